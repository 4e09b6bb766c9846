//! The audit trail through the real binary, on SQLite and on Redis: every change made
//! through each path (the local CLI, the control socket, the HTTP API with a named token, a
//! signal) is recorded exactly once with who and what; what is refused before it reaches
//! the store or the daemon (a bad token, a malformed id, a queue the config does not name)
//! is not, and what the store or the daemon refuses is, as `refused`. The trail is bounded
//! by `audit_keep`. (`taskd audit`'s table is read cell by cell in tests/tables.rs; the
//! `tokens` config errors are in tests/config_errors.rs; the broker's rules in
//! tests/broker_contract.rs.)

mod common;
#[cfg(feature = "redis")]
#[path = "common/redis.rs"]
mod redis_server;

use std::time::Duration;

use common::{poll, Env, SIGHUP, SIGTERM};
use serde_json::Value;

const DEFAULT_TOKEN: &str = "default-token-0123456789abcdef";
const CI_TOKEN: &str = "ci-token-0123456789abcdef";

/// A worker that is ready at once and answers nothing (its queue gets no task here).
const WORKER: &str = r#"["sh", "-c", "echo '{\"type\":\"ready\",\"protocol\":1}' >&4; while read -r l <&3; do :; done"]"#;

/// Where the store is.
enum Backend {
    Sqlite,
    #[cfg(feature = "redis")]
    Redis,
}

/// A test's directory and config, and the Redis server it uses (kept alive with it).
struct Setup {
    env: Env,
    #[cfg(feature = "redis")]
    _redis: Option<redis_server::RedisServer>,
    #[cfg(feature = "redis")]
    redis_port: Option<u16>,
}

impl std::ops::Deref for Setup {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

/// A config with the single token, a named one (`ci`, in a 0600 file), a listener, two
/// queues, a schedule and `extra` in `[taskd]`; `None` when the backend cannot run here (skipped
/// visibly).
fn setup(backend: Backend, extra: &str) -> Option<Setup> {
    let env = Env::raw("");
    let file = env.path().join("ci.token");
    std::fs::write(&file, format!("{CI_TOKEN}\n")).expect("write the token file");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 600");
    #[allow(unused_mut)]
    let mut broker = String::new();
    #[cfg(feature = "redis")]
    let mut redis = None;
    #[cfg(feature = "redis")]
    let mut redis_port = None;
    match backend {
        Backend::Sqlite => {}
        #[cfg(feature = "redis")]
        Backend::Redis => {
            let server = redis_server::RedisServer::start(&common::skip::current_test())?;
            broker = format!("broker = \"{}\"\nlease = \"3s\"\n", server.url());
            redis_port = Some(server.port);
            redis = Some(server);
        }
    }
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\n\
         token = \"{DEFAULT_TOKEN}\"\ntokens = [{{ name = \"ci\", token_file = \"ci.token\" }}]\n{broker}{extra}\n\
         [queues.q]\nshell = \"true\"\n\n\
         [queues.w]\nworker = {WORKER}\nstart_secs = \"0s\"\n\n\
         [schedules.nightly]\nqueue = \"q\"\ncron = \"0 3 * * *\"\nmissed = \"skip\"\n"
    );
    std::fs::write(&env.config, text).expect("write the config");
    Some(Setup {
        env,
        #[cfg(feature = "redis")]
        _redis: redis,
        #[cfg(feature = "redis")]
        redis_port,
    })
}

/// The whole trail, oldest first (`taskd audit --json -n 0`), read with a copy of the
/// config as it was first written (the test breaks the config itself for a while).
fn trail(env: &Env) -> Vec<Value> {
    let reader = env.path().join("reader.toml");
    if !reader.exists() {
        std::fs::copy(&env.config, &reader).expect("copy the config");
    }
    let out = std::process::Command::new(common::BIN)
        .arg("-c")
        .arg(&reader)
        .args(["audit", "--json", "-n", "0"])
        .env_remove("TASKD_CONFIG")
        .output()
        .expect("run taskd audit");
    assert!(
        out.status.success(),
        "taskd audit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    match serde_json::from_str(&out) {
        Ok(Value::Array(a)) => a,
        other => panic!("audit --json is not an array: {other:?}\n{out}"),
    }
}

/// The real uid of this process (the tests' commands run as the same user).
fn my_uid() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("a Uid line");
    line.split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .expect("a uid")
}

/// The user name of `uid`, from /etc/passwd.
fn user_of(uid: u64) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse::<u64>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

/// Checks one change at a time: each must add exactly one record to the trail.
struct Trail<'a> {
    env: &'a Env,
    count: usize,
}

impl<'a> Trail<'a> {
    fn new(env: &'a Env) -> Self {
        Trail {
            env,
            count: trail(env).len(),
        }
    }

    /// `act` (done by the time it returns) added exactly one record; return it.
    fn one(&mut self, what: &str, act: impl FnOnce()) -> Value {
        act();
        let t = trail(self.env);
        assert_eq!(
            t.len(),
            self.count + 1,
            "{what}: want exactly one new record; the trail:\n{}",
            serde_json::to_string_pretty(&t).unwrap_or_default()
        );
        self.count += 1;
        t.last().cloned().expect("a record")
    }

    /// `act` added nothing to the trail.
    fn none(&mut self, what: &str, act: impl FnOnce()) {
        act();
        let t = trail(self.env);
        assert_eq!(
            t.len(),
            self.count,
            "{what}: want no record; the trail ends with {:#}",
            t.last().cloned().unwrap_or_default()
        );
    }

    /// A record the daemon writes beside its main loop (its start, a SIGHUP reload):
    /// wait for it, then insist there is exactly one.
    fn one_later(&mut self, what: &str, act: impl FnOnce()) -> Value {
        act();
        let mut t = Vec::new();
        let ok = poll(Duration::from_secs(20), || {
            t = trail(self.env);
            t.len() > self.count
        });
        assert!(ok, "{what}: no record within 20 s");
        assert_eq!(t.len(), self.count + 1, "{what}: {t:#?}");
        self.count += 1;
        t.last().cloned().expect("a record")
    }
}

fn run_code(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let out = env.run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn post(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request("POST", url).timeout(Duration::from_secs(60));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let (code, text) = match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("POST {url}: {e}"),
    };
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(url: &str) -> Value {
    let text = ureq::get(url)
        .timeout(Duration::from_secs(20))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_string()
        .expect("a body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {e}\n{text}"))
}

/// Asserts a record's who: the path, and the Unix user or the token.
fn assert_who(r: &Value, via: &str, uid: Option<u64>, token: Option<&str>) {
    let a = &r["actor"];
    assert_eq!(a["via"], via, "{r:#}");
    assert_eq!(a["uid"].as_u64(), uid, "{r:#}");
    assert_eq!(a["token"].as_str(), token, "{r:#}");
    let who = r["who"].as_str().expect("who");
    match (via, uid, token) {
        ("cli", Some(u), _) => {
            let want = match user_of(u) {
                Some(name) => format!("local cli uid {u} ({name})"),
                None => format!("local cli uid {u}"),
            };
            assert!(who.starts_with(&want), "{who:?} should start with {want:?}");
            assert_eq!(a["user"].as_str(), user_of(u).as_deref(), "{r:#}");
        }
        ("socket", Some(u), _) => {
            assert!(who.starts_with(&format!("socket uid {u}")), "{who:?}");
            assert!(a["pid"].as_u64().is_some(), "the peer's pid: {r:#}");
        }
        ("api", _, Some(t)) => {
            assert!(
                who.starts_with(&format!("api token \"{t}\" from 127.0.0.1:")),
                "{who:?}"
            );
            assert!(
                a["addr"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("127.0.0.1:")),
                "{r:#}"
            );
        }
        _ => {}
    }
}

/// Asserts a record's what: action, target, outcome, and a fragment of its detail.
fn assert_what(
    r: &Value,
    action: &str,
    task: Option<&str>,
    queue: Option<&str>,
    outcome: &str,
    detail: &str,
) {
    assert_eq!(r["action"], action, "{r:#}");
    assert_eq!(r["task"].as_str(), task, "{r:#}");
    assert_eq!(r["queue"].as_str(), queue, "{r:#}");
    assert_eq!(r["outcome"], outcome, "{r:#}");
    assert!(
        r["detail"].as_str().is_some_and(|d| d.contains(detail)),
        "detail lacks {detail:?}: {r:#}"
    );
}

/// Every change through every path, one record each: the scenario of the two tests below.
fn every_path(s: &Setup) {
    let env: &Env = s;
    let uid = my_uid();
    let d = env.daemon();
    let url = d.api_base();
    let mut t = Trail::new(env);
    // The daemon's start is recorded beside its main loop, after "ready".
    let start = if t.count == 0 {
        t.one_later("the daemon's start", || {})
    } else {
        trail(env).last().cloned().expect("a record")
    };
    assert_eq!(t.count, 1, "one start record");
    assert_what(&start, "start", None, None, "ok", "started");
    assert_eq!(start["actor"]["via"], "daemon");

    // --- the local CLI ---------------------------------------------------------------------
    let id = env
        .ok(&["submit", "q", "{}", "--delay", "1h"])
        .trim()
        .to_string();
    let r = t.one("taskd cancel", || {
        env.ok(&["cancel", &id]);
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(
        &r,
        "cancel",
        Some(&id),
        Some("q"),
        "ok",
        "cancelled before it ran",
    );
    let r = t.one("taskd retry", || {
        env.ok(&["retry", &id]);
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(
        &r,
        "retry",
        Some(&id),
        Some("q"),
        "ok",
        "fresh attempt budget",
    );
    let r = t.one("taskd pause", || {
        env.ok(&["pause", "q"]);
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(&r, "pause", None, Some("q"), "ok", "paused");
    let r = t.one("taskd resume", || {
        env.ok(&["resume", "q"]);
    });
    assert_what(&r, "resume", None, Some("q"), "ok", "resumed");
    // Refused by the store: recorded, with why (and the task's queue when it exists).
    let waiting = env
        .ok(&["submit", "q", "{}", "--delay", "1h"])
        .trim()
        .to_string();
    let r = t.one("taskd retry of a waiting task", || {
        assert_eq!(run_code(env, &["retry", &waiting]).0, Some(1));
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(
        &r,
        "retry",
        Some(&waiting),
        Some("q"),
        "refused",
        "only failed or cancelled",
    );
    let unknown = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20";
    let r = t.one("taskd cancel of an unknown task", || {
        assert_eq!(run_code(env, &["cancel", unknown]).0, Some(1));
    });
    assert_what(
        &r,
        "cancel",
        Some(unknown),
        None,
        "refused",
        "no task with id",
    );
    // Refused before the store: not an action on anything, not recorded.
    t.none("taskd retry of a malformed id", || {
        assert_eq!(run_code(env, &["retry", "not-an-id"]).0, Some(2));
    });
    t.none("taskd pause of a queue the config does not name", || {
        assert_eq!(run_code(env, &["pause", "nope"]).0, Some(2));
    });
    // A schedule's fire, pause and resume: the schedule, its queue, and a fire's task.
    let mut fired = String::new();
    let r = t.one("taskd schedules fire", || {
        fired = env.ok(&["schedules", "fire", "nightly"]).trim().to_string();
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(
        &r,
        "schedule_fire",
        Some(&fired),
        Some("q"),
        "ok",
        "enqueued now, outside its slots",
    );
    assert_eq!(r["schedule"], "nightly");
    assert_eq!(
        r["target"],
        format!("schedule nightly, task {fired} (queue q)")
    );
    let r = t.one("taskd schedules pause", || {
        env.ok(&["schedules", "pause", "nightly"]);
    });
    assert_who(&r, "cli", Some(uid), None);
    assert_what(&r, "schedule_pause", None, Some("q"), "ok", "paused");
    assert_eq!(r["target"], "schedule nightly (queue q)");
    let r = t.one("taskd schedules resume", || {
        env.ok(&["schedules", "resume", "nightly"]);
    });
    assert_what(
        &r,
        "schedule_resume",
        None,
        Some("q"),
        "ok",
        "missed slots (missed = \"skip\")",
    );
    assert_eq!(r["schedule"], "nightly");
    for action in ["fire", "pause", "resume"] {
        t.none(
            &format!("taskd schedules {action} of an unknown name"),
            || {
                let (code, err) = run_code(env, &["schedules", action, "nope"]);
                assert_eq!(code, Some(2), "{err}");
                assert!(err.contains("known schedules: nightly"), "{err}");
            },
        );
    }

    // --- the control socket ----------------------------------------------------------------
    let r = t.one("taskd restart", || {
        env.ok(&["restart", "w"]);
    });
    assert_who(&r, "socket", Some(uid), None);
    assert_what(&r, "restart", None, Some("w"), "ok", "restarting 1 worker");
    let r = t.one("taskd reload", || {
        env.ok(&["reload"]);
    });
    assert_who(&r, "socket", Some(uid), None);
    assert_what(&r, "reload", None, None, "ok", "nothing changed");
    // An invalid file: `taskd reload` refuses it itself (exit 78) and never asks the daemon;
    // SIGHUP makes the daemon try, and refuse: recorded.
    let good = std::fs::read_to_string(&env.config).expect("read the config");
    std::fs::write(
        &env.config,
        format!("{good}\n[queues.bad]\nconcurrency = 0\n"),
    )
    .expect("break the config");
    t.none("taskd reload of an invalid config", || {
        assert_eq!(run_code(env, &["reload"]).0, Some(78));
    });
    let r = t.one_later("SIGHUP with an invalid config", || d.signal(SIGHUP));
    assert_eq!(r["actor"]["via"], "signal");
    assert_eq!(r["actor"]["signal"], "SIGHUP");
    assert_what(
        &r,
        "reload",
        None,
        None,
        "refused",
        "the new config is invalid",
    );
    std::fs::write(&env.config, &good).expect("restore the config");

    // --- the HTTP API, with each token -----------------------------------------------------
    let api = |path: &str| format!("{url}/api/v1/{path}");
    let r = t.one("POST pause with the ci token", || {
        assert_eq!(post(&api("queues/q/pause"), Some(CI_TOKEN)).0, 200);
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(&r, "pause", None, Some("q"), "ok", "paused");
    let r = t.one("POST resume with the default token", || {
        assert_eq!(post(&api("queues/q/resume"), Some(DEFAULT_TOKEN)).0, 200);
    });
    assert_who(&r, "api", None, Some("default"));
    assert_what(&r, "resume", None, Some("q"), "ok", "resumed");
    let r = t.one("POST cancel", || {
        assert_eq!(
            post(&api(&format!("tasks/{waiting}/cancel")), Some(CI_TOKEN)).0,
            200
        );
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(
        &r,
        "cancel",
        Some(&waiting),
        Some("q"),
        "ok",
        "cancelled before it ran",
    );
    let r = t.one("POST retry", || {
        assert_eq!(
            post(&api(&format!("tasks/{waiting}/retry")), Some(CI_TOKEN)).0,
            200
        );
    });
    assert_what(
        &r,
        "retry",
        Some(&waiting),
        Some("q"),
        "ok",
        "fresh attempt budget",
    );
    let r = t.one("POST cancel of a task that already finished", || {
        // The retried task runs `true` and succeeds.
        env.wait_state(&waiting, "succeeded", Duration::from_secs(20));
        let (code, v) = post(&api(&format!("tasks/{waiting}/cancel")), Some(CI_TOKEN));
        assert_eq!(
            (code, v["outcome"].clone()),
            (200, serde_json::json!({"already_finished": "succeeded"}))
        );
    });
    assert_what(
        &r,
        "cancel",
        Some(&waiting),
        Some("q"),
        "refused",
        "already finished (succeeded)",
    );
    let r = t.one("POST retry of an unknown task", || {
        assert_eq!(
            post(&api(&format!("tasks/{unknown}/retry")), Some(CI_TOKEN)).0,
            404
        );
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(
        &r,
        "retry",
        Some(unknown),
        None,
        "refused",
        "no task with id",
    );
    let r = t.one("POST restart", || {
        assert_eq!(post(&api("queues/w/restart"), Some(CI_TOKEN)).0, 202);
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(&r, "restart", None, Some("w"), "ok", "restarting 1 worker");
    // A bulk operation: one record for the whole of it, with its filter and count; a dry
    // run changes nothing and is not recorded.
    let cancelled: Vec<String> = (0..3)
        .map(|_| {
            let id = env
                .ok(&["submit", "q", "{}", "--delay", "1h"])
                .trim()
                .to_string();
            env.ok(&["cancel", &id]);
            id
        })
        .collect();
    t.count += 3;
    let bulk = |body: &str| {
        let r = ureq::post(&api("tasks/bulk"))
            .set("Authorization", &format!("Bearer {CI_TOKEN}"))
            .send_string(body)
            .unwrap_or_else(|e| panic!("bulk: {e}"));
        serde_json::from_str::<Value>(&r.into_string().expect("a body")).expect("JSON")
    };
    t.none("a bulk dry run", || {
        let v = bulk(r#"{"action": "retry", "filter": {"queue": "q", "state": "cancelled"}, "dry_run": true}"#);
        assert_eq!(v["matched"], 3, "{v:#}");
    });
    let r = t.one("a bulk retry", || {
        let v = bulk(
            r#"{"action": "retry", "filter": {"queue": "q", "state": "cancelled"}, "expect": 3}"#,
        );
        assert_eq!(v["done"], 3, "{v:#}");
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(
        &r,
        "bulk_retry",
        None,
        Some("q"),
        "ok",
        "3 of 3 tasks queued again",
    );
    assert_eq!(
        r["filter"],
        serde_json::json!({"queue": "q", "state": "cancelled"})
    );
    assert_eq!(r["count"], 3);
    assert_eq!(r["target"], "queue=q state=cancelled (3 tasks)");
    for id in &cancelled {
        assert_ne!(env.state(id), "cancelled", "{id} was retried");
    }

    // Refused before anything is attempted: a missing or wrong token (the log says so),
    // a malformed id, a queue the daemon does not know, a queue without workers.
    t.none("POST pause with a wrong token", || {
        assert_eq!(
            post(&api("queues/q/pause"), Some("wrong-token-0123456789abcdef")).0,
            401
        );
    });
    t.none("POST pause without a token", || {
        assert_eq!(post(&api("queues/q/pause"), None).0, 401);
    });
    assert!(
        d.log_text()
            .contains("API: refused POST /api/v1/queues/q/pause from 127.0.0.1:"),
        "a refused token is in the daemon's log:\n{}",
        d.log_text()
    );
    assert!(!d.log_text().contains("wrong-token"), "a token in the log");
    t.none("POST cancel of a malformed id", || {
        assert_eq!(post(&api("tasks/not-an-id/cancel"), Some(CI_TOKEN)).0, 400);
    });
    t.none("POST pause of an unknown queue", || {
        assert_eq!(post(&api("queues/nope/pause"), Some(CI_TOKEN)).0, 404);
    });
    t.none("POST restart of a queue without workers", || {
        assert_eq!(post(&api("queues/q/restart"), Some(CI_TOKEN)).0, 409);
    });
    // A schedule's fire, pause and resume over HTTP: with the token's name.
    let r = t.one("POST schedules/nightly/fire", || {
        let (code, v) = post(&api("schedules/nightly/fire"), Some(CI_TOKEN));
        assert_eq!(code, 201, "{v:#}");
        fired = v["task"]["id"].as_str().expect("the task").to_string();
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(
        &r,
        "schedule_fire",
        Some(&fired),
        Some("q"),
        "ok",
        "outside its slots",
    );
    assert_eq!(r["schedule"], "nightly");
    let r = t.one("POST schedules/nightly/pause", || {
        assert_eq!(post(&api("schedules/nightly/pause"), Some(CI_TOKEN)).0, 200);
    });
    assert_who(&r, "api", None, Some("ci"));
    assert_what(&r, "schedule_pause", None, Some("q"), "ok", "paused");
    let r = t.one("POST schedules/nightly/resume", || {
        assert_eq!(
            post(&api("schedules/nightly/resume"), Some(DEFAULT_TOKEN)).0,
            200
        );
    });
    assert_who(&r, "api", None, Some("default"));
    assert_what(&r, "schedule_resume", None, Some("q"), "ok", "resumed");
    t.none("POST fire of an unknown schedule", || {
        assert_eq!(post(&api("schedules/nope/fire"), Some(CI_TOKEN)).0, 404);
    });
    t.none("POST pause of a schedule without a token", || {
        assert_eq!(post(&api("schedules/nightly/pause"), None).0, 401);
    });
    // Enqueues are the workload, not an operator's change.
    t.none("an enqueue", || {
        env.ok(&["submit", "q", "{}"]);
        let (code, _) = {
            let r = ureq::post(&api("queues/q/tasks"))
                .set("Authorization", &format!("Bearer {CI_TOKEN}"))
                .send_string("{}");
            match r {
                Ok(r) => (r.status(), ()),
                Err(e) => panic!("enqueue: {e}"),
            }
        };
        assert_eq!(code, 201);
    });

    // The API shows the same trail, newest first, a page at a time.
    let local = trail(env);
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = api("audit?limit=7");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = get(&path);
        let records = page["records"].as_array().expect("records").clone();
        assert!(records.len() <= 7);
        seen.extend(records);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    seen.reverse();
    assert_eq!(
        seen, local,
        "GET /api/v1/audit and taskd audit --json differ"
    );
    let recent = get(&api("audit?since=1h"));
    assert_eq!(
        recent["records"].as_array().map(Vec::len),
        Some(local.len())
    );
    let none = get(&api("audit?since=2030-01-01T00:00:00Z"));
    assert_eq!(none["records"], serde_json::json!([]));

    // --- the daemon's stop ------------------------------------------------------------------
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0));
    let after = trail(env);
    assert_eq!(after.len(), t.count + 1, "one stop record: {after:#?}");
    let stop = after.last().expect("a record");
    assert_what(stop, "stop", None, None, "ok", "draining");
    assert_eq!(stop["actor"]["signal"], "SIGTERM");
}

#[test]
fn every_change_is_recorded_once_on_sqlite() {
    let Some(s) = setup(Backend::Sqlite, "") else {
        return;
    };
    every_path(&s);
}

#[cfg(feature = "redis")]
#[test]
fn every_change_is_recorded_once_on_redis() {
    let Some(s) = setup(Backend::Redis, "") else {
        return;
    };
    every_path(&s);
}

/// `audit_keep` bounds the trail: the newest records stay.
fn keep_bounds(s: &Setup) -> Vec<Value> {
    for _ in 0..3 {
        s.ok(&["pause", "q"]);
        s.ok(&["resume", "q"]);
    }
    let t = trail(s);
    let actions: Vec<&str> = t.iter().filter_map(|r| r["action"].as_str()).collect();
    assert_eq!(
        actions,
        ["resume", "pause", "resume"],
        "the newest 3, oldest first"
    );
    let newest = s.ok(&["audit", "--json", "-n", "1"]);
    let newest: Vec<Value> = serde_json::from_str(&newest).expect("JSON");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0], *t.last().expect("records"));
    t
}

#[test]
fn audit_keep_bounds_the_trail_on_sqlite() {
    let Some(s) = setup(Backend::Sqlite, "audit_keep = 3\n") else {
        return;
    };
    keep_bounds(&s);
    let db = rusqlite::Connection::open(s.path().join("state/taskd.db")).expect("open the store");
    let n: i64 = db
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .expect("count the audit rows");
    assert_eq!(n, 3, "rows in the audit table, not only the listing");
}

#[cfg(feature = "redis")]
#[test]
fn audit_keep_bounds_the_trail_on_redis() {
    let Some(s) = setup(Backend::Redis, "audit_keep = 3\n") else {
        return;
    };
    keep_bounds(&s);
    let port = s.redis_port.expect("a redis port");
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "XLEN", "taskd:audit"])
        .output()
        .expect("redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "3",
        "the stream is capped, not only the listing"
    );
}
