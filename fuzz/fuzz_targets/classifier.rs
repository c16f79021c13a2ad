//! The read/write classifier and the session-effect analyser on arbitrary
//! SQL text: no panic, and nothing with a write keyword is sent to a replica.
#![no_main]

use dbproxy::router::classify::{Class, Volatility, classify, is_ddl};
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
});
