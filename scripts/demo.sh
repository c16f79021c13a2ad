#!/usr/bin/env bash
# The one command that runs the proxy on an embedded default: builds dbproxy (release), starts a
# throwaway PostgreSQL primary + 2 streaming replicas, writes a proxy.toml for them and runs the
# proxy until Ctrl-C, which stops everything again.
#
# Environment: DBPROXY_PORT (default 6432), DBPROXY_METRICS_PORT (default 9930),
#              DBPROXY_BIN (use this binary instead of building target/release/dbproxy).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
port=${DBPROXY_PORT:-6432}
metrics_port=${DBPROXY_METRICS_PORT:-9930}

if [[ -z ${DBPROXY_BIN:-} ]]; then
    echo "building dbproxy (cargo build --release)..." >&2
    cargo build --release
    DBPROXY_BIN=$PWD/target/release/dbproxy
fi

dir=$(mktemp -d /tmp/dbproxy-demo.XXXXXX)
proxy_pid=""

# Stop the proxy (gracefully, then hard), then the cluster. Runs once, on any exit.
cleanup() {
    trap - EXIT INT TERM
    if [[ -n $proxy_pid ]] && kill -0 "$proxy_pid" 2>/dev/null; then
        echo "stopping dbproxy..." >&2
        kill -TERM "$proxy_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$proxy_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$proxy_pid" 2>/dev/null || true
    fi
    echo "stopping PostgreSQL..." >&2
    scripts/pg-cluster.sh down "$dir" || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --watch $$: the cluster goes away even if this script is killed with SIGKILL.
echo "starting PostgreSQL primary + 2 replicas in $dir..." >&2
scripts/pg-cluster.sh up "$dir" --watch $$ >/dev/null
# shellcheck source=/dev/null
source "$dir/cluster.env"

config=$dir/proxy.toml
cat >"$config" <<EOF
[proxy]
listen = "127.0.0.1:$port"
admin_users = ["admin"]
metrics_listen = "127.0.0.1:$metrics_port"

[pool]
mode = "transaction"
size = 20
checkout_timeout = "5s"

[routing]
read_write_split = true
balance = "round_robin"
read_your_writes = true

[[databases]]
name = "appdb"
primary = "127.0.0.1:$PRIMARY_PORT"
replicas = ["127.0.0.1:$REPLICA1_PORT", "127.0.0.1:$REPLICA2_PORT"]

[[users]]
name = "app"
password = "app-secret"

[[users]]
name = "admin"
password = "admin-secret"
EOF

"$DBPROXY_BIN" --config "$config" &
proxy_pid=$!

ready=""
for _ in $(seq 150); do
    kill -0 "$proxy_pid" 2>/dev/null || { echo "dbproxy exited during startup (see its log above)" >&2; exit 1; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ready=1; break; fi
    sleep 0.2
done
[[ -n $ready ]] || { echo "dbproxy did not accept connections on 127.0.0.1:$port within 30 s" >&2; exit 1; }

cat <<EOF

dbproxy is running (transaction pooling, reads split over 2 streaming replicas).

  connection string:  postgresql://app:app-secret@127.0.0.1:$port/appdb
  try it:             psql 'postgresql://app:app-secret@127.0.0.1:$port/appdb' -c 'SHOW port'
  admin console:      psql 'postgresql://admin:admin-secret@127.0.0.1:$port/dbproxy' -c 'SHOW POOLS'
  metrics:            curl http://127.0.0.1:$metrics_port/metrics
  config:             $config

Ctrl-C stops everything.
EOF

# wait returns early when a trapped signal arrives; the trap then exits and cleanup runs.
rc=0
wait "$proxy_pid" || rc=$?
proxy_pid=""
echo "dbproxy exited with status $rc" >&2
exit "$rc"
