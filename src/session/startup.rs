//! The startup phase of a client connection: encryption negotiation, the
//! StartupMessage, SCRAM-SHA-256 authentication, and the greeting
//! (AuthenticationOk, ParameterStatus, BackendKeyData come later from
//! `transfer`, once the cancel key exists).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{ClientStream, send_fatal};
use crate::auth::{ScramError, ScramExchange, User, scram};
use crate::config::{ADMIN_DATABASE, DatabaseConfig};
use crate::protocol::backend::{
    ErrorFields, authentication_sasl, authentication_sasl_continue, authentication_sasl_final,
    negotiate_protocol_version,
};
use crate::protocol::frontend::{PASSWORD_TAG, parse_sasl_initial_response};
use crate::protocol::startup::{self, MAX_STARTUP_LEN, StartupPacket};
use crate::protocol::{Item, Scanner, SqlState};
use crate::proxy::Shared;

/// What an authenticated client connected to.
pub enum Target {
    Database(Arc<DatabaseConfig>),
    /// The admin console (database `dbproxy`).
    Admin,
}

/// A client that has authenticated.
pub struct Opened {
    pub stream: ClientStream,
    pub target: Target,
    pub user: Arc<User>,
    /// Startup parameters other than user and database, in order.
    pub params: Vec<(String, String)>,
}

/// A startup that ends the connection, with what to tell the client.
pub struct Failure {
    stream: Option<ClientStream>,
    error: Option<ErrorFields>,
}

impl Failure {
    fn fatal(stream: ClientStream, code: SqlState, message: impl Into<String>) -> Failure {
        Failure {
            stream: Some(stream),
            error: Some(ErrorFields::fatal(code, message)),
        }
    }

    fn hang_up() -> Failure {
        Failure {
            stream: None,
            error: None,
        }
    }

    /// Sends the error, if there is one and a stream to send it on.
    pub async fn report(self, errors: &crate::stats::ErrorCounts) {
        if let Some(err) = &self.error {
            let kind = match err.code {
                SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => "auth_failed",
                _ => "client_protocol",
            };
            errors.count(kind);
            tracing::info!(code = %err.code, message = %err.message, "client login refused");
        }
        if let (Some(mut stream), Some(err)) = (self.stream, self.error) {
            send_fatal(&mut stream, &err).await;
        }
    }
}

/// Reads more bytes into `buf`; EOF or an error means the client left.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<(), Failure> {
    buf.reserve(512);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Failure::hang_up()),
        Ok(_) => Ok(()),
    }
}

/// Negotiates encryption and reads the StartupMessage. `Ok(None)` when the
/// connection was a cancel request (handled here) or ended quietly.
pub async fn open(shared: &Shared, tcp: TcpStream) -> Result<Option<Opened>, Failure> {
    let mut stream = ClientStream::Plain(tcp);
    let mut buf = BytesMut::with_capacity(512);
    let (minor, params) = loop {
        let parsed = match startup::parse(&buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                fill(&mut stream, &mut buf).await?;
                continue;
            }
            Err(e) => {
                let code = match e {
                    startup::StartupError::UnsupportedVersion { .. } => SqlState::FEATURE_NOT_SUPPORTED,
                    _ => SqlState::PROTOCOL_VIOLATION,
                };
                return Err(Failure::fatal(stream, code, e.to_string()));
            }
        };
        let (packet, used) = parsed;
        buf.advance(used);
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest if !buf.is_empty() => {
                // Bytes sent before our answer could be injected by a man in the middle.
                return Err(Failure::fatal(
                    stream,
                    SqlState::PROTOCOL_VIOLATION,
                    "received unencrypted data after SSL request",
                ));
            }
            StartupPacket::SslRequest => {
                stream = negotiate_tls(shared, stream).await?;
            }
            StartupPacket::GssEncRequest => {
                stream.write_all(b"N").await.map_err(|_| Failure::hang_up())?;
            }
            StartupPacket::Cancel { process_id, secret_key } => {
                shared.cancels.cancel(process_id, secret_key).await;
                return Ok(None);
            }
            StartupPacket::Startup { minor, params } => break (minor, params),
        }
    };
    if matches!(stream, ClientStream::Plain(_)) && tls_required(shared) {
        return Err(Failure::fatal(
            stream,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "dbproxy requires TLS (tls.client_mode = \"require\"): connect with sslmode=require",
        ));
    }
    if !buf.is_empty() {
        return Err(Failure::fatal(
            stream,
            SqlState::PROTOCOL_VIOLATION,
            "unexpected data after the startup packet",
        ));
    }
    login(shared, stream, minor, params).await.map(Some)
}

/// Whether plaintext logins are refused. Cancel requests are not: libpq
/// before 17 always sends them unencrypted, and they carry a secret key.
fn tls_required(shared: &Shared) -> bool {
    let live = shared.live();
    live.tls.is_some()
        && live
            .config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_mode == crate::config::TlsClientMode::Require)
}

async fn negotiate_tls(shared: &Shared, stream: ClientStream) -> Result<ClientStream, Failure> {
    let ClientStream::Plain(mut tcp) = stream else {
        return Err(Failure::fatal(
            stream,
            SqlState::PROTOCOL_VIOLATION,
            "SSL request inside an encrypted connection",
        ));
    };
    let Some(acceptor) = &shared.live().tls else {
        tcp.write_all(b"N").await.map_err(|_| Failure::hang_up())?;
        return Ok(ClientStream::Plain(tcp));
    };
    tcp.write_all(b"S").await.map_err(|_| Failure::hang_up())?;
    match acceptor.accept(tcp).await {
        Ok(tls) => Ok(ClientStream::Tls(Box::new(tls))),
        Err(e) => {
            tracing::info!(error = %e, "TLS handshake failed");
            Err(Failure::hang_up())
        }
    }
}

async fn login(
    shared: &Shared,
    mut stream: ClientStream,
    minor: u16,
    mut params: Vec<(String, String)>,
) -> Result<Opened, Failure> {
    let unsupported: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        let names: Vec<&str> = unsupported.iter().map(String::as_str).collect();
        negotiate_protocol_version(&mut out, 0, &names);
        stream.write_all(&out).await.map_err(|_| Failure::hang_up())?;
        params.retain(|(k, _)| !k.starts_with("_pq_."));
    }
    let take = |params: &mut Vec<(String, String)>, key: &str| {
        let at = params.iter().position(|(k, _)| k == key)?;
        Some(params.remove(at).1)
    };
    let Some(user_name) = take(&mut params, "user").filter(|u| !u.is_empty()) else {
        return Err(Failure::fatal(
            stream,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        ));
    };
    let db_name = take(&mut params, "database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user_name.clone());
    if params
        .iter()
        .any(|(k, v)| k == "replication" && v != "false" && v != "0" && v != "off")
    {
        return Err(Failure::fatal(
            stream,
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by dbproxy",
        ));
    }
    let db = if db_name == ADMIN_DATABASE {
        None
    } else {
        match shared.live().databases.get(&db_name) {
            Some(_) if shared.is_disabled(&db_name) => {
                return Err(Failure::fatal(
                    stream,
                    SqlState::CANNOT_CONNECT_NOW,
                    format!("database \"{db_name}\" is disabled in dbproxy"),
                ));
            }
            Some(db) => Some(db.clone()),
            None => {
                return Err(Failure::fatal(
                    stream,
                    SqlState::INVALID_CATALOG_NAME,
                    format!("database \"{db_name}\" does not exist in dbproxy"),
                ));
            }
        }
    };
    let Some(user) = shared.live().users.get(&user_name).cloned() else {
        return Err(Failure::fatal(
            stream,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("user \"{user_name}\" is not configured in dbproxy"),
        ));
    };
    if let Err(e) = authenticate(&mut stream, &user).await {
        return Err(match e {
            AuthFailure::Gone => Failure::hang_up(),
            AuthFailure::Refused(code, message) => Failure::fatal(stream, code, message),
        });
    }
    let target = match db {
        Some(db) => Target::Database(db),
        None if shared.live().config.proxy.admin_users.contains(&user.name) => Target::Admin,
        None => {
            return Err(Failure::fatal(
                stream,
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("user \"{}\" is not allowed to use the admin console", user.name),
            ));
        }
    };
    Ok(Opened {
        stream,
        target,
        user,
        params,
    })
}

enum AuthFailure {
    Gone,
    Refused(SqlState, String),
}

/// Runs the SCRAM-SHA-256 exchange for `user`.
async fn authenticate(stream: &mut ClientStream, user: &User) -> Result<(), AuthFailure> {
    let mut out = BytesMut::new();
    authentication_sasl(&mut out, &[scram::MECHANISM]);
    stream.write_all(&out).await.map_err(|_| AuthFailure::Gone)?;
    let mut buf = BytesMut::with_capacity(512);
    let mut scanner = Scanner::new(MAX_STARTUP_LEN);
    let first = read_password_message(stream, &mut buf, &mut scanner).await?;
    let initial = parse_sasl_initial_response(&first).ok_or_else(|| malformed("invalid SASLInitialResponse"))?;
    if initial.mechanism != scram::MECHANISM {
        return Err(AuthFailure::Refused(
            SqlState::PROTOCOL_VIOLATION,
            "client selected an invalid SASL authentication mechanism".to_owned(),
        ));
    }
    let (exchange, server_first) =
        ScramExchange::start(&user.secret, initial.data).map_err(|e| scram_failure(e, user))?;
    out.clear();
    authentication_sasl_continue(&mut out, server_first.as_bytes());
    stream.write_all(&out).await.map_err(|_| AuthFailure::Gone)?;
    let last = read_password_message(stream, &mut buf, &mut scanner).await?;
    let server_final = exchange.finish(&last).map_err(|e| scram_failure(e, user))?;
    if !buf.is_empty() {
        return Err(malformed("unexpected data after the SASL response"));
    }
    out.clear();
    authentication_sasl_final(&mut out, server_final.as_bytes());
    stream.write_all(&out).await.map_err(|_| AuthFailure::Gone)
}

fn malformed(what: &str) -> AuthFailure {
    AuthFailure::Refused(SqlState::PROTOCOL_VIOLATION, format!("malformed SCRAM message: {what}"))
}

fn scram_failure(e: ScramError, user: &User) -> AuthFailure {
    match e {
        ScramError::InvalidProof => AuthFailure::Refused(
            SqlState::INVALID_PASSWORD,
            format!("password authentication failed for user \"{}\"", user.name),
        ),
        other => AuthFailure::Refused(SqlState::PROTOCOL_VIOLATION, other.to_string()),
    }
}

/// Reads one `p` message body, bounded by the startup size limit.
async fn read_password_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    scanner: &mut Scanner,
) -> Result<BytesMut, AuthFailure> {
    loop {
        match scanner.next(buf, |_| true) {
            Ok(Some(Item::Whole { tag: PASSWORD_TAG, len })) => {
                let mut msg = buf.split_to(len);
                msg.advance(5);
                return Ok(msg);
            }
            Ok(Some(Item::Whole { tag, .. })) => {
                return Err(AuthFailure::Refused(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("expected SASL response, got message type {:?}", char::from(tag)),
                ));
            }
            Ok(Some(_)) | Ok(None) => fill(stream, buf).await.map_err(|_| AuthFailure::Gone)?,
            Err(e) => return Err(AuthFailure::Refused(SqlState::PROTOCOL_VIOLATION, e.to_string())),
        }
    }
}
