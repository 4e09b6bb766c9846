//! The Celery bridge on Redis against the real Celery client (common/celery.rs) and a
//! private redis-server (common/redis.rs).

#![cfg(feature = "redis")]

#[path = "common/celery.rs"]
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
    let Some(server) = redis_server::RedisServer::start(test) else {
        return;
    };
    let Some(py) = celery_venv::python(test) else {
        return;
    };
    let base = format!("redis://127.0.0.1:{}", server.port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt
        .block_on(RedisResults::open(
            &format!("{base}/1"),
            Duration::from_secs(600),
        ))
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

    let mut child = Command::new(&py)
        .args(["-c", WAITER, &format!("{base}/0"), &format!("{base}/1")])
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
    let client = redis::Client::open(format!("{base}/1")).unwrap();
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
