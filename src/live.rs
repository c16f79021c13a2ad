//! The part of the shared state a reload replaces: the configuration, users
//! (with their SCRAM secrets), databases, TLS, and the per-database routing
//! state, counters and pause switches. Readers take a snapshot with
//! `Shared::live()`; RELOAD and SIGHUP swap in a new one atomically, so
//! connected clients carry on and new work sees the new settings.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::User;
use crate::config::{Config, DatabaseConfig, PoolMode, Problem};
use crate::router::Router;
use crate::stats::DbStats;

/// One generation of the reloadable state.
pub struct Live {
    pub config: Config,
    pub users: HashMap<String, Arc<User>>,
    pub databases: HashMap<String, Arc<DatabaseConfig>>,
    pub tls: Option<TlsAcceptor>,
    /// Routing state (server health, replay positions, function volatility) per database.
    pub routers: HashMap<String, Arc<Router>>,
    /// Traffic counters per database.
    pub stats: HashMap<String, Arc<DbStats>>,
    /// `PAUSE`d databases: new transactions wait until `RESUME`.
    pub paused: HashMap<String, Arc<watch::Sender<bool>>>,
    /// The switches of databases a reload removed (see `build`).
    retired_paused: HashMap<String, Arc<watch::Sender<bool>>>,
}

impl Live {
    /// Builds the state for `config`, keeping from `previous` whatever is
    /// still valid: users whose passwords did not change (their secrets cost
    /// 4096 hash rounds each), and the routers, counters and pause switches of
    /// databases whose servers did not change.
    pub fn build(config: Config, previous: Option<&Live>) -> Result<Live, Vec<Problem>> {
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose().map_err(|e| {
            vec![Problem {
                key: "tls".to_owned(),
                message: e.to_string(),
            }]
        })?;
        let users = config
            .users
            .iter()
            .map(|u| {
                let server_password = u.server_password.as_deref().unwrap_or(&u.password);
                let kept = previous
                    .and_then(|p| p.users.get(&u.name))
                    .zip(previous.and_then(|p| p.config.users.iter().find(|o| o.name == u.name)))
                    .filter(|(old, cfg)| cfg.password == u.password && old.server_password == server_password)
                    .map(|(old, _)| old.clone());
                let user =
                    kept.unwrap_or_else(|| Arc::new(User::new(&u.name, &u.password, u.server_password.as_deref())));
                (u.name.clone(), user)
            })
            .collect();
        let mut routers = HashMap::new();
        let mut stats = HashMap::new();
        let mut paused = HashMap::new();
        for db in &config.databases {
            let same = previous
                .and_then(|p| p.databases.get(&db.name))
                .is_some_and(|old| old.primary == db.primary && old.replicas == db.replicas);
            let prev = previous.filter(|_| same);
            routers.insert(
                db.name.clone(),
                prev.and_then(|p| p.routers.get(&db.name).cloned())
                    .unwrap_or_else(|| Arc::new(Router::new(db.replicas.len()))),
            );
            stats.insert(
                db.name.clone(),
                previous
                    .and_then(|p| p.stats.get(&db.name).cloned())
                    .unwrap_or_default(),
            );
            paused.insert(
                db.name.clone(),
                previous
                    .and_then(|p| p.paused.get(&db.name).or_else(|| p.retired_paused.get(&db.name)))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(watch::channel(false).0)),
            );
        }
        // Sessions keep their database's switch: one removed and added again
        // gets the same switch back, so PAUSE still reaches them.
        let mut retired_paused = HashMap::new();
        if let Some(p) = previous {
            for (name, switch) in p.paused.iter().chain(&p.retired_paused) {
                if !paused.contains_key(name) {
                    retired_paused.insert(name.clone(), switch.clone());
                }
            }
        }
        Ok(Live {
            users,
            databases: config
                .databases
                .iter()
                .map(|d| (d.name.clone(), Arc::new(d.clone())))
                .collect(),
            tls,
            routers,
            stats,
            paused,
            retired_paused,
            config,
        })
    }

    /// The user health monitors log in as: the first configured one.
    pub fn monitor_user(&self) -> Option<&Arc<User>> {
        self.config.users.first().and_then(|u| self.users.get(&u.name))
    }

    /// Whether `db` has a health monitor that logs in and checks every server
    /// (its reads may go to replicas), rather than a probe of its primary
    /// (`router::health::watch_primary`). Only then is its health known.
    pub fn monitors_replicas(&self, db: &DatabaseConfig) -> bool {
        self.config.routing.read_write_split
            && self.config.pool.mode == PoolMode::Transaction
            && !db.replicas.is_empty()
            && self.monitor_user().is_some()
    }
}
