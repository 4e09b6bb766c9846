//! The Celery bridge on RabbitMQ, against a private `rabbitmq-server` each test starts and
//! the real Celery client from PyPI (a pinned venv, tests/common/celery_venv.rs).

#[path = "common/celery_venv.rs"]
mod celery_venv;
mod common;
#[path = "common/rabbitmq.rs"]
mod rabbitmq;
#[path = "common/redis.rs"]
mod redis_server;

use common::secs;
use rabbitmq::RabbitServer;

/// Python that sends with the real Celery client and prints each message as RabbitMQ holds
/// it (read back with py-amqp's basic.get), as JSON lines.
const PRODUCE_AND_READ: &str = r#"
import json, os, amqp
from celery import Celery
app = Celery("probe", broker=os.environ["BROKER"], backend="rpc://")
a = app.send_task("app.tasks.add", args=[2, 3], kwargs={"z": 1})
b = app.send_task("app.tasks.alert", args=["hi"], countdown=30, expires=120, priority=7,
                  queue="alerts")
print(json.dumps({"ids": [a.id, b.id]}))
conn = amqp.Connection(host="127.0.0.1:" + os.environ["PORT"]); conn.connect()
ch = conn.channel()
for q in ["celery", "alerts"]:
    m = ch.basic_get(q, no_ack=False)
    props = dict(m.properties)
    print(json.dumps({"queue": q, "exchange": m.delivery_info["exchange"],
                      "routing_key": m.delivery_info["routing_key"], "properties": props,
                      "body": m.body if isinstance(m.body, str) else m.body.decode()},
                     default=str))
conn.close()
"#;

#[test]
fn private_rabbitmq_answers_survives_a_kill_and_leaves_no_process_behind() {
    let test = "private_rabbitmq_answers_survives_a_kill_and_leaves_no_process_behind";
    let Some(py) = celery_venv::python(test) else {
        return;
    };
    let Some(mut server) = RabbitServer::start(test) else {
        return;
    };
    assert!(rabbitmq::amqp_answers(server.port));
    assert_ne!(server.port, 5672, "never the machine's RabbitMQ port");
    let pids = server.pids();
    assert!(
        pids.len() >= 3,
        "epmd, the start script and the Erlang VM at least: {pids:?}"
    );

    // A persistent message in a durable queue survives SIGKILL of every server process.
    let (ok, out, err) = celery_venv::run(
        &py,
        r#"
import os
from celery import Celery
app = Celery("probe", broker=os.environ["BROKER"])
print(app.send_task("app.tasks.add", args=[1, 2]).id)
"#,
        &[("BROKER", &server.url())],
    );
    assert!(ok, "celery send_task failed:\n{out}\n{err}");
    assert_eq!(server.queues().get("celery").map(|q| q.0), Some(1));
    server.restart();
    assert!(server.pids().iter().all(|p| !pids.contains(p)));
    assert_eq!(
        server.queues().get("celery").map(|q| q.0),
        Some(1),
        "the durable queue lost its message across the restart:\n{}",
        server.log_text()
    );

    let port = server.port;
    let pids = server.pids();
    drop(server);
    for p in &pids {
        assert!(
            !common::alive(*p),
            "process {p} of the server is still running after the drop"
        );
    }
    assert!(!rabbitmq::amqp_answers(port));
}

/// What the bridge relies on from Celery's producer over AMQP, checked against the real
/// client: the default exchange with the queue's name as routing key, the task id as
/// correlation id, the caller's reply queue in reply_to, persistent delivery, the priority
/// property, the protocol-2 headers, and a JSON body.
#[test]
fn celery_producer_sends_what_the_amqp_transport_reads() {
    let test = "celery_producer_sends_what_the_amqp_transport_reads";
    let Some(py) = celery_venv::python(test) else {
        return;
    };
    let Some(server) = RabbitServer::start(test) else {
        return;
    };
    let (ok, out, err) = celery_venv::run(
        &py,
        PRODUCE_AND_READ,
        &[
            ("BROKER", &server.url()),
            ("PORT", &server.port.to_string()),
        ],
    );
    assert!(ok, "the producer failed:\n{out}\n{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let ids = lines[0]["ids"].as_array().expect("ids").clone();
    for (m, (queue, id)) in lines[1..]
        .iter()
        .zip([("celery", &ids[0]), ("alerts", &ids[1])])
    {
        assert_eq!(m["exchange"], "", "{m}");
        assert_eq!(m["routing_key"], queue, "{m}");
        let p = &m["properties"];
        assert_eq!(&p["correlation_id"], id, "{m}");
        assert!(p["reply_to"].as_str().is_some_and(|r| r.len() == 36), "{m}");
        assert_eq!(p["delivery_mode"], 2, "{m}");
        assert_eq!(p["content_type"], "application/json", "{m}");
        assert_eq!(p["content_encoding"], "utf-8", "{m}");
        let h = &p["application_headers"];
        assert_eq!(&h["id"], id, "{m}");
        assert_eq!(h["lang"], "py", "{m}");
        assert_eq!(h["retries"], 0, "{m}");
        let body: serde_json::Value =
            serde_json::from_str(m["body"].as_str().expect("body")).expect("a JSON body");
        assert_eq!(body.as_array().map(|a| a.len()), Some(3), "{body}");
    }
    let (plain, alert) = (&lines[1], &lines[2]);
    assert_eq!(
        plain["properties"]["application_headers"]["task"],
        "app.tasks.add"
    );
    assert_eq!(plain["properties"]["priority"], 0);
    assert_eq!(
        plain["properties"]["application_headers"]["eta"],
        serde_json::Value::Null
    );
    let body: serde_json::Value = serde_json::from_str(plain["body"].as_str().unwrap()).unwrap();
    assert_eq!(body[0], serde_json::json!([2, 3]));
    assert_eq!(body[1], serde_json::json!({"z": 1}));

    let h = &alert["properties"]["application_headers"];
    assert_eq!(alert["properties"]["priority"], 7);
    // expires travels twice: as the header and as RabbitMQ's per-message TTL (ms, a string).
    assert_eq!(alert["properties"]["expiration"], "120000");
    assert!(
        h["eta"].as_str().is_some_and(|e| e.ends_with("+00:00")),
        "{h}"
    );
    assert!(
        h["expires"].as_str().is_some_and(|e| e.ends_with("+00:00")),
        "{h}"
    );

    // The producer declared each queue durable, with no arguments (no x-max-priority), and
    // the caller's reply queue.
    let declared = server.ctl(&[
        "list_queues",
        "--no-table-headers",
        "name",
        "durable",
        "auto_delete",
        "arguments",
    ]);
    for q in ["celery", "alerts"] {
        assert!(
            declared
                .lines()
                .any(|l| l == format!("{q}\ttrue\tfalse\t[]")),
            "{declared}"
        );
    }
}

/// A Celery client process driven line by line over stdin, answering one JSON line per
/// command on stdout:
/// - `send {"name", "args", "kwargs", "options", "via"}`: `delay` (via "delay"),
///   `apply_async` (via "apply_async", the default) or `send_task` (via "send_task");
///   `options.eta_in` (seconds from now) becomes an `eta`. Answers `{"sent": id}`.
/// - `revoke ID TERMINATE` (0 or 1): `app.control.revoke`. Answers `{"revoked": id}`.
/// - `get ID TIMEOUT`: `AsyncResult(id).get(timeout)`. Answers `{"value": …}` or the
///   exception raised: `{"exc_type", "exc_module", "message"}`.
const CLIENT: &str = r#"
import datetime, json, os, sys
from celery import Celery
app = Celery("client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                result_accept_content=["json"])
tasks = {}
def task(name):
    if name not in tasks:
        def body(*a, **k):
            raise RuntimeError("runs on taskd, never in the client")
        tasks[name] = app.task(name=name)(body)
    return tasks[name]
results = {}
def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    cmd, _, rest = line.strip().partition(" ")
    try:
        if cmd == "send":
            c = json.loads(rest)
            opts = dict(c.get("options", {}))
            if "eta_in" in opts:
                opts["eta"] = (datetime.datetime.now(datetime.timezone.utc)
                               + datetime.timedelta(seconds=opts.pop("eta_in")))
            args, kwargs, via = c.get("args", []), c.get("kwargs", {}), c.get("via", "apply_async")
            if via == "delay":
                r = task(c["name"]).delay(*args, **kwargs)
            elif via == "send_task":
                r = app.send_task(c["name"], args=args, kwargs=kwargs, **opts)
            else:
                r = task(c["name"]).apply_async(args=args, kwargs=kwargs, **opts)
            results[r.id] = r
            say({"sent": r.id})
        elif cmd == "revoke":
            tid, terminate = rest.split()
            app.control.revoke(tid, terminate=terminate == "1")
            say({"revoked": tid})
        elif cmd == "get":
            tid, timeout = rest.split()
            r = results.get(tid) or app.AsyncResult(tid)
            say({"value": r.get(timeout=float(timeout))})
        else:
            say({"error": "unknown command " + cmd})
    except Exception as e:
        say({"exc_type": type(e).__name__, "exc_module": type(e).__module__, "message": str(e)})
"#;

struct Client {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
    err: std::path::PathBuf,
}

impl Client {
    fn start(py: &std::path::Path, dir: &std::path::Path, broker: &str, backend: &str) -> Client {
        use std::process::{Command, Stdio};
        let err = dir.join(format!("client-{}.err", common::unique()));
        let mut child = Command::new(py)
            .arg("-c")
            .arg(CLIENT)
            .env("BROKER", broker)
            .env("BACKEND", backend)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).expect("client stderr"))
            .spawn()
            .expect("start the Celery client");
        let stdin = child.stdin.take().expect("stdin");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Client {
            child,
            stdin,
            out,
            err,
        }
    }

    fn ask(&mut self, line: &str) -> serde_json::Value {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{line}").expect("write to the client");
        self.stdin.flush().expect("flush");
        let mut answer = String::new();
        self.out.read_line(&mut answer).expect("read the client");
        serde_json::from_str(&answer).unwrap_or_else(|_| {
            panic!(
                "the Celery client answered {answer:?} to {line:?}; its stderr:\n{}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            )
        })
    }

    /// Send a task; its id.
    fn send(&mut self, call: serde_json::Value) -> String {
        let a = self.ask(&format!("send {call}"));
        a["sent"]
            .as_str()
            .unwrap_or_else(|| panic!("send {call} failed: {a}"))
            .to_string()
    }

    fn get(&mut self, id: &str, timeout_s: u32) -> serde_json::Value {
        self.ask(&format!("get {id} {timeout_s}"))
    }

    fn revoke(&mut self, id: &str, terminate: bool) {
        let a = self.ask(&format!("revoke {id} {}", u8::from(terminate)));
        assert_eq!(a["revoked"], id, "{a}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A taskd config bridging `broker`: `app.add` adds its two arguments (jq, into the result
/// file), `app.boom` fails with a message on stderr, `app.sleep` sleeps a minute; `alerts.*`
/// go to the `alerts` queue.
fn bridge_env(broker: &str, backend: &str) -> common::Env {
    common::Env::new(&format!(
        r#"
[queues.math]
shell = 'jq ".args[0] + .args[1]" > "$TASKD_RESULT_FILE"'
concurrency = 4

[queues.fail]
shell = 'echo "disk full on $TASKD_ARG_disk" >&2; exit 3'
max_attempts = 1

[queues.slow]
shell = 'echo $$ > "$TASKD_ARG_pidfile"; exec sleep 60'
kill_grace = "1s"

[queues.alerts]
shell = 'jq -c ".args" > "$TASKD_RESULT_FILE"'

[celery]
broker = "{broker}"
result_backend = "{backend}"
queues = ["celery", "alerts"]

[celery.tasks]
"app.add" = "math"
"app.boom" = "fail"
"app.sleep" = "slow"
"alerts.*" = "alerts"
"#
    ))
}

/// Wait until taskd's store has the task of this Celery id.
fn wait_ingested(env: &common::Env, id: &str) {
    assert!(
        common::poll(secs(30), || env
            .run(&["show", id, "--json"])
            .status
            .success()),
        "taskd did not ingest Celery task {id}"
    );
}

/// Start RabbitMQ (`None`: skipped) and the Celery venv for `test`.
fn setup(test: &str) -> Option<(std::path::PathBuf, RabbitServer)> {
    let py = celery_venv::python(test)?;
    let server = RabbitServer::start(test)?;
    // The producer declares its queues on first send; taskd declares none of them. A
    // Celery app declares them when it connects to publish: do that first, as the app that
    // is being migrated already did.
    let (ok, out, err) = celery_venv::run(
        &py,
        r#"
import os
from celery import Celery
from kombu import Queue
app = Celery("setup", broker=os.environ["BROKER"])
with app.connection_for_write() as conn:
    for q in ["celery", "alerts"]:
        Queue(q, routing_key=q)(conn.default_channel).declare()
"#,
        &[("BROKER", &server.url())],
    );
    assert!(ok, "declaring the Celery queues failed:\n{out}\n{err}");
    Some((py, server))
}

/// Every call shape of a Celery producer, run by taskd and read back with `.get()` over
/// `rpc://`: values, a failure raised, an expired task, an unmapped name, a pickle message.
#[test]
fn celery_calls_over_rabbitmq_run_on_taskd_and_get_answers_over_rpc() {
    let test = "celery_calls_over_rabbitmq_run_on_taskd_and_get_answers_over_rpc";
    let Some((py, server)) = setup(test) else {
        return;
    };
    let env = bridge_env(&server.url(), "rpc://");
    let d = env.daemon();
    let mut c = Client::start(&py, env.path(), &server.url(), "rpc://");

    let delay = c.send(serde_json::json!({"name": "app.add", "args": [2, 3], "via": "delay"}));
    let countdown =
        c.send(serde_json::json!({"name": "app.add", "args": [4, 5], "options": {"countdown": 2}}));
    let eta =
        c.send(serde_json::json!({"name": "app.add", "args": [1, 1], "options": {"eta_in": 2}}));
    let expires =
        c.send(serde_json::json!({"name": "app.add", "args": [10, 1], "options": {"expires": 60}}));
    let alert = c.send(serde_json::json!({"name": "alerts.send", "args": ["ops"],
                              "options": {"queue": "alerts", "priority": 9}}));
    let boom =
        c.send(serde_json::json!({"name": "app.boom", "kwargs": {"disk": "sda1"}, "via": "delay"}));
    let expired = c.send(serde_json::json!({"name": "app.add", "args": [0, 0],
                                "options": {"countdown": 4, "expires": 1}}));
    let unmapped =
        c.send(serde_json::json!({"name": "app.nobody", "args": [], "via": "send_task"}));
    let pickled = c.send(
        serde_json::json!({"name": "app.add", "args": [1, 2], "via": "send_task",
                                "options": {"serializer": "pickle"}}),
    );

    assert_eq!(c.get(&delay, 60), serde_json::json!({"value": 5}));
    assert_eq!(c.get(&countdown, 60), serde_json::json!({"value": 9}));
    assert_eq!(c.get(&eta, 60), serde_json::json!({"value": 2}));
    assert_eq!(c.get(&expires, 60), serde_json::json!({"value": 11}));
    assert_eq!(c.get(&alert, 60), serde_json::json!({"value": ["ops"]}));

    // The failure is raised as the class the client can catch, with the program's message.
    let failed = c.get(&boom, 60);
    assert_eq!(failed["exc_type"], "RuntimeError", "{failed}");
    assert_eq!(failed["exc_module"], "builtins", "{failed}");
    let expired_answer = c.get(&expired, 60);
    assert_eq!(
        expired_answer["exc_type"], "TaskRevokedError",
        "{expired_answer}"
    );
    assert!(
        expired_answer["message"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{expired_answer}"
    );
    let unmapped_answer = c.get(&unmapped, 60);
    assert_eq!(
        unmapped_answer["exc_type"], "NotRegistered",
        "{unmapped_answer}"
    );
    assert!(
        unmapped_answer["message"]
            .as_str()
            .unwrap_or("")
            .contains("app.nobody"),
        "{unmapped_answer}"
    );
    let pickled_answer = c.get(&pickled, 60);
    assert_eq!(
        pickled_answer["exc_type"], "ContentDisallowed",
        "{pickled_answer}"
    );

    // taskd's own records: the Celery id is the task id; countdown/eta held the task back,
    // priority and queue carried over.
    let rec = env.show(&countdown);
    assert_eq!(rec["state"], "succeeded", "{rec:#}");
    assert!(
        rec["run_at"].is_string() || rec["run_at"].is_number(),
        "{rec:#}"
    );
    let rec = env.show(&alert);
    assert_eq!(rec["queue"], "alerts", "{rec:#}");
    assert_eq!(rec["priority"], 9, "{rec:#}");
    let rec = env.show(&boom);
    assert_eq!(rec["state"], "failed", "{rec:#}");

    // Every message was acknowledged once ingested: nothing left in RabbitMQ.
    let queues = server.queues();
    for q in ["celery", "alerts"] {
        assert_eq!(
            queues.get(q).map(|q| (q.0, q.1)),
            Some((0, 0)),
            "{queues:?}"
        );
    }
    assert!(
        d.log_text().contains(&format!("127.0.0.1:{}", server.port)),
        "the daemon names the broker it consumes from:\n{}",
        d.log_text()
    );
}

/// `revoke(id)` of a waiting task and `revoke(id, terminate=True)` of a running one, sent
/// with Celery's client over the `celery.pidbox` broadcast: both cancelled in taskd's store
/// (the running one's process stopped), the client raises TaskRevokedError, and the revoke
/// holds across a restart of taskd.
#[test]
fn celery_revoke_over_rabbitmq_cancels_waiting_and_running_tasks_for_good() {
    let test = "celery_revoke_over_rabbitmq_cancels_waiting_and_running_tasks_for_good";
    let Some((py, server)) = setup(test) else {
        return;
    };
    let env = bridge_env(&server.url(), "rpc://");
    let d = env.daemon();
    let mut c = Client::start(&py, env.path(), &server.url(), "rpc://");

    let waiting = c.send(
        serde_json::json!({"name": "app.add", "args": [1, 2], "options": {"countdown": 3600}}),
    );
    let pidfile = env.path().join("running.pid");
    let running = c.send(serde_json::json!({"name": "app.sleep", "via": "delay",
                                            "kwargs": {"pidfile": pidfile}}));
    // Ingested first (`wait_state` reads a task that exists), which a loaded machine delays.
    wait_ingested(&env, &waiting);
    wait_ingested(&env, &running);
    env.wait_state(&waiting, "scheduled", secs(30));
    env.wait_state(&running, "running", secs(30));
    let mut pid = 0;
    assert!(common::poll(secs(10), || {
        pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        pid > 0
    }));
    assert!(common::alive(pid));

    c.revoke(&waiting, false);
    c.revoke(&running, true);
    env.wait_state(&waiting, "cancelled", secs(30));
    env.wait_state(&running, "cancelled", secs(30));
    assert!(
        common::poll(secs(10), || !common::alive(pid)),
        "the revoked task's process {pid} still runs"
    );
    for id in [&waiting, &running] {
        let a = c.get(id, 60);
        assert_eq!(a["exc_type"], "TaskRevokedError", "{id}: {a}");
    }

    // Stored: a new daemon on the same store leaves them cancelled.
    drop(d);
    let _d = env.daemon();
    for id in [&waiting, &running] {
        assert_eq!(env.state(id), "cancelled");
    }
}

/// taskd SIGKILLed after it ingested (and acknowledged) a task and before the task ended:
/// the task is in taskd's store, not lost with the daemon; the next daemon runs it and the
/// caller still gets its result. A message delivered but not yet ingested when the daemon
/// dies is delivered again by RabbitMQ (nothing acknowledged it).
#[test]
fn taskd_killed_between_ingest_and_finish_loses_no_celery_task() {
    let test = "taskd_killed_between_ingest_and_finish_loses_no_celery_task";
    let Some((py, server)) = setup(test) else {
        return;
    };
    let env = bridge_env(&server.url(), "rpc://");
    let d = env.daemon();
    let mut c = Client::start(&py, env.path(), &server.url(), "rpc://");
    let id = c.send(
        serde_json::json!({"name": "app.add", "args": [20, 22], "options": {"countdown": 3}}),
    );
    wait_ingested(&env, &id);
    assert_eq!(
        server.queues().get("celery").map(|q| (q.0, q.1)),
        Some((0, 0)),
        "ingested means acknowledged"
    );
    d.kill9();
    // Sent while no daemon runs: it waits in RabbitMQ.
    let later = c.send(serde_json::json!({"name": "app.add", "args": [1, 2], "via": "delay"}));
    assert!(common::poll(secs(10), || server
        .queues()
        .get("celery")
        .is_some_and(|q| q.0 == 1)));
    let _d = env.daemon();
    assert_eq!(c.get(&id, 60), serde_json::json!({"value": 42}));
    assert_eq!(c.get(&later, 60), serde_json::json!({"value": 3}));
    assert_eq!(env.state(&id), "succeeded");
    assert_eq!(env.show(&id)["history"].as_array().map(Vec::len), Some(1));
}

/// Celery's Redis result backend with the AMQP transport: the task comes over RabbitMQ, its
/// result goes to Redis, where `.get()` reads it — in the caller, and in another process
/// that only knows the id.
#[test]
fn redis_result_backend_serves_tasks_that_came_over_rabbitmq() {
    let test = "redis_result_backend_serves_tasks_that_came_over_rabbitmq";
    let Some((py, server)) = setup(test) else {
        return;
    };
    let Some(redis) = redis_server::RedisServer::start(test) else {
        return;
    };
    let backend = format!("redis://127.0.0.1:{}/1", redis.port);
    let env = bridge_env(&server.url(), &backend);
    let _d = env.daemon();
    let mut c = Client::start(&py, env.path(), &server.url(), &backend);
    let add = c.send(serde_json::json!({"name": "app.add", "args": [2, 40], "via": "delay"}));
    let boom =
        c.send(serde_json::json!({"name": "app.boom", "kwargs": {"disk": "sdb"}, "via": "delay"}));
    assert_eq!(c.get(&add, 60), serde_json::json!({"value": 42}));
    let failed = c.get(&boom, 60);
    assert_eq!(failed["exc_type"], "RuntimeError", "{failed}");
    let mut other = Client::start(&py, env.path(), &server.url(), &backend);
    assert_eq!(other.get(&add, 10), serde_json::json!({"value": 42}));
    let stored = redis.cli(&["-n", "1", "GET", &format!("celery-task-meta-{add}")]);
    let meta: serde_json::Value = serde_json::from_str(stored.trim()).expect("a stored meta");
    assert_eq!(meta["status"], "SUCCESS");
    assert_eq!(meta["task_id"], add.as_str());
}

/// taskd started before any producer declared the queues waits for them (logging why), and
/// when RabbitMQ restarts it logs the loss with the broker's address (no password) and
/// consumes again.
#[test]
fn the_amqp_transport_waits_for_queues_and_reconnects_after_a_broker_restart() {
    let test = "the_amqp_transport_waits_for_queues_and_reconnects_after_a_broker_restart";
    let Some(py) = celery_venv::python(test) else {
        return;
    };
    let Some(mut server) = RabbitServer::start(test) else {
        return;
    };
    let env = bridge_env(&server.url(), "rpc://");
    let d = env.daemon();
    assert!(
        common::poll(secs(30), || d.log_text().contains(
            "the Celery queue `celery` does not exist on the broker yet"
        )),
        "{}",
        d.log_text()
    );
    // The first send declares the queues (as Celery producers do); taskd then consumes.
    let mut c = Client::start(&py, env.path(), &server.url(), "rpc://");
    let first = c.send(serde_json::json!({"name": "app.add", "args": [1, 1], "via": "delay"}));
    let _ =
        c.send(serde_json::json!({"name": "alerts.x", "args": [], "options": {"queue": "alerts"}}));
    assert_eq!(c.get(&first, 90), serde_json::json!({"value": 2}));
    drop(c);

    server.restart();
    let lost = format!(
        "lost the AMQP broker at amqp://guest@127.0.0.1:{}/",
        server.port
    );
    assert!(
        common::poll(secs(30), || d.log_text().contains(&lost)),
        "no log line naming the broker:\n{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("guest:guest"),
        "the password is logged"
    );
    let mut c = Client::start(&py, env.path(), &server.url(), "rpc://");
    let second = c.send(serde_json::json!({"name": "app.add", "args": [2, 2], "via": "delay"}));
    assert_eq!(c.get(&second, 90), serde_json::json!({"value": 4}));
}

/// Two taskd nodes, each with a store of its own, consume the same queues of one RabbitMQ:
/// every Celery task is taken by one of them and runs once.
#[test]
fn two_taskd_nodes_on_one_rabbitmq_run_each_celery_task_once() {
    let test = "two_taskd_nodes_on_one_rabbitmq_run_each_celery_task_once";
    let Some((py, server)) = setup(test) else {
        return;
    };
    let nodes = [
        bridge_env(&server.url(), "rpc://"),
        bridge_env(&server.url(), "rpc://"),
    ];
    let _daemons: Vec<common::Daemon> = nodes.iter().map(|n| n.daemon()).collect();
    let mut c = Client::start(&py, nodes[0].path(), &server.url(), "rpc://");
    let ids: Vec<(String, i64)> = (0..40)
        .map(|i| {
            let id = c.send(serde_json::json!({"name": "app.add", "args": [i, 2], "via": "delay"}));
            (id, i + 2)
        })
        .collect();
    for (id, want) in &ids {
        assert_eq!(c.get(id, 60), serde_json::json!({"value": want}), "{id}");
        let found: Vec<(usize, serde_json::Value)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.run(&["show", id, "--json"]).status.success())
            .map(|(i, n)| (i, n.show(id)))
            .collect();
        assert_eq!(found.len(), 1, "{id} is in exactly one node's store");
        let shown = &found[0].1;
        assert_eq!(shown["state"], "succeeded");
        assert_eq!(common::history(shown).len(), 1, "ran once: {shown}");
    }
    // Nothing is left in RabbitMQ, delivered or not.
    let queues = server.queues();
    assert_eq!(
        queues.get("celery").map(|q| (q.0, q.1)),
        Some((0, 0)),
        "{queues:?}"
    );
}

/// Many messages waiting before taskd starts are ingested in pipelined batches (a small
/// prefetch makes many of them), each acknowledged once it is stored; taskd killed with
/// SIGKILL while it ingests loses none and, started again, makes none twice: every Celery
/// id is one task, and RabbitMQ holds nothing, delivered or not.
#[test]
fn a_queue_ingested_in_batches_across_a_kill_is_every_message_once() {
    let test = "a_queue_ingested_in_batches_across_a_kill_is_every_message_once";
    let Some((py, server)) = setup(test) else {
        return;
    };
    const N: usize = 3000;
    let env = common::Env::new(&format!(
        r#"
[queues.math]
command = ["/bin/true"]

[celery]
broker = "{}"
result_backend = "rpc://"
queues = ["celery"]
prefetch = 40

[celery.tasks]
"app.add" = "math"
"#,
        server.url()
    ));
    // Nothing runs: what is measured is what was ingested.
    env.ok(&["pause", "math"]);
    let (ok, out, err) = celery_venv::run(
        &py,
        &format!(
            r#"
import os
from celery import Celery
app = Celery("probe", broker=os.environ["BROKER"], backend="rpc://")
with app.producer_or_acquire() as producer:
    for i in range({N}):
        print(app.send_task("app.add", args=[i, 1], producer=producer).id)
"#
        ),
        &[("BROKER", &server.url())],
    );
    assert!(ok, "the producer failed:\n{out}\n{err}");
    let sent: std::collections::BTreeSet<String> = out.lines().map(str::to_string).collect();
    assert_eq!(sent.len(), N);
    assert!(
        common::poll(secs(30), || server
            .queues()
            .get("celery")
            .is_some_and(|q| q.0 == N as u64)),
        "{:?}",
        server.queues()
    );

    let d = env.daemon();
    assert!(
        common::poll_every(std::time::Duration::from_millis(5), secs(60), || env
            .count("math", "queued")
            > 0),
        "nothing ingested:\n{}",
        d.log_text()
    );
    d.kill9();
    let d = env.daemon();
    assert!(
        common::poll(secs(120), || server
            .queues()
            .get("celery")
            .is_some_and(|q| (q.0, q.1) == (0, 0))
            && env.count("math", "queued") == N as u64),
        "queues {:?}, {} tasks:\n{}",
        server.queues(),
        env.count("math", "queued"),
        d.log_text()
    );
    let stored: std::collections::BTreeSet<String> = env
        .tasks_in("queued")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(stored, sent, "every Celery id is one task");
    // A wrong acknowledgement (a tag acknowledged twice, or one not delivered) closes the
    // channel: the session would have ended and connected again.
    assert!(
        !d.log_text().contains("lost the AMQP broker"),
        "{}",
        d.log_text()
    );
}
