//! SQLSTATE codes the proxy itself reports, as typed constants (never string
//! literals at the call site). Server errors are forwarded unchanged and do not
//! go through this type.

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    const fn new(code: &str) -> SqlState {
        let b = code.as_bytes();
        assert!(b.len() == 5, "a SQLSTATE has five characters");
        SqlState([b[0], b[1], b[2], b[3], b[4]])
    }

    /// Parses a code reported by a server; `None` unless five ASCII alphanumerics.
    pub fn from_code(code: &str) -> Option<SqlState> {
        let b: [u8; 5] = code.as_bytes().try_into().ok()?;
        b.iter().all(u8::is_ascii_alphanumeric).then_some(SqlState(b))
    }

    /// The code as sent in the `C` field of an `ErrorResponse`.
    pub fn code(&self) -> &str {
        // Both constructors admit only ASCII, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    /// 25P03: a client stayed idle inside a transaction for too long.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState::new("25P03");
    /// 08006: the server connection failed while in use.
    pub const CONNECTION_FAILURE: SqlState = SqlState::new("08006");
    /// 08001: could not establish a connection to the server.
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: SqlState = SqlState::new("08001");
    /// 08P01: the peer broke the wire protocol.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState::new("08P01");
    /// 0A000: e.g. an unsupported protocol version.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState::new("0A000");
    /// 28000: unknown user or other authorization problem.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState::new("28000");
    /// 28P01: wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState::new("28P01");
    /// 3D000: unknown database.
    pub const INVALID_CATALOG_NAME: SqlState = SqlState::new("3D000");
    /// 42P05: a Parse names a prepared statement that exists.
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState::new("42P05");
    /// 26000: no prepared statement of that name.
    pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState::new("26000");
    /// 42704: e.g. KILL_CLIENT of a client that is not connected.
    pub const UNDEFINED_OBJECT: SqlState = SqlState::new("42704");
    /// 42601: an admin console command the proxy does not know.
    pub const SYNTAX_ERROR: SqlState = SqlState::new("42601");
    /// 22023: a RELOAD of an invalid configuration.
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState::new("22023");
    /// 53300: too many client connections.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState::new("53300");
    /// 54000: a message exceeded `proxy.max_message_size`.
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState::new("54000");
    /// 57014: the request was abandoned (e.g. no server connection in time).
    pub const QUERY_CANCELED: SqlState = SqlState::new("57014");
    /// 57P01: the proxy is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState::new("57P01");
    /// 57P03: the proxy cannot serve connections right now.
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState::new("57P03");
    /// XX000: a bug in the proxy.
    pub const INTERNAL_ERROR: SqlState = SqlState::new("XX000");
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}
