#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests and the demo: one primary and N streaming replicas on
# 127.0.0.1, all inside one directory that `down` removes again.
#
#   pg-cluster.sh up DIR [--watch PID] [--replicas N] [--ssl]
#                                                       start; prints cluster.env lines on stdout
#                                                       (--ssl: TLS on, SSL_CA= names the CA file)
#   pg-cluster.sh down DIR                              stop every node, rm -rf DIR (idempotent)
#   pg-cluster.sh stop-node DIR NODE                    NODE = primary | replicaK (-m immediate)
#   pg-cluster.sh start-node DIR NODE
#   pg-cluster.sh freeze-node DIR NODE                  SIGSTOP the postmaster and every backend
#   pg-cluster.sh thaw-node DIR NODE                    SIGCONT them
#   pg-cluster.sh add-replica DIR NODE                  NODE = replicaK, new: base backup, start,
#                                                       wait until it streams; prints its port
#   pg-cluster.sh promote-node DIR NODE                 pg_ctl promote (a failover)
#
# Layout of DIR: primary/ replica1/ ... (data directories), <node>.log (server logs), the unix
# sockets, cluster.env, ssl/ (with --ssl: a test CA and a certificate for 127.0.0.1 and
# localhost that every node uses, and ca.key to sign client certificates with), and .pg-cluster
# (marker that makes `down` willing to delete DIR).
# Roles created on the primary: app/app-secret, admin/admin-secret (SCRAM over TCP); database
# appdb owned by app; role dbproxy_cert, whose members must log in with a client certificate
# signed by the test CA (with --ssl). The postgres superuser is trusted over 127.0.0.1 and the unix socket.
#
# PostgreSQL refuses to run as root, so as root every server tool runs as the postgres user.
set -euo pipefail

readonly MARKER=.pg-cluster
readonly SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")

log() { printf 'pg-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '5,15p' "$SCRIPT" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Server binaries: $PGBIN, else the newest /usr/lib/postgresql/<major>/bin.
find_pgbin() {
    if [[ -n ${PGBIN:-} ]]; then
        [[ -x $PGBIN/initdb ]] || die "PGBIN=$PGBIN has no initdb"
        return
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) || true
    [[ -n $d && -x $d/initdb ]] ||
        die "no PostgreSQL server found under /usr/lib/postgresql/*/bin (install postgresql or set PGBIN)"
    PGBIN=$d
}

# Run a server tool as the postgres user when we are root. cd into DIR first: the postgres
# user may not be allowed into the caller's cwd (e.g. /root), which makes the tools complain.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$DIR" && runuser -u postgres -- "$@")
    else
        (cd "$DIR" && "$@")
    fi
}

# Files this script writes into a data directory belong to the server's user.
give_to_pg() {
    if [[ $EUID -eq 0 ]]; then chown postgres: "$@"; fi
}

# psql against a node's unix socket (trust auth, no password prompts).
node_psql() {
    local port=$1
    shift
    as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$port" -U postgres -d postgres "$@"
}

# N distinct free loopback ports. The sockets stay bound until all are picked so they differ;
# something else may still grab one before the server binds, which start_new_node retries.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Per-node settings. cluster_name becomes a replica's application_name in pg_stat_replication.
write_node_conf() {
    printf "port = %s\ncluster_name = '%s'\n" "$2" "$1" >"$DIR/$1/node.conf"
    give_to_pg "$DIR/$1/node.conf"
}

node_port() { sed -n "s/^port = \([0-9]*\)$/\1/p" "$DIR/$1/node.conf"; }

# Nodes are the data directories in DIR, primary first.
list_nodes() {
    local d
    for d in "$DIR"/primary "$DIR"/replica*; do
        [[ -f $d/PG_VERSION ]] && basename "$d"
    done
    return 0
}

start_node() {
    local node=$1
    [[ -f $DIR/$node/PG_VERSION ]] || die "no node '$node' in $DIR"
    # -t: a replica only accepts connections once it has reached a consistent state.
    if ! as_pg "$PGBIN/pg_ctl" start -w -t 60 -D "$DIR/$node" -l "$DIR/$node.log" >/dev/null; then
        log "could not start $node; last lines of $DIR/$node.log:"
        tail -n 25 "$DIR/$node.log" >&2 || true
        return 1
    fi
}

# Send SIG to a node's postmaster and all its children (a frozen server: connections are
# accepted by the kernel, nothing answers).
signal_node() {
    local node=$1 sig=$2 pid
    pid=$(head -n 1 "$DIR/$node/postmaster.pid" 2>/dev/null) || die "$node is not running"
    [[ $pid =~ ^[0-9]+$ ]] || die "$node has no postmaster pid"
    if [[ $sig == STOP ]]; then
        kill -STOP "$pid"
        pkill -STOP -P "$pid" || true
    else
        pkill -CONT -P "$pid" || true
        kill -CONT "$pid"
    fi
}

stop_node() {
    local node=$1 pid
    [[ -f $DIR/$node/postmaster.pid ]] || return 0
    # A frozen node would ignore the stop request.
    signal_node "$node" CONT 2>/dev/null || true
    if ! as_pg "$PGBIN/pg_ctl" stop -m immediate -w -t 30 -D "$DIR/$node" >/dev/null 2>&1; then
        # Not stopped (or a stale pid file): make sure no postmaster outlives its directory.
        pid=$(head -n 1 "$DIR/$node/postmaster.pid" 2>/dev/null) || true
        if [[ $pid =~ ^[0-9]+$ ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
}

# Start a node that `up` just created, on a fresh port if the picked one was taken meanwhile.
start_new_node() {
    local node=$1 attempt
    for attempt in 1 2 3; do
        start_node "$node" 2>/dev/null && return 0
        if ((attempt < 3)) && grep -q 'could not bind' "$DIR/$node.log" 2>/dev/null; then
            log "port of $node was taken, retrying with another one"
            write_node_conf "$node" "$(free_ports 1)"
            : >"$DIR/$node.log"
            continue
        fi
        log "could not start $node; last lines of $DIR/$node.log:"
        tail -n 25 "$DIR/$node.log" >&2 || true
        return 1
    done
}

# A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost, in DIR/ssl.
make_certs() {
    local d=$DIR/ssl
    command -v openssl >/dev/null || die "--ssl needs the openssl command (apt-get install -y openssl)"
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj '/CN=pg-cluster test CA' \
        -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' \
        -keyout "$d/ca.key" -out "$d/ca.crt" >"$d/openssl.log" 2>&1 || die "openssl: $(cat "$d/openssl.log")"
    openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' \
        -keyout "$d/server.key" -out "$d/server.csr" >>"$d/openssl.log" 2>&1 || die "openssl: $(cat "$d/openssl.log")"
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=CA:FALSE' \
        'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
        -extfile "$d/server.ext" -out "$d/server.crt" >>"$d/openssl.log" 2>&1 || die "openssl: $(cat "$d/openssl.log")"
    chmod 600 "$d/server.key" "$d/ca.key"
    chmod 755 "$d"
    give_to_pg "$d" "$d"/*
}

cmd_up() {
    local watch="" replicas=2 ssl=""
    while [[ $# -gt 0 ]]; do
        case $1 in
        --watch) watch=${2:?--watch needs a PID}; shift 2 ;;
        --replicas) replicas=${2:?--replicas needs a number}; shift 2 ;;
        --ssl) ssl=1; shift ;;
        *) usage ;;
        esac
    done
    [[ $replicas =~ ^[0-9]+$ ]] || die "--replicas must be a number, got '$replicas'"
    find_pgbin

    if [[ -e $DIR ]]; then
        [[ -d $DIR && -z $(ls -A "$DIR") ]] || die "$DIR exists and is not an empty directory"
    fi
    mkdir -p "$DIR"
    DIR=$(readlink -f "$DIR")
    touch "$DIR/$MARKER"
    # The unix socket path (DIR/.s.PGSQL.NNNNN) must fit in sun_path (107 bytes).
    ((${#DIR} <= 80)) || die "DIR path too long for a unix socket directory: $DIR"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$DIR"
        chmod 700 "$DIR"
        runuser -u postgres -- test -x "$DIR" ||
            die "the postgres user cannot reach $DIR (a parent directory is not searchable)"
    fi

    # Start the reaper before the slow part, so a caller that dies during `up` is covered too.
    # A zombie counts as dead (nobody may reap an orphaned test binary). The reaper must not
    # inherit the caller's stdout/stderr: a caller reading our output to EOF would hang.
    if [[ -n $watch ]]; then
        kill -0 "$watch" 2>/dev/null || die "--watch: no process $watch"
        setsid nohup bash -c '
            alive() { kill -0 "$1" 2>/dev/null && ! grep -q "^State:.*Z" "/proc/$1/status" 2>/dev/null; }
            while alive "$1" && [[ -e $2/'"$MARKER"' ]]; do sleep 0.5; done
            [[ -e $2/'"$MARKER"' ]] && exec "$0" down "$2"' \
            "$SCRIPT" "$watch" "$DIR" </dev/null >/dev/null 2>&1 &
    fi

    # From here on, a failure stops whatever was started; DIR stays for its logs (down removes it).
    trap 'rc=$?; if ((rc != 0)); then log "up failed, stopping nodes; logs are in $DIR"; for n in $(list_nodes); do stop_node "$n"; done; fi' EXIT

    local -a ports
    read -r -a ports <<<"$(free_ports $((replicas + 1)))"

    log "initdb primary ($PGBIN)"
    as_pg "$PGBIN/initdb" -D "$DIR/primary" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 --no-sync >"$DIR/initdb.log" 2>&1 ||
        { tail -n 25 "$DIR/initdb.log" >&2; die "initdb failed"; }

    {
        cat <<'EOF'
# TYPE  DATABASE     USER      ADDRESS          METHOD
local   all          all                        trust
host    all          postgres  127.0.0.1/32     trust
host    replication  all       127.0.0.1/32     trust
EOF
        # With --ssl, members of role dbproxy_cert log in with a client certificate (CN = user).
        [[ -n $ssl ]] && echo "hostssl all          +dbproxy_cert 127.0.0.1/32 cert"
        echo "host    all          all       127.0.0.1/32     scram-sha-256"
    } >"$DIR/primary/pg_hba.conf"
    # Replicas inherit this file through pg_basebackup; each overwrites only node.conf.
    cat >>"$DIR/primary/postgresql.conf" <<EOF

# --- pg-cluster.sh: throwaway test cluster ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
fsync = off
full_page_writes = off
max_connections = 300
wal_level = replica
max_wal_senders = 10
# Keep WAL around so a replica stopped by a test can catch up after start-node.
wal_keep_size = '512MB'
hot_standby = on
wal_receiver_status_interval = 1s
# Replicas reconnect to a restarted primary within a second instead of the default 5 s.
wal_retrieve_retry_interval = 1s
include = 'node.conf'
EOF
    if [[ -n $ssl ]]; then
        make_certs
        cat >>"$DIR/primary/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = '$DIR/ssl/server.crt'
ssl_key_file = '$DIR/ssl/server.key'
# Client certificates signed by the test CA are accepted (see pg_hba.conf).
ssl_ca_file = '$DIR/ssl/ca.crt'
EOF
    fi
    give_to_pg "$DIR/primary/pg_hba.conf"
    write_node_conf primary "${ports[0]}"

    log "starting primary"
    start_new_node primary
    local primary_port
    primary_port=$(node_port primary)
    node_psql "$primary_port" <<'SQL'
CREATE ROLE app LOGIN PASSWORD 'app-secret';
CREATE ROLE admin LOGIN PASSWORD 'admin-secret';
CREATE DATABASE appdb OWNER app;
-- With --ssl, members log in with a client certificate (see pg_hba.conf).
CREATE ROLE dbproxy_cert NOLOGIN;
SQL

    # Base backups run in parallel; each gets its own WAL sender.
    local k pids=()
    for ((k = 1; k <= replicas; k++)); do
        log "pg_basebackup replica$k"
        as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres \
            -D "$DIR/replica$k" -R -X stream -c fast --no-sync >"$DIR/basebackup$k.log" 2>&1 &
        pids+=($!)
    done
    for ((k = 1; k <= replicas; k++)); do
        wait "${pids[k - 1]}" || { tail -n 25 "$DIR/basebackup$k.log" >&2; die "pg_basebackup of replica$k failed"; }
        write_node_conf "replica$k" "${ports[k]}"
    done
    for ((k = 1; k <= replicas; k++)); do
        log "starting replica$k"
        start_new_node "replica$k"
    done

    log "waiting for $replicas replicas to stream"
    local streaming=0 i
    for ((i = 0; i < 300; i++)); do
        streaming=$(node_psql "$primary_port" -At \
            -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
        ((streaming >= replicas)) && break
        sleep 0.1
    done
    if ((streaming < replicas)); then
        for ((k = 1; k <= replicas; k++)); do
            log "last lines of replica$k.log:"
            tail -n 10 "$DIR/replica$k.log" >&2 || true
        done
        die "only $streaming of $replicas replicas are streaming after 30 s"
    fi

    local env_lines list=""
    env_lines="PGBIN=$PGBIN"$'\n'"PRIMARY_PORT=$primary_port"
    for ((k = 1; k <= replicas; k++)); do
        env_lines+=$'\n'"REPLICA${k}_PORT=$(node_port "replica$k")"
        list+=${list:+,}$(node_port "replica$k")
    done
    env_lines+=$'\n'"REPLICA_PORTS=$list"
    [[ -n $ssl ]] && env_lines+=$'\n'"SSL_CA=$DIR/ssl/ca.crt"
    printf '%s\n' "$env_lines" >"$DIR/cluster.env"
    printf '%s\n' "$env_lines"
    log "up: primary on 127.0.0.1:$primary_port${list:+, replicas on $list}"
}

# One more streaming replica of a running primary, for tests that promote or lose it.
cmd_add_replica() {
    local node=$1 primary_port i streaming=0
    [[ $node =~ ^replica[0-9]+$ ]] || die "a new node's name must be replicaK, got '$node'"
    [[ ! -e $DIR/$node ]] || die "$node already exists in $DIR"
    primary_port=$(node_port primary)
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres \
        -D "$DIR/$node" -R -X stream -c fast --no-sync >"$DIR/basebackup-$node.log" 2>&1 ||
        { tail -n 25 "$DIR/basebackup-$node.log" >&2; die "pg_basebackup of $node failed"; }
    write_node_conf "$node" "$(free_ports 1)"
    start_new_node "$node"
    for ((i = 0; i < 300; i++)); do
        streaming=$(node_psql "$primary_port" -At -c \
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$node' AND state = 'streaming'")
        ((streaming >= 1)) && break
        sleep 0.1
    done
    ((streaming >= 1)) || die "$node is not streaming after 30 s"
    node_port "$node"
}

cmd_down() {
    [[ -e $DIR ]] || return 0
    # Refuse to delete a directory this script did not create.
    [[ -e $DIR/$MARKER ]] || die "$DIR was not created by pg-cluster.sh (no $MARKER); not deleting it"
    if [[ -f $DIR/cluster.env ]]; then
        PGBIN=${PGBIN:-$(sed -n 's/^PGBIN=//p' "$DIR/cluster.env")}
    fi
    find_pgbin
    local node
    for node in $(list_nodes); do
        stop_node "$node"
    done
    rm -rf "$DIR"
}

[[ $# -ge 2 ]] || usage
cmd=$1
DIR=$2
shift 2
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGSSLMODE PGOPTIONS
case $cmd in
up) cmd_up "$@" ;;
down) [[ $# -eq 0 ]] || usage; DIR=$(readlink -m "$DIR"); cmd_down ;;
add-replica)
    [[ $# -eq 1 ]] || usage
    DIR=$(readlink -f "$DIR")
    [[ -f $DIR/$MARKER ]] || die "$DIR is not a pg-cluster directory"
    PGBIN=${PGBIN:-$(sed -n 's/^PGBIN=//p' "$DIR/cluster.env" 2>/dev/null)}
    find_pgbin
    cmd_add_replica "$1"
    ;;
stop-node | start-node | freeze-node | thaw-node | promote-node)
    [[ $# -eq 1 ]] || usage
    DIR=$(readlink -f "$DIR")
    [[ -f $DIR/$MARKER ]] || die "$DIR is not a pg-cluster directory"
    PGBIN=${PGBIN:-$(sed -n 's/^PGBIN=//p' "$DIR/cluster.env" 2>/dev/null)}
    find_pgbin
    [[ -f $DIR/$1/PG_VERSION ]] || die "no node '$1' in $DIR (nodes: $(list_nodes | xargs))"
    case $cmd in
    stop-node) stop_node "$1" ;;
    start-node) start_node "$1" ;;
    freeze-node) signal_node "$1" STOP ;;
    thaw-node) signal_node "$1" CONT ;;
    promote-node) as_pg "$PGBIN/pg_ctl" promote -w -t 60 -D "$DIR/$1" >/dev/null ;;
    esac
    ;;
*) usage ;;
esac
