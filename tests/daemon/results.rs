//! Results, on each backend: what an exec task writes to `$TASKD_RESULT_FILE` and what a
//! long-lived worker's `ok` carries, stored with the task and shown by `show`, `result`,
//! `submit --wait` and the API. (A child module of `cases`: it shares its helpers.)

use super::*;

/// The config with the API on a free loopback port (for `--server`).
fn with_api(case: &Case, body: &str) -> String {
    config_text(case, "5s", body).replacen("[taskd]\n", "[taskd]\nlisten = \"127.0.0.1:0\"\n", 1)
}

/// An exec queue whose task returns what its payload's `kind` says, after writing the
/// result file's path to `$D/path-<id>` and printing the file's mode.
const RESULTS_QUEUE: &str = r#"
[queues.r]
max_result = "1KiB"
max_attempts = 3
shell = '''
echo "$TASKD_RESULT_FILE" > "$D/path-$TASKD_TASK_ID"
stat -c '%a' "$TASKD_RESULT_FILE"
case "$TASKD_ARG_kind" in
json) printf '{"sum": 3, "big": 123456789012345678901234567890}\n' > "$TASKD_RESULT_FILE" ;;
text) printf 'done: 3 files\n\n' > "$TASKD_RESULT_FILE" ;;
bytes) printf 'caf\351 \377\033[2J' > "$TASKD_RESULT_FILE" ;;
nothing) ;;
long) head -c 1024 /dev/zero | tr '\0' x > "$TASKD_RESULT_FILE" ;;
big) head -c 2000 /dev/zero | tr '\0' x > "$TASKD_RESULT_FILE" ;;
link) rm "$TASKD_RESULT_FILE"; ln -s "$D/secret" "$TASKD_RESULT_FILE" ;;
fail) echo '"partial"' > "$TASKD_RESULT_FILE"; exit 3 ;;
esac
'''

[queues.off]
max_result = 0
shell = 'echo "[${TASKD_RESULT_FILE-unset}]"'
"#;

/// `taskd ARGS`: (exit code, stdout, stderr).
fn outcome(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let out = env.run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `result` line of `taskd show ID` (without its label), if it has one.
fn shown_result(env: &Env, id: &str) -> Option<String> {
    env.ok(&["show", id])
        .lines()
        .find_map(|l| l.strip_prefix("result    ").map(str::to_string))
}

#[test]
fn an_exec_task_returns_what_it_writes_to_its_result_file() {
    let Some(env) = Case::new() else { return };
    std::fs::write(&env.config, with_api(&env, RESULTS_QUEUE)).unwrap();
    std::fs::write(env.path().join("secret"), "\"the daemon's secret\"").unwrap();
    let d = env.daemon();
    let url = d.api_base();
    let kinds = [
        "json", "text", "bytes", "nothing", "long", "big", "link", "fail",
    ];
    let ids: Vec<String> = kinds
        .iter()
        .map(|k| submit(&env, "r", &json!({ "kind": k }), &[]))
        .collect();
    let done: Vec<Value> = ids.iter().map(|id| wait_done(&env, id, secs(30))).collect();
    let by_kind = |k: &str| {
        let i = kinds.iter().position(|x| *x == k).unwrap();
        (ids[i].as_str(), &done[i])
    };
    // Each attempt had a file of its own, the task's alone, removed once it ended. The
    // files are under `state/results`, or on the tmpfs directory it links to.
    let link = env.path().join("state/results");
    let root = std::fs::read_link(&link).unwrap_or(link);
    for (id, v) in ids.iter().zip(&done) {
        let path = std::fs::read_to_string(env.path().join(format!("path-{id}"))).unwrap();
        let path = Path::new(path.trim());
        assert!(path.starts_with(&root), "{path:?} not under {root:?}");
        assert!(!path.exists(), "{path:?} was left behind: {v:#}");
        assert!(
            history(v)[0]["stdout_tail"]
                .as_str()
                .unwrap()
                .starts_with("600\n"),
            "the file is mode 0600: {v:#}"
        );
    }

    // Valid JSON is that JSON (numbers as written); `result` prints it on one line.
    let (id, v) = by_kind("json");
    assert_eq!(v["state"], "succeeded", "{v:#}");
    const JSON: &str = r#"{"big":123456789012345678901234567890,"sum":3}"#;
    assert_eq!(v["result"].to_string(), JSON);
    assert_eq!(
        outcome(&env, &["result", id]),
        (Some(0), format!("{JSON}\n"), String::new())
    );
    assert_eq!(shown_result(&env, id).as_deref(), Some(JSON));
    let api: Value = ureq::get(&format!("{url}/api/v1/tasks/{id}"))
        .call()
        .expect("the API answers")
        .into_json()
        .expect("JSON");
    assert_eq!(api["result"].to_string(), JSON, "the API's task object");
    // Other text is a string, without its trailing newlines.
    let (id, v) = by_kind("text");
    assert_eq!(v["result"], "done: 3 files", "{v:#}");
    assert_eq!(
        outcome(&env, &["result", id]).1,
        "\"done: 3 files\"\n",
        "a JSON string"
    );
    // Invalid UTF-8 is replaced; a control character is escaped for the terminal.
    let (id, v) = by_kind("bytes");
    assert_eq!(v["result"], "caf\u{fffd} \u{fffd}\u{1b}[2J", "{v:#}");
    let printed = outcome(&env, &["result", id]).1;
    assert_eq!(printed, "\"caf\u{fffd} \u{fffd}\\u001b[2J\"\n");
    assert_eq!(
        serde_json::from_str::<Value>(&printed).unwrap(),
        v["result"],
        "what `result` prints reads back as the result"
    );
    // Nothing written: no result; `result` prints nothing and says the task succeeded.
    let (id, v) = by_kind("nothing");
    assert_eq!(
        (&v["state"], &v["result"]),
        (&json!("succeeded"), &Value::Null)
    );
    assert_eq!(
        outcome(&env, &["result", id]),
        (Some(0), String::new(), String::new())
    );
    assert_eq!(shown_result(&env, id), None);
    // Exactly max_result is kept: `show` cuts it, `result` prints it whole.
    let (id, v) = by_kind("long");
    let x1024 = "x".repeat(1024);
    assert_eq!(v["result"], x1024.as_str(), "{v:#}");
    assert_eq!(outcome(&env, &["result", id]).1, format!("\"{x1024}\"\n"));
    let shown = shown_result(&env, id).unwrap();
    assert!(
        shown.starts_with(&format!("\"{}", "x".repeat(999)))
            && shown.ends_with(&format!(
                "… (1026 bytes in all; `taskd result {id}` prints it whole)"
            )),
        "{shown}"
    );
    // Over max_result: failed at once, not retried, and the error says why.
    let (id, v) = by_kind("big");
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(history(v).len(), 1, "not retried: {v:#}");
    assert_eq!(history(v)[0]["reason"], "result");
    assert_eq!(history(v)[0]["exit_code"], 0);
    assert_eq!(v["result"], Value::Null);
    let error = v["last_error"].as_str().unwrap();
    assert!(
        error.contains("too big")
            && error.contains("2000 bytes")
            && error.contains("max_result (1KiB)"),
        "{error}"
    );
    let (code, out, err) = outcome(&env, &["result", id]);
    assert_eq!((code, out.as_str()), (Some(4), ""));
    assert!(
        err.contains(&format!("task {id} failed after 1 attempt(s): ")) && err.contains(error),
        "{err}"
    );
    // A symbolic link swapped in is not followed: the task fails, the secret stays put.
    let (id, v) = by_kind("link");
    assert_eq!(
        (&v["state"], &history(v)[0]["reason"]),
        (&json!("failed"), &json!("result")),
        "{v:#}"
    );
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("replaced by a symbolic link"),
        "{v:#}"
    );
    assert!(!v.to_string().contains("daemon's secret"), "{v:#}");
    assert!(!env.ok(&["show", id]).contains("the daemon's secret"));
    assert!(env.path().join("secret").exists());
    // `max_result = 0`: no result file at all.
    let id = submit(&env, "off", &json!({}), &[]);
    let v = env.wait_state(&id, "succeeded", secs(30));
    assert_eq!(history(&v)[0]["stdout_tail"], "[unset]\n", "{v:#}");
    assert_eq!(v["result"], Value::Null);
    // A failed run keeps no result and is retried as usual.
    let (id, v) = by_kind("fail");
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(history(v).len(), 3, "retried: {v:#}");
    assert_eq!(v["result"], Value::Null);
    assert_eq!(outcome(&env, &["result", id]).0, Some(4));
}

#[test]
fn result_waits_and_its_exit_code_says_how_the_task_ended() {
    let Some(env) = Case::new() else { return };
    std::fs::write(
        &env.config,
        with_api(
            &env,
            r#"
[queues.slow]
concurrency = 2
shell = '''
while [ ! -e "$D/go-$TASKD_ARG_n" ]; do sleep 0.02; done
printf '{"n": %s}' "$TASKD_ARG_n" > "$TASKD_RESULT_FILE"
'''
"#,
        ),
    )
    .unwrap();
    let d = env.daemon();
    let url = d.api_base();
    let id = submit(&env, "slow", &json!({"n": 1}), &[]);
    env.wait_state(&id, "running", secs(20));

    // Not finished: exit 1, with a message; --json says the state.
    for remote in [false, true] {
        let mut args = vec!["result", id.as_str()];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let (code, out, err) = outcome(&env, &args);
        assert_eq!((code, out.as_str()), (Some(1), ""), "{args:?}: {err}");
        assert_eq!(
            err,
            format!("taskd: task {id} has not finished: it is running (--wait waits for it)\n")
        );
    }
    let (code, out, _) = outcome(&env, &["result", &id, "--json"]);
    assert_eq!(code, Some(1));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({"id": id, "state": "running", "result": null, "error": null})
    );
    // A timeout that passes: exit 1 once it has.
    let began = Instant::now();
    let (code, _, err) = outcome(&env, &["result", &id, "--timeout", "400ms"]);
    assert!(began.elapsed() >= Duration::from_millis(400));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("after waiting 400ms (--timeout)"), "{err}");
    // Unknown and malformed ids are usage errors (2).
    let unknown = "01a20000-0000-7000-8000-000000000000";
    for remote in [false, true] {
        let mut args = vec!["result", unknown];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let (code, _, err) = outcome(&env, &args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(err.contains(&format!("no task with id {unknown}")), "{err}");
    }
    assert_eq!(outcome(&env, &["result", "nope"]).0, Some(2));

    // --wait returns once the task has finished, with its result.
    let waiters: Vec<std::process::Child> = [vec![], vec!["--server", url.as_str()]]
        .iter()
        .map(|extra| {
            let mut args = vec!["result", id.as_str(), "--wait"];
            args.extend(extra.iter().copied());
            env.cmd(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::fs::write(env.path().join("go-1"), "").unwrap();
    for w in waiters {
        let out = w.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"n\":1}\n");
    }
    let (code, out, _) = outcome(&env, &["result", &id, "--json", "--server", &url]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"id": id, "state": "succeeded", "result": {"n": 1}, "error": null})
    );
    // Cancelled: exit 4, the error on stderr.
    let id = submit(&env, "slow", &json!({"n": 2}), &[]);
    env.wait_state(&id, "running", secs(20));
    env.ok(&["cancel", &id]);
    let (code, out, err) = outcome(&env, &["result", &id, "--wait", "--timeout", "20s"]);
    assert_eq!((code, out.as_str()), (Some(4), ""), "{err}");
    assert!(
        err.starts_with(&format!("taskd: task {id} cancelled after ")),
        "{err}"
    );
    let (code, out, _) = outcome(&env, &["result", &id, "--json"]);
    assert_eq!(code, Some(4));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v["state"], &v["result"]),
        (&json!("cancelled"), &Value::Null)
    );
    assert!(v["error"].as_str().unwrap().contains("cancelled"), "{v}");
}

#[test]
fn submit_wait_prints_the_result_after_the_outcome() {
    let Some(env) = Case::new() else { return };
    std::fs::write(&env.config, with_api(&env, RESULTS_QUEUE)).unwrap();
    let d = env.daemon();
    let url = d.api_base();
    for remote in [false, true] {
        let mut args = vec!["submit", "r", r#"{"kind":"json"}"#, "--wait"];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let (code, out, err) = outcome(&env, &args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let id = lines[0];
        assert_eq!(lines[1], "600", "the task's output");
        assert_eq!(
            lines[2],
            r#"result: {"big":123456789012345678901234567890,"sum":3}"#
        );
        assert_eq!(
            err,
            format!("taskd: task {id} succeeded after 1 attempt(s)\n")
        );
        // Without a result, no result line.
        let mut args = vec!["submit", "r", r#"{"kind":"nothing"}"#, "--wait"];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let (code, out, _) = outcome(&env, &args);
        assert_eq!(code, Some(0));
        assert!(!out.contains("result:"), "{out}");
        // --json: the final record holds it.
        let mut args = vec!["submit", "r", r#"{"kind":"text"}"#, "--wait", "--json"];
        if remote {
            args.extend(["--server", url.as_str()]);
        }
        let (code, out, _) = outcome(&env, &args);
        assert_eq!(code, Some(0));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["result"], "done: 3 files", "{v:#}");
    }
}

/// A worker built on contrib/python/taskd_worker.py: the function's return value is the
/// result. And a worker written before results (it never sends one) still works.
#[test]
fn a_workers_ok_carries_the_functions_return_value() {
    let Some(env) = Case::new() else { return };
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/python");
    let worker = r#"
import os, sys
sys.path.insert(0, os.environ["HELPER_DIR"])
import taskd_worker

@taskd_worker.task
def handle(payload, job):
    what = payload["return"]
    if what == "dict":
        return {"id": job.id, "n": 123456789012345678901234567890, "s": "é ✓"}
    if what == "none":
        return None
    if what == "big":
        return "x" * 2000
    if what == "set":
        return {1, 2}
    return what

taskd_worker.run()
"#;
    // Protocol 1 as written before results: an `ok` with nothing more.
    let old = r#"
import json, os
tasks = os.fdopen(3, "rb")
os.write(4, b'{"type":"ready","protocol":1}\n')
for line in tasks:
    msg = json.loads(line)
    os.write(4, (json.dumps({"type": "result", "id": msg["id"], "status": "ok"}) + "\n").encode())
"#;
    std::fs::write(env.path().join("w.py"), worker).unwrap();
    std::fs::write(env.path().join("old.py"), old).unwrap();
    let body = format!(
        r#"
[queues.w]
worker = ["python3", "@D@/w.py"]
start_secs = "100ms"
max_result = "1KiB"
max_attempts = 3
env = {{ D = '@D@', HELPER_DIR = '{}' }}

[queues.old]
worker = ["python3", "@D@/old.py"]
start_secs = "100ms"
"#,
        helper.display()
    );
    write_config(&env, "5s", &body);
    let _d = env.daemon();
    let submit_w = |what: &str| submit(&env, "w", &json!({ "return": what }), &[]);
    let dict = submit_w("dict");
    let v = env.wait_state(&dict, "succeeded", secs(30));
    assert_eq!(
        v["result"].to_string(),
        format!(r#"{{"id":"{dict}","n":123456789012345678901234567890,"s":"é ✓"}}"#)
    );
    assert_eq!(history(&v)[0]["reason"], "result");
    assert_eq!(
        outcome(&env, &["result", &dict]).1,
        format!("{}\n", v["result"])
    );
    let none = submit_w("none");
    let v = env.wait_state(&none, "succeeded", secs(30));
    assert_eq!(v["result"], Value::Null);
    let zero = submit(&env, "w", &json!({ "return": 0 }), &[]);
    assert_eq!(env.wait_state(&zero, "succeeded", secs(30))["result"], 0);
    // Over max_result: failed at once, like a file that is too big.
    let big = submit_w("big");
    let v = env.wait_state(&big, "failed", secs(30));
    assert_eq!(history(&v).len(), 1, "not retried: {v:#}");
    assert_eq!(history(&v)[0]["reason"], "result");
    let error = v["last_error"].as_str().unwrap();
    assert!(
        error.contains("the worker's result holds 2002 bytes, over max_result (1KiB)"),
        "{error}"
    );
    // A value JSON cannot hold: the helper fails the task (not retried) and says why.
    let set = submit_w("set");
    let v = env.wait_state(&set, "failed", secs(30));
    assert_eq!(history(&v).len(), 1, "{v:#}");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("return value is not JSON: TypeError"),
        "{v:#}"
    );
    // The worker lives on after each of these.
    let after = submit_w("dict");
    env.wait_state(&after, "succeeded", secs(30));

    let id = submit(&env, "old", &json!({}), &[]);
    let v = env.wait_state(&id, "succeeded", secs(30));
    assert_eq!(v["result"], Value::Null, "{v:#}");
    assert_eq!(
        outcome(&env, &["result", &id]),
        (Some(0), String::new(), String::new())
    );
}
