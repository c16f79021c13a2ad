//! What the client sends, translated for whichever server connection serves
//! it: batches staged and routed, messages dispatched, simple queries, and a
//! client's Close of a statement (answered here with renaming on). Parse, Bind
//! and Describe of statements are in `extended.rs`; DEALLOCATE, DISCARD ALL
//! and refused session features in `local.rs`; the stale-plan resend in
//! `retry.rs`.

use bytes::{Buf, BytesMut};

use super::expect::{Request, Synthetic};
use super::statements::server_name;
use super::transfer::{Attached, Conn, Exit, HIGH_WATER, Phase, whole_frontend};
use crate::config::PoolMode;
use crate::pool::Role;
use crate::protocol::backend::{ErrorFields, ready_for_query};
use crate::protocol::extended::{close_complete, parse_bind_names, parse_complete, parse_parse, parse_target};
use crate::protocol::framing::{HEADER_LEN, read_cbytes};
use crate::protocol::{FrameError, Item, SqlState, TransactionStatus};
use crate::router::{Class, WriteReason};
use crate::server_state::NamedChange;
use crate::sql::Effects;

/// Bytes of an extended-protocol batch held back, with read/write splitting,
/// until its Sync shows where it may run. A larger batch goes to the primary
/// as it comes, so memory stays bounded.
const STAGED_LIMIT: usize = 1024 * 1024;

impl Conn<'_> {
    /// Statement renaming is on: transaction mode with a statement budget.
    pub(super) fn tracking(&self) -> bool {
        self.mode == PoolMode::Transaction && self.shared.max_prepared.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Handles every complete client message that can be handled now.
    pub(super) async fn process_client(&mut self) -> Result<(), Exit> {
        if self.retry.swallowing || self.retry.due {
            // A batch is about to be sent again: what follows must follow it.
            return Ok(());
        }
        while self.to_server.len() < HIGH_WATER {
            let item = match self.cscan.next(&self.cbuf, whole_frontend) {
                Ok(Some(item)) => item,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.shared.errors.count("client_protocol");
                    let code = match e {
                        FrameError::TooLarge { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
                        FrameError::BadLength { .. } => SqlState::PROTOCOL_VIOLATION,
                    };
                    let hint = "raise proxy.max_message_size if messages this large are expected";
                    return Err(Exit::Fatal(ErrorFields::fatal(code, e.to_string()).with_hint(hint)));
                }
            };
            if matches!(item, Item::Whole { .. }) && self.waiting_for_replica() {
                // A new request must not be pipelined onto a replica it may not
                // belong on: let the replica answer, release it, then route.
                // (A whole message has not moved the scanner: it is read again.)
                return Ok(());
            }
            if let Item::Whole {
                tag: tag @ (b'B' | b'D'),
                len,
            } = item
                && self.unnamed_in_doubt(tag, &self.cbuf[..len])
            {
                return Ok(());
            }
            match item {
                Item::Whole { tag, len } => {
                    let msg = self.cbuf.split_to(len);
                    self.on_message(tag, msg).await?;
                    self.emit_ready();
                }
                Item::Head { .. } => {
                    if !self.staged.is_empty() {
                        // CopyData after a staged batch (an extended-protocol
                        // COPY FROM STDIN): the batch goes first. What follows it
                        // is not seen yet, so only the primary is safe (as after
                        // a Flush); a COPY FROM needs the primary anyway.
                        self.flush_staged(true).await?;
                    }
                    // CopyData: it belongs to the server only while one is held.
                    self.stream_to_server = matches!(self.phase, Phase::Attached(_));
                    self.forward_client_bytes(item.len());
                }
                Item::Body(n) => self.forward_client_bytes(n),
            }
        }
        Ok(())
    }

    /// Attached to a replica in autocommit, with answers still owed.
    fn waiting_for_replica(&self) -> bool {
        match &self.phase {
            Phase::Attached(a) => {
                a.role == Role::Replica && a.status == TransactionStatus::Idle && !a.unsynced && !self.expect.is_empty()
            }
            _ => false,
        }
    }

    /// A Bind or Describe of the client's unnamed statement while a Parse
    /// of it in an earlier batch is unanswered: that Parse may yet be
    /// skipped after an error, leaving the connection another client's
    /// unnamed statement. Its answer is awaited first.
    fn unnamed_in_doubt(&self, tag: u8, msg: &[u8]) -> bool {
        if self.unnamed.current().is_none() || !self.tracking() {
            // (Clients that never prepare the unnamed statement stop here.)
            return false;
        }
        if tag == b'D' && msg.get(HEADER_LEN) != Some(&b'S') {
            // A portal's Describe (pgbench -M extended's) follows its Bind.
            return false;
        }
        // The queue is looked at from its end, where a batch's own Parse
        // usually is: the message is read only when it matters.
        if !self.expect.unnamed_parse_in_earlier_batch() {
            return false;
        }
        let body = &msg[HEADER_LEN..];
        match tag {
            b'B' => matches!(parse_bind_names(body), Some((_, "", _))),
            _ => matches!(parse_target(body), Some((b'S', ""))),
        }
    }

    fn forward_client_bytes(&mut self, n: usize) {
        if self.stream_to_server && matches!(self.phase, Phase::Attached(_)) {
            self.to_server.extend_from_slice(&self.cbuf[..n]);
        }
        self.cbuf.advance(n);
    }

    /// Writes the proxy's own answers that are due now.
    pub(super) fn emit_ready(&mut self) {
        for s in self.expect.take_ready() {
            match s {
                Synthetic::ParseComplete => parse_complete(&mut self.to_client),
                Synthetic::CloseComplete => close_complete(&mut self.to_client),
            }
        }
    }

    pub(super) fn attached(&mut self) -> Option<&mut Attached> {
        match &mut self.phase {
            Phase::Attached(a) => Some(a),
            _ => None,
        }
    }

    /// Handles one whole client message.
    async fn on_message(&mut self, tag: u8, msg: BytesMut) -> Result<(), Exit> {
        match tag {
            b'X' => return Err(Exit::Terminated),
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'c' | b'f' => {}
            _ => {
                return Err(Exit::Fatal(ErrorFields::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("invalid frontend message type {tag}"),
                )));
            }
        }
        if self.split && matches!(self.phase, Phase::Idle) {
            if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C') {
                // Which server a batch needs is known once it is complete.
                self.staged_bytes += msg.len();
                self.staged.push((tag, msg));
                if self.staged_bytes > STAGED_LIMIT {
                    // Held no longer: the batch goes to the primary, which is
                    // safe for whatever the rest of it holds.
                    tracing::debug!(
                        bytes = self.staged_bytes,
                        "large batch before Sync: sent to the primary unseen"
                    );
                    self.flush_staged(true).await?;
                }
                return Ok(());
            }
            if !self.staged.is_empty() {
                // After a Flush the rest of the batch follows the server chosen
                // now, unseen: only the primary is safe for whatever comes.
                self.flush_staged(tag == b'H').await?;
            }
        }
        if let Phase::SkipToSync = self.phase {
            // A request failed without a server (perhaps the batch just
            // flushed): its batch is skipped, and its Sync answered here.
            if tag == b'S' {
                ready_for_query(&mut self.to_client, TransactionStatus::Idle);
                self.phase = Phase::Idle;
            }
            return Ok(());
        }
        self.dispatch(tag, msg).await
    }

    /// Routes the staged batch by everything in it, then handles its messages.
    async fn flush_staged(&mut self, primary: bool) -> Result<(), Exit> {
        let staged = std::mem::take(&mut self.staged);
        self.staged_bytes = 0;
        let mut class = if primary {
            Class::Primary(WriteReason::Transaction)
        } else {
            Class::Neutral
        };
        let mut needs_server = false;
        let mut batch_unnamed = None;
        for (tag, msg) in &staged {
            let (c, needs) = self.staged_class(*tag, msg, &mut batch_unnamed);
            class = class.combine(c);
            needs_server |= needs;
        }
        if needs_server && !self.ensure_server(staged[0].0, class).await? {
            // The client has been told; the rest of the batch is skipped.
            return Ok(());
        }
        for (tag, msg) in staged {
            if matches!(self.phase, Phase::SkipToSync) {
                break;
            }
            self.dispatch(tag, msg).await?;
            self.emit_ready();
        }
        Ok(())
    }

    /// Where a staged message may run, and whether it needs a server at all.
    /// `batch_unnamed`: the class of the batch's last unnamed Parse so far.
    fn staged_class(&mut self, tag: u8, msg: &[u8], batch_unnamed: &mut Option<Class>) -> (Class, bool) {
        let body = &msg[HEADER_LEN..];
        match tag {
            b'P' => match parse_parse(body) {
                Some(p) => {
                    let (text, legibility) = self.read_statement(p.query);
                    let class = self.class_of(&text, legibility);
                    if p.name.is_empty() {
                        *batch_unnamed = Some(class);
                        (class, true)
                    } else {
                        let known = self.tracking()
                            && self.pool.knows_statement(&server_name(
                                p.query,
                                p.param_types,
                                self.router.schema_epoch(),
                            ));
                        (class, !known)
                    }
                }
                None => (Class::Primary(WriteReason::ParseFallback), true),
            },
            b'B' => match parse_bind_names(body) {
                Some((_, "", _)) => match batch_unnamed {
                    Some(class) => (*class, true),
                    // Refused without a server if the client has none.
                    None => (
                        self.unnamed.class(),
                        !self.tracking() || self.unnamed.current().is_some(),
                    ),
                },
                Some((_, name, _)) => match self.statements.get(name) {
                    Some(stmt) => (stmt.class, true),
                    None => (Class::Primary(WriteReason::ParseFallback), true),
                },
                None => (Class::Primary(WriteReason::ParseFallback), true),
            },
            b'C' => match parse_target(body) {
                Some((b'S', _)) if self.tracking() => (Class::Neutral, false),
                _ => (Class::Neutral, true),
            },
            _ => (Class::Neutral, true),
        }
    }

    /// Handles one client message, routed or not.
    pub(super) async fn dispatch(&mut self, tag: u8, msg: BytesMut) -> Result<(), Exit> {
        // A Bind is recorded by `on_bind`, which looks its statement up anyway.
        if tag != b'B' && self.tracking() && !self.retry.replaying {
            self.record_for_retry(tag, &msg, None);
        }
        let body = &msg[HEADER_LEN..];
        match tag {
            b'Q' => self.on_query(&msg).await,
            b'P' => self.on_parse(&msg, false).await,
            b'B' => self.on_bind(&msg).await,
            b'D' => match parse_target(body) {
                Some((b'S', name)) => self.on_statement_target(&msg, b'D', name.to_owned()).await,
                _ => {
                    self.send(&msg, b'D', Some(Request::DescribePortal), Class::Neutral)
                        .await
                }
            },
            b'C' => match parse_target(body) {
                Some((b'S', name)) if self.tracking() => {
                    // Only the client's view: the server keeps it for others.
                    if name.is_empty() {
                        self.unnamed.drop_statement();
                    } else {
                        self.statements.remove(name);
                    }
                    self.expect.synthetic(Synthetic::CloseComplete);
                    Ok(())
                }
                Some((b'S', name)) if !name.is_empty() && self.mode == PoolMode::Transaction => {
                    // Under the client's own name (renaming off).
                    if !self.ensure_server(b'C', Class::Neutral).await? {
                        return Ok(());
                    }
                    self.to_server.extend_from_slice(&msg);
                    self.expect.sent_named(Request::Close, NamedChange::Closed(name.into()));
                    self.tracker_and_sync_state(b'C');
                    Ok(())
                }
                _ => self.send(&msg, b'C', Some(Request::Close), Class::Neutral).await,
            },
            b'E' => self.send(&msg, b'E', Some(Request::Execute), Class::Neutral).await,
            b'S' => self.send(&msg, b'S', Some(Request::Sync), Class::Neutral).await,
            b'F' => {
                let class = Class::Primary(WriteReason::VolatileFunction);
                self.send(&msg, b'F', Some(Request::FunctionCall), class).await
            }
            // Flush and COPY messages without a server: nothing to flush, and
            // COPY messages outside COPY are ignored, as PostgreSQL does.
            _ if matches!(self.phase, Phase::Idle) => Ok(()),
            _ => self.send(&msg, tag, None, Class::Neutral).await,
        }
    }

    /// Forwards `msg` as is, expecting `request`'s answer.
    pub(super) async fn send(
        &mut self,
        msg: &[u8],
        tag: u8,
        request: Option<Request>,
        class: Class,
    ) -> Result<(), Exit> {
        if tag == b'S' && matches!(self.phase, Phase::Idle) {
            // A Sync with nothing before it: answer for the idle server.
            ready_for_query(&mut self.to_client, TransactionStatus::Idle);
            return Ok(());
        }
        if !self.ensure_server(tag, class).await? {
            return Ok(());
        }
        self.to_server.extend_from_slice(msg);
        self.sent(tag, request);
        Ok(())
    }

    /// Accounts for a request written to the server on the client's behalf.
    pub(super) fn sent(&mut self, tag: u8, request: Option<Request>) {
        if let Some(r) = request {
            self.expect.sent(r, false, None);
        }
        self.tracker_and_sync_state(tag);
    }

    /// The bookkeeping of [`Self::sent`] other than the expectation itself.
    pub(super) fn tracker_and_sync_state(&mut self, tag: u8) {
        if self.request_started.is_none() {
            self.request_started = Some(std::time::Instant::now());
        }
        if matches!(tag, b'c' | b'f') {
            self.expect.copy_end();
        }
        match tag {
            b'Q' => {
                self.tracker.request_sent();
                if let Some(a) = self.attached() {
                    a.conn.conn.state.query_sent();
                }
            }
            b'F' => self.tracker.request_sent(),
            b'S' => {
                self.tracker.request_sent();
                if let Some(a) = self.attached() {
                    a.unsynced = false;
                }
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                // Any of these can fail after an earlier Execute of the batch ran.
                self.tracker.statements_sent(1);
                if let Some(a) = self.attached() {
                    a.unsynced = true;
                }
            }
            _ => {}
        }
    }

    async fn on_query(&mut self, msg: &[u8]) -> Result<(), Exit> {
        // Whether answered here or by a server, as PostgreSQL does for any
        // simple Query (the server connection's is dropped as it is sent).
        self.unnamed.drop_statement();
        let read = read_cbytes(&msg[HEADER_LEN..]).map(|(sql, _)| self.read_statement(sql));
        let mut fx = match &read {
            Some((text, legibility)) => self.effects_of(text, *legibility),
            None => Effects::default(),
        };
        if !fx.param_changes.is_empty() {
            // No Bind gives the value (a SQL PREPARE body): untracked.
            fx.param_changes.clear();
            fx.pins.add(crate::sql::Pins::UNTRACKED);
        }
        let sql = read.as_ref().map(|(text, _)| &**text);
        if let (Some(cmd), Phase::Idle) = (&fx.local, &self.phase) {
            self.answer_locally(cmd.clone());
            return Ok(());
        }
        let reject = self.shared.live().config.pool.session_features == crate::config::SessionFeatures::Reject;
        if reject && self.mode == PoolMode::Transaction && !fx.pins.is_empty() {
            return self.reject_session_feature(&fx).await;
        }
        let class = match &read {
            // A client about to be pinned stays where it lands: the primary.
            Some(_) if self.split && !fx.pins.is_empty() => Class::Primary(WriteReason::Write),
            Some((text, legibility)) => self.class_of(text, *legibility),
            // Malformed: the server will say so.
            None => Class::Neutral,
        };
        if let Some(sql) = sql.filter(|s| crate::router::classify::is_ddl(s)) {
            self.router.note_ddl(sql);
        }
        if !self.ensure_server(b'Q', class).await? {
            return Ok(());
        }
        if let Some(cmd) = &fx.local {
            // Sent while a server is held (inside a transaction or pipelined).
            self.apply_effects(&fx);
            if self.forward_local_command(cmd, msg) {
                self.tracker.statements_sent(fx.statements);
                self.sent(b'Q', Some(Request::Query));
                return Ok(());
            }
        }
        self.apply_effects(&fx);
        self.to_server.extend_from_slice(msg);
        self.tracker.statements_sent(fx.statements);
        self.sent(b'Q', Some(Request::Query));
        Ok(())
    }
}
