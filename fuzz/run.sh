#!/usr/bin/env bash
# Run every fuzz target in turn for SECONDS each (default 10) on the committed corpus, and
# stop at the first finding. docs/fuzzing.md says more.
#   fuzz/run.sh [SECONDS]
# Uses the nightly toolchain when rustup has one, else the stable one with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-10}"
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz"; exit 1; }
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    cargo=(cargo +nightly)
else
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
fi
"${cargo[@]}" fuzz build -O
for target in $("${cargo[@]}" fuzz list); do
    # A copy of the corpus to grow, so that a short run leaves the committed one as it is.
    work="$(mktemp -d)"
    cp -r "corpus/$target/." "$work/"
    echo "fuzz: $target for ${seconds}s"
    status=0
    "${cargo[@]}" fuzz run -O "$target" "$work" -- -max_total_time="$seconds" -print_final_stats=1 \
        >"$work.log" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|==[0-9]+==|SUMMARY|thread .* panicked)' "$work.log" || true
    if [ "$status" -ne 0 ]; then tail -40 "$work.log"; fi
    rm -f "$work.log"
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        echo "fuzz: $target failed; its input is in fuzz/artifacts/$target/"
        exit "$status"
    fi
done
echo "fuzz: every target ran ${seconds}s without a finding"
