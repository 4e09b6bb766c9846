//! The core against messages the real Celery published (`testdata/redis-messages.json`:
//! celery 5.5.3 and kombu 5.5.4 to a redis-server, read back as stored), and ingest into the
//! in-memory broker.

use serde_json::{json, Value};

use super::message::{from_kombu_envelope, parse, Reason};
use super::*;

const CAPTURED: &str = include_str!("testdata/redis-messages.json");

/// The captured message `name` as a transport hands it over, with the key it was pushed to.
fn captured(name: &str) -> (Delivery, String, Value) {
    let all: Value = serde_json::from_str(CAPTURED).unwrap();
    let m = &all[name];
    let text = m["message"].as_str().unwrap();
    let envelope: Value = serde_json::from_str(text).unwrap();
    (
        from_kombu_envelope(text).unwrap(),
        m["key"].as_str().unwrap().to_string(),
        envelope,
    )
}

fn ms(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

#[test]
fn a_plain_call_gives_name_id_args_and_where_its_result_goes() {
    let (d, key, env) = captured("delay");
    assert_eq!(key, "celery");
    let t = parse(&d).unwrap();
    let id = env["headers"]["id"].as_str().unwrap();
    assert_eq!(t.id.to_string(), id);
    assert_eq!(t.name, "app.tasks.add");
    assert_eq!(t.args, vec![json!(2), json!(3)]);
    assert!(t.kwargs.is_empty());
    assert_eq!((t.eta, t.expires, t.retries), (None, None, 0));
    assert_eq!(t.timelimit, [None, None]);
    assert_eq!(t.priority, Some(0));
    assert_eq!(t.root_id.as_deref(), Some(id));
    assert_eq!(t.parent_id, None);
    assert_eq!(t.result_to.id, id);
    assert_eq!(t.result_to.correlation_id.as_deref(), Some(id));
    assert_eq!(
        t.result_to.reply_to.as_deref(),
        env["properties"]["reply_to"].as_str()
    );
    assert!(!t.result_to.ignore_result);
}

#[test]
fn keyword_arguments_keep_their_values_and_non_ascii_text() {
    let (d, _, _) = captured("kwargs");
    let t = parse(&d).unwrap();
    assert_eq!(t.name, "app.tasks.alert");
    assert!(t.args.is_empty());
    assert_eq!(
        Value::Object(t.kwargs),
        json!({"user_id": 42, "msg": "h\u{e9}"})
    );
}

#[test]
fn countdown_and_eta_are_a_time_to_run_at() {
    let (d, _, env) = captured("countdown");
    let t = parse(&d).unwrap();
    assert_eq!(t.eta, Some(ms(env["headers"]["eta"].as_str().unwrap())));
    let (d, _, _) = captured("eta");
    assert_eq!(parse(&d).unwrap().eta, Some(ms("2030-01-02T03:04:05Z")));
}

#[test]
fn expires_is_a_deadline() {
    let (d, _, env) = captured("expires");
    let t = parse(&d).unwrap();
    assert_eq!(
        t.expires,
        Some(ms(env["headers"]["expires"].as_str().unwrap()))
    );
    assert_eq!(t.eta, None);
}

#[test]
fn priority_keeps_the_producers_number_and_redis_serves_low_numbers_first() {
    let (d, key, _) = captured("priority");
    assert_eq!(key, "celery\u{6}\u{16}3", "kombu's priority step of 5");
    let t = parse(&d).unwrap();
    assert_eq!(t.priority, Some(5));
    assert_eq!(PriorityOrder::LowerFirst.taskd_priority(t.priority), -5);
    assert_eq!(PriorityOrder::HigherFirst.taskd_priority(t.priority), 5);
    let (d, key, _) = captured("queue");
    assert_eq!(key, "alerts\u{6}\u{16}9");
    assert_eq!(parse(&d).unwrap().priority, Some(9));
    // Priority 0, the default, is served first on Redis and is taskd's default too.
    assert_eq!(PriorityOrder::LowerFirst.taskd_priority(Some(0)), 0);
    assert!(PriorityOrder::LowerFirst.taskd_priority(Some(0)) > -5);
}

#[test]
fn time_limits_are_hard_then_soft_and_retries_and_ignore_result_are_read() {
    let (d, _, _) = captured("timelimit");
    assert_eq!(parse(&d).unwrap().timelimit, [Some(60.0), Some(50.0)]);
    let (d, _, _) = captured("retries");
    assert_eq!(parse(&d).unwrap().retries, 2);
    let (d, _, _) = captured("ignore_result");
    assert!(parse(&d).unwrap().result_to.ignore_result);
}

#[test]
fn python_types_stay_as_kombu_tagged_them() {
    let (d, _, _) = captured("types");
    let t = parse(&d).unwrap();
    assert_eq!(
        t.args,
        vec![json!({"__type__": "datetime", "__value__": "2030-01-01T00:00:00+00:00"})]
    );
}

#[test]
fn pickle_and_compression_are_refused_with_the_id_to_fail() {
    for (name, reason, says) in [
        (
            "pickle",
            Reason::Serializer,
            "application/x-python-serialize",
        ),
        ("zlib", Reason::Compression, "application/x-gzip"),
    ] {
        let (d, _, env) = captured(name);
        let r = parse(&d).unwrap_err();
        assert_eq!(r.reason, reason, "{name}");
        assert!(r.detail.contains(says), "{name}: {}", r.detail);
        assert_eq!(r.name.as_deref(), Some("app.tasks.add"));
        let ids: Vec<&str> = r.results.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, vec![env["headers"]["id"].as_str().unwrap()], "{name}");
        assert_eq!(
            reason.exception(),
            ("kombu.exceptions", "ContentDisallowed")
        );
    }
}

#[test]
fn callbacks_and_chains_are_refused_and_a_chains_last_task_fails_too() {
    let (d, _, env) = captured("link");
    let r = parse(&d).unwrap_err();
    assert_eq!(r.reason, Reason::Workflow);
    assert!(r.detail.contains("callbacks"), "{}", r.detail);
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].id, env["headers"]["id"].as_str().unwrap());

    let (d, _, env) = captured("chain");
    let r = parse(&d).unwrap_err();
    assert_eq!(r.reason, Reason::Workflow);
    assert!(r.detail.contains("chain"), "{}", r.detail);
    let body: Value = serde_json::from_slice(&d.body).unwrap();
    let last = body[2]["chain"][0]["options"]["task_id"].as_str().unwrap();
    let ids: Vec<&str> = r.results.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, vec![env["headers"]["id"].as_str().unwrap(), last]);
}

#[test]
fn protocol_1_bodies_are_read() {
    // Celery 3's layout (docs/internals/protocol.rst, version 1): all in the body.
    let body = json!({"task": "app.tasks.add", "id": "0b4a5a0e-5d2c-4f6e-9d7b-0c6c1f1e2a3b",
        "args": [1, 2], "kwargs": {"k": "v"}, "retries": 1, "eta": "2030-01-02T03:04:05.000001",
        "expires": null, "utc": true, "callbacks": null, "errbacks": null, "timelimit": [10, null]});
    let d = Delivery {
        body: body.to_string().into_bytes(),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        ..Delivery::default()
    };
    let t = parse(&d).unwrap();
    assert_eq!(t.name, "app.tasks.add");
    assert_eq!(t.args, vec![json!(1), json!(2)]);
    assert_eq!(t.retries, 1);
    assert_eq!(t.eta, Some(ms("2030-01-02T03:04:05Z")));
    assert_eq!(t.timelimit, [Some(10.0), None]);
    // A v1 workflow is refused with the id from the body.
    let mut wf = body.clone();
    wf["callbacks"] = json!([{"task": "x"}]);
    let d = Delivery {
        body: wf.to_string().into_bytes(),
        ..Delivery::default()
    };
    let r = parse(&d).unwrap_err();
    assert_eq!(r.reason, Reason::Workflow);
    assert_eq!(r.results[0].id, "0b4a5a0e-5d2c-4f6e-9d7b-0c6c1f1e2a3b");
}

#[test]
fn malformed_messages_say_what_is_wrong() {
    let (mut d, _, env) = captured("delay");
    d.body = b"[1, 2".to_vec();
    let r = parse(&d).unwrap_err();
    assert_eq!(r.reason, Reason::Malformed);
    assert!(r.detail.contains("not JSON"), "{}", r.detail);
    assert_eq!(r.results[0].id, env["headers"]["id"].as_str().unwrap());

    let (mut d, _, _) = captured("delay");
    d.headers.insert("id".into(), json!("my-own-id"));
    let r = parse(&d).unwrap_err();
    assert!(r.detail.contains("is not a UUID"), "{}", r.detail);
    assert_eq!(r.results[0].id, "my-own-id");

    assert!(from_kombu_envelope(
        "{\"body\": \"%%%\", \"properties\": {\"body_encoding\": \"base64\"}}"
    )
    .is_err());
}

// --- ingest ----------------------------------------------------------------------------

// Ingest needs a `[celery]` table, and the config refuses one naming a Redis broker in a build
// without the `redis` feature.
#[cfg(feature = "redis")]
mod ingest {
    use std::sync::Arc;

    use super::*;
    use crate::broker::memory::MemoryBroker;

    /// A sink that keeps what it was given.
    #[derive(Default)]
    struct Kept(std::sync::Mutex<Vec<(ResultTo, CeleryState)>>);

    #[async_trait::async_trait]
    impl ResultSink for Kept {
        async fn store(&self, to: &ResultTo, state: &CeleryState) -> Result<(), String> {
            self.0.lock().unwrap().push((to.clone(), state.clone()));
            Ok(())
        }
        fn describe(&self) -> String {
            "kept".into()
        }
    }

    const CONFIG: &str = r#"
[queues.default]
command = ["true"]
[queues.alerts]
command = ["echo", "{user_id}"]
[celery]
broker = "redis://127.0.0.1:1/0"
[celery.tasks]
"app.tasks.alert" = { queue = "alerts", track_started = true }
"app.tasks.add" = "default"
"#;

    fn bridge() -> (Bridge, Arc<dyn Broker>, Arc<Kept>) {
        let config =
            crate::config::parse_str(CONFIG, std::path::Path::new("/etc/taskd/taskd.toml"))
                .unwrap();
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let kept = Arc::new(Kept::default());
        let b = Bridge::new(
            Arc::new(config),
            broker.clone(),
            Some(kept.clone()),
            Arc::new(Metrics::new()),
        );
        (b, broker, kept)
    }

    #[tokio::test]
    async fn a_message_becomes_a_task_under_its_celery_id_once() {
        let (b, broker, kept) = bridge();
        let (d, _, env) = captured("kwargs");
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        let got = b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        assert_eq!(got, Ingested::Task(id, "alerts".parse().unwrap()));
        let t = broker
            .get(id)
            .await
            .unwrap()
            .expect("stored under the Celery id");
        assert_eq!(t.task.queue.as_str(), "alerts");
        let p = &t.task.payload;
        assert_eq!(p["task"], "app.tasks.alert");
        assert_eq!(p["args"], json!([]));
        assert_eq!(p["kwargs"], json!({"user_id": 42, "msg": "h\u{e9}"}));
        assert_eq!(
            p["user_id"], 42,
            "keyword arguments are top-level fields too"
        );
        assert_eq!(p["celery"]["id"], id.to_string());
        assert_eq!(p["celery"]["track_started"], true);
        let meta = CeleryMeta::of(p).unwrap();
        assert_eq!(meta.name, "app.tasks.alert");
        assert_eq!(meta.result_to.id, id.to_string());
        assert!(meta.track_started);
        assert!(CeleryMeta::tracks_started(p));
        assert_eq!(CeleryMeta::result_to(p), Some(meta.result_to.clone()));
        let plain = json!({"task": "x", "user_id": 42});
        assert_eq!(CeleryMeta::result_to(&plain), None);
        assert!(!CeleryMeta::tracks_started(&plain));
        // Delivered again: the same task, nothing new.
        let again = b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        assert_eq!(again, Ingested::Existing(id));
        assert_eq!(
            broker.list(&Default::default()).await.unwrap().len(),
            1,
            "one task"
        );
        assert!(kept.0.lock().unwrap().is_empty(), "no result written");
    }

    #[tokio::test]
    async fn eta_expires_and_priority_reach_the_task() {
        let (b, broker, _) = bridge();
        let (d, _, env) = captured("eta");
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        let t = broker.get(id).await.unwrap().unwrap().task;
        assert_eq!(t.run_at, ms("2030-01-02T03:04:05Z"));
        assert_eq!(t.state, crate::model::TaskState::Scheduled);

        let (mut d, _, env) = captured("priority");
        let later = crate::model::now_ms() + 3_600_000;
        d.headers
            .insert("expires".into(), json!(result::iso_time(later)));
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        let t = broker.get(id).await.unwrap().unwrap().task;
        assert_eq!(t.priority, -5);
        assert_eq!(t.expires_at, Some(later));
    }

    #[tokio::test]
    async fn an_expired_message_is_revoked_without_a_task() {
        let (b, broker, kept) = bridge();
        let (mut d, _, env) = captured("delay");
        d.headers
            .insert("expires".into(), json!("2020-01-01T00:00:00+00:00"));
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap(),
            Ingested::Expired(id)
        );
        assert!(broker.get(id).await.unwrap().is_none());
        let kept = kept.0.lock().unwrap();
        assert_eq!(kept[0].1, CeleryState::Revoked("expired".into()));
    }

    #[tokio::test]
    async fn refused_messages_fail_their_task_in_the_backend_and_enqueue_nothing() {
        let (b, broker, kept) = bridge();
        // Not mapped.
        let (mut d, _, env) = captured("delay");
        d.headers.insert("task".into(), json!("billing.charge"));
        let got = b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        assert_eq!(got, Ingested::Refused(Reason::Unmapped));
        // Pickle.
        let (p, _, penv) = captured("pickle");
        assert_eq!(
            b.ingest(&p, PriorityOrder::LowerFirst).await.unwrap(),
            Ingested::Refused(Reason::Serializer)
        );
        // Too large for its queue's... payload limit is the daemon's: a placeholder it cannot
        // fill makes the task one its queue cannot run.
        let (mut k, _, kenv) = captured("kwargs");
        let body = json!([[], {"msg": "no user id"}, {}]);
        k.body = body.to_string().into_bytes();
        assert_eq!(
            b.ingest(&k, PriorityOrder::LowerFirst).await.unwrap(),
            Ingested::Refused(Reason::Invalid)
        );
        assert!(broker.list(&Default::default()).await.unwrap().is_empty());
        let kept = kept.0.lock().unwrap();
        let by_id = |e: &Value| {
            let id = e["headers"]["id"].as_str().unwrap();
            kept.iter()
                .find(|(to, _)| to.id == id)
                .map(|(_, s)| s.clone())
                .unwrap()
        };
        let CeleryState::Failure {
            module,
            class,
            message,
            ..
        } = by_id(&env)
        else {
            panic!("not a failure")
        };
        assert_eq!(
            (module.as_str(), class.as_str()),
            ("celery.exceptions", "NotRegistered")
        );
        assert!(
            message.contains("billing.charge") && message.contains("[celery.tasks]"),
            "{message}"
        );
        let CeleryState::Failure { class, .. } = by_id(&penv) else {
            panic!()
        };
        assert_eq!(class, "ContentDisallowed");
        let CeleryState::Failure { class, message, .. } = by_id(&kenv) else {
            panic!()
        };
        assert_eq!(class, "ValueError");
        assert!(message.contains("user_id"), "{message}");
    }

    #[tokio::test]
    async fn ignore_result_writes_nothing() {
        let (b, _, kept) = bridge();
        let (mut d, _, _) = captured("ignore_result");
        d.headers.insert("task".into(), json!("unmapped.name"));
        b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        assert!(kept.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn ends_and_revokes_become_celery_states() {
        let (b, broker, kept) = bridge();
        let (d, _, env) = captured("delay");
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        b.revoke(id).await.unwrap();
        assert_eq!(
            broker.get(id).await.unwrap().unwrap().task.state,
            crate::model::TaskState::Cancelled
        );
        let kept = kept.0.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0.id, id.to_string());
        assert_eq!(kept[0].1, CeleryState::Revoked("revoked".into()));
    }

    /// The state written from an attempt as the supervisor hands it over with its end
    /// (`recorded_state`, no read of the store) is the one read back from the store once the
    /// broker recorded that attempt (`final_state`): a success with its result, a failure, a
    /// timeout. The other ends are read from the store.
    #[tokio::test]
    async fn the_state_from_the_recorded_attempt_is_the_one_the_store_gives() {
        use crate::broker::Finish;
        use crate::model::{AttemptReason, AttemptRecord, NodeId};
        let ends = [
            (
                Finish::Succeeded,
                AttemptRecord {
                    reason: Some(AttemptReason::Exit),
                    exit_code: Some(0),
                    result: Some(json!({"sent": [1, 2.5, "h\u{e9}"], "none": null})),
                    ..Default::default()
                },
            ),
            (Finish::Succeeded, AttemptRecord::default()),
            (
                Finish::Failed,
                AttemptRecord {
                    reason: Some(AttemptReason::Exit),
                    exit_code: Some(3),
                    error: Some("exit code 3".into()),
                    stderr_tail: "Traceback\n  disk full\n\n".into(),
                    ..Default::default()
                },
            ),
            (
                Finish::Failed,
                AttemptRecord {
                    reason: Some(AttemptReason::Timeout),
                    error: Some("timed out after 1s".into()),
                    ..Default::default()
                },
            ),
        ];
        for (finish, attempt) in ends {
            let (b, broker, _) = bridge();
            let (d, _, env) = captured("delay");
            let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
            b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
            let node: NodeId = "n:1".into();
            let claimed = broker
                .claim(
                    &node,
                    &"default".parse().unwrap(),
                    1,
                    std::time::Duration::from_secs(60),
                )
                .await
                .unwrap();
            let attempt = AttemptRecord {
                number: 1,
                node,
                pid: Some(4242),
                started_at: 1,
                ended_at: 2,
                ..attempt
            };
            broker
                .finish(&claimed[0].lease, attempt.clone(), finish)
                .await
                .unwrap();
            let detail = broker.get(id).await.unwrap().unwrap();
            let stored = final_state(&detail).expect("ended");
            assert_eq!(recorded_state(&attempt, finish), Some(stored.clone()));
            // And what the writer reads back for an id is that same state.
            let read = b.final_states(&[id]).await.unwrap();
            assert_eq!(read.len(), 1);
            assert_eq!(read[0].0.id, id.to_string());
            assert_eq!(read[0].1, stored);
        }
        let retry = AttemptRecord::default();
        assert_eq!(recorded_state(&retry, Finish::Retry { at: 5 }), None);
        assert_eq!(recorded_state(&retry, Finish::Cancelled), None);
        assert_eq!(recorded_state(&retry, Finish::Requeue), None);
    }

    /// `write_final` writes every state but the ignored ones.
    #[tokio::test]
    async fn written_ends_leave_out_ignored_results() {
        let (b, _, kept) = bridge();
        let to = |id: &str, ignore_result| ResultTo {
            id: id.into(),
            reply_to: None,
            correlation_id: None,
            ignore_result,
        };
        b.write_final(&[
            (to("a", false), CeleryState::Success(json!(1))),
            (to("b", true), CeleryState::Success(json!(2))),
            (to("c", false), CeleryState::Revoked("revoked".into())),
        ])
        .await
        .unwrap();
        let kept = kept.0.lock().unwrap();
        let ids: Vec<&str> = kept.iter().map(|(t, _)| t.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }

    /// A bridge whose state (the kept revokes) is in `dir`.
    fn bridge_in(dir: &std::path::Path) -> (Bridge, Arc<dyn Broker>, Arc<Kept>) {
        let mut config =
            crate::config::parse_str(CONFIG, std::path::Path::new("/etc/taskd/taskd.toml"))
                .unwrap();
        config.state_dir = dir.to_path_buf();
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let kept = Arc::new(Kept::default());
        let b = Bridge::new(
            Arc::new(config),
            broker.clone(),
            Some(kept.clone()),
            Arc::new(Metrics::new()),
        );
        (b, broker, kept)
    }

    #[tokio::test]
    async fn a_batch_answers_each_message_in_order_and_stores_a_redelivery_once() {
        let (b, broker, _kept) = bridge();
        let (delay, _, e1) = captured("delay");
        let (kwargs, _, e2) = captured("kwargs");
        let (pickle, _, _) = captured("pickle");
        let id = |e: &Value| -> TaskId { e["headers"]["id"].as_str().unwrap().parse().unwrap() };
        let got = b
            .ingest_batch(
                &[delay.clone(), kwargs, pickle, delay],
                PriorityOrder::LowerFirst,
            )
            .await;
        let got: Vec<Ingested> = got.into_iter().map(Result::unwrap).collect();
        assert!(
            matches!(got[0], Ingested::Task(i, _) if i == id(&e1)),
            "{got:?}"
        );
        assert!(
            matches!(got[1], Ingested::Task(i, _) if i == id(&e2)),
            "{got:?}"
        );
        assert_eq!(got[2], Ingested::Refused(Reason::Serializer));
        assert_eq!(got[3], Ingested::Existing(id(&e1)));
        assert!(broker.get(id(&e1)).await.unwrap().is_some());
        assert!(broker.get(id(&e2)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_revoke_before_the_message_arrives_revokes_it_then_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _, env) = captured("delay");
        let id: TaskId = env["headers"]["id"].as_str().unwrap().parse().unwrap();
        {
            let (b, _, _) = bridge_in(dir.path());
            b.revoke(id).await.unwrap();
        }
        let (b, broker, kept) = bridge_in(dir.path());
        let got = b.ingest(&d, PriorityOrder::LowerFirst).await.unwrap();
        assert_eq!(got, Ingested::Revoked(id));
        assert!(broker.get(id).await.unwrap().is_none(), "no task made");
        let kept = kept.0.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1, CeleryState::Revoked("revoked".into()));
    }
}
