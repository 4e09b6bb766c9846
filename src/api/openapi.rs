//! The OpenAPI 3 document served at `/api/v1/openapi.json`, written by hand next to the
//! routes it describes; a test checks it against [`super::routes`] both ways, and
//! `tests/api.rs` calls every documented operation on a real daemon.

use serde_json::{json, Value};

fn error_ref() -> Value {
    json!({ "description": "an error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn queue_param() -> Value {
    json!({ "name": "queue", "in": "path", "required": true, "schema": { "type": "string" }, "description": "a queue of the daemon's config" })
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } })
}

fn task_ref() -> Value {
    json!({ "$ref": "#/components/schemas/Task" })
}

/// The document.
pub fn document() -> Value {
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
            "/healthz": { "get": { "summary": "Broker reachable and daemon not draining", "responses": { "200": ok("healthy", json!({ "type": "object" })), "503": error_ref() } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (OpenMetrics text), named taskd_*", "responses": { "200": { "description": "metrics", "content": { "application/openmetrics-text": {} } } } } },
            "/api/v1/openapi.json": { "get": { "summary": "This document", "responses": { "200": ok("OpenAPI 3 document", json!({ "type": "object" })) } } },
            "/api/v1/queues": { "get": {
                "summary": "Queues with their counts by state and paused flags, this daemon's long-lived workers, and the nodes sharing the broker (Redis)",
                "responses": { "200": ok("queues", json!({ "type": "object", "properties": {
                    "queues": { "type": "array", "items": { "$ref": "#/components/schemas/Queue" } },
                    "workers": { "type": "array", "items": { "type": "object" } },
                    "nodes": { "type": "array", "items": { "type": "object", "properties": {
                        "id": { "type": "string" }, "host": { "type": "string" }, "pid": { "type": "integer" },
                        "queues": { "type": "array", "items": { "type": "string" } }, "running": { "type": "integer" },
                        "last_heartbeat": { "type": "integer", "description": "ms since the epoch, the Redis server's clock" } } } } } })), "401": error_ref() }
            } },
            "/api/v1/queues/{queue}/tasks": { "post": {
                "summary": "Enqueue one task; 201 once it is durable (200 with `existing: true` for a unique key already waiting or running)",
                "security": secured, "parameters": [queue_param()],
                "requestBody": { "required": false, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/NewTask" } } } },
                "responses": { "201": ok("the task", task_ref()), "200": ok("an existing task with the same unique key", task_ref()),
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "413": error_ref(), "422": error_ref(), "503": error_ref() }
            } },
            "/api/v1/queues/{queue}/tasks/batch": { "post": {
                "summary": "Enqueue many tasks atomically: a JSON array of NewTask, or one NewTask per line (JSON lines)",
                "security": secured, "parameters": [queue_param()],
                "requestBody": { "required": true, "content": {
                    "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/NewTask" } } },
                    "application/x-ndjson": { "schema": { "type": "string" } } } },
                "responses": { "201": ok("all enqueued", json!({ "type": "object", "properties": { "enqueued": { "type": "integer" }, "existing": { "type": "integer" }, "ids": { "type": "array", "items": { "type": "string" } } } })),
                    "400": error_ref(), "401": error_ref(), "404": error_ref(), "413": error_ref(), "422": error_ref(), "503": error_ref() }
            } },
            "/api/v1/queues/{queue}/pause": { "post": { "summary": "Stop claiming from a queue (persists)", "security": secured, "parameters": [queue_param()],
                "responses": { "200": ok("paused", json!({ "type": "object" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/queues/{queue}/resume": { "post": { "summary": "Claim from a paused queue again", "security": secured, "parameters": [queue_param()],
                "responses": { "200": ok("resumed", json!({ "type": "object" })), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/queues/{queue}/restart": { "post": { "summary": "Restart a worker queue's long-lived workers one at a time, each after its current task (as `taskd restart`); 409 for a queue that runs a process per task", "security": secured, "parameters": [queue_param()],
                "responses": { "202": ok("the rolling restart began", json!({ "type": "object", "properties": { "queue": { "type": "string" }, "restarting": { "type": "boolean" }, "message": { "type": "string" } } })), "401": error_ref(), "404": error_ref(), "409": error_ref(), "503": error_ref() } } },
            "/api/v1/tasks": { "get": {
                "summary": "List tasks, newest first, a page at a time",
                "parameters": [
                    { "name": "queue", "in": "query", "schema": { "type": "string" } },
                    { "name": "state", "in": "query", "schema": { "$ref": "#/components/schemas/State" } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 50 } },
                    { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" }
                ],
                "responses": { "200": ok("a page", json!({ "type": "object", "properties": { "tasks": { "type": "array", "items": task_ref() }, "next_cursor": { "type": "string", "nullable": true } } })), "400": error_ref(), "401": error_ref() }
            } },
            "/api/v1/tasks/{id}": { "get": { "summary": "One task with its attempt history", "parameters": [id_param()],
                "responses": { "200": ok("the task", json!({ "$ref": "#/components/schemas/TaskDetail" })), "400": error_ref(), "401": error_ref(), "404": error_ref() } } },
            "/api/v1/tasks/{id}/retry": { "post": { "summary": "Queue a failed or cancelled task again with a fresh attempt budget", "security": secured, "parameters": [id_param()],
                "responses": { "200": ok("the task", task_ref()), "401": error_ref(), "404": error_ref(), "409": error_ref() } } },
            "/api/v1/tasks/{id}/cancel": { "post": { "summary": "Cancel a waiting task, or stop a running one", "security": secured, "parameters": [id_param()],
                "responses": { "200": ok("what happened", json!({ "type": "object", "properties": { "outcome": {}, "task": task_ref() } })), "401": error_ref(), "404": error_ref() } } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "State": { "type": "string", "enum": ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled"] },
                "NewTask": { "type": "object", "additionalProperties": false, "properties": {
                    "payload": { "description": "any JSON value (default {}); an object fills the queue command's {field} placeholders" },
                    "args": { "type": "array", "items": { "type": "string" }, "description": "argv appended to the queue's command" },
                    "delay": { "type": "string", "example": "5m", "description": "run no sooner than this long from now" },
                    "run_at": { "oneOf": [{ "type": "string", "format": "date-time" }, { "type": "integer", "description": "Unix seconds" }] },
                    "priority": { "type": "integer", "default": 0 },
                    "unique": { "type": "string", "description": "at most one waiting or running task of the queue holds this key" }
                } },
                "Task": { "type": "object", "properties": {
                    "id": { "type": "string" }, "queue": { "type": "string" }, "state": { "$ref": "#/components/schemas/State" },
                    "payload": {}, "args": { "type": "array", "items": { "type": "string" } }, "priority": { "type": "integer" },
                    "unique_key": { "type": "string", "nullable": true }, "run_at": { "type": "integer", "description": "ms since the epoch" },
                    "attempts": { "type": "integer" }, "created_at": { "type": "integer" }, "updated_at": { "type": "integer" },
                    "finished_at": { "type": "integer", "nullable": true }, "last_error": { "type": "string", "nullable": true },
                    "cancel_requested": { "type": "boolean" }, "node": { "type": "string", "nullable": true },
                    "existing": { "type": "boolean", "description": "enqueue only" }
                } },
                "TaskDetail": { "allOf": [task_ref(), { "type": "object", "properties": { "history": { "type": "array", "items": { "$ref": "#/components/schemas/Attempt" } } } }] },
                "Attempt": { "type": "object", "properties": {
                    "number": { "type": "integer" }, "node": { "type": "string" }, "pid": { "type": "integer", "nullable": true },
                    "started_at": { "type": "integer" }, "ended_at": { "type": "integer" }, "exit_code": { "type": "integer", "nullable": true },
                    "signal": { "type": "integer", "nullable": true }, "reason": { "type": "string", "nullable": true, "enum": ["exit", "signal", "timeout", "lost", "spawn", "cancelled", "shutdown", "invalid", "result", "crash", "protocol", null] },
                    "error": { "type": "string", "nullable": true }, "stdout_tail": { "type": "string" }, "stderr_tail": { "type": "string" }
                } },
                "Queue": { "type": "object", "properties": {
                    "queue": { "type": "string" }, "paused": { "type": "boolean" }, "configured": { "type": "boolean" },
                    "concurrency": { "type": "integer", "nullable": true },
                    "set_aside": { "type": "integer", "description": "inbox entries set aside, never to run (Redis: a reused id or an unreadable entry)" },
                    "counts": { "type": "object", "additionalProperties": { "type": "integer" } }
                } },
                "Error": { "type": "object", "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "string", "example": "unknown_queue" }, "message": { "type": "string" } } } } }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
}
