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

use common::{poll, submit_batch, Daemon, Env};
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
        // Both nodes ran tasks (the limit is the cluster's, not a node's).
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
