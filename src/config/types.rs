//! Value types used in the configuration file: durations written as humantime
//! strings ("500ms", "5s"), sizes, server addresses, and the mode enums.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses a humantime duration string ("5s", "250ms", "10m").
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// Formats a duration the way the config file writes it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A `host:port` address of a PostgreSQL server (`[v6]:port` for IPv6 literals;
/// a host that starts with `/` is the directory of the server's unix socket).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl ServerAddr {
    /// The unix-domain socket to use when the host is a directory (starts
    /// with `/`): `<host>/.s.PGSQL.<port>`, as libpq names it.
    pub fn unix_socket(&self) -> Option<std::path::PathBuf> {
        self.host
            .starts_with('/')
            .then(|| std::path::Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }
}

impl std::str::FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(format!("{s:?} has an empty host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{s:?} has an invalid port"))?;
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for ServerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// From the first statement of a transaction to its end.
    #[default]
    Transaction,
    /// For the whole client connection.
    Session,
}

impl PoolMode {
    /// The name used in the config file and the admin console.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// What transaction pooling does with session-only features (LISTEN,
/// session advisory locks, temporary tables, WITH HOLD cursors, SQL PREPARE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionFeatures {
    /// Keep the client on its server connection until it releases them.
    #[default]
    Pin,
    /// Refuse them with an error (simple query protocol; extended-protocol
    /// uses still pin).
    Reject,
}

impl SessionFeatures {
    /// The name used in the config file and the admin console.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionFeatures::Pin => "pin",
            SessionFeatures::Reject => "reject",
        }
    }
}

/// How reads are spread over replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
}

impl Balance {
    /// The name used in the config file and the admin console.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
        }
    }
}

/// Whether clients may connect without TLS when `[tls]` is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsClientMode {
    /// Clients choose (`sslmode=disable` or `prefer` work unencrypted).
    #[default]
    Allow,
    /// A client that logs in without TLS is refused (FATAL 28000).
    Require,
}

impl TlsClientMode {
    /// The name used in the config file and the admin console.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsClientMode::Allow => "allow",
            TlsClientMode::Require => "require",
        }
    }
}

/// How dbproxy uses TLS to the servers (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Never: plain TCP.
    Disable,
    /// TLS when the server offers it, else plain TCP.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked (unless a
    /// `ca_file` is given).
    Require,
    /// TLS with a certificate signed by one of `ca_file`'s authorities.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the server's host.
    VerifyFull,
}

impl ServerSslMode {
    /// The name used in the config file and the admin console.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerSslMode::Disable => "disable",
            ServerSslMode::Prefer => "prefer",
            ServerSslMode::Require => "require",
            ServerSslMode::VerifyCa => "verify-ca",
            ServerSslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is refused.
    pub fn requires(self) -> bool {
        !matches!(self, ServerSslMode::Disable | ServerSslMode::Prefer)
    }

    /// Whether the server's certificate must be checked.
    pub fn verifies(self) -> bool {
        matches!(self, ServerSslMode::VerifyCa | ServerSslMode::VerifyFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!("10.0.0.1:5432".parse::<ServerAddr>().unwrap().port, 5432);
        let v6: ServerAddr = "[::1]:6543".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 6543));
        assert_eq!(v6.to_string(), "[::1]:6543");
        assert_eq!("db.internal:5432".parse::<ServerAddr>().unwrap().host, "db.internal");
        for bad in ["nohost", ":5432", "h:0", "h:99999", "h:x"] {
            assert!(bad.parse::<ServerAddr>().is_err(), "{bad}");
        }
        let unix: ServerAddr = "/var/run/postgresql:5433".parse().unwrap();
        assert_eq!(
            unix.unix_socket().unwrap(),
            std::path::Path::new("/var/run/postgresql/.s.PGSQL.5433")
        );
        assert_eq!(unix.to_string(), "/var/run/postgresql:5433");
        assert!(v6.unix_socket().is_none());
    }
}
