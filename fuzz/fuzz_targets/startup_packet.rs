//! The startup packet parser on arbitrary bytes: no panic, and what it
//! accepts fits in the buffer and under the startup limit.
#![no_main]

use dbproxy::protocol::startup::{MAX_STARTUP_LEN, StartupPacket, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A connection may send SSLRequest/GSSENCRequest before its startup packet.
    while let Ok(Some((packet, used))) = parse(rest) {
        assert!(used > 0 && used <= rest.len() && used <= MAX_STARTUP_LEN);
        rest = &rest[used..];
        if let StartupPacket::Startup { params, .. } = packet {
            for (k, v) in &params {
                assert!(!k.contains('\0') && !v.contains('\0'));
            }
            break;
        }
    }
});
