//! One script of protocol corner cases, answered by PostgreSQL directly and
//! through dbproxy, message for message. Through dbproxy the pool has one
//! server connection, and another client runs between the steps (when the
//! first is outside a transaction) so that every step may meet a connection
//! someone else just used.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;
use crate::wire::*;

/// Bytes to send, and how many ReadyForQuery end their answer.
struct Step {
    bytes: Vec<u8>,
    readies: usize,
    /// Leaves the client pinned to its server connection (nobody else can
    /// run through the pool of one until it is unpinned).
    pins: bool,
}

fn pinning(step: Step) -> Step {
    Step { pins: true, ..step }
}

fn q(sql: &str) -> Step {
    Step {
        bytes: message(b'Q', format!("{sql}\0").as_bytes()),
        readies: 1,
        pins: false,
    }
}

/// Extended-protocol messages and a Sync.
fn batch(msgs: &[Vec<u8>]) -> Step {
    let mut bytes = msgs.concat();
    bytes.extend_from_slice(&sync());
    Step {
        bytes,
        readies: 1,
        pins: false,
    }
}

fn raw(msgs: &[Vec<u8>], readies: usize) -> Step {
    Step {
        bytes: msgs.concat(),
        readies,
        pins: false,
    }
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

fn execute_rows(portal: &str, rows: i32) -> Vec<u8> {
    let mut body = format!("{portal}\0").into_bytes();
    body.extend_from_slice(&rows.to_be_bytes());
    message(b'E', &body)
}

/// A Bind of `statement` to the unnamed portal, with text parameters.
fn bind_params(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut body = format!("\0{statement}\0").into_bytes();
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for v in params {
        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
        body.extend_from_slice(v.as_bytes());
    }
    body.extend_from_slice(&[0, 0]);
    message(b'B', &body)
}

fn copy_data(text: &str) -> Vec<u8> {
    message(b'd', text.as_bytes())
}

/// A DataRow's values, comma-separated (NULL as `-`).
fn values(body: &[u8]) -> String {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            out.push("-".to_owned());
        } else {
            out.push(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned());
            at += len as usize;
        }
    }
    out.join(",")
}

/// Sends a step; returns its answer spelled out. ParameterStatus is left
/// out (what DISCARD ALL reports differs; see the README's known gaps), and
/// so is the backend pid of a notification.
async fn answer(s: &mut TcpStream, step: &Step) -> Vec<String> {
    s.write_all(&step.bytes).await.unwrap();
    let mut out = Vec::new();
    let mut readies = 0;
    while readies < step.readies {
        let Some((tag, body)) = read_message(s).await else {
            out.push("(no answer)".to_owned());
            return out;
        };
        out.push(match tag {
            b'Z' => {
                readies += 1;
                format!("Z:{}", char::from(body[0]))
            }
            b'D' => format!("D:{}", values(&body)),
            b'T' => format!("T:{}", i16::from_be_bytes([body[0], body[1]])),
            b'N' => format!("N:{}", body_code(&body).unwrap_or_default()),
            b'd' => format!("d:{}", String::from_utf8_lossy(&body)),
            b'S' => continue,
            _ => spelled(tag, &body),
        });
    }
    out
}

fn script() -> Vec<Step> {
    let p = parse_msg;
    vec![
        q("CREATE TABLE diff_t (a int)"),
        // Simple queries: several statements, empty, an error in the middle.
        q("SELECT 1; SELECT 2"),
        q(""),
        q("SELECT 1; SELECT 1/0; SELECT 3"),
        q("SELECT 1; SELEC 2; SELECT 3"),
        q("SELECT 1/0"),
        q("DO $$BEGIN RAISE NOTICE 'hello'; END$$"),
        // Transaction blocks and their failed state.
        q("BEGIN"),
        q("SELECT 1"),
        q("SELEC"),
        q("SELECT 1"),
        q("ROLLBACK"),
        q("BEGIN"),
        batch(&[p("", "SELEC"), bind_msg(""), execute_msg()]),
        batch(&[p("", "SELECT 1"), bind_msg(""), execute_msg()]),
        q("COMMIT"),
        // The extended protocol: unnamed, named, pipelined Syncs.
        batch(&[p("", "SELECT 'a'"), bind_msg(""), execute_msg()]),
        raw(
            &[
                p("s1", "SELECT 1"),
                bind_msg("s1"),
                execute_msg(),
                sync(),
                bind_msg("s1"),
                execute_msg(),
                sync(),
            ],
            2,
        ),
        raw(
            &[
                p("", "SELEC"),
                sync(),
                p("", "SELECT 2"),
                bind_msg(""),
                execute_msg(),
                sync(),
            ],
            2,
        ),
        batch(&[p("", ""), bind_msg(""), execute_msg()]),
        batch(&[p("s3", "SELECT 1 AS x"), target(b'D', b'S', "s3")]),
        batch(&[bind_msg("s3"), target(b'D', b'P', ""), execute_msg()]),
        // Names that do not exist.
        batch(&[target(b'D', b'S', "nosuch")]),
        batch(&[target(b'C', b'S', "nosuch")]),
        batch(&[target(b'C', b'P', "nosuch")]),
        batch(&[bind_msg("nosuch"), execute_msg()]),
        raw(&[sync()], 1),
        // A portal run in parts inside a transaction.
        q("BEGIN"),
        batch(&[p("", "SELECT generate_series(1, 5)"), bind_msg(""), execute_rows("", 2)]),
        batch(&[execute_rows("", 2)]),
        batch(&[execute_rows("", 2)]),
        q("COMMIT"),
        // Settings: rolled back, savepoints, SET LOCAL.
        q("BEGIN; SET search_path = nosuch; ROLLBACK"),
        q("SHOW search_path"),
        q("BEGIN; SET work_mem = '1MB'; SAVEPOINT a; SET work_mem = '2MB'; ROLLBACK TO a; COMMIT"),
        q("SHOW work_mem"),
        q("BEGIN; SET LOCAL work_mem = '3MB'; SHOW work_mem; COMMIT"),
        q("SHOW work_mem"),
        q("SET application_name = 'diff'"),
        q("SHOW application_name"),
        // (Hot standbys refuse SERIALIZABLE: with splitting on, these stay on the primary.)
        q("SET default_transaction_isolation = 'serializable'"),
        q("BEGIN; SHOW transaction_isolation; COMMIT"),
        q("SELECT relname FROM pg_class WHERE relname = 'pg_class'"),
        q("BEGIN READ ONLY"),
        q("SELECT relname FROM pg_class WHERE relname = 'pg_class'"),
        q("COMMIT"),
        q("RESET default_transaction_isolation"),
        // Set where a read-only transaction runs (a replica, with splitting on):
        // that connection must not keep it as its default for the next client.
        q("BEGIN READ ONLY"),
        q("SET default_transaction_isolation = 'serializable'"),
        q("COMMIT"),
        q("SELECT relname FROM pg_class WHERE relname = 'pg_class'"),
        q("RESET default_transaction_isolation"),
        // SQL-level prepared statements and DEALLOCATE.
        // (SQL PREPARE pins the client until DEALLOCATE ALL; see the README.)
        pinning(q("PREPARE p1 AS SELECT 11")),
        pinning(q("EXECUTE p1")),
        pinning(q("DEALLOCATE p1")),
        pinning(q("EXECUTE p1")),
        pinning(q("DEALLOCATE nosuch")),
        pinning(batch(&[p("s2", "SELECT 2")])),
        q("DEALLOCATE ALL"),
        batch(&[bind_msg("s2"), execute_msg()]),
        // COPY out, in, failing, abandoned.
        q("COPY (SELECT 1 UNION ALL SELECT 2) TO STDOUT"),
        raw(
            &[
                message(b'Q', b"COPY diff_t FROM STDIN\0"),
                copy_data("1\n"),
                copy_data("2\n"),
                message(b'c', &[]),
            ],
            1,
        ),
        raw(
            &[
                message(b'Q', b"COPY diff_t FROM STDIN\0"),
                copy_data("x\n"),
                message(b'c', &[]),
            ],
            1,
        ),
        raw(
            &[message(b'Q', b"COPY diff_t FROM STDIN\0"), message(b'f', b"nope\0")],
            1,
        ),
        q("SELECT a FROM diff_t ORDER BY a"),
        q("SELECT count(*), sum(length(repeat('x', 100000))) FROM generate_series(1, 3)"),
        // Extended-protocol COPY, with a Sync inside the copy (ignored).
        batch(&[
            p("", "COPY diff_t FROM STDIN"),
            bind_msg(""),
            execute_msg(),
            copy_data("3\n"),
            message(b'c', &[]),
        ]),
        raw(
            &[
                p("", "COPY diff_t FROM STDIN"),
                bind_msg(""),
                execute_msg(),
                copy_data("4\n"),
                sync(),
                message(b'c', &[]),
                sync(),
            ],
            1,
        ),
        // A write, then reads of it at once (splitting: read-your-writes).
        q("INSERT INTO diff_t VALUES (5)"),
        batch(&[p("", "SELECT count(*) FROM diff_t"), bind_msg(""), execute_msg()]),
        raw(
            &[
                p("", "SELECT count(*) FROM diff_t"),
                bind_msg(""),
                execute_msg(),
                sync(),
                p("", "INSERT INTO diff_t VALUES (6)"),
                bind_msg(""),
                execute_msg(),
                sync(),
                p("", "SELECT count(*) FROM diff_t"),
                bind_msg(""),
                execute_msg(),
                sync(),
            ],
            3,
        ),
        // Errors from the server about the client's own messages.
        batch(&[p("", "SELECT 1/0"), bind_msg(""), execute_msg()]),
        batch(&[p("s7", "SELECT $1::int"), bind_msg("s7"), execute_msg()]),
        batch(&[target(b'D', b'P', "nosuch")]),
        batch(&[execute_rows("nosuch", 0)]),
        batch(&[p("", "SELECT 1"), bind_msg(""), execute_msg(), message(b'H', &[])]),
        // Savepoints with an error in between.
        q("BEGIN"),
        q("SAVEPOINT a"),
        q("SELEC"),
        q("ROLLBACK TO a"),
        q("SELECT 1"),
        q("COMMIT"),
        // The unnamed statement used in later batches than its Parse (libpq's
        // PQprepare, then PQexecPrepared), with the other client's unnamed
        // statement prepared on the connection in between.
        batch(&[p("", "SELECT 'mine', $1::int"), target(b'D', b'S', "")]),
        batch(&[bind_params("", &["7"]), execute_msg()]),
        batch(&[target(b'D', b'S', "")]),
        batch(&[bind_params("", &["8"]), target(b'D', b'P', ""), execute_msg()]),
        // Gone after a simple Query, its Close, a Parse that fails; none to
        // begin with inside a transaction block, then one.
        q("SELECT 1"),
        batch(&[bind_params("", &["9"]), execute_msg()]),
        batch(&[target(b'D', b'S', "")]),
        batch(&[p("", "SELECT 'again'")]),
        batch(&[target(b'C', b'S', "")]),
        batch(&[bind_msg(""), execute_msg()]),
        batch(&[p("", "SELECT 'third'")]),
        batch(&[p("", "SELEC")]),
        batch(&[bind_msg(""), execute_msg()]),
        q("BEGIN"),
        batch(&[bind_msg(""), execute_msg()]),
        q("ROLLBACK"),
        batch(&[p("", "SELECT 'fourth'")]),
        batch(&[p("b", "BEGIN"), bind_msg("b"), execute_msg()]),
        batch(&[bind_msg(""), execute_msg()]),
        batch(&[p("c", "COMMIT"), bind_msg("c"), execute_msg()]),
        batch(&[bind_msg(""), execute_msg()]),
        // Pipelined: a Parse skipped after an error, then a Bind in the next batch.
        raw(
            &[
                bind_msg("nosuch"),
                p("", "SELECT 'skipped'"),
                sync(),
                bind_msg(""),
                execute_msg(),
                sync(),
            ],
            2,
        ),
        // Pipelined: a Parse, then a Bind in the next batch.
        raw(
            &[p("", "SELECT 'fifth'"), sync(), bind_msg(""), execute_msg(), sync()],
            2,
        ),
        // A write in the batch of the Parse: the proxy's own query after the
        // commit (splitting: the primary's WAL position) drops the connection's
        // unnamed statement.
        batch(&[
            p("", "INSERT INTO diff_t VALUES (8)"),
            p("w", "INSERT INTO diff_t VALUES (7)"),
            bind_msg("w"),
            execute_msg(),
        ]),
        batch(&[bind_msg(""), execute_msg()]),
        // Names as PostgreSQL reads them: a setting whatever its case or
        // quotes, a statement name as written when quoted.
        q("SET \"Work_Mem\" = '5MB'"),
        q("RESET work_mem"),
        q("SHOW work_mem"),
        q("SET work_mem = '6MB'"),
        q("RESET \"WORK_MEM\""),
        q("SHOW work_mem"),
        q("SELECT set_config('Work_Mem', '9MB', false)"),
        q("RESET work_mem"),
        q("SHOW work_mem"),
        batch(&[p("S1", "SELECT 1")]),
        q("DEALLOCATE s1"),
        q("DEALLOCATE \"S1\""),
        batch(&[bind_msg("S1"), execute_msg()]),
        // LISTEN pins until UNLISTEN *.
        pinning(q("LISTEN ch")),
        pinning(q("NOTIFY ch, 'x'")),
        q("UNLISTEN *"),
        q("DROP TABLE diff_t"),
    ]
}

async fn run(s: &mut TcpStream, mut between: Option<&mut TcpStream>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, step) in script().into_iter().enumerate() {
        let got = answer(s, &step).await;
        let idle = got.last().is_some_and(|z| z == "Z:I") && !step.pins;
        out.push(got);
        if let (Some(other), true) = (between.as_deref_mut(), idle) {
            // Someone else uses the one server connection, with state of its own.
            let busy = batch(&[
                parse_msg("s1", "SELECT 'other'"),
                bind_msg("s1"),
                execute_msg(),
                target(b'C', b'S', "s1"),
                parse_msg("", "SELECT 'not yours'"),
                target(b'D', b'S', ""),
            ]);
            let done = answer(other, &busy).await;
            assert_eq!(
                done,
                ["1", "2", "D:other", "C:SELECT 1", "3", "1", "t", "T:1", "Z:I"],
                "after step {i}"
            );
            let set = answer(other, &q("SET work_mem = '7MB'; SET search_path = elsewhere")).await;
            assert_eq!(set, ["C:SET", "C:SET", "Z:I"], "after step {i}");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_corner_cases_are_answered_as_by_postgresql() {
    let user = create_user("differ").await;
    let mut direct = login_direct(&user).await;
    let expected = run(&mut direct, None).await;
    drop(direct);
    // (Some answers spelled out, so the script is known to do what it says.)
    assert_eq!(expected[3], ["T:1", "D:1", "C:SELECT 1", "E:22012", "Z:I"]);
    assert_eq!(expected[28], ["1", "2", "D:1", "D:2", "s", "Z:T"]);
    assert_eq!(expected[61], ["G", "C:COPY 2", "Z:I"]);
    assert_eq!(expected.len(), script().len());

    let steps: Vec<Vec<u8>> = script().into_iter().map(|s| s.bytes).collect();
    let mut differences = Vec::new();
    // Read/write splitting off, then on (batches are then held until their
    // Sync shows where they may run, and reads go to the replicas).
    for split in [false, true] {
        let mut setup = Setup::new(&[&user]).pool("size = 1");
        // Replay positions read often, so reads return to the replicas soon after each write.
        setup.routing = format!("read_write_split = {split}\nhealth_check_interval = \"20ms\"");
        let proxy = setup.start().await;
        let replica_checkouts = || {
            proxy.shared().live().stats["appdb"]
                .routed_replica
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        if split {
            // The replicas join the rotation after their first health check.
            let probe = connect(&proxy, &user).await.unwrap();
            let ready = eventually(std::time::Duration::from_secs(15), || async {
                probe.simple_query("SELECT 1").await.unwrap();
                replica_checkouts() > 0
            })
            .await;
            assert!(ready, "no read reached a replica");
        }
        let before = replica_checkouts();
        let mut other = login(proxy.local_addr(), &user).await;
        let mut s = login(proxy.local_addr(), &user).await;
        let got = run(&mut s, Some(&mut other)).await;
        let on_replicas = replica_checkouts() - before;
        assert_eq!(
            on_replicas > 0,
            split,
            "the script's checkouts of a replica: {on_replicas}"
        );
        for (i, (want, have)) in expected.iter().zip(&got).enumerate() {
            if want != have {
                let sent: String = String::from_utf8_lossy(&steps[i])
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                differences.push(format!(
                    "split {split}, step {i} ({sent}):\n  direct:  {want:?}\n  dbproxy: {have:?}"
                ));
            }
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
