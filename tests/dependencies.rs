//! Dependencies (`--after`), expiry (`--expires`) and unique keys (`--unique`,
//! `--unique-for`) with real processes: the `taskd` binary as daemon and producers, on the
//! SQLite store and on a private `redis-server` (each case runs on both).

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::process::Stdio;

use common::{secs, Env};
use redis_server::RedisServer;
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Redis,
}

/// An env whose config has `queues` (with `@D@` replaced by the env's directory), on the
/// backend; `None` when Redis is wanted and `redis-server` is missing (the skip is printed).
fn env(backend: Backend, test: &str, queues: &str) -> Option<(Env, Option<RedisServer>)> {
    env_with(backend, test, "", queues)
}

/// [`env`] with extra `[taskd]` lines.
fn env_with(
    backend: Backend,
    test: &str,
    taskd: &str,
    queues: &str,
) -> Option<(Env, Option<RedisServer>)> {
    let e = Env::raw("");
    let d = e.path().display().to_string();
    let (broker, server) = match backend {
        Backend::Sqlite => (String::new(), None),
        Backend::Redis => {
            let server = RedisServer::start(test)?;
            (
                format!("broker = \"{}\"\nlease = \"5s\"\n", server.url()),
                Some(server),
            )
        }
    };
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n{taskd}\n{broker}\n\
         [defaults]\nbackoff = {{ base = \"100ms\", max = \"200ms\", jitter = false }}\n\n{}\n",
        queues.replace("@D@", &d)
    );
    std::fs::write(&e.config, text).expect("write config");
    Some((e, server))
}

/// `taskd show ID` as people read it: the value of the line starting with `label`.
fn show_line(env: &Env, id: &str, label: &str) -> String {
    let out = env.ok(&["show", id]);
    out.lines()
        .find_map(|l| l.strip_prefix(label).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("`taskd show {id}` has no `{label}` line:\n{out}"))
}

fn submit(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    env.ok(&all).trim().to_string()
}

/// The lines tasks appended to `<dir>/log`: `start <n> <ns> <TASKD_AFTER>` and
/// `end <n> <ns>`.
fn log(env: &Env) -> Vec<Vec<String>> {
    std::fs::read_to_string(env.path().join("log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}

fn stamp(log: &[Vec<String>], what: &str, n: &str) -> u128 {
    log.iter()
        .find(|l| l[0] == what && l[1] == n)
        .unwrap_or_else(|| panic!("no `{what} {n}` in the log: {log:?}"))[2]
        .parse()
        .expect("a time in ns")
}

/// Two queues whose tasks log their start (with `$TASKD_AFTER`) and end; `fail` exits 3.
const LOGGING: &str = "\
[queues.a]\nconcurrency = 4\nmax_attempts = 1\n\
shell = 'echo \"start $TASKD_ARG_n $(date +%s%N) $TASKD_AFTER\" >> \"@D@/log\"; sleep 0.2; echo \"end $TASKD_ARG_n $(date +%s%N)\" >> \"@D@/log\"; [ \"$TASKD_ARG_fail\" != 1 ] || exit 3'\n\
[queues.b]\nconcurrency = 4\nmax_attempts = 1\n\
shell = 'echo \"start $TASKD_ARG_n $(date +%s%N) $TASKD_AFTER\" >> \"@D@/log\"; echo \"end $TASKD_ARG_n $(date +%s%N)\" >> \"@D@/log\"'\n";

/// Celery's chain, group and chord as plain CLI use, across two queues.
fn chain_group_and_chord(backend: Backend, test: &str) {
    let Some((env, _server)) = env(backend, test, LOGGING) else {
        return;
    };
    // A chain: first, then second (on another queue), both submitted before anything runs.
    let first = submit(&env, &["a", r#"{"n":"first"}"#, "--delay", "1s"]);
    let second = submit(&env, &["b", r#"{"n":"second"}"#, "--after", &first]);
    assert_eq!(show_line(&env, &second, "state"), "scheduled");
    assert_eq!(show_line(&env, &second, "after"), first);
    // A group: a batch of three; a chord: one task after all of them.
    let batch = env.path().join("group.jsonl");
    std::fs::write(&batch, "{\"n\":\"g1\"}\n{\"n\":\"g2\"}\n{\"n\":\"g3\"}\n").expect("batch");
    let group: Value = serde_json::from_str(&env.ok(&[
        "submit",
        "a",
        "--batch",
        batch.to_str().expect("utf-8"),
        "--json",
    ]))
    .expect("submit --json is JSON");
    let ids: Vec<String> = group["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let mut chord_args = vec!["b", r#"{"n":"chord"}"#];
    for id in &ids {
        chord_args.extend(["--after", id.as_str()]);
    }
    let chord = submit(&env, &chord_args);
    assert_eq!(show_line(&env, &chord, "after"), ids.join(", "));

    let _d = env.daemon();
    for id in [&second, &chord] {
        env.wait_state(id, "succeeded", secs(30));
    }
    let log = log(&env);
    // Each dependant started after its parents ended, and saw their ids.
    assert!(stamp(&log, "start", "second") >= stamp(&log, "end", "first"));
    for g in ["g1", "g2", "g3"] {
        assert!(
            stamp(&log, "start", "chord") >= stamp(&log, "end", g),
            "the chord started before {g} ended: {log:?}"
        );
    }
    let after_of = |n: &str| {
        log.iter()
            .find(|l| l[0] == "start" && l[1] == n)
            .and_then(|l| l.get(3).cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        after_of("second"),
        first,
        "TASKD_AFTER of the chain's second task"
    );
    assert_eq!(after_of("chord"), ids.join(","), "TASKD_AFTER of the chord");
    assert_eq!(
        after_of("g1"),
        "",
        "a task without parents has an empty TASKD_AFTER"
    );
    let shown = env.show(&chord);
    assert_eq!(shown["after"], serde_json::json!(ids));
}

/// A failing parent cancels its dependants, and theirs, across queues; an unknown parent is
/// refused; a parent that already failed cancels a new dependant at once.
fn a_failing_parent_cancels_its_descendants(backend: Backend, test: &str) {
    let Some((env, _server)) = env(backend, test, LOGGING) else {
        return;
    };
    let unknown = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20";
    let out = env.run(&["submit", "b", "{}", "--after", unknown]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown parent is a usage error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(unknown), "the refusal names the id: {err}");
    let out = env.run(&["submit", "b", "{}", "--after", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));

    let parent = submit(&env, &["a", r#"{"n":"p","fail":"1"}"#, "--delay", "1s"]);
    let kid = submit(&env, &["b", r#"{"n":"k"}"#, "--after", &parent]);
    let grandkid = submit(&env, &["a", r#"{"n":"gk"}"#, "--after", &kid]);
    let _d = env.daemon();
    env.wait_state(&parent, "failed", secs(30));
    env.wait_state(&grandkid, "cancelled", secs(30));
    assert_eq!(show_line(&env, &kid, "state"), "cancelled");
    assert_eq!(
        show_line(&env, &kid, "error"),
        format!("dependency {parent} failed")
    );
    assert_eq!(
        show_line(&env, &grandkid, "error"),
        format!("dependency {kid} failed")
    );
    assert_eq!(
        env.show(&grandkid)["last_error"],
        format!("dependency {kid} failed")
    );
    // Neither dependant ran.
    assert!(log(&env).iter().all(|l| l[1] != "k" && l[1] != "gk"));
    // After a failed parent: cancelled at once, recorded with the reason.
    let late = submit(&env, &["b", r#"{"n":"late"}"#, "--after", &parent]);
    assert_eq!(show_line(&env, &late, "state"), "cancelled");
    assert_eq!(
        show_line(&env, &late, "error"),
        format!("dependency {parent} failed")
    );
}

/// Eight `taskd submit --unique` processes at once: one task, every one prints its id.
fn eight_racing_submitters_make_one_task(backend: Backend, test: &str) {
    let Some((env, _server)) = env(backend, test, "[queues.u]\nshell = 'true'\n") else {
        return;
    };
    let children: Vec<_> = (0..8)
        .map(|_| {
            env.cmd(&[
                "submit",
                "u",
                "{}",
                "--unique",
                "reindex:7",
                "--unique-for",
                "1h",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn taskd submit")
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let mut ids = Vec::new();
    let mut duplicates = 0;
    for o in &outs {
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        ids.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
        if String::from_utf8_lossy(&o.stderr).contains("already") {
            duplicates += 1;
        }
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every submitter got the one task's id: {ids:?}"
    );
    assert_eq!(duplicates, 7, "seven were told it was a duplicate");
    let listed: Value = serde_json::from_str(&env.ok(&["tasks", "--json"])).expect("JSON");
    let tasks = listed.as_array().expect("a list of tasks");
    assert_eq!(tasks.len(), 1, "exactly one task: {listed:#}");

    // Once it finished, --unique-for keeps the key taken: a duplicate still gets its id.
    let _d = env.daemon();
    env.wait_state(&ids[0], "succeeded", secs(30));
    let out = env.run(&["submit", "u", "{}", "--unique", "reindex:7", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["existing"], true, "--json says it was a duplicate");
    assert_eq!(v["task"]["id"], ids[0].as_str());
    assert_eq!(v["task"]["state"], "succeeded");
    // Another key is free.
    let other = submit(&env, &["u", "{}", "--unique", "reindex:8"]);
    assert_ne!(other, ids[0]);
}

/// A task that waits past its expiry (behind a busy slot, or retrying) is cancelled,
/// reason `expired`, never started; the queue's `expires` applies to tasks without
/// `--expires`; `/metrics` counts them.
fn tasks_expire_while_they_wait(backend: Backend, test: &str) {
    let queues = "\
[queues.busy]\nconcurrency = 1\n\
shell = 'if [ \"$TASKD_ARG_n\" = hold ]; then while [ ! -e \"@D@/go\" ]; do sleep 0.05; done; fi; echo \"$TASKD_ARG_n\" >> \"@D@/ran\"'\n\
[queues.flaky]\nmax_attempts = 5\nbackoff = { base = \"30s\", max = \"30s\", jitter = false }\nshell = 'exit 1'\n\
[queues.short]\nexpires = \"1s\"\nshell = 'true'\n";
    let Some((env, _server)) = env_with(backend, test, "listen = \"127.0.0.1:0\"", queues) else {
        return;
    };
    let out = env.run(&["submit", "busy", "{}", "--expires", "soon"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed --expires is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--expires"));

    let d = env.daemon();
    let hold = submit(&env, &["busy", r#"{"n":"hold"}"#]);
    env.wait_state(&hold, "running", secs(20));
    // Behind the running task, with one second to start: it never does.
    let waiting = submit(&env, &["busy", r#"{"n":"late"}"#, "--expires", "1s"]);
    assert_eq!(show_line(&env, &waiting, "state"), "queued");
    assert!(!show_line(&env, &waiting, "expires").is_empty());
    let kid = submit(&env, &["busy", r#"{"n":"kid"}"#, "--after", &waiting]);
    // A retrying task past its expiry is not run again.
    let flaky = submit(&env, &["flaky", "{}", "--expires", "2s"]);
    // The queue's `expires` applies without --expires; a paused queue keeps it waiting.
    env.ok(&["pause", "short"]);
    let short = submit(&env, &["short", "{}"]);
    assert!(!show_line(&env, &short, "expires").is_empty());

    let v = env.wait_state(&waiting, "cancelled", secs(20));
    assert_eq!(v["last_error"], "expired");
    assert_eq!(show_line(&env, &waiting, "error"), "expired");
    assert_eq!(
        show_line(&env, &kid, "error"),
        format!("dependency {waiting} failed")
    );
    let v = env.wait_state(&flaky, "cancelled", secs(20));
    assert_eq!(v["last_error"], "expired");
    assert_eq!(v["attempts"], 1, "ran once, not retried past its expiry");
    assert_eq!(show_line(&env, &flaky, "state"), "cancelled");
    env.wait_state(&short, "cancelled", secs(20));
    assert_eq!(show_line(&env, &short, "error"), "expired");

    std::fs::write(env.path().join("go"), "").expect("release the holder");
    env.wait_state(&hold, "succeeded", secs(20));
    let ran = std::fs::read_to_string(env.path().join("ran")).unwrap_or_default();
    assert_eq!(ran.trim(), "hold", "no expired task started");
    let metrics = ureq::get(&format!("{}/metrics", d.api_base()))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let count = |queue: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("taskd_tasks_expired_total")
                    && l.contains(&format!("queue=\"{queue}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (count("busy"), count("flaky"), count("short")),
        (1, 1, 1),
        "{metrics}"
    );
}

#[test]
fn tasks_expire_while_they_wait_on_sqlite() {
    tasks_expire_while_they_wait(Backend::Sqlite, "tasks_expire_while_they_wait_on_sqlite");
}

#[test]
fn tasks_expire_while_they_wait_on_redis() {
    tasks_expire_while_they_wait(Backend::Redis, "tasks_expire_while_they_wait_on_redis");
}

#[test]
fn chain_group_and_chord_on_sqlite() {
    chain_group_and_chord(Backend::Sqlite, "chain_group_and_chord_on_sqlite");
}

#[test]
fn chain_group_and_chord_on_redis() {
    chain_group_and_chord(Backend::Redis, "chain_group_and_chord_on_redis");
}

#[test]
fn a_failing_parent_cancels_its_descendants_on_sqlite() {
    a_failing_parent_cancels_its_descendants(
        Backend::Sqlite,
        "a_failing_parent_cancels_its_descendants_on_sqlite",
    );
}

#[test]
fn a_failing_parent_cancels_its_descendants_on_redis() {
    a_failing_parent_cancels_its_descendants(
        Backend::Redis,
        "a_failing_parent_cancels_its_descendants_on_redis",
    );
}

#[test]
fn eight_racing_submitters_make_one_task_on_sqlite() {
    eight_racing_submitters_make_one_task(
        Backend::Sqlite,
        "eight_racing_submitters_make_one_task_on_sqlite",
    );
}

#[test]
fn eight_racing_submitters_make_one_task_on_redis() {
    eight_racing_submitters_make_one_task(
        Backend::Redis,
        "eight_racing_submitters_make_one_task_on_redis",
    );
}

/// A long-lived worker that answers each task with the `after` of its task message.
const AFTER_WORKER: &str = r#"import json, os
tasks = os.fdopen(3, "r")
results = os.fdopen(4, "w")
results.write(json.dumps({"type": "ready", "protocol": 1}) + "\n")
results.flush()
for line in tasks:
    m = json.loads(line)
    results.write(json.dumps({"type": "result", "id": m["id"], "status": "ok", "result": m.get("after")}) + "\n")
    results.flush()
"#;

/// A worker sees its task's parents in the task message (`after`, in the order given):
/// `taskd result` prints what the worker read.
fn a_worker_sees_the_parents_in_its_task_message(backend: Backend, test: &str) {
    let Some((env, _server)) = env(
        backend,
        test,
        "[queues.w]\nworker = [\"python3\", \"@D@/after.py\"]\nstart_secs = \"100ms\"\n\n\
         [queues.p]\nshell = 'true'\n",
    ) else {
        return;
    };
    std::fs::write(env.path().join("after.py"), AFTER_WORKER).expect("write the worker");
    let p1 = submit(&env, &["p", "{}"]);
    let p2 = submit(&env, &["p", "{}"]);
    let kid = submit(&env, &["w", "{}", "--after", &p2, "--after", &p1]);
    let lone = submit(&env, &["w", "{}"]);
    let _d = env.daemon();
    env.wait_state(&kid, "succeeded", secs(30));
    env.wait_state(&lone, "succeeded", secs(30));
    assert_eq!(
        env.ok(&["result", &kid]).trim(),
        format!(r#"["{p2}","{p1}"]"#),
        "the worker's task message lists the parents"
    );
    assert_eq!(
        env.ok(&["result", &lone]).trim(),
        "[]",
        "a task without parents has an empty `after`"
    );
}

#[test]
fn a_worker_sees_the_parents_in_its_task_message_on_sqlite() {
    a_worker_sees_the_parents_in_its_task_message(
        Backend::Sqlite,
        "a_worker_sees_the_parents_in_its_task_message_on_sqlite",
    );
}

#[test]
fn a_worker_sees_the_parents_in_its_task_message_on_redis() {
    a_worker_sees_the_parents_in_its_task_message(
        Backend::Redis,
        "a_worker_sees_the_parents_in_its_task_message_on_redis",
    );
}
