//! What the client sends, translated for whichever server connection serves
//! it: named prepared statements renamed to shared server-side names (and
//! prepared on the spot where missing), session settings carried over on
//! attach, session-only features pinning the client, and routing to a server
//! connection. A client's Close of a statement is answered here; DEALLOCATE,
//! DISCARD ALL and refused session features are in `local.rs`, the stale-plan
//! resend in `retry.rs`.

use std::sync::Arc;

use bytes::{Buf, BytesMut};

use super::expect::{ClientParse, PendingNamed, Request, Synthetic};
use super::local::reject_sql;
use super::statements::{Statement, bound, server_name};
use super::transfer::{Attached, Conn, Exit, HIGH_WATER, Phase, whole_frontend};
use crate::config::PoolMode;
use crate::pool::Role;
use crate::protocol::backend::{ErrorFields, ready_for_query};
use crate::protocol::extended::{
    close_complete, parse_bind_names, parse_complete, parse_parse, parse_target, write_bind_renamed, write_parse,
    write_target,
};
use crate::protocol::framing::{HEADER_LEN, read_cbytes};
use crate::protocol::{FrameError, Item, SqlState, TransactionStatus};
use crate::router::{Class, WriteReason};
use crate::server_state::{NamedChange, NamedEffects};
use crate::sql::{Effects, Pins};

/// Bytes of an extended-protocol batch held back, with read/write splitting,
/// until its Sync shows where it may run. A larger batch goes to the primary
/// as it comes, so memory stays bounded.
const STAGED_LIMIT: usize = 1024 * 1024;

impl Conn<'_> {
    /// Statement renaming is on: transaction mode with a statement budget.
    fn tracking(&self) -> bool {
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
    async fn send(&mut self, msg: &[u8], tag: u8, request: Option<Request>, class: Class) -> Result<(), Exit> {
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

    /// `refusal`: the Parse is dbproxy's own, raising a refused feature's
    /// error (a DO block that sets nothing).
    async fn on_parse(&mut self, msg: &[u8], refusal: bool) -> Result<(), Exit> {
        let Some(p) = parse_parse(&msg[HEADER_LEN..]) else {
            // Let the server judge a Parse dbproxy cannot read (malformed, or
            // a name that is not UTF-8 in a client encoding that allows it).
            let class = Class::Primary(WriteReason::ParseFallback);
            if msg.get(HEADER_LEN) == Some(&0) && self.mode == PoolMode::Transaction {
                // Of the unnamed statement: the client's all the same.
                return self.parse_unnamed(msg, Effects::default(), class).await;
            }
            self.send(msg, b'P', Some(Request::Parse), class).await?;
            self.set_unnamed_owner(None);
            if self.mode == PoolMode::Transaction
                && let Some(a) = self.attached()
            {
                // A statement under the client's own name: reset before
                // anyone else gets the connection.
                a.conn.conn.state.dirty = true;
            }
            return Ok(());
        };
        // (The text is sent as it came, whatever dbproxy reads it as.)
        let (text, legibility) = self.read_statement(p.query);
        let mut fx = self.effects_of(&text, legibility);
        fx.opaque &= !refusal;
        if !fx.pins.is_empty()
            && self.shared.live().config.pool.session_features == crate::config::SessionFeatures::Reject
            && !crate::sql::lexer::tokenize(&text)
                .iter()
                .any(|t| t.kind == crate::sql::lexer::Kind::Param)
        {
            // Refused where it would run: the statement becomes one that
            // raises the error when executed (statements with parameters
            // cannot be rewritten so, and still pin).
            let mut rewritten = BytesMut::new();
            write_parse(&mut rewritten, p.name, reject_sql(&fx).as_bytes(), &[0, 0]);
            return Box::pin(self.on_parse(&rewritten, true)).await;
        }
        let class = self.class_of(&text, legibility);
        if crate::router::classify::is_ddl(&text) {
            self.router.note_ddl(&text);
        }
        if p.name.is_empty() || !self.tracking() {
            let unnamed = p.name.is_empty();
            if unnamed && self.mode == PoolMode::Transaction {
                return self.parse_unnamed(msg, fx, class).await;
            }
            if !unnamed && self.mode == PoolMode::Transaction {
                return self.parse_client_named(msg, p.name, fx, p.param_types, class).await;
            }
            self.send(msg, b'P', Some(Request::Parse), class).await?;
            if unnamed {
                // Session mode: whose it is, is not recorded.
                self.set_unnamed_owner(None);
            }
            return Ok(());
        }
        if self.statements.contains(p.name) && !self.expect.parse_pending_before_sync(p.name) {
            // (A name whose Parse in an earlier batch is unanswered may yet
            // fail and be free: the new statement replaces it, unchecked.)
            let message = format!("prepared statement \"{}\" already exists", p.name);
            self.refuse(&ErrorFields::error(SqlState::DUPLICATE_PREPARED_STATEMENT, message));
            return Ok(());
        }
        let budget = self.shared.live().config.pool.max_client_statement_bytes;
        let cost = super::statements::cost(p.name, p.query, p.param_types);
        if budget > 0 && self.statements.bytes() + cost > budget {
            self.shared.errors.count("client_statement_limit");
            let held = self.statements.bytes();
            let why = "client's prepared statement refused: over pool.max_client_statement_bytes";
            if self.statements.first_refusal() {
                // Once per client: the counter has them all.
                tracing::warn!(held, cost, "{why}");
            } else {
                tracing::debug!(held, cost, "{why}");
            }
            let message = format!(
                "prepared statement \"{}\" would take this client's prepared statements over \
                 pool.max_client_statement_bytes ({budget} bytes) in dbproxy",
                p.name
            );
            let hint =
                "close (DEALLOCATE) prepared statements no longer needed, or raise pool.max_client_statement_bytes";
            self.refuse(&ErrorFields::error(SqlState::PROGRAM_LIMIT_EXCEEDED, message).with_hint(hint));
            return Ok(());
        }
        let stmt = Arc::new(Statement {
            server_name: server_name(p.query, p.param_types, self.router.schema_epoch()),
            query: p.query.into(),
            param_types: p.param_types.into(),
            effects: fx,
            class,
        });
        if matches!(self.phase, Phase::Idle) && self.pool.knows_statement(&stmt.server_name) {
            // A server accepted this very statement before: no need to hold
            // one just to hear so again (clients that prepare synchronously
            // outside transactions would otherwise queue behind busy ones).
            let client = self.statements.insert(p.name, stmt);
            self.expect.synthetic_parse(client);
            return Ok(());
        }
        if !self.ensure_server(b'P', stmt.class).await? {
            return Ok(());
        }
        let client = self.statements.insert(p.name, stmt.clone());
        let held = self
            .attached()
            .is_some_and(|a| a.conn.conn.state.prepared.touch(&stmt.server_name));
        self.count_prepared(held);
        if held {
            self.expect.synthetic_parse(client);
        } else {
            self.prepare(&stmt, Some(client));
        }
        if let Some(a) = self.attached() {
            a.unsynced = true;
        }
        Ok(())
    }

    /// The client's unnamed Parse, kept to be sent again where a later Bind
    /// or Describe of it finds another client's unnamed statement, or none.
    /// (Statement tracking off, `pool.max_prepared_statements = 0`: only its
    /// class and effects are kept, for a Bind in the same transaction.)
    async fn parse_unnamed(&mut self, msg: &[u8], mut fx: Effects, class: Class) -> Result<(), Exit> {
        if !self.ensure_server(b'P', class).await? {
            return Ok(());
        }
        let tracking = self.tracking();
        let local = if tracking { fx.local.take() } else { None };
        let client = self.unnamed.parsed(msg, tracking && local.is_none(), fx, class);
        self.set_unnamed_owner(tracking.then_some(client.id));
        match local {
            // DEALLOCATE / DISCARD ALL through the extended protocol.
            Some(cmd) => self.forward_local_parse(&cmd, msg, client),
            None => {
                self.to_server.extend_from_slice(msg);
                match tracking {
                    true => self.expect.sent_client_parse(None, client),
                    false => self.expect.sent(Request::Parse, false, None),
                }
                self.tracker_and_sync_state(b'P');
            }
        }
        Ok(())
    }

    /// A Parse under the client's own name (renaming off): what the
    /// statement does is recorded on the connection once the server accepts
    /// it, for its Binds (see `server_state::ClientNamed`). Past the number
    /// recorded, the client is pinned instead.
    async fn parse_client_named(
        &mut self,
        msg: &[u8],
        name: &str,
        fx: Effects,
        param_types: &[u8],
        class: Class,
    ) -> Result<(), Exit> {
        if !self.ensure_server(b'P', class).await? {
            return Ok(());
        }
        let full = self.attached().is_some_and(|a| a.conn.conn.state.client_named.full());
        let named = match (fx.is_empty(), full) {
            (true, _) => None,
            (false, true) => {
                self.apply_effects(&Effects {
                    pins: Pins::UNTRACKED,
                    ..Effects::default()
                });
                None
            }
            (false, false) => Some(Arc::new(NamedEffects {
                effects: fx,
                param_types: param_types.into(),
            })),
        };
        self.to_server.extend_from_slice(msg);
        self.expect
            .sent_named(Request::Parse, NamedChange::Parsed(name.into(), named));
        self.tracker_and_sync_state(b'P');
        Ok(())
    }

    /// A Bind of statement `name` under the client's own name (renaming
    /// off), in the held connection's stream: what it does is that of the
    /// Parse of it in the same batch, else of the statement recorded on the
    /// connection. Behind Parses or Closes of it in earlier batches only,
    /// still unanswered (which may yet fail or be skipped), which statement
    /// the Bind will find is not known: the client is pinned if any of them,
    /// or the one recorded, does something.
    fn bind_client_named(&mut self, name: &str, body: &[u8], rest_at: usize) {
        let recorded = self.attached().and_then(|a| a.conn.conn.state.client_named.get(name));
        let untracked = || {
            Some(Arc::new(NamedEffects {
                effects: Effects {
                    pins: Pins::UNTRACKED,
                    ..Effects::default()
                },
                param_types: Box::default(),
            }))
        };
        let named = match self.expect.pending_named(name) {
            PendingNamed::None => recorded,
            PendingNamed::SameBatch(named) => named,
            PendingNamed::Earlier { effects } if effects || recorded.is_some() => untracked(),
            PendingNamed::Earlier { .. } => None,
        };
        if let Some(n) = named {
            self.apply_effects(&bound(&n.effects, body, rest_at, Some(&n.param_types)));
        }
    }

    /// Records whose unnamed statement the held connection has now: this
    /// client's Parse `id`, or nobody's known.
    fn set_unnamed_owner(&mut self, id: Option<u64>) {
        let me = self.me.id;
        if let Some(a) = self.attached() {
            a.conn.conn.state.unnamed = id.map(|id| (me, id));
        }
    }

    /// [`Self::ensure_server`] for a Bind or Describe, of the client's
    /// unnamed statement if `unnamed` (tracking on): a client that has none
    /// is refused without taking a connection, and the connection taken gets
    /// the client's statement if it lacks it. `Ok(false)`: the client has
    /// been answered.
    async fn ensure_server_for(&mut self, tag: u8, class: Class, unnamed: bool) -> Result<bool, Exit> {
        if unnamed && self.unnamed.current().is_none() {
            self.refuse_missing_unnamed();
            return Ok(false);
        }
        Ok(self.ensure_server(tag, class).await? && (!unnamed || self.ensure_unnamed()))
    }

    /// Whether a Bind or Describe of the client's unnamed statement may go
    /// to the held connection: where the connection's unnamed statement is
    /// another's (or none), the client's Parse is sent again first.
    fn ensure_unnamed(&mut self) -> bool {
        let me = self.me.id;
        let Phase::Attached(a) = &mut self.phase else {
            return true;
        };
        match self.unnamed.current() {
            Some((id, _)) if a.conn.conn.state.unnamed == Some((me, id)) => true,
            Some((id, Some(parse))) => {
                self.to_server.extend_from_slice(parse);
                // Skipped or failed, it leaves the connection's unnamed statement unknown.
                self.expect.sent_unnamed_again(self.unnamed.again());
                a.conn.conn.state.unnamed = Some((me, id));
                true
            }
            _ => {
                self.refuse_missing_unnamed();
                false
            }
        }
    }

    /// A Bind or Describe of the unnamed statement by a client that has
    /// none: refused as PostgreSQL refuses it (never given another's).
    fn refuse_missing_unnamed(&mut self) {
        let message = "unnamed prepared statement does not exist";
        self.refuse(&ErrorFields::error(SqlState::INVALID_SQL_STATEMENT_NAME, message));
    }

    /// Writes a Parse of `stmt` to the server connection held (closing the
    /// least recently used statement if that exceeds the budget): the
    /// client's own Parse, or one the proxy injects (`client` None).
    fn prepare(&mut self, stmt: &Statement, client: Option<ClientParse>) {
        let limit = self.shared.live().config.pool.max_prepared_statements;
        let Phase::Attached(a) = &mut self.phase else {
            return;
        };
        if let Some(old) = a.conn.conn.state.prepared.insert(stmt.server_name.clone(), limit) {
            write_target(&mut self.to_server, b'C', b'S', &old);
            self.expect.sent(Request::Close, true, Some(old));
        }
        write_parse(&mut self.to_server, &stmt.server_name, &stmt.query, &stmt.param_types);
        match client {
            Some(client) => self.expect.sent_client_parse(Some(stmt.server_name.clone()), client),
            None => self.expect.sent(Request::Parse, true, Some(stmt.server_name.clone())),
        }
    }

    /// Prepares `stmt` on the held connection unless it is there already.
    fn ensure_prepared(&mut self, stmt: &Statement) {
        let held = self
            .attached()
            .is_some_and(|a| a.conn.conn.state.prepared.touch(&stmt.server_name));
        self.count_prepared(held);
        if !held {
            self.prepare(stmt, None);
        }
    }

    /// Counts a named statement found prepared on the server connection, or not.
    fn count_prepared(&self, held: bool) {
        let counter = if held {
            &self.stats.prepared_hits
        } else {
            &self.stats.prepared_misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn on_bind(&mut self, msg: &[u8]) -> Result<(), Exit> {
        let names = parse_bind_names(&msg[HEADER_LEN..]);
        let known = match names {
            Some((_, name, _)) if self.tracking() && !name.is_empty() => self.statements.get(name).cloned(),
            _ => None,
        };
        if self.tracking() && !self.retry.replaying {
            self.record_for_retry(b'B', msg, known.as_ref());
        }
        let class = match (&names, &known) {
            (_, Some(stmt)) => stmt.class,
            (Some((_, "", _)), _) => self.unnamed.class(),
            _ => Class::Primary(WriteReason::ParseFallback),
        };
        let unnamed = self.tracking() && matches!(names, Some((_, "", _)));
        if !self.ensure_server_for(b'B', class, unnamed).await? {
            return Ok(());
        }
        match (names, known) {
            (Some((portal, _, rest_at)), Some(stmt)) => {
                self.ensure_prepared(&stmt);
                let fx = bound(&stmt.effects, &msg[HEADER_LEN..], rest_at, Some(&stmt.param_types));
                self.apply_effects(&fx);
                write_bind_renamed(&mut self.to_server, msg, portal, &stmt.server_name, rest_at);
                self.expect.sent(Request::Bind, false, Some(stmt.server_name.clone()));
                self.tracker_and_sync_state(b'B');
                return Ok(());
            }
            (names, _) => {
                match names {
                    Some((_, name, rest_at)) if !name.is_empty() && self.mode == PoolMode::Transaction => {
                        self.bind_client_named(name, &msg[HEADER_LEN..], rest_at);
                    }
                    // Names dbproxy cannot read: whatever the statement does
                    // ends with the connection's reset.
                    None if self.mode == PoolMode::Transaction => {
                        if let Some(a) = self.attached() {
                            a.conn.conn.state.dirty = true;
                        }
                    }
                    _ => {}
                }
                if let Some((_, "", rest_at)) = names {
                    let fx = std::mem::take(self.unnamed.effects_mut());
                    // (Looked up only for a set_config with a parameter.)
                    let types = (!fx.param_changes.is_empty())
                        .then(|| self.unnamed.param_types())
                        .flatten();
                    self.apply_effects(&bound(&fx, &msg[HEADER_LEN..], rest_at, types.as_deref()));
                    *self.unnamed.effects_mut() = fx;
                }
                self.to_server.extend_from_slice(msg);
            }
        }
        self.sent(b'B', Some(Request::Bind));
        Ok(())
    }

    /// Describe of a statement: renamed like Bind.
    async fn on_statement_target(&mut self, msg: &[u8], tag: u8, name: String) -> Result<(), Exit> {
        let unnamed = self.tracking() && name.is_empty();
        if !self.ensure_server_for(tag, Class::Neutral, unnamed).await? {
            return Ok(());
        }
        let known = if self.tracking() {
            self.statements.get(&name).cloned()
        } else {
            None
        };
        match known {
            Some(stmt) => {
                self.ensure_prepared(&stmt);
                write_target(&mut self.to_server, tag, b'S', &stmt.server_name);
                // Named, so a stale-plan error on it finds the statement.
                self.expect
                    .sent(Request::DescribeStatement, false, Some(stmt.server_name.clone()));
                self.tracker_and_sync_state(tag);
            }
            None => {
                self.to_server.extend_from_slice(msg);
                self.sent(tag, Some(Request::DescribeStatement));
            }
        }
        Ok(())
    }
}
