//! Client bytes through the framing Scanner, fed in chunks of a fuzzed size,
//! and every message the proxy inspects decoded and rewritten as the session
//! does. Checks: no panic, every item lies within the buffer, nothing is
//! buffered beyond the limit, and rewritten messages decode to what was read.
#![no_main]

use bytes::BytesMut;
use dbproxy::protocol::extended::{parse_bind_names, parse_parse, parse_target, write_bind_renamed, write_parse, write_target};
use dbproxy::protocol::framing::{HEADER_LEN, Item, Scanner, read_cbytes};
use dbproxy::protocol::frontend::parse_sasl_initial_response;
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 16;

/// The message types the session reads whole (the rest are streamed).
fn whole(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'C' | b'Q' | b'p' | b'E' | b'S' | b'H' | b'X')
}

fn decode(tag: u8, msg: &[u8]) {
    let body = &msg[HEADER_LEN..];
    let mut out = BytesMut::new();
    match tag {
        b'P' => {
            if let Some(p) = parse_parse(body) {
                write_parse(&mut out, "dbp_0123456789abcdef", p.query, p.param_types);
                let again = parse_parse(&out[HEADER_LEN..]).expect("a rewritten Parse decodes");
                assert_eq!((again.query, again.param_types), (p.query, p.param_types));
                // Text in any client encoding, as the session reads it.
                for backslash_trail in [false, true] {
                    let (text, legibility) = dbproxy::sql::encoding::read(p.query, backslash_trail);
                    let _ = dbproxy::sql::encoding::effects(&text, legibility);
                }
            }
        }
        b'B' => {
            if let Some((portal, statement, rest_at)) = parse_bind_names(body) {
                write_bind_renamed(&mut out, msg, portal, "dbp_0123456789abcdef", rest_at);
                let (p, s, _) = parse_bind_names(&out[HEADER_LEN..]).expect("a rewritten Bind decodes");
                assert_eq!((p, s), (portal, "dbp_0123456789abcdef"));
                assert_eq!(out.len() + statement.len(), msg.len() + "dbp_0123456789abcdef".len());
            }
        }
        b'D' | b'C' => {
            if let Some((kind, name)) = parse_target(body) {
                write_target(&mut out, tag, kind, name);
                assert_eq!(&out[..], msg, "a Describe/Close round-trips");
            }
        }
        b'Q' => {
            if let Some((sql, _)) = read_cbytes(body) {
                let (text, legibility) = dbproxy::sql::encoding::read(sql, true);
                let _ = dbproxy::sql::encoding::effects(&text, legibility);
            }
        }
        b'p' => {
            let _ = parse_sasl_initial_response(body);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let mut scanner = Scanner::new(MAX);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    loop {
        match scanner.next(&buf, whole) {
            Ok(Some(item)) => {
                assert!(!item.is_empty() && item.len() <= buf.len(), "{item:?} beyond {} bytes", buf.len());
                if let Item::Whole { tag, len } = item {
                    assert!(len <= MAX + 1);
                    decode(tag, &buf[..len]);
                }
                buf.drain(..item.len());
            }
            Ok(None) => {
                assert!(scanner.bytes_wanted(&buf) <= MAX + 1);
                if fed == stream.len() {
                    break;
                }
                let end = (fed + chunk).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
            }
            Err(_) => break,
        }
        assert!(buf.len() <= MAX + 1 + 64, "buffered {} bytes", buf.len());
    }
});
