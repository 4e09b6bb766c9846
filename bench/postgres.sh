#!/usr/bin/env bash
# The PostgreSQL broker beside SQLite and Redis, on a private PostgreSQL (fsync on,
# pg_stat_statements) and a private redis-server, alternated in one run. The table goes to
# bench/results/postgres.md. See docs/performance.md and docs/postgres.md.
# Usage: bench/postgres.sh [--rounds N] [--only W1,W2,enqueue,sql,claim,latency]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin taskd
exec python3 bench/postgres.py "$@"
