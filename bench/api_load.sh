#!/usr/bin/env bash
# Enqueue through the HTTP API under load: wrk with 64 connections on
# loopback against a release daemon whose queue is paused, so only enqueueing is measured.
# Every 201 means the task is committed (synchronous=FULL). Usage: bench/api_load.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
command -v wrk >/dev/null 2>&1 || { echo "installing wrk"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release --quiet
dir=$(mktemp -d /tmp/taskd-api-load.XXXXXX)
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/taskd.toml" <<TOML
[taskd]
state_dir = "state"
listen = "127.0.0.1:$port"
[queues.q]
command = ["/bin/true"]
TOML
T=target/release/taskd
$T -c "$dir/taskd.toml" pause q >/dev/null
RUST_LOG=warn $T -c "$dir/taskd.toml" start 2>"$dir/daemon.log" &
daemon=$!
for _ in $(seq 100); do grep -q ready "$dir/daemon.log" 2>/dev/null && break; sleep 0.05; done

cat > "$dir/one.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"payload":{"src":"a.jpg","size":"128"}}'
wrk.headers["Content-Type"] = "application/json"
LUA
python3 - "$dir/batch.lua" <<'PY'
import json, sys
body = json.dumps([{"payload": {"n": i}} for i in range(1000)])
open(sys.argv[1], "w").write('wrk.method = "POST"\nwrk.body = [=[' + body + ']=]\nwrk.headers["Content-Type"] = "application/json"\n')
PY

count() { sqlite3 "$dir/state/taskd.db" "select count(*) from tasks"; }
echo "== single-task requests, 64 connections, ${secs}s"
before=$(count)
wrk -t2 -c64 -d"${secs}s" --latency -s "$dir/one.lua" "http://127.0.0.1:$port/api/v1/queues/q/tasks" | grep -E "Requests/sec|50%|99%|Non-2xx"
echo "tasks stored: $(( $(count) - before ))"
echo "== batch requests of 1,000 tasks, 64 connections, ${secs}s"
before=$(count)
start=$(date +%s.%N)
wrk -t2 -c64 -d"${secs}s" --latency -s "$dir/batch.lua" "http://127.0.0.1:$port/api/v1/queues/q/tasks/batch" | grep -E "Requests/sec|50%|99%|Non-2xx"
end=$(date +%s.%N)
stored=$(( $(count) - before ))
echo "tasks stored: $stored ($(python3 -c "print(round($stored/($end-$start)))") tasks/s)"
