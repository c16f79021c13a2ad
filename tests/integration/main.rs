//! Integration tests: a real PostgreSQL primary with two streaming replicas
//! (started once for this binary by `scripts/pg-cluster.sh`), the real proxy,
//! and real clients (tokio-postgres, psql, pgbench).

mod admin;
mod cli;
mod differential;
mod failures;
mod harness;
mod login;
mod pooling;
mod protocol;
mod raw;
mod statements;
mod tls;
mod transparency;
mod wire;
