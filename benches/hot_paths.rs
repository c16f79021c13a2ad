//! Criterion micro-benchmarks of the per-message hot paths: scanning server
//! output for forwarding, scanning client input, and SCRAM verification.

use std::hint::black_box;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dbproxy::auth::{ScramExchange, ScramSecret};
use dbproxy::protocol::{Item, Scanner};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// A typical `pgbench -S` answer: RowDescription, one DataRow,
/// CommandComplete, ReadyForQuery; or `rows` DataRows of `width` bytes.
fn result_set(rows: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::new();
    msg(
        &mut out,
        b'T',
        b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    );
    let mut row = vec![0u8, 1];
    row.extend_from_slice(&(width as u32).to_be_bytes());
    row.extend(std::iter::repeat_n(b'7', width));
    for _ in 0..rows {
        msg(&mut out, b'D', &row);
    }
    msg(&mut out, b'C', b"SELECT 1\0");
    msg(&mut out, b'Z', b"I");
    out
}

/// Walks a buffer as the session loop does; returns the bytes covered.
fn scan(buf: &[u8], whole: fn(u8) -> bool) -> usize {
    let mut scanner = Scanner::new(1 << 30);
    let mut pos = 0;
    while let Ok(Some(item)) = scanner.next(&buf[pos..], whole) {
        if let Item::Whole { tag: b'Z', .. } = item {
            black_box(buf[pos + 5]);
        }
        pos += item.len();
    }
    pos
}

fn framing(c: &mut Criterion) {
    let whole_backend: fn(u8) -> bool = |t| !matches!(t, b'D' | b'd');
    let mut g = c.benchmark_group("scan_server_output");
    for (name, rows, width) in [
        ("select_one_row", 1, 8),
        ("100_rows_of_100B", 100, 100),
        ("10_rows_of_64KiB", 10, 65536),
    ] {
        let buf = result_set(rows, width);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(name, |b| b.iter(|| scan(black_box(&buf), whole_backend)));
    }
    g.finish();

    let mut client = Vec::new();
    msg(
        &mut client,
        b'P',
        b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
    );
    msg(&mut client, b'B', b"\0\0\0\0\0\x01\0\0\0\x0512345\0\0");
    msg(&mut client, b'D', b"P\0");
    msg(&mut client, b'E', b"\0\0\0\0\0");
    msg(&mut client, b'S', b"");
    let whole_frontend: fn(u8) -> bool = |t| t != b'd';
    c.bench_function("scan_client_extended_batch", |b| {
        b.iter(|| scan(black_box(&client), whole_frontend))
    });
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Server-side cost of one SCRAM login, with the client's salted password
/// computed once outside the loop (the salt is fixed per user).
fn scram(c: &mut Criterion) {
    let password = b"app-secret";
    let secret = ScramSecret::from_password("app-secret");
    let client_first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO";
    let (_, server_first) = ScramExchange::start(&secret, client_first).expect("valid");
    let salt = server_first
        .split(",s=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("salt");
    let salt = B64.decode(salt).expect("base64");
    let mut u = hmac(password, &[salt.as_slice(), &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..4096 {
        u = hmac(password, &u);
        salted.iter_mut().zip(u).for_each(|(s, x)| *s ^= x);
    }
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    c.bench_function("scram_server_exchange", |b| {
        b.iter(|| {
            let (exchange, server_first) = ScramExchange::start(&secret, client_first).expect("valid");
            let nonce = server_first.split(',').next().expect("nonce").trim_start_matches("r=");
            let without_proof = format!("c=biws,r={nonce}");
            let auth = format!("n=,r=rOprNGfwEbeRWgbNEkqO,{server_first},{without_proof}");
            let signature = hmac(&stored_key, auth.as_bytes());
            let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
            let client_final = format!("{without_proof},p={}", B64.encode(proof));
            black_box(exchange.finish(client_final.as_bytes()).expect("proof accepted"))
        })
    });
    c.bench_function("scram_secret_per_user", |b| {
        b.iter(|| ScramSecret::from_password(black_box("app-secret")))
    });
}

/// Statement classification for read/write splitting: uncached (the
/// classifier itself) and cached (the router's lookup by full text, or by
/// shape).
fn routing(c: &mut Criterion) {
    use dbproxy::router::{Router, Volatility, classify};
    let catalog = |name: &str| match name {
        "count" | "lower" | "coalesce" | "now" => Some(Volatility::Stable),
        _ => None,
    };
    let statements = [
        (
            "pgbench_select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
        ),
        (
            "oltp_join",
            "SELECT o.id, o.total, lower(c.name), count(*) OVER () FROM orders o JOIN customers c ON c.id = o.customer_id \
             WHERE o.created_at > now() - interval '1 day' AND o.status IN ('open', 'paid') ORDER BY o.id DESC LIMIT 50",
        ),
        (
            "update",
            "UPDATE pgbench_accounts SET abalance = abalance + -2139 WHERE aid = 48213;",
        ),
    ];
    let mut g = c.benchmark_group("classify_uncached");
    for (name, sql) in statements {
        g.bench_function(name, |b| b.iter(|| classify(black_box(sql), &catalog)));
    }
    g.finish();
    let router = Router::new(2);
    let mut g = c.benchmark_group("classify_cached");
    for (name, sql) in statements {
        router.classify(sql);
        g.bench_function(name, |b| b.iter(|| router.classify(black_box(sql))));
    }
    // Texts that differ from a cached one only in a literal: found by their
    // shape (pgbench -S through the simple protocol).
    let texts: Vec<String> = (0..1024)
        .map(|aid| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"))
        .collect();
    router.classify(&texts[0]);
    let mut next = texts.iter().cycle();
    g.bench_function("pgbench_select_other_literal", |b| {
        b.iter(|| router.classify(black_box(next.next().map_or("", String::as_str))))
    });
    g.finish();
    // The session-effects pre-check every simple query pays in transaction mode.
    let mut g = c.benchmark_group("session_effects");
    for (name, sql) in statements {
        g.bench_function(name, |b| b.iter(|| dbproxy::sql::analyze(black_box(sql))));
    }
    g.finish();
}

criterion_group!(benches, framing, scram, routing);
criterion_main!(benches);
