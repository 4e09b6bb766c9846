//! The daemon started from code, in this process: `taskd::daemon::run` with a broker the test
//! opens (the in-memory one, a real SQLite file), an API listener the test binds on
//! 127.0.0.1:0, and a handle the test stops it with. Tasks are real `/bin/sh` processes.
//! What a user runs (`taskd start`, signals, systemd) is covered by tests/daemon.rs and
//! tests/systemd.rs; this is what a program or a test that embeds the daemon relies on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use taskd::broker::memory::MemoryBroker;
use taskd::broker::Broker;
use taskd::config::Config;
use taskd::daemon::{self, Controls, Handle, Listeners};
use taskd::model::{AttemptReason, NewTask, TaskDetail, TaskId, TaskState};

/// A daemon running in this process, over the store `broker`.
struct Embedded {
    dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    broker: Arc<dyn Broker>,
    api: SocketAddr,
    handle: Handle,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn config_text(queues: &str) -> String {
    format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"1s\"\n\n{queues}\n")
}

/// Write the config into a fresh temp directory and read it as `taskd start` does.
fn config(queues: &str) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir(dir.path().join("state")).expect("the state directory");
    let path = dir.path().join("taskd.toml");
    std::fs::write(&path, config_text(queues)).expect("write the config");
    let config = taskd::config::load(&path).expect("a valid config");
    (dir, config)
}

/// Start the daemon on `config` over `broker` (`None`: the store the config names, opened as
/// `taskd start` opens it), its API on a port of the test's choosing.
async fn start(
    dir: tempfile::TempDir,
    config: Config,
    broker: Option<Arc<dyn Broker>>,
) -> Embedded {
    let broker = match broker {
        Some(b) => b,
        None => taskd::broker::open(&config.broker)
            .await
            .expect("the store opens"),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let api = listener.local_addr().expect("its address");
    let listeners = Listeners {
        api: vec![listener],
        ..Listeners::default()
    };
    let controls = Controls::new();
    let handle = controls.handle();
    let config_path = config.path.clone();
    let daemon = tokio::spawn(daemon::run(config, broker.clone(), listeners, controls));
    Embedded {
        dir,
        config_path,
        broker,
        api,
        handle,
        daemon,
    }
}

impl Embedded {
    /// `POST path` with a JSON body on the daemon's API (a blocking client, off the runtime).
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let url = format!("http://{}{path}", self.api);
        tokio::task::spawn_blocking(move || {
            let answer = match ureq::post(&url).send_json(body) {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("POST {url}: {e}"),
            };
            let status = answer.status();
            (status, answer.into_json().expect("a JSON answer"))
        })
        .await
        .expect("the request's thread")
    }

    async fn get(&self, id: TaskId) -> TaskDetail {
        self.broker
            .get(id)
            .await
            .expect("the store answers")
            .expect("the task exists")
    }

    /// Poll the task until `done` holds, for up to 20 s of real time.
    async fn wait_for(
        &self,
        id: TaskId,
        what: &str,
        done: impl Fn(&TaskDetail) -> bool,
    ) -> TaskDetail {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let detail = self.get(id).await;
            if done(&detail) {
                return detail;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} is not {what} after 20 s: {detail:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ask for the drain and insist that `run` returns `Ok` within a minute. The store, and
    /// the directory that holds its file.
    async fn stop(self) -> (Arc<dyn Broker>, tempfile::TempDir) {
        self.handle.shutdown();
        let returned = tokio::time::timeout(Duration::from_secs(60), self.daemon)
            .await
            .expect("run returns once drained")
            .expect("run did not panic");
        if let Err(e) = returned {
            panic!("run failed: {e:#}");
        }
        (self.broker, self.dir)
    }
}

/// Not a live process (gone, or a zombie nobody reaped).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.contains(") Z "),
        Err(_) => true,
    }
}

/// Nothing the store shows as running.
async fn nothing_running(broker: &dyn Broker) {
    let running = broker
        .count_state(TaskState::Running)
        .await
        .expect("the store answers");
    assert_eq!(running, 0, "tasks left running");
}

#[tokio::test]
async fn over_the_in_memory_broker_a_task_sent_to_the_api_runs_and_run_returns_on_shutdown() {
    let (dir, config) = config("[queues.q]\nshell = 'echo \"hello $TASKD_TASK_ID\"'\n");
    let d = start(dir, config, Some(Arc::new(MemoryBroker::new()))).await;
    let (status, answer) = d
        .post(
            "/api/v1/queues/q/tasks",
            serde_json::json!({"payload": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let id: TaskId = answer["id"]
        .as_str()
        .expect("the answer names the task")
        .parse()
        .expect("a task id");
    let done = d
        .wait_for(id, "succeeded", |t| t.task.state == TaskState::Succeeded)
        .await;
    assert_eq!(done.task.attempts, 1);
    assert_eq!(done.history.len(), 1, "{done:#?}");
    assert_eq!(
        done.history[0].stdout_tail,
        format!("hello {id}\n"),
        "the task's own output: {done:#?}"
    );
    let pid = done.history[0].pid.expect("the run's pid is recorded");
    assert!(gone(pid), "the task's process {pid} is still alive");

    let api = d.api;
    let (broker, _dir) = d.stop().await;
    nothing_running(broker.as_ref()).await;
    // The API stopped with the daemon.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(api).is_ok() {
        assert!(Instant::now() < deadline, "the API still answers on {api}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn over_a_sqlite_file_a_task_runs_and_shutdown_puts_a_long_one_back_stopped() {
    let (dir, config) = config(
        "[queues.quick]\nshell = 'echo done'\n\n\
         [queues.long]\nshell = 'exec sleep 600'\nkill_grace = \"1s\"\n",
    );
    let store = match &config.broker {
        taskd::config::BrokerUrl::Sqlite { path } => path.clone(),
        other => panic!("the default store is a SQLite file, not {other}"),
    };
    let d = start(dir, config, None).await;
    assert!(
        store.is_file(),
        "the store is a real file: {}",
        store.display()
    );
    let quick = NewTask::new("quick".parse().expect("a queue name"), "{}".into());
    let long = NewTask::new("long".parse().expect("a queue name"), "{}".into());
    let (quick, long) = (quick.id, {
        let id = long.id;
        d.broker
            .enqueue(vec![quick, long])
            .await
            .expect("enqueue into the store");
        id
    });
    let done = d
        .wait_for(quick, "succeeded", |t| t.task.state == TaskState::Succeeded)
        .await;
    assert_eq!(done.history[0].stdout_tail, "done\n");
    d.wait_for(long, "running", |t| t.task.state == TaskState::Running)
        .await;

    let (broker, _dir) = d.stop().await;
    // The long task was interrupted by the drain (`shutdown_grace` 1 s), its process group
    // stopped, and the task put back, uncharged, for the next daemon.
    let back = broker.get(long).await.expect("get").expect("exists");
    assert_eq!(back.task.state, TaskState::Queued, "{back:#?}");
    assert_eq!(back.task.attempts, 0, "not charged: {back:#?}");
    assert_eq!(back.task.node, None, "no lease left: {back:#?}");
    let last = back
        .history
        .last()
        .expect("the interrupted run is in the history");
    assert_eq!(last.reason, Some(AttemptReason::Shutdown), "{back:#?}");
    let pid = last.pid.expect("its pid");
    assert!(
        gone(pid),
        "the interrupted task's process {pid} is still alive"
    );
    nothing_running(broker.as_ref()).await;
    drop(broker);
    // What is on disk says the same to a broker opened afresh on the file.
    let url = taskd::config::BrokerUrl::Sqlite { path: store };
    let reopened = taskd::broker::open(&url)
        .await
        .expect("the store opens again");
    nothing_running(reopened.as_ref()).await;
    let again = reopened.get(long).await.expect("get").expect("exists");
    assert_eq!(again.task.state, TaskState::Queued);
}

#[tokio::test]
async fn a_reload_through_the_handle_starts_a_queue_added_to_the_file() {
    let (dir, config) = config("[queues.a]\nshell = 'true'\n");
    let d = start(dir, config, Some(Arc::new(MemoryBroker::new()))).await;
    std::fs::write(
        &d.config_path,
        config_text("[queues.a]\nshell = 'true'\n\n[queues.b]\nshell = 'echo from-b'\n"),
    )
    .expect("rewrite the config");
    let reply = d.handle.reload("test").await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        reply.changes,
        vec!["queue b: started".to_string()],
        "{reply:?}"
    );
    let (status, answer) = d
        .post("/api/v1/queues/b/tasks", serde_json::json!({}))
        .await;
    assert_eq!(status, 201, "the API takes the new queue: {answer}");
    let id: TaskId = answer["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a task id");
    let done = d
        .wait_for(id, "succeeded", |t| t.task.state == TaskState::Succeeded)
        .await;
    assert_eq!(done.history[0].stdout_tail, "from-b\n");
    let (broker, _dir) = d.stop().await;
    nothing_running(broker.as_ref()).await;
}

#[tokio::test]
async fn an_api_listener_outside_loopback_without_a_token_is_refused() {
    let (dir, config) = config("[queues.q]\nshell = 'true'\n");
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("a free port");
    let listeners = Listeners {
        api: vec![listener],
        ..Listeners::default()
    };
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let err = daemon::run(config, broker, listeners, Controls::new())
        .await
        .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("not a loopback address") && text.contains("token"),
        "{text}"
    );
    drop(dir);
}
