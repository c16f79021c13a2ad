//! The set of pools, created on first use and keyed by (database, user, server).

use std::collections::HashMap;
use std::fmt;
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
    settings: PoolSettings,
}

impl Pools {
    /// An empty set; every pool gets `settings`.
    pub fn new(settings: PoolSettings) -> Pools {
        Pools {
            map: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            settings,
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
        let permits = self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.addr.clone(), key.user.clone()))
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.size)))
            .clone();
        self.map()
            .entry(key)
            .or_insert_with_key(|k| Arc::new(Pool::with_limit(k.clone(), target(), self.settings.clone(), permits)))
            .clone()
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
