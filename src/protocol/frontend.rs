//! Decoders for the few client messages whose contents the proxy reads during
//! authentication. Regular traffic is forwarded as raw frames.

use super::framing::{read_cstr, read_i32};

/// Tag of SASLInitialResponse, SASLResponse and PasswordMessage alike.
pub const PASSWORD_TAG: u8 = b'p';

/// A SASLInitialResponse body: the chosen mechanism and its first message.
#[derive(Debug, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    pub data: &'a [u8],
}

/// Parses a SASLInitialResponse body (without tag and length).
pub fn parse_sasl_initial_response(body: &[u8]) -> Option<SaslInitialResponse<'_>> {
    let (mechanism, rest) = read_cstr(body)?;
    let (len, data) = read_i32(rest)?;
    if len < 0 || len as usize != data.len() {
        return None;
    }
    Some(SaslInitialResponse { mechanism, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_response_is_length_checked() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse_sasl_initial_response(&body),
            Some(SaslInitialResponse {
                mechanism: "SCRAM-SHA-256",
                data: b"abc"
            })
        );
        body.push(b'x');
        assert_eq!(parse_sasl_initial_response(&body), None);
        assert_eq!(parse_sasl_initial_response(b"SCRAM"), None);
    }
}
