//! Pool bounds, fairness, checkout timeout and the two pooling modes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use dbproxy::config::ServerAddr;
use dbproxy::pool::{Pool, PoolKey, PoolSettings, Role};
use dbproxy::server_conn::LoginTarget;

use tokio_postgres::types::Type;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_five_server_connections() {
    let user = create_user("many").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 5\ncheckout_timeout = \"30s\"")
        .start()
        .await;
    let peak = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (peak, done, name) = (peak.clone(), done.clone(), user.name.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(backends(&name, None).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let proxy = Arc::new(proxy);
    let clients = (0..200).map(|i| {
        let (proxy, user) = (proxy.clone(), user.clone());
        tokio::spawn(async move {
            let client = connect(&proxy, &user).await?;
            for j in 0..5 {
                // Unnamed statements (Parse/Bind/Execute/Sync in one batch). Named
                // statements across transactions are covered with the
                // prepared-statement work.
                let rows = client
                    .query_typed(
                        "SELECT $1::int4 + $2::int4, pg_sleep(0.002)::text",
                        &[(&i, Type::INT4), (&j, Type::INT4)],
                    )
                    .await?;
                assert_eq!(rows[0].get::<_, i32>(0), i + j);
            }
            Ok::<_, tokio_postgres::Error>(())
        })
    });
    let results = futures_util::future::join_all(clients).await;
    done.store(true, Ordering::Relaxed);
    monitor.await.unwrap();
    assert_all_succeeded(results);
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        (1..=5).contains(&peak),
        "the server saw {peak} backends for a pool of 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sequential_connections_reuse_the_pool() {
    let user = create_user("seq").await;
    let proxy = Setup::new(&[&user]).pool("size = 3").start().await;
    for i in 0..300 {
        let client = connect(&proxy, &user).await.unwrap();
        assert_eq!(
            client
                .query_one("SELECT $1::int4", &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0),
            i
        );
    }
    let n = backends(&user.name, None).await;
    assert!(
        (1..=3).contains(&n),
        "{n} backends after 300 connections on a pool of 3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_gives_a_clear_error_and_the_client_goes_on() {
    let user = create_user("wait").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"300ms\"")
        .start()
        .await;
    let holder = connect(&proxy, &user).await.unwrap();
    let waiter = connect(&proxy, &user).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let started = std::time::Instant::now();
    let err = waiter.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(sqlstate(&err), "57014", "{}", describe(&err));
    assert!(describe(&err).contains("timeout"), "{}", describe(&err));
    // Extended protocol failure is followed by a usable connection too.
    let err = waiter.query("SELECT $1::int4", &[&1i32]).await.unwrap_err();
    assert!(describe(&err).contains("timeout"), "{}", describe(&err));

    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiter.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
    assert_eq!(holder.query_one("SELECT 8", &[]).await.unwrap().get::<_, i32>(0), 8);
}

/// The fairness test the pool must pass: 200 tasks on a pool of 4, each
/// holding a real server connection for 1 ms, with a 500 ms checkout timeout.
/// A first-come-first-served pool times nobody out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_serves_waiters_first_come_first_served() {
    let user = create_user("fair").await;
    let addr = ServerAddr {
        host: "127.0.0.1".into(),
        port: cluster().primary,
    };
    let key = PoolKey {
        database: "appdb".into(),
        user: user.name.clone(),
        addr: addr.clone(),
        role: Role::Primary,
    };
    let target = LoginTarget {
        addr,
        dbname: "appdb".into(),
        user: user.name.clone(),
        password: user.password.clone(),
        tls: dbproxy::tls::ServerTls::disabled().into(),
        salted: Default::default(),
        serializable_conns: None,
    };
    let settings = PoolSettings {
        size: 4,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };
    let pool = Arc::new(Pool::new(key, target, settings));
    // Warm the pool so connection set-up is not part of the measurement.
    let warm: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.checkout(Duration::from_secs(5)))).await;
    for c in warm {
        c.unwrap().checkin();
    }
    let tasks = (0..200).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let conn = pool.checkout(Duration::from_millis(500)).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            conn.checkin();
            Ok::<_, dbproxy::pool::CheckoutError>(())
        })
    });
    let results = futures_util::future::join_all(tasks).await;
    let timeouts = results.iter().filter(|r| !matches!(r, Ok(Ok(())))).count();
    assert_eq!(timeouts, 0, "{timeouts} of 200 checkouts timed out");
    assert_eq!(backends(&user.name, None).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_settings_and_resets_them_for_the_next_client() {
    let user = create_user("sess").await;
    let proxy = Setup::new(&[&user]).pool("mode = \"session\"\nsize = 1").start().await;
    let first = connect(&proxy, &user).await.unwrap();
    first.batch_execute("SET work_mem = '7MB'").await.unwrap();
    let pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let wm: String = first.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "7MB");
    drop(first);

    let second = connect(&proxy, &user).await.unwrap();
    let row = second
        .query_one("SELECT pg_backend_pid(), current_setting('work_mem')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the one server connection is reused");
    assert_eq!(row.get::<_, String>(1), "4MB", "DISCARD ALL ran between clients");
}
