//! What a server connection carries from one client to the next in
//! transaction mode: the prepared statements it holds (LRU-bounded) and the
//! session settings applied to it, so each client gets its own on attach.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::sql::{Effects, SettingChange};

/// Statements prepared on one server connection, by server-side name.
#[derive(Debug, Default)]
pub struct Prepared {
    /// foldhash rather than SipHash (every Bind touches this map): the names
    /// are dbproxy's own, derived by SHA-256 from the statement, and at most
    /// `max_prepared_statements` of them.
    last_used: foldhash::HashMap<Arc<str>, u64>,
    tick: u64,
}

impl Prepared {
    /// Whether `name` is prepared here, without counting a use.
    pub fn contains(&self, name: &str) -> bool {
        self.last_used.contains_key(name)
    }

    /// Whether `name` is prepared here; counts as a use.
    pub fn touch(&mut self, name: &str) -> bool {
        self.tick += 1;
        match self.last_used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `name` as prepared; returns the least recently used statement
    /// to close if that takes the count above `limit`.
    pub fn insert(&mut self, name: Arc<str>, limit: usize) -> Option<Arc<str>> {
        self.tick += 1;
        self.last_used.insert(name, self.tick);
        if self.last_used.len() <= limit {
            return None;
        }
        let oldest = self.last_used.iter().min_by_key(|(_, t)| **t).map(|(n, _)| n.clone())?;
        self.last_used.remove(&oldest);
        Some(oldest)
    }

    /// Forgets `name` (its Parse failed).
    pub fn remove(&mut self, name: &str) {
        self.last_used.remove(name);
    }

    /// Number of statements held.
    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }
}

/// What the statements a connection holds under clients' own names do to
/// the session (statement renaming off, `pool.max_prepared_statements = 0`),
/// for each Bind of them, whoever binds: only statements that do something
/// (a `SET`, a session-only feature, a `DO` block) are recorded, once the
/// server has answered their Parse.
#[derive(Debug, Default)]
pub struct ClientNamed {
    recorded: HashMap<Arc<str>, Arc<NamedEffects>>,
}

/// A statement's effects and its Parse's parameter types as sent (for a
/// `set_config` whose value is a parameter).
#[derive(Debug)]
pub struct NamedEffects {
    pub effects: Effects,
    pub param_types: Box<[u8]>,
}

/// A Parse or Close under a client's own name, applied to [`ClientNamed`]
/// when the server answers it (one it skips or refuses changes nothing).
#[derive(Debug, Clone)]
pub enum NamedChange {
    /// The statement now under the name, and what it does (None: nothing,
    /// or nothing dbproxy records).
    Parsed(Arc<str>, Option<Arc<NamedEffects>>),
    Closed(Arc<str>),
}

impl ClientNamed {
    /// Most statements recorded per connection.
    pub const LIMIT: usize = 64;

    /// How many are recorded.
    pub fn len(&self) -> usize {
        self.recorded.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.recorded.is_empty()
    }

    /// The effects of statement `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<Arc<NamedEffects>> {
        self.recorded.get(name).cloned()
    }

    /// The server answered a Parse or Close. (A statement is given a record
    /// only where the records and those owed stay within [`Self::LIMIT`].)
    pub fn apply(&mut self, change: NamedChange) {
        match change {
            // Accepted: the name was free, whatever was recorded under it.
            NamedChange::Parsed(name, Some(named)) => {
                self.recorded.insert(name, named);
            }
            NamedChange::Parsed(name, None) | NamedChange::Closed(name) => {
                self.recorded.remove(&name);
            }
        }
    }

    /// `DEALLOCATE name` was sent: whether it had a record.
    pub fn remove(&mut self, name: &str) -> bool {
        self.recorded.remove(name).is_some()
    }

    /// The connection holds none of them now (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.recorded.clear();
    }
}

type Values = BTreeMap<String, String>;

/// Session settings as `name -> statement that sets it`, with a fingerprint
/// so two sets compare in O(1) on the hot path.
///
/// The map is shared: clients whose startup packets ask for the same
/// settings share one (see `intern`), and a server connection that was
/// given a client's settings shares that client's, so the check on every
/// checkout is a pointer comparison rather than a walk over strings in
/// memory no other transaction has touched lately.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    values: Arc<Values>,
    fingerprint: u64,
    /// `default_transaction_isolation` is `serializable`, which hot
    /// standbys refuse: such a client's reads must go to the primary. None
    /// where it is not set here (the role's or database's default applies).
    serializable: Option<bool>,
    /// `client_encoding` is one whose characters may end in the byte of a
    /// backslash (SJIS, BIG5, GBK, UHC, GB18030, JOHAB); None: not set
    /// (the role's or database's default applies).
    backslash_trail: Option<bool>,
}

fn serializable(values: &Values) -> Option<bool> {
    // The statement that sets it names the value; no other value contains
    // this. (Names are keys as `sql::session` folds them.)
    values
        .get("default_transaction_isolation")
        .map(|sql| crate::sql::mentions(sql, "serializable"))
}

fn backslash_trail(values: &Values) -> Option<bool> {
    values
        .get("client_encoding")
        .map(|sql| crate::sql::encoding::backslash_trail(sql))
}

/// Settings `RESET ALL` leaves as they are (PostgreSQL's `GUC_NO_RESET_ALL`:
/// `SET ROLE` and `SET SESSION AUTHORIZATION` stay in force).
const NOT_RESET_BY_ALL: [&str; 2] = ["role", "session_authorization"];

/// After `RESET ALL`, `values` takes `before`'s [`NOT_RESET_BY_ALL`] settings.
fn keep_past_reset_all(values: &mut Values, before: &Values) {
    for name in NOT_RESET_BY_ALL {
        match before.get(name) {
            Some(sql) => values.insert(name.to_owned(), sql.clone()),
            None => values.remove(name),
        };
    }
}

fn fingerprint(values: &Values) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    values.hash(&mut h);
    h.finish()
}

/// The one shared map holding `values`, if clients already hold an equal
/// one. Bounded: entries whose clients have all gone are dropped when the
/// table fills, and a table full of live ones stops taking new entries.
fn intern(values: Values, fingerprint: u64) -> Arc<Values> {
    const MAX_INTERNED: usize = 1024;
    static INTERNED: LazyLock<Mutex<HashMap<u64, Weak<Values>>>> = LazyLock::new(Default::default);
    let mut table = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = table.get(&fingerprint).and_then(Weak::upgrade)
        && *shared == values
    {
        return shared;
    }
    let values = Arc::new(values);
    if table.len() >= MAX_INTERNED {
        table.retain(|_, w| w.strong_count() > 0);
    }
    if table.len() < MAX_INTERNED {
        table.insert(fingerprint, Arc::downgrade(&values));
    }
    values
}

impl Settings {
    /// Settings from `(name, value)` pairs given as plain values (startup
    /// parameters), set through `set_config` so lists stay lists.
    pub fn from_values<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Settings {
        let mut values = Values::new();
        for (name, value) in pairs {
            let name = name.to_ascii_lowercase();
            let sql = crate::sql::set_config_sql(&name, value);
            values.insert(name, sql);
        }
        let fingerprint = fingerprint(&values);
        Settings {
            serializable: serializable(&values),
            backslash_trail: backslash_trail(&values),
            values: intern(values, fingerprint),
            fingerprint,
        }
    }

    fn refresh(&mut self) {
        self.fingerprint = fingerprint(&self.values);
        self.serializable = serializable(&self.values);
        self.backslash_trail = backslash_trail(&self.values);
    }

    /// Whether transactions default to SERIALIZABLE; None where
    /// `default_transaction_isolation` is not set here.
    pub fn serializable(&self) -> Option<bool> {
        self.serializable
    }

    /// Whether the client's encoding may end a character with the byte of a
    /// backslash (see `sql::encoding::backslash_in_doubt`); None where
    /// `client_encoding` is not set here.
    pub fn backslash_trail(&self) -> Option<bool> {
        self.backslash_trail
    }

    /// Whether `name` (lower case) has the same value in both (or in neither).
    pub fn same_value(&self, other: &Settings, name: &str) -> bool {
        self.values.get(name) == other.values.get(name)
    }

    /// Whether both hold the same values.
    pub fn same_as(&self, other: &Settings) -> bool {
        Arc::ptr_eq(&self.values, &other.values)
            || (self.fingerprint == other.fingerprint && self.values == other.values)
    }

    /// Applies a confirmed change as a client sees it: RESET returns to the
    /// value the client's startup packet gave, if any.
    pub fn apply_for_client(&mut self, change: &SettingChange, startup: &Settings) {
        match change {
            SettingChange::Set { name, sql } => {
                Arc::make_mut(&mut self.values).insert(name.clone(), sql.clone());
            }
            SettingChange::Reset(name) => match startup.values.get(name) {
                Some(v) => {
                    Arc::make_mut(&mut self.values).insert(name.clone(), v.clone());
                }
                None => {
                    Arc::make_mut(&mut self.values).remove(name);
                }
            },
            SettingChange::ResetAll => {
                let mut values = Values::clone(&startup.values);
                keep_past_reset_all(&mut values, &self.values);
                self.values = Arc::new(values);
            }
        }
        self.refresh();
    }

    /// Applies a confirmed change as the server connection holds it: RESET
    /// returns to the connection's own default.
    pub fn apply_for_server(&mut self, change: &SettingChange) {
        match change {
            SettingChange::Set { name, sql } => {
                Arc::make_mut(&mut self.values).insert(name.clone(), sql.clone());
            }
            SettingChange::Reset(name) => {
                Arc::make_mut(&mut self.values).remove(name);
            }
            SettingChange::ResetAll => {
                let mut values = Values::new();
                keep_past_reset_all(&mut values, &self.values);
                self.values = Arc::new(values);
            }
        }
        self.refresh();
    }

    /// The SQL that turns `current` into `self`, updating `current` to match.
    /// `None` when they already match.
    pub fn carry_to(&self, current: &mut Settings) -> Option<String> {
        if Arc::ptr_eq(&self.values, &current.values) {
            return None;
        }
        if self.same_as(current) {
            // Share the map, so the next check is a pointer comparison.
            current.values = Arc::clone(&self.values);
            return None;
        }
        let mut sql = Vec::new();
        for (name, statement) in self.values.iter() {
            if current.values.get(name) != Some(statement) {
                sql.push(statement.clone());
            }
        }
        for name in current.values.keys() {
            if !self.values.contains_key(name) {
                sql.push(format!("RESET {}", crate::sql::setting_name_sql(name)));
            }
        }
        *current = self.clone();
        Some(sql.join("; "))
    }

    /// Forgets everything (the connection was reset).
    pub fn clear(&mut self) {
        self.values = Arc::default();
        self.refresh();
    }
}

/// The state a server connection carries between clients.
#[derive(Debug, Default)]
pub struct ServerState {
    pub prepared: Prepared,
    pub settings: Settings,
    /// The proxy lost track of the session state: reset before reuse.
    pub dirty: bool,
    /// Whose unnamed prepared statement the connection holds: the client's
    /// session id and its Parse's id (`session::statements::Unnamed`). None:
    /// nobody's known (none, or one the proxy did not record).
    pub unnamed: Option<(u64, u64)>,
    /// Statements under clients' own names that affect the session.
    pub client_named: ClientNamed,
    /// The `client_encoding` the server reported at login (the role's or
    /// database's) may end characters with a backslash's byte.
    pub default_backslash_trail: bool,
    /// A standby's connection whose transactions default to SERIALIZABLE
    /// (the role's or database's setting, asked at login): no read runs
    /// there unless its client sets another default. Counted in its pool.
    pub default_serializable: Option<crate::pool::Gauge<Arc<AtomicUsize>>>,
}

impl ServerState {
    /// A simple Query was sent: PostgreSQL drops the unnamed statement.
    pub fn query_sent(&mut self) {
        self.unnamed = None;
    }

    /// Whether text sent now is read by the server in an encoding that may
    /// end characters with a backslash's byte: as set on it, or as it
    /// started.
    pub fn backslash_trail(&self) -> bool {
        self.settings.backslash_trail().unwrap_or(self.default_backslash_trail)
    }

    /// The SQL that gives this connection `client`'s settings (see
    /// [`Settings::carry_to`]). Where transactions default to SERIALIZABLE
    /// it runs at READ COMMITTED: a standby refuses the snapshot that
    /// `set_config` takes at SERIALIZABLE.
    pub fn carry(&mut self, client: &Settings) -> Option<String> {
        let sql = client.carry_to(&mut self.settings)?;
        Some(match self.default_serializable {
            Some(_) => format!("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; {sql}"),
            None => sql,
        })
    }

    /// After `DISCARD ALL` ran on the connection.
    pub fn reset(&mut self) {
        self.prepared = Prepared::default();
        self.settings.clear();
        self.dirty = false;
        self.unnamed = None;
        self.client_named.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_named_effects_are_recorded_once_answered_until_closed() {
        let set = || {
            Some(Arc::new(NamedEffects {
                effects: Effects {
                    changes: vec![SettingChange::Set {
                        name: "work_mem".into(),
                        sql: "SET work_mem = '1MB'".into(),
                    }],
                    ..Effects::default()
                },
                param_types: [0, 0].into(),
            }))
        };
        let parsed = |name: &str, named| NamedChange::Parsed(name.into(), named);
        let mut named = ClientNamed::default();
        named.apply(parsed("s0", set()));
        named.apply(parsed("s1", None));
        assert!(named.get("s0").is_some() && named.get("s1").is_none());
        // An accepted Parse means the name was free: its record replaces any.
        named.apply(parsed("s0", None));
        assert!(named.get("s0").is_none());
        named.apply(parsed("s0", set()));
        named.apply(NamedChange::Closed("s0".into()));
        assert!(named.get("s0").is_none() && named.is_empty());
        for i in 0..3 {
            named.apply(parsed(&format!("n{i}"), set()));
        }
        named.apply(parsed("n0", set()));
        named.apply(parsed("plain", None));
        assert_eq!(named.len(), 3);
        assert!(named.remove("n1") && !named.remove("n1"));
        assert!(named.get("n1").is_none() && named.get("n2").is_some());
        named.clear();
        assert!(named.get("n2").is_none());
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut p = Prepared::default();
        assert_eq!(p.insert("a".into(), 2), None);
        assert_eq!(p.insert("b".into(), 2), None);
        assert!(p.touch("a"));
        assert_eq!(p.insert("c".into(), 2).as_deref(), Some("b"));
        assert!(!p.touch("b"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_serializable_default_is_known_from_how_it_was_set() {
        let change = |name: &str, sql: &str| SettingChange::Set {
            name: name.into(),
            sql: sql.into(),
        };
        let startup = Settings::from_values([("default_transaction_isolation", "SERIALIZABLE")]);
        assert_eq!(startup.serializable(), Some(true));
        let mut s = Settings::default();
        assert_eq!(s.serializable(), None, "not set: the role's default applies");
        s.apply_for_client(
            &change(
                "default_transaction_isolation",
                "SET default_transaction_isolation TO 'serializable'",
            ),
            &Settings::default(),
        );
        assert_eq!(s.serializable(), Some(true));
        s.apply_for_client(
            &change(
                "default_transaction_isolation",
                "SET default_transaction_isolation TO 'repeatable read'",
            ),
            &Settings::default(),
        );
        assert_eq!(s.serializable(), Some(false));
        s.apply_for_client(&SettingChange::ResetAll, &startup);
        assert_eq!(s.serializable(), Some(true), "RESET ALL returns to the startup value");
        s.apply_for_client(&SettingChange::ResetAll, &Settings::default());
        assert_eq!(s.serializable(), None, "RESET ALL with no startup value");
        let mut quoted = Settings::default();
        let fx = crate::sql::analyze("SET \"Default_Transaction_Isolation\" TO 'SERIALIZABLE'");
        quoted.apply_for_client(&fx.changes[0], &Settings::default());
        assert_eq!(
            quoted.serializable(),
            Some(true),
            "setting names are matched as PostgreSQL does"
        );
    }

    #[test]
    fn carrying_settings_sets_and_resets_the_difference() {
        let startup = Settings::from_values([("application_name", "a")]);
        let mut client = startup.clone();
        client.apply_for_client(
            &SettingChange::Set {
                name: "statement_timeout".into(),
                sql: "SET statement_timeout TO '150ms'".into(),
            },
            &startup,
        );
        let mut server = Settings::default();
        server.apply_for_server(&SettingChange::Set {
            name: "search_path".into(),
            sql: "SET search_path TO x".into(),
        });
        let sql = client.carry_to(&mut server).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'a', false); SET statement_timeout TO '150ms'; RESET \"search_path\""
        );
        assert!(server.same_as(&client));
        assert_eq!(client.carry_to(&mut server), None);
        client.apply_for_client(&SettingChange::ResetAll, &startup);
        assert!(client.same_as(&startup));
    }

    #[test]
    fn equal_startup_settings_share_one_map_and_changes_do_not_leak_into_it() {
        let a = Settings::from_values([("application_name", "share-test"), ("DateStyle", "ISO")]);
        let mut b = Settings::from_values([("datestyle", "ISO"), ("application_name", "share-test")]);
        assert!(Arc::ptr_eq(&a.values, &b.values));
        let c = Settings::from_values([("application_name", "share-test-2")]);
        assert!(!Arc::ptr_eq(&a.values, &c.values) && !a.same_as(&c));

        // A server connection given `a`'s settings shares them; the
        // same values reached another way are adopted on the next check.
        let mut server = Settings::default();
        assert!(a.carry_to(&mut server).is_some());
        assert!(Arc::ptr_eq(&a.values, &server.values));
        let mut other = Settings::default();
        other.apply_for_server(&SettingChange::Set {
            name: "application_name".into(),
            sql: crate::sql::set_config_sql("application_name", "share-test"),
        });
        other.apply_for_server(&SettingChange::Set {
            name: "datestyle".into(),
            sql: crate::sql::set_config_sql("datestyle", "ISO"),
        });
        assert!(!Arc::ptr_eq(&a.values, &other.values));
        assert_eq!(a.carry_to(&mut other), None);
        assert!(Arc::ptr_eq(&a.values, &other.values));

        // Changing one holder's copy leaves the shared one alone.
        b.apply_for_client(
            &SettingChange::Set {
                name: "search_path".into(),
                sql: "SET search_path TO x".into(),
            },
            &a,
        );
        server.apply_for_server(&SettingChange::Reset("datestyle".into()));
        assert!(!b.same_as(&a) && !server.same_as(&a));
        assert_eq!(a.values.len(), 2);
        assert_eq!(a.carry_to(&mut server).as_deref(), Some(a.values["datestyle"].as_str()));
    }
}
