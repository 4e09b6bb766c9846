//! Deploying new code to long-lived workers, with a real daemon and real Python workers:
//! `taskd restart QUEUE` under a steady stream of tasks (no task fails, one worker at a
//! time, never zero RUNNING, the new code answers afterwards), the API's restart with its
//! token, `reload` with `restart_on_change`, and the queues that cannot be restarted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "restart-token-0123456789abcdef";

fn helper_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/python")
}

/// A worker that answers each task with its code version and pid, after 30 ms of work.
fn script(version: &str) -> String {
    format!(
        r#"
import os, sys, time
sys.path.insert(0, os.environ["HELPER_DIR"])
import taskd_worker

VERSION = "{version}"

@taskd_worker.task
def handle(payload, job):
    time.sleep(0.03)
    print("version", VERSION, "pid", os.getpid())

taskd_worker.run()
"#
    )
}

/// Replaces the worker script as a deploy does: a new file renamed over the old one.
fn deploy(env: &Env, version: &str) {
    let tmp = env.path().join("w.py.new");
    std::fs::write(&tmp, script(version)).expect("write the new script");
    std::fs::rename(&tmp, env.path().join("w.py")).expect("rename the new script into place");
}

/// `[queues.w]`: the Python worker, `concurrency` of them, with `extra` settings; and an
/// exec queue `e`.
fn queues(env: &Env, extra: &str) -> String {
    let d = env.path().display();
    format!(
        "[queues.w]\nworker = [\"python3\", \"{d}/w.py\"]\nconcurrency = 2\nstart_secs = \"300ms\"\n\
         kill_grace = \"2s\"\nmax_attempts = 1\nenv = {{ HELPER_DIR = '{}' }}\n{extra}\n\n\
         [queues.e]\ncommand = [\"true\"]\n",
        helper_dir().display()
    )
}

fn env_with(taskd: &str, extra: &str) -> Env {
    let env = Env::new("");
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n{taskd}\n\n{}",
        queues(&env, extra)
    );
    std::fs::write(&env.config, text).expect("write the config");
    deploy(&env, "v1");
    env
}

fn workers(env: &Env) -> Vec<Value> {
    let s: Value = serde_json::from_str(&env.ok(&["status", "--json"])).expect("status --json");
    s["workers"].as_array().cloned().unwrap_or_default()
}

fn running(ws: &[Value]) -> Vec<i64> {
    ws.iter()
        .filter(|w| w["state"] == "running")
        .filter_map(|w| w["pid"].as_i64())
        .collect()
}

/// The pids of the two RUNNING workers, once both are RUNNING and none of them is in `old`.
fn two_new_workers(env: &Env, old: &[i64]) -> Vec<i64> {
    let mut pids = Vec::new();
    let ok = poll(secs(30), || {
        pids = running(&workers(env));
        pids.len() == 2 && pids.iter().all(|p| !old.contains(p))
    });
    assert!(
        ok,
        "the workers were not replaced: {old:?} → {:#?}",
        workers(env)
    );
    pids
}

/// The log's worker stops for `why` and worker starts, from the first such stop: each stop
/// must follow a replacement that reached RUNNING (one worker at a time). Returns the stops.
fn one_at_a_time(log: &str, why: &str) -> usize {
    let events: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("worker ended") && l.contains(why)) || l.contains("worker running"))
        .collect();
    let Some(first) = events.iter().position(|l| l.contains(why)) else {
        return 0;
    };
    let mut stops = 0;
    let mut replaced = true;
    for l in &events[first..] {
        if l.contains(why) {
            assert!(replaced, "two workers down at once:\n{}", events.join("\n"));
            stops += 1;
            replaced = false;
        } else {
            replaced = true;
        }
    }
    stops
}

#[test]
fn restart_under_load_fails_no_task_keeps_a_worker_running_and_deploys_the_new_code() {
    let env = env_with("", "");
    let d = env.daemon();
    let old = two_new_workers(&env, &[]);
    deploy(&env, "v2");

    let stop = AtomicBool::new(false);
    let ids = Mutex::new(Vec::<String>::new());
    let samples = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                let id = env.submit("w", &json!({ "n": n }).to_string());
                ids.lock().expect("not poisoned").push(id);
                n += 1;
                // A steady stream, not a flood: about 50 tasks a second.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The stream ends when this closure does, a failed assertion included (the scope
        // waits for the submitting thread).
        struct EndStream<'a>(&'a AtomicBool);
        impl Drop for EndStream<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _end = EndStream(&stop);
        poll(secs(10), || ids.lock().expect("not poisoned").len() >= 20);

        let out = env.ok(&["restart", "w"]);
        assert_eq!(
            out.trim(),
            "queue w: restarting 2 workers one at a time, each after its current task; `taskd status` shows the progress"
        );
        // Sample the workers while they roll: never zero RUNNING.
        let mut samples = Vec::new();
        let done = poll_every(Duration::from_millis(10), secs(40), || {
            let ws = workers(&env);
            let pids = running(&ws);
            assert!(
                !pids.is_empty(),
                "no worker RUNNING during the restart: {ws:#?}"
            );
            samples.push(pids.clone());
            pids.len() == 2 && pids.iter().all(|p| !old.contains(p))
        });
        assert!(done, "the restart did not finish: {:#?}", workers(&env));
        // Keep the stream going a little past the restart, so that tasks submitted after it
        // run the new code however fast or slow the restart was on this machine.
        let at_end = ids.lock().expect("not poisoned").len();
        assert!(
            poll(secs(30), || ids.lock().expect("not poisoned").len()
                >= at_end.max(20) + 10),
            "the submitting thread stalled after the restart"
        );
        samples
    });
    assert!(
        samples.len() >= 3,
        "sampled the restart {} times",
        samples.len()
    );
    let new = two_new_workers(&env, &old);
    // The log: each old worker stopped only once the previous replacement was RUNNING.
    assert_eq!(
        one_at_a_time(&d.log_text(), "(taskd restart)"),
        2,
        "{}",
        d.log_text()
    );
    // Every task succeeded, on its first attempt; those after the restart ran the new code.
    let ids = ids.into_inner().expect("not poisoned");
    for id in &ids {
        let t = env.wait_state(id, "succeeded", secs(30));
        assert_eq!(t["attempts"], 1, "task {id} ran more than once: {t:#}");
    }
    let after = env.submit("w", "{}");
    let t = env.wait_state(&after, "succeeded", secs(20));
    let out = history(&t)[0]["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(out.starts_with("version v2 pid "), "{out}");
    let pid: i64 = out
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("a pid");
    assert!(new.contains(&pid), "answered by {pid}, not by {new:?}");
    let v1 = ids
        .iter()
        .filter(|id| {
            history(&env.show(id))[0]["stdout_tail"]
                .as_str()
                .unwrap_or_default()
                .starts_with("version v1")
        })
        .count();
    // How many ran before their worker was replaced depends on the machine's speed; some
    // did (the workers had loaded v1 before the stream began).
    assert!(v1 >= 1, "no task ran the old code before the restart");
}

#[test]
fn restart_through_the_api_needs_the_token_and_refuses_an_exec_queue() {
    let env = env_with(
        &format!("listen = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\""),
        "",
    );
    let d = env.daemon();
    let url = d.api_base();
    let old = two_new_workers(&env, &[]);
    let post = |path: &str, token: Option<&str>| {
        let mut req = ureq::post(&format!("{url}{path}")).timeout(secs(20));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    };
    let (code, _) = post("/api/v1/queues/w/restart", None);
    assert_eq!(code, 401, "a restart without the token");
    let (code, body) = post("/api/v1/queues/e/restart", Some(TOKEN));
    assert_eq!(code, 409, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["error"]["code"], "not_a_worker_queue", "{v:#}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("queue `e` runs a new process per task"),
        "{v:#}"
    );
    let (code, body) = post("/api/v1/queues/nope/restart", Some(TOKEN));
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        running(&workers(&env)).len(),
        2,
        "a refused restart restarted nothing"
    );

    let (code, body) = post("/api/v1/queues/w/restart", Some(TOKEN));
    assert_eq!(code, 202, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["queue"], "w");
    assert_eq!(
        v["message"],
        "queue w: restarting 2 workers one at a time, each after its current task"
    );
    two_new_workers(&env, &old);
    assert_eq!(
        one_at_a_time(&d.log_text(), "(taskd restart)"),
        2,
        "{}",
        d.log_text()
    );
    // The OpenAPI document lists the route.
    let doc: Value = serde_json::from_str(
        &ureq::get(&format!("{url}/api/v1/openapi.json"))
            .call()
            .expect("openapi")
            .into_string()
            .expect("a body"),
    )
    .expect("JSON");
    assert!(doc["paths"]["/api/v1/queues/{queue}/restart"]["post"].is_object());
}

#[test]
fn reload_restarts_workers_whose_script_changed_only_with_restart_on_change() {
    let env = env_with("", "restart_on_change = true");
    let d = env.daemon();
    let old = two_new_workers(&env, &[]);
    let out = env.ok(&["reload"]);
    assert_eq!(
        out.trim(),
        "reloaded: nothing changed",
        "an unchanged script restarts nothing"
    );
    assert_eq!(running(&workers(&env)), old);

    // The script is touched after the workers started: a reload restarts them.
    let script = env.path().join("w.py");
    std::fs::File::options()
        .append(true)
        .open(&script)
        .expect("open the script")
        .set_modified(std::time::SystemTime::now())
        .expect("touch the script");
    let out = env.ok(&["reload"]);
    assert!(
        out.contains(&format!(
            "queue w: workers restart one at a time: its program file {} changed (restart_on_change)",
            script.display()
        )),
        "{out}"
    );
    two_new_workers(&env, &old);
    assert_eq!(
        one_at_a_time(&d.log_text(), "(restart_on_change)"),
        2,
        "{}",
        d.log_text()
    );

    // Without the key, a touched script is left alone.
    let text = std::fs::read_to_string(&env.config)
        .expect("config")
        .replace("restart_on_change = true", "");
    std::fs::write(&env.config, text).expect("rewrite the config");
    let now = running(&workers(&env));
    std::fs::File::options()
        .append(true)
        .open(&script)
        .expect("open the script")
        .set_modified(std::time::SystemTime::now() + secs(5))
        .expect("touch the script");
    let out = env.ok(&["reload"]);
    assert!(!out.contains("restart"), "{out}");
    assert_eq!(running(&workers(&env)), now);
}

#[test]
fn restart_refuses_an_exec_queue_and_an_unknown_queue_with_exit_2() {
    let env = env_with("", "");
    let _d = env.daemon();
    let old = two_new_workers(&env, &[]);
    let out = env.run(&["restart", "e"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "taskd: cannot restart `e`: it runs a new process per task (`command` or `shell` in {}), not long-lived workers, so its next task already runs the new code",
            env.config.display()
        )
    );
    let out = env.run(&["restart", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot restart `nope`: no such queue in {}; known queues: e, w",
            env.config.display()
        )),
        "{err}"
    );
    assert_eq!(
        running(&workers(&env)),
        old,
        "a refused restart restarted nothing"
    );

    // A queue the file has but the running daemon does not: the daemon says so.
    let text = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(
        &env.config,
        format!(
            "{text}\n[queues.w2]\nworker = [\"python3\", \"{}/w.py\"]\n",
            env.path().display()
        ),
    )
    .expect("rewrite the config");
    let out = env.run(&["restart", "w2"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot restart `w2`: unknown queue `w2` (the running daemon has: e, w); nothing restarted"),
        "{err}"
    );
}
