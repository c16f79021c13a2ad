//! Protocol coverage through the proxy: extended and simple queries, binary
//! formats, pipelining, errors in and out of transactions, COPY, notices, pgbench.

use std::process::Command;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, future::join_all};
use tokio_postgres::types::Type;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_binary_parameters_and_results() {
    let user = create_user("ext").await;
    let proxy = Setup::new(&[&user]).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let blob: Vec<u8> = (0..=255).collect();
    let row = client
        .query_one(
            "SELECT $1::int8 + 1, $2::text || '!', $3::bytea, $4::float8 * 2, $5::bool",
            &[&41i64, &"héllo", &blob, &1.25f64, &true],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "héllo!");
    assert_eq!(row.get::<_, Vec<u8>>(2), blob);
    assert_eq!(row.get::<_, f64>(3), 2.5);
    assert!(row.get::<_, bool>(4));

    let stmt = client
        .prepare_typed("SELECT g FROM generate_series(1, $1) g", &[Type::INT4])
        .await
        .unwrap();
    let rows = client.query(&stmt, &[&1000i32]).await.unwrap();
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows[999].get::<_, i32>(0), 1000);

    // Simple protocol, several statements in one message.
    let msgs = client.simple_query("SELECT 1; SELECT 'two'; SELECT 3").await.unwrap();
    let rows = msgs
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_all_answer_in_order() {
    let user = create_user("pipe").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let stmt = client.prepare("SELECT $1::int4 * 10").await.unwrap();
    // tokio-postgres sends all of these before reading any answer.
    let futures = (0..200).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move { client.query_one(stmt, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
    });
    let results = join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i32 * 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_and_outside_transactions_behave_as_on_a_direct_connection() {
    let user = create_user("errs").await;
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client
        .batch_execute("CREATE TABLE errs_t (id int primary key)")
        .await
        .unwrap();

    let err = client.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    assert_eq!(client.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);

    client
        .batch_execute("BEGIN; INSERT INTO errs_t VALUES (1)")
        .await
        .unwrap();
    let err = client.batch_execute("INSERT INTO errs_t VALUES (1)").await.unwrap_err();
    assert_eq!(sqlstate(&err), "23505");
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02", "the failed transaction stays with the client");
    client.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM errs_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A transaction keeps one server connection until it ends.
    client.batch_execute("BEGIN").await.unwrap();
    let a: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let b: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_200k_rows_in_and_out() {
    copy_rows_in_and_out(false).await;
}

/// tokio-postgres sends COPY FROM STDIN through the extended protocol, which
/// splitting holds back until its Sync shows where the batch goes. (A client
/// that sends its CopyData without waiting for CopyInResponse is in the
/// differential test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_200k_rows_in_and_out_with_splitting_on() {
    copy_rows_in_and_out(true).await;
}

async fn copy_rows_in_and_out(split: bool) {
    let user = create_user("copy").await;
    let mut setup = Setup::new(&[&user]);
    setup.routing = format!("read_write_split = {split}");
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    client
        .batch_execute("CREATE TABLE copy_t (id int, name text)")
        .await
        .unwrap();

    let sink = client.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..200_000 {
        chunk.push_str(&format!("{i}\tname-{i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    sink.send(Bytes::from(chunk)).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 200_000);

    let stream = client.copy_out("COPY copy_t TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let (mut lines, mut bytes) = (0usize, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(lines, 200_000);
    assert!(bytes > 2_000_000);

    // The connection is in a clean state afterwards.
    let n: i64 = client
        .query_one("SELECT count(*) FROM copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_psql() {
    let user = create_user("notice").await;
    let proxy = Setup::new(&[&user]).start().await;
    let out = Command::new("psql")
        .args([
            &url(&proxy, &user),
            "-Xc",
            "DO $$ BEGIN RAISE NOTICE 'hello notice'; END $$",
        ])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOTICE:  hello notice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_clean_through_the_proxy() {
    let user = create_user("bench").await;
    let proxy = Setup::new(&[&user]).pool("size = 4").start().await;
    // pgbench's tables land in the role's own schema.
    let url = url(&proxy, &user);
    pgbench(&url, &["-i", "-s", "1", "-q"], 0);
    for mode in ["simple", "extended"] {
        pgbench(&url, &["-c", "10", "-j", "2", "-t", "50", "-M", mode], 500);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_with_50_clients_over_a_pool_of_10() {
    let user = create_user("benchprep").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 10\ncheckout_timeout = \"30s\"")
        .start()
        .await;
    let url = url(&proxy, &user);
    pgbench(&url, &["-i", "-s", "1", "-q"], 0);
    pgbench(&url, &["-c", "50", "-j", "2", "-t", "20", "-M", "prepared"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_starting_with_non_ascii_text_get_the_servers_error() {
    // The classifier fuzz target found that such text made the session panic.
    let user = create_user("utf8").await;
    let proxy = Setup::new(&[&user]).start().await;
    let client = connect(&proxy, &user).await.unwrap();
    for sql in ["Выбрать 1", "abcdé 1", "日本語"] {
        let err = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42601", "{sql}: {}", describe(&err));
        let err = client.prepare(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42601", "{sql}: {}", describe(&err));
    }
    assert_eq!(
        client
            .query_one("SELECT 'ok ✓'::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "ok ✓"
    );
}
