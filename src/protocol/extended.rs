//! Reading and rewriting the extended-protocol messages that name prepared
//! statements (Parse, Bind, Describe, Close), so statements can be renamed on
//! their way to whichever server connection a client is using.

use bytes::{BufMut, BytesMut};

use super::backend::{message, put_cstr};
use super::framing::{HEADER_LEN, read_cbytes, read_cstr};

/// A Parse message's fields.
#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    /// The text as sent: UTF-8, or another client encoding (LATIN1, ...).
    pub query: &'a [u8],
    /// The parameter-type section as sent: count, then one OID each.
    pub param_types: &'a [u8],
}

/// Decodes a Parse body (after the header).
pub fn parse_parse(body: &[u8]) -> Option<Parse<'_>> {
    let (name, rest) = read_cstr(body)?;
    let (query, rest) = read_cbytes(rest)?;
    let (count, oids) = rest.split_first_chunk::<2>()?;
    if oids.len() != usize::from(u16::from_be_bytes(*count)) * 4 {
        return None;
    }
    Some(Parse {
        name,
        query,
        param_types: rest,
    })
}

/// The portal and statement names at the start of a Bind body, and where the
/// rest of the body starts.
pub fn parse_bind_names(body: &[u8]) -> Option<(&str, &str, usize)> {
    let (portal, rest) = read_cstr(body)?;
    let (statement, rest) = read_cstr(rest)?;
    Some((portal, statement, body.len() - rest.len()))
}

/// Parameter `n` (from 1) of a Bind body whose names end at `rest_at`: its
/// format code (0 text, 1 binary) and its value (`None`: NULL). `None` if
/// the message has no such parameter or does not add up.
pub fn bind_param(body: &[u8], rest_at: usize, n: usize) -> Option<(i16, Option<&[u8]>)> {
    fn u16_at(b: &[u8]) -> Option<(u16, &[u8])> {
        b.split_first_chunk::<2>()
            .map(|(c, rest)| (u16::from_be_bytes(*c), rest))
    }
    let (formats, rest) = u16_at(body.get(rest_at..)?)?;
    let (codes, rest) = rest.split_at_checked(usize::from(formats) * 2)?;
    let (params, mut rest) = u16_at(rest)?;
    let code = |i: usize| i16::from_be_bytes([codes[2 * i], codes[2 * i + 1]]);
    let format = match formats {
        _ if n == 0 || n > usize::from(params) => return None,
        0 => 0,
        1 => code(0),
        _ if formats == params => code(n - 1),
        _ => return None,
    };
    for i in 1..=n {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        let (value, after) = match usize::try_from(len) {
            Ok(len) => after.split_at_checked(len).map(|(v, a)| (Some(v), a))?,
            Err(_) => (None, after),
        };
        if i == n {
            return Some((format, value));
        }
        rest = after;
    }
    None
}

/// The target of a Describe or Close body: `b'S'` or `b'P'`, and the name.
pub fn parse_target(body: &[u8]) -> Option<(u8, &str)> {
    let (&kind, rest) = body.split_first()?;
    let (name, rest) = read_cstr(rest)?;
    (matches!(kind, b'S' | b'P') && rest.is_empty()).then_some((kind, name))
}

/// Writes a Parse of `query` under `name`.
pub fn write_parse(buf: &mut BytesMut, name: &str, query: &[u8], param_types: &[u8]) {
    message(buf, b'P', |b| {
        put_cstr(b, name);
        b.put_slice(query);
        b.put_u8(0);
        b.put_slice(param_types);
    });
}

/// Writes a Bind identical to `bind` (a whole message) but for `statement`.
pub fn write_bind_renamed(buf: &mut BytesMut, bind: &[u8], portal: &str, statement: &str, rest_at: usize) {
    message(buf, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_slice(&bind[HEADER_LEN + rest_at..]);
    });
}

/// Writes a Bind of `statement` to `portal`: no parameters, text results.
pub fn write_bind(buf: &mut BytesMut, portal: &str, statement: &str) {
    message(buf, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_slice(&[0, 0, 0, 0, 0, 0]);
    });
}

/// Writes an Execute of `portal`, all rows.
pub fn write_execute(buf: &mut BytesMut, portal: &str) {
    message(buf, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    });
}

/// Writes a Describe or Close (`tag`) of `kind` (`S`/`P`) named `name`.
pub fn write_target(buf: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    message(buf, tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

/// Writes a simple Query.
pub fn write_query(buf: &mut BytesMut, sql: &str) {
    message(buf, b'Q', |b| put_cstr(b, sql));
}

/// ParseComplete, for a Parse the proxy answers itself.
pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

/// CloseComplete, for a Close the proxy answers itself.
pub fn close_complete(buf: &mut BytesMut) {
    message(buf, b'3', |_| {});
}

pub use super::backend::command_complete;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trip() {
        let mut buf = BytesMut::new();
        write_parse(&mut buf, "s1", b"SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(&buf[HEADER_LEN..]).unwrap();
        assert_eq!(
            p,
            Parse {
                name: "s1",
                query: b"SELECT $1",
                param_types: &[0, 1, 0, 0, 0, 23]
            }
        );
        // Text that is not UTF-8 (LATIN1: 0xe9 is e acute) is kept as sent.
        let p = parse_parse(b"s2\0SELECT 'caf\xe9'\0\0\0").unwrap();
        assert_eq!(p.query, b"SELECT 'caf\xe9'");
        assert!(
            parse_parse(b"s1\0SELECT\0\0\x02\0\0\0\x17").is_none(),
            "count says 2 OIDs, only 1 sent"
        );
        assert!(parse_parse(b"s1\0SELECT").is_none());
    }

    #[test]
    fn bind_parameters_are_found_by_number() {
        let mut bind = BytesMut::new();
        message(&mut bind, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "s");
            b.put_slice(&[0, 2, 0, 0, 0, 1]); // formats: text, binary
            b.put_slice(&[0, 2]); // two parameters
            b.put_slice(&[0, 0, 0, 2, b'4', b'2']);
            b.put_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
            b.put_slice(&[0, 0]); // result formats
        });
        let body = &bind[HEADER_LEN..];
        let (_, _, rest_at) = parse_bind_names(body).unwrap();
        assert_eq!(bind_param(body, rest_at, 1), Some((0, Some(&b"42"[..]))));
        assert_eq!(bind_param(body, rest_at, 2), Some((1, None)));
        assert_eq!(bind_param(body, rest_at, 3), None);
        assert_eq!(bind_param(body, rest_at, 0), None);
        // Cut short: no value past the end.
        assert_eq!(bind_param(&body[..body.len() - 9], rest_at, 1), None);
    }

    #[test]
    fn bind_rename_keeps_the_rest() {
        let mut original = BytesMut::new();
        message(&mut original, b'B', |b| {
            put_cstr(b, "");
            put_cstr(b, "client_stmt");
            b.put_slice(&[0, 0, 0, 1, 0, 0, 0, 2, b'4', b'2', 0, 0]);
        });
        let (portal, stmt, rest_at) = parse_bind_names(&original[HEADER_LEN..]).unwrap();
        assert_eq!((portal, stmt), ("", "client_stmt"));
        let mut renamed = BytesMut::new();
        write_bind_renamed(&mut renamed, &original, portal, "dbp_x", rest_at);
        let (_, stmt2, rest2) = parse_bind_names(&renamed[HEADER_LEN..]).unwrap();
        assert_eq!(stmt2, "dbp_x");
        assert_eq!(&renamed[HEADER_LEN + rest2..], &original[HEADER_LEN + rest_at..]);
        let len = u32::from_be_bytes([renamed[1], renamed[2], renamed[3], renamed[4]]) as usize;
        assert_eq!(len + 1, renamed.len());
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target(b"Sname\0"), Some((b'S', "name")));
        assert_eq!(parse_target(b"P\0"), Some((b'P', "")));
        assert_eq!(parse_target(b"Xname\0"), None);
        assert_eq!(parse_target(b"Sname\0extra"), None);
    }
}
