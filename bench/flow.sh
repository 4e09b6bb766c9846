#!/usr/bin/env bash
# Flow control's figures (docs/performance.md, "Flow control"): the claim rate with
# per-key limits (100,000 waiting tasks on 1,000 keys) against a queue without keys, on
# SQLite and on a private redis-server, through the broker (bench/flow_bench.rs); and the
# rate limit's accuracy, starts per second measured against the configured rate, on one
# daemon (SQLite, Redis) and on two daemons sharing one redis-server (bench/flow.py).
# Usage: bench/flow.sh [--only claim|rate]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin taskd --example flow_bench
exec python3 bench/flow.py "$@"
