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
