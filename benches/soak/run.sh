#!/usr/bin/env bash
# Soak test: 5,000 concurrent clients for 60 s through dbproxy (see soak.py for options).
# Uses the test virtualenv (.venv-test, created by scripts/test.sh) or creates one with asyncpg.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.."
VENV=.venv-test
scripts/venv.sh "$VENV" asyncpg asyncpg
# One fd per client in this process and in dbproxy.
ulimit -n "$(ulimit -Hn)"
exec "$VENV/bin/python" benches/soak/soak.py "$@"
