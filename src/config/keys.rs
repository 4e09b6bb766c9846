//! Every key of `taskd.toml`, each defined once: its name, the table it belongs to, its
//! built-in default, what docs/config.md says about it, and the call that reads its value.
//!
//! From these definitions come the key lists (the unknown-key messages and their
//! did-you-mean), the per-queue layering (a queue's own value, else `[defaults]`, else the
//! built-in default), [`QueueConfig`] with its defaults, and the key reference of
//! docs/config.md: the tables between `<!-- keys:… -->` markers, which the test at the
//! bottom regenerates and compares.
//!
//! This module holds no validation rule beyond which reader a key uses: the readers live in
//! `validate/`, one file per concern. docs/architecture.md says how to add a key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::validate::{
    nr_open, BackoffLayer, CeleryLayer, Cx, Entry, Place, ScheduleLayer, TaskdLayer,
};
use super::{defaults, limits, ArgTemplate, Backoff, Limits, Program, Rate, WorkerProgram};
use crate::model::{Keep, QueueName};

/// What docs/config.md shows about one key: a row of its table.
pub(super) struct Doc {
    pub(super) name: &'static str,
    /// The default, as docs/config.md writes it. Read only by the test that keeps
    /// docs/config.md in step with these definitions.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) default: &'static str,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) meaning: &'static str,
}

/// One key of a table whose value is read into a `T` (the table being built).
pub(super) struct Key<T: 'static> {
    pub(super) doc: Doc,
    /// Reads the entry's value into `T`, reporting every problem on the context; `false`
    /// when the value was invalid (and `T` was left as it was).
    pub(super) read: fn(&mut Cx<'_>, &Entry<'_>, &mut T) -> bool,
}

/// The key of `keys` called `name`.
pub(super) fn find<T>(keys: &'static [Key<T>], name: &str) -> Option<&'static Key<T>> {
    keys.iter().find(|k| k.doc.name == name)
}

/// The names of `keys`, in their order.
pub(super) fn names<T>(keys: &[Key<T>]) -> impl Iterator<Item = &'static str> + '_ {
    keys.iter().map(|k| k.doc.name)
}

macro_rules! key {
    ($name:literal, $default:literal, $meaning:literal, $read:expr $(,)?) => {
        Key {
            doc: Doc {
                name: $name,
                default: $default,
                meaning: $meaning,
            },
            read: $read,
        }
    };
}

/// The tables at the top level.
pub(super) const ROOT: &[&str] = &["taskd", "defaults", "queues", "schedules", "celery"];

/// `[taskd]`: the daemon's own settings. What a key's value becomes when it is not set
/// (which may depend on another key, as `broker` on `state_dir`) is decided where the
/// [`super::Config`] is built, in `validate/mod.rs`.
pub(super) const TASKD: &[Key<TaskdLayer>] = &[
    key!(
        "broker",
        "`sqlite://<state_dir>/taskd.db`",
        "where tasks live. `sqlite:///abs/path.db` or `sqlite:relative.db`; or a Redis server shared by several nodes: `redis://[:password@]host[:port][/db]`, `rediss://…` for TLS (see [redis.md](redis.md)); or a PostgreSQL database shared by several nodes: `postgres://user[:password]@host[:port]/database` (or `postgresql://`), with libpq's parameters (`sslmode`, ...) and taskd's own: `schema` (default `taskd`), `pool_size` (default 8), `statement_timeout` (default `30s`), `sslrootcert` (see [postgres.md](postgres.md)).",
        |cx, e, t| {
            t.broker = cx.broker(e);
            t.broker.is_some()
        },
    ),
    key!(
        "state_dir",
        "`$STATE_DIRECTORY`, else `taskd-data` next to the config",
        "the store, the daemon's lock (`taskd.pid`) and wake-up socket. One daemon per store: a second daemon on the same SQLite file is refused whatever its `state_dir`, naming the first one's pid. Deleting it under a running daemon halts that daemon (it claims nothing more, `taskd status` and the log say why): restart the daemon",
        |cx, e, t| {
            t.state_dir = cx.path(e, "/var/lib/taskd");
            t.state_dir.is_some()
        },
    ),
    key!(
        "state_group",
        "none",
        "a group whose members may enqueue straight into the SQLite store (`taskd submit` run by a web app's user): the daemon then makes `state_dir` that group's, mode 2770, and the store's files 0660. Without it, `state_dir` is 0700 and the store's files 0600, whatever the umask. See [Who can read the store](#who-can-read-the-store)",
        |cx, e, t| {
            t.state_group = cx.state_group(e);
            t.state_group.is_some()
        },
    ),
    key!(
        "listen",
        "none",
        "where the HTTP API, dashboard and metrics are served (see [api.md](api.md)): an IP address and port (`\"127.0.0.1:7070\"`; a non-loopback one needs `token` or `token_file`), or `\"unix:/run/taskd/api.sock\"`, a Unix socket (mode 0660, group `listen_group`) served without a token: its permissions say who may use it. A list serves several: `[\"127.0.0.1:7070\", \"unix:/run/taskd/api.sock\"]`. A stale socket file is replaced at start (one another process still serves is refused), and removed at exit",
        |cx, e, t| {
            t.listen = cx.listen(e);
            t.listen.is_some()
        },
    ),
    key!(
        "listen_group",
        "none (the daemon's group)",
        "the group of `listen`'s Unix sockets: its members may use the API there (e.g. `\"www-data\"` for a web app on this machine)",
        |cx, e, t| {
            t.listen_group = cx.listen_group(e);
            t.listen_group.is_some()
        },
    ),
    key!(
        "shutdown_grace",
        "`\"30s\"`",
        "on SIGTERM, how long running tasks may finish before they are stopped and put back",
        |cx, e, t| {
            t.shutdown_grace = cx.duration(e);
            t.shutdown_grace.is_some()
        },
    ),
    key!(
        "lease",
        "`\"60s\"` (SQLite), `\"30s\"` (Redis)",
        "how long a claim holds a task unless its node renews it (every third of the lease); 3s to 1h. On a shared broker, a dead node's tasks are taken back about one lease after its last renewal",
        |cx, e, t| {
            t.lease = cx.lease(e);
            t.lease.is_some()
        },
    ),
    key!(
        "max_payload",
        "`\"1MiB\"`",
        "the largest payload `submit` accepts (1 byte to 512 MiB)",
        |cx, e, t| {
            t.max_payload = cx
                .size(e, 1, limits::MAX_PAYLOAD, "1MiB")
                .and_then(|n| usize::try_from(n).ok());
            t.max_payload.is_some()
        },
    ),
    key!(
        "control_socket",
        "`<state_dir>/taskd.sock`",
        "the daemon's control socket for `taskd reload` (mode 0600); e.g. `\"/run/taskd/taskd.sock\"` with the unit's `RuntimeDirectory=` (and `RuntimeDirectoryPreserve=yes`, so that `taskd check` finds the directory while the service is stopped). Its directory must exist: `check` and `start` refuse the config (exit 78) when it does not, and `start` exits 78 when the socket cannot be bound",
        |cx, e, t| {
            t.control_socket = cx.control_socket(e);
            t.control_socket.is_some()
        },
    ),
    key!(
        "cgroup_root",
        "none (the daemon's own cgroup v2)",
        "a directory of a cgroup v2 hierarchy where the daemon creates its subtree of task cgroups (`taskd-<key>`, one per state directory), for a daemon run outside systemd, e.g. `\"/sys/fs/cgroup/taskd\"`; created if missing. Without it the daemon uses its own v2 cgroup (under systemd, the unit's with `Delegate=yes`). See [Containment](#containment)",
        |cx, e, t| {
            t.cgroup_root = cx.cgroup_root(e);
            t.cgroup_root.is_some()
        },
    ),
    key!(
        "token",
        "none",
        "the API's bearer token (at least 16 printable ASCII characters); never logged or printed. The audit trail names it `default`",
        |cx, e, t| cx.token(e, t),
    ),
    key!(
        "token_file",
        "none",
        "a file holding the token (trimmed); not together with `token`. It must be a regular file no other user can read or change: not readable or writable by others, not writable by its group (0600, or 0640 with a group only the daemon's user is in), owned by root or the daemon's user; `check` and `start` refuse it otherwise",
        |cx, e, t| cx.token_file(e, t),
    ),
    key!(
        "tokens",
        "none",
        "more API tokens, each with a name the audit trail records for every change made with it: `tokens = [{ name = \"ci\", token_file = \"/etc/taskd/ci.token\" }, { name = \"dashboard\", token_file = \"…\" }]` (or `[[taskd.tokens]]` tables). Each entry has a `name` (1–64 letters, digits, `_`, `-`, `.`; unique, and not `default` while `token` or `token_file` is set) and one of `token_file` (same rules as `token_file` above) or `token`; two names may not share a token. Any of them is accepted wherever the API wants a token. Commands other than `start`, `check` and `reload` do not open token files",
        |cx, e, t| cx.tokens(e, t),
    ),
    key!(
        "audit_keep",
        "`100000`",
        "how many audit records the broker keeps (1 to 10000000): the newest; each new record drops the oldest past this number. Records are small (a few hundred bytes). See `taskd audit` in the README",
        |cx, e, t| {
            t.audit_keep = cx.audit_keep(e);
            t.audit_keep.is_some()
        },
    ),
    key!(
        "log_tasks",
        "`\"failures\"`",
        "which task ends the daemon logs. `\"failures\"`: a task that failed for good at `warn` (`task failed`, with its queue, id, `attempts`, `reason`, `error` and the last line of its stderr, up to 240 characters), and a failed attempt that will be retried at `info` (`attempt failed; retrying in …`, with `next`, the time of the next attempt); `\"all\"`: those, and at `info` every success and every cancellation of a task this daemon had claimed (one cancelled while it waited in the broker never reached a daemon); `\"none\"`: no line per task (a program that cannot be started is still logged at `warn`). A reload applies it",
        |cx, e, t| {
            t.log_tasks = cx.log_tasks(e);
            t.log_tasks.is_some()
        },
    ),
];

/// How a queue key's value in one table combines with the value below it (the `[defaults]`
/// value, below which is the built-in default).
pub(super) trait Layered: Sized {
    /// The value as one table sets it.
    type Set;
    fn over(set: Self::Set, lower: &Self) -> Self;
}

/// Types whose value in a table replaces the one below it as a whole.
macro_rules! replaced {
    ($($t:ty),*) => {$(
        impl Layered for $t {
            type Set = $t;
            fn over(set: $t, _: &$t) -> $t {
                set
            }
        }
    )*};
}
replaced!(usize, u32, u64, bool, Duration, Keep);

/// A list (`fail_exit_codes`, `env_inherit`) is replaced, not merged.
impl<T> Layered for Vec<T> {
    type Set = Vec<T>;
    fn over(set: Vec<T>, _: &Vec<T>) -> Vec<T> {
        set
    }
}

/// A setting without a default (`cwd`, `user`, ...): set, or taken from below.
impl<T> Layered for Option<T> {
    type Set = T;
    fn over(set: T, _: &Option<T>) -> Option<T> {
        Some(set)
    }
}

/// `env` is merged variable by variable.
impl Layered for BTreeMap<String, String> {
    type Set = BTreeMap<String, String>;
    fn over(set: Self, lower: &Self) -> Self {
        let mut env = lower.clone();
        env.extend(set);
        env
    }
}

/// `limits` is merged sub-key by sub-key.
impl Layered for Limits {
    type Set = Limits;
    fn over(set: Limits, lower: &Limits) -> Limits {
        set.over(lower)
    }
}

/// `backoff` is merged sub-key by sub-key.
impl Layered for Backoff {
    type Set = BackoffLayer;
    fn over(set: BackoffLayer, lower: &Backoff) -> Backoff {
        set.over(lower)
    }
}

/// Defines the keys a queue may take from `[defaults]`, each once: its field in
/// [`QueueConfig`] (type, built-in default, rustdoc), its row in docs/config.md and its
/// reader. Generates `QueueConfig` and `QueueConfig::new`, the validator's `Layer` (the
/// keys as one table sets them) and `Settings` (every layer applied), and [`QUEUE`].
macro_rules! queue_keys {
    ($(
        $(#[doc = $rustdoc:literal])*
        $field:ident: $ty:ty = $builtin:expr,
            default: $default:literal,
            meaning: $meaning:literal,
            read: $read:expr;
    )*) => {
        /// One queue, with everything it did not set taken from `[defaults]` or the built-in
        /// defaults.
        #[derive(Clone, Debug, PartialEq)]
        pub struct QueueConfig {
            pub name: QueueName,
            pub program: Program,
            $(
                $(#[doc = $rustdoc])*
                pub $field: $ty,
            )*
        }

        impl QueueConfig {
            /// A queue with every setting at its built-in default.
            pub fn new(name: QueueName, program: Program) -> Self {
                Self::with_settings(name, program, Settings::builtin())
            }

            pub(super) fn with_settings(name: QueueName, program: Program, settings: Settings) -> Self {
                QueueConfig {
                    name,
                    program,
                    $($field: settings.$field,)*
                }
            }
        }

        /// The queue keys with every layer applied.
        #[derive(Clone)]
        pub(super) struct Settings {
            $(pub(super) $field: $ty,)*
            /// Where each key set by a table was written, for errors found only after
            /// inheritance (a `user` the daemon cannot switch to).
            pub(super) at: BTreeMap<&'static str, Place>,
        }

        impl Settings {
            pub(super) fn builtin() -> Self {
                Settings {
                    $($field: $builtin,)*
                    at: BTreeMap::new(),
                }
            }

            /// `self` with the keys `layer` sets over it, each combined as its type says
            /// ([`Layered`]).
            pub(super) fn with(&self, layer: Layer) -> Settings {
                let mut at = self.at.clone();
                at.extend(layer.at);
                Settings {
                    $($field: match layer.$field {
                        Some(set) => Layered::over(set, &self.$field),
                        None => self.$field.clone(),
                    },)*
                    at,
                }
            }
        }

        /// The queue keys as one table (`[defaults]` or `[queues.NAME]`) sets them.
        #[derive(Clone, Default)]
        pub(super) struct Layer {
            $(pub(super) $field: Option<<$ty as Layered>::Set>,)*
            pub(super) at: BTreeMap<&'static str, Place>,
        }

        /// The keys a queue may take from `[defaults]`.
        pub(super) const QUEUE: &[Key<Layer>] = &[$(
            Key {
                doc: Doc {
                    name: stringify!($field),
                    default: $default,
                    meaning: $meaning,
                },
                read: |cx, e, layer| {
                    let read: fn(&mut Cx<'_>, &Entry<'_>) -> Option<<$ty as Layered>::Set> = $read;
                    match read(cx, e) {
                        Some(value) => {
                            layer.$field = Some(value);
                            layer.at.insert(stringify!($field), Place::of(e));
                            true
                        }
                        None => false,
                    }
                },
            },
        )*];
    };
}

queue_keys! {
    /// Tasks run at once on one node (1..=10000, default 1).
    concurrency: usize = defaults::CONCURRENCY,
        default: "`1`",
        meaning: "tasks of this queue running at once on this daemon (1–10000); for a `worker` queue, the number of worker processes",
        read: |cx, e| cx
            .int_in_range(e, 1, limits::MAX_CONCURRENCY, "4")
            .and_then(|n| usize::try_from(n).ok());
    /// Per-attempt time limit (default 30m).
    timeout: Duration = defaults::TIMEOUT,
        default: "`\"30m\"`",
        meaning: "the global task timeout: SIGTERM to the process group, `kill_grace`, SIGKILL. With a cgroup per task the whole cgroup is killed too; without one, a child that left the group (`setsid`, a daemonizing program) keeps running: see [Containment](#containment)",
        read: |cx, e| cx.duration(e);
    /// Total runs, the first included (1..=1000, default 5).
    max_attempts: u32 = defaults::MAX_ATTEMPTS,
        default: "`5`",
        meaning: "total runs including the first (1–1000; never unlimited)",
        read: |cx, e| cx.max_attempts(e);
    /// Lost runs a task may have (its daemon or node died while it ran) before the next
    /// one fails it, reason `lost` (0..=1000, default 3).
    max_lost: u32 = defaults::MAX_LOST,
        default: "`3`",
        meaning: "lost runs a task may have (the daemon or node running it died: kill -9, OOM, power) before the next one fails it instead of queueing it again (0–1000). Lost runs are not charged to `max_attempts`, so without this a task that crashes its daemon would run for ever. The task ends `failed`, its last attempt's reason `lost`; `taskd show` counts its lost runs",
        read: |cx, e| cx
            .int_in_range(e, 0, limits::MAX_ATTEMPTS, "3")
            .and_then(|n| u32::try_from(n).ok());
    /// Runs of one task its long-lived worker may die in before the task fails, reason
    /// `crash`, with attempts left or not (1..=1000, default 3).
    max_crashes: u32 = defaults::MAX_CRASHES,
        default: "`3`",
        meaning: "for a `worker` queue: the times a long-lived worker may die while running the same task; at the last one the task fails (reason `crash`, not retried) even with attempts left (1–1000). A task that kills every worker that takes it is the likely cause; `taskd show` counts its crashes",
        read: |cx, e| cx
            .int_in_range(e, 1, limits::MAX_ATTEMPTS, "3")
            .and_then(|n| u32::try_from(n).ok());
    backoff: Backoff = Backoff::default(),
        default: "`{ kind = \"exponential\", base = \"10s\", max = \"1h\", jitter = true }`",
        meaning: "delay before a retry: `base × 2^(n-1)` after the n-th failed attempt (`fixed`: `base`), capped at `max`; `jitter` picks a random point in the upper half; see [Retry backoff](#retry-backoff)",
        read: |cx, e| cx.backoff(e);
    /// How long after its run-at a task may still start (`None`: no limit); `--expires`
    /// overrides it per task.
    expires: Option<Duration> = None,
        default: "none",
        meaning: "a task not started this long after its run-at (its submit time when due at once) is never started: it is cancelled, reason `expired`; `taskd submit --expires` sets it per task; a schedule's tasks take it from their enqueue time",
        read: |cx, e| cx.duration(e);
    /// Time between SIGTERM and SIGKILL to the task's process group (default 10s).
    kill_grace: Duration = defaults::KILL_GRACE,
        default: "`\"10s\"`",
        meaning: "time between SIGTERM and SIGKILL, on timeout, cancel and shutdown",
        read: |cx, e| cx.duration(e);
    /// Exit codes that fail the task at once, without retry (each 1..=255).
    fail_exit_codes: Vec<i32> = Vec::new(),
        default: "`[]`",
        meaning: "exit codes (1–255) that fail the task at once, without retries",
        read: |cx, e| cx.exit_codes(e);
    /// Extra environment: `[defaults]` env with the queue's env merged over it.
    env: BTreeMap<String, String> = BTreeMap::new(),
        default: "`{}`",
        meaning: "extra environment variables (names may not start with `TASKD_`)",
        read: |cx, e| cx.env(e);
    /// Working directory, absolute.
    cwd: Option<PathBuf> = None,
        default: "the daemon's",
        meaning: "working directory of the task",
        read: |cx, e| cx.path(e, "/srv/app");
    /// User to run as; known to exist when the config was validated.
    user: Option<String> = None,
        default: "the daemon's",
        meaning: "run the task as this user (a name); see [Users and groups](#users-and-groups)",
        read: |cx, e| cx.account(e, super::validate::Account::User);
    /// Group to run as; known to exist when the config was validated. Without `user`, the
    /// task runs as the daemon's user with this group.
    group: Option<String> = None,
        default: "the user's primary group",
        meaning: "run the task with this primary group (a name)",
        read: |cx, e| cx.account(e, super::validate::Account::Group);
    /// The task's umask (`0..=0o777`); `None` keeps the daemon's.
    umask: Option<u32> = None,
        default: "the daemon's",
        meaning: "the task's umask: octal digits in a string, `\"027\"`, or an octal integer, `0o027`",
        read: |cx, e| cx.umask(e);
    /// Resource limits, each set as both the soft and the hard limit.
    limits: Limits = Limits::default(),
        default: "none",
        meaning: "resource limits: `{ nofile, nproc, as, cpu, fsize, core }`; see [Resource limits](#resource-limits)",
        read: |cx, e| cx.limits(e);
    /// The most memory (and swap) the task's cgroup may use, in bytes; `None`: no limit.
    /// Needs a cgroup per task.
    memory_max: Option<u64> = None,
        default: "none",
        meaning: "the most memory a task (or a worker process), everything it started included, may use (≥ `\"1MiB\"`; swap not allowed on top): past it the kernel's OOM killer ends a process of it, and the attempt's reason is `oom`. Needs a cgroup per task: see [Containment](#containment)",
        read: |cx, e| cx.size(e, limits::MIN_MEMORY_MAX, u64::MAX, "512MiB");
    /// The most processes and threads the task's cgroup may hold at once; `None`: no limit.
    pids_max: Option<u64> = None,
        default: "none",
        meaning: "the most processes and threads a task (or a worker process), everything it started included, may hold at once (1–4194304): a fork past it fails (EAGAIN), so a fork bomb stays inside its task. Needs a cgroup per task",
        read: |cx, e| cx
            .int_in_range(e, 1, limits::MAX_PIDS, "256")
            .and_then(|n| u64::try_from(n).ok());
    /// The task cgroup's CPU weight (1..=10000); `None`: the default, 100.
    cpu_weight: Option<u32> = None,
        default: "none (`100`)",
        meaning: "the task's share of CPU time when CPUs are busy, against other tasks and the rest of the machine (1–10000; 100 is everyone's default: 200 gets twice as much). Needs a cgroup per task",
        read: |cx, e| cx
            .int_in_range(e, 1, 10_000, "100")
            .and_then(|n| u32::try_from(n).ok());
    /// Names of the daemon's environment variables passed on to tasks, on top of
    /// [`defaults::ENV_INHERIT`]. Never one of the
    /// [`never_inherited`](super::never_inherited) names.
    env_inherit: Vec<String> = Vec::new(),
        default: "`[]`",
        meaning: "names of the daemon's environment variables passed to tasks on top of the built-in allowlist; see [What a task sees](#what-a-task-sees)",
        read: |cx, e| cx.env_inherit(e);
    /// Bytes of stdout and of stderr kept per attempt (default 64 KiB, at most 16 MiB).
    output_tail: usize = defaults::OUTPUT_TAIL,
        default: "`\"64KiB\"`",
        meaning: "bytes of stdout and of stderr kept per attempt (0–16 MiB)",
        read: |cx, e| cx
            .size(e, 0, limits::MAX_OUTPUT_TAIL, "64KiB")
            .and_then(|n| usize::try_from(n).ok());
    /// The largest result a task may return, in bytes (default 1 MiB, at most 64 MiB; 0
    /// turns results off): what it writes to `$TASKD_RESULT_FILE`, or a worker's `result`.
    max_result: u64 = defaults::MAX_RESULT,
        default: "`\"1MiB\"`",
        meaning: "the largest result a task may return (0–64 MiB): the bytes it writes to `$TASKD_RESULT_FILE`, or a worker's `result` as compact JSON. A bigger one fails the task at once (reason `result`, not retried). `0` turns results off: no `TASKD_RESULT_FILE`, and any result fails the task. See [Results](#results)",
        read: |cx, e| cx.size(e, 0, limits::MAX_RESULT, "1MiB");
    /// Copy the task's output into the daemon's log, a line per event tagged with the task.
    log_output: bool = false,
        default: "`false`",
        meaning: "also copy the task's output into the daemon's log, one event per line (target `taskd::output`, with `stream`, `queue`, `task` and `attempt`); lines over 8 KiB are split. Off by default: task output is data, and may hold secrets",
        read: |cx, e| cx.boolean(e);
    /// Directory for full output files, absolute.
    log_dir: Option<PathBuf> = None,
        default: "none",
        meaning: "keep full output in `<log_dir>/<task id>.<attempt>.out` / `.err`",
        read: |cx, e| cx.path(e, "/var/log/taskd");
    /// Size cap per log file in bytes (default 10 MiB).
    log_max: u64 = defaults::LOG_MAX,
        default: "`\"10MiB\"`",
        meaning: "cap per log file; a marker line says where it was cut",
        read: |cx, e| cx.size(e, 1, u64::MAX, "10MiB");
    /// How long a succeeded task is kept after it finished (default 7 days).
    keep_succeeded: Keep = defaults::KEEP_SUCCEEDED,
        default: "`\"7d\"`",
        meaning: "how long a succeeded task (with its attempts, output tails and result) is kept after it finished; then the daemon deletes it (`taskd prune` does it now). A duration, or `\"forever\"`. See [Retention](#retention)",
        read: |cx, e| cx.keep(e);
    /// How long a failed task is kept after it finished (default 30 days).
    keep_failed: Keep = defaults::KEEP_FAILED,
        default: "`\"30d\"`",
        meaning: "how long a failed task is kept after it failed for good (a duration, or `\"forever\"`); `taskd retry` needs it still there",
        read: |cx, e| cx.keep(e);
    /// How long a cancelled task is kept after it finished (default 7 days).
    keep_cancelled: Keep = defaults::KEEP_CANCELLED,
        default: "`\"7d\"`",
        meaning: "how long a cancelled task is kept after it was cancelled (a duration, or `\"forever\"`)",
        read: |cx, e| cx.keep(e);
    /// Let a payload value that starts with `-` fill a placeholder that begins a `command`
    /// element before any `--` element (default false: refused at submit, since the program
    /// would read it as an option). See `runnable::argv`.
    allow_dash_values: bool = false,
        default: "`false`",
        meaning: "for `command`: accept a payload value that starts with `-` in a placeholder that begins an argv element before any `\"--\"` element (`\"{src}\"`, `\"{name}.png\"`). By default such a task is refused at submit (exit 2; API 422), because the program would read `--output=/etc/x` as an option. Prefer `\"--\", \"{src}\"` (the program then takes it as an operand) or `\"--size={size}\"` to setting this",
        read: |cx, e| cx.boolean(e);
    /// The per-key concurrency key: a template over the payload's top-level fields (as in
    /// `command`), filled at submit; `None`: no per-key limit.
    concurrency_key: Option<ArgTemplate> = None,
        default: "none",
        meaning: "a key made from the payload like a `command` element (`\"{customer}\"`): at most `concurrency_per_key` tasks with the same key value run (or are held by a node) at once, across every daemon sharing the broker; tasks of other keys keep flowing. A payload that cannot fill it is refused at submit (exit 2; API 422). See [Flow control](#flow-control)",
        read: |cx, e| cx.key_template(e);
    /// How many tasks with one `concurrency_key` value run at once (1..=10000, default 1).
    concurrency_per_key: u32 = 1,
        default: "`1`",
        meaning: "with `concurrency_key`: tasks with the same key value running at once across all nodes (1–10000)",
        read: |cx, e| cx
            .int_in_range(e, 1, limits::MAX_CONCURRENCY, "1")
            .and_then(|n| u32::try_from(n).ok());
    /// At most this many task starts per period, spread evenly, across all nodes.
    rate: Option<Rate> = None,
        default: "none",
        meaning: "at most this many task starts per period across every daemon sharing the broker, spread evenly (GCRA): `\"100/m\"`; units `/s`, `/m`, `/h`, `/d`. Retries count as starts. See [Flow control](#flow-control)",
        read: |cx, e| cx.rate(e);
    /// With `rate`: how many starts may happen at once after an idle time (default 1).
    burst: u32 = 1,
        default: "`1`",
        meaning: "with `rate`: how many starts may happen at once after an idle time (1–10000)",
        read: |cx, e| cx
            .int_in_range(e, 1, limits::MAX_CONCURRENCY, "10")
            .and_then(|n| u32::try_from(n).ok());
    /// With `rate`: one limit per value of this key (a template, as `concurrency_key`).
    rate_key: Option<ArgTemplate> = None,
        default: "none",
        meaning: "with `rate`: one limit per value of this key made from the payload (`\"{domain}\"`); without it the limit is the queue's. A payload that cannot fill it is refused at submit",
        read: |cx, e| cx.key_template(e);
}

/// What a queue runs: exactly one of these, in the queue's own table only. Read by
/// `validate/program.rs`, which knows how they exclude each other.
pub(super) const PROGRAM: &[Doc] = &[
    Doc {
        name: "command",
        default: "—",
        meaning: "argv, run directly (no shell). `{field}` is filled from the payload's top-level field; `{{` and `}}` are literal braces. The program (first element) cannot be a placeholder. A value is one argv element, never split, but it can still be read as an option: see `allow_dash_values`. A task whose argv the kernel cannot pass (an element over 131071 bytes, `MAX_ARG_STRLEN`; over 1 MiB in all; a NUL byte) is refused at submit.",
    },
    Doc {
        name: "shell",
        default: "—",
        meaning: "a script for `/bin/sh -c`. Payload fields arrive as `$TASKD_ARG_<field>`; extra argv as `$1…`.",
    },
    Doc {
        name: "worker",
        default: "—",
        meaning: "argv of a long-lived worker program, run directly (no placeholders): the queue keeps `concurrency` of them running and feeds them tasks one at a time; see [Long-lived workers](#long-lived-workers)",
    },
];

/// The settings that only a `worker` queue takes, in the queue's own table only. Their
/// built-in defaults are [`WorkerProgram::new`]'s.
pub(super) const WORKER: &[Key<WorkerProgram>] = &[
    key!(
        "max_tasks_per_worker",
        "none",
        "recycle a worker (stop it, start a fresh one) after it answered this many tasks (≥ 1)",
        |cx, e, w| match cx.int_in_range(e, 1, i64::MAX, "1000") {
            Some(n) => {
                w.max_tasks = u64::try_from(n).ok();
                true
            }
            None => false,
        },
    ),
    key!(
        "max_worker_memory",
        "none",
        "recycle a worker after its current task when its resident memory (VmRSS of the worker process, read from `/proc/PID/status`) is above this size (≥ `\"1MiB\"`). Where the daemon cannot read another user's `/proc` entries (systemd's `ProtectProc=invisible` without `CAP_SYS_PTRACE`, as in the shipped unit, with a queue `user`), it is not enforced and the log says so",
        |cx, e, w| match cx.size(e, limits::MIN_WORKER_MEMORY, u64::MAX, "512MiB") {
            Some(n) => {
                w.max_memory = Some(n);
                true
            }
            None => false,
        },
    ),
    key!(
        "start_secs",
        "`\"1s\"`",
        "a started worker is RUNNING (gets tasks) once it sent `ready` and has lived this long; `\"0s\"` means at `ready`",
        |cx, e, w| match cx.start_secs(e) {
            Some(d) => {
                w.start_secs = d;
                true
            }
            None => false,
        },
    ),
    key!(
        "start_retries",
        "`3`",
        "a worker that fails to start this many times in a row (1–100) is FATAL: not restarted until a reload; its queue's tasks wait, uncharged",
        |cx, e, w| match cx.int_in_range(e, 1, limits::MAX_START_RETRIES, "3") {
            Some(n) => {
                w.start_retries = n as u32; // 1..=MAX_START_RETRIES fits
                true
            }
            None => false,
        },
    ),
    key!(
        "restart_on_change",
        "`false`",
        "`taskd reload` (or SIGHUP) also restarts the workers, one at a time as `taskd restart` does, when a program file changed (a newer mtime) since the oldest running worker started: the program (`worker`'s first element, found on `PATH`) and every later argument that names an existing file (the script of `[\"python3\", \"app.py\"]`). Modules the script imports are not watched: touch the script, or use `taskd restart`",
        |cx, e, w| match cx.boolean(e) {
            Some(b) => {
                w.restart_on_change = b;
                true
            }
            None => false,
        },
    ),
    key!(
        "worker_fork",
        "`false`",
        "start the `worker` program once as a *parent* that loads the application and forks each slot's worker from itself, so the workers share its memory (its interpreter and imports) until they write it; a crashed, timed-out, cancelled or recycled worker is replaced by a new fork. The program must support it (the Python library's `app.run()` and `serve()` do; see [worker-protocol.md](worker-protocol.md#forking-workers-worker_fork)); one that does not fails its start with a message saying so",
        |cx, e, w| match cx.boolean(e) {
            Some(b) => {
                w.fork = b;
                true
            }
            None => false,
        },
    ),
];

/// The sub-keys of `backoff`; the built-in defaults are [`Backoff::default`]'s.
pub(super) const BACKOFF: &[Key<BackoffLayer>] = &[
    key!(
        "kind",
        "`\"exponential\"`",
        "`\"exponential\"`: `base × 2^(n-1)` after the n-th failed attempt; `\"fixed\"`: `base` every time",
        |cx, e, b| {
            b.kind = cx.backoff_kind(e);
            b.kind.is_some()
        },
    ),
    key!(
        "base",
        "`\"10s\"`",
        "the first delay (at most `max`)",
        |cx, e, b| {
            b.base = cx.duration(e);
            b.base_at = Some((e.value_span(), e.path.clone()));
            b.base.is_some()
        },
    ),
    key!(
        "max",
        "`\"1h\"`",
        "the longest delay",
        |cx, e, b| {
            b.max = cx.duration(e);
            b.max_at = Some((e.value_span(), e.path.clone()));
            b.max.is_some()
        },
    ),
    key!(
        "jitter",
        "`true`",
        "wait a random time in the upper half of the delay, so that tasks that failed together do not retry together",
        |cx, e, b| {
            b.jitter = cx.boolean(e);
            b.jitter.is_some()
        },
    ),
];

/// The sub-keys of `limits`; none is set by default.
pub(super) const LIMITS: &[Key<Limits>] = &[
    key!(
        "nofile",
        "none",
        "`RLIMIT_NOFILE`, open descriptors: an integer, 1 to `fs.nr_open` (usually 1048576)",
        |cx, e, l| {
            l.nofile = cx.limit_count(e, nr_open(), false);
            l.nofile.is_some()
        },
    ),
    key!(
        "nproc",
        "none",
        "`RLIMIT_NPROC`, processes: an integer ≥ 1. Counts **all** processes of the task's user on the machine, so it only means something with a dedicated `user`; root ignores it",
        |cx, e, l| {
            l.nproc = cx.limit_count(e, i64::MAX as u64, true);
            l.nproc.is_some()
        },
    ),
    key!(
        "as",
        "none",
        "`RLIMIT_AS`, address space: a size, at least `\"16MiB\"`. Virtual memory, not RSS: runtimes that reserve large areas (Go, Java, V8) need far more than they use",
        |cx, e, l| {
            l.address_space = cx.limit_size(e, limits::MIN_ADDRESS_SPACE, "4GiB");
            l.address_space.is_some()
        },
    ),
    key!(
        "cpu",
        "none",
        "`RLIMIT_CPU`, CPU time: whole seconds, an integer (`600`) or a duration (`\"10m\"`); past it the task gets SIGXCPU and is killed, a failed attempt",
        |cx, e, l| {
            l.cpu = cx.limit_cpu(e);
            l.cpu.is_some()
        },
    ),
    key!(
        "fsize",
        "none",
        "`RLIMIT_FSIZE`, the largest file written: a size; past it a write fails and the task gets SIGXFSZ",
        |cx, e, l| {
            l.fsize = cx.limit_size(e, 0, "1GiB");
            l.fsize.is_some()
        },
    ),
    key!(
        "core",
        "none",
        "`RLIMIT_CORE`, core dump size: a size; `0` turns core dumps off",
        |cx, e, l| {
            l.core = cx.limit_size(e, 0, "0");
            l.core.is_some()
        },
    ),
];

/// The keys of a `[schedules.NAME]` table. Whether `cron` and `every` exclude each other, the
/// queue exists and the payload fills its placeholders is checked once the table is read
/// (`validate/schedule.rs`).
pub(super) const SCHEDULE: &[Key<ScheduleLayer>] = &[
    key!(
        "queue",
        "— (required)",
        "the queue of the config whose task each slot enqueues",
        |cx, e, l| {
            l.queue = cx.string(e, "\"reports\"").map(|q| (q.to_string(), Place::of(e)));
            l.queue.is_some()
        },
    ),
    key!(
        "cron",
        "—",
        "when it fires: 5 fields (`minute hour day-of-month month day-of-week`), or 6 with seconds first (`\"*/10 * * * * *\"`); names (`mon-fri`, `jan`), `L`, `W`, `#` and `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`. Read on the wall clock of `timezone`; see [Schedules](#schedules) for DST. Exactly one of `cron` and `every`",
        |cx, e, l| {
            l.cron = cx.cron(e).map(|c| (c, Place::of(e)));
            l.cron.is_some()
        },
    ),
    key!(
        "every",
        "—",
        "or a fixed period, whole seconds (`\"1s\"`, `\"10m\"`, `\"6h\"`): the slots are the multiples of it since 1970-01-01 UTC, so `\"10m\"` fires at :00, :10, … whatever the zone",
        |cx, e, l| {
            l.every = cx.every(e).map(|c| (c, Place::of(e)));
            l.every.is_some()
        },
    ),
    key!(
        "timezone",
        "the machine's (`TZ`, else `/etc/localtime`)",
        "the IANA time zone `cron` is read in (`\"Europe/Berlin\"`, `\"UTC\"`)",
        |cx, e, l| {
            l.timezone = cx.time_zone(e);
            l.timezone.is_some()
        },
    ),
    key!(
        "payload",
        "`{}`",
        "the task's payload, a table (JSON object): `{ month = \"last\" }`. It must fill the queue's `{field}` placeholders (checked by `taskd check`)",
        |cx, e, l| {
            l.payload = cx.json_table(e).map(|v| (v, Place::of(e)));
            l.payload.is_some()
        },
    ),
    key!(
        "args",
        "`[]`",
        "extra argv for the task, as `taskd submit QUEUE -- ARGS`",
        |cx, e, l| {
            l.args = cx.strings(e);
            l.args.is_some()
        },
    ),
    key!(
        "priority",
        "`0`",
        "the task's priority (higher runs first among ready tasks of the queue)",
        |cx, e, l| {
            l.priority = cx
                .int_in_range(e, i32::MIN as i64, i32::MAX as i64, "0")
                .map(|n| n as i32);
            l.priority.is_some()
        },
    ),
    key!(
        "missed",
        "`\"latest\"`",
        "slots missed while no daemon fired them (down, paused, disabled, a clock step forward): `\"skip\"` runs none, `\"latest\"` one run for the newest, `\"all\"` every one (at most `max_catch_up`, the newest). Each is recorded",
        |cx, e, l| {
            l.missed = cx
                .one_of(e, &crate::slots::Missed::NAMES)
                .and_then(crate::slots::Missed::parse);
            l.missed.is_some()
        },
    ),
    key!(
        "max_catch_up",
        "`100`",
        "with `missed = \"all\"`, the most missed slots that run (1–10000); older ones are recorded as skipped",
        |cx, e, l| {
            l.max_catch_up = cx
                .int_in_range(e, 1, super::schedule::MAX_CATCH_UP_LIMIT, "100")
                .map(|n| n as u32);
            l.max_catch_up.is_some()
        },
    ),
    key!(
        "overlap",
        "`\"skip\"`",
        "when the previous slot's task is still waiting or running: `\"skip\"` records the slot as skipped, `\"allow\"` enqueues it anyway",
        |cx, e, l| {
            l.overlap = cx
                .one_of(e, &super::Overlap::NAMES)
                .and_then(super::Overlap::parse);
            l.overlap.is_some()
        },
    ),
    key!(
        "enabled",
        "`true`",
        "`false` keeps the schedule in the config without firing it; enabling it again treats the slots since as missed, as `taskd schedules resume` does",
        |cx, e, l| {
            l.enabled = cx.boolean(e);
            l.enabled.is_some()
        },
    ),
];

/// The keys of `[celery]`, the Celery bridge (docs/celery.md). That `broker` is set and
/// that every queue `[celery.tasks]` names exists is checked once the file is read
/// (`validate/celery.rs`).
pub(super) const CELERY: &[Key<CeleryLayer>] = &[
    key!(
        "broker",
        "— (required)",
        "the broker the Celery producers publish to: `redis://[:password@]host[:port][/db]` (`rediss://` for TLS), or `amqp://user:password@host[:port]/vhost` (`amqps://`)",
        |cx, e, l| {
            l.broker = cx.celery_broker(e);
            l.broker.is_some()
        },
    ),
    key!(
        "result_backend",
        "none (no result is written)",
        "where each task's end is written for Celery's `AsyncResult`: `redis://…/db` (Celery's Redis result backend), or `rpc://` (replies over an `amqp://` broker)",
        |cx, e, l| {
            l.result_backend = cx.celery_backend(e);
            l.result_backend.is_some()
        },
    ),
    key!(
        "queues",
        "`[\"celery\"]`",
        "the Celery queues to consume (Celery's `-Q`), served in this order within a priority",
        |cx, e, l| {
            l.queues = cx.celery_queues(e);
            l.queues.is_some()
        },
    ),
    key!(
        "tasks",
        "— (required)",
        "`[celery.tasks]`: Celery task name → taskd queue, `\"app.tasks.alert\" = \"alerts\"`, or `{ queue = \"alerts\", track_started = true }`. A `*` in a name matches any run of characters (`\"app.tasks.*\" = \"default\"`); an exact name wins over patterns, and patterns are tried in the order written. A task whose name nothing matches fails (`NotRegistered`)",
        |cx, e, l| {
            l.tasks = cx.celery_tasks(e);
            l.tasks.is_some()
        },
    ),
    key!(
        "track_started",
        "`false`",
        "write STARTED when a task starts (Celery's `task_track_started`), for the entries of `[celery.tasks]` that do not say",
        |cx, e, l| {
            l.track_started = cx.boolean(e);
            l.track_started.is_some()
        },
    ),
    key!(
        "result_expires",
        "`\"1d\"`",
        "how long a result stays in a Redis result backend (Celery's `result_expires`), and how long a revoke of a task whose message has not arrived yet is kept",
        |cx, e, l| {
            l.result_expires = cx.duration(e);
            l.result_expires.is_some()
        },
    ),
    key!(
        "visibility_timeout",
        "`\"1h\"`",
        "Redis: how old a message taken by a consumer that never acknowledged it (a Celery worker or a taskd node that died) must be before it is delivered again (kombu's `visibility_timeout`); set it to the largest any consumer of that Redis uses",
        |cx, e, l| {
            l.visibility_timeout = cx.duration(e);
            l.visibility_timeout.is_some()
        },
    ),
    key!(
        "prefetch",
        "`2000`",
        "AMQP: how many messages RabbitMQ may hand taskd ahead, per consumed queue, before taskd acknowledged them (`basic.qos`); each is acknowledged once its task is in taskd's store. 1–65535",
        |cx, e, l| {
            l.prefetch = cx.int_in_range(e, 1, 65_535, "2000").map(|n| n as u16);
            l.prefetch.is_some()
        },
    ),
];

/// Whether `name` is a `[taskd]` key.
pub(super) fn is_taskd(name: &str) -> bool {
    find(TASKD, name).is_some()
}

/// Whether `name` is a queue key `[defaults]` may hold.
pub(super) fn is_queue(name: &str) -> bool {
    find(QUEUE, name).is_some()
}

/// Whether `name` is a key only a queue's own table may hold (what it runs, worker settings).
pub(super) fn is_queue_only(name: &str) -> bool {
    PROGRAM.iter().any(|d| d.name == name) || find(WORKER, name).is_some()
}

/// Whether `name` is a worker setting.
pub(super) fn is_worker_setting(name: &str) -> bool {
    find(WORKER, name).is_some()
}

/// Every key a queue's own table may hold, in the order messages list them.
pub(super) fn queue_table_keys() -> Vec<&'static str> {
    names(QUEUE)
        .chain(PROGRAM.iter().map(|d| d.name))
        .chain(names(WORKER))
        .collect()
}

/// The generated parts of docs/config.md: `(marker, table)`. A table's rows follow the
/// definitions' order.
#[cfg(test)]
fn reference() -> Vec<(&'static str, String)> {
    fn table<'a>(first: &str, docs: impl Iterator<Item = &'a Doc>) -> String {
        let mut out = format!("| {first} | default | meaning |\n|---|---|---|\n");
        for d in docs {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                d.name, d.default, d.meaning
            ));
        }
        out
    }
    vec![
        ("taskd", table("key", TASKD.iter().map(|k| &k.doc))),
        (
            "queue",
            table("key", PROGRAM.iter().chain(QUEUE.iter().map(|k| &k.doc))),
        ),
        ("backoff", table("sub-key", BACKOFF.iter().map(|k| &k.doc))),
        ("worker", table("key", WORKER.iter().map(|k| &k.doc))),
        ("limits", table("sub-key", LIMITS.iter().map(|k| &k.doc))),
        ("schedule", table("key", SCHEDULE.iter().map(|k| &k.doc))),
        ("celery", table("key", CELERY.iter().map(|k| &k.doc))),
    ]
}

/// `text` (docs/config.md) with every generated table replaced by its definitions' table;
/// `Err` names a marker that is missing or not closed.
#[cfg(test)]
fn regenerate(text: &str) -> Result<String, String> {
    let mut out = text.to_string();
    for (name, table) in reference() {
        let begin = format!("<!-- keys:{name}: generated from src/config/keys.rs -->\n");
        let end = format!("<!-- /keys:{name} -->");
        let start = out
            .find(&begin)
            .ok_or_else(|| format!("docs/config.md lacks the line `{}`", begin.trim()))?
            + begin.len();
        let stop = out[start..].find(&end).ok_or_else(|| {
            format!(
                "docs/config.md lacks the line `{end}` after `{}`",
                begin.trim()
            )
        })? + start;
        out.replace_range(start..stop, &table);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The command that rewrites docs/config.md from the definitions.
    const REGENERATE: &str = "TASKD_UPDATE_DOCS=1 cargo test --lib config::keys";

    #[test]
    fn docs_config_md_shows_the_key_definitions() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md");
        let text =
            std::fs::read_to_string(&path).expect("docs/config.md is part of the repository");
        let fresh = regenerate(&text).unwrap_or_else(|why| panic!("{why}: restore the markers"));
        if fresh == text {
            return;
        }
        if std::env::var_os("TASKD_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &fresh).expect("docs/config.md is writable");
            return;
        }
        let (old, new) = text
            .lines()
            .zip(fresh.lines())
            .find(|(a, b)| a != b)
            .unwrap_or(("(end of file)", "(end of file)"));
        panic!(
            "docs/config.md's key reference differs from the definitions in src/config/keys.rs.\n\
             first difference:\n  docs/config.md: {old}\n  keys.rs:        {new}\n\
             regenerate it with `{REGENERATE}` and review the diff"
        );
    }

    #[test]
    fn every_key_is_defined_once() {
        let mut all: Vec<&str> = names(TASKD).chain(queue_table_keys()).collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "a key is defined twice: {all:?}");
        for keys in [
            names(BACKOFF).collect::<Vec<_>>(),
            names(LIMITS).collect(),
            names(SCHEDULE).collect(),
            names(CELERY).collect(),
        ] {
            let mut k = keys.clone();
            k.sort_unstable();
            k.dedup();
            assert_eq!(k.len(), keys.len(), "a sub-key is defined twice: {keys:?}");
        }
    }
}
