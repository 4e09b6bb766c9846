//! The producer/operator command line through the real binary, with no daemon running unless a
//! test starts one: submit, show, status, tasks, retry, cancel, pause, resume, batches, and
//! concurrent producers.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Env;
use serde_json::{json, Value};

/// The test config: a small `max_payload`, a queue with placeholders and one without.
const CONFIG: &str = r#"
[taskd]
state_dir = "state"
shutdown_grace = "5s"
max_payload = "256B"

[queues.thumbs]
command = ["/bin/echo", "--size", "{size}", "{src}"]

[queues.plain]
shell = "true"
"#;

fn env() -> Env {
    Env::raw(CONFIG)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run and insist on exit `code`; return stderr.
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let out = env.run(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "taskd {args:?} should exit {code}:\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "taskd {args:?} panicked:\n{err}");
    err
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn status(env: &Env) -> Value {
    json_of(&env.ok(&["status", "--json"]))
}

/// The status row of `queue`.
fn queue_status(env: &Env, queue: &str) -> Value {
    let s = status(env);
    s["queues"]
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["queue"] == queue).cloned())
        .unwrap_or_else(|| panic!("status has no queue {queue}:\n{s:#}"))
}

/// Tasks over every state and queue, from `status --json`.
fn total(env: &Env) -> u64 {
    let s = status(env);
    s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|q| q["counts"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}

fn tasks(env: &Env, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["tasks", "--json"];
    a.extend_from_slice(args);
    match json_of(&env.ok(&a)) {
        Value::Array(v) => v,
        other => panic!("tasks --json is not an array: {other:#}"),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

// ----- submit and show ---------------------------------------------------------------------

#[test]
fn submit_show_round_trip() {
    let env = env();
    let before = now_ms();
    let out = env.ok(&[
        "submit",
        "thumbs",
        r#"{"size": 64, "src": "/tmp/a b.png", "extra": [1, {"x": null}]}"#,
        "--priority",
        "7",
        "--",
        "--flag",
        "two words",
        "-x",
    ]);
    let id = out.trim();
    assert!(is_uuid(id), "submit prints the task id, got {out:?}");
    assert_eq!(out.lines().count(), 1, "only the id on stdout: {out:?}");

    let t = env.show(id);
    assert_eq!(t["id"], id);
    assert_eq!(t["queue"], "thumbs");
    assert_eq!(t["state"], "queued");
    assert_eq!(
        t["payload"],
        json!({"size": 64, "src": "/tmp/a b.png", "extra": [1, {"x": null}]})
    );
    assert_eq!(t["args"], json!(["--flag", "two words", "-x"]));
    assert_eq!(t["priority"], 7);
    assert_eq!(t["attempts"], 0);
    assert_eq!(t["unique_key"], Value::Null);
    assert_eq!(t["history"], json!([]));
    let created = t["created_at"].as_i64().unwrap();
    assert!(
        created >= before - 1000 && created <= now_ms() + 1000,
        "created_at {created} is not now"
    );
    assert!(
        t["run_at"].as_i64().unwrap() <= now_ms(),
        "no delay: runnable now"
    );

    // The human form names the same things.
    let text = env.ok(&["show", id]);
    for want in [
        id,
        "thumbs",
        "queued",
        "\"two words\"",
        "priority  7",
        "/tmp/a b.png",
    ] {
        assert!(text.contains(want), "show lacks {want:?}:\n{text}");
    }

    // Negative priorities are accepted too.
    let id2 = env
        .ok(&["submit", "plain", "--priority", "-3"])
        .trim()
        .to_string();
    let t2 = env.show(&id2);
    assert_eq!(t2["priority"], -3);
    assert_eq!(t2["payload"], json!({}), "the default payload is {{}}");
}

#[test]
fn submit_json_prints_the_whole_record() {
    let env = env();
    let out = env.ok(&[
        "submit",
        "thumbs",
        r#"{"size":1,"src":"s"}"#,
        "--json",
        "--",
        "a",
    ]);
    let v = json_of(&out);
    assert_eq!(v["existing"], false);
    let t = &v["task"];
    let id = t["id"].as_str().expect("task.id");
    assert!(is_uuid(id), "{v:#}");
    assert_eq!(t["state"], "queued");
    assert_eq!(t["queue"], "thumbs");
    assert_eq!(t["payload"], json!({"size": 1, "src": "s"}));
    assert_eq!(t["args"], json!(["a"]));
    // The record is the broker's: show agrees on every field it printed.
    let shown = env.show(id);
    for (k, val) in t.as_object().unwrap() {
        assert_eq!(
            &shown[k], val,
            "field {k} differs between submit --json and show --json"
        );
    }
}

#[test]
fn delay_and_at_make_the_task_scheduled() {
    let env = env();
    let before = now_ms();
    let v = json_of(&env.ok(&["submit", "plain", "--delay", "5m", "--json"]));
    let t = &v["task"];
    assert_eq!(t["state"], "scheduled", "{v:#}");
    let run_at = t["run_at"].as_i64().unwrap();
    assert!(
        run_at >= before + 299_000 && run_at <= now_ms() + 301_000,
        "run_at {run_at} should be 5m from now ({before})"
    );
    assert_eq!(env.state(t["id"].as_str().unwrap()), "scheduled");

    // --at with Unix seconds, in the future and in the past.
    let future = now_ms() / 1000 + 3600;
    let id = env
        .ok(&["submit", "plain", "--at", &future.to_string()])
        .trim()
        .to_string();
    let t = env.show(&id);
    assert_eq!(t["state"], "scheduled");
    assert_eq!(t["run_at"], future * 1000);
    let id = env
        .ok(&["submit", "plain", "--at", "2020-01-01T00:00:00Z"])
        .trim()
        .to_string();
    assert_eq!(
        env.state(&id),
        "queued",
        "a time in the past is runnable now"
    );

    assert_eq!(queue_status(&env, "plain")["counts"]["scheduled"], 2);
    assert_eq!(queue_status(&env, "plain")["counts"]["queued"], 1);

    let err = fails(&env, &["submit", "plain", "--delay", "soon"], 2);
    assert!(err.contains("--delay") && err.contains("soon"), "{err}");
    let err = fails(&env, &["submit", "plain", "--at", "tomorrow-ish"], 2);
    assert!(err.contains("--at"), "{err}");
    fails(
        &env,
        &[
            "submit",
            "plain",
            "--delay",
            "1m",
            "--at",
            "2030-01-01T00:00:00Z",
        ],
        2,
    );
    assert_eq!(total(&env), 3, "refused submits enqueue nothing");
}

#[test]
fn huge_delay_is_refused_or_stays_in_the_future() {
    let env = env();
    let out = env.run(&["submit", "plain", "--delay", "300000000y", "--json"]);
    if out.status.code() == Some(2) {
        return; // refused: fine
    }
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let t = &json_of(&stdout(&out))["task"];
    assert_eq!(
        t["state"], "scheduled",
        "a delay of 300 million years must not run now: {t:#}"
    );
    assert!(t["run_at"].as_i64().unwrap() > now_ms(), "{t:#}");
}

#[test]
fn huge_at_is_refused() {
    let env = env();
    let err = fails(&env, &["submit", "plain", "--at", "99999999999999999"], 2);
    assert!(err.contains("--at"), "{err}");
}

#[test]
fn payload_from_stdin() {
    let env = env();
    let mut child = env
        .cmd(&["submit", "thumbs", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"size\": 9,\n \"src\": \"x\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert_eq!(env.show(&id)["payload"], json!({"size": 9, "src": "x"}));
}

// ----- no daemon ---------------------------------------------------------------------------

#[test]
fn submit_works_with_no_daemon_running() {
    let env = env();
    assert!(!env.path().join("state").exists(), "fresh env");
    let id = env.submit("plain", r#"{"n": 1}"#);
    let s = status(&env);
    assert_eq!(
        s["daemon"],
        Value::Null,
        "no daemon should be reported:\n{s:#}"
    );
    let plain = queue_status(&env, "plain");
    assert_eq!(plain["counts"]["queued"], 1, "{s:#}");
    assert_eq!(plain["paused"], false);
    assert_eq!(plain["configured"], true);
    for state in [
        "scheduled",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "cancelled",
    ] {
        assert_eq!(plain["counts"][state], 0, "{state}: {s:#}");
    }
    assert_eq!(
        queue_status(&env, "thumbs")["counts"]["queued"],
        0,
        "configured queues are listed even when empty"
    );

    let list = tasks(&env, &[]);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["state"], "queued");
    assert_eq!(list[0]["queue"], "plain");
    assert_eq!(list[0]["payload"], json!({"n": 1}));

    // Filters.
    assert_eq!(tasks(&env, &["--state", "queued"]).len(), 1);
    assert_eq!(tasks(&env, &["--state", "scheduled"]).len(), 0);
    assert_eq!(tasks(&env, &["--queue", "thumbs"]).len(), 0);
    assert_eq!(
        tasks(&env, &["--queue", "plain", "--state", "queued"]).len(),
        1
    );
    let err = fails(&env, &["tasks", "--state", "bogus"], 2);
    assert!(
        err.contains("bogus") && err.contains("queued"),
        "names the valid states: {err}"
    );

    // The human forms say the daemon is not running and show the task.
    let text = env.ok(&["status"]);
    assert!(
        text.contains("not running") && text.contains("plain"),
        "{text}"
    );
    let text = env.ok(&["tasks"]);
    assert!(text.contains(&id) && text.contains("queued"), "{text}");
}

// ----- bad input ---------------------------------------------------------------------------

#[test]
fn malformed_json_names_the_byte_position() {
    let env = env();
    for (payload, byte) in [
        (r#"{"a": x}"#, 6),
        ("{\"a\":\n x}", 7),
        (r#"{"é": x}"#, 7), // é is two bytes
        (r#"{"a": 1,}"#, 8),
        (r#"{"a": 1} junk"#, 9),
    ] {
        let err = fails(&env, &["submit", "plain", payload], 2);
        assert!(err.contains("malformed JSON"), "{payload:?}: {err}");
        assert!(
            err.contains(&format!("at byte {byte} ")),
            "{payload:?}: want byte {byte}: {err}"
        );
    }
    let err = fails(&env, &["submit", "plain", ""], 2);
    assert!(err.contains("malformed JSON"), "{err}");
    assert_eq!(total(&env), 0, "nothing enqueued");
}

#[test]
fn unknown_queue_lists_the_known_ones() {
    let env = env();
    let err = fails(&env, &["submit", "thumbnail", "{}"], 2);
    assert!(err.contains("unknown queue `thumbnail`"), "{err}");
    assert!(
        err.contains("plain") && err.contains("thumbs"),
        "lists known queues: {err}"
    );
    assert!(
        err.contains(&env.config.display().to_string()),
        "names the config: {err}"
    );
    assert_eq!(total(&env), 0);
}

/// `taskd prune` deletes the rate states whose time has passed (they limit nothing: broker
/// rule 19) and says how many; one whose time is ahead stays; a dry run deletes none.
#[test]
fn prune_deletes_lapsed_rate_states_and_says_so() {
    let env = env();
    env.ok(&["prune", "--dry-run"]); // the store exists from here
    let db = rusqlite::Connection::open(env.path().join("state/taskd.db")).expect("the store");
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    db.execute(
        "INSERT INTO rate_state (queue, key, tat) VALUES
           ('plain', 'a', ?1), ('plain', 'b', ?1), ('plain', 'c', ?2), ('thumbs', '', ?1)",
        rusqlite::params![now_us - 1_000_000, now_us + 3_600_000_000],
    )
    .expect("rate states");
    let count = |db: &rusqlite::Connection| -> i64 {
        db.query_row("SELECT count(*) FROM rate_state", [], |r| r.get(0))
            .expect("count")
    };
    let dry = json_of(&env.ok(&["prune", "--dry-run", "--json"]));
    assert_eq!(dry["rate_states"], 0, "{dry:#}");
    assert_eq!(count(&db), 4, "a dry run deletes none");
    let only_plain = env.ok(&["prune", "--queue", "plain"]);
    assert!(
        only_plain.contains("deleted 2 rate states whose time had passed"),
        "{only_plain}"
    );
    assert_eq!(count(&db), 2, "thumbs' state and plain's live one are left");
    let all = json_of(&env.ok(&["prune", "--json"]));
    assert_eq!(all["rate_states"], 1, "{all:#}");
    let left: String = db
        .query_row("SELECT key FROM rate_state", [], |r| r.get(0))
        .expect("one left");
    assert_eq!(left, "c", "the state whose time is ahead stays");
    let again = env.ok(&["prune"]);
    assert!(!again.contains("rate state"), "{again}");
}

/// pause, resume and tail tell an unknown or malformed queue name the way submit does: the
/// config file it was looked up in and the queues there are.
#[test]
fn queue_commands_name_an_unknown_queue_like_submit() {
    let env = env();
    let config = env.config.display().to_string();
    for (name, says) in [
        ("thumbnail", "unknown queue `thumbnail`"),
        ("no/such", "`no/such` is not a queue name"),
    ] {
        let submit = fails(&env, &["submit", name, "{}"], 2);
        for cmd in ["pause", "resume", "tail"] {
            let err = fails(&env, &[cmd, name], 2);
            assert!(err.contains(says), "taskd {cmd} {name}: {err}");
            assert!(
                err.contains("known queues: plain, thumbs"),
                "taskd {cmd} {name} lists the known queues: {err}"
            );
            assert_eq!(err, submit, "taskd {cmd} {name} says what submit says");
        }
        let err = fails(&env, &["pause", name], 2);
        if name == "thumbnail" {
            assert!(err.contains(&config), "names the config: {err}");
        }
    }
    assert_eq!(queue_status(&env, "plain")["paused"], false);
    assert_eq!(queue_status(&env, "thumbs")["paused"], false);
}

#[test]
fn payload_over_max_payload_is_refused() {
    let env = env();
    // Exactly 256 bytes is allowed; 257 is not.
    let fill = |n: usize| format!(r#"{{"p":"{}"}}"#, "x".repeat(n - 8));
    assert_eq!(fill(256).len(), 256);
    env.submit("plain", &fill(256));
    let err = fails(&env, &["submit", "plain", &fill(257)], 2);
    assert!(err.contains("257 bytes") && err.contains("256"), "{err}");
    assert!(
        err.contains("max_payload"),
        "says which setting to raise: {err}"
    );
    let big = fill(10_000);
    let err = fails(&env, &["submit", "plain", &big], 2);
    assert!(err.contains("over the limit"), "{err}");
    assert_eq!(total(&env), 1);
}

#[test]
fn payload_missing_a_placeholder_field_is_refused() {
    let env = env();
    let err = fails(&env, &["submit", "thumbs", r#"{"src": "a.png"}"#], 2);
    assert!(err.contains("`size`") && err.contains("thumbs"), "{err}");
    let err = fails(
        &env,
        &["submit", "thumbs", r#"{"size": 3, "src": null}"#],
        2,
    );
    assert!(
        err.contains("payload field `src` is null")
            && err.contains("{src} needs a string, number, boolean, array or object")
            && !err.contains("no field"),
        "null does not fill a field, and the message says it is null: {err}"
    );
    let err = fails(&env, &["submit", "thumbs", "[1, 2]"], 2);
    assert!(err.contains("no field"), "{err}");
    let err = fails(&env, &["submit", "thumbs"], 2);
    assert!(
        err.contains("no field"),
        "the default payload {{}} lacks fields: {err}"
    );
    assert_eq!(total(&env), 0);
    // A shell queue takes any JSON value.
    env.submit("plain", "[1, 2]");
    env.submit("plain", "\"text\"");
}

/// Submit `payload` on stdin (a payload of megabytes does not fit in the CLI's own argv).
fn submit_stdin(env: &Env, queue: &str, payload: &str) -> Output {
    let mut child = env
        .cmd(&["submit", queue, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskd submit");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(payload.as_bytes())
        .expect("write the payload");
    child.wait_with_output().expect("taskd submit")
}

/// What the kernel cannot pass to a process (`execve`: 128 KiB per string, argv and
/// environment together within a quarter of the stack limit) used to be accepted at submit,
/// then failed every attempt with "Argument list too long". An argv element that cannot be
/// passed is refused at submit; payload fields too big for the environment are left out of
/// it (the whole payload is on stdin), so the task runs.
#[test]
fn payloads_the_kernel_cannot_pass_are_refused_or_run() {
    let env = Env::raw(
        r#"
[taskd]
state_dir = "state"
shutdown_grace = "5s"
max_payload = "4MiB"

[queues.arg]
command = ["/bin/echo", "{x}"]
max_attempts = 1

[queues.env]
shell = 'echo "stdin=$(wc -c) f00=${#TASKD_ARG_f00} payload=${#TASKD_PAYLOAD}"'
max_attempts = 1
"#,
    );
    let out = submit_stdin(
        &env,
        "arg",
        &json!({ "x": "x".repeat(140_000) }).to_string(),
    );
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("queue `arg`")
            && err.contains("140000 bytes")
            && err.contains("limit of 131071 bytes per argument (MAX_ARG_STRLEN)"),
        "{err}"
    );
    assert_eq!(total(&env), 0);
    // A field the script reads as $TASKD_ARG_f00 but too big to be a variable: refused,
    // not run with the variable empty.
    let out = submit_stdin(
        &env,
        "env",
        &json!({ "f00": "v".repeat(70_000) }).to_string(),
    );
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("payload field `f00` is too big for the environment variable TASKD_ARG_f00 the script reads"),
        "{err}"
    );
    assert_eq!(total(&env), 0);

    let long_name = json!({ "n".repeat(140_000): 1 }).to_string();
    let wide: serde_json::Map<String, Value> = (0..40)
        .map(|i| (format!("f{i:02}"), json!("v".repeat(60_000))))
        .collect();
    let wide = Value::Object(wide).to_string();
    let mut ids = Vec::new();
    for payload in [&long_name, &wide] {
        let out = submit_stdin(&env, "env", payload);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        ids.push(stdout(&out).trim().to_string());
    }
    let _d = env.daemon();
    let done = env.wait_state(&ids[0], "succeeded", Duration::from_secs(30));
    assert_eq!(
        common::history(&done)[0]["stdout_tail"],
        format!("stdin={} f00=0 payload=0\n", long_name.len())
    );
    let done = env.wait_state(&ids[1], "succeeded", Duration::from_secs(30));
    assert_eq!(
        common::history(&done)[0]["stdout_tail"],
        format!("stdin={} f00=60000 payload=0\n", wide.len())
    );
}

/// A payload value that starts an argv element with `-` reaches the program as an option
/// (`make-thumb --output=/etc/x`). Refused at submit unless the placeholder follows `--` or
/// the queue says `allow_dash_values = true`.
#[test]
fn placeholder_values_that_would_be_options_are_refused() {
    let env = Env::raw(
        r#"
[taskd]
state_dir = "state"

[queues.thumb]
command = ["/bin/echo", "--size={size}", "{src}"]

[queues.safe]
command = ["/bin/echo", "--", "{src}"]

[queues.trusting]
command = ["/bin/echo", "{src}"]
allow_dash_values = true
"#,
    );
    let payload = r#"{"size": "-1", "src": "--output=/etc/x"}"#;
    let err = fails(&env, &["submit", "thumb", payload], 2);
    assert!(
        err.contains("queue `thumb`")
            && err.contains("\"--output=/etc/x\" made from `{src}` starts with `-`")
            && err.contains("put \"--\" before `{src}`")
            && err.contains("`allow_dash_values = true`"),
        "{err}"
    );
    let err = fails(&env, &["submit", "thumb", r#"{"size": 1, "src": -2}"#], 2);
    assert!(
        err.contains("\"-2\""),
        "a negative number is refused too: {err}"
    );
    assert_eq!(total(&env), 0);
    // `--size={size}` cannot become an option; `{src}` after `--` cannot either; a queue
    // may allow dashes.
    env.submit("thumb", r#"{"size": "-1", "src": "a.png"}"#);
    env.submit("safe", payload);
    env.submit("trusting", payload);
    assert_eq!(total(&env), 3);
}

/// Asserts that `text` (what a person reads) holds no raw escape or bell, and shows them.
fn assert_escapes_visible(what: &str, text: &str, shown: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\r'),
        "{what} copies raw control characters to the terminal: {text:?}"
    );
    assert!(text.contains(shown), "{what} lacks {shown:?}:\n{text}");
}

/// Task output is data: a task that prints terminal escapes (set the title, clear the
/// screen, hide a line behind a carriage return) must not drive the terminal of an operator
/// who reads it with show, tasks, status or submit --wait, nor the daemon's log. Control
/// characters are shown as escapes; --json keeps the text as it was.
#[test]
fn task_output_cannot_drive_the_operators_terminal() {
    let env = Env::raw(
        r#"
[taskd]
state_dir = "state"
shutdown_grace = "5s"

[queues.loud]
shell = 'printf "out\033]0;pwned\007\033[2J\n"; printf "err\033[31m\rfake\n" >&2; exit 3'
max_attempts = 1
log_output = true

[queues.missing]
command = ["/nonexistent/\u001b]0;pwned\u0007"]
max_attempts = 1

[queues.worker]
worker = ["/bin/sh", "-c", 'printf "w\033]0;pwned\007\n" >&2; exit 1']
start_retries = 1
"#,
    );
    let d = env.daemon();
    let out = env.run(&["submit", "loud", "--wait"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    let id = stdout(&out).lines().next().unwrap_or_default().to_string();
    assert_escapes_visible(
        "submit --wait (stdout)",
        &stdout(&out),
        "out\\x1b]0;pwned\\x07\\x1b[2J",
    );
    assert_escapes_visible(
        "submit --wait (stderr)",
        &stderr(&out),
        "err\\x1b[31m\\rfake",
    );

    let shown = env.ok(&["show", &id]);
    assert_escapes_visible("show", &shown, "    out\\x1b]0;pwned\\x07\\x1b[2J");
    assert_escapes_visible("show", &shown, "    err\\x1b[31m\\rfake");
    let raw = env.show(&id);
    assert_eq!(
        common::history(&raw)[0]["stdout_tail"],
        "out\u{1b}]0;pwned\u{7}\u{1b}[2J\n",
        "--json keeps the output as it was"
    );

    let missing = env.submit("missing", "{}");
    env.wait_state(&missing, "failed", Duration::from_secs(20));
    let listed = env.ok(&["tasks", "--queue", "missing"]);
    assert_escapes_visible("tasks", &listed, "/nonexistent/\\x1b]0;pwned\\x07");
    let shown = env.ok(&["show", &missing]);
    assert_escapes_visible("show (error)", &shown, "/nonexistent/\\x1b]0;pwned\\x07");

    let mut status = String::new();
    let seen = common::poll(Duration::from_secs(30), || {
        status = env.ok(&["status"]);
        status.contains("pwned")
    });
    assert!(
        seen,
        "the worker's stderr never showed in status:\n{status}"
    );
    assert_escapes_visible("status", &status, "w\\x1b]0;pwned\\x07");

    let log = d.log_text();
    assert!(
        log.contains("pwned"),
        "log_output logs the task's output:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}') && !log.contains('\u{7}'),
        "the daemon's log copies raw control characters: {log:?}"
    );
}

/// The mode (permission bits, set-id bits included) and group of `path`.
fn mode_and_group(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.gid())
}

/// `taskd ARGS` as user nobody (group nogroup, no other group), when the tests run as root.
fn as_nobody(env: &Env, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            common::BIN,
        ])
        .arg("-c")
        .arg(&env.config)
        .args(args)
        .env_remove("TASKD_CONFIG")
        .output()
        .expect("run setpriv")
}

/// The store holds every payload and output tail: under umask 022 its directory used to be
/// created 0755 and its files 0644, readable by every local user. They are 0700 and 0600
/// whatever the umask; with `state_group` the group's members (a web app's user) enqueue
/// straight into the store, and other users still cannot read it.
#[test]
fn the_store_is_private_unless_a_group_shares_it() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let queues = "[queues.plain]\nshell = \"true\"\n";
    let env = Env::raw(&format!("[taskd]\nstate_dir = \"state\"\n\n{queues}"));
    let state = env.path().join("state");
    let files = ["taskd.db", "taskd.db-wal", "taskd.db-shm"];
    let mut submit = env.cmd(&["submit", "plain"]);
    // SAFETY: umask is async-signal-safe and touches only the child's own process state.
    unsafe {
        submit.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
    let out = submit.output().expect("run taskd submit");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode_and_group(&state).0, 0o700, "the state directory");
    for f in files {
        assert_eq!(mode_and_group(&state.join(f)).0, 0o600, "{f}");
    }
    {
        let _d = env.daemon();
        assert_eq!(mode_and_group(&state).0, 0o700);
        assert_eq!(mode_and_group(&state.join("taskd.db.wake")).0, 0o600);
    }
    if !nix::unistd::geteuid().is_root() {
        common::skip::skip(
            "running as another user needs root",
            "run the tests as root",
        );
        return;
    }
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = as_nobody(&env, &["submit", "plain"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "another user enqueued into a private store"
    );
    assert!(
        stderr(&out).to_lowercase().contains("permission denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(total(&env), 1);

    std::fs::write(
        &env.config,
        format!("[taskd]\nstate_dir = \"state\"\nstate_group = \"nogroup\"\n\n{queues}"),
    )
    .expect("rewrite the config");
    let nogroup = nix_gid("nogroup");
    let _d = env.daemon();
    assert_eq!(
        mode_and_group(&state),
        (0o2770, nogroup),
        "the state directory"
    );
    for f in files {
        assert_eq!(mode_and_group(&state.join(f)), (0o660, nogroup), "{f}");
    }
    assert_eq!(
        mode_and_group(&state.join("taskd.db.wake")),
        (0o660, nogroup)
    );
    let out = as_nobody(&env, &["submit", "plain"]);
    assert!(
        out.status.success(),
        "a member of state_group cannot enqueue: {}",
        stderr(&out)
    );
    let id = stdout(&out).trim().to_string();
    env.wait_state(&id, "succeeded", Duration::from_secs(20));
}

/// A store that is not SQLite (damaged, or another file put there) used to fail every
/// command with "file is not a database" and no word of which file.
#[test]
fn a_corrupt_store_is_named() {
    let env = env();
    std::fs::create_dir_all(env.path().join("state")).expect("state dir");
    let db = env.path().join("state").join("taskd.db");
    std::fs::write(&db, vec![0x5a; 8192]).expect("write garbage");
    for args in [&["submit", "plain"][..], &["status"][..], &["start"][..]] {
        let err = fails(&env, args, 1);
        assert!(
            err.contains(&format!("the store {}", db.display()))
                && err.contains("file is not a database")
                && err.contains("restore it from a backup, or move it away"),
            "taskd {args:?}: {err}"
        );
    }
}

/// The id of group `name`, from /etc/group.
fn nix_gid(name: &str) -> u32 {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse().ok()))?
        })
        .unwrap_or_else(|| panic!("no group {name}"))
}

#[test]
fn bad_flags_are_usage_errors() {
    let env = env();
    fails(&env, &["submit"], 2);
    fails(&env, &["submit", "plain", "--bogus"], 2);
    fails(&env, &["submit", "plain", "--priority", "high"], 2);
    fails(&env, &["frobnicate"], 2);
    let err = fails(&env, &["show", "not-an-id"], 2);
    assert!(err.contains("not-an-id"), "{err}");
    fails(&env, &["submit", "plain", "{}", "--batch", "x.jsonl"], 2);
}

// ----- unique keys -------------------------------------------------------------------------

#[test]
fn unique_key_twice_returns_the_same_id() {
    let env = env();
    let a = env
        .ok(&["submit", "plain", r#"{"n":1}"#, "--unique", "k1"])
        .trim()
        .to_string();
    let out = env.run(&["submit", "plain", r#"{"n":2}"#, "--unique", "k1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), a, "same key, same id");
    assert!(
        stderr(&out).contains("k1"),
        "tells the user it was already there: {}",
        stderr(&out)
    );
    let v = json_of(&env.ok(&["submit", "plain", "--unique", "k1", "--json"]));
    assert_eq!(v["existing"], true);
    assert_eq!(v["task"]["id"], a);
    assert_eq!(queue_status(&env, "plain")["counts"]["queued"], 1);
    assert_eq!(
        env.show(&a)["payload"],
        json!({"n": 1}),
        "the first payload is kept"
    );
    assert_eq!(env.show(&a)["unique_key"], "k1");

    // Another key, or the same key on another queue, is another task.
    let b = env
        .ok(&["submit", "plain", "--unique", "k2"])
        .trim()
        .to_string();
    assert_ne!(a, b);
    let c = env
        .ok(&[
            "submit",
            "thumbs",
            r#"{"size":1,"src":"s"}"#,
            "--unique",
            "k1",
        ])
        .trim()
        .to_string();
    assert_ne!(a, c);

    // Once the holder is cancelled, the key is free again.
    env.ok(&["cancel", &a]);
    let d = env
        .ok(&["submit", "plain", "--unique", "k1"])
        .trim()
        .to_string();
    assert_ne!(a, d);
}

// ----- show, retry, cancel -----------------------------------------------------------------

#[test]
fn show_of_an_unknown_id_fails() {
    let env = env();
    env.submit("plain", "{}");
    let id = "01a21d6f-4409-7209-a740-27d3119860d3";
    let err = fails(&env, &["show", id], 1);
    assert!(err.contains(id) && err.contains("no task"), "{err}");
    let err = fails(&env, &["show", id, "--json"], 1);
    assert!(err.contains("no task"), "{err}");
    fails(&env, &["retry", id], 1);
    fails(&env, &["cancel", id], 1);
}

#[test]
fn retry_of_a_queued_task_is_refused() {
    let env = env();
    let id = env.submit("plain", "{}");
    let err = fails(&env, &["retry", &id], 1);
    assert!(
        err.contains("queued") && err.contains("failed or cancelled"),
        "{err}"
    );
    assert_eq!(env.state(&id), "queued");
    let s = env.ok(&["submit", "plain", "--delay", "1h"]);
    let err = fails(&env, &["retry", s.trim()], 1);
    assert!(err.contains("scheduled"), "{err}");
}

#[test]
fn cancel_then_retry() {
    let env = env();
    let id = env.submit("plain", r#"{"k": "v"}"#);
    let out = env.ok(&["cancel", &id]);
    assert!(out.contains("cancelled"), "{out}");
    let t = env.show(&id);
    assert_eq!(t["state"], "cancelled");
    assert!(t["finished_at"].as_i64().is_some(), "{t:#}");
    assert_eq!(queue_status(&env, "plain")["counts"]["cancelled"], 1);
    assert_eq!(queue_status(&env, "plain")["counts"]["queued"], 0);

    // Cancelling twice: nothing to cancel.
    let err = fails(&env, &["cancel", &id], 1);
    assert!(err.contains("already finished"), "{err}");

    env.ok(&["retry", &id]);
    let t = env.show(&id);
    assert_eq!(t["state"], "queued");
    assert_eq!(t["attempts"], 0);
    assert_eq!(t["finished_at"], Value::Null);
    assert_eq!(t["payload"], json!({"k": "v"}));
    assert_eq!(queue_status(&env, "plain")["counts"]["queued"], 1);
    assert_eq!(queue_status(&env, "plain")["counts"]["cancelled"], 0);

    // A scheduled task can be cancelled as well.
    let s = env
        .ok(&["submit", "plain", "--delay", "1h"])
        .trim()
        .to_string();
    env.ok(&["cancel", &s]);
    assert_eq!(env.state(&s), "cancelled");
}

// ----- pause / resume ----------------------------------------------------------------------

#[test]
fn pause_and_resume_show_in_status_and_persist() {
    let env = env();
    let out = env.ok(&["pause", "plain"]);
    assert!(out.contains("paused"), "{out}");
    assert_eq!(queue_status(&env, "plain")["paused"], true);
    assert_eq!(queue_status(&env, "thumbs")["paused"], false);
    env.ok(&["pause", "plain"]); // idempotent
    assert_eq!(queue_status(&env, "plain")["paused"], true);
    assert!(env.ok(&["status"]).contains("PAUSED"));

    let err = fails(&env, &["pause", "nope"], 2);
    assert!(
        err.contains("unknown queue `nope`") && err.contains("plain, thumbs"),
        "{err}"
    );

    // Persists across a daemon's life: it reads the flag and does not clear it.
    let d = env.daemon();
    let s = status(&env);
    assert_eq!(
        s["daemon"]["pid"],
        d.pid(),
        "status reports the running daemon:\n{s:#}"
    );
    assert_eq!(queue_status(&env, "plain")["paused"], true);
    d.signal(common::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    let s = status(&env);
    assert_eq!(s["daemon"], Value::Null, "{s:#}");
    assert_eq!(
        queue_status(&env, "plain")["paused"],
        true,
        "pause persists across daemon restarts"
    );

    env.ok(&["resume", "plain"]);
    assert_eq!(queue_status(&env, "plain")["paused"], false);
    env.ok(&["resume", "plain"]); // idempotent
    assert_eq!(queue_status(&env, "plain")["paused"], false);
    assert!(!env.ok(&["status"]).contains("PAUSED"));
}

// ----- concurrency and batches -------------------------------------------------------------

#[test]
fn eight_concurrent_producers_of_200_tasks_each() {
    const PRODUCERS: usize = 8;
    const EACH: usize = 200;
    let env = env();
    // No submit before the threads start: the first submits of all producers also race on
    // creating the state directory and the database.
    let results: Vec<(Vec<String>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let env = &env;
                s.spawn(move || {
                    let mut ids = Vec::with_capacity(EACH);
                    let mut errors = Vec::new();
                    for n in 0..EACH {
                        let payload = format!(r#"{{"p":{p},"n":{n}}}"#);
                        let out = env.run(&["submit", "plain", &payload]);
                        if !out.status.success() || !out.stderr.is_empty() {
                            errors.push(format!(
                                "producer {p} task {n}: exit {:?}: {}",
                                out.status.code(),
                                stderr(&out)
                            ));
                        }
                        ids.push(stdout(&out).trim().to_string());
                    }
                    (ids, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("producer thread"))
            .collect()
    });
    let errors: Vec<&String> = results.iter().flat_map(|(_, e)| e).collect();
    assert!(
        errors.is_empty(),
        "{} submits failed or warned, e.g.:\n{}",
        errors.len(),
        errors
            .iter()
            .take(5)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ids: Vec<&String> = results.iter().flat_map(|(i, _)| i).collect();
    assert_eq!(ids.len(), PRODUCERS * EACH);
    assert!(ids.iter().all(|i| is_uuid(i)), "every submit printed an id");
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), PRODUCERS * EACH, "duplicate ids");

    assert_eq!(
        queue_status(&env, "plain")["counts"]["queued"],
        (PRODUCERS * EACH) as u64
    );
    assert_eq!(total(&env), (PRODUCERS * EACH) as u64);
    // Every payload is there, once, under the id its producer was given.
    let list = tasks(&env, &["--limit", "5000"]);
    assert_eq!(list.len(), PRODUCERS * EACH);
    let mut seen = HashSet::new();
    for t in &list {
        let key = (
            t["payload"]["p"].as_u64().unwrap(),
            t["payload"]["n"].as_u64().unwrap(),
        );
        assert!(seen.insert(key), "payload {key:?} stored twice");
        let (p, n) = (key.0 as usize, key.1 as usize);
        assert_eq!(
            t["id"].as_str().unwrap(),
            results[p].0[n],
            "task {key:?} has another id than submit printed"
        );
    }
}

fn write_batch(env: &Env, name: &str, lines: impl Iterator<Item = String>) -> String {
    let path = env.path().join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    f.flush().unwrap();
    path.display().to_string()
}

#[test]
fn batch_of_100000_enqueues_all() {
    const N: usize = 100_000;
    let env = env();
    let file = write_batch(
        &env,
        "batch.jsonl",
        (0..N).map(|i| format!(r#"{{"i":{i}}}"#)),
    );
    let out = env.ok(&["submit", "plain", "--batch", &file]);
    assert!(out.contains(&format!("enqueued {N} tasks")), "{out}");
    let plain = queue_status(&env, "plain");
    assert_eq!(plain["counts"]["queued"], N as u64, "{plain:#}");
    assert_eq!(total(&env), N as u64);
    // The first and last lines are both there.
    let list = tasks(&env, &["--limit", "200000"]);
    assert_eq!(list.len(), N);
    let is: HashSet<u64> = list
        .iter()
        .map(|t| t["payload"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(is.len(), N, "every line became exactly one task");
    assert!(is.contains(&0) && is.contains(&(N as u64 - 1)));
}

#[test]
fn batch_with_one_bad_line_enqueues_nothing_and_names_the_line() {
    let env = env();
    env.submit("plain", "{}"); // something already there stays, and nothing is added
    let lines = |bad: usize, text: &'static str| {
        (1..=1000).map(move |i| {
            if i == bad {
                text.to_string()
            } else {
                format!(r#"{{"i":{i}}}"#)
            }
        })
    };

    let file = write_batch(&env, "bad-json.jsonl", lines(537, r#"{"i": 537,}"#));
    let err = fails(&env, &["submit", "plain", "--batch", &file], 2);
    assert!(err.contains("line 537"), "names the line: {err}");
    assert!(
        err.contains("malformed JSON") && err.contains("byte 10"),
        "{err}"
    );
    assert!(err.contains("nothing was enqueued"), "{err}");
    assert_eq!(total(&env), 1);

    // The last line, a too-large payload, a missing placeholder field.
    let file = write_batch(&env, "bad-last.jsonl", lines(1000, "{"));
    let err = fails(&env, &["submit", "plain", "--batch", &file], 2);
    assert!(err.contains("line 1000"), "{err}");
    let big: &'static str = Box::leak(format!(r#"{{"p":"{}"}}"#, "x".repeat(300)).into_boxed_str());
    let file = write_batch(&env, "bad-big.jsonl", lines(3, big));
    let err = fails(&env, &["submit", "plain", "--batch", &file], 2);
    assert!(
        err.contains("line 3") && err.contains("over the limit"),
        "{err}"
    );
    let file = write_batch(
        &env,
        "bad-field.jsonl",
        (1..=10).map(|i| {
            if i == 7 {
                r#"{"size":1}"#.to_string()
            } else {
                format!(r#"{{"size":{i},"src":"s"}}"#)
            }
        }),
    );
    let err = fails(&env, &["submit", "thumbs", "--batch", &file], 2);
    assert!(err.contains("line 7") && err.contains("`src`"), "{err}");
    assert_eq!(total(&env), 1, "no bad batch enqueued anything");

    // Empty and missing files.
    let file = write_batch(&env, "empty.jsonl", std::iter::empty());
    let err = fails(&env, &["submit", "plain", "--batch", &file], 2);
    assert!(err.contains("no tasks"), "{err}");
    let err = fails(
        &env,
        &["submit", "plain", "--batch", "/nonexistent/x.jsonl"],
        2,
    );
    assert!(err.contains("/nonexistent/x.jsonl"), "{err}");
    assert_eq!(total(&env), 1);
}

#[test]
fn batch_from_stdin_with_options_and_blank_lines() {
    let env = env();
    let mut child = env
        .cmd(&[
            "submit",
            "plain",
            "--batch",
            "-",
            "--delay",
            "1h",
            "--priority",
            "5",
            "--json",
            "--",
            "x",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"a\":1}\n\n{\"a\":2}\r\n   \n{\"a\":3}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json_of(&stdout(&out));
    assert_eq!(v["enqueued"], 3, "{v:#}");
    let ids = v["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    for id in ids {
        let t = env.show(id.as_str().unwrap());
        assert_eq!(t["state"], "scheduled");
        assert_eq!(t["priority"], 5);
        assert_eq!(t["args"], json!(["x"]));
    }
    assert_eq!(total(&env), 3);
}

// ----- help and pipes ----------------------------------------------------------------------

#[test]
fn help_lists_the_exit_codes() {
    let out = Command::new(common::BIN)
        .arg("--help")
        .env_remove("TASKD_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Exit codes"), "{text}");
    for (code, word) in [
        ("0", "ok"),
        ("1", "failure"),
        ("2", "usage"),
        ("3", "broker"),
        ("4", "--wait"),
        ("78", "config"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(code) && l.contains(word)),
            "--help lacks exit code {code} ({word}):\n{text}"
        );
    }
    for cmd in [
        "start", "check", "submit", "status", "tasks", "show", "result", "retry", "cancel",
        "pause", "resume",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "--help lacks {cmd}:\n{text}"
        );
    }
}

#[test]
fn closed_stdout_is_not_a_panic() {
    let env = env();
    let file = write_batch(
        &env,
        "b.jsonl",
        (0..3000).map(|i| format!(r#"{{"i":{i}}}"#)),
    );
    env.ok(&["submit", "plain", "--batch", &file]);
    let mut child = env
        .cmd(&["tasks", "--json", "--limit", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, as with `| head -1`
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn man_pages_and_completions_are_generated_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = std::process::Command::new(common::BIN)
        .args(["generate", "man"])
        .arg(&man)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(man.join("taskd.1")).expect("taskd.1 written");
    assert!(page.contains(".TH taskd"), "a roff man page");
    for sub in ["submit", "status", "reload", "retry"] {
        assert!(man.join(format!("taskd-{sub}.1")).exists(), "taskd-{sub}.1");
    }
    let submit = std::fs::read_to_string(man.join("taskd-submit.1")).unwrap();
    assert!(
        submit.contains("\\-\\-delay") || submit.contains("--delay"),
        "submit's page documents --delay"
    );

    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(common::BIN)
            .args(["generate", "completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("submit") && script.contains("reload"),
            "{shell} completion knows the subcommands"
        );
    }
    // The bash script must at least parse.
    let script = std::process::Command::new(common::BIN)
        .args(["generate", "completions", "bash"])
        .output()
        .unwrap()
        .stdout;
    let path = dir.path().join("taskd.bash");
    std::fs::write(&path, script).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap();
    assert!(check.success(), "bash -n rejects the completion script");
}

/// `submit --json --wait` prints one JSON document, the finished task as `show --json`
/// prints it, for the broker and through the API, on success (exit 0) and failure (exit 4).
#[test]
fn submit_json_wait_prints_one_document() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n\
         [queues.ok]\nshell = 'echo done'\n\n\
         [queues.bad]\nshell = 'echo broken >&2; exit 9'\nmax_attempts = 1\n",
    );
    let d = env.daemon();
    let url = d.api_base();
    for (queue, code, state) in [("ok", 0, "succeeded"), ("bad", 4, "failed")] {
        for remote in [false, true] {
            let mut args = vec!["submit", queue, "--json", "--wait"];
            if remote {
                args.extend(["--server", url.as_str()]);
            }
            let out = env.run(&args);
            assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
            let text = stdout(&out);
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{args:?} printed no single JSON document ({e}):\n{text}")
            });
            assert_eq!(v["state"], state, "{args:?}: {v:#}");
            let id = v["id"].as_str().expect("the record's id");
            assert_eq!(v, env.show(id), "{args:?}: the record `show --json` prints");
            assert_eq!(v["history"].as_array().map(Vec::len), Some(1), "{v:#}");
        }
    }
}

/// A task cancelled while it runs and then retried starts a fresh attempt budget, so its
/// program sees TASKD_ATTEMPT=1 twice: `show` numbers the runs in order and says where
/// TASKD_ATTEMPT differs, instead of printing two "attempt 1".
#[test]
fn show_numbers_runs_in_order_after_a_cancel_and_a_retry() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n\
         [queues.q]\nshell = 'echo \"run as attempt $TASKD_ATTEMPT\"; if [ -e done ]; then exit 0; fi; touch done; sleep 30'\n\
         cwd = \".\"\n",
    );
    let _d = env.daemon();
    let id = env.submit("q", "{}");
    env.wait_state(&id, "running", std::time::Duration::from_secs(20));
    env.ok(&["cancel", &id]);
    env.wait_state(&id, "cancelled", std::time::Duration::from_secs(20));
    env.ok(&["retry", &id]);
    let v = env.wait_state(&id, "succeeded", std::time::Duration::from_secs(20));
    let numbers: Vec<u64> = common::history(&v)
        .iter()
        .map(|a| a["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, [1, 1], "TASKD_ATTEMPT as recorded: {v:#}");
    let text = env.ok(&["show", &id]);
    let headings: Vec<&str> = text.lines().filter(|l| l.starts_with("attempt ")).collect();
    assert_eq!(headings.len(), 2, "{text}");
    assert!(
        headings[0].starts_with("attempt 1 — cancelled"),
        "{}",
        headings[0]
    );
    assert!(
        headings[1].starts_with("attempt 2 (TASKD_ATTEMPT=1) — exit, exit code 0"),
        "{}",
        headings[1]
    );
}

/// The subcommands listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A wrapped description is indented further than the names.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every option and argument of every command says what it is for in `-h`.
#[test]
fn every_option_of_every_command_has_help_text() {
    let help = |path: &[String]| {
        let out = Command::new(common::BIN)
            .args(path)
            .arg("-h")
            .output()
            .expect("run taskd -h");
        assert!(out.status.success(), "{path:?} -h: {out:?}");
        stdout(&out)
    };
    let mut todo: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|c| vec![c])
        .collect();
    assert!(todo.len() >= 10, "{todo:?}");
    let mut bare = Vec::new();
    while let Some(path) = todo.pop() {
        let text = help(&path);
        for sub in subcommands(&text) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        for line in text.lines() {
            let t = line.trim_start();
            let is_entry = line.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'));
            // `  --flag <VALUE>  description`: the description follows two spaces.
            if is_entry && t.split_once("  ").is_none_or(|(_, d)| d.trim().is_empty()) {
                bare.push(format!("taskd {} {t}", path.join(" ")));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "options without help text:\n{}",
        bare.join("\n")
    );
}
