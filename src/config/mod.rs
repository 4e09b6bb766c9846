//! The config: `taskd.toml` read raw, then validated into a [`Config`] with defaults applied.
//!
//! This module owns the file format documented in docs/config.md and every rule about what a
//! valid config is. It must not start anything, open the broker or touch the state
//! directory: it only reads the file (and the system user database, to check `user` and
//! `group`).
//!
//! Two stages, like ripgrep's low/high args:
//!
//! 1. **Raw**: [`toml_edit::ImDocument`] parses the text and keeps the byte span of every key
//!    and value. A TOML syntax error stops here (there is no tree to walk).
//! 2. **Validated**: the tree is walked by hand, not by serde, so that *every* problem is
//!    reported at once, each as a [`Diagnostic`] with file, line, column, dotted key and a fix.
//!    Only a config without a single error becomes a [`Config`].
//!
//! Every key is defined once, in `keys.rs` (name, default, documentation, reader); the
//! readers live in `validate/`, one file per concern.
//!
//! Inheritance: `[defaults]` holds every queue key except `command`, `shell` and `worker`;
//! a queue takes each key from its own table, else from `[defaults]`, else the built-in
//! default. A queue's `env` is merged key by key over the defaults' `env`, and a queue's
//! `backoff` sub-keys fall back to the defaults' `backoff` sub-keys one by one, and so do
//! `limits` sub-keys. `env_inherit`, like `fail_exit_codes`, is replaced, not merged.
//!
//! Privileges: whether the daemon could switch to a queue's `user`/`group` is checked here,
//! against the effective uid and gid of the process reading the file (`taskd check` should be
//! run as the user the daemon runs as).
//!
//! Paths: every path in a [`Config`] is absolute. Relative paths in the file (`state_dir`,
//! `cwd`, `log_dir`, `sqlite:relative.db`) are relative to the directory holding the config
//! file, never to the daemon's working directory, so `taskd -c /etc/taskd/taskd.toml` means
//! the same thing from anywhere. That directory is made absolute with
//! [`std::fs::canonicalize`] when possible, else by joining it to the current directory.
//!
//! `state_dir`, when not set, is `$STATE_DIRECTORY` (its first entry if colon-separated, as
//! systemd's `StateDirectory=` sets it), else `taskd-data` next to the config file. The
//! broker, when not set, is the SQLite file `taskd.db` inside `state_dir`.

mod backoff;
pub mod celery;
pub(crate) mod flow;
mod keys;
#[cfg(feature = "postgres")]
pub(crate) mod postgres_url;
pub(crate) mod runnable;
mod schedule;
mod template;
mod units;
pub(crate) use units::show_size;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::QueueName;

pub(crate) use backoff::{Backoff, BackoffKind};
pub use flow::Rate;
pub(crate) use keys::QueueConfig;
pub(crate) use schedule::{Overlap, ScheduleConfig};
pub(crate) use template::ArgTemplate;

/// The config's schedules by name. Shared, not copied: the daemon, its scheduler and each
/// of its schedule's handlings hold the same ones (a thousand schedules are a thousand
/// cron patterns, payloads and names, once).
pub type Schedules = BTreeMap<String, std::sync::Arc<ScheduleConfig>>;

/// A validated config, with defaults applied and every path absolute.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, as given.
    pub path: PathBuf,
    pub broker: BrokerUrl,
    pub state_dir: PathBuf,
    /// Where the HTTP API, dashboard and metrics are served (`listen`: one address or a
    /// list; TCP addresses and `unix:` socket paths). Empty: no API.
    pub listen: Vec<Listen>,
    /// The group given the API's Unix sockets (`listen_group`); `None`: the daemon's own.
    pub listen_group: Option<String>,
    /// The API's bearer tokens, each with the name the audit trail records: `token` (or
    /// `token_file`) is named [`DEFAULT_TOKEN`], `tokens` adds named ones. At least one is
    /// required when `listen` is not a loopback address; mutating endpoints check them
    /// whenever there is one.
    pub tokens: Vec<ApiToken>,
    /// How many audit records the broker keeps, the newest (`audit_keep`).
    pub audit_keep: usize,
    /// Where the daemon creates its subtree of task cgroups (`cgroup_root`); `None`: under
    /// its own cgroup v2.
    pub cgroup_root: Option<PathBuf>,
    /// How long a draining daemon lets running tasks finish (default 30s).
    pub shutdown_grace: Duration,
    /// How long a claim holds a task unless renewed (`lease`); `None`: the broker's default
    /// (60 s embedded, 30 s shared). On a shared broker a dead node's tasks are taken back
    /// about one lease after it stopped renewing.
    pub lease: Option<Duration>,
    /// The largest payload accepted, in bytes (default 1 MiB).
    pub max_payload: usize,
    /// The daemon's control socket (`taskd reload`); default `state_dir/taskd.sock`.
    pub control_socket: PathBuf,
    /// A group whose members may write the store (`state_group`): `state_dir` becomes
    /// theirs, mode 2770. `None`: `state_dir` is 0700.
    pub state_group: Option<String>,
    /// Which task ends the daemon logs (`log_tasks`, default failures).
    pub log_tasks: LogTasks,
    pub queues: BTreeMap<QueueName, QueueConfig>,
    /// `[schedules.NAME]`, by name.
    pub schedules: Schedules,
    /// `[celery]`: the Celery bridge; `None` when the file has no such table.
    pub celery: Option<celery::CeleryConfig>,
}

/// One place the API is served (an entry of `listen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// An IP address and port. Outside loopback it needs a token.
    Tcp(SocketAddr),
    /// `unix:/path`: a Unix socket, mode 0660 (group `listen_group`), served without a
    /// token: its file's permissions say who may connect.
    Unix(PathBuf),
}

impl Listen {
    pub(crate) fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which task ends the daemon logs (`[taskd] log_tasks`): a failed task at `warn` and a
/// retried attempt at `info` (`failures`, the default), also every other end at `info`
/// (`all`), or none of them (`none`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogTasks {
    #[default]
    Failures,
    All,
    None,
}

impl LogTasks {
    pub(crate) const NAMES: [&'static str; 3] = ["failures", "all", "none"];

    pub fn as_str(self) -> &'static str {
        match self {
            LogTasks::Failures => "failures",
            LogTasks::All => "all",
            LogTasks::None => "none",
        }
    }

    pub fn parse(text: &str) -> Option<LogTasks> {
        match text {
            "failures" => Some(LogTasks::Failures),
            "all" => Some(LogTasks::All),
            "none" => Some(LogTasks::None),
            _ => None,
        }
    }
}

/// The name the audit trail gives the token of `token` or `token_file`.
pub(crate) const DEFAULT_TOKEN: &str = "default";

/// One API bearer token and its name (`tokens = [{ name = "ci", token_file = "…" }]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    /// `None` in a config read by a client command ([`load_as_client`]): a client never
    /// checks tokens, so it does not open token files (which may be readable by the
    /// daemon's user only).
    pub secret: Option<Secret>,
}

impl Config {
    /// Whether the API checks tokens (any is configured).
    pub(crate) fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The name of the configured token that `given` is, if any. Every token is compared,
    /// each in time independent of where the first difference is, so the answer's timing
    /// does not say which token came closest.
    pub(crate) fn token_name(&self, given: &str) -> Option<&str> {
        let mut found = None;
        for t in &self.tokens {
            if t.secret.as_ref().is_some_and(|s| s.matches(given)) {
                found = Some(t.name.as_str());
            }
        }
        found
    }
}

/// A secret string: its `Debug` never shows it, so a logged or printed config cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Compare in time independent of where the first difference is.
    pub(crate) fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= (*x ^ b.get(i).copied().unwrap_or(0)) as usize;
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where tasks live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerUrl {
    /// The embedded SQLite store; `path` is absolute.
    Sqlite { path: PathBuf },
    /// A Redis server shared by several nodes: `redis://` or `rediss://` (TLS), with an
    /// optional password and database number. Secret: the URL may hold the password.
    Redis { url: Secret },
    /// A PostgreSQL database shared by several nodes: `postgres://` or `postgresql://` with
    /// libpq's parameters and taskd's own (`schema`, `pool_size`, `statement_timeout`,
    /// `sslrootcert`; docs/postgres.md). Secret: the URL may hold the password.
    Postgres { url: Secret },
}

impl BrokerUrl {
    /// A shared broker: several daemons may use it at once.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self, BrokerUrl::Redis { .. } | BrokerUrl::Postgres { .. })
    }
}

/// `url` with its password (if any) replaced by `***`, for logs and `taskd check`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        // A user without a password (`postgres://app@db/app`, trust or a client
        // certificate): nothing to hide, and the user is worth seeing.
        None => url.to_string(),
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // An absolute path already starts with `/`, which makes the `sqlite:///` form.
            BrokerUrl::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            BrokerUrl::Redis { url } | BrokerUrl::Postgres { url } => {
                f.write_str(&redact_url(url.expose()))
            }
        }
    }
}

impl QueueConfig {
    /// Every payload field a `command` placeholder uses (empty for `shell`).
    pub(crate) fn required_fields(&self) -> BTreeSet<String> {
        match &self.program {
            Program::Command(argv) => argv
                .iter()
                .flat_map(|a| a.fields())
                .map(str::to_string)
                .collect(),
            Program::Shell(_) | Program::Worker(_) => BTreeSet::new(),
        }
    }

    /// The worker settings of a `worker` queue.
    pub(crate) fn worker(&self) -> Option<&WorkerProgram> {
        match &self.program {
            Program::Worker(w) => Some(w),
            _ => None,
        }
    }
}

/// What a queue runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// argv, executed directly; the first element is the program and holds no placeholder.
    Command(Vec<ArgTemplate>),
    /// A script for `/bin/sh -c`, run exactly as written.
    Shell(String),
    /// Long-lived worker processes fed tasks over pipes (docs/worker-protocol.md).
    Worker(WorkerProgram),
}

/// A `worker` queue's program and supervision settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerProgram {
    /// argv of each worker process, executed directly; no placeholders.
    pub argv: Vec<String>,
    /// Recycle a worker after this many tasks (`max_tasks_per_worker`).
    pub max_tasks: Option<u64>,
    /// Recycle a worker after its current task when its RSS is above this (`max_worker_memory`).
    pub max_memory: Option<u64>,
    /// A worker counts as started (RUNNING) once it is ready and alive this long (`start_secs`).
    pub start_secs: std::time::Duration,
    /// Failed starts in a row before the worker is FATAL (`start_retries`).
    pub start_retries: u32,
    /// A reload restarts the workers when their program file changed since they started
    /// (`restart_on_change`).
    pub restart_on_change: bool,
    /// One loaded parent forks the workers (`worker_fork`).
    pub fork: bool,
}

impl WorkerProgram {
    pub fn new(argv: Vec<String>) -> Self {
        WorkerProgram {
            argv,
            max_tasks: None,
            max_memory: None,
            start_secs: defaults::START_SECS,
            start_retries: defaults::START_RETRIES,
            restart_on_change: false,
            fork: false,
        }
    }
}

/// A queue's resource limits (`limits = { nofile, nproc, as, cpu, fsize, core }`). Each one
/// that is set becomes both the soft and the hard limit of the task (`setrlimit` before exec).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_NOFILE: open descriptors. Never `Unlimited` (the kernel refuses it).
    pub nofile: Option<LimitValue>,
    /// RLIMIT_NPROC: processes (threads) of the task's real user, counted system-wide.
    pub nproc: Option<LimitValue>,
    /// RLIMIT_AS (`as` in the file): address space in bytes.
    pub address_space: Option<LimitValue>,
    /// RLIMIT_CPU: CPU time in seconds; past it the task is killed by SIGXCPU/SIGKILL.
    pub cpu: Option<LimitValue>,
    /// RLIMIT_FSIZE: the largest file the task may write, in bytes (SIGXFSZ past it).
    pub fsize: Option<LimitValue>,
    /// RLIMIT_CORE: the largest core dump, in bytes (0: none).
    pub core: Option<LimitValue>,
}

impl Limits {
    /// `self`'s limits, with those it does not set taken from `lower`.
    pub(crate) fn over(&self, lower: &Limits) -> Limits {
        Limits {
            nofile: self.nofile.or(lower.nofile),
            nproc: self.nproc.or(lower.nproc),
            address_space: self.address_space.or(lower.address_space),
            cpu: self.cpu.or(lower.cpu),
            fsize: self.fsize.or(lower.fsize),
            core: self.core.or(lower.core),
        }
    }
}

/// One resource limit's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitValue {
    Finite(u64),
    /// `"unlimited"` (RLIM_INFINITY).
    Unlimited,
}

/// Whether the daemon's environment variable `name` must never reach a task, even when
/// `env_inherit` lists it (which the config refuses): the service manager's connection
/// (`NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_*`, `JOURNAL_STREAM`) belongs to the daemon, and
/// `TASKD_*` are set by taskd itself.
pub(crate) fn never_inherited(name: &str) -> bool {
    name == "NOTIFY_SOCKET"
        || name == "JOURNAL_STREAM"
        || name.starts_with("WATCHDOG_")
        || name.starts_with("LISTEN_")
        || name.to_ascii_uppercase().starts_with("TASKD_")
}

/// The built-in defaults, in one place so docs and code agree.
pub(crate) mod defaults {
    use std::time::Duration;

    pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// The shortest and longest `lease`: renewed every third, a shorter one would cost a
    /// round trip per second per node; a longer one leaves a dead node's tasks for hours.
    pub(crate) const MIN_LEASE: Duration = Duration::from_secs(3);
    pub(crate) const MAX_LEASE: Duration = Duration::from_secs(3600);
    /// The lease on a shared broker, when `lease` is not set.
    pub(crate) const SHARED_LEASE: Duration = Duration::from_secs(30);
    pub(crate) const MAX_PAYLOAD: usize = 1024 * 1024;
    pub(crate) const CONCURRENCY: usize = 1;
    pub(crate) const TIMEOUT: Duration = Duration::from_secs(30 * 60);
    pub(crate) const MAX_ATTEMPTS: u32 = 5;
    /// `max_lost`: lost runs a task may have before the next one fails it.
    pub(crate) const MAX_LOST: u32 = 3;
    /// `max_crashes`: worker deaths on one task that fail it.
    pub(crate) const MAX_CRASHES: u32 = 3;
    pub(crate) const KILL_GRACE: Duration = Duration::from_secs(10);
    pub(crate) const OUTPUT_TAIL: usize = 64 * 1024;
    pub(crate) const LOG_MAX: u64 = 10 * 1024 * 1024;
    /// `max_result`: the largest result a task may return.
    pub(crate) const MAX_RESULT: u64 = 1024 * 1024;
    /// A worker is RUNNING once it has been ready and alive this long.
    pub(crate) const START_SECS: Duration = Duration::from_secs(1);
    /// Failed starts in a row before a worker is FATAL.
    pub(crate) const START_RETRIES: u32 = 3;
    /// The daemon's environment variables every task gets (when the daemon has them);
    /// `env_inherit` adds to this list.
    pub(crate) const ENV_INHERIT: &[&str] = &[
        "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR",
    ];
    /// PATH of a task that runs as another `user` (unless the queue's `env` sets PATH), and
    /// of any task when the daemon has no PATH.
    pub(crate) const TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    /// `state_dir`'s name next to the config file when neither the file nor systemd set it.
    pub(crate) const STATE_DIR_NAME: &str = "taskd-data";
    /// The SQLite file's name inside `state_dir` when `broker` is not set.
    pub(crate) const DB_FILE_NAME: &str = "taskd.db";
    /// The control socket's file name inside the state directory, by default.
    pub(crate) const CONTROL_SOCKET_NAME: &str = "taskd.sock";
    /// How many audit records the broker keeps (the newest) when `audit_keep` is not set.
    pub(crate) const AUDIT_KEEP: usize = 100_000;
    /// How long finished tasks are kept, by how they ended (`keep_succeeded`, ...).
    pub(crate) const KEEP_SUCCEEDED: crate::model::Keep =
        crate::model::Keep::For(Duration::from_secs(7 * 86_400));
    pub(crate) const KEEP_FAILED: crate::model::Keep =
        crate::model::Keep::For(Duration::from_secs(30 * 86_400));
    pub(crate) const KEEP_CANCELLED: crate::model::Keep =
        crate::model::Keep::For(Duration::from_secs(7 * 86_400));
}

/// Limits on values, shared by the validator and its messages.
pub(crate) mod limits {
    pub(crate) const MAX_CONCURRENCY: i64 = 10_000;
    pub(crate) const MAX_ATTEMPTS: i64 = 1000;
    pub(crate) const MAX_START_RETRIES: i64 = 100;
    /// The most audit records `audit_keep` may ask the broker to keep.
    pub(crate) const MAX_AUDIT_KEEP: i64 = 10_000_000;
    /// The smallest `memory_max`.
    pub(crate) const MIN_MEMORY_MAX: u64 = 1024 * 1024;
    /// The largest `pids_max` (the kernel's `PID_MAX_LIMIT`).
    pub(crate) const MAX_PIDS: i64 = 4_194_304;
    /// The smallest `max_worker_memory`: below it no interpreter even starts.
    pub(crate) const MIN_WORKER_MEMORY: u64 = 1024 * 1024;
    pub(crate) const MAX_OUTPUT_TAIL: u64 = 16 * 1024 * 1024;
    /// The largest `max_result`: a result is stored whole with its task and sent whole by
    /// every read of the task.
    pub(crate) const MAX_RESULT: u64 = 64 * 1024 * 1024;
    /// SQLite refuses values over 1e9 bytes by default; stay well below it.
    pub(crate) const MAX_PAYLOAD: u64 = 512 * 1024 * 1024;
    /// The smallest `limits.as`: below it hardly any program can even start, and the likely
    /// cause is a number meant in KiB or MiB.
    pub(crate) const MIN_ADDRESS_SPACE: u64 = 16 * 1024 * 1024;
    /// Linux's default `fs.nr_open`, the ceiling for `limits.nofile` when
    /// `/proc/sys/fs/nr_open` cannot be read.
    pub(crate) const NR_OPEN: u64 = 1024 * 1024;
}

/// One problem in a config file, with where it is and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted path of the key, e.g. `queues.thumbnails.concurrency` (empty for syntax errors
    /// that belong to no key).
    pub key: String,
    pub message: String,
    pub fix: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: ",
            self.file.display(),
            self.line,
            self.column
        )?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n  fix: {fix}")?;
        }
        Ok(())
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", show_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
}

fn show_diagnostics(diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&d.to_string());
        out.push('\n');
    }
    let file = diags
        .first()
        .map(|d| d.file.display().to_string())
        .unwrap_or_else(|| "the config".into());
    let n = diags.len();
    let noun = if n == 1 { "error" } else { "errors" };
    out.push_str(&format!("{n} {noun} in {file}"));
    out
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(&text, path)
}

/// Reads and validates the config file at `path` for a process that only submits or
/// inspects tasks: like [`load`], but without the check that this process could run each
/// queue's tasks as its `user` and `group` (which needs root). The daemon, `taskd check`
/// and `taskd reload` use [`load`].
pub(crate) fn load_as_client(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    validate::validate_as(&text, path, std::env::var_os("STATE_DIRECTORY"), None)
        .map_err(ConfigError::Invalid)
}

/// Validates config `text` as if read from `path` (which places relative paths and names the
/// file in diagnostics; it is not read).
pub(crate) fn parse_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    validate::validate(text, path, std::env::var_os("STATE_DIRECTORY"))
        .map_err(ConfigError::Invalid)
}

#[cfg(test)]
mod tests;
