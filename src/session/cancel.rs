//! Cancel requests. Each client gets a random key of its own (never a
//! server's); a CancelRequest quoting it is forwarded, with the server's own
//! key, to the server that client is using at that moment, and to nobody if
//! it is idle.
//!
//! A cancel must never hit another client's query. The session therefore
//! clears its slot before giving its server connection back, and clearing waits
//! for a cancel in flight to finish (the postmaster has signalled the backend by
//! the time it closes the cancel connection). A signal that lands after the
//! query ended finds the backend idle, where PostgreSQL ignores it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::server_conn::{CancelKey, send_cancel};

/// The server connection a client is using, if any, as seen by cancellers.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: tokio::sync::Mutex<Option<CancelKey>>,
}

impl CancelSlot {
    /// Records the server connection the client now holds.
    pub async fn set(&self, key: CancelKey) {
        *self.target.lock().await = Some(key);
    }

    /// Forgets it, after any cancel in flight has been delivered.
    pub async fn clear(&self) {
        if !self.try_clear() {
            *self.target.lock().await = None;
        }
    }

    /// [`Self::set`] without waiting: fails only while a cancel is being
    /// delivered, and then hands the key back.
    pub fn try_set(&self, key: CancelKey) -> Result<(), CancelKey> {
        match self.target.try_lock() {
            Ok(mut target) => {
                *target = Some(key);
                Ok(())
            }
            Err(_) => Err(key),
        }
    }

    /// [`Self::clear`] without waiting: false while a cancel is being delivered.
    fn try_clear(&self) -> bool {
        match self.target.try_lock() {
            Ok(mut target) => {
                *target = None;
                true
            }
            Err(_) => false,
        }
    }
}

/// Client cancel keys of one proxy.
#[derive(Debug)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    timeout: Duration,
}

/// A registered key; unregisters on drop.
pub struct Registration<'a> {
    registry: &'a CancelRegistry,
    pub process_id: i32,
    pub secret_key: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.slots().remove(&(self.process_id, self.secret_key));
    }
}

impl CancelRegistry {
    /// A registry whose forwarded cancels give up after `timeout`.
    pub fn new(timeout: Duration) -> CancelRegistry {
        CancelRegistry {
            slots: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), Arc<CancelSlot>>> {
        // HashMap insert/remove cannot leave it inconsistent on panic.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draws a fresh random key (from the thread CSPRNG) for a new client.
    pub fn register(&self) -> Registration<'_> {
        let slot = Arc::new(CancelSlot::default());
        let mut slots = self.slots();
        loop {
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(key) {
                e.insert(slot.clone());
                return Registration {
                    registry: self,
                    process_id: key.0,
                    secret_key: key.1,
                    slot,
                };
            }
        }
    }

    /// Handles a CancelRequest. Unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, process_id: i32, secret_key: i32) {
        let Some(slot) = self.slots().get(&(process_id, secret_key)).cloned() else {
            tracing::debug!(process_id, "cancel request with an unknown key ignored");
            return;
        };
        let target = slot.target.lock().await;
        if let Some(key) = target.as_ref() {
            tracing::debug!(server = %key.addr, backend = key.process_id, "forwarding cancel request");
            if let Err(e) = send_cancel(key, self.timeout).await {
                tracing::warn!(server = %key.addr, error = %e, "could not forward cancel request");
            }
        }
    }
}
