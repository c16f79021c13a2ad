//! Test harness: the shared cluster, per-test roles, and proxies built from
//! TOML text exactly as a user would write it. Shared by the test binaries,
//! which each use part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dbproxy::{Config, Proxy};
use tokio_postgres::{Client, NoTls};

/// The PostgreSQL primary and replicas shared by every test in this binary.
pub struct Cluster {
    pub dir: PathBuf,
    pub primary: u16,
    pub replicas: Vec<u16>,
    /// The CA that signed the servers' certificate, when their TLS is on:
    /// in the `integration` binary, so that every test there also runs over
    /// dbproxy's default `server_tls.sslmode = "prefer"`, encrypted; the
    /// `routing` binary's servers have TLS off.
    pub ssl_ca: Option<PathBuf>,
}

/// Whether this test binary's servers have TLS on (see `Cluster::ssl_ca`).
const SERVERS_USE_TLS: bool = matches!(env!("CARGO_CRATE_NAME").as_bytes(), b"integration");

impl Cluster {
    /// Stops a node (`primary`, `replica1`, `replica2`) at once, like a crash.
    pub fn stop_node(&self, node: &str) {
        self.node("stop-node", node);
    }

    /// Starts a stopped node again.
    pub fn start_node(&self, node: &str) {
        self.node("start-node", node);
    }

    /// Freezes a node (SIGSTOP of the postmaster and its backends).
    pub fn freeze_node(&self, node: &str) {
        self.node("freeze-node", node);
    }

    /// Lets a frozen node run again.
    pub fn thaw_node(&self, node: &str) {
        self.node("thaw-node", node);
    }

    /// Promotes a replica: it leaves recovery and takes writes (a failover).
    pub fn promote_node(&self, node: &str) {
        self.node("promote-node", node);
    }

    /// Adds a streaming replica (`replicaK`, not one of the shared ones); its port.
    pub fn add_replica(&self, node: &str) -> u16 {
        let out = self.node("add-replica", node);
        out.trim().parse().expect("add-replica prints the port")
    }

    fn node(&self, action: &str, node: &str) -> String {
        let out = Command::new(repo_root().join("scripts/pg-cluster.sh"))
            .args([action.as_ref(), self.dir.as_os_str(), node.as_ref()])
            .output()
            .expect("scripts/pg-cluster.sh runs");
        assert!(
            out.status.success(),
            "{action} {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the cluster on first use. A reaper started by the script tears it
/// down when this test process exits, however it exits.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("dbp-it-{pid}"));
        let out = Command::new(repo_root().join("scripts/pg-cluster.sh"))
            .arg("up")
            .arg(&dir)
            .args(["--watch", &pid.to_string()])
            .args(SERVERS_USE_TLS.then_some("--ssl"))
            .output()
            .expect("scripts/pg-cluster.sh runs");
        assert!(
            out.status.success(),
            "starting the PostgreSQL cluster failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} missing from cluster output: {env}"))
                .to_owned()
        };
        Cluster {
            dir,
            primary: get("PRIMARY_PORT").parse().expect("port"),
            replicas: get("REPLICA_PORTS")
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().expect("port"))
                .collect(),
            ssl_ca: SERVERS_USE_TLS.then(|| PathBuf::from(get("SSL_CA"))),
        }
    })
}

/// A superuser connection to the primary's `appdb`, bypassing the proxy.
pub async fn superuser() -> Client {
    superuser_on(cluster().primary).await
}

/// A superuser connection to the server on `port` (the primary or a replica).
pub async fn superuser_on(port: u16) -> Client {
    let (client, conn) =
        tokio_postgres::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=appdb"), NoTls)
            .await
            .unwrap_or_else(|e| panic!("superuser connects to port {port}: {e}"));
    tokio::spawn(conn);
    client
}

/// A login role of its own for one test, so backend counts are per test.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub name: String,
    pub password: String,
}

pub async fn create_user(prefix: &str) -> TestUser {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let password = format!("pw-{name}");
    let su = superuser().await;
    su.batch_execute(&format!(
        "CREATE ROLE {name} LOGIN PASSWORD '{password}'; CREATE SCHEMA AUTHORIZATION {name};"
    ))
    .await
    .expect("create role");
    TestUser { name, password }
}

/// Number of backends the primary has for `user`, optionally in one state.
pub async fn backends(user: &str, state: Option<&str>) -> i64 {
    let su = superuser().await;
    let row = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND ($2::text IS NULL OR state = $2)",
            &[&user, &state],
        )
        .await
        .expect("count backends");
    row.get(0)
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether, within `limit`, `user` has no backend left idle in a transaction.
pub async fn no_transaction_left_open(user: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        backends(user, Some("idle in transaction")).await == 0
    })
    .await
}

/// How to configure a test proxy; rendered as a TOML file.
pub struct Setup {
    pub users: Vec<TestUser>,
    /// Lines of the `[pool]` section.
    pub pool: String,
    /// Extra lines of the `[proxy]` section.
    pub proxy: String,
    /// Overrides the primary address (e.g. a port nobody listens on).
    pub primary: Option<String>,
    /// `[tls]` certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra lines of the `[tls]` section.
    pub tls_lines: String,
    pub listen: String,
    /// Lines of the `[routing]` section.
    pub routing: String,
    /// Overrides the replica ports (default: the cluster's replicas).
    pub replicas: Option<Vec<u16>>,
}

impl Setup {
    pub fn new(users: &[&TestUser]) -> Setup {
        Setup {
            users: users.iter().map(|u| (*u).clone()).collect(),
            pool: "size = 5\ncheckout_timeout = \"5s\"".to_owned(),
            proxy: String::new(),
            primary: None,
            tls: None,
            tls_lines: String::new(),
            listen: "127.0.0.1:0".to_owned(),
            routing: "read_write_split = false".to_owned(),
            replicas: None,
        }
    }

    pub fn pool(mut self, lines: &str) -> Setup {
        self.pool = lines.to_owned();
        self
    }

    pub fn toml(&self) -> String {
        let c = cluster();
        let primary = self
            .primary
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", c.primary));
        let replicas: Vec<String> = self
            .replicas
            .as_ref()
            .unwrap_or(&c.replicas)
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let mut text = format!(
            "[proxy]\nlisten = \"{}\"\n{}\n\n[pool]\n{}\n\n[routing]\n{}\n\n[[databases]]\nname = \"appdb\"\nprimary = \"{primary}\"\nreplicas = [{}]\n",
            self.listen,
            self.proxy,
            self.pool,
            self.routing,
            replicas.join(", ")
        );
        if let Some((cert, key)) = &self.tls {
            text.push_str(&format!(
                "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{}\n",
                cert.display(),
                key.display(),
                self.tls_lines
            ));
        }
        for u in &self.users {
            text.push_str(&format!(
                "\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n",
                u.name, u.password
            ));
        }
        text
    }

    /// Starts the proxy in this process.
    pub async fn start(&self) -> Proxy {
        let config = Config::parse(&self.toml()).unwrap_or_else(|p| panic!("test config invalid: {p:?}"));
        Proxy::start(config).await.expect("proxy starts")
    }
}

/// A connection URL for `user` through `proxy`.
pub fn url(proxy: &Proxy, user: &TestUser) -> String {
    format!(
        "postgresql://{}:{}@{}/appdb",
        user.name,
        user.password,
        proxy.local_addr()
    )
}

/// Connects through the proxy with tokio-postgres.
pub async fn connect(proxy: &Proxy, user: &TestUser) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(&url(proxy, user), NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Like [`connect`], also returning the connection task so a test can kill
/// it (a TCP drop without Terminate).
pub async fn connect_killable(proxy: &Proxy, user: &TestUser) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(&url(proxy, user), NoTls)
        .await
        .expect("connects");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// A failed call as a user reads it: SQLSTATE, message and detail.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}: {} {}",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail().unwrap_or("")
        ),
        None => format!("{e} ({:?})", std::error::Error::source(e)),
    }
}

/// The SQLSTATE of a failed call, or "" if it has none.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// The server port that answered (which server a query ran on).
pub async fn server_port(client: &Client) -> u16 {
    let row = client
        .query_one("SELECT setting FROM pg_settings WHERE name = 'port'", &[])
        .await
        .expect("port query");
    row.get::<_, String>(0).parse().expect("port")
}

/// Asserts that every joined client task succeeded, showing the first failures.
pub fn assert_all_succeeded(results: Vec<Result<Result<(), tokio_postgres::Error>, tokio::task::JoinError>>) {
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(describe(&e)),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} clients failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

/// Runs pgbench with `args` against `url`; asserts it processed `transactions` without failures.
pub fn pgbench(url: &str, args: &[&str], transactions: u32) {
    let run = Command::new("pgbench")
        .args(args)
        .arg(url)
        .output()
        .expect("pgbench runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    if transactions > 0 {
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{args:?}: {stdout}"
        );
        let processed = format!("number of transactions actually processed: {transactions}/{transactions}");
        assert!(stdout.contains(&processed), "{args:?}: {stdout}");
    }
}

/// `GET path` on the metrics endpoint: its status line and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// Starts a proxy from `setup` written to a file, which RELOAD reads again;
/// `setup.listen` becomes its address, so the file can be rewritten as is.
pub async fn start_from_file(setup: &mut Setup) -> (dbproxy::Proxy, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, setup.toml()).unwrap();
    let proxy = dbproxy::Proxy::start(dbproxy::Config::load(&path).unwrap())
        .await
        .unwrap();
    proxy.shared().set_config_path(path.clone());
    setup.listen = proxy.local_addr().to_string();
    (proxy, dir, path)
}
