//! The admin console: database `dbproxy`, for `proxy.admin_users` only,
//! simple query protocol, PgBouncer-compatible commands and column names so
//! existing PgBouncer tooling keeps working.

mod show;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::User;
use crate::protocol::backend::{
    ErrorFields, authentication_ok, backend_key_data, command_complete, error_response, parameter_status,
    ready_for_query,
};
use crate::protocol::framing::read_cstr;
use crate::protocol::{Item, Scanner, SqlState, TransactionStatus};
use crate::proxy::Shared;
use crate::session::ClientStream;

/// Largest command the console reads.
const MAX_COMMAND: usize = 64 * 1024;

/// Serves one admin client until it leaves.
pub async fn run(shared: &Arc<Shared>, mut stream: ClientStream, user: &User, key: (i32, i32)) {
    tracing::info!(user = %user.name, "admin console session");
    let mut out = BytesMut::new();
    authentication_ok(&mut out);
    for (name, value) in [
        ("server_version", concat!(env!("CARGO_PKG_VERSION"), "/dbproxy")),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        parameter_status(&mut out, name, value);
    }
    backend_key_data(&mut out, key.0, key.1);
    ready_for_query(&mut out, TransactionStatus::Idle);
    let mut buf = BytesMut::with_capacity(1024);
    let mut scanner = Scanner::new(MAX_COMMAND);
    let mut skipping = false;
    let mut shutdown = shared.shutdown.clone();
    loop {
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        let (tag, len) = match scanner.next(&buf, |_| true) {
            Ok(Some(Item::Whole { tag, len })) => (tag, len),
            Ok(_) => {
                buf.reserve(1024);
                tokio::select! {
                    r = stream.read_buf(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    },
                    _ = async { let _ = shutdown.wait_for(|&s| s).await; } => {
                        let err = ErrorFields::fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection because dbproxy is shutting down");
                        error_response(&mut out, &err);
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                }
            }
            Err(e) => {
                error_response(
                    &mut out,
                    &ErrorFields::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string()),
                );
                let _ = stream.write_all(&out).await;
                return;
            }
        };
        let msg = buf.split_to(len);
        match tag {
            b'X' => return,
            b'Q' => {
                let sql = read_cstr(&msg[5..]).map(|(s, _)| s).unwrap_or_default();
                match execute(shared, sql, &mut out) {
                    Outcome::Done => {}
                    Outcome::Shutdown => {
                        ready_for_query(&mut out, TransactionStatus::Idle);
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                    Outcome::Paused(databases) => {
                        if !until_released(shared, &databases, &mut stream, &mut buf).await {
                            return;
                        }
                        command_complete(&mut out, "PAUSE");
                    }
                    Outcome::WaitClose(database) => {
                        if !until_closed(shared, database.as_deref(), &mut stream, &mut buf).await {
                            return;
                        }
                        command_complete(&mut out, "WAIT_CLOSE");
                    }
                    Outcome::Reload => match shared.reload_off_thread().await {
                        Ok(()) => command_complete(&mut out, "RELOAD"),
                        Err(problems) => {
                            let detail: Vec<String> = problems.iter().map(ToString::to_string).collect();
                            let err = ErrorFields::error(
                                SqlState::INVALID_PARAMETER_VALUE,
                                "the configuration file is invalid; the running configuration stays",
                            )
                            .with_detail(detail.join("\n"));
                            error_response(&mut out, &err);
                        }
                    },
                }
                ready_for_query(&mut out, TransactionStatus::Idle);
            }
            b'S' => {
                skipping = false;
                ready_for_query(&mut out, TransactionStatus::Idle);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' if !skipping => {
                skipping = true;
                let err = ErrorFields::error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the admin console accepts only the simple query protocol",
                )
                .with_hint("with psql this is the default; drivers may need a simple-query mode");
                error_response(&mut out, &err);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {}
            _ => {
                let err = ErrorFields::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("invalid frontend message type {tag}"),
                );
                error_response(&mut out, &err);
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Shutdown,
    /// These databases were paused: the command completes once they hold no
    /// server connection (see [`until_released`]).
    Paused(Vec<String>),
    /// WAIT_CLOSE of one database or all: completes once no server
    /// connection to be closed is in use (see [`until_closed`]).
    WaitClose(Option<String>),
    /// RELOAD: runs on the blocking pool ([`Shared::reload_off_thread`]).
    Reload,
}

/// How often PAUSE looks whether the transactions in flight have finished.
const PAUSE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Waits, as PgBouncer's PAUSE does, until no server connection of
/// `databases` is in use or about to be (transactions in flight have
/// finished, in session mode the clients have left, and nobody who passed the
/// pause check before it was set still waits for a slot or a new
/// connection), then closes their idle server connections. A database
/// resumed meanwhile (from another console) is no longer waited for; the wait
/// ends when none is paused or dbproxy shuts down. False when the console's
/// client left meanwhile (what it sends is kept in `buf`, up to a command's
/// size).
async fn until_released(
    shared: &Arc<Shared>,
    databases: &[String],
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> bool {
    let still_paused = || {
        let live = shared.live();
        databases
            .iter()
            .filter(|d| live.paused.get(*d).is_some_and(|p| *p.borrow()))
            .cloned()
            .collect::<Vec<_>>()
    };
    let pools = |of: &[String]| {
        shared
            .pools
            .all()
            .into_iter()
            .filter(|p| of.contains(&p.key.database))
            .collect::<Vec<_>>()
    };
    let in_use = |of: &[String]| {
        use std::sync::atomic::Ordering::Acquire;
        pools(of)
            .iter()
            .map(|p| p.stats.active.load(Acquire) + p.stats.waiting.load(Acquire) + p.stats.connecting.load(Acquire))
            .sum::<usize>()
    };
    // Twice in a row, so a checkout between the pause check and its pool's
    // counters (no await in between, but another thread) has shown up.
    let mut quiet = 0;
    let mut logged = false;
    loop {
        let paused = still_paused();
        if paused.is_empty() || *shared.shutdown.borrow() {
            return true;
        }
        if quiet >= 2 {
            for pool in pools(&paused) {
                pool.close_idle();
            }
            return true;
        }
        let n = in_use(&paused);
        if n == 0 {
            quiet += 1;
        } else {
            quiet = 0;
            if !logged {
                tracing::info!(databases = ?paused, in_use = n, "PAUSE waits for the transactions in flight");
                logged = true;
            }
        }
        if !poll_interval(stream, buf).await {
            return false;
        }
    }
}

/// Waits one [`PAUSE_POLL`]; false if the console's client left meanwhile
/// (what it sends is kept in `buf`, up to a command's size).
async fn poll_interval(stream: &mut ClientStream, buf: &mut BytesMut) -> bool {
    if buf.len() < MAX_COMMAND {
        buf.reserve(1024);
        tokio::select! {
            r = stream.read_buf(buf) => if matches!(r, Ok(0) | Err(_)) { return false },
            _ = tokio::time::sleep(PAUSE_POLL) => {}
        }
    } else {
        tokio::time::sleep(PAUSE_POLL).await;
    }
    true
}

/// Waits, as PgBouncer's WAIT_CLOSE does, until no server connection of
/// `database` (of every database without one) that is to be closed when
/// given back is still in use: those opened before a RECONNECT, or under a
/// `[server_tls]` setting a reload replaced. Ends early when dbproxy shuts
/// down; false when the console's client left meanwhile.
async fn until_closed(
    shared: &Arc<Shared>,
    database: Option<&str>,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> bool {
    let mut logged = false;
    loop {
        let pools = shared.pools.all();
        let waiting = shared
            .registry
            .all()
            .iter()
            .filter(|c| database.is_none_or(|d| c.database == d))
            .filter(|c| c.server().is_some_and(|held| show::close_needed(&pools, c, &held)))
            .count();
        if waiting == 0 || *shared.shutdown.borrow() {
            return true;
        }
        if !logged {
            tracing::info!(
                database = database.unwrap_or("(all)"),
                in_use = waiting,
                "WAIT_CLOSE waits for server connections to be given back"
            );
            logged = true;
        }
        if !poll_interval(stream, buf).await {
            return false;
        }
    }
}

/// The command's database argument (`KILL db`, `RECONNECT [db]`, ...), if any.
fn database_arg(sql: &str) -> Option<&str> {
    sql.split_whitespace().nth(1).map(|d| d.trim_end_matches(';'))
}

/// ERROR 3D000 for a database dbproxy does not serve.
fn no_such_database(out: &mut BytesMut, name: &str) -> Outcome {
    let err = ErrorFields::error(SqlState::INVALID_CATALOG_NAME, format!("no such database: {name}"));
    error_response(out, &err);
    Outcome::Done
}

/// Runs one console command, writing its result or error to `out`.
fn execute(shared: &Arc<Shared>, sql: &str, out: &mut BytesMut) -> Outcome {
    let live = shared.live();
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => {
            crate::protocol::backend::empty_query(out);
            Outcome::Done
        }
        ["SHOW", what] => {
            if let Err(e) = show::show(shared, what, out) {
                error_response(out, &e);
            }
            Outcome::Done
        }
        ["PAUSE" | "RESUME", rest @ ..] if rest.len() <= 1 => {
            let pause = words[0] == "PAUSE";
            let targets: Vec<&String> = match database_arg(sql) {
                Some(name) => match live.paused.keys().find(|k| k.as_str() == name) {
                    Some(k) => vec![k],
                    None => return no_such_database(out, name),
                },
                None => live.paused.keys().collect(),
            };
            for name in &targets {
                tracing::info!(database = %name, "{} from the admin console", words[0]);
                live.paused[*name].send_replace(pause);
            }
            if pause {
                return Outcome::Paused(targets.into_iter().cloned().collect());
            }
            command_complete(out, words[0]);
            Outcome::Done
        }
        ["KILL_CLIENT", id] => {
            match id.parse::<u64>().ok().filter(|&id| shared.registry.kill(id)) {
                Some(_) => command_complete(out, "KILL_CLIENT"),
                None => {
                    let err = ErrorFields::error(SqlState::UNDEFINED_OBJECT, format!("no such client: {id}"))
                        .with_hint("SHOW CLIENTS lists them (the ptr column)");
                    error_response(out, &err);
                }
            }
            Outcome::Done
        }
        ["KILL", _] => {
            let name = database_arg(sql).unwrap_or_default();
            if !live.databases.contains_key(name) {
                return no_such_database(out, name);
            }
            let killed = shared.registry.kill_database(name);
            for pool in shared.pools.all().iter().filter(|p| p.key.database == name) {
                pool.close_idle();
            }
            tracing::info!(database = name, clients = killed, "KILL from the admin console");
            command_complete(out, "KILL");
            Outcome::Done
        }
        ["DISABLE" | "ENABLE", _] => {
            let name = database_arg(sql).unwrap_or_default();
            if !live.databases.contains_key(name) {
                return no_such_database(out, name);
            }
            let mut disabled = shared.disabled.lock().unwrap_or_else(|e| e.into_inner());
            if words[0] == "DISABLE" {
                disabled.insert(name.to_owned());
            } else {
                disabled.remove(name);
            }
            tracing::info!(database = name, "{} from the admin console", words[0]);
            command_complete(out, words[0]);
            Outcome::Done
        }
        ["RECONNECT", rest @ ..] if rest.len() <= 1 => {
            let name = database_arg(sql);
            if let Some(name) = name.filter(|n| !live.databases.contains_key(*n)) {
                return no_such_database(out, name);
            }
            for pool in shared
                .pools
                .all()
                .iter()
                .filter(|p| name.is_none_or(|n| p.key.database == n))
            {
                pool.reconnect();
            }
            tracing::info!(database = name.unwrap_or("(all)"), "RECONNECT from the admin console");
            command_complete(out, "RECONNECT");
            Outcome::Done
        }
        ["WAIT_CLOSE", rest @ ..] if rest.len() <= 1 => {
            let name = database_arg(sql);
            if let Some(name) = name.filter(|n| !live.databases.contains_key(*n)) {
                return no_such_database(out, name);
            }
            Outcome::WaitClose(name.map(str::to_owned))
        }
        ["RELOAD"] => Outcome::Reload,
        ["SHUTDOWN"] => {
            tracing::info!("SHUTDOWN from the admin console");
            shared.begin_shutdown();
            command_complete(out, "SHUTDOWN");
            Outcome::Shutdown
        }
        _ => {
            let err = ErrorFields::error(SqlState::SYNTAX_ERROR, format!("invalid admin command: {}", sql.trim()))
                .with_hint("SHOW HELP lists the commands");
            error_response(out, &err);
            Outcome::Done
        }
    }
}
