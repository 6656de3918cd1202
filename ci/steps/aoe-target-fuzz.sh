#!/usr/bin/env bash
# Bounded fuzzing of aoe-target (about 60 s of fuzzing): the frame parser and the target
# engine, with cargo-fuzz (libFuzzer + AddressSanitizer). Only the stable toolchain exists on
# our machines; cargo-fuzz's -Z flags are accepted there with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
cd aoe-target/fuzz
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in frame engine; do
    echo "fuzzing $target for 30 s"
    if ! cargo fuzz run "$target" -- -max_total_time=30 -max_len=12000 -print_final_stats=1 >"$log" 2>&1; then
        tail -60 "$log"
        echo "aoe-target fuzz: $target failed (artifact under aoe-target/fuzz/artifacts/$target)" >&2
        exit 1
    fi
    grep -E "^(Done|stat::number_of_executed_units)" "$log"
done
