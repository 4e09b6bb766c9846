#!/usr/bin/env bash
# The Redis broker beside the SQLite one, on a private redis-server (AOF on, everysec):
# W1 and W2 through the release binary, enqueue and claim+complete through the broker
# (bench/redis_bench.rs) beside `redis-benchmark -t lpush` with the same pipelining.
# The table goes to bench/results/redis.md. See docs/performance.md.
# Usage: bench/redis.sh [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin taskd --example redis_bench
exec python3 bench/redis_bench.py "$@"
