//! The command line: `--check`, and the environment the binary reads.

use std::process::{Command, Output};

use crate::harness::*;

/// Runs `dbproxy --config FILE --check` on `toml`, with `env` set.
fn check(toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbproxy"));
    cmd.arg("--config")
        .arg(&path)
        .arg("--check")
        .env_remove("TOKIO_WORKER_THREADS");
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test]
async fn check_accepts_a_valid_file_and_lists_every_problem_of_an_invalid_one() {
    let user = create_user("cli").await;
    let toml = Setup::new(&[&user]).toml();
    let out = check(&toml, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("configuration is valid\n"),
        "{}",
        text(&out.stdout)
    );

    let bad = toml.replace("[pool]\n", "[pool]\nmode = \"statement-ish\"\n") + "\n[proxy2]\n";
    let out = check(&bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("2 problem(s):"), "{err}");
    assert!(
        err.contains("`statement-ish`") && err.contains("proxy2: unknown section"),
        "{err}"
    );
    // The password of the file is not repeated in its problems.
    assert!(!err.contains(&user.password), "{err}");
}

#[tokio::test]
async fn an_invalid_tokio_worker_threads_is_reported_instead_of_panicking() {
    let user = create_user("cli_env").await;
    let toml = Setup::new(&[&user]).toml();
    for bad in ["abc", "0", "-1", "4096"] {
        let out = check(&toml, &[("TOKIO_WORKER_THREADS", bad)]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.starts_with("TOKIO_WORKER_THREADS: must be an integer from 1 to 1024"),
            "{bad}: {err}"
        );
    }
    let out = check(&toml, &[("TOKIO_WORKER_THREADS", "3")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // proxy.workers, when set, wins: the variable is not read.
    let with_workers = toml.replace("[proxy]\n", "[proxy]\nworkers = 2\n");
    let out = check(&with_workers, &[("TOKIO_WORKER_THREADS", "abc")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
