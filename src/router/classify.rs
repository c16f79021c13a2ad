//! Statement classification for read/write splitting. Token-based on the
//! lexer in `sql::lexer` (so keywords inside strings, comments, dollar quotes
//! and quoted identifiers never count), and conservative: a statement goes to
//! a replica only when it is provably a plain read; anything else, including
//! anything not understood, goes to the primary.

use std::ops::ControlFlow;

use crate::sql::lexer::{Kind, Token, for_each_token, tokenize};

/// Above this size a statement is not worth analysing: primary.
const MAX_CLASSIFIED_LEN: usize = 64 * 1024;

/// Why a statement must run on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteReason {
    /// INSERT/UPDATE/DELETE/MERGE, DDL, COPY FROM, LOCK, maintenance, LISTEN/NOTIFY, ...
    Write,
    /// SELECT ... FOR UPDATE/SHARE.
    LockingRead,
    /// Calls a function that is volatile, or not known to be otherwise.
    VolatileFunction,
    /// Starts a read-write transaction.
    Transaction,
    /// Too large or not understood.
    ParseFallback,
}

impl WriteReason {
    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteReason::Write => "write",
            WriteReason::LockingRead => "locking_read",
            WriteReason::VolatileFunction => "volatile_function",
            WriteReason::Transaction => "transaction",
            WriteReason::ParseFallback => "parse_fallback",
        }
    }
}

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Transaction control, SET, SHOW and the like: no preference of its own.
    Neutral,
    /// A plain read: a replica may serve it.
    Read,
    /// BEGIN/START TRANSACTION READ ONLY: the transaction may run on a replica.
    ReadOnlyTransaction,
    /// The primary, for this reason.
    Primary(WriteReason),
}

impl Class {
    /// The class of two statements sent together: the primary wins.
    pub fn combine(self, other: Class) -> Class {
        match (self, other) {
            (Class::Primary(r), _) | (_, Class::Primary(r)) => Class::Primary(r),
            (Class::ReadOnlyTransaction, _) | (_, Class::ReadOnlyTransaction) => Class::ReadOnlyTransaction,
            (Class::Read, _) | (_, Class::Read) => Class::Read,
            _ => Class::Neutral,
        }
    }
}

/// Volatility of a function, as `pg_proc.provolatile` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

/// SQL keywords that may be followed by `(` without being function calls.
const CONSTRUCTS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "by",
    "case",
    "cast",
    "coalesce",
    "cube",
    "distinct",
    "else",
    "except",
    "exists",
    "extract",
    "filter",
    "from",
    "greatest",
    "group",
    "grouping",
    "groups",
    "having",
    "ilike",
    "in",
    "intersect",
    "is",
    "join",
    "lateral",
    "least",
    "like",
    "limit",
    "not",
    "nullif",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "over",
    "overlay",
    "partition",
    "position",
    "range",
    "recursive",
    "rollup",
    "row",
    "rows",
    "select",
    "sets",
    "similar",
    "some",
    "substring",
    "table",
    "tablesample",
    "then",
    "trim",
    "union",
    "using",
    "values",
    "when",
    "where",
    "window",
    "with",
    "within",
    "xmlelement",
    "xmlforest",
    "xmlparse",
    "normalize",
];

/// Whether `sql` starts with CREATE, ALTER or DROP (function volatility may change).
pub fn is_ddl(sql: &str) -> bool {
    // Bytes, not str slices: the text after the keyword may be any UTF-8.
    let start = sql.trim_start().as_bytes();
    ["create", "alter ", "drop "].iter().any(|kw| {
        start
            .get(..kw.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(kw.as_bytes()))
    })
}

/// Whether `sql` has a statement that can change the result type of a
/// statement prepared earlier: ALTER, DROP, or CREATE OR REPLACE (a view or a
/// function). Plain CREATE (tables, indexes, temp tables) cannot.
pub fn may_change_result_types(sql: &str) -> bool {
    let tokens = tokenize(sql);
    tokens.split(|t| t.is_punct(sql, b';')).any(|stmt| {
        let word = |i: usize, kw: &str| stmt.get(i).is_some_and(|t| t.is_word(sql, kw));
        word(0, "alter") || word(0, "drop") || (word(0, "create") && word(1, "or") && word(2, "replace"))
    })
}

/// Writes the shape of `sql` to `out`, for the classification cache: the
/// text with each string and number literal replaced by one byte that no
/// UTF-8 text holds, so `... WHERE aid = 1` and `... WHERE aid = 2` have one
/// shape. Texts of one shape are the same tokens but for the literals'
/// contents (the lexer put literals at the same places of the same text
/// around them), and [`classify`] reads no literal's contents but in `SET`
/// and `RESET` statements (`'serializable'`): so texts of one shape have one
/// class. A text with either word, or without literals, has no shape
/// (`false`; the latter is its own).
pub fn shape(sql: &str, out: &mut Vec<u8>) -> bool {
    let text = sql.as_bytes();
    let mut copied = 0;
    let mut sets = false;
    for_each_token(sql, |token| {
        let marker = match token.kind {
            Kind::Str => 0xf8,
            Kind::Number => 0xf9,
            Kind::Word if token.is_word(sql, "set") || token.is_word(sql, "reset") => {
                sets = true;
                return ControlFlow::Break(());
            }
            _ => return ControlFlow::Continue(()),
        };
        out.extend_from_slice(&text[copied..token.start]);
        out.push(marker);
        copied = token.end;
        ControlFlow::Continue(())
    });
    out.extend_from_slice(&text[copied..]);
    // (A literal ends after the text's first byte.)
    copied > 0 && !sets
}

/// Functions `pg_proc` calls stable that still cannot run on a standby.
const PRIMARY_ONLY: &[&str] = &[
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_export_snapshot",
];

/// Classifies a query string (one or more statements). `volatility` looks up
/// a function by name; `None` means unknown, which counts as volatile.
pub fn classify(sql: &str, volatility: &dyn Fn(&str) -> Option<Volatility>) -> Class {
    if sql.len() > MAX_CLASSIFIED_LEN {
        return Class::Primary(WriteReason::ParseFallback);
    }
    let tokens = tokenize(sql);
    tokens
        .split(|t| t.is_punct(sql, b';'))
        .filter(|s| !s.is_empty())
        .map(|stmt| statement(sql, stmt, volatility))
        .fold(Class::Neutral, Class::combine)
}

fn statement(sql: &str, t: &[Token], volatility: &dyn Fn(&str) -> Option<Volatility>) -> Class {
    let Some(first) = t.first() else {
        return Class::Neutral;
    };
    if first.is_punct(sql, b'(') {
        // (SELECT ...) UNION (SELECT ...)
        return query(sql, t, volatility);
    }
    if first.kind != Kind::Word {
        return Class::Primary(WriteReason::ParseFallback);
    }
    let word = |i: usize, kw: &str| t.get(i).is_some_and(|tok| tok.is_word(sql, kw));
    match first.text(sql).to_ascii_lowercase().as_str() {
        "select" | "with" | "table" | "values" => query(sql, t, volatility),
        "show" => Class::Read,
        // Hot standbys refuse SERIALIZABLE, and a connection left with it as
        // the default would fail the next client's reads there.
        "set" | "reset" if t.iter().any(|tok| crate::sql::mentions(tok.text(sql), "serializable")) => {
            Class::Primary(WriteReason::Transaction)
        }
        "set" | "reset" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" | "deallocate"
        | "discard" => Class::Neutral,
        "begin" | "start" => {
            let read_only = t
                .windows(2)
                .any(|w| w[0].is_word(sql, "read") && w[1].is_word(sql, "only"));
            // Hot standbys refuse SERIALIZABLE.
            let serializable = t.iter().any(|tok| tok.is_word(sql, "serializable"));
            if read_only && !serializable {
                Class::ReadOnlyTransaction
            } else {
                Class::Primary(WriteReason::Transaction)
            }
        }
        "explain" => {
            let mut i = 1;
            let mut analyze = false;
            if t.get(1).is_some_and(|tok| tok.is_punct(sql, b'(')) {
                // EXPLAIN (ANALYZE, ...) stmt
                while i < t.len() && !t[i].is_punct(sql, b')') {
                    analyze |= t[i].is_word(sql, "analyze") || t[i].is_word(sql, "analyse");
                    i += 1;
                }
                i += 1;
            } else {
                while word(i, "analyze") || word(i, "analyse") || word(i, "verbose") {
                    analyze |= word(i, "analyze") || word(i, "analyse");
                    i += 1;
                }
            }
            match t.get(i..).map(|rest| statement(sql, rest, volatility)) {
                Some(Class::Primary(r)) if analyze => Class::Primary(r),
                Some(Class::Primary(WriteReason::ParseFallback)) | None => Class::Primary(WriteReason::ParseFallback),
                Some(_) => Class::Read,
            }
        }
        "copy" => {
            // COPY t TO ... reads; COPY t FROM ... writes. FROM inside COPY (SELECT ...) does not count.
            let mut depth = 0i32;
            for tok in t {
                if tok.is_punct(sql, b'(') {
                    depth += 1;
                } else if tok.is_punct(sql, b')') {
                    depth -= 1;
                } else if depth == 0 && tok.is_word(sql, "from") {
                    return Class::Primary(WriteReason::Write);
                }
            }
            query(sql, &t[1..], volatility).combine(Class::Read)
        }
        "do" | "call" => Class::Primary(WriteReason::VolatileFunction),
        _ => Class::Primary(WriteReason::Write),
    }
}

/// A SELECT-like statement: a read unless something in it says otherwise.
fn query(sql: &str, t: &[Token], volatility: &dyn Fn(&str) -> Option<Volatility>) -> Class {
    let word = |i: usize, kw: &str| t.get(i).is_some_and(|tok| tok.is_word(sql, kw));
    let mut class = Class::Read;
    for (i, tok) in t.iter().enumerate() {
        if tok.kind == Kind::Quoted && t.get(i + 1).is_some_and(|n| n.is_punct(sql, b'(')) {
            // "MixedCase"() or "nextval"(): a function call by its exact name.
            let name = tok.text(sql).trim_matches('"').replace("\"\"", "\"");
            match volatility(&name) {
                Some(Volatility::Immutable | Volatility::Stable) if !PRIMARY_ONLY.contains(&name.as_str()) => {}
                _ => class = Class::Primary(WriteReason::VolatileFunction),
            }
            continue;
        }
        if tok.kind != Kind::Word {
            continue;
        }
        let text = tok.text(sql);
        if text.eq_ignore_ascii_case("for")
            && (word(i + 1, "update")
                || word(i + 1, "share")
                || (word(i + 1, "no") && word(i + 2, "key"))
                || (word(i + 1, "key") && word(i + 2, "share")))
        {
            return Class::Primary(WriteReason::LockingRead);
        }
        if ["insert", "update", "delete", "merge", "into"]
            .iter()
            .any(|kw| text.eq_ignore_ascii_case(kw))
        {
            // Data-modifying CTE, SELECT INTO, or a word we do not understand here.
            return Class::Primary(WriteReason::Write);
        }
        if t.get(i + 1).is_some_and(|n| n.is_punct(sql, b'(')) {
            let name = text.to_ascii_lowercase();
            if CONSTRUCTS.contains(&name.as_str()) {
                continue;
            }
            if PRIMARY_ONLY.contains(&name.as_str()) {
                return Class::Primary(WriteReason::VolatileFunction);
            }
            match volatility(&name) {
                Some(Volatility::Immutable | Volatility::Stable) => {}
                Some(Volatility::Volatile) | None => class = Class::Primary(WriteReason::VolatileFunction),
            }
        }
    }
    class
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(name: &str) -> Option<Volatility> {
        match name {
            "count" | "sum" | "lower" | "upper" | "length" | "abs" | "varchar" | "numeric" | "unnest" => {
                Some(Volatility::Immutable)
            }
            "now" | "current_setting" | "to_char" | "txid_current" => Some(Volatility::Stable),
            "nextval" | "setval" | "random" | "pg_advisory_lock" | "pg_notify" | "pg_sleep" | "insert_audit" => {
                Some(Volatility::Volatile)
            }
            _ => None,
        }
    }

    fn class(sql: &str) -> Class {
        classify(sql, &catalog)
    }

    #[test]
    fn plain_reads_may_go_to_replicas() {
        for sql in [
            "SELECT 1",
            "select * from accounts where id = $1",
            "SELECT count(*), sum(balance), lower(name), now() FROM t GROUP BY name",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "TABLE accounts",
            "VALUES (1), (2)",
            "SHOW search_path",
            "EXPLAIN SELECT * FROM t",
            "SELECT 'for update', \"update\" FROM t -- for update",
            "SELECT $$ insert into x $$ /* delete */",
            "SELECT * FROM t WHERE id IN (1, 2) AND EXISTS (SELECT 1) AND id = ANY($1)",
            "SELECT x::varchar(10), y::numeric(10,2) FROM t",
            "(SELECT 1) UNION (SELECT 2)",
            "COPY t TO STDOUT",
            "COPY (SELECT a FROM t) TO STDOUT",
            "SELECT coalesce(a, b), greatest(1, 2), cast(a AS int) FROM t",
        ] {
            assert_eq!(class(sql), Class::Read, "{sql}");
        }
    }

    #[test]
    fn writes_and_their_reasons() {
        use WriteReason::*;
        let cases = [
            ("INSERT INTO t VALUES (1)", Write),
            ("update t set a = 1", Write),
            ("DELETE FROM t", Write),
            ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", Write),
            ("SELECT * FROM t FOR UPDATE", LockingRead),
            ("select * from t for   no key update", LockingRead),
            ("SELECT * FROM t /* c */ FOR\nSHARE", LockingRead),
            ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", LockingRead),
            (
                "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
                Write,
            ),
            ("SELECT * INTO newt FROM t", Write),
            ("CREATE TABLE t (a int)", Write),
            ("TRUNCATE t", Write),
            ("COPY t FROM STDIN", Write),
            ("LOCK TABLE t", Write),
            ("VACUUM t", Write),
            ("ANALYZE t", Write),
            ("LISTEN c", Write),
            ("NOTIFY c", Write),
            ("DO $$ BEGIN END $$", VolatileFunction),
            ("CALL p()", VolatileFunction),
            ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", Write),
            ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t", Write),
            ("SELECT nextval('s')", VolatileFunction),
            ("SELECT setval('s', 1)", VolatileFunction),
            ("SELECT pg_advisory_lock(1)", VolatileFunction),
            ("SELECT txid_current()", VolatileFunction),
            ("SELECT pg_notify('c', 'x')", VolatileFunction),
            ("SELECT public.insert_audit(1)", VolatileFunction),
            ("SELECT my_unknown_function(1)", VolatileFunction),
            ("SELECT random()", VolatileFunction),
            ("BEGIN", Transaction),
            ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", Transaction),
            ("BEGIN READ WRITE", Transaction),
            ("SET default_transaction_isolation = 'serializable'", Transaction),
            ("SET SESSION default_transaction_isolation TO SERIALIZABLE", Transaction),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", Transaction),
            ("SELECT \"nextval\"('s')", VolatileFunction),
            ("SELECT \"MyFunc\"()", VolatileFunction),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", Transaction),
            ("SELECT \"nextval\"('s')", VolatileFunction),
            ("SELECT \"MyFunc\"()", VolatileFunction),
            ("SELECT 1; INSERT INTO t VALUES (1)", Write),
            ("", ParseFallback),
        ];
        for (sql, reason) in cases {
            let want = if sql.is_empty() {
                Class::Neutral
            } else {
                Class::Primary(reason)
            };
            assert_eq!(class(sql), want, "{sql}");
        }
    }

    #[test]
    fn transactions() {
        assert_eq!(class("BEGIN READ ONLY"), Class::ReadOnlyTransaction);
        assert_eq!(
            class("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            Class::ReadOnlyTransaction
        );
        assert_eq!(class("BEGIN READ ONLY; SELECT 1; COMMIT"), Class::ReadOnlyTransaction);
        assert_eq!(class("COMMIT"), Class::Neutral);
        assert_eq!(class("SET x = 1"), Class::Neutral);
    }

    #[test]
    fn result_type_changes() {
        assert!(may_change_result_types("ALTER TABLE t ADD COLUMN c int"));
        assert!(may_change_result_types("drop view v"));
        assert!(may_change_result_types("CREATE OR REPLACE VIEW v AS SELECT 1"));
        assert!(may_change_result_types("BEGIN; ALTER TABLE t DROP c; COMMIT"));
        assert!(!may_change_result_types("CREATE TABLE t (a int)"));
        assert!(!may_change_result_types("CREATE TEMP TABLE t (a int)"));
        assert!(!may_change_result_types("CREATE INDEX ON t (a)"));
        assert!(!may_change_result_types("SELECT 'alter table'"));
    }

    #[test]
    fn ddl_detection_survives_any_utf8() {
        // Found by the classifier fuzz target: a multi-byte character ending at
        // byte 6 used to panic on a str slice at byte 5.
        for sql in ["M+ъ", "Выбрать", "abcdé x", "  drop table t", "ALTER TABLE t", "créate"] {
            let _ = is_ddl(sql);
            let _ = class(sql);
        }
        assert!(is_ddl("  drop table t"));
        assert!(is_ddl("CREATE TABLE t()"));
        assert!(!is_ddl("Выбрать"));
    }

    #[test]
    fn oversized_or_odd_input_goes_to_the_primary() {
        let big = format!("SELECT '{}'", "x".repeat(MAX_CLASSIFIED_LEN));
        assert_eq!(class(&big), Class::Primary(WriteReason::ParseFallback));
        assert_eq!(class("$1"), Class::Primary(WriteReason::ParseFallback));
    }
}
