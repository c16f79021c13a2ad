//! A client's named prepared statements in transaction pooling: its names
//! mapped to shared server-side statements, with what they cost in memory so
//! that one client cannot grow the proxy without bound
//! (`pool.max_client_statement_bytes`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::expect::ClientParse;
use crate::protocol::extended::bind_param;
use crate::router::Class;
use crate::sql::{Effects, Pins, SettingChange, set_config_sql};

/// A client's named prepared statement.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The name used on servers: the same for the same text and types, so
    /// clients share server-side statements.
    pub server_name: Arc<str>,
    /// As the client sent it (UTF-8 or not).
    pub query: Box<[u8]>,
    pub param_types: Box<[u8]>,
    /// What running it does to the session.
    pub effects: Effects,
    /// Where it may run.
    pub class: Class,
}

/// The server-side name of a statement: a digest of its text, its types and
/// the database's schema epoch (see `Router::schema_epoch`).
pub(super) fn server_name(query: &[u8], param_types: &[u8], epoch: u64) -> Arc<str> {
    let mut h = Sha256::new();
    h.update(query);
    h.update([0]);
    h.update(param_types);
    h.update(epoch.to_le_bytes());
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("dbp_{hex}"))
}

/// Bytes a statement costs beyond its name, text and types: the map entry,
/// the statement itself, its server-side name and its effects.
pub const OVERHEAD: usize = 256;

/// `fx` of a statement run through Bind `body` (whose names end at
/// `rest_at`): each `set_config('name', $n, false)` gets the value bound,
/// whether sent as text or binary, if the Parse's `param_types` (its
/// parameter-type section; `None`: not known) declared the parameter text,
/// varchar, unknown or not at all, so that its bytes are the value as
/// set_config takes it (a `name`, `bpchar` or `"char"` parameter would be
/// cut or trimmed on the way). Otherwise, or for a NULL or a value that is
/// not UTF-8 (which cannot be carried as SQL), the client is pinned as an
/// untracked change.
pub fn bound<'a>(fx: &'a Effects, body: &[u8], rest_at: usize, param_types: Option<&[u8]>) -> Cow<'a, Effects> {
    if fx.param_changes.is_empty() {
        return Cow::Borrowed(fx);
    }
    // OIDs of text, varchar, unknown; 0: left to the server, which gives
    // set_config's argument text.
    const AS_TEXT: [u32; 4] = [0, 25, 1043, 705];
    let declared = |n: usize| -> Option<u32> {
        let oids = param_types?.get(2..)?;
        match oids.get(4 * (n - 1)..4 * n) {
            Some(oid) => Some(u32::from_be_bytes(oid.try_into().ok()?)),
            // Past the types declared: left to the server.
            None => Some(0),
        }
    };
    let mut bound = fx.clone();
    // From the last, so that each goes where it was among the changes.
    for (at, name, n) in std::mem::take(&mut bound.param_changes).into_iter().rev() {
        let value = match declared(n) {
            Some(oid) if AS_TEXT.contains(&oid) => bind_param(body, rest_at, n).and_then(|(_, value)| value),
            _ => None,
        };
        match value.and_then(|v| std::str::from_utf8(v).ok()) {
            Some(value) => {
                let sql = set_config_sql(&name, value);
                bound
                    .changes
                    .insert(at.min(bound.changes.len()), SettingChange::Set { name, sql });
            }
            None => bound.pins.add(Pins::UNTRACKED),
        }
    }
    Cow::Owned(bound)
}

/// What keeping statement `name` with this text and these types costs.
pub fn cost(name: &str, query: &[u8], param_types: &[u8]) -> usize {
    OVERHEAD + name.len() + query.len() + param_types.len()
}

/// The client's statements by its names, and their total [`cost`]. SipHash,
/// not a faster hash: the names are the client's to choose.
#[derive(Debug, Default)]
pub struct Statements {
    /// Each with the id its Parse was given.
    map: HashMap<Arc<str>, (Arc<Statement>, u64)>,
    bytes: usize,
    next_id: u64,
    /// A Parse was refused for the budget (warned about once per client).
    refused: bool,
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.map.get(name).map(|(s, _)| s)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Whether this is the first Parse refused for the budget.
    pub fn first_refusal(&mut self) -> bool {
        !std::mem::replace(&mut self.refused, true)
    }

    /// Total cost of the statements kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps `stmt` under `name`, replacing any statement of that name.
    /// Returns the Parse's id, for [`Self::forget`].
    pub fn insert(&mut self, name: &str, stmt: Arc<Statement>) -> ClientParse {
        self.next_id += 1;
        self.bytes += cost(name, &stmt.query, &stmt.param_types);
        let name: Arc<str> = name.into();
        if let Some((old, _)) = self.map.insert(name.clone(), (stmt, self.next_id)) {
            self.bytes -= cost(&name, &old.query, &old.param_types);
        }
        ClientParse { name, id: self.next_id }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        let (old, _) = self.map.remove(name)?;
        self.bytes -= cost(name, &old.query, &old.param_types);
        Some(old)
    }

    /// Removes the statement `parse` created, unless its name has been given
    /// to another since: that Parse got no ParseComplete after all.
    pub fn forget(&mut self, parse: &ClientParse) {
        if self.map.get(&*parse.name).is_some_and(|(_, id)| *id == parse.id) {
            self.remove(&parse.name);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Statement>> {
        self.map.values().map(|(s, _)| s)
    }

    /// The statements, to give them new server-side names (their cost stays).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Arc<Statement>> {
        self.map.values_mut().map(|(s, _)| s)
    }
}

/// Forgets the client's Parse that got no ParseComplete (see
/// `Expectations::take_unparsed`). Returns whether it was of the unnamed
/// statement.
pub fn forget_unparsed(statements: &mut Statements, unnamed: &mut Unnamed, parse: &ClientParse, skipped: bool) -> bool {
    if parse.name.is_empty() {
        unnamed.forget(parse.id, skipped);
        true
    } else {
        statements.forget(parse);
        false
    }
}

/// Longest unnamed Parse kept to be sent again: a longer one (a bulk
/// INSERT's text) only works on the connection it was sent to, so that idle
/// clients do not hold large copies.
pub const MAX_KEPT_PARSE: usize = 64 * 1024;

/// One unnamed Parse of the client's, as kept.
#[derive(Debug)]
struct Kept {
    /// Which of the client's unnamed Parses; 0: none.
    id: u64,
    /// The Parse, whole, to send again; empty: it may not be (a DEALLOCATE
    /// or DISCARD ALL the proxy handles, a Parse too long to keep).
    parse: Vec<u8>,
    /// Session effects of running it.
    effects: Effects,
    /// Where it may run.
    class: Class,
}

impl Default for Kept {
    fn default() -> Self {
        Kept {
            id: 0,
            parse: Vec::new(),
            effects: Effects::default(),
            class: Class::Neutral,
        }
    }
}

/// The client's unnamed prepared statement in transaction pooling. On a
/// direct connection it lasts until the next unnamed Parse, a simple Query
/// or its Close; through the pool, its Bind or Describe may come in a later
/// transaction than its Parse (libpq's `PQprepare` then `PQexecPrepared`,
/// pgx's describe-exec mode), on a server connection whose unnamed statement
/// is another client's, or none. So the proxy keeps the client's last
/// unnamed Parse, and each server connection records whose unnamed
/// statement it holds (`ServerState::unnamed`): where it is not the client's,
/// the Parse is sent again first.
#[derive(Debug)]
pub struct Unnamed {
    current: Kept,
    /// The one before, back if the current one's Parse is skipped after an error.
    previous: Kept,
    last_id: u64,
    /// The empty name, shared by this client's expectation entries.
    name: Arc<str>,
}

impl Default for Unnamed {
    fn default() -> Self {
        Unnamed {
            current: Kept::default(),
            previous: Kept::default(),
            last_id: 0,
            name: Arc::from(""),
        }
    }
}

impl Unnamed {
    /// The client sent unnamed Parse `msg`, kept to send again if `resend`
    /// (and not too long). Returns its id, for [`Self::forget`] and
    /// `ServerState::unnamed`.
    pub fn parsed(&mut self, msg: &[u8], resend: bool, effects: Effects, class: Class) -> ClientParse {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.last_id += 1;
        let kept = &mut self.current;
        kept.id = self.last_id;
        kept.effects = effects;
        kept.class = class;
        kept.parse.clear();
        if resend && msg.len() <= MAX_KEPT_PARSE {
            kept.parse.extend_from_slice(msg);
        }
        ClientParse {
            name: self.name.clone(),
            id: kept.id,
        }
    }

    /// The client's unnamed statement, if it has one: its id, and its Parse
    /// to send again (None: it may not be sent again).
    pub fn current(&self) -> Option<(u64, Option<&[u8]>)> {
        let kept = &self.current;
        (kept.id != 0).then(|| (kept.id, (!kept.parse.is_empty()).then_some(&kept.parse[..])))
    }

    /// The parameter-type section of the last unnamed Parse, if it is kept.
    pub fn param_types(&self) -> Option<Vec<u8>> {
        let (_, parse) = self.current()?;
        let p = crate::protocol::extended::parse_parse(parse?.get(crate::protocol::framing::HEADER_LEN..)?)?;
        Some(p.param_types.to_vec())
    }

    /// Where the last unnamed statement may run.
    pub fn class(&self) -> Class {
        self.current.class
    }

    /// What running the last unnamed statement does to the session.
    pub fn effects_mut(&mut self) -> &mut Effects {
        &mut self.current.effects
    }

    /// The Parse of the statement sent again by the proxy: not the client's
    /// own, so its failure forgets nothing of the client's (id 0).
    pub fn again(&self) -> ClientParse {
        ClientParse {
            name: self.name.clone(),
            id: 0,
        }
    }

    /// The statement is gone (a simple Query, a Close of it).
    pub fn drop_statement(&mut self) {
        self.current.id = 0;
    }

    /// Parse `id` got no ParseComplete: it failed, which drops the unnamed
    /// statement, or was `skipped` after an earlier error, which keeps the
    /// one before (if that was the last Parse before it; otherwise none is
    /// kept, and a Bind of it is refused).
    pub fn forget(&mut self, id: u64, skipped: bool) {
        if id == 0 {
            // Sent again by the proxy: nothing of the client's changes.
            return;
        }
        if self.current.id == id && skipped {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.previous.id = 0;
        } else {
            if self.current.id == id {
                self.current.id = 0;
            }
            if self.previous.id == id {
                self.previous.id = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_value_is_taken_where_its_declared_type_keeps_it_whole() {
        use crate::protocol::backend::{message, put_cstr};
        use bytes::BufMut;
        let fx = Effects {
            param_changes: vec![(0, "a.b".to_owned(), 1)],
            ..Effects::default()
        };
        let mut bind = bytes::BytesMut::new();
        message(&mut bind, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "");
            b.put_slice(&[0, 0, 0, 1, 0, 0, 0, 3, b'C', b':', b'\\', 0, 0]);
        });
        let body = &bind[crate::protocol::framing::HEADER_LEN..];
        let set = |types: Option<&[u8]>| bound(&fx, body, 2, types).into_owned();
        for types in [
            &[0, 0][..],
            &[0, 1, 0, 0, 0, 25],
            &[0, 1, 0, 0, 0, 0],
            &[0, 1, 0, 0, 4, 19],
        ] {
            let got = set(Some(types));
            assert!(got.pins.is_empty() && got.param_changes.is_empty(), "{types:?}");
            let want = "SELECT pg_catalog.set_config('a.b', E'C:\\\\', false)";
            assert!(
                matches!(&got.changes[..], [SettingChange::Set { sql, .. }] if sql == want),
                "{types:?}"
            );
        }
        // name (OID 19), "char" (18): the server would cut the value; unknown types.
        for types in [Some(&[0, 1, 0, 0, 0, 19][..]), Some(&[0, 1, 0, 0, 0, 18]), None] {
            let got = set(types);
            assert_eq!((got.pins, got.changes.len()), (Pins::UNTRACKED, 0), "{types:?}");
        }
    }

    #[test]
    fn server_names_depend_on_text_and_types() {
        let a = server_name(b"SELECT $1", &[0, 1, 0, 0, 0, 23], 0);
        assert_eq!(a, server_name(b"SELECT $1", &[0, 1, 0, 0, 0, 23], 0));
        assert_ne!(a, server_name(b"SELECT $1", &[0, 1, 0, 0, 0, 25], 0));
        assert_ne!(a, server_name(b"SELECT $2", &[0, 1, 0, 0, 0, 23], 0));
        assert_ne!(a, server_name(b"SELECT $1", &[0, 1, 0, 0, 0, 23], 1));
        assert!(a.starts_with("dbp_") && a.len() == 28);
    }

    fn stmt(query: &str) -> Arc<Statement> {
        Arc::new(Statement {
            server_name: server_name(query.as_bytes(), &[0, 0], 0),
            query: query.as_bytes().into(),
            param_types: Box::new([0, 0]),
            effects: Effects::default(),
            class: Class::Neutral,
        })
    }

    #[test]
    fn the_cost_follows_every_change() {
        let mut s = Statements::default();
        s.insert("a", stmt("SELECT 1"));
        s.insert("bb", stmt("SELECT 22"));
        assert_eq!(
            s.bytes(),
            cost("a", b"SELECT 1", &[0, 0]) + cost("bb", b"SELECT 22", &[0, 0])
        );
        // Replacing a name counts the new statement only.
        s.insert("a", stmt("SELECT 333"));
        assert_eq!(
            s.bytes(),
            cost("a", b"SELECT 333", &[0, 0]) + cost("bb", b"SELECT 22", &[0, 0])
        );
        assert!(s.remove("a").is_some());
        assert!(s.remove("a").is_none());
        assert_eq!(s.bytes(), cost("bb", b"SELECT 22", &[0, 0]));
        s.clear();
        assert_eq!((s.bytes(), s.contains("bb")), (0, false));
    }

    #[test]
    fn a_failed_parse_forgets_only_its_own_statement() {
        let mut s = Statements::default();
        let first = s.insert("a", stmt("SELECT 1"));
        let second = s.insert("a", stmt("SELECT 2"));
        s.forget(&first);
        assert_eq!(s.get("a").map(|st| &*st.query), Some(&b"SELECT 2"[..]));
        s.forget(&second);
        assert_eq!((s.get("a").is_none(), s.bytes()), (true, 0));
    }

    #[test]
    fn the_unnamed_statement_is_the_last_parse_kept() {
        let mut u = Unnamed::default();
        assert_eq!(u.current(), None);
        let first = u.parsed(b"P-first", true, Effects::default(), Class::Neutral);
        let second = u.parsed(b"P-second", true, Effects::default(), Class::Neutral);
        assert!(first.name.is_empty() && second.id > first.id);
        assert_eq!(u.current(), Some((second.id, Some(&b"P-second"[..]))));
        u.forget(first.id, false);
        assert_eq!(u.current().map(|(id, _)| id), Some(second.id));
        u.forget(second.id, false);
        assert_eq!(u.current(), None);
        let third = u.parsed(b"P-dealloc", false, Effects::default(), Class::Neutral);
        assert_eq!(u.current(), Some((third.id, None)));
        u.drop_statement();
        assert_eq!(u.current(), None);
        // Skipped after an error: the one before stays.
        let fourth = u.parsed(b"P-fourth", true, Effects::default(), Class::Neutral);
        let fifth = u.parsed(b"P-fifth", true, Effects::default(), Class::Neutral);
        u.forget(fifth.id, true);
        assert_eq!(u.current(), Some((fourth.id, Some(&b"P-fourth"[..]))));
        // The one before failed, and the next is skipped: none stays.
        let sixth = u.parsed(b"P-sixth", true, Effects::default(), Class::Neutral);
        u.forget(fourth.id, false);
        u.forget(sixth.id, true);
        assert_eq!(u.current(), None);
        // Two skipped: the one before both is not kept.
        u.parsed(b"P-seventh", true, Effects::default(), Class::Neutral);
        let eighth = u.parsed(b"P-eighth", true, Effects::default(), Class::Neutral);
        let ninth = u.parsed(b"P-ninth", true, Effects::default(), Class::Neutral);
        u.forget(eighth.id, true);
        u.forget(ninth.id, true);
        assert_eq!(u.current(), None);
        // Sent again by the proxy and skipped: nothing changes, even with none.
        u.forget(0, true);
        assert_eq!(u.current(), None);
        // A skipped Parse brings back the class of the one before, too.
        let write = Class::Primary(crate::router::WriteReason::Write);
        u.parsed(b"P-insert", true, Effects::default(), write);
        let read = u.parsed(b"P-select", true, Effects::default(), Class::Neutral);
        u.forget(read.id, true);
        assert_eq!(u.class(), write);
        // Too long to keep: known, but not to be sent again.
        let long = vec![b'x'; MAX_KEPT_PARSE + 1];
        let kept = u.parsed(&long, true, Effects::default(), Class::Neutral);
        assert_eq!(u.current(), Some((kept.id, None)));
    }
}
