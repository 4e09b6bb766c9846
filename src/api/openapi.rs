//! The OpenAPI 3 document served at `/api/v1/openapi.json`, written by hand next to the
//! routes it describes. Tests check it against [`super::routes`] both ways, and its response
//! schemas against what the shapes of [`crate::view`] serialize (field names, types,
//! nullability, required fields); `tests/api.rs` calls every documented operation on a real
//! daemon. It must not describe a response no handler returns.

use serde_json::{json, Value};

fn error_ref() -> Value {
    json!({ "description": "an error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

/// A `text/event-stream` answer whose events' `data` are `schema`.
fn stream(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "text/event-stream": { "schema": schema } } })
}

fn queue_param() -> Value {
    json!({ "name": "queue", "in": "path", "required": true, "schema": { "type": "string" }, "description": "a queue of the daemon's config" })
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } })
}

fn schedule_param() -> Value {
    json!({ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "a schedule of the daemon's config" })
}

fn task_ref() -> Value {
    json!({ "$ref": "#/components/schemas/Task" })
}

/// The document.
pub fn document() -> Value {
    let mut doc = paths_and_components();
    // One `json!` is too deep for every path: the later ones are added here.
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.insert("/api/v1/tasks/{id}/why".into(), why_path());
    }
    doc
}

/// `GET /api/v1/tasks/{id}/why`.
fn why_path() -> Value {
    json!({ "get": { "summary": "Why the task is not running, as `taskd why`: every reason, each a line for people (`text`) and its numbers (a run-at or next start, the tasks it waits for or that hold its key, N of N); for a running or finished task, that it is", "parameters": [id_param()],
        "responses": { "200": ok("the reasons", json!({ "$ref": "#/components/schemas/Why" })), "400": error_ref(), "401": error_ref(), "404": error_ref() } } })
}

fn paths_and_components() -> Value {
    let secured = json!([{ "bearer": [] }]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "taskd",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of the taskd job-queue daemon. Mutating operations need `Authorization: Bearer TOKEN` when the daemon has a token; reads need it too when it listens on a non-loopback address. Every error is `{\"error\": {\"code\", \"message\", …}}`. While the daemon drains, every operation but /metrics answers 503."
        },
        "paths": {
            "/": { "get": { "summary": "The dashboard (HTML)", "responses": { "200": { "description": "HTML page", "content": { "text/html": {} } } } } },
            "/healthz": { "get": { "summary": "Broker reachable and daemon not draining", "responses": { "200": ok("healthy", json!({ "$ref": "#/components/schemas/Health" })), "503": error_ref() } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (OpenMetrics text), named taskd_*", "responses": { "200": { "description": "metrics", "content": { "application/openmetrics-text": {} } } } } },
            "/api/v1/openapi.json": { "get": { "summary": "This document", "responses": { "200": ok("OpenAPI 3 document", json!({ "type": "object" })) } } },
            "/api/v1/queues": { "get": {
                "summary": "Queues with their counts by state and paused flags, this daemon's long-lived workers, and the nodes sharing the broker (Redis)",
                "responses": { "200": ok("queues", json!({ "$ref": "#/components/schemas/Overview" })), "401": error_ref() }
            } },
            "/api/v1/queues/{queue}/tasks": { "post": {
                "summary": "Enqueue one task; 201 once it is durable (200 with `existing: true` for a unique key already waiting or running). A body of `application/octet-stream` or `application/x-protobuf` is a raw payload, stored untouched and given to the task on stdin byte for byte; its options are then in the query string",
                "security": secured, "parameters": [queue_param(),
                    { "name": "delay", "in": "query", "schema": { "type": "string", "example": "5m" }, "description": "raw payloads only: as NewTask's `delay`" },
                    { "name": "run_at", "in": "query", "schema": { "type": "string" }, "description": "raw payloads only: RFC 3339 or Unix seconds" },
                    { "name": "priority", "in": "query", "schema": { "type": "integer" }, "description": "raw payloads only" },
                    { "name": "unique", "in": "query", "schema": { "type": "string" }, "description": "raw payloads only" },
                    { "name": "unique_for", "in": "query", "schema": { "type": "string" }, "description": "raw payloads only" },
                    { "name": "after", "in": "query", "schema": { "type": "string" }, "description": "raw payloads only: task ids separated by commas" },
                    { "name": "expires", "in": "query", "schema": { "type": "string" }, "description": "raw payloads only: a duration or a time" }
                ],
                "requestBody": { "required": false, "content": {
                    "application/json": { "schema": { "$ref": "#/components/schemas/NewTask" } },
                    "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
                    "application/x-protobuf": { "schema": { "type": "string", "format": "binary" } } } },
                "responses": { "201": ok("the task", json!({ "$ref": "#/components/schemas/EnqueuedTask" })), "200": ok("an existing task with the same unique key", json!({ "$ref": "#/components/schemas/EnqueuedTask" })),
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "413": error_ref(), "422": error_ref(), "503": error_ref() }
            } },
            "/api/v1/queues/{queue}/tasks/batch": { "post": {
                "summary": "Enqueue many tasks atomically: a JSON array of NewTask, or one NewTask per line (JSON lines)",
                "security": secured, "parameters": [queue_param()],
                "requestBody": { "required": true, "content": {
                    "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/NewTask" } } },
                    "application/x-ndjson": { "schema": { "type": "string" } } } },
                "responses": { "201": ok("all enqueued", json!({ "$ref": "#/components/schemas/BatchEnqueued" })),
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "413": error_ref(), "422": error_ref(), "503": error_ref() }
            } },
            "/api/v1/queues/{queue}/pause": { "post": { "summary": "Stop claiming from a queue (persists)", "security": secured, "parameters": [queue_param()],
                "responses": { "200": ok("paused", json!({ "$ref": "#/components/schemas/Paused" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/queues/{queue}/resume": { "post": { "summary": "Claim from a paused queue again", "security": secured, "parameters": [queue_param()],
                "responses": { "200": ok("resumed", json!({ "$ref": "#/components/schemas/Paused" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/queues/{queue}/restart": { "post": { "summary": "Restart a worker queue's long-lived workers one at a time, each after its current task (as `taskd restart`); 409 for a queue that runs a process per task", "security": secured, "parameters": [queue_param()],
                "responses": { "202": ok("the rolling restart began", json!({ "$ref": "#/components/schemas/Restarting" })), "401": error_ref(), "404": error_ref(), "409": error_ref(), "503": error_ref() } } },
            "/api/v1/tasks": { "get": {
                "summary": "List tasks, newest first, a page at a time",
                "parameters": [
                    { "name": "queue", "in": "query", "schema": { "type": "string" } },
                    { "name": "state", "in": "query", "schema": { "$ref": "#/components/schemas/State" } },
                    { "name": "since", "in": "query", "schema": { "type": "integer" }, "description": "created at or after (ms since the epoch)" },
                    { "name": "until", "in": "query", "schema": { "type": "integer" }, "description": "created before (ms since the epoch)" },
                    { "name": "id", "in": "query", "schema": { "type": "string", "format": "uuid" }, "description": "this task only" },
                    { "name": "unique_key", "in": "query", "schema": { "type": "string" }, "description": "tasks with this unique key, waiting, running or finished" },
                    { "name": "payload", "in": "query", "schema": { "type": "string", "example": "user_id=42" }, "description": "FIELD = VALUE: a dotted path into the payload (`payload.` optional; a number indexes an array) and a value, compared as JSON (42 matches 42 and 42.0) or as the text of a string field (42 matches \"42\")" },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 50 } },
                    { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page: the next page holds the matching tasks older than it" }
                ],
                "responses": { "200": ok("a page", json!({ "$ref": "#/components/schemas/TaskPage" })), "400": error_ref(), "401": error_ref() }
            } },
            "/api/v1/tasks/bulk": { "post": {
                "summary": "Retry or cancel every task a filter matches (at most 10000): a dry run counts them first; `expect` (the count the operator confirmed) refuses the change with 409 when more match by then",
                "security": secured,
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/BulkRequest" } } } },
                "responses": { "200": ok("what matched and what was done", json!({ "$ref": "#/components/schemas/Bulk" })),
                    "400": error_ref(), "401": error_ref(), "409": error_ref(), "413": error_ref(), "422": error_ref() }
            } },
            "/api/v1/stats": { "get": {
                "summary": "Finished attempts per time bucket, every queue or one: counts by outcome and run times, from the counters the daemon keeps in the broker (they survive a restart)",
                "parameters": [
                    { "name": "window", "in": "query", "schema": { "type": "string", "enum": ["1h", "24h"], "default": "1h" }, "description": "1h: 60 buckets of a minute; 24h: 96 buckets of 15 minutes" },
                    { "name": "queue", "in": "query", "schema": { "type": "string" } }
                ],
                "responses": { "200": ok("the buckets", json!({ "$ref": "#/components/schemas/Stats" })), "400": error_ref(), "401": error_ref() }
            } },
            "/api/v1/tasks/{id}": { "get": { "summary": "One task with its attempt history and its result", "parameters": [id_param()],
                "responses": { "200": ok("the task", json!({ "$ref": "#/components/schemas/TaskDetail" })), "400": error_ref(), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/tasks/{id}/output": { "get": {
                "summary": "The task's output as Server-Sent Events: its latest attempt's output (live while it runs on this daemon, its stored tails once it ended), and with follow=true every later attempt as it is written, until the task ends. Each event's `event:` is the data's `event`, its `data:` one OutputEvent as JSON, its `id:` the position to resume after (send it back as Last-Event-ID, or as `from`). A follower that falls behind what the daemon holds gets a `skipped` event; the task is never slowed down by a follower.",
                "parameters": [id_param(),
                    { "name": "follow", "in": "query", "schema": { "type": "boolean", "default": false }, "description": "keep the stream open until the task ends (through retries); otherwise it ends with what exists now (a `snapshot` or `end` event)" },
                    { "name": "attempt", "in": "query", "schema": { "type": "integer", "minimum": 1 }, "description": "begin with this attempt (runs numbered in order, as in `history`), not the latest" },
                    { "name": "from", "in": "query", "schema": { "type": "string", "example": "2:512:0" }, "description": "resume after this event id (RUN:OUT:ERR, RUN:end or end), as Last-Event-ID does" },
                    { "name": "Last-Event-ID", "in": "header", "schema": { "type": "string" }, "description": "what an EventSource sends when it reconnects: the stream resumes after it, repeating and losing nothing the daemon still holds" }
                ],
                "responses": { "200": stream("the events", json!({ "$ref": "#/components/schemas/OutputEvent" })),
                    "204": { "description": "the position given back is the task's end: nothing more will come (an EventSource stops reconnecting)" },
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "503": error_ref() }
            } },
            "/api/v1/queues/{queue}/output": { "get": {
                "summary": "The output of the queue's tasks that run on this daemon, as Server-Sent Events, as they run (tasks already running from now on, new ones from their start), until the client disconnects: `attempt`, `output`, `skipped`, `attempt_end` events of every task (`run` is null: events carry `task` and `attempt`), and `tasks_skipped` when tasks start and end faster than the follower reads. Positions are not resumable: a reconnect starts from the present.",
                "parameters": [queue_param()],
                "responses": { "200": stream("the events", json!({ "$ref": "#/components/schemas/OutputEvent" })),
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "503": error_ref() }
            } },
            "/api/v1/tasks/{id}/retry": { "post": { "summary": "Queue a failed or cancelled task again with a fresh attempt budget", "security": secured, "parameters": [id_param()],
                "responses": { "200": ok("the task", task_ref()), "401": error_ref(), "404": error_ref(), "409": error_ref() } } },
            "/api/v1/tasks/{id}/cancel": { "post": { "summary": "Cancel a waiting task, or stop a running one", "security": secured, "parameters": [id_param()],
                "responses": { "200": ok("what happened", json!({ "$ref": "#/components/schemas/Cancelled" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/schedules": { "get": { "summary": "The config's schedules: spec, time zone, next slot, the last slot record and its task's state, counts, enabled and paused",
                "responses": { "200": ok("schedules", json!({ "$ref": "#/components/schemas/Schedules" })), "401": error_ref() } } },
            "/api/v1/schedules/{name}": { "get": { "summary": "One schedule and its newest slot records, newest first", "parameters": [schedule_param(),
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500, "default": 50 } }],
                "responses": { "200": ok("the schedule", json!({ "$ref": "#/components/schemas/ScheduleDetail" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/schedules/{name}/fire": { "post": { "summary": "Enqueue the schedule's task now (not a slot: the schedule's record is untouched)", "security": secured, "parameters": [schedule_param()],
                "responses": { "201": ok("the task", json!({ "$ref": "#/components/schemas/ScheduleFired" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/schedules/{name}/pause": { "post": { "summary": "Stop firing a schedule (persists)", "security": secured, "parameters": [schedule_param()],
                "responses": { "200": ok("paused", json!({ "$ref": "#/components/schemas/SchedulePaused" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/schedules/{name}/resume": { "post": { "summary": "Fire a paused schedule again; the slots it slept through are missed slots", "security": secured, "parameters": [schedule_param()],
                "responses": { "200": ok("resumed", json!({ "$ref": "#/components/schemas/SchedulePaused" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/audit": { "get": {
                "summary": "The audit trail, newest first, a page at a time: every change made through the CLI, the control socket, the API and signals (cancel, retry, pause, resume, restart, reload, bulk operations, a schedule's fire, pause and resume; the daemon's start and stop), with who made it and how it went",
                "parameters": [
                    { "name": "since", "in": "query", "schema": { "type": "string" }, "description": "only records taken since then: a duration back from now (`2h`, `1d`) or a time (RFC 3339, or Unix seconds)" },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 50 } },
                    { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" }
                ],
                "responses": { "200": ok("a page", json!({ "$ref": "#/components/schemas/AuditPage" })), "400": error_ref(), "401": error_ref() }
            } }
        },
        "components": components()
    })
}

/// The reusable parts: security schemes and the schemas of requests and responses.
fn components() -> Value {
    let mut c = base_components();
    for more in [
        schedule_schemas(),
        bulk_and_stats_schemas(),
        audit_schemas(),
        why_schemas(),
    ] {
        if let (Some(schemas), Value::Object(more)) = (c["schemas"].as_object_mut(), more) {
            schemas.extend(more);
        }
    }
    c
}

/// The schemas of `/api/v1/audit`.
fn audit_schemas() -> Value {
    json!({
        "AuditPage": { "type": "object", "required": ["records", "next_cursor"], "properties": {
            "records": { "type": "array", "items": { "$ref": "#/components/schemas/AuditRecord" } },
            "next_cursor": { "type": "string", "nullable": true, "description": "the id of the page's last record, when older ones follow" } } },
        "AuditRecord": { "type": "object", "required": ["id", "at", "who", "actor", "action", "target", "task", "queue", "schedule", "filter", "count", "outcome", "detail"], "properties": {
            "id": { "type": "string", "description": "opaque; the cursor for older records" },
            "at": { "type": "integer", "description": "when the store took it, ms since the epoch (the store's clock)" },
            "who": { "type": "string", "example": "api token \"ci\" from 10.0.0.5:41234", "description": "who, for people" },
            "actor": { "$ref": "#/components/schemas/Actor" },
            "action": { "type": "string", "enum": audit_actions() },
            "target": { "type": "string", "example": "task 0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20 (queue emails)", "description": "the target, for people" },
            "task": { "type": "string", "format": "uuid", "nullable": true },
            "queue": { "type": "string", "nullable": true },
            "schedule": { "type": "string", "nullable": true, "description": "the schedule acted on ([schedules.NAME]): schedule_fire, schedule_pause, schedule_resume" },
            "filter": { "type": "object", "nullable": true, "additionalProperties": { "type": "string" }, "description": "a bulk operation's filter" },
            "count": { "type": "integer", "nullable": true, "description": "a bulk operation: how many tasks it changed" },
            "outcome": { "type": "string", "enum": ["ok", "refused"] },
            "detail": { "type": "string", "description": "what happened, or why it was refused" } } },
        "Actor": { "type": "object", "required": ["via", "uid", "user", "login_uid", "login_user", "pid", "host", "token", "addr", "signal"], "properties": {
            "via": { "type": "string", "enum": ["cli", "socket", "api", "signal", "daemon"] },
            "uid": { "type": "integer", "nullable": true, "description": "the Unix uid of a local CLI or of the control socket's peer" },
            "user": { "type": "string", "nullable": true },
            "login_uid": { "type": "integer", "nullable": true, "description": "the login uid, when another user's (sudo, su)" },
            "login_user": { "type": "string", "nullable": true },
            "pid": { "type": "integer", "nullable": true },
            "host": { "type": "string", "nullable": true },
            "token": { "type": "string", "nullable": true, "description": "the name of the API token the request carried" },
            "addr": { "type": "string", "nullable": true, "description": "the HTTP client's address" },
            "signal": { "type": "string", "nullable": true } } }
    })
}

/// The schemas of `/api/v1/tasks/{id}/why`.
fn why_schemas() -> Value {
    json!({
        "Why": { "type": "object", "required": ["task", "queue", "state", "running", "reasons"], "properties": {
            "task": { "type": "string", "format": "uuid" },
            "queue": { "type": "string" },
            "state": { "$ref": "#/components/schemas/State" },
            "running": { "type": "boolean", "description": "it runs now" },
            "reasons": { "type": "array", "items": { "$ref": "#/components/schemas/WhyReason" }, "description": "at least one; `ready` when nothing holds a waiting task back" } } },
        "WhyReason": { "type": "object", "required": ["kind", "text", "at", "tasks", "key", "node", "count", "limit"], "properties": {
            "kind": { "type": "string", "enum": crate::view::WHY_KINDS },
            "text": { "type": "string", "example": "its key `acme` is at its limit (1 of 1): held by 0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20", "description": "the line `taskd why` prints" },
            "at": { "type": "integer", "nullable": true, "description": "the time it names (run-at, retry, the rate limit's next start, the end), ms since the epoch" },
            "tasks": { "type": "array", "items": { "type": "string", "format": "uuid" }, "description": "the parents not yet succeeded, the tasks holding the key, or the oldest running task" },
            "key": { "type": "string", "nullable": true, "description": "the key at its limit, or the rate limit's key" },
            "node": { "type": "string", "nullable": true, "description": "the node running or holding the task" },
            "count": { "type": "integer", "nullable": true, "description": "how many hold what is full (running tasks, key holders, parents waited for)" },
            "limit": { "type": "integer", "nullable": true, "description": "of how many allowed (slots, concurrency_per_key, parents in all)" } } }
    })
}

/// Every action an audit record can have, as the records name them.
fn audit_actions() -> Value {
    crate::audit::Action::ALL
        .iter()
        .map(|a| a.as_str())
        .collect()
}

/// The schemas of `/api/v1/schedules`.
fn schedule_schemas() -> Value {
    json!({
            "Schedules": { "type": "object", "required": ["schedules"], "properties": {
                "schedules": { "type": "array", "items": { "$ref": "#/components/schemas/Schedule" } } } },
            "Schedule": { "type": "object", "required": ["schedule", "queue", "spec", "timezone", "enabled", "paused", "missed", "overlap", "next", "next_local", "next_utc", "handled_through", "fired", "caught_up", "skipped", "last"], "properties": {
                "schedule": { "type": "string" }, "queue": { "type": "string" },
                "spec": { "type": "string", "example": "cron \"0 3 * * *\"" }, "timezone": { "type": "string" },
                "enabled": { "type": "boolean" }, "paused": { "type": "boolean" },
                "missed": { "type": "string", "enum": ["skip", "latest", "all"] }, "overlap": { "type": "string", "enum": ["skip", "allow"] },
                "next": { "type": "integer", "nullable": true, "description": "the next slot, ms since the epoch (null while disabled or paused)" },
                "next_local": { "type": "string", "nullable": true, "description": "the next slot in the schedule's zone, RFC 3339 with offset" },
                "next_utc": { "type": "string", "nullable": true },
                "handled_through": { "type": "integer", "nullable": true, "description": "every slot up to this instant is handled" },
                "fired": { "type": "integer" }, "caught_up": { "type": "integer" }, "skipped": { "type": "integer" },
                "last": { "allOf": [{ "$ref": "#/components/schemas/Slot" }], "nullable": true } } },
            "Slot": { "type": "object", "required": ["slot", "slot_utc", "first", "count", "outcome", "task", "task_state", "reason", "at", "node"], "properties": {
                "slot": { "type": "integer", "description": "ms since the epoch" }, "slot_utc": { "type": "string" },
                "first": { "type": "integer", "description": "the oldest slot of a run of skipped slots" }, "count": { "type": "integer" },
                "outcome": { "type": "string", "enum": ["fired", "caught_up", "skipped"] },
                "task": { "type": "string", "format": "uuid", "nullable": true },
                "task_state": { "type": "string", "nullable": true, "enum": ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled", null], "description": "the state of its task now" },
                "reason": { "type": "string", "nullable": true }, "at": { "type": "integer" }, "node": { "type": "string" } } },
            "ScheduleDetail": { "type": "object", "required": ["schedule", "history"], "properties": {
                "schedule": { "$ref": "#/components/schemas/Schedule" },
                "history": { "type": "array", "items": { "$ref": "#/components/schemas/Slot" } } } },
            "ScheduleFired": { "type": "object", "required": ["schedule", "task"], "properties": { "schedule": { "type": "string" }, "task": task_ref() } },
            "SchedulePaused": { "type": "object", "required": ["schedule", "paused"], "properties": { "schedule": { "type": "string" }, "paused": { "type": "boolean" } } }
    })
}

/// The schemas of the bulk operation and the stats (one `json!` is too deep for them all).
fn bulk_and_stats_schemas() -> Value {
    json!({
            "Filter": { "type": "object", "additionalProperties": false, "description": "the conditions of GET /api/v1/tasks", "properties": {
                "queue": { "type": "string" }, "state": { "$ref": "#/components/schemas/State" },
                "since": { "type": "integer" }, "until": { "type": "integer" }, "id": { "type": "string", "format": "uuid" },
                "unique_key": { "type": "string" }, "payload": { "type": "string", "example": "user_id = 42" } } },
            "BulkRequest": { "type": "object", "required": ["action"], "additionalProperties": false, "properties": {
                "action": { "type": "string", "enum": ["retry", "cancel"], "description": "retry applies to failed and cancelled tasks, cancel to waiting and running ones" },
                "filter": { "$ref": "#/components/schemas/Filter" },
                "dry_run": { "type": "boolean", "default": false, "description": "count only" },
                "expect": { "type": "integer", "description": "the count confirmed: 409 count_changed when more match now" } } },
            "Bulk": { "type": "object", "required": ["action", "dry_run", "matched", "done", "skipped", "errors"], "properties": {
                "action": { "type": "string", "enum": ["retry", "cancel"] }, "dry_run": { "type": "boolean" },
                "matched": { "type": "integer", "description": "tasks the filter matched that the action applies to" },
                "done": { "type": "integer", "description": "retried; or cancelled, or asked to stop (running)" },
                "skipped": { "type": "integer", "description": "tasks that had moved on meanwhile" },
                "errors": { "type": "array", "description": "tasks the action was refused for (at most 100)", "items": { "type": "object", "required": ["id", "error"], "properties": {
                    "id": { "type": "string", "format": "uuid" }, "error": { "type": "string" } } } } } },
            "StatBucket": { "type": "object", "required": ["start", "succeeded", "failed", "retried", "cancelled", "runs", "run_ms_mean", "run_ms_max", "wait_ms_mean"], "properties": {
                "start": { "type": "integer", "description": "ms since the epoch" },
                "succeeded": { "type": "integer" }, "failed": { "type": "integer", "description": "attempts that ended the task failed" },
                "retried": { "type": "integer", "description": "failed attempts that run again" }, "cancelled": { "type": "integer", "description": "running tasks cancelled" },
                "runs": { "type": "integer", "description": "attempts that ran a process" },
                "run_ms_mean": { "type": "integer", "nullable": true }, "run_ms_max": { "type": "integer", "nullable": true },
                "wait_ms_mean": { "type": "integer", "nullable": true, "description": "mean time from due to start" } } },
            "Stats": { "type": "object", "required": ["window", "queue", "bucket_s", "from", "to", "buckets", "total"], "properties": {
                "window": { "type": "string", "enum": ["1h", "24h"] }, "queue": { "type": "string", "nullable": true },
                "bucket_s": { "type": "integer" }, "from": { "type": "integer" }, "to": { "type": "integer" },
                "buckets": { "type": "array", "items": { "$ref": "#/components/schemas/StatBucket" } },
                "total": { "$ref": "#/components/schemas/StatBucket" } } }
    })
}

fn base_components() -> Value {
    json!({
        "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        "schemas": {
            "State": { "type": "string", "enum": ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled"] },
            "NewTask": { "type": "object", "additionalProperties": false, "properties": {
                "payload": { "description": "any JSON value (default {}); an object fills the queue command's {field} placeholders" },
                "payload_b64": { "type": "string", "format": "byte", "example": "CgNBZGEQlw4=", "description": "instead of `payload`: a raw payload (bytes, not JSON) in standard base64, stored untouched and given to the task on stdin byte for byte" },
                "args": { "type": "array", "items": { "type": "string" }, "description": "argv appended to the queue's command" },
                "delay": { "type": "string", "example": "5m", "description": "run no sooner than this long from now" },
                "run_at": { "oneOf": [{ "type": "string", "format": "date-time" }, { "type": "integer", "description": "Unix seconds" }] },
                "priority": { "type": "integer", "default": 0 },
                "unique": { "type": "string", "description": "at most one waiting or running task of the queue holds this key" },
                "unique_for": { "type": "string", "example": "10m", "description": "with `unique` (ignored without it): the key stays taken this long after the task finished; a duplicate meanwhile answers that task, `existing: true`" },
                "after": { "type": "array", "items": { "type": "string", "format": "uuid" }, "description": "run only after these tasks succeeded (`scheduled` until then; cancelled, `dependency <ID> failed`, when one fails or is cancelled); an unknown id is refused with 422" },
                "expires": { "oneOf": [{ "type": "string", "example": "1h" }, { "type": "integer", "description": "Unix seconds" }], "description": "not started by then, the task is never started: cancelled with the reason `expired`. A duration counted from its run-at (\"30m\"), or a time (RFC 3339, or Unix seconds); default: the queue's `expires`" }
            } },
            "Task": { "type": "object", "required": ["id", "queue", "state", "payload", "args", "priority", "unique_key", "run_at", "attempts", "created_at", "updated_at", "finished_at", "last_error", "cancel_requested", "node", "schedule", "slot", "after", "expires_at"], "properties": {
                "id": { "type": "string", "format": "uuid" }, "queue": { "type": "string" }, "state": { "$ref": "#/components/schemas/State" },
                "payload": { "description": "the JSON value the task was submitted with; null for a raw payload" },
                "payload_b64": { "type": "string", "format": "byte", "description": "a raw payload's bytes in standard base64 (absent for a JSON payload)" }, "args": { "type": "array", "items": { "type": "string" } }, "priority": { "type": "integer" },
                "unique_key": { "type": "string", "nullable": true }, "run_at": { "type": "integer", "description": "ms since the epoch" },
                "attempts": { "type": "integer" }, "created_at": { "type": "integer" }, "updated_at": { "type": "integer" },
                "finished_at": { "type": "integer", "nullable": true }, "last_error": { "type": "string", "nullable": true },
                "cancel_requested": { "type": "boolean" }, "node": { "type": "string", "nullable": true },
                "schedule": { "type": "string", "nullable": true, "description": "the schedule that enqueued it ([schedules.NAME])" },
                "slot": { "type": "integer", "nullable": true, "description": "the slot it runs for, ms since the epoch; null for `taskd schedules fire`" },
                "after": { "type": "array", "items": { "type": "string", "format": "uuid" }, "description": "the tasks it runs after (`--after`): it waits in `scheduled` until each one succeeded, and is cancelled (`dependency <ID> failed`) when one fails or is cancelled" },
                "expires_at": { "type": "integer", "nullable": true, "description": "ms since the epoch: not started by then, it is cancelled with the reason `expired` (`--expires`, the queue's `expires`)" }
            } },
            "EnqueuedTask": { "allOf": [task_ref(), { "type": "object", "required": ["existing"], "properties": {
                "existing": { "type": "boolean", "description": "a waiting or running task already held the unique key: this is that task" } } }] },
            "BatchEnqueued": { "type": "object", "required": ["enqueued", "existing", "ids"], "properties": {
                "enqueued": { "type": "integer" }, "existing": { "type": "integer", "description": "how many held a unique key already taken" },
                "ids": { "type": "array", "items": { "type": "string", "format": "uuid" } } } },
            "TaskPage": { "type": "object", "required": ["tasks", "next_cursor"], "properties": {
                "tasks": { "type": "array", "items": task_ref() }, "next_cursor": { "type": "string", "nullable": true } } },
            "Cancelled": { "type": "object", "required": ["outcome", "task"], "properties": {
                "outcome": { "oneOf": [
                    { "type": "string", "enum": ["cancelled", "requested"] },
                    { "type": "object", "required": ["already_finished"], "properties": { "already_finished": { "$ref": "#/components/schemas/State" } } }
                ] },
                "task": task_ref() } },
            "Paused": { "type": "object", "required": ["queue", "paused"], "properties": { "queue": { "type": "string" }, "paused": { "type": "boolean" } } },
            "Restarting": { "type": "object", "required": ["queue", "restarting", "message"], "properties": { "queue": { "type": "string" }, "restarting": { "type": "boolean" }, "message": { "type": "string" } } },
            "Health": { "type": "object", "required": ["status"], "properties": { "status": { "type": "string", "enum": ["ok"] } } },
            "Overview": { "type": "object", "required": ["queues", "workers", "nodes"], "properties": {
                "queues": { "type": "array", "items": { "$ref": "#/components/schemas/Queue" } },
                "workers": { "type": "array", "items": { "$ref": "#/components/schemas/Worker" } },
                "nodes": { "type": "array", "items": { "$ref": "#/components/schemas/Node" } } } },
            "Worker": { "type": "object", "required": ["queue", "slot", "pid", "start_time", "state", "since_ms", "started_ms", "tasks_done", "last_exit", "why", "last_stderr", "uptime_s", "rss_bytes"], "properties": {
                "queue": { "type": "string" }, "slot": { "type": "integer" }, "pid": { "type": "integer", "nullable": true },
                "start_time": { "type": "integer", "description": "the process's start time in clock ticks since boot" },
                "state": { "type": "string", "enum": ["starting", "running", "backoff", "stopping", "fatal", "stopped"] },
                "since_ms": { "type": "integer" }, "started_ms": { "type": "integer", "nullable": true },
                "tasks_done": { "type": "integer" }, "last_exit": { "type": "string", "nullable": true },
                "why": { "type": "string", "nullable": true, "description": "why it is FATAL" },
                "last_stderr": { "type": "array", "items": { "type": "string" }, "description": "the last lines its previous process wrote on stderr outside tasks" },
                "uptime_s": { "type": "integer", "nullable": true, "description": "seconds its current process has run" },
                "rss_bytes": { "type": "integer", "nullable": true, "description": "its process's resident memory (VmRSS), bytes" } } },
            "Node": { "type": "object", "required": ["id", "host", "pid", "queues", "running", "last_heartbeat"], "properties": {
                "id": { "type": "string" }, "host": { "type": "string" }, "pid": { "type": "integer" },
                "queues": { "type": "array", "items": { "type": "string" } }, "running": { "type": "integer" },
                "last_heartbeat": { "type": "integer", "description": "ms since the epoch, the Redis server's clock" } } },
            "TaskDetail": { "allOf": [task_ref(), { "type": "object", "required": ["history", "result", "lost", "crashes"], "properties": {
                "lost": { "type": "integer", "description": "runs lost: the daemon or node running it died (attempts with reason `lost`); past the queue's `max_lost` the task fails" },
                "crashes": { "type": "integer", "description": "runs its long-lived worker died in (reason `crash`); at the queue's `max_crashes` the task fails" },
                "history": { "type": "array", "items": { "$ref": "#/components/schemas/Attempt" } },
                "result": { "nullable": true, "description": "what the task returned when it succeeded (any JSON value: a worker's `ok` result, or what it wrote to `$TASKD_RESULT_FILE`); null until then, and for a task that succeeded without one" } } }] },
            "Attempt": { "type": "object", "required": ["number", "node", "pid", "started_at", "ended_at", "exit_code", "signal", "reason", "error", "stdout_tail", "stderr_tail", "memory_peak", "cpu_usec"], "properties": {
                "number": { "type": "integer" }, "node": { "type": "string" }, "pid": { "type": "integer", "nullable": true },
                "started_at": { "type": "integer" }, "ended_at": { "type": "integer" }, "exit_code": { "type": "integer", "nullable": true },
                "signal": { "type": "integer", "nullable": true }, "reason": { "type": "string", "nullable": true, "enum": ["exit", "signal", "timeout", "lost", "spawn", "cancelled", "shutdown", "invalid", "result", "crash", "protocol", "oom", null] },
                "error": { "type": "string", "nullable": true }, "stdout_tail": { "type": "string" }, "stderr_tail": { "type": "string" },
                "memory_peak": { "type": "integer", "nullable": true, "description": "the peak memory use of the attempt's cgroup, in bytes; null where not measured (no cgroup or memory controller, a task on a long-lived worker)" },
                "cpu_usec": { "type": "integer", "nullable": true, "description": "CPU time (user + system) of everything the attempt's cgroup held, in microseconds; null where not measured" }
            } },
            "Queue": { "type": "object", "required": ["queue", "paused", "configured", "concurrency", "set_aside", "counts"], "properties": {
                "queue": { "type": "string" }, "paused": { "type": "boolean" }, "configured": { "type": "boolean" },
                "concurrency": { "type": "integer", "nullable": true },
                "set_aside": { "type": "integer", "description": "inbox entries set aside, never to run (Redis: a reused id or an unreadable entry)" },
                "counts": { "type": "object", "description": "tasks by state, every state named (zeros included)",
                    "required": ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled"],
                    "properties": { "scheduled": { "type": "integer" }, "queued": { "type": "integer" }, "running": { "type": "integer" },
                        "retrying": { "type": "integer" }, "succeeded": { "type": "integer" }, "failed": { "type": "integer" }, "cancelled": { "type": "integer" } } }
            } },
            "OutStream": { "type": "string", "enum": ["stdout", "stderr"] },
            "OutputEvent": { "description": "one event of an output stream (the `data:` of an SSE event, whose `event:` is `event`)", "oneOf": output_events() },
            "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                "code": { "type": "string", "example": "unknown_queue" }, "message": { "type": "string" } },
                "additionalProperties": { "description": "details of some errors: `known` queues, the `byte`, `line` and `column` of malformed JSON, a `limit`, …" } } } }
        }
    })
}

/// The kinds of [`crate::view::OutputEvent`], one object schema each.
fn output_events() -> Value {
    let id = json!({ "type": "string", "nullable": true, "description": "the position after this event (RUN:OUT:ERR or RUN:end): send it back to resume after it; null where the event does not move the follower (a stored tail, a queue's stream)" });
    let task = json!({ "type": "string", "format": "uuid" });
    let run = json!({ "type": "integer", "nullable": true, "description": "the run, numbered in order as in `history` (null in a queue's stream)" });
    let stream = json!({ "$ref": "#/components/schemas/OutStream" });
    let kind = |name: &str| json!({ "type": "string", "enum": [name] });
    json!([
        { "type": "object", "description": "a run begins (live: its output follows as it is written) or a finished run's stored output follows",
          "required": ["event", "id", "task", "queue", "run", "attempt", "node", "started_at", "live"], "properties": {
            "event": kind("attempt"), "id": id, "task": task, "queue": { "type": "string" }, "run": run,
            "attempt": { "type": "integer", "description": "TASKD_ATTEMPT of the run" }, "node": { "type": "string", "nullable": true },
            "started_at": { "type": "integer" }, "live": { "type": "boolean" } } },
        { "type": "object", "description": "text the task wrote (UTF-8; bytes that are not become U+FFFD)",
          "required": ["event", "id", "task", "run", "stream", "data"], "properties": {
            "event": kind("output"), "id": id, "task": task, "run": run, "stream": stream, "data": { "type": "string" } } },
        { "type": "object", "description": "this follower fell behind what the daemon holds: `bytes` of `stream` are not shown (show `[… N bytes skipped]`)",
          "required": ["event", "id", "task", "run", "stream", "bytes"], "properties": {
            "event": kind("skipped"), "id": id, "task": task, "run": run, "stream": stream, "bytes": { "type": "integer" } } },
        { "type": "object", "description": "a run ended: how, and what became of the task (`state`, `run_at` for a retry; null for an earlier run of the history)",
          "required": ["event", "id", "task", "run", "attempt", "reason", "exit_code", "signal", "error", "started_at", "ended_at", "state", "run_at"], "properties": {
            "event": kind("attempt_end"), "id": id, "task": task, "run": run, "attempt": { "type": "integer" },
            "reason": { "type": "string", "nullable": true, "enum": ["exit", "signal", "timeout", "lost", "spawn", "cancelled", "shutdown", "invalid", "result", "crash", "protocol", "oom", null] },
            "exit_code": { "type": "integer", "nullable": true }, "signal": { "type": "integer", "nullable": true }, "error": { "type": "string", "nullable": true },
            "started_at": { "type": "integer" }, "ended_at": { "type": "integer" },
            "state": { "type": "string", "nullable": true, "enum": ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled", null] },
            "run_at": { "type": "integer", "nullable": true } } },
        { "type": "object", "description": "something the follower should know: where the task runs (another node), what it waits for",
          "required": ["event", "task", "message"], "properties": {
            "event": kind("notice"), "task": { "type": "string", "format": "uuid", "nullable": true }, "message": { "type": "string" } } },
        { "type": "object", "description": "the task ended for good; the stream closes. Its id is `end`",
          "required": ["event", "id", "task", "state", "attempts", "error"], "properties": {
            "event": kind("end"), "id": { "type": "string", "enum": ["end"] }, "task": task, "state": { "$ref": "#/components/schemas/State" },
            "attempts": { "type": "integer" }, "error": { "type": "string", "nullable": true } } },
        { "type": "object", "description": "without follow: what exists now was sent, and the task has not ended; the stream closes",
          "required": ["event", "task", "state"], "properties": {
            "event": kind("snapshot"), "task": task, "state": { "$ref": "#/components/schemas/State" } } },
        { "type": "object", "description": "a queue's stream: tasks that started and ended before this follower looked, not shown",
          "required": ["event", "count"], "properties": { "event": kind("tasks_skipped"), "count": { "type": "integer" } } }
    ])
}

#[cfg(test)]
mod request_tests;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::{json, Value};

    use crate::audit::{Action, Actor, AuditEntry, AuditRecord, Via};
    use crate::broker::{CancelOutcome, NodeInfo, QueueRow};
    use crate::model::{AttemptReason, AttemptRecord, TaskDetail, TaskId, TaskRecord, TaskState};
    use crate::view;
    use crate::worker::status::{WorkerInfo, WorkerState};

    #[test]
    fn documents_exactly_the_routes() {
        let doc = super::document();
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = super::super::routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, routed, "OpenAPI paths and the router differ");
    }

    /// Which sample a value is: every optional field set and every list non-empty (so every
    /// documented field must appear), or every option `None` and every list empty (so what
    /// still appears is always there: it must be `required`, and a `null` must be
    /// `nullable`).
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Fill {
        Full,
        Sparse,
    }

    /// Walks a schema of the document alongside a serialized value and notes every
    /// disagreement, with the JSON path where it is.
    struct Walker<'a> {
        doc: &'a Value,
        errors: Vec<String>,
    }

    impl<'a> Walker<'a> {
        fn new(doc: &'a Value) -> Self {
            Walker {
                doc,
                errors: Vec::new(),
            }
        }

        fn resolve<'s>(&self, schema: &'s Value) -> &'s Value
        where
            'a: 's,
        {
            match schema.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let name = r
                        .strip_prefix("#/components/schemas/")
                        .expect("the document refers only to its own schemas");
                    let target = &self.doc["components"]["schemas"][name];
                    assert!(!target.is_null(), "dangling $ref {r}");
                    self.resolve(target)
                }
                None => schema,
            }
        }

        /// `allOf` as one object schema: the parts' properties and required fields together.
        fn merge(&self, parts: &[Value]) -> Value {
            let mut properties = serde_json::Map::new();
            let mut required = Vec::new();
            for part in parts {
                let part = self.resolve(part);
                let part = match part.get("allOf").and_then(Value::as_array) {
                    Some(inner) => self.merge(inner),
                    None => part.clone(),
                };
                if let Some(p) = part["properties"].as_object() {
                    properties.extend(p.clone());
                }
                if let Some(r) = part["required"].as_array() {
                    required.extend(r.iter().cloned());
                }
            }
            json!({ "type": "object", "properties": properties, "required": required })
        }

        fn check(&mut self, at: &str, schema: &Value, value: &Value, fill: Fill) {
            let schema = self.resolve(schema);
            // `allOf` with `nullable` beside it: a reference that may be null.
            if value.is_null() && schema["nullable"] == true {
                return;
            }
            if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
                let merged = self.merge(parts);
                let mut inner = Walker::new(self.doc);
                inner.check(at, &merged, value, fill);
                self.errors.extend(inner.errors);
                return;
            }
            if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
                let fits = alternatives.iter().any(|alt| {
                    let mut w = Walker::new(self.doc);
                    w.check(at, alt, value, fill);
                    w.errors.is_empty()
                });
                if !fits {
                    self.errors
                        .push(format!("{at}: {value} fits none of the document's oneOf"));
                }
                return;
            }
            let nullable = schema["nullable"] == true;
            if value.is_null() {
                if !nullable && schema.get("type").is_some() {
                    self.errors.push(format!(
                        "{at}: serialized as null, but the document does not say `nullable`"
                    ));
                }
                return;
            }
            if nullable && fill == Fill::Sparse {
                self.errors.push(format!(
                    "{at}: documented `nullable`, but serialized as {value} with nothing set"
                ));
            }
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                if !allowed.contains(value) {
                    self.errors
                        .push(format!("{at}: {value} is not in the document's enum"));
                }
            }
            let kind = schema.get("type").and_then(Value::as_str);
            let fits = match kind {
                None => true,
                Some("string") => value.is_string(),
                Some("integer") => value.is_i64() || value.is_u64(),
                Some("number") => value.is_number(),
                Some("boolean") => value.is_boolean(),
                Some("array") => value.is_array(),
                Some("object") => value.is_object(),
                Some(other) => {
                    self.errors
                        .push(format!("{at}: unknown type `{other}` in the document"));
                    return;
                }
            };
            if !fits {
                self.errors.push(format!(
                    "{at}: serialized as {value}, but the document says {}",
                    kind.unwrap_or("anything")
                ));
                return;
            }
            // A schema without a type (a payload) takes any value, whatever is inside it.
            if kind.is_none() {
                return;
            }
            if let Some(items) = value.as_array() {
                for (i, item) in items.iter().enumerate() {
                    self.check(&format!("{at}[{i}]"), &schema["items"], item, fill);
                }
            }
            if let Some(object) = value.as_object() {
                self.object(at, schema, object, fill);
            }
        }

        fn object(
            &mut self,
            at: &str,
            schema: &Value,
            object: &serde_json::Map<String, Value>,
            fill: Fill,
        ) {
            let empty = serde_json::Map::new();
            let properties = schema["properties"].as_object().unwrap_or(&empty);
            let required: BTreeSet<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (key, value) in object {
                match properties.get(key) {
                    Some(s) => self.check(&format!("{at}.{key}"), s, value, fill),
                    None => match schema.get("additionalProperties") {
                        Some(s) if s.is_object() => {
                            self.check(&format!("{at}.{key}"), s, value, fill)
                        }
                        _ => self.errors.push(format!(
                            "{at}: serializes `{key}`, which the document does not describe"
                        )),
                    },
                }
            }
            for r in &required {
                if !object.contains_key(*r) {
                    self.errors.push(format!(
                        "{at}.{r}: required by the document, but not serialized"
                    ));
                }
                if !properties.contains_key(*r) {
                    self.errors
                        .push(format!("{at}.{r}: required, but not among the properties"));
                }
            }
            match fill {
                Fill::Full => {
                    for key in properties.keys() {
                        if !object.contains_key(key) {
                            self.errors.push(format!(
                                "{at}.{key}: documented, but not serialized even with every field set"
                            ));
                        }
                    }
                }
                Fill::Sparse => {
                    for key in object.keys() {
                        if properties.contains_key(key) && !required.contains(key.as_str()) {
                            self.errors.push(format!(
                                "{at}.{key}: always serialized, but not `required` in the document"
                            ));
                        }
                    }
                }
            }
        }
    }

    const NOW: i64 = 1_764_800_000_000;

    fn task(fill: Fill) -> TaskRecord {
        let full = fill == Fill::Full;
        TaskRecord {
            id: TaskId::new(),
            queue: "thumbs".parse().expect("a valid queue name"),
            state: TaskState::Failed,
            payload: json!({ "size": 64 }),
            args: if full {
                vec!["--fast".into()]
            } else {
                Vec::new()
            },
            priority: 2,
            unique_key: full.then(|| "k".to_string()),
            run_at: NOW,
            attempts: 3,
            created_at: NOW,
            updated_at: NOW,
            finished_at: full.then_some(NOW),
            last_error: full.then(|| "exit code 3".to_string()),
            cancel_requested: false,
            node: full.then(|| "host:1".into()),
            schedule: full.then(|| "nightly".to_string()),
            slot: full.then_some(NOW),
            after: if full {
                vec![TaskId::new()]
            } else {
                Vec::new()
            },
            expires_at: full.then_some(NOW),
            payload_b64: full.then(|| "CgNBZGEQKg==".to_string()),
        }
    }

    fn attempt(fill: Fill) -> AttemptRecord {
        let full = fill == Fill::Full;
        AttemptRecord {
            number: 1,
            node: "host:1".into(),
            pid: full.then_some(42),
            started_at: NOW,
            ended_at: NOW,
            exit_code: full.then_some(3),
            signal: full.then_some(9),
            reason: full.then_some(AttemptReason::Exit),
            error: full.then(|| "exit code 3".to_string()),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            memory_peak: full.then_some(1 << 20),
            cpu_usec: full.then_some(1500),
            result: None,
        }
    }

    fn worker(fill: Fill) -> view::WorkerView {
        let full = fill == Fill::Full;
        let info = WorkerInfo {
            queue: "thumbs".parse().expect("a valid queue name"),
            slot: 0,
            pid: full.then_some(42),
            start_time: 7,
            state: WorkerState::Fatal,
            since_ms: NOW,
            started_ms: full.then_some(NOW - 5_000),
            tasks_done: 1,
            last_exit: full.then(|| "exit code 1".to_string()),
            why: full.then(|| "exited 3 times".to_string()),
            last_stderr: if full {
                vec!["ImportError".into()]
            } else {
                Vec::new()
            },
        };
        view::WorkerView::new(info, NOW, full.then_some(50 << 20))
    }

    fn overview(fill: Fill) -> view::Overview {
        let full = fill == Fill::Full;
        let row = QueueRow {
            counts: BTreeMap::from([(TaskState::Queued, 4)]),
            paused: true,
            configured: true,
            set_aside: 0,
        };
        let node = NodeInfo {
            id: "host:1".into(),
            host: "host".into(),
            pid: 1,
            queues: vec!["thumbs".into()],
            running: 2,
            last_heartbeat: NOW,
        };
        view::Overview {
            queues: vec![view::QueueView::new("thumbs", &row, full.then_some(4))],
            workers: if full { vec![worker(fill)] } else { Vec::new() },
            nodes: if full { vec![node] } else { Vec::new() },
        }
    }

    fn audit_record(fill: Fill) -> view::AuditView {
        let full = fill == Fill::Full;
        let actor = if full {
            Actor {
                uid: Some(0),
                user: Some("root".into()),
                login_uid: Some(1000),
                login_user: Some("alice".into()),
                pid: Some(42),
                host: Some("web-1".into()),
                token: Some("ci".into()),
                addr: Some("10.0.0.5:41234".into()),
                signal: Some("SIGHUP".into()),
                ..Actor::blank(Via::Api)
            }
        } else {
            Actor::blank(Via::Signal)
        };
        let mut entry = AuditEntry::new(actor, Action::BulkRetry).ok("12 tasks queued again");
        if full {
            entry = AuditEntry {
                task: Some(TaskId::new()),
                queue: Some("thumbs".parse().expect("a valid queue name")),
                schedule: Some("nightly".into()),
                filter: Some(BTreeMap::from([(
                    "state".to_string(),
                    "failed".to_string(),
                )])),
                count: Some(12),
                ..entry
            };
        }
        view::AuditView::from(AuditRecord {
            id: "1764800000000-0".into(),
            at: NOW,
            entry,
        })
    }

    fn to_json(value: impl serde::Serialize) -> Value {
        serde_json::to_value(value).expect("the shapes serialize")
    }

    /// An error body as every handler answers one (with details, or without).
    fn error_sample(fill: Fill) -> Value {
        let e = super::super::error::ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "unknown_queue",
            "unknown queue `x`",
        );
        let e = match fill {
            Fill::Full => e.with("known", vec!["thumbs".to_string()]),
            Fill::Sparse => e,
        };
        to_json(e.body())
    }

    /// What each documented JSON response serializes, by (method, path, status): the
    /// shapes the handlers return, filled both ways.
    fn api_samples(fill: Fill) -> BTreeMap<(&'static str, &'static str, &'static str), Vec<Value>> {
        let full = fill == Fill::Full;
        let enqueued = |existing| {
            to_json(view::EnqueuedTask {
                task: task(fill),
                existing,
            })
        };
        let enqueue = "/api/v1/queues/{queue}/tasks";
        let mut samples = BTreeMap::from([
            (
                ("get", "/healthz", "200"),
                vec![to_json(view::Health { status: "ok" })],
            ),
            (
                ("get", "/api/v1/queues", "200"),
                vec![to_json(overview(fill))],
            ),
            (("post", enqueue, "201"), vec![enqueued(false)]),
            (("post", enqueue, "200"), vec![enqueued(true)]),
            (
                ("post", "/api/v1/queues/{queue}/tasks/batch", "201"),
                vec![to_json(view::BatchEnqueued {
                    enqueued: 2,
                    existing: 1,
                    ids: if full {
                        vec![TaskId::new()]
                    } else {
                        Vec::new()
                    },
                })],
            ),
            (
                ("post", "/api/v1/queues/{queue}/pause", "200"),
                vec![to_json(view::PauseView {
                    queue: "thumbs".parse().expect("a valid queue name"),
                    paused: true,
                })],
            ),
            (
                ("post", "/api/v1/queues/{queue}/resume", "200"),
                vec![to_json(view::PauseView {
                    queue: "thumbs".parse().expect("a valid queue name"),
                    paused: false,
                })],
            ),
            (
                ("post", "/api/v1/queues/{queue}/restart", "202"),
                vec![to_json(view::RestartView {
                    queue: "thumbs".parse().expect("a valid queue name"),
                    restarting: true,
                    message: "queue thumbs: restarting 2 workers one at a time, each after its current task".into(),
                })],
            ),
            (
                ("get", "/api/v1/tasks", "200"),
                vec![to_json(view::TaskPage {
                    tasks: if full { vec![task(fill)] } else { Vec::new() },
                    next_cursor: full.then(|| TaskId::new().to_string()),
                })],
            ),
            (
                ("post", "/api/v1/tasks/bulk", "200"),
                vec![to_json(view::BulkView {
                    action: view::BulkAction::Cancel,
                    dry_run: !full,
                    matched: 3,
                    done: 2,
                    skipped: 0,
                    errors: if full {
                        vec![view::BulkFailure {
                            id: TaskId::new(),
                            error: "broker unreachable".into(),
                        }]
                    } else {
                        Vec::new()
                    },
                })],
            ),
            (
                ("get", "/api/v1/stats", "200"),
                vec![to_json({
                    let mut r = crate::broker::StatRow::new(
                        "thumbs".parse().expect("a valid queue name"),
                        NOW / 60_000,
                    );
                    if full {
                        r.succeeded = 3;
                        r.runs = 3;
                        r.run_ms_sum = 30;
                        r.run_ms_max = 20;
                    }
                    let b = view::StatBucket::sum(NOW, [&r]);
                    view::StatsView {
                        window: "1h".into(),
                        queue: full.then(|| "thumbs".to_string()),
                        bucket_s: 60,
                        from: NOW,
                        to: NOW + 60_000,
                        buckets: vec![b.clone()],
                        total: b,
                    }
                })],
            ),
            (
                ("get", "/api/v1/tasks/{id}", "200"),
                vec![to_json(TaskDetail::new(
                    task(fill),
                    if full { vec![attempt(fill)] } else { Vec::new() },
                    full.then(|| json!({ "thumbnail": "/srv/t/64.png", "bytes": 5120 })),
                ))],
            ),
            (
                ("get", "/api/v1/tasks/{id}/why", "200"),
                vec![to_json(view::WhyView {
                    task: TaskId::new(),
                    queue: "thumbs".into(),
                    state: TaskState::Queued,
                    running: false,
                    reasons: vec![{
                        let mut r = view::WhyReason::new("key_limit", "its key `acme` is at its limit (1 of 1): held by …".into());
                        if full {
                            r.at = Some(NOW);
                            r.tasks = vec![TaskId::new()];
                            r.key = Some("acme".into());
                            r.node = Some("host:1".into());
                            r.count = Some(1);
                            r.limit = Some(1);
                        }
                        r
                    }],
                })],
            ),
            (
                ("post", "/api/v1/tasks/{id}/retry", "200"),
                vec![to_json(task(fill))],
            ),
            (
                ("get", "/api/v1/audit", "200"),
                vec![to_json(view::AuditPage {
                    records: vec![audit_record(fill)],
                    next_cursor: full.then(|| "1764800000000-0".to_string()),
                })],
            ),
            (
                ("post", "/api/v1/tasks/{id}/cancel", "200"),
                [
                    CancelOutcome::Cancelled,
                    CancelOutcome::Requested,
                    CancelOutcome::AlreadyFinished(TaskState::Succeeded),
                ]
                .into_iter()
                .map(|outcome| {
                    to_json(view::CancelView {
                        outcome,
                        task: task(fill),
                    })
                })
                .collect(),
            ),
        ]);
        samples.extend(schedule_samples(fill));
        samples
    }

    /// A documented response: (method, path, status).
    type Response = (&'static str, &'static str, &'static str);

    /// The shapes of `/api/v1/schedules`.
    fn schedule_samples(fill: Fill) -> Vec<(Response, Vec<Value>)> {
        use crate::broker::SlotOutcome;
        let full = fill == Fill::Full;
        let slot = |outcome| view::SlotView {
            slot: NOW,
            slot_utc: "2025-12-03T22:13:20Z".into(),
            first: NOW,
            count: 1,
            outcome,
            task: full.then(TaskId::new),
            task_state: full.then_some(TaskState::Succeeded),
            reason: full.then(|| "overlap".to_string()),
            at: NOW,
            node: "host:1".into(),
        };
        let schedule = view::ScheduleView {
            schedule: "nightly".into(),
            queue: "thumbs".into(),
            spec: "cron \"0 3 * * *\"".into(),
            timezone: "Europe/Berlin".into(),
            enabled: true,
            paused: !full,
            missed: "latest".into(),
            overlap: "skip".into(),
            next: full.then_some(NOW),
            next_local: full.then(|| "2025-12-04T03:00:00+01:00".to_string()),
            next_utc: full.then(|| "2025-12-04T02:00:00Z".to_string()),
            handled_through: full.then_some(NOW),
            fired: 3,
            caught_up: 1,
            skipped: 2,
            last: full.then(|| slot(SlotOutcome::CaughtUp)),
        };
        let paused = |paused| {
            to_json(view::SchedulePaused {
                schedule: "nightly".into(),
                paused,
            })
        };
        vec![
            (
                ("get", "/api/v1/schedules", "200"),
                vec![to_json(view::Schedules {
                    schedules: if full {
                        vec![schedule.clone()]
                    } else {
                        Vec::new()
                    },
                })],
            ),
            (
                ("get", "/api/v1/schedules/{name}", "200"),
                vec![to_json(view::ScheduleDetail {
                    schedule: schedule.clone(),
                    history: if full {
                        vec![slot(SlotOutcome::Fired), slot(SlotOutcome::Skipped)]
                    } else {
                        Vec::new()
                    },
                })],
            ),
            (
                ("post", "/api/v1/schedules/{name}/fire", "201"),
                vec![to_json(view::ScheduleFired {
                    schedule: "nightly".into(),
                    task: task(fill),
                })],
            ),
            (
                ("post", "/api/v1/schedules/{name}/pause", "200"),
                vec![paused(true)],
            ),
            (
                ("post", "/api/v1/schedules/{name}/resume", "200"),
                vec![paused(false)],
            ),
        ]
    }

    /// Every JSON response the document describes (errors and the document itself aside) is
    /// what its handler's shape serializes, field for field, and every shape is documented.
    #[test]
    fn response_schemas_match_the_shapes() {
        let doc = super::document();
        let mut errors = Vec::new();
        for fill in [Fill::Full, Fill::Sparse] {
            let mut samples = api_samples(fill);
            for (path, ops) in doc["paths"].as_object().expect("paths") {
                for (method, op) in ops.as_object().expect("operations") {
                    let responses = op["responses"].as_object().expect("responses");
                    for (status, response) in responses {
                        let schema = &response["content"]["application/json"]["schema"];
                        if schema.is_null() || path == "/api/v1/openapi.json" {
                            continue;
                        }
                        if schema["$ref"] == "#/components/schemas/Error" {
                            let mut w = Walker::new(&doc);
                            let at =
                                format!("{} {path} {status} ({fill:?})", method.to_uppercase());
                            w.check(&at, schema, &error_sample(fill), fill);
                            errors.extend(w.errors);
                            continue;
                        }
                        let Some(values) =
                            samples.remove(&(method.as_str(), path.as_str(), status.as_str()))
                        else {
                            errors.push(format!(
                                "{} {path} {status}: documented, but no shape is checked against it",
                                method.to_uppercase()
                            ));
                            continue;
                        };
                        for value in values {
                            let mut w = Walker::new(&doc);
                            let at =
                                format!("{} {path} {status} ({fill:?})", method.to_uppercase());
                            w.check(&at, schema, &value, fill);
                            errors.extend(w.errors);
                        }
                    }
                }
            }
            for (method, path, status) in samples.keys() {
                errors.push(format!(
                    "{method} {path} {status}: a shape the document does not describe"
                ));
            }
        }
        assert!(
            errors.is_empty(),
            "the OpenAPI document and the shapes differ:\n{}",
            errors.join("\n")
        );
    }

    /// `taskd status --json` is the API's `GET /api/v1/queues` plus the daemon found on this
    /// machine and its state directory; `taskd submit --json` is the task and `existing`;
    /// `taskd audit --json` is an array of the API's audit records.
    #[test]
    fn cli_json_shapes_extend_the_documented_ones() {
        let doc = super::document();
        let status = json!({ "allOf": [
            { "$ref": "#/components/schemas/Overview" },
            { "type": "object", "required": ["daemon", "state_dir", "store"], "properties": {
                "daemon": { "type": "object", "nullable": true, "required": ["pid", "halted", "containment"], "properties": {
                    "pid": { "type": "integer" }, "halted": { "type": "string", "nullable": true },
                    "containment": { "type": "string", "nullable": true } } },
                "state_dir": { "type": "string" },
                "store": { "type": "object", "nullable": true, "required": ["bytes", "measure"], "properties": {
                    "bytes": { "type": "integer" }, "measure": { "type": "string" } } } } }
        ] });
        let submitted = json!({ "type": "object", "required": ["existing", "task"], "properties": {
            "existing": { "type": "boolean" }, "task": { "$ref": "#/components/schemas/Task" } } });
        let mut w = Walker::new(&doc);
        for fill in [Fill::Full, Fill::Sparse] {
            let full = fill == Fill::Full;
            let s = view::Status {
                daemon: full.then(|| view::DaemonView {
                    pid: 1,
                    halted: Some("the store lock is lost".into()),
                    containment: Some("a cgroup per task under /sys/fs/cgroup/taskd".into()),
                }),
                state_dir: "/var/lib/taskd".into(),
                store: full.then_some(crate::broker::StoreSize {
                    bytes: 4096,
                    measure: "file",
                }),
                overview: overview(fill),
            };
            w.check(
                &format!("status --json ({fill:?})"),
                &status,
                &to_json(s),
                fill,
            );
            let s = view::Submitted {
                existing: full,
                task: task(fill),
            };
            w.check(
                &format!("submit --json ({fill:?})"),
                &submitted,
                &to_json(s),
                fill,
            );
            // `taskd audit --json`: the records of `GET /api/v1/audit`, as an array.
            w.check(
                &format!("audit --json ({fill:?})"),
                &json!({ "type": "array", "items": { "$ref": "#/components/schemas/AuditRecord" } }),
                &to_json(vec![audit_record(fill)]),
                fill,
            );
        }
        assert!(w.errors.is_empty(), "{}", w.errors.join("\n"));
    }

    /// Every kind of output event, filled both ways, is what the document's `OutputEvent`
    /// describes (and reads back as itself), and the document has no kind the code lacks.
    #[test]
    fn output_events_match_their_schema() {
        use crate::view::{OutStream, OutputEvent};
        let doc = super::document();
        let schema = &doc["paths"]["/api/v1/tasks/{id}/output"]["get"]["responses"]["200"]
            ["content"]["text/event-stream"]["schema"];
        assert_eq!(
            schema,
            &doc["paths"]["/api/v1/queues/{queue}/output"]["get"]["responses"]["200"]["content"]
                ["text/event-stream"]["schema"]
        );
        let mut w = Walker::new(&doc);
        let mut kinds = BTreeSet::new();
        for fill in [Fill::Full, Fill::Sparse] {
            let full = fill == Fill::Full;
            let task = TaskId::new();
            let id = full.then(|| "2:10:3".to_string());
            let run = full.then_some(2);
            let events = [
                OutputEvent::Attempt {
                    id: id.clone(),
                    task,
                    queue: "thumbs".parse().expect("a valid queue name"),
                    run,
                    attempt: 1,
                    node: full.then(|| "host:1".into()),
                    started_at: NOW,
                    live: true,
                },
                OutputEvent::Output {
                    id: id.clone(),
                    task,
                    run,
                    stream: OutStream::Stdout,
                    data: "line\n".into(),
                },
                OutputEvent::Skipped {
                    id: id.clone(),
                    task,
                    run,
                    stream: OutStream::Stderr,
                    bytes: 4096,
                },
                OutputEvent::AttemptEnd {
                    id: id.clone(),
                    task,
                    run,
                    attempt: 1,
                    reason: full.then_some(AttemptReason::Exit),
                    exit_code: full.then_some(3),
                    signal: full.then_some(9),
                    error: full.then(|| "exit code 3".into()),
                    started_at: NOW,
                    ended_at: NOW + 5,
                    state: full.then_some(TaskState::Retrying),
                    run_at: full.then_some(NOW + 10_000),
                },
                OutputEvent::Notice {
                    task: full.then_some(task),
                    message: "attempt 2 runs on node other:7".into(),
                },
                OutputEvent::End {
                    id: "end".into(),
                    task,
                    state: TaskState::Failed,
                    attempts: 3,
                    error: full.then(|| "exit code 3".into()),
                },
                OutputEvent::Snapshot {
                    task,
                    state: TaskState::Running,
                },
                OutputEvent::TasksSkipped { count: 12 },
            ];
            for ev in events {
                kinds.insert(ev.name());
                let value = to_json(&ev);
                w.check(&format!("{} ({fill:?})", ev.name()), schema, &value, fill);
                let back: OutputEvent = serde_json::from_value(value).expect("an event reads back");
                assert_eq!(back, ev);
            }
        }
        assert!(w.errors.is_empty(), "{}", w.errors.join("\n"));
        let documented: BTreeSet<&str> = doc["components"]["schemas"]["OutputEvent"]["oneOf"]
            .as_array()
            .expect("oneOf")
            .iter()
            .filter_map(|k| k["properties"]["event"]["enum"][0].as_str())
            .collect();
        assert_eq!(documented, kinds);
    }

    /// The walker itself finds each kind of disagreement (so a pass above means something).
    #[test]
    fn the_walker_finds_each_kind_of_disagreement() {
        let doc = json!({ "components": { "schemas": { "S": { "type": "object", "required": ["a"], "properties": {
            "a": { "type": "integer" }, "b": { "type": "string", "nullable": true } } } } } });
        let schema = json!({ "$ref": "#/components/schemas/S" });
        let errors = |value: Value, fill| {
            let mut w = Walker::new(&doc);
            w.check("x", &schema, &value, fill);
            w.errors
        };
        assert!(errors(json!({ "a": 1, "b": "s" }), Fill::Full).is_empty());
        assert!(errors(json!({ "a": 1, "b": null }), Fill::Full).is_empty());
        let cases = [
            (
                json!({ "a": "1", "b": "s" }),
                Fill::Full,
                "x.a: serialized as \"1\", but the document says integer",
            ),
            (
                json!({ "a": 1, "b": "s", "c": 1 }),
                Fill::Full,
                "x: serializes `c`, which the document does not describe",
            ),
            (
                json!({ "a": 1 }),
                Fill::Full,
                "x.b: documented, but not serialized even with every field set",
            ),
            (
                json!({ "b": "s" }),
                Fill::Full,
                "x.a: required by the document, but not serialized",
            ),
            (
                json!({ "a": null, "b": null }),
                Fill::Sparse,
                "x.a: serialized as null, but the document does not say `nullable`",
            ),
            (
                json!({ "a": 1, "b": null }),
                Fill::Sparse,
                "x.b: always serialized, but not `required` in the document",
            ),
            (
                json!({ "a": 1, "b": "s" }),
                Fill::Sparse,
                "x.b: documented `nullable`, but serialized as \"s\" with nothing set",
            ),
        ];
        for (value, fill, want) in cases {
            let got = errors(value.clone(), fill);
            assert!(
                got.iter().any(|e| e == want),
                "{value} ({fill:?}): want {want:?}, got {got:?}"
            );
        }
    }
}
