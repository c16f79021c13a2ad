//! The operations HTTP endpoint on `proxy.metrics_listen`: `/metrics`
//! (Prometheus text, every name prefixed `dbproxy_`), `/healthz` (the process
//! is up) and `/readyz` (listening, not draining, and for each database with
//! monitored servers the primary or a replica reachable). A deliberately small
//! HTTP/1.x handler: GET only, one request per connection.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::Shared;
use std::sync::atomic::AtomicU64;

use crate::stats::{BUCKETS, DbStats, Histogram, REASONS};

/// Serves the endpoint until the proxy stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &shared)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", render(shared)),
        ("GET", "/healthz") => ("200 OK", "ok\n".to_owned()),
        ("GET", "/readyz") if ready(shared) => ("200 OK", "ready\n".to_owned()),
        ("GET", "/readyz") => ("503 Service Unavailable", "not ready\n".to_owned()),
        ("GET", _) => ("404 Not Found", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Ready: not draining, and every monitored database has a reachable server.
pub fn ready(shared: &Shared) -> bool {
    let live = shared.live();
    if *shared.shutdown.borrow() {
        return false;
    }
    // Only where a monitor checks every server is health known.
    live.databases.iter().all(|(name, db)| {
        let Some(router) = live.routers.get(name) else {
            return true;
        };
        !live.monitors_replicas(db) || router.primary.is_healthy() || router.replicas.iter().any(|r| r.is_healthy())
    })
}

/// Selects one of a database's histograms.
type PickHistogram = fn(&DbStats) -> &Histogram;

/// Writes one metric family: HELP, TYPE, then `name{labels} value` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram, header: bool) {
    if header {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    }
    let (counts, sum) = h.snapshot();
    for (bound, count) in BUCKETS.iter().zip(&counts) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
    }
    let total = counts.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
}

/// The Prometheus text exposition.
pub fn render(shared: &Shared) -> String {
    let live = shared.live();
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP dbproxy_build_info Build information.\n# TYPE dbproxy_build_info gauge"
    );
    let _ = writeln!(out, "dbproxy_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

    let _ = writeln!(
        out,
        "# HELP dbproxy_config_reloads_total Configuration reloads by outcome.\n# TYPE dbproxy_config_reloads_total counter"
    );
    for (result, c) in [("ok", &shared.reloads_ok), ("error", &shared.reloads_failed)] {
        let _ = writeln!(
            out,
            "dbproxy_config_reloads_total{{result=\"{result}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP dbproxy_log_lines_dropped_total Log lines dropped because stderr did not take them fast enough.\n# TYPE dbproxy_log_lines_dropped_total counter\ndbproxy_log_lines_dropped_total {}",
        crate::logging::dropped_lines()
    );
    let pools = shared.pools.all();
    let active: usize = pools.iter().map(|p| p.stats.active.load(Ordering::Relaxed)).sum();
    let waiting: usize = pools.iter().map(|p| p.stats.waiting.load(Ordering::Relaxed)).sum();
    let total = shared.clients.count();
    let _ = writeln!(
        out,
        "# HELP dbproxy_clients Connected clients by state.\n# TYPE dbproxy_clients gauge"
    );
    for (state, n) in [
        ("active", active),
        ("waiting", waiting),
        ("idle", total.saturating_sub(active + waiting)),
    ] {
        let _ = writeln!(out, "dbproxy_clients{{state=\"{state}\"}} {n}");
    }

    let mut pinned: BTreeMap<String, usize> = live.stats.keys().map(|db| (db.clone(), 0)).collect();
    for c in shared.registry.all() {
        if !c.pins().is_empty() {
            *pinned.entry(c.database.clone()).or_default() += 1;
        }
    }
    let _ = writeln!(
        out,
        "# HELP dbproxy_clients_pinned Clients pinned to their server connection now (session-only features).\n\
         # TYPE dbproxy_clients_pinned gauge"
    );
    for (db, n) in pinned {
        let _ = writeln!(out, "dbproxy_clients_pinned{{database=\"{db}\"}} {n}");
    }

    let _ = writeln!(
        out,
        "# HELP dbproxy_server_connections Server connections by state.\n# TYPE dbproxy_server_connections gauge"
    );
    for p in &pools {
        let k = &p.key;
        let labels = format!(
            "database=\"{}\",user=\"{}\",server=\"{}\",role=\"{}\"",
            k.database, k.user, k.addr, k.role
        );
        for (state, n) in [
            ("active", p.stats.active.load(Ordering::Relaxed)),
            ("idle", p.idle_count()),
            ("login", p.stats.connecting.load(Ordering::Relaxed)),
        ] {
            let _ = writeln!(out, "dbproxy_server_connections{{{labels},state=\"{state}\"}} {n}");
        }
    }

    let mut names: Vec<&String> = live.stats.keys().collect();
    names.sort();
    let per_db = |f: &dyn Fn(&DbStats) -> u64| -> Vec<(String, u64)> {
        names
            .iter()
            .map(|db| (format!("database=\"{db}\""), f(&live.stats[*db])))
            .collect()
    };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    family(
        &mut out,
        "dbproxy_queries_total",
        "counter",
        "Requests answered (queries and Syncs).",
        per_db(&|s| load(&s.query_count)),
    );
    family(
        &mut out,
        "dbproxy_received_bytes_total",
        "counter",
        "Bytes received from clients.",
        per_db(&|s| load(&s.received)),
    );
    family(
        &mut out,
        "dbproxy_sent_bytes_total",
        "counter",
        "Bytes sent to clients.",
        per_db(&|s| load(&s.sent)),
    );
    family(
        &mut out,
        "dbproxy_pinned_total",
        "counter",
        "Clients pinned to their server connection by a session-only feature.",
        per_db(&|s| load(&s.pinned)),
    );
    let mut labelled = |name: &str, help: &str, label: &str, values: &dyn Fn(&DbStats) -> Vec<(&'static str, u64)>| {
        let samples = names.iter().flat_map(|db| {
            values(&live.stats[*db])
                .into_iter()
                .map(move |(v, n)| (format!("database=\"{db}\",{label}=\"{v}\""), n))
        });
        family(&mut out, name, "counter", help, samples.collect());
    };
    labelled(
        "dbproxy_transactions_total",
        "Server connections taken, by the role of the server.",
        "role",
        &|s| {
            vec![
                ("primary", load(&s.routed_primary)),
                ("replica", load(&s.routed_replica)),
            ]
        },
    );
    labelled(
        "dbproxy_routed_total",
        "Server connections taken, by routing reason.",
        "reason",
        &|s| REASONS.iter().copied().zip(s.reasons.iter().map(load)).collect(),
    );
    labelled(
        "dbproxy_prepared_statements_total",
        "Named statements found prepared on the server connection (hit) or prepared there (miss).",
        "result",
        &|s| vec![("hit", load(&s.prepared_hits)), ("miss", load(&s.prepared_misses))],
    );
    let errors = shared
        .errors
        .snapshot()
        .map(|(kind, n)| (format!("kind=\"{kind}\""), n))
        .collect();
    family(
        &mut out,
        "dbproxy_errors_total",
        "counter",
        "Errors the proxy reported, by kind.",
        errors,
    );
    let histograms: [(&str, &str, PickHistogram); 3] = [
        (
            "dbproxy_pool_wait_seconds",
            "Time clients waited for a server connection.",
            |s| &s.wait,
        ),
        (
            "dbproxy_transaction_duration_seconds",
            "Time a server connection was held.",
            |s| &s.xact,
        ),
        (
            "dbproxy_query_duration_seconds",
            "Time from a request to its ReadyForQuery.",
            |s| &s.query,
        ),
    ];
    for (name, help, pick) in histograms {
        for (i, db) in names.iter().enumerate() {
            let labels = format!("database=\"{db}\"");
            histogram(&mut out, name, help, &labels, pick(&live.stats[*db]), i == 0);
        }
    }
    let _ = writeln!(
        out,
        "# HELP dbproxy_replica_lag_bytes WAL a monitored replica has yet to replay.\n# TYPE dbproxy_replica_lag_bytes gauge"
    );
    for db in &live.config.databases {
        let Some(router) = live.routers.get(&db.name) else {
            continue;
        };
        let primary = router.primary.lsn();
        for (addr, h) in db.replicas.iter().zip(&router.replicas) {
            let behind = primary.saturating_sub(h.lsn());
            let _ = writeln!(
                out,
                "dbproxy_replica_lag_bytes{{database=\"{}\",server=\"{addr}\"}} {behind}",
                db.name
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP dbproxy_server_up Whether a monitored server is in rotation.\n# TYPE dbproxy_server_up gauge\n\
         # HELP dbproxy_replica_lag_seconds Replication lag of a monitored replica.\n# TYPE dbproxy_replica_lag_seconds gauge"
    );
    for db in &live.config.databases {
        let Some(router) = live.routers.get(&db.name) else {
            continue;
        };
        let _ = writeln!(
            out,
            "dbproxy_server_up{{database=\"{}\",server=\"{}\",role=\"primary\"}} {}",
            db.name,
            db.primary,
            u8::from(router.primary.is_healthy())
        );
        for (addr, h) in db.replicas.iter().zip(&router.replicas) {
            let labels = format!("database=\"{}\",server=\"{addr}\"", db.name);
            let _ = writeln!(
                out,
                "dbproxy_server_up{{{labels},role=\"replica\"}} {}",
                u8::from(h.is_healthy())
            );
            let _ = writeln!(out, "dbproxy_replica_lag_seconds{{{labels}}} {}", h.lag().as_secs_f64());
        }
    }
    out
}
