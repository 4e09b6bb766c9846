//! Shared vocabulary: ids, names, task states, task records and attempt records.
//!
//! Every module speaks these types; none of them knows about SQLite, processes or the CLI.
//! Times are milliseconds since the Unix epoch (`UnixMs`), the same on every node.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub(crate) type UnixMs = i64;

/// The current wall-clock time in [`UnixMs`].
pub fn now_ms() -> UnixMs {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    d.as_millis() as UnixMs
}

/// A time for people: RFC 3339 in UTC, to the second.
pub fn fmt_time(ms: UnixMs) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration for people: "412ms", "1.2s", "3m 5s".
pub fn fmt_duration_ms(ms: i64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let secs = std::time::Duration::from_secs((ms / 1000) as u64);
    humantime::format_duration(secs).to_string()
}

/// A task's id: a UUIDv7, so ids sort roughly by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub uuid::Uuid);

impl TaskId {
    pub fn new() -> Self {
        TaskId(uuid::Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for TaskId {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        uuid::Uuid::parse_str(text.trim())
            .map(TaskId)
            .map_err(|_| format!("`{text}` is not a task id (expected a UUID such as 0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20)"))
    }
}

/// A queue's name: 1–64 characters of ASCII letters, digits, `_`, `-` and `.`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Why `name` cannot be a queue name, if it cannot.
    pub(crate) fn check(name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > 64 {
            return Err("a queue name must be 1 to 64 characters long".into());
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!(
                "a queue name may hold only ASCII letters, digits, `_`, `-` and `.`, not {c:?}"
            ));
        }
        Ok(())
    }
}

impl TryFrom<String> for QueueName {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        QueueName::check(&text)?;
        Ok(QueueName(text))
    }
}

impl FromStr for QueueName {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        QueueName::try_from(text.to_string())
    }
}

impl From<QueueName> for String {
    fn from(queue: QueueName) -> String {
        queue.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Where a task is in its life: README.md ("Retries, timeouts and signals") for users,
/// docs/architecture.md ("How a task flows") for the transitions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Scheduled,
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Scheduled,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed and cancelled tasks never change again on their own.
    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// How long a finished task is kept before it is deleted (`keep_succeeded`,
/// `keep_failed`, `keep_cancelled`): for a time after it finished, or forever.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Keep {
    For(std::time::Duration),
    Forever,
}

impl Keep {
    /// The finish time before which a task is due for deletion at `now` (ms), or `None`
    /// when nothing is ever due.
    pub fn cutoff(self, now: UnixMs) -> Option<UnixMs> {
        match self {
            Keep::Forever => None,
            Keep::For(d) => Some(now.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64)),
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown state `{text}` (one of: scheduled, queued, running, retrying, succeeded, failed, cancelled)"
                )
            })
    }
}

/// Why an attempt ended. Stable names: they appear in `taskd show` and the JSON output.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptReason {
    /// The program exited by itself (code 0 or not).
    Exit,
    /// The program was killed by a signal that taskd did not send.
    Signal,
    /// The program ran past its timeout and taskd killed its process group.
    Timeout,
    /// The daemon running it went away; the attempt is not charged.
    Lost,
    /// The program could not be started (not found, not executable, bad cwd).
    Spawn,
    /// An operator cancelled the task while it ran.
    Cancelled,
    /// The daemon shut down and put the task back; the attempt is not charged.
    Shutdown,
    /// The task could not even be prepared (a payload field its command needs is missing).
    Invalid,
    /// The task's answer decided the attempt: a long-lived worker answered it (ok, error or
    /// retry; see docs/worker-protocol.md), or its result could not be kept (over
    /// `max_result`, or a result file that was swapped for something else).
    Result,
    /// The long-lived worker running the task died before answering.
    Crash,
    /// The long-lived worker running the task broke the protocol (an unreadable line).
    Protocol,
    /// The kernel's OOM killer ended a process of the task: its cgroup reached the queue's
    /// `memory_max`.
    Oom,
}

impl AttemptReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptReason::Exit => "exit",
            AttemptReason::Signal => "signal",
            AttemptReason::Timeout => "timeout",
            AttemptReason::Lost => "lost",
            AttemptReason::Spawn => "spawn",
            AttemptReason::Cancelled => "cancelled",
            AttemptReason::Shutdown => "shutdown",
            AttemptReason::Invalid => "invalid",
            AttemptReason::Result => "result",
            AttemptReason::Crash => "crash",
            AttemptReason::Protocol => "protocol",
            AttemptReason::Oom => "oom",
        }
    }
}

impl fmt::Display for AttemptReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptReason {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "exit" => AttemptReason::Exit,
            "signal" => AttemptReason::Signal,
            "timeout" => AttemptReason::Timeout,
            "lost" => AttemptReason::Lost,
            "spawn" => AttemptReason::Spawn,
            "cancelled" => AttemptReason::Cancelled,
            "shutdown" => AttemptReason::Shutdown,
            "invalid" => AttemptReason::Invalid,
            "result" => AttemptReason::Result,
            "crash" => AttemptReason::Crash,
            "protocol" => AttemptReason::Protocol,
            "oom" => AttemptReason::Oom,
            _ => return Err(format!("unknown attempt reason `{text}`")),
        })
    }
}

/// What a producer asks for: one task to enqueue.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewTask {
    pub id: TaskId,
    pub queue: QueueName,
    /// The payload as stored: compact JSON text (already validated by the caller), or a raw
    /// payload's [`raw_payload_text`].
    pub payload: String,
    /// Extra argv appended to the queue's command.
    pub args: Vec<String>,
    /// Higher runs first among ready tasks of one queue.
    pub priority: i32,
    /// Not before this time; `None` means now.
    pub run_at: Option<UnixMs>,
    /// At most one waiting or running task per queue holds a given key.
    pub unique_key: Option<String>,
    /// Its `concurrency_key` value, filled from the payload at submit (`config::flow::keys`).
    #[serde(default)]
    pub flow_key: Option<String>,
    /// Its `rate_key` value, filled from the payload at submit.
    #[serde(default)]
    pub rate_key: Option<String>,
    /// How long (ms) the unique key still holds after the task finished (`--unique-for`).
    #[serde(default)]
    pub unique_for: Option<i64>,
    /// The parents: the task waits (`scheduled`) until every one of them has succeeded, and
    /// is cancelled when one fails or is cancelled (`--after`).
    #[serde(default)]
    pub after: Vec<TaskId>,
    /// Not started by then, it is never started: it ends `cancelled`, reason `expired`.
    #[serde(default)]
    pub expires_at: Option<UnixMs>,
}

impl NewTask {
    pub fn new(queue: QueueName, payload: String) -> Self {
        NewTask {
            id: TaskId::new(),
            queue,
            payload,
            args: Vec::new(),
            priority: 0,
            run_at: None,
            unique_key: None,
            flow_key: None,
            rate_key: None,
            unique_for: None,
            after: Vec::new(),
            expires_at: None,
        }
    }
}

/// The id a daemon claims tasks under: `host:pid`, the host name of its machine and the pid
/// of its process there, so that ids of live daemons never collide and a node's machine and
/// process can be told from its id (to kill what it left behind, or to ask whether it lives).
/// Leases, task records and attempt records carry it as its text.
///
/// An id read back from a store is kept as written: one that is not `host:pid` (written by
/// hand, or by a test) is still an id, whose [`Self::host`] and [`Self::pid`] are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

/// This machine's host name, read once per process (`None` when it cannot be read): node
/// ids and node records carry it, and so do audit records.
pub(crate) fn host_name() -> Option<&'static str> {
    static HOST: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        nix::unistd::gethostname()
            .ok()
            .map(|h| h.to_string_lossy().into_owned())
    })
    .as_deref()
}

impl NodeId {
    /// The id a daemon in this process claims under: this machine's [`host_name`]
    /// (`localhost` when it cannot be read) and this process's pid.
    pub(crate) fn of_this_process() -> NodeId {
        NodeId::new(host_name().unwrap_or("localhost"), std::process::id())
    }

    /// The id of the daemon in process `pid` on host `host`.
    pub fn new(host: &str, pid: u32) -> NodeId {
        NodeId(format!("{host}:{pid}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host name part (`None`: the id is not `host:pid`).
    pub(crate) fn host(&self) -> Option<&str> {
        self.parts().map(|(host, _)| host)
    }

    /// The pid part (`None`: the id is not `host:pid`).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.parts().map(|(_, pid)| pid)
    }

    /// Host and pid. A host name holds no `:`, but the split is from the right, so that an
    /// id written by other means with one in its host still finds its pid.
    fn parts(&self) -> Option<(&str, u32)> {
        let (host, pid) = self.0.rsplit_once(':')?;
        Some((host, pid.parse().ok()?))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An id as a store holds it.
impl From<String> for NodeId {
    fn from(id: String) -> NodeId {
        NodeId(id)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> NodeId {
        NodeId(id.to_string())
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A task as the broker keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub queue: QueueName,
    pub state: TaskState,
    pub payload: serde_json::Value,
    pub args: Vec<String>,
    pub priority: i32,
    pub unique_key: Option<String>,
    /// When it becomes (or became) ready.
    pub run_at: UnixMs,
    /// Charged attempts so far (lost and shutdown attempts are not counted).
    pub attempts: u32,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
    pub finished_at: Option<UnixMs>,
    /// The last attempt's error, for failed and retrying tasks.
    pub last_error: Option<String>,
    /// An operator asked to cancel this running task.
    pub cancel_requested: bool,
    /// The node holding the lease, while running.
    pub node: Option<NodeId>,
    /// The schedule (`[schedules.NAME]`) that enqueued it, if one did.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The slot of that schedule it runs for; `None` for `taskd schedules fire`.
    #[serde(default)]
    pub slot: Option<UnixMs>,
    /// The tasks it runs after (`--after`), in the order given; empty for most tasks.
    #[serde(default)]
    pub after: Vec<TaskId>,
    /// When it expires if it has not started: it is then cancelled, reason `expired`.
    #[serde(default)]
    pub expires_at: Option<UnixMs>,
    /// A raw payload (bytes, not JSON: `submit --raw`), base64-encoded; `payload` is then
    /// `null`. Absent for a JSON payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<String>,
}

/// How a store keeps a raw payload: this prefix, then the bytes in standard base64. No JSON
/// text starts with `b`, so a stored payload is told apart by its first bytes, on every
/// broker, without a column or field of its own.
pub const RAW_PAYLOAD_PREFIX: &str = "b64:";

/// The stored text of a raw payload.
pub fn raw_payload_text(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let mut text = String::with_capacity(RAW_PAYLOAD_PREFIX.len() + bytes.len().div_ceil(3) * 4);
    text.push_str(RAW_PAYLOAD_PREFIX);
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut text);
    text
}

/// Reads a stored payload: a JSON payload's value (and `None`), or, for a raw payload,
/// `null` and its base64 text ([`TaskRecord::payload_b64`]).
pub fn read_stored_payload(text: &str) -> Result<(serde_json::Value, Option<String>), String> {
    match text.strip_prefix(RAW_PAYLOAD_PREFIX) {
        Some(b64) => Ok((serde_json::Value::Null, Some(b64.to_string()))),
        None => serde_json::from_str(text)
            .map(|v| (v, None))
            .map_err(|e| e.to_string()),
    }
}

impl TaskRecord {
    /// The bytes of a raw payload (`None`: a JSON payload, or base64 that does not decode).
    pub fn raw_payload(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let b64 = self.payload_b64.as_deref()?;
        base64::engine::general_purpose::STANDARD.decode(b64).ok()
    }

    /// What a task reads on stdin: a raw payload's bytes, else the payload's JSON text.
    pub fn stdin_bytes(&self) -> Vec<u8> {
        match self.raw_payload() {
            Some(bytes) => bytes,
            None => self.payload.to_string().into_bytes(),
        }
    }

    /// How long an attempt may run: its queue's `timeout`, or the task's own hard time
    /// limit when that is shorter ([`own_time_limit`]).
    pub fn timeout(&self, queue: std::time::Duration) -> std::time::Duration {
        own_time_limit(&self.payload).map_or(queue, |own| own.min(queue))
    }
}

/// A task's own hard time limit: a Celery producer's `time_limit` (the message's
/// `timelimit` header is `[hard, soft]`), which the Celery bridge keeps in the payload as
/// `celery.timelimit`. `None` for other tasks, and for a limit that is not a positive
/// number of seconds.
pub fn own_time_limit(payload: &serde_json::Value) -> Option<std::time::Duration> {
    let secs = payload.pointer("/celery/timelimit/0")?.as_f64()?;
    (secs > 0.0)
        .then(|| std::time::Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

/// The reason (`last_error`) of a task cancelled because it had not started by its expiry.
pub const EXPIRED: &str = "expired";

/// A task's parents as the stores keep them: ids separated by commas (`TASKD_AFTER`'s form).
pub(crate) fn join_after(after: &[TaskId]) -> String {
    after
        .iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads what [`join_after`] wrote.
pub(crate) fn parse_after(text: &str) -> Result<Vec<TaskId>, String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// The reason a task cancelled because its parent `parent` failed or was cancelled carries
/// (its `last_error`).
pub(crate) fn dependency_failed(parent: TaskId) -> String {
    format!("dependency {parent} failed")
}

/// One run of a task, kept in its history.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt number this run had (`TASKD_ATTEMPT`).
    pub number: u32,
    pub node: NodeId,
    pub pid: Option<i32>,
    pub started_at: UnixMs,
    pub ended_at: UnixMs,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<AttemptReason>,
    /// A one-line human explanation ("exit code 3", "timed out after 2m").
    pub error: Option<String>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// The peak memory use of the attempt's cgroup, in bytes (`None`: not measured: no
    /// cgroup, or no memory controller, or a task on a long-lived worker).
    #[serde(default)]
    pub memory_peak: Option<u64>,
    /// The CPU time (user + system) of everything the attempt's cgroup held, in
    /// microseconds (`None`: not measured).
    #[serde(default)]
    pub cpu_usec: Option<u64>,
    /// What the run returned (a worker's `ok` result, or what the task wrote to
    /// `$TASKD_RESULT_FILE`), on its way to the broker: a [`Finish::Succeeded`] stores it as
    /// the task's result ([`TaskDetail::result`]). It belongs to the task, not to the
    /// history: never serialized with the attempt, and `None` in every attempt read back.
    ///
    /// [`Finish::Succeeded`]: crate::broker::Finish::Succeeded
    #[serde(skip)]
    pub result: Option<serde_json::Value>,
}

impl AttemptRecord {
    /// A run the daemon or node lost (it died, or its lease was taken over), ended `now`
    /// with `note` saying why; no exit status.
    pub(crate) fn lost(
        number: u32,
        node: NodeId,
        pid: Option<i32>,
        started_at: UnixMs,
        now: UnixMs,
        note: String,
    ) -> AttemptRecord {
        AttemptRecord {
            number,
            node,
            pid,
            started_at,
            ended_at: now,
            reason: Some(AttemptReason::Lost),
            error: Some(note),
            ..Default::default()
        }
    }
}

/// A task with its whole attempt history, for `taskd show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub task: TaskRecord,
    pub history: Vec<AttemptRecord>,
    /// The value the task returned when it succeeded (any JSON but `null`); `None` for a
    /// task that has not succeeded, or succeeded without one.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Runs lost: the daemon or node running it died (attempts with reason `lost`). Past its
    /// queue's `max_lost` the task fails.
    #[serde(default)]
    pub lost: u32,
    /// Runs its long-lived worker died in (reason `crash`). At its queue's `max_crashes`
    /// the task fails.
    #[serde(default)]
    pub crashes: u32,
}

impl TaskDetail {
    /// The task, its history and result, with its lost runs and crashes counted from the
    /// history.
    pub fn new(
        task: TaskRecord,
        history: Vec<AttemptRecord>,
        result: Option<serde_json::Value>,
    ) -> TaskDetail {
        let count = |reason| history.iter().filter(|a| a.reason == Some(reason)).count() as u32;
        TaskDetail {
            lost: count(AttemptReason::Lost),
            crashes: count(AttemptReason::Crash),
            task,
            history,
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::NodeId;

    #[test]
    fn a_node_id_is_host_and_pid_and_reads_back_as_written() {
        let id = NodeId::new("web-1.example", 4242);
        assert_eq!(id.to_string(), "web-1.example:4242");
        assert_eq!((id.host(), id.pid()), (Some("web-1.example"), Some(4242)));
        assert_eq!(NodeId::from(id.to_string()), id);
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"web-1.example:4242\""
        );
        // The split is from the right: a `:` in what precedes the pid stays in the host.
        let odd = NodeId::from("fe80::1:77");
        assert_eq!((odd.host(), odd.pid()), (Some("fe80::1"), Some(77)));
    }

    #[test]
    fn an_id_that_is_not_host_and_pid_has_neither() {
        for text in ["", "no-pid", "host:", "host:x", "host:-1"] {
            let id = NodeId::from(text);
            assert_eq!((id.host(), id.pid()), (None, None), "{text:?}");
            assert_eq!(id.as_str(), text);
        }
    }
}
