#!/usr/bin/env bash
# Makes sure the virtualenv DIR works and can import MODULES; otherwise (re)creates it and
# installs PACKAGES from PyPI. Shared by the test command and the benchmark scripts.
#   scripts/venv.sh DIR 'module1, module2' package1 package2 ...
set -euo pipefail
dir=$1 modules=$2
shift 2
# Recreate a virtualenv that is missing or broken (e.g. the system python changed).
if ! "$dir/bin/python" -c 'pass' 2>/dev/null; then
    echo "creating $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
fi
if ! "$dir/bin/python" -c "import $modules" 2>/dev/null; then
    echo "installing $* into $dir" >&2
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
fi
