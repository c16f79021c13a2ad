//! The client's byte stream: plain TCP, or TLS after an SSLRequest.

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection, encrypted or not.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Whether the client negotiated TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

/// The read side of a client connection (see [`ClientStream::into_split`]).
pub enum ClientReader {
    Plain(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<TlsStream<TcpStream>>>),
}

/// The write side of a client connection (see [`ClientStream::into_split`]).
pub enum ClientWriter {
    Plain(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<TlsStream<TcpStream>>>),
}

impl ClientStream {
    /// Halves to read and write at once. Plain TCP needs no lock between
    /// them; TLS, one state machine for both directions, goes through
    /// `tokio::io::split`.
    pub fn into_split(self) -> (ClientReader, ClientWriter) {
        match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.into_split();
                (ClientReader::Plain(r), ClientWriter::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (ClientReader::Tls(r), ClientWriter::Tls(w))
            }
        }
    }
}

delegate_read!(ClientStream: ClientStream::Plain, ClientStream::Tls);
delegate_write!(ClientStream: ClientStream::Plain, ClientStream::Tls);
delegate_read!(ClientReader: ClientReader::Plain, ClientReader::Tls);
delegate_write!(ClientWriter: ClientWriter::Plain, ClientWriter::Tls);
