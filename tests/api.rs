//! The HTTP API against a real daemon: every endpoint, its errors, tokens, draining,
//! metrics, the OpenAPI document against the router, and `--server` on the CLI.

mod common;

use std::time::Duration;

use common::browser::{find_chromium, Browser};
use common::{poll, Env, SIGTERM};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A temp dir whose config listens on a free loopback port, with `extra` added to [taskd].
fn env(extra: &str, queues: &str) -> Env {
    Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n{extra}\n\n{queues}\n"
    ))
}

/// One request; (status, JSON body or Null, raw text).
fn call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let (code, text) = call_text(method, url, token, body);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn call_text(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(20));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn wait_task(url: &str, id: &str, state: &str) -> Value {
    let mut last = Value::Null;
    let ok = poll(Duration::from_secs(20), || {
        last = call("GET", &format!("{url}/api/v1/tasks/{id}"), None, None).1;
        last["state"] == state
    });
    assert!(ok, "task {id} did not reach {state}: {last:#}");
    last
}

const QUEUES: &str = "[queues.echo]\nshell = \"echo out-$TASKD_ATTEMPT; echo err-line >&2\"\n\n[queues.mail]\ncommand = [\"/bin/echo\", \"{to}\"]\n\n[queues.fail]\nshell = \"echo boom >&2; exit 3\"\nmax_attempts = 1\n\n[queues.slow]\nshell = \"sleep 30\"\n";

/// A schedule that fires at 03:00 (so not during a test).
const NIGHTLY: &str = "[schedules.nightly]\nqueue = \"mail\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Berlin\"\npayload = { to = \"ops@example.com\" }\n";

#[test]
fn schedules_list_fire_pause_and_resume() {
    let e = env(
        &format!("token = \"{TOKEN}\""),
        &format!("{QUEUES}\n{NIGHTLY}"),
    );
    let d = e.daemon();
    let url = d.api_base();
    let (code, v) = call("GET", &format!("{url}/api/v1/schedules"), None, None);
    assert_eq!(code, 200, "{v:#}");
    let s = &v["schedules"][0];
    assert_eq!(s["schedule"], "nightly");
    assert_eq!(s["spec"], "cron \"0 3 * * *\"");
    assert_eq!(s["timezone"], "Europe/Berlin");
    assert!(
        s["next_local"].as_str().unwrap().contains("T03:00:00+0"),
        "{s}"
    );
    assert!(s["next_utc"].as_str().unwrap().ends_with(":00:00Z"), "{s}");
    // Changes need the token.
    let (code, _) = call(
        "POST",
        &format!("{url}/api/v1/schedules/nightly/fire"),
        None,
        None,
    );
    assert_eq!(code, 401);
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/schedules/nightly/fire"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 201, "{v:#}");
    assert_eq!(v["task"]["schedule"], "nightly");
    assert!(v["task"]["slot"].is_null());
    let id = v["task"]["id"].as_str().unwrap().to_string();
    let done = wait_task(&url, &id, "succeeded");
    assert_eq!(done["history"][0]["stdout_tail"], "ops@example.com\n");
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/schedules/nightly/pause"),
        Some(TOKEN),
        None,
    );
    assert_eq!((code, v["paused"].as_bool()), (200, Some(true)));
    let (_, v) = call(
        "GET",
        &format!("{url}/api/v1/schedules/nightly"),
        None,
        None,
    );
    assert_eq!(v["schedule"]["paused"], true);
    assert!(v["schedule"]["next"].is_null());
    assert_eq!(
        v["history"].as_array().unwrap().len(),
        0,
        "a manual fire is not a slot"
    );
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/schedules/nightly/resume"),
        Some(TOKEN),
        None,
    );
    assert_eq!((code, v["paused"].as_bool()), (200, Some(false)));
    // An unknown name: 404, naming the known ones, on every schedule route.
    for (method, path) in [
        ("GET", "nope"),
        ("POST", "nope/fire"),
        ("POST", "nope/pause"),
        ("POST", "nope/resume"),
    ] {
        let (code, v) = call(
            method,
            &format!("{url}/api/v1/schedules/{path}"),
            Some(TOKEN),
            None,
        );
        assert_eq!(code, 404, "{method} {path}: {v:#}");
        assert_eq!(v["error"]["code"], "unknown_schedule");
        assert_eq!(
            v["error"]["message"],
            "unknown schedule `nope`; known schedules: nightly"
        );
        assert_eq!(v["error"]["known"], serde_json::json!(["nightly"]));
    }
    // Pause and resume need the token too; a wrong one is refused.
    for action in ["pause", "resume"] {
        let (code, v) = call(
            "POST",
            &format!("{url}/api/v1/schedules/nightly/{action}"),
            Some("wrong-token-0123456789abcdef"),
            None,
        );
        assert_eq!(code, 401, "{action}: {v:#}");
    }
    // Each change made is in the audit trail, newest first.
    let (_, v) = call("GET", &format!("{url}/api/v1/audit?limit=3"), None, None);
    let actions: Vec<&str> = v["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["schedule_resume", "schedule_pause", "schedule_fire"],
        "{v:#}"
    );
    assert_eq!(v["records"][2]["task"], serde_json::json!(id));
    assert_eq!(v["records"][2]["schedule"], "nightly");
}

#[test]
fn enqueue_read_list_and_metrics() {
    let e = env("", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/mail/tasks"),
        None,
        Some(r#"{"payload": {"to": "ann@example.com"}, "priority": 2}"#),
    );
    assert_eq!(code, 201, "{v:#}");
    assert_eq!(v["queue"], "mail");
    assert_eq!(v["priority"], 2);
    assert_eq!(v["existing"], false);
    let id = v["id"].as_str().expect("id").to_string();
    let done = wait_task(&url, &id, "succeeded");
    assert_eq!(done["history"][0]["stdout_tail"], "ann@example.com\n");

    // unique: the second enqueue returns the first (still waiting: delayed).
    let body = r#"{"unique": "k1", "delay": "1h"}"#;
    let (c1, first) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(body),
    );
    let (c2, second) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(body),
    );
    assert_eq!((c1, c2), (201, 200), "{first:#} {second:#}");
    assert_eq!(first["state"], "scheduled");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["existing"], true);
    let (c, at) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(r#"{"run_at": "2999-01-01T00:00:00Z"}"#),
    );
    assert_eq!(c, 201, "{at:#}");
    assert_eq!(at["state"], "scheduled");

    // list with filters and cursor pagination: 3 scheduled echo tasks + more.
    for _ in 0..3 {
        call(
            "POST",
            &format!("{url}/api/v1/queues/echo/tasks"),
            None,
            Some(r#"{"delay": "1h"}"#),
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{url}/api/v1/tasks?queue=echo&state=scheduled&limit=2&cursor={c}"),
            None => format!("{url}/api/v1/tasks?queue=echo&state=scheduled&limit=2"),
        };
        let (code, page) = call("GET", &q, None, None);
        assert_eq!(code, 200, "{page:#}");
        let tasks = page["tasks"].as_array().expect("tasks");
        assert!(tasks.len() <= 2);
        for t in tasks {
            assert_eq!(t["state"], "scheduled");
            seen.push(t["id"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (5, 5), "{seen:?}");
    let (code, err) = call(
        "GET",
        &format!("{url}/api/v1/tasks?state=sleeping"),
        None,
        None,
    );
    assert_eq!(code, 400);
    assert_eq!(err["error"]["code"], "bad_query");

    // queues with counts
    let (_, q) = call("GET", &format!("{url}/api/v1/queues"), None, None);
    let mail = q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "mail")
        .expect("mail")
        .clone();
    assert_eq!(mail["counts"]["succeeded"], 1);
    assert_eq!(mail["paused"], false);

    let (code, text) = call_text("GET", &format!("{url}/metrics"), None, None);
    assert_eq!(code, 200);
    for needle in [
        "taskd_tasks_enqueued_total{queue=\"mail\"} 1",
        "taskd_tasks_started_total{queue=\"mail\"} 1",
        "taskd_tasks_finished_total{queue=\"mail\",outcome=\"succeeded\"} 1",
        "taskd_attempt_duration_seconds_count{queue=\"mail\"} 1",
        "taskd_queue_depth{queue=\"echo\",state=\"scheduled\"} 5",
        "taskd_running{queue=\"mail\"} 0",
        "taskd_broker_errors_total 0",
        "taskd_process_resident_memory_bytes ",
        "taskd_process_open_fds ",
        "taskd_process_cpu_seconds_total ",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    let (code, h) = call("GET", &format!("{url}/healthz"), None, None);
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")));
}

#[test]
fn batches_are_atomic() {
    let e = env("", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    call(
        "POST",
        &format!("{url}/api/v1/queues/mail/pause"),
        Some(TOKEN),
        None,
    );
    let batch = format!("{url}/api/v1/queues/mail/tasks/batch");
    let (code, v) = call(
        "POST",
        &batch,
        None,
        Some(r#"[{"payload": {"to": "a"}}, {"payload": {"to": "b"}, "priority": 1}]"#),
    );
    assert_eq!(code, 201, "{v:#}");
    assert_eq!(v["enqueued"], 2);
    let lines = "{\"payload\": {\"to\": \"c\"}}\n\n{\"payload\": {\"to\": \"d\"}}\n{\"payload\": {\"to\": \"e\"}}\n";
    let (code, v) = call("POST", &batch, None, Some(lines));
    assert_eq!(code, 201, "{v:#}");
    assert_eq!(v["ids"].as_array().map(Vec::len), Some(3));
    // One bad item: nothing of the batch is enqueued, and the item is named.
    let (code, v) = call(
        "POST",
        &batch,
        None,
        Some(r#"[{"payload": {"to": "f"}}, {"payload": {}}]"#),
    );
    assert_eq!(code, 422, "{v:#}");
    assert_eq!(v["error"]["item"], 1);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("item 1"),
        "{v:#}"
    );
    let (code, v) = call(
        "POST",
        &batch,
        None,
        Some("{\"payload\": {\"to\": \"g\"}}\n{\"payload\": \n"),
    );
    assert_eq!(code, 400, "{v:#}");
    assert_eq!(v["error"]["line_of_batch"], 2);
    let (_, q) = call(
        "GET",
        &format!("{url}/api/v1/tasks?queue=mail&limit=100"),
        None,
        None,
    );
    assert_eq!(q["tasks"].as_array().map(Vec::len), Some(5), "{q:#}");
    // A big batch (far over the connection's 64 KiB header buffer) streams in whole.
    let big: String = (0..10_000)
        .map(|i| format!("{{\"payload\": {{\"to\": \"user{i}@example.com\"}}}}\n"))
        .collect();
    assert!(big.len() > 400_000);
    let (code, v) = call("POST", &batch, None, Some(&big));
    assert_eq!((code, v["enqueued"].as_u64()), (201, Some(10_000)), "{v:#}");
}

#[test]
fn errors_name_the_problem() {
    let e = env("max_payload = 1024", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/nope/tasks"),
        None,
        Some("{}"),
    );
    assert_eq!(code, 404);
    assert_eq!(v["error"]["code"], "unknown_queue");
    assert_eq!(v["error"]["known"], json!(["echo", "fail", "mail", "slow"]));
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some("{\"payload\": {\"a\": tru}}"),
    );
    assert_eq!(code, 400);
    assert_eq!(v["error"]["code"], "bad_json");
    assert_eq!(v["error"]["byte"], 21, "{v:#}"); // where serde_json noticed: after `tru`
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("line 1, column"),
        "{v:#}"
    );
    let big = format!("{{\"payload\": {{\"x\": \"{}\"}}}}", "a".repeat(2000));
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(&big),
    );
    assert_eq!(code, 413, "{v:#}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    let huge = format!("{{\"payload\": {{\"x\": \"{}\"}}}}", "a".repeat(200_000));
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(&huge),
    );
    assert_eq!(code, 413, "{v:#}");
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/mail/tasks"),
        None,
        Some(r#"{"payload": {"cc": 1}}"#),
    );
    assert_eq!(code, 422);
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("to"),
        "{v:#}"
    );
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(r#"{"delay": "soon"}"#),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (422, Some("invalid_task"))
    );
    let (code, v) = call("GET", &format!("{url}/api/v1/tasks/not-an-id"), None, None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (400, Some("bad_task_id"))
    );
    let missing = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20";
    let (code, v) = call("GET", &format!("{url}/api/v1/tasks/{missing}"), None, None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("task_not_found"))
    );
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/tasks/{missing}/retry"),
        None,
        None,
    );
    assert_eq!(code, 404, "{v:#}");
    let (code, v) = call("GET", &format!("{url}/api/v2/nothing"), None, None);
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("no_route")));
    let (code, v) = call("DELETE", &format!("{url}/api/v1/queues"), None, None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

/// Bodies that cannot become a task that runs: 422 `invalid_task` (docs/api.md), not a 201
/// for a task whose every attempt fails at spawn; JSON nested past the parser's depth is
/// malformed JSON (400 `bad_json`), not an invalid task.
#[test]
fn bodies_that_cannot_run_are_refused() {
    let e = env(
        "",
        "[queues.mail]\ncommand = [\"/bin/echo\", \"{to}\"]\n\n[queues.echo]\nshell = 'echo \"$TASKD_ARG_x\"'\n",
    );
    let d = e.daemon();
    let url = d.api_base();
    let post = |queue: &str, body: &str| {
        call(
            "POST",
            &format!("{url}/api/v1/queues/{queue}/tasks"),
            None,
            Some(body),
        )
    };
    let refused = |queue: &str, body: &str, code: u16, error: &str, words: &[&str]| {
        let (c, v) = post(queue, body);
        assert_eq!(
            (c, v["error"]["code"].as_str()),
            (code, Some(error)),
            "{body}: {v:#}"
        );
        let m = v["error"]["message"].as_str().unwrap_or("");
        for w in words {
            assert!(m.contains(w), "{body}: message lacks {w:?}: {m}");
        }
    };
    refused(
        "mail",
        r#"{"payload": {"to": "a"}, "args": ["x\u0000y"]}"#,
        422,
        "invalid_task",
        &["extra argument 1 holds a NUL byte"],
    );
    refused(
        "mail",
        r#"{"payload": {"to": "a\u0000b"}}"#,
        422,
        "invalid_task",
        &["NUL byte", "{to}"],
    );
    refused(
        "echo",
        r#"{"payload": {"x": "a\u0000b"}}"#,
        422,
        "invalid_task",
        &["payload field `x` holds a NUL byte", "TASKD_ARG_x"],
    );
    refused(
        "mail",
        r#"{"payload": {"to": "--output=/etc/x"}}"#,
        422,
        "invalid_task",
        &["starts with `-`", "allow_dash_values"],
    );
    refused(
        "mail",
        r#"{"payload": {"to": null}}"#,
        422,
        "invalid_task",
        &["payload field `to` is null"],
    );
    let deep = format!("{{\"payload\": {}1{}}}", "[".repeat(200), "]".repeat(200));
    refused("echo", &deep, 400, "bad_json", &["recursion limit"]);
    let (c, v) = call("GET", &format!("{url}/api/v1/tasks"), None, None);
    assert_eq!(c, 200, "{v:#}");
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(0), "{v:#}");
    let (c, v) = post("mail", r#"{"payload": {"to": "ann"}}"#);
    assert_eq!(c, 201, "{v:#}");
    let id = v["id"].as_str().expect("id");
    let done = wait_task(&url, id, "succeeded");
    assert_eq!(done["history"][0]["stdout_tail"], "ann\n");
}

#[test]
fn retry_cancel_pause_resume() {
    let e = env("", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/fail/tasks"),
        None,
        None,
    );
    let id = v["id"].as_str().expect("id").to_string();
    let failed = wait_task(&url, &id, "failed");
    assert_eq!(failed["history"][0]["stderr_tail"], "boom\n");
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/tasks/{id}/retry"),
        None,
        None,
    );
    assert_eq!(code, 200, "{v:#}");
    let again = wait_task(&url, &id, "failed");
    assert_eq!(again["history"].as_array().map(Vec::len), Some(2));
    // A task that is not failed cannot be retried.
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(r#"{"delay": "1h"}"#),
    );
    let waiting = v["id"].as_str().expect("id").to_string();
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/tasks/{waiting}/retry"),
        None,
        None,
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v:#}"
    );
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/tasks/{waiting}/cancel"),
        None,
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(v["outcome"], "cancelled");
    assert_eq!(v["task"]["state"], "cancelled");
    // A running task is asked to stop.
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/slow/tasks"),
        None,
        None,
    );
    let slow = v["id"].as_str().expect("id").to_string();
    wait_task(&url, &slow, "running");
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/tasks/{slow}/cancel"),
        None,
        None,
    );
    assert_eq!(v["outcome"], "requested", "{v:#}");
    wait_task(&url, &slow, "cancelled");

    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/pause"),
        None,
        None,
    );
    assert_eq!((code, v["paused"].as_bool()), (200, Some(true)));
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        None,
    );
    let held = v["id"].as_str().expect("id").to_string();
    let (_, q) = call("GET", &format!("{url}/api/v1/queues"), None, None);
    let echo = q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "echo")
        .expect("echo")
        .clone();
    assert_eq!(echo["paused"], true);
    let (code, _) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/resume"),
        None,
        None,
    );
    assert_eq!(code, 200);
    wait_task(&url, &held, "succeeded");
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/nope/pause"),
        None,
        None,
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("unknown_queue"))
    );
}

#[test]
fn tokens_guard_mutations_and_stay_secret() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let enqueue = format!("{url}/api/v1/queues/echo/tasks");
    let (code, v) = call("POST", &enqueue, None, None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("missing_token"))
    );
    let (code, v) = call("POST", &enqueue, Some("wrong-token-wrong-token"), None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("bad_token"))
    );
    for path in [
        "/api/v1/queues/echo/pause",
        "/api/v1/queues/echo/resume",
        "/api/v1/queues/echo/tasks/batch",
    ] {
        let (code, _) = call("POST", &format!("{url}{path}"), None, Some("[{}]"));
        assert_eq!(code, 401, "{path}");
    }
    let (code, v) = call("POST", &enqueue, Some(TOKEN), None);
    assert_eq!(code, 201, "{v:#}");
    let id = v["id"].as_str().expect("id");
    for path in ["retry", "cancel"] {
        let (code, _) = call(
            "POST",
            &format!("{url}/api/v1/tasks/{id}/{path}"),
            None,
            None,
        );
        assert_eq!(code, 401, "{path}");
    }
    // Reads on a loopback address need no token.
    let (code, _) = call("GET", &format!("{url}/api/v1/tasks/{id}"), None, None);
    assert_eq!(code, 200);
    // The token is never printed or logged.
    let check = e.run(&["check", "--json"]);
    let check_text = e.run(&["check"]);
    for out in [
        &check.stdout,
        &check.stderr,
        &check_text.stdout,
        &check_text.stderr,
    ] {
        assert!(!String::from_utf8_lossy(out).contains(TOKEN));
    }
    assert!(!d.log_text().contains(TOKEN), "{}", d.log_text());

    // token_file works the same.
    let file = e.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("token file");
    // Readable by the daemon's user only: `start` refuses a token file others can read.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 600");
    let e2 = env(&format!("token_file = \"{}\"", file.display()), QUEUES);
    let d2 = e2.daemon();
    let url2 = d2.api_base();
    let (code, _) = call(
        "POST",
        &format!("{url2}/api/v1/queues/echo/tasks"),
        None,
        None,
    );
    assert_eq!(code, 401);
    let (code, _) = call(
        "POST",
        &format!("{url2}/api/v1/queues/echo/tasks"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 201);
}

/// The authentication scheme is case-insensitive (RFC 9110): `bearer TOKEN` and
/// `BEARER TOKEN` are `Bearer TOKEN`; a wrong token is still refused.
#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let post = |auth: &str| match ureq::post(&format!("{url}/api/v1/queues/echo/tasks"))
        .timeout(Duration::from_secs(20))
        .set("Authorization", auth)
        .send_string("{}")
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(post(&format!("{scheme} {TOKEN}")), 201, "{scheme}");
    }
    assert_eq!(post(&format!("bearer {TOKEN}x")), 401);
    assert_eq!(post(&format!("Basic {TOKEN}")), 401);
    assert_eq!(post(&format!("bearer{TOKEN}")), 401);
}

#[test]
fn non_loopback_listen_needs_a_token() {
    let e = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"0.0.0.0:0\"\n\n[queues.a]\nshell = \"true\"\n",
    );
    let out = e.run(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("taskd.toml:3:10: error: taskd.listen:"),
        "{err}"
    );
    assert!(err.contains("token_file"), "{err}");
    let out = e.run(&["start"]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let short = Env::raw("[taskd]\nstate_dir = \"state\"\ntoken = \"short\"\n");
    let out = short.run(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("taskd.token") && !err.contains("\"short\""),
        "{err}"
    );
    // With a token a non-loopback listen starts, and reads need the token too.
    let ok = Env::raw(&format!("[taskd]\nstate_dir = \"state\"\nlisten = \"0.0.0.0:0\"\ntoken = \"{TOKEN}\"\n\n[queues.a]\nshell = \"true\"\n\n[schedules.nightly]\nqueue = \"a\"\ncron = \"0 3 * * *\"\n"));
    let d = ok.daemon();
    let url = d.api_base().replace("0.0.0.0", "127.0.0.1");
    let (code, _) = call("GET", &format!("{url}/api/v1/queues"), None, None);
    assert_eq!(code, 401);
    let (code, _) = call("GET", &format!("{url}/api/v1/queues"), Some(TOKEN), None);
    assert_eq!(code, 200);
    let (code, _) = call("GET", &format!("{url}/healthz"), None, None);
    assert_eq!(code, 200);
    // The schedule routes too: every one refuses a request without the token, reads
    // included, and answers with it.
    for (method, path, with_token) in [
        ("GET", "", 200),
        ("GET", "/nightly", 200),
        ("POST", "/nightly/pause", 200),
        ("POST", "/nightly/resume", 200),
        ("POST", "/nightly/fire", 201),
    ] {
        let route = format!("{url}/api/v1/schedules{path}");
        let (code, v) = call(method, &route, None, None);
        assert_eq!(code, 401, "{method} {route} without the token: {v:#}");
        let (code, v) = call(method, &route, Some(TOKEN), None);
        assert_eq!(code, with_token, "{method} {route} with the token: {v:#}");
    }
    let (code, v) = call("GET", &format!("{url}/api/v1/schedules"), Some(TOKEN), None);
    assert_eq!(code, 200);
    assert_eq!(v["schedules"][0]["schedule"], "nightly", "{v:#}");
    assert_eq!(v["schedules"][0]["paused"], false, "{v:#}");
    let (code, v) = call(
        "GET",
        &format!("{url}/api/v1/tasks?queue=a"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200);
    let tasks = v["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 1, "the one fire made one task: {v:#}");
    assert_eq!(tasks[0]["schedule"], "nightly", "{v:#}");
}

/// Start a task of the `slow` queue, wait until it runs, send SIGTERM and wait until the
/// daemon drains behind it (`/healthz` answers 503): its answer's body.
fn drain_behind_a_running_task(d: &common::Daemon) -> Value {
    let url = d.api_base();
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/slow/tasks"),
        None,
        None,
    );
    let id = v["id"].as_str().expect("id").to_string();
    wait_task(&url, &id, "running");
    d.signal(SIGTERM);
    let mut last = (0, Value::Null);
    let draining = poll(Duration::from_secs(10), || {
        last = call("GET", &format!("{url}/healthz"), None, None);
        last.0 == 503
    });
    assert!(
        draining,
        "healthz did not turn 503 while draining: {last:?}"
    );
    last.1
}

#[test]
fn draining_answers_503() {
    let e = env("", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let health = drain_behind_a_running_task(&d);
    assert_eq!(health["error"]["code"], "draining");
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        None,
    );
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("draining")));
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn openapi_matches_the_routes() {
    let e = env("", &format!("{QUEUES}\n{NIGHTLY}"));
    let d = e.daemon();
    let url = d.api_base();
    let (code, doc) = call("GET", &format!("{url}/api/v1/openapi.json"), None, None);
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    let (_, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/echo/tasks"),
        None,
        Some(r#"{"delay": "1h"}"#),
    );
    let id = v["id"].as_str().expect("id").to_string();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 13, "{paths:?}");
    // The schedule routes are documented, each with its method.
    for (path, method) in [
        ("/api/v1/schedules", "get"),
        ("/api/v1/schedules/{name}", "get"),
        ("/api/v1/schedules/{name}/fire", "post"),
        ("/api/v1/schedules/{name}/pause", "post"),
        ("/api/v1/schedules/{name}/resume", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the OpenAPI document"
        );
    }
    for (path, ops) in paths {
        for method in ops.as_object().expect("ops").keys() {
            let concrete = path
                .replace("{queue}", "echo")
                .replace("{id}", &id)
                .replace("{name}", "nightly");
            if path.ends_with("/output") {
                // An output stream: its answer begins at once; a queue's never ends.
                let r = ureq::get(&format!("{url}{concrete}"))
                    .timeout(Duration::from_secs(20))
                    .call()
                    .unwrap_or_else(|e| panic!("documented GET {path}: {e}"));
                assert_eq!(r.status(), 200, "documented GET {path}");
                assert_eq!(r.content_type(), "text/event-stream", "GET {path}");
                continue;
            }
            let body = if path.ends_with("/batch") {
                Some("[{}]")
            } else if path.ends_with("/bulk") {
                Some(r#"{"action": "cancel", "filter": {"queue": "echo"}, "dry_run": true}"#)
            } else {
                None
            };
            let (code, text) = call_text(
                &method.to_uppercase(),
                &format!("{url}{concrete}"),
                None,
                body,
            );
            assert!(
                code < 400 || code == 409,
                "documented {method} {path} answered {code}: {text}"
            );
        }
    }
}

#[test]
fn cli_submit_and_status_through_the_api() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    // A host without the config: -c points nowhere.
    let elsewhere = Env::raw("");
    let run = |args: &[&str], token: Option<&str>| {
        let mut c = std::process::Command::new(common::BIN);
        c.args(args)
            .env_remove("TASKD_CONFIG")
            .current_dir(elsewhere.path());
        c.env_remove("TASKD_TOKEN");
        if let Some(t) = token {
            c.env("TASKD_TOKEN", t);
        }
        c.output().expect("run taskd")
    };
    let out = run(
        &[
            "submit",
            "--server",
            &url,
            "mail",
            r#"{"to": "bob"}"#,
            "--wait",
        ],
        Some(TOKEN),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(wait_task(&url, &id, "succeeded")["queue"], "mail");
    let out = run(
        &["submit", "--server", &url, "mail", r#"{"to": "bob"}"#],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "no token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["submit", "--server", &url, "nope", "{}"], Some(TOKEN));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known queues: echo, fail, mail, slow"));
    let out = run(
        &["submit", "--server", &url, "mail", "{\"to\": "],
        Some(TOKEN),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed JSON payload at byte"));
    let batch = elsewhere.path().join("batch.jsonl");
    std::fs::write(&batch, "{\"to\": \"a\"}\n{\"to\": \"b\"}\n").expect("batch");
    let out = run(
        &[
            "submit",
            "--server",
            &url,
            "mail",
            "--batch",
            batch.to_str().expect("utf8"),
        ],
        Some(TOKEN),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("enqueued 2 tasks on mail"));
    let out = run(&["status", "--server", &url], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mail") && text.contains("slow"), "{text}");
    let out = run(&["status", "--server", &url, "--json"], None);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["queues"].as_array().is_some_and(|q| q.len() == 4),
        "{v:#}"
    );
    let out = run(&["status", "--server", "http://127.0.0.1:1"], None);
    assert_eq!(out.status.code(), Some(3));
}

/// The keys of a JSON object, to compare two documents' shapes.
fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v:#}"))
        .keys()
        .cloned()
        .collect()
}

/// `--json` prints the same documents with `--server URL` as from the broker: the API and
/// the CLI serialize the same shapes (`status --json` adding only what the local machine
/// knows), so a field one side has the other has too.
#[test]
fn json_is_the_same_document_locally_and_through_the_api() {
    let e = env(
        "",
        "[queues.mail]\ncommand = [\"/bin/echo\", \"{to}\"]\nconcurrency = 3\n\n[queues.pool]\nconcurrency = 2\nworker = [\"sh\", \"-c\", \"echo '{\\\"type\\\":\\\"ready\\\",\\\"protocol\\\":1}' >&4; while read -r l <&3; do :; done\"]\nstart_secs = \"0s\"\n",
    );
    let d = e.daemon();
    let url = d.api_base();
    let json = |args: &[&str]| -> Value {
        let text = e.ok(args);
        serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{args:?}: not JSON ({err}):\n{text}"))
    };
    let mut local = Value::Null;
    let ok = poll(Duration::from_secs(30), || {
        local = json(&["status", "--json"]);
        local["workers"].as_array().is_some_and(|ws| {
            ws.len() == 2
                && ws
                    .iter()
                    .all(|w| w["state"] == "running" && w["pid"].is_i64())
        })
    });
    assert!(ok, "the workers did not start: {local:#}");
    let remote = json(&["status", "--server", &url, "--json"]);

    // status: the API's document is the local one without `daemon`, `state_dir` and
    // `store` (the size `status` reads from the store itself; the API gives it as the
    // metric taskd_store_bytes).
    let mut want = keys(&local);
    want.retain(|k| k != "daemon" && k != "state_dir" && k != "store");
    assert_eq!(keys(&remote), want, "status --server --json: {remote:#}");
    assert_eq!(remote["queues"], local["queues"], "the queues");
    let mail = local["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue"] == "mail"))
        .expect("mail is listed");
    assert_eq!(
        mail["concurrency"], 3,
        "status --json gives each queue's slots: {mail:#}"
    );
    let (lw, rw) = (
        local["workers"].as_array().expect("workers"),
        remote["workers"].as_array().expect("workers"),
    );
    assert_eq!(lw.len(), rw.len());
    for (l, r) in lw.iter().zip(rw) {
        assert_eq!(keys(l), keys(r), "a worker's fields");
        assert!(
            r["uptime_s"].is_i64(),
            "the API's workers carry uptime_s: {r:#}"
        );
        for k in ["queue", "slot", "pid", "state", "started_ms", "tasks_done"] {
            assert_eq!(l[k], r[k], "worker {k}");
        }
    }

    // submit: `{"existing", "task"}` either way; the task record is the store's.
    let first = json(&[
        "submit",
        "mail",
        r#"{"to":"a"}"#,
        "--delay",
        "1h",
        "--unique",
        "k",
        "--json",
    ]);
    assert_eq!(keys(&first), ["existing", "task"], "{first:#}");
    assert_eq!(first["existing"], false);
    let again = json(&[
        "submit",
        "mail",
        r#"{"to":"a"}"#,
        "--delay",
        "1h",
        "--unique",
        "k",
        "--json",
    ]);
    let again_remote = json(&[
        "submit",
        "--server",
        &url,
        "mail",
        r#"{"to":"a"}"#,
        "--delay",
        "1h",
        "--unique",
        "k",
        "--json",
    ]);
    assert_eq!(again["existing"], true);
    assert_eq!(again_remote, again, "submit --server --json");
    assert_eq!(keys(&first["task"]), keys(&again_remote["task"]));

    // submit --batch: `{"enqueued", "existing", "ids"}` either way.
    let batch = e.path().join("batch.jsonl");
    std::fs::write(&batch, "{\"to\": \"b\"}\n{\"to\": \"c\"}\n").expect("write the batch");
    let file = batch.to_str().expect("a UTF-8 path");
    let local = json(&["submit", "mail", "--delay", "1h", "--batch", file, "--json"]);
    let remote = json(&[
        "submit", "--server", &url, "mail", "--delay", "1h", "--batch", file, "--json",
    ]);
    assert_eq!(keys(&local), ["enqueued", "existing", "ids"], "{local:#}");
    assert_eq!(keys(&remote), keys(&local), "{remote:#}");
    for v in [&local, &remote] {
        assert_eq!(
            (v["enqueued"].as_u64(), v["existing"].as_u64()),
            (Some(2), Some(0)),
            "{v:#}"
        );
        assert_eq!(v["ids"].as_array().map(Vec::len), Some(2));
    }
}

// ----- the dashboard in a real browser ---------------------------------------------------

#[test]
fn dashboard_in_a_browser() {
    let Some(chromium) = find_chromium() else {
        common::skip::skip("chromium is not installed", "apt-get install -y chromium");
        return;
    };
    let dir = tempfile::tempdir().expect("marker dir");
    let marker = dir.path().join("fixed");
    let queues = format!(
        "{QUEUES}\n[queues.reports]\nshell = \"if [ -e {m} ]; then echo report ready; else touch {m}; echo 'cannot reach db: connection refused' >&2; exit 3; fi\"\nmax_attempts = 1\n\n[queues.broken]\nworker = [\"python3\", \"-c\", \"import nosuchmodule_taskd_test\"]\nstart_retries = 1\n",
        m = marker.display()
    );
    let e = env(&format!("token = \"{TOKEN}\""), &queues);
    let d = e.daemon();
    let url = d.api_base();
    let post = |path: &str, body: Option<&str>| {
        let (code, v) = call("POST", &format!("{url}{path}"), Some(TOKEN), body);
        assert!(code < 300, "{path}: {v:#}");
        v
    };
    for to in ["ann@example.com", "bob@example.com", "cy@example.com"] {
        post(
            "/api/v1/queues/mail/tasks",
            Some(&json!({ "payload": { "to": to } }).to_string()),
        );
    }
    post("/api/v1/queues/fail/tasks", None);
    let slow = post("/api/v1/queues/slow/tasks", None)["id"]
        .as_str()
        .expect("id")
        .to_string();
    let id = post(
        "/api/v1/queues/reports/tasks",
        Some(r#"{"payload": {"month": "2026-11"}}"#),
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_task(&url, &id, "failed");
    wait_task(&url, &slow, "running");

    let mut b = Browser::open(&chromium, &format!("{url}/#task/{id}"));
    b.wait_for(
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'failed'",
        "the failed task",
    );
    b.wait_for(
        "document.body.innerText.includes('cannot reach db: connection refused')",
        "the attempt's stderr",
    );
    // Without the token the action is refused, and says why.
    b.eval("document.querySelector('button[data-action=retry]').click(); true");
    b.wait_for(
        "document.querySelector('#flash').textContent.includes('retry') && document.querySelector('#flash').textContent.includes('failed')",
        "the refused retry",
    );
    assert_eq!(wait_task(&url, &id, "failed")["attempts"], 1);
    b.eval(&format!(
        "const t = document.querySelector('#token'); t.value = '{TOKEN}'; t.dispatchEvent(new Event('change')); true"
    ));
    b.wait_for(
        "!!document.querySelector('button[data-action=retry]')",
        "the retry button",
    );
    b.eval("document.querySelector('button[data-action=retry]').click(); true");
    wait_task(&url, &id, "succeeded");
    b.wait_for(
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'succeeded'",
        "the retried task succeed",
    );
    b.wait_for(
        "document.querySelectorAll('.attempt').length === 2",
        "both attempts",
    );

    // The overview: queues, running task with its elapsed time, the failure; pause a queue.
    b.eval("location.hash = ''; true");
    b.wait_for(
        "!!document.querySelector('#queues tr[data-queue=mail]')",
        "the queues",
    );
    b.wait_for(
        "document.querySelector('#queues tr[data-queue=mail] [data-count=succeeded]').textContent === '3'",
        "mail's counts",
    );
    b.wait_for(
        &format!(
            "document.querySelector('#running').innerText.includes('{}')",
            &slow[slow.len() - 8..]
        ),
        "the running task",
    );
    b.wait_for(
        "document.querySelector('#failures').innerText.includes('exit code 3')",
        "the failure",
    );
    // A FATAL worker, with what it wrote on stderr before it died.
    b.wait_for(
        "document.querySelector('#workers tr[data-worker=\"broken/0\"] [data-worker-state]')?.dataset.workerState === 'fatal'",
        "the FATAL worker",
    );
    b.wait_for(
        "document.querySelector('#workers tr[data-worker=\"broken/0\"] .worker-stderr')?.textContent.includes(\"No module named 'nosuchmodule_taskd_test'\")",
        "the worker's last stderr lines",
    );
    b.eval("document.querySelector('button[data-action=pause][data-queue=mail]').click(); true");
    b.wait_for(
        "!!document.querySelector('#queues tr[data-queue=mail] [data-paused]')",
        "mail paused",
    );
    let (_, q) = call("GET", &format!("{url}/api/v1/queues"), None, None);
    assert!(q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .any(|q| q["queue"] == "mail" && q["paused"] == true));
    // The workers panel's restart button (a <button>: focusable, Enter/Space press it)
    // POSTs the queue's restart and shows the daemon's answer.
    assert_eq!(
        b.eval("document.querySelector('button[data-action=restart][data-queue=broken]')?.tagName"),
        json!("BUTTON")
    );
    b.eval(
        "document.querySelector('button[data-action=restart][data-queue=broken]').click(); true",
    );
    b.wait_for(
        "document.querySelector('#flash').textContent === 'queue broken: restarting 1 worker one at a time, each after its current task'",
        "the restart's answer",
    );

    b.screenshot(&e.path().join("dashboard.png"));
}

#[test]
fn reload_swaps_the_token_and_limits_hold() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let enqueue = format!("{url}/api/v1/queues/echo/tasks");
    let fresh = "another-token-9876543210";
    std::fs::write(
        &e.config,
        format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\ntoken = \"{fresh}\"\n\n{QUEUES}\n"),
    )
    .expect("rewrite");
    let out = e.run(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("API token `default` changed"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(fresh));
    let (code, _) = call("POST", &enqueue, Some(TOKEN), None);
    assert_eq!(code, 401, "the old token is refused after a reload");
    let (code, _) = call("POST", &enqueue, Some(fresh), None);
    assert_eq!(code, 201);

    // Too many header lines: refused before any handler (431), and the daemon lives on.
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-Junk-{i}: {i}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Garbage instead of HTTP: the connection is dropped, nothing else happens.
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"\x00\xff\xfe garbage\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let (code, _) = call("GET", &format!("{url}/healthz"), None, None);
    assert_eq!(code, 200);
}

/// A raw HTTP/1.1 request (for headers a client library sets itself); the status line.
fn raw(url: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(url.trim_start_matches("http://")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn web_pages_cannot_drive_the_api() {
    let e = env("", QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let host = url.trim_start_matches("http://").to_string();
    let post = |origin: &str, host: &str| {
        raw(
            &url,
            &format!("POST /api/v1/queues/echo/tasks HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        )
    };
    let a = post("https://evil.example", &host);
    assert!(
        a.starts_with("HTTP/1.1 403") && a.contains("cross_origin"),
        "{a}"
    );
    let a = post(&format!("http://{host}"), &host);
    assert!(
        a.starts_with("HTTP/1.1 201"),
        "the dashboard's own origin: {a}"
    );
    let port = host.rsplit(':').next().expect("port");
    let a = post(
        &format!("http://localhost:{port}"),
        &format!("localhost:{port}"),
    );
    assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    // DNS rebinding: a foreign name pointing at 127.0.0.1.
    let a = raw(
        &url,
        "GET /api/v1/tasks HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
    );
    assert!(
        a.starts_with("HTTP/1.1 403") && a.contains("bad_host"),
        "{a}"
    );
}

#[test]
fn a_taken_address_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let e = Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"{addr}\"\n\n[queues.a]\nshell = \"true\"\n"
    ));
    let out = e.run(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("failed to listen on {addr} (`listen` in [taskd])")),
        "{err}"
    );
}

/// `GET /api/v1/tasks` filters on the server (state, queue, time range, id, unique key,
/// payload field) and pages by cursor; `POST /api/v1/tasks/bulk` counts first (dry run),
/// refuses when more match than were confirmed, then retries or cancels what matches;
/// `GET /api/v1/stats` buckets the finished attempts.
#[test]
fn list_filters_bulk_and_stats() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let post = |path: &str, body: &Value| {
        call(
            "POST",
            &format!("{url}{path}"),
            Some(TOKEN),
            Some(&body.to_string()),
        )
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let (c, v) = post(
            "/api/v1/queues/mail/tasks",
            &json!({ "payload": { "to": format!("u{i}@x"), "user": { "id": i } }, "unique": format!("k{i}") }),
        );
        assert_eq!(c, 201, "{v:#}");
        ids.push(v["id"].as_str().expect("id").to_string());
    }
    let mut fails = Vec::new();
    for _ in 0..3 {
        let (_, v) = post("/api/v1/queues/fail/tasks", &json!({}));
        fails.push(v["id"].as_str().expect("id").to_string());
    }
    let slow: Vec<String> = (0..2)
        .map(|_| {
            post("/api/v1/queues/slow/tasks", &json!({ "delay": "1h" })).1["id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    for id in &ids {
        wait_task(&url, id, "succeeded");
    }
    for id in &fails {
        wait_task(&url, id, "failed");
    }
    let list = |q: &str| {
        let (c, v) = call("GET", &format!("{url}/api/v1/tasks?{q}"), None, None);
        assert_eq!(c, 200, "{q}: {v:#}");
        v["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["id"].as_str().expect("id").to_string())
            .collect::<Vec<_>>()
    };
    let newest_first = |v: &[String]| v.iter().rev().cloned().collect::<Vec<_>>();
    assert_eq!(list("queue=mail&state=succeeded"), newest_first(&ids));
    assert_eq!(list("payload=user.id%3D3"), vec![ids[3].clone()]);
    assert_eq!(
        list("payload=payload.to%20%3D%20u1%40x"),
        vec![ids[1].clone()]
    );
    assert_eq!(list("unique_key=k2"), vec![ids[2].clone()]);
    assert_eq!(list(&format!("id={}", fails[1])), vec![fails[1].clone()]);
    assert_eq!(list("state=scheduled"), newest_first(&slow));
    let created: i64 = call("GET", &format!("{url}/api/v1/tasks/{}", ids[2]), None, None).1
        ["created_at"]
        .as_i64()
        .expect("created_at");
    assert_eq!(
        list(&format!("queue=mail&since={created}&until={}", created + 1)),
        vec![ids[2].clone()]
    );
    assert!(list(&format!("since={}", created + 3_600_000)).is_empty());
    // Pages by cursor, across the filter.
    let (_, p1) = call(
        "GET",
        &format!("{url}/api/v1/tasks?queue=mail&limit=2"),
        None,
        None,
    );
    let cursor = p1["next_cursor"].as_str().expect("a next page").to_string();
    assert_eq!(cursor, ids[3]);
    let (_, p2) = call(
        "GET",
        &format!("{url}/api/v1/tasks?queue=mail&limit=2&cursor={cursor}"),
        None,
        None,
    );
    let p2_ids: Vec<&str> = p2["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(p2_ids, vec![ids[2].as_str(), ids[1].as_str()]);
    let (_, p3) = call(
        "GET",
        &format!("{url}/api/v1/tasks?queue=mail&limit=2&cursor={}", ids[1]),
        None,
        None,
    );
    assert_eq!(p3["tasks"].as_array().map(Vec::len), Some(1));
    assert_eq!(p3["next_cursor"], Value::Null);
    // Errors name the parameter.
    for (q, code, what) in [
        ("payload=nonsense", "bad_query", "payload"),
        ("state=done", "bad_query", "state"),
        ("id=42", "bad_query", "id"),
        ("since=yesterday", "bad_query", "since"),
        ("colour=red", "bad_query", "colour"),
    ] {
        let (c, v) = call("GET", &format!("{url}/api/v1/tasks?{q}"), None, None);
        assert_eq!(
            (c, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{q}: {v:#}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(what)),
            "{q}: {v:#}"
        );
    }
    let (c, v) = call(
        "GET",
        &format!("{url}/api/v1/tasks?cursor={}", common_uuid()),
        None,
        None,
    );
    assert_eq!(
        (c, v["error"]["code"].as_str()),
        (400, Some("bad_cursor")),
        "{v:#}"
    );

    // Bulk: the token is needed; a dry run counts and changes nothing.
    let bulk = json!({ "action": "retry", "filter": { "queue": "fail" }, "dry_run": true });
    let (c, _) = call(
        "POST",
        &format!("{url}/api/v1/tasks/bulk"),
        None,
        Some(&bulk.to_string()),
    );
    assert_eq!(c, 401);
    let (c, v) = post("/api/v1/tasks/bulk", &bulk);
    assert_eq!(c, 200, "{v:#}");
    assert_eq!(
        (
            v["matched"].as_u64(),
            v["done"].as_u64(),
            v["dry_run"].as_bool()
        ),
        (Some(3), Some(0), Some(true))
    );
    assert_eq!(list("queue=fail&state=failed").len(), 3);
    // A retry of every queue matches only failed and cancelled tasks.
    let (_, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "retry", "dry_run": true }),
    );
    assert_eq!(v["matched"], 3);
    // More match than were confirmed: refused, with the new count.
    let (c, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "retry", "filter": { "queue": "fail" }, "expect": 2 }),
    );
    assert_eq!(
        (
            c,
            v["error"]["code"].as_str(),
            v["error"]["matched"].as_u64()
        ),
        (409, Some("count_changed"), Some(3)),
        "{v:#}"
    );
    let (c, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "retry", "filter": { "queue": "fail" }, "expect": 3 }),
    );
    assert_eq!(c, 200, "{v:#}");
    assert_eq!(
        (
            v["matched"].as_u64(),
            v["done"].as_u64(),
            v["skipped"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{v:#}"
    );
    for id in &fails {
        let mut t = Value::Null;
        assert!(
            poll(Duration::from_secs(20), || {
                t = call("GET", &format!("{url}/api/v1/tasks/{id}"), None, None).1;
                t["state"] == "failed" && t["history"].as_array().map(Vec::len) == Some(2)
            }),
            "{id} was not retried: {t:#}"
        );
    }
    // Cancel by filter: the two scheduled tasks of slow.
    let (_, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "cancel", "filter": { "queue": "slow", "state": "scheduled" }, "dry_run": true }),
    );
    assert_eq!(v["matched"], 2);
    let (c, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "cancel", "filter": { "queue": "slow", "state": "scheduled" }, "expect": 2 }),
    );
    assert_eq!((c, v["done"].as_u64()), (200, Some(2)), "{v:#}");
    assert_eq!(list("queue=slow&state=cancelled"), newest_first(&slow));
    // A cancel of succeeded tasks matches none.
    let (_, v) = post(
        "/api/v1/tasks/bulk",
        &json!({ "action": "cancel", "filter": { "state": "succeeded" }, "dry_run": true }),
    );
    assert_eq!(v["matched"], 0);
    for body in [
        json!({ "action": "delete" }),
        json!({ "action": "cancel", "filter": { "state": "nope" } }),
        json!({ "action": "cancel", "filter": { "colour": "red" } }),
    ] {
        let (c, v) = post("/api/v1/tasks/bulk", &body);
        assert_eq!(c, 400, "{body}: {v:#}");
    }

    // Stats: 5 succeeded and 6 failed attempts in the last hour, counted by the daemon and
    // stored in the broker (written every few seconds); bucketed by minute.
    let mut s = Value::Null;
    assert!(
        poll(Duration::from_secs(20), || {
            s = call("GET", &format!("{url}/api/v1/stats?window=1h"), None, None).1;
            s["total"]["succeeded"] == 5 && s["total"]["failed"] == 6
        }),
        "{s:#}"
    );
    assert_eq!(s["bucket_s"], 60);
    assert_eq!(s["buckets"].as_array().map(Vec::len), Some(60));
    assert_eq!(
        s["to"].as_i64().zip(s["from"].as_i64()).map(|(t, f)| t - f),
        Some(3_600_000)
    );
    let sum: u64 = s["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b["succeeded"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(sum, 5);
    assert!(
        s["total"]["runs"].as_u64() == Some(11) && s["total"]["run_ms_mean"].as_u64().is_some(),
        "{s:#}"
    );
    let (_, day) = call(
        "GET",
        &format!("{url}/api/v1/stats?window=24h&queue=fail"),
        None,
        None,
    );
    assert_eq!(
        (
            day["bucket_s"].as_u64(),
            day["buckets"].as_array().map(Vec::len)
        ),
        (Some(900), Some(96))
    );
    assert_eq!(
        (
            day["total"]["failed"].as_u64(),
            day["total"]["succeeded"].as_u64()
        ),
        (Some(6), Some(0))
    );
    let (c, v) = call("GET", &format!("{url}/api/v1/stats?window=7d"), None, None);
    assert_eq!((c, v["error"]["code"].as_str()), (400, Some("bad_query")));

    // The counters live in the store: a restarted daemon shows the same numbers.
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    let d = e.daemon();
    let url = d.api_base();
    let (_, again) = call("GET", &format!("{url}/api/v1/stats?window=1h"), None, None);
    assert_eq!(
        (
            again["total"]["succeeded"].as_u64(),
            again["total"]["failed"].as_u64()
        ),
        (Some(5), Some(6)),
        "{again:#}"
    );
}

fn common_uuid() -> String {
    "01a21d6e-0b22-76f5-b0f6-6090fb98b41d".to_string()
}

/// One HTTP/1.1 answer: its status line, its headers (in lower case, one a line) and body.
#[derive(Debug)]
struct Answer {
    status: String,
    headers: String,
    body: String,
}

/// A kept-alive connection to the daemon, written to by hand (to send a request's head and
/// its body in two writes, as Python's http.client does).
struct Kept {
    s: std::net::TcpStream,
    r: std::io::BufReader<std::net::TcpStream>,
}

impl Kept {
    fn open(url: &str) -> Kept {
        let s = std::net::TcpStream::connect(url.trim_start_matches("http://")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = std::io::BufReader::new(s.try_clone().expect("clone"));
        Kept { s, r }
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        (&self.s).write_all(bytes).expect("write");
    }

    /// The next answer; None when the daemon closed the connection instead.
    fn answer(&mut self) -> Option<Answer> {
        use std::io::{BufRead, Read};
        let mut status = String::new();
        if self.r.read_line(&mut status).ok()? == 0 {
            return None;
        }
        let mut headers = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().ok()?;
            }
            headers.push_str(lower.trim_end());
            headers.push('\n');
        }
        let mut body = vec![0; length];
        self.r.read_exact(&mut body).ok()?;
        Some(Answer {
            status: status.trim_end().to_string(),
            headers,
            body: String::from_utf8_lossy(&body).into(),
        })
    }

    /// Sends `head` (a request line and its headers, without `Content-Length` or the blank
    /// line), checks that nothing is answered while its body is still to come, then sends
    /// `body`: the answer.
    fn answer_after_body(&mut self, head: &str, body: &str) -> Answer {
        self.write(format!("{head}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        // A wait for an absence: on a daemon that answers early the answer is there within it.
        self.s
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        match self.s.peek(&mut byte) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("`{head}` was answered before its body was sent: {other:?}"),
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        self.write(body.as_bytes());
        self.answer()
            .unwrap_or_else(|| panic!("`{head}`: the daemon closed the connection unanswered"))
    }

    /// `GET path` on this connection: the daemon kept it and goes on serving.
    fn still_serves(&mut self, path: &str, after: &str) -> Answer {
        self.write(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
        self.answer()
            .unwrap_or_else(|| panic!("the daemon closed the connection after `{after}`"))
    }
}

#[test]
fn a_submit_to_an_unknown_queue_keeps_the_connection() {
    // Answered before its body arrived, the refusal closed the connection: a client that
    // sends the body in a second write (Python's http.client) then got a broken pipe instead
    // of the 404. The daemon now reads the body first, answers, and keeps the connection.
    let e = env("", QUEUES);
    let d = e.daemon();
    let mut c = Kept::open(&d.api_base());
    for path in [
        "/api/v1/queues/no-such-queue/tasks",
        "/api/v1/queues/no-such-queue/tasks/batch",
    ] {
        let head =
            format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json");
        let a = c.answer_after_body(&head, "{\"payload\": {\"n\": 1}}");
        assert!(a.status.starts_with("HTTP/1.1 404"), "{a:?}");
        assert!(a.body.contains("unknown_queue"), "{a:?}");
        let a = c.still_serves("/healthz", &head);
        assert!(a.status.starts_with("HTTP/1.1 200"), "{a:?}");
    }
}

#[test]
fn refusals_before_the_body_keep_the_connection() {
    // The guard (token, host, origin) and the routes that read no body answered before the
    // body arrived, and the connection was closed under a client still sending it.
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let host = url.trim_start_matches("http://").to_string();
    let submit = "POST /api/v1/queues/echo/tasks HTTP/1.1\r\nContent-Type: application/json";
    let token = format!("Authorization: Bearer {TOKEN}");
    let cases = [
        (format!("{submit}\r\nHost: {host}"), "401", "missing_token"),
        (
            format!("{submit}\r\nHost: {host}\r\nAuthorization: Bearer wrong-token-0123456789"),
            "401",
            "bad_token",
        ),
        (
            format!("{submit}\r\nHost: {host}\r\n{token}\r\nOrigin: https://evil.example"),
            "403",
            "cross_origin",
        ),
        (
            format!("{submit}\r\nHost: evil.example\r\n{token}"),
            "403",
            "bad_host",
        ),
        (
            format!("POST /api/v1/nowhere HTTP/1.1\r\nHost: {host}\r\n{token}"),
            "404",
            "no_route",
        ),
        (
            format!("POST /healthz HTTP/1.1\r\nHost: {host}"),
            "405",
            "method_not_allowed",
        ),
        (
            format!("POST /api/v1/tasks/not-an-id/retry HTTP/1.1\r\nHost: {host}\r\n{token}"),
            "400",
            "bad_task_id",
        ),
    ];
    let mut c = Kept::open(&url);
    for (head, status, code) in &cases {
        let a = c.answer_after_body(head, "{\"payload\": {\"to\": \"a@example.com\"}}");
        assert!(
            a.status.starts_with(&format!("HTTP/1.1 {status}")),
            "{head}: {a:?}"
        );
        assert!(a.body.contains(code), "{head}: {a:?}");
        assert!(!a.headers.contains("connection: close"), "{head}: {a:?}");
        let a = c.still_serves("/healthz", head);
        assert!(a.status.starts_with("HTTP/1.1 200"), "{a:?}");
    }
    // Nothing was enqueued by any of them.
    let (_, v) = call("GET", &format!("{url}/api/v1/tasks"), None, None);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(0), "{v:#}");
}

#[test]
fn a_draining_daemon_reads_the_body_before_its_503() {
    // A long grace: the daemon drains for as long as the test needs (it is killed after).
    let e = Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"120s\"\nlisten = \"127.0.0.1:0\"\n\n{QUEUES}\n"
    ));
    let d = e.daemon();
    let url = d.api_base();
    drain_behind_a_running_task(&d);
    let head = "POST /api/v1/queues/echo/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    let mut c = Kept::open(&url);
    let a = c.answer_after_body(head, "{\"payload\": {\"to\": \"a@example.com\"}}");
    assert!(a.status.starts_with("HTTP/1.1 503"), "{a:?}");
    assert!(a.body.contains("draining"), "{a:?}");
    assert!(a.headers.contains("retry-after: 5"), "{a:?}");
    // `/metrics` is still served while draining, on the same connection.
    let a = c.still_serves("/metrics", head);
    assert!(a.status.starts_with("HTTP/1.1 200"), "{a:?}");
    assert!(a.body.contains("taskd_"), "{a:?}");
}

#[test]
fn a_refused_body_is_read_only_up_to_its_bound() {
    let e = env(&format!("token = \"{TOKEN}\""), QUEUES);
    let d = e.daemon();
    let url = d.api_base();
    let submit = "POST /api/v1/queues/echo/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    // A body over 64 KiB, refused before it is read: answered at once, without waiting for
    // a byte of it (an unauthenticated client cannot make the daemon read it), and closed.
    // The read timeout is shorter than the 5 s the daemon would wait for a body it reads.
    let mut c = Kept::open(&url);
    c.s.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    c.write(format!("{submit}\r\nContent-Length: {}\r\n\r\n", 1 << 20).as_bytes());
    let a = c
        .answer()
        .expect("the refusal of a body past the bound comes at once");
    assert!(a.status.starts_with("HTTP/1.1 401"), "{a:?}");
    assert!(a.headers.contains("connection: close"), "{a:?}");
    assert!(c.answer().is_none(), "the connection is closed");
    // `Expect: 100-continue`: the client waits for a word before it sends the body; the
    // refusal is that word (no `100 Continue` asks for a body that would be dropped).
    let mut c = Kept::open(&url);
    c.s.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    c.write(format!("{submit}\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n").as_bytes());
    let a = c.answer().expect("the refusal comes at once");
    assert!(a.status.starts_with("HTTP/1.1 401"), "{a:?}");
    assert!(a.headers.contains("connection: close"), "{a:?}");
    // Within the bound, sent in pieces: read to its end, answered, and the connection kept.
    let mut c = Kept::open(&url);
    let body = format!("{{\"payload\": {{\"to\": \"{}\"}}}}", "x".repeat(60 * 1024));
    c.write(format!("{submit}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    for piece in body.as_bytes().chunks(16 * 1024) {
        c.write(piece);
    }
    let a = c.answer().expect("an answer");
    assert!(a.status.starts_with("HTTP/1.1 401"), "{a:?}");
    assert!(!a.headers.contains("connection: close"), "{a:?}");
    let a = c.still_serves("/healthz", submit);
    assert!(a.status.starts_with("HTTP/1.1 200"), "{a:?}");
}
