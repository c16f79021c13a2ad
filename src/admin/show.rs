//! SHOW commands of the admin console, with PgBouncer's column names and
//! order (extra columns, such as the server and its role, come last).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;

use crate::clients::{ClientInfo, HeldServer};
use crate::config::{Config, format_duration};
use crate::pool::Pool;
use crate::protocol::SqlState;
use crate::protocol::backend::{ColumnType, ErrorFields, command_complete, data_row, notice, row_description};
use crate::proxy::Shared;

use ColumnType::{Int8 as I, Text as T};

/// Writes one result set.
fn table(out: &mut BytesMut, columns: &[(&str, ColumnType)], rows: &[Vec<Option<String>>]) {
    row_description(out, columns);
    for row in rows {
        data_row(out, row);
    }
    command_complete(out, "SHOW");
}

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// Runs `SHOW what`.
pub fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Result<(), ErrorFields> {
    let live = shared.live();
    match what {
        "HELP" => {
            notice(
                out,
                "Console usage\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|USERS|LISTS|VERSION\n\tPAUSE [db]|RESUME [db]|KILL db|KILL_CLIENT id|DISABLE db|ENABLE db|RECONNECT [db]|WAIT_CLOSE [db]|RELOAD|SHUTDOWN",
            );
            command_complete(out, "SHOW");
        }
        "VERSION" => table(
            out,
            &[("version", T)],
            &[vec![s(concat!("dbproxy ", env!("CARGO_PKG_VERSION")))]],
        ),
        "POOLS" => pools(shared, out),
        "DATABASES" => databases(shared, out),
        "USERS" => {
            let mode = live.config.pool.mode.as_str();
            let rows: Vec<_> = live.config.users.iter().map(|u| vec![s(&u.name), s(mode)]).collect();
            table(out, &[("name", T), ("pool_mode", T)], &rows);
        }
        "LISTS" => lists(shared, out),
        "CONFIG" => config(&live.config, out),
        "STATS" | "STATS_TOTALS" | "STATS_AVERAGES" => stats(shared, what, out),
        "CLIENTS" => clients(shared, out),
        "SERVERS" => servers(shared, out),
        _ => {
            return Err(
                ErrorFields::error(SqlState::SYNTAX_ERROR, format!("unknown SHOW item: {what}"))
                    .with_hint("SHOW HELP lists the commands"),
            );
        }
    }
    Ok(())
}

fn pools(shared: &Shared, out: &mut BytesMut) {
    let live = shared.live();
    let columns = [
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
        ("server", T),
        ("role", T),
    ];
    let mode = live.config.pool.mode.as_str();
    let rows: Vec<_> = shared
        .pools
        .all()
        .iter()
        .map(|p| {
            let active = p.stats.active.load(Ordering::Relaxed);
            let waiting = p.stats.waiting.load(Ordering::Relaxed);
            let login = p.stats.connecting.load(Ordering::Relaxed);
            vec![
                s(&p.key.database),
                s(&p.key.user),
                s(active),
                s(waiting),
                s(0),
                s(0),
                s(active),
                s(0),
                s(0),
                s(p.idle_count()),
                s(0),
                s(0),
                s(login),
                s(0),
                s(0),
                s(mode),
                s(&p.key.addr),
                s(p.key.role),
            ]
        })
        .collect();
    table(out, &columns, &rows);
}

fn databases(shared: &Shared, out: &mut BytesMut) {
    let live = shared.live();
    let columns = [
        ("name", T),
        ("host", T),
        ("port", I),
        ("database", T),
        ("force_user", T),
        ("pool_size", I),
        ("min_pool_size", I),
        ("reserve_pool", I),
        ("pool_mode", T),
        ("max_connections", I),
        ("current_connections", I),
        ("paused", I),
        ("disabled", I),
        ("replicas", T),
    ];
    let pools = shared.pools.all();
    let rows: Vec<_> = live
        .config
        .databases
        .iter()
        .map(|db| {
            let current: usize = pools
                .iter()
                .filter(|p| p.key.database == db.name)
                .map(|p| p.stats.active.load(Ordering::Relaxed) + p.idle_count())
                .sum();
            let replicas: Vec<String> = db.replicas.iter().map(ToString::to_string).collect();
            vec![
                s(&db.name),
                s(&db.primary.host),
                s(db.primary.port),
                s(db.server_dbname()),
                None,
                s(live.config.pool.size),
                s(0),
                s(0),
                s(live.config.pool.mode.as_str()),
                s(0),
                s(current),
                s(u8::from(live.paused.get(&db.name).is_some_and(|p| *p.borrow()))),
                s(u8::from(shared.is_disabled(&db.name))),
                s(replicas.join(",")),
            ]
        })
        .collect();
    table(out, &columns, &rows);
}

/// SHOW STATS (PgBouncer 1.18's columns), STATS_TOTALS and STATS_AVERAGES.
/// Totals since start; averages are per second since start for counts and
/// bytes, and per transaction or query for times (microseconds).
fn stats(shared: &Shared, what: &str, out: &mut BytesMut) {
    let live = shared.live();
    let secs = shared.started.elapsed().as_secs_f64().max(1.0);
    let mut names: Vec<&String> = live.stats.keys().collect();
    names.sort();
    let rows: Vec<(String, [u64; 7], [u64; 7])> = names
        .into_iter()
        .map(|name| {
            let st = &live.stats[name];
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let (xacts, queries) = (get(&st.xact_count), get(&st.query_count));
            let totals = [
                xacts,
                queries,
                get(&st.received),
                get(&st.sent),
                get(&st.xact_time_us),
                get(&st.query_time_us),
                get(&st.wait_time_us),
            ];
            let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
            let averages = [
                (xacts as f64 / secs) as u64,
                (queries as f64 / secs) as u64,
                (totals[2] as f64 / secs) as u64,
                (totals[3] as f64 / secs) as u64,
                per(totals[4], xacts),
                per(totals[5], queries),
                per(totals[6], xacts),
            ];
            (name.clone(), totals, averages)
        })
        .collect();
    let short = [
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
    ];
    match what {
        "STATS" => {
            let long = [
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "avg_xact_count",
                "avg_query_count",
                "avg_recv",
                "avg_sent",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
            ];
            let mut columns = vec![("database", T)];
            columns.extend(long.iter().map(|c| (*c, I)));
            let rows: Vec<_> = rows
                .iter()
                .map(|(n, t, a)| std::iter::once(s(n)).chain(t.iter().chain(a.iter()).map(s)).collect())
                .collect();
            table(out, &columns, &rows);
        }
        _ => {
            let mut columns = vec![("database", T)];
            columns.extend(short.iter().map(|c| (*c, I)));
            let pick_totals = what == "STATS_TOTALS";
            let rows: Vec<_> = rows
                .iter()
                .map(|(n, t, a)| {
                    std::iter::once(s(n))
                        .chain((if pick_totals { t } else { a }).iter().map(s))
                        .collect()
                })
                .collect();
            table(out, &columns, &rows);
        }
    }
}

/// PgBouncer's SHOW CLIENTS / SHOW SERVERS columns (1.18), and dbproxy's
/// `pinned`.
const CONNECTION_COLUMNS: [(&str, ColumnType); 19] = [
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
    ("pinned", T),
];

fn clients(shared: &Shared, out: &mut BytesMut) {
    let rows: Vec<_> = shared
        .registry
        .all()
        .iter()
        .map(|c| {
            let connected = humantime::format_rfc3339_seconds(c.connected).to_string();
            let link = c.server().map(|held| held.pid.to_string());
            vec![
                s("C"),
                s(&c.user),
                s(&c.database),
                s(c.state().as_str()),
                s(c.peer.ip()),
                s(c.peer.port()),
                None,
                None,
                s(&connected),
                s(&connected),
                s(0),
                s(0),
                s(0),
                s(c.id),
                link,
                s(0),
                s(if c.tls { "TLS" } else { "" }),
                s(&c.application_name),
                s(c.pins().names().join(", ")),
            ]
        })
        .collect();
    table(out, &CONNECTION_COLUMNS, &rows);
}

fn servers(shared: &Shared, out: &mut BytesMut) {
    let mut rows = Vec::new();
    let pools = shared.pools.all();
    for c in shared.registry.all() {
        if let Some(held) = c.server() {
            let (host, port) = held.addr.rsplit_once(':').unwrap_or((held.addr, ""));
            let pinned = c.pins().names().join(", ");
            rows.push(server_row(
                [&c.user, &c.database, "active", host, port, &c.application_name, &pinned],
                (held.pid, held.tls),
                s(c.id),
                close_needed(&pools, &c, &held),
            ));
        }
    }
    for p in &pools {
        for backend in p.idle_backends() {
            let port = p.key.addr.port.to_string();
            rows.push(server_row(
                [&p.key.user, &p.key.database, "idle", &p.key.addr.host, &port, "", ""],
                backend,
                None,
                false,
            ));
        }
    }
    table(out, &CONNECTION_COLUMNS, &rows);
}

/// Whether the server connection `c` holds is to be closed when given back:
/// opened before a RECONNECT of its pool, or under a `[server_tls]` setting
/// a reload replaced. (Idle ones are closed at once.)
pub(super) fn close_needed(pools: &[Arc<Pool>], c: &ClientInfo, held: &HeldServer) -> bool {
    pools
        .iter()
        .filter(|p| p.key.database == c.database && p.key.user == c.user)
        .find(|p| p.key.addr.to_string() == *held.addr)
        .is_some_and(|p| p.close_needed(held.generation, held.tls_epoch))
}

/// A SHOW SERVERS row: `[user, database, state, addr, port, application_name]`,
/// the backend pid and whether the connection is encrypted, and the client
/// using it (`link`).
fn server_row(text: [&str; 7], (pid, tls): (i32, bool), link: Option<String>, close: bool) -> Vec<Option<String>> {
    let [user, database, state, addr, port, app, pinned] = text;
    vec![
        s("S"),
        s(user),
        s(database),
        s(state),
        s(addr),
        s(port),
        None,
        None,
        None,
        None,
        s(0),
        s(0),
        s(u8::from(close)),
        s(pid),
        link,
        s(pid),
        s(if tls { "TLS" } else { "" }),
        s(app),
        s(pinned),
    ]
}

fn lists(shared: &Shared, out: &mut BytesMut) {
    let live = shared.live();
    let pools = shared.pools.all();
    let idle: usize = pools.iter().map(|p| p.idle_count()).sum();
    let used: usize = pools.iter().map(|p| p.stats.active.load(Ordering::Relaxed)).sum();
    let rows: Vec<_> = [
        ("databases", live.config.databases.len()),
        ("users", live.config.users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", shared.clients.count()),
        ("login_clients", 0),
        ("free_servers", idle),
        ("used_servers", used),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    .into_iter()
    .map(|(k, v)| vec![s(k), s(v)])
    .collect();
    table(out, &[("list", T), ("items", I)], &rows);
}

/// Every setting of `c`, by its section-qualified key, as the console shows it.
fn settings(c: &Config) -> Vec<(&'static str, String)> {
    let dur = |v| format_duration(v).to_string();
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("proxy.listen", c.proxy.listen.to_string()),
        ("proxy.admin_users", c.proxy.admin_users.join(",")),
        (
            "proxy.metrics_listen",
            c.proxy.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
        ),
        ("proxy.max_client_conn", c.proxy.max_client_conn.to_string()),
        ("proxy.client_login_timeout", dur(c.proxy.client_login_timeout)),
        ("proxy.max_message_size", c.proxy.max_message_size.to_string()),
        ("proxy.shutdown_timeout", dur(c.proxy.shutdown_timeout)),
        (
            "proxy.workers",
            c.proxy
                .workers
                .map(|n| n.to_string())
                .unwrap_or_else(|| "auto".to_owned()),
        ),
        (
            "tls.cert",
            c.tls.as_ref().map(|t| t.cert.display().to_string()).unwrap_or_default(),
        ),
        (
            "tls.key",
            c.tls.as_ref().map(|t| t.key.display().to_string()).unwrap_or_default(),
        ),
        (
            "tls.client_mode",
            c.tls
                .as_ref()
                .map(|t| t.client_mode)
                .unwrap_or_default()
                .as_str()
                .to_owned(),
        ),
        ("server_tls.sslmode", c.server_tls.sslmode.as_str().to_owned()),
        ("server_tls.ca_file", path(&c.server_tls.ca_file)),
        ("server_tls.cert_file", path(&c.server_tls.cert_file)),
        ("server_tls.key_file", path(&c.server_tls.key_file)),
        ("pool.mode", c.pool.mode.as_str().to_owned()),
        ("pool.size", c.pool.size.to_string()),
        ("pool.checkout_timeout", dur(c.pool.checkout_timeout)),
        ("pool.server_connect_timeout", dur(c.pool.server_connect_timeout)),
        ("pool.server_idle_timeout", dur(c.pool.server_idle_timeout)),
        ("pool.idle_transaction_timeout", dur(c.pool.idle_transaction_timeout)),
        ("pool.server_reset_query", c.pool.server_reset_query.clone()),
        (
            "pool.max_prepared_statements",
            c.pool.max_prepared_statements.to_string(),
        ),
        (
            "pool.max_client_statement_bytes",
            c.pool.max_client_statement_bytes.to_string(),
        ),
        ("pool.session_features", c.pool.session_features.as_str().to_owned()),
        ("routing.read_write_split", c.routing.read_write_split.to_string()),
        ("routing.balance", c.routing.balance.as_str().to_owned()),
        ("routing.read_your_writes", c.routing.read_your_writes.to_string()),
        ("routing.max_replica_lag", dur(c.routing.max_replica_lag)),
        ("routing.health_check_interval", dur(c.routing.health_check_interval)),
        ("routing.health_check_timeout", dur(c.routing.health_check_timeout)),
    ]
}

/// Every setting with its value and default. No password ever appears here:
/// `[[users]]` are not settings.
fn config(c: &Config, out: &mut BytesMut) {
    let defaults = settings(&Config::default());
    // RELOAD applies everything but the listen addresses and the runtime's
    // threads (those need a restart).
    let changeable = |k: &str| {
        if k == "proxy.listen" || k == "proxy.metrics_listen" || k == "proxy.workers" {
            "no"
        } else {
            "yes"
        }
    };
    let rows: Vec<_> = settings(c)
        .into_iter()
        .zip(defaults)
        .map(|((k, v), (_, def))| vec![s(k), s(v), s(def), s(changeable(k))])
        .collect();
    table(
        out,
        &[("key", T), ("value", T), ("default", T), ("changeable", T)],
        &rows,
    );
}
