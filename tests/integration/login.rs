//! Logging in through the proxy: connection strings, wrong credentials, psql.

use std::process::Command;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_string_login_reaches_the_primary() {
    let user = create_user("login").await;
    let proxy = Setup::new(&[&user]).start().await;
    let client = connect(&proxy, &user).await.expect("login through the proxy");
    let row = client.query_one("SELECT current_user::text, 6 * 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), user.name);
    assert_eq!(row.get::<_, i32>(1), 42);
    assert_eq!(server_port(&client).await, cluster().primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_get_clear_errors_and_others_keep_working() {
    let user = create_user("creds").await;
    let proxy = Setup::new(&[&user]).start().await;
    let good = connect(&proxy, &user).await.expect("good login");

    let wrong = TestUser {
        name: user.name.clone(),
        password: "not-the-password".into(),
    };
    let Err(err) = connect(&proxy, &wrong).await else {
        panic!("wrong password refused")
    };
    assert_eq!(sqlstate(&err), "28P01", "{}", describe(&err));
    assert!(
        describe(&err).contains("password authentication failed"),
        "{}",
        describe(&err)
    );

    let unknown_db = format!(
        "postgresql://{}:{}@{}/nosuchdb",
        user.name,
        user.password,
        proxy.local_addr()
    );
    let err = tokio_postgres::connect(&unknown_db, tokio_postgres::NoTls)
        .await
        .err()
        .expect("unknown db refused");
    assert_eq!(sqlstate(&err), "3D000", "{}", describe(&err));
    assert!(describe(&err).contains("nosuchdb"), "{}", describe(&err));

    let stranger = TestUser {
        name: "nobody_here".into(),
        password: "x".into(),
    };
    let Err(err) = connect(&proxy, &stranger).await else {
        panic!("unknown user refused")
    };
    assert_eq!(sqlstate(&err), "28000", "{}", describe(&err));
    assert!(describe(&err).contains("nobody_here"), "{}", describe(&err));

    // Everyone else is still served, on old and new connections.
    assert_eq!(good.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let again = connect(&proxy, &user).await.expect("new login after failures");
    assert_eq!(again.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_a_url_and_sees_errors() {
    let user = create_user("psql").await;
    let proxy = Setup::new(&[&user]).start().await;
    let out = Command::new("psql")
        .args([&url(&proxy, &user), "-XAtc", "SELECT 'hello from ' || current_user"])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("hello from {}", user.name)
    );

    let bad = format!("postgresql://{}:wrong@{}/appdb", user.name, proxy.local_addr());
    let out = Command::new("psql")
        .args([&bad, "-XAtc", "SELECT 1"])
        .output()
        .expect("psql runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_verifier_in_the_config_logs_clients_in() {
    let user = create_user("verifier").await;
    let verifier: String = superuser()
        .await
        .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&user.name])
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let setup = Setup::new(&[&user]);
    let plain = format!("password = \"{}\"", user.password);
    let toml = setup.toml();
    assert!(toml.contains(&plain));
    let toml = toml.replace(
        &plain,
        &format!("password = \"{verifier}\"\nserver_password = \"{}\"", user.password),
    );
    let config = dbproxy::Config::parse(&toml).unwrap();
    let proxy = dbproxy::Proxy::start(config).await.unwrap();
    let client = connect(&proxy, &user)
        .await
        .expect("the client's password matches the verifier");
    assert_eq!(client.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
    let wrong = TestUser {
        name: user.name.clone(),
        password: "wrong".into(),
    };
    let err = connect(&proxy, &wrong).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01", "{}", describe(&err));
}
