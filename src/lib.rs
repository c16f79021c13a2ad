//! dbproxy: a PostgreSQL connection pooler and read/write-splitting proxy.
//!
//! # Layout
//!
//! Data flows client -> session -> pool -> server connection:
//!
//! - [`config`]: the TOML file: sections, defaults, validation reporting every problem.
//! - [`protocol`]: wire format only (framing, startup packet, messages the proxy
//!   writes, SQLSTATEs); no I/O, safe on any input.
//! - [`auth`]: SCRAM-SHA-256 verification of clients.
//! - [`tls`]: the rustls acceptor for clients that ask for TLS.
//! - [`listener`]: the accept loop, `max_client_conn`, stop-accepting on shutdown.
//! - [`session`]: one task per client: startup and authentication
//!   (`session/startup.rs`), the forwarding loop (`session/transfer.rs`),
//!   cancel keys (`session/cancel.rs`).
//! - [`pool`]: bounded, fair pools of server connections per (database, user, server).
//! - [`server_conn`]: one server connection: connect, log in, cancel, liveness.
//! - [`proxy`]: the shared state and the handle that starts and stops a proxy.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod listener;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod server_conn;
pub mod server_state;
pub mod session;
pub mod sql;
pub mod tls;

pub use config::Config;
pub use proxy::Proxy;
