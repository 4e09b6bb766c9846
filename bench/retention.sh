#!/usr/bin/env bash
# Retention's bound: TOTAL tasks (default 1,000,000) through enqueue → claim → start →
# finish → prune on a fresh SQLite store with keep_succeeded = "1s" and the daemon's 5 s
# pruning pass; a row every REPORT tasks (store size, WAL, tasks alive, claim rate).
# The table goes to bench/results/retention.md. See docs/performance.md, "Retention".
# Usage: bench/retention.sh [TOTAL [REPORT]]   (or STORE=redis://127.0.0.1:6379/15 …)
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:-1000000}"
report="${2:-50000}"
cargo build --release --quiet --example retention_bench
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
store="${STORE:-sqlite:$dir/taskd.db}"
mkdir -p bench/results
{
  echo "# Retention: $total tasks through enqueue → run → prune ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
  echo
  echo "Store: ${store%%:*}; keep_succeeded = \"1s\", a pruning pass every 5 s; a row every $report tasks."
  echo
  ./target/release/examples/retention_bench "$store" "$total" "$report"
} | tee bench/results/retention.md
