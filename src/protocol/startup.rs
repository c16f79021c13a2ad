//! The untagged first packet a client sends: SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage. Parsed with hard bounds, since it arrives
//! before any authentication.

use super::framing::{read_cstr, read_i32};

/// Largest startup packet accepted (PgBouncer and PostgreSQL use 10 000).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// A decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption (always declined).
    GssEncRequest,
    /// Cancel the query running for the session with this key.
    Cancel { process_id: i32, secret_key: i32 },
    /// Protocol 3.x StartupMessage with its parameters, in order.
    Startup {
        /// Minor protocol version the client asked for (we speak 3.0).
        minor: u16,
        params: Vec<(String, String)>,
    },
}

/// Why a startup packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Parses the packet at the front of `buf`. `Ok(None)` means more bytes are
/// needed; otherwise returns the packet and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, StartupError> {
    let Some((len, _)) = read_i32(buf) else {
        return Ok(None);
    };
    let len = len as u32;
    if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    let Some(packet) = buf.get(4..len) else {
        return Ok(None);
    };
    let (code, body) = read_i32(packet).ok_or(StartupError::Malformed("missing code"))?;
    let parsed = match code {
        SSL_REQUEST_CODE if body.is_empty() => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if body.is_empty() => StartupPacket::GssEncRequest,
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            return Err(StartupError::Malformed("encryption request with a body"));
        }
        CANCEL_REQUEST_CODE => {
            let (process_id, rest) = read_i32(body).ok_or(StartupError::Malformed("short cancel request"))?;
            let (secret_key, rest) = read_i32(rest).ok_or(StartupError::Malformed("short cancel request"))?;
            if !rest.is_empty() {
                return Err(StartupError::Malformed("long cancel request"));
            }
            StartupPacket::Cancel { process_id, secret_key }
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            StartupPacket::Startup {
                minor,
                params: parse_params(body)?,
            }
        }
    };
    Ok(Some((parsed, len)))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let (name, rest) = read_cstr(body).ok_or(StartupError::Malformed(
            "parameter name is not a terminated UTF-8 string",
        ))?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let (value, rest) = read_cstr(rest).ok_or(StartupError::Malformed(
            "parameter value is not a terminated UTF-8 string",
        ))?;
        params.push((name.to_owned(), value.to_owned()));
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn startup_message_with_params() {
        let p = packet(196_608, b"user\0app\0database\0appdb\0\0");
        let (pkt, used) = parse(&p).unwrap().unwrap();
        assert_eq!(used, p.len());
        assert_eq!(
            pkt,
            StartupPacket::Startup {
                minor: 0,
                params: vec![("user".into(), "app".into()), ("database".into(), "appdb".into())]
            }
        );
        assert_eq!(parse(&p[..p.len() - 1]).unwrap(), None);
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse(&packet(SSL_REQUEST_CODE, b"")).unwrap().unwrap().0,
            StartupPacket::SslRequest
        );
        assert_eq!(
            parse(&packet(GSSENC_REQUEST_CODE, b"")).unwrap().unwrap().0,
            StartupPacket::GssEncRequest
        );
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice(&(-7i32).to_be_bytes());
        assert_eq!(
            parse(&packet(CANCEL_REQUEST_CODE, &body)).unwrap().unwrap().0,
            StartupPacket::Cancel {
                process_id: 42,
                secret_key: -7
            }
        );
    }

    #[test]
    fn bad_packets_are_refused() {
        assert_eq!(parse(&[0, 0, 0, 4]), Err(StartupError::BadLength(4)));
        assert_eq!(
            parse(&[0x7f, 0xff, 0xff, 0xff]),
            Err(StartupError::BadLength(0x7fff_ffff))
        );
        assert!(matches!(
            parse(&packet(0x0002_0000, b"\0")),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        ));
        assert!(parse(&packet(196_608, b"user\0app")).is_err());
        assert!(parse(&packet(196_608, b"user\0\xff\xfe\0\0")).is_err());
        assert!(parse(&packet(196_608, b"user\0a\0\0junk")).is_err());
    }
}
