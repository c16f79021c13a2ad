//! The configuration file (TOML): sections, defaults, and validation that
//! reports every problem with the key that has it. See the README's
//! configuration reference for each key.

mod types;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use types::{Balance, PoolMode, ServerAddr, ServerSslMode, SessionFeatures, TlsClientMode, format_duration};

/// Name of the admin console's virtual database.
pub const ADMIN_DATABASE: &str = "dbproxy";

/// Most worker threads `proxy.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// `[proxy]`: the client-facing listener and global limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub admin_users: Vec<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub max_client_conn: usize,
    /// A client that has not finished startup and authentication by then is dropped.
    #[serde(deserialize_with = "types::duration")]
    pub client_login_timeout: Duration,
    /// Largest protocol message accepted from a client or server, in bytes.
    pub max_message_size: usize,
    /// Longest a graceful shutdown waits for transactions in flight.
    #[serde(deserialize_with = "types::duration")]
    pub shutdown_timeout: Duration,
    /// Worker threads of the runtime; unset: one per CPU the process may use.
    /// Applied by the binary when it builds its runtime; `Proxy::start` runs
    /// on whatever runtime its caller has.
    pub workers: Option<usize>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            admin_users: Vec::new(),
            metrics_listen: None,
            max_client_conn: 10_000,
            client_login_timeout: Duration::from_secs(10),
            max_message_size: 256 << 20,
            shutdown_timeout: Duration::from_secs(30),
            workers: None,
        }
    }
}

/// `[tls]`: the certificate clients see when they ask for TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `"require"` refuses clients that log in without TLS.
    #[serde(default)]
    pub client_mode: TlsClientMode,
}

/// `[server_tls]`: TLS from dbproxy to the servers, as libpq's `sslmode`,
/// `sslrootcert`, `sslcert` and `sslkey` (over TCP; never over a unix socket).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub sslmode: ServerSslMode,
    /// PEM file of the certificate authorities that sign the servers'
    /// certificates: required by `verify-ca` and `verify-full`; with `prefer`
    /// or `require` it makes them verify the chain too, as libpq does.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain dbproxy presents to the servers (libpq's
    /// `sslcert`), for `cert` authentication or `clientcert` in pg_hba.conf.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (libpq's `sslkey`).
    pub key_file: Option<PathBuf>,
}

/// `[pool]`: server connection pools, one per (database, user, server).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Hard bound on connections to one server as one user.
    pub size: usize,
    #[serde(deserialize_with = "types::duration")]
    pub checkout_timeout: Duration,
    /// Longest a new server connection may take to connect and log in.
    #[serde(deserialize_with = "types::duration")]
    pub server_connect_timeout: Duration,
    /// Idle server connections older than this are closed.
    #[serde(deserialize_with = "types::duration")]
    pub server_idle_timeout: Duration,
    /// A client idle inside a transaction for longer is disconnected (its
    /// transaction rolled back, its server connection returned). 0: never.
    #[serde(deserialize_with = "types::duration")]
    pub idle_transaction_timeout: Duration,
    /// Run on a server connection a session-mode client gave back.
    pub server_reset_query: String,
    /// Named prepared statements kept per server connection (least recently
    /// used are closed beyond it). 0 turns statement tracking off: names then
    /// pass through unchanged, as with PgBouncer before 1.21.
    pub max_prepared_statements: usize,
    /// Most memory one client's named prepared statements may take in the
    /// proxy (transaction mode, statement names, texts and types plus a
    /// fixed overhead each); a Parse beyond it is refused. 0: no bound.
    pub max_client_statement_bytes: usize,
    /// Pin clients that use session-only features, or refuse them.
    pub session_features: SessionFeatures,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            checkout_timeout: Duration::from_secs(5),
            server_connect_timeout: Duration::from_secs(5),
            server_idle_timeout: Duration::from_secs(600),
            idle_transaction_timeout: Duration::ZERO,
            server_reset_query: "DISCARD ALL".to_owned(),
            max_prepared_statements: 200,
            max_client_statement_bytes: 64 * 1024 * 1024,
            session_features: SessionFeatures::Pin,
        }
    }
}

/// `[routing]`: read/write split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub read_write_split: bool,
    pub balance: Balance,
    pub read_your_writes: bool,
    /// A replica lagging more than this leaves the rotation.
    #[serde(deserialize_with = "types::duration")]
    pub max_replica_lag: Duration,
    /// How often each server's health and replay position are checked.
    #[serde(deserialize_with = "types::duration")]
    pub health_check_interval: Duration,
    /// A check taking longer than this counts as a failure.
    #[serde(deserialize_with = "types::duration")]
    pub health_check_timeout: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_write_split: true,
            balance: Balance::RoundRobin,
            read_your_writes: true,
            max_replica_lag: Duration::from_secs(30),
            health_check_interval: Duration::from_millis(200),
            health_check_timeout: Duration::from_secs(2),
        }
    }
}

/// One `[[databases]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients put in their connection string.
    pub name: String,
    pub primary: ServerAddr,
    #[serde(default)]
    pub replicas: Vec<ServerAddr>,
    /// Database name on the servers, when it differs from `name`.
    #[serde(default)]
    pub dbname: Option<String>,
}

impl DatabaseConfig {
    /// The database name to use on the servers.
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

/// One `[[users]]` entry. `Debug` never prints the password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// What clients authenticate with: a plaintext password, or a SCRAM
    /// verifier (`SCRAM-SHA-256$...`, as in `pg_authid`).
    pub password: String,
    /// Password for logging in to the servers; defaults to `password`, and is
    /// required when `password` is a SCRAM verifier.
    #[serde(default)]
    pub server_password: Option<String>,
    /// Name of an environment variable holding `server_password`, so the file
    /// need hold no password at all. Read when the file is loaded or reloaded.
    #[serde(default)]
    pub server_password_env: Option<String>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub tls: Option<TlsConfig>,
    pub server_tls: ServerTlsConfig,
    pub pool: PoolConfig,
    pub routing: RoutingConfig,
    pub databases: Vec<DatabaseConfig>,
    pub users: Vec<UserConfig>,
}

/// One thing wrong with a configuration, and the key that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Deserializes one section, recording its error instead of stopping.
    fn section<T: DeserializeOwned>(&mut self, key: &str, value: toml::Value) -> Option<T> {
        match value.try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(key, e.to_string().trim().replace('\n', " "));
                None
            }
        }
    }

    fn array<T: DeserializeOwned>(&mut self, key: &str, value: toml::Value) -> Vec<T> {
        match value {
            toml::Value::Array(items) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| self.section(&format!("{key}[{i}]"), v))
                .collect(),
            _ => {
                self.add(key, format!("must be an array of tables ([[{key}]])"));
                Vec::new()
            }
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![Problem {
                key: path.display().to_string(),
                message: format!("cannot read the configuration file: {e}"),
            }]
        })?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text, returning every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems(Vec::new());
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            // Not e.to_string(): it quotes the offending line, which may hold a password.
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            vec![Problem {
                key: line.map_or("(syntax)".to_owned(), |l| format!("(syntax, line {l})")),
                message: e.message().trim().replace('\n', " "),
            }]
        })?;
        let mut config = Config::default();
        for (key, value) in table {
            match key.as_str() {
                "proxy" => config.proxy = problems.section(&key, value).unwrap_or_default(),
                "tls" => config.tls = problems.section(&key, value),
                "server_tls" => config.server_tls = problems.section(&key, value).unwrap_or_default(),
                "pool" => config.pool = problems.section(&key, value).unwrap_or_default(),
                "routing" => config.routing = problems.section(&key, value).unwrap_or_default(),
                "databases" => config.databases = problems.array(&key, value),
                "users" => config.users = problems.array(&key, value),
                _ => problems.add(&key, "unknown section"),
            }
        }
        for (i, u) in config.users.iter_mut().enumerate() {
            let Some(var) = &u.server_password_env else { continue };
            let key = format!("users[{i}].server_password_env");
            if u.server_password.is_some() {
                problems.add(key, "set server_password or server_password_env, not both");
                continue;
            }
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => u.server_password = Some(v),
                _ => problems.add(key, format!("environment variable {var:?} is not set or is empty")),
            }
        }
        config.validate(&mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(problems.0)
        }
    }

    fn validate(&self, p: &mut Problems) {
        if self.proxy.max_client_conn == 0 {
            p.add("proxy.max_client_conn", "must be at least 1");
        }
        if let Some(n) = self.proxy.workers
            && !(1..=MAX_WORKERS).contains(&n)
        {
            p.add("proxy.workers", format!("must be between 1 and {MAX_WORKERS}"));
        }
        if self.proxy.max_message_size < 1024 {
            p.add("proxy.max_message_size", "must be at least 1024 bytes");
        }
        if self.proxy.client_login_timeout.is_zero() {
            p.add("proxy.client_login_timeout", "must be greater than zero");
        }
        if self.pool.size == 0 {
            p.add("pool.size", "must be at least 1");
        }
        for (key, d) in [
            ("pool.checkout_timeout", self.pool.checkout_timeout),
            ("pool.server_connect_timeout", self.pool.server_connect_timeout),
            ("pool.server_idle_timeout", self.pool.server_idle_timeout),
            ("routing.health_check_interval", self.routing.health_check_interval),
            ("routing.health_check_timeout", self.routing.health_check_timeout),
        ] {
            if d.is_zero() {
                p.add(key, "must be greater than zero");
            }
        }
        if self.databases.is_empty() {
            p.add(
                "databases",
                "no [[databases]] entry: clients would have nothing to connect to",
            );
        }
        let mut names = HashSet::new();
        for (i, db) in self.databases.iter().enumerate() {
            let key = format!("databases[{i}].name");
            if db.name.is_empty() {
                p.add(key, "must not be empty");
            } else if db.name == ADMIN_DATABASE {
                p.add(key, format!("{ADMIN_DATABASE:?} is reserved for the admin console"));
            } else if !names.insert(db.name.as_str()) {
                p.add(key, format!("database {:?} is defined twice", db.name));
            }
        }
        let mut users = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                p.add(format!("users[{i}].name"), "must not be empty");
            } else if !users.insert(u.name.as_str()) {
                p.add(
                    format!("users[{i}].name"),
                    format!("user {:?} is defined twice", u.name),
                );
            }
            if u.password.is_empty() {
                p.add(format!("users[{i}].password"), "must not be empty");
            }
            if u.password.starts_with("SCRAM-SHA-256$") {
                if crate::auth::ScramSecret::parse_verifier(&u.password).is_none() {
                    p.add(
                        format!("users[{i}].password"),
                        "looks like a SCRAM verifier but cannot be parsed",
                    );
                }
                if u.server_password.is_none() {
                    p.add(
                        format!("users[{i}].server_password"),
                        "required when password is a SCRAM verifier (the proxy needs a password to log in to the servers)",
                    );
                }
            }
        }
        for (i, admin) in self.proxy.admin_users.iter().enumerate() {
            if !users.contains(admin.as_str()) {
                p.add(
                    format!("proxy.admin_users[{i}]"),
                    format!("{admin:?} is not defined in [[users]]"),
                );
            }
        }
        if let Some(tls) = &self.tls
            && let Err(e) = crate::tls::acceptor(tls)
        {
            p.add("tls", e.to_string());
        }
        let server_tls = &self.server_tls;
        let mut usable = true;
        if server_tls.cert_file.is_some() != server_tls.key_file.is_some() {
            let missing = match server_tls.cert_file {
                Some(_) => "server_tls.key_file",
                None => "server_tls.cert_file",
            };
            p.add(missing, "cert_file and key_file go together".to_owned());
            usable = false;
        }
        if server_tls.ca_file.is_none() && server_tls.sslmode.verifies() {
            p.add(
                "server_tls.ca_file",
                format!(
                    "sslmode {:?} needs the certificate authorities' file",
                    server_tls.sslmode.as_str()
                ),
            );
            usable = false;
        }
        // Reads the files (whatever the mode).
        if usable && let Err(e) = crate::tls::server_connector(server_tls) {
            p.add("server_tls", e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_EXAMPLE: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
admin_users = ["admin"]
metrics_listen = "127.0.0.1:9930"
max_client_conn = 10000

[pool]
mode = "transaction"
size = 20
checkout_timeout = "5s"

[routing]
read_write_split = true
balance = "round_robin"
read_your_writes = true

[[databases]]
name = "appdb"
primary = "10.0.0.1:5432"
replicas = ["10.0.0.2:5432", "10.0.0.3:5432"]

[[users]]
name = "app"
password = "app-secret"

[[users]]
name = "admin"
password = "admin-secret"
"#;

    #[test]
    fn contract_example_parses() {
        let c = Config::parse(CONTRACT_EXAMPLE).unwrap();
        assert_eq!(c.pool.size, 20);
        assert_eq!(c.pool.checkout_timeout, Duration::from_secs(5));
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.routing.balance, Balance::RoundRobin);
        assert_eq!(c.databases[0].replicas.len(), 2);
        assert_eq!(c.proxy.metrics_listen, Some("127.0.0.1:9930".parse().unwrap()));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[proxy]
lisen = "x"
[pool]
size = 0
checkout_timeout = "soon"
[routing]
balance = "random"
[[databases]]
name = "dbproxy"
primary = "nohost"
[[databases]]
name = "a"
primary = "h:1"
[[users]]
name = "u"
password = ""
[extra]
"#;
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in ["proxy", "pool", "routing", "databases[0]", "users[0].password", "extra"] {
            assert!(keys.contains(&key), "{key} missing from {problems:?}");
        }
        let text = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(text.contains("lisen"), "{text}");
        assert!(text.contains("soon"), "{text}");
    }

    #[test]
    fn semantic_problems() {
        let text = r#"
[proxy]
admin_users = ["root"]
workers = 0
[pool]
size = 0
[[databases]]
name = "dbproxy"
primary = "h:1"
[[users]]
name = "u"
password = "p"
[[users]]
name = "u"
password = "p"
"#;
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "proxy.workers",
                "pool.size",
                "databases[0].name",
                "users[1].name",
                "proxy.admin_users[0]"
            ]
        );
    }

    #[test]
    fn server_tls_settings() {
        let base = "[[databases]]\nname = \"d\"\nprimary = \"h:1\"\n";
        let c = Config::parse(base).unwrap();
        assert_eq!(c.server_tls.sslmode, ServerSslMode::Prefer, "libpq's default");
        let c = Config::parse(&format!("{base}[server_tls]\nsslmode = \"disable\"\n")).unwrap();
        assert_eq!(c.server_tls.sslmode, ServerSslMode::Disable);
        let problems = Config::parse(&format!("{base}[server_tls]\nsslmode = \"verify-full\"\n")).unwrap_err();
        assert_eq!(problems[0].key, "server_tls.ca_file", "{problems:?}");
        let problems = Config::parse(&format!(
            "{base}[server_tls]\nsslmode = \"verify-ca\"\nca_file = \"/nonexistent.pem\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "server_tls", "{problems:?}");
        assert!(problems[0].message.contains("/nonexistent.pem"), "{problems:?}");
        let problems = Config::parse(&format!("{base}[server_tls]\nsslmode = \"allow\"\n")).unwrap_err();
        assert_eq!(problems[0].key, "server_tls", "{problems:?}");
        let problems = Config::parse(&format!(
            "{base}[server_tls]\nsslmode = \"verify-full\"\ncert_file = \"/c.pem\"\n"
        ))
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server_tls.key_file", "server_tls.ca_file"],
            "every problem: {problems:?}"
        );
        // Files are read even when TLS is off, so --check finds them before the mode changes.
        let problems = Config::parse(&format!(
            "{base}[server_tls]\nsslmode = \"disable\"\nca_file = \"/nonexistent.pem\"\n"
        ))
        .unwrap_err();
        assert_eq!(problems[0].key, "server_tls", "{problems:?}");
        let problems = Config::parse(&format!(
            "{base}[server_tls]\ncert_file = \"/nonexistent.pem\"\nkey_file = \"/nonexistent.key\"\n"
        ))
        .unwrap_err();
        assert!(problems[0].message.contains("/nonexistent.pem"), "{problems:?}");
    }

    #[test]
    fn syntax_errors_do_not_quote_the_line() {
        let problems = Config::parse("[[users]]\nname = \"u\"\npassword = \"hunter2\" oops\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].key.contains("line 3"), "{problems:?}");
        assert!(!format!("{problems:?}").contains("hunter2"), "{problems:?}");
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let c = Config::parse(CONTRACT_EXAMPLE).unwrap();
        assert!(!format!("{c:?}").contains("app-secret"));
    }

    #[test]
    fn server_password_env_is_read_and_checked() {
        // PATH is set in any environment tests run in; nothing here sets variables.
        let path = std::env::var("PATH").unwrap();
        let text = CONTRACT_EXAMPLE.replace(
            "password = \"app-secret\"",
            "password = \"app-secret\"\nserver_password_env = \"PATH\"",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.users[0].server_password.as_deref(), Some(path.as_str()));

        let text = CONTRACT_EXAMPLE.replace(
            "password = \"app-secret\"",
            "password = \"app-secret\"\nserver_password_env = \"DBPROXY_SURELY_UNSET_VARIABLE\"",
        );
        let problems = Config::parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "users[0].server_password_env", "{problems:?}");
        assert!(problems[0].message.contains("DBPROXY_SURELY_UNSET_VARIABLE"));

        let text = CONTRACT_EXAMPLE.replace(
            "password = \"app-secret\"",
            "password = \"app-secret\"\nserver_password = \"x\"\nserver_password_env = \"PATH\"",
        );
        let problems = Config::parse(&text).unwrap_err();
        assert!(problems[0].message.contains("not both"), "{problems:?}");
    }
}
