//! Hostile or odd bytes over a raw socket: each gets a clear error or a
//! hang-up, and the proxy keeps serving a normal client meanwhile.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Reads until EOF (or 5 s) and returns what the proxy sent.
async fn reply(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    out
}

/// The SQLSTATE in an ErrorResponse, if the bytes start with one.
fn error_code(bytes: &[u8]) -> Option<String> {
    let body = bytes.strip_prefix(b"E")?.get(4..)?;
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startups_get_clear_errors_and_others_are_served() {
    let user = create_user("raw").await;
    let proxy = Setup::new(&[&user]).start().await;
    let addr = proxy.local_addr();
    let normal = connect(&proxy, &user).await.unwrap();

    // Protocol 2.0 is refused with 0A000.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(2 << 16, &[("user", "x")])).await.unwrap();
    assert_eq!(error_code(&reply(&mut s).await).as_deref(), Some("0A000"));

    // Bytes sent after SSLRequest before our answer: refused, never "negotiated".
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend_from_slice(&startup(3 << 16, &[("user", "x")]));
    s.write_all(&bytes).await.unwrap();
    let r = reply(&mut s).await;
    assert_eq!(error_code(&r).as_deref(), Some("08P01"), "{r:?}");

    // A 2 GB length claim is refused without waiting for (or allocating) it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await.unwrap();
    assert_eq!(error_code(&reply(&mut s).await).as_deref(), Some("08P01"));

    // Random garbage: an error or a hang-up, never a hang.
    for seed in 0u32..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let junk: Vec<u8> = (0..64u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 13) as u8)
            .collect();
        let _ = s.write_all(&junk).await;
        let _ = reply(&mut s).await;
    }

    // A well-formed startup for a user the proxy does not know: 28000.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(3 << 16, &[("user", "nobody"), ("database", "appdb")]))
        .await
        .unwrap();
    assert_eq!(error_code(&reply(&mut s).await).as_deref(), Some("28000"));

    assert_eq!(normal.query_one("SELECT 11", &[]).await.unwrap().get::<_, i32>(0), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_after_login_is_refused() {
    let user = create_user("rawbig").await;
    let mut setup = Setup::new(&[&user]);
    setup.proxy = "max_message_size = 65536".into();
    let proxy = setup.start().await;
    let client = connect(&proxy, &user).await.unwrap();
    let big = "x".repeat(100_000);
    let err = client.query_one(&format!("SELECT '{big}'"), &[]).await.unwrap_err();
    // The connection is closed with an error naming the limit.
    assert_eq!(sqlstate(&err), "54000", "{}", describe(&err));
    assert!(describe(&err).contains("limit"), "{}", describe(&err));
    let other = connect(&proxy, &user).await.unwrap();
    assert_eq!(other.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_with_53300_and_serves_the_rest() {
    let user = create_user("maxconn").await;
    let mut setup = Setup::new(&[&user]);
    setup.proxy = "max_client_conn = 3".into();
    let proxy = setup.start().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&proxy, &user).await.unwrap());
    }
    let Err(err) = connect(&proxy, &user).await else {
        panic!("a fourth client got in");
    };
    assert_eq!(sqlstate(&err), "53300", "{}", describe(&err));
    assert!(describe(&err).contains("max_client_conn"), "{}", describe(&err));
    assert_eq!(held[0].query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    held.pop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            connect(&proxy, &user).await.is_ok()
        })
        .await,
        "a slot frees when a client leaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_connections_neither_linger_nor_slow_others() {
    let user = create_user("silent").await;
    let mut setup = Setup::new(&[&user]);
    setup.proxy = "client_login_timeout = \"1s\"".into();
    let proxy = setup.start().await;
    let addr = proxy.local_addr();
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // A normal client meanwhile answers quickly.
    let started = std::time::Instant::now();
    let client = connect(&proxy, &user).await.unwrap();
    client.query_one("SELECT 1", &[]).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // A startup packet sent one byte at a time still logs in (within the timeout).
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let packet = startup(3 << 16, &[("user", &user.name), ("database", "appdb")]);
    for b in &packet {
        slow.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut first = [0u8; 1];
    slow.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], b'R', "authentication request after a byte-by-byte startup");
    // The silent ones are closed by client_login_timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut closed = 0;
    for s in &mut silent {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "every silent connection was closed");
    // The slow client never answered the SCRAM challenge: the timeout closed it too.
    assert_eq!(proxy.shared().clients.count(), 1, "only the logged-in client remains");
}
