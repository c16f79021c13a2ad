//! One connection to a PostgreSQL server: connect, log in as a configured user
//! (SCRAM-SHA-256, md5 or trust), and remember what the server reported
//! (ParameterStatus, its cancel key). After login the connection is a plain
//! byte stream that sessions forward frames over.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::{SaltedPasswordCache, ScramClient};
use crate::config::ServerAddr;
use crate::protocol::{SqlState, TransactionStatus};
use crate::server_state::ServerState;
use crate::server_stream::ServerStream;

/// ParameterStatus values a server reported at login, in order.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// What a server connection logs in as. `Debug` never prints the password.
#[derive(Clone)]
pub struct LoginTarget {
    pub addr: ServerAddr,
    pub dbname: String,
    pub user: String,
    pub password: String,
    /// Read afresh for each connection (a reload may replace it).
    pub tls: crate::tls::ServerTlsSetting,
    /// The SCRAM salted password of the pool's logins (shared by clones).
    pub salted: SaltedPasswordCache,
    /// For a standby's pool: each login asks the default transaction
    /// isolation, and this counts the open connections where it is
    /// SERIALIZABLE (which a standby refuses to run reads at).
    pub serializable_conns: Option<Arc<AtomicUsize>>,
}

impl std::fmt::Debug for LoginTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginTarget")
            .field("addr", &self.addr)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Where and how to cancel the query running on one server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: &'static ServerAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

/// A server address and its text, made once per distinct address for the
/// life of the process and never freed (there are as many as addresses were
/// ever configured), so that naming a connection's server on every checkout
/// (its cancel key, the client's SHOW CLIENTS entry) copies a reference
/// instead of counting one on a line another thread may hold.
#[derive(Debug)]
struct Endpoint {
    addr: ServerAddr,
    label: Box<str>,
}

fn endpoint(addr: &ServerAddr) -> &'static Endpoint {
    static ALL: Mutex<Vec<&'static Endpoint>> = Mutex::new(Vec::new());
    let mut all = ALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = all.iter().find(|e| e.addr == *addr) {
        return known;
    }
    let new: &'static Endpoint = Box::leak(Box::new(Endpoint {
        addr: addr.clone(),
        label: addr.to_string().into(),
    }));
    all.push(new);
    new
}

/// Why a server connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: ServerAddr, source: io::Error },
    #[error("server {addr} did not complete login within {timeout:?}")]
    Timeout { addr: ServerAddr, timeout: Duration },
    #[error("server {addr} refused login: {message}")]
    Rejected {
        addr: ServerAddr,
        code: SqlState,
        message: String,
    },
    #[error("server {addr} asked for an authentication method dbproxy does not support ({method})")]
    UnsupportedAuth { addr: ServerAddr, method: &'static str },
    #[error("server {addr} broke the protocol: {reason}")]
    Protocol { addr: ServerAddr, reason: String },
    #[error("connection to server {addr} failed: {source}")]
    Io { addr: ServerAddr, source: io::Error },
}

impl ServerError {
    /// The SQLSTATE a client sees for this failure.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ServerError::Rejected { code, .. } => *code,
            ServerError::Io { .. } => SqlState::CONNECTION_FAILURE,
            _ => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        }
    }
}

/// An established, logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: ServerStream,
    /// The server's address and its text, interned.
    endpoint: &'static Endpoint,
    /// ParameterStatus values reported at login, in order.
    pub params: ServerParams,
    pub process_id: i32,
    secret_key: i32,
    pub created: Instant,
    pub last_used: Instant,
    /// Prepared statements and settings held for clients.
    pub state: ServerState,
    /// The pool's generation when this connection was opened (RECONNECT).
    pub generation: usize,
    /// The epoch of the `[server_tls]` setting it was opened with.
    pub tls_epoch: u64,
}

impl ServerConn {
    /// Connects and logs in, bounded by `timeout` overall.
    pub async fn connect(target: &LoginTarget, timeout: Duration) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(timeout, Self::connect_inner(target)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout {
                addr: target.addr.clone(),
                timeout,
            }),
        }
    }

    async fn connect_inner(target: &LoginTarget) -> Result<ServerConn, ServerError> {
        let addr = &target.addr;
        let tls = target.tls.current();
        let stream = ServerStream::connect(addr, &tls)
            .await
            .map_err(|source| ServerError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let mut login = Login {
            stream,
            addr,
            buf: BytesMut::with_capacity(1024),
        };
        let mut out = BytesMut::new();
        let params = [
            ("user", target.user.as_str()),
            ("database", target.dbname.as_str()),
            ("application_name", "dbproxy"),
        ];
        frontend::startup_message(params, &mut out).map_err(|e| login.protocol(e.to_string()))?;
        login.send(&mut out).await?;
        login.authenticate(target).await?;
        let mut params = Vec::new();
        let mut key = (0, 0);
        loop {
            match login.recv().await? {
                Message::ParameterStatus(body) => {
                    let name = body.name().map_err(|e| login.protocol(e.to_string()))?;
                    let value = body.value().map_err(|e| login.protocol(e.to_string()))?;
                    params.push((name.to_owned(), value.to_owned()));
                }
                Message::BackendKeyData(body) => key = (body.process_id(), body.secret_key()),
                Message::ReadyForQuery(_) => break,
                Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => return Err(login.rejected(&body)),
                _ => return Err(login.protocol("unexpected message during login".to_owned())),
            }
        }
        if !login.buf.is_empty() {
            return Err(login.protocol("data after ReadyForQuery during login".to_owned()));
        }
        let now = Instant::now();
        let default_backslash_trail = params
            .iter()
            .any(|(name, value)| name == "client_encoding" && crate::sql::encoding::backslash_trail(value));
        let mut conn = ServerConn {
            stream: login.stream,
            endpoint: endpoint(addr),
            params: Arc::new(params),
            process_id: key.0,
            secret_key: key.1,
            created: now,
            last_used: now,
            state: ServerState {
                default_backslash_trail,
                ..ServerState::default()
            },
            generation: 0,
            tls_epoch: tls.epoch(),
        };
        if let Some(count) = &target.serializable_conns {
            // The role's or database's default, which no client statement
            // shows. SHOW takes no snapshot, so it runs even where that
            // default makes every snapshot fail.
            let rows = conn
                .query_rows("SHOW default_transaction_isolation")
                .await
                .map_err(|source| ServerError::Io {
                    addr: addr.clone(),
                    source,
                })?;
            if rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()) == Some("serializable") {
                conn.state.default_serializable = Some(crate::pool::Gauge::raise(count.clone()));
            }
        }
        Ok(conn)
    }

    /// The server this connection is to.
    pub fn addr(&self) -> &'static ServerAddr {
        &self.endpoint.addr
    }

    /// [`Self::addr`] as text, made once (SHOW CLIENTS and SHOW SERVERS name
    /// it on every checkout).
    pub fn label(&self) -> &'static str {
        &self.endpoint.label
    }

    /// The key that cancels whatever this connection is running.
    pub fn cancel_key(&self) -> CancelKey {
        CancelKey {
            addr: self.addr(),
            process_id: self.process_id,
            secret_key: self.secret_key,
        }
    }

    /// Whether an idle connection is still usable: nothing to read and no EOF.
    /// One non-blocking syscall, no round trip. A server that was terminated
    /// behind our back has sent an error and closed, which this detects.
    pub fn is_alive(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Runs one simple query whose results nobody wants (a reset or a
    /// rollback) and returns the transaction status that follows it. Errors
    /// from the server make this fail: the connection is then not reusable.
    pub async fn run_discarding(&mut self, sql: &str) -> io::Result<TransactionStatus> {
        self.simple_query(sql, false).await.map(|(status, _)| status)
    }

    /// Runs one simple query of the proxy's own (health checks, catalog
    /// lookups) and returns its rows as text.
    pub async fn query_rows(&mut self, sql: &str) -> io::Result<Vec<Vec<Option<String>>>> {
        self.simple_query(sql, true).await.map(|(_, rows)| rows)
    }

    async fn simple_query(
        &mut self,
        sql: &str,
        keep_rows: bool,
    ) -> io::Result<(TransactionStatus, Vec<Vec<Option<String>>>)> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.state.query_sent();
        self.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut failed = false;
        let mut rows = Vec::new();
        loop {
            while let Some(msg) = Message::parse(&mut buf)? {
                match msg {
                    Message::ErrorResponse(_) => failed = true,
                    Message::DataRow(body) if keep_rows => {
                        let data = body.buffer();
                        let mut row = Vec::new();
                        let mut ranges = body.ranges();
                        while let Some(range) = ranges.next()? {
                            row.push(range.map(|r| String::from_utf8_lossy(&data[r]).into_owned()));
                        }
                        rows.push(row);
                    }
                    Message::ReadyForQuery(body) if buf.is_empty() => {
                        return match TransactionStatus::from_byte(body.status()) {
                            Some(s) if !failed => Ok((s, rows)),
                            _ => Err(io::Error::other(format!("{sql:?} failed on the server"))),
                        };
                    }
                    Message::ReadyForQuery(_) => return Err(io::Error::other("data after ReadyForQuery")),
                    _ => {}
                }
            }
            if self.stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Sends a CancelRequest for `key` and waits until the server has acted on it
/// (the postmaster closes the connection after signalling the backend).
pub async fn send_cancel(key: &CancelKey, timeout: Duration) -> io::Result<()> {
    let work = async {
        // In plain text, as libpq before PostgreSQL 17: the key is all it carries.
        let mut stream = ServerStream::connect(key.addr, &crate::tls::ServerTls::disabled()).await?;
        let mut out = BytesMut::new();
        frontend::cancel_request(key.process_id, key.secret_key, &mut out);
        stream.write_all(&out).await?;
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// The login conversation on a fresh connection.
struct Login<'a> {
    stream: ServerStream,
    addr: &'a ServerAddr,
    buf: BytesMut,
}

impl Login<'_> {
    fn protocol(&self, reason: String) -> ServerError {
        ServerError::Protocol {
            addr: self.addr.clone(),
            reason,
        }
    }

    fn io(&self, source: io::Error) -> ServerError {
        ServerError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn rejected(&self, body: &ErrorResponseBody) -> ServerError {
        let (mut code, mut message) = (SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, String::new());
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            match f.type_() {
                b'C' => {
                    if let Some(c) = std::str::from_utf8(f.value_bytes()).ok().and_then(SqlState::from_code) {
                        code = c;
                    }
                }
                b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                _ => {}
            }
        }
        ServerError::Rejected {
            addr: self.addr.clone(),
            code,
            message,
        }
    }

    async fn send(&mut self, out: &mut BytesMut) -> Result<(), ServerError> {
        let r = self.stream.write_all(out).await;
        out.clear();
        r.map_err(|e| self.io(e))
    }

    async fn recv(&mut self) -> Result<Message, ServerError> {
        loop {
            match Message::parse(&mut self.buf) {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            if self.buf.len() > 1 << 20 {
                return Err(self.protocol("oversized message during login".to_owned()));
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(self.io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    async fn authenticate(&mut self, target: &LoginTarget) -> Result<(), ServerError> {
        let (user, password) = (&target.user, &target.password);
        let mut out = BytesMut::new();
        match self.recv().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password.as_bytes(), &mut out).map_err(|e| self.protocol(e.to_string()))?;
                self.send(&mut out).await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| self.protocol(e.to_string()))?;
                self.send(&mut out).await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Ok(Some(m)) = mechanisms.next() {
                    offered |= m == SCRAM_SHA_256;
                }
                if !offered {
                    return Err(ServerError::UnsupportedAuth {
                        addr: self.addr.clone(),
                        method: "SASL without SCRAM-SHA-256",
                    });
                }
                self.scram(password, &target.salted).await?;
            }
            Message::ErrorResponse(body) => return Err(self.rejected(&body)),
            _ => {
                return Err(ServerError::UnsupportedAuth {
                    addr: self.addr.clone(),
                    method: "GSS/SSPI/Kerberos",
                });
            }
        }
        match self.recv().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(self.rejected(&body)),
            _ => Err(self.protocol("expected AuthenticationOk".to_owned())),
        }
    }

    async fn scram(&mut self, password: &str, cache: &SaltedPasswordCache) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        let mut scram = ScramClient::new(password);
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.client_first().as_bytes(), &mut out)
            .map_err(|e| self.protocol(e.to_string()))?;
        self.send(&mut out).await?;
        let server_first = match self.recv().await? {
            Message::AuthenticationSaslContinue(body) => body.data().to_vec(),
            Message::ErrorResponse(body) => return Err(self.rejected(&body)),
            _ => return Err(self.protocol("expected SASL continue".to_owned())),
        };
        let client_final = scram
            .answer(&server_first, cache)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        frontend::sasl_response(client_final.as_bytes(), &mut out).map_err(|e| self.protocol(e.to_string()))?;
        self.send(&mut out).await?;
        match self.recv().await? {
            Message::AuthenticationSaslFinal(body) => {
                scram.verify(body.data()).map_err(|e| self.protocol(e.to_string()))
            }
            Message::ErrorResponse(body) => Err(self.rejected(&body)),
            _ => Err(self.protocol("expected SASL final".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_is_interned_once() {
        let a = ServerAddr {
            host: "db-intern-test".into(),
            port: 5432,
        };
        let b = ServerAddr {
            port: 5433,
            ..a.clone()
        };
        let first = endpoint(&a);
        assert!(std::ptr::eq(first, endpoint(&a.clone())));
        assert!(!std::ptr::eq(first, endpoint(&b)));
        assert_eq!(&*first.label, "db-intern-test:5432");
        assert_eq!(endpoint(&b).addr, b);
    }
}
