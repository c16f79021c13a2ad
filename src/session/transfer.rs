//! The main loop of a logged-in client: forwards raw frames between the client
//! and the server connection it holds, and decides when to hold one.
//!
//! Both directions go through bounded buffers, and the loop waits on client
//! reads, server reads and writes to either side at once, so neither peer can
//! stall the other (a pipelining client, a large COPY, a big result) and memory
//! stays bounded. Frames are not decoded on the way through except for the few
//! fields that drive pooling: message tags, and the status of ReadyForQuery.
//!
//! In transaction mode a server connection is checked out when a message that
//! needs one arrives and checked back in once every Query/Sync sent has been
//! answered by a ReadyForQuery whose status is idle; in session mode it is kept
//! until the client leaves.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{ReadHalf as ServerRead, WriteHalf as ServerWrite};
use tokio::sync::watch;

use super::cancel::{CancelSlot, Registration};
use super::startup::Opened;
use super::{ClientStream, send_fatal};
use crate::config::PoolMode;
use crate::pool::{Checkout, CheckoutError, Pool, Role};
use crate::protocol::backend::{
    ErrorFields, authentication_ok, backend_key_data, error_response, parameter_status, ready_for_query,
};
use crate::protocol::{FrameError, Item, Scanner, SqlState, TransactionStatus};
use crate::proxy::Shared;
use crate::server_conn::ServerParams;

/// Above this many buffered bytes a direction stops reading until it drains.
const HIGH_WATER: usize = 256 * 1024;
/// Spare capacity made available for each read.
const READ_RESERVE: usize = 16 * 1024;
/// Longest a rollback or reset of a returned connection may take.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Client messages returned whole; CopyData streams through.
fn whole_frontend(tag: u8) -> bool {
    tag != b'd'
}

/// Server messages returned whole; rows and CopyData stream through.
fn whole_backend(tag: u8) -> bool {
    !matches!(tag, b'D' | b'd')
}

/// What the client is doing, as far as server connections are concerned.
enum Phase {
    /// No server connection held.
    Idle,
    /// Holding a server connection.
    Attached(Attached),
    /// A request failed in the proxy before reaching a server: drop messages
    /// until Sync, then report ReadyForQuery, as PostgreSQL does after an error
    /// in the extended protocol.
    SkipToSync,
}

struct Attached {
    conn: Checkout,
    /// Queries, Syncs and FunctionCalls sent and not yet answered by ReadyForQuery.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Status of the last ReadyForQuery.
    status: TransactionStatus,
}

impl Attached {
    /// Nothing sent is awaiting an answer.
    fn quiet(&self) -> bool {
        self.pending == 0 && !self.unsynced
    }
}

/// Why the main loop ended.
enum Exit {
    /// The client closed its connection.
    ClientLeft,
    /// The client sent Terminate.
    Terminated,
    /// Tell the client this, then hang up.
    Fatal(ErrorFields),
    /// Hang up without a word: the stream to the client is mid-message.
    Abort,
}

enum Event {
    ClientRead(io::Result<usize>),
    ServerRead(io::Result<usize>),
    ClientWrote(io::Result<usize>),
    ServerWrote(io::Result<usize>),
    Shutdown,
}

struct Conn<'a> {
    shared: &'a Shared,
    mode: PoolMode,
    pool: Arc<Pool>,
    slot: &'a CancelSlot,
    rd: ReadHalf<ClientStream>,
    wr: WriteHalf<ClientStream>,
    shutdown: watch::Receiver<bool>,
    cbuf: BytesMut,
    cscan: Scanner,
    /// Whether the streamed client message in progress goes to the server.
    stream_to_server: bool,
    sbuf: BytesMut,
    sscan: Scanner,
    to_client: BytesMut,
    to_server: BytesMut,
    phase: Phase,
    release_due: bool,
    draining: bool,
}

/// Greets a logged-in client and serves it until it leaves.
pub(super) async fn run(shared: &Arc<Shared>, opened: Opened, registration: &Registration<'_>) {
    let Opened {
        stream,
        db,
        user,
        params,
    } = opened;
    let pool = shared.pool(&db, &user, Role::Primary, &db.primary);
    let mut to_client = BytesMut::with_capacity(1024);
    authentication_ok(&mut to_client);
    let app_name = params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.as_str());
    for (name, value) in server_params(shared, &pool).await.iter() {
        let value = match name.as_str() {
            "application_name" => app_name.unwrap_or(""),
            _ => value.as_str(),
        };
        parameter_status(&mut to_client, name, value);
    }
    backend_key_data(&mut to_client, registration.process_id, registration.secret_key);
    ready_for_query(&mut to_client, TransactionStatus::Idle);
    let (rd, wr) = tokio::io::split(stream);
    let max = shared.config.proxy.max_message_size;
    let mut conn = Conn {
        shared,
        mode: shared.config.pool.mode,
        pool,
        slot: &registration.slot,
        rd,
        wr,
        shutdown: shared.shutdown.clone(),
        cbuf: BytesMut::new(),
        cscan: Scanner::new(max),
        stream_to_server: false,
        sbuf: BytesMut::new(),
        sscan: Scanner::new(max),
        to_client,
        to_server: BytesMut::new(),
        phase: Phase::Idle,
        release_due: false,
        draining: false,
    };
    let exit = conn.serve().await;
    conn.finish(exit).await;
}

/// The ParameterStatus set shown at login: what the servers last reported,
/// without needing a server at this moment once one was ever reached.
async fn server_params(shared: &Shared, pool: &Arc<Pool>) -> ServerParams {
    if let Some(p) = pool.server_params() {
        return p;
    }
    match pool.checkout(shared.config.pool.checkout_timeout).await {
        Ok(conn) => {
            let params = conn.conn.params.clone();
            conn.checkin();
            params
        }
        Err(e) => {
            tracing::warn!(error = %e, "no server reachable at login; reporting default parameters");
            Arc::new(
                [
                    ("server_version", "15.0"),
                    ("server_encoding", "UTF8"),
                    ("client_encoding", "UTF8"),
                    ("DateStyle", "ISO, MDY"),
                    ("IntervalStyle", "postgres"),
                    ("TimeZone", "UTC"),
                    ("integer_datetimes", "on"),
                    ("standard_conforming_strings", "on"),
                    ("application_name", ""),
                ]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            )
        }
    }
}

fn shutdown_error() -> ErrorFields {
    ErrorFields::fatal(
        SqlState::ADMIN_SHUTDOWN,
        "terminating connection because dbproxy is shutting down",
    )
}

/// The message of an ErrorResponse body whose severity is FATAL or PANIC.
fn fatal_message(body: &[u8]) -> Option<String> {
    let mut fatal = false;
    let mut message = None;
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'S' | b'V', sev)) => fatal |= sev == b"FATAL" || sev == b"PANIC",
            Some((b'M', m)) => message = Some(String::from_utf8_lossy(m).into_owned()),
            _ => {}
        }
    }
    fatal.then(|| message.unwrap_or_else(|| "server reported a fatal error".to_owned()))
}

/// Resolves once a graceful shutdown has begun.
async fn shutdown_started(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&s| s).await;
}

async fn read_server(half: Option<ServerRead<'_>>, buf: &mut BytesMut) -> io::Result<usize> {
    match half {
        Some(mut r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_server(half: Option<ServerWrite<'_>>, buf: &[u8]) -> io::Result<usize> {
    match half {
        Some(mut w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

impl Conn<'_> {
    async fn serve(&mut self) -> Exit {
        loop {
            if let Err(exit) = self.process_server().await {
                return exit;
            }
            if self.release_due {
                self.release_due = false;
                self.detach().await;
                if self.draining {
                    return Exit::Fatal(shutdown_error());
                }
            }
            if let Err(exit) = self.process_client().await {
                return exit;
            }
            if let Err(exit) = self.wait().await {
                return exit;
            }
        }
    }

    /// Waits for the next I/O event and applies it to the buffers.
    async fn wait(&mut self) -> Result<(), Exit> {
        let want_client = self.cbuf.len() < HIGH_WATER || self.cscan.bytes_wanted(&self.cbuf) > 0;
        let want_server = self.to_client.len() < HIGH_WATER;
        if want_client {
            self.cbuf.reserve(READ_RESERVE);
        }
        let (srd, swr) = match &mut self.phase {
            Phase::Attached(a) => {
                self.sbuf.reserve(READ_RESERVE);
                let (r, w) = a.conn.conn.stream.split();
                (Some(r), Some(w))
            }
            _ => (None, None),
        };
        let draining = self.draining;
        let event = tokio::select! {
            r = self.rd.read_buf(&mut self.cbuf), if want_client => Event::ClientRead(r),
            r = read_server(srd, &mut self.sbuf), if want_server => Event::ServerRead(r),
            r = self.wr.write(&self.to_client), if !self.to_client.is_empty() => Event::ClientWrote(r),
            r = write_server(swr, &self.to_server), if !self.to_server.is_empty() => Event::ServerWrote(r),
            _ = shutdown_started(&mut self.shutdown), if !draining => Event::Shutdown,
        };
        match event {
            Event::ClientRead(Ok(0) | Err(_)) | Event::ClientWrote(Ok(0) | Err(_)) => Err(Exit::ClientLeft),
            Event::ClientRead(Ok(_)) => Ok(()),
            Event::ClientWrote(Ok(n)) => {
                self.to_client.advance(n);
                if self.to_client.is_empty() {
                    self.to_client.clear();
                    self.wr.flush().await.map_err(|_| Exit::ClientLeft)?;
                }
                Ok(())
            }
            Event::ServerRead(Ok(0)) => self.server_lost("server closed the connection").await,
            Event::ServerRead(Err(e)) | Event::ServerWrote(Err(e)) => self.server_lost(&e.to_string()).await,
            Event::ServerRead(Ok(_)) => Ok(()),
            Event::ServerWrote(Ok(n)) => {
                self.to_server.advance(n);
                Ok(())
            }
            Event::Shutdown => {
                self.draining = true;
                match &self.phase {
                    Phase::Attached(a) if !(a.quiet() && a.status == TransactionStatus::Idle) => Ok(()),
                    _ => Err(Exit::Fatal(shutdown_error())),
                }
            }
        }
    }

    /// Moves complete server output towards the client, tracking
    /// ReadyForQuery to know when the server connection can be released.
    async fn process_server(&mut self) -> Result<(), Exit> {
        let Phase::Attached(a) = &mut self.phase else {
            return Ok(());
        };
        let mut pos = 0;
        let mut broken = None;
        loop {
            match self.sscan.next(&self.sbuf[pos..], whole_backend) {
                Ok(None) => break,
                Ok(Some(Item::Whole { tag: b'Z', len })) => {
                    let status = match (
                        len,
                        self.sbuf.get(pos + 5).copied().and_then(TransactionStatus::from_byte),
                    ) {
                        (6, Some(s)) => s,
                        _ => {
                            broken = Some("server broke the protocol: invalid ReadyForQuery".to_owned());
                            break;
                        }
                    };
                    pos += len;
                    a.status = status;
                    a.pending = a.pending.saturating_sub(1);
                    let idle = a.quiet() && status == TransactionStatus::Idle;
                    if idle && (self.mode == PoolMode::Transaction || self.draining) {
                        self.release_due = true;
                        break;
                    }
                }
                Ok(Some(Item::Whole { tag: b'E', len })) => {
                    if let Some(message) = fatal_message(&self.sbuf[pos + 5..pos + len]) {
                        // The server is about to hang up; the client's proxy connection is fine.
                        broken = Some(message);
                        break;
                    }
                    pos += len;
                }
                Ok(Some(item)) => pos += item.len(),
                Err(e) => {
                    broken = Some(format!("server broke the protocol: {e}"));
                    break;
                }
            }
        }
        if pos > 0 {
            if self.to_client.is_empty() && pos == self.sbuf.len() {
                std::mem::swap(&mut self.to_client, &mut self.sbuf);
            } else {
                self.to_client.extend_from_slice(&self.sbuf[..pos]);
                self.sbuf.advance(pos);
            }
        }
        match broken {
            Some(why) => self.server_lost(&why).await,
            None => Ok(()),
        }
    }

    /// Handles every complete client message that can be handled now.
    async fn process_client(&mut self) -> Result<(), Exit> {
        while self.to_server.len() < HIGH_WATER {
            let item = match self.cscan.next(&self.cbuf, whole_frontend) {
                Ok(Some(item)) => item,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
                        FrameError::BadLength { .. } => SqlState::PROTOCOL_VIOLATION,
                    };
                    let hint = "raise proxy.max_message_size if messages this large are expected";
                    return Err(Exit::Fatal(ErrorFields::fatal(code, e.to_string()).with_hint(hint)));
                }
            };
            match item {
                Item::Whole { tag, len } => self.on_message(tag, len).await?,
                Item::Head { .. } => {
                    // CopyData: it belongs to the server only while one is held.
                    self.stream_to_server = matches!(self.phase, Phase::Attached(_));
                    self.forward_client_bytes(item.len());
                }
                Item::Body(n) => self.forward_client_bytes(n),
            }
        }
        Ok(())
    }

    fn forward_client_bytes(&mut self, n: usize) {
        if self.stream_to_server && matches!(self.phase, Phase::Attached(_)) {
            self.to_server.extend_from_slice(&self.cbuf[..n]);
        }
        self.cbuf.advance(n);
    }

    /// Handles one whole client message of `len` bytes at the front of `cbuf`.
    async fn on_message(&mut self, tag: u8, len: usize) -> Result<(), Exit> {
        match tag {
            b'X' => return Err(Exit::Terminated),
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'c' | b'f' => {}
            _ => {
                return Err(Exit::Fatal(ErrorFields::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("invalid frontend message type {}", tag),
                )));
            }
        }
        match self.phase {
            Phase::SkipToSync => {
                if tag == b'S' {
                    ready_for_query(&mut self.to_client, TransactionStatus::Idle);
                    self.phase = Phase::Idle;
                }
                self.cbuf.advance(len);
                return Ok(());
            }
            Phase::Idle => {
                match tag {
                    // A Sync with nothing before it: answer for the idle server.
                    b'S' => ready_for_query(&mut self.to_client, TransactionStatus::Idle),
                    // Nothing to flush; COPY messages outside COPY are ignored, as PostgreSQL does.
                    b'H' | b'c' | b'f' => {}
                    _ if self.draining => return Err(Exit::Fatal(shutdown_error())),
                    _ => {
                        if let Err(e) = self.attach().await? {
                            self.report_checkout_failure(tag, &e);
                        }
                    }
                }
                if !matches!(self.phase, Phase::Attached(_)) {
                    self.cbuf.advance(len);
                    return Ok(());
                }
            }
            Phase::Attached(_) => {}
        }
        if let Phase::Attached(a) = &mut self.phase {
            match tag {
                b'Q' | b'F' => a.pending += 1,
                b'S' => {
                    a.pending += 1;
                    a.unsynced = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => a.unsynced = true,
                _ => {}
            }
            self.to_server.extend_from_slice(&self.cbuf[..len]);
        }
        self.cbuf.advance(len);
        Ok(())
    }

    /// Checks out a server connection for the client. The outer error means
    /// the client left while we flushed its pending output.
    async fn attach(&mut self) -> Result<Result<(), CheckoutError>, Exit> {
        // Do not hold back output the client may be waiting for while we wait for a server.
        if !self.to_client.is_empty() {
            self.wr.write_all(&self.to_client).await.map_err(|_| Exit::ClientLeft)?;
            self.wr.flush().await.map_err(|_| Exit::ClientLeft)?;
            self.to_client.clear();
        }
        let conn = match self.pool.checkout(self.shared.config.pool.checkout_timeout).await {
            Ok(conn) => conn,
            Err(e) => return Ok(Err(e)),
        };
        self.slot.set(conn.conn.cancel_key()).await;
        self.phase = Phase::Attached(Attached {
            conn,
            pending: 0,
            unsynced: false,
            status: TransactionStatus::Idle,
        });
        Ok(Ok(()))
    }

    /// The request that needed a server fails; the client stays connected.
    fn report_checkout_failure(&mut self, tag: u8, e: &CheckoutError) {
        tracing::warn!(error = %e, "no server connection for the client's request");
        let code = match e {
            CheckoutError::Timeout { .. } => SqlState::QUERY_CANCELED,
            CheckoutError::Connect(se) => se.sqlstate(),
        };
        error_response(&mut self.to_client, &ErrorFields::error(code, e.to_string()));
        match tag {
            b'Q' | b'F' | b'S' => ready_for_query(&mut self.to_client, TransactionStatus::Idle),
            _ => self.phase = Phase::SkipToSync,
        }
    }

    /// Gives the server connection back (or closes it if it is not clean).
    async fn detach(&mut self) {
        let Phase::Attached(a) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        self.slot.clear().await;
        let clean = a.quiet() && self.sbuf.is_empty() && self.to_server.is_empty() && self.sscan.at_boundary();
        self.sbuf.clear();
        self.to_server.clear();
        self.sscan = Scanner::new(self.shared.config.proxy.max_message_size);
        if clean {
            self.retire(a);
        } else {
            // Closing alone would leave the backend running until it next writes.
            tracing::debug!(server = %a.conn.conn.addr, "cancelling and closing a server connection left mid-request");
            tokio::spawn(a.conn.abandon(self.shared.config.pool.server_connect_timeout));
        }
    }

    /// Returns a quiet connection to its pool, first rolling back an open
    /// transaction and, in session mode, running the reset query.
    fn retire(&self, a: Attached) {
        let rollback = a.status != TransactionStatus::Idle;
        let reset = (self.mode == PoolMode::Session).then(|| self.shared.config.pool.server_reset_query.clone());
        if !rollback && reset.as_deref().is_none_or(str::is_empty) {
            a.conn.checkin();
            return;
        }
        let mut conn = a.conn;
        tokio::spawn(async move {
            let work = async {
                let mut status = TransactionStatus::Idle;
                if rollback {
                    status = conn.conn.run_discarding("ROLLBACK").await?;
                }
                if let Some(q) = reset.filter(|q| !q.is_empty()) {
                    status = conn.conn.run_discarding(&q).await?;
                }
                Ok::<_, io::Error>(status)
            };
            match tokio::time::timeout(RETIRE_TIMEOUT, work).await {
                Ok(Ok(TransactionStatus::Idle)) => conn.checkin(),
                outcome => {
                    tracing::info!(?outcome, server = %conn.conn.addr, "closing server connection that could not be reset")
                }
            }
        });
    }

    /// The server connection failed. The client learns of it; what it was
    /// doing decides whether it can go on.
    async fn server_lost(&mut self, why: &str) -> Result<(), Exit> {
        let Phase::Attached(a) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Ok(());
        };
        let Attached {
            conn,
            pending,
            unsynced,
            status,
        } = a;
        let addr = conn.conn.addr.clone();
        tracing::warn!(server = %addr, reason = why, "server connection lost");
        self.slot.clear().await;
        drop(conn);
        let mid_message = !self.sscan.at_boundary();
        self.sbuf.clear();
        self.to_server.clear();
        self.sscan = Scanner::new(self.shared.config.proxy.max_message_size);
        if mid_message {
            return Err(Exit::Abort);
        }
        let message = format!("server connection to {addr} was lost: {why}");
        if self.mode == PoolMode::Session || status != TransactionStatus::Idle || (pending == 0 && !unsynced) {
            // Session state or an open transaction is gone: the client must start over.
            return Err(Exit::Fatal(ErrorFields::fatal(SqlState::CONNECTION_FAILURE, message)));
        }
        let err = ErrorFields::error(SqlState::CONNECTION_FAILURE, message);
        for _ in 0..pending {
            error_response(&mut self.to_client, &err);
            ready_for_query(&mut self.to_client, TransactionStatus::Idle);
        }
        if unsynced {
            error_response(&mut self.to_client, &err);
            self.phase = Phase::SkipToSync;
        }
        Ok(())
    }

    /// Ends the session: settles the server connection, tells the client why
    /// if there is something to tell, and closes.
    async fn finish(mut self, exit: Exit) {
        self.detach_on_exit().await;
        match exit {
            Exit::Fatal(err) => {
                let _ = self.wr.write_all(&self.to_client).await;
                send_fatal(&mut self.wr, &err).await;
            }
            Exit::Terminated | Exit::ClientLeft | Exit::Abort => {
                let _ = self.wr.shutdown().await;
            }
        }
    }

    async fn detach_on_exit(&mut self) {
        if matches!(self.phase, Phase::Attached(_)) {
            self.detach().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_are_recognised() {
        let body = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0";
        assert_eq!(
            fatal_message(body).as_deref(),
            Some("terminating connection due to administrator command")
        );
        assert_eq!(fatal_message(b"SERROR\0VERROR\0C42601\0Msyntax error\0\0"), None);
    }
}
