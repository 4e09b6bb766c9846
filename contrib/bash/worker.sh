#!/usr/bin/env bash
# A taskd long-lived worker in bash (protocol 1.1, docs/worker-protocol.md). Needs jq.
#
#   [queues.shell-jobs]
#   worker = ["/usr/local/lib/taskd/worker.sh"]
#
# Tasks arrive as JSON lines on fd 3; answers go to fd 4. Whatever this script prints on
# stdout/stderr while a task runs is that task's output. The payload is data: it is read
# with jq, never evaluated as shell code.
#
# What handle() returns is the task's result: it sets RESULT (empty before each task), as
# exec tasks write $TASKD_RESULT_FILE, with the same rules: valid JSON is kept as that JSON,
# other text becomes a JSON string, nothing is no result.
#
# This example understands {"action": "echo", "text": "..."} (returns {"echoed": text}),
# {"action": "sleep", "seconds": N}, {"action": "fail"} and {"action": "crash"}; put your
# work in handle().
set -u

[[ "${TASKD_WORKER_PROTOCOL:-}" == 1 ]] || { echo "worker.sh: not started by taskd (protocol 1)" >&2; exit 2; }
command -v jq >/dev/null || { echo "worker.sh: jq is required" >&2; exit 2; }

answer() { # id status [message]
    jq -cn --arg id "$1" --arg status "$2" --arg message "${3:-}" \
        '{type: "result", id: $id, status: $status} + (if $message == "" then {} else {message: $message} end)' >&4
}

answer_ok() { # id result-text
    if [[ -z "$2" ]]; then
        answer "$1" ok
        return
    fi
    # Valid JSON as it is (jq before 1.7 rounds numbers to doubles); any other text as a
    # JSON string, without its trailing newlines.
    jq -cn --arg id "$1" --arg text "$2" \
        '{type: "result", id: $id, status: "ok", result: (try ($text | fromjson) catch ($text | sub("\n+$"; "")))}' >&4
}

# Runs one task; its exit status says ok (0), retry (1) or error (2).
handle() { # payload-json
    local action
    action=$(jq -r '.action // "echo"' <<<"$1")
    case "$action" in
        echo)
            jq -r '.text // ""' <<<"$1"
            RESULT=$(jq -c '{echoed: (.text // "")}' <<<"$1")
            ;;
        sleep) sleep "$(jq -r '.seconds // 1' <<<"$1")" ;;
        fail) echo "asked to fail" >&2; return 2 ;;
        crash) echo "crashing" >&2; kill -KILL $$ ;;
        *) echo "unknown action: $action" >&2; return 2 ;;
    esac
}

echo '{"type":"ready","protocol":1}' >&4
while IFS= read -r line <&3; do
    id=$(jq -r '.id' <<<"$line")
    payload=$(jq -c '.payload' <<<"$line")
    RESULT=
    handle "$payload"
    case $? in
        0) answer_ok "$id" "$RESULT" ;;
        2) answer "$id" error "handler failed" ;;
        *) answer "$id" retry "handler asked for a retry" ;;
    esac
done
