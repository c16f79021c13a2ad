//! Requests the proxy answers or rewrites itself instead of passing them on:
//! `DEALLOCATE` and `DISCARD ALL` (which must touch only the client's own
//! view of shared server connections), session-only features refused
//! under `pool.session_features = "reject"`, and refused requests (a named
//! Parse of a name in use or over the budget, the unnamed statement of a
//! client that has none).

use super::expect::{ClientParse, Request};
use super::transfer::{Conn, Exit, Phase};
use crate::protocol::SqlState;
use crate::protocol::TransactionStatus;
use crate::protocol::backend::{ErrorFields, command_complete, error_response, ready_for_query};
use crate::protocol::extended::{write_bind, write_execute, write_parse, write_query, write_target};
use crate::sql::{Effects, LocalCommand};

/// Why a session-only feature is refused (`pool.session_features = "reject"`).
fn reject_message(fx: &Effects) -> String {
    format!(
        "{} is not available through dbproxy in transaction pooling (pool.session_features = \"reject\")",
        fx.pins.names().join(", ")
    )
}

/// A statement that raises [`reject_message`] on the server, where the refused
/// statement would have run (so a transaction fails as the client is told).
pub(super) fn reject_sql(fx: &Effects) -> String {
    raise_sql(&reject_error(fx))
}

fn reject_error(fx: &Effects) -> ErrorFields {
    ErrorFields::error(SqlState::FEATURE_NOT_SUPPORTED, reject_message(fx))
        .with_hint("use session pooling, or pool.session_features = \"pin\"")
}

/// A statement that raises `err` (its code, message and hint) when executed.
/// The texts may hold the client's bytes (a statement name), which only the
/// client's encoding can read: they go as hex, decoded in that encoding, as
/// the server reads the client's own messages. The statement is plain ASCII
/// whatever the client sent, and nothing in it is quoted.
pub(super) fn raise_sql(err: &ErrorFields) -> String {
    let text = |s: &str| {
        let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
        format!("convert_from(decode('{hex}', 'hex'), current_setting('client_encoding'))")
    };
    let mut sql = format!(
        "DO $dbproxy$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}",
        err.code.code(),
        text(&err.message)
    );
    if let Some(hint) = &err.hint {
        sql.push_str(&format!(", HINT = {}", text(hint)));
    }
    sql.push_str("; END $dbproxy$");
    sql
}

impl Conn<'_> {
    /// `pool.session_features = "reject"`: the statement is refused. Outside a
    /// transaction the proxy answers; inside one the server raises the error,
    /// so the transaction fails there exactly as the client is told.
    pub(super) async fn reject_session_feature(&mut self, fx: &Effects) -> Result<(), Exit> {
        if matches!(self.phase, Phase::Idle) {
            error_response(&mut self.to_client, &reject_error(fx));
            ready_for_query(&mut self.to_client, TransactionStatus::Idle);
            return Ok(());
        }
        write_query(&mut self.to_server, &reject_sql(fx));
        self.sent(b'Q', Some(Request::Query));
        Ok(())
    }

    /// A client's Parse, Bind or Describe the proxy refuses (a name already
    /// in use, a statement over the client's budget, an unnamed statement the
    /// client does not have), answered where the server would have answered
    /// it. Without a server connection the proxy answers at once
    /// and skips the rest of the batch up to its Sync. On a held connection
    /// the server itself raises the error in place of the Parse, after the
    /// answers owed before it, skips the rest of the batch, and fails a
    /// transaction block, as PostgreSQL does for a request that fails.
    pub(super) fn refuse(&mut self, err: &ErrorFields) {
        const REFUSED: &str = "dbp_refused";
        if !matches!(self.phase, Phase::Attached(_)) {
            error_response(&mut self.to_client, err);
            self.phase = Phase::SkipToSync;
            return;
        }
        // Close first: the statement a refusal before left on this connection.
        write_target(&mut self.to_server, b'C', b'S', REFUSED);
        self.expect.sent(Request::Close, true, None);
        write_parse(&mut self.to_server, REFUSED, raise_sql(err).as_bytes(), &[0, 0]);
        self.expect.sent(Request::Parse, true, None);
        write_bind(&mut self.to_server, "", REFUSED);
        self.expect.sent(Request::Bind, true, None);
        write_execute(&mut self.to_server, "");
        // The client's answer: the error, in place of ParseComplete (or BindComplete, ...).
        self.expect.sent(Request::Execute, false, None);
        self.sent(b'P', None);
    }

    /// A DEALLOCATE or DISCARD ALL that reaches the held server connection:
    /// names translated to the server's, records kept true. Returns whether
    /// it wrote the query itself.
    pub(super) fn forward_local_command(&mut self, cmd: &LocalCommand, msg: &[u8]) -> bool {
        let Phase::Attached(a) = &mut self.phase else {
            return false;
        };
        let in_block = a.status != TransactionStatus::Idle;
        match cmd {
            LocalCommand::DiscardAll if in_block => {
                // PostgreSQL refuses DISCARD ALL in a transaction block: nothing changes.
            }
            LocalCommand::Deallocate(name) => {
                if let Some(stmt) = self.statements.remove(name) {
                    let name = &stmt.server_name;
                    if in_block {
                        // The block may fail (or have failed) and keep the statement
                        // on the server: reset the connection before anyone reuses it.
                        a.conn.conn.state.dirty = true;
                    }
                    let sql = if a.conn.conn.state.prepared.contains(name) {
                        // Others may share it, but a client that deallocates is done
                        // with it; it is prepared again on demand.
                        a.conn.conn.state.prepared.remove(name);
                        format!("DEALLOCATE \"{name}\"")
                    } else {
                        // Never prepared on this connection: still answer as the
                        // server would, without touching anyone else's statements.
                        format!("PREPARE \"{name}\" AS SELECT; DEALLOCATE \"{name}\"")
                    };
                    write_query(&mut self.to_server, &sql);
                    return true;
                }
                if a.conn.conn.state.client_named.remove(name) {
                    // Under the client's own name (renaming off). In a block
                    // that has failed, or behind requests that may fail it,
                    // it may not be deallocated: whatever it does then ends
                    // with the connection's reset.
                    a.conn.conn.state.dirty |= in_block || a.unsynced || !self.expect.is_empty();
                }
            }
            LocalCommand::DeallocateAll => {
                self.statements.clear();
                // Prepare afresh from now on; whether it succeeds or not, reset before reuse.
                a.conn.conn.state.prepared = Default::default();
                a.conn.conn.state.client_named.clear();
                a.conn.conn.state.dirty = true;
            }
            LocalCommand::DiscardAll => {
                self.statements.clear();
                *self.unnamed.effects_mut() = Effects::default();
                self.settings = self.startup.clone();
                self.pins = Default::default();
                self.me.set_pins(self.pins);
                // Confirmed with its request, to tell the client its own values.
                self.tracker.record(&Effects {
                    changes: vec![crate::sql::SettingChange::ResetAll],
                    ..Effects::default()
                });
                a.conn.conn.state.prepared = Default::default();
                a.conn.conn.state.client_named.clear();
                a.conn.conn.state.dirty = true;
            }
        }
        self.to_server.extend_from_slice(msg);
        true
    }

    /// An unnamed Parse of DEALLOCATE or DISCARD ALL, on the held server
    /// connection. `DEALLOCATE name` must only drop the client's own name,
    /// never a server statement other clients share: the Parse becomes a
    /// DEALLOCATE of a throwaway statement prepared just before it (so the
    /// client still gets exactly `DEALLOCATE`, or the server's error for a
    /// name it never prepared). DEALLOCATE ALL and DISCARD ALL go as they
    /// are, with the records of [`Self::forward_local_command`].
    pub(super) fn forward_local_parse(&mut self, cmd: &LocalCommand, msg: &[u8], client: ClientParse) {
        const THROWAWAY: &str = "dbp_deallocate";
        match cmd {
            LocalCommand::Deallocate(name) if self.statements.remove(name).is_some() => {
                // Close first: a throwaway left by a batch that failed before its Execute.
                write_target(&mut self.to_server, b'C', b'S', THROWAWAY);
                self.expect.sent(Request::Close, true, None);
                write_parse(&mut self.to_server, THROWAWAY, b"SELECT", &[0, 0]);
                self.expect.sent(Request::Parse, true, None);
                write_parse(
                    &mut self.to_server,
                    "",
                    format!("DEALLOCATE {THROWAWAY}").as_bytes(),
                    &[0, 0],
                );
            }
            LocalCommand::Deallocate(_) => self.to_server.extend_from_slice(msg),
            LocalCommand::DeallocateAll | LocalCommand::DiscardAll => {
                self.forward_local_command(cmd, msg);
            }
        }
        self.expect.sent_client_parse(None, client);
        self.tracker_and_sync_state(b'P');
    }

    /// DEALLOCATE and DISCARD ALL outside a transaction touch only the
    /// client's own view, never a shared server connection.
    pub(super) fn answer_locally(&mut self, cmd: LocalCommand) {
        match &cmd {
            LocalCommand::DeallocateAll => self.statements.clear(),
            LocalCommand::Deallocate(name) => {
                if self.statements.remove(name).is_none() {
                    let err = ErrorFields::error(
                        SqlState::INVALID_SQL_STATEMENT_NAME,
                        format!("prepared statement \"{name}\" does not exist"),
                    );
                    error_response(&mut self.to_client, &err);
                    ready_for_query(&mut self.to_client, TransactionStatus::Idle);
                    return;
                }
            }
            LocalCommand::DiscardAll => {
                self.statements.clear();
                *self.unnamed.effects_mut() = Effects::default();
                self.pins = Default::default();
                self.me.set_pins(self.pins);
            }
        }
        command_complete(&mut self.to_client, cmd.tag());
        if cmd == LocalCommand::DiscardAll {
            // After CommandComplete, where a server reports what changed.
            self.restate
                .discard_locally(&self.settings, &self.startup, &mut self.to_client);
            self.settings = self.startup.clone();
        }
        ready_for_query(&mut self.to_client, TransactionStatus::Idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_texts_go_as_hex_in_the_clients_encoding() {
        let err = ErrorFields::error(SqlState::PROGRAM_LIMIT_EXCEEDED, "a'\\\u{c1}$").with_hint("h");
        let decode = |hex: &str| format!("convert_from(decode('{hex}', 'hex'), current_setting('client_encoding'))");
        assert_eq!(
            raise_sql(&err),
            format!(
                "DO $dbproxy$ BEGIN RAISE EXCEPTION USING ERRCODE = '54000', MESSAGE = {}, HINT = {}; END $dbproxy$",
                decode("61275cc38124"),
                decode("68")
            )
        );
    }
}
