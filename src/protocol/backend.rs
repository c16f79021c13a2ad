//! Encoders for the messages the proxy sends to clients on its own behalf:
//! authentication exchange, parameter status, errors, and simple result sets.

use bytes::{BufMut, BytesMut};

use super::{SqlState, TransactionStatus};

/// Writes one tagged message; `body` appends the payload, the length is patched in.
pub(crate) fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

/// AuthenticationSASL listing the mechanisms offered.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue carrying the server-first message.
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

/// AuthenticationSASLFinal carrying the server-final message.
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// BackendKeyData: the key a client must quote to cancel its queries.
pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

/// ReadyForQuery.
pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    message(buf, b'Z', |b| b.put_u8(status.as_byte()));
}

/// NegotiateProtocolVersion: we speak 3.0 and none of the `_pq_` options.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unrecognized: &[&str]) {
    message(buf, b'v', |b| {
        b.put_i32((3 << 16) | newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for opt in unrecognized {
            put_cstr(b, opt);
        }
    });
}

/// A column of a result set the proxy produces itself (admin console).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Int8,
}

/// RowDescription for text-format columns.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, ColumnType)]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (name, ty) in columns {
            put_cstr(b, name);
            b.put_i32(0); // table OID
            b.put_i16(0); // column number
            let (oid, len) = match ty {
                ColumnType::Text => (25, -1),
                ColumnType::Int8 => (20, 8),
            };
            b.put_i32(oid);
            b.put_i16(len);
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (`None` is NULL).
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.as_ref().len() as i32);
                    b.put_slice(v.as_ref().as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// CommandComplete with `tag`.
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag));
}

/// EmptyQueryResponse.
pub fn empty_query(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

/// NoticeResponse with severity NOTICE.
pub fn notice(buf: &mut BytesMut, text: &str) {
    message(buf, b'N', |b| {
        for (field, value) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000"), (b'M', text)] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// Severity of an error or notice the proxy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The request failed; the connection stays usable.
    Error,
    /// The connection is about to be closed.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// The fields of an ErrorResponse the proxy produces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    /// An ERROR with the given code and message.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        ErrorFields {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A FATAL with the given code and message.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        ErrorFields {
            severity: Severity::Fatal,
            ..Self::error(code, message)
        }
    }

    /// Adds a hint line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a detail line.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// ErrorResponse.
pub fn error_response(buf: &mut BytesMut, e: &ErrorFields) {
    message(buf, b'E', |b| {
        for (field, value) in [
            (b'S', e.severity.as_str()),
            (b'V', e.severity.as_str()),
            (b'C', e.code.code()),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, &e.message);
        if let Some(d) = &e.detail {
            b.put_u8(b'D');
            put_cstr(b, d);
        }
        if let Some(h) = &e.hint {
            b.put_u8(b'H');
            put_cstr(b, h);
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, &ErrorFields::fatal(SqlState::INVALID_PASSWORD, "nope"));
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        assert_eq!(&buf[5..], b"SFATAL\0VFATAL\0C28P01\0Mnope\0\0");
    }

    #[test]
    fn ready_for_query_layout() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, TransactionStatus::Idle);
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
    }
}
