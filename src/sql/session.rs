//! What a statement does to the session beyond its transaction: settings it
//! changes (carried to whichever server connection serves the client next),
//! session-only features that pin the client to its server connection, and
//! commands about the client's own prepared statements that the proxy answers.

use super::lexer::{Kind, Token, tokenize};

/// Session-only features a client holds on its server connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pins(u8);

impl Pins {
    pub const LISTEN: Pins = Pins(1);
    pub const ADVISORY_LOCK: Pins = Pins(2);
    pub const TEMP_TABLE: Pins = Pins(4);
    pub const HOLD_CURSOR: Pins = Pins(8);
    pub const SQL_PREPARE: Pins = Pins(16);
    /// A session change the proxy cannot carry (e.g. SET SESSION CHARACTERISTICS).
    pub const UNTRACKED: Pins = Pins(32);
    /// Every feature (what DISCARD ALL releases).
    pub const ALL: Pins = Pins(u8::MAX);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The features as one byte (see [`Pins::from_bits`]).
    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> Pins {
        Pins(bits)
    }

    pub fn add(&mut self, other: Pins) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: Pins) {
        self.0 &= !other.0;
    }

    /// Names of the features held, for logs.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Self::LISTEN, "LISTEN"),
            (Self::ADVISORY_LOCK, "advisory lock"),
            (Self::TEMP_TABLE, "temporary table"),
            (Self::HOLD_CURSOR, "WITH HOLD cursor"),
            (Self::SQL_PREPARE, "SQL PREPARE"),
            (Self::UNTRACKED, "untracked session setting"),
        ]
        .into_iter()
        .filter(|(p, _)| self.0 & p.0 != 0)
        .map(|(_, n)| n)
        .collect()
    }
}

/// A change to a session setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// A new value for `name`; `sql` is the statement that sets it again
    /// (`SET name TO ...`, or `SELECT pg_catalog.set_config(...)` for plain
    /// values, which PostgreSQL parses as a startup packet's would be).
    Set {
        name: String,
        sql: String,
    },
    Reset(String),
    ResetAll,
}

/// Commands about the client's own prepared statements and session, which
/// the proxy answers itself so they do not touch a shared server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCommand {
    DeallocateAll,
    Deallocate(String),
    DiscardAll,
}

impl LocalCommand {
    /// The CommandComplete tag PostgreSQL answers with.
    pub fn tag(&self) -> &'static str {
        match self {
            LocalCommand::DeallocateAll => "DEALLOCATE ALL",
            LocalCommand::Deallocate(_) => "DEALLOCATE",
            LocalCommand::DiscardAll => "DISCARD ALL",
        }
    }
}

/// A statement that ends a transaction block or works on its savepoints.
/// Savepoint names are case-folded unless quoted, as PostgreSQL compares
/// them; an empty name is one dbproxy could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxCommand {
    Savepoint(String),
    Release(String),
    RollbackTo(String),
    /// `COMMIT`, `END` (also `AND CHAIN`).
    Commit,
    /// `ROLLBACK`, `ABORT` (also `AND CHAIN`).
    Rollback,
    /// `PREPARE TRANSACTION`: what it leaves of the block's settings is not
    /// followed.
    Unknown,
}

/// Everything [`analyze`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub changes: Vec<SettingChange>,
    /// Transaction and savepoint commands, each with the number of `changes`
    /// before it (so a `SET` between `SAVEPOINT` and `ROLLBACK TO` is known
    /// to be undone, and one before a `COMMIT` in the same string to be kept).
    /// Recorded only where the text was analysed (it had a trigger word).
    pub tx: Vec<(usize, TxCommand)>,
    /// Statements in the text, when it was analysed (a request that fails
    /// after running some of them leaves their fate unknown).
    pub statements: usize,
    pub pins: Pins,
    pub unpins: Pins,
    /// Set when the whole text is one command the proxy can answer.
    pub local: Option<LocalCommand>,
    /// `set_config('name', $n, false)`: a change whose value is parameter
    /// `n` (from 1), known once a Bind gives it (`session::statements::bound`):
    /// its place among `changes`, the name, `n`.
    pub param_changes: Vec<(usize, String, usize)>,
    /// Runs code whose session effects cannot be seen (a `DO` block): the
    /// server connection is reset before another client gets it.
    pub opaque: bool,
    /// The text may change `client_encoding`, if only for its transaction
    /// (`SET LOCAL`, `set_config(.., true)`): how later text is read
    /// depends on it (`sql::encoding`).
    pub encoding: bool,
}

impl Effects {
    /// Whatever ran did something dbproxy cannot carry: the client is
    /// pinned (an `untracked session setting`).
    pub fn untracked() -> Effects {
        Effects {
            pins: Pins::UNTRACKED,
            ..Effects::default()
        }
    }

    /// Nothing session-related.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.tx.is_empty()
            && self.pins.is_empty()
            && self.unpins.is_empty()
            && self.local.is_none()
            && self.param_changes.is_empty()
            && !self.opaque
    }
}

/// The statement that gives setting `name` the plain value `value`.
pub fn set_config_sql(name: &str, value: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config({}, {}, false)",
        quote_literal(name),
        quote_literal(value)
    )
}

/// Quotes `s` as an SQL string literal.
/// With a backslash in it, an escape string (`E'...'`, the backslash
/// doubled), as PostgreSQL's own `quote_literal` writes it: read the same
/// whatever `standard_conforming_strings` the connection has.
pub fn quote_literal(s: &str) -> String {
    let quoted = s.replace('\'', "''");
    match s.contains('\\') {
        true => format!("E'{}'", quoted.replace('\\', "\\\\")),
        false => format!("'{quoted}'"),
    }
}

/// A setting name as a key: PostgreSQL finds settings by name whatever
/// the case, quoted or not (`SET "Work_Mem"` is `work_mem`).
fn name_key(sql: &str, t: &Token) -> String {
    ident_key(sql, t).to_ascii_lowercase()
}

/// A setting's key as a name in SQL: one quoted identifier (a dotted
/// custom name such as `myapp.user_id` included, as PostgreSQL joins its
/// parts with dots anyway).
pub fn setting_name_sql(key: &str) -> String {
    format!("\"{}\"", key.replace('"', "\"\""))
}

/// An identifier as PostgreSQL compares it: unquoted names fold to lower
/// case, quoted ones are taken as written.
fn ident_key(sql: &str, t: &Token) -> String {
    match t.kind {
        Kind::Quoted => {
            let text = t.text(sql);
            let inner = text.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(text);
            inner.replace("\"\"", "\"")
        }
        _ => t.text(sql).to_ascii_lowercase(),
    }
}

/// Content of a plain `'...'` literal, if the token is one.
fn literal(sql: &str, t: &Token) -> Option<String> {
    let text = t.text(sql);
    let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
    Some(inner.replace("''", "'"))
}

/// Analyses a query string (one or more statements).
pub fn analyze(sql: &str) -> Effects {
    if !super::precheck::may_have_effects(sql) {
        return Effects::default();
    }
    let tokens = tokenize(sql);
    let mut effects = Effects::default();
    let statements: Vec<&[Token]> = tokens
        .split(|t| t.is_punct(sql, b';'))
        .filter(|s| !s.is_empty())
        .collect();
    for stmt in &statements {
        statement(sql, stmt, &mut effects, statements.len() == 1);
    }
    effects.statements = statements.len();
    effects
}

/// The name of a savepoint command whose keywords end before token `at`
/// (`SAVEPOINT` itself is optional there, and may also be the name).
fn savepoint_name(sql: &str, t: &[Token], at: usize) -> Option<String> {
    let at = match t.get(at) {
        Some(tok) if tok.is_word(sql, "savepoint") && t.len() > at + 1 => at + 1,
        _ => at,
    };
    t.get(at).filter(|_| t.len() == at + 1).map(|tok| ident_key(sql, tok))
}

fn statement(sql: &str, t: &[Token], fx: &mut Effects, alone: bool) {
    let word = |i: usize, kw: &str| t.get(i).is_some_and(|tok| tok.is_word(sql, kw));
    if word(0, "set") {
        fx.encoding |= t
            .iter()
            .any(|tok| tok.is_word(sql, "client_encoding") || tok.is_word(sql, "names"));
        set(sql, t, fx);
    } else if word(0, "reset") {
        let name = if word(1, "all") {
            None
        } else if word(1, "time") && word(2, "zone") {
            Some("timezone".to_owned())
        } else if word(1, "session") && word(2, "authorization") {
            Some("session_authorization".to_owned())
        } else {
            t.get(1).map(|tok| name_key(sql, tok))
        };
        fx.encoding |= name.as_deref().is_none_or(|name| name == "client_encoding");
        fx.changes
            .push(name.map_or(SettingChange::ResetAll, SettingChange::Reset));
    } else if word(0, "rollback") && (word(1, "to") || word(2, "to")) {
        let at = if word(1, "to") { 2 } else { 3 };
        // A name dbproxy cannot read matches no savepoint: the transaction
        // becomes uncertain.
        let name = savepoint_name(sql, t, at).unwrap_or_default();
        fx.tx.push((fx.changes.len(), TxCommand::RollbackTo(name)));
    } else if (word(0, "rollback") || word(0, "abort")) && !word(1, "prepared") {
        fx.tx.push((fx.changes.len(), TxCommand::Rollback));
    } else if (word(0, "commit") || word(0, "end")) && !word(1, "prepared") {
        fx.tx.push((fx.changes.len(), TxCommand::Commit));
    } else if word(0, "prepare") && word(1, "transaction") {
        fx.tx.push((fx.changes.len(), TxCommand::Unknown));
    } else if word(0, "savepoint") {
        let name = savepoint_name(sql, t, 1).unwrap_or_default();
        fx.tx.push((fx.changes.len(), TxCommand::Savepoint(name)));
    } else if word(0, "release") {
        let name = savepoint_name(sql, t, 1).unwrap_or_default();
        fx.tx.push((fx.changes.len(), TxCommand::Release(name)));
    } else if word(0, "listen") {
        fx.pins.add(Pins::LISTEN);
    } else if word(0, "unlisten") && t.get(1).is_some_and(|tok| tok.is_punct(sql, b'*')) {
        fx.unpins.add(Pins::LISTEN);
    } else if word(0, "prepare") && !word(1, "transaction") {
        fx.pins.add(Pins::SQL_PREPARE);
    } else if word(0, "deallocate") {
        let at = if word(1, "prepare") { 2 } else { 1 };
        if word(at, "all") {
            fx.unpins.add(Pins::SQL_PREPARE);
            if alone {
                fx.local = Some(LocalCommand::DeallocateAll);
            }
        } else if let (Some(name), true) = (t.get(at), alone && t.len() == at + 1) {
            // A statement name, compared as written when quoted.
            fx.local = Some(LocalCommand::Deallocate(ident_key(sql, name)));
        }
    } else if word(0, "discard") {
        if word(1, "all") {
            fx.unpins = Pins::ALL;
            if alone {
                fx.local = Some(LocalCommand::DiscardAll);
            }
        } else if word(1, "temp") || word(1, "temporary") {
            fx.unpins.add(Pins::TEMP_TABLE);
        }
    } else if word(0, "do") {
        // Code dbproxy cannot follow: whatever it sets, the connection is
        // reset before another client gets it.
        fx.opaque = true;
    } else if word(0, "declare") {
        if t.windows(2)
            .any(|w| w[0].is_word(sql, "with") && w[1].is_word(sql, "hold"))
        {
            fx.pins.add(Pins::HOLD_CURSOR);
        }
    } else if word(0, "close") && word(1, "all") {
        fx.unpins.add(Pins::HOLD_CURSOR);
    } else if word(0, "create")
        && (word(1, "temp")
            || word(1, "temporary")
            || ((word(1, "global") || word(1, "local")) && (word(2, "temp") || word(2, "temporary"))))
    {
        fx.pins.add(Pins::TEMP_TABLE);
    }
    if t.windows(2)
        .any(|w| w[0].is_word(sql, "into") && (w[1].is_word(sql, "temp") || w[1].is_word(sql, "temporary")))
    {
        fx.pins.add(Pins::TEMP_TABLE);
    }
    functions(sql, t, fx);
}

/// SET in its many spellings; SET LOCAL and transaction-scoped forms change nothing lasting.
fn set(sql: &str, t: &[Token], fx: &mut Effects) {
    let word = |i: usize, kw: &str| t.get(i).is_some_and(|tok| tok.is_word(sql, kw));
    let value_from = |i: usize| t.get(i).map(|tok| sql[tok.start..t[t.len() - 1].end].trim().to_owned());
    let mut i = 1;
    if word(1, "local") || word(1, "transaction") || word(1, "constraints") {
        return;
    }
    if word(1, "session") {
        if word(2, "characteristics") {
            fx.pins.add(Pins::UNTRACKED);
            return;
        }
        i = 2;
    }
    let (name, value_at) = if word(i, "time") && word(i + 1, "zone") {
        ("timezone".to_owned(), i + 2)
    } else if word(i, "names") {
        ("client_encoding".to_owned(), i + 1)
    } else if word(i, "schema") {
        ("search_path".to_owned(), i + 1)
    } else if word(i, "role") {
        ("role".to_owned(), i + 1)
    } else if word(i, "session") && word(i + 1, "authorization") {
        ("session_authorization".to_owned(), i + 2)
    } else {
        // name [. name] {TO | =} value
        let Some(first) = t.get(i) else { return };
        if !matches!(first.kind, Kind::Word | Kind::Quoted) {
            fx.pins.add(Pins::UNTRACKED);
            return;
        }
        let mut name = name_key(sql, first);
        let mut j = i + 1;
        while t.get(j).is_some_and(|tok| tok.is_punct(sql, b'.')) {
            match t.get(j + 1) {
                Some(part) => name = format!("{name}.{}", name_key(sql, part)),
                None => return,
            }
            j += 2;
        }
        if !(word(j, "to") || t.get(j).is_some_and(|tok| tok.is_punct(sql, b'='))) {
            // e.g. SET x FROM CURRENT, or syntax the server will reject anyway.
            return;
        }
        (name, j + 1)
    };
    if [
        "transaction_isolation",
        "transaction_read_only",
        "transaction_deferrable",
    ]
    .contains(&name.as_str())
    {
        // Per transaction, as SET TRANSACTION: nothing lasting to carry.
        return;
    }
    let Some(value) = value_from(value_at) else { return };
    let is_default = ["default", "local", "none"]
        .iter()
        .any(|kw| value.eq_ignore_ascii_case(kw));
    if is_default && (name == "timezone" || name == "role" || value.eq_ignore_ascii_case("default")) {
        fx.changes.push(SettingChange::Reset(name));
    } else {
        let sql = format!("SET {} TO {value}", setting_name_sql(&name));
        fx.changes.push(SettingChange::Set { name, sql });
    }
}

/// Function calls with session effects: advisory locks and set_config.
fn functions(sql: &str, t: &[Token], fx: &mut Effects) {
    for (i, tok) in t.iter().enumerate() {
        if !matches!(tok.kind, Kind::Word | Kind::Quoted) || !t.get(i + 1).is_some_and(|n| n.is_punct(sql, b'(')) {
            continue;
        }
        if tok.kind == Kind::Quoted && i >= 2 && t[i - 1].is_punct(sql, b'&') && t[i - 2].is_word(sql, "u") {
            // U&"\0073et_config"(...): a name with Unicode escapes is not
            // read, so whatever it calls counts as an untracked change.
            fx.pins.add(Pins::UNTRACKED);
            continue;
        }
        // ("set_config"(...) is set_config too: a quoted name as written.)
        let name = ident_key(sql, tok);
        match name.as_str() {
            "pg_advisory_lock" | "pg_advisory_lock_shared" | "pg_try_advisory_lock" | "pg_try_advisory_lock_shared" => {
                fx.pins.add(Pins::ADVISORY_LOCK)
            }
            "pg_advisory_unlock_all" => fx.unpins.add(Pins::ADVISORY_LOCK),
            "set_config" => set_config(sql, &t[i + 2..], fx),
            _ => {}
        }
    }
}

/// `set_config('name', value, false)`: tracked when the name is a literal and
/// the value a literal or a parameter (`$n`, known at Bind); `is_local` true
/// changes nothing lasting; anything else is an untracked change.
fn set_config(sql: &str, args: &[Token], fx: &mut Effects) {
    let parsed = match args {
        [name, c1, value, c2, local, close, ..]
            if c1.is_punct(sql, b',') && c2.is_punct(sql, b',') && close.is_punct(sql, b')') =>
        {
            literal(sql, name).map(|n| (n.to_ascii_lowercase(), value, local))
        }
        _ => None,
    };
    let Some((name, value, local)) = parsed else {
        fx.encoding = true;
        fx.pins.add(Pins::UNTRACKED);
        return;
    };
    fx.encoding |= name == "client_encoding";
    if local.is_word(sql, "true") {
        return;
    }
    let param = (value.kind == Kind::Param)
        .then(|| value.text(sql)[1..].parse::<usize>().ok())
        .flatten();
    match (local.is_word(sql, "false"), literal(sql, value), param) {
        (true, Some(value), _) => {
            let sql = set_config_sql(&name, &value);
            fx.changes.push(SettingChange::Set { name, sql })
        }
        (true, None, Some(n)) if n > 0 => fx.param_changes.push((fx.changes.len(), name, n)),
        _ => fx.pins.add(Pins::UNTRACKED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> SettingChange {
        SettingChange::Set {
            name: name.into(),
            sql: format!("SET {} TO {value}", setting_name_sql(name)),
        }
    }

    #[test]
    fn settings() {
        let cases: &[(&str, Vec<SettingChange>)] = &[
            (
                "SET statement_timeout = '150ms'",
                vec![set("statement_timeout", "'150ms'")],
            ),
            (
                "set Search_Path to myschema, public",
                vec![set("search_path", "myschema, public")],
            ),
            ("SET SESSION work_mem TO 8000", vec![set("work_mem", "8000")]),
            ("SET TIME ZONE 'Europe/Paris'", vec![set("timezone", "'Europe/Paris'")]),
            ("SET TIME ZONE LOCAL", vec![SettingChange::Reset("timezone".into())]),
            ("SET NAMES 'LATIN1'", vec![set("client_encoding", "'LATIN1'")]),
            ("SET SCHEMA 'app'", vec![set("search_path", "'app'")]),
            ("SET myapp.user_id = 42", vec![set("myapp.user_id", "42")]),
            ("SET \"MixedCase\" TO 1", vec![set("mixedcase", "1")]),
            ("SET \"my-app\".\"X\" = 2", vec![set("my-app.x", "2")]),
            (
                "SET \"work_mem\" = '1MB'; RESET Work_Mem",
                vec![set("work_mem", "'1MB'"), SettingChange::Reset("work_mem".into())],
            ),
            (
                "SET \"TimeZone\" TO DEFAULT",
                vec![SettingChange::Reset("timezone".into())],
            ),
            ("SET work_mem TO DEFAULT", vec![SettingChange::Reset("work_mem".into())]),
            (
                "RESET work_mem; RESET ALL",
                vec![SettingChange::Reset("work_mem".into()), SettingChange::ResetAll],
            ),
            ("SET LOCAL work_mem = '1MB'", vec![]),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", vec![]),
            ("SET transaction_isolation = 'serializable'", vec![]),
            ("SET \"Transaction_Read_Only\" TO on", vec![]),
            (
                "SELECT set_config('app.tenant', 'acme', false)",
                vec![SettingChange::Set {
                    name: "app.tenant".into(),
                    sql: "SELECT pg_catalog.set_config('app.tenant', 'acme', false)".into(),
                }],
            ),
            ("SELECT set_config('app.tenant', 'acme', true)", vec![]),
            ("SELECT 'SET x = 1', offset_col FROM t OFFSET 5", vec![]),
            ("/* SET x = 1 */ SELECT 1", vec![]),
        ];
        for (sql, want) in cases {
            assert_eq!(&analyze(sql).changes, want, "{sql}");
        }
    }

    #[test]
    fn pins_and_unpins() {
        assert_eq!(analyze("LISTEN chan").pins, Pins::LISTEN);
        assert_eq!(analyze("UNLISTEN *").unpins, Pins::LISTEN);
        assert_eq!(analyze("select pg_advisory_lock(1)").pins, Pins::ADVISORY_LOCK);
        assert!(analyze("select pg_advisory_xact_lock(1)").pins.is_empty());
        assert_eq!(analyze("CREATE TEMP TABLE t (x int)").pins, Pins::TEMP_TABLE);
        assert_eq!(
            analyze("create global temporary table t (x int)").pins,
            Pins::TEMP_TABLE
        );
        assert_eq!(analyze("SELECT * INTO TEMP t FROM u").pins, Pins::TEMP_TABLE);
        assert_eq!(
            analyze("DECLARE c CURSOR WITH HOLD FOR SELECT 1").pins,
            Pins::HOLD_CURSOR
        );
        assert!(analyze("DECLARE c CURSOR FOR SELECT 1").pins.is_empty());
        assert_eq!(analyze("PREPARE q AS SELECT 1").pins, Pins::SQL_PREPARE);
        assert!(analyze("PREPARE TRANSACTION 'x'").pins.is_empty());
        assert_eq!(
            analyze("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").pins,
            Pins::UNTRACKED
        );
        assert_eq!(
            analyze("SELECT set_config(name, 'v', false) FROM t").pins,
            Pins::UNTRACKED
        );
        assert!(analyze("SELECT 'LISTEN x', $$pg_advisory_lock(1)$$").is_empty());
        assert!(analyze("DO $$ BEGIN PERFORM set_config('a.b', 'c', false); END $$").opaque);
        assert!(analyze("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING; DO 'begin null; end'").opaque);
        assert!(!analyze("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING; SELECT 1").opaque);
    }

    #[test]
    fn set_config_with_a_parameter_for_its_value_waits_for_the_bind() {
        let fx = analyze("SELECT set_config('App.Tenant', $2, false), $1::int");
        assert_eq!(fx.param_changes, [(0, "app.tenant".to_owned(), 2)]);
        assert!(fx.changes.is_empty() && fx.pins.is_empty());
        assert!(analyze("SELECT set_config('a.b', $1, true)").is_empty());
        for sql in [
            "SELECT set_config('a.b', $1, $2)",
            "SELECT set_config('a.b', $1 || 'x', false)",
            "SELECT set_config($1, 'x', false)",
        ] {
            let fx = analyze(sql);
            assert_eq!((fx.pins, fx.param_changes.len()), (Pins::UNTRACKED, 0), "{sql}");
        }
    }

    #[test]
    fn functions_are_found_by_quoted_names_too() {
        let quoted = analyze("SELECT \"set_config\"('work_mem', '1GB', false)");
        assert!(matches!(&quoted.changes[..], [SettingChange::Set { name, .. }] if name == "work_mem"));
        let escaped = analyze("SELECT U&\"\\0073et_config\"('work_mem', '1GB', false)");
        assert_eq!(escaped.pins, Pins::UNTRACKED);
        assert_eq!(
            analyze("SELECT pg_catalog.\"pg_advisory_lock\"(1)").pins,
            Pins::ADVISORY_LOCK
        );
        // As written: a quoted name in other case is another function.
        assert!(
            analyze("SELECT \"Set_Config\"('work_mem', '1GB', false)")
                .changes
                .is_empty()
        );
    }

    #[test]
    fn a_change_of_client_encoding_is_noticed_in_every_form() {
        for sql in [
            "SET client_encoding = 'SJIS'",
            "SET LOCAL client_encoding TO 'SJIS'",
            "set names 'sjis'",
            "SET LOCAL NAMES 'SJIS'",
            "SELECT set_config('client_encoding', 'SJIS', true)",
            "SELECT set_config($1, 'SJIS', false)",
            // Back to the server connection's own default (the role's).
            "RESET client_encoding",
            "RESET ALL",
        ] {
            assert!(analyze(sql).encoding, "{sql}");
        }
        for sql in [
            "SET work_mem = '1GB'",
            "SELECT set_config('work_mem', '1GB', true)",
            "RESET work_mem",
        ] {
            assert!(!analyze(sql).encoding, "{sql}");
        }
    }

    #[test]
    fn savepoints_are_noticed_in_order_with_the_settings() {
        let a = || "a".to_owned();
        for sql in [
            "ROLLBACK TO a",
            "rollback to savepoint A",
            "ROLLBACK WORK TO SAVEPOINT a",
            "ROLLBACK TRANSACTION TO \"a\"",
        ] {
            assert_eq!(analyze(sql).tx, [(0, TxCommand::RollbackTo(a()))], "{sql}");
        }
        for sql in ["RELEASE a", "RELEASE SAVEPOINT a"] {
            assert_eq!(analyze(sql).tx, [(0, TxCommand::Release(a()))], "{sql}");
        }
        assert_eq!(analyze("SAVEPOINT a").tx, [(0, TxCommand::Savepoint(a()))]);
        // The name is kept as written when quoted; SAVEPOINT may be the name.
        assert_eq!(
            analyze("SAVEPOINT \"My \"\"sp\"\"\"").tx,
            [(0, TxCommand::Savepoint("My \"sp\"".to_owned()))]
        );
        assert_eq!(
            analyze("ROLLBACK TO savepoint").tx,
            [(0, TxCommand::RollbackTo("savepoint".to_owned()))]
        );
        let fx = analyze("SET a = 1; SAVEPOINT s; SET b = 2; ROLLBACK TO s; SELECT 1");
        assert_eq!(fx.changes.len(), 2);
        assert_eq!(
            fx.tx,
            [
                (1, TxCommand::Savepoint("s".into())),
                (2, TxCommand::RollbackTo("s".into()))
            ]
        );
        assert_eq!(fx.statements, 5);
        assert_eq!(analyze("ROLLBACK").tx, [(0, TxCommand::Rollback)]);
        assert_eq!(analyze("SET a = 1; END").tx, [(1, TxCommand::Commit)]);
        assert_eq!(analyze("SET a = 1; COMMIT AND CHAIN").tx, [(1, TxCommand::Commit)]);
        assert_eq!(
            analyze("SET a = 1; PREPARE TRANSACTION 'x'").tx,
            [(1, TxCommand::Unknown)]
        );
        assert!(analyze("SET a = 1; ROLLBACK PREPARED 'x'").tx.is_empty());
        assert!(analyze("SELECT savepoint_id, released FROM t").is_empty());
    }

    #[test]
    fn local_commands_only_when_alone() {
        assert_eq!(analyze("DEALLOCATE ALL").local, Some(LocalCommand::DeallocateAll));
        assert_eq!(
            analyze("deallocate prepare all;").local,
            Some(LocalCommand::DeallocateAll)
        );
        assert_eq!(
            analyze("DEALLOCATE stmt1").local,
            Some(LocalCommand::Deallocate("stmt1".into()))
        );
        // Statement names are compared as written when quoted, folded when not.
        assert_eq!(
            analyze("DEALLOCATE \"S1\"").local,
            Some(LocalCommand::Deallocate("S1".into()))
        );
        assert_eq!(
            analyze("DEALLOCATE PREPARE S1").local,
            Some(LocalCommand::Deallocate("s1".into()))
        );
        assert_eq!(analyze("DISCARD ALL").local, Some(LocalCommand::DiscardAll));
        assert_eq!(analyze("DISCARD ALL; SELECT 1").local, None);
        assert_eq!(analyze("discard temp").unpins, Pins::TEMP_TABLE);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("C:\\new's"), "E'C:\\\\new''s'");
    }
}
