//! Following output: a task's (`taskd logs ID --follow`, `GET /api/v1/tasks/{id}/output`)
//! or a queue's (`taskd tail QUEUE`, `GET /api/v1/queues/{queue}/output`), as a sequence of
//! [`OutputEvent`]s.
//!
//! Sessions are pull-based: each `next()` returns the next event, read from the attempt's
//! live ring ([`crate::executor::live`]) while the attempt runs on this daemon, and from the
//! broker around it (the task's state, each finished run's stored tails). A follower that
//! does not pull holds nothing up: the ring moves on, and its next read says what it missed.
//! The same sessions serve the control socket ([`serve_control`], JSON lines), the API
//! (Server-Sent Events) and the CLI itself, which follows through the broker alone (no hub)
//! when it cannot reach a daemon.
//!
//! Positions: see [`Position`]. Design notes: docs/architecture.md, "Watching output".

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError};
use crate::executor::live::{Cursor, EndInfo, Live, LiveOutput, Read, Stream};
use crate::model::{AttemptRecord, QueueName, TaskDetail, TaskId, TaskState, UnixMs};
use crate::view::{OutStream, OutputEvent};

/// The most bytes one `output` event carries.
pub const READ_MAX: usize = 16 * 1024;
/// How often a task that runs elsewhere, or waits, is looked up in the broker.
const POLL: Duration = Duration::from_secs(1);
/// The most follow sessions the control socket serves at once.
pub const MAX_CONTROL_SESSIONS: usize = 64;

/// Where a follower of a task is; the `id` of the events that move it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// In run `run` (numbered as `taskd show` numbers runs), having had `at` of its output:
    /// `RUN:OUT:ERR`.
    In { run: u32, at: Cursor },
    /// After run `run` (0: before the first): `RUN:end`.
    After(u32),
    /// After the task's end: `end`.
    End,
}

impl Position {
    pub fn id(&self) -> String {
        match self {
            Position::In { run, at } => format!("{run}:{}:{}", at.out, at.err),
            Position::After(run) => format!("{run}:end"),
            Position::End => "end".to_string(),
        }
    }

    pub fn parse(text: &str) -> Result<Position, String> {
        let bad = || {
            format!("`{text}` is not a position of an output stream (RUN:OUT:ERR, RUN:end or end, as the events' ids)")
        };
        let s = text.trim();
        if s == "end" {
            return Ok(Position::End);
        }
        let parts: Vec<&str> = s.split(':').collect();
        let num = |t: &str| t.parse::<u64>().map_err(|_| bad());
        match parts.as_slice() {
            [run, "end"] => Ok(Position::After(
                u32::try_from(num(run)?).map_err(|_| bad())?,
            )),
            [run, out, err] => {
                let run = u32::try_from(num(run)?).map_err(|_| bad())?;
                if run == 0 {
                    return Err(bad());
                }
                Ok(Position::In {
                    run,
                    at: Cursor {
                        out: num(out)?,
                        err: num(err)?,
                    },
                })
            }
            _ => Err(bad()),
        }
    }
}

/// What a session reads.
#[derive(Clone)]
pub struct Source {
    pub broker: Arc<dyn Broker>,
    /// This daemon's live output; `None` for a follower without a daemon (the CLI on its
    /// own): each run is then shown from its stored tails when it ends.
    pub live: Option<Arc<Live>>,
    /// This daemon's node id (`host:pid`), to tell its runs from other nodes'.
    pub node: Option<String>,
}

/// What a follower of a task asks for.
#[derive(Clone, Debug)]
pub struct TaskRequest {
    pub task: TaskId,
    /// Keep following until the task ends; otherwise stop at what exists now.
    pub follow: bool,
    /// Start with this run (`--attempt N`; `taskd show`'s numbering), not the latest.
    pub run: Option<u32>,
    /// Resume after this position (a reconnect).
    pub from: Option<Position>,
}

/// Why a session could not begin.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("no task with id {0}")]
    NotFound(TaskId),
    #[error("task {task} has no attempt {run}: {}", runs_phrase(*.runs, *.running))]
    NoSuchRun {
        task: TaskId,
        run: u32,
        runs: u32,
        running: bool,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

fn runs_phrase(runs: u32, running: bool) -> String {
    let mut s = match runs {
        0 => "no attempt has run yet".to_string(),
        1 => "it has run once (attempt 1)".to_string(),
        n => format!("its attempts are 1 to {n}"),
    };
    if running {
        s.push_str(&format!(", and attempt {} is running", runs + 1));
    }
    s
}

/// UTF-8 text from a stream read in pieces: a character split between two reads is held
/// back (at most 3 bytes) until it is whole.
#[derive(Default, Debug)]
struct Carry(Vec<u8>);

impl Carry {
    fn push(&mut self, bytes: Vec<u8>) -> String {
        let mut data = std::mem::take(&mut self.0);
        if data.is_empty() {
            data = bytes;
        } else {
            data.extend_from_slice(&bytes);
        }
        let keep = incomplete_tail(&data);
        self.0 = data.split_off(data.len() - keep);
        match String::from_utf8(data) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    fn flush(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.0)).into_owned()
    }

    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

/// How many bytes at the end of `b` begin a character that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match std::str::from_utf8(&bytes[i..]) {
            Ok(_) => return 0,
            Err(e) => match e.error_len() {
                None => return bytes.len() - (i + e.valid_up_to()),
                Some(n) => i += e.valid_up_to() + n,
            },
        }
    }
}

fn out_stream(stream: Stream) -> OutStream {
    match stream {
        Stream::Stdout => OutStream::Stdout,
        Stream::Stderr => OutStream::Stderr,
    }
}

/// The two streams' carries of one followed attempt.
#[derive(Default, Debug)]
struct Carries {
    out: Carry,
    err: Carry,
}

impl Carries {
    fn of(&mut self, stream: Stream) -> &mut Carry {
        match stream {
            Stream::Stdout => &mut self.out,
            Stream::Stderr => &mut self.err,
        }
    }

    /// `cur` less what is held back: what the follower has had.
    fn delivered(&self, cur: Cursor) -> Cursor {
        Cursor {
            out: cur.out - self.out.len(),
            err: cur.err - self.err.len(),
        }
    }
}

/// One read of an attempt's ring, as events: `output`, `skipped`, or nothing (`Idle`).
enum Step {
    Events(Vec<OutputEvent>),
    Idle(Option<EndInfo>),
}

fn read_step(out: &LiveOutput, cur: &mut Cursor, carries: &mut Carries, run: Option<u32>) -> Step {
    let id = |c: Cursor| run.map(|run| Position::In { run, at: c }.id());
    match out.read(cur, READ_MAX) {
        Read::Data(s, bytes) => {
            let data = carries.of(s).push(bytes);
            if data.is_empty() {
                return Step::Events(Vec::new());
            }
            Step::Events(vec![OutputEvent::Output {
                id: id(carries.delivered(*cur)),
                task: out.task,
                run,
                stream: out_stream(s),
                data,
            }])
        }
        Read::Skipped { out: o, err: e } => {
            // Bytes held back belong to a character the gap cut: shown as U+FFFD.
            let mut events = flush(out, cur, carries, run);
            for (s, n) in [(Stream::Stdout, o), (Stream::Stderr, e)] {
                if n > 0 {
                    events.push(OutputEvent::Skipped {
                        id: id(*cur),
                        task: out.task,
                        run,
                        stream: out_stream(s),
                        bytes: n,
                    });
                }
            }
            Step::Events(events)
        }
        Read::Idle { end } => Step::Idle(end),
    }
}

/// What is held back, as `output` events (the run ended, or a gap cut a character).
fn flush(
    out: &LiveOutput,
    cur: &Cursor,
    carries: &mut Carries,
    run: Option<u32>,
) -> Vec<OutputEvent> {
    let mut events = Vec::new();
    for s in [Stream::Stdout, Stream::Stderr] {
        let data = carries.of(s).flush();
        if !data.is_empty() {
            events.push(OutputEvent::Output {
                id: run.map(|run| Position::In { run, at: *cur }.id()),
                task: out.task,
                run,
                stream: out_stream(s),
                data,
            });
        }
    }
    events
}

fn live_attempt(out: &LiveOutput, run: Option<u32>, at: Cursor) -> OutputEvent {
    OutputEvent::Attempt {
        id: run.map(|run| Position::In { run, at }.id()),
        task: out.task,
        queue: out.queue.clone(),
        run,
        attempt: out.attempt,
        node: Some(out.node.clone()),
        started_at: out.started_at,
        live: true,
    }
}

fn live_end(out: &LiveOutput, run: Option<u32>, info: &EndInfo) -> OutputEvent {
    OutputEvent::AttemptEnd {
        id: run.map(|r| Position::After(r).id()),
        task: out.task,
        run,
        attempt: out.attempt,
        reason: info.reason,
        exit_code: info.exit_code,
        signal: info.signal,
        error: info.error.clone(),
        started_at: info.started_at,
        ended_at: info.ended_at,
        state: Some(info.state),
        run_at: info.run_at,
    }
}

/// A run of the history, as its stored output: `attempt`, the tails, `attempt_end`.
fn stored_run(detail: &TaskDetail, run: u32) -> Vec<OutputEvent> {
    let Some(a) = detail.history.get(run as usize - 1) else {
        return Vec::new();
    };
    let t = &detail.task;
    let last = run as usize == detail.history.len();
    let mut events = vec![OutputEvent::Attempt {
        id: None,
        task: t.id,
        queue: t.queue.clone(),
        run: Some(run),
        attempt: a.number,
        node: Some(a.node.to_string()),
        started_at: a.started_at,
        live: false,
    }];
    for (stream, tail) in [
        (OutStream::Stdout, &a.stdout_tail),
        (OutStream::Stderr, &a.stderr_tail),
    ] {
        if !tail.is_empty() {
            events.push(OutputEvent::Output {
                id: None,
                task: t.id,
                run: Some(run),
                stream,
                data: tail.clone(),
            });
        }
    }
    events.push(stored_end(detail, run, a, last));
    events
}

fn stored_end(detail: &TaskDetail, run: u32, attempt: &AttemptRecord, last: bool) -> OutputEvent {
    let t = &detail.task;
    OutputEvent::AttemptEnd {
        id: Some(Position::After(run).id()),
        task: t.id,
        run: Some(run),
        attempt: attempt.number,
        reason: attempt.reason,
        exit_code: attempt.exit_code,
        signal: attempt.signal,
        error: attempt.error.clone(),
        started_at: attempt.started_at,
        ended_at: attempt.ended_at,
        state: last.then_some(t.state),
        run_at: (last && matches!(t.state, TaskState::Retrying | TaskState::Scheduled))
            .then_some(t.run_at),
    }
}

fn end_event(detail: &TaskDetail) -> OutputEvent {
    OutputEvent::End {
        id: Position::End.id(),
        task: detail.task.id,
        state: detail.task.state,
        attempts: detail.task.attempts,
        error: detail.task.last_error.clone(),
    }
}

/// A time for people: RFC 3339 in UTC, to the second.
pub fn fmt_time(ms: UnixMs) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A run of this daemon being followed.
struct Attached {
    out: Arc<LiveOutput>,
    run: u32,
    cur: Cursor,
    carries: Carries,
    bell: watch::Receiver<()>,
    /// Without `follow`: stop once this much was read (what existed when we looked).
    upto: Option<Cursor>,
}

enum Phase {
    /// Look at the task and begin with its latest run (or `only`).
    Start,
    /// Resume at a position given back by the follower.
    Resume(Position),
    /// Show a finished run from the history.
    Stored(u32),
    /// After run N: show the next one when it exists, else wait.
    After(u32),
    /// Waiting for run N + 1 (or the task's end), until the deadline or a wake-up.
    Waiting(u32, tokio::time::Instant),
    Live(Box<Attached>),
    /// Without `follow`: say how the task stands and stop.
    Close,
    Done,
}

/// A follower of one task.
pub struct TaskFollow {
    src: Source,
    task: TaskId,
    follow: bool,
    only: Option<u32>,
    phase: Phase,
    pending: VecDeque<OutputEvent>,
    /// The task's queue's doorbell: a run starts, writes or ends.
    bell: Option<watch::Receiver<()>>,
    last_notice: Option<String>,
    stop: CancellationToken,
}

impl TaskFollow {
    /// Begin following; refuses an unknown task or a run it does not have.
    pub async fn open(
        src: Source,
        req: TaskRequest,
        stop: CancellationToken,
    ) -> Result<TaskFollow, FollowError> {
        let d = src
            .broker
            .get(req.task)
            .await?
            .ok_or(FollowError::NotFound(req.task))?;
        let runs = d.history.len() as u32;
        let running = d.task.state == TaskState::Running;
        if let Some(run) = req.run {
            if run == 0 || run > runs + u32::from(running) {
                return Err(FollowError::NoSuchRun {
                    task: req.task,
                    run,
                    runs,
                    running,
                });
            }
        }
        let bell = src.live.as_ref().map(|l| l.doorbell(&d.task.queue));
        let phase = match req.from {
            Some(p) => Phase::Resume(p),
            None => Phase::Start,
        };
        Ok(TaskFollow {
            src,
            task: req.task,
            follow: req.follow,
            only: req.run,
            phase,
            pending: VecDeque::new(),
            bell,
            last_notice: None,
            stop,
        })
    }

    async fn detail(&mut self) -> Option<TaskDetail> {
        let mut delay =
            crate::backoff::Doubling::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.src.broker.get(self.task).await {
                Ok(Some(d)) => return Some(d),
                Ok(None) | Err(BrokerError::NotFound(_)) => {
                    self.notice(format!("task {} no longer exists", self.task));
                    self.phase = Phase::Done;
                    return None;
                }
                Err(e) => {
                    // Keep following: the broker comes back, and the task with it.
                    self.notice(format!("the broker does not answer ({e}); trying again"));
                    tokio::select! {
                        _ = tokio::time::sleep(delay.next_delay()) => {}
                        _ = self.stop.cancelled() => {
                            self.phase = Phase::Done;
                            return None;
                        }
                    }
                }
            }
        }
    }

    fn notice(&mut self, message: String) {
        if self.last_notice.as_deref() == Some(message.as_str()) {
            return;
        }
        self.last_notice = Some(message.clone());
        self.pending.push_back(OutputEvent::Notice {
            task: Some(self.task),
            message,
        });
    }

    fn attach(&mut self, out: Arc<LiveOutput>, run: u32, at: Cursor, announce: bool) {
        if announce {
            self.pending.push_back(live_attempt(&out, Some(run), at));
        }
        self.last_notice = None;
        let upto = (!self.follow).then(|| out.total());
        self.phase = Phase::Live(Box::new(Attached {
            bell: out.doorbell(),
            out,
            run,
            cur: at,
            carries: Carries::default(),
            upto,
        }));
    }

    fn after_stored(&mut self, run: u32) -> Phase {
        if self.follow {
            Phase::After(run)
        } else {
            Phase::Close
        }
    }

    /// The next event; `None` once the stream is over (the task ended, or without
    /// `follow`, what exists was sent; or the follower was stopped).
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.stop.is_cancelled() {
                return None;
            }
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Start => {
                    let d = self.detail().await?;
                    let runs = d.history.len() as u32;
                    let current = self.src.live.as_ref().and_then(|l| l.current(self.task));
                    match (self.only, current) {
                        (Some(n), _) if n <= runs => self.phase = Phase::Stored(n),
                        (_, Some(out)) => self.attach(out, runs + 1, Cursor::default(), true),
                        (None, None) if runs > 0 => self.phase = Phase::Stored(runs),
                        _ => {
                            self.phase = if self.follow {
                                Phase::After(runs)
                            } else {
                                Phase::Close
                            }
                        }
                    }
                }
                Phase::Resume(Position::End) => return None,
                Phase::Resume(Position::After(k)) => self.phase = Phase::After(k),
                Phase::Resume(Position::In { run, at }) => {
                    let d = self.detail().await?;
                    let runs = d.history.len() as u32;
                    let live = self.src.live.clone();
                    let current = live.as_ref().and_then(|l| l.current(self.task));
                    let ended = |rec: &AttemptRecord| {
                        live.as_ref().and_then(|l| {
                            l.ended(self.task).into_iter().find(|o| {
                                o.node == rec.node.as_str()
                                    && o.attempt == rec.number
                                    && o.end().is_some_and(|e| e.started_at == rec.started_at)
                            })
                        })
                    };
                    if let Some(out) = current.filter(|_| run == runs + 1) {
                        self.attach(out, run, at, false);
                    } else if let Some(out) = d.history.get(run as usize - 1).and_then(ended) {
                        self.attach(out, run, at, false);
                    } else if run <= runs {
                        self.notice(format!(
                            "the live output of attempt {run} is no longer held here; its stored output follows (it may repeat what was shown)"
                        ));
                        self.phase = Phase::Stored(run);
                    } else {
                        self.phase = Phase::After(run - 1);
                    }
                }
                Phase::Stored(run) => {
                    let d = self.detail().await?;
                    self.pending.extend(stored_run(&d, run));
                    self.phase = self.after_stored(run);
                }
                Phase::After(k) => {
                    let d = self.detail().await?;
                    let runs = d.history.len() as u32;
                    if runs > k {
                        self.phase = Phase::Stored(k + 1);
                        continue;
                    }
                    if let Some(out) = self.src.live.as_ref().and_then(|l| l.current(self.task)) {
                        self.attach(out, k + 1, Cursor::default(), true);
                        continue;
                    }
                    if d.task.state.is_terminal() {
                        self.pending.push_back(end_event(&d));
                        self.phase = Phase::Done;
                        continue;
                    }
                    if !self.follow {
                        self.phase = Phase::Close;
                        continue;
                    }
                    if let Some(n) = self.waiting_for(&d, k + 1) {
                        self.notice(n);
                    }
                    self.phase = Phase::Waiting(k, tokio::time::Instant::now() + POLL);
                }
                Phase::Waiting(k, until) => {
                    let current = self.src.live.as_ref().and_then(|l| l.current(self.task));
                    if current.is_some() || tokio::time::Instant::now() >= until {
                        self.phase = Phase::After(k);
                        continue;
                    }
                    let mut bell = self.bell.take();
                    if let Some(b) = bell.as_mut() {
                        b.borrow_and_update();
                    }
                    let rang = async {
                        match bell.as_mut() {
                            Some(b) => {
                                let _ = b.changed().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = rang => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = self.stop.cancelled() => return None,
                    }
                    self.bell = bell;
                    self.phase = Phase::Waiting(k, until);
                }
                Phase::Live(mut a) => {
                    let reached = a
                        .upto
                        .is_some_and(|u| a.cur.out >= u.out && a.cur.err >= u.err);
                    let step = if reached {
                        Step::Idle(a.out.end())
                    } else {
                        a.bell.borrow_and_update();
                        read_step(&a.out, &mut a.cur, &mut a.carries, Some(a.run))
                    };
                    match step {
                        Step::Events(events) => {
                            self.pending.extend(events);
                            self.phase = Phase::Live(a);
                        }
                        Step::Idle(Some(info)) => {
                            let Attached {
                                out,
                                run,
                                cur,
                                mut carries,
                                ..
                            } = *a;
                            self.pending
                                .extend(flush(&out, &cur, &mut carries, Some(run)));
                            if info.ran {
                                self.pending.push_back(live_end(&out, Some(run), &info));
                                self.phase = self.after_stored(run);
                            } else {
                                self.notice(format!(
                                    "attempt {run} did not start after all (no worker took the task); it waits in its queue"
                                ));
                                self.phase = if self.follow {
                                    Phase::After(run - 1)
                                } else {
                                    Phase::Close
                                };
                            }
                        }
                        Step::Idle(None) if !self.follow => {
                            let Attached {
                                out,
                                run,
                                cur,
                                mut carries,
                                ..
                            } = *a;
                            self.pending
                                .extend(flush(&out, &cur, &mut carries, Some(run)));
                            self.phase = Phase::Close;
                        }
                        Step::Idle(None) => {
                            tokio::select! {
                                _ = a.bell.changed() => {}
                                _ = self.stop.cancelled() => return None,
                            }
                            self.phase = Phase::Live(a);
                        }
                    }
                }
                Phase::Close => {
                    let d = self.detail().await?;
                    self.pending.push_back(if d.task.state.is_terminal() {
                        end_event(&d)
                    } else {
                        OutputEvent::Snapshot {
                            task: d.task.id,
                            state: d.task.state,
                        }
                    });
                    self.phase = Phase::Done;
                }
            }
        }
    }

    /// What the follower waits for while run `next` has not started here.
    fn waiting_for(&self, detail: &TaskDetail, next: u32) -> Option<String> {
        let t = &detail.task;
        match t.state {
            TaskState::Running => {
                let node = t.node.clone().unwrap_or_else(|| "another node".into());
                let here =
                    self.src.live.is_some() && self.src.node.as_deref() == Some(node.as_str());
                if here {
                    // Between its start and its registration here: a moment.
                    return None;
                }
                Some(if self.src.live.is_some() {
                    format!(
                        "attempt {next} runs on node {node}, whose output is live only there (`taskd logs --follow {}` on that host, or --server with that node's API); its stored output is shown when it ends",
                        t.id
                    )
                } else {
                    format!(
                        "attempt {next} runs on node {node}; without its daemon's live output, its stored output is shown when it ends"
                    )
                })
            }
            TaskState::Queued => Some(format!(
                "waiting: the task is queued (attempt {next} starts when a slot is free)"
            )),
            TaskState::Scheduled => Some(format!(
                "waiting: the task is scheduled for {}",
                fmt_time(t.run_at)
            )),
            TaskState::Retrying => Some(format!(
                "waiting: attempt {next} runs at {} (a retry)",
                fmt_time(t.run_at)
            )),
            _ => None,
        }
    }
}

/// A followed attempt of a queue's stream.
struct Tracked {
    out: Arc<LiveOutput>,
    cur: Cursor,
    carries: Carries,
}

/// A follower of the tasks of one queue that run on this daemon: each one's output as it
/// comes (tasks already running from now on, new ones from their start), until stopped.
pub struct QueueFollow {
    live: Arc<Live>,
    queue: QueueName,
    bell: watch::Receiver<()>,
    seen: u64,
    tasks: Vec<Tracked>,
    next_task: usize,
    pending: VecDeque<OutputEvent>,
    stop: CancellationToken,
}

impl QueueFollow {
    pub fn open(live: Arc<Live>, queue: QueueName, stop: CancellationToken) -> QueueFollow {
        let bell = live.doorbell(&queue);
        let (held, _, registered) = live.queue_since(&queue, 0);
        let mut pending = VecDeque::new();
        let mut tasks = Vec::new();
        for out in held.into_iter().filter(|o| o.end().is_none()) {
            let cur = out.total();
            pending.push_back(live_attempt(&out, None, cur));
            tasks.push(Tracked {
                out,
                cur,
                carries: Carries::default(),
            });
        }
        QueueFollow {
            live,
            queue,
            bell,
            seen: registered,
            tasks,
            next_task: 0,
            pending,
            stop,
        }
    }

    /// The next event; `None` once stopped.
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.stop.is_cancelled() {
                return None;
            }
            self.bell.borrow_and_update();
            if self.live.registered(&self.queue) > self.seen {
                let (found, missed, registered) = self.live.queue_since(&self.queue, self.seen);
                self.seen = registered;
                if missed > 0 {
                    self.pending
                        .push_back(OutputEvent::TasksSkipped { count: missed });
                }
                for out in found {
                    self.pending
                        .push_back(live_attempt(&out, None, Cursor::default()));
                    self.tasks.push(Tracked {
                        out,
                        cur: Cursor::default(),
                        carries: Carries::default(),
                    });
                }
                continue;
            }
            // Each task in turn, so that one that writes a lot does not hide the others.
            let n = self.tasks.len();
            let mut done = None;
            for i in 0..n {
                let idx = (self.next_task + i) % n;
                let t = &mut self.tasks[idx];
                match read_step(&t.out, &mut t.cur, &mut t.carries, None) {
                    Step::Events(events) => {
                        self.pending.extend(events);
                        self.next_task = idx + 1;
                        break;
                    }
                    Step::Idle(Some(info)) => {
                        self.pending
                            .extend(flush(&t.out, &t.cur, &mut t.carries, None));
                        if info.ran {
                            self.pending.push_back(live_end(&t.out, None, &info));
                        }
                        done = Some(idx);
                        break;
                    }
                    Step::Idle(None) => {}
                }
            }
            if let Some(idx) = done {
                self.tasks.remove(idx);
            }
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                _ = self.bell.changed() => {}
                _ = self.stop.cancelled() => return None,
            }
        }
    }
}

/// A session of either kind.
pub enum Session {
    Task(Box<TaskFollow>),
    Queue(Box<QueueFollow>),
}

impl Session {
    pub async fn next(&mut self) -> Option<OutputEvent> {
        match self {
            Session::Task(t) => t.next().await,
            Session::Queue(q) => q.next().await,
        }
    }
}

/// Answer a `follow` or `tail` request of the control socket on `stream`: a header line
/// (`{"ok":true}`, or `{"ok":false,"errors":[…]}`), then one JSON event per line until the
/// session ends or the client goes away.
pub async fn serve_control(
    src: Source,
    req: crate::control::Request,
    stream: std::os::unix::net::UnixStream,
) {
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    let (mut read, mut write) = stream.into_split();
    let stop = CancellationToken::new();
    // A client that goes away (Ctrl-C) ends its session, even while nothing is written.
    let gone = stop.clone();
    let watcher = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        gone.cancel();
    });
    let session = match open_control(src, req, stop.clone()).await {
        Ok(s) => s,
        Err(why) => {
            let reply = crate::control::ReloadReply {
                ok: false,
                errors: vec![why],
                ..Default::default()
            };
            let _ = write_line(&mut write, &reply).await;
            watcher.abort();
            return;
        }
    };
    let mut session = session;
    let ok = crate::control::ReloadReply {
        ok: true,
        ..Default::default()
    };
    if write_line(&mut write, &ok).await.is_ok() {
        while let Some(ev) = session.next().await {
            if write_line(&mut write, &ev).await.is_err() {
                break;
            }
        }
    }
    let _ = write.shutdown().await;
    watcher.abort();
}

async fn open_control(
    src: Source,
    req: crate::control::Request,
    stop: CancellationToken,
) -> Result<Session, String> {
    use crate::control::Request;
    match req {
        Request::Follow {
            task,
            follow,
            run,
            from,
        } => {
            let task: TaskId = task.parse()?;
            let from = from.as_deref().map(Position::parse).transpose()?;
            let req = TaskRequest {
                task,
                follow,
                run,
                from,
            };
            TaskFollow::open(src, req, stop)
                .await
                .map(|t| Session::Task(Box::new(t)))
                .map_err(|e| e.to_string())
        }
        Request::Tail { queue } => {
            let queue: QueueName = queue.parse()?;
            let live = src
                .live
                .ok_or_else(|| "this daemon has no live output".to_string())?;
            Ok(Session::Queue(Box::new(QueueFollow::open(
                live, queue, stop,
            ))))
        }
        other => Err(format!("not a streaming request: {other:?}")),
    }
}

async fn write_line<T: serde::Serialize>(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    value: &T,
) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    text.push(b'\n');
    writer.write_all(&text).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_back_what_they_write() {
        for p in [
            Position::In {
                run: 2,
                at: Cursor { out: 10, err: 3 },
            },
            Position::After(0),
            Position::After(4),
            Position::End,
        ] {
            assert_eq!(Position::parse(&p.id()), Ok(p));
        }
        for bad in ["", "x", "1:2", "0:1:2", "1:a:2", "-1:end", "1:2:3:4"] {
            assert!(Position::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_character_split_between_reads_is_held_back_until_whole() {
        let mut c = Carry::default();
        let text = "é✓".as_bytes().to_vec();
        assert_eq!(c.push(text[..1].to_vec()), "");
        assert_eq!(c.len(), 1);
        assert_eq!(c.push(text[1..3].to_vec()), "é");
        assert_eq!(c.push(text[3..].to_vec()), "✓");
        assert_eq!(c.len(), 0);
        // Bytes that are not UTF-8 become U+FFFD; an unfinished character at the end waits.
        assert_eq!(c.push(vec![b'a', 0xff, b'b', 0xe2, 0x9c]), "a\u{fffd}b");
        assert_eq!(c.flush(), "\u{fffd}");
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn events_read_back_what_they_write() {
        let task = TaskId::new();
        let ev = OutputEvent::Skipped {
            id: Some("1:2:3".into()),
            task,
            run: Some(1),
            stream: OutStream::Stderr,
            bytes: 1234,
        };
        let text = serde_json::to_string(&ev).expect("serializes");
        let back: OutputEvent = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, ev);
    }
}
