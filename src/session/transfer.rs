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
//! needs one arrives and checked back in once everything sent has been
//! answered (see `expect.rs`), the last ReadyForQuery says idle, and the client
//! holds no session-only feature; in session mode it is kept until the client
//! leaves. What the client sends is translated in `requests.rs`; giving the
//! server connection back or up is in `release.rs`.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::buffers::{IDLE_READ_RESERVE, READ_RESERVE, recycle, spare_buffer};
use super::cancel::{CancelSlot, Registration};
use super::expect::{Expectations, Synthetic, Verdict};
use super::greeting::{server_params, startup_settings, startup_values};
use super::restate::Restate;
use super::retry::{Retry, is_stale_plan};
use super::settings::Tracker;
use super::startup::{Opened, Target};
use super::statements::{Statements, Unnamed, forget_unparsed};
use super::stream::{ClientReader, ClientWriter};
use crate::clients::{ClientInfo, SIGNAL_KILL, SIGNAL_SHUTDOWN};
use crate::config::PoolMode;
use crate::pool::{Checkout, Pool, Role};
use crate::protocol::backend::{ErrorFields, authentication_ok, backend_key_data, parameter_status, ready_for_query};
use crate::protocol::extended::{close_complete, parse_complete};
use crate::protocol::{Item, Scanner, SqlState, TransactionStatus};
use crate::proxy::Shared;
use crate::router::health::ServerHealth;
use crate::router::{Router, WriteMark};
use crate::server_state::Settings;
use crate::server_stream::{ServerRead, ServerWrite};
use crate::sql::Pins;
use crate::stats::DbStats;

/// Above this many buffered bytes a direction stops reading until it drains.
pub(super) const HIGH_WATER: usize = 256 * 1024;
/// Client messages returned whole; CopyData streams through.
pub(super) fn whole_frontend(tag: u8) -> bool {
    tag != b'd'
}

/// Server messages returned whole; rows and CopyData stream through.
fn whole_backend(tag: u8) -> bool {
    !matches!(tag, b'D' | b'd')
}

/// What the client is doing, as far as server connections are concerned.
// One per session and never moved in bulk; boxing `Attached` would cost an
// allocation per transaction.
#[allow(clippy::large_enum_variant)]
pub(super) enum Phase {
    /// No server connection held.
    Idle,
    /// Holding a server connection.
    Attached(Attached),
    /// A request failed in the proxy before reaching a server: drop messages
    /// until Sync, then report ReadyForQuery, as PostgreSQL does after an error
    /// in the extended protocol.
    SkipToSync,
}

pub(super) struct Attached {
    pub(super) conn: Checkout,
    /// What the server is to this client's database.
    pub(super) role: Role,
    /// Something that may write was sent (then read-your-writes records the
    /// primary's WAL position when the transaction ends).
    pub(super) wrote: bool,
    /// Extended-protocol messages sent since the last Sync.
    pub(super) unsynced: bool,
    /// Status of the last ReadyForQuery.
    pub(super) status: TransactionStatus,
    /// When the server connection was taken.
    pub(super) since: Instant,
    /// Which replica it is (`None`: the primary), for its health.
    pub(super) replica: Option<usize>,
    /// Last time bytes moved to or from the server.
    pub(super) server_io: Instant,
    /// Spare capacity to make available for the next server read.
    pub(super) read_reserve: usize,
    /// Inside a transaction block: when the client last had all its output
    /// (with `server_io`, where its idle time starts).
    pub(super) delivered: Instant,
}

/// Why the main loop ended.
pub(super) enum Exit {
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
    Killed,
    /// A server of the client's database stopped answering health checks
    /// (perhaps the one it waits on).
    ServerStuck,
    /// The client stayed idle inside a transaction for
    /// `pool.idle_transaction_timeout`.
    IdleInTransaction,
}

pub(super) struct Conn<'a> {
    pub(super) shared: &'a Shared,
    pub(super) mode: PoolMode,
    pub(super) pool: Arc<Pool>,
    /// PAUSE of the client's database (the same sender across reloads).
    pub(super) paused: Option<Arc<tokio::sync::watch::Sender<bool>>>,
    pub(super) slot: &'a CancelSlot,
    rd: ClientReader,
    pub(super) wr: ClientWriter,
    pub(super) cbuf: BytesMut,
    pub(super) cscan: Scanner,
    /// Whether the streamed client message in progress goes to the server.
    pub(super) stream_to_server: bool,
    pub(super) sbuf: BytesMut,
    pub(super) sscan: Scanner,
    /// The streamed server message in progress answers the proxy: drop it.
    swallow_stream: bool,
    pub(super) to_client: BytesMut,
    pub(super) to_server: BytesMut,
    pub(super) phase: Phase,
    release_due: bool,
    pub(super) draining: bool,
    /// Answers owed by the server connection held.
    pub(super) expect: Expectations,
    /// The client's named prepared statements, by its names.
    pub(super) statements: Statements,
    /// The client's unnamed prepared statement.
    pub(super) unnamed: Unnamed,
    /// The client's session settings, carried to each server connection.
    pub(super) settings: Settings,
    /// A `client_encoding` change was sent and is not settled yet (its
    /// transaction is open, or its answer owed): text is read as if the
    /// encoding might end characters with a backslash's byte.
    pub(super) encoding_unsettled: bool,
    /// The `client_encoding` the servers start sessions with (the role's or
    /// database's) may end characters with a backslash's byte: it applies
    /// while the client sets none.
    pub(super) default_backslash_trail: bool,
    /// Its settings from the startup packet (what RESET returns to).
    pub(super) startup: Settings,
    /// Its own values, told again after a RESET.
    pub(super) restate: Restate,
    pub(super) tracker: Tracker,
    /// Session-only features that tie the client to its server connection.
    pub(super) pins: Pins,
    /// Read/write splitting is on for this client.
    pub(super) split: bool,
    pub(super) router: Arc<Router>,
    /// Pools of the database's replicas, in configuration order.
    pub(super) replica_pools: Vec<Arc<Pool>>,
    /// Where the client's last write is, for read-your-writes.
    pub(super) mark: Arc<WriteMark>,
    /// Extended-protocol messages held until Sync or Flush decides the server.
    pub(super) staged: Vec<(u8, BytesMut)>,
    /// Bytes in `staged`.
    pub(super) staged_bytes: usize,
    /// Traffic counters of the client's database.
    pub(super) stats: Arc<DbStats>,
    /// When the oldest request not yet answered by ReadyForQuery was sent.
    pub(super) request_started: Option<Instant>,
    /// This client in the registry (SHOW CLIENTS, KILL).
    pub(super) me: Arc<ClientInfo>,
    /// The tail of the current extended batch, kept in case a stale plan
    /// makes it worth sending again.
    pub(super) retry: Retry,
}

/// Greets a logged-in client and serves it until it leaves.
pub(super) async fn run(shared: &Arc<Shared>, opened: Opened, registration: &Registration<'_>, me: &Arc<ClientInfo>) {
    let Opened {
        stream,
        target,
        user,
        params,
    } = opened;
    let Target::Database(db) = target else {
        return;
    };
    let startup_values = startup_values(&params);
    let startup = startup_settings(&startup_values);
    let pool = shared.pool(&db, &user, Role::Primary, &db.primary);
    let replica_pools: Vec<Arc<Pool>> = db
        .replicas
        .iter()
        .map(|a| shared.pool(&db, &user, Role::Replica, a))
        .collect();
    // The snapshot is not kept: a session holds only its own database's
    // router (which keeps that router's watch running after a reload).
    let (router, split) = {
        let live = shared.snapshot();
        let router = live
            .routers
            .get(&db.name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Router::new(0)));
        let split = live.config.routing.read_write_split
            && live.config.pool.mode == PoolMode::Transaction
            && !replica_pools.is_empty();
        (router, split)
    };
    let mut to_client = BytesMut::with_capacity(1024);
    authentication_ok(&mut to_client);
    // What the servers report, except where the client's startup packet
    // asked for its own value (applied on every server it uses).
    let candidates: Vec<&Arc<Pool>> = std::iter::once(&pool).chain(replica_pools.iter()).collect();
    let mut default_backslash_trail = false;
    let shown = Box::pin(server_params(shared, &candidates)).await;
    for (name, value) in shown.iter() {
        if name == "client_encoding" {
            // The role's or database's, where the client sets none.
            default_backslash_trail = crate::sql::encoding::backslash_trail(value);
        }
        let own = params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let value = match (name.as_str(), own) {
            (_, Some(v)) => v,
            ("application_name", None) => "",
            (_, None) => value.as_str(),
        };
        parameter_status(&mut to_client, name, value);
    }
    backend_key_data(&mut to_client, registration.process_id, registration.secret_key);
    ready_for_query(&mut to_client, TransactionStatus::Idle);
    let (rd, wr) = stream.into_split();
    let max = shared.live().config.proxy.max_message_size;
    // The registry entry exists already: a shutdown that began before it
    // did is seen here, one that begins after it signals the entry.
    if *shared.shutdown.borrow() {
        me.signal(SIGNAL_SHUTDOWN);
    }
    let mut conn = Conn {
        shared,
        mode: shared.live().config.pool.mode,
        pool,
        paused: shared.live().paused.get(&db.name).cloned(),
        slot: &registration.slot,
        rd,
        wr,
        cbuf: BytesMut::new(),
        cscan: Scanner::new(max),
        stream_to_server: false,
        sbuf: BytesMut::new(),
        sscan: Scanner::new(max),
        swallow_stream: false,
        to_client,
        to_server: BytesMut::new(),
        phase: Phase::Idle,
        release_due: false,
        draining: false,
        expect: Expectations::default(),
        statements: Statements::default(),
        unnamed: Unnamed::default(),
        encoding_unsettled: false,
        default_backslash_trail,
        settings: startup.clone(),
        startup,
        restate: Restate::new(&startup_values, shown),
        tracker: Tracker::default(),
        pins: Pins::default(),
        split,
        router,
        replica_pools,
        mark: Arc::new(WriteMark::default()),
        staged: Vec::new(),
        staged_bytes: 0,
        stats: shared.live().stats.get(&db.name).cloned().unwrap_or_default(),
        request_started: None,
        me: me.clone(),
        retry: Retry::default(),
    };
    let exit = conn.serve().await;
    Box::pin(conn.finish(exit)).await;
}

pub(super) fn shutdown_error() -> ErrorFields {
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

async fn read_server(half: Option<ServerRead<'_>>, buf: &mut BytesMut) -> io::Result<usize> {
    match half {
        Some(mut r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Resolves at `deadline`, if there is one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
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
            if self.retry.due
                && let Err(exit) = self.send_batch_again().await
            {
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

    /// Nothing sent to the server is waiting for an answer.
    pub(super) fn quiet(&self, a: &Attached) -> bool {
        self.expect.is_empty() && !a.unsynced
    }

    /// What the health monitor knows of the held server.
    fn health(&self, a: &Attached) -> Option<&Arc<ServerHealth>> {
        match a.replica {
            Some(i) => self.router.replicas.get(i),
            None => Some(&self.router.primary),
        }
    }

    /// Waits for the next I/O event and applies it to the buffers.
    async fn wait(&mut self) -> Result<(), Exit> {
        let want_client = self.cbuf.len() < HIGH_WATER || self.cscan.bytes_wanted(&self.cbuf) > 0;
        let want_server = self.to_client.len() < HIGH_WATER;
        if want_client {
            let idle = matches!(self.phase, Phase::Idle) && self.cbuf.is_empty();
            let spare = self.cbuf.capacity() - self.cbuf.len();
            if idle {
                self.cbuf.reserve(IDLE_READ_RESERVE);
            } else if spare < IDLE_READ_RESERVE / 2 {
                // Grow only when small requests no longer fit (COPY data, big batches).
                self.cbuf.reserve(READ_RESERVE);
            }
        }
        // Idle in a transaction: everything answered and delivered, nothing
        // more from the client. Counted from the answer that ended its last
        // request, or from when the client had all of it if that was later.
        let idle_deadline = match &self.phase {
            Phase::Attached(a)
                if a.status != TransactionStatus::Idle
                    && self.quiet(a)
                    && self.cbuf.is_empty()
                    && self.to_server.is_empty()
                    && self.to_client.is_empty() =>
            {
                let limit = self.shared.live().config.pool.idle_transaction_timeout;
                match limit.is_zero() {
                    true => None,
                    // Too far to represent: never.
                    false => a.server_io.max(a.delivered).checked_add(limit),
                }
            }
            _ => None,
        };
        let (srd, mut swr) = match &mut self.phase {
            Phase::Attached(a) => {
                if self.sbuf.capacity() == 0 {
                    self.sbuf = spare_buffer();
                }
                self.sbuf.reserve(a.read_reserve);
                let (r, w) = a.conn.conn.stream.split();
                (Some(r), Some(w))
            }
            _ => (None, None),
        };
        // Output is written at once when the socket takes it, as it nearly
        // always does: a round through the select below polls every source.
        let eager = match (srd.is_some(), self.to_server.is_empty(), self.to_client.is_empty()) {
            (true, false, _) => swr.as_mut().and_then(|w| match w.try_write(&self.to_server) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                r => Some(Event::ServerWrote(r)),
            }),
            (_, _, false) => {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::pin::Pin::new(&mut self.wr).poll_write(&mut cx, &self.to_client) {
                    std::task::Poll::Ready(r) => Some(Event::ClientWrote(r)),
                    std::task::Poll::Pending => None,
                }
            }
            _ => None,
        };
        let event = match eager {
            Some(event) => event,
            // Unbiased (a random first branch each turn), so neither peer can
            // keep the other's input or output waiting while it streams.
            None => tokio::select! {
                signals = self.me.signalled() => match signals {
                    s if s & SIGNAL_KILL != 0 => Event::Killed,
                    s if s & SIGNAL_SHUTDOWN != 0 => Event::Shutdown,
                    _ => Event::ServerStuck,
                },
                r = self.wr.write(&self.to_client), if !self.to_client.is_empty() => Event::ClientWrote(r),
                r = write_server(swr, &self.to_server), if !self.to_server.is_empty() => Event::ServerWrote(r),
                r = read_server(srd, &mut self.sbuf), if want_server => Event::ServerRead(r),
                r = self.rd.read_buf(&mut self.cbuf), if want_client => Event::ClientRead(r),
                _ = until(idle_deadline), if idle_deadline.is_some() => Event::IdleInTransaction,
            },
        };
        match event {
            Event::ClientRead(Ok(0) | Err(_)) | Event::ClientWrote(Ok(0) | Err(_)) => Err(Exit::ClientLeft),
            Event::ClientRead(Ok(n)) => {
                self.stats
                    .received
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Event::ClientWrote(Ok(n)) => {
                self.stats
                    .sent
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                self.to_client.advance(n);
                if self.to_client.is_empty() {
                    self.to_client.clear();
                    match &mut self.phase {
                        // It may be a whole server read buffer (swapped in by process_server).
                        Phase::Idle => recycle(&mut self.to_client),
                        // A slow reader's idle time starts once it has everything.
                        Phase::Attached(a) if a.status != TransactionStatus::Idle => a.delivered = Instant::now(),
                        _ => {}
                    }
                    self.wr.flush().await.map_err(|_| Exit::ClientLeft)?;
                }
                Ok(())
            }
            Event::ServerRead(Ok(0)) | Event::ServerWrote(Ok(0)) => {
                self.server_lost("server closed the connection").await
            }
            Event::ServerRead(Err(e)) | Event::ServerWrote(Err(e)) => self.server_lost(&e.to_string()).await,
            Event::ServerRead(Ok(n)) => {
                if let Phase::Attached(a) = &mut self.phase {
                    a.server_io = Instant::now();
                    if n >= a.read_reserve {
                        a.read_reserve = READ_RESERVE;
                    }
                }
                Ok(())
            }
            Event::ServerWrote(Ok(n)) => {
                self.to_server.advance(n);
                if let Phase::Attached(a) = &mut self.phase {
                    a.server_io = Instant::now();
                }
                Ok(())
            }
            Event::ServerStuck => {
                let limit = self.shared.live().config.routing.health_check_timeout;
                match &self.phase {
                    // Silence is the server's only while we read what it sends
                    // (not while a slow client holds its output back).
                    Phase::Attached(a)
                        if !self.quiet(a)
                            && want_server
                            && self.health(a).is_some_and(|h| h.is_stuck())
                            && a.server_io.elapsed() >= limit =>
                    {
                        let why = format!(
                            "server stopped responding (no answer for {limit:?}, and its health check timed out); \
                             a statement in flight outside a transaction may still take effect when it resumes"
                        );
                        self.server_gone(&why, true).await
                    }
                    _ => Ok(()),
                }
            }
            Event::IdleInTransaction => {
                tracing::info!(
                    "client idle in a transaction for longer than pool.idle_transaction_timeout: disconnecting it"
                );
                self.shared.errors.count("idle_transaction_timeout");
                Err(Exit::Fatal(ErrorFields::fatal(
                    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    "terminating connection due to idle-in-transaction timeout",
                )))
            }
            Event::Killed => Err(Exit::Fatal(ErrorFields::fatal(
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to KILL from the dbproxy admin console",
            ))),
            Event::Shutdown => {
                self.draining = true;
                match &self.phase {
                    Phase::Attached(a) if !(self.quiet(a) && a.status == TransactionStatus::Idle) => Ok(()),
                    _ => Err(Exit::Fatal(shutdown_error())),
                }
            }
        }
    }

    /// Moves server output towards the client: forwards what answers the
    /// client, drops what answers the proxy, adds the answers the proxy gives
    /// itself, and follows ReadyForQuery to know when to release the server.
    async fn process_server(&mut self) -> Result<(), Exit> {
        let Phase::Attached(a) = &mut self.phase else {
            return Ok(());
        };
        // sbuf[..start] is already handled; sbuf[start..pos] is to be forwarded.
        let (mut start, mut pos) = (0, 0);
        let mut broken = None;
        // A statement whose server copy turned out stale.
        let mut renew = None;
        loop {
            let item = match self.sscan.next(&self.sbuf[pos..], whole_backend) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => {
                    broken = Some(format!("server broke the protocol: {e}"));
                    break;
                }
            };
            let (tag, len) = match item {
                Item::Whole { tag, len } => (tag, len),
                Item::Head { tag, .. } => {
                    // Rows answering the proxy's own queries are dropped whole.
                    self.swallow_stream = self.expect.on_server_message(tag) == Verdict::Swallow;
                    if self.swallow_stream {
                        self.to_client.extend_from_slice(&self.sbuf[start..pos]);
                        start = pos + item.len();
                    }
                    pos += item.len();
                    continue;
                }
                Item::Body(n) => {
                    if self.swallow_stream {
                        self.to_client.extend_from_slice(&self.sbuf[start..pos]);
                        start = pos + n;
                    }
                    pos += n;
                    continue;
                }
            };
            let body = &self.sbuf[pos + 5..pos + len];
            if tag == b'E'
                && let Some(message) = fatal_message(body)
            {
                // The server is about to hang up; the client's proxy connection is fine.
                broken = Some(message);
                break;
            }
            // ReadyForQuery's status, checked once for what follows.
            let ready = match tag {
                b'Z' => match body.first().copied().and_then(TransactionStatus::from_byte) {
                    Some(status) if len == 6 => Some(status),
                    _ => {
                        broken = Some("server broke the protocol: invalid ReadyForQuery".to_owned());
                        break;
                    }
                },
                _ => None,
            };
            if tag == b'E' && is_stale_plan(body) {
                // The server's copy of this statement predates DDL. This
                // client's statement moves to a fresh server copy (see
                // `renew_statement`), and the batch is sent again when that is
                // invisible to the client (see `Retry`); otherwise the client
                // sees the error, as it would directly.
                if let Some(name) = self.expect.front_statement() {
                    if self.retry.covers(&name, self.expect.visible_done())
                        && a.status == TransactionStatus::Idle
                        && self.expect.ends_at_first_sync()
                        && self.to_server.is_empty()
                    {
                        tracing::info!(statement = %name, "stale plan after a schema change: preparing again and resending the batch");
                        self.retry.swallowing = true;
                        // PostgreSQL sends ParameterDescription before it finds the plan stale.
                        self.retry.drop_parameter_description =
                            self.expect.front_request() == Some(super::expect::Request::DescribeStatement);
                    }
                    renew = Some(name);
                }
            }
            let mut verdict = self.expect.on_server_message(tag);
            if tag == b't' && self.retry.drop_parameter_description && !self.retry.swallowing {
                // The resent Describe's: the client has it from the first attempt.
                self.retry.drop_parameter_description = false;
                verdict = Verdict::Swallow;
            }
            if self.retry.swallowing && !matches!(tag, b'A' | b'N' | b'S') {
                // The failed attempt: the client sees only the second one
                // (asynchronous messages still pass).
                verdict = Verdict::Swallow;
                if tag == b'E' {
                    self.tracker.error();
                }
                if let Some(status) = ready {
                    a.status = status;
                    // Settles the failed attempt's request, as if forwarded.
                    let settled = self.tracker.ready(status);
                    a.conn.conn.state.dirty |= settled.uncertain;
                    self.retry.swallowing = false;
                    self.retry.due = true;
                }
            }
            match verdict {
                Verdict::Forward => match (tag, ready) {
                    (_, Some(status)) => {
                        a.status = status;
                        self.retry.drop_parameter_description = false;
                        self.stats
                            .query_count
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(t) = self.request_started.take() {
                            // Up to the read that brought this ReadyForQuery.
                            let took = a.server_io.saturating_duration_since(t);
                            DbStats::add_time(&self.stats.query_time_us, took);
                            self.stats.query.observe(took);
                        }
                        if !self.expect.is_empty() {
                            // Pipelined requests are still being answered.
                            self.request_started = Some(a.server_io);
                        }
                        let settled = self.tracker.ready(status);
                        for change in &settled.confirmed {
                            self.settings.apply_for_client(change, &self.startup);
                            a.conn.conn.state.settings.apply_for_server(change);
                        }
                        a.conn.conn.state.dirty |= settled.uncertain;
                        let restate = self.mode == PoolMode::Transaction && self.pins.is_empty();
                        if status == TransactionStatus::Idle
                            && self.restate.before_ready(
                                &settled.confirmed,
                                restate,
                                &self.sbuf[start..pos],
                                &mut self.to_client,
                            )
                        {
                            start = pos;
                        }
                        if status == TransactionStatus::Idle && self.expect.is_empty() {
                            // Any change of client_encoding is now in `settings`, or gone.
                            self.encoding_unsettled = false;
                        }
                        if a.role == Role::Replica && a.conn.conn.state.settings.serializable() == Some(true) {
                            // Set inside a read-only transaction there: a standby
                            // connection defaulting to SERIALIZABLE would fail the
                            // next client's carried settings. Reset it before reuse.
                            a.conn.conn.state.dirty = true;
                        }
                    }
                    (b'E', _) => self.tracker.error(),
                    (b'C', _) if self.tracker.waiting() => self.tracker.command_complete(body),
                    _ => {}
                },
                Verdict::Swallow | Verdict::Demote => {
                    self.to_client.extend_from_slice(&self.sbuf[start..pos]);
                    if verdict == Verdict::Demote {
                        // Our own SETs failed: tell the client as a notice, reset the connection later.
                        tracing::warn!("carrying the client's settings to the server failed");
                        self.to_client.put_u8(b'N');
                        self.to_client.extend_from_slice(&self.sbuf[pos + 1..pos + len]);
                        a.conn.conn.state.dirty = true;
                    }
                    start = pos + len;
                }
            }
            pos += len;
            if self.expect.has_ready() {
                self.to_client.extend_from_slice(&self.sbuf[start..pos]);
                start = pos;
                for s in self.expect.take_ready() {
                    match s {
                        Synthetic::ParseComplete => parse_complete(&mut self.to_client),
                        Synthetic::CloseComplete => close_complete(&mut self.to_client),
                    }
                }
            }
            if self.expect.has_outcomes() {
                for name in self.expect.take_failed() {
                    a.conn.conn.state.prepared.remove(&name);
                }
                for (parse, skipped) in self.expect.take_unparsed() {
                    if forget_unparsed(&mut self.statements, &mut self.unnamed, &parse, skipped) {
                        // The connection holds the one before, or none.
                        a.conn.conn.state.unnamed = None;
                    }
                }
                for name in self.expect.take_kept() {
                    a.conn.conn.state.prepared.insert(name, usize::MAX);
                }
                for change in self.expect.take_named() {
                    a.conn.conn.state.client_named.apply(change);
                }
            }
            if self.expect.has_created() {
                self.pool.learn_statements(self.expect.take_created());
            }
            let ignored = self.expect.take_ignored_syncs();
            if ignored > 0 {
                self.tracker.forget_requests(ignored);
            }
            let released = tag == b'Z'
                && verdict == Verdict::Forward
                && self.expect.is_empty()
                && !a.unsynced
                && a.status == TransactionStatus::Idle
                && ((self.mode == PoolMode::Transaction && self.pins.is_empty()) || self.draining);
            if released {
                self.release_due = true;
                break;
            }
        }
        if let Some(name) = renew {
            self.renew_statement(&name);
        }
        if start == 0 && pos == self.sbuf.len() && self.to_client.is_empty() {
            std::mem::swap(&mut self.to_client, &mut self.sbuf);
        } else {
            self.to_client.extend_from_slice(&self.sbuf[start..pos]);
            self.sbuf.advance(pos);
        }
        match broken {
            Some(why) => self.server_lost(&why).await,
            None => Ok(()),
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
