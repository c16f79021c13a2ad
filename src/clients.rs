//! Who is connected: one entry per logged-in client, for the admin console's
//! SHOW CLIENTS / SHOW SERVERS and for KILL and KILL_CLIENT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

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
    /// The server connection held: (server address, backend pid).
    server: Mutex<Option<(String, i32)>>,
    /// Wakes the session to end it (KILL, KILL_CLIENT).
    pub kill: Notify,
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
            server: Mutex::new(None),
            kill: Notify::new(),
        }
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Records what the client is doing, and with which server connection.
    pub fn set(&self, state: ClientState, server: Option<(String, i32)>) {
        self.state.store(state as u8, Ordering::Relaxed);
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = server;
    }

    /// The server connection held, if any.
    pub fn server(&self) -> Option<(String, i32)> {
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
                c.kill.notify_one();
                true
            }
            None => false,
        }
    }

    /// Ends every client of `database`; how many.
    pub fn kill_database(&self, database: &str) -> usize {
        let map = self.map();
        let victims: Vec<_> = map.values().filter(|c| c.database == database).collect();
        victims.iter().for_each(|c| c.kill.notify_one());
        victims.len()
    }
}
