#!/usr/bin/env bash
# Side-by-side load benchmark (dbproxy, PgBouncer, direct; --relay adds HAProxy). See run.py for options.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.."
# PgBouncer, and openssl for the servers' test certificates (pg-cluster.sh --ssl); HAProxy
# only for --relay.
pkgs="pgbouncer openssl"
[[ " $* " == *" --relay "* ]] && pkgs+=" haproxy"
for pkg in $pkgs; do
    command -v "$pkg" >/dev/null && continue
    if [[ $EUID -eq 0 ]]; then
        apt-get install -y "$pkg" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$pkg" >/dev/null; }
    else
        echo "$pkg missing: sudo apt-get install -y $pkg" >&2
        exit 1
    fi
done
# A virtualenv with matplotlib, for --chart.
VENV=.venv-bench
scripts/venv.sh "$VENV" matplotlib matplotlib
ulimit -n "$(ulimit -Hn)"
exec "$VENV/bin/python" benches/load/run.py "$@"
