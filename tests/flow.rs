//! Per-key concurrency and rate limits with the real `taskd` binary and real tasks: each
//! task writes its start and end stamps from inside, and the test checks every overlap and
//! every window. On SQLite with one daemon, and on Redis with two daemons sharing one
//! `redis-server` (the limits are cluster-wide). Nothing sleeps a fixed time to wait.

mod common;
#[cfg(feature = "redis")]
#[path = "common/redis.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{poll, submit_batch, Env};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// A queue whose task appends `<key> start|end <ns> <task id>` to `stamps`, sleeping
/// `sleep` between the two.
fn stamping_queue(name: &str, stamps: &Path, sleep: &str, settings: &str) -> String {
    format!(
        "[queues.{name}]\nconcurrency = 4\n{settings}\nshell = '''\n\
         echo \"$TASKD_ARG_customer start $(date +%s%N) $TASKD_TASK_ID\" >> {s}\n\
         sleep {sleep}\n\
         echo \"$TASKD_ARG_customer end $(date +%s%N) $TASKD_TASK_ID\" >> {s}\n'''\n",
        s = stamps.display()
    )
}

/// Each task's (key, start ns, end ns), once every one of `n` tasks has written both.
fn intervals(stamps: &Path, n: usize) -> Vec<(String, u128, u128)> {
    let mut runs: BTreeMap<String, (String, Option<u128>, Option<u128>)> = BTreeMap::new();
    let ok = poll(DEADLINE, || {
        runs.clear();
        let text = std::fs::read_to_string(stamps).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 4 {
                continue;
            }
            let ns: u128 = f[2].parse().expect("a time in ns");
            let r = runs
                .entry(f[3].to_string())
                .or_insert((f[0].to_string(), None, None));
            if f[1] == "start" {
                r.1 = Some(ns);
            } else {
                r.2 = Some(ns);
            }
        }
        runs.len() == n && runs.values().all(|r| r.1.is_some() && r.2.is_some())
    });
    assert!(ok, "not every task ran within {DEADLINE:?}: {runs:?}");
    runs.into_values()
        .map(|(k, s, e)| (k, s.unwrap(), e.unwrap()))
        .collect()
}

/// No two runs of one key overlap more than `per_key` at once (checked at every start).
fn assert_per_key(runs: &[(String, u128, u128)], per_key: usize) {
    for (key, start, _) in runs {
        let at_once = runs
            .iter()
            .filter(|(k, s, e)| k == key && s <= start && e > start)
            .count();
        assert!(
            at_once <= per_key,
            "key {key}: {at_once} runs at once at {start}, the limit is {per_key}: {runs:?}"
        );
    }
}

/// Key `a` has five tasks submitted first, keys b–f one each after them: with one slot per
/// key the others start before `a`'s third run (no head-of-line blocking), and `a`'s runs
/// never overlap.
fn per_key_case(nodes: &[&Env], stamps: &Path) {
    let mut payloads: Vec<_> = (0..5).map(|_| json!({"customer": "a"})).collect();
    for k in ["b", "c", "d", "e", "f"] {
        payloads.push(json!({ "customer": k }));
    }
    submit_batch(nodes[0], "pk", &payloads);
    let runs = intervals(stamps, payloads.len());
    assert_per_key(&runs, 1);
    let mut a_starts: Vec<u128> = runs.iter().filter(|r| r.0 == "a").map(|r| r.1).collect();
    a_starts.sort();
    for (k, s, _) in runs.iter().filter(|r| r.0 != "a") {
        assert!(
            *s < a_starts[2],
            "key {k} started at {s}, after key a's third run ({}): a blocked key held the queue up",
            a_starts[2]
        );
    }
}

/// `n` tasks at `rate` starts per second, burst 1: every window of starts holds at most
/// what the rate allows (one more for the stamp's jitter), and the whole run takes as long
/// as the rate says. Returns the measured rate (starts per second).
fn rate_case(nodes: &[&Env], stamps: &Path, n: usize, rate: f64) -> f64 {
    let payloads: Vec<_> = (0..n)
        .map(|i| json!({"customer": format!("c{i}")}))
        .collect();
    submit_batch(nodes[0], "rt", &payloads);
    let runs = intervals(stamps, n);
    let mut starts: Vec<f64> = runs.iter().map(|r| r.1 as f64 / 1e9).collect();
    starts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let interval = 1.0 / rate;
    for (i, s) in starts.iter().enumerate() {
        // Starts in the one second from this one.
        let within = starts[i..].iter().take_while(|t| **t < s + 1.0).count();
        assert!(
            within as f64 <= rate + 2.0,
            "{within} starts within 1 s from {s}: the rate allows {rate} (+1 burst): {starts:?}"
        );
    }
    let span = starts[n - 1] - starts[0];
    assert!(
        span >= (n - 1) as f64 * interval * 0.9,
        "{n} starts took {span:.3} s; at {rate}/s they take at least {:.3} s",
        (n - 1) as f64 * interval
    );
    let measured = (n - 1) as f64 / span;
    eprintln!(
        "rate limit: {n} starts at {rate}/s configured, {measured:.3}/s measured ({:+.2} %)",
        (measured - rate) / rate * 100.0
    );
    measured
}

fn sqlite_env(queues: &str) -> Env {
    Env::new(queues)
}

#[test]
fn sqlite_per_key_concurrency_is_never_exceeded_and_other_keys_flow() {
    let dir = tempfile::tempdir().unwrap();
    let stamps = dir.path().join("stamps");
    let env = sqlite_env(&stamping_queue(
        "pk",
        &stamps,
        "0.3",
        "concurrency_key = \"{customer}\"",
    ));
    let _d = env.daemon();
    per_key_case(&[&env], &stamps);
}

#[test]
fn sqlite_rate_limit_spreads_starts() {
    let dir = tempfile::tempdir().unwrap();
    let stamps = dir.path().join("stamps");
    let env = sqlite_env(&stamping_queue("rt", &stamps, "0", "rate = \"10/s\""));
    let _d = env.daemon();
    rate_case(&[&env], &stamps, 35, 10.0);
}

#[test]
fn a_payload_that_cannot_fill_a_key_is_refused_at_submit() {
    let env = Env::new(
        "[queues.pk]\nshell = 'true'\nconcurrency_key = \"cust-{customer}\"\n\
         [queues.rk]\nshell = 'true'\nrate = \"1/s\"\nrate_key = \"{domain}\"\n",
    );
    let out = env.run(&["submit", "pk", r#"{"other":1}"#]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("queue `pk`: concurrency_key \"cust-{customer}\": payload has no field `customer` (the key needs {customer})"),
        "{err}"
    );
    let out = env.run(&["submit", "rk", r#"{"domain":null}"#]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("queue `rk`: rate_key \"{domain}\": payload field `domain` is null"),
        "{err}"
    );
    // Nothing was stored.
    assert_eq!(env.count("pk", "queued") + env.count("rk", "queued"), 0);
    env.ok(&["submit", "pk", r#"{"customer":7}"#]);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::common::Daemon;
    use crate::redis_server::RedisServer;

    fn node(server: &RedisServer, queues: &str) -> Env {
        let env = Env::raw("");
        let text = format!(
            "[taskd]\nstate_dir = \"state\"\nbroker = \"{}\"\nshutdown_grace = \"5s\"\nlease = \"5s\"\n\n{queues}\n",
            server.url()
        );
        std::fs::write(&env.config, text).expect("write config");
        env
    }

    fn two_nodes(server: &RedisServer, queues: &str) -> (Env, Env, Daemon, Daemon) {
        let a = node(server, queues);
        let b = node(server, queues);
        let da = a.daemon();
        let db = b.daemon();
        (a, b, da, db)
    }

    #[test]
    fn two_nodes_share_the_per_key_limit() {
        let Some(server) = RedisServer::start("two_nodes_share_the_per_key_limit") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let stamps = dir.path().join("stamps");
        let q = stamping_queue("pk", &stamps, "0.3", "concurrency_key = \"{customer}\"");
        let (a, b, _da, _db) = two_nodes(&server, &q);
        per_key_case(&[&a, &b], &stamps);
    }

    #[test]
    fn two_nodes_share_the_rate_limit() {
        let Some(server) = RedisServer::start("two_nodes_share_the_rate_limit") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let stamps = dir.path().join("stamps");
        let q = stamping_queue("rt", &stamps, "0", "rate = \"10/s\"");
        let (a, b, _da, _db) = two_nodes(&server, &q);
        rate_case(&[&a, &b], &stamps, 35, 10.0);
    }

    /// On a shared broker `why` names the nodes: none registered, or none serving the queue
    /// (a node whose config lacks it); a key held on another node.
    #[test]
    fn why_names_the_nodes_sharing_redis() {
        let Some(server) = RedisServer::start("why_names_the_nodes_sharing_redis") else {
            return;
        };
        let pk = "[queues.pk]\nshell = 'sleep 30'\nconcurrency_key = \"{customer}\"\n";
        let other = "[queues.other]\nshell = 'true'\n";
        // The node runs only `pk`; the producer's config knows `other` too.
        let runner = node(&server, pk);
        let producer = node(&server, &format!("{pk}\n{other}"));
        let t = producer.submit("other", "{}");
        let text = why(&producer, &t);
        assert!(
            text.contains("- no daemon is running: no node is registered with the broker (start one: `taskd start`)"),
            "{text}"
        );
        let _d = runner.daemon();
        why_says(
            &producer,
            &t,
            "- no node serves queue `other`: 1 node shares the broker, none with it in its config",
        );
        let a1 = producer.submit("pk", r#"{"customer":"acme"}"#);
        producer.wait_state(&a1, "running", DEADLINE);
        let a2 = producer.submit("pk", r#"{"customer":"acme"}"#);
        why_says(
            &producer,
            &a2,
            &format!("- its key `acme` is at its limit (1 of 1): held by {a1}"),
        );
    }

    #[test]
    fn one_node_rate_limit_on_redis() {
        let Some(server) = RedisServer::start("one_node_rate_limit_on_redis") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let stamps = dir.path().join("stamps");
        let q = stamping_queue("rt", &stamps, "0", "rate = \"10/s\"");
        let a = node(&server, &q);
        let _d = a.daemon();
        rate_case(&[&a], &stamps, 35, 10.0);
    }
}

/// `taskd why ID`'s lines, as people read them.
fn why(env: &Env, id: &str) -> String {
    env.ok(&["why", id])
}

/// Poll `taskd why` until its output holds `want`.
fn why_says(env: &Env, id: &str, want: &str) -> String {
    let mut last = String::new();
    let ok = poll(DEADLINE, || {
        last = why(env, id);
        last.contains(want)
    });
    assert!(ok, "`taskd why {id}` never said {want:?}; last:\n{last}");
    last
}

/// `GET /api/v1/tasks/{id}/why`: the status and the JSON answer.
fn api_why(base: &str, id: &str) -> (u16, serde_json::Value) {
    let r = match ureq::get(&format!("{base}/api/v1/tasks/{id}/why")).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET why: {e}"),
    };
    let status = r.status();
    (status, r.into_json().expect("a JSON answer"))
}

/// The API's reasons as the lines `taskd why` prints them.
fn api_lines(base: &str, id: &str) -> Vec<String> {
    let (status, v) = api_why(base, id);
    assert_eq!(status, 200, "{v}");
    v["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| format!("- {}", r["text"].as_str().expect("text")))
        .collect()
}

#[test]
fn why_names_every_reason_from_real_situations() {
    let env = Env::raw(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\n\
         [queues.slow]\nshell = 'sleep 30'\nconcurrency = 1\n\n\
         [queues.ahead]\nshell = 'sleep 30'\nconcurrency = 1\n\n\
         [queues.flaky]\nshell = 'exit 1'\nmax_attempts = 3\nbackoff = { kind = \"fixed\", base = \"1h\", jitter = false }\n\n\
         [queues.pk]\nshell = 'sleep 30'\nconcurrency = 4\nconcurrency_key = \"{customer}\"\n\n\
         [queues.rt]\nshell = 'true'\nrate = \"1/m\"\n\n\
         [queues.fast]\nshell = 'true'\n\n\
         [queues.broken]\nworker = [\"/bin/sh\", \"-c\", \"echo cannot import app >&2; exit 3\"]\nconcurrency = 1\nstart_retries = 1\n\n\
         [queues.gone]\nshell = 'true'\n",
    );
    // No daemon yet: a task for later, and one waiting for a parent.
    let later = env
        .ok(&["submit", "fast", "{}", "--delay", "1h"])
        .trim()
        .to_string();
    let text = why(&env, &later);
    assert!(
        text.starts_with(&format!("task {later} is scheduled\n")),
        "{text}"
    );
    assert!(
        text.contains("- its run-at time is in the future: "),
        "{text}"
    );
    assert!(text.contains("(in 59m"), "{text}");
    assert!(
        text.contains(&format!(
            "- no daemon is running for {}",
            env.config.display()
        )),
        "{text}"
    );
    let child = env
        .ok(&["submit", "fast", "{}", "--after", &later])
        .trim()
        .to_string();
    let text = why(&env, &child);
    assert!(
        text.contains(&format!(
            "- it waits for 1 of its 1 parent: {later} (scheduled)"
        )),
        "{text}"
    );
    // A queue no longer in the config.
    let orphan = env.submit("gone", "{}");
    env.ok(&["pause", "fast"]);
    let paused = env.submit("fast", "{}");
    let text = why(&env, &paused);
    assert!(
        text.contains("- its queue `fast` is paused (`taskd resume fast`)"),
        "{text}"
    );
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("[queues.gone]\nshell = 'true'\n", ""),
    )
    .unwrap();
    let text = why(&env, &orphan);
    assert!(
        text.contains(&format!(
            "- its queue `gone` is not in the config {}: no daemon with this config serves it",
            env.config.display()
        )),
        "{text}"
    );

    let backlog: Vec<String> = (0..3).map(|_| env.submit("ahead", "{}")).collect();
    let d = env.daemon();
    let base = d.api_base();
    // With the daemon up, no `no daemon` line.
    let text = why(&env, &later);
    assert!(!text.contains("no daemon"), "{text}");
    // Slots full: the queue runs one task at a time.
    let first = env.submit("slow", "{}");
    env.wait_state(&first, "running", DEADLINE);
    let second = env.submit("slow", "{}");
    let text = why_says(
        &env,
        &second,
        "- the queue's slots are full: 1 of 1 running; the oldest is ",
    );
    assert!(text.contains(&first), "{text}");
    // A backlog found at start: the daemon claims one task beyond its slot, and holds it.
    let mut held = String::new();
    let ok = poll(DEADLINE, || {
        held = backlog
            .iter()
            .map(|id| why(&env, id))
            .find(|t| t.contains("- it is held by node "))
            .unwrap_or_default();
        !held.is_empty()
    });
    assert!(
        ok,
        "no task of `ahead` was held: {}",
        why(&env, &backlog[2])
    );
    assert!(held.contains(", which will start it next\n"), "{held}");
    let text = why(&env, &first);
    assert!(
        text.starts_with(&format!(
            "task {first} is running\n- it is running (attempt 1) on node "
        )),
        "{text}"
    );
    // A key at its limit, with the task holding it.
    let a1 = env.submit("pk", r#"{"customer":"acme"}"#);
    env.wait_state(&a1, "running", DEADLINE);
    let a2 = env.submit("pk", r#"{"customer":"acme"}"#);
    let text = why_says(
        &env,
        &a2,
        &format!("- its key `acme` is at its limit (1 of 1): held by {a1}"),
    );
    // The API answers the same lines, and the numbers as data.
    let lines: Vec<String> = text.lines().skip(1).map(str::to_string).collect();
    assert_eq!(api_lines(&base, &a2), lines);
    let (_, v) = api_why(&base, &a2);
    assert_eq!(v["task"], a2.as_str());
    assert_eq!(v["queue"], "pk");
    assert_eq!(v["state"], "queued");
    assert_eq!(v["running"], false);
    let key = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "key_limit")
        .cloned()
        .expect("a key_limit reason");
    assert_eq!(key["key"], "acme");
    assert_eq!(key["tasks"], json!([a1]));
    assert_eq!(
        (key["count"].clone(), key["limit"].clone()),
        (json!(1), json!(1))
    );
    // The rate limit's next start.
    let r1 = env.submit("rt", "{}");
    env.wait_state(&r1, "succeeded", DEADLINE);
    let r2 = env.submit("rt", "{}");
    let text = why_says(
        &env,
        &r2,
        "- the rate limit (1/m) allows the next start at ",
    );
    assert!(text.contains("(in "), "{text}");
    let (_, v) = api_why(&base, &r2);
    let rate = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "rate_limit")
        .cloned()
        .unwrap_or_else(|| panic!("no rate_limit reason: {v}"));
    let at = rate["at"].as_i64().expect("the next start, in ms");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        at > now && at <= now + 60_000,
        "the next start {at} is within the minute from {now}"
    );
    // A failed attempt waiting for its retry.
    let flaky = env.submit("flaky", "{}");
    env.wait_state(&flaky, "retrying", DEADLINE);
    let text = why(&env, &flaky);
    assert!(
        text.starts_with(&format!(
            "task {flaky} is retrying\n- it waits to retry at "
        )),
        "{text}"
    );
    assert!(text.contains("(in 59m"), "{text}");
    assert!(text.contains(" after attempt 1 failed"), "{text}");
    // Workers that cannot start.
    let stuck = env.submit("broken", "{}");
    why_says(
        &env,
        &stuck,
        "- its queue's 1 worker is FATAL: 1 failed starts in a row (start_retries = 1)",
    );
    why_says(&env, &stuck, "its stderr ended with: cannot import app");
    // Finished.
    let done = env.submit("fast", "{}");
    env.ok(&["resume", "fast"]);
    env.wait_state(&done, "succeeded", DEADLINE);
    let text = why(&env, &done);
    assert!(text.contains("- it has finished: succeeded at "), "{text}");
    // --json gives the same as data, as the API does.
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["why", &a2, "--json"])).expect("why --json is JSON");
    assert_eq!(v["task"], a2.as_str());
    assert_eq!(v["state"], "queued");
    assert!(v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["kind"] == "key_limit" && r["text"].as_str().unwrap().contains(&a1)));
    // An unknown task, a malformed id.
    let unknown = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20";
    let (status, v) = api_why(&base, unknown);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "task_not_found");
    assert_eq!(api_why(&base, "nope").0, 400);
    let out = env.run(&["why", unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no task with id {unknown}")));
    assert_eq!(env.run(&["why", "nope"]).status.code(), Some(2));

    // The dashboard's task page shows the same lines.
    let Some(chromium) = common::browser::find_chromium() else {
        common::skip::skip("chromium is not installed", "apt-get install -y chromium");
        return;
    };
    let mut b = common::browser::Browser::open(&chromium, &format!("{base}/#task/{a2}"));
    b.wait_for(
        "!document.querySelector('#task-why-box')?.hidden && document.querySelectorAll('#task-why li').length > 0",
        "the task's reasons",
    );
    let shown = b.eval(
        "[...document.querySelectorAll('#task-why li')].map(l => [l.dataset.kind, l.textContent])",
    );
    let api: Vec<serde_json::Value> = api_why(&base, &a2).1["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!([r["kind"], r["text"]]))
        .collect();
    assert_eq!(shown, json!(api), "the page lists the API's reasons");
    assert!(
        shown.to_string().contains(&format!("held by {a1}")),
        "{shown}"
    );
    // A running task has no such section.
    b.eval(&format!("location.hash = '#task/{a1}'; true"));
    b.wait_for(
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'running'",
        "the running task",
    );
    assert_eq!(
        b.eval("document.querySelector('#task-why-box').hidden"),
        true
    );
}

/// `--help` names the flow-control flags and `why`, with what they do.
#[test]
fn help_names_the_flow_control_commands_and_flags() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .env_remove("TASKD_CONFIG")
            .output()
            .expect("run taskd --help");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let top = help(&["--help"]);
    assert!(
        top.lines()
            .any(|l| l.trim_start().starts_with("why") && l.contains("Why a task is not running")),
        "{top}"
    );
    // Flattened: the help is wrapped to the terminal's width.
    let flat = |text: String| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let submit = flat(help(&["submit", "--help"]));
    for want in [
        "--after <ID>",
        "dependency ID failed",
        "$TASKD_AFTER",
        "An unknown ID is refused (exit 2)",
        "--expires <DURATION|TIME>",
        "reason `expired`",
        "--unique-for <DURATION>",
    ] {
        assert!(
            submit.contains(want),
            "submit --help lacks {want:?}:\n{submit}"
        );
    }
    let why = flat(help(&["why", "--help"]));
    for want in [
        "the rate limit's next start",
        "GET /api/v1/tasks/{id}/why",
        "--json",
    ] {
        assert!(why.contains(want), "why --help lacks {want:?}:\n{why}");
    }
}
