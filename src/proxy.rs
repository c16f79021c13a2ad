//! A running proxy: the state every session shares, and the handle that starts
//! and stops it. Several proxies can run in one process (tests do).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::auth::User;
use crate::config::{Config, DatabaseConfig, PoolMode, ServerAddr};
use crate::listener::{self, ClientGauge};
use crate::pool::{Pool, PoolKey, PoolSettings, Pools, Role};
use crate::router::Router;
use crate::server_conn::LoginTarget;
use crate::session::CancelRegistry;
use crate::stats::DbStats;

/// State shared by the listener and every session of one proxy.
pub struct Shared {
    pub config: Config,
    pub users: HashMap<String, Arc<User>>,
    pub databases: HashMap<String, Arc<DatabaseConfig>>,
    /// Routing state (server health, replay positions, function volatility) per database.
    pub routers: HashMap<String, Arc<Router>>,
    /// Traffic counters per database.
    pub stats: HashMap<String, Arc<DbStats>>,
    /// `PAUSE`d databases: new transactions wait until `RESUME`.
    pub paused: HashMap<String, watch::Sender<bool>>,
    /// When the proxy started (for per-second averages).
    pub started: std::time::Instant,
    pub pools: Pools,
    pub cancels: CancelRegistry,
    pub tls: Option<TlsAcceptor>,
    /// Becomes `true` when a graceful shutdown starts.
    pub shutdown: watch::Receiver<bool>,
    /// Starts a graceful shutdown (signals, the admin console's SHUTDOWN).
    pub shutdown_tx: watch::Sender<bool>,
    pub clients: ClientGauge,
    next_session_id: AtomicU64,
}

impl Shared {
    /// The pool of server connections to `addr` for `db` as `user`.
    pub fn pool(&self, db: &DatabaseConfig, user: &User, role: Role, addr: &ServerAddr) -> Arc<Pool> {
        let key = PoolKey {
            database: db.name.clone(),
            user: user.name.clone(),
            addr: addr.clone(),
            role,
        };
        self.pools.get(key, || LoginTarget {
            addr: addr.clone(),
            dbname: db.server_dbname().to_owned(),
            user: user.name.clone(),
            password: user.server_password.clone(),
        })
    }

    /// A new session number, for logs and the admin console.
    pub fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("invalid [tls] configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A started proxy.
pub struct Proxy {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Binds the listener and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let listen = config.proxy.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen { addr: listen, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Listen { addr: listen, source })?;
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let metrics = match config.proxy.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Metrics { addr, source })?;
                let bound = l.local_addr().map_err(|source| StartError::Metrics { addr, source })?;
                Some((l, bound))
            }
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|(_, a)| *a);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            users: config
                .users
                .iter()
                .map(|u| {
                    let user = User::new(&u.name, &u.password, u.server_password.as_deref());
                    (u.name.clone(), Arc::new(user))
                })
                .collect(),
            databases: config
                .databases
                .iter()
                .map(|d| (d.name.clone(), Arc::new(d.clone())))
                .collect(),
            stats: config
                .databases
                .iter()
                .map(|d| (d.name.clone(), Arc::default()))
                .collect(),
            paused: config
                .databases
                .iter()
                .map(|d| (d.name.clone(), watch::channel(false).0))
                .collect(),
            started: std::time::Instant::now(),
            routers: config
                .databases
                .iter()
                .map(|d| (d.name.clone(), Arc::new(Router::new(d.replicas.len()))))
                .collect(),
            pools: Pools::new(PoolSettings {
                size: config.pool.size,
                connect_timeout: config.pool.server_connect_timeout,
                idle_timeout: config.pool.server_idle_timeout,
            }),
            cancels: CancelRegistry::new(config.pool.server_connect_timeout),
            tls,
            shutdown: shutdown_rx,
            shutdown_tx,
            clients: ClientGauge::default(),
            next_session_id: AtomicU64::new(0),
            config,
        });
        let accept = tokio::spawn(listener::accept_loop(listener, shared.clone()));
        let mut tasks = vec![accept, tokio::spawn(maintain(shared.clone()))];
        if let Some((listener, _)) = metrics {
            tasks.push(tokio::spawn(crate::metrics::serve(listener, shared.clone())));
        }
        // Health checks log in as the first configured user; they serve routing,
        // so they run where reads may go to replicas.
        let monitored = shared.config.routing.read_write_split && shared.config.pool.mode == PoolMode::Transaction;
        let user = shared
            .config
            .users
            .first()
            .and_then(|u| shared.users.get(&u.name))
            .cloned();
        if let (true, Some(user)) = (monitored, user) {
            for (name, db) in shared.databases.iter().filter(|(_, db)| !db.replicas.is_empty()) {
                let router = shared.routers[name].clone();
                let monitor = crate::router::health::monitor(shared.clone(), db.clone(), user.clone(), router);
                tasks.push(tokio::spawn(monitor));
            }
        }
        tracing::info!(%addr, "dbproxy listening");
        Ok(Proxy {
            addr,
            metrics_addr,
            shared,
            tasks,
        })
    }

    /// The address clients connect to (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state, for inspection.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when a graceful shutdown was requested from inside (the admin
    /// console's SHUTDOWN).
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shared.shutdown.clone();
        let _ = rx.wait_for(|&s| s).await;
    }

    /// Graceful shutdown: stop accepting, let transactions in flight finish,
    /// close idle clients with 57P01, and return once every client is gone or
    /// `proxy.shutdown_timeout` has passed. Returns whether all clients left.
    pub async fn shutdown(self) -> bool {
        let _ = self.shared.shutdown_tx.send(true);
        let timeout = self.shared.config.proxy.shutdown_timeout;
        let drained = tokio::time::timeout(timeout, self.shared.clients.wait_zero())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                remaining = self.shared.clients.count(),
                "shutdown timeout reached with clients still connected"
            );
        }
        for task in &self.tasks {
            task.abort();
        }
        drained
    }
}

/// Periodic housekeeping: closes expired idle server connections.
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        shared.pools.prune_idle();
    }
}
