#!/usr/bin/env bash
# Bounded fuzzing of the fabric's parsers and endpoint (fabric/fuzz, cargo-fuzz + libFuzzer).
# Only stable Rust is installed: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags
# (sanitizer=address). 30 s per target; a crash fails the step with the reproducer's path.
set -euo pipefail
cd "$(dirname "$0")/../../fabric/fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
SECS=${FABRIC_FUZZ_SECS:-30}
cargo fuzz build -O
for t in frame endpoint; do
    echo "fuzzing $t for ${SECS} s"
    timeout $((SECS + 120)) cargo fuzz run -O "$t" -- -max_total_time="$SECS" -print_final_stats=1 2>&1 \
        | grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done|==|SUMMARY|artifact)" || true
    # libFuzzer exits non-zero on a crash; pipefail carries it, but check artifacts too.
    if compgen -G "artifacts/$t/*" >/dev/null; then
        echo "fuzz target $t failed (crash, leak, timeout or OOM): $(ls artifacts/$t/)" >&2
        exit 1
    fi
done
