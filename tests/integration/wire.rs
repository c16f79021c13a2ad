//! Raw frontend/backend messages for tests that need exact control of what
//! goes over the wire: logging in by hand, extended-protocol batches, and
//! answers spelled out for comparison.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::TestUser;

pub fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
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

/// A frontend message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// SASLInitialResponse naming `mechanism` with `data`.
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

/// Reads one backend message; `None` on EOF or after 5 s.
pub async fn read_message(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        stream.read_exact(&mut body).await.ok()?;
        Some((head[0], body))
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.ok().flatten()
}

/// The SQLSTATE of an ErrorResponse body.
pub fn body_code(body: &[u8]) -> Option<String> {
    body_field(body, b'C')
}

/// A field (`C` code, `M` message, `H` hint, ...) of an ErrorResponse or
/// NoticeResponse body.
pub fn body_field(body: &[u8], field: u8) -> Option<String> {
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(&[field][..]))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// Connects and sends a startup packet for `user`; returns at the SASL request.
pub async fn until_sasl(addr: std::net::SocketAddr, user: &TestUser) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup(3 << 16, &[("user", &user.name), ("database", "appdb")]))
        .await
        .unwrap();
    let (tag, body) = read_message(&mut s).await.expect("an authentication request");
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &10i32.to_be_bytes(), "AuthenticationSASL");
    s
}

/// Logs `user` in over a raw socket; returns it after the first ReadyForQuery.
pub async fn login(addr: std::net::SocketAddr, user: &TestUser) -> TcpStream {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut scram = ScramSha256::new(user.password.as_bytes(), ChannelBinding::unsupported());
    let mut s = until_sasl(addr, user).await;
    s.write_all(&sasl_initial("SCRAM-SHA-256", scram.message()))
        .await
        .unwrap();
    let (_, body) = read_message(&mut s).await.unwrap();
    scram.update(&body[4..]).unwrap();
    s.write_all(&message(b'p', scram.message())).await.unwrap();
    while let Some((tag, _)) = read_message(&mut s).await {
        if tag == b'Z' {
            break;
        }
    }
    s
}

/// Logs in to the primary directly, bypassing the proxy.
pub async fn login_direct(user: &TestUser) -> TcpStream {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", crate::harness::cluster().primary)
        .parse()
        .unwrap();
    login(addr, user).await
}

pub fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let mut body = format!("{name}\0{sql}\0").into_bytes();
    body.extend_from_slice(&[0, 0]);
    message(b'P', &body)
}

pub fn bind_msg(statement: &str) -> Vec<u8> {
    let mut body = format!("\0{statement}\0").into_bytes();
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &body)
}

/// A Describe (`D`) or Close (`C`) of a statement (`S`) or portal (`P`).
pub fn target(tag: u8, kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend_from_slice(format!("{name}\0").as_bytes());
    message(tag, &body)
}

pub fn execute_msg() -> Vec<u8> {
    message(b'E', &[0, 0, 0, 0, 0])
}

/// Reads messages up to (not including) ReadyForQuery.
pub async fn until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let (tag, body) = read_message(s).await.expect("an answer");
        if tag == b'Z' {
            return out;
        }
        out.push((tag, body));
    }
}

/// A message as the tests compare it: CommandComplete tags, error codes and
/// ParameterStatus spelled out, anything else by its type.
pub fn spelled(tag: u8, body: &[u8]) -> String {
    match tag {
        b'C' => format!("C:{}", String::from_utf8_lossy(&body[..body.len() - 1])),
        b'E' => format!("E:{}", body_code(body).unwrap_or_default()),
        b'S' => format!("S:{}", String::from_utf8_lossy(body).replace('\0', "=")),
        other => char::from(other).to_string(),
    }
}

/// Sends `msgs` and a Sync; returns what came back up to ReadyForQuery.
pub async fn round(s: &mut TcpStream, msgs: &[Vec<u8>]) -> Vec<String> {
    let mut out: Vec<u8> = msgs.concat();
    out.extend_from_slice(&message(b'S', &[]));
    s.write_all(&out).await.unwrap();
    until_ready(s).await.iter().map(|(t, b)| spelled(*t, b)).collect()
}

/// Sends a simple query; returns its CommandComplete tags, error codes and
/// the first value of each row.
/// (`sql` as bytes: text in another client encoding than UTF-8 too.)
pub async fn simple(s: &mut TcpStream, sql: impl AsRef<[u8]>) -> Vec<String> {
    let mut body = sql.as_ref().to_vec();
    body.push(0);
    s.write_all(&message(b'Q', &body)).await.unwrap();
    let answers = until_ready(s).await;
    answers
        .iter()
        .filter_map(|(tag, body)| match tag {
            b'C' | b'E' => Some(spelled(*tag, body)),
            b'D' => Some(format!("D:{}", String::from_utf8_lossy(&body[6..]))),
            _ => None,
        })
        .collect()
}
