//! Transaction pooling the client cannot notice: named prepared statements,
//! session settings and session-only features, with clients interleaved on
//! small pools so each lands on different server connections.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_work_whatever_server_connection_serves_the_client() {
    let user = create_user("named").await;
    let proxy = Arc::new(
        Setup::new(&[&user])
            .pool("size = 3\ncheckout_timeout = \"30s\"")
            .start()
            .await,
    );
    let tasks = (0..50).map(|i: i32| {
        let (proxy, user) = (proxy.clone(), user.clone());
        tokio::spawn(async move {
            let client = connect(&proxy, &user).await?;
            let stmt = client.prepare("SELECT $1::int4 * 2, pg_backend_pid()").await?;
            for j in 0..20 {
                let row = client.query_one(&stmt, &[&(i + j)]).await?;
                assert_eq!(row.get::<_, i32>(0), (i + j) * 2);
            }
            // Ad hoc statements: prepared, executed and closed each time.
            for j in 0..5 {
                let row = client
                    .query_one("SELECT $1::text || '-' || $2::int4", &[&"k", &j])
                    .await?;
                assert_eq!(row.get::<_, String>(0), format!("k-{j}"));
            }
            Ok::<_, tokio_postgres::Error>(())
        })
    });
    let results = futures_util::future::join_all(tasks).await;
    assert_all_succeeded(results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_statement_timeout_never_touches_another_client() {
    let user = create_user("stmt_to").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"30s\"")
        .start()
        .await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    a.batch_execute("SET statement_timeout = '150ms'").await.unwrap();
    let a_task = tokio::spawn(async move {
        let mut codes = Vec::new();
        for _ in 0..4 {
            let err = a
                .batch_execute("SELECT pg_sleep(0.6)")
                .await
                .expect_err("A's timeout applies");
            codes.push(sqlstate(&err));
        }
        codes
    });
    let b_task = tokio::spawn(async move {
        for _ in 0..3 {
            b.batch_execute("SELECT pg_sleep(0.3)")
                .await
                .map_err(|e| describe(&e))?;
        }
        Ok::<_, String>(())
    });
    assert_eq!(a_task.await.unwrap(), ["57014"; 4]);
    b_task
        .await
        .unwrap()
        .expect("B is never cancelled by A's statement_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_follows_its_client_into_every_transaction() {
    let user = create_user("spath").await;
    let su = superuser().await;
    su.batch_execute(&format!(
        "CREATE SCHEMA sp_{0} AUTHORIZATION {0}; CREATE TABLE sp_{0}.only_here (v int); \
         INSERT INTO sp_{0}.only_here VALUES (7); ALTER TABLE sp_{0}.only_here OWNER TO {0}",
        user.name
    ))
    .await
    .unwrap();
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    a.batch_execute(&format!("SET search_path TO sp_{}, public", user.name))
        .await
        .unwrap();
    for _ in 0..6 {
        let v: i32 = a.query_one("SELECT v FROM only_here", &[]).await.unwrap().get(0);
        assert_eq!(v, 7);
        let path: String = b.query_one("SHOW search_path", &[]).await.unwrap().get(0);
        assert_eq!(path, "\"$user\", public", "B never sees A's search_path");
        b.batch_execute("SET search_path TO public").await.unwrap();
        b.batch_execute("RESET search_path").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_name_from_the_connection_string_is_what_the_server_shows() {
    let user = create_user("appname").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let connect_as = |app: &str| {
        let url = format!("{}?application_name={app}", url(&proxy, &user));
        async move {
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        }
    };
    let reporting = connect_as("reporting").await;
    let billing = connect_as("billing").await;
    let plain = connect(&proxy, &user).await.unwrap();
    let sql = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()";
    for _ in 0..3 {
        assert_eq!(
            reporting.query_one(sql, &[]).await.unwrap().get::<_, String>(0),
            "reporting"
        );
        assert_eq!(
            billing.query_one(sql, &[]).await.unwrap().get::<_, String>(0),
            "billing"
        );
        assert_eq!(plain.query_one(sql, &[]).await.unwrap().get::<_, String>(0), "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_session_level_sets_are_remembered() {
    let user = create_user("setlocal").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let other = connect(&proxy, &user).await.unwrap();
    a.batch_execute("BEGIN; SET LOCAL work_mem = '5MB'; COMMIT")
        .await
        .unwrap();
    other.batch_execute("SET work_mem = '9MB'").await.unwrap();
    assert_eq!(work_mem(&a).await, "4MB", "SET LOCAL is not remembered");
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET work_mem = '6MB'").await.unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "4MB", "a rolled-back SET is not remembered");
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "7MB", "a committed SET is remembered");
    a.batch_execute("SELECT set_config('work_mem', '3MB', false)")
        .await
        .unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "3MB");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "4MB");
    // Savepoints created and released (as ORMs nest transactions) keep what was set.
    a.batch_execute("BEGIN; SAVEPOINT s1; SET work_mem = '8MB'; SAVEPOINT s2")
        .await
        .unwrap();
    a.batch_execute("RELEASE SAVEPOINT s2; RELEASE s1").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "8MB", "a SET committed through released savepoints");
    // A rollback to a savepoint undoes only what came after the savepoint: in
    // one string...
    a.batch_execute("BEGIN; SET work_mem = '2MB'; SAVEPOINT s; SET work_mem = '1MB'; ROLLBACK TO s; COMMIT")
        .await
        .unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "2MB", "the SET before the savepoint");
    // ...as an ORM sends it (statement by statement, recovering from an
    // error), and through the extended protocol.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("SET work_mem = '3MB'", &[]).await.unwrap();
    a.batch_execute("SAVEPOINT orm_1").await.unwrap();
    a.execute("SET work_mem = '1MB'", &[]).await.unwrap();
    a.batch_execute("SAVEPOINT orm_2").await.unwrap();
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    a.batch_execute("ROLLBACK TO SAVEPOINT orm_2").await.unwrap();
    a.execute("SET work_mem = '5MB'", &[]).await.unwrap();
    a.batch_execute("RELEASE SAVEPOINT orm_2").await.unwrap();
    a.execute("ROLLBACK TO SAVEPOINT orm_1", &[]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "3MB", "the SET before the outer savepoint");
    // A request that fails part-way leaves what it set uncertain until its
    // savepoint is rolled back to.
    a.batch_execute("BEGIN; SET work_mem = '6MB'; SAVEPOINT s")
        .await
        .unwrap();
    assert!(a.batch_execute("SET work_mem = '1MB'; SELECT 1/0").await.is_err());
    a.batch_execute("ROLLBACK TO s; COMMIT").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "6MB");
    // A savepoint dbproxy cannot follow (created in a request that failed
    // part-way): the previous value is kept, and the server connection is
    // reset, so nobody else inherits anything.
    a.batch_execute("BEGIN; SET work_mem = '7MB'").await.unwrap();
    assert!(a.batch_execute("SAVEPOINT lost; SELECT 1/0").await.is_err());
    a.batch_execute("ROLLBACK TO lost; COMMIT").await.unwrap();
    assert_eq!(work_mem(&other).await, "9MB");
    assert_eq!(work_mem(&a).await, "6MB", "uncertain: the previous value");
    // A string that commits a SET and then fails: its connection is reset,
    // so a client without settings of its own does not inherit the SET.
    let plain = connect(&proxy, &user).await.unwrap();
    assert!(
        a.batch_execute("BEGIN; SET lock_timeout = '11s'; COMMIT; BEGIN; SELECT 1/0")
            .await
            .is_err()
    );
    a.batch_execute("ROLLBACK").await.unwrap();
    let lock_timeout: String = plain.query_one("SHOW lock_timeout", &[]).await.unwrap().get(0);
    assert_eq!(lock_timeout, "0", "nobody inherits the committed SET");
    // Transaction commands inside one string are followed.
    a.batch_execute("BEGIN; SET work_mem = '12MB'; ROLLBACK; SET work_mem = '13MB'")
        .await
        .unwrap();
    assert_eq!(work_mem(&plain).await, "4MB");
    assert_eq!(work_mem(&a).await, "13MB");
}

async fn work_mem(c: &tokio_postgres::Client) -> String {
    c.query_one("SHOW work_mem", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_touch_only_the_clients_own_view() {
    let user = create_user("discard").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    let stmt = a.prepare("SELECT $1::int4 + 1").await.unwrap();
    assert_eq!(a.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);
    b.batch_execute("DISCARD ALL").await.unwrap();
    b.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(a.query_one(&stmt, &[&2i32]).await.unwrap().get::<_, i32>(0), 3);
    let err = b.batch_execute("DEALLOCATE nope").await.unwrap_err();
    assert_eq!(sqlstate(&err), "26000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_works_in_transaction_mode_by_pinning_the_listener() {
    let user = create_user("listen").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let (listener, mut conn) = tokio_postgres::connect(&url(&proxy, &user), NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute("LISTEN dbproxy_test").await.unwrap();
    let notifier = connect(&proxy, &user).await.unwrap();
    for i in 0..3 {
        notifier
            .batch_execute(&format!("NOTIFY dbproxy_test, 'hello {i}'"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("notification arrives");
        assert_eq!(got.as_deref(), Some(format!("hello {i}").as_str()));
    }
    // Session-only features keep working across statements for pinned clients.
    let locker = connect(&proxy, &user).await.unwrap();
    drop(notifier);
    locker.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();
    let unlocked: bool = locker
        .query_one("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(unlocked, "the lock was taken on the same server connection");
    listener.batch_execute("UNLISTEN *").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_and_sql_prepare_pin_and_then_work() {
    let user = create_user("pinned").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    a.batch_execute("CREATE TEMP TABLE scratch (v int)").await.unwrap();
    a.batch_execute("INSERT INTO scratch VALUES (1), (2)").await.unwrap();
    b.batch_execute("SELECT 1").await.unwrap();
    let n: i64 = a.query_one("SELECT count(*) FROM scratch", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    b.batch_execute("PREPARE two AS SELECT 2").await.unwrap();
    a.batch_execute("SELECT 1").await.unwrap();
    let msgs = b.simple_query("EXECUTE two").await.unwrap();
    assert!(
        msgs.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    drop(a);
    drop(b);
    // Pinned clients leave reset connections behind: nobody inherits their temp table.
    let c = connect(&proxy, &user).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..4 {
        let err = c.query_one("SELECT count(*) FROM scratch", &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42P01", "{}", describe(&err));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_valued_startup_options_are_carried_as_lists() {
    let user = create_user("optlist").await;
    let su = superuser().await;
    su.batch_execute(&format!(
        "CREATE SCHEMA ol_{0} AUTHORIZATION {0}; CREATE TABLE ol_{0}.in_first (v int); ALTER TABLE ol_{0}.in_first OWNER TO {0}; \
         CREATE TABLE public.in_second_{0} (v int); ALTER TABLE public.in_second_{0} OWNER TO {0}",
        user.name
    ))
    .await
    .unwrap();
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let mut config: tokio_postgres::Config = url(&proxy, &user).parse().unwrap();
    config.options(format!("-c search_path=ol_{},public", user.name));
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let other = connect(&proxy, &user).await.unwrap();
    for _ in 0..3 {
        client
            .query("SELECT * FROM in_first", &[])
            .await
            .expect("first schema of the list");
        client
            .query(&format!("SELECT * FROM in_second_{}", user.name), &[])
            .await
            .expect("second schema of the list");
        let path: String = other.query_one("SHOW search_path", &[]).await.unwrap().get(0);
        assert_eq!(path, "\"$user\", public");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_gone_stale_after_ddl_can_be_prepared_again() {
    let user = create_user("stale").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    a.batch_execute("CREATE TABLE stale_t (a int); INSERT INTO stale_t VALUES (1)")
        .await
        .unwrap();
    let old = a.prepare("SELECT * FROM stale_t").await.unwrap();
    assert_eq!(a.query(&old, &[]).await.unwrap()[0].len(), 1);
    a.batch_execute("ALTER TABLE stale_t ADD COLUMN b int DEFAULT 2")
        .await
        .unwrap();
    // As on a direct connection: the old statement's result type changed.
    let err = a.query(&old, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    // Preparing the same text again gives the new shape, not the stale server copy.
    for _ in 0..2 {
        let fresh = a.prepare("SELECT * FROM stale_t").await.unwrap();
        let rows = a.query(&fresh, &[]).await.expect("a fresh statement works");
        assert_eq!(rows[0].len(), 2);
        assert_eq!(rows[0].get::<_, i32>(1), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_after_ddl_never_meets_a_server_copy_planned_before_it() {
    // One server connection, so both clients' statements live on it.
    let user = create_user("epoch").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    a.batch_execute("CREATE TABLE epoch_t (a int); INSERT INTO epoch_t VALUES (1)")
        .await
        .unwrap();
    let old = a.prepare("SELECT * FROM epoch_t").await.unwrap();
    assert_eq!(a.query(&old, &[]).await.unwrap()[0].len(), 1);
    b.batch_execute("ALTER TABLE epoch_t ADD COLUMN b int DEFAULT 2")
        .await
        .unwrap();
    // B prepares the same text after the change: on a direct connection it
    // gets a fresh plan, and so it does here, with no error to see.
    let fresh = b.prepare("SELECT * FROM epoch_t").await.unwrap();
    assert_eq!(fresh.columns().len(), 2, "described with the new shape");
    let rows = b.query(&fresh, &[]).await.expect("no stale-plan error");
    assert_eq!(rows[0].get::<_, i32>(1), 2);
    // A's statement was prepared before the change: as on a direct connection.
    let err = a.query(&old, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    // And B's keeps working after A's error.
    assert_eq!(b.query(&fresh, &[]).await.unwrap()[0].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_ddl_run_elsewhere_only_the_first_stale_copy_is_seen() {
    let user = create_user("extddl").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let sql = "SELECT * FROM extddl_t";
    let a = connect(&proxy, &user).await.unwrap();
    a.batch_execute("CREATE TABLE extddl_t (a int); INSERT INTO extddl_t VALUES (1)")
        .await
        .unwrap();
    // Both server connections get a copy of the statement.
    let mut b = connect(&proxy, &user).await.unwrap();
    let mut c = connect(&proxy, &user).await.unwrap();
    let tb = b.transaction().await.unwrap();
    let tc = c.transaction().await.unwrap();
    for t in [&tb, &tc] {
        let s = t.prepare(sql).await.unwrap();
        assert_eq!(t.query(&s, &[]).await.unwrap()[0].len(), 1);
    }
    let (pb, pc) = (
        tb.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        tc.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
    );
    assert_ne!(pb, pc, "two server connections");
    tb.commit().await.unwrap();
    tc.commit().await.unwrap();
    // A schema change dbproxy does not see.
    superuser()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"{0}\".extddl_t ADD COLUMN b int DEFAULT 2",
            user.name
        ))
        .await
        .unwrap();
    // The first client to meet a stale copy gets the error (it holds that
    // connection in its transaction)...
    let mut d = connect(&proxy, &user).await.unwrap();
    let td = d.transaction().await.unwrap();
    let first = async {
        // Describe revalidates too: the error may come at prepare time.
        let s = td.prepare(sql).await?;
        td.query(&s, &[]).await
    };
    let err = first.await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    // ...and a statement prepared after that never meets the other connection's stale copy.
    let e = connect(&proxy, &user).await.unwrap();
    let s = e.prepare(sql).await.unwrap();
    assert_eq!(s.columns().len(), 2);
    let rows = e.query(&s, &[]).await.expect("no second stale-plan error");
    assert_eq!(rows[0].get::<_, i32>(1), 2);
    drop(td);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_plan_met_while_preparing_is_recovered_without_the_client_seeing_it() {
    let user = create_user("retry").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let sql = "SELECT * FROM retry_t";
    let a = connect(&proxy, &user).await.unwrap();
    a.batch_execute("CREATE TABLE retry_t (a int); INSERT INTO retry_t VALUES (1)")
        .await
        .unwrap();
    let old = a.prepare(sql).await.unwrap();
    assert_eq!(a.query(&old, &[]).await.unwrap()[0].len(), 1);
    // A schema change dbproxy does not see.
    superuser()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"{0}\".retry_t ADD COLUMN b int DEFAULT 2",
            user.name
        ))
        .await
        .unwrap();
    // B prepares after the change, on the connection holding the stale copy:
    // its Describe fails there, and dbproxy prepares again and resends.
    let b = connect(&proxy, &user).await.unwrap();
    let fresh = b.prepare(sql).await.expect("the stale copy stays invisible");
    assert_eq!(fresh.columns().len(), 2);
    assert_eq!(b.query(&fresh, &[]).await.unwrap()[0].get::<_, i32>(1), 2);
    // The bookkeeping of settings is still in step after the resend: B's SET
    // follows B and nobody else (one server connection for all).
    b.batch_execute("SET work_mem = '7MB'").await.unwrap();
    let c = connect(&proxy, &user).await.unwrap();
    assert_ne!(work_mem(&c).await, "7MB");
    assert_eq!(work_mem(&b).await, "7MB");
    assert_ne!(work_mem(&c).await, "7MB");
    // A's statement was described before the change: it fails as on a direct
    // connection (a retry would return rows of a shape A was never told).
    let err = a.query(&old, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    let again = a.prepare(sql).await.unwrap();
    assert_eq!(a.query(&again, &[]).await.unwrap()[0].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_features_can_be_rejected_instead_of_pinned() {
    let user = create_user("reject").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 2\nsession_features = \"reject\"")
        .start()
        .await;
    let client = connect(&proxy, &user).await.unwrap();
    let err = client.batch_execute("LISTEN somewhere").await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    assert!(describe(&err).contains("LISTEN"), "{}", describe(&err));
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    // Inside a transaction the transaction fails, as the client is told.
    client.batch_execute("BEGIN").await.unwrap();
    let err = client.batch_execute("SELECT pg_advisory_lock(1)").await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02", "{}", describe(&err));
    client.batch_execute("ROLLBACK").await.unwrap();
    client.batch_execute("SELECT 2").await.unwrap();
    // Through the extended protocol too (prepared and executed, as most drivers
    // send everything), and the client is not pinned afterwards.
    let err = client.execute("LISTEN elsewhere", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    assert!(describe(&err).contains("reject"), "{}", describe(&err));
    let err = client
        .execute("CREATE TEMP TABLE rejected (a int)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{}", describe(&err));
    let other = connect(&proxy, &user).await.unwrap();
    other.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // With one of the two connections held by `other`, a pinned client would
    // keep the second; an unpinned one releases it, so a third client gets in.
    let third = connect(&proxy, &user).await.unwrap();
    assert_eq!(third.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
    assert_eq!(client.query_one("SELECT 4", &[]).await.unwrap().get::<_, i32>(0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_feature_is_released_by_its_own_statement() {
    let user = create_user("unpin").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"2s\"")
        .start()
        .await;
    let pinned = connect(&proxy, &user).await.unwrap();
    let other = connect(&proxy, &user).await.unwrap();
    let pairs = [
        ("LISTEN unpin_channel", "UNLISTEN *"),
        ("SELECT pg_advisory_lock(77)", "SELECT pg_advisory_unlock_all()"),
        ("CREATE TEMP TABLE unpin_scratch (v int)", "DISCARD TEMP"),
        ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT", "CLOSE ALL"),
        ("PREPARE unpin_stmt AS SELECT 1", "DEALLOCATE ALL"),
        ("PREPARE unpin_stmt2 AS SELECT 1", "DEALLOCATE PREPARE ALL"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "DISCARD ALL"),
    ];
    for (pin, release) in pairs {
        pinned.batch_execute(pin).await.unwrap();
        // The one server connection is held by the pinned client: the other waits and times out.
        let err = other.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&err), "57014", "after {pin}: {}", describe(&err));
        pinned.batch_execute(release).await.unwrap();
        other
            .batch_execute("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("{release} did not release the pin of {pin}: {}", describe(&e)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_with_a_bound_value_follows_its_client_without_pinning_it() {
    let user = create_user("setcfgparam").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"2s\"")
        .start()
        .await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    let tenant = |c: &tokio_postgres::Row| c.get::<_, Option<String>>(0);
    // tokio-postgres binds a text parameter in binary format, psycopg in text
    // (tests/python): the value is read from the Bind either way.
    let set = "SELECT set_config('app.tenant', $1, false)";
    a.query(set, &[&"tenant-a"]).await.unwrap();
    for _ in 0..3 {
        // Not pinned: B gets the one server connection, without A's setting.
        let row = b.query_one("SELECT current_setting('app.tenant', true)", &[]).await;
        assert_ne!(tenant(&row.unwrap()).as_deref(), Some("tenant-a"));
        let row = a.query_one("SELECT current_setting('app.tenant')", &[]).await;
        assert_eq!(tenant(&row.unwrap()).as_deref(), Some("tenant-a"));
    }
    // Through the unnamed statement too, and the last value wins.
    a.query_typed(set, &[(&"tenant-a2", tokio_postgres::types::Type::TEXT)])
        .await
        .unwrap();
    let row = b.query_one("SELECT current_setting('app.tenant', true)", &[]).await;
    assert_ne!(tenant(&row.unwrap()).as_deref(), Some("tenant-a2"));
    let row = a.query_one("SELECT current_setting('app.tenant')", &[]).await;
    assert_eq!(tenant(&row.unwrap()).as_deref(), Some("tenant-a2"));
    // A NULL cannot be carried as SQL: that client is pinned.
    a.query(set, &[&None::<&str>]).await.unwrap();
    let err = b.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{}", describe(&err));
    drop(a);

    // Nor is a parameter that no Bind gives (SQL PREPARE and EXECUTE): the
    // client stays pinned after DEALLOCATE ALL, and nobody gets its setting.
    let c = connect(&proxy, &user).await.unwrap();
    c.batch_execute(
        "PREPARE p(text) AS SELECT set_config('app.tenant', $1, false); \
         EXECUTE p('tenant-c'); DEALLOCATE ALL; SELECT 1",
    )
    .await
    .unwrap();
    let err = b.query_one("SELECT current_setting('app.tenant', true)", &[]).await;
    assert_eq!(sqlstate(&err.unwrap_err()), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_block_leaves_nothing_to_the_next_client() {
    let user = create_user("doblock").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    // A DO block may set anything: its connection is reset before the next
    // client gets it (the setting is not carried to A's later transactions
    // either: README, "Known gaps").
    a.batch_execute("DO $$ BEGIN PERFORM set_config('app.tenant', 'tenant-a', false); END $$")
        .await
        .unwrap();
    let row = b
        .query_one("SELECT current_setting('app.tenant', true)", &[])
        .await
        .unwrap();
    assert_ne!(row.get::<_, Option<String>>(0).as_deref(), Some("tenant-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_renaming_off_a_named_statement_still_pins_and_carries_its_settings() {
    let user = create_user("renamingoff").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\ncheckout_timeout = \"2s\"\nmax_prepared_statements = 0")
        .start()
        .await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    let text = |row: tokio_postgres::Row| row.get::<_, Option<String>>(0);
    // tokio-postgres prepares every query as a named statement (s0, s1, ...),
    // which goes to the server under that name with renaming off.
    a.execute("SET work_mem = '1111kB'", &[]).await.unwrap();
    a.query("SELECT set_config('app.tenant', $1, false)", &[&"tenant-a"])
        .await
        .unwrap();
    for _ in 0..2 {
        let row = b.query_one("SHOW work_mem", &[]).await.unwrap();
        assert_ne!(text(row).as_deref(), Some("1111kB"));
        let row = b.query_one("SELECT current_setting('app.tenant', true)", &[]).await;
        assert_ne!(text(row.unwrap()).as_deref(), Some("tenant-a"));
        let row = a.query_one("SHOW work_mem", &[]).await.unwrap();
        assert_eq!(text(row).as_deref(), Some("1111kB"));
        let row = a.query_one("SELECT current_setting('app.tenant')", &[]).await;
        assert_eq!(text(row.unwrap()).as_deref(), Some("tenant-a"));
    }
    // A session-only feature pins the client to its server connection.
    a.query("SELECT pg_advisory_lock(42)", &[]).await.unwrap();
    let err = b.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{}", describe(&err));
    drop(a);
    // And a DO block has its connection reset before the next client.
    let c = connect(&proxy, &user).await.unwrap();
    c.execute(
        "DO $$ BEGIN PERFORM set_config('app.tenant', 'tenant-c', false); END $$",
        &[],
    )
    .await
    .unwrap();
    drop(c);
    let row = b.query_one("SELECT current_setting('app.tenant', true)", &[]).await;
    assert_ne!(text(row.unwrap()).as_deref(), Some("tenant-c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_returns_a_pinned_client_to_its_startup_values() {
    let user = create_user("resetpinned").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let mut config: tokio_postgres::Config = url(&proxy, &user).parse().unwrap();
    config.options("-c work_mem=7777kB").application_name("resetter");
    let (client, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let show = async |name: &str| -> String {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
        row.get(0)
    };
    client
        .batch_execute("LISTEN resetter; SET work_mem = '1MB'")
        .await
        .unwrap();
    assert_eq!(show("work_mem").await, "1MB");
    // Pinned, the client keeps its server connection, whose own RESET
    // values are the server's (and application_name dbproxy's login name):
    // the client's are set again before its next request.
    client.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(show("work_mem").await, "7777kB");
    client.batch_execute("SET work_mem = '2MB'; RESET ALL").await.unwrap();
    assert_eq!(show("work_mem").await, "7777kB");
    assert_eq!(show("application_name").await, "resetter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_leaves_set_role_in_force_and_to_its_client_alone() {
    let user = create_user("resetrole").await;
    let role = format!("{}_r", user.name);
    let grant = format!("CREATE ROLE {role}; GRANT {role} TO {}", user.name);
    superuser().await.batch_execute(&grant).await.unwrap();
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let a = connect(&proxy, &user).await.unwrap();
    let b = connect(&proxy, &user).await.unwrap();
    let current = async |c: &tokio_postgres::Client| -> String {
        c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0)
    };
    // As in PostgreSQL, RESET ALL does not undo SET ROLE (nor SET SESSION
    // AUTHORIZATION): A keeps the role, and B, on the same server
    // connection, never runs as it.
    a.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    a.batch_execute("RESET ALL").await.unwrap();
    for _ in 0..2 {
        assert_eq!(current(&b).await, user.name);
        assert_eq!(current(&a).await, role);
    }
    a.batch_execute("RESET role").await.unwrap();
    assert_eq!(current(&a).await, user.name);
}
