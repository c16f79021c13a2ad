//! Bounded pools of server connections, one per (database, user, server).
//!
//! The bound is a fair (FIFO) semaphore with `pool.size` permits: a checked-out
//! connection holds a permit, and a new connection is only opened by a holder
//! of a permit when no idle one is left, so a server never sees more than
//! `size` connections from one pool. Idle connections are reused
//! most-recent-first; dead ones are detected without a round trip and replaced.

mod registry;

use std::collections::HashSet;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::server_conn::{LoginTarget, ServerConn, ServerError, ServerParams};

pub use registry::{PoolKey, Pools, Role};

/// Why no server connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("timeout: no server connection to {addr} became available within {waited:?} (pool.size = {size})")]
    Timeout {
        addr: String,
        waited: Duration,
        size: usize,
    },
    #[error(transparent)]
    Connect(#[from] ServerError),
}

/// Pool settings, from `[pool]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl From<&crate::config::Config> for PoolSettings {
    fn from(c: &crate::config::Config) -> Self {
        PoolSettings {
            size: c.pool.size,
            connect_timeout: c.pool.server_connect_timeout,
            idle_timeout: c.pool.server_idle_timeout,
        }
    }
}

/// Live counters, read by the admin console and metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Connections handed out right now.
    pub active: AtomicUsize,
    /// Clients waiting for a connection right now.
    pub waiting: AtomicUsize,
    /// Connections being opened right now.
    pub connecting: AtomicUsize,
}

/// One bounded pool.
#[derive(Debug)]
pub struct Pool {
    pub key: PoolKey,
    target: LoginTarget,
    settings: PoolSettings,
    permits: Arc<Semaphore>,
    #[expect(clippy::vec_box, reason = "boxed so a checkout moves a pointer, not the connection")]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// Server-side statement names some server of this pool accepted a Parse
    /// for: a client's Parse of one of these can be answered without a server.
    known_statements: Mutex<HashSet<Arc<str>>>,
    /// Bumped by RECONNECT: connections opened before are closed when given back.
    generation: AtomicUsize,
    /// ParameterStatus values of the newest connection, shown to clients at login.
    server_params: Mutex<Option<ServerParams>>,
    pub stats: PoolStats,
    /// Connections handed out right now by every pool of this server (all
    /// users and databases): what `least_connections` compares.
    server_active: Arc<AtomicUsize>,
}

impl Pool {
    /// A pool with no connections yet and a bound of its own.
    pub fn new(key: PoolKey, target: LoginTarget, settings: PoolSettings) -> Pool {
        let permits = Arc::new(Semaphore::new(settings.size));
        Pool::with_limit(key, target, settings, permits, Default::default())
    }

    /// A pool whose bound (`permits`) may be shared with other pools: every
    /// pool logging in to the same server as the same user shares one; and
    /// whose count of connections in use adds to `server_active`, shared by
    /// every pool of the same server.
    pub fn with_limit(
        key: PoolKey,
        target: LoginTarget,
        settings: PoolSettings,
        permits: Arc<Semaphore>,
        server_active: Arc<AtomicUsize>,
    ) -> Pool {
        Pool {
            key,
            target,
            permits,
            settings,
            idle: Mutex::new(Vec::new()),
            known_statements: Mutex::new(HashSet::new()),
            generation: AtomicUsize::new(0),
            server_params: Mutex::new(None),
            stats: PoolStats::default(),
            server_active,
        }
    }

    /// Connections to this pool's server in use now, through any pool.
    pub fn server_active(&self) -> usize {
        self.server_active.load(Ordering::Relaxed)
    }

    /// Counts a connection handed out.
    fn hand_out(&self) {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.server_active.fetch_add(1, Ordering::Relaxed);
    }

    /// What the servers of this pool last reported in ParameterStatus, if any
    /// connection was ever made.
    pub fn server_params(&self) -> Option<ServerParams> {
        self.server_params.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a connection of this pool, open now, runs transactions at
    /// SERIALIZABLE unless told otherwise, which a standby refuses for reads
    /// (see [`LoginTarget::serializable_conns`]).
    pub fn serializable_default(&self) -> bool {
        self.target
            .serializable_conns
            .as_ref()
            .is_some_and(|n| n.load(Ordering::Relaxed) > 0)
    }

    /// Whether a server of this pool accepted this statement before.
    pub fn knows_statement(&self, name: &str) -> bool {
        self.known_statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// Records statements a server accepted. Bounded: a client that invents
    /// statements without end only resets the record.
    pub fn learn_statements(&self, names: impl IntoIterator<Item = Arc<str>>) {
        const MAX_KNOWN: usize = 10_000;
        let mut known = self.known_statements.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
            known.insert(name);
        }
    }

    /// The idle connections' backend pids, and whether each is encrypted.
    pub fn idle_backends(&self) -> Vec<(i32, bool)> {
        self.idle_list()
            .iter()
            .map(|c| (c.process_id, c.stream.is_tls()))
            .collect()
    }

    /// Number of idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle_list().len()
    }

    #[expect(clippy::vec_box, reason = "see `idle`")]
    fn idle_list(&self) -> std::sync::MutexGuard<'_, Vec<Box<ServerConn>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands out a connection, waiting up to `wait` for a free slot (first come,
    /// first served), then reusing an idle connection or opening a new one.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Checkout, CheckoutError> {
        // A free slot needs no timer; only waiters pay for one.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Ok(Ok(p)),
            Err(_) => {
                let _waiting = Gauge::raise(&self.stats.waiting);
                tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await
            }
        };
        let permit = match permit {
            Ok(Ok(p)) => p,
            // The semaphore is never closed; treat it like a timeout if it were.
            Ok(Err(_)) | Err(_) => {
                return Err(CheckoutError::Timeout {
                    addr: self.target.addr.to_string(),
                    waited: wait,
                    size: self.settings.size,
                });
            }
        };
        let conn = match self.pop_idle() {
            Some(conn) => conn,
            None => {
                let connecting = Gauge::raise(&self.stats.connecting);
                // Before connecting: a RECONNECT during the login makes this one stale.
                let generation = self.generation.load(Ordering::Acquire);
                // Boxed: a login is a large future, and every checkout that
                // waits for a slot would otherwise carry (and copy) it.
                let conn = Box::pin(ServerConn::connect(&self.target, self.settings.connect_timeout)).await;
                drop(connecting);
                let mut conn = conn?;
                conn.generation = generation;
                *self.server_params.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.params.clone());
                Box::new(conn)
            }
        };
        self.hand_out();
        Ok(Checkout {
            conn,
            slot: Slot {
                pool: self.clone(),
                _permit: permit,
            },
        })
    }

    /// An idle connection, if a slot is free and one is there: the common
    /// case of [`Self::checkout`], without waiting or connecting.
    pub fn try_checkout(self: &Arc<Self>) -> Option<Checkout> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let conn = self.pop_idle()?;
        self.hand_out();
        Some(Checkout {
            conn,
            slot: Slot {
                pool: self.clone(),
                _permit: permit,
            },
        })
    }

    fn pop_idle(&self) -> Option<Box<ServerConn>> {
        let mut idle = self.idle_list();
        while let Some(mut conn) = idle.pop() {
            if self.is_current(&conn) && conn.is_alive() && conn.last_used.elapsed() < self.settings.idle_timeout {
                return Some(conn);
            }
            tracing::debug!(server = %conn.addr(), pid = conn.process_id, "discarding dead or expired idle server connection");
        }
        None
    }

    /// Whether `conn` may be reused: opened since the last RECONNECT, under
    /// the `[server_tls]` setting in force (a reload may have replaced it).
    fn is_current(&self, conn: &ServerConn) -> bool {
        !self.close_needed(conn.generation, conn.tls_epoch)
    }

    /// Whether a connection opened at `generation` under `[server_tls]`
    /// epoch `tls_epoch` is to be closed when given back (SHOW SERVERS'
    /// `close_needed`, WAIT_CLOSE).
    pub fn close_needed(&self, generation: usize, tls_epoch: u64) -> bool {
        generation < self.generation.load(Ordering::Acquire) || tls_epoch != self.target.tls.epoch()
    }

    /// RECONNECT: idle connections close now, those in use when given back.
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.close_idle();
    }

    /// Closes every idle connection (KILL).
    pub fn close_idle(&self) {
        self.idle_list().clear();
    }

    /// Closes idle connections unused for longer than `server_idle_timeout`
    /// or found dead.
    pub fn prune_idle(&self) {
        let timeout = self.settings.idle_timeout;
        self.idle_list()
            .retain_mut(|c| c.is_alive() && c.last_used.elapsed() < timeout);
    }
}

/// A checked-out server connection. Give it back with [`Checkout::checkin`];
/// dropping it instead closes the connection (the server then rolls back
/// anything left open) and frees the slot.
#[derive(Debug)]
pub struct Checkout {
    /// Boxed: it moves between the pool and a session on every checkout.
    pub conn: Box<ServerConn>,
    slot: Slot,
}

/// The pool slot a checkout occupies; freed on drop.
#[derive(Debug)]
struct Slot {
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.pool.server_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Checkout {
    /// The pool this connection belongs to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.slot.pool
    }

    /// Closes a connection that was abandoned mid-request, keeping its slot
    /// until the backend has really gone, so the server never sees more than
    /// `size` backends: asks it to terminate, cancels what it runs, and waits
    /// for it to hang up.
    pub async fn abandon(self, cancel_timeout: Duration) {
        let Checkout { mut conn, slot } = self;
        let key = conn.cancel_key();
        let work = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            conn.stream.write_all(b"X\0\0\0\x04").await?;
            let _ = crate::server_conn::send_cancel(&key, cancel_timeout).await;
            let mut sink = [0u8; 4096];
            while conn.stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(cancel_timeout, work).await;
        drop(slot);
    }

    /// Returns a clean connection (idle, nothing in flight) for reuse.
    pub fn checkin(self) {
        let Checkout { mut conn, slot } = self;
        if !slot.pool.is_current(&conn) {
            // RECONNECT, or a new [server_tls], asked for fresh connections: this one closes.
            return;
        }
        conn.last_used = Instant::now();
        // Push before the slot is freed so the next holder finds it.
        slot.pool.idle_list().push(conn);
        drop(slot);
    }
}

/// One unit of a gauge for as long as it lives: a checkout dropped while it
/// waits or connects (a caller's timeout) still takes itself off the gauge,
/// and a connection counted in its pool (see `ServerState::default_serializable`)
/// leaves the count when it is closed. `D`: a borrow of the gauge, or a share.
#[derive(Debug)]
pub struct Gauge<D: Deref<Target = AtomicUsize>>(D);

impl<D: Deref<Target = AtomicUsize>> Gauge<D> {
    pub fn raise(gauge: D) -> Gauge<D> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl<D: Deref<Target = AtomicUsize>> Drop for Gauge<D> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
