//! Prepared statements at the edges: a name prepared twice, a client whose
//! statements outgrow `pool.max_client_statement_bytes`, and the unnamed
//! statement used in a later transaction than its Parse.

use tokio::net::TcpStream;

use crate::harness::*;
use crate::wire::*;

/// Sends `msgs` and a Sync; returns the answers spelled as `round` does, with
/// each DataRow's first value (`D:value`).
async fn rows(s: &mut TcpStream, msgs: &[Vec<u8>]) -> Vec<String> {
    use tokio::io::AsyncWriteExt;
    let mut out: Vec<u8> = msgs.concat();
    out.extend_from_slice(&message(b'S', &[]));
    s.write_all(&out).await.unwrap();
    until_ready(s)
        .await
        .iter()
        .map(|(tag, body)| match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]).max(0) as usize;
                format!("D:{}", String::from_utf8_lossy(&body[6..6 + len]))
            }
            _ => spelled(*tag, body),
        })
        .collect()
}

fn run(name: &str) -> [Vec<u8>; 2] {
    [bind_msg(name), execute_msg()]
}

/// One script, answered on a direct connection and through dbproxy.
async fn duplicate_names_script(s: &mut TcpStream) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    out.push(rows(s, &[parse_msg("s1", "SELECT 1")]).await);
    // The same name again, with the same text and with another.
    out.push(rows(s, &[parse_msg("s1", "SELECT 1")]).await);
    out.push(rows(s, &[parse_msg("s1", "SELECT 2"), bind_msg("s1"), execute_msg()]).await);
    out.push(rows(s, &run("s1")).await);
    // Twice in one batch: the first stays.
    out.push(rows(s, &[parse_msg("s2", "SELECT 22"), parse_msg("s2", "SELECT 23")]).await);
    out.push(rows(s, &run("s2")).await);
    // Inside a transaction block: the error aborts it.
    out.push(simple(s, "BEGIN").await);
    out.push(rows(s, &[parse_msg("s1", "SELECT 3")]).await);
    out.push(simple(s, "SELECT 4").await);
    out.push(simple(s, "ROLLBACK").await);
    // A Parse that fails, or that an error before it skips, creates nothing.
    out.push(rows(s, &[parse_msg("s3", "SELEC 1")]).await);
    out.push(rows(s, &[parse_msg("s3", "SELECT 3")]).await);
    out.push(rows(s, &[parse_msg("s4", "SELEC 1"), parse_msg("s5", "SELECT 5")]).await);
    out.push(rows(s, &[parse_msg("s5", "SELECT 5")]).await);
    // The same name again in the next batch, sent before the first is answered.
    {
        use tokio::io::AsyncWriteExt;
        let sync = message(b'S', &[]);
        let two = [
            parse_msg("s6", "SELEC 6"),
            sync.clone(),
            parse_msg("s6", "SELECT 6"),
            sync,
        ]
        .concat();
        s.write_all(&two).await.unwrap();
        for _ in 0..2 {
            out.push(until_ready(s).await.iter().map(|(t, b)| spelled(*t, b)).collect());
        }
    }
    out.push(rows(s, &run("s6")).await);
    // Closed, the name is free again.
    let close = message(b'C', b"Ss1\0");
    out.push(rows(s, &[close, parse_msg("s1", "SELECT 5"), bind_msg("s1"), execute_msg()]).await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_name_in_use_cannot_be_prepared_again() {
    let user = create_user("dupname").await;
    let mut direct = login_direct(&user).await;
    let expected = duplicate_names_script(&mut direct).await;
    assert_eq!(
        expected,
        [
            vec!["1"],
            vec!["E:42P05"],
            vec!["E:42P05"],
            vec!["2", "D:1", "C:SELECT 1"],
            vec!["1", "E:42P05"],
            vec!["2", "D:22", "C:SELECT 1"],
            vec!["C:BEGIN"],
            vec!["E:42P05"],
            vec!["E:25P02"],
            vec!["C:ROLLBACK"],
            vec!["E:42601"],
            vec!["1"],
            vec!["E:42601"],
            vec!["1"],
            vec!["E:42601"],
            vec!["1"],
            vec!["2", "D:6", "C:SELECT 1"],
            vec!["3", "1", "2", "D:5", "C:SELECT 1"],
        ],
        "PostgreSQL itself"
    );
    // One server connection, so the names meet statements other clients made too.
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let mut other = login(proxy.local_addr(), &user).await;
    assert_eq!(rows(&mut other, &[parse_msg("o1", "SELECT 2")]).await, ["1"]);
    let mut s = login(proxy.local_addr(), &user).await;
    assert_eq!(duplicate_names_script(&mut s).await, expected);
    assert_eq!(rows(&mut other, &run("o1")).await, ["2", "D:2", "C:SELECT 1"]);
}

/// A field (`M` message, `H` hint, `C` code) of the first ErrorResponse in answers.
async fn error_field(s: &mut TcpStream, msgs: &[Vec<u8>], field: u8) -> String {
    use tokio::io::AsyncWriteExt;
    let mut out: Vec<u8> = msgs.concat();
    out.extend_from_slice(&message(b'S', &[]));
    s.write_all(&out).await.unwrap();
    let answers = until_ready(s).await;
    let (_, body) = answers.iter().find(|(t, _)| *t == b'E').expect("an error");
    body_field(body, field).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_statement_budget_is_refused_and_carries_on() {
    let user = create_user("stmtbudget").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 2\nmax_client_statement_bytes = 65536")
        .start()
        .await;
    let mut s = login(proxy.local_addr(), &user).await;
    let text = |i: usize| format!("SELECT {i}, '{}'", "x".repeat(900));
    // About 1.2 KB each: roughly 55 fit in 64 KiB, then the next is refused.
    let mut refused_at = None;
    for i in 0..100 {
        let answer = rows(&mut s, &[parse_msg(&format!("s{i}"), &text(i))]).await;
        if answer != ["1"] {
            assert_eq!(answer, ["E:54000"], "statement {i}");
            refused_at = Some(i);
            break;
        }
    }
    let n = refused_at.expect("a statement refused");
    assert!((40..60).contains(&n), "refused at {n}");
    let msg = error_field(&mut s, &[parse_msg("big", &text(0))], b'M').await;
    assert!(
        msg.contains("\"big\"") && msg.contains("pool.max_client_statement_bytes (65536 bytes)"),
        "{msg}"
    );
    // The rest of a refused batch is skipped, as after any failed Parse.
    assert_eq!(
        rows(&mut s, &[parse_msg("big", &text(0)), bind_msg("s0"), execute_msg()]).await,
        ["E:54000"]
    );
    // Statements kept still run, and the client's connection is fine.
    assert_eq!(rows(&mut s, &run("s1")).await[..2], ["2", "D:1"]);
    assert_eq!(simple(&mut s, "SELECT 7").await, ["D:7", "C:SELECT 1"]);
    // Inside a transaction block the refusal fails the block, as a failed Parse would.
    assert_eq!(simple(&mut s, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(simple(&mut s, "SELECT 8").await, ["D:8", "C:SELECT 1"]);
    assert_eq!(rows(&mut s, &[parse_msg("big", &text(0))]).await, ["E:54000"]);
    assert_eq!(simple(&mut s, "SELECT 9").await, ["E:25P02"]);
    assert_eq!(simple(&mut s, "ROLLBACK").await, ["C:ROLLBACK"]);
    // Closing statements makes room again.
    let close = |name: &str| message(b'C', format!("S{name}\0").as_bytes());
    assert_eq!(rows(&mut s, &[close("s0"), close("s1")]).await, ["3", "3"]);
    assert_eq!(
        rows(&mut s, &[parse_msg("big", &text(0)), bind_msg("big"), execute_msg()]).await[..3],
        ["1", "2", "D:0"]
    );
    // DEALLOCATE ALL empties the budget.
    assert_eq!(simple(&mut s, "DEALLOCATE ALL").await, ["C:DEALLOCATE ALL"]);
    for i in 0..n {
        assert_eq!(
            rows(&mut s, &[parse_msg(&format!("t{i}"), &text(i))]).await,
            ["1"],
            "t{i}"
        );
    }

    // Names are the client's to choose: refused inside a transaction (where the
    // server raises the error), one that quotes and dollar-quotes comes back whole.
    let odd = r"it's $dbproxy$ \'; SELECT 1; --";
    assert_eq!(simple(&mut s, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(
        simple(&mut s, "SET LOCAL standard_conforming_strings = off").await,
        ["C:SET"]
    );
    let msg = error_field(&mut s, &[parse_msg(odd, &text(0))], b'M').await;
    assert!(
        msg.starts_with(&format!("prepared statement \"{odd}\" would take")),
        "{msg}"
    );
    assert_eq!(simple(&mut s, "ROLLBACK").await, ["C:ROLLBACK"]);
    // In SJIS, bytes 81 5C are one character: a backslash escaped as UTF-8 text
    // would be swallowed by it and let the quote close the string.
    assert_eq!(simple(&mut s, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(simple(&mut s, "SET LOCAL client_encoding = 'SJIS'").await, ["C:SET"]);
    let sjis = "\u{c1}\\'; RAISE NOTICE 'injected'; --";
    // Read in SJIS, as the server reads the name itself, it comes back as sent.
    let msg = error_field(&mut s, &[parse_msg(sjis, &text(0))], b'M').await;
    assert!(
        msg.starts_with(&format!("prepared statement \"{sjis}\" would take")),
        "{msg}"
    );
    assert_eq!(simple(&mut s, "ROLLBACK").await, ["C:ROLLBACK"]);
    assert_eq!(simple(&mut s, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(rows(&mut s, &[parse_msg(odd, "SELECT 1")]).await, ["1"]);
    let msg = error_field(&mut s, &[parse_msg(odd, "SELECT 1")], b'M').await;
    assert_eq!(msg, format!("prepared statement \"{odd}\" already exists"));
    assert_eq!(simple(&mut s, "ROLLBACK").await, ["C:ROLLBACK"]);

    // Counted, and nobody else is affected.
    let other = connect(&proxy, &user).await.unwrap();
    for i in 0..5 {
        other.prepare(&text(i)).await.unwrap();
    }
    let errors = proxy
        .shared()
        .errors
        .snapshot()
        .find(|(k, _)| *k == "client_statement_limit");
    assert!(errors.is_some_and(|(_, n)| n >= 4), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_splitting_on_a_batch_that_gets_no_server_is_answered_once() {
    let user = create_user("splitskip").await;
    let mut setup = Setup::new(&[&user]).pool("size = 1\ncheckout_timeout = \"1s\"");
    setup.routing = "read_write_split = true".to_owned();
    let proxy = setup.start().await;
    let write = "SELECT pg_current_xact_id()::text";
    // A holds the one primary connection in a transaction.
    let a = connect(&proxy, &user).await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.simple_query(write).await.unwrap();
    // B's batch needs the primary too: one timeout, one error, one ReadyForQuery.
    let mut b = login(proxy.local_addr(), &user).await;
    assert_eq!(
        rows(&mut b, &[parse_msg("", write), bind_msg(""), execute_msg()]).await,
        ["E:57014"]
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        rows(&mut b, &[parse_msg("", write), bind_msg(""), execute_msg()]).await[..2],
        ["1", "2"]
    );

    // A name in use, refused without a server (the server accepted this text
    // before): the batch's Sync gets no server either.
    assert_eq!(rows(&mut b, &[parse_msg("s1", "SELECT 1")]).await, ["1"]);
    let before = proxy.shared().live().stats["appdb"]
        .xact_count
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        rows(&mut b, &[parse_msg("s2", "SELECT 1"), parse_msg("s2", "SELECT 1")]).await,
        ["1", "E:42P05"]
    );
    let after = proxy.shared().live().stats["appdb"]
        .xact_count
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(before, after, "no server connection taken");
    // Nothing more owed: the next query's answer is the next thing read.
    assert_eq!(simple(&mut b, "SELECT 10").await, ["D:10", "C:SELECT 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_follows_its_client_to_later_transactions() {
    let user = create_user("unnamedstmt").await;
    // One server connection, which every client's transactions share.
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    // A prepares (Parse, Sync), B's unnamed statement replaces it on the
    // connection, A binds its own in its next transaction.
    assert_eq!(rows(&mut a, &[parse_msg("", "SELECT 'a'")]).await, ["1"]);
    assert_eq!(
        rows(&mut b, &[parse_msg("", "SELECT 'b'"), bind_msg(""), execute_msg()]).await,
        ["1", "2", "D:b", "C:SELECT 1"]
    );
    assert_eq!(rows(&mut a, &run("")).await, ["2", "D:a", "C:SELECT 1"]);
    assert_eq!(rows(&mut b, &run("")).await, ["2", "D:b", "C:SELECT 1"]);
    // A client without one is refused as by PostgreSQL, never given another's.
    let mut c = login(proxy.local_addr(), &user).await;
    let refused = error_field(&mut c, &run(""), b'M').await;
    assert_eq!(refused, "unnamed prepared statement does not exist");
    assert_eq!(simple(&mut c, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(rows(&mut c, &run("")).await, ["E:26000"]);
    assert_eq!(simple(&mut c, "ROLLBACK").await, ["C:ROLLBACK"]);
    // Text that is not UTF-8 (the client's encoding is LATIN1): the client's all the same.
    assert_eq!(simple(&mut a, "SET client_encoding = 'LATIN1'").await, ["C:SET"]);
    let latin1 = message(b'P', b"\0SELECT 'caf\xe9'\0\0\0");
    let got = rows(&mut a, &[latin1, bind_msg(""), execute_msg()]).await;
    assert_eq!(got, ["1", "2", "D:caf\u{fffd}", "C:SELECT 1"]);
    assert_eq!(rows(&mut b, &[parse_msg("", "SELECT 'b'")]).await, ["1"]);
    assert_eq!(rows(&mut a, &run("")).await, ["2", "D:caf\u{fffd}", "C:SELECT 1"]);
    drop((a, b, c));

    // Splitting on: after a committed write, the proxy reads the primary's
    // WAL position with a query of its own on the connection, which drops its
    // unnamed statement; the client's next Bind must not meet the gap.
    let mut setup = Setup::new(&[&user]).pool("size = 1");
    setup.routing = "read_write_split = true".to_owned();
    let proxy = setup.start().await;
    let mut s = login(proxy.local_addr(), &user).await;
    let write = "SELECT pg_current_xact_id()::text";
    let pending = [
        parse_msg("", "SELECT 'after the write'"),
        parse_msg("w", write),
        bind_msg("w"),
        execute_msg(),
    ];
    assert_eq!(rows(&mut s, &pending).await[..3], ["1", "1", "2"]);
    // (A write in the same batch: the primary, the one connection just used.)
    let again = [
        parse_msg("w2", write),
        bind_msg("w2"),
        execute_msg(),
        bind_msg(""),
        execute_msg(),
    ];
    assert_eq!(
        rows(&mut s, &again).await[4..],
        ["2", "D:after the write", "C:SELECT 1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_renamed_routed_and_tracked_like_any_other() {
    // LATIN1 clients: 0xe9 is e acute, which is not UTF-8 on its own.
    let user = create_user("latin1").await;
    let proxy = Setup::new(&[&user]).pool("size = 2").start().await;
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    for s in [&mut a, &mut b] {
        assert_eq!(simple(s, "SET client_encoding = 'LATIN1'").await, ["C:SET"]);
    }
    // Named statements are the client's own, as for UTF-8 text (clients one
    // after the other share one server connection): the same name in two
    // clients is no clash, and a third client cannot bind another's.
    let cafe = message(b'P', b"s1\0SELECT 'caf\xe9'\0\0\0");
    assert_eq!(rows(&mut a, &[cafe]).await, ["1"]);
    let the = message(b'P', b"s1\0SELECT 'th\xe9'\0\0\0");
    let got = rows(&mut b, &[the, bind_msg("s1"), execute_msg()]).await;
    assert_eq!(got, ["1", "2", "D:th\u{fffd}", "C:SELECT 1"]);
    assert_eq!(rows(&mut a, &run("s1")).await, ["2", "D:caf\u{fffd}", "C:SELECT 1"]);
    let mut c = login(proxy.local_addr(), &user).await;
    assert_eq!(rows(&mut c, &run("s1")).await, ["E:26000"]);
    // A name that is not UTF-8 goes to the server as it is, for the
    // transaction: the connection is reset before anyone else gets it.
    let named = message(b'P', b"s\xe9\0SELECT 1\0\0\0");
    let bind = message(b'B', b"\0s\xe9\0\0\0\0\0\0\0");
    for s in [&mut a, &mut b] {
        let got = rows(s, &[named.clone(), bind.clone(), execute_msg()]).await;
        assert_eq!(got, ["1", "2", "D:1", "C:SELECT 1"]);
    }
    // A setting whose value is not UTF-8 cannot be carried faithfully: the
    // client keeps its server connection, and nobody else gets the setting.
    assert_eq!(simple(&mut a, b"SET application_name = 'caf\xe9'").await, ["C:SET"]);
    let shown = simple(&mut b, "SHOW application_name").await;
    assert!(!shown[0].contains("caf"), "{shown:?}");
    // (PostgreSQL shows the e acute of application_name as "??" or "\xc3\xa9".)
    let shown = simple(&mut a, "SHOW application_name").await;
    assert!(shown[0].starts_with("D:caf"), "{shown:?}");
    drop((a, b, c));

    // SJIS: 0x95 0x5c is one character, whose second byte is a backslash's.
    // Read byte by byte, the escape string would swallow the SET after it.
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    assert_eq!(simple(&mut a, "SET client_encoding = 'SJIS'").await, ["C:SET"]);
    let hidden = b"SELECT E'\x95\x5c'; SET work_mem = '1111kB'; --'";
    assert_eq!(simple(&mut a, hidden).await[1..], ["C:SELECT 1", "C:SET"]);
    assert_ne!(simple(&mut b, "SHOW work_mem").await[0], "D:1111kB");
    assert_eq!(simple(&mut a, "SHOW work_mem").await[0], "D:1111kB");
    drop((a, b));
    // The same with the encoding set for one transaction only.
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    assert_eq!(simple(&mut a, "BEGIN").await, ["C:BEGIN"]);
    assert_eq!(simple(&mut a, "SET LOCAL client_encoding = 'SJIS'").await, ["C:SET"]);
    let hidden = b"SELECT E'\x95\x5c'; SET work_mem = '2222kB'; --'";
    assert_eq!(simple(&mut a, hidden).await[1..], ["C:SELECT 1", "C:SET"]);
    assert_eq!(simple(&mut a, "COMMIT").await, ["C:COMMIT"]);
    assert_ne!(simple(&mut b, "SHOW work_mem").await[0], "D:2222kB");
    assert_eq!(simple(&mut a, "SHOW work_mem").await[0], "D:2222kB");
    drop((a, b));

    // Splitting on: such text is not read to route it, so it goes to the
    // primary (a write sent to a replica would fail there).
    let mut setup = Setup::new(&[&user]);
    setup.routing = "read_write_split = true\nhealth_check_interval = \"20ms\"".to_owned();
    let proxy = setup.start().await;
    let mut s = login(proxy.local_addr(), &user).await;
    // (The replicas join the rotation after their first health check.)
    let on_replicas = || {
        proxy.shared().live().stats["appdb"]
            .routed_replica
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut tries = 0;
    while on_replicas() == 0 {
        simple(&mut s, "SELECT 1").await;
        tries += 1;
        assert!(tries < 300, "no read reached a replica");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // (Each client's first write, so that read-your-writes has no say.)
    let mut t = login(proxy.local_addr(), &user).await;
    for c in [&mut s, &mut t] {
        assert_eq!(simple(c, "SET client_encoding = 'LATIN1'").await, ["C:SET"]);
    }
    let before = on_replicas();
    let write = b"SELECT pg_current_xact_id()::text <> 'caf\xe9'";
    assert_eq!(simple(&mut s, write).await, ["D:t", "C:SELECT 1"]);
    let parse = message(b'P', b"\0SELECT pg_current_xact_id()::text <> 'caf\xe9'\0\0\0");
    let got = rows(&mut t, &[parse, bind_msg(""), execute_msg()]).await;
    assert_eq!(got, ["1", "2", "D:t", "C:SELECT 1"]);
    assert_eq!(on_replicas(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_encoding_the_role_sets_is_read_as_the_server_reads_it() {
    let user = create_user("sjisrole").await;
    let role = format!("ALTER ROLE {} SET client_encoding = 'SJIS'", user.name);
    superuser().await.batch_execute(&role).await.unwrap();
    let proxy = Setup::new(&[&user])
        .pool("size = 2\ncheckout_timeout = \"2s\"")
        .start()
        .await;
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    // No client_encoding in the startup packet: the role's applies, and
    // 0x95 0x5c is one SJIS character (see the test above).
    assert_eq!(simple(&mut a, "SHOW client_encoding").await[0], "D:SJIS");
    let hidden = b"SELECT E'\x95\x5c'; SET work_mem = '1111kB'; --'";
    assert_eq!(simple(&mut a, hidden).await[1..], ["C:SELECT 1", "C:SET"]);
    assert_ne!(simple(&mut b, "SHOW work_mem").await[0], "D:1111kB");
    assert_eq!(simple(&mut a, "SHOW work_mem").await[0], "D:1111kB");
    // A client that asks for UTF-8 is read as UTF-8, where no character
    // ends in 0x5c: its SET is tracked, and it is not pinned (A is, to one
    // of the two server connections; B still gets the other).
    let mut c = login(proxy.local_addr(), &user).await;
    assert_eq!(simple(&mut c, "SET client_encoding = 'UTF8'").await, ["C:SET"]);
    let text = "SELECT E'\u{d5}\\\\'; SET work_mem = '3333kB'";
    assert_eq!(simple(&mut c, text).await, ["D:\u{d5}\\", "C:SELECT 1", "C:SET"]);
    let shown = simple(&mut b, "SHOW work_mem").await;
    assert!(shown[0].starts_with("D:") && shown[0] != "D:3333kB", "{shown:?}");
    assert_eq!(simple(&mut c, "SHOW work_mem").await[0], "D:3333kB");

    // RESET returns the server to the role's encoding: text sent behind it,
    // even before its answer, is read as SJIS.
    let proxy = Setup::new(&[&user]).pool("size = 1").start().await;
    let mut d = login(proxy.local_addr(), &user).await;
    assert_eq!(simple(&mut d, "SET client_encoding = 'UTF8'").await, ["C:SET"]);
    let hidden = b"SELECT E'\x95\x5c'; SET work_mem = '4444kB'; --'\0";
    let pipelined = [message(b'Q', b"RESET client_encoding\0"), message(b'Q', hidden)].concat();
    tokio::io::AsyncWriteExt::write_all(&mut d, &pipelined).await.unwrap();
    assert_eq!(until_ready(&mut d).await.len(), 2);
    let answers = until_ready(&mut d).await;
    assert!(!answers.iter().any(|(tag, _)| *tag == b'E'), "{answers:?}");
    assert_eq!(simple(&mut d, "SHOW work_mem").await[0], "D:4444kB");
    drop(d);
    // D was pinned: its server connection is reset before the next client.
    let mut e = login(proxy.local_addr(), &user).await;
    assert_ne!(simple(&mut e, "SHOW work_mem").await[0], "D:4444kB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_renaming_off_what_a_bind_does_is_what_the_server_holds_under_its_name() {
    // One server connection, renaming off: statement names reach it as the
    // clients wrote them, and a Bind runs whatever it holds under the name.
    let user = create_user("clientnamed").await;
    let proxy = Setup::new(&[&user])
        .pool("size = 1\nmax_prepared_statements = 0")
        .start()
        .await;
    let mut a = login(proxy.local_addr(), &user).await;
    let mut b = login(proxy.local_addr(), &user).await;
    let tenant = "SELECT current_setting('app.tenant', true)";
    let set_b = "SELECT set_config('app.tenant', 'tenant-b', false)";
    // A Parse the server refuses records nothing: one of a name taken ...
    assert_eq!(rows(&mut a, &[parse_msg("s1", "SELECT 1")]).await, ["1"]);
    assert_eq!(rows(&mut b, &[parse_msg("s1", set_b)]).await, ["E:42P05"]);
    assert_eq!(rows(&mut a, &run("s1")).await, ["2", "D:1", "C:SELECT 1"]);
    // ... or one that fails, whose name another client then takes.
    let failing = format!("{set_b} FROM no_such_table");
    assert_eq!(rows(&mut b, &[parse_msg("s2", &failing)]).await, ["E:42P01"]);
    let got = rows(&mut a, &[parse_msg("s2", "SELECT 2"), bind_msg("s2"), execute_msg()]).await;
    assert_eq!(got, ["1", "2", "D:2", "C:SELECT 1"]);
    // (B uses the connection in between: A's settings are carried back.)
    assert_ne!(simple(&mut b, tenant).await[0], "D:tenant-b");
    assert_ne!(simple(&mut a, tenant).await[0], "D:tenant-b");

    // A Close the server skips after an error leaves the statement there,
    // and what it does: B runs A's statement, and the setting is B's now,
    // not a third client's.
    let set_a = "SELECT set_config('app.tenant', 'tenant-a', false)";
    assert_eq!(rows(&mut a, &[parse_msg("s3", set_a)]).await, ["1"]);
    let failing = [
        parse_msg("", "SELECT 1/0"),
        bind_msg(""),
        execute_msg(),
        target(b'C', b'S', "s3"),
    ];
    assert_eq!(rows(&mut a, &failing).await, ["1", "E:22012"]);
    assert_eq!(rows(&mut b, &run("s3")).await, ["2", "D:tenant-a", "C:SELECT 1"]);
    let mut c = login(proxy.local_addr(), &user).await;
    assert_ne!(simple(&mut c, tenant).await[0], "D:tenant-a");
    assert_eq!(simple(&mut b, tenant).await[0], "D:tenant-a");
    // Once the name is free (here by a DEALLOCATE dbproxy does not follow),
    // what it does is the new statement's.
    assert_eq!(
        simple(&mut b, "DEALLOCATE s3; SELECT 1").await,
        ["C:DEALLOCATE", "D:1", "C:SELECT 1"]
    );
    assert_eq!(rows(&mut c, &[parse_msg("s3", "SELECT 3")]).await, ["1"]);
    assert_eq!(rows(&mut c, &run("s3")).await, ["2", "D:3", "C:SELECT 1"]);
    assert_eq!(simple(&mut b, tenant).await[0], "D:tenant-a");
    assert_ne!(simple(&mut c, tenant).await[0], "D:tenant-a");

    // Pipelined: a Bind behind unanswered Parses of its name in earlier
    // batches may meet any of them (here the first; the second is refused as
    // a duplicate). The client is pinned, and its connection reset after it.
    let mut d = login(proxy.local_addr(), &user).await;
    let set_d = "SELECT set_config('app.tenant', 'tenant-d', false)";
    let sync = message(b'S', &[]);
    let batches = [
        parse_msg("s4", set_d),
        sync.clone(),
        parse_msg("s4", "SELECT 4"),
        sync.clone(),
        bind_msg("s4"),
        execute_msg(),
        sync,
    ];
    tokio::io::AsyncWriteExt::write_all(&mut d, &batches.concat())
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.extend(until_ready(&mut d).await.iter().map(|(tag, body)| spelled(*tag, body)));
    }
    assert_eq!(answers, ["1", "E:42P05", "2", "D", "C:SELECT 1"]);
    drop(d);
    assert_ne!(simple(&mut c, tenant).await[0], "D:tenant-d");

    // A pinned client's settings set again after its RESET ALL leave its
    // unnamed statement alone (a query would drop it, and with renaming off
    // dbproxy does not prepare it again).
    let mut f = login(proxy.local_addr(), &user).await;
    assert_eq!(
        simple(&mut f, "LISTEN renaming_off; SET work_mem = '1MB'").await,
        ["C:LISTEN", "C:SET"]
    );
    assert_eq!(rows(&mut f, &[parse_msg("", "SELECT 5")]).await, ["1"]);
    let reset = [parse_msg("r", "RESET ALL"), bind_msg("r"), execute_msg()];
    // (The RESET reports the server connection's application_name: README.)
    let got = rows(&mut f, &reset).await;
    assert_eq!(got, ["1", "2", "C:RESET", "S:application_name=dbproxy="]);
    assert_eq!(rows(&mut f, &run("")).await, ["2", "D:5", "C:SELECT 1"]);
    assert_eq!(simple(&mut f, "SHOW application_name").await, ["D:", "C:SHOW"]);
}
