//! The end of a server connection's use by a client: giving it back at a
//! transaction's end (rolled back, reset, or its WAL position read for
//! read-your-writes first), giving it up when it failed or froze, and ending
//! the session.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::buffers::{recycle, shrink};
use super::send_fatal;
use super::settings::Tracker;
use super::transfer::{Attached, Conn, Exit, Phase};
use crate::clients::ClientState;
use crate::config::PoolMode;
use crate::pool::Role;
use crate::protocol::backend::{ErrorFields, error_response, ready_for_query};
use crate::protocol::{SqlState, TransactionStatus};
use crate::router::WriteMark;
use crate::router::health::parse_lsn;
use crate::stats::DbStats;

/// Longest a rollback or reset of a returned connection may take.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);

impl Conn<'_> {
    /// Gives the server connection back (or closes it if it is not clean).
    pub(super) async fn detach(&mut self) {
        let Phase::Attached(a) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let held = a.since.elapsed();
        self.me.set(ClientState::Idle, None);
        self.stats.xact_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        DbStats::add_time(&self.stats.xact_time_us, held);
        self.stats.xact.observe(held);
        self.request_started = None;
        self.slot.clear().await;
        let clean = self.quiet(&a) && self.sbuf.is_empty() && self.to_server.is_empty() && self.sscan.at_boundary();
        self.sbuf.clear();
        self.to_server.clear();
        // An idle client keeps no large buffers: it may stay idle for hours,
        // and 10,000 of them should fit in about 100 MB.
        recycle(&mut self.sbuf);
        recycle(&mut self.to_server);
        // Messages are split off the client buffer: its allocation may be shared.
        shrink(&mut self.cbuf);
        recycle(&mut self.to_client);
        // (Released with nothing owed, or at the session's end: no client
        // Parse is left unanswered that the client could still use.)
        self.expect.clear();
        self.retry.reset();
        self.sscan.reset();
        if clean {
            // A client leaving while pinned leaves session state behind.
            let reset = self.mode == PoolMode::Session || !self.pins.is_empty() || a.conn.conn.state.dirty;
            let committed_write = a.role == Role::Primary && a.wrote && a.status == TransactionStatus::Idle;
            let mark = (committed_write && self.split && self.shared.live().config.routing.read_your_writes)
                .then(|| self.mark.clone());
            self.retire(a, reset, mark);
        } else {
            // Closing alone would leave the backend running until it next writes.
            tracing::debug!(server = %a.conn.conn.addr(), "cancelling and closing a server connection left mid-request");
            tokio::spawn(a.conn.abandon(self.shared.live().config.pool.server_connect_timeout));
        }
    }

    /// Returns a quiet connection to its pool, first rolling back an open
    /// transaction and, when asked, running the reset query. With `mark`, also
    /// reads the primary's WAL position (after the client's commit, off the
    /// client's path) for read-your-writes.
    fn retire(&self, a: Attached, reset: bool, mark: Option<Arc<WriteMark>>) {
        let rollback = a.status != TransactionStatus::Idle;
        // Session state we cannot clear (no reset query): nobody else may inherit the connection.
        let (close, reset) = match reset {
            true => match &self.shared.live().config.pool.server_reset_query {
                q if q.trim().is_empty() => (true, None),
                q => (false, Some(q.clone())),
            },
            false => (false, None),
        };
        if close && mark.is_none() {
            tracing::debug!(server = %a.conn.conn.addr(), "closing a server connection with session state and no reset query");
            return;
        }
        if !rollback && reset.is_none() && mark.is_none() {
            a.conn.checkin();
            return;
        }
        // The reset query (DISCARD ALL) takes a snapshot, which a standby
        // refuses while transactions default to SERIALIZABLE.
        let standby_serializable = a.role == Role::Replica
            && (a.conn.conn.state.default_serializable.is_some()
                || a.conn.conn.state.settings.serializable() == Some(true));
        let mut conn = a.conn;
        if let Some(m) = &mark {
            m.begin();
        }
        tokio::spawn(async move {
            if let Some(m) = mark {
                let rows = tokio::time::timeout(
                    RETIRE_TIMEOUT,
                    conn.conn.query_rows("SELECT pg_current_wal_insert_lsn()"),
                )
                .await;
                let lsn = match rows {
                    Ok(Ok(rows)) => rows
                        .first()
                        .and_then(|r| r.first())
                        .and_then(|v| v.as_deref())
                        .and_then(parse_lsn),
                    _ => None,
                };
                m.finish(lsn);
                if lsn.is_none() {
                    return; // the connection did not answer: do not reuse it
                }
            }
            let work = async {
                let mut status = TransactionStatus::Idle;
                if rollback {
                    status = conn.conn.run_discarding("ROLLBACK").await?;
                }
                if let Some(q) = &reset {
                    if standby_serializable {
                        // Its own query: DISCARD ALL cannot run in a block.
                        conn.conn
                            .run_discarding("SET default_transaction_isolation TO 'read committed'")
                            .await?;
                    }
                    status = conn.conn.run_discarding(q).await?;
                    if q.trim().trim_end_matches(';').eq_ignore_ascii_case("DISCARD ALL") {
                        conn.conn.state.reset();
                    }
                }
                Ok::<_, io::Error>(status)
            };
            match tokio::time::timeout(RETIRE_TIMEOUT, work).await {
                Ok(Ok(TransactionStatus::Idle)) if !conn.conn.state.dirty && !close => conn.checkin(),
                outcome => {
                    tracing::info!(?outcome, server = %conn.conn.addr(), "closing server connection that could not be reset")
                }
            }
        });
    }

    /// The server connection failed. The client learns of it; what it was
    /// doing decides whether it can go on.
    pub(super) async fn server_lost(&mut self, why: &str) -> Result<(), Exit> {
        self.server_gone(why, false).await
    }

    /// Gives up a server connection that failed (`frozen`: may still exist,
    /// so it is abandoned in the background, keeping its pool slot until the
    /// backend hangs up or `server_connect_timeout` passes) and tells the
    /// client as a direct connection would.
    pub(super) async fn server_gone(&mut self, why: &str, frozen: bool) -> Result<(), Exit> {
        let Phase::Attached(a) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Ok(());
        };
        let outstanding = self.expect.client_syncs();
        let Attached {
            conn, unsynced, status, ..
        } = a;
        let addr = conn.conn.addr();
        self.retry.reset();
        tracing::warn!(server = %addr, reason = why, "server connection lost");
        self.shared.errors.count("server_lost");
        self.slot.clear().await;
        self.me.set(ClientState::Idle, None);
        if frozen {
            self.shared.errors.count("server_unresponsive");
            tokio::spawn(conn.abandon(self.shared.live().config.pool.server_connect_timeout));
        } else {
            drop(conn);
        }
        let mid_message = !self.sscan.at_boundary();
        self.sbuf.clear();
        self.to_server.clear();
        self.expect.clear();
        for (parse, skipped) in self.expect.take_unparsed() {
            // Their Parses get the error below.
            super::statements::forget_unparsed(&mut self.statements, &mut self.unnamed, &parse, skipped);
        }
        self.tracker = Tracker::default();
        self.sscan.reset();
        if mid_message {
            return Err(Exit::Abort);
        }
        let message = format!("server connection to {addr} was lost: {why}");
        let session_lost = self.mode == PoolMode::Session || !self.pins.is_empty();
        if session_lost || status != TransactionStatus::Idle || (outstanding == 0 && !unsynced) {
            // Session state or an open transaction is gone: the client must start over.
            return Err(Exit::Fatal(ErrorFields::fatal(SqlState::CONNECTION_FAILURE, message)));
        }
        let err = ErrorFields::error(SqlState::CONNECTION_FAILURE, message);
        for _ in 0..outstanding {
            error_response(&mut self.to_client, &err);
            ready_for_query(&mut self.to_client, TransactionStatus::Idle);
        }
        if unsynced {
            error_response(&mut self.to_client, &err);
            self.phase = Phase::SkipToSync;
        }
        Ok(())
    }

    /// Ends the session: settles the server connection, tells the client why
    /// if there is something to tell, and closes.
    pub(super) async fn finish(mut self, exit: Exit) {
        self.detach().await;
        match exit {
            Exit::Fatal(err) => {
                let _ = self.wr.write_all(&self.to_client).await;
                send_fatal(&mut self.wr, &err).await;
            }
            Exit::Terminated | Exit::ClientLeft | Exit::Abort => {
                let _ = self.wr.shutdown().await;
            }
        }
    }
}
