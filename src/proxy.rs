//! A running proxy: the state every session shares, and the handle that starts
//! and stops it. Several proxies can run in one process (tests do).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::User;
use crate::config::{Config, DatabaseConfig, Problem, ServerAddr};
use crate::listener::{self, ClientGauge};
use crate::live::Live;
use crate::pool::{Pool, PoolKey, PoolSettings, Pools, Role};
use crate::server_conn::LoginTarget;
use crate::session::CancelRegistry;

/// State shared by the listener and every session of one proxy.
pub struct Shared {
    /// What a reload replaces (configuration, users, databases, TLS, ...).
    live: ArcSwap<Live>,
    /// `pool.max_prepared_statements` of `live`, which sessions consult
    /// for most client messages: one plain load instead of a guarded one.
    pub max_prepared: AtomicUsize,
    /// The file RELOAD and SIGHUP re-read, when the proxy was started from one.
    config_path: Mutex<Option<PathBuf>>,
    /// When the proxy started (for per-second averages).
    pub started: std::time::Instant,
    pub pools: Pools,
    /// TLS to the servers (`[server_tls]`), replaced by a reload.
    server_tls: crate::tls::ServerTlsSetting,
    pub cancels: CancelRegistry,
    /// Becomes `true` when a graceful shutdown starts.
    pub shutdown: watch::Receiver<bool>,
    /// Starts a graceful shutdown (signals, the admin console's SHUTDOWN).
    pub shutdown_tx: watch::Sender<bool>,
    pub clients: ClientGauge,
    /// Databases DISABLEd from the console: new clients are refused.
    pub disabled: Mutex<std::collections::HashSet<String>>,
    /// Errors the proxy reported, by kind.
    pub errors: crate::stats::ErrorCounts,
    /// Logged-in clients, for SHOW CLIENTS and KILL.
    pub registry: crate::clients::Clients,
    /// Reloads applied and refused, for metrics.
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Background tasks (health monitors) to stop at shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    next_session_id: AtomicU64,
    /// Held by a reload from start to end.
    reloading: Mutex<()>,
}

/// The connector to the servers from `[server_tls]` (its files read now),
/// or the problem, keyed as validation reports it.
fn server_tls(config: &Config) -> Result<crate::tls::ServerTls, Vec<Problem>> {
    crate::tls::server_connector(&config.server_tls).map_err(|e| {
        vec![Problem {
            key: "server_tls".to_owned(),
            message: e.to_string(),
        }]
    })
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
        // The password of the configuration in force, not of the caller's copy:
        // a client that logged in across a reload which changed it must not
        // make a pool with the old one (the reload forgets that user's pools
        // after storing the new configuration).
        let password = match self.live().users.get(&user.name) {
            Some(current) => current.server_password.clone(),
            None => user.server_password.clone(),
        };
        let standby = role == Role::Replica;
        self.pools.get(key, || LoginTarget {
            addr: addr.clone(),
            dbname: db.server_dbname().to_owned(),
            user: user.name.clone(),
            password,
            tls: self.server_tls.clone(),
            salted: Default::default(),
            serializable_conns: standby.then(Default::default),
        })
    }

    /// The current configuration and what was built from it, for a quick
    /// look (do not hold it across an await: see [`Shared::snapshot`]).
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// The current configuration as an owned snapshot, to keep across awaits.
    pub fn snapshot(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Re-reads the configuration file and applies it without dropping
    /// clients: users and passwords, databases added or removed, pool sizes,
    /// routing, TLS and limits. An invalid file changes nothing; its problems
    /// are returned (and logged).
    pub fn reload(self: &Arc<Self>) -> Result<(), Vec<Problem>> {
        let outcome = self.try_reload();
        match &outcome {
            Ok(()) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!("configuration reloaded");
            }
            Err(problems) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                for p in problems {
                    tracing::error!(key = %p.key, problem = %p.message, "reload refused; keeping the running configuration");
                }
            }
        }
        outcome
    }

    /// [`Shared::reload`] on tokio's blocking pool: it reads files and derives
    /// the SCRAM secrets of new or changed passwords (about 1 ms each), which
    /// must not hold up a worker thread, least of all the only one
    /// (`proxy.workers = 1`).
    pub async fn reload_off_thread(self: &Arc<Self>) -> Result<(), Vec<Problem>> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || shared.reload())
            .await
            .unwrap_or_else(|e| {
                Err(vec![Problem {
                    key: "(reload)".to_owned(),
                    message: format!("the reload did not finish: {e}"),
                }])
            })
    }

    fn try_reload(self: &Arc<Self>) -> Result<(), Vec<Problem>> {
        // SIGHUP and the console's RELOAD may come together: one at a time.
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.config_path.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(path) = path else {
            return Err(vec![Problem {
                key: "(reload)".to_owned(),
                message: "the proxy was not started from a configuration file".to_owned(),
            }]);
        };
        let config = Config::load(&path)?;
        let old = self.live.load_full();
        if config.proxy.listen != old.config.proxy.listen
            || config.proxy.metrics_listen != old.config.proxy.metrics_listen
        {
            tracing::warn!("listen addresses changed: they take effect at the next restart");
        }
        if config.proxy.workers != old.config.proxy.workers {
            tracing::warn!("proxy.workers changed: it takes effect at the next restart");
        }
        // Read again whether or not the section changed: a CA file may have
        // been replaced in place.
        let server_tls = server_tls(&config)?;
        let live = Arc::new(Live::build(config, Some(&old))?);
        self.pools.resize(PoolSettings::from(&live.config));
        self.live.store(live.clone());
        self.max_prepared
            .store(live.config.pool.max_prepared_statements, Ordering::Relaxed);
        // Server passwords changed: those users' pools start afresh. After the
        // store, so a pool made meanwhile (with the old password) is forgotten
        // too, and every later one has the new password.
        for (name, user) in &live.users {
            if old
                .users
                .get(name)
                .is_some_and(|o| o.server_password != user.server_password)
            {
                self.pools.forget_user(name);
            }
        }
        if self.server_tls.replace(server_tls) {
            // Nothing opened under the old setting is used again: each
            // pool (also those of sessions and monitors that a reload
            // removed from the map) drops such a connection at its next
            // checkout or checkin; the idle ones of current pools close now.
            for pool in self.pools.all() {
                pool.close_idle();
            }
            tracing::info!(
                sslmode = live.config.server_tls.sslmode.as_str(),
                "[server_tls] changed: server connections are opened afresh"
            );
        }
        self.spawn_monitors(&live, Some(&old));
        Ok(())
    }

    /// Records the file the configuration came from, for RELOAD and SIGHUP.
    pub fn set_config_path(&self, path: PathBuf) {
        *self.config_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// Starts a watch for each database that did not have one of the right
    /// kind under `previous`. Where reads may go to replicas, a health monitor that logs
    /// in as the first configured user and checks every server; elsewhere a
    /// probe of the primary that does not log in, to release the sessions
    /// stuck on it when it freezes.
    fn spawn_monitors(self: &Arc<Self>, live: &Arc<Live>, previous: Option<&Live>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for (name, db) in live.databases.iter() {
            let router = live.routers[name].clone();
            let full = live.monitors_replicas(db);
            // The watch of the same router goes on, unless it must change
            // kind (splitting or the pool mode changed): the old one then ends.
            // A monitor logs in: it restarts, with new pools, when its user or
            // that user's password changed.
            let same_login = |p: &Live| match (p.monitor_user(), live.monitor_user()) {
                (Some(a), Some(b)) => a.name == b.name && a.server_password == b.server_password,
                (None, None) => true,
                _ => false,
            };
            let kept = previous.is_some_and(|p| {
                p.routers.get(name).is_some_and(|r| Arc::ptr_eq(r, &router))
                    && p.databases.get(name).is_some_and(|d| p.monitors_replicas(d) == full)
                    && (!full || same_login(p))
            });
            if kept {
                continue;
            }
            // The watch started before over this router, if any, ends.
            let epoch = router.watch_epoch.fetch_add(1, Ordering::AcqRel) + 1;
            match live.monitor_user() {
                Some(user) if full => {
                    let monitor = crate::router::health::monitor(self.clone(), db.clone(), user.clone(), router, epoch);
                    tasks.push(tokio::spawn(monitor));
                }
                _ => tasks.push(tokio::spawn(crate::router::health::watch_primary(
                    self.clone(),
                    db.clone(),
                    router,
                    epoch,
                ))),
            }
        }
    }

    /// Starts a graceful shutdown: the listener and logins see the watch,
    /// logged-in sessions their signal.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        for client in self.registry.all() {
            client.signal(crate::clients::SIGNAL_SHUTDOWN);
        }
    }

    /// Whether new clients of `db` are refused (DISABLE).
    pub fn is_disabled(&self, db: &str) -> bool {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner()).contains(db)
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
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Config(Vec<Problem>),
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
        let settings = PoolSettings::from(&config);
        let cancel_timeout = config.pool.server_connect_timeout;
        let server_tls = server_tls(&config).map_err(StartError::Config)?;
        let live = Arc::new(Live::build(config, None).map_err(StartError::Config)?);
        let shared = Arc::new(Shared {
            live: ArcSwap::new(live.clone()),
            max_prepared: AtomicUsize::new(live.config.pool.max_prepared_statements),
            config_path: Mutex::new(None),
            started: std::time::Instant::now(),
            pools: Pools::new(settings),
            server_tls: server_tls.into(),
            cancels: CancelRegistry::new(cancel_timeout),
            shutdown: shutdown_rx,
            shutdown_tx,
            clients: ClientGauge::default(),
            registry: Default::default(),
            errors: Default::default(),
            disabled: Default::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            next_session_id: AtomicU64::new(0),
            reloading: Mutex::new(()),
        });
        let accept = tokio::spawn(listener::accept_loop(listener, shared.clone()));
        let mut tasks = vec![accept, tokio::spawn(maintain(shared.clone()))];
        if let Some((listener, _)) = metrics {
            tasks.push(tokio::spawn(crate::metrics::serve(listener, shared.clone())));
        }
        shared.spawn_monitors(&live, None);
        let runtime = tokio::runtime::Handle::current();
        let workers = runtime.metrics().num_workers();
        let scheduler = match runtime.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "single-threaded",
            _ => "multi-threaded",
        };
        tracing::info!(%addr, workers, scheduler, "dbproxy listening");
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
        self.shared.begin_shutdown();
        let timeout = self.shared.live().config.proxy.shutdown_timeout;
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
        for task in self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            task.abort();
        }
        drained
    }
}

/// Periodic housekeeping: closes expired idle server connections.
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut peak = 0;
    loop {
        tick.tick().await;
        shared.pools.prune_idle();
        // When many clients have left, hand their freed buffers back to the
        // system: glibc keeps freed memory in its per-thread arenas otherwise
        // (measured: RSS stayed at its 5,000-client peak after they all left).
        let now = shared.clients.count();
        peak = peak.max(now);
        if peak - now >= 100 && now < peak / 4 * 3 {
            peak = now;
            tokio::task::spawn_blocking(release_free_memory);
        }
    }
}

/// Returns free heap memory to the operating system where the allocator
/// keeps it (glibc); elsewhere a no-op.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions: it walks the allocator's own
    // free lists under the arena locks it takes itself.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
