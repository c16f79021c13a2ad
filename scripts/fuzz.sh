#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
# Installs cargo-fuzz when missing. The machine's stable toolchain is used with
# RUSTC_BOOTSTRAP=1, since cargo-fuzz needs nightly flags (-Zsanitizer=address).
# A crash leaves its input in fuzz/artifacts/<target>/ and exits non-zero; the
# corpus grows in fuzz/corpus/<target>/ across runs (neither is committed).
# fuzz/dicts/<target>.dict, where there is one, gives libFuzzer words to try.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(frontend_framing startup_packet scram_exchange classifier)
fi

if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH=$HOME/.cargo/bin:$PATH
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    dict=()
    if [[ -f fuzz/dicts/$t.dict ]]; then
        dict=("-dict=fuzz/dicts/$t.dict")
    fi
    if ! cargo fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=4096 \
        -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz target $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        rm -f "$log"
        exit 1
    fi
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
    cov=$(grep -oE 'DONE +cov: [0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
    printf 'fuzz %-18s %4s s  %10s runs  coverage %s  no crash\n' "$t" "$seconds" "$runs" "$cov" >&2
    rm -f "$log"
done
