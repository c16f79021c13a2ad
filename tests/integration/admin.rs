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

fn admin_setup(user: &TestUser, admin: &TestUser) -> Setup {
    let mut setup = Setup::new(&[user, admin]);
    setup.proxy = format!("admin_users = [\"{}\"]", admin.name);
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_have_pgbouncer_columns_and_real_values() {
    let user = create_user("adm_app").await;
    let admin = TestUser {
        name: "console_admin".into(),
        password: "console-secret".into(),
    };
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
    let admin = TestUser {
        name: "console_admin2".into(),
        password: "console-secret2".into(),
    };
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
    let admin = TestUser {
        name: "console_admin3".into(),
        password: "console-secret3".into(),
    };
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
