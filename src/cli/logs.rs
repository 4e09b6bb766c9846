//! `taskd logs ID [--follow]` and `taskd tail QUEUE`: a task's output (live while it runs,
//! its stored tails once it ended), and the output of a queue's tasks as they run.
//!
//! The events come from the daemon's control socket (JSON lines), from the API's
//! Server-Sent Events with `--server`, or, when no daemon on this machine answers, from a
//! [`crate::follow`] session run here over the broker alone. The task's stdout goes to
//! stdout and its stderr to stderr; taskd's own lines (`── attempt 2 … ──`) go to stderr.
//! Text bound for a terminal has its control characters escaped unless `--raw`; a pipe or
//! a file gets it as it came.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use super::submit::{Remote, RemoteArgs};
use super::visible::visible;
use super::{exit, fmt_duration_ms, fmt_time, load_config, open_broker, Failure};
use crate::backoff::Doubling;
use crate::control::Request;
use crate::follow::{Position, Source, TaskFollow, TaskRequest};
use crate::model::{AttemptReason, TaskId, TaskState};
use crate::view::{OutStream, OutputEvent};

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The task's id, as `submit` printed it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Follow the output as the task writes it, through its retries, until the task ends;
    /// then exit 0 if it succeeded, 4 if it failed or was cancelled.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Show attempt N (numbered as `taskd show` numbers them) instead of the latest; with
    /// --follow, go on from there.
    #[arg(long, value_name = "N")]
    pub attempt: Option<u32>,
    /// Write the task's output as it came even to a terminal (by default a terminal gets
    /// control characters as escapes such as \x1b; a pipe or a file always gets it as it
    /// came).
    #[arg(long)]
    pub raw: bool,
    /// Print the events as JSON, one per line (attempt, output, skipped, attempt_end,
    /// notice, end, snapshot), as the API's output stream sends them.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// The queue whose tasks to follow, as in the config's `[queues.NAME]`.
    #[arg(value_name = "QUEUE")]
    pub queue: String,
    /// Write the tasks' output as it came even to a terminal (by default a terminal gets
    /// control characters as escapes; a pipe or a file always gets it as it came).
    #[arg(long)]
    pub raw: bool,
    /// Print the events as JSON, one per line, as the API's queue output stream sends them.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Where the events come from.
enum Feed {
    /// A session run here over the broker alone.
    Here(Box<TaskFollow>),
    /// The daemon's control socket.
    Daemon(crate::control::StreamAnswer),
    /// The API's Server-Sent Events.
    Remote(Box<SseFeed>),
}

/// Why a feed stopped before its end.
enum Stopped {
    /// The connection to the daemon went away (it stopped, or restarted).
    Lost(String),
    Failed(Failure),
}

impl Feed {
    async fn next(&mut self) -> Result<Option<OutputEvent>, Stopped> {
        match self {
            Feed::Here(s) => Ok(s.next().await),
            Feed::Daemon(a) => match a.lines.next_line().await {
                Ok(Some(line)) => serde_json::from_str(&line).map(Some).map_err(|e| {
                    Stopped::Failed(Failure::new(
                        exit::FAILURE,
                        format!(
                            "the daemon sent something that is not an output event ({e}): {line}"
                        ),
                    ))
                }),
                Ok(None) => Err(Stopped::Lost("the daemon closed the stream".into())),
                Err(e) => Err(Stopped::Lost(format!(
                    "reading from the daemon failed: {e}"
                ))),
            },
            Feed::Remote(r) => r.next(),
        }
    }
}

/// A reader of the API's Server-Sent Events that reconnects from the last id it had.
struct SseFeed {
    remote: Remote,
    path: String,
    body: Option<std::io::BufReader<Box<dyn std::io::Read + Send>>>,
    last_id: Option<String>,
    /// Give up after this many reconnects in a row without an event.
    tries: u32,
}

const SSE_RETRIES: u32 = 5;

impl SseFeed {
    fn open(remote: Remote, path: String) -> Result<SseFeed, Failure> {
        let body = match remote.stream(&path, None) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(Failure::new(
                    exit::FAILURE,
                    format!("{}{path}: the daemon has nothing to stream", remote.base()),
                ))
            }
            Err((_, f)) => return Err(f),
        };
        Ok(SseFeed {
            remote,
            path,
            body: Some(std::io::BufReader::new(body)),
            last_id: None,
            tries: 0,
        })
    }

    fn next(&mut self) -> Result<Option<OutputEvent>, Stopped> {
        let mut delay = Doubling::new(Duration::from_millis(500), Duration::from_secs(8));
        loop {
            let Some(body) = self.body.as_mut() else {
                if self.tries >= SSE_RETRIES {
                    return Err(Stopped::Failed(Failure::new(
                        exit::BROKER,
                        format!(
                            "lost the stream of {}{} and could not get it back after {SSE_RETRIES} tries",
                            self.remote.base(),
                            self.path
                        ),
                    )));
                }
                self.tries += 1;
                std::thread::sleep(delay.next_delay());
                match self.remote.stream(&self.path, self.last_id.as_deref()) {
                    Ok(Some(b)) => self.body = Some(std::io::BufReader::new(b)),
                    Ok(None) => return Ok(None),
                    // A daemon that restarts answers 503 or nothing for a moment.
                    Err((None | Some(503), _)) => {}
                    Err((_, f)) => return Err(Stopped::Failed(f)),
                }
                continue;
            };
            match read_sse_event(body) {
                Ok(Some((id, data))) => {
                    self.tries = 0;
                    if id.is_some() {
                        self.last_id = id;
                    }
                    let ev: OutputEvent = serde_json::from_str(&data).map_err(|e| {
                        Stopped::Failed(Failure::new(
                            exit::FAILURE,
                            format!("the daemon sent something that is not an output event ({e}): {data}"),
                        ))
                    })?;
                    return Ok(Some(ev));
                }
                Ok(None) | Err(_) => {
                    // The stream ended without the task's end: reconnect from the last id.
                    self.body = None;
                }
            }
        }
    }
}

/// The next event of an SSE body: its `id` and `data` (comments and keep-alives skipped);
/// `None` at the end of the body.
fn read_sse_event(body: &mut impl BufRead) -> std::io::Result<Option<(Option<String>, String)>> {
    let mut id = None;
    let mut data: Option<String> = None;
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end_matches(['\n', '\r']);
        if l.is_empty() {
            if let Some(d) = data.take() {
                return Ok(Some((id, d)));
            }
            continue;
        }
        if l.starts_with(':') {
            continue;
        }
        let (field, value) = l.split_once(':').unwrap_or((l, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
}

pub async fn logs(flag: Option<PathBuf>, args: LogsArgs) -> anyhow::Result<u8> {
    let id: TaskId = args.id.parse().map_err(Failure::usage)?;
    if args.attempt == Some(0) {
        return Err(Failure::usage("--attempt counts from 1, as `taskd show` does").into());
    }
    let mut printer = Printer::new(args.raw, args.json, false);
    if let Some(remote) = Remote::new(&args.remote) {
        let mut path = format!("/api/v1/tasks/{id}/output?follow={}", args.follow);
        if let Some(n) = args.attempt {
            path.push_str(&format!("&attempt={n}"));
        }
        let feed = SseFeed::open(remote, path)?;
        return show_all(
            Feed::Remote(Box::new(feed)),
            &mut printer,
            args.follow,
            None,
        )
        .await;
    }
    let config = load_config(flag)?;
    let broker = open_broker(&config).await?;
    let detail = broker.get(id).await?.ok_or_else(|| {
        Failure::usage(format!(
            "no task with id {id} in {} (`taskd tasks` lists them)",
            config.broker
        ))
    })?;
    let runs = detail.history.len() as u32;
    let state = detail.task.state;
    let source = Source {
        broker: broker.clone(),
        live: None,
        node: None,
    };
    let req = TaskRequest {
        task: id,
        follow: args.follow,
        run: args.attempt,
        from: None,
    };
    // The stored tails need no daemon: a finished task, or an attempt that ended.
    let stored_only = state.is_terminal()
        || (!args.follow && state != TaskState::Running)
        || (!args.follow && args.attempt.is_some_and(|n| n <= runs));
    let here = || async {
        TaskFollow::open(source.clone(), req.clone(), Default::default())
            .await
            .map_err(|e| match e {
                crate::follow::FollowError::Broker(b) => anyhow::Error::from(b),
                other => Failure::usage(other.to_string()).into(),
            })
    };
    let feed = if stored_only {
        Feed::Here(Box::new(here().await?))
    } else {
        let ask = Request::Follow {
            task: id.to_string(),
            follow: args.follow,
            run: args.attempt,
            from: None,
        };
        match crate::control::request_stream(&config.control_socket, &ask).await {
            Ok(a) if a.header.ok => Feed::Daemon(a),
            Ok(a) => {
                return Err(Failure::new(exit::FAILURE, a.header.errors.join("; ")).into());
            }
            Err(e) => {
                let why = super::reload::unreachable(&config, &e);
                printer.meta(&format!(
                    "{}; following the task through the broker instead: each attempt's stored output is shown when it ends",
                    why.message
                ));
                Feed::Here(Box::new(here().await?))
            }
        }
    };
    show_all(feed, &mut printer, args.follow, Some((source, id))).await
}

/// Show every event of `feed`; return the exit code. A lost daemon connection is followed
/// on through the broker (`fallback`: the source and the task) from the last position.
async fn show_all(
    mut feed: Feed,
    printer: &mut Printer,
    follow: bool,
    fallback: Option<(Source, TaskId)>,
) -> anyhow::Result<u8> {
    let mut last: Option<String> = None;
    loop {
        match feed.next().await {
            Ok(Some(ev)) => {
                if let Some(id) = ev.id() {
                    last = Some(id.to_string());
                }
                printer.show(&ev);
                match ev {
                    OutputEvent::End { state, .. } => {
                        return Ok(if !follow || state == TaskState::Succeeded {
                            exit::OK
                        } else {
                            exit::TASK_FAILED
                        });
                    }
                    // Without --follow: what exists now was shown.
                    OutputEvent::Snapshot { .. } => return Ok(exit::OK),
                    _ => {}
                }
            }
            Ok(None) => return Ok(exit::OK),
            Err(Stopped::Failed(f)) => return Err(f.into()),
            Err(Stopped::Lost(why)) => {
                let Some((source, task)) = fallback.clone() else {
                    return Err(Failure::new(exit::FAILURE, why).into());
                };
                printer.meta(&format!(
                    "{why} (the daemon stopped?); following the task through the broker from here"
                ));
                let req = TaskRequest {
                    task,
                    follow,
                    run: None,
                    from: last.as_deref().and_then(|l| Position::parse(l).ok()),
                };
                let s = TaskFollow::open(source, req, Default::default())
                    .await
                    .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
                feed = Feed::Here(Box::new(s));
            }
        }
    }
}

/// Where `taskd tail` follows a queue from.
enum TailFrom {
    /// A daemon's API (`--server`).
    Remote(Remote),
    /// This machine's daemon, through its control socket.
    Here(Box<crate::config::Config>),
}

pub async fn tail(flag: Option<PathBuf>, args: TailArgs) -> anyhow::Result<u8> {
    // Here the config names the queues, so an unknown or malformed name is told with the
    // queues there are; a remote daemon's API checks the name itself.
    let (queue, daemon) = match Remote::new(&args.remote) {
        Some(remote) => {
            let queue = args.queue.parse().map_err(|e: String| {
                Failure::usage(format!("`{}` is not a queue name: {e}", args.queue))
            })?;
            (queue, TailFrom::Remote(remote))
        }
        None => {
            let config = load_config(flag)?;
            let queue = super::submit::find_queue(&config, &args.queue)?
                .name
                .clone();
            (queue, TailFrom::Here(Box::new(config)))
        }
    };
    let mut printer = Printer::new(args.raw, args.json, true);
    let (mut feed, from) = match daemon {
        TailFrom::Remote(remote) => {
            let base = remote.base().to_string();
            let feed = SseFeed::open(remote, format!("/api/v1/queues/{queue}/output"))?;
            (
                Feed::Remote(Box::new(feed)),
                format!("the daemon at {base}"),
            )
        }
        TailFrom::Here(config) => {
            let ask = Request::Tail {
                queue: queue.to_string(),
            };
            let answer = crate::control::request_stream(&config.control_socket, &ask)
                .await
                .map_err(|e| {
                    let f = super::reload::unreachable(&config, &e);
                    Failure::new(
                        f.code,
                        format!(
                            "{}: `taskd tail` shows the tasks a running daemon runs",
                            f.message
                        ),
                    )
                })?;
            if !answer.header.ok {
                return Err(Failure::new(exit::FAILURE, answer.header.errors.join("; ")).into());
            }
            (Feed::Daemon(answer), "this machine's daemon".to_string())
        }
    };
    if !args.json {
        printer.meta(&format!(
            "following the tasks of queue {queue} as they run on {from}; Ctrl-C to stop"
        ));
    }
    loop {
        match feed.next().await {
            Ok(Some(ev)) => printer.show(&ev),
            Ok(None) | Err(Stopped::Lost(_)) => {
                printer.flush_all();
                return Err(Failure::new(
                    exit::FAILURE,
                    "the daemon ended the stream (it is stopping)",
                )
                .into());
            }
            Err(Stopped::Failed(f)) => return Err(f.into()),
        }
    }
}

/// The last 8 hex digits of a task id (its first ones are a timestamp, which tasks enqueued
/// together share): how `taskd tail` tells tasks apart.
pub fn short_id(id: TaskId) -> String {
    let s = id.0.simple().to_string();
    s[s.len() - 8..].to_string()
}

/// Longest part of a line `tail` holds back waiting for its end.
const MAX_PARTIAL: usize = 8 * 1024;

/// How events look to people (or as JSON lines with `--json`).
struct Printer {
    json: bool,
    /// `tail`: every line is prefixed with its task's short id.
    prefixed: bool,
    /// Escape control characters on each stream (a terminal, without `--raw`).
    escape_out: bool,
    escape_err: bool,
    tty_out: bool,
    tty_err: bool,
    /// The last text written on each stream ended a line (`logs`).
    at_line_start: [bool; 2],
    /// `tail`: what a task wrote after its last newline, per stream.
    partial: HashMap<(TaskId, OutStream), String>,
    /// The last notice shown, not shown twice in a row.
    last_notice: Option<String>,
}

fn idx(stream: OutStream) -> usize {
    match stream {
        OutStream::Stdout => 0,
        OutStream::Stderr => 1,
    }
}

impl Printer {
    fn new(raw: bool, json: bool, prefixed: bool) -> Printer {
        let tty_out = std::io::stdout().is_terminal();
        let tty_err = std::io::stderr().is_terminal();
        Printer {
            json,
            prefixed,
            escape_out: tty_out && !raw,
            escape_err: tty_err && !raw,
            tty_out,
            tty_err,
            at_line_start: [true, true],
            partial: HashMap::new(),
            last_notice: None,
        }
    }

    fn write(&mut self, stream: OutStream, text: &str) {
        if text.is_empty() {
            return;
        }
        let escape = match stream {
            OutStream::Stdout => self.escape_out,
            OutStream::Stderr => self.escape_err,
        };
        let text = if escape { visible(text) } else { text.into() };
        let _ = match stream {
            OutStream::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
            OutStream::Stderr => {
                let mut o = std::io::stderr().lock();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
        };
        self.at_line_start[idx(stream)] = text.ends_with('\n');
    }

    /// Before a line of taskd's own: end the task's unfinished lines on terminals, where
    /// they would run into it (a pipe or a file gets the task's bytes unchanged).
    fn end_lines(&mut self) {
        for (s, tty) in [
            (OutStream::Stdout, self.tty_out),
            (OutStream::Stderr, self.tty_err),
        ] {
            if tty && !self.at_line_start[idx(s)] {
                self.write_plain(s, "\n");
            }
        }
    }

    fn write_plain(&mut self, stream: OutStream, text: &str) {
        let _ = match stream {
            OutStream::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
            OutStream::Stderr => {
                let mut o = std::io::stderr().lock();
                o.write_all(text.as_bytes()).and_then(|_| o.flush())
            }
        };
        self.at_line_start[idx(stream)] = text.ends_with('\n');
    }

    /// A line of taskd's own, on stderr.
    fn meta(&mut self, text: &str) {
        if self.json {
            return;
        }
        self.end_lines();
        eprintln!("── {} ──", visible(text));
        self.at_line_start[1] = true;
    }

    fn task_meta(&mut self, task: TaskId, text: &str) {
        if self.prefixed {
            self.flush_task(task);
            eprintln!("{} | ── {} ──", short_id(task), visible(text));
        } else {
            self.meta(text);
        }
    }

    fn show(&mut self, ev: &OutputEvent) {
        if self.json {
            if let Ok(line) = serde_json::to_string(ev) {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{line}").and_then(|_| o.flush());
            }
            return;
        }
        if !matches!(ev, OutputEvent::Notice { .. }) {
            self.last_notice = None;
        }
        match ev {
            OutputEvent::Attempt {
                task,
                run,
                attempt,
                node,
                started_at,
                live,
                ..
            } => {
                let name = attempt_name(*run, *attempt);
                let on = node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default();
                let what = if *live { "live" } else { "stored output" };
                self.task_meta(
                    *task,
                    &format!("{name} · started {}{on} · {what}", fmt_time(*started_at)),
                );
            }
            OutputEvent::Output {
                task, stream, data, ..
            } => {
                if self.prefixed {
                    self.prefixed_output(*task, *stream, data);
                } else {
                    self.write(*stream, data);
                }
            }
            OutputEvent::Skipped {
                task,
                stream,
                bytes,
                ..
            } => {
                let marker = format!("[… {bytes} bytes skipped]\n");
                if self.prefixed {
                    self.flush_line(*task, *stream);
                    self.write_plain(*stream, &format!("{} | {marker}", short_id(*task)));
                } else {
                    if !self.at_line_start[idx(*stream)] {
                        self.write_plain(*stream, "\n");
                    }
                    self.write_plain(*stream, &marker);
                }
            }
            OutputEvent::AttemptEnd {
                task,
                run,
                attempt,
                reason,
                exit_code,
                error,
                started_at,
                ended_at,
                state,
                run_at,
                ..
            } => {
                let how = match (error, exit_code, reason) {
                    (Some(e), _, _) => e.clone(),
                    (None, Some(c), _) => format!("exit code {c}"),
                    (None, None, Some(AttemptReason::Result)) => {
                        "the worker answered ok".to_string()
                    }
                    (None, None, r) => r.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                };
                let next = match (state, run_at) {
                    (Some(TaskState::Succeeded), _) => "; the task succeeded".to_string(),
                    (Some(TaskState::Failed), _) => "; the task failed".to_string(),
                    (Some(TaskState::Cancelled), _) => "; the task was cancelled".to_string(),
                    (Some(TaskState::Retrying), Some(at)) => {
                        format!("; it runs again at {}", fmt_time(*at))
                    }
                    // A shutdown's or a lost run's error already says it went back.
                    (Some(TaskState::Queued), _)
                        if matches!(
                            reason,
                            Some(AttemptReason::Shutdown | AttemptReason::Lost)
                        ) =>
                    {
                        String::new()
                    }
                    (Some(TaskState::Queued), _) => "; the task is queued again".to_string(),
                    (Some(TaskState::Running), _) => "; the task runs again".to_string(),
                    _ => String::new(),
                };
                let name = attempt_name(*run, *attempt);
                self.task_meta(
                    *task,
                    &format!(
                        "{name} ended after {}: {how}{next}",
                        fmt_duration_ms((ended_at - started_at).max(0))
                    ),
                );
            }
            OutputEvent::Notice { task, message } => {
                // A follower that reconnected may be told the same thing again.
                if self.last_notice.as_deref() == Some(message.as_str()) {
                    return;
                }
                self.last_notice = Some(message.clone());
                match task {
                    Some(t) if self.prefixed => self.task_meta(*t, message),
                    _ => self.meta(message),
                }
            }
            OutputEvent::End {
                task,
                state,
                attempts,
                error,
                ..
            } => {
                let why = match (state, error) {
                    (TaskState::Succeeded, _) | (_, None) => String::new(),
                    (_, Some(e)) => format!(": {e}"),
                };
                let s = if *attempts == 1 { "" } else { "s" };
                self.meta(&format!(
                    "task {task} {state} after {attempts} attempt{s}{why}"
                ));
            }
            OutputEvent::Snapshot { task, state } => {
                let text = match state {
                    TaskState::Running => format!(
                        "the attempt is still running; `taskd logs --follow {task}` follows it"
                    ),
                    other => format!(
                        "the task is {other}; nothing more has run yet (`taskd logs --follow {task}` waits for it)"
                    ),
                };
                self.meta(&text);
            }
            OutputEvent::TasksSkipped { count } => {
                let s = if *count == 1 { "" } else { "s" };
                self.meta(&format!(
                    "[… {count} task{s} started and ended before they could be shown]"
                ));
            }
        }
    }

    /// `tail`: whole lines, each prefixed with its task's short id.
    fn prefixed_output(&mut self, task: TaskId, stream: OutStream, data: &str) {
        let mut buf = self.partial.remove(&(task, stream)).unwrap_or_default();
        buf.push_str(data);
        let prefix = short_id(task);
        let mut rest = buf.as_str();
        let mut out = String::new();
        while let Some(i) = rest.find('\n') {
            out.push_str(&format!("{prefix} | {}\n", self.esc(stream, &rest[..i])));
            rest = &rest[i + 1..];
        }
        if rest.len() >= MAX_PARTIAL {
            out.push_str(&format!("{prefix} | {}\n", self.esc(stream, rest)));
            rest = "";
        }
        if !rest.is_empty() {
            self.partial.insert((task, stream), rest.to_string());
        }
        self.write_plain(stream, &out);
    }

    fn esc<'a>(&self, stream: OutStream, text: &'a str) -> std::borrow::Cow<'a, str> {
        let escape = match stream {
            OutStream::Stdout => self.escape_out,
            OutStream::Stderr => self.escape_err,
        };
        if escape {
            visible(text)
        } else {
            text.into()
        }
    }

    fn flush_line(&mut self, task: TaskId, stream: OutStream) {
        if let Some(rest) = self.partial.remove(&(task, stream)) {
            let line = format!("{} | {}\n", short_id(task), self.esc(stream, &rest));
            self.write_plain(stream, &line);
        }
    }

    fn flush_task(&mut self, task: TaskId) {
        self.flush_line(task, OutStream::Stdout);
        self.flush_line(task, OutStream::Stderr);
    }

    fn flush_all(&mut self) {
        let keys: Vec<(TaskId, OutStream)> = self.partial.keys().copied().collect();
        for (t, s) in keys {
            self.flush_line(t, s);
        }
    }
}

/// "attempt 3", or "attempt 3 (TASKD_ATTEMPT=1)" where the run's count differs (after a
/// retry or an uncharged run), as `taskd show` says it; "attempt N" alone in a queue's
/// stream, which does not count runs.
fn attempt_name(run: Option<u32>, attempt: u32) -> String {
    match run {
        Some(r) if r == attempt => format!("attempt {r}"),
        Some(r) => format!("attempt {r} (TASKD_ATTEMPT={attempt})"),
        None => format!("attempt {attempt}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_read_field_by_field() {
        let text = ": keep-alive\n\nevent: output\nid: 1:3:0\ndata: {\"a\":1}\n\nretry: 5\ndata: x\ndata: y\n\n";
        let mut body = std::io::BufReader::new(text.as_bytes());
        assert_eq!(
            read_sse_event(&mut body).expect("reads"),
            Some((Some("1:3:0".to_string()), "{\"a\":1}".to_string()))
        );
        assert_eq!(
            read_sse_event(&mut body).expect("reads"),
            Some((None, "x\ny".to_string()))
        );
        assert_eq!(read_sse_event(&mut body).expect("reads"), None);
    }

    #[test]
    fn short_ids_are_the_random_end_of_the_id() {
        let id: TaskId = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20"
            .parse()
            .expect("an id");
        assert_eq!(short_id(id), "8d6a4b20");
    }
}
