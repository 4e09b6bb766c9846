//! `taskd submit`: enqueue straight into the broker; return once the task is durable.
//!
//! With `--server URL` it enqueues through a daemon's HTTP API instead (for hosts that
//! cannot reach the broker); the daemon validates the payload with
//! [`crate::submission`], the same checks the direct path makes. [`Remote`] is that small client, shared with `status`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use super::visible::{json_line, visible};
use super::{exit, load_config, open_broker, print_json, Failure};
use crate::backoff::Doubling;
use crate::config::{Config, QueueConfig};
use crate::model::{NewTask, QueueName, TaskRecord, TaskState, UnixMs};
use crate::submission::{
    byte_offset, expires_at, parse_at, parse_delay, parse_duration_ms, parse_parents,
    parse_payload, parse_raw_payload, strip_position, unknown_parent,
};

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The queue to put the task on.
    pub queue: String,
    /// The payload: a JSON value (an object for `{field}` placeholders); `-` reads stdin.
    /// Default `{}`.
    pub payload: Option<String>,
    /// Extra argv appended to the queue's command (after `--`).
    #[arg(last = true)]
    pub args: Vec<String>,
    /// Run no sooner than this long from now ("30s", "5m", "1h 30m").
    #[arg(long, value_name = "DURATION", conflicts_with = "at")]
    pub delay: Option<String>,
    /// Run no sooner than this time (RFC 3339, e.g. 2026-12-01T03:00:00Z, or Unix seconds).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Higher runs first among a queue's ready tasks.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// At most one waiting or running task of the queue holds KEY; a second submit
    /// returns the first task's id.
    #[arg(long, value_name = "KEY")]
    pub unique: Option<String>,
    /// With --unique: the key stays taken this long after the task finished ("10m": at
    /// most one such task per 10 minutes); a duplicate meanwhile returns that task's id.
    #[arg(long, value_name = "DURATION", requires = "unique")]
    pub unique_for: Option<String>,
    /// Run only after task ID has succeeded (repeatable: after all of them). The task waits
    /// in `scheduled` meanwhile, and is cancelled ("dependency ID failed") if ID fails or is
    /// cancelled. An unknown ID is refused (exit 2). The task sees the ids in $TASKD_AFTER.
    #[arg(long, value_name = "ID")]
    pub after: Vec<String>,
    /// Never start the task after this: a duration from its run-at ("30m") or a time (RFC
    /// 3339, or Unix seconds). Not started by then, it is cancelled, reason `expired`, and
    /// a retrying one is not run again. Default: the queue's `expires`.
    #[arg(long, value_name = "DURATION|TIME")]
    pub expires: Option<String>,
    /// Enqueue one task per line of FILE (`-` for stdin), each line a JSON payload, all in
    /// one transaction: all or none.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["payload", "unique", "wait"])]
    pub batch: Option<PathBuf>,
    /// The payload is the bytes of FILE (`-` for stdin), not JSON (a Protobuf message, an
    /// image): stored untouched up to `max_payload` and given to the task on stdin byte for
    /// byte (a worker gets them base64-encoded as `payload_b64`). A queue that fills
    /// `{field}` placeholders or whose script reads $TASKD_ARG_<field> refuses it (exit 2).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["payload", "batch"])]
    pub raw: Option<PathBuf>,
    /// Print the whole task record as JSON (with --wait: only the final record, as `taskd
    /// show --json` prints it, once the task has finished).
    #[arg(long)]
    pub json: bool,
    /// Follow the task until it finishes; print its output, its outcome and what it
    /// returned (`result: JSON`); exit 0 if it succeeded, 4 if it failed or was cancelled.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Talk to a daemon's HTTP API instead of the broker.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Use the HTTP API of the daemon at URL (e.g. http://queue-host:7070, or
    /// unix:/run/taskd/api.sock for its Unix socket) instead of the broker; no config file
    /// is needed then.
    #[arg(long, value_name = "URL", env = "TASKD_SERVER")]
    pub server: Option<String>,
    /// The API's bearer token (the daemon's `token`); prefer $TASKD_TOKEN, which `ps` does
    /// not show.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TASKD_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// A blocking client of a daemon's API (a CLI makes one request at a time).
pub struct Remote {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Remote {
    pub fn new(args: &RemoteArgs) -> Option<Remote> {
        let base = args.server.as_ref()?.trim_end_matches('/').to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        Some(Remote {
            base,
            token: args.token.clone(),
            agent,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The socket of a `unix:/path` server.
    fn unix_socket(&self) -> Option<&std::path::Path> {
        self.base.strip_prefix("unix:").map(std::path::Path::new)
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> Failure {
        Failure::new(
            exit::BROKER,
            format!("failed to reach the taskd API at {}: {error}", self.base),
        )
    }

    /// `METHOD base+path` with an optional body; the JSON answer, or a [`Failure`] that
    /// carries the server's error message and a fitting exit code.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<serde_json::Value, Failure> {
        self.fetch(method, path, body).map_err(|(_, f)| f)
    }

    /// [`Self::call`], keeping the HTTP status of an error answer (`None`: no answer).
    pub fn fetch(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<serde_json::Value, (Option<u16>, Failure)> {
        let url = format!("{}{path}", self.base);
        if let Some(socket) = self.unix_socket() {
            let mut headers = vec![("Accept", "application/json")];
            let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
            if let Some(a) = &auth {
                headers.push(("Authorization", a));
            }
            if body.is_some() {
                headers.push(("Content-Type", "application/json"));
            }
            let answer = super::unix_http::request(
                socket,
                method,
                path,
                &headers,
                body,
                Some(Duration::from_secs(60)),
            )
            .map_err(|e| (None, self.unreachable(e)))?;
            let value: Result<serde_json::Value, _> = serde_json::from_reader(answer.body);
            return match answer.status {
                200..=299 => value.map_err(|e| {
                    (
                        None,
                        Failure::new(
                            exit::FAILURE,
                            format!("failed to read the answer of {url}: {e}"),
                        ),
                    )
                }),
                code => Err(error_answer(&url, code, value.unwrap_or_default())),
            };
        }
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r.into_json().map_err(|e| {
                (
                    None,
                    Failure::new(
                        exit::FAILURE,
                        format!("failed to read the answer of {url}: {e}"),
                    ),
                )
            }),
            Err(ureq::Error::Status(code, r)) => {
                Err(error_answer(&url, code, r.into_json().unwrap_or_default()))
            }
            Err(e) => Err((None, self.unreachable(e))),
        }
    }
}

/// An error answer of the API as a [`Failure`] with its message and a fitting exit code.
fn error_answer(url: &str, code: u16, body: serde_json::Value) -> (Option<u16>, Failure) {
    let message = body["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {code}"));
    let exit_code = match code {
        401 | 403 => exit::FAILURE,
        400..=499 => exit::USAGE,
        _ => exit::BROKER,
    };
    (
        Some(code),
        Failure::new(exit_code, format!("{url}: {message}")),
    )
}

/// The body of a stream of Server-Sent Events, read as it comes.
pub type SseBody = Box<dyn Read + Send>;

impl Remote {
    /// `GET base+path` as a stream of Server-Sent Events (`Last-Event-ID: last` to resume):
    /// the body to read, or `None` for 204 (nothing more will come).
    pub fn stream(
        &self,
        path: &str,
        last: Option<&str>,
    ) -> Result<Option<SseBody>, (Option<u16>, Failure)> {
        let url = format!("{}{path}", self.base);
        if let Some(socket) = self.unix_socket() {
            let mut headers = vec![("Accept", "text/event-stream")];
            let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
            if let Some(a) = &auth {
                headers.push(("Authorization", a));
            }
            if let Some(l) = last {
                headers.push(("Last-Event-ID", l));
            }
            let answer = super::unix_http::request(
                socket,
                "GET",
                path,
                &headers,
                None,
                Some(Duration::from_secs(60)),
            )
            .map_err(|e| (None, self.unreachable(e)))?;
            return match answer.status {
                204 => Ok(None),
                200..=299 => Ok(Some(answer.body)),
                code => Err(error_answer(
                    &url,
                    code,
                    serde_json::from_reader(answer.body).unwrap_or_default(),
                )),
            };
        }
        // No deadline for the whole answer (it lasts as long as the task): the daemon sends
        // a keep-alive every 15 s, so a minute of silence means it is gone.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .build();
        let mut req = agent.get(&url).set("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some(l) = last {
            req = req.set("Last-Event-ID", l);
        }
        match req.call() {
            Ok(r) if r.status() == 204 => Ok(None),
            Ok(r) => Ok(Some(Box::new(r.into_reader()))),
            Err(ureq::Error::Status(code, r)) => {
                Err(error_answer(&url, code, r.into_json().unwrap_or_default()))
            }
            Err(e) => Err((None, self.unreachable(e))),
        }
    }
}

pub async fn run(flag: Option<PathBuf>, args: SubmitArgs) -> anyhow::Result<u8> {
    if let Some(remote) = Remote::new(&args.remote) {
        return run_remote(&remote, &args).await;
    }
    let config = load_config(flag)?;
    let queue = find_queue(&config, &args.queue)?;
    let run_at = run_at(&args)?;
    let after = parse_parents(&args.after).map_err(|e| Failure::usage(format!("--after {e}")))?;
    let unique_for = match &args.unique_for {
        Some(d) => {
            Some(parse_duration_ms(d).map_err(|e| Failure::usage(format!("--unique-for {e}")))?)
        }
        None => None,
    };
    let expires_at = expires_at(queue, run_at, args.expires.as_deref())
        .map_err(|e| Failure::usage(format!("--expires {e}")))?;
    let tasks = match &args.batch {
        Some(file) => read_batch(&config, queue, file, &args, run_at, &after)?
            .into_iter()
            .map(|mut t| {
                t.expires_at = expires_at;
                t
            })
            .collect(),
        None => {
            let payload = match &args.raw {
                Some(file) => parse_raw_payload(&config, queue, &read_raw(file)?, &args.args),
                None => parse_payload(&config, queue, &payload_text(&args)?, &args.args),
            }
            .map_err(|e| Failure::usage(e.to_string()))?;
            let mut t = crate::submission::new_task(queue, payload);
            t.args = args.args.clone();
            t.priority = args.priority;
            t.run_at = run_at;
            t.unique_key = args.unique.clone();
            t.unique_for = unique_for;
            t.after = after;
            t.expires_at = expires_at;
            vec![t]
        }
    };
    let broker = open_broker(&config).await?;
    let count = tasks.len();
    let enqueued = broker.enqueue(tasks).await.map_err(|e| match e {
        crate::broker::BrokerError::NotFound(p) => {
            anyhow::Error::from(Failure::usage(format!("--{}", unknown_parent(p))))
        }
        e => e.into(),
    })?;
    if args.batch.is_some() {
        if args.json {
            print_json(&crate::view::BatchEnqueued {
                enqueued: count,
                existing: enqueued.iter().filter(|e| e.existing).count(),
                ids: enqueued.iter().map(|e| e.id).collect(),
            })?;
        } else {
            println!("enqueued {count} tasks on {}", queue.name);
        }
        return Ok(exit::OK);
    }
    let e = &enqueued[0];
    // With --wait, --json prints one document, the final record, once the task ends: two
    // documents back to back would be no JSON a reader can parse.
    if args.json {
        if !args.wait {
            match broker.get(e.id).await? {
                Some(detail) => print_json(&crate::view::Submitted {
                    existing: e.existing,
                    task: detail.task,
                })?,
                None => print_json(e)?,
            }
        }
    } else {
        println!("{}", e.id);
        if e.existing {
            eprintln!(
                "taskd: a task with unique key {:?} is already {}; returned its id",
                args.unique.as_deref().unwrap_or(""),
                e.state
            );
        }
    }
    if args.wait {
        return wait(broker.as_ref(), e.id, args.json).await;
    }
    Ok(exit::OK)
}

/// `taskd submit --server URL`: the same request through the API.
async fn run_remote(remote: &Remote, args: &SubmitArgs) -> anyhow::Result<u8> {
    let queue: QueueName = args.queue.parse().map_err(|e: String| {
        Failure::usage(format!("`{}` is not a queue name: {e}", args.queue))
    })?;
    // The body's fields besides the payload; the daemon checks every one.
    let fields = |payload: serde_json::Value| {
        let mut body =
            serde_json::json!({ "payload": payload, "args": args.args, "priority": args.priority });
        if let Some(d) = &args.delay {
            body["delay"] = d.clone().into();
        }
        if let Some(t) = &args.at {
            body["run_at"] = t.clone().into();
        }
        if let Some(u) = &args.unique {
            body["unique"] = u.clone().into();
        }
        if let Some(u) = &args.unique_for {
            body["unique_for"] = u.clone().into();
        }
        if !args.after.is_empty() {
            body["after"] = args.after.clone().into();
        }
        if let Some(e) = &args.expires {
            body["expires"] = e.clone().into();
        }
        body
    };
    let json_of = |text: &str, what: &str| -> Result<serde_json::Value, Failure> {
        serde_json::from_str(text).map_err(|e| {
            Failure::usage(format!(
                "malformed JSON {what} at byte {} (line {}, column {}): {}",
                byte_offset(text, e.line(), e.column()),
                e.line(),
                e.column(),
                strip_position(&e.to_string())
            ))
        })
    };
    if let Some(file) = &args.batch {
        let text = read_batch_text(file)?;
        let mut lines = String::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let payload = json_of(
                line,
                &format!("payload in {} line {}", file.display(), i + 1),
            )?;
            lines.push_str(&fields(payload).to_string());
            lines.push('\n');
        }
        let v = remote.call(
            "POST",
            &format!("/api/v1/queues/{queue}/tasks/batch"),
            Some(&lines),
        )?;
        if args.json {
            print_json(&v)?;
        } else {
            println!("enqueued {} tasks on {queue}", v["enqueued"]);
        }
        return Ok(exit::OK);
    }
    let body = match &args.raw {
        Some(file) => {
            use base64::Engine as _;
            let mut body = fields(serde_json::Value::Null);
            if let Some(o) = body.as_object_mut() {
                o.remove("payload");
                o.insert(
                    "payload_b64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(read_raw(file)?)
                        .into(),
                );
            }
            body.to_string()
        }
        None => {
            let text = payload_text(args)?;
            fields(json_of(&text, "payload")?).to_string()
        }
    };
    let task = remote.call(
        "POST",
        &format!("/api/v1/queues/{queue}/tasks"),
        Some(&body),
    )?;
    let id = task["id"].as_str().unwrap_or_default().to_string();
    let existing = task["existing"].as_bool().unwrap_or(false);
    if args.json {
        if !args.wait {
            // The API answers the record with `existing` beside its fields; `submit --json`
            // prints the same document with or without `--server`.
            let mut record = task.clone();
            if let Some(o) = record.as_object_mut() {
                o.remove("existing");
            }
            let task: TaskRecord = serde_json::from_value(record).map_err(|e| {
                Failure::new(exit::FAILURE, format!("{}: not a task: {e}", remote.base()))
            })?;
            print_json(&crate::view::Submitted { existing, task })?;
        }
    } else {
        println!("{id}");
        if existing {
            eprintln!(
                "taskd: a task with unique key {:?} is already {}; returned its id",
                args.unique.as_deref().unwrap_or(""),
                task["state"].as_str().unwrap_or("waiting")
            );
        }
    }
    if !args.wait {
        return Ok(exit::OK);
    }
    let mut delay = Doubling::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let detail = remote.call("GET", &format!("/api/v1/tasks/{id}"), None)?;
        let state: Option<TaskState> = detail["state"].as_str().and_then(|s| s.parse().ok());
        if let Some(state) = state.filter(|s| s.is_terminal()) {
            if args.json {
                print_json(&detail)?;
            } else {
                if let Some(last) = detail["history"].as_array().and_then(|h| h.last()) {
                    print!("{}", visible(last["stdout_tail"].as_str().unwrap_or("")));
                    eprint!("{}", visible(last["stderr_tail"].as_str().unwrap_or("")));
                }
                let why = detail["last_error"]
                    .as_str()
                    .map(|e| format!(": {}", visible(e)))
                    .unwrap_or_default();
                eprintln!(
                    "taskd: task {id} {state} after {} attempt(s){why}",
                    detail["attempts"]
                );
                if !detail["result"].is_null() {
                    println!("result: {}", json_line(&detail["result"]));
                }
            }
            return Ok(match state {
                TaskState::Succeeded => exit::OK,
                _ => exit::TASK_FAILED,
            });
        }
        tokio::time::sleep(delay.next_delay()).await;
    }
}

/// The queue `name` of `config`, or a usage error naming the known queues.
pub(super) fn find_queue<'a>(config: &'a Config, name: &str) -> Result<&'a QueueConfig, Failure> {
    let known = || {
        config
            .queues
            .keys()
            .map(|q| q.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let q: QueueName = name.parse().map_err(|e: String| {
        Failure::usage(format!(
            "`{name}` is not a queue name: {e}; known queues: {}",
            known()
        ))
    })?;
    config.queues.get(&q).ok_or_else(|| {
        Failure::usage(format!(
            "unknown queue `{name}` in {}; known queues: {}",
            config.path.display(),
            if config.queues.is_empty() {
                "(none)".to_string()
            } else {
                known()
            }
        ))
    })
}

fn run_at(args: &SubmitArgs) -> Result<Option<UnixMs>, Failure> {
    if let Some(d) = &args.delay {
        return parse_delay(d)
            .map(Some)
            .map_err(|e| Failure::usage(format!("--delay {e}")));
    }
    if let Some(t) = &args.at {
        return parse_at(t)
            .map(Some)
            .map_err(|e| Failure::usage(format!("--at {e}")));
    }
    Ok(None)
}

fn read_batch(
    config: &Config,
    queue: &QueueConfig,
    file: &std::path::Path,
    args: &SubmitArgs,
    run_at: Option<UnixMs>,
    after: &[crate::model::TaskId],
) -> Result<Vec<NewTask>, Failure> {
    let text = read_batch_text(file)?;
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let payload = parse_payload(config, queue, line, &args.args).map_err(|e| {
            Failure::usage(format!(
                "{} line {}: {e}; nothing was enqueued",
                file.display(),
                i + 1
            ))
        })?;
        let mut t = crate::submission::new_task(queue, payload);
        t.args = args.args.clone();
        t.priority = args.priority;
        t.run_at = run_at;
        t.after = after.to_vec();
        tasks.push(t);
    }
    if tasks.is_empty() {
        return Err(Failure::usage(format!(
            "{} holds no tasks (one JSON payload per line)",
            file.display()
        )));
    }
    Ok(tasks)
}

/// Follow a task until it is terminal, then report it.
async fn wait(
    broker: &dyn crate::broker::Broker,
    id: crate::model::TaskId,
    json: bool,
) -> anyhow::Result<u8> {
    let mut delay = Doubling::new(Duration::from_millis(5), Duration::from_millis(200));
    loop {
        let detail = broker.get(id).await?.ok_or_else(|| {
            Failure::new(
                exit::FAILURE,
                format!("task {id} disappeared from the broker"),
            )
        })?;
        if detail.task.state.is_terminal() {
            if json {
                print_json(&detail)?;
            } else {
                if let Some(last) = detail.history.last() {
                    if !last.stdout_tail.is_empty() {
                        print!("{}", visible(&last.stdout_tail));
                    }
                    if !last.stderr_tail.is_empty() {
                        eprint!("{}", visible(&last.stderr_tail));
                    }
                }
                let why = detail
                    .task
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {}", visible(e)))
                    .unwrap_or_default();
                eprintln!(
                    "taskd: task {id} {} after {} attempt(s){why}",
                    detail.task.state, detail.task.attempts
                );
                // What it returned, after the outcome, on stdout with the task's output.
                if let Some(r) = &detail.result {
                    println!("result: {}", json_line(r));
                }
            }
            return Ok(match detail.task.state {
                TaskState::Succeeded => exit::OK,
                _ => exit::TASK_FAILED,
            });
        }
        tokio::time::sleep(delay.next_delay()).await;
    }
}

/// The payload argument's text: `{}` when absent, stdin for `-`.
fn payload_text(args: &SubmitArgs) -> Result<String, Failure> {
    match args.payload.as_deref() {
        None => Ok("{}".to_string()),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                Failure::usage(format!("failed to read the payload from stdin: {e}"))
            })?;
            Ok(s)
        }
        Some(s) => Ok(s.to_string()),
    }
}

/// The bytes of a `--raw` file, or of stdin for `-`.
fn read_raw(file: &std::path::Path) -> Result<Vec<u8>, Failure> {
    if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).map_err(|e| {
            Failure::usage(format!("failed to read the raw payload from stdin: {e}"))
        })?;
        return Ok(bytes);
    }
    std::fs::read(file).map_err(|e| {
        Failure::usage(format!(
            "failed to read the raw payload file {}: {e}",
            file.display()
        ))
    })
}

/// The text of a `--batch` file, or of stdin for `-`.
fn read_batch_text(file: &std::path::Path) -> Result<String, Failure> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::usage(format!("failed to read the batch from stdin: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(file).map_err(|e| {
        Failure::usage(format!(
            "failed to read the batch file {}: {e}",
            file.display()
        ))
    })
}
