//! The extended protocol's statements: a client's Parse, Bind and Describe
//! of a statement. With renaming on, named statements become shared
//! server-side names, prepared on the held connection where missing, and the
//! client's unnamed statement is sent again where the connection holds
//! another's; with renaming off (`pool.max_prepared_statements = 0`), names
//! pass through and what a statement under a client's own name does to the
//! session is recorded on the connection for its Binds
//! (`server_state::ClientNamed`). Session effects apply at Bind.

use std::sync::Arc;

use bytes::BytesMut;

use super::expect::{ClientParse, PendingNamed, Request};
use super::local::reject_sql;
use super::statements::{Statement, bound, server_name};
use super::transfer::{Conn, Exit, Phase};
use crate::config::PoolMode;
use crate::protocol::SqlState;
use crate::protocol::backend::ErrorFields;
use crate::protocol::extended::{parse_bind_names, parse_parse, write_bind_renamed, write_parse, write_target};
use crate::protocol::framing::HEADER_LEN;
use crate::router::{Class, WriteReason};
use crate::server_state::{ClientNamed, NamedChange, NamedEffects};
use crate::sql::Effects;

impl Conn<'_> {
    /// `refusal`: the Parse is dbproxy's own, raising a refused feature's
    /// error (a DO block that sets nothing).
    pub(super) async fn on_parse(&mut self, msg: &[u8], refusal: bool) -> Result<(), Exit> {
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
        // Those recorded and those to be: never more than the limit.
        let owed = self.expect.pending_named_effects();
        let room = self
            .attached()
            .is_none_or(|a| a.conn.conn.state.client_named.len() + owed < ClientNamed::LIMIT);
        let named = match (fx.is_empty(), room) {
            (true, _) => None,
            (false, false) => {
                self.apply_effects(&Effects::untracked());
                None
            }
            (false, true) => Some(Arc::new(NamedEffects {
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
        let named = match self.expect.pending_named(name) {
            PendingNamed::None => recorded,
            PendingNamed::SameBatch(named) => named,
            PendingNamed::Earlier { effects } => {
                if effects || recorded.is_some() {
                    self.apply_effects(&Effects::untracked());
                }
                None
            }
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

    pub(super) async fn on_bind(&mut self, msg: &[u8]) -> Result<(), Exit> {
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
    pub(super) async fn on_statement_target(&mut self, msg: &[u8], tag: u8, name: String) -> Result<(), Exit> {
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
