//! The read/write classifier and the session-effect analyser on arbitrary
//! SQL text: no panic, nothing with a write keyword is sent to a replica, and
//! texts of one shape (other literals) get one class, as the classification
//! cache assumes.
#![no_main]

use dbproxy::router::classify::{Class, Volatility, classify, is_ddl, shape};
use dbproxy::sql::lexer::{Kind, tokenize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let lookup = |name: &str| match name {
        "now" | "lower" => Some(Volatility::Stable),
        "abs" => Some(Volatility::Immutable),
        _ => None,
    };
    let class = classify(sql, &lookup);
    let _ = is_ddl(sql);
    let _ = dbproxy::sql::session::analyze(sql);
    // A statement that is only a plain INSERT/UPDATE/DELETE keyword sequence
    // must never be judged a read.
    let head = sql.trim_start().get(..6).map(str::to_ascii_lowercase);
    if matches!(head.as_deref(), Some("insert" | "update" | "delete")) {
        assert!(!matches!(class, Class::Read), "{sql:?} classified as a read");
    }
    // The same text with other literals: where its shape is the same (two
    // strings may become one: `'a''b'`), so is its class.
    let mut other = String::new();
    let mut at = 0;
    for token in tokenize(sql) {
        other.push_str(&sql[at..token.start]);
        other.push_str(match token.kind {
            Kind::Str => "'v'",
            Kind::Number => "7",
            _ => token.text(sql),
        });
        at = token.end;
    }
    other.push_str(&sql[at..]);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    if shape(sql, &mut a) && shape(&other, &mut b) && a == b {
        assert_eq!(class, classify(&other, &lookup), "{sql:?} / {other:?}");
    }
});
