//! The daemon's integration cases, shared by three test binaries: `tests/daemon.rs` runs
//! them on the embedded SQLite store, `tests/daemon_redis.rs` on a private `redis-server`,
//! `tests/daemon_postgres.rs` on a private PostgreSQL. The backend changes only the
//! `[taskd]` table of the config the cases write.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{
    self, alive, children, history, poll, submit_batch, wait_line, Daemon, Env, SIGHUP, SIGTERM,
};
use crate::pg_server::PgServer;
use crate::redis_server::RedisServer;
use serde_json::{json, Value};

// ------------------------------------------------------------------------------------------
// Helpers (tests/common/mod.rs is shared by every test binary).

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The broker the cases run on; each test binary picks one (and never builds the other).
#[allow(dead_code)]
pub enum Backend {
    /// The embedded store in the test's state directory.
    Sqlite,
    /// One private `redis-server` per test binary; each test gets a database of its own.
    Redis,
    /// One private PostgreSQL per test binary (tests/common/postgres.rs); each test gets a
    /// database of its own.
    Postgres,
}

/// Databases of the shared server: one per test, so parallel tests never share a queue.
const REDIS_DATABASES: u32 = 256;
/// The lease on Redis and PostgreSQL: short, so that a lease-based takeover happens
/// within a test's deadlines (the daemon renews every third of it).
const LEASE: &str = "3s";

/// The binary's server, shared by the tests that are running; the last one to finish
/// stops it (a later test starts another).
static REDIS: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a daemon case")
        .to_string()
}

fn shared_redis() -> Option<Arc<RedisServer>> {
    let mut slot = REDIS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(server) = slot.upgrade() {
        return Some(server);
    }
    let databases = REDIS_DATABASES.to_string();
    let server = Arc::new(RedisServer::start_with(
        &test_name(),
        &["--databases", &databases],
    )?);
    *slot = Arc::downgrade(&server);
    Some(server)
}

/// One test's environment: its temp directory and config (an [`Env`]), and on Redis or
/// PostgreSQL the database it owns on the binary's server, which stays up while the case
/// holds it.
pub struct Case {
    env: Env,
    redis: Option<(Arc<RedisServer>, u32)>,
    postgres: Option<(Arc<PgServer>, String)>,
}

impl Deref for Case {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl Case {
    /// A fresh environment on the binary's backend; `None` (after a visible skip message)
    /// when that backend cannot run here.
    fn new() -> Option<Case> {
        let env = Env::raw("");
        let mut postgres = None;
        let redis = match crate::BACKEND {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let server = crate::pg_server::shared(&test_name())?;
                // A database per test (CREATE DATABASE copies an empty template): its own
                // schema, queues and wake-up channel.
                let db = server.new_db();
                postgres = Some((server, db));
                None
            }
            Backend::Redis => {
                let server = shared_redis()?;
                let db = NEXT_DB.fetch_add(1, Ordering::Relaxed);
                // A database used twice on one server would show a test another's tasks.
                assert!(
                    db < REDIS_DATABASES,
                    "more cases than the server's {REDIS_DATABASES} databases: raise REDIS_DATABASES"
                );
                Some((server, db))
            }
        };
        Some(Case {
            env,
            redis,
            postgres,
        })
    }

    /// The lines the backend adds to `[taskd]`.
    fn taskd_lines(&self) -> String {
        if let Some((server, db)) = &self.postgres {
            return format!("broker = \"{}\"\nlease = \"{LEASE}\"\n", server.url(db));
        }
        match &self.redis {
            None => String::new(),
            Some((server, db)) => format!(
                "broker = \"redis://127.0.0.1:{}/{db}\"\nlease = \"{LEASE}\"\n",
                server.port
            ),
        }
    }
}

/// The config text: a `[taskd]` table with `shutdown_grace = grace` (and the backend's
/// broker), fast `[defaults]` (100ms/200ms backoff without jitter, 1s kill_grace) and `D`
/// in every task's environment pointing at the test's temp directory; `@D@` in `body` is
/// replaced by that directory.
fn config_text(case: &Case, grace: &str, body: &str) -> String {
    config_text_with(case, grace, "", body)
}

/// As [`config_text`], with `defaults` (TOML lines) added to `[defaults]`.
fn config_text_with(case: &Case, grace: &str, defaults: &str, body: &str) -> String {
    let d = case.path().display().to_string();
    format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"{grace}\"\n{}\n\
         [defaults]\nbackoff = {{ base = \"100ms\", max = \"200ms\", jitter = false }}\n\
         kill_grace = \"1s\"\nenv = {{ D = '{d}' }}\n{defaults}\n\n{}\n",
        case.taskd_lines(),
        body.replace("@D@", &d)
    )
}

/// A Case whose config is `config_text(grace, body)`; `None` when the backend cannot run.
fn setup(grace: &str, body: &str) -> Option<Case> {
    let case = Case::new()?;
    write_config(&case, grace, body);
    Some(case)
}

fn write_config(case: &Case, grace: &str, body: &str) {
    std::fs::write(&case.config, config_text(case, grace, body)).expect("write config");
}

/// Submit a JSON payload (plus extra argv after `--`); return the id.
fn submit(env: &Env, queue: &str, payload: &Value, extra: &[&str]) -> String {
    let p = payload.to_string();
    let mut args = vec!["submit", queue, p.as_str()];
    if !extra.is_empty() {
        args.push("--");
        args.extend_from_slice(extra);
    }
    env.ok(&args).trim().to_string()
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Wait until the task is succeeded, failed or cancelled; return its record.
fn wait_done(env: &Env, id: &str, deadline: Duration) -> Value {
    let mut last = Value::Null;
    let ok = poll(deadline, || {
        last = env.show(id);
        is_terminal(last["state"].as_str().unwrap_or(""))
    });
    assert!(
        ok,
        "task {id} did not finish within {deadline:?}; last record:\n{last:#}"
    );
    last
}

fn wait_pid(path: &Path, deadline: Duration) -> i32 {
    let s = wait_line(path, deadline);
    s.parse()
        .unwrap_or_else(|_| panic!("{} does not hold a pid: {s:?}", path.display()))
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Assert the task stays in `state` during the whole `window`.
fn assert_stays(env: &Env, id: &str, state: &str, window: Duration) {
    let start = Instant::now();
    while start.elapsed() < window {
        let v = env.show(id);
        assert_eq!(
            v["state"], state,
            "task {id} left {state} during the window:\n{v:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_log(d: &Daemon, needle: &str, deadline: Duration) {
    assert!(
        poll(deadline, || d.log_text().contains(needle)),
        "the daemon log never said {needle:?}:\n{}",
        d.log_text()
    );
}

fn all_dead(pids: &[i32], deadline: Duration) -> Vec<i32> {
    poll(deadline, || pids.iter().all(|&p| !alive(p)));
    pids.iter().copied().filter(|&p| alive(p)).collect()
}

// ------------------------------------------------------------------------------------------
// 1. Dispatch

#[test]
fn concurrency_limit_is_respected_and_reached() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.c]
concurrency = 2
shell = '''
s=$(date +%s%N)
sleep 0.3
e=$(date +%s%N)
echo "$s $e" > "$D/times/$TASKD_TASK_ID"
'''
"#,
    ) else {
        return;
    };
    std::fs::create_dir(env.path().join("times")).unwrap();
    let d = env.daemon();
    let ids = submit_batch(&env, "c", &vec![json!({}); 8]);

    // Sample the daemon's live children (task leaders) while the queue runs.
    let mut most_children = 0;
    let ok = poll(secs(30), || {
        let live = children(d.pid()).iter().filter(|(_, s)| *s != 'Z').count();
        most_children = most_children.max(live);
        env.count("c", "succeeded") == 8
    });
    assert!(ok, "8 tasks did not all succeed:\n{}", d.log_text());
    assert!(
        most_children <= 2,
        "saw {most_children} task processes alive at once with concurrency 2"
    );

    // The recorded intervals lie inside each process's life: if three of them overlap, three
    // processes were alive at once.
    let mut events = Vec::new();
    for id in &ids {
        let line = std::fs::read_to_string(env.path().join("times").join(id))
            .expect("task wrote its times");
        let mut it = line.split_whitespace().map(|n| n.parse::<u128>().unwrap());
        let (s, e) = (it.next().unwrap(), it.next().unwrap());
        events.push((s, 1i32));
        events.push((e, -1i32));
    }
    events.sort(); // at equal times an end (-1) sorts before a start (+1)
    let (mut now, mut most) = (0, 0);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    assert!(most <= 2, "{most} tasks ran at once with concurrency 2");
    assert_eq!(
        most, 2,
        "concurrency 2 was never used: tasks ran one at a time"
    );
}

/// What `taskd status` calls running is what runs: with concurrency 2 and a backlog, the
/// broker never shows more than 2 of the queue's tasks `running`.
#[test]
fn status_never_shows_more_running_than_the_concurrency() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.c]
concurrency = 2
shell = 'sleep 0.1'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    submit_batch(&env, "c", &vec![json!({}); 20]);
    let mut most = 0;
    let mut seen = Vec::new();
    let ok = poll(secs(30), || {
        let out: Value = serde_json::from_str(
            &env.ok(&["tasks", "--queue", "c", "--state", "running", "--json"]),
        )
        .unwrap();
        let n = out.as_array().unwrap().len();
        if n > most {
            most = n;
            seen = out
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect();
        }
        env.count("c", "succeeded") == 20
    });
    assert!(ok, "the tasks did not finish");
    assert!(
        most <= 2,
        "`taskd tasks --state running` listed {most} tasks of a queue with concurrency 2 ({seen:?}): \
         tasks claimed ahead of a free slot are shown as running before their process exists"
    );
}

#[test]
fn command_placeholders_are_filled_and_extra_argv_appended() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.cmd]
command = ['@D@/argv.sh', '--size={size}', '{src}', 'lit{{x}}', '{n}']
"#,
    ) else {
        return;
    };
    let script = env.path().join("argv.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]\\n' \"$a\"; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _d = env.daemon();

    let d = env.path().display().to_string();
    let src = format!("a b;$(touch {d}/pwned1) `touch {d}/pwned2` | touch {d}/pwned3");
    let id = submit(
        &env,
        "cmd",
        &json!({"size": "10x20", "src": src, "n": 7}),
        &["extra 1", "--flag", "$(touch pwned4)"],
    );
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let expected = format!(
        "[--size=10x20]\n[{src}]\n[lit{{x}}]\n[7]\n[extra 1]\n[--flag]\n[$(touch pwned4)]\n"
    );
    assert_eq!(history(&v)[0]["stdout_tail"], expected.as_str(), "{v:#}");
    for f in ["pwned1", "pwned2", "pwned3", "pwned4"] {
        assert!(
            !env.path().join(f).exists(),
            "payload text was executed: {f} exists"
        );
    }
    assert!(!Path::new("pwned4").exists());
}

#[test]
fn shell_mode_gets_payload_as_env_and_stdin_never_as_code() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.sh]
max_attempts = 4
cwd = 'work' # relative to the config file's directory
env = { EXTRA = "extra value" }
shell = '''
printf '%s' "$TASKD_ARG_evil" > "$D/out/arg"
cat > "$D/out/stdin"
printf '%s' "$TASKD_PAYLOAD" > "$D/out/payload"
printf '%s\n' "$TASKD_TASK_ID" "$TASKD_QUEUE" "$TASKD_ATTEMPT" "$TASKD_MAX_ATTEMPTS" "$TASKD_ARG_n" "$EXTRA" "$(pwd)" > "$D/out/vars"
echo "$$ $(ps -o pgid= $$)" > "$D/out/pgid"
'''
"#,
    ) else {
        return;
    };
    std::fs::create_dir(env.path().join("work")).unwrap();
    std::fs::create_dir(env.path().join("out")).unwrap();
    let _d = env.daemon();

    let d = env.path().display().to_string();
    let evil = format!(
        "$(touch {d}/pwned1); touch {d}/pwned2 `touch {d}/pwned3` && touch {d}/pwned4 | touch {d}/pwned5\n'\"\\ ; rm -rf {d}/work"
    );
    let payload = json!({"evil": evil, "n": 42});
    let id = submit(&env, "sh", &payload, &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "succeeded", "{v:#}");

    for f in ["pwned1", "pwned2", "pwned3", "pwned4", "pwned5"] {
        assert!(
            !env.path().join(f).exists(),
            "payload text was executed as shell code: {f} exists"
        );
    }
    assert!(
        env.path().join("work").is_dir(),
        "payload text was executed: work/ was removed"
    );
    let out = env.path().join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("arg")).unwrap(),
        evil,
        "TASKD_ARG_evil is not intact"
    );
    let stdin: Value = serde_json::from_str(&std::fs::read_to_string(out.join("stdin")).unwrap())
        .expect("stdin is JSON");
    assert_eq!(stdin, payload, "stdin does not carry the payload");
    let env_payload: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("payload")).unwrap())
            .expect("TASKD_PAYLOAD is JSON");
    assert_eq!(env_payload, payload);

    let vars = std::fs::read_to_string(out.join("vars")).unwrap();
    let vars: Vec<&str> = vars.lines().collect();
    let work = std::fs::canonicalize(env.path().join("work")).unwrap();
    assert_eq!(
        vars,
        vec![
            id.as_str(),
            "sh",
            "1",
            "4",
            "42",
            "extra value",
            work.to_str().unwrap()
        ],
        "TASKD_TASK_ID, TASKD_QUEUE, TASKD_ATTEMPT, TASKD_MAX_ATTEMPTS, TASKD_ARG_n, env, cwd"
    );

    let pg = std::fs::read_to_string(out.join("pgid")).unwrap();
    let pg: Vec<&str> = pg.split_whitespace().collect();
    assert_eq!(pg.len(), 2, "ps output: {pg:?}");
    assert_eq!(
        pg[0], pg[1],
        "the task is not the leader of its own process group (pid, pgid) = {pg:?}"
    );
    assert_ne!(
        pg[1].parse::<i32>().unwrap(),
        own_pgrp(),
        "the task shares the test's group"
    );
}

fn own_pgrp() -> i32 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let close = s.rfind(')').unwrap();
    s[close + 2..]
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn submitted_task_starts_at_once_not_on_a_polling_tick() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.lat]
shell = 'date +%s%N > "$D/lat/$TASKD_TASK_ID.tmp" && mv "$D/lat/$TASKD_TASK_ID.tmp" "$D/lat/$TASKD_TASK_ID"'
"#,
    ) else {
        return;
    };
    std::fs::create_dir(env.path().join("lat")).unwrap();
    let _d = env.daemon();
    let mut lat_ms = Vec::new();
    for i in 0..20 {
        let before = nanos();
        let id = submit(&env, "lat", &json!({ "i": i }), &[]);
        let started = wait_line(&env.path().join("lat").join(&id), secs(10))
            .parse::<u128>()
            .unwrap();
        lat_ms.push((started.saturating_sub(before) / 1_000_000) as u64);
        env.wait_state(&id, "succeeded", secs(10));
    }
    let mut sorted = lat_ms.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    eprintln!("submit -> task started, ms (20 round trips, includes the CLI process): {lat_ms:?}; median {median} ms");
    assert!(
        median < 500,
        "median submit->start latency {median} ms: the daemon is not woken at once ({lat_ms:?})"
    );
}

#[test]
fn a_backlog_on_one_queue_does_not_starve_another() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.busy]
concurrency = 2
shell = 'sleep 0.1'

[queues.other]
shell = 'echo other'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    submit_batch(&env, "busy", &vec![json!({}); 100]);
    assert!(
        poll(secs(10), || env.count("busy", "succeeded") >= 2),
        "the busy queue did not start"
    );
    let t0 = Instant::now();
    let id = submit(&env, "other", &json!({}), &[]);
    env.wait_state(&id, "succeeded", secs(10));
    let took = t0.elapsed();
    let left = 100 - env.count("busy", "succeeded");
    assert!(
        left >= 50,
        "the other queue's task waited for the busy queue's backlog ({left} left, took {took:?}): {}",
        env.ok(&["status", "--json"])
    );
    assert!(
        took < secs(3),
        "the other queue's task took {took:?} behind a busy queue"
    );
}

#[test]
fn missing_placeholder_field_fails_the_task_permanently() {
    // Enqueued while the queue's command needed no field; the daemon runs a command that does.
    let Some(env) = setup("5s", "[queues.m]\ncommand = ['/bin/echo', 'x']\n") else {
        return;
    };
    let id = submit(&env, "m", &json!({"other": 1}), &[]);
    write_config(
        &env,
        "5s",
        "[queues.m]\nmax_attempts = 5\ncommand = ['/bin/echo', '{size}']\n",
    );
    let _d = env.daemon();
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(
        history(&v).len(),
        1,
        "a missing field must not be retried:\n{v:#}"
    );
    let err = v["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("size"),
        "the error should name the missing field: {err:?}"
    );
}

// ------------------------------------------------------------------------------------------
// 2. Timeouts

#[test]
fn timeout_kills_the_task_with_reason_timeout() {
    // The global task timeout: set in [defaults], inherited by the queue.
    let Some(env) = Case::new() else {
        return;
    };
    let body = r#"
[queues.t]
kill_grace = "5s"
max_attempts = 1
shell = 'echo $$ > "$D/pid"; sleep 30'
"#;
    std::fs::write(
        &env.config,
        config_text_with(&env, "5s", "timeout = \"1s\"", body),
    )
    .unwrap();
    let _d = env.daemon();
    let id = submit(&env, "t", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    let v = wait_done(&env, &id, secs(15));
    assert_eq!(v["state"], "failed", "{v:#}");
    let a = &history(&v)[0];
    assert_eq!(a["reason"], "timeout", "{v:#}");
    assert_eq!(a["signal"], 15, "SIGTERM was enough: {v:#}");
    let took = a["ended_at"].as_i64().unwrap() - a["started_at"].as_i64().unwrap();
    assert!(
        (950..4000).contains(&took),
        "a 1s timeout took {took} ms to fire"
    );
    assert!(
        all_dead(&[pid], secs(2)).is_empty(),
        "the timed-out task {pid} is still alive"
    );
}

#[test]
fn task_ignoring_sigterm_is_killed_after_kill_grace() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.t]
timeout = "500ms"
kill_grace = "700ms"
max_attempts = 1
shell = '''trap '' TERM; echo $$ > "$D/pid"; sleep 30 & echo $! > "$D/child"; wait; wait'''
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "t", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    let child = wait_pid(&env.path().join("child"), secs(10));
    let v = wait_done(&env, &id, secs(15));
    assert_eq!(v["state"], "failed", "{v:#}");
    let a = &history(&v)[0];
    assert_eq!(a["reason"], "timeout", "{v:#}");
    assert_eq!(
        a["signal"], 9,
        "a task ignoring SIGTERM needs SIGKILL: {v:#}"
    );
    let took = a["ended_at"].as_i64().unwrap() - a["started_at"].as_i64().unwrap();
    assert!(
        (1150..5000).contains(&took),
        "timeout 500ms + kill_grace 700ms took {took} ms"
    );
    let left = all_dead(&[pid, child], secs(2));
    assert!(
        left.is_empty(),
        "the task (leader {pid}, child {child}) survived SIGKILL: {left:?} alive"
    );
}

#[test]
fn background_grandchildren_die_with_their_task() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.timeout]
timeout = "500ms"
max_attempts = 1
shell = 'sleep 30 & echo $!; sleep 30'

[queues.exits_holding_pipe]
shell = 'sleep 30 & echo $!; exit 0'

[queues.exits_detached]
shell = 'sleep 30 >/dev/null 2>&1 </dev/null & echo $!; exit 0'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let ids: Vec<(&str, String)> = ["timeout", "exits_holding_pipe", "exits_detached"]
        .into_iter()
        .map(|q| (q, submit(&env, q, &json!({}), &[])))
        .collect();
    for (q, id) in ids {
        let v = wait_done(&env, &id, secs(15));
        let a = &history(&v)[0];
        let want = if q == "timeout" {
            ("failed", "timeout")
        } else {
            ("succeeded", "exit")
        };
        assert_eq!(
            (v["state"].as_str().unwrap(), a["reason"].as_str().unwrap()),
            want,
            "{v:#}"
        );
        let bg: i32 = a["stdout_tail"]
            .as_str()
            .unwrap()
            .trim()
            .parse()
            .expect("the task printed $!");
        assert!(
            all_dead(&[bg], secs(3)).is_empty(),
            "queue {q}: the background grandchild {bg} survived its task"
        );
    }
}

/// What taskd documents (README, "Containment" and "What escapes without cgroups"): a child
/// that leaves the task's process group with `setsid` dies with its task (its exit, its
/// timeout) where the daemon runs each task in a cgroup, and outlives the task and the
/// daemon's stop where it only has process groups. The daemon's log says which applies.
#[test]
fn a_setsid_child_lives_as_long_as_documented() {
    let Some(env) = setup(
        "1s",
        r#"
[queues.exits]
# Exits once the child leads its own session (field 6 of /proc/PID/stat), not before.
shell = 'setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!; until [ "$(cut -d" " -f6 /proc/$!/stat)" = "$!" ]; do :; done; exit 0'

[queues.times_out]
timeout = "300ms"
kill_grace = "200ms"
max_attempts = 1
shell = 'setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!; sleep 30'
"#,
    ) else {
        return;
    };
    let mut escaped = Vec::new();
    let d = env.daemon();
    let cgroups = d
        .log_text()
        .contains("containment: a cgroup per task under ");
    for (q, state) in [("exits", "succeeded"), ("times_out", "failed")] {
        let id = submit(&env, q, &json!({}), &[]);
        let v = wait_done(&env, &id, secs(15));
        assert_eq!(v["state"], state, "{v:#}");
        let pid: i32 = history(&v)[0]["stdout_tail"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .parse()
            .expect("the task printed $!");
        escaped.push(pid);
    }
    if cgroups {
        // Gone with their tasks, before the daemon stops.
        assert!(
            common::poll(secs(10), || escaped.iter().all(|p| !alive(*p))),
            "a setsid child outlived its task although the daemon runs tasks in cgroups: {:?}",
            escaped.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
    }
    d.signal(SIGTERM);
    assert!(d.wait_exit(secs(15)).is_some(), "the daemon did not stop");
    let survivors: Vec<i32> = escaped.iter().copied().filter(|p| alive(*p)).collect();
    for p in &escaped {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if !cgroups {
        assert_eq!(
            survivors, escaped,
            "without cgroups a setsid child no longer outlives its task: update the README, docs/architecture.md and docs/config.md"
        );
    }
}

#[test]
fn fifty_timed_out_tasks_leave_no_zombies_or_strays() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.t]
concurrency = 10
timeout = "1s"
kill_grace = "200ms"
max_attempts = 1
shell = '''
sleep 30 & echo "$$ $!" >> "$D/pids"
if [ "$TASKD_ARG_trap" = true ]; then trap '' TERM; fi
sleep 30
'''
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let payloads: Vec<Value> = (0..50).map(|i| json!({ "trap": i % 2 == 0 })).collect();
    let ids = submit_batch(&env, "t", &payloads);
    assert!(
        poll(secs(60), || env.count("t", "failed") == 50),
        "50 tasks did not all time out; status: {}\n{}",
        env.ok(&["status", "--json"]),
        d.log_text()
    );
    for id in ids.iter().step_by(7) {
        let v = env.show(id);
        assert_eq!(history(&v)[0]["reason"], "timeout", "{v:#}");
    }
    let pids: Vec<i32> = std::fs::read_to_string(env.path().join("pids"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // The timeout is long enough for every shell to reach its first line on a loaded
    // machine (300 ms was not, once).
    assert_eq!(
        pids.len(),
        100,
        "each task records its own pid and its background child's"
    );
    let survivors = all_dead(&pids, secs(3));
    assert!(
        survivors.is_empty(),
        "processes of timed-out tasks survive: {survivors:?}"
    );
    let mut kids = Vec::new();
    let clean = poll(secs(5), || {
        kids = children(d.pid());
        kids.is_empty()
    });
    assert!(
        clean,
        "the daemon still has children (zombies are 'Z') after all tasks ended: {kids:?}"
    );
    assert!(!d.exited());
}

// ------------------------------------------------------------------------------------------
// 3. Retries

#[test]
fn failing_exit_is_retried_until_max_attempts_with_every_attempt_recorded() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.r]
max_attempts = 3
shell = 'echo out-$TASKD_ATTEMPT; echo err-$TASKD_ATTEMPT >&2; exit 3'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "r", &json!({}), &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["attempts"], 3, "{v:#}");
    let h = history(&v);
    assert_eq!(h.len(), 3, "{v:#}");
    for (i, a) in h.iter().enumerate() {
        let n = i + 1;
        assert_eq!(a["number"], n, "{v:#}");
        assert_eq!(a["reason"], "exit", "{v:#}");
        assert_eq!(a["exit_code"], 3, "{v:#}");
        assert_eq!(a["stdout_tail"], format!("out-{n}\n"), "{v:#}");
        assert_eq!(a["stderr_tail"], format!("err-{n}\n"), "{v:#}");
        assert!(a["pid"].as_i64().unwrap_or(0) > 0, "{v:#}");
        let (s, e) = (
            a["started_at"].as_i64().unwrap(),
            a["ended_at"].as_i64().unwrap(),
        );
        assert!(s > 0 && s <= e, "attempt {n}: started {s}, ended {e}");
    }
    // Backoff 100ms then 200ms (no jitter) between attempts.
    for (i, min_gap) in [(1usize, 100i64), (2, 200)] {
        let gap = h[i]["started_at"].as_i64().unwrap() - h[i - 1]["ended_at"].as_i64().unwrap();
        assert!(
            gap >= min_gap - 5,
            "attempt {} started {gap} ms after the previous one ended; backoff is {min_gap} ms",
            i + 1
        );
        assert!(
            gap < 5000,
            "attempt {} waited {gap} ms for a {min_gap} ms backoff",
            i + 1
        );
    }
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 3"),
        "{v:#}"
    );
}

/// While a task waits in `retrying`, its `run_at` shows the backoff it was given.
#[test]
fn backoff_grows_to_its_cap_and_jitter_stays_within_bounds() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.exp]
max_attempts = 4
backoff = { base = "600ms", max = "1200ms" }
shell = 'exit 1'

[queues.jit]
max_attempts = 3
backoff = { base = "600ms", max = "2s", jitter = true }
shell = 'exit 1'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let exp = submit(&env, "exp", &json!({}), &[]);
    let jit = submit(&env, "jit", &json!({}), &[]);
    // (task, attempts so far) -> run_at - the last attempt's end
    let mut seen: std::collections::BTreeMap<(usize, usize), i64> = Default::default();
    let ok = poll(secs(20), || {
        let mut done = true;
        for (k, id) in [&exp, &jit].into_iter().enumerate() {
            let v = env.show(id);
            if v["state"] == "retrying" {
                let h = history(&v);
                let last_end = h.last().unwrap()["ended_at"].as_i64().unwrap();
                seen.insert((k, h.len()), v["run_at"].as_i64().unwrap() - last_end);
            }
            done &= is_terminal(v["state"].as_str().unwrap());
        }
        done
    });
    assert!(ok, "the tasks did not finish");
    eprintln!("backoff delays seen (queue 0 = exp, 1 = jit; attempts so far) -> ms: {seen:?}");
    // The gaps in each task's history, from an attempt's end to the next one's start: at
    // least the delay, and (for the cap) short of the uncapped one. Always there, however
    // slow the machine.
    let gaps = |id: &str| -> Vec<i64> {
        let v = env.show(id);
        let h = history(&v);
        (1..h.len())
            .map(|i| h[i]["started_at"].as_i64().unwrap() - h[i - 1]["ended_at"].as_i64().unwrap())
            .collect()
    };
    // exponential 600ms, 1200ms, then capped at 1200ms (uncapped: 2400ms); no jitter
    // inherited.
    let exp_gaps = gaps(&exp);
    assert_eq!(exp_gaps.len(), 3, "{exp_gaps:?}");
    for (n, want) in [(1usize, 600i64), (2, 1200), (3, 1200)] {
        let gap = exp_gaps[n - 1];
        assert!(
            gap >= want - 5,
            "exp: attempt {} began {gap} ms after attempt {n}, want at least {want}",
            n + 1
        );
        // Where a `taskd show` caught the task retrying (a loop of two `show` calls may
        // miss a window on a loaded machine), its run_at is the delay itself.
        if let Some(&got) = seen.get(&(0, n)) {
            assert!(
                (want..want + 500).contains(&got),
                "exp: backoff after attempt {n} was {got} ms, want {want}"
            );
        }
    }
    assert!(
        exp_gaps[2] < 2400,
        "exp: the cap of 1200 ms did not hold: {exp_gaps:?}"
    );
    // with jitter: between half and all of 600ms, then of 1200ms
    let jit_gaps = gaps(&jit);
    assert_eq!(jit_gaps.len(), 2, "{jit_gaps:?}");
    for (n, full) in [(1usize, 600i64), (2, 1200)] {
        let gap = jit_gaps[n - 1];
        assert!(
            gap >= full / 2 - 5,
            "jit: attempt {} began {gap} ms after attempt {n}, want at least {}",
            n + 1,
            full / 2
        );
        if let Some(&got) = seen.get(&(1, n)) {
            assert!(
                (full / 2..=full + 500).contains(&got),
                "jit: backoff after attempt {n} was {got} ms, want {}..={full}",
                full / 2
            );
        }
    }
    assert!(
        seen.len() >= 2,
        "no `taskd show` ever caught a task retrying: {seen:?}"
    );
    assert_eq!(env.state(&exp), "failed");
    assert_eq!(history(&env.show(&exp)).len(), 4);
}

#[test]
fn fail_exit_codes_fail_at_once() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.r]
max_attempts = 5
fail_exit_codes = [7, 9]
shell = 'exit 7'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "r", &json!({}), &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["attempts"], 1, "{v:#}");
    let h = history(&v);
    assert_eq!(h.len(), 1, "{v:#}");
    assert_eq!(h[0]["exit_code"], 7);
    assert_eq!(h[0]["reason"], "exit");
}

#[test]
fn programs_that_cannot_start_fail_at_once_saying_why() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.missing_path]
max_attempts = 5
command = ['@D@/no-such-program']

[queues.missing_name]
max_attempts = 5
command = ['no-such-program-taskd-test']

[queues.not_executable]
max_attempts = 5
command = ['@D@/not-exec.sh']

[queues.bad_interpreter]
max_attempts = 5
command = ['@D@/bad-interp.sh']
"#,
    ) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let ne = env.path().join("not-exec.sh");
    std::fs::write(&ne, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&ne, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bi = env.path().join("bad-interp.sh");
    std::fs::write(&bi, "#!/nonexistent/interpreter\necho hi\n").unwrap();
    std::fs::set_permissions(&bi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _d = env.daemon();

    let cases = [
        ("missing_path", "not found", "no-such-program"),
        ("missing_name", "not found", "no-such-program-taskd-test"),
        ("not_executable", "not executable", "not-exec.sh"),
        ("bad_interpreter", "interpreter", "bad-interp.sh"),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(q, _, _)| submit(&env, q, &json!({}), &[]))
        .collect();
    for ((q, says, names), id) in cases.iter().zip(&ids) {
        let v = wait_done(&env, id, secs(20));
        assert_eq!(v["state"], "failed", "{q}: {v:#}");
        let h = history(&v);
        assert_eq!(
            h.len(),
            1,
            "{q}: a program that cannot start must not be retried:\n{v:#}"
        );
        assert_eq!(h[0]["reason"], "spawn", "{q}: {v:#}");
        let err = h[0]["error"].as_str().unwrap_or_default();
        assert!(
            err.contains(says) && err.contains(names),
            "{q}: error {err:?} should say {says:?} and name {names:?}"
        );
    }
}

#[test]
fn death_by_signal_is_reason_signal() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.s]
max_attempts = 2
shell = 'kill -9 $$'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "s", &json!({}), &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "failed", "{v:#}");
    let h = history(&v);
    assert_eq!(h.len(), 2, "a signal death is retried: {v:#}");
    for a in h {
        assert_eq!(a["reason"], "signal", "{v:#}");
        assert_eq!(a["signal"], 9, "{v:#}");
        assert!(a["exit_code"].is_null(), "{v:#}");
    }
}

#[test]
fn retry_requeues_a_failed_task_with_a_fresh_budget() {
    // Fails on runs 1-3, succeeds on run 4. With max_attempts 2: runs 1, 2 -> failed;
    // `taskd retry` -> run 3 (attempt 1) fails, run 4 (attempt 2) succeeds.
    let Some(env) = setup(
        "5s",
        r#"
[queues.r]
max_attempts = 2
shell = '''
n=$(cat "$D/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$D/count"
echo "run $n attempt $TASKD_ATTEMPT"
[ $n -ge 4 ]
'''
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "r", &json!({}), &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(history(&v).len(), 2);

    env.ok(&["retry", &id]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(
        v["state"], "succeeded",
        "retry did not give a fresh budget:\n{v:#}"
    );
    assert_eq!(v["attempts"], 2, "{v:#}");
    let tails: Vec<&str> = history(&v)
        .iter()
        .map(|a| a["stdout_tail"].as_str().unwrap())
        .collect();
    assert_eq!(
        tails,
        vec![
            "run 1 attempt 1\n",
            "run 2 attempt 2\n",
            "run 3 attempt 1\n",
            "run 4 attempt 2\n"
        ],
        "{v:#}"
    );
    // A succeeded task is not retried.
    let out = env.run(&["retry", &id]);
    assert!(
        !out.status.success(),
        "retrying a succeeded task should be refused"
    );
}

// ------------------------------------------------------------------------------------------
// 4. Output

#[test]
fn output_tail_keeps_the_last_bytes() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.o]
output_tail = "1KiB"
shell = '''
head -c 102400 /dev/zero | tr '\0' a; echo END-MARKER
head -c 5000 /dev/zero | tr '\0' b >&2; echo ERR-MARKER >&2
'''
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "o", &json!({}), &[]);
    let v = wait_done(&env, &id, secs(20));
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let a = &history(&v)[0];
    let out = a["stdout_tail"].as_str().unwrap();
    let err = a["stderr_tail"].as_str().unwrap();
    assert_eq!(out.len(), 1024, "stdout tail should be the last 1 KiB");
    assert_eq!(out, format!("{}END-MARKER\n", "a".repeat(1024 - 11)));
    assert_eq!(err.len(), 1024, "stderr tail should be the last 1 KiB");
    assert_eq!(err, format!("{}ERR-MARKER\n", "b".repeat(1024 - 11)));
}

#[test]
fn a_gigabyte_of_output_leaves_the_daemon_rss_flat() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.small]
shell = 'head -c 200000 /dev/zero; echo small-done'

[queues.big]
shell = 'head -c 1073741824 /dev/zero; echo; echo BIG-DONE'
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let at_start = rss_kib(d.pid());
    // Warm up: one task through every code path, so the baseline is a daemon that has run one.
    let id = submit(&env, "small", &json!({}), &[]);
    env.wait_state(&id, "succeeded", secs(20));
    let idle = rss_kib(d.pid());

    let started = Instant::now();
    let id = submit(&env, "big", &json!({}), &[]);
    let mut peak = idle;
    let mut state = String::new();
    let done = poll(secs(120), || {
        peak = peak.max(rss_kib(d.pid()));
        state = env.state(&id);
        is_terminal(&state)
    });
    peak = peak.max(rss_kib(d.pid()));
    let took = started.elapsed();
    assert!(done, "the 1 GiB task did not finish:\n{}", d.log_text());
    let v = env.show(&id);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let tail = history(&v)[0]["stdout_tail"].as_str().unwrap();
    assert!(
        tail.ends_with("\nBIG-DONE\n"),
        "the tail lost the end of the output"
    );
    assert_eq!(tail.len(), 64 * 1024, "the default tail is the last 64 KiB");
    eprintln!(
        "RSS of the daemon: {at_start} KiB at start, {idle} KiB idle after one task, peak {peak} KiB while a task wrote 1 GiB \
         to stdout (growth {} KiB); the task took {took:.1?}",
        peak as i64 - idle as i64
    );
    assert!(
        peak <= idle + 4 * 1024,
        "RSS grew from {idle} KiB to {peak} KiB while a task wrote 1 GiB"
    );
}

#[test]
fn log_dir_keeps_full_output_up_to_log_max() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.l]
log_dir = '@D@/logs'
log_max = "10KiB"
output_tail = "1KiB"
shell = '''
head -c "$TASKD_ARG_n" /dev/zero | tr '\0' x
head -c 3000 /dev/zero | tr '\0' e >&2
'''
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let small = submit(&env, "l", &json!({"n": 5000}), &[]);
    let big = submit(&env, "l", &json!({"n": 102400}), &[]);
    for id in [&small, &big] {
        let v = wait_done(&env, id, secs(20));
        assert_eq!(v["state"], "succeeded", "{v:#}");
        assert_eq!(history(&v)[0]["stdout_tail"].as_str().unwrap().len(), 1024);
    }
    let logs = env.path().join("logs");
    let read = |name: String| {
        std::fs::read(logs.join(&name))
            .unwrap_or_else(|e| panic!("log file {name}: {e}; dir has {:?}", ls(&logs)))
    };
    assert_eq!(
        read(format!("{small}.1.out")),
        vec![b'x'; 5000],
        "the full stdout is kept"
    );
    assert_eq!(
        read(format!("{small}.1.err")),
        vec![b'e'; 3000],
        "the full stderr is kept"
    );
    let out = read(format!("{big}.1.out"));
    assert!(
        out.len() <= 10240 + 100,
        "log_max 10KiB: the log file is {} bytes",
        out.len()
    );
    assert_eq!(
        &out[..10240],
        &[b'x'; 10240][..],
        "the first 10 KiB are kept"
    );
    let rest = String::from_utf8_lossy(&out[10240..]);
    assert!(
        rest.contains("truncated"),
        "the capped log should say it was truncated: {rest:?}"
    );
}

/// An attempt put back by a shutdown runs again under the same attempt number: its log
/// files must still respect log_max.
#[test]
fn log_max_holds_when_an_attempt_runs_again_after_a_shutdown() {
    let Some(env) = setup(
        "300ms",
        r#"
[queues.l]
log_dir = '@D@/logs'
log_max = "1KiB"
shell = '''
head -c 3000 /dev/zero | tr '\0' x
if [ ! -e "$D/second" ]; then echo $$ > "$D/pid"; sleep 30; fi
'''
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let id = submit(&env, "l", &json!({}), &[]);
    wait_pid(&env.path().join("pid"), secs(10));
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(secs(15)), Some(0));
    assert_eq!(env.state(&id), "queued");
    std::fs::write(env.path().join("second"), "").unwrap();
    let _d = env.daemon();
    let v = env.wait_state(&id, "succeeded", secs(20));
    let numbers: Vec<i64> = history(&v)
        .iter()
        .map(|a| a["number"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 1], "{v:#}");
    let files: Vec<(PathBuf, u64)> = ls(&env.path().join("logs"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&id))
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect();
    assert!(!files.is_empty());
    for (p, len) in &files {
        assert!(
            *len <= 1024 + 100,
            "{} is {len} bytes with log_max = 1KiB (files: {files:?})",
            p.display()
        );
    }
}

fn ls(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------------------
// 5. Signals

#[test]
fn sigterm_drains_then_puts_a_long_task_back_uncharged() {
    let Some(env) = setup(
        "1s",
        r#"
[queues.s]
max_attempts = 3
shell = '''
if [ -e "$D/second" ]; then echo "second run, attempt $TASKD_ATTEMPT"; exit 0; fi
echo $$ > "$D/pid"; sleep 30
'''
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let id = submit(&env, "s", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    let t0 = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait_exit(secs(15));
    let took = t0.elapsed();
    assert_eq!(code, Some(0), "a drained daemon exits 0");
    assert!(
        took >= Duration::from_millis(900),
        "the daemon stopped the task before shutdown_grace (1s): {took:?}"
    );
    assert!(
        took < secs(5),
        "the daemon took {took:?} to drain with shutdown_grace 1s"
    );
    assert!(
        all_dead(&[pid], secs(2)).is_empty(),
        "the task {pid} outlived the daemon"
    );

    let v = env.show(&id);
    assert_eq!(v["state"], "queued", "{v:#}");
    assert_eq!(
        v["attempts"], 0,
        "the shutdown must not charge an attempt:\n{v:#}"
    );
    let h = history(&v);
    assert_eq!(h.len(), 1, "{v:#}");
    assert_eq!(h[0]["reason"], "shutdown", "{v:#}");

    // The next daemon runs it again, as attempt 1.
    std::fs::write(env.path().join("second"), "").unwrap();
    let _d = env.daemon();
    let v = env.wait_state(&id, "succeeded", secs(20));
    assert_eq!(v["attempts"], 1, "{v:#}");
    assert_eq!(
        history(&v).last().unwrap()["stdout_tail"],
        "second run, attempt 1\n",
        "{v:#}"
    );
}

#[test]
fn sigterm_lets_a_task_finish_within_the_grace_and_claims_nothing_new() {
    let Some(env) = setup(
        "20s",
        r#"
[queues.f]
shell = '''
touch "$D/started-$TASKD_ARG_n"
while [ ! -e "$D/go" ]; do sleep 0.02; done
echo finished
'''
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let first = submit(&env, "f", &json!({"n": 1}), &[]);
    let second = submit(&env, "f", &json!({"n": 2}), &[]);
    assert!(
        poll(secs(10), || env.path().join("started-1").exists()),
        "the first task did not start"
    );
    d.signal(SIGTERM);
    wait_log(&d, "draining", secs(10));
    std::fs::write(env.path().join("go"), "").unwrap();
    let t0 = Instant::now();
    assert_eq!(d.wait_exit(secs(15)), Some(0));
    assert!(
        t0.elapsed() < secs(5),
        "the daemon waited {:?} after its last task finished",
        t0.elapsed()
    );

    let v = env.show(&first);
    assert_eq!(
        v["state"], "succeeded",
        "a task finishing within the grace succeeds:\n{v:#}"
    );
    assert_eq!(history(&v).len(), 1);
    assert_eq!(history(&v)[0]["stdout_tail"], "finished\n");
    let v = env.show(&second);
    assert_eq!(
        v["state"], "queued",
        "a draining daemon must not claim new tasks:\n{v:#}"
    );
    assert!(history(&v).is_empty(), "{v:#}");
    assert!(
        !env.path().join("started-2").exists(),
        "a draining daemon started a new task"
    );
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let Some(env) = setup(
        "30s",
        r#"
[queues.s]
shell = 'echo $$ > "$D/pid"; sleep 30'
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let id = submit(&env, "s", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    d.signal(SIGTERM);
    wait_log(&d, "draining", secs(10));
    assert!(
        alive(pid),
        "the first SIGTERM must let the task run on (grace 30s)"
    );
    let t0 = Instant::now();
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(secs(20)), Some(0));
    let took = t0.elapsed();
    assert!(
        took < secs(4),
        "after a second SIGTERM the daemon took {took:?} to stop (grace is 30s)"
    );
    assert!(
        all_dead(&[pid], secs(2)).is_empty(),
        "the task {pid} outlived the daemon"
    );
    let v = env.show(&id);
    assert_eq!(v["state"], "queued", "{v:#}");
    assert_eq!(v["attempts"], 0, "{v:#}");
    assert_eq!(history(&v)[0]["reason"], "shutdown", "{v:#}");
}

#[test]
fn a_second_sigterm_stops_at_once_even_a_task_ignoring_sigterm() {
    let Some(env) = setup(
        "30s",
        r#"
[queues.s]
kill_grace = "8s"
shell = '''trap '' TERM; echo $$ > "$D/pid"; sleep 30'''
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let id = submit(&env, "s", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    d.signal(SIGTERM);
    wait_log(&d, "draining", secs(10));
    let t0 = Instant::now();
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(secs(30)), Some(0));
    let took = t0.elapsed();
    assert!(
        took < secs(4),
        "after a second SIGTERM the daemon took {took:?} to stop: it waited for kill_grace (8s) instead of stopping at once"
    );
    assert!(
        all_dead(&[pid], secs(2)).is_empty(),
        "the task {pid} outlived the daemon"
    );
    let v = env.show(&id);
    assert_eq!(v["state"], "queued", "{v:#}");
    assert_eq!(v["attempts"], 0, "{v:#}");
}

#[test]
fn sigint_drains_like_sigterm() {
    let Some(env) = setup(
        "300ms",
        r#"
[queues.s]
shell = 'echo $$ > "$D/pid"; sleep 30'
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    let id = submit(&env, "s", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    d.signal(common::SIGINT);
    assert_eq!(d.wait_exit(secs(15)), Some(0));
    assert!(all_dead(&[pid], secs(2)).is_empty());
    let v = env.show(&id);
    assert_eq!(v["state"], "queued", "{v:#}");
    assert_eq!(history(&v)[0]["reason"], "shutdown", "{v:#}");
}

#[test]
fn sighup_reloads_concurrency_and_queues_and_refuses_an_invalid_config() {
    let blocker = r#"shell = '''echo $$ > "$D/$TASKD_QUEUE-pid-$TASKD_ARG_n"; while [ ! -e "$D/go" ]; do sleep 0.02; done'''"#;
    let v1 = format!(
        "[queues.a]\nconcurrency = 1\n{blocker}\n\n[queues.c]\n{blocker}\n\n[queues.t]\nconcurrency = 2\nmax_attempts = 1\n{blocker}\n"
    );
    let Some(env) = setup("5s", &v1) else {
        return;
    };
    let d = env.daemon();
    let a: Vec<String> = (1..=3)
        .map(|n| submit(&env, "a", &json!({ "n": n }), &[]))
        .collect();
    let c: Vec<String> = (1..=2)
        .map(|n| submit(&env, "c", &json!({ "n": n }), &[]))
        .collect();
    let pid_file = |q: &str, n: u32| env.path().join(format!("{q}-pid-{n}"));
    let a1 = wait_pid(&pid_file("a", 1), secs(10));
    let t1 = submit(&env, "t", &json!({ "n": 1 }), &[]);
    let c1 = wait_pid(&pid_file("c", 1), secs(10));
    let t1_pid = wait_pid(&pid_file("t", 1), secs(10));
    assert_eq!(env.state(&a[1]), "queued", "concurrency 1");

    // Concurrency 1 -> 3, queue c removed, queue b added, queue t's timeout 30m -> 1s.
    let v2 = format!(
        "[queues.a]\nconcurrency = 3\n{blocker}\n\n[queues.b]\nshell = 'echo hello-b'\n\n\
         [queues.t]\nconcurrency = 2\nmax_attempts = 1\ntimeout = \"1s\"\n{blocker}\n"
    );
    write_config(&env, "5s", &v2);
    d.signal(SIGHUP);
    let a2 = wait_pid(&pid_file("a", 2), secs(10));
    let a3 = wait_pid(&pid_file("a", 3), secs(10));
    assert!(
        alive(a1) && alive(c1),
        "a reload must not kill running tasks"
    );
    assert!(a2 != a1 && a3 != a1);
    let b1 = submit(&env, "b", &json!({}), &[]);
    let v = env.wait_state(&b1, "succeeded", secs(10));
    assert_eq!(history(&v)[0]["stdout_tail"], "hello-b\n");
    // The new timeout applies to a task started after the reload, not to the running one.
    let t2 = submit(&env, "t", &json!({ "n": 2 }), &[]);
    let v = wait_done(&env, &t2, secs(15));
    assert_eq!(
        history(&v)[0]["reason"],
        "timeout",
        "the reloaded timeout did not apply:\n{v:#}"
    );
    assert!(
        alive(t1_pid),
        "a timeout change killed a task that was running before the reload"
    );

    // An invalid config is refused and the old one kept. Once the daemon has said so, the
    // valid file goes back for the CLI's sake (the daemon reads it only on SIGHUP).
    let valid = std::fs::read_to_string(&env.config).unwrap();
    // Invalid (an unknown key), and it would raise a's concurrency to 10 if it were applied.
    let bad = v2
        .replace("concurrency = 3", "concurrency = 10")
        .replace("[queues.b]\n", "[queues.b]\nno_such_key = 1\n");
    std::fs::write(&env.config, config_text(&env, "5s", &bad)).unwrap();
    d.signal(SIGHUP);
    wait_log(&d, "the new config is invalid", secs(10));
    std::fs::write(&env.config, valid).unwrap();
    assert!(!d.exited(), "an invalid reload must not stop the daemon");
    let b2 = submit(&env, "b", &json!({}), &[]);
    env.wait_state(&b2, "succeeded", secs(10));
    let a4 = submit(&env, "a", &json!({ "n": 4 }), &[]);
    // Still concurrency 3 with 3 busy: the refused config's 10 was not applied.
    assert_stays(&env, &a4, "queued", Duration::from_millis(500));
    assert!(
        alive(a1) && alive(a2) && alive(a3) && alive(c1),
        "the refused reload killed tasks"
    );

    std::fs::write(env.path().join("go"), "").unwrap();
    for id in a.iter().chain(&c[..1]).chain([&a4, &t1]) {
        let v = env.wait_state(id, "succeeded", secs(10));
        assert_eq!(history(&v).len(), 1, "the task ran more than once:\n{v:#}");
        assert_eq!(v["attempts"], 1);
    }
    // The removed queue drained: its running task finished, its queued one did not start.
    assert_stays(&env, &c[1], "queued", Duration::from_millis(500));
    assert!(!pid_file("c", 2).exists());
}

// ------------------------------------------------------------------------------------------
// 6. Control

#[test]
fn cancel_kills_a_running_task_group_quickly() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.k]
kill_grace = "5s"
shell = 'sleep 30 & echo $! > "$D/bg"; echo $$ > "$D/pid"; wait'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let id = submit(&env, "k", &json!({}), &[]);
    let pid = wait_pid(&env.path().join("pid"), secs(10));
    let bg = wait_pid(&env.path().join("bg"), secs(10));
    env.wait_state(&id, "running", secs(10));
    let t0 = Instant::now();
    let out = env.ok(&["cancel", &id]);
    assert!(
        out.contains("being stopped"),
        "cancel of a running task: {out:?}"
    );
    let survivors = all_dead(&[pid, bg], secs(5));
    let took = t0.elapsed();
    assert!(survivors.is_empty(), "cancel left {survivors:?} alive");
    eprintln!("cancel -> task group dead: {took:?} (includes the CLI process)");
    assert!(
        took < secs(2),
        "cancel took {took:?} to kill the task's group"
    );
    let v = env.wait_state(&id, "cancelled", secs(10));
    let h = history(&v);
    assert_eq!(h.len(), 1, "{v:#}");
    assert_eq!(h[0]["reason"], "cancelled", "{v:#}");
    // Cancelling a finished task is an error.
    let again = env.run(&["cancel", &id]);
    assert_eq!(again.status.code(), Some(1), "cancelling a cancelled task");
}

#[test]
fn pause_stops_claiming_survives_a_restart_and_resume_runs() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.p]
shell = 'echo ran-p'

[queues.ctl]
shell = 'echo ctl'
"#,
    ) else {
        return;
    };
    let d = env.daemon();
    env.ok(&["pause", "p"]);
    let p = submit(&env, "p", &json!({}), &[]);
    let p_cancel = submit(&env, "p", &json!({"cancel": true}), &[]);
    let ctl = submit(&env, "ctl", &json!({}), &[]);
    env.wait_state(&ctl, "succeeded", secs(10));
    assert_stays(&env, &p, "queued", secs(1));
    let status: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    let row = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "p")
        .unwrap()
        .clone();
    assert_eq!(row["paused"], true, "{status:#}");

    // A waiting task is cancelled at once.
    let out = env.ok(&["cancel", &p_cancel]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(env.state(&p_cancel), "cancelled");

    // Restart: still paused.
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(secs(15)), Some(0));
    let _d = env.daemon();
    let ctl2 = submit(&env, "ctl", &json!({}), &[]);
    env.wait_state(&ctl2, "succeeded", secs(10));
    assert_stays(&env, &p, "queued", secs(1));

    env.ok(&["resume", "p"]);
    let v = env.wait_state(&p, "succeeded", secs(10));
    assert_eq!(history(&v)[0]["stdout_tail"], "ran-p\n");
    assert_eq!(
        env.state(&p_cancel),
        "cancelled",
        "a cancelled task must not run on resume"
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let close = s.rfind(')').unwrap();
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// CPU ticks the process uses over `window` (a measurement, not a wait for an outcome).
fn cpu_over(pid: i32, window: Duration) -> u64 {
    let a = cpu_ticks(pid);
    std::thread::sleep(window);
    cpu_ticks(pid) - a
}

#[test]
fn an_idle_daemon_does_not_spin_on_a_due_task_of_a_paused_queue() {
    let Some(env) = setup("5s", "[queues.p]\nshell = 'true'\n") else {
        return;
    };
    let d = env.daemon();
    let idle = cpu_over(d.pid(), Duration::from_millis(1500));
    env.ok(&["pause", "p"]);
    let id = env
        .ok(&["submit", "p", "--delay", "100ms"])
        .trim()
        .to_string();
    assert!(poll(secs(5), || env.show(&id)["run_at"].as_i64().unwrap()
        + 200
        < nanos() as i64 / 1_000_000));
    let paused = cpu_over(d.pid(), Duration::from_millis(1500));
    eprintln!("daemon CPU over 1.5 s: idle {idle} ticks, with a due task on a paused queue {paused} ticks");
    assert!(paused <= idle + 5, "the daemon burns CPU ({paused} ticks in 1.5 s, idle {idle}) while a paused queue holds a due task");
    env.ok(&["resume", "p"]);
    env.wait_state(&id, "succeeded", secs(10));
}

#[test]
fn pausing_a_busy_queue_starts_nothing_new_and_gives_held_tasks_back() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.b]
concurrency = 2
shell = 'date +%s%N > "$D/starts/$TASKD_TASK_ID"; sleep 0.2; : > "$D/ends/$TASKD_TASK_ID"'
"#,
    ) else {
        return;
    };
    std::fs::create_dir(env.path().join("starts")).unwrap();
    std::fs::create_dir(env.path().join("ends")).unwrap();
    let files = |dir: &str| std::fs::read_dir(env.path().join(dir)).unwrap().count() as u64;
    let _d = env.daemon();
    let ids = submit_batch(&env, "b", &vec![json!({}); 30]);
    assert!(
        poll(secs(10), || env.count("b", "succeeded") >= 2),
        "the queue did not start"
    );
    env.ok(&["pause", "b"]);
    let paused_at = nanos();
    // Whatever was running finishes; then nothing is running and nothing more starts. A
    // task whose process has started shows as running only once its start record is
    // written (a few ms later, longer on a loaded machine): until then it counts as queued,
    // so "settled" also needs every started process ended and its end recorded.
    let settled = poll(secs(10), || {
        let ends = files("ends");
        env.count("b", "running") == 0
            && files("starts") == ends
            && env.count("b", "succeeded") == ends
    });
    assert!(
        settled,
        "tasks stay running after pause: {}",
        env.ok(&["status", "--json"])
    );
    let done = env.count("b", "succeeded");
    assert_stays_count(&env, "b", "succeeded", done, Duration::from_millis(600));
    assert_eq!(
        env.count("b", "queued"),
        30 - done,
        "{}",
        env.ok(&["status", "--json"])
    );
    let late: Vec<(String, u128)> = ids
        .iter()
        .filter_map(|id| {
            let t = std::fs::read_to_string(env.path().join("starts").join(id)).ok()?;
            let t: u128 = t.trim().parse().ok()?;
            // A second's slack: a task the daemon started just before `pause` returned may
            // take a while to reach its `date` on a loaded machine, while a pause that
            // did not hold would go on starting tasks for about three seconds more.
            (t > paused_at + 1_000_000_000).then(|| (id.clone(), (t - paused_at) / 1_000_000))
        })
        .collect();
    assert!(
        late.is_empty(),
        "tasks started more than 1 s after `pause` returned (id, ms): {late:?}"
    );
    // Tasks given back were never run: no attempt is recorded for them.
    for id in &ids {
        let v = env.show(id);
        if v["state"] == "queued" {
            assert!(
                history(&v).is_empty() && v["attempts"] == 0,
                "a task given back by pause:\n{v:#}"
            );
        }
    }
    env.ok(&["resume", "b"]);
    assert!(
        poll(secs(30), || env.count("b", "succeeded") == 30),
        "resume did not finish the queue"
    );
}

fn assert_stays_count(env: &Env, queue: &str, state: &str, n: u64, window: Duration) {
    let start = Instant::now();
    while start.elapsed() < window {
        assert_eq!(
            env.count(queue, state),
            n,
            "{queue}/{state} changed during the window"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancelling_a_claimed_task_that_has_not_started_means_it_never_runs() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.q]
shell = '''
touch "$D/started-$TASKD_ARG_n"
while [ ! -e "$D/go" ]; do sleep 0.02; done
'''
"#,
    ) else {
        return;
    };
    // Enqueued before the daemon starts: it finds a backlog.
    let ids: Vec<String> = (1..=4)
        .map(|n| submit(&env, "q", &json!({ "n": n }), &[]))
        .collect();
    let _d = env.daemon();
    assert!(poll(secs(10), || env.path().join("started-1").exists()));
    // Cancel every waiting task, whatever the daemon has done with it so far.
    let t0 = Instant::now();
    for id in &ids[1..] {
        env.ok(&["cancel", id]);
    }
    for id in &ids[1..] {
        let v = env.wait_state(id, "cancelled", secs(5));
        for a in history(&v) {
            assert_eq!(a["reason"], "cancelled", "{v:#}");
        }
        assert_eq!(
            v["attempts"], 0,
            "a task that never ran was charged:\n{v:#}"
        );
    }
    eprintln!(
        "cancel of 3 waiting tasks -> all cancelled: {:?}",
        t0.elapsed()
    );
    std::fs::write(env.path().join("go"), "").unwrap();
    env.wait_state(&ids[0], "succeeded", secs(10));
    for n in 2..=4 {
        assert!(
            !env.path().join(format!("started-{n}")).exists(),
            "cancelled task {n} ran"
        );
    }
}

#[test]
fn submit_wait_exits_0_on_success_and_4_on_failure() {
    let Some(env) = setup(
        "5s",
        r#"
[queues.ok]
shell = 'echo "out:$TASKD_ARG_msg"'

[queues.bad]
max_attempts = 2
shell = 'echo failing-out; echo failing-err >&2; exit 5'

[queues.slow]
shell = 'echo $$ > "$D/slow-pid"; sleep 30'
"#,
    ) else {
        return;
    };
    let _d = env.daemon();
    let out = env.run(&["submit", "--wait", "ok", r#"{"msg":"hello"}"#]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout}\nstderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("out:hello"),
        "submit --wait prints the output: {stdout:?}"
    );
    let id = stdout.lines().next().unwrap().trim().to_string();
    assert_eq!(env.state(&id), "succeeded");

    let out = env.run(&["submit", "--wait", "bad"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert!(stdout.contains("failing-out"), "{stdout:?}");
    assert!(
        stderr.contains("failing-err") && stderr.contains("failed"),
        "{stderr:?}"
    );
    let id = stdout.lines().next().unwrap().trim().to_string();
    let v = env.show(&id);
    assert_eq!(v["state"], "failed");
    assert_eq!(
        history(&v).len(),
        2,
        "--wait follows the task through its retries:\n{v:#}"
    );

    // Cancelled while --wait follows it: exit 4.
    let mut follower = env
        .cmd(&["submit", "--wait", "slow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_pid(&env.path().join("slow-pid"), secs(10));
    let id = env.ok(&["tasks", "--queue", "slow", "--json"]);
    let id = serde_json::from_str::<Value>(&id).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&["cancel", &id]);
    let mut code = None;
    poll(secs(10), || {
        code = follower.try_wait().unwrap().map(|st| st.code());
        code.is_some()
    });
    if code.is_none() {
        let _ = follower.kill();
    }
    let out = follower.wait_with_output().unwrap();
    assert_eq!(
        code,
        Some(Some(4)),
        "submit --wait on a cancelled task; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid));
}

// ------------------------------------------------------------------------------------------
// 7. One daemon per state directory

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_naming_the_first() {
    let Some(env) = setup("5s", "[queues.q]\nshell = 'true'\n") else {
        return;
    };
    let first = env.daemon();
    let mut second = env
        .cmd(&["start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    poll(secs(10), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second daemon on the same state_dir kept running");
    }
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon exited 0");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "the refusal should name the first daemon's pid {}: {stderr}",
        first.pid()
    );
    assert!(!first.exited(), "the first daemon died");
    // And the first still works.
    let id = submit(&env, "q", &json!({}), &[]);
    env.wait_state(&id, "succeeded", secs(10));
}

/// Integers beyond 64 bits and decimals beyond an f64 reach the task as they were given
/// (stdin, `TASKD_ARG_*`, a `{field}` placeholder) and `taskd show` shows them so, whether
/// the task came through `taskd submit` or the HTTP API.
#[test]
fn numbers_beyond_64_bits_reach_the_task_exactly() {
    let Some(case) = Case::new() else { return };
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n{}\n\
         [queues.cat]\nshell = 'cat; echo; echo \"$TASKD_ARG_big\"'\n\n\
         [queues.echo]\ncommand = [\"/bin/echo\", \"{{big}}\", \"{{f}}\"]\n",
        case.taskd_lines()
    );
    std::fs::write(&case.config, text).expect("write config");
    let d = case.daemon();
    let url = d.api_base();
    const BIG: &str = "123456789012345678901234567890";
    const F: &str = "0.1000000000000000055511151231257827";
    // Keys in order, no spaces: the payload's text as taskd keeps it.
    let payload = format!(r#"{{"big":{BIG},"f":{F},"neg":-98765432109876543210987654321}}"#);
    let by_cli = case.ok(&["submit", "cat", &payload]).trim().to_string();
    let r = ureq::post(&format!("{url}/api/v1/queues/cat/tasks"))
        .send_string(&format!(r#"{{"payload": {payload}}}"#))
        .expect("the API takes the task");
    let by_api: Value = serde_json::from_str(&r.into_string().expect("body")).expect("JSON");
    let by_api = by_api["id"].as_str().expect("an id").to_string();
    for id in [&by_cli, &by_api] {
        let done = case.wait_state(id, "succeeded", secs(20));
        assert_eq!(
            history(&done)[0]["stdout_tail"].as_str().expect("stdout"),
            format!("{payload}\n{BIG}\n"),
            "stdin and TASKD_ARG_big of {id}"
        );
        assert_eq!(done["payload"].to_string(), payload, "show --json of {id}");
        let shown = case.ok(&["show", id]);
        assert!(
            shown.contains(BIG) && shown.contains(F) && !shown.contains("e+29"),
            "taskd show {id}:\n{shown}"
        );
    }
    let id = case.ok(&["submit", "echo", &payload]).trim().to_string();
    let done = case.wait_state(&id, "succeeded", secs(20));
    assert_eq!(history(&done)[0]["stdout_tail"], format!("{BIG} {F}\n"));
}

// ------------------------------------------------------------------------------------------
// Results (tests/daemon/results.rs)

#[path = "results.rs"]
mod results;

// ------------------------------------------------------------------------------------------
// Retention (tests/daemon/retention.rs)

#[path = "retention.rs"]
mod retention;
