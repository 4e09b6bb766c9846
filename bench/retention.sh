#!/usr/bin/env bash
# Retention's bound: TOTAL tasks (default 1,000,000) through enqueue → claim → start →
# finish → prune with keep_succeeded = "1s" and the daemon's 5 s pruning pass; a row every
# REPORT tasks (store size, tasks alive, claim rate).
# SQLite (default): a fresh store file; the size is the file, its WAL and shm.
# Redis (--redis): a private redis-server started here on a free loopback port in a temp
# dir (AOF on, everysec, as bench/redis.sh runs it; never the machine's Redis); the size is
# its used_memory, beside its RSS and the AOF on disk.
# The table goes to bench/results/retention.md (retention-redis.md). See
# docs/performance.md, "Retention".
# Usage: bench/retention.sh [--redis] [TOTAL [REPORT]]
set -euo pipefail
cd "$(dirname "$0")/.."
kind=sqlite
if [ "${1:-}" = "--redis" ]; then
  kind=redis
  shift
fi
total="${1:-1000000}"
report="${2:-50000}"
cargo build --release --quiet --example retention_bench
dir="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
out=bench/results/retention.md
if [ "$kind" = redis ]; then
  command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  mkdir -p "$dir/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/redis" --save "" \
    --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
    >"$dir/redis.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do
    [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && break
    sleep 0.05
  done
  store="redis://127.0.0.1:$port/0"
  export RETENTION_REDIS_DIR="$dir/redis"
  out=bench/results/retention-redis.md
  what="a private redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') (AOF everysec); store = its used_memory, RSS = used_memory_rss, AOF = its files on disk"
else
  store="sqlite:$dir/taskd.db"
  what="a fresh SQLite file; store = the file, its WAL and shared-memory file"
fi
mkdir -p bench/results
{
  echo "# Retention: $total tasks through enqueue → run → prune ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo "Store: $what; keep_succeeded = \"1s\", a pruning pass every 5 s; a row every $report tasks."
  echo
  ./target/release/examples/retention_bench "$store" "$total" "$report"
  echo
  echo "Load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out"
