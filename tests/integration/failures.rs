//! Cancel, clients and servers that vanish, servers that are down, and
//! bounded memory on large results.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::NoTls;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_long_query_and_the_connection_stays_usable() {
    let user = create_user("cancel").await;
    let proxy = Setup::new(&[&user]).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let err = client.query_one("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(sqlstate(&err), "57014", "{}", describe(&err));
    canceller.await.unwrap().unwrap();
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reached_by_its_unix_socket_serves_queries_and_cancels() {
    let user = create_user("unixsock").await;
    let c = cluster();
    let mut setup = Setup::new(&[&user]);
    // The cluster's socket directory, as libpq and PgBouncer spell it.
    setup.primary = Some(format!("{}:{}", c.dir.display(), c.primary));
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let row = client
        .query_one("SELECT inet_client_addr() IS NULL, current_setting('port')", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the server sees a unix-socket client");
    assert_eq!(row.get::<_, String>(1), c.primary.to_string());
    let statement = client.prepare("SELECT $1::int + 1").await.unwrap();
    assert_eq!(client.query_one(&statement, &[&41]).await.unwrap().get::<_, i32>(0), 42);
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let err = client.query_one("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{}", describe(&err));
    canceller.await.unwrap().unwrap();
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_idle_client_hits_nobody_else() {
    let user = create_user("cancel_idle").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let idle = connect(&proxy, &user).await.unwrap();
    idle.query_one("SELECT 1", &[]).await.unwrap();
    let busy = connect(&proxy, &user).await.unwrap();
    let token = idle.cancel_token();
    let query = tokio::spawn(async move { busy.query_one("SELECT pg_sleep(0.6)::text", &[]).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The idle client's key, on the only server connection, while another client runs.
    token.cancel_query(NoTls).await.unwrap();
    query.await.unwrap().expect("the busy client's query is not cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_idle_in_transaction_leaves_nothing_open() {
    let user = create_user("kill_idle").await;
    let proxy = Setup::new(&[&user]).start().await;
    let setup = connect(&proxy, &user).await.unwrap();
    setup.batch_execute("CREATE TABLE kill_idle_t (v int)").await.unwrap();
    let (client, task) = connect_killable(&proxy, &user).await;
    client
        .batch_execute("BEGIN; INSERT INTO kill_idle_t VALUES (1)")
        .await
        .unwrap();
    assert_eq!(backends(&user.name, Some("idle in transaction")).await, 1);
    task.abort(); // TCP drop, no Terminate
    let name = user.name.clone();
    assert!(
        no_transaction_left_open(&name, Duration::from_secs(5)).await,
        "a backend stayed idle in transaction"
    );
    let n: i64 = setup
        .query_one("SELECT count(*) FROM kill_idle_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the uncommitted row must not survive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_query_in_a_transaction_leaves_nothing_open() {
    let user = create_user("kill_busy").await;
    let proxy = Setup::new(&[&user]).start().await;
    let setup = connect(&proxy, &user).await.unwrap();
    setup.batch_execute("CREATE TABLE kill_busy_t (v int)").await.unwrap();
    let (client, task) = connect_killable(&proxy, &user).await;
    client
        .batch_execute("BEGIN; INSERT INTO kill_busy_t VALUES (1)")
        .await
        .unwrap();
    let query = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(30)").await });
    let name = user.name.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            backends(&name, Some("active")).await == 1
        })
        .await
    );
    task.abort();
    query.abort();
    assert!(
        eventually(Duration::from_secs(5), || async {
            backends(&name, Some("active")).await == 0 && backends(&name, Some("idle in transaction")).await == 0
        })
        .await,
        "the abandoned backend kept running"
    );
    let n: i64 = setup
        .query_one("SELECT count(*) FROM kill_busy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_terminated_mid_query_gives_a_class_08_error_and_the_pool_recovers() {
    let user = create_user("term").await;
    let proxy = Setup::new(&[&user]).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let name = user.name.clone();
    let killer = tokio::spawn(async move {
        let su = superuser().await;
        eventually(Duration::from_secs(5), || async {
            let rows = su
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
                    &[&name],
                )
                .await
                .unwrap();
            !rows.is_empty()
        })
        .await
    });
    let err = client.query_one("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert!(killer.await.unwrap());
    assert!(
        sqlstate(&err).starts_with("08"),
        "expected class 08, got {}",
        describe(&err)
    );
    assert!(describe(&err).contains("administrator command"), "{}", describe(&err));
    // Same client, next statement: a fresh server connection.
    assert_eq!(client.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_killed_behind_our_back_are_replaced_unseen() {
    let user = create_user("idle_kill").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let before: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let su = superuser().await;
    su.execute("SELECT pg_terminate_backend($1)", &[&before]).await.unwrap();
    let gone = || async {
        let n: i64 = su
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&before])
            .await
            .unwrap()
            .get(0);
        n == 0
    };
    assert!(eventually(Duration::from_secs(5), gone).await);
    let after: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("no error seen")
        .get(0);
    assert_ne!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_login_still_works_and_queries_fail_clearly() {
    let user = create_user("down").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut setup = Setup::new(&[&user]);
    setup.primary = Some(format!("127.0.0.1:{port}"));
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.expect("login does not need a server");
    let started = Instant::now();
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
    assert!(
        describe(&err).contains(&format!("127.0.0.1:{port}")),
        "{}",
        describe(&err)
    );
    // The client is still connected and gets the same clear answer again.
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Kills the proxy process when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the built `dbproxy` binary with `setup`; returns it and a connected client.
async fn start_binary(setup: &mut Setup, user: &TestUser) -> (Child, tokio_postgres::Client, u16) {
    // The binary reads its file at start and at SIGHUP: it must outlive this call.
    let dir = tempfile::tempdir().unwrap().keep();
    start_binary_at(setup, user, &dir.join("proxy.toml")).await
}

/// Like [`start_binary`], with the configuration file at `path`.
async fn start_binary_at(
    setup: &mut Setup,
    user: &TestUser,
    path: &std::path::Path,
) -> (Child, tokio_postgres::Client, u16) {
    let log = std::fs::File::create(path.with_extension("log")).unwrap();
    start_binary_logging_to(setup, user, path, log.into()).await
}

/// Like [`start_binary_at`], with the proxy's stderr going to `stderr`.
async fn start_binary_logging_to(
    setup: &mut Setup,
    user: &TestUser,
    path: &std::path::Path,
    stderr: Stdio,
) -> (Child, tokio_postgres::Client, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    setup.listen = format!("127.0.0.1:{port}");
    std::fs::write(path, setup.toml()).unwrap();
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_dbproxy"))
            .arg("--config")
            .arg(path)
            .args(["--log-format", "json"])
            .env_remove("TOKIO_WORKER_THREADS")
            .env("RUST_LOG", "info")
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let url = format!("postgresql://{}:{}@127.0.0.1:{port}/appdb", user.name, user.password);
    for _ in 0..100 {
        if let Ok((c, conn)) = tokio_postgres::connect(&url, NoTls).await {
            tokio::spawn(conn);
            return (child, c, port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy binary never accepted connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_dropping_clients() {
    let user = create_user("sighup").await;
    let newcomer = create_user("sighup_new").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let mut setup = Setup::new(&[&user]);
    let (proxy, client, port) = start_binary_at(&mut setup, &user, &path).await;
    setup.users.push(newcomer.clone());
    std::fs::write(&path, setup.toml()).unwrap();
    let pid = proxy.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let url = format!(
        "postgresql://{}:{}@127.0.0.1:{port}/appdb",
        newcomer.name, newcomer.password
    );
    let mut joined = false;
    for _ in 0..50 {
        if let Ok((c, conn)) = tokio_postgres::connect(&url, NoTls).await {
            tokio::spawn(conn);
            c.query_one("SELECT 1", &[]).await.unwrap();
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "the user added by SIGHUP never got in");
    client
        .query_one("SELECT 2", &[])
        .await
        .expect("the connected client stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_workers_sets_the_number_of_runtime_threads() {
    let user = create_user("workers").await;
    // One more than the default (start_binary_at clears TOKIO_WORKER_THREADS);
    // one runs the single-threaded scheduler on the main thread. The startup
    // line says what the runtime has (tokio's own count of its workers).
    let more = std::thread::available_parallelism().unwrap().get() + 1;
    for (workers, scheduler) in [(more, "multi-threaded"), (1, "single-threaded")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let mut setup = Setup::new(&[&user]);
        setup.proxy = format!("workers = {workers}");
        let (_proxy, client, _) = start_binary_at(&mut setup, &user, &path).await;
        let row = client
            .query_one("SELECT count(*) FROM generate_series(1, 1000)", &[])
            .await;
        assert_eq!(row.unwrap().get::<_, i64>(0), 1000);
        let log = std::fs::read_to_string(path.with_extension("log")).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("dbproxy listening"))
            .unwrap_or_else(|| panic!("no startup line in {log}"));
        assert!(line.contains(&format!("\"workers\":{workers},")), "{line}");
        assert!(line.contains(&format!("\"scheduler\":\"{scheduler}\"")), "{line}");
    }
    // On the one thread: the server hop's TLS (the cluster has it on, and
    // `prefer` takes it), a reload, and the drain at SIGTERM.
    let mut setup = Setup::new(&[&user]);
    setup.proxy = "workers = 1".to_owned();
    let (mut proxy, client, _) = start_binary(&mut setup, &user).await;
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert!(client.query_one(sql, &[]).await.unwrap().get::<_, bool>(0));
    let pid = proxy.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("served after the reload");
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = exit_status(&mut proxy).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_transaction_in_flight_finish_then_exits_cleanly() {
    let user = create_user("sigterm").await;
    let (mut proxy, client, port) = start_binary(&mut Setup::new(&[&user]), &user).await;
    let idle_url = format!("postgresql://{}:{}@127.0.0.1:{port}/appdb", user.name, user.password);
    let (idle, conn) = tokio_postgres::connect(&idle_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let query = tokio::spawn(async move { client.query_one("SELECT pg_sleep(1)::text, 'done'", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = proxy.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let row = query.await.unwrap().expect("the query in flight returns its row");
    assert_eq!(row.get::<_, &str>(1), "done");
    let err = idle
        .query_one("SELECT 1", &[])
        .await
        .expect_err("idle clients are closed");
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{}", describe(&err));
    let status = exit_status(&mut proxy).await;
    assert!(status.success(), "exit status {status}");
}

/// How the proxy process exited; fails the test if it runs on for 10 s.
async fn exit_status(proxy: &mut Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the proxy did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_result_streams_through_with_bounded_memory() {
    let user = create_user("big").await;
    let (proxy, client, _) = start_binary(&mut Setup::new(&[&user]), &user).await;
    client.query_one("SELECT 1", &[]).await.unwrap();
    let before = rss_kib(proxy.0.id());
    let params: [i32; 0] = [];
    let rows = client
        .query_raw("SELECT repeat('x', 1000000) FROM generate_series(1, 300)", params)
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let (mut n, mut bytes, mut peak) = (0, 0usize, before);
    while let Some(row) = rows.next().await {
        bytes += row.unwrap().get::<_, &str>(0).len();
        n += 1;
        if n % 20 == 0 {
            peak = peak.max(rss_kib(proxy.0.id()));
        }
    }
    assert_eq!((n, bytes), (300, 300_000_000));
    let growth_mib = (peak.saturating_sub(before)) / 1024;
    eprintln!("proxy RSS {before} KiB before, peak {peak} KiB while streaming 300 MB: +{growth_mib} MiB");
    assert!(
        growth_mib < 50,
        "proxy RSS grew by {growth_mib} MiB while streaming 300 MB"
    );
}

/// A log collector that stops reading (the proxy's stderr a pipe nobody drains,
/// as when a container's log shipper stalls) must not stop the proxy: its log
/// lines queue (and beyond what the queue holds, are dropped and counted), and
/// logins go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_does_not_stall_the_proxy() {
    let user = create_user("stalled_log").await;
    let path = tempfile::tempdir().unwrap().keep().join("proxy.toml");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut setup = Setup::new(&[&user]);
    setup.proxy = format!("metrics_listen = \"{metrics}\"");
    let (mut proxy, _client, port) = start_binary_logging_to(&mut setup, &user, &path, Stdio::piped()).await;
    // Held open and never read: the pipe fills after 64 KiB.
    let _unread = proxy.0.stderr.take();
    let url = format!("postgresql://{}:{}@127.0.0.1:{port}/appdb", user.name, user.password);
    // Each login and logout logs two lines of about 200 bytes each (JSON).
    for i in 0..1000 {
        let session = async {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
            let conn = tokio::spawn(conn);
            c.simple_query("SELECT 1").await?;
            drop(c);
            let _ = conn.await;
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), session).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("login {i}: {}", describe(&e))),
            Err(_) => panic!("login {i} stalled: the proxy blocks on its full stderr"),
        }
    }
    // 2,000 lines fit in the queue (16,384 lines; dropping beyond it is the
    // unit test's): none lost yet, and the counter is there to say so.
    let (_, body) = http_get(metrics, "/metrics").await;
    let dropped = body
        .lines()
        .find_map(|l| l.strip_prefix("dbproxy_log_lines_dropped_total "));
    assert_eq!(dropped, Some("0"), "{body}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connect_and_drop_cycles_leak_no_descriptors() {
    let user = create_user("fds").await;
    let (proxy, client, port) = start_binary(&mut Setup::new(&[&user]), &user).await;
    client.query_one("SELECT 1", &[]).await.unwrap();
    let before = open_fds(proxy.0.id());
    let url = format!("postgresql://{}:{}@127.0.0.1:{port}/appdb", user.name, user.password);
    for i in 0..1000 {
        if i % 2 == 0 {
            // Log in, query, leave.
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let task = tokio::spawn(conn);
            c.query_one("SELECT 1", &[]).await.unwrap();
            drop(c);
            let _ = task.await;
        } else {
            // Connect and drop without a word.
            drop(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
    }
    let settled = eventually(Duration::from_secs(5), || async {
        open_fds(proxy.0.id()) <= before + 2
    })
    .await;
    let after = open_fds(proxy.0.id());
    eprintln!("proxy descriptors: {before} before, {after} after 1000 connect/drop cycles");
    assert!(settled, "descriptors grew from {before} to {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_in_a_transaction_is_disconnected_and_its_connection_freed() {
    let user = create_user("idle_tx").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"5s\"\nidle_transaction_timeout = \"500ms\"")
        .start()
        .await;
    // The stalled client's connection task reports the FATAL it gets.
    let (stalled, conn) = tokio_postgres::connect(&url(&proxy, &user), NoTls).await.unwrap();
    let fatal = tokio::spawn(conn);
    stalled.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // The only server connection is held: another client waits for it.
    let other = connect(&proxy, &user).await.unwrap();
    let started = Instant::now();
    other.batch_execute("SELECT 2").await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(4),
        "waited {waited:?}"
    );
    let err = tokio::time::timeout(Duration::from_secs(5), fatal)
        .await
        .expect("the stalled client's connection ends")
        .unwrap()
        .expect_err("with an error");
    assert_eq!(sqlstate(&err), "25P03", "{}", describe(&err));
    assert!(stalled.batch_execute("SELECT 3").await.is_err());
    assert!(
        no_transaction_left_open(&user.name, Duration::from_secs(5)).await,
        "the stalled transaction was left open"
    );
    // A transaction that keeps working is not touched, however long it lasts.
    other.batch_execute("BEGIN").await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.batch_execute("SELECT 4").await.unwrap();
    }
    other.batch_execute("COMMIT").await.unwrap();
}
