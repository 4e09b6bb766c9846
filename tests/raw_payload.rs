//! Raw (binary) payloads with real processes: a real Protobuf message made by `protoc`,
//! submitted with `taskd submit --raw`, through the API as `application/x-protobuf` and
//! `payload_b64`, and decoded by the task from its stdin; every byte value delivered as it
//! was sent, to an exec task and (base64-encoded, `payload_b64`) to a long-lived worker;
//! queues that read payload fields refusing raw payloads; `taskd show`'s size and hex
//! preview. Each case runs on the SQLite store and on a private `redis-server`.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::Env;
use redis_server::RedisServer;
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Redis,
}

const PROTO: &str = r#"syntax = "proto3";
package example;

message Person {
  string name = 1;
  int32 id = 2;
  repeated string emails = 3;
  bytes avatar = 4;
}
"#;

/// A worker (protocol 1) that answers each task with what it received: the `payload` and
/// `payload_b64` fields of its task message.
const ECHO_WORKER: &str = r#"
import json, os
os.write(4, b'{"type":"ready","protocol":1}\n')
for line in os.fdopen(3, "rb"):
    m = json.loads(line)
    if m.get("type") != "task":
        continue
    r = {"payload": m.get("payload"), "payload_b64": m.get("payload_b64")}
    os.write(4, (json.dumps({"type": "result", "id": m["id"], "status": "ok", "result": r}) + "\n").encode())
"#;

fn protoc() -> bool {
    let ok = Command::new("protoc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        common::skip::skip(
            "needs protoc (the Protobuf compiler)",
            "apt-get install -y protobuf-compiler",
        );
    }
    ok
}

fn python3() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        common::skip::skip("needs python3", "apt-get install -y python3");
    }
    ok
}

/// An env on the backend with the test's queues (`@D@`: the env's directory), its API on a
/// loopback port; `None` when Redis is wanted and missing (the skip is printed).
fn env(backend: Backend, test: &str) -> Option<(Env, Option<RedisServer>)> {
    let e = Env::raw("");
    let d = e.path().display().to_string();
    let (broker, server) = match backend {
        Backend::Sqlite => (String::new(), None),
        Backend::Redis => {
            let server = RedisServer::start(test)?;
            (format!("broker = \"{}\"\n", server.url()), Some(server))
        }
    };
    std::fs::write(e.path().join("person.proto"), PROTO).expect("write the .proto");
    std::fs::write(e.path().join("echo_worker.py"), ECHO_WORKER).expect("write the worker");
    let text = format!(
        r#"[taskd]
state_dir = "state"
shutdown_grace = "5s"
listen = "127.0.0.1:0"
max_payload = 4096
{broker}
[queues.decode]
# The Protobuf message on stdin, decoded to its text form as the result.
shell = 'protoc --decode=example.Person -I "{d}" "{d}/person.proto" > "$TASKD_RESULT_FILE"'
max_attempts = 1

[queues.hex]
# Every byte of stdin in hex, as the result.
shell = 'od -An -v -tx1 | tr -d " \n" > "$TASKD_RESULT_FILE"'
max_attempts = 1

[queues.worker]
worker = ["python3", "{d}/echo_worker.py"]

[queues.mail]
command = ["/bin/echo", "{{to}}"]

[queues.script]
shell = 'echo "$TASKD_ARG_name"'
"#
    );
    std::fs::write(&e.config, text).expect("write config");
    Some((e, server))
}

/// `protoc --encode`: a Person as its wire bytes (with a NUL, a 0xff, a newline in it).
fn person(env: &Env) -> Vec<u8> {
    let d = env.path().display().to_string();
    let mut child = Command::new("protoc")
        .arg("--encode=example.Person")
        .arg("-I")
        .arg(&d)
        .arg(format!("{d}/person.proto"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run protoc");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(br#"name: "Ada Lovelace" id: 1815 emails: "ada@example.com" emails: "a@example.org" avatar: "\000\377\n\001""#)
        .expect("write the text message");
    let out = child.wait_with_output().expect("protoc ends");
    assert!(
        out.status.success(),
        "protoc --encode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::str::from_utf8(&out.stdout).is_err(),
        "the message is not UTF-8"
    );
    out.stdout
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `taskd submit ARGS` with `stdin` on its standard input: (exit code, stdout, stderr).
fn submit(env: &Env, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    let mut child = env
        .cmd(&all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run taskd submit");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("taskd submit ends");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn submitted(env: &Env, args: &[&str], stdin: &[u8]) -> String {
    let (code, out, err) = submit(env, args, stdin);
    assert_eq!(code, 0, "taskd submit {args:?} failed:\n{out}\n{err}");
    out
}

fn result(env: &Env, id: &str) -> Value {
    env.wait_state(id, "succeeded", Duration::from_secs(30))["result"].clone()
}

fn show_payload_line(env: &Env, id: &str) -> String {
    let out = env.ok(&["show", id]);
    out.lines()
        .find_map(|l| l.strip_prefix("payload").map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("`taskd show {id}` has no payload line:\n{out}"))
}

fn raw_payloads(backend: Backend, test: &str) {
    if !protoc() || !python3() {
        return;
    }
    let Some((env, _server)) = env(backend, test) else {
        return;
    };
    let msg = person(&env);
    let file = env.path().join("person.bin");
    std::fs::write(&file, &msg).expect("write the message");
    let file = file.to_str().expect("utf-8 path");

    // Refused at submit, before a daemon runs: placeholders, $TASKD_ARG_*, over max_payload.
    for (queue, says) in [("mail", "{to}"), ("script", "TASKD_ARG_name")] {
        let (code, _, err) = submit(&env, &[queue, "--raw", file], b"");
        assert_eq!(
            code, 2,
            "a raw payload for `{queue}` must be refused: {err}"
        );
        assert!(
            err.contains(says) && err.contains("raw payload"),
            "the refusal names the cause: {err}"
        );
    }
    let (code, _, err) = submit(&env, &["hex", "--raw", "-"], &[7u8; 5000]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("5000 bytes") && err.contains("4096"),
        "over max_payload: {err}"
    );
    assert_eq!(env.count("hex", "queued"), 0, "nothing refused was stored");

    // Straight into the broker: a file, and stdin with every byte value.
    let decoded = submitted(&env, &["decode", "--raw", file], b"");
    let all: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let every = submitted(&env, &["hex", "--raw", "-", "--priority", "3"], &all);

    // What people read before it runs: the size and the first bytes in hex.
    assert_eq!(
        show_payload_line(&env, &decoded),
        format!(
            "raw, {} bytes: {} …",
            msg.len(),
            msg[..32]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    );
    assert!(show_payload_line(&env, &every).starts_with("raw, 512 bytes: ff fe fd fc"));
    let record = env.show(&every);
    assert_eq!(record["payload"], Value::Null);
    assert_eq!(record["payload_b64"], b64(&all));
    assert_eq!(record["priority"], 3);

    let daemon = env.daemon();
    let api = daemon.api_base();

    // The task decoded the message from its stdin.
    let text = result(&env, &decoded);
    let text = text.as_str().expect("protoc's text output is the result");
    for field in [
        "name: \"Ada Lovelace\"",
        "id: 1815",
        "emails: \"ada@example.com\"",
        "emails: \"a@example.org\"",
        "avatar: \"\\000\\377\\n\\001\"",
    ] {
        assert!(text.contains(field), "decoded {field:?}? {text}");
    }
    assert_eq!(result(&env, &every), Value::String(hex(&all)));

    // The API: the body is the payload (application/x-protobuf), options in the query.
    let resp = ureq::post(&format!("{api}/api/v1/queues/decode/tasks?priority=2"))
        .set("Content-Type", "application/x-protobuf")
        .send_bytes(&msg)
        .expect("POST a raw payload");
    assert_eq!(resp.status(), 201);
    let created: Value = resp.into_json().expect("JSON");
    assert_eq!(created["payload_b64"], b64(&msg));
    assert_eq!(created["priority"], 2);
    let id = created["id"].as_str().expect("an id").to_string();
    assert!(result(&env, &id)
        .as_str()
        .is_some_and(|t| t.contains("id: 1815")));
    let resp = ureq::post(&format!("{api}/api/v1/queues/hex/tasks"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&all)
        .expect("POST raw bytes");
    let id = resp.into_json::<Value>().expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_string();
    assert_eq!(result(&env, &id), Value::String(hex(&all)));
    // A queue with placeholders answers 422, naming the cause.
    match ureq::post(&format!("{api}/api/v1/queues/mail/tasks"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&msg)
    {
        Err(ureq::Error::Status(422, r)) => {
            let body: Value = r.into_json().expect("JSON error");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("{to}")));
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // `submit --server`: the same bytes through the API (as `payload_b64`).
    let remote = submitted(&env, &["hex", "--raw", file, "--server", &api], b"");
    assert_eq!(result(&env, &remote), Value::String(hex(&msg)));
    let (code, _, err) = submit(&env, &["mail", "--raw", file, "--server", &api], b"");
    assert_eq!(code, 2, "{err}");

    // A long-lived worker gets the bytes base64-encoded in `payload_b64`, `payload` null;
    // a JSON payload comes as before, without `payload_b64`.
    let id = submitted(&env, &["worker", "--raw", "-"], &all);
    assert_eq!(
        result(&env, &id),
        serde_json::json!({ "payload": null, "payload_b64": b64(&all) })
    );
    let id = submitted(&env, &["worker", r#"{"n":1}"#], b"");
    assert_eq!(
        result(&env, &id),
        serde_json::json!({ "payload": {"n": 1}, "payload_b64": null })
    );
    drop(daemon);
}

#[test]
fn raw_payloads_on_sqlite() {
    raw_payloads(Backend::Sqlite, "raw_payloads_on_sqlite");
}

#[test]
fn raw_payloads_on_redis() {
    raw_payloads(Backend::Redis, "raw_payloads_on_redis");
}
