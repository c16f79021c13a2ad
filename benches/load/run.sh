#!/usr/bin/env bash
# Side-by-side load benchmark (dbproxy, PgBouncer, direct). See run.py for options.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.."
if ! command -v pgbouncer >/dev/null; then
    if [[ $EUID -eq 0 ]]; then
        apt-get install -y pgbouncer >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y pgbouncer >/dev/null; }
    else
        echo "pgbouncer missing: sudo apt-get install -y pgbouncer" >&2
        exit 1
    fi
fi
# A virtualenv with matplotlib, for --chart.
VENV=.venv-bench
scripts/venv.sh "$VENV" matplotlib matplotlib
ulimit -n "$(ulimit -Hn)"
exec "$VENV/bin/python" benches/load/run.py "$@"
