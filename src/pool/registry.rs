//! The set of pools, created on first use and keyed by (database, user, server).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{Pool, PoolSettings};
use crate::config::ServerAddr;
use crate::server_conn::LoginTarget;

/// The role a server plays for a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Primary,
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// Identifies one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub addr: ServerAddr,
    pub role: Role,
}

/// All pools of one proxy.
#[derive(Debug)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// One bound per (server, user), shared by the pools of every database
    /// that logs in to that server as that user.
    limits: Mutex<HashMap<(ServerAddr, String), Arc<Semaphore>>>,
    /// Connections in use per server, across all its pools.
    server_active: Mutex<HashMap<ServerAddr, Arc<AtomicUsize>>>,
    settings: Mutex<PoolSettings>,
}

impl Pools {
    /// An empty set; every pool gets `settings`.
    pub fn new(settings: PoolSettings) -> Pools {
        Pools {
            map: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            server_active: Mutex::new(HashMap::new()),
            settings: Mutex::new(settings),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        // Inserting into a HashMap cannot leave it inconsistent on panic.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool for `key`, created with `target` on first use.
    pub fn get(&self, key: PoolKey, target: impl FnOnce() -> LoginTarget) -> Arc<Pool> {
        if let Some(pool) = self.map().get(&key) {
            return pool.clone();
        }
        let settings = self.settings.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let permits = self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.addr.clone(), key.user.clone()))
            .or_insert_with(|| Arc::new(Semaphore::new(settings.size)))
            .clone();
        let server_active = self
            .server_active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.addr.clone())
            .or_default()
            .clone();
        self.map()
            .entry(key)
            .or_insert_with_key(|k| Arc::new(Pool::with_limit(k.clone(), target(), settings, permits, server_active)))
            .clone()
    }

    /// Applies new settings: every bound grows at once, or shrinks as
    /// connections come back (nothing in use is taken away); new pools get
    /// the new timeouts.
    pub fn resize(&self, new: PoolSettings) {
        let old = std::mem::replace(
            &mut *self.settings.lock().unwrap_or_else(|e| e.into_inner()),
            new.clone(),
        );
        if new.size == old.size {
            return;
        }
        for permits in self.limits.lock().unwrap_or_else(|e| e.into_inner()).values() {
            if new.size > old.size {
                permits.add_permits(new.size - old.size);
            } else {
                let permits = permits.clone();
                let fewer = (old.size - new.size) as u32;
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many_owned(fewer).await {
                        p.forget();
                    }
                });
            }
        }
    }

    /// Drops `user`'s pools (its server password changed); connections in
    /// use finish with the old pool, new ones log in afresh.
    pub fn forget_user(&self, user: &str) {
        self.map().retain(|k, _| k.user != user);
    }

    /// Every pool, sorted by key.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<_> = self.map().values().cloned().collect();
        pools.sort_by(|a, b| a.key.cmp(&b.key));
        pools
    }

    /// Closes idle connections that expired or died, in every pool.
    pub fn prune_idle(&self) {
        for pool in self.all() {
            pool.prune_idle();
        }
    }
}
