//! The accept loop: enforces `max_client_conn`, starts one session task per
//! client, and stops accepting when shutdown begins.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::protocol::SqlState;
use crate::protocol::backend::{ErrorFields, error_response};
use crate::proxy::Shared;
use crate::session;

/// Number of connected clients, with a way to wait for zero.
#[derive(Debug, Default)]
pub struct ClientGauge {
    count: AtomicUsize,
    zero: Notify,
}

/// One counted client; uncounts on drop.
pub struct ClientGuard<'a>(&'a ClientGauge);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

impl ClientGauge {
    /// Clients connected now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts a client unless that would exceed `max`.
    pub fn try_add(&self, max: usize) -> Option<ClientGuard<'_>> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ClientGuard(self))
    }

    /// Resolves once no client is connected.
    pub async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Accepts clients until shutdown.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and similar: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|&s| s).await; } => {
                tracing::info!("no longer accepting clients: shutting down");
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let max = shared.live().config.proxy.max_client_conn;
            match shared.clients.try_add(max) {
                Some(_guard) => session::serve(&shared, tcp, peer).await,
                None => {
                    shared.errors.count("too_many_clients");
                    refuse(tcp, max).await
                }
            }
        });
    }
}

/// Tells a client over the limit why it is refused, then hangs up.
async fn refuse(mut tcp: TcpStream, max: usize) {
    tracing::warn!(max_client_conn = max, "client refused: too many clients");
    let mut buf = BytesMut::new();
    let err = ErrorFields::fatal(
        SqlState::TOO_MANY_CONNECTIONS,
        format!("too many clients: dbproxy already serves max_client_conn = {max} clients"),
    );
    error_response(&mut buf, &err);
    let _ = tcp.write_all(&buf).await;
    let _ = tcp.shutdown().await;
}
