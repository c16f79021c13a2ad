//! Health and replication position of each server, kept current by one
//! monitor task per database, using connections from the pools (so they count
//! towards `pool.size`). A replica that refuses connections, errors or lags
//! more than `routing.max_replica_lag` leaves the rotation at the next check;
//! it rejoins by itself once a check succeeds again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Router, Volatility};
use crate::auth::User;
use crate::config::{DatabaseConfig, ServerAddr};
use crate::pool::{CheckoutError, Pool, Role};
use crate::proxy::Shared;
use crate::server_stream::Endpoint;

/// How often the function catalog is re-read without a reason to.
const FUNCTION_REFRESH: Duration = Duration::from_secs(60);

/// What the monitor last learnt about one server.
#[derive(Debug, Default)]
pub struct ServerHealth {
    pub(super) healthy: AtomicBool,
    /// WAL position: replayed (replica) or written (primary).
    pub(super) lsn: AtomicU64,
    /// Replication lag, in milliseconds (0 for the primary).
    lag_ms: AtomicU64,
    /// The server's role is not the configured one: a replica that left
    /// recovery (promoted), or a primary in recovery.
    wrong_role: AtomicBool,
    /// Checks in a row that timed out. From the second on, the monitor
    /// signals the database's sessions ([`crate::clients::SIGNAL_SERVER_STUCK`])
    /// at each check, and those waiting on this server for longer than the
    /// check timeout give up on it (see [`ServerHealth::is_stuck`]).
    timeouts: std::sync::atomic::AtomicU32,
}

impl ServerHealth {
    /// In rotation.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Last known WAL position.
    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Acquire)
    }

    /// Last known lag.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }

    /// Its last two checks or more timed out.
    pub fn is_stuck(&self) -> bool {
        self.timeouts.load(Ordering::Acquire) >= 2
    }

    /// Takes the server out of rotation (a connection to it just failed).
    pub fn mark_down(&self) {
        self.healthy.store(false, Ordering::Release);
    }
}

/// Parses a `pg_lsn` ("16/B374D848").
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Runs `select` in a READ COMMITTED transaction: a role or database whose
/// transactions default to SERIALIZABLE would make every read on a standby
/// fail. (If the SELECT fails, the query fails and the connection is closed.)
macro_rules! read_committed {
    ($select:literal) => {
        concat!("BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY; ", $select, "; COMMIT")
    };
}

const CHECK_SQL: &str = read_committed!(
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     COALESCE((EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 0), \
     pg_is_in_recovery()"
);

/// What one check found.
enum Verdict {
    /// Answered: WAL position, ms since the last replayed transaction, and
    /// whether the server is a standby.
    Up(u64, u64, bool),
    /// Refused connections or failed the query.
    Down,
    /// Did not answer within the timeout (frozen, or far too slow).
    Unresponsive,
    /// The pool was busy: no verdict.
    Busy,
}

/// One check of the server behind `pool`.
async fn check(pool: Arc<Pool>, timeout: Duration) -> Verdict {
    // A busy pool must give "no verdict" before the check itself times out.
    let wait = timeout / 4;
    let work = async {
        let mut conn = match pool.checkout(wait).await {
            Ok(c) => c,
            Err(CheckoutError::Timeout { .. }) => return Verdict::Busy,
            Err(CheckoutError::Connect(e)) => {
                tracing::debug!(error = %e, "health check: cannot connect");
                return Verdict::Down;
            }
        };
        match conn.conn.query_rows(CHECK_SQL).await {
            Ok(rows) => {
                let row = rows.first();
                let field = |i: usize| row.and_then(|r| r.get(i)).and_then(|v| v.as_deref());
                let lsn = field(0).and_then(parse_lsn).unwrap_or(0);
                let since = field(1).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0).max(0) as u64;
                let standby = field(2) == Some("t");
                conn.checkin();
                Verdict::Up(lsn, since, standby)
            }
            Err(e) => {
                tracing::debug!(error = %e, "health check query failed");
                Verdict::Down
            }
        }
    };
    // A connection dropped here mid-check is closed; a frozen backend sees
    // the hang-up (and ends) once it runs again.
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Verdict::Unresponsive)
}

/// Whether the server at `addr` answers at all, without logging in (so it
/// costs no pool slot; see [`probe`]). Used when the pool is too busy for a
/// check: a frozen server's clients hold every connection, and must not keep
/// the verdict away. `None`: no verdict (the server could not be reached at
/// all, which its sessions' own sockets report).
async fn answers(addr: &ServerAddr, timeout: Duration) -> Option<bool> {
    probe(addr, timeout).await.ok()
}

/// Longest a name lookup of a probe may take; it is not part of the probe's
/// time limit, which judges the server alone.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// An SSLRequest to the server at `addr` and its one-byte answer, after
/// which the connection is closed. PostgreSQL logs nothing for this when it
/// answers `N` (TLS off, and always over a unix socket); with TLS on it logs
/// the handshake that never came.
/// `Ok(true)`: it answered within `timeout`; `Ok(false)`: it did not (it
/// accepted the connection, or queued it, and then nothing); `Err`: the
/// name lookup or every connection attempt failed (the server is down, not
/// frozen). Each address of the name is tried in turn, as a client would.
async fn probe(addr: &ServerAddr, timeout: Duration) -> std::io::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoints = match tokio::time::timeout(LOOKUP_TIMEOUT, Endpoint::lookup(addr)).await {
        Ok(found) => found?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    let work = async {
        let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
        for endpoint in &endpoints {
            let mut s = match endpoint.connect().await {
                Ok(s) => s,
                // A unix socket whose listen queue is full: nobody accepts any more.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await?;
            return Ok(true);
        }
        Err(last)
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Ok(false))
}

/// Shortest time between two probes of [`watch_primary`]: each one costs
/// the server a process start.
const PROBE_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// Whether the watch number `epoch` over `router` is still needed: it is
/// the database's current router and no newer watch replaced this one (a
/// reload that changed the kind of watch the database needs, see
/// `Live::monitors_replicas`), or sessions still use the router (they keep
/// the router of the configuration they logged in under).
fn still_watched(shared: &Shared, db: &DatabaseConfig, router: &Arc<Router>, epoch: u64) -> bool {
    let current = shared
        .live()
        .routers
        .get(&db.name)
        .is_some_and(|r| Arc::ptr_eq(r, router));
    if current {
        router.watch_epoch.load(Ordering::Acquire) == epoch
    } else {
        // This task holds one reference.
        Arc::strong_count(router) > 1
    }
}

/// Watches the primary of a database that no [`monitor`] watches (read/write
/// splitting off, or no replicas), without logging in: a probe (an SSLRequest, see `probe`) every
/// `health_check_interval` (at least a second) while some connection to that
/// primary is in use (nobody can be stuck otherwise). From the
/// second probe in a row without an answer within `health_check_timeout`,
/// the sessions stuck on the primary are released, as the monitor does. A
/// refused connection is no verdict of frozenness: those sessions' own
/// sockets report it.
pub async fn watch_primary(shared: Arc<Shared>, db: Arc<DatabaseConfig>, router: Arc<Router>, epoch: u64) {
    let name = db.primary.to_string();
    while still_watched(&shared, &db, &router, epoch) {
        let (interval, timeout) = {
            let routing = &shared.live().config.routing;
            (routing.health_check_interval, routing.health_check_timeout)
        };
        let busy = shared.pools.all().iter().any(|p| {
            p.key.database == db.name
                && p.key.role == Role::Primary
                && p.key.addr == db.primary
                && p.stats.active.load(Ordering::Relaxed) > 0
        });
        let verdict = match busy {
            false => Verdict::Down,
            true => match probe(&db.primary, timeout).await {
                Ok(true) => Verdict::Up(0, 0, false),
                Ok(false) => Verdict::Unresponsive,
                Err(_) => Verdict::Down,
            },
        };
        if count_timeouts(&router.primary, &verdict, &name, timeout) {
            shared
                .registry
                .signal_database(&db.name, crate::clients::SIGNAL_SERVER_STUCK);
        }
        tokio::time::sleep(interval.max(PROBE_INTERVAL_MIN)).await;
    }
    tracing::debug!(database = %db.name, "primary watch ends: its servers were replaced by a reload");
}

/// A busy pool gives no verdict, unless the server does not even answer a
/// probe: then it is unresponsive.
async fn check_or_probe(pool: Arc<Pool>, addr: ServerAddr, timeout: Duration) -> Verdict {
    match check(pool, timeout).await {
        Verdict::Busy if answers(&addr, timeout).await == Some(false) => Verdict::Unresponsive,
        verdict => verdict,
    }
}

/// Counts timed-out checks in a row; whether the sessions stuck on the server
/// are to be released now, as they are from the second one on (one slow check
/// is not enough to drop them). A check with an answer ends the run; a busy
/// pool gives no verdict.
fn count_timeouts(health: &ServerHealth, verdict: &Verdict, name: &str, timeout: Duration) -> bool {
    match verdict {
        Verdict::Unresponsive => {
            let n = health.timeouts.fetch_add(1, Ordering::AcqRel) + 1;
            tracing::warn!(server = name, ?timeout, in_a_row = n, "health check timed out");
            n >= 2
        }
        Verdict::Up(..) | Verdict::Down => {
            health.timeouts.store(0, Ordering::Release);
            false
        }
        Verdict::Busy => false,
    }
}

/// Watches the servers of `db` for as long as the proxy runs.
pub async fn monitor(shared: Arc<Shared>, db: Arc<DatabaseConfig>, user: Arc<User>, router: Arc<Router>, epoch: u64) {
    // Read in a block: a snapshot kept for the task's life would keep every
    // router of its configuration alive (see `still_watched`).
    let (interval, timeout, max_lag) = {
        let routing = &shared.live().config.routing;
        (
            routing.health_check_interval,
            routing.health_check_timeout,
            routing.max_replica_lag,
        )
    };
    let primary = shared.pool(&db, &user, Role::Primary, &db.primary);
    let replicas: Vec<Arc<Pool>> = db
        .replicas
        .iter()
        .map(|a| shared.pool(&db, &user, Role::Replica, a))
        .collect();
    let mut functions_loaded: Option<Instant> = None;
    while still_watched(&shared, &db, &router, epoch) {
        // All servers at once: a frozen one must not delay the others' checks.
        let replica_checks: Vec<_> = replicas
            .iter()
            .zip(&db.replicas)
            .map(|(p, a)| tokio::spawn(check_or_probe(p.clone(), a.clone(), timeout)))
            .collect();
        let primary_name = db.primary.to_string();
        let verdict = check_or_probe(primary.clone(), db.primary.clone(), timeout).await;
        let mut stuck = count_timeouts(&router.primary, &verdict, &primary_name, timeout);
        let primary_lsn = match verdict {
            Verdict::Up(lsn, _, standby) => {
                if router.primary.wrong_role.swap(standby, Ordering::AcqRel) != standby {
                    if standby {
                        tracing::error!(server = %primary_name, "the primary is in recovery (a standby): writes fail until it is promoted or the configuration names the new primary");
                    } else {
                        tracing::info!(server = %primary_name, "the primary accepts writes again");
                    }
                }
                set(&router.primary, true, lsn, 0, &primary_name);
                Some(lsn)
            }
            Verdict::Down | Verdict::Unresponsive => {
                set(&router.primary, false, router.primary.lsn(), 0, &primary_name);
                None
            }
            Verdict::Busy => None,
        };
        for (i, handle) in replica_checks.into_iter().enumerate() {
            let health = &router.replicas[i];
            let name = db.replicas[i].to_string();
            let verdict = handle.await.unwrap_or(Verdict::Busy);
            stuck |= count_timeouts(health, &verdict, &name, timeout);
            match verdict {
                Verdict::Up(lsn, _, false) => {
                    // Promoted (a failover), or never a standby: it does not
                    // follow the primary, so reads there may miss its writes.
                    if !health.wrong_role.swap(true, Ordering::AcqRel) {
                        tracing::error!(server = %name, "replica is not in recovery (promoted?): out of read rotation until it is a standby again");
                    }
                    set(health, false, lsn, 0, &name);
                }
                Verdict::Up(lsn, since_ms, true) => {
                    if health.wrong_role.swap(false, Ordering::AcqRel) {
                        tracing::info!(server = %name, "replica is a standby again");
                    }
                    // Caught up, or the primary is unknown: no lag to hold against it.
                    let lag_ms = match primary_lsn {
                        Some(p) if lsn < p => since_ms,
                        _ => 0,
                    };
                    let ok = Duration::from_millis(lag_ms) <= max_lag;
                    set(health, ok, lsn, lag_ms, &name);
                }
                Verdict::Down | Verdict::Unresponsive => set(
                    health,
                    false,
                    health.lsn(),
                    health.lag_ms.load(Ordering::Relaxed),
                    &name,
                ),
                Verdict::Busy => {}
            }
        }
        if stuck {
            // Each session checks whether it waits on a stuck server.
            shared
                .registry
                .signal_database(&db.name, crate::clients::SIGNAL_SERVER_STUCK);
        }
        let due = functions_loaded.is_none_or(|t| t.elapsed() > FUNCTION_REFRESH) || router.take_refresh_request();
        if due && load_functions(&router, std::iter::once(&primary).chain(replicas.iter()), timeout).await {
            functions_loaded = Some(Instant::now());
        }
        router.wait_for_next_check(interval).await;
    }
}

fn set(health: &ServerHealth, healthy: bool, lsn: u64, lag_ms: u64, name: &str) {
    let was = health.healthy.swap(healthy, Ordering::AcqRel);
    health.lsn.store(lsn, Ordering::Release);
    health.lag_ms.store(lag_ms, Ordering::Relaxed);
    if was != healthy {
        if healthy {
            tracing::info!(server = name, "server back in rotation");
        } else {
            tracing::warn!(server = name, lag_ms, "server out of rotation");
        }
    }
}

/// Reads function volatility from the first server that answers.
async fn load_functions<'a>(router: &Router, pools: impl Iterator<Item = &'a Arc<Pool>>, timeout: Duration) -> bool {
    const SQL: &str = read_committed!("SELECT proname, max(provolatile::text) FROM pg_proc GROUP BY proname");
    for pool in pools {
        let Ok(Ok(mut conn)) = tokio::time::timeout(timeout, pool.checkout(timeout)).await else {
            continue;
        };
        let Ok(Ok(rows)) = tokio::time::timeout(timeout, conn.conn.query_rows(SQL)).await else {
            continue;
        };
        conn.checkin();
        let map: HashMap<String, Volatility> = rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter();
                let name = r.next()??;
                let v = match r.next()??.as_str() {
                    "i" => Volatility::Immutable,
                    "s" => Volatility::Stable,
                    _ => Volatility::Volatile,
                };
                Some((name, v))
            })
            .collect();
        tracing::debug!(functions = map.len(), "function volatility loaded");
        router.set_functions(map);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parsing() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("x"), None);
    }
}
