//! The Celery bridge on RabbitMQ, against a private `rabbitmq-server` each test starts and
//! the real Celery client from PyPI (a pinned venv, tests/common/celery_venv.rs).

#[path = "common/celery_venv.rs"]
mod celery_venv;
mod common;
#[path = "common/rabbitmq.rs"]
mod rabbitmq;

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
