//! One client connection: startup (TLS, StartupMessage, SCRAM), then the main
//! loop that forwards frames between the client and the server connection it
//! holds, checking one out per transaction (or per session).

mod buffers;
mod cancel;
mod checkout;
mod effects;
mod expect;
mod extended;
mod greeting;
mod local;
mod release;
mod requests;
mod restate;
mod retry;
mod settings;
mod startup;
mod statements;
mod stream;
mod transfer;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

pub use cancel::{CancelRegistry, CancelSlot};
pub use stream::ClientStream;

use crate::clients::ClientInfo;
use crate::protocol::backend::{ErrorFields, error_response};
use crate::proxy::Shared;

/// Serves one client from accept to disconnect.
pub async fn serve(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let id = shared.next_session_id();
    let span = tracing::info_span!("client", id, %peer);
    async move {
        let login_timeout = shared.live().config.proxy.client_login_timeout;
        let opened = // Boxed, like the other phases that are not the idle wait: a logged-in
        // client's task then carries only the state it needs while idle.
        match tokio::time::timeout(login_timeout, Box::pin(startup::open(shared, tcp))).await {
            Ok(Ok(Some(login))) => login,
            Ok(Ok(None)) => return,
            Ok(Err(failure)) => {
                failure.report(&shared.errors).await;
                return;
            }
            Err(_) => {
                shared.errors.count("login_timeout");
                tracing::info!(timeout = ?login_timeout, "client did not finish login in time");
                return;
            }
        };
        let registration = shared.cancels.register();
        let key = (registration.process_id, registration.secret_key);
        match opened.target {
            startup::Target::Admin => {
                Box::pin(crate::admin::run(shared, opened.stream, &opened.user, key)).await;
            }
            startup::Target::Database(ref db) => {
                let (user, database, tls) = (opened.user.name.clone(), db.name.clone(), opened.stream.is_tls());
                tracing::info!(%user, %database, tls, "client logged in");
                let app = opened
                    .params
                    .iter()
                    .find(|(k, _)| k == "application_name")
                    .map(|(_, v)| v.as_str());
                let info = ClientInfo::new(id, &user, &database, peer, tls, app.unwrap_or(""));
                let entry = shared.registry.register(info);
                transfer::run(shared, opened, &registration, &entry.info).await;
            }
        }
        tracing::info!("client disconnected");
    }
    .instrument(span)
    .await
}

/// Writes a FATAL error to the client and hangs up.
async fn send_fatal<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, err: &ErrorFields) {
    let mut buf = BytesMut::new();
    error_response(&mut buf, err);
    let _ = stream.write_all(&buf).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}
