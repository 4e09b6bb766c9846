//! The Celery bridge on Redis against the real Celery client (the pinned venv of
//! common/celery_venv.rs) and a private redis-server (common/redis.rs), both set up by
//! [`Fixture::start`].

#![cfg(feature = "redis")]

#[path = "common/celery_venv.rs"]
mod celery_venv;
mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use taskd::celery::message::ResultTo;
use taskd::celery::redis::RedisResults;
use taskd::celery::CeleryState;

/// A Celery client that reads the results of the ids written to its stdin, one a line, with
/// `AsyncResult(id).get()`, and prints what it got as a JSON line: the value, or the
/// exception raised (its module and class, its args), and the state afterwards.
const WAITER: &str = r#"
import json, os, sys
from celery import Celery
from celery.result import AsyncResult
app = Celery("t", broker=sys.argv[1], backend=sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    tid = line.strip()
    try:
        out = {"id": tid, "value": AsyncResult(tid, app=app).get(timeout=20)}
    except Exception as e:
        out = {"id": tid, "raised": type(e).__module__ + "." + type(e).__name__,
               "args": [str(a) for a in e.args]}
    out["state"] = AsyncResult(tid, app=app).state
    print(json.dumps(out), flush=True)
os._exit(0)  # not through the interpreter's teardown, where Celery's finalizers complain
"#;

fn to(id: &str) -> ResultTo {
    ResultTo {
        id: id.to_string(),
        reply_to: None,
        correlation_id: None,
        ignore_result: false,
    }
}

/// What every test here starts with: a private redis-server, whose db 0 is the Celery
/// broker and db 1 its result backend, and the pinned Celery venv. `None` when either cannot
/// be had: the test is skipped visibly (failed under `CI=true`).
struct Fixture {
    server: redis_server::RedisServer,
    py: std::path::PathBuf,
}

impl Fixture {
    fn start(test: &str) -> Option<Fixture> {
        let server = redis_server::RedisServer::start(test)?;
        let py = celery_venv::python(test)?;
        Some(Fixture { server, py })
    }

    /// `redis://127.0.0.1:<port>/<db>`.
    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.server.port)
    }

    /// A Celery producer of this broker and backend.
    fn producer(&self) -> Producer {
        Producer::start(&self.py, &self.url(0), &self.url(1))
    }

    /// A taskd config with `queues` (TOML tables), bridging the broker and backend with the
    /// `[celery]` keys `celery` adds and the `[celery.tasks]` lines `routes`.
    fn env(&self, queues: &str, celery: &str, routes: &str) -> common::Env {
        common::Env::new(&self.tables(queues, celery, routes))
    }

    /// That config's tables after `[taskd]` (for [`common::Env::rewrite`]).
    fn tables(&self, queues: &str, celery: &str, routes: &str) -> String {
        format!(
            "{queues}\n[celery]\nbroker = \"{}\"\nresult_backend = \"{}\"\n{celery}\n[celery.tasks]\n{routes}\n",
            self.url(0),
            self.url(1)
        )
    }
}

/// Waits until someone subscribes to `channel` (a client blocked in `get()`).
fn wait_subscribed(conn: &mut redis::Connection, channel: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(conn)
            .unwrap();
        if n.first().is_some_and(|(_, n)| *n > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no client subscribed to {channel}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn results_written_by_the_redis_sink_are_what_celery_clients_read() {
    let test = "results_written_by_the_redis_sink_are_what_celery_clients_read";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt
        .block_on(RedisResults::open(&f.url(1), Duration::from_secs(600)))
        .unwrap();
    let store = |id: &str, state: CeleryState| {
        rt.block_on(taskd::celery::ResultSink::store(&sink, &to(id), &state))
            .unwrap()
    };
    let ids: Vec<String> = (0..6).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    // Written before the client asks: it reads the key.
    store(
        &ids[0],
        CeleryState::Success(json!({"sent": 3, "to": ["a", "b"]})),
    );
    store(
        &ids[1],
        CeleryState::Failure {
            module: "builtins".into(),
            class: "RuntimeError".into(),
            message: "exit code 3".into(),
            traceback: Some("disk full\n".into()),
        },
    );
    store(&ids[2], CeleryState::Revoked("expired".into()));
    // STARTED never replaces a ready state, and nothing replaces SUCCESS.
    store(
        &ids[0],
        CeleryState::Started {
            hostname: "h".into(),
            pid: 1,
        },
    );
    store(&ids[0], CeleryState::Revoked("revoked".into()));

    let mut child = Command::new(&f.py)
        .args(["-c", WAITER, &f.url(0), &f.url(1)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    assert_eq!(next()["ready"], true);
    let mut ask = |id: &str| writeln!(stdin, "{id}").unwrap();
    ask(&ids[0]);
    let got = next();
    assert_eq!(got["value"], json!({"sent": 3, "to": ["a", "b"]}), "{got}");
    assert_eq!(got["state"], "SUCCESS");
    ask(&ids[1]);
    let got = next();
    assert_eq!(got["raised"], "builtins.RuntimeError", "{got}");
    assert_eq!(got["args"], json!(["exit code 3"]));
    assert_eq!(got["state"], "FAILURE");
    ask(&ids[2]);
    let got = next();
    assert_eq!(got["raised"], "celery.exceptions.TaskRevokedError", "{got}");
    assert_eq!(got["args"], json!(["expired"]));
    assert_eq!(got["state"], "REVOKED");

    // Written while the client waits: the PUBLISH wakes it (well before its 20 s timeout).
    let client = redis::Client::open(f.url(1)).unwrap();
    let mut conn = client.get_connection().unwrap();
    for (i, state, check) in [
        (
            3,
            CeleryState::Success(Value::Null),
            json!({"value": null, "state": "SUCCESS"}),
        ),
        (
            4,
            CeleryState::Failure {
                module: "celery.exceptions".into(),
                class: "TimeLimitExceeded".into(),
                message: "timed out after 1s".into(),
                traceback: None,
            },
            // celery.exceptions re-exports billiard's class: the one `except` catches.
            json!({"raised": "billiard.exceptions.TimeLimitExceeded", "state": "FAILURE"}),
        ),
        (
            5,
            CeleryState::Revoked("revoked".into()),
            json!({"raised": "celery.exceptions.TaskRevokedError", "state": "REVOKED"}),
        ),
    ] {
        ask(&ids[i]);
        wait_subscribed(&mut conn, &format!("celery-task-meta-{}", ids[i]));
        let began = Instant::now();
        store(&ids[i], state);
        let got = next();
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "get() waited past the write"
        );
        for (k, v) in check.as_object().unwrap() {
            assert_eq!(&got[k], v, "{k} of {got}");
        }
    }
    // The key expires with the backend's expiry.
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("celery-task-meta-{}", ids[0]))
        .query(&mut conn)
        .unwrap();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");
    drop(stdin);
    let _ = child.wait();
}

/// A Celery producer driven by JSON lines on stdin, answering each with a JSON line:
/// `{"op": "send", "name", "args", "kwargs", "opts"}` → `{"id"}` (`app.send_task`, `opts`
/// are apply_async's: countdown, expires, priority, queue, serializer);
/// `{"op": "get", "id", "timeout"}` → `{"value"}` or `{"raised", "args"}`, and `state`;
/// `{"op": "state", "id"}` → `{"state"}`; `{"op": "revoke", "id", "terminate"}` → `{}`.
const PRODUCER: &str = r#"
import json, os, sys
from celery import Celery
from celery.result import AsyncResult
app = Celery("app", broker=sys.argv[1], backend=sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    c = json.loads(line)
    if c["op"] == "send":
        r = app.send_task(c["name"], args=c.get("args", []), kwargs=c.get("kwargs", {}), **c.get("opts", {}))
        out = {"id": r.id}
    elif c["op"] == "get":
        r = AsyncResult(c["id"], app=app)
        try:
            out = {"value": r.get(timeout=c.get("timeout", 30))}
        except Exception as e:
            out = {"raised": type(e).__module__ + "." + type(e).__name__, "args": [str(a) for a in e.args]}
        out["state"] = AsyncResult(c["id"], app=app).state
    elif c["op"] == "state":
        out = {"state": AsyncResult(c["id"], app=app).state}
    elif c["op"] == "revoke":
        app.control.revoke(c["id"], terminate=c.get("terminate", False))
        out = {}
    print(json.dumps(out), flush=True)
os._exit(0)
"#;

struct Producer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Producer {
    fn start(py: &std::path::Path, broker: &str, backend: &str) -> Producer {
        let mut child = Command::new(py)
            .args(["-c", PRODUCER, broker, backend])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut p = Producer {
            child,
            stdin,
            lines,
        };
        assert_eq!(p.read()["ready"], true);
        p
    }

    fn read(&mut self) -> Value {
        serde_json::from_str(&self.lines.next().expect("a line").unwrap()).unwrap()
    }

    fn call(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.read()
    }

    fn send(&mut self, name: &str, args: Value, opts: Value) -> String {
        let r = self.call(json!({"op": "send", "name": name, "args": args, "opts": opts}));
        r["id"].as_str().unwrap().to_string()
    }

    fn get(&mut self, id: &str) -> Value {
        self.call(json!({"op": "get", "id": id}))
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The queues of most tests: `default` sums the arguments into the result file, `failing`
/// fails with a message on stderr, `slow` sleeps a minute.
const QUEUES: &str = r#"
[queues.default]
command = ["python3", "-c", "import json, os, sys; p = json.load(sys.stdin); open(os.environ['TASKD_RESULT_FILE'], 'w').write(json.dumps(sum(p['args'])))"]
concurrency = 4

[queues.failing]
shell = "echo 'disk full' >&2; exit 3"
max_attempts = 1

[queues.slow]
shell = "sleep 60"
"#;

/// Their routes: `app.tasks.fail` and `app.tasks.sleep` (which tracks starts) to theirs,
/// every other `app.tasks.*` to `default`.
const ROUTES: &str = r#"
"app.tasks.fail" = "failing"
"app.tasks.sleep" = { queue = "slow", track_started = true }
"app.tasks.*" = "default"
"#;

/// The record of task `id` once the bridge has ingested it.
fn ingested(env: &common::Env, id: &str) -> Value {
    assert!(
        common::poll(Duration::from_secs(20), || env
            .run(&["show", id, "--json"])
            .status
            .success()),
        "task {id} was never ingested"
    );
    env.show(id)
}

#[test]
fn celery_producers_run_their_tasks_on_taskd_and_get_results() {
    let test = "celery_producers_run_their_tasks_on_taskd_and_get_results";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = f.env(QUEUES, r#"queues = ["celery", "alerts"]"#, ROUTES);
    let daemon = env.daemon();
    let mut p = f.producer();

    // delay(2, 3).get() == 5, and the task is a taskd task under the Celery id.
    let id = p.send("app.tasks.add", json!([2, 3]), json!({}));
    let got = p.get(&id);
    assert_eq!(got["value"], 5, "{got}\n{}", daemon.log_text());
    assert_eq!(got["state"], "SUCCESS");
    let shown = env.show(&id);
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["payload"]["task"], "app.tasks.add");
    assert_eq!(shown["payload"]["celery"]["id"], id.as_str());
    let human = env.ok(&["show", &id]);
    assert!(
        human
            .lines()
            .any(|l| l == format!("celery    app.tasks.add (Celery id {id})")),
        "{human}"
    );

    // A failure raises a class the client has: builtins.RuntimeError, saying why.
    let id = p.send("app.tasks.fail", json!([]), json!({}));
    let got = p.get(&id);
    assert_eq!(got["raised"], "builtins.RuntimeError", "{got}");
    assert!(
        got["args"][0].as_str().unwrap().contains("exit code 3"),
        "{got}"
    );
    assert_eq!(got["state"], "FAILURE");

    // countdown: the task waits in taskd until then; a named queue and a priority.
    let id = p.send("app.tasks.add", json!([1, 1]), json!({"countdown": 2}));
    let shown = ingested(&env, &id);
    assert!(
        matches!(
            shown["state"].as_str(),
            Some("scheduled") | Some("queued") | Some("running") | Some("succeeded")
        ),
        "{shown}"
    );
    assert_eq!(p.get(&id)["value"], 2);
    let id = p.send(
        "app.tasks.add",
        json!([4, 4]),
        json!({"queue": "alerts", "priority": 9}),
    );
    assert_eq!(p.get(&id)["value"], 8);
    assert_eq!(env.show(&id)["priority"], -9);

    // Refused: an unmapped name, a pickled message, an expired one. The client raises.
    let id = p.send("billing.charge", json!([]), json!({}));
    let got = p.get(&id);
    assert_eq!(got["raised"], "celery.exceptions.NotRegistered", "{got}");
    assert!(
        got["args"][0].as_str().unwrap().contains("billing.charge"),
        "{got}"
    );
    let id = p.send(
        "app.tasks.add",
        json!([1, 2]),
        json!({"serializer": "pickle"}),
    );
    let got = p.get(&id);
    assert_eq!(got["raised"], "kombu.exceptions.ContentDisallowed", "{got}");
    assert!(got["args"][0].as_str().unwrap().contains("pickle"), "{got}");
    let id = p.send("app.tasks.add", json!([1, 2]), json!({"expires": -5}));
    let got = p.get(&id);
    assert_eq!(got["raised"], "celery.exceptions.TaskRevokedError", "{got}");

    // Revoke of a waiting task and of a running one.
    let id = p.send("app.tasks.add", json!([1, 2]), json!({"countdown": 60}));
    ingested(&env, &id);
    env.wait_state(&id, "scheduled", Duration::from_secs(20));
    p.call(json!({"op": "revoke", "id": id}));
    env.wait_state(&id, "cancelled", Duration::from_secs(20));
    let got = p.get(&id);
    assert_eq!(got["raised"], "celery.exceptions.TaskRevokedError", "{got}");
    let id = p.send("app.tasks.sleep", json!([]), json!({}));
    ingested(&env, &id);
    env.wait_state(&id, "running", Duration::from_secs(20));
    // Its route tracks starts: the client sees STARTED while it runs.
    let mut state = Value::Null;
    assert!(
        common::poll(Duration::from_secs(20), || {
            state = p.call(json!({"op": "state", "id": id}))["state"].clone();
            state == "STARTED"
        }),
        "state {state}"
    );
    p.call(json!({"op": "revoke", "id": id, "terminate": true}));
    env.wait_state(&id, "cancelled", Duration::from_secs(20));
    let got = p.get(&id);
    assert_eq!(got["raised"], "celery.exceptions.TaskRevokedError", "{got}");

    // Every message was acknowledged, and the queues' bindings are there for producers.
    let client = redis::Client::open(f.url(0)).unwrap();
    let mut conn = client.get_connection().unwrap();
    let unacked: i64 = redis::cmd("HLEN").arg("unacked").query(&mut conn).unwrap();
    assert_eq!(unacked, 0);
    let bound: bool = redis::cmd("SISMEMBER")
        .arg("_kombu.binding.alerts")
        .arg("alerts\x06\x16\x06\x16alerts")
        .query(&mut conn)
        .unwrap();
    assert!(bound);
    let log = daemon.log_text();
    assert!(
        log.contains("Celery message refused; its task failed"),
        "{log}"
    );
}

#[test]
fn a_task_survives_taskd_killed_between_ingest_and_finish() {
    let test = "a_task_survives_taskd_killed_between_ingest_and_finish";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = f.env(
        r#"
[queues.nap]
shell = "sleep 3; echo '\"napped\"' > \"$TASKD_RESULT_FILE\""
"#,
        "",
        r#""app.tasks.nap" = "nap""#,
    );
    let daemon = env.daemon();
    let mut p = f.producer();
    let id = p.send("app.tasks.nap", json!([]), json!({}));
    ingested(&env, &id);
    env.wait_state(&id, "running", Duration::from_secs(20));
    daemon.kill9();
    // Ingested (the message is acknowledged), not finished: the store has it, and the next
    // daemon runs it again (its lost run recorded) and writes the result.
    let _again = env.daemon();
    let got = p.get(&id);
    assert_eq!(got["value"], "napped", "{got}");
    let shown = env.show(&id);
    assert_eq!(shown["state"], "succeeded");
    let reasons: Vec<&str> = common::history(&shown)
        .iter()
        .filter_map(|a| a["reason"].as_str())
        .collect();
    assert_eq!(reasons, vec!["lost", "exit"], "{shown}");
}

/// A Celery worker's app for the tests: `app.tasks.add` sums its arguments, as taskd's
/// queue does; `app.tasks.nap` sleeps a minute (late ack: its message stays unacknowledged
/// while it runs).
const WORKER_APP: &str = r#"
import time
from celery import Celery
import os
app = Celery("app", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
app.conf.broker_transport_options = {"visibility_timeout": 2}
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True

@app.task(name="app.tasks.add")
def add(*args):
    return sum(args)

@app.task(name="app.tasks.nap")
def nap():
    time.sleep(60)
"#;

#[test]
fn a_celery_worker_and_taskd_sharing_redis_lose_nothing_when_either_is_killed() {
    let test = "a_celery_worker_and_taskd_sharing_redis_lose_nothing_when_either_is_killed";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = f.env(
        r#"
[queues.default]
command = ["python3", "-c", "import json, os, sys; p = json.load(sys.stdin); open(os.environ['TASKD_RESULT_FILE'], 'w').write(json.dumps(sum(p['args'])))"]
concurrency = 2

[queues.nap]
shell = "echo '\"napped by taskd\"' > \"$TASKD_RESULT_FILE\""
"#,
        r#"visibility_timeout = "2s""#,
        r#"
"app.tasks.nap" = "nap"
"app.tasks.*" = "default"
"#,
    );
    std::fs::write(env.path().join("worker_app.py"), WORKER_APP).unwrap();
    let worker = || {
        Command::new(&f.py)
            .args([
                "-m",
                "celery",
                "-A",
                "worker_app",
                "worker",
                "--pool",
                "solo",
                "-Q",
                "celery",
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ])
            .current_dir(env.path())
            .env("BROKER", f.url(0))
            .env("BACKEND", f.url(1))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(env.path().join(format!("worker-{}.log", common::unique())))
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    };
    let client = redis::Client::open(f.url(0)).unwrap();
    let mut conn = client.get_connection().unwrap();
    let mut p = f.producer();

    // The Celery worker takes a long task (late ack) and is killed: taskd restores the
    // message it left unacknowledged and runs it.
    let mut celery = worker();
    let nap = p.send("app.tasks.nap", json!([]), json!({}));
    assert!(
        common::poll(Duration::from_secs(30), || {
            let n: i64 = redis::cmd("HLEN").arg("unacked").query(&mut conn).unwrap();
            n == 1
        }),
        "the Celery worker never took the message"
    );
    celery.kill().unwrap();
    celery.wait().unwrap();
    let daemon = env.daemon();
    let got = p.get(&nap);
    assert_eq!(
        got["value"],
        "napped by taskd",
        "{got}\n{}",
        daemon.log_text()
    );

    // Both consume one queue; each is killed in turn while messages flow. Every task's
    // result arrives, from one or the other.
    let mut celery = worker();
    let ids: Vec<(String, i64)> = (0..30)
        .map(|i| (p.send("app.tasks.add", json!([i, 1]), json!({})), i + 1))
        .collect();
    daemon.kill9();
    let _daemon = env.daemon();
    celery.kill().unwrap();
    celery.wait().unwrap();
    let mut celery = worker();
    for (id, want) in &ids {
        let got = p.get(id);
        assert_eq!(got["value"], *want, "{id}: {got}");
    }
    celery.kill().unwrap();
    let _ = celery.wait();
}

#[test]
fn two_nodes_ingesting_from_one_celery_broker_run_each_task_once() {
    let test = "two_nodes_ingesting_from_one_celery_broker_run_each_task_once";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let base = format!("redis://127.0.0.1:{}", f.server.port);
    // Two daemons sharing taskd's broker (db 2), each with its own state directory, both
    // bridging the same Celery broker (db 0).
    let node = || {
        common::Env::raw(&format!(
            r#"
[taskd]
state_dir = "state"
broker = "{base}/2"
shutdown_grace = "5s"

[queues.default]
command = ["python3", "-c", "import json, os, sys; p = json.load(sys.stdin); open(os.environ['TASKD_RESULT_FILE'], 'w').write(json.dumps(sum(p['args'])))"]
concurrency = 2

[celery]
broker = "{base}/0"
result_backend = "{base}/1"
[celery.tasks]
"app.tasks.*" = "default"
"#
        ))
    };
    let (a, b) = (node(), node());
    let _da = a.daemon();
    let _db = b.daemon();
    let mut p = f.producer();
    let ids: Vec<(String, i64)> = (0..40)
        .map(|i| (p.send("app.tasks.add", json!([i, 2]), json!({})), i + 2))
        .collect();
    for (id, want) in &ids {
        assert_eq!(p.get(id)["value"], *want, "{id}");
        let shown = a.show(id);
        assert_eq!(shown["state"], "succeeded");
        assert_eq!(common::history(&shown).len(), 1, "ran once: {shown}");
    }
}

/// A revoke of a task whose message taskd has not taken yet (it waits in a Celery queue
/// taskd does not consume) is kept, across a restart: when taskd takes the message, the
/// client gets REVOKED and the task never runs.
#[test]
fn a_revoke_sent_before_taskd_takes_the_message_revokes_it_on_arrival() {
    let test = "a_revoke_sent_before_taskd_takes_the_message_revokes_it_on_arrival";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = f.env(QUEUES, r#"queues = ["celery"]"#, ROUTES);
    let daemon = env.daemon();
    let mut p = f.producer();
    // The bridge consumes (and listens for revokes) once a first task has come back.
    let first = p.send("app.tasks.add", json!([1, 1]), json!({}));
    assert_eq!(p.get(&first)["value"], 2);
    let id = p.send("app.tasks.add", json!([2, 2]), json!({"queue": "later"}));
    p.call(json!({"op": "revoke", "id": id}));
    assert!(
        common::poll(Duration::from_secs(20), || daemon.log_text().lines().any(
            |l| l.contains("kept until its message arrives") && l.contains(&id)
        )),
        "the revoke was not kept:\n{}",
        daemon.log_text()
    );
    assert!(
        !env.run(&["show", &id]).status.success(),
        "not ingested yet"
    );
    // Restarted, consuming the queue that holds the message as well.
    drop(daemon);
    env.rewrite(&f.tables(QUEUES, r#"queues = ["celery", "later"]"#, ROUTES));
    let daemon = env.daemon();
    let got = p.get(&id);
    assert_eq!(got["raised"], "celery.exceptions.TaskRevokedError", "{got}");
    assert_eq!(got["args"], json!(["revoked"]), "{got}");
    assert_eq!(got["state"], "REVOKED");
    assert!(
        common::poll(Duration::from_secs(20), || daemon.log_text().lines().any(
            |l| l.contains("revoked before taskd received it; not run") && l.contains(&id)
        )),
        "{}",
        daemon.log_text()
    );
    let shown = env.run(&["show", &id]);
    assert!(!shown.status.success(), "no task was made for it");
    let client = redis::Client::open(f.url(0)).unwrap();
    let mut conn = client.get_connection().unwrap();
    let (waiting, unacked): (i64, i64) = redis::pipe()
        .cmd("LLEN")
        .arg("later")
        .cmd("HLEN")
        .arg("unacked")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        (waiting, unacked),
        (0, 0),
        "the message was taken and acknowledged"
    );
}

/// A Celery `time_limit` shorter than the queue's `timeout` is the task's timeout; a longer
/// one leaves the queue's. The client raises TimeLimitExceeded either way.
#[test]
fn a_celery_time_limit_shorter_than_the_queue_timeout_stops_the_task() {
    let test = "a_celery_time_limit_shorter_than_the_queue_timeout_stops_the_task";
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = f.env(
        r#"
[queues.slow]
shell = "sleep 60"
timeout = "3s"
kill_grace = "1s"
max_attempts = 1
concurrency = 2
"#,
        "",
        r#""app.tasks.*" = "slow""#,
    );
    let _daemon = env.daemon();
    let mut p = f.producer();
    let short = p.send(
        "app.tasks.nap",
        json!([]),
        json!({"time_limit": 1, "soft_time_limit": 0.5}),
    );
    let long = p.send("app.tasks.nap", json!([]), json!({"time_limit": 600}));
    for (id, after) in [(&short, "1s"), (&long, "3s")] {
        let got = p.get(id);
        // celery.exceptions.TimeLimitExceeded is billiard's class, which names its module.
        assert_eq!(
            got["raised"], "billiard.exceptions.TimeLimitExceeded",
            "{got}"
        );
        assert_eq!(got["state"], "FAILURE");
        let shown = env.show(id);
        assert_eq!(common::history(&shown)[0]["reason"], "timeout", "{shown}");
        let human = env.ok(&["show", id]);
        assert!(
            human.contains(&format!("timed out after {after} ")),
            "{id}: {human}"
        );
    }
}

/// The dashboard, in a real browser, names a Celery task by its Celery name and id: on its
/// page (as `taskd show` does) and under its id in the task list.
#[test]
fn the_dashboard_names_celery_tasks_by_their_celery_name_and_id() {
    let test = "the_dashboard_names_celery_tasks_by_their_celery_name_and_id";
    let Some(chromium) = common::browser::find_chromium() else {
        common::skip::skip_named(
            test,
            "chromium is not installed",
            "apt-get install -y chromium",
        );
        return;
    };
    let Some(f) = Fixture::start(test) else {
        return;
    };
    let env = common::Env::new(&format!(
        "listen = \"127.0.0.1:0\"\n{}",
        f.tables(QUEUES, "", ROUTES)
    ));
    let daemon = env.daemon();
    let mut p = f.producer();
    let id = p.send("app.tasks.add", json!([20, 22]), json!({}));
    assert_eq!(p.get(&id)["value"], 42);
    let plain = env.submit("default", r#"{"args": [1, 2]}"#);
    env.wait_state(&plain, "succeeded", Duration::from_secs(20));

    let mut b =
        common::browser::Browser::open(&chromium, &format!("{}/#task/{id}", daemon.api_base()));
    b.wait_for(
        "!!document.querySelector('#task-celery')",
        "the task page's celery line",
    );
    assert_eq!(
        b.eval("document.querySelector('#task-celery').textContent"),
        json!(format!("app.tasks.add (Celery id {id})"))
    );
    b.eval("location.hash = '#tasks?queue=default'; true");
    b.wait_for(
        "document.querySelectorAll('#tasks tbody tr[data-task]').length === 2",
        "both tasks listed",
    );
    let names = b.eval(
        "Object.fromEntries([...document.querySelectorAll('#tasks tbody tr[data-task]')].map(r => [r.dataset.task, r.querySelector('.celery-name')?.textContent ?? null]))",
    );
    assert_eq!(
        names,
        json!({ id.clone(): "app.tasks.add", plain.clone(): null })
    );
    b.eval(&format!("location.hash = '#task/{plain}'; true"));
    b.wait_for(
        &format!("document.querySelector('#task-head code')?.textContent === '{plain}'"),
        "the plain task's page",
    );
    assert_eq!(
        b.eval("document.querySelector('#task-celery')"),
        Value::Null
    );
}
