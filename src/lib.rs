//! dbproxy: a PostgreSQL connection pooler and read/write-splitting proxy.
//!
//! # Layout
//!
//! Data flows client -> session -> (router) -> pool -> server connection:
//!
//! - [`config`]: the TOML file: sections, defaults, validation reporting every problem.
//! - [`protocol`]: wire format only (framing, startup packet, messages the proxy
//!   writes, reading and rewriting Parse/Bind/Describe/Close, SQLSTATEs); no I/O,
//!   safe on any input.
//! - [`auth`]: SCRAM-SHA-256 verification of clients, and the SCRAM client
//!   that logs in to servers (a pool's salted password kept for its next logins).
//! - [`tls`]: the rustls acceptor for clients that ask for TLS, and the
//!   connector (with libpq's verification modes) for TLS to the servers, shared by
//!   every pool and replaced by a reload (`ServerTlsSetting`).
//! - [`clients`]: registry of logged-in clients (SHOW CLIENTS/SERVERS, KILL).
//! - [`listener`]: the accept loop, `max_client_conn`, stop-accepting on shutdown.
//! - [`session`]: one task per client: startup and authentication
//!   (`session/startup.rs`), the login greeting and the settings a startup packet
//!   asks for (`session/greeting.rs`), the forwarding loop (`session/transfer.rs`), the
//!   sizing and reuse of its buffers (`session/buffers.rs`),
//!   giving a server connection back or up, the read-your-writes position after a
//!   write, and the end of a session (`session/release.rs`), client messages: batch
//!   staging and routing, dispatch, simple queries (`session/requests.rs`), the
//!   extended protocol's Parse, Bind and Describe: statement renaming, the
//!   unnamed statement sent again, statements under clients' own names with
//!   renaming off (`session/extended.rs`), how a statement's text is read and its effects
//!   (pins, setting changes, a reset) applied (`session/effects.rs`), a client's named statements and their memory
//!   budget, and its unnamed statement kept to be prepared again on another
//!   connection (`session/statements.rs`), taking a server connection for a request
//!   (`session/checkout.rs`: the pool, the wait, what a held connection carries),
//!   DEALLOCATE/DISCARD ALL, refused session features and refused requests
//!   (`session/local.rs`), resending a batch after a stale plan
//!   (`session/retry.rs`), the queue of answers owed by the server
//!   (`session/expect.rs`), confirming setting changes (`session/settings.rs`),
//!   telling a client its own values again after a RESET (`session/restate.rs`),
//!   cancel keys (`session/cancel.rs`), plain or TLS client stream
//!   (`session/stream.rs`).
//! - [`sql`]: a lexer that understands comments, quoting and dollar quoting
//!   (`sql/lexer.rs`), and what a statement does to the session: settings, pins,
//!   locally answered commands (`sql/session.rs`) with a cheap pre-check that
//!   spares most statements the lexer (`sql/precheck.rs`); how text in client
//!   encodings other than UTF-8 is read, only to be safe (`sql/encoding.rs`).
//! - [`router`]: read/write splitting per database: replica choice, read-your-writes
//!   marks and the classification cache (`router/mod.rs`), the conservative
//!   statement classifier (`router/classify.rs`), and the health monitor that checks
//!   servers, lag and replay positions and reads function volatility from `pg_proc`
//!   (`router/health.rs`).
//! - [`pool`]: bounded, fair pools of server connections per (database, user, server),
//!   bound shared per (server, user); registry of statements the servers accepted.
//! - [`server_conn`]: one server connection: connect, log in, cancel, liveness.
//! - [`server_stream`]: the byte stream to a server: TCP, TLS over TCP
//!   (SSLRequest first), or a unix-domain socket.
//! - `io_enum`: `AsyncRead`/`AsyncWrite` for enums of streams (client and
//!   server streams and their halves).
//! - [`server_state`]: what a server connection holds for clients: prepared
//!   statements (LRU), applied settings, and (renaming off) what statements
//!   under clients' own names do to the session.
//! - [`live`]: the reloadable state (configuration, users, databases, TLS, a router,
//!   counters and a pause switch per database), swapped as a whole by a reload.
//! - [`proxy`]: the shared state (pools, the [`live`] snapshot) and the handle that
//!   starts (listener, maintenance, metrics endpoint, a health monitor per database
//!   with replicas when `read_write_split` is on in transaction mode, a probe of
//!   the primary for every other database), reloads (RELOAD, SIGHUP) and stops a
//!   proxy.
//! - [`admin`]: the admin console on database `dbproxy`: session and commands
//!   (`admin/mod.rs`), the SHOW tables (`admin/show.rs`).
//! - [`stats`]: per-database counters and histograms (SHOW STATS, `/metrics`).
//! - [`logging`]: the binary's log lines to stderr through a bounded queue and
//!   a thread of their own, so that a stalled log reader never blocks a worker.
//! - [`metrics`]: the HTTP endpoint on `metrics_listen`: `/metrics`, `/healthz`,
//!   `/readyz`.

// One audited exception: `proxy::release_free_memory` (glibc's malloc_trim).
#![deny(unsafe_code)]

#[macro_use]
mod io_enum;

pub mod admin;
pub mod auth;
pub mod clients;
pub mod config;
pub mod listener;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod server_conn;
pub mod server_state;
pub mod server_stream;
pub mod session;
pub mod sql;
pub mod stats;
pub mod tls;

pub use config::Config;
pub use proxy::Proxy;
