//! Who is connected: one entry per logged-in client, for the admin console's
//! SHOW CLIENTS / SHOW SERVERS and for KILL and KILL_CLIENT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::sql::Pins;

/// A client's relation to server connections, as SHOW CLIENTS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// One logged-in client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub peer: SocketAddr,
    pub tls: bool,
    pub application_name: String,
    pub connected: SystemTime,
    state: AtomicU8,
    /// Session-only features that pin the client to its server connection.
    pins: AtomicU8,
    /// The server connection held.
    server: Mutex<Option<HeldServer>>,
    /// Signals raised for the session ([`SIGNAL_KILL`], [`SIGNAL_SHUTDOWN`],
    /// [`SIGNAL_SERVER_STUCK`]), not yet taken.
    signals: AtomicU8,
    /// The session task, to wake when a signal is raised.
    waker: atomic_waker::AtomicWaker,
}

/// The server connection a client holds, as SHOW CLIENTS and SHOW SERVERS show it.
#[derive(Debug, Clone)]
pub struct HeldServer {
    /// The server's address (`host:port`).
    pub addr: &'static str,
    /// The backend's process id.
    pub pid: i32,
    /// Whether the connection to the server is encrypted.
    pub tls: bool,
    /// The pool generation and `[server_tls]` epoch it was opened under
    /// (see [`crate::pool::Pool::close_needed`]).
    pub generation: usize,
    pub tls_epoch: u64,
}

/// End the session (KILL, KILL_CLIENT).
pub const SIGNAL_KILL: u8 = 1;
/// The proxy is shutting down: finish the transaction in flight, then leave.
pub const SIGNAL_SHUTDOWN: u8 = 2;
/// A server of the session's database stopped answering health checks: give
/// it up if it is the one the session waits on (see
/// [`crate::router::health::ServerHealth::is_stuck`]).
pub const SIGNAL_SERVER_STUCK: u8 = 4;

/// Resolves with the signals raised for a session since they were last taken.
/// Far cheaper to poll on every turn of the session loop than a `Notify`:
/// an atomic load, and an atomic waker registration that does not clone.
pub struct Signalled<'a>(&'a ClientInfo);

impl std::future::Future for Signalled<'_> {
    type Output = u8;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<u8> {
        let info = self.0;
        if info.signals.load(Ordering::Acquire) == 0 {
            info.waker.register(cx.waker());
            if info.signals.load(Ordering::Acquire) == 0 {
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(info.signals.swap(0, Ordering::AcqRel))
    }
}

impl ClientInfo {
    pub fn new(id: u64, user: &str, database: &str, peer: SocketAddr, tls: bool, application_name: &str) -> Self {
        ClientInfo {
            id,
            user: user.to_owned(),
            database: database.to_owned(),
            peer,
            tls,
            application_name: application_name.to_owned(),
            connected: SystemTime::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            pins: AtomicU8::new(0),
            server: Mutex::new(None),
            signals: AtomicU8::new(0),
            waker: atomic_waker::AtomicWaker::new(),
        }
    }

    /// Raises `signal` for the session and wakes it.
    pub fn signal(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The session's signals, for its event loop (see [`Signalled`]).
    pub fn signalled(&self) -> Signalled<'_> {
        Signalled(self)
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Records what the client is doing while it holds no server connection
    /// (and held none since the last [`Self::set`] with `None`).
    pub fn set_state(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Records what the client is doing, and with which server connection.
    pub fn set(&self, state: ClientState, server: Option<HeldServer>) {
        self.state.store(state as u8, Ordering::Relaxed);
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = server;
    }

    /// Records the session-only features the client holds (SHOW CLIENTS,
    /// `dbproxy_clients_pinned`).
    pub fn set_pins(&self, pins: Pins) {
        self.pins.store(pins.bits(), Ordering::Relaxed);
    }

    /// The session-only features the client holds.
    pub fn pins(&self) -> Pins {
        Pins::from_bits(self.pins.load(Ordering::Relaxed))
    }

    /// The server connection held, if any.
    pub fn server(&self) -> Option<HeldServer> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The registry of logged-in clients.
#[derive(Debug, Default)]
pub struct Clients {
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// A registered client; unregisters on drop.
pub struct Entry<'a> {
    clients: &'a Clients,
    pub info: Arc<ClientInfo>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.clients.map().remove(&self.info.id);
    }
}

impl Clients {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ClientInfo>>> {
        // Inserting into and removing from a map cannot leave it inconsistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a client for as long as the returned entry lives.
    pub fn register(&self, info: ClientInfo) -> Entry<'_> {
        let info = Arc::new(info);
        self.map().insert(info.id, info.clone());
        Entry { clients: self, info }
    }

    /// Every client, by id.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.map().values().cloned().collect()
    }

    /// Ends client `id`; whether it was connected.
    pub fn kill(&self, id: u64) -> bool {
        match self.map().get(&id) {
            Some(c) => {
                c.signal(SIGNAL_KILL);
                true
            }
            None => false,
        }
    }

    /// Ends every client of `database`; how many.
    pub fn kill_database(&self, database: &str) -> usize {
        self.signal_database(database, SIGNAL_KILL)
    }

    /// Raises `signal` for every client of `database`; how many.
    pub fn signal_database(&self, database: &str, signal: u8) -> usize {
        let map = self.map();
        let clients: Vec<_> = map.values().filter(|c| c.database == database).collect();
        clients.iter().for_each(|c| c.signal(signal));
        clients.len()
    }
}
