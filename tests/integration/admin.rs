//! The admin console: PgBouncer-compatible SHOW commands with real values,
//! errors that keep the session, non-admins refused, SHUTDOWN.

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::harness::*;

/// Rows of a console command as (column names, rows of text).
async fn show(admin: &Client, sql: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let msgs = admin
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => columns = cols.iter().map(|c| c.name().to_owned()).collect(),
            SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).unwrap_or("").to_owned()).collect()),
            _ => {}
        }
    }
    (columns, rows)
}

async fn admin_client(proxy: &dbproxy::Proxy, admin: &TestUser) -> Client {
    let url = format!(
        "postgresql://{}:{}@{}/dbproxy",
        admin.name,
        admin.password,
        proxy.local_addr()
    );
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("admin login");
    tokio::spawn(conn);
    client
}

/// An admin console user (it never logs in to the servers, so no role is created).
fn console_admin(name: &str) -> TestUser {
    TestUser {
        name: name.to_owned(),
        password: format!("{name}-secret"),
    }
}

fn admin_setup(user: &TestUser, admin: &TestUser) -> Setup {
    let mut setup = Setup::new(&[user, admin]);
    setup.proxy = format!("admin_users = [\"{}\"]", admin.name);
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_have_pgbouncer_columns_and_real_values() {
    let user = create_user("adm_app").await;
    let admin = console_admin("console_admin");
    let proxy = admin_setup(&user, &admin).start().await;
    let app = connect(&proxy, &user).await.unwrap();
    for _ in 0..5 {
        app.query_one("SELECT 1", &[]).await.unwrap();
    }
    let console = admin_client(&proxy, &admin).await;

    let (cols, rows) = show(&console, "SHOW POOLS").await;
    let pgbouncer = [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    assert_eq!(&cols[..pgbouncer.len()], pgbouncer);
    assert_eq!(&cols[pgbouncer.len()..], ["server", "role"]);
    let row = rows
        .iter()
        .find(|r| r[1] == user.name && r[17] == "primary")
        .expect("a primary pool row for the app user");
    assert_eq!(row[0], "appdb");
    assert_eq!(row[9], "1", "one idle server connection after the queries: {row:?}");
    assert_eq!(row[15], "transaction");
    assert_eq!(row[16], format!("127.0.0.1:{}", cluster().primary));
    assert_eq!(row[17], "primary");

    let (cols, rows) = show(&console, "show databases;").await;
    assert_eq!(cols[..4], ["name", "host", "port", "database"]);
    assert_eq!(rows[0][0], "appdb");
    assert_eq!(rows[0][2], cluster().primary.to_string());

    let (cols, rows) = show(&console, "SHOW CONFIG").await;
    assert_eq!(cols, ["key", "value", "default", "changeable"]);
    let size = rows.iter().find(|r| r[0] == "pool.size").expect("pool.size listed");
    assert_eq!((size[1].as_str(), size[2].as_str()), ("5", "20"));
    let workers = rows
        .iter()
        .find(|r| r[0] == "proxy.workers")
        .expect("proxy.workers listed");
    assert_eq!(workers[1..], ["auto", "auto", "no"], "read at start only");
    let all = format!("{rows:?}");
    assert!(
        !all.contains(&user.password) && !all.contains(&admin.password),
        "no password in SHOW CONFIG"
    );

    let (_, rows) = show(&console, "SHOW USERS").await;
    assert!(rows.iter().any(|r| r[0] == user.name));
    let (cols, rows) = show(&console, "SHOW LISTS").await;
    assert_eq!(cols, ["list", "items"]);
    assert!(
        rows.iter()
            .any(|r| r[0] == "used_clients" && r[1].parse::<usize>().unwrap() >= 2)
    );
    let (_, rows) = show(&console, "SHOW VERSION").await;
    assert!(rows[0][0].starts_with("dbproxy "));
    console.simple_query("SHOW HELP").await.unwrap();

    // Unknown commands are errors, not disconnects.
    let err = console.simple_query("FLY TO THE MOON").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42601", "{}", describe(&err));
    assert!(show(&console, "SHOW VERSION").await.1.len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_users_get_the_console() {
    let user = create_user("adm_refused").await;
    let admin = console_admin("console_admin2");
    let proxy = admin_setup(&user, &admin).start().await;
    let url = format!(
        "postgresql://{}:{}@{}/dbproxy",
        user.name,
        user.password,
        proxy.local_addr()
    );
    let Err(err) = tokio_postgres::connect(&url, NoTls).await else {
        panic!("a non-admin got the console");
    };
    assert_eq!(sqlstate(&err), "28000", "{}", describe(&err));
    assert!(describe(&err).contains("admin console"), "{}", describe(&err));
    let bad = format!("postgresql://{}:wrong@{}/dbproxy", admin.name, proxy.local_addr());
    let Err(err) = tokio_postgres::connect(&bad, NoTls).await else {
        panic!("a wrong password got the console");
    };
    assert_eq!(sqlstate(&err), "28P01");
    // The proxy carries on.
    connect(&proxy, &user)
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_drains_the_proxy() {
    let user = create_user("adm_down").await;
    let admin = console_admin("console_admin3");
    let proxy = admin_setup(&user, &admin).start().await;
    let idle = connect(&proxy, &user).await.unwrap();
    idle.query_one("SELECT 1", &[]).await.unwrap();
    let console = admin_client(&proxy, &admin).await;
    let _ = console.simple_query("SHUTDOWN").await;
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            connect(&proxy, &user).await.is_err()
        })
        .await,
        "new clients are refused after SHUTDOWN"
    );
    let err = idle.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{}", describe(&err));
}

fn metric(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{prefix} missing from:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_count_real_traffic() {
    let user = create_user("adm_stats").await;
    let admin = console_admin("console_admin4");
    let mut setup = admin_setup(&user, &admin);
    setup.proxy.push_str("\nmetrics_listen = \"127.0.0.1:0\"");
    let proxy = setup.start().await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    let console = admin_client(&proxy, &admin).await;
    let before = show(&console, "SHOW STATS").await;
    assert_eq!(before.0[..3], ["database", "total_xact_count", "total_query_count"]);
    let q0: u64 = before.1[0][2].parse().unwrap();
    let (_, m0) = http_get(metrics, "/metrics").await;
    let app = connect(&proxy, &user).await.unwrap();
    for _ in 0..25 {
        app.batch_execute("SELECT 1").await.unwrap();
    }
    let after = show(&console, "SHOW STATS").await;
    let q1: u64 = after.1[0][2].parse().unwrap();
    assert_eq!(q1 - q0, 25, "25 queries counted");
    let x1: u64 = after.1[0][1].parse().unwrap();
    assert!(x1 >= 25, "{x1}");
    let (cols, _) = show(&console, "SHOW STATS_TOTALS").await;
    assert_eq!(cols[1..3], ["xact_count", "query_count"]);

    let (status, body) = http_get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let q = metric(&body, "dbproxy_queries_total{database=\"appdb\"}")
        - metric(&m0, "dbproxy_queries_total{database=\"appdb\"}");
    assert_eq!(q, 25.0);
    assert!(metric(&body, "dbproxy_transactions_total{database=\"appdb\",role=\"primary\"}") >= 25.0);
    assert!(metric(&body, "dbproxy_pool_wait_seconds_count{database=\"appdb\"}") >= 25.0);
    assert!(body.contains("dbproxy_server_connections{database=\"appdb\""));
    assert!(body.contains("dbproxy_build_info{version="));
    assert!(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.starts_with("dbproxy_"))
    );

    assert!(metric(&body, "dbproxy_routed_total{database=\"appdb\",reason=\"primary\"}") >= 25.0);
    // Named statements: the first execution prepares, the rest find it there.
    let stmt = app.prepare("SELECT $1::int4").await.unwrap();
    for i in 0..5 {
        app.query_one(&stmt, &[&i]).await.unwrap();
    }
    let wrong = format!("postgresql://{}:nope@{}/appdb", user.name, proxy.local_addr());
    assert!(tokio_postgres::connect(&wrong, NoTls).await.is_err());
    let (_, body) = http_get(metrics, "/metrics").await;
    assert!(
        metric(
            &body,
            "dbproxy_prepared_statements_total{database=\"appdb\",result=\"hit\"}"
        ) >= 4.0
    );
    assert!(
        metric(
            &body,
            "dbproxy_prepared_statements_total{database=\"appdb\",result=\"miss\"}"
        ) >= 1.0
    );
    assert!(metric(&body, "dbproxy_errors_total{kind=\"auth_failed\"}") >= 1.0);
    assert!(metric(&body, "dbproxy_query_duration_seconds_count{database=\"appdb\"}") >= 30.0);
    assert!(body.contains("dbproxy_replica_lag_bytes{database=\"appdb\""));
    let pinned_now = "dbproxy_clients_pinned{database=\"appdb\"}";
    assert_eq!(metric(&body, pinned_now), 0.0);
    app.batch_execute("LISTEN somewhere").await.unwrap();
    let (_, body) = http_get(metrics, "/metrics").await;
    assert_eq!(metric(&body, "dbproxy_pinned_total{database=\"appdb\"}"), 1.0);
    assert_eq!(metric(&body, pinned_now), 1.0);
    let (cols, rows) = show(&console, "SHOW CLIENTS").await;
    assert_eq!(cols[18], "pinned");
    let row = rows.iter().find(|r| r[1] == user.name).expect("the client's row");
    assert_eq!(row[18], "LISTEN", "{rows:?}");
    let (_, servers) = show(&console, "SHOW SERVERS").await;
    let held = servers.iter().find(|r| r[1] == user.name && r[3] == "active");
    assert_eq!(held.expect("its server connection")[18], "LISTEN", "{servers:?}");
    app.batch_execute("UNLISTEN *").await.unwrap();
    let (_, body) = http_get(metrics, "/metrics").await;
    assert_eq!(metric(&body, pinned_now), 0.0, "released by UNLISTEN *");
    app.batch_execute("LISTEN again").await.unwrap();
    drop(app);
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            metric(&http_get(metrics, "/metrics").await.1, pinned_now) == 0.0
        })
        .await,
        "a pinned client that leaves is no longer counted"
    );
    assert!(http_get(metrics, "/healthz").await.0.contains("200"));
    assert!(http_get(metrics, "/readyz").await.0.contains("200"));
    let _ = proxy.shared().shutdown_tx.send(true);
    assert!(
        http_get(metrics, "/readyz").await.0.contains("503"),
        "not ready while draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let user = create_user("adm_pause").await;
    let admin = console_admin("console_admin5");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = admin_client(&proxy, &admin).await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    console.simple_query("PAUSE appdb").await.unwrap();
    let (_, dbs) = show(&console, "SHOW DATABASES").await;
    assert_eq!(dbs[0][11], "1", "SHOW DATABASES says paused");
    let late = connect(&proxy, &user)
        .await
        .expect("clients may connect during a pause");
    let started = std::time::Instant::now();
    let query = tokio::spawn(async move { late.query_one("SELECT 2", &[]).await.map(|r| r.get::<_, i32>(0)) });
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(!query.is_finished(), "the query waits while paused");
    console.simple_query("RESUME").await.unwrap();
    assert_eq!(query.await.unwrap().unwrap(), 2);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    let err = console.simple_query("PAUSE nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
    client.batch_execute("SELECT 3").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_returns_once_transactions_in_flight_finish_and_closes_server_connections() {
    let user = create_user("adm_pause_wait").await;
    let admin = console_admin("console_admin9");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = std::sync::Arc::new(admin_client(&proxy, &admin).await);
    let busy = connect(&proxy, &user).await.unwrap();
    let idle = connect(&proxy, &user).await.unwrap();
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    idle.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(
        backends(&user.name, None).await,
        2,
        "one in a transaction, one idle in the pool"
    );
    let pause = {
        let console = console.clone();
        tokio::spawn(async move { console.simple_query("PAUSE appdb").await.map(|_| ()) })
    };
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the transaction in flight");
    let committed = std::time::Instant::now();
    busy.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), pause)
        .await
        .expect("PAUSE returns once the transaction ended")
        .unwrap()
        .unwrap();
    assert!(committed.elapsed() < std::time::Duration::from_secs(2));
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            backends(&user.name, None).await == 0
        })
        .await,
        "PAUSE closed the database's server connections"
    );
    let (_, servers) = show(&console, "SHOW SERVERS").await;
    assert!(servers.iter().all(|r| r[1] != user.name), "{servers:?}");
    console.simple_query("RESUME appdb").await.unwrap();
    busy.batch_execute("SELECT 2").await.unwrap();
    idle.batch_execute("SELECT 3").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_file_and_refuses_an_invalid_one() {
    let user = create_user("adm_reload").await;
    let newcomer = create_user("adm_newcomer").await;
    let admin = console_admin("console_admin6");
    let mut setup = admin_setup(&user, &admin);
    let (proxy, _dir, path) = start_from_file(&mut setup).await;
    let console = admin_client(&proxy, &admin).await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert!(connect(&proxy, &newcomer).await.is_err(), "not configured yet");

    // Same listen address (the proxy keeps its socket), a new user, a new pool size.
    setup.users.push(newcomer.clone());
    setup.pool = "size = 2\ncheckout_timeout = \"3s\"".into();
    std::fs::write(&path, setup.toml()).unwrap();
    console.simple_query("RELOAD").await.expect("a valid file reloads");
    let (_, rows) = show(&console, "SHOW CONFIG").await;
    let size = rows.iter().find(|r| r[0] == "pool.size").unwrap();
    assert_eq!(size[1], "2");
    let fresh = connect(&proxy, &newcomer).await.expect("the new user logs in");
    fresh.query_one("SELECT 1", &[]).await.unwrap();
    client
        .batch_execute("SELECT 2; COMMIT")
        .await
        .expect("the connected client carried on, mid-transaction");

    std::fs::write(&path, setup.toml().replace("[pool]", "[pool]\nsizee = 3")).unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err), "22023", "{}", describe(&err));
    assert!(
        describe(&err).contains("sizee"),
        "the problem names the key: {}",
        describe(&err)
    );
    let (_, rows) = show(&console, "SHOW CONFIG").await;
    assert_eq!(
        rows.iter().find(|r| r[0] == "pool.size").unwrap()[1],
        "2",
        "the running configuration stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_servers_and_kill() {
    let user = create_user("adm_kill").await;
    let admin = console_admin("console_admin7");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = admin_client(&proxy, &admin).await;
    let url = format!("{}?application_name=killme", url(&proxy, &user));
    let (a, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let b = connect(&proxy, &user).await.unwrap();
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    b.query_one("SELECT 1", &[]).await.unwrap();

    let (cols, rows) = show(&console, "SHOW CLIENTS").await;
    assert_eq!(cols[..4], ["type", "user", "database", "state"]);
    let mine: Vec<_> = rows.iter().filter(|r| r[1] == user.name).collect();
    assert_eq!(mine.len(), 2, "{rows:?}");
    let a_row = mine.iter().find(|r| r[17] == "killme").expect("a by application_name");
    assert_eq!(a_row[3], "active", "a holds a server connection in its transaction");
    let (_, servers) = show(&console, "SHOW SERVERS").await;
    let states: Vec<&str> = servers
        .iter()
        .filter(|r| r[1] == user.name)
        .map(|r| r[3].as_str())
        .collect();
    assert!(states.contains(&"active") && states.contains(&"idle"), "{servers:?}");
    // This binary's cluster takes TLS, and the default sslmode (prefer) uses it.
    assert!(
        servers.iter().filter(|r| r[1] == user.name).all(|r| r[16] == "TLS"),
        "{servers:?}"
    );

    console
        .simple_query(&format!("KILL_CLIENT {}", a_row[13]))
        .await
        .unwrap();
    let err = a.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{}", describe(&err));
    assert_eq!(
        b.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2,
        "others untouched"
    );
    let name = user.name.clone();
    assert!(
        no_transaction_left_open(&name, std::time::Duration::from_secs(5)).await,
        "the killed client's transaction was rolled back"
    );

    console.simple_query("KILL appdb").await.unwrap();
    let err = b.query_one("SELECT 3", &[]).await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{}", describe(&err));
    let err = console.simple_query("KILL_CLIENT 999999").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42704");
    // New clients are served after a KILL.
    connect(&proxy, &user)
        .await
        .unwrap()
        .query_one("SELECT 4", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_enable_and_reconnect() {
    let user = create_user("adm_disable").await;
    let admin = console_admin("console_admin8");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = admin_client(&proxy, &admin).await;
    let client = connect(&proxy, &user).await.unwrap();
    let before: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);

    console.simple_query("DISABLE appdb").await.unwrap();
    let Err(err) = connect(&proxy, &user).await else {
        panic!("a disabled database accepted a client");
    };
    assert_eq!(sqlstate(&err), "57P03", "{}", describe(&err));
    assert_eq!(show(&console, "SHOW DATABASES").await.1[0][12], "1");
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("connected clients carry on");
    console.simple_query("ENABLE appdb").await.unwrap();
    connect(&proxy, &user).await.expect("enabled again");

    console.simple_query("RECONNECT appdb").await.unwrap();
    let after: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(before, after, "RECONNECT replaced the server connection");
    let err = console.simple_query("DISABLE nosuch").await.unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_close_waits_for_connections_a_reconnect_replaces() {
    let user = create_user("adm_wait").await;
    let admin = console_admin("console_admin9");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = admin_client(&proxy, &admin).await;
    let a = connect(&proxy, &user).await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    let before: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let close_needed = |servers: &[Vec<String>]| -> Vec<String> {
        servers
            .iter()
            .filter(|r| r[1] == user.name && r[3] == "active")
            .map(|r| r[12].clone())
            .collect()
    };
    let (cols, servers) = show(&console, "SHOW SERVERS").await;
    assert_eq!(cols[12], "close_needed");
    assert_eq!(close_needed(&servers), ["0"]);
    console.simple_query("WAIT_CLOSE").await.expect("nothing to wait for");

    console.simple_query("RECONNECT appdb").await.unwrap();
    assert_eq!(close_needed(&show(&console, "SHOW SERVERS").await.1), ["1"]);
    let waiter = admin_client(&proxy, &admin).await;
    let wait = tokio::spawn(async move { waiter.simple_query("WAIT_CLOSE appdb").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !wait.is_finished(),
        "WAIT_CLOSE returned while the old connection is in use"
    );
    a.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .expect("WAIT_CLOSE returns once the connection is given back")
        .unwrap()
        .unwrap();
    let after: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(before, after, "the replaced connection was closed");
    let err = console.simple_query("WAIT_CLOSE nosuch").await.unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_server_connection_was_lost_is_listed_without_it() {
    let user = create_user("adm_lost").await;
    let admin = console_admin("console_admin_lost");
    let proxy = admin_setup(&user, &admin).start().await;
    let console = admin_client(&proxy, &admin).await;
    let client = connect(&proxy, &user).await.unwrap();
    let link_of = |rows: &[Vec<String>]| {
        rows.iter()
            .find(|r| r[1] == user.name)
            .map(|r| r[14].clone())
            .expect("the client's row")
    };
    let name = user.name.clone();
    let killer = tokio::spawn(async move {
        let su = superuser().await;
        eventually(std::time::Duration::from_secs(5), || async {
            let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'";
            !su.query(sql, &[&name]).await.unwrap().is_empty()
        })
        .await
    });
    let err = client.query_one("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert!(killer.await.unwrap());
    assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
    // The client stays, idle, and holds nothing: not the backend that is gone.
    let (cols, rows) = show(&console, "SHOW CLIENTS").await;
    assert_eq!(cols[14], "link");
    assert_eq!(link_of(&rows), "", "{rows:?}");
    let (_, servers) = show(&console, "SHOW SERVERS").await;
    assert!(!servers.iter().any(|r| r[1] == user.name), "{servers:?}");
    client.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let (_, rows) = show(&console, "SHOW CLIENTS").await;
    assert_eq!(
        link_of(&rows),
        pid.to_string(),
        "a new one, held inside its transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_statement_renaming_off_by_reload_applies_to_connected_clients_at_once() {
    let user = create_user("adm_renaming").await;
    let admin = console_admin("console_admin_renaming");
    let mut setup = admin_setup(&user, &admin);
    let (proxy, _dir, path) = start_from_file(&mut setup).await;
    let console = admin_client(&proxy, &admin).await;
    let client = connect(&proxy, &user).await.unwrap();
    // The server-side names of the statements prepared on the connection the
    // client holds inside a transaction, after it prepares `sql` there.
    let names_after_preparing = |sql: &'static str| {
        let client = &client;
        async move {
            client.batch_execute("BEGIN").await.unwrap();
            client.prepare(sql).await.unwrap();
            let rows = client
                .query("SELECT name FROM pg_prepared_statements", &[])
                .await
                .unwrap();
            client.batch_execute("COMMIT").await.unwrap();
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
        }
    };
    let renamed = names_after_preparing("SELECT 1").await;
    assert!(
        !renamed.is_empty() && renamed.iter().all(|n| n.starts_with("dbp_")),
        "{renamed:?}"
    );

    setup.pool = "max_prepared_statements = 0".into();
    std::fs::write(&path, setup.toml()).unwrap();
    console.simple_query("RELOAD").await.expect("a valid file reloads");
    let names = names_after_preparing("SELECT 2").await;
    assert!(names.iter().any(|n| !n.starts_with("dbp_")), "{names:?}");
}
