//! The byte stream to a server: TCP, or a unix-domain socket when the
//! configured host is a directory (`"/var/run/postgresql:5432"` is the socket
//! `/var/run/postgresql/.s.PGSQL.5432`, as libpq and PgBouncer spell it). A
//! unix socket skips the TCP/IP stack on both ends, which on the same host
//! costs the proxy and the server noticeably less CPU per message. Over TCP,
//! TLS as `[server_tls]` asks (an SSLRequest first, as libpq does).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_rustls::client::TlsStream;

use crate::config::{ServerAddr, ServerSslMode};
use crate::tls::ServerTls;

type TlsIo = Box<TlsStream<TcpStream>>;

/// A connection to a server.
#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsServer>),
}

/// A TLS connection to a server, kept as two halves so that reading and
/// writing can wait at once (`tokio::io::split`: one TLS state machine with
/// a lock between the halves).
pub struct TlsServer {
    read: ReadHalf<TlsIo>,
    write: TlsWriter,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

/// The write half of a TLS connection. A write reports its bytes as written
/// only once their encrypted form is on the socket: the session writes until
/// its buffer is empty and never flushes, so nothing may stay behind in the
/// TLS layer.
pub struct TlsWriter {
    half: WriteHalf<TlsIo>,
    /// Bytes the TLS layer took from the last write and has not sent yet;
    /// the next write (of the same bytes and maybe more) reports them once sent.
    accepted: usize,
}

/// The read half of a borrowed [`ServerStream`] (see [`ServerStream::split`]).
pub enum ServerRead<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
    Tls(&'a mut ReadHalf<TlsIo>),
}

/// The write half of a borrowed [`ServerStream`].
pub enum ServerWrite<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
    Tls(&'a mut TlsWriter),
}

/// What a client sends to ask for TLS: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl ServerStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// Connects to `addr`, over its unix socket when its host is a directory,
    /// else over TCP with TLS as `tls` asks.
    pub async fn connect(addr: &ServerAddr, tls: &ServerTls) -> io::Result<ServerStream> {
        match addr.unix_socket() {
            Some(path) => UnixStream::connect(path).await.map(ServerStream::Unix),
            None => {
                let stream = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
                // Requests and answers are small and complete: send them at once.
                let _ = stream.set_nodelay(true);
                let Some(connector) = tls.connector() else {
                    return Ok(ServerStream::Tcp(stream));
                };
                match negotiate(stream, addr, tls, connector).await {
                    Err(Refused::Handshake(e)) if tls.mode == ServerSslMode::Prefer => {
                        // As libpq: `prefer` tries again without TLS.
                        tracing::warn!(server = %addr, error = %e, "TLS handshake failed; sslmode prefer connects again without TLS");
                        let stream = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
                        let _ = stream.set_nodelay(true);
                        Ok(ServerStream::Tcp(stream))
                    }
                    Err(Refused::Handshake(e) | Refused::Other(e)) => Err(e),
                    Ok(stream) => Ok(stream),
                }
            }
        }
    }

    /// Halves to read and write at once, without a lock (but for TLS).
    pub fn split(&mut self) -> (ServerRead<'_>, ServerWrite<'_>) {
        match self {
            ServerStream::Tls(s) => (ServerRead::Tls(&mut s.read), ServerWrite::Tls(&mut s.write)),
            ServerStream::Tcp(s) => {
                let (r, w) = s.split();
                (ServerRead::Tcp(r), ServerWrite::Tcp(w))
            }
            ServerStream::Unix(s) => {
                let (r, w) = s.split();
                (ServerRead::Unix(r), ServerWrite::Unix(w))
            }
        }
    }

    /// A read that does not wait (`WouldBlock` when nothing is there). Over
    /// TLS it also sees what the TLS layer has already decrypted, and a
    /// partial record it takes off the socket stays in that layer for the
    /// next read.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
            ServerStream::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut read = tokio::io::ReadBuf::new(buf);
                match Pin::new(&mut s.read).poll_read(&mut cx, &mut read) {
                    Poll::Ready(Ok(())) => Ok(read.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

/// Why [`negotiate`] gave no stream.
enum Refused {
    /// The server agreed to TLS, then the handshake failed (a certificate
    /// that does not verify, no common protocol or cipher).
    Handshake(io::Error),
    Other(io::Error),
}

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Refused {
        Refused::Other(e)
    }
}

/// The SSLRequest, its one-byte answer, then the handshake if the server
/// agreed. A server that declines is used in plain text only with `prefer`.
async fn negotiate(
    mut stream: TcpStream,
    addr: &ServerAddr,
    tls: &ServerTls,
    connector: &tokio_rustls::TlsConnector,
) -> Result<ServerStream, Refused> {
    stream.write_all(&SSL_REQUEST).await?;
    // Exactly one byte: anything after it would be the server's, unencrypted.
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if !tls.mode.requires() => return Ok(ServerStream::Tcp(stream)),
        b'N' => {
            return Err(Refused::Other(io::Error::other(format!(
                "the server does not accept TLS connections (server_tls.sslmode = \"{}\")",
                tls.mode.as_str()
            ))));
        }
        other => {
            return Err(Refused::Other(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {other:#04x} to the SSLRequest"),
            )));
        }
    }
    let name = match addr.host.parse::<std::net::IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls::pki_types::ServerName::try_from(addr.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", addr.host)))?,
    };
    let stream = connector.connect(name, stream).await.map_err(|e| {
        Refused::Handshake(io::Error::new(
            e.kind(),
            format!("TLS handshake with the server failed: {e}"),
        ))
    })?;
    let (read, write) = tokio::io::split(Box::new(stream));
    Ok(ServerStream::Tls(Box::new(TlsServer {
        read,
        write: TlsWriter {
            half: write,
            accepted: 0,
        },
    })))
}

impl AsyncRead for TlsServer {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsServer {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_shutdown(cx)
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.accepted == 0 {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            this.accepted = ready!(Pin::new(&mut this.half).poll_write(cx, buf))?;
        }
        ready!(Pin::new(&mut this.half).poll_flush(cx))?;
        // A caller that gave up on the earlier bytes (a connection being
        // abandoned) gets no count above its own buffer's length.
        Poll::Ready(Ok(std::mem::take(&mut this.accepted).min(buf.len())))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().half).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().half).poll_shutdown(cx)
    }
}

/// Where a server listens, with its name looked up.
pub enum Endpoint {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl Endpoint {
    /// Looks `addr` up: every address of a name, in the resolver's order.
    pub async fn lookup(addr: &ServerAddr) -> io::Result<Vec<Endpoint>> {
        if let Some(path) = addr.unix_socket() {
            return Ok(vec![Endpoint::Unix(path)]);
        }
        let found: Vec<Endpoint> = tokio::net::lookup_host((addr.host.as_str(), addr.port))
            .await?
            .map(Endpoint::Tcp)
            .collect();
        if found.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{addr} has no address"),
            ));
        }
        Ok(found)
    }

    /// Connects, without a name lookup.
    pub async fn connect(&self) -> io::Result<ServerStream> {
        match self {
            Endpoint::Tcp(a) => TcpStream::connect(a).await.map(ServerStream::Tcp),
            Endpoint::Unix(p) => UnixStream::connect(p).await.map(ServerStream::Unix),
        }
    }
}

impl ServerWrite<'_> {
    /// A write that does not wait (`WouldBlock` when the socket is full).
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerWrite::Tcp(w) => w.try_write(buf),
            ServerWrite::Unix(w) => w.try_write(buf),
            // Bytes the TLS layer takes are reported by a later write once
            // sent (see `TlsWriter`), which the caller's next wait makes.
            ServerWrite::Tls(w) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(&mut **w).poll_write(&mut cx, buf) {
                    Poll::Ready(r) => r,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

delegate_read!(ServerStream: ServerStream::Tcp, ServerStream::Unix, ServerStream::Tls);
delegate_write!(ServerStream: ServerStream::Tcp, ServerStream::Unix, ServerStream::Tls);
delegate_read!(ServerRead<'_>: ServerRead::Tcp, ServerRead::Unix, ServerRead::Tls);
delegate_write!(ServerWrite<'_>: ServerWrite::Tcp, ServerWrite::Unix, ServerWrite::Tls);
