//! TLS towards clients: sslmode=require and verify-full against a CA made
//! here, with tokio-postgres (rustls) and psql. TLS towards the servers
//! (`[server_tls]`), whose certificate the cluster script made.

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
    set_mode(&dir.join("server.key"), 0o600);
    ca.der().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_and_verify_full() {
    let user = create_user("tls").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certs(dir.path());
    let mut setup = Setup::new(&[&user]);
    setup.tls = Some((dir.path().join("server.pem"), dir.path().join("server.key")));
    // A key others can read is refused, as PostgreSQL refuses its own.
    set_mode(&dir.path().join("server.key"), 0o644);
    let problems = dbproxy::Config::parse(&setup.toml()).expect_err("a world-readable key is accepted");
    assert!(
        problems
            .iter()
            .any(|p| p.key == "tls" && p.message.contains("group or world access")),
        "{problems:?}"
    );
    set_mode(&dir.path().join("server.key"), 0o600);
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
    // The servers of this test binary have TLS on, and dbproxy's default
    // server_tls.sslmode is "prefer": the proxy-to-server hop is encrypted too.
    assert!(ssl, "the server connection is not encrypted");
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

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
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

/// Whether the server connection serving `client` is encrypted.
async fn server_hop_encrypted(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await?;
    Ok(row.get(0))
}

/// The CA that signed the servers' certificate (this binary's cluster has TLS on).
fn servers_ca() -> std::path::PathBuf {
    cluster()
        .ssl_ca
        .clone()
        .expect("the servers have TLS on in this binary")
}

/// The configuration text of `setup` plus a `[server_tls]` section.
fn server_tls_toml(setup: &Setup, lines: &str) -> String {
    format!("{}\n[server_tls]\n{lines}\n", setup.toml())
}

/// A proxy whose configuration is `setup` plus a `[server_tls]` section.
async fn with_server_tls(setup: &Setup, lines: &str) -> dbproxy::Proxy {
    let text = server_tls_toml(setup, lines);
    let config = dbproxy::Config::parse(&text).unwrap_or_else(|p| panic!("config invalid: {p:?}"));
    dbproxy::Proxy::start(config).await.expect("proxy starts")
}

/// `[server_tls]`: `verify-full` against the servers' CA encrypts every
/// server connection; a CA that did not sign their certificate fails each
/// request with a clear error while the client stays connected, except under
/// `prefer`, which goes on without TLS; `disable` keeps to plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_verify_full_a_wrong_ca_prefer_and_disable() {
    let user = create_user("srvtls").await;
    let setup = Setup::new(&[&user]);
    let ca = servers_ca();

    let proxy = with_server_tls(
        &setup,
        &format!("sslmode = \"verify-full\"\nca_file = \"{}\"", ca.display()),
    )
    .await;
    let client = connect(&proxy, &user).await.unwrap();
    assert!(server_hop_encrypted(&client).await.unwrap(), "verify-full");
    // Enough rows to cross many TLS records.
    let rows = client
        .query("SELECT repeat(md5(i::text), 40) FROM generate_series(1, 5000) i", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);
    drop(client);
    drop(proxy);

    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    let wrong = other.path().join("ca.pem");
    let proxy = with_server_tls(
        &setup,
        &format!("sslmode = \"verify-ca\"\nca_file = \"{}\"", wrong.display()),
    )
    .await;
    let client = connect(&proxy, &user).await.expect("the login needs no server");
    for _ in 0..2 {
        let err = client.simple_query("SELECT 1").await.unwrap_err();
        let text = describe(&err);
        assert!(text.contains("TLS handshake") && text.contains("certificate"), "{text}");
        assert_eq!(sqlstate(&err), "08001", "{text}");
    }
    drop(client);
    drop(proxy);

    // prefer, as libpq: a handshake that fails goes on without TLS.
    let proxy = with_server_tls(
        &setup,
        &format!("sslmode = \"prefer\"\nca_file = \"{}\"", wrong.display()),
    )
    .await;
    let client = connect(&proxy, &user).await.unwrap();
    assert!(
        !server_hop_encrypted(&client).await.unwrap(),
        "prefer after a failed handshake"
    );
    drop(client);
    drop(proxy);

    let proxy = with_server_tls(&setup, "sslmode = \"disable\"").await;
    let client = connect(&proxy, &user).await.unwrap();
    assert!(!server_hop_encrypted(&client).await.unwrap(), "disable");
}

/// `[server_tls]` is reloadable: idle server connections are closed at once
/// and one in use when it is given back, so everything after the reload runs
/// on the new setting; a CA file replaced in place counts as a change; one
/// that cannot be read refuses the reload and keeps the running setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_server_tls_to_every_later_transaction() {
    let user = create_user("srvtls_reload").await;
    let setup = Setup::new(&[&user]);
    let ca = servers_ca();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let write = |lines: &str| std::fs::write(&path, server_tls_toml(&setup, lines)).unwrap();
    write("sslmode = \"disable\"");
    let proxy = dbproxy::Proxy::start(dbproxy::Config::load(&path).unwrap())
        .await
        .expect("proxy starts");
    proxy.shared().set_config_path(path.clone());
    let idle = connect(&proxy, &user).await.unwrap();
    let busy = connect(&proxy, &user).await.unwrap();
    busy.batch_execute("BEGIN").await.unwrap();
    assert!(!server_hop_encrypted(&busy).await.unwrap(), "disable");
    // A second connection, left idle in the pool.
    assert!(!server_hop_encrypted(&idle).await.unwrap(), "disable");

    let ca_copy = dir.path().join("ca.pem");
    std::fs::copy(&ca, &ca_copy).unwrap();
    write(&format!(
        "sslmode = \"verify-full\"\nca_file = \"{}\"",
        ca_copy.display()
    ));
    proxy.shared().reload().expect("reload");
    assert!(
        server_hop_encrypted(&idle).await.unwrap(),
        "the idle connection was closed"
    );
    assert!(
        !server_hop_encrypted(&busy).await.unwrap(),
        "a transaction in flight keeps its connection"
    );
    busy.batch_execute("COMMIT").await.unwrap();
    assert!(
        server_hop_encrypted(&busy).await.unwrap(),
        "the plain connection was closed when given back"
    );

    // Another CA's certificate under the same file name: the servers' no longer verify.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path());
    std::fs::copy(other.path().join("ca.pem"), &ca_copy).unwrap();
    proxy.shared().reload().expect("reload");
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "08001", "{}", describe(&err));

    std::fs::copy(&ca, &ca_copy).unwrap();
    proxy.shared().reload().expect("reload");
    assert!(server_hop_encrypted(&idle).await.unwrap(), "the right CA again");
    std::fs::write(&ca_copy, "not a certificate").unwrap();
    assert!(
        proxy.shared().reload().is_err(),
        "an unreadable CA file refuses the reload"
    );
    assert!(server_hop_encrypted(&idle).await.unwrap(), "the running setting stays");
}

/// Signs a client certificate for `user` with the cluster's test CA; returns
/// (certificate file, key file) in `dir`.
fn client_cert(dir: &Path, user: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ssl = cluster().dir.join("ssl");
    let (key, csr, cert) = (dir.join("client.key"), dir.join("client.csr"), dir.join("client.crt"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let subject = format!("/CN={user}");
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject]
        .into_iter()
        .chain(["-keyout", key.to_str().unwrap(), "-out", csr.to_str().unwrap()])
        .collect::<Vec<_>>());
    let (ca_crt, ca_key, ext) = (ssl.join("ca.crt"), ssl.join("ca.key"), dir.join("client.ext"));
    // Extensions make it an X.509 v3 certificate, the only version webpki accepts.
    std::fs::write(&ext, "basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-set_serial",
        "4242",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        ca_crt.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    set_mode(&key, 0o600);
    (cert, key)
}

/// `[server_tls]` `cert_file`/`key_file`: dbproxy presents a client
/// certificate, so a role the servers authenticate by certificate (pg_hba
/// `cert`, set up by the cluster script for members of `dbproxy_cert`) works
/// through it; without the certificate its logins fail with the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_presents_a_client_certificate() {
    let user = create_user("srvcert").await;
    superuser()
        .await
        .batch_execute(&format!("GRANT dbproxy_cert TO {}", user.name))
        .await
        .unwrap();
    let setup = Setup::new(&[&user]);
    let ca = servers_ca();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = client_cert(dir.path(), &user.name);

    let proxy = with_server_tls(
        &setup,
        &format!(
            "sslmode = \"verify-full\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .await;
    let client = connect(&proxy, &user).await.unwrap();
    let dn: String = client
        .query_one("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dn, format!("/CN={}", user.name));
    drop(client);
    drop(proxy);

    let proxy = with_server_tls(
        &setup,
        &format!("sslmode = \"verify-full\"\nca_file = \"{}\"", ca.display()),
    )
    .await;
    let client = connect(&proxy, &user).await.expect("the login needs no server");
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(describe(&err).contains("certificate"), "{}", describe(&err));
}
