//! TLS towards clients: sslmode=require and verify-full against a CA made
//! here, with tokio-postgres (rustls) and psql.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::harness::*;

/// Writes ca.pem, server.pem and server.key (for "localhost" and 127.0.0.1).
fn make_certs(dir: &Path) -> CertificateDer<'static> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dbproxy test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca.der().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_and_verify_full() {
    let user = create_user("tls").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certs(dir.path());
    let mut setup = Setup::new(&[&user]);
    setup.tls = Some((dir.path().join("server.pem"), dir.path().join("server.key")));
    let proxy = setup.start().await;
    let port = proxy.local_addr().port();

    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = MakeRustlsConnect::new(config);
    let url = format!(
        "postgresql://{}:{}@localhost:{port}/appdb?sslmode=require",
        user.name, user.password
    );
    let (client, conn) = tokio_postgres::connect(&url, tls).await.expect("TLS login");
    tokio::spawn(conn);
    let ssl: bool = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(false);
    // The proxy-to-server hop is plaintext here; what matters is the client hop worked.
    assert!(!ssl);
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);

    let ca_path = dir.path().join("ca.pem");
    for mode in ["require", "verify-full"] {
        let conninfo = format!(
            "host=localhost port={port} dbname=appdb user={} password={} sslmode={mode} sslrootcert={}",
            user.name,
            user.password,
            ca_path.display()
        );
        let out = Command::new("psql")
            .args([&conninfo, "-XAtc", "SELECT 'tls ok'"])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tls ok");
    }
    // verify-full checks the host name: 127.0.0.2 is not in the certificate.
    let conninfo = format!(
        "host=127.0.0.2 port={port} dbname=appdb user={} password={} sslmode=verify-full sslrootcert={}",
        user.name,
        user.password,
        ca_path.display()
    );
    let out = Command::new("psql")
        .args([&conninfo, "-XAtc", "SELECT 1"])
        .output()
        .expect("psql runs");
    assert!(
        !out.status.success(),
        "verify-full must reject a host the certificate does not name"
    );
    // Plaintext clients are still allowed unless configured otherwise.
    let out = psql_plain(&user, port, "disable", "SELECT 2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(proxy);

    // tls.client_mode = "require": plaintext logins are refused with 28000,
    // TLS ones work.
    setup.tls_lines = "client_mode = \"require\"".into();
    let proxy = setup.start().await;
    let port = proxy.local_addr().port();
    let out = psql_plain(&user, port, "disable", "SELECT 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plaintext client got in");
    assert!(stderr.contains("requires TLS"), "{stderr}");
    let out = psql_plain(&user, port, "require", "SELECT 3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

/// Runs `sql` with psql over 127.0.0.1 with `sslmode`.
fn psql_plain(user: &TestUser, port: u16, sslmode: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([&format!("{}?sslmode={sslmode}", url_plain(user, port)), "-XAtc", sql])
        .output()
        .expect("psql runs")
}

fn url_plain(user: &TestUser, port: u16) -> String {
    format!("postgresql://{}:{}@127.0.0.1:{port}/appdb", user.name, user.password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_configured_ssl_is_declined() {
    let user = create_user("notls").await;
    let proxy = Setup::new(&[&user]).start().await;
    let url = url(&proxy, &user);
    let out = Command::new("psql")
        .args([&format!("{url}?sslmode=prefer"), "-XAtc", "SELECT 1"])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("psql")
        .args([&format!("{url}?sslmode=require"), "-XAtc", "SELECT 1"])
        .output()
        .expect("psql runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not support SSL"));
}
