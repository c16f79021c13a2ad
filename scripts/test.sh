#!/usr/bin/env bash
# The one command that runs every test on a fresh machine (Debian 12; root or not):
# installs what is missing (PostgreSQL server + client, a Python virtualenv with the drivers),
# then runs fmt, clippy, the Rust tests, the Python driver suite and a short fuzzing run,
# stopping at the first failure.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
readonly VENV=.venv-test
start=$SECONDS

banner() { printf '\n==== %s ====\n' "$*" >&2; }
report_time() {
    local rc=$?
    if ((rc == 0)); then
        printf '\nall tests passed in %d s\n' $((SECONDS - start)) >&2
    else
        printf '\nFAILED (exit %d) after %d s\n' "$rc" $((SECONDS - start)) >&2
    fi
}
trap report_time EXIT

# Run one step with a banner and its own timing; any failure ends the script (set -e).
step() {
    local name=$1 t=$SECONDS
    shift
    banner "$name"
    "$@"
    printf -- '---- %s: ok (%d s)\n' "$name" $((SECONDS - t)) >&2
}

# --- prerequisites ------------------------------------------------------------------------
missing=()
# On Debian pgbench ships with the server package (postgresql-NN), psql with the client.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || ! command -v pgbench >/dev/null; then
    missing+=(postgresql)
fi
command -v psql >/dev/null || missing+=(postgresql-client)
# Debian ships the venv module (ensurepip) separately.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v cc >/dev/null || missing+=(build-essential)
# The integration tests' servers use TLS with certificates made by openssl (pg-cluster.sh --ssl).
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]]; then
        banner "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y "${missing[@]}"
    else
        echo "missing packages; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH=$HOME/.cargo/bin:$PATH
fi
if ! command -v cargo >/dev/null; then
    echo "cargo not found; install Rust with: curl https://sh.rustup.rs -sSf | sh -s -- -y" >&2
    exit 1
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    command -v rustup >/dev/null || { echo "cargo fmt/clippy missing and no rustup to add them" >&2; exit 1; }
    banner "adding rustfmt and clippy"
    rustup component add rustfmt clippy
fi

# The Python drivers for the pytest suite, in a virtualenv of their own.
scripts/venv.sh "$VENV" 'pytest, psycopg, asyncpg' pytest 'psycopg[binary]' asyncpg

# --- the tests ------------------------------------------------------------------------------
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --all-targets -- -D warnings
step "cargo test" cargo test
step "cargo build (binary for the Python suite)" cargo build
export DBPROXY_BIN=$PWD/target/debug/dbproxy
step "pytest tests/python" "$VENV/bin/python" -m pytest -q tests/python
# A short bounded fuzzing run of every target (scripts/fuzz.sh; DBPROXY_FUZZ_SECONDS=0 skips it).
fuzz_seconds=${DBPROXY_FUZZ_SECONDS:-20}
if ((fuzz_seconds > 0)); then
    step "fuzz ($fuzz_seconds s per target)" scripts/fuzz.sh "$fuzz_seconds"
fi
