//! The server side of SCRAM-SHA-256 on arbitrary client messages: the input
//! is split at its first NUL into client-first and client-final. Also the
//! `pg_authid` verifier parser. No panic; a forged final message is refused.
#![no_main]

use std::sync::OnceLock;

use dbproxy::auth::{ScramExchange, ScramSecret};
use libfuzzer_sys::fuzz_target;

fn secret() -> &'static ScramSecret {
    static SECRET: OnceLock<ScramSecret> = OnceLock::new();
    SECRET.get_or_init(|| ScramSecret::from_password("fuzz-password"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ScramSecret::parse_verifier(text);
    }
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok((exchange, server_first)) = ScramExchange::start(secret(), first) else {
        return;
    };
    assert!(server_first.starts_with("r="));
    // The fuzzer cannot know the server nonce, so a final message may only be
    // accepted if it carries the proof, which it cannot forge.
    assert!(exchange.finish(last).is_err(), "a forged SCRAM proof was accepted");
});
