//! Read/write splitting against a real primary and two streaming replicas of
//! this binary's own, so servers can be stopped and delayed without
//! disturbing other tests. Which server answered is read from `pg_settings`.

#[path = "../integration/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use harness::*;
use tokio::sync::RwLock;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// Tests that stop or delay servers run alone.
static DISRUPTION: RwLock<()> = RwLock::const_new(());

const PORT_SQL: &str = "SELECT setting FROM pg_settings WHERE name = 'port'";

fn split_setup(user: &TestUser) -> Setup {
    let mut setup = Setup::new(&[user]);
    setup.routing = "read_write_split = true\nhealth_check_interval = \"100ms\"".to_owned();
    setup
}

/// [`split_setup`] for `user`, with the health monitor logging in as
/// `monitor` (so `user`'s pools serve its clients alone).
fn split_setup_beside(monitor: &TestUser, user: &TestUser) -> Setup {
    let mut setup = split_setup(monitor);
    setup.users.push(user.clone());
    setup
}

async fn port_of(client: &Client, sql: &str) -> u16 {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql} returned no port"))
}

/// Waits until the monitor has put both replicas in rotation.
async fn replicas_ready(client: &Client) {
    let want: BTreeSet<u16> = cluster().replicas.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let start = Instant::now();
    while seen != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replicas never served reads (saw {seen:?})"
        );
        let p = port_of(client, PORT_SQL).await;
        if want.contains(&p) {
            seen.insert(p);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Round robin, for a user other than the one the health monitor logs in as
/// (so its replica pools start empty: each read that finds no idle
/// connection opens one on the replica whose turn it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_parameterised_reads_alternate_between_the_replicas() {
    let _shared = DISRUPTION.read().await;
    let monitor = create_user("rr_monitor").await;
    let user = create_user("rr").await;
    let proxy = split_setup_beside(&monitor, &user).start().await;
    replicas_ready(&connect(&proxy, &monitor).await.unwrap()).await;
    let client = connect(&proxy, &user).await.unwrap();
    let replicas: BTreeSet<u16> = cluster().replicas.iter().copied().collect();
    let mut simple = Vec::new();
    for _ in 0..6 {
        simple.push(port_of(&client, PORT_SQL).await);
    }
    assert!(simple.iter().all(|p| replicas.contains(p)), "{simple:?}");
    assert!(
        simple.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates: {simple:?}"
    );
    let stmt = client
        .prepare("SELECT setting::int4 FROM pg_settings WHERE name = $1")
        .await
        .unwrap();
    let mut extended = Vec::new();
    for _ in 0..6 {
        let row = client.query_one(&stmt, &[&"port"]).await.unwrap();
        extended.push(row.get::<_, i32>(0) as u16);
        let rows = client.query_typed(PORT_SQL, &[]).await.unwrap();
        extended.push(rows[0].get::<_, String>(0).parse().unwrap());
    }
    assert!(extended.iter().all(|p| replicas.contains(p)), "{extended:?}");
    assert_eq!(extended.iter().collect::<BTreeSet<_>>().len(), 2, "{extended:?}");
}

/// Least connections counts what a replica serves for every user and
/// database: while one user's transaction holds a connection to one replica,
/// another user's reads go to the other (its own pools there are empty
/// alike). The monitor checks once a second, so its own checks hardly ever
/// count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_every_users_connections_to_a_replica() {
    let _shared = DISRUPTION.read().await;
    let holder = create_user("lc_holder").await;
    let reader = create_user("lc_reader").await;
    let mut setup = split_setup_beside(&holder, &reader);
    setup.routing =
        "read_write_split = true\nbalance = \"least_connections\"\nhealth_check_interval = \"1s\"".to_owned();
    let proxy = setup.start().await;
    let holding = connect(&proxy, &holder).await.unwrap();
    replicas_ready(&holding).await;
    holding.batch_execute("BEGIN READ ONLY").await.unwrap();
    let busy = port_of(&holding, PORT_SQL).await;
    assert!(cluster().replicas.contains(&busy), "{busy}");

    let client = connect(&proxy, &reader).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(port_of(&client, PORT_SQL).await);
    }
    let idle: Vec<u16> = cluster().replicas.iter().copied().filter(|&p| p != busy).collect();
    assert!(
        seen.iter().all(|p| idle.contains(p)),
        "reads while replica {busy} serves a transaction: {seen:?}"
    );
    holding.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_reaches_the_primary() {
    let _shared = DISRUPTION.read().await;
    let user = create_user("writes").await;
    let proxy = split_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE w (id serial primary key, v int); CREATE SEQUENCE s; \
             CREATE FUNCTION audit_insert() RETURNS int VOLATILE LANGUAGE sql AS 'INSERT INTO w (v) VALUES (0) RETURNING 1';",
        )
        .await
        .unwrap();
    replicas_ready(&client).await;
    let primary = cluster().primary;
    let port = "(SELECT setting FROM pg_settings WHERE name = 'port')";
    let cases = [
        format!("INSERT INTO w (v) VALUES (1) RETURNING {port}"),
        format!("UPDATE w SET v = v + 1 WHERE id = 1 RETURNING {port}"),
        format!("DELETE FROM w WHERE v = -1 RETURNING {port}; SELECT {port}"),
        format!("SELECT {port} FROM w LIMIT 1 FOR UPDATE"),
        format!("select {port} from w limit 1 for   share"),
        format!("WITH ins AS (INSERT INTO w (v) VALUES (2) RETURNING id) SELECT {port} FROM ins"),
        format!("SELECT nextval('s'), {port}"),
        format!("SELECT pg_advisory_xact_lock(7), {port}"),
        format!("SELECT txid_current(), {port}"),
        format!("SELECT audit_insert(), {port}"),
        format!("SELECT random(), {port}"),
    ];
    for sql in &cases {
        for _ in 0..3 {
            let rows = client
                .simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
            let got: Vec<u16> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(r.len() - 1).and_then(|v| v.parse().ok()),
                    _ => None,
                })
                .collect();
            assert!(
                !got.is_empty() && got.iter().all(|&p| p == primary),
                "{sql} ran on {got:?}"
            );
        }
    }
    // Parameterised writes through the extended protocol.
    for i in 0..3 {
        let rows = client
            .query_typed(
                &format!("INSERT INTO w (v) VALUES ($1) RETURNING {port}"),
                &[(&i, Type::INT4)],
            )
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, String>(0).parse::<u16>().unwrap(), primary);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_stay_on_one_server() {
    let _shared = DISRUPTION.read().await;
    let user = create_user("tx").await;
    let proxy = split_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("CREATE TABLE tx_t (v int)").await.unwrap();
    replicas_ready(&client).await;
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        port_of(&client, PORT_SQL).await,
        cluster().primary,
        "a read-write transaction starts on the primary"
    );
    client.batch_execute("INSERT INTO tx_t VALUES (1)").await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM tx_t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "the transaction sees its own insert");
    client.batch_execute("COMMIT").await.unwrap();

    // A client that has not written (this one just did, so read-your-writes
    // would rightly keep it on the primary until the replicas catch up).
    let reader = connect(&proxy, &user).await.unwrap();
    reader.batch_execute("BEGIN READ ONLY").await.unwrap();
    let a = port_of(&reader, PORT_SQL).await;
    let b = port_of(&reader, PORT_SQL).await;
    reader.batch_execute("COMMIT").await.unwrap();
    assert_eq!(a, b);
    assert!(
        cluster().replicas.contains(&a),
        "a read-only transaction may run on a replica"
    );

    // A pipelined batch with a read and then a write runs where the write can.
    let (p1, p2) = tokio::join!(
        client.query_typed(PORT_SQL, &[]),
        client.query_typed("INSERT INTO tx_t VALUES (2) RETURNING 1", &[])
    );
    p1.unwrap();
    p2.expect("a write pipelined behind a read never lands on a replica");
}

/// Sets `recovery_min_apply_delay` on both replicas.
async fn replica_delay(ms: u64) {
    let c = cluster();
    for (i, port) in c.replicas.iter().enumerate() {
        let conf = c.dir.join(format!("replica{}", i + 1)).join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("recovery_min_apply_delay"))
            .collect();
        let line = format!("recovery_min_apply_delay = '{ms}ms'");
        lines.push(&line);
        std::fs::write(&conf, lines.join("\n") + "\n").unwrap();
        let client = superuser_on(*port).await;
        client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_always_reads_its_own_writes_even_from_lagging_replicas() {
    let _alone = DISRUPTION.write().await;
    let user = create_user("ryw").await;
    let proxy = split_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("CREATE TABLE ryw_t (id int)").await.unwrap();
    replicas_ready(&client).await;
    replica_delay(1500).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        client.execute("INSERT INTO ryw_t VALUES ($1)", &[&i]).await.unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM ryw_t WHERE id = $1", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "write {i} is visible to the same client's next read");
    }
    // Another client, which wrote nothing, may read from the (lagging) replicas meanwhile.
    replica_delay(0).await;
    let start = Instant::now();
    loop {
        let p = port_of(&client, PORT_SQL).await;
        if cluster().replicas.contains(&p) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "reads never returned to the replicas"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "reads back on replicas {:?} after the replicas caught up",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_leaves_rotation_and_comes_back() {
    let _alone = DISRUPTION.write().await;
    let user = create_user("repl_down").await;
    let proxy = split_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    replicas_ready(&client).await;
    let c = cluster();
    let (mut ok, mut failed) = (0, 0);
    let start = Instant::now();
    let mut stopped = false;
    while start.elapsed() < Duration::from_secs(3) {
        if !stopped && start.elapsed() > Duration::from_millis(500) {
            c.stop_node("replica1");
            stopped = true;
        }
        match client.simple_query(PORT_SQL).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    assert!(
        failed <= 1,
        "{failed} reads failed while a replica stopped ({ok} succeeded)"
    );
    let survivors: BTreeSet<u16> = {
        let mut s = BTreeSet::new();
        for _ in 0..6 {
            s.insert(port_of(&client, PORT_SQL).await);
        }
        s
    };
    assert!(!survivors.contains(&c.replicas[0]), "{survivors:?}");
    c.start_node("replica1");
    let back = Instant::now();
    loop {
        if port_of(&client, PORT_SQL).await == c.replicas[0] {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(15), "the replica never rejoined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "replica rejoined {:?} after restart; {failed} of {} reads failed",
        back.elapsed(),
        ok + failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_reads_work_and_writes_fail_clearly_then_recover() {
    let _alone = DISRUPTION.write().await;
    let user = create_user("prim_down").await;
    let proxy = split_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("CREATE TABLE pd (v int)").await.unwrap();
    replicas_ready(&client).await;
    let c = cluster();
    c.stop_node("primary");
    let result = async {
        // Reads keep working on the replicas, for old and new clients.
        for _ in 0..4 {
            assert!(c.replicas.contains(&port_of(&client, PORT_SQL).await));
        }
        let fresh = connect(&proxy, &user).await.expect("login works with the primary down");
        assert!(c.replicas.contains(&port_of(&fresh, PORT_SQL).await));
        let started = Instant::now();
        let err = client
            .batch_execute("INSERT INTO pd VALUES (1)")
            .await
            .expect_err("no primary");
        assert!(started.elapsed() < Duration::from_secs(3), "writes fail quickly");
        assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
        assert!(describe(&err).contains(&c.primary.to_string()), "{}", describe(&err));
    };
    // Restart the primary whatever happened, then report.
    let outcome = std::panic::AssertUnwindSafe(result).catch_unwind().await;
    c.start_node("primary");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let back = Instant::now();
    loop {
        match client.batch_execute("INSERT INTO pd VALUES (2)").await {
            Ok(()) => break,
            Err(e) => assert!(
                back.elapsed() < Duration::from_secs(15),
                "writes never recovered: {}",
                describe(&e)
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("writes recovered {:?} after the primary restarted", back.elapsed());
}

/// Runs `body`, then thaws `node` whatever happened.
async fn while_frozen<F: std::future::Future<Output = ()>>(node: &str, body: F) {
    let c = cluster();
    c.freeze_node(node);
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;
    c.thaw_node(node);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn frozen_setup(user: &TestUser) -> Setup {
    let mut setup = Setup::new(&[user]);
    setup.routing =
        "read_write_split = true\nhealth_check_interval = \"100ms\"\nhealth_check_timeout = \"500ms\"".to_owned();
    setup.pool = "size = 5\ncheckout_timeout = \"2s\"\nserver_connect_timeout = \"1s\"".to_owned();
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_leaves_rotation_and_nobody_hangs() {
    let _alone = DISRUPTION.write().await;
    let user = create_user("repl_frozen").await;
    let proxy = frozen_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    replicas_ready(&client).await;
    let c = cluster();
    let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    while_frozen("replica1", async {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(5), client.simple_query(PORT_SQL))
                .await
                .expect("a read hung on the frozen replica");
            slowest = slowest.max(t.elapsed());
            match result {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(sqlstate(&e).starts_with("08"), "{}", describe(&e));
                    assert!(describe(&e).contains("stopped responding"), "{}", describe(&e));
                    failed += 1;
                }
            }
        }
        // Out of rotation: every read now goes to the other replica.
        for _ in 0..6 {
            assert_eq!(port_of(&client, PORT_SQL).await, c.replicas[1]);
        }
    })
    .await;
    assert!(failed <= 1, "{failed} reads failed ({ok} succeeded)");
    assert!(slowest < Duration::from_secs(3), "a read took {slowest:?}");
    let back = Instant::now();
    while port_of(&client, PORT_SQL).await != c.replicas[0] {
        assert!(back.elapsed() < Duration::from_secs(15), "the replica never rejoined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "frozen replica: {failed} of {} reads failed, slowest {slowest:?}; rejoined {:?} after SIGCONT",
        ok + failed,
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_fails_writes_after_the_timeout_and_recovers() {
    let _alone = DISRUPTION.write().await;
    let user = create_user("prim_frozen").await;
    let proxy = frozen_setup(&user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("CREATE TABLE pf (v int)").await.unwrap();
    replicas_ready(&client).await;
    let c = cluster();
    let mut in_tx = connect(&proxy, &user).await.unwrap();
    let tx = in_tx.transaction().await.unwrap();
    tx.execute("INSERT INTO pf VALUES (1)", &[]).await.unwrap();
    while_frozen("primary", async {
        // The open transaction's next statement: an error after the timeout, not a hang.
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), tx.execute("INSERT INTO pf VALUES (2)", &[]))
            .await
            .expect("a write hung on the frozen primary")
            .expect_err("the primary is frozen");
        let took = started.elapsed();
        assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
        assert!(took >= Duration::from_millis(400), "gave up after only {took:?}");
        eprintln!("in-transaction write failed after {took:?}: {}", describe(&err));
        // New writes fail within the timeouts too; reads keep working on the replicas.
        for _ in 0..3 {
            let started = Instant::now();
            let err = tokio::time::timeout(
                Duration::from_secs(5),
                client.batch_execute("INSERT INTO pf VALUES (3)"),
            )
            .await
            .expect("a write hung on the frozen primary")
            .expect_err("the primary is frozen");
            assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
            if describe(&err).contains("stopped responding") {
                assert!(describe(&err).contains("may still take effect"), "{}", describe(&err));
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "took {:?}",
                started.elapsed()
            );
            assert!(c.replicas.contains(&port_of(&client, PORT_SQL).await));
        }
    })
    .await;
    drop(tx);
    drop(in_tx);
    let back = Instant::now();
    while let Err(e) = client.batch_execute("INSERT INTO pf VALUES (4)").await {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "writes never recovered: {}",
            describe(&e)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("writes recovered {:?} after SIGCONT", back.elapsed());
    // The frozen transaction never committed and nothing is left open. An
    // autocommit INSERT that was in flight when the primary froze runs when it
    // resumes, before it sees the hang-up: its outcome was unknown, as on a
    // direct connection that times out, and the error said so.
    let rows: Vec<i32> = client
        .query("SELECT DISTINCT v FROM pf ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(rows == vec![4] || rows == vec![3, 4], "{rows:?}");
    assert!(
        no_transaction_left_open(&user.name, Duration::from_secs(10)).await,
        "a transaction was left open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_holding_every_connection_to_a_frozen_primary_are_released() {
    // The health check cannot borrow a connection (the client holds the only
    // one), so it probes the server without logging in.
    let _alone = DISRUPTION.write().await;
    let user = create_user("prim_frozen_full").await;
    let mut setup = frozen_setup(&user);
    setup.pool = "size = 1\ncheckout_timeout = \"2s\"\nserver_connect_timeout = \"1s\"".to_owned();
    let proxy = setup.start().await;
    let mut client = connect(&proxy, &user).await.unwrap();
    client.batch_execute("CREATE TABLE pff (v int)").await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO pff VALUES (1)", &[]).await.unwrap();
    while_frozen("primary", async {
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(6), tx.execute("INSERT INTO pff VALUES (2)", &[]))
            .await
            .expect("a client holding the only connection hung on the frozen primary")
            .expect_err("the primary is frozen");
        assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
        eprintln!("released after {:?} with the pool full", started.elapsed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_leaves_the_read_rotation() {
    let _alone = DISRUPTION.write().await;
    let c = cluster();
    let user = create_user("repl_promoted").await;
    // A replica of this test's own: promoting it must not disturb the others.
    let port = c.add_replica("replica3");
    let mut setup = split_setup(&user);
    setup.replicas = Some(vec![port]);
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let start = Instant::now();
    while port_of(&client, PORT_SQL).await != port {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new replica never served reads"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.promote_node("replica3");
    let promoted = Instant::now();
    // It answers still, but is no replica of the primary any more: reads
    // written on the primary would not show there.
    while port_of(&client, PORT_SQL).await != c.primary {
        assert!(
            promoted.elapsed() < Duration::from_secs(10),
            "reads stayed on the promoted server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        assert_eq!(port_of(&client, PORT_SQL).await, c.primary, "it stays out of rotation");
    }
    eprintln!(
        "a promoted replica left the rotation {:?} after the promotion",
        promoted.elapsed()
    );
    c.stop_node("replica3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_splitting_clients_stuck_on_a_frozen_primary_are_released() {
    // No health monitor runs without splitting; a probe of the primary that
    // does not log in watches it instead.
    let _alone = DISRUPTION.write().await;
    let user = create_user("prim_frozen_nosplit").await;
    let mut setup = frozen_setup(&user);
    setup.routing = "read_write_split = false\nhealth_check_timeout = \"500ms\"".to_owned();
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let mut in_tx = connect(&proxy, &user).await.unwrap();
    let tx = in_tx.transaction().await.unwrap();
    tx.batch_execute("SELECT 1").await.unwrap();
    while_frozen("primary", async {
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(8), tx.batch_execute("SELECT 2"))
            .await
            .expect("a query hung on the frozen primary")
            .expect_err("the primary is frozen");
        assert!(sqlstate(&err).starts_with("08"), "{}", describe(&err));
        assert!(describe(&err).contains("stopped responding"), "{}", describe(&err));
        eprintln!(
            "in-transaction query failed after {:?}: {}",
            started.elapsed(),
            describe(&err)
        );
    })
    .await;
    drop(tx);
    drop(in_tx);
    let back = Instant::now();
    while let Err(e) = client.batch_execute("SELECT 3").await {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "never recovered: {}",
            describe(&e)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        no_transaction_left_open(&user.name, Duration::from_secs(10)).await,
        "a transaction was left open"
    );
}

/// Splitting turned on by a reload, for a database whose servers did not
/// change: its replicas get a health monitor and join the rotation, and
/// `/readyz` stays ready; turned off again, reads go to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitting_turned_on_by_a_reload_brings_the_replicas_in() {
    let user = create_user("repl_reload").await;
    let mut setup = split_setup(&user);
    let split_on = setup.routing.clone();
    let split_off = split_on.replace("read_write_split = true", "read_write_split = false");
    setup.routing = split_off.clone();
    setup.proxy.push_str("\nmetrics_listen = \"127.0.0.1:0\"");
    let (proxy, _dir, path) = start_from_file(&mut setup).await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    let primary = cluster().primary;
    let client = connect(&proxy, &user).await.unwrap();
    assert_eq!(port_of(&client, PORT_SQL).await, primary);
    assert!(http_get(metrics, "/readyz").await.0.contains("200"));

    setup.routing = split_on;
    std::fs::write(&path, setup.toml()).unwrap();
    proxy.shared().reload().expect("the new file reloads");
    let fresh = connect(&proxy, &user).await.unwrap();
    replicas_ready(&fresh).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(metrics, "/readyz").await.0.contains("200")
        })
        .await,
        "/readyz never answered 200 with splitting on"
    );

    setup.routing = split_off;
    std::fs::write(&path, setup.toml()).unwrap();
    proxy.shared().reload().expect("the new file reloads");
    let last = connect(&proxy, &user).await.unwrap();
    for _ in 0..4 {
        assert_eq!(port_of(&last, PORT_SQL).await, primary, "splitting is off again");
    }
    assert!(http_get(metrics, "/readyz").await.0.contains("200"));
}

/// The health monitor logs in as the first user. A reload that changes that
/// user's password (rotated on the servers too) starts the monitor again with
/// new pools: once the connections that logged in with the old password are
/// gone, its checks still log in and the replicas stay in the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_whose_password_was_rotated_keeps_the_replicas_in() {
    let _shared = DISRUPTION.read().await;
    let user = create_user("repl_rotate").await;
    let mut setup = split_setup(&user);
    let (proxy, _dir, path) = start_from_file(&mut setup).await;
    replicas_ready(&connect(&proxy, &user).await.unwrap()).await;

    let rotated = TestUser {
        name: user.name.clone(),
        password: format!("{}-rotated", user.password),
    };
    let sql = format!("ALTER ROLE {} PASSWORD '{}'", rotated.name, rotated.password);
    superuser().await.batch_execute(&sql).await.unwrap();
    setup.users = vec![rotated.clone()];
    std::fs::write(&path, setup.toml()).unwrap();
    proxy.shared().reload().expect("the new file reloads");
    // Let the replicas replay the new password, then end every connection
    // that logged in with the old one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for port in std::iter::once(cluster().primary).chain(cluster().replicas.iter().copied()) {
        let end = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1";
        superuser_on(port).await.execute(end, &[&rotated.name]).await.unwrap();
    }
    // Several rounds of checks (every 100 ms) later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    replicas_ready(&connect(&proxy, &rotated).await.unwrap()).await;
}

/// This binary's servers have TLS off: `server_tls.sslmode = "require"`
/// fails each request with a clear error instead of falling back to plain
/// text, and the default `prefer` uses plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_require_refuses_a_server_without_tls() {
    let user = create_user("srvtls_req").await;
    let setup = Setup::new(&[&user]);
    let text = format!("{}\n[server_tls]\nsslmode = \"require\"\n", setup.toml());
    let proxy = dbproxy::Proxy::start(dbproxy::Config::parse(&text).unwrap())
        .await
        .unwrap();
    let client = connect(&proxy, &user).await.expect("the login needs no server");
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(describe(&err).contains("does not accept TLS"), "{}", describe(&err));
    drop(client);
    drop(proxy);

    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let ssl: bool = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!ssl, "prefer against a server without TLS");
}

/// Waits until every replica has replayed `user`'s role settings.
async fn replicas_see_role_settings(user: &TestUser) {
    for &port in &cluster().replicas {
        let su = superuser_on(port).await;
        let seen = eventually(Duration::from_secs(10), || async {
            let sql =
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = $1";
            su.query_one(sql, &[&user.name]).await.unwrap().get::<_, i64>(0) > 0
        })
        .await;
        assert!(seen, "replica {port} never replayed the role's settings");
    }
}

/// A role whose transactions default to SERIALIZABLE (`ALTER ROLE ... SET
/// default_transaction_isolation`, which no statement of its clients shows)
/// cannot read on a hot standby ("cannot use serializable mode in a hot
/// standby"): its reads go to the primary and succeed, until the client sets
/// another default for itself. A health monitor logging in as such a role
/// still keeps the replicas in rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_whose_transactions_default_to_serializable_reads_from_the_primary() {
    let _shared = DISRUPTION.read().await;
    let plain = create_user("ser_plain").await;
    let serial = create_user("ser_role").await;
    let sql = format!(
        "ALTER ROLE {} SET default_transaction_isolation = 'serializable'",
        serial.name
    );
    superuser().await.batch_execute(&sql).await.unwrap();
    replicas_see_role_settings(&serial).await;
    let primary = cluster().primary;

    let proxy = split_setup_beside(&plain, &serial).start().await;
    replicas_ready(&connect(&proxy, &plain).await.unwrap()).await;
    let client = connect(&proxy, &serial).await.unwrap();
    let stmt = client.prepare(PORT_SQL).await.unwrap();
    for _ in 0..4 {
        assert_eq!(port_of(&client, PORT_SQL).await, primary, "a plain read");
        let row = client.query_one(&stmt, &[]).await.unwrap();
        assert_eq!(
            row.get::<_, String>(0).parse::<u16>().unwrap(),
            primary,
            "a prepared read"
        );
        let rows = client
            .simple_query("BEGIN READ ONLY; SHOW transaction_isolation; COMMIT")
            .await
            .unwrap();
        let level = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(level.as_deref(), Some("serializable"), "the role's default holds");
    }
    client
        .batch_execute("SET default_transaction_isolation = 'read committed'")
        .await
        .unwrap();
    replicas_ready(&client).await;
    client
        .batch_execute("RESET default_transaction_isolation")
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(port_of(&client, PORT_SQL).await, primary, "after RESET");
    }
    // Clients that set nothing never get the replica connections the role's
    // default made, even those another client used with its own setting.
    let other = connect(&proxy, &serial).await.unwrap();
    for _ in 0..4 {
        assert_eq!(port_of(&other, PORT_SQL).await, primary, "another client");
    }

    // The monitor logs in as the serializable role.
    let proxy = split_setup(&serial).start().await;
    let client = connect(&proxy, &serial).await.unwrap();
    client
        .batch_execute("SET default_transaction_isolation = 'repeatable read'")
        .await
        .unwrap();
    replicas_ready(&client).await;
}

/// A replica connection its client left defaulting to SERIALIZABLE (set
/// inside a read-only transaction there) is reset and kept: the reset query
/// (`DISCARD ALL`) takes a snapshot, which a standby refuses at SERIALIZABLE,
/// so it runs after dbproxy's own SET of another default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_connection_left_serializable_is_reset_and_kept() {
    let _shared = DISRUPTION.read().await;
    // Not the monitor's user: its checks would use the connection too.
    let monitor = create_user("ser_reset_monitor").await;
    let user = create_user("ser_reset").await;
    let proxy = split_setup_beside(&monitor, &user).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    replicas_ready(&client).await;
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    client
        .batch_execute("SET default_transaction_isolation = 'serializable'")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), setting::int4 FROM pg_settings WHERE name = 'port'",
            &[],
        )
        .await
        .unwrap();
    let (pid, port): (i32, i32) = (row.get(0), row.get(1));
    assert!(
        cluster().replicas.contains(&(port as u16)),
        "the transaction ran on a replica"
    );
    client.batch_execute("COMMIT").await.unwrap();
    let su = superuser_on(port as u16).await;
    let kept = eventually(Duration::from_secs(5), || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'idle' AND query = 'DISCARD ALL'";
        su.query_one(sql, &[&pid]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    assert!(kept, "the connection was reset and kept");
    let other = connect(&proxy, &user).await.unwrap();
    for _ in 0..4 {
        let p = port_of(&other, PORT_SQL).await;
        assert!(
            cluster().replicas.contains(&p),
            "another client's reads go to the replicas"
        );
        assert_eq!(
            port_of(&client, PORT_SQL).await,
            cluster().primary,
            "the client's own default holds"
        );
    }
}
