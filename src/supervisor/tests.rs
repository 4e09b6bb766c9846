//! The supervisor in-process: the in-memory broker, tokio's clock paused, and queues whose
//! tasks never become processes (a program that does not exist, a placeholder the payload
//! lacks), so that the loops' decisions are checked without waiting on real time.
//! Real processes are the integration tests' business (tests/daemon, tests/workers).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::startlog::StartLog;
use super::Supervisor;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, ListFilter};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{AttemptReason, NewTask, NodeId, QueueName, TaskId, TaskState};

struct Fixture {
    broker: Arc<dyn Broker>,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

/// A supervisor over a fresh in-memory store, serving `queues` (TOML `[queues.…]` tables).
async fn start(queues: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("a temp dir");
    let text = format!(
        "[taskd]\nstate_dir = \"{}\"\n\n{queues}",
        dir.path().display()
    );
    let config: Config =
        crate::config::parse_str(&text, &dir.path().join("taskd.toml")).expect("a valid config");
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let (start_log, _) = StartLog::open(dir.path()).expect("the start log opens");
    let metrics = Arc::new(Metrics::new());
    let supervisor = Supervisor::new(
        broker.clone(),
        "test-node:1".into(),
        start_log,
        metrics.clone(),
    );
    let wakeups = broker.subscribe().await.expect("wake-ups");
    supervisor.start(&config, wakeups);
    Fixture {
        broker,
        supervisor,
        metrics,
        _dir: dir,
    }
}

fn qn(name: &str) -> QueueName {
    name.parse().expect("a valid queue name")
}

async fn enqueue(
    broker: &Arc<dyn Broker>,
    queue: &str,
    payload: &str,
    count: usize,
) -> Vec<TaskId> {
    let tasks: Vec<NewTask> = (0..count)
        .map(|_| NewTask::new(qn(queue), payload.to_string()))
        .collect();
    let ids = tasks.iter().map(|t| t.id).collect();
    broker.enqueue(tasks).await.expect("enqueue");
    ids
}

/// Lets the supervisor's loops run until every task of `ids` is in `state`; the clock is
/// paused, so each step advances it only as far as the next timer. Fails after an hour of
/// the supervisor's time.
async fn settle(broker: &Arc<dyn Broker>, ids: &[TaskId], state: TaskState) {
    for _ in 0..3_600 {
        let mut all = true;
        for id in ids {
            let d = broker
                .get(*id)
                .await
                .expect("get")
                .expect("the task exists");
            all &= d.task.state == state;
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let now = broker.list(&ListFilter::default()).await.expect("list");
    panic!("tasks did not all become {state}: {now:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_program_that_does_not_exist_fails_each_task_once_with_its_reason() {
    let f = start(
        "[queues.q]\ncommand = [\"/nonexistent/taskd-test-program\"]\nconcurrency = 2\nmax_attempts = 5\n",
    )
    .await;
    let ids = enqueue(&f.broker, "q", "{}", 5).await;
    settle(&f.broker, &ids, TaskState::Failed).await;
    for id in &ids {
        let d = f.broker.get(*id).await.expect("get").expect("exists");
        assert_eq!(d.task.attempts, 1, "charged once, never retried: {d:#?}");
        assert_eq!(d.history.len(), 1);
        assert_eq!(d.history[0].reason, Some(AttemptReason::Spawn));
        assert!(
            d.history[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("program not found: /nonexistent/taskd-test-program"),
            "{d:#?}"
        );
        assert_eq!(d.task.node, None, "no lease is left behind");
    }
    let text = f.metrics.render();
    assert!(
        text.contains("taskd_tasks_started_total{queue=\"q\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("taskd_tasks_finished_total{queue=\"q\",outcome=\"failed\"} 5"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_payload_without_a_placeholders_field_fails_as_invalid() {
    let f = start("[queues.q]\ncommand = [\"/bin/echo\", \"{name}\"]\n").await;
    let ids = enqueue(&f.broker, "q", r#"{"other": 1}"#, 1).await;
    settle(&f.broker, &ids, TaskState::Failed).await;
    let d = f.broker.get(ids[0]).await.expect("get").expect("exists");
    assert_eq!(d.history[0].reason, Some(AttemptReason::Invalid), "{d:#?}");
    assert!(
        d.history[0].error.as_deref().unwrap_or("").contains("name"),
        "the error names the missing field: {d:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drained_supervisor_claims_nothing_more() {
    let f = start("[queues.q]\ncommand = [\"/nonexistent/taskd-test-program\"]\n").await;
    f.supervisor
        .drain(Duration::from_secs(1), CancellationToken::new())
        .await;
    let ids = enqueue(&f.broker, "q", "{}", 2).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    for id in &ids {
        let t = f.broker.get(*id).await.expect("get").expect("exists").task;
        assert_eq!(
            (t.state, t.node.as_ref().map(NodeId::as_str)),
            (TaskState::Queued, None)
        );
    }
    assert_eq!(f.supervisor.snapshot().running, 0);
}

/// Runs `test` on a runtime of its own with tokio's clock paused, on a thread of its own,
/// and fails when it has not returned within a minute of real time: a loop that never waits
/// would otherwise hang the test binary instead of failing it (the paused clock cannot
/// advance while a task spins).
fn within_a_minute<F>(test: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        rt.block_on(test());
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no answer within a minute of real time: a loop never waits")
        }
        // The test panicked on its thread; its message is above.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test failed"),
    }
}

/// A queue resumed while its dispatcher still holds the pause it last read: the store gives
/// it tasks again, and it must not claim them only to release them on its next turn (with a
/// broker that answers at once that loop never waited, so nothing else ran, not even the
/// wake-up that would have told it of the resume). The time that passes while the queue is
/// paused brings the dispatcher's fallback tick due with the resume; how far into that tick
/// the pause falls decides which loop runs first, so several offsets are tried.
#[test]
fn a_queue_resumed_after_a_while_paused_runs_its_tasks() {
    within_a_minute(|| async {
        for offset_ms in [0, 500, 1000, 1500, 1900] {
            let f = start("[queues.q]\ncommand = [\"/nonexistent/taskd-test-program\"]\n").await;
            f.broker.set_paused(&qn("q"), true).await.expect("pause");
            let ids = enqueue(&f.broker, "q", "{}", 2).await;
            tokio::time::sleep(Duration::from_millis(offset_ms)).await;
            tokio::time::advance(Duration::from_secs(10)).await;
            for id in &ids {
                let t = f.broker.get(*id).await.expect("get").expect("exists").task;
                assert_eq!(
                    (t.state, t.node.as_ref().map(NodeId::as_str)),
                    (TaskState::Queued, None),
                    "paused"
                );
            }
            f.broker.set_paused(&qn("q"), false).await.expect("resume");
            settle(&f.broker, &ids, TaskState::Failed).await;
            f.supervisor
                .drain(Duration::from_secs(1), CancellationToken::new())
                .await;
        }
    });
}

/// A renewal answered "lost" for a claim this node no longer holds (the task ended here and
/// was claimed again under a new token while the renewal waited on the broker) must not
/// stop the new claim's run: it used to, and the run ended `cancelled` "by an operator"
/// (found by the chaos suite on Redis, a broker restart and a node crash together).
#[test]
fn a_lost_answer_for_an_older_claim_leaves_the_new_claim_running() {
    use crate::broker::Lease;
    let node: NodeId = "test-node:1".into();
    let (a, b, c) = (TaskId::new(), TaskId::new(), TaskId::new());
    let sent = vec![
        Lease {
            task: a,
            token: 4,
            node: node.clone(),
        },
        Lease {
            task: b,
            token: 7,
            node: node.clone(),
        },
        Lease {
            task: c,
            token: 2,
            node,
        },
    ];
    // a: claimed again here since (token 5); b: still the claim that was sent; c: ended here.
    let current = |id: TaskId| match id {
        id if id == a => Some(5),
        id if id == b => Some(7),
        _ => None,
    };
    assert_eq!(super::still_held(&sent, vec![a, b, c], current), vec![b]);
    // An id the renewal was not asked about is never taken as lost.
    assert!(super::still_held(&sent, vec![TaskId::new()], |_| Some(1)).is_empty());
}

/// A run that never began (no process: it was stopped on finding its lease gone before it
/// started) is not added to the history when its result is refused: nothing ran. It used to
/// be added as a `lost` run that "may have run twice" (found by the chaos suite on Redis).
/// A run that did begin still is.
#[tokio::test(start_paused = true)]
async fn a_refused_result_of_a_run_that_never_began_adds_nothing_to_the_history() {
    use crate::broker::{Finish, Recover};
    use crate::model::AttemptRecord;
    let f = start("").await;
    let ids = enqueue(&f.broker, "q", "{}", 1).await;
    let node: NodeId = "other-node:2".into();
    let claimed = f
        .broker
        .claim(&node, &qn("q"), 1, Duration::from_secs(60))
        .await
        .expect("claim");
    let lease = claimed[0].lease.clone();
    // The lease is taken back (as after a node froze past it) and the task claimed again.
    f.broker
        .recover(Recover::All, "taken back")
        .await
        .expect("recover");
    f.broker
        .claim(&node, &qn("q"), 1, Duration::from_secs(60))
        .await
        .expect("claim again");
    let never_began = AttemptRecord {
        number: 1,
        node: node.clone(),
        reason: Some(AttemptReason::Cancelled),
        ..Default::default()
    };
    f.supervisor
        .lease_lost(&lease, never_began, Finish::Cancelled)
        .await;
    let d = f.broker.get(ids[0]).await.expect("get").expect("the task");
    assert!(d.history.is_empty(), "{:?}", d.history);
    let began = AttemptRecord {
        number: 1,
        node,
        pid: Some(4242),
        reason: Some(AttemptReason::Exit),
        exit_code: Some(0),
        ..Default::default()
    };
    f.supervisor
        .lease_lost(&lease, began, Finish::Succeeded)
        .await;
    let d = f.broker.get(ids[0]).await.expect("get").expect("the task");
    assert_eq!(d.history.len(), 1, "{:?}", d.history);
    assert_eq!(d.history[0].reason, Some(AttemptReason::Lost));
}

/// A claim this node held past its lease without renewing it (frozen, or cut off from the
/// broker) starts only once the broker confirms the lease: a claim another node took back is
/// not started here, one still held is, and its lease counts from the confirmation. Found
/// by the chaos suite on Redis: a node frozen with tasks claimed ahead started them on
/// waking, after the other node had run them to their end.
#[tokio::test(start_paused = true)]
async fn a_claim_held_past_its_lease_starts_only_once_the_broker_confirms_it() {
    use super::HeldTask;
    use crate::broker::Recover;
    use crate::executor::Stop;
    let f = start("").await;
    let node: NodeId = "test-node:1".into();
    let other: NodeId = "other-node:2".into();
    enqueue(&f.broker, "q", "{}", 1).await;
    let taken = f
        .broker
        .claim(&node, &qn("q"), 1, Duration::from_secs(60))
        .await
        .expect("claim")
        .remove(0);
    f.broker
        .recover(Recover::All, "taken back")
        .await
        .expect("recover");
    let again = f
        .broker
        .claim(&other, &qn("q"), 1, Duration::from_secs(60))
        .await
        .expect("claim again");
    assert_eq!(again.len(), 1, "the other node holds it now");
    enqueue(&f.broker, "q", "{}", 1).await;
    let kept = f
        .broker
        .claim(&node, &qn("q"), 1, Duration::from_secs(60))
        .await
        .expect("claim")
        .remove(0);
    let lapsed = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(1)).await;
    for c in [&taken, &kept] {
        f.supervisor.leases.lock().expect("not poisoned").insert(
            c.task.id,
            HeldTask {
                queue: qn("q"),
                lease: c.lease.clone(),
                cancel: CancellationToken::new(),
                valid_until: lapsed,
            },
        );
    }
    let stop = Stop {
        cancel: CancellationToken::new(),
        shutdown: CancellationToken::new(),
        kill: CancellationToken::new(),
    };
    assert!(
        !f.supervisor.lease_confirmed(&taken.lease, &stop).await,
        "a claim another node took back must not start here"
    );
    assert!(
        f.supervisor.lease_confirmed(&kept.lease, &stop).await,
        "a claim the broker still holds for this node starts"
    );
    let until = f.supervisor.leases.lock().expect("not poisoned")[&kept.task.id].valid_until;
    assert!(
        until > tokio::time::Instant::now(),
        "the confirmation secures the lease again"
    );
}
