//! Long-lived workers under a real daemon with real worker processes: the Python
//! helper (contrib/python/taskd_worker.py) and the bash example (contrib/bash/worker.sh).
//! Crash, hang, garbage, recycling, FATAL, reload and kill -9 of the daemon.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// A Python worker built on the helper. Its behaviour is chosen by the payload's `do`:
/// "echo" (default), "crash" (on the first attempt), "hang" (starts a `sleep` in its group,
/// writes both pids, then sleeps), "garbage", "grow" (keeps 64 MiB). Every task sends a
/// progress message, prints a stray line on stdout and one on stderr, and its worker pid.
const PY_WORKER: &str = r#"
import os, sys, time
sys.path.insert(0, os.environ["HELPER_DIR"])
import taskd_worker

hoard = []

@taskd_worker.task
def handle(payload, job):
    taskd_worker.progress("started")
    print("stray print from", os.getpid(), "payload", payload.get("n"))
    sys.stderr.write("to stderr\n")
    what = payload.get("do", "echo")
    d = os.environ["D"]
    if what == "crash" and job.attempt == 1:
        os._exit(3)
    if what == "hang":
        import subprocess
        child = subprocess.Popen(["sleep", "60"])
        with open(os.path.join(d, "hang-pids"), "w") as f:
            f.write("%d %d\n" % (os.getpid(), child.pid))
        time.sleep(60)
    if what == "garbage":
        os.write(4, b"this is not json at all\n")
        time.sleep(60)
    if what == "grow":
        hoard.append(bytearray(64 * 1024 * 1024))
    if what == "block":
        import subprocess
        child = subprocess.Popen(["sleep", "60"])
        with open(os.path.join(d, "pid-%s" % payload["n"]), "w") as f:
            f.write("%d %d\n" % (os.getpid(), child.pid))
        while os.path.exists(os.path.join(d, "block")):
            time.sleep(0.02)
    if what == "len":
        print("blob of", len(payload["blob"]))
    if what == "fail":
        raise taskd_worker.Fail("bad payload")
    if what == "retry":
        raise taskd_worker.Retry("try later")

taskd_worker.run()
"#;

/// An env whose `[queues.w]` runs the Python worker, with `extra` settings.
fn py_env(extra: &str) -> Env {
    let env = Env::new("");
    env.rewrite(&py_queue(&env, extra));
    std::fs::write(env.path().join("w.py"), PY_WORKER).unwrap();
    env
}

fn py_queue(env: &Env, extra: &str) -> String {
    let d = env.path().display().to_string();
    format!(
        "[queues.w]\nworker = [\"python3\", \"{d}/w.py\"]\nstart_secs = \"100ms\"\nkill_grace = \"1s\"\n\
         backoff = {{ kind = \"fixed\", base = \"1s\" }}\n\
         env = {{ D = '{d}', HELPER_DIR = '{}' }}\n{extra}\n",
        contrib("python").display()
    )
}

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.ok(&["status", "--json"])).expect("status --json is JSON")
}

fn workers(env: &Env) -> Vec<Value> {
    status(env)["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The pids of the queue's RUNNING workers, once `n` of them are.
fn running_pids(env: &Env, n: usize) -> Vec<i64> {
    let mut pids = Vec::new();
    let ok = poll(secs(20), || {
        pids = workers(env)
            .iter()
            .filter(|w| w["state"] == "running")
            .filter_map(|w| w["pid"].as_i64())
            .collect();
        pids.len() == n
    });
    assert!(ok, "{n} workers did not get RUNNING: {:#?}", workers(env));
    pids
}

fn stdout_of(v: &Value, attempt: usize) -> String {
    history(v)[attempt]["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn worker_pid_of(v: &Value, attempt: usize) -> i64 {
    history(v)[attempt]["pid"].as_i64().expect("a pid")
}

#[test]
fn python_worker_runs_tasks_and_stray_prints_are_their_output() {
    let env = Env::new("");
    let logs = env.path().join("logs");
    env.rewrite(&py_queue(
        &env,
        &format!(
            "concurrency = 2\nmax_attempts = 2\nlog_dir = \"{}\"",
            logs.display()
        ),
    ));
    std::fs::write(env.path().join("w.py"), PY_WORKER).unwrap();
    let _d = env.daemon();
    let ids: Vec<String> = submit_batch(
        &env,
        "w",
        &(0..20).map(|n| json!({ "n": n })).collect::<Vec<_>>(),
    );
    for (n, id) in ids.iter().enumerate() {
        let v = env.wait_state(id, "succeeded", secs(20));
        let h = history(&v);
        assert_eq!(h.len(), 1, "{v:#}");
        assert_eq!(h[0]["reason"], "result", "{v:#}");
        let out = stdout_of(&v, 0);
        assert!(
            out.starts_with("stray print from ") && out.ends_with(&format!("payload {n}\n")),
            "the task's stdout is its output, uncorrupted: {out:?}"
        );
        assert_eq!(h[0]["stderr_tail"], "to stderr\n", "{v:#}");
        let file = std::fs::read_to_string(logs.join(format!("{id}.1.out"))).unwrap();
        assert_eq!(file, out, "log_dir keeps the task's full output");
    }
    // Two workers served them all, without restarts.
    let pids: std::collections::BTreeSet<i64> = ids
        .iter()
        .map(|id| worker_pid_of(&env.show(id), 0))
        .collect();
    assert!(
        pids.len() <= 2,
        "more worker processes than slots: {pids:?}"
    );
    // Status lists both workers and counts the tasks they answered (refreshed each second).
    let mut ws = Vec::new();
    assert!(
        poll(secs(5), || {
            ws = workers(&env);
            ws.iter()
                .map(|w| w["tasks_done"].as_u64().unwrap_or(0))
                .sum::<u64>()
                == 20
        }),
        "status counts the tasks done: {ws:#?}"
    );
    assert_eq!(ws.len(), 2, "{ws:#?}");
    for w in &ws {
        assert_eq!(w["queue"], "w");
        assert_eq!(w["state"], "running");
        assert!(w["uptime_s"].is_u64(), "{w}");
        let pid = w["pid"].as_i64().unwrap();
        assert!(alive(pid as i32), "{w}");
        if w["tasks_done"].as_u64().unwrap_or(0) > 0 {
            assert!(pids.contains(&pid), "{w} {pids:?}");
        }
    }
    let text = env.ok(&["status"]);
    assert!(text.contains("w/0") && text.contains("RUNNING"), "{text}");

    // A payload much bigger than a pipe's buffer.
    let blob = "x".repeat(600 * 1024);
    let big = submit_batch(&env, "w", &[json!({ "do": "len", "blob": blob })]).remove(0);
    let v = env.wait_state(&big, "succeeded", secs(20));
    assert!(
        stdout_of(&v, 0).ends_with("blob of 614400\n"),
        "{}",
        stdout_of(&v, 0)
    );

    // error fails at once; retry follows the retry policy.
    let fail = env.submit("w", r#"{"do":"fail"}"#);
    let v = env.wait_state(&fail, "failed", secs(10));
    assert_eq!(history(&v).len(), 1, "not retried: {v:#}");
    assert!(
        v["last_error"].as_str().unwrap().contains("bad payload"),
        "{v:#}"
    );
    let retry = env.submit("w", r#"{"do":"retry"}"#);
    let v = env.wait_state(&retry, "failed", secs(15));
    assert_eq!(history(&v).len(), 2, "retried up to max_attempts: {v:#}");
    assert!(
        v["last_error"].as_str().unwrap().contains("try later"),
        "{v:#}"
    );
}

#[test]
fn a_worker_that_dies_mid_task_fails_the_attempt_with_crash_and_is_restarted() {
    let env = py_env("max_attempts = 3");
    let d = env.daemon();
    let first = running_pids(&env, 1)[0];
    let id = env.submit("w", r#"{"do":"crash"}"#);
    let v = env.wait_state(&id, "succeeded", secs(20));
    let h = history(&v);
    assert_eq!(h.len(), 2, "{v:#}");
    assert_eq!(h[0]["reason"], "crash", "{v:#}");
    assert!(
        h[0]["error"].as_str().unwrap().contains("exit code 3"),
        "the crash says how the worker ended: {v:#}"
    );
    assert_eq!(h[1]["reason"], "result", "{v:#}");
    assert_eq!(worker_pid_of(&v, 0), first);
    assert_ne!(worker_pid_of(&v, 1), first, "the worker was restarted");
    assert!(!alive(first as i32));
    let w = &workers(&env)[0];
    assert!(
        w["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 3"),
        "status shows the last exit: {w}\n{}",
        d.log_text()
    );
}

#[test]
fn a_task_over_its_timeout_kills_the_workers_group_and_restarts_it() {
    let env = py_env("timeout = \"1s\"\nmax_attempts = 1");
    let _d = env.daemon();
    let id = env.submit("w", r#"{"do":"hang"}"#);
    let pids = wait_line(&env.path().join("hang-pids"), secs(20));
    let pids: Vec<i32> = pids.split(' ').map(|p| p.parse().unwrap()).collect();
    let v = env.wait_state(&id, "failed", secs(20));
    let h = history(&v);
    assert_eq!(h[0]["reason"], "timeout", "{v:#}");
    assert!(
        poll(secs(5), || pids.iter().all(|&p| !alive(p))),
        "the worker and the child in its group must be gone: {pids:?}"
    );
    // A new worker takes the next task.
    let next = env.submit("w", "{}");
    let v = env.wait_state(&next, "succeeded", secs(20));
    assert_ne!(worker_pid_of(&v, 0) as i32, pids[0]);
}

#[test]
fn garbage_on_the_result_pipe_is_a_protocol_error_shown_in_the_log() {
    let env = py_env("max_attempts = 1");
    let d = env.daemon();
    let first = running_pids(&env, 1)[0];
    let id = env.submit("w", r#"{"do":"garbage"}"#);
    let v = env.wait_state(&id, "failed", secs(20));
    let h = history(&v);
    assert_eq!(h[0]["reason"], "protocol", "{v:#}");
    assert!(
        h[0]["error"]
            .as_str()
            .unwrap()
            .contains("this is not json at all"),
        "{v:#}"
    );
    assert!(
        d.log_text().contains("this is not json at all"),
        "the log shows the offending line:\n{}",
        d.log_text()
    );
    assert!(poll(secs(5), || !alive(first as i32)), "restarted");
    let next = env.submit("w", "{}");
    let v = env.wait_state(&next, "succeeded", secs(20));
    assert_ne!(worker_pid_of(&v, 0), first);
}

#[test]
fn max_tasks_per_worker_recycles_the_worker() {
    let env = py_env("max_tasks_per_worker = 3");
    let _d = env.daemon();
    let mut pids = Vec::new();
    for n in 0..7 {
        let id = env.submit("w", &json!({ "n": n }).to_string());
        let v = env.wait_state(&id, "succeeded", secs(20));
        pids.push(worker_pid_of(&v, 0));
    }
    assert_eq!(pids[0], pids[1]);
    assert_eq!(pids[1], pids[2]);
    assert_ne!(pids[2], pids[3], "recycled after 3 tasks: {pids:?}");
    assert_eq!(pids[3], pids[5]);
    assert_ne!(pids[5], pids[6], "{pids:?}");
}

#[test]
fn max_worker_memory_recycles_the_worker_after_its_task() {
    let env = py_env("max_worker_memory = \"48MiB\"");
    let d = env.daemon();
    let a = env.submit("w", "{}");
    let pa = worker_pid_of(&env.wait_state(&a, "succeeded", secs(20)), 0);
    let b = env.submit("w", r#"{"do":"grow"}"#);
    let vb = env.wait_state(&b, "succeeded", secs(20));
    assert_eq!(worker_pid_of(&vb, 0), pa, "small tasks keep the worker");
    let c = env.submit("w", "{}");
    let pc = worker_pid_of(&env.wait_state(&c, "succeeded", secs(20)), 0);
    assert_ne!(pc, pa, "recycled after the task that grew it");
    assert!(
        d.log_text().contains("max_worker_memory"),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_worker_that_cannot_start_is_fatal_and_its_tasks_wait_uncharged() {
    let env = Env::new(
        "[queues.w]\nworker = [\"sh\", \"-c\", \"echo starting; exit 7\"]\nstart_secs = \"100ms\"\nstart_retries = 2\n",
    );
    let d = env.daemon();
    let id = env.submit("w", "{}");
    let mut last = Vec::new();
    let fatal = poll(secs(20), || {
        last = workers(&env);
        last.first().is_some_and(|w| w["state"] == "fatal")
    });
    assert!(fatal, "{last:#?}\n{}", d.log_text());
    let why = last[0]["why"].as_str().unwrap_or("");
    assert!(
        why.contains("2 failed starts") && why.contains("exit code 7"),
        "{why}"
    );
    let text = env.ok(&["status"]);
    assert!(text.contains("FATAL"), "{text}");
    assert!(
        text.contains("workers FATAL (see below): tasks wait"),
        "{text}"
    );
    let v = env.show(&id);
    assert_eq!(v["state"], "queued", "{v:#}");
    assert_eq!(v["attempts"], 0, "{v:#}");
    assert!(history(&v).is_empty(), "{v:#}");

    // Fixed and reloaded: the worker starts and the task runs, on its first attempt.
    let d2 = env.path().display().to_string();
    std::fs::write(env.path().join("w.py"), PY_WORKER).unwrap();
    env.rewrite(&format!(
        "[queues.w]\nworker = [\"python3\", \"{d2}/w.py\"]\nstart_secs = \"100ms\"\nenv = {{ D = '{d2}', HELPER_DIR = '{}' }}\n",
        contrib("python").display()
    ));
    env.ok(&["reload"]);
    let v = env.wait_state(&id, "succeeded", secs(20));
    assert_eq!(v["attempts"], 1, "{v:#}");
}

/// A worker that cannot start says why on stderr ("can't open file", an import error): its
/// last lines reach `status --json`, the status table and its "why", the API, and the daemon
/// log's failed-start line, not only the log's stream of output.
#[test]
fn a_fatal_workers_why_shows_what_it_wrote_on_stderr() {
    let script =
        "import sys\nprint('loading settings', file=sys.stderr)\nimport nosuchmodule_taskd_test\n";
    let env = Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n\n\
         [queues.missing]\nworker = [\"python3\", \"/nonexistent/dir/worker.py\"]\nstart_retries = 1\n\n\
         [queues.import]\nworker = [\"python3\", \"-c\", {script:?}]\nstart_retries = 2\n\n\
         [queues.noprog]\nworker = [\"/nonexistent/bin/worker\"]\nstart_retries = 1\n"
    ));
    let d = env.daemon();
    let mut last = Vec::new();
    let fatal = poll(secs(30), || {
        last = workers(&env);
        last.len() == 3 && last.iter().all(|w| w["state"] == "fatal")
    });
    assert!(fatal, "{last:#?}\n{}", d.log_text());
    let of = |q: &str| {
        last.iter()
            .find(|w| w["queue"] == q)
            .cloned()
            .expect("the worker is listed")
    };
    let stderr = |w: &Value| -> Vec<String> {
        w["last_stderr"]
            .as_array()
            .unwrap_or_else(|| panic!("no last_stderr: {w:#}"))
            .iter()
            .map(|l| l.as_str().expect("a line").to_string())
            .collect()
    };
    let cases = [
        ("missing", "can't open file '/nonexistent/dir/worker.py'"),
        ("import", "No module named 'nosuchmodule_taskd_test'"),
    ];
    for (queue, cause) in cases {
        let w = of(queue);
        let lines = stderr(&w);
        assert!(
            lines.last().is_some_and(|l| l.contains(cause)),
            "{queue}: {lines:#?}"
        );
        let why = w["why"].as_str().unwrap_or("");
        assert!(
            why.contains(cause),
            "{queue}: the why hides the cause: {why}"
        );
        assert!(w["pid"].is_null(), "a FATAL worker has no process: {w:#}");
    }
    assert!(
        stderr(&of("import")).contains(&"loading settings".to_string()),
        "earlier lines are kept too"
    );
    // A program that does not exist never writes a line: its why names it.
    let w = of("noprog");
    assert!(stderr(&w).is_empty(), "{w:#}");
    assert!(
        w["why"]
            .as_str()
            .is_some_and(|y| y.contains("program not found: /nonexistent/bin/worker")),
        "{w:#}"
    );
    // The table and the lines under it.
    let text = env.ok(&["status"]);
    for (queue, cause) in cases {
        assert!(
            text.contains(&format!("{queue}/0 wrote on stderr before it last ended:")),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("│ {queue}/0 ")))
            .unwrap_or_else(|| panic!("no row for {queue}/0:\n{text}"));
        assert!(row.contains(cause), "{row}");
    }
    // The API lists the same.
    let api = d.api_base();
    let v: Value = serde_json::from_str(&env.ok(&["status", "--server", &api, "--json"]))
        .expect("the API answers JSON");
    let ws = v["workers"].as_array().expect("workers");
    for (queue, cause) in cases {
        let w = ws
            .iter()
            .find(|w| w["queue"] == queue)
            .unwrap_or_else(|| panic!("{v:#}"));
        assert!(stderr(w).last().is_some_and(|l| l.contains(cause)), "{w:#}");
    }
    // The log's failed-start line names it as well.
    assert!(
        d.log_text()
            .lines()
            .any(|l| l.contains("worker failed to start")
                && l.contains("No module named 'nosuchmodule_taskd_test'")),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_reload_that_changes_the_command_restarts_workers_one_at_a_time() {
    let env = py_env("concurrency = 3");
    let d = env.daemon();
    let before = running_pids(&env, 3);
    env.rewrite(
        &py_queue(&env, "concurrency = 3\nenv_inherit = [\"TERM\"]")
            .replace("python3\",", "python3\", \"-u\","),
    );
    env.ok(&["reload"]);
    let mut after = Vec::new();
    assert!(
        poll(secs(30), || {
            after = running_pids(&env, 3);
            after.iter().all(|p| !before.contains(p))
        }),
        "every worker restarted: {before:?} → {after:?}"
    );
    // One at a time: each replacement was RUNNING before the next old worker was stopped.
    let log = d.log_text();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| {
            (l.contains("worker ended") && l.contains("(reload)")) || l.contains("worker running")
        })
        .collect();
    let first_end = events
        .iter()
        .position(|l| l.contains("(reload)"))
        .expect("a reload restart in the log");
    let mut stopped = 0;
    let mut running_since_stop = true;
    for l in &events[first_end..] {
        if l.contains("(reload)") {
            assert!(
                running_since_stop,
                "two workers down at once:\n{}",
                events.join("\n")
            );
            stopped += 1;
            running_since_stop = false;
        } else {
            running_since_stop = true;
        }
    }
    assert_eq!(stopped, 3, "{}", events.join("\n"));
    let id = env.submit("w", "{}");
    env.wait_state(&id, "succeeded", secs(20));
}

#[test]
fn kill9_with_busy_workers_recovers_their_tasks_uncharged_and_leaves_no_worker() {
    let env = py_env("concurrency = 2\nmax_attempts = 1");
    std::fs::write(env.path().join("block"), "").unwrap();
    let d = env.daemon();
    let ids: Vec<String> = (0..2)
        .map(|n| env.submit("w", &json!({ "do": "block", "n": n }).to_string()))
        .collect();
    // Each worker and a child in its group.
    let pids: Vec<i32> = (0..2)
        .flat_map(|n| {
            wait_line(&env.path().join(format!("pid-{n}")), secs(20))
                .split(' ')
                .map(|p| p.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect();
    for id in &ids {
        env.wait_state(id, "running", secs(10));
    }
    d.kill9();
    // The children outlive the daemon: only the next daemon can clean them up.
    assert!(alive(pids[1]) && alive(pids[3]), "{pids:?}");
    std::fs::remove_file(env.path().join("block")).unwrap();
    let d = env.daemon();
    for id in &ids {
        let v = env.wait_state(id, "succeeded", secs(20));
        assert_eq!(v["attempts"], 1, "the lost run was not charged: {v:#}");
        let h = history(&v);
        assert_eq!(h[0]["reason"], "lost", "{v:#}");
        assert_eq!(h[1]["reason"], "result", "{v:#}");
    }
    assert!(
        poll(secs(5), || pids.iter().all(|&p| !alive(p))),
        "workers of the killed daemon survive: {pids:?}\n{}",
        d.log_text()
    );
}

#[test]
fn a_clean_stop_stops_the_workers() {
    let env = py_env("concurrency = 2");
    let d = env.daemon();
    let pids = running_pids(&env, 2);
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(secs(20)), Some(0));
    assert!(pids.iter().all(|&p| !alive(p as i32)), "{pids:?}");
    let text = env.ok(&["status"]);
    assert!(text.contains("daemon: not running"), "{text}");
    assert!(text.contains("workers: none running"), "{text}");
}

#[test]
fn bash_worker_example_echoes_crashes_and_times_out() {
    assert!(
        std::process::Command::new("jq")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "the bash worker example needs jq"
    );
    let env = Env::new(&format!(
        "[queues.b]\nworker = [\"{}\"]\nstart_secs = \"100ms\"\ntimeout = \"5s\"\nkill_grace = \"1s\"\nmax_attempts = 1\n",
        contrib("bash/worker.sh").display()
    ));
    let _d = env.daemon();
    let echo = env.submit(
        "b",
        r#"{"action":"echo","text":"hello $(touch /tmp/nope) `id`"}"#,
    );
    let v = env.wait_state(&echo, "succeeded", secs(20));
    assert_eq!(
        stdout_of(&v, 0),
        "hello $(touch /tmp/nope) `id`\n",
        "the payload is data, never code: {v:#}"
    );
    assert_eq!(
        v["result"],
        json!({"echoed": "hello $(touch /tmp/nope) `id`"}),
        "handle() returns its RESULT: {v:#}"
    );
    let crash = env.submit("b", r#"{"action":"crash"}"#);
    let v = env.wait_state(&crash, "failed", secs(20));
    assert_eq!(history(&v)[0]["reason"], "crash", "{v:#}");
    assert!(
        history(&v)[0]["error"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{v:#}"
    );
    let hang = env.submit("b", r#"{"action":"sleep","seconds":30}"#);
    let v = env.wait_state(&hang, "failed", secs(20));
    assert_eq!(history(&v)[0]["reason"], "timeout", "{v:#}");
    let fail = env.submit("b", r#"{"action":"fail"}"#);
    let v = env.wait_state(&fail, "failed", secs(20));
    assert_eq!(history(&v)[0]["reason"], "result", "{v:#}");
    assert_eq!(history(&v)[0]["stderr_tail"], "asked to fail\n", "{v:#}");
    let after = env.submit("b", r#"{"text":"still here"}"#);
    let v = env.wait_state(&after, "succeeded", secs(20));
    assert_eq!(v["result"], json!({"echoed": "still here"}), "{v:#}");
    assert_eq!(env.ok(&["result", &after]), "{\"echoed\":\"still here\"}\n");
}

#[test]
fn cancelling_a_task_stops_its_worker_which_is_restarted() {
    let env = py_env("max_attempts = 1");
    let _d = env.daemon();
    let id = env.submit("w", r#"{"do":"hang"}"#);
    let pids = wait_line(&env.path().join("hang-pids"), secs(20));
    let pids: Vec<i32> = pids.split(' ').map(|p| p.parse().unwrap()).collect();
    env.wait_state(&id, "running", secs(10));
    env.ok(&["cancel", &id]);
    let v = env.wait_state(&id, "cancelled", secs(20));
    assert_eq!(history(&v)[0]["reason"], "cancelled", "{v:#}");
    assert!(
        poll(secs(5), || pids.iter().all(|&p| !alive(p))),
        "the worker's group was stopped: {pids:?}"
    );
    let next = env.submit("w", "{}");
    env.wait_state(&next, "succeeded", secs(20));
}

/// A worker that reports who and where it runs.
const WHOAMI_WORKER: &str = r#"
import os, resource, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import taskd_worker

@taskd_worker.task
def handle(payload):
    mask = os.umask(0)
    print(os.getuid(), "%03o" % mask, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
          os.getcwd(), os.environ.get("GREETING"), os.environ.get("SECRET"),
          os.environ.get("TASKD_WORKER_PROTOCOL"), os.getpgid(0) == os.getpid())

taskd_worker.run()
"#;

#[test]
fn a_worker_runs_as_its_queue_user_with_its_umask_limits_env_and_cwd() {
    if !nix::unistd::geteuid().is_root() {
        common::skip::skip("needs root to switch users", "run the tests as root");
        return;
    }
    let env = Env::new("");
    let dir = env.path().display().to_string();
    std::fs::write(env.path().join("whoami.py"), WHOAMI_WORKER).unwrap();
    std::fs::copy(
        contrib("python/taskd_worker.py"),
        env.path().join("taskd_worker.py"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.rewrite(&format!(
        "[queues.u]\nworker = [\"python3\", \"{dir}/whoami.py\"]\nstart_secs = \"100ms\"\n\
         user = \"nobody\"\numask = \"027\"\nlimits = {{ nofile = 512 }}\ncwd = \"/tmp\"\n\
         env = {{ GREETING = \"hello\" }}\n"
    ));
    let _d = env.daemon_with(&[("SECRET", "s3cret")]);
    let id = env.submit("u", "{}");
    let v = env.wait_state(&id, "succeeded", secs(20));
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&nobody.stdout).trim().to_string();
    assert_eq!(
        stdout_of(&v, 0),
        format!("{uid} 027 512 /tmp hello None 1 True\n"),
        "{v:#}"
    );
}

#[test]
fn reloads_change_the_number_of_workers_and_can_switch_the_queue_to_a_command() {
    let env = py_env("concurrency = 1");
    let _d = env.daemon();
    let first = running_pids(&env, 1);
    env.rewrite(&py_queue(&env, "concurrency = 3"));
    env.ok(&["reload"]);
    let three = running_pids(&env, 3);
    assert!(
        three.contains(&first[0]),
        "the first worker stays: {three:?}"
    );
    env.rewrite(&py_queue(&env, "concurrency = 2"));
    env.ok(&["reload"]);
    assert!(
        poll(secs(20), || workers(&env).len() == 2),
        "{:#?}",
        workers(&env)
    );
    let id = env.submit("w", "{}");
    env.wait_state(&id, "succeeded", secs(20));

    env.rewrite("[queues.w]\ncommand = [\"/bin/echo\", \"exec mode\"]\n");
    env.ok(&["reload"]);
    assert!(
        poll(secs(20), || workers(&env).is_empty()),
        "{:#?}",
        workers(&env)
    );
    assert!(
        poll(secs(5), || three.iter().all(|&p| !alive(p as i32))),
        "{three:?}"
    );
    let id = env.submit("w", "{}");
    let v = env.wait_state(&id, "succeeded", secs(20));
    assert_eq!(history(&v)[0]["reason"], "exit", "{v:#}");
    assert_eq!(stdout_of(&v, 0), "exec mode\n");
}

#[test]
fn the_api_lists_the_workers_with_the_queues() {
    let env = Env::new("");
    std::fs::write(env.path().join("w.py"), PY_WORKER).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n\n{}",
            py_queue(&env, "concurrency = 2")
        ),
    )
    .unwrap();
    let daemon = env.daemon();
    let url = daemon.api_base();
    running_pids(&env, 2);
    let v: Value = ureq::get(&format!("{url}/api/v1/queues"))
        .call()
        .expect("GET /api/v1/queues")
        .into_json()
        .expect("JSON");
    let ws = v["workers"].as_array().expect("workers");
    assert_eq!(ws.len(), 2, "{v:#}");
    assert!(
        ws.iter()
            .all(|w| w["queue"] == "w" && w["state"] == "running"),
        "{v:#}"
    );
}

#[test]
fn a_reload_to_a_worker_that_cannot_start_stops_the_rollout_at_the_first_worker() {
    let env = py_env("concurrency = 2");
    let d = env.daemon();
    let before = running_pids(&env, 2);
    env.rewrite(
        "[queues.w]\nconcurrency = 2\nworker = [\"sh\", \"-c\", \"exit 3\"]\nstart_secs = \"100ms\"\nstart_retries = 1\n",
    );
    env.ok(&["reload"]);
    let mut ws = Vec::new();
    assert!(
        poll(secs(20), || {
            ws = workers(&env);
            ws.iter().any(|w| w["state"] == "fatal")
        }),
        "{ws:#?}\n{}",
        d.log_text()
    );
    // The queue still works, on the worker with the old settings (were it stopped too, its
    // replacement would fail as well and the task would never run).
    let id = env.submit("w", "{}");
    let v = env.wait_state(&id, "succeeded", secs(20));
    let ws = workers(&env);
    let running: Vec<i64> = ws
        .iter()
        .filter(|w| w["state"] == "running")
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    assert_eq!(running.len(), 1, "{ws:#?}");
    assert!(before.contains(&running[0]), "{ws:#?}");
    assert_eq!(worker_pid_of(&v, 0), running[0]);
}

/// Seconds since midnight of a log line's RFC 3339 timestamp.
fn log_time(line: &str) -> f64 {
    let t = &line[line.find('T').expect("a timestamp") + 1..];
    let t = &t[..t.find('Z').expect("UTC")];
    let parts: Vec<f64> = t.split(':').map(|p| p.parse().expect("a number")).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn a_worker_that_keeps_crashing_after_it_runs_restarts_with_growing_backoff() {
    let env = py_env("max_attempts = 1");
    let d = env.daemon();
    running_pids(&env, 1);
    for _ in 0..3 {
        let id = env.submit("w", r#"{"do":"crash"}"#);
        let v = env.wait_state(&id, "failed", secs(20));
        assert_eq!(history(&v)[0]["reason"], "crash", "{v:#}");
    }
    running_pids(&env, 1);
    let log = d.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker ended") || l.contains("worker starting"))
        .collect();
    // ended → starting gaps, one per crash.
    let mut gaps = Vec::new();
    for pair in lines.windows(2) {
        if pair[0].contains("worker ended") && pair[1].contains("worker starting") {
            // (across midnight, the clock starts again at 0)
            gaps.push((log_time(pair[1]) - log_time(pair[0])).rem_euclid(86_400.0));
        }
    }
    assert_eq!(gaps.len(), 3, "{}", lines.join("\n"));
    for (gap, want) in gaps.iter().zip([0.5, 1.0, 2.0]) {
        assert!(
            *gap >= want - 0.05 && *gap < want + 1.0,
            "restart delays {gaps:?}, expected about 0.5, 1, 2 s"
        );
    }
}

#[test]
fn the_example_config_runs_the_example_worker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("config/taskd.toml")).unwrap();
    let hello = &example[example.find("[queues.hello]").expect("a hello queue")..];
    let hello = hello.replace("cwd = \"..\"", &format!("cwd = \"{}\"", root.display()));
    let env = Env::new(&hello.replace("start_secs = \"1s\"", "start_secs = \"100ms\""));
    let _d = env.daemon();
    let out = env.run(&["submit", "hello", r#"{"name":"you"}"#, "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("hello, you (task "), "{text}");
    assert!(
        text.ends_with("result: {\"greeting\":\"hello, you\"}\n"),
        "greet() returns the result: {text}"
    );
    let id = env.submit("hello", "{}");
    let v = env.wait_state(&id, "failed", secs(20));
    assert_eq!(history(&v).len(), 1, "not retried: {v:#}");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("needs a \"name\""),
        "{v:#}"
    );
}
