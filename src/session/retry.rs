//! Sending a batch again after "cached plan must not change result type",
//! when the client cannot tell (see [`Retry`]), and moving a client's
//! statement to a fresh server copy after such an error.

use std::sync::Arc;

use bytes::BytesMut;

use super::statements::{Statement, server_name};
use super::transfer::{Conn, Exit, Phase};
use crate::protocol::TransactionStatus;
use crate::protocol::extended::parse_target;
use crate::protocol::framing::HEADER_LEN;

/// A batch that may be sent again after "cached plan must not change result
/// type": one whose first use of a named statement (Bind or Describe) failed
/// before anything ran, outside a transaction block, and which describes what
/// it returns (so the client learns the new shape from the second attempt,
/// exactly as if it had prepared after the schema change). The statement is
/// prepared afresh first. Anything else gets the error, as directly.
#[derive(Debug, Default)]
pub(super) struct Retry {
    /// Client messages from that first Bind/Describe to the Sync, as sent.
    pub(super) bytes: Vec<u8>,
    /// Server name of the statement the recorded part starts with.
    pub(super) statement: Option<Arc<str>>,
    /// An Execute ran in this batch before recording could start.
    pub(super) executed: bool,
    /// The recorded part has a Describe before any Execute.
    pub(super) described: bool,
    /// The recorded part has an Execute.
    pub(super) recorded_execute: bool,
    /// The recorded part ends with the batch's Sync.
    pub(super) closed: bool,
    /// The failed attempt's answers are being swallowed up to its ReadyForQuery.
    pub(super) swallowing: bool,
    /// The failed attempt is over: send the batch again.
    pub(super) due: bool,
    /// Sending it again (nothing is recorded meanwhile).
    pub(super) replaying: bool,
    /// The failed request was a Describe of the statement, whose
    /// ParameterDescription the client already has: drop the second one.
    pub(super) drop_parameter_description: bool,
    /// `Expectations::visible_done` when recording started: the retry is
    /// only invisible if no answer of the recorded part reached the client.
    pub(super) visible_mark: u64,
}

impl Retry {
    /// Forgets the current batch (keeping a small buffer's allocation).
    pub(super) fn reset(&mut self) {
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        if bytes.capacity() > KEEP {
            bytes = Vec::new();
        }
        *self = Retry {
            bytes,
            ..Retry::default()
        };
    }

    /// Whether a stale-plan error on server statement `name` can be hidden by
    /// resending the recorded tail: it is the statement recording started at,
    /// the tail is complete and describes its result, and no answer of it has
    /// reached the client (`visible_done` now is as when recording started).
    pub(super) fn covers(&self, name: &str, visible_done: u64) -> bool {
        self.statement.as_deref() == Some(name)
            && self.closed
            && self.described
            && !self.replaying
            && visible_done == self.visible_mark
    }
}

/// Longest batch tail kept for a retry.
const LIMIT: usize = 64 * 1024;
/// A recording buffer larger than this is freed between batches.
const KEEP: usize = 4096;

impl Conn<'_> {
    /// Keeps what `Retry` needs of the current extended batch.
    /// `bound`: for a Bind, the client's statement it names, as the caller
    /// already looked it up (`None`: unnamed or unknown).
    pub(super) fn record_for_retry(&mut self, tag: u8, msg: &[u8], bound: Option<&Arc<Statement>>) {
        if self.retry.closed {
            // The previous batch is over; this message starts the next one.
            self.retry.reset();
        }
        if self.retry.statement.is_some() {
            self.record_more(tag, msg);
            return;
        }
        match tag {
            b'E' => self.retry.executed = true,
            b'S' => self.retry.executed = false,
            b'B' | b'D' if !self.retry.executed => self.start_recording(tag, msg, bound),
            _ => {}
        }
    }

    /// Starts recording at a Bind or Describe of one of the client's named
    /// statements, outside a transaction block.
    fn start_recording(&mut self, tag: u8, msg: &[u8], bound: Option<&Arc<Statement>>) {
        if let Phase::Attached(a) = &self.phase
            && a.status != TransactionStatus::Idle
        {
            return;
        }
        if msg.len() > LIMIT {
            return;
        }
        let stmt = match tag {
            b'B' => bound,
            _ => parse_target(&msg[HEADER_LEN..])
                .and_then(|(k, s)| (k == b'S' && !s.is_empty()).then_some(s))
                .and_then(|name| self.statements.get(name)),
        };
        let Some(stmt) = stmt else {
            return;
        };
        let r = &mut self.retry;
        r.statement = Some(stmt.server_name.clone());
        r.bytes.extend_from_slice(msg);
        r.described = tag == b'D';
        r.visible_mark = self.expect.visible_done();
    }

    /// Adds a message of the batch being recorded.
    fn record_more(&mut self, tag: u8, msg: &[u8]) {
        let r = &mut self.retry;
        if r.bytes.len() + msg.len() > LIMIT {
            // Too much to keep: no retry for the rest of this batch.
            r.reset();
            r.executed = tag != b'S';
            return;
        }
        r.bytes.extend_from_slice(msg);
        match tag {
            b'D' if !r.recorded_execute => r.described = true,
            b'E' => r.recorded_execute = true,
            b'S' => r.closed = true,
            _ => {}
        }
    }

    /// After "cached plan must not change result type" on the server copy
    /// `name`: the client's statements using it move to the current schema
    /// epoch's name (starting a new epoch if `name` is current, since this is
    /// a schema change dbproxy did not see), so their next use prepares a
    /// fresh copy. The stale copy stays on the server: other clients that
    /// described it before the change get the error there, as directly.
    pub(super) fn renew_statement(&mut self, name: &Arc<str>) {
        let Some(stmt) = self.statements.values().find(|s| s.server_name == *name).cloned() else {
            self.router.bump_schema_epoch();
            return;
        };
        if server_name(&stmt.query, &stmt.param_types, self.router.schema_epoch()) == *name {
            self.router.bump_schema_epoch();
        }
        let fresh = server_name(&stmt.query, &stmt.param_types, self.router.schema_epoch());
        for s in self.statements.values_mut() {
            if s.server_name == *name {
                *s = Arc::new(Statement {
                    server_name: fresh.clone(),
                    ..(**s).clone()
                });
            }
        }
    }

    /// Sends the recorded batch tail again after a stale plan (see `Retry`):
    /// the statement's fresh Parse goes first, through the usual path.
    pub(super) async fn send_batch_again(&mut self) -> Result<(), Exit> {
        let bytes = std::mem::take(&mut self.retry.bytes);
        let drop_parameter_description = self.retry.drop_parameter_description;
        self.retry.reset();
        self.retry.drop_parameter_description = drop_parameter_description;
        self.retry.replaying = true;
        let mut at = 0;
        while let Some(head) = bytes.get(at..at + HEADER_LEN) {
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize + 1;
            let Some(msg) = bytes.get(at..at + len) else { break };
            let result = self.dispatch(head[0], BytesMut::from(msg)).await;
            self.emit_ready();
            if let Err(exit) = result {
                self.retry.replaying = false;
                return Err(exit);
            }
            at += len;
        }
        self.retry.replaying = false;
        // Keep the buffer's allocation for the next batches.
        if self.retry.bytes.is_empty() {
            self.retry.bytes = bytes;
            self.retry.bytes.clear();
        }
        Ok(())
    }
}

/// Whether an ErrorResponse body is "cached plan must not change result type".
pub(super) fn is_stale_plan(body: &[u8]) -> bool {
    let field = |t: u8| {
        body.split(|&b| b == 0)
            .find_map(|f| f.split_first().filter(|(k, _)| **k == t).map(|(_, v)| v))
    };
    field(b'C') == Some(b"0A000")
        && field(b'M').is_some_and(|m| m.starts_with(b"cached plan must not change result type"))
}
