//! The byte stream to a server: TCP, or a unix-domain socket when the
//! configured host is a directory (`"/var/run/postgresql:5432"` is the socket
//! `/var/run/postgresql/.s.PGSQL.5432`, as libpq and PgBouncer spell it). A
//! unix socket skips the TCP/IP stack on both ends, which on the same host
//! costs the proxy and the server noticeably less CPU per message.

use std::io;

use tokio::net::{TcpStream, UnixStream, tcp, unix};

use crate::config::ServerAddr;

/// A connection to a server.
#[derive(Debug)]
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The read half of a borrowed [`ServerStream`] (see [`ServerStream::split`]).
pub enum ServerRead<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
}

/// The write half of a borrowed [`ServerStream`].
pub enum ServerWrite<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
}

impl ServerStream {
    /// Connects to `addr`, over its unix socket when its host is a directory.
    pub async fn connect(addr: &ServerAddr) -> io::Result<ServerStream> {
        match addr.unix_socket() {
            Some(path) => UnixStream::connect(path).await.map(ServerStream::Unix),
            None => {
                let stream = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
                // Requests and answers are small and complete: send them at once.
                let _ = stream.set_nodelay(true);
                Ok(ServerStream::Tcp(stream))
            }
        }
    }

    /// Halves to read and write at once, without a lock.
    pub fn split(&mut self) -> (ServerRead<'_>, ServerWrite<'_>) {
        match self {
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

    /// A read that does not wait (`WouldBlock` when nothing is there).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
        }
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
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerWrite::Tcp(w) => w.try_write(buf),
            ServerWrite::Unix(w) => w.try_write(buf),
        }
    }
}

delegate_read!(ServerStream: ServerStream::Tcp, ServerStream::Unix);
delegate_write!(ServerStream: ServerStream::Tcp, ServerStream::Unix);
delegate_read!(ServerRead<'_>: ServerRead::Tcp, ServerRead::Unix);
delegate_write!(ServerWrite<'_>: ServerWrite::Tcp, ServerWrite::Unix);
