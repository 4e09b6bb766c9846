//! The second stage: walk the span-keeping TOML tree by hand, collect every problem as a
//! [`Diagnostic`], and build a [`Config`] only when there is none.
//!
//! Each reader records its own errors and returns `None` for a bad value; the caller then falls
//! back to the default, so one mistake never causes a cascade of follow-on errors.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, Key, TableLike};

use super::units::{self, DurationError};
use super::{
    defaults, limits, never_inherited, ArgTemplate, Backoff, BackoffKind, BrokerUrl, Config,
    Diagnostic, LimitValue, Limits, Program, QueueConfig, Secret,
};
use crate::model::QueueName;

type Span = Option<Range<usize>>;

const ROOT_KEYS: &[&str] = &["taskd", "defaults", "queues"];
const TASKD_KEYS: &[&str] = &[
    "broker",
    "state_dir",
    "listen",
    "shutdown_grace",
    "lease",
    "max_payload",
    "control_socket",
    "token",
    "token_file",
];
/// Keys a queue may take from `[defaults]`.
const LAYER_KEYS: &[&str] = &[
    "concurrency",
    "timeout",
    "max_attempts",
    "backoff",
    "kill_grace",
    "fail_exit_codes",
    "env",
    "cwd",
    "user",
    "group",
    "umask",
    "limits",
    "env_inherit",
    "output_tail",
    "log_output",
    "log_dir",
    "log_max",
];
/// Keys only a queue may have: what it runs, and the settings of long-lived workers.
const PROGRAM_KEYS: &[&str] = &[
    "command",
    "shell",
    "worker",
    "max_tasks_per_worker",
    "max_worker_memory",
    "start_secs",
    "start_retries",
];
/// The settings that only a `worker` queue takes.
const WORKER_KEYS: &[&str] = &[
    "max_tasks_per_worker",
    "max_worker_memory",
    "start_secs",
    "start_retries",
];
const BACKOFF_KEYS: &[&str] = &["kind", "base", "max", "jitter"];
const LIMIT_KEYS: &[&str] = &["nofile", "nproc", "as", "cpu", "fsize", "core"];

/// Who reads the config: whether tasks may run as another user depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    pub(super) euid: u32,
    pub(super) egid: u32,
}

impl Identity {
    pub(super) fn current() -> Identity {
        Identity {
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
        }
    }
}

/// Validates `text` as read from `path`. `state_directory` is `$STATE_DIRECTORY`, passed in so
/// tests need not touch the process environment.
pub(super) fn validate(
    text: &str,
    path: &Path,
    state_directory: Option<OsString>,
) -> Result<Config, Vec<Diagnostic>> {
    validate_as(text, path, state_directory, Some(Identity::current()))
}

/// [`validate`] as if read by a process with `identity`; `None` skips the check that the
/// reader could switch to each queue's `user` and `group` (a producer that only submits
/// tasks need not be root). Tests pass an identity to play a non-root daemon.
pub(super) fn validate_as(
    text: &str,
    path: &Path,
    state_directory: Option<OsString>,
    identity: Option<Identity>,
) -> Result<Config, Vec<Diagnostic>> {
    let mut cx = Cx {
        text,
        file: path.to_path_buf(),
        dir: config_dir(path),
        diags: Vec::new(),
        identity,
    };
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            cx.syntax_error(&e);
            return Err(cx.diags);
        }
    };
    let config = cx.root(doc.as_table(), state_directory);
    if cx.diags.is_empty() {
        Ok(config)
    } else {
        // Report in file order: that is how a person fixes them. A problem of a [defaults] key
        // that several queues inherit is found once per queue but reported once.
        cx.diags.sort_by(|a, b| {
            (a.line, a.column, &a.key, &a.message).cmp(&(b.line, b.column, &b.key, &b.message))
        });
        cx.diags.dedup();
        Err(cx.diags)
    }
}

/// The config file's directory, absolute.
fn config_dir(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir)
        .or_else(|_| std::path::absolute(&dir))
        .map(|p| normalize(&p))
        .unwrap_or(dir)
}

/// Drops `.` components; keeps `..`, since it may cross a symlink.
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// `p` made absolute against `dir` (the config file's directory).
fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        normalize(p)
    } else {
        normalize(&dir.join(p))
    }
}

/// Appends a key to a dotted path, quoting it when it is not a bare TOML key.
fn join_key(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

fn with_article(type_name: &str) -> String {
    let article = match type_name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    };
    format!("{article} {type_name}")
}

/// One key/value pair of a table, with its dotted path.
struct Entry<'a> {
    name: &'a str,
    key: &'a Key,
    item: &'a Item,
    path: String,
}

impl<'a> Entry<'a> {
    fn key_span(&self) -> Span {
        self.key.span().or_else(|| self.item.span())
    }

    fn value_span(&self) -> Span {
        self.item.span().or_else(|| self.key.span())
    }

    fn found(&self) -> String {
        with_article(self.item.type_name())
    }
}

fn entries<'a>(table: &'a dyn TableLike, parent: &str) -> Vec<Entry<'a>> {
    table
        .iter()
        .filter_map(|(name, _)| {
            let (key, item) = table.get_key_value(name)?;
            Some(Entry {
                name,
                key,
                item,
                path: join_key(parent, name),
            })
        })
        .collect()
}

/// Which table is being read, for unknown-key messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Root,
    Taskd,
    Defaults,
    Queue,
    Backoff,
    Limits,
}

/// The queue keys as one table (`[defaults]` or `[queues.NAME]`) sets them.
#[derive(Clone, Default)]
struct Layer {
    concurrency: Option<usize>,
    timeout: Option<Duration>,
    max_attempts: Option<u32>,
    backoff: Option<BackoffLayer>,
    kill_grace: Option<Duration>,
    fail_exit_codes: Option<Vec<i32>>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<PathBuf>,
    user: Option<Located<String>>,
    group: Option<Located<String>>,
    umask: Option<u32>,
    limits: Option<Limits>,
    env_inherit: Option<Vec<String>>,
    output_tail: Option<usize>,
    log_output: Option<bool>,
    log_dir: Option<PathBuf>,
    log_max: Option<u64>,
}

/// A value with the place it was set, for errors found only after inheritance.
#[derive(Clone)]
struct Located<T> {
    value: T,
    span: Span,
    key: String,
}

#[derive(Clone, Default)]
struct BackoffLayer {
    kind: Option<BackoffKind>,
    base: Option<Duration>,
    max: Option<Duration>,
    jitter: Option<bool>,
    /// Where to point a "base > max" error, and under which key.
    base_at: Option<(Span, String)>,
    max_at: Option<(Span, String)>,
    table_at: (Span, String),
    /// A sub-key was invalid: skip the base/max comparison, it would only repeat that error.
    broken: bool,
}

impl BackoffLayer {
    fn over(&self, lower: &Backoff) -> Backoff {
        Backoff {
            kind: self.kind.unwrap_or(lower.kind),
            base: self.base.unwrap_or(lower.base),
            max: self.max.unwrap_or(lower.max),
            jitter: self.jitter.unwrap_or(lower.jitter),
        }
    }
}

/// The queue keys with every layer applied.
#[derive(Clone)]
struct Settings {
    concurrency: usize,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    kill_grace: Duration,
    fail_exit_codes: Vec<i32>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    user: Option<Located<String>>,
    group: Option<Located<String>>,
    umask: Option<u32>,
    limits: Limits,
    env_inherit: Vec<String>,
    output_tail: usize,
    log_output: bool,
    log_dir: Option<PathBuf>,
    log_max: u64,
}

impl Settings {
    fn builtin() -> Self {
        Settings {
            concurrency: defaults::CONCURRENCY,
            timeout: defaults::TIMEOUT,
            max_attempts: defaults::MAX_ATTEMPTS,
            backoff: Backoff::default(),
            kill_grace: defaults::KILL_GRACE,
            fail_exit_codes: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            group: None,
            umask: None,
            limits: Limits::default(),
            env_inherit: Vec::new(),
            output_tail: defaults::OUTPUT_TAIL,
            log_output: false,
            log_dir: None,
            log_max: defaults::LOG_MAX,
        }
    }

    fn with(&self, layer: Layer) -> Settings {
        let mut env = self.env.clone();
        env.extend(layer.env.unwrap_or_default());
        Settings {
            concurrency: layer.concurrency.unwrap_or(self.concurrency),
            timeout: layer.timeout.unwrap_or(self.timeout),
            max_attempts: layer.max_attempts.unwrap_or(self.max_attempts),
            backoff: layer
                .backoff
                .map(|b| b.over(&self.backoff))
                .unwrap_or(self.backoff),
            kill_grace: layer.kill_grace.unwrap_or(self.kill_grace),
            fail_exit_codes: layer
                .fail_exit_codes
                .unwrap_or_else(|| self.fail_exit_codes.clone()),
            env,
            cwd: layer.cwd.or_else(|| self.cwd.clone()),
            user: layer.user.or_else(|| self.user.clone()),
            group: layer.group.or_else(|| self.group.clone()),
            umask: layer.umask.or(self.umask),
            limits: layer
                .limits
                .map(|l| l.over(&self.limits))
                .unwrap_or(self.limits),
            env_inherit: layer
                .env_inherit
                .unwrap_or_else(|| self.env_inherit.clone()),
            output_tail: layer.output_tail.unwrap_or(self.output_tail),
            log_output: layer.log_output.unwrap_or(self.log_output),
            log_dir: layer.log_dir.or_else(|| self.log_dir.clone()),
            log_max: layer.log_max.unwrap_or(self.log_max),
        }
    }
}

/// The `[taskd]` table as read.
#[derive(Default)]
struct TaskdLayer {
    broker: Option<BrokerUrl>,
    state_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    shutdown_grace: Option<Duration>,
    lease: Option<Duration>,
    max_payload: Option<usize>,
    control_socket: Option<PathBuf>,
    /// Where `listen` was written, for the "non-loopback needs a token" diagnostic.
    listen_span: Span,
    token: Option<Secret>,
}

/// The walk's context: the text (for positions), the file, and the diagnostics so far.
struct Cx<'t> {
    text: &'t str,
    file: PathBuf,
    dir: PathBuf,
    diags: Vec<Diagnostic>,
    /// Who will run the tasks; `None`: do not check privileges.
    identity: Option<Identity>,
}

impl Cx<'_> {
    /// 1-based line and character column of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn error(&mut self, span: Span, key: &str, message: impl Into<String>, fix: Option<String>) {
        let (line, column) = span.map_or((1, 1), |s| self.position(s.start));
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
            fix,
        });
    }

    fn syntax_error(&mut self, e: &toml_edit::TomlError) {
        // toml_edit's message may span several lines ("invalid table header\nduplicate key
        // ..."); the last line is the most specific.
        let lines: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let (mut key, mut message, mut fix) = (
            String::new(),
            format!("invalid TOML: {}", lines.join("; ")),
            Some(
                self.unquoted_hint(e.span())
                    .unwrap_or_else(|| "correct the TOML syntax at this position".to_string()),
            ),
        );
        if let Some((dup, table)) = lines.iter().find_map(|l| parse_duplicate(l)) {
            if table == "queues" {
                key = join_key("queues", &dup);
                message = format!("queue `{dup}` is defined twice");
                fix = Some(format!(
                    "keep one [queues.{dup}] table, or rename one of them"
                ));
            } else {
                key = join_key(&table, &dup);
                let place = if table.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in [{table}]")
                };
                message = format!("`{dup}` is set twice {place}");
                fix = Some("remove one of them".into());
            }
        }
        self.error(e.span(), &key, message, fix);
    }

    /// `timeout = 5m` is the commonest syntax error in this file: a duration or size without
    /// quotes. Spot it on the error's line and say so.
    fn unquoted_hint(&self, span: Span) -> Option<String> {
        let start = span?.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?;
        let (key, value) = line.split_once('=')?;
        let value = value.split('#').next()?.trim();
        let looks_like_unit = value.starts_with(|c: char| c.is_ascii_digit())
            && value.contains(|c: char| c.is_ascii_alphabetic())
            && !value.contains(['"', '\'']);
        looks_like_unit.then(|| {
            format!(
                "durations and sizes are strings: write `{} = \"{value}\"`",
                key.trim()
            )
        })
    }

    // ----- unknown keys and wrong types -------------------------------------------------

    fn unknown_key(&mut self, e: &Entry, section: Section, label: &str, valid: &[&str]) {
        let name = e.name;
        let (message, fix) = if TASKD_KEYS.contains(&name) && section != Section::Taskd {
            (
                format!("`{name}` belongs in [taskd], not {label}"),
                "move it under the [taskd] table".to_string(),
            )
        } else if LAYER_KEYS.contains(&name) && matches!(section, Section::Root | Section::Taskd) {
            (
                format!("`{name}` is a queue setting and does not belong {label}"),
                "move it under [defaults] (for every queue) or a [queues.NAME] table".to_string(),
            )
        } else if PROGRAM_KEYS.contains(&name) && section != Section::Queue {
            (
                format!("`{name}` belongs in a [queues.NAME] table, not {label}: each queue says what it runs"),
                "move it under the [queues.NAME] table it is for".to_string(),
            )
        } else if let Some(near) = units::closest(name, valid) {
            (
                format!("unknown key `{name}` {label}"),
                format!("did you mean `{near}`?"),
            )
        } else {
            (
                format!("unknown key `{name}` {label}"),
                format!("the keys allowed here are: {}", valid.join(", ")),
            )
        };
        self.error(e.key_span(), &e.path, message, Some(fix));
    }

    fn wrong_type(&mut self, e: &Entry, expected: &str, fix: String) {
        let message = format!("{} must be {expected}, found {}", e.name, e.found());
        self.error(e.value_span(), &e.path, message, Some(fix));
    }

    fn table<'a>(&mut self, e: &Entry<'a>, example: &str) -> Option<&'a dyn TableLike> {
        if let Some(t) = e.item.as_table_like() {
            return Some(t);
        }
        self.wrong_type(e, "a table", format!("write it as {example}"));
        None
    }

    fn string<'a>(&mut self, e: &Entry<'a>, example: &str) -> Option<&'a str> {
        if let Some(s) = e.item.as_str() {
            return Some(s);
        }
        self.wrong_type(
            e,
            "a string",
            format!("write it in quotes, such as `{} = {example}`", e.name),
        );
        None
    }

    fn integer(&mut self, e: &Entry, example: &str) -> Option<i64> {
        if let Some(n) = e.item.as_integer() {
            return Some(n);
        }
        let fix = match e.item.as_str().map(|s| s.trim().parse::<i64>()) {
            Some(Ok(n)) => format!("remove the quotes: `{} = {n}`", e.name),
            _ => format!("write a whole number, such as `{} = {example}`", e.name),
        };
        self.wrong_type(e, "an integer", fix);
        None
    }

    fn boolean(&mut self, e: &Entry) -> Option<bool> {
        if let Some(b) = e.item.as_bool() {
            return Some(b);
        }
        self.wrong_type(
            e,
            "a boolean",
            format!("write `{} = true` or `{} = false`", e.name, e.name),
        );
        None
    }

    /// An integer in `lo..=hi`.
    fn int_in_range(&mut self, e: &Entry, lo: i64, hi: i64, example: &str) -> Option<i64> {
        let n = self.integer(e, example)?;
        if n < lo {
            let message = if n < 0 {
                format!(
                    "{} cannot be negative (found {n}); it must be at least {lo}",
                    e.name
                )
            } else {
                format!("{} must be at least {lo}, found {n}", e.name)
            };
            let fix = format!("set `{} = {lo}` or more", e.name);
            self.error(e.value_span(), &e.path, message, Some(fix));
            return None;
        }
        if n > hi {
            let message = format!("{} must be at most {hi}, found {n}", e.name);
            let fix = format!("set `{} = {hi}` or less", e.name);
            self.error(e.value_span(), &e.path, message, Some(fix));
            return None;
        }
        Some(n)
    }

    fn duration(&mut self, e: &Entry) -> Option<Duration> {
        let name = e.name;
        let Some(s) = e.item.as_str() else {
            let fix = match e.item.as_integer() {
                Some(n) if n > 0 => format!("a duration needs a unit: write `{name} = \"{n}s\"`"),
                _ => format!("write a duration in quotes, such as `{name} = \"30s\"`"),
            };
            self.wrong_type(e, "a duration string such as \"30s\"", fix);
            return None;
        };
        match units::parse_positive_duration(s) {
            Ok(d) => Some(d),
            Err(err) => {
                let (message, fix) = match err {
                    DurationError::Negative => (
                        format!("{name} cannot be negative (found \"{s}\")"),
                        format!("write a positive duration, such as `{name} = \"30s\"`"),
                    ),
                    DurationError::Zero => (
                        format!("{name} must be longer than zero"),
                        format!("write a positive duration, such as `{name} = \"30s\"`"),
                    ),
                    DurationError::TooLong => (
                        format!(
                            "{name} is too long (\"{s}\"); the longest accepted is {}",
                            units::show_duration(units::MAX_DURATION)
                        ),
                        format!("write a shorter duration, such as `{name} = \"1h\"`"),
                    ),
                    DurationError::Unparsable(why) => (
                        format!("\"{s}\" is not a duration: {why}"),
                        "write a number and a unit, such as \"90s\", \"2m\", \"1h 30m\" or \"1d\""
                            .to_string(),
                    ),
                };
                self.error(e.value_span(), &e.path, message, Some(fix));
                None
            }
        }
    }

    /// A byte size (integer bytes or a string like "512KiB") in `min..=max`.
    fn size(&mut self, e: &Entry, min: u64, max: u64, example: &str) -> Option<u64> {
        let name = e.name;
        let parsed = if let Some(n) = e.item.as_integer() {
            u64::try_from(n).map_err(|_| format!("{name} cannot be negative (found {n})"))
        } else if let Some(s) = e.item.as_str() {
            units::parse_size(s).map_err(|why| format!("{name}: {why}"))
        } else {
            self.wrong_type(
                e,
                "a size (bytes, or a string such as \"512KiB\")",
                format!("write `{name} = \"{example}\"`"),
            );
            return None;
        };
        let n = match parsed {
            Ok(n) => n,
            Err(message) => {
                let fix = format!(
                    "write a whole number of bytes or a size such as `{name} = \"{example}\"` (units: {})",
                    units::SIZE_UNITS
                );
                self.error(e.value_span(), &e.path, message, Some(fix));
                return None;
            }
        };
        if n < min {
            let message = if min == 1 {
                format!("{name} must be more than zero")
            } else {
                format!("{name} must be at least {}", units::show_size(min))
            };
            let fix = format!("write a size such as `{name} = \"{example}\"`");
            self.error(e.value_span(), &e.path, message, Some(fix));
            return None;
        }
        if n > max {
            let message = format!(
                "{name} is too large ({}); the most accepted is {}",
                units::show_size(n),
                units::show_size(max)
            );
            let fix = format!("write `{name} = \"{}\"` or less", units::show_size(max));
            self.error(e.value_span(), &e.path, message, Some(fix));
            return None;
        }
        Some(n)
    }

    /// A path relative to the config file's directory (or absolute), made absolute.
    fn path(&mut self, e: &Entry, example: &str) -> Option<PathBuf> {
        let s = self.string(e, &format!("\"{example}\""))?;
        let name = e.name;
        let problem = if s.trim().is_empty() {
            Some(format!("{name} cannot be empty"))
        } else if s.contains('\0') {
            Some(format!("{name} cannot contain a NUL byte"))
        } else if s.starts_with('~') {
            Some(format!(
                "{name} starts with `~`, which taskd does not expand"
            ))
        } else if s.starts_with('$') {
            Some(format!(
                "{name} starts with `$`, and taskd does not expand environment variables"
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            let fix = format!(
                "write an absolute path such as `{name} = \"{example}\"`, or one relative to the config file's directory"
            );
            self.error(e.value_span(), &e.path, message, Some(fix));
            return None;
        }
        Some(resolve(&self.dir, Path::new(s)))
    }

    // ----- sections ----------------------------------------------------------------------

    fn root(&mut self, root: &dyn TableLike, state_directory: Option<OsString>) -> Config {
        let mut taskd = TaskdLayer::default();
        let mut defaults_layer = None;
        let mut queue_tables = Vec::new();
        for e in entries(root, "") {
            match e.name {
                "taskd" => {
                    if let Some(t) = self.table(&e, "a [taskd] table") {
                        taskd = self.taskd(t, &e.path);
                    }
                }
                "defaults" => {
                    if let Some(t) = self.table(&e, "a [defaults] table") {
                        defaults_layer = Some(self.layer(t, &e.path, Section::Defaults).0);
                    }
                }
                "queues" => {
                    if e.item.is_array_of_tables() {
                        self.error(
                            e.key_span(),
                            &e.path,
                            "queues must be named tables such as [queues.thumbnails], not [[queues]]",
                            Some("write one [queues.NAME] table per queue".into()),
                        );
                    } else if let Some(t) = self.table(&e, "[queues.NAME] tables") {
                        queue_tables = entries(t, &e.path);
                    }
                }
                _ => self.unknown_key(&e, Section::Root, "at the top level", ROOT_KEYS),
            }
        }

        let mut base = Settings::builtin();
        if let Some(layer) = defaults_layer {
            let backoff = layer.backoff.clone();
            base = base.with(layer);
            if let Some(b) = backoff {
                self.check_backoff(&b, &base.backoff);
            }
        }

        let mut queues = BTreeMap::new();
        for e in &queue_tables {
            if let Some(q) = self.queue(e, &base) {
                queues.insert(q.name.clone(), q);
            }
        }

        let state_dir = taskd.state_dir.unwrap_or_else(|| {
            let from_systemd = state_directory.and_then(|v| {
                let v = v.to_string_lossy().into_owned();
                let first = v.split(':').next().unwrap_or("").to_string();
                (!first.is_empty()).then(|| PathBuf::from(first))
            });
            match from_systemd {
                Some(p) => std::path::absolute(&p).map(|p| normalize(&p)).unwrap_or(p),
                None => self.dir.join(defaults::STATE_DIR_NAME),
            }
        });
        let broker = taskd.broker.unwrap_or_else(|| BrokerUrl::Sqlite {
            path: state_dir.join(defaults::DB_FILE_NAME),
        });
        let control_socket = taskd
            .control_socket
            .unwrap_or_else(|| state_dir.join(defaults::CONTROL_SOCKET_NAME));
        if let (Some(addr), None) = (taskd.listen, &taskd.token) {
            if !addr.ip().is_loopback() {
                self.error(
                    taskd.listen_span.clone(),
                    "taskd.listen",
                    format!("listen = \"{addr}\" is reachable from other hosts, and no API token is set: anyone could enqueue and cancel tasks"),
                    Some("set `token = \"…\"` or `token_file = \"/etc/taskd/token\"` in [taskd], or listen on a loopback address such as \"127.0.0.1:7070\"".into()),
                );
            }
        }
        Config {
            control_socket,
            path: self.file.clone(),
            broker,
            state_dir,
            listen: taskd.listen,
            token: taskd.token,
            shutdown_grace: taskd.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
            lease: taskd.lease,
            max_payload: taskd.max_payload.unwrap_or(defaults::MAX_PAYLOAD),
            queues,
        }
    }

    fn taskd(&mut self, t: &dyn TableLike, path: &str) -> TaskdLayer {
        let mut out = TaskdLayer::default();
        for e in entries(t, path) {
            match e.name {
                "broker" => {
                    if let Some(s) = self.string(&e, "\"sqlite:///var/lib/taskd/taskd.db\"") {
                        match parse_broker(s, &self.dir) {
                            Ok(b) => out.broker = Some(b),
                            Err((message, fix)) => {
                                self.error(e.value_span(), &e.path, message, Some(fix))
                            }
                        }
                    }
                }
                "state_dir" => out.state_dir = self.path(&e, "/var/lib/taskd"),
                "listen" => {
                    out.listen_span = e.value_span();
                    if let Some(s) = self.string(&e, "\"127.0.0.1:7070\"") {
                        match s.trim().parse::<SocketAddr>() {
                            Ok(a) => out.listen = Some(a),
                            Err(_) => self.error(
                                e.value_span(),
                                &e.path,
                                format!("\"{s}\" is not an IP address and port"),
                                Some(
                                    "write an address and port such as \"127.0.0.1:7070\" or \"[::1]:7070\" (host names are not accepted)"
                                        .into(),
                                ),
                            ),
                        }
                    }
                }
                "shutdown_grace" => out.shutdown_grace = self.duration(&e),
                "lease" => {
                    // A lease past a year is refused by the duration parser as well; the
                    // message must give the lease's own bounds, not the parser's.
                    let over_a_year = e.item.as_str().map(units::parse_positive_duration)
                        == Some(Err(DurationError::TooLong));
                    let d = if over_a_year { None } else { self.duration(&e) };
                    match (d, over_a_year) {
                        (Some(d), _)
                            if (defaults::MIN_LEASE..=defaults::MAX_LEASE).contains(&d) =>
                        {
                            out.lease = Some(d)
                        }
                        (Some(_), _) | (None, true) => self.error(
                            e.value_span(),
                            &e.path,
                            format!(
                                "lease must be between {} and {} (found {})",
                                units::show_duration(defaults::MIN_LEASE),
                                units::show_duration(defaults::MAX_LEASE),
                                e.item
                                    .as_str()
                                    .map_or_else(String::new, |s| format!("\"{s}\""))
                            ),
                            Some(
                                "write `lease = \"30s\"`, or remove it for the broker's default"
                                    .into(),
                            ),
                        ),
                        _ => {}
                    }
                }
                "control_socket" => {
                    out.control_socket = self.path(&e, "/run/taskd/taskd.sock");
                    if let Some(p) = &out.control_socket {
                        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
                        // sun_path holds 108 bytes with its terminating NUL.
                        if p.as_os_str().len() > 107 {
                            self.error(
                                e.value_span(),
                                &e.path,
                                format!("the path is {} bytes long; a Unix socket path must be at most 107", p.as_os_str().len()),
                                Some("choose a shorter path, such as \"/run/taskd/taskd.sock\"".into()),
                            );
                        } else if let Some(dir) = dir.filter(|d| !d.is_dir()) {
                            // The daemon binds the socket at start; a missing directory
                            // would only show then, after a restart loop under systemd.
                            self.error(
                                e.value_span(),
                                &e.path,
                                format!("the directory {} of the control socket does not exist", dir.display()),
                                Some(format!("create {} (under systemd: `RuntimeDirectory=taskd` and `RuntimeDirectoryPreserve=yes`), or remove `control_socket` for the default in state_dir", dir.display())),
                            );
                        }
                    }
                }
                "max_payload" => {
                    out.max_payload = self
                        .size(&e, 1, limits::MAX_PAYLOAD, "1MiB")
                        .and_then(|n| usize::try_from(n).ok())
                }
                "token" => {
                    if let Some(s) = self.string(&e, "\"a-long-random-string\"") {
                        if let Some(t) = self.token(&e, s, "token") {
                            self.set_token(&e, &mut out, t);
                        }
                    }
                }
                "token_file" => {
                    if let Some(p) = self.path(&e, "/etc/taskd/token") {
                        match std::fs::read_to_string(&p) {
                            Ok(text) => {
                                if let Some(t) = self.token(&e, text.trim(), "token_file") {
                                    self.set_token(&e, &mut out, t);
                                }
                            }
                            Err(err) => self.error(
                                e.value_span(),
                                &e.path,
                                format!("failed to read the token file {}: {err}", p.display()),
                                Some("create the file with the token on one line, readable by the daemon's user only (mode 0600)".into()),
                            ),
                        }
                    }
                }
                _ => self.unknown_key(&e, Section::Taskd, "in [taskd]", TASKD_KEYS),
            }
        }
        out
    }

    /// Checks an API token's text (never echoed in a diagnostic: it is a secret).
    fn token(&mut self, e: &Entry, text: &str, what: &str) -> Option<Secret> {
        let problem = if text.len() < 16 {
            Some(format!(
                "the {what} holds a token of {} characters; at least 16 are needed",
                text.len()
            ))
        } else if text.chars().any(|c| !c.is_ascii_graphic()) {
            Some(format!("the {what} holds a token with spaces or characters outside printable ASCII, which an HTTP header cannot carry"))
        } else {
            None
        };
        match problem {
            Some(message) => {
                self.error(
                    e.value_span(),
                    &e.path,
                    message,
                    Some("generate one with `head -c 32 /dev/urandom | base64`".into()),
                );
                None
            }
            None => Some(Secret::new(text.to_string())),
        }
    }

    fn set_token(&mut self, e: &Entry, out: &mut TaskdLayer, t: Secret) {
        if out.token.is_some() {
            self.error(
                e.key_span(),
                &e.path,
                "both `token` and `token_file` are set",
                Some(
                    "keep one of them (token_file keeps the secret out of the config file)".into(),
                ),
            );
        }
        out.token = Some(t);
    }

    /// Reads the queue keys of `[defaults]` or a queue table. In a queue table, the entries
    /// for `command`, `shell`, `worker` and `max_tasks_per_worker` are handed back unread.
    fn layer<'a>(
        &mut self,
        t: &'a dyn TableLike,
        path: &str,
        section: Section,
    ) -> (Layer, Vec<Entry<'a>>) {
        let mut layer = Layer::default();
        let mut program = Vec::new();
        let label = format!("in [{path}]");
        for e in entries(t, path) {
            match e.name {
                "concurrency" => {
                    layer.concurrency = self
                        .int_in_range(&e, 1, limits::MAX_CONCURRENCY, "4")
                        .and_then(|n| usize::try_from(n).ok())
                }
                "timeout" => layer.timeout = self.duration(&e),
                "max_attempts" => {
                    layer.max_attempts = match self.integer(&e, "5") {
                        Some(n) if n < 1 => {
                            self.error(
                                e.value_span(),
                                &e.path,
                                format!("max_attempts must be at least 1, found {n}: it counts every run, the first included"),
                                Some("set `max_attempts = 1` for no retries, or more".into()),
                            );
                            None
                        }
                        Some(n) if n > limits::MAX_ATTEMPTS => {
                            self.error(
                                e.value_span(),
                                &e.path,
                                format!("max_attempts must be at most {}, found {n}: taskd never retries without limit", limits::MAX_ATTEMPTS),
                                Some(format!("set `max_attempts = {}` or less", limits::MAX_ATTEMPTS)),
                            );
                            None
                        }
                        Some(n) => u32::try_from(n).ok(),
                        None => None,
                    }
                }
                "backoff" => layer.backoff = self.backoff(&e),
                "kill_grace" => layer.kill_grace = self.duration(&e),
                "fail_exit_codes" => layer.fail_exit_codes = self.exit_codes(&e),
                "env" => layer.env = self.env(&e),
                "cwd" => layer.cwd = self.path(&e, "/srv/app"),
                "log_dir" => layer.log_dir = self.path(&e, "/var/log/taskd"),
                "user" => layer.user = self.account(&e, Account::User),
                "group" => layer.group = self.account(&e, Account::Group),
                "umask" => layer.umask = self.umask(&e),
                "limits" => layer.limits = self.limits(&e),
                "env_inherit" => layer.env_inherit = self.env_inherit(&e),
                "output_tail" => {
                    layer.output_tail = self
                        .size(&e, 0, limits::MAX_OUTPUT_TAIL, "64KiB")
                        .and_then(|n| usize::try_from(n).ok())
                }
                "log_max" => layer.log_max = self.size(&e, 1, u64::MAX, "10MiB"),
                "log_output" => layer.log_output = self.boolean(&e),
                name if section == Section::Queue && PROGRAM_KEYS.contains(&name) => {
                    program.push(e)
                }
                _ => {
                    let mut valid = LAYER_KEYS.to_vec();
                    if section == Section::Queue {
                        valid.extend(PROGRAM_KEYS);
                    }
                    self.unknown_key(&e, section, &label, &valid)
                }
            }
        }
        (layer, program)
    }

    fn backoff(&mut self, e: &Entry) -> Option<BackoffLayer> {
        let t = self.table(
            e,
            "a table such as `backoff = { kind = \"exponential\", base = \"10s\", max = \"1h\", jitter = true }`",
        )?;
        let mut out = BackoffLayer {
            table_at: (e.value_span(), e.path.clone()),
            ..BackoffLayer::default()
        };
        for sub in entries(t, &e.path) {
            match sub.name {
                "kind" => {
                    let Some(s) = self.string(&sub, "\"exponential\"") else {
                        out.broken = true;
                        continue;
                    };
                    out.kind = match s {
                        "exponential" => Some(BackoffKind::Exponential),
                        "fixed" => Some(BackoffKind::Fixed),
                        other => {
                            let fix = match units::closest(other, &["exponential", "fixed"]) {
                                Some(near) => format!("did you mean `kind = \"{near}\"`?"),
                                None => {
                                    "write `kind = \"exponential\"` or `kind = \"fixed\"`".into()
                                }
                            };
                            self.error(
                                sub.value_span(),
                                &sub.path,
                                format!("unknown backoff kind \"{other}\" (expected \"exponential\" or \"fixed\")"),
                                Some(fix),
                            );
                            out.broken = true;
                            None
                        }
                    };
                }
                "base" => {
                    out.base = self.duration(&sub);
                    out.broken |= out.base.is_none();
                    out.base_at = Some((sub.value_span(), sub.path.clone()));
                }
                "max" => {
                    out.max = self.duration(&sub);
                    out.broken |= out.max.is_none();
                    out.max_at = Some((sub.value_span(), sub.path.clone()));
                }
                "jitter" => {
                    out.jitter = self.boolean(&sub);
                    out.broken |= out.jitter.is_none();
                }
                _ => {
                    let label = format!("in {}", e.path);
                    self.unknown_key(&sub, Section::Backoff, &label, BACKOFF_KEYS)
                }
            }
        }
        Some(out)
    }

    /// Reports `base > max` once, in the table whose `backoff` produced it. `merged` is the
    /// policy that table ends up with after inheritance.
    fn check_backoff(&mut self, layer: &BackoffLayer, merged: &Backoff) {
        if layer.broken || merged.base <= merged.max {
            return;
        }
        let (span, key) = layer
            .base_at
            .clone()
            .or_else(|| layer.max_at.clone())
            .unwrap_or_else(|| layer.table_at.clone());
        let default_note = |set: bool| if set { "" } else { ", inherited" };
        let message = format!(
            "backoff base ({}{}) is longer than max ({}{})",
            units::show_duration(merged.base),
            default_note(layer.base.is_some()),
            units::show_duration(merged.max),
            default_note(layer.max.is_some()),
        );
        let fix = format!(
            "set `base` to {} or less, or raise `max`",
            units::show_duration(merged.max)
        );
        self.error(span, &key, message, Some(fix));
    }

    fn exit_codes(&mut self, e: &Entry) -> Option<Vec<i32>> {
        let Some(array) = e.item.as_array() else {
            self.wrong_type(
                e,
                "an array of exit codes",
                "write a list such as `fail_exit_codes = [2, 64]`".into(),
            );
            return None;
        };
        let mut codes = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", e.path);
            match v.as_integer() {
                Some(0) => {
                    self.error(
                        v.span(),
                        &key,
                        "exit code 0 means success and cannot be a failure code",
                        Some("remove 0 from fail_exit_codes".into()),
                    );
                    ok = false;
                }
                Some(n @ 1..=255) => {
                    let n = n as i32; // 1..=255 fits
                    if !codes.contains(&n) {
                        codes.push(n);
                    }
                }
                Some(n) => {
                    self.error(
                        v.span(),
                        &key,
                        format!("exit code {n} is impossible: exit codes are 1 to 255"),
                        Some("use codes from 1 to 255".into()),
                    );
                    ok = false;
                }
                None => {
                    self.error(
                        v.span(),
                        &key,
                        format!(
                            "fail_exit_codes must hold integers, found {}",
                            with_article(v.type_name())
                        ),
                        Some("write a list such as `fail_exit_codes = [2, 64]`".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(codes)
    }

    fn env(&mut self, e: &Entry) -> Option<BTreeMap<String, String>> {
        let t = self.table(
            e,
            "a table such as `env = { REPORT_DIR = \"/srv/reports\" }`",
        )?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for var in entries(t, &e.path) {
            let name = var.name;
            if let Err(why) = check_env_name(name) {
                self.error(var.key_span(), &var.path, why.0, Some(why.1));
                ok = false;
                continue;
            }
            let Some(value) = var.item.as_str() else {
                let fix = match var
                    .item
                    .as_value()
                    .filter(|v| !v.is_array() && !v.is_inline_table())
                {
                    Some(v) => format!(
                        "write the value as a string: `{name} = \"{}\"`",
                        v.to_string().trim()
                    ),
                    None => format!("write the value as a string, such as `{name} = \"value\"`"),
                };
                self.error(
                    var.value_span(),
                    &var.path,
                    format!("environment values must be strings, found {}", var.found()),
                    Some(fix),
                );
                ok = false;
                continue;
            };
            if value.contains('\0') {
                self.error(
                    var.value_span(),
                    &var.path,
                    "an environment value cannot contain a NUL byte",
                    Some("remove the \\u0000 from the value".into()),
                );
                ok = false;
                continue;
            }
            out.insert(name.to_string(), value.to_string());
        }
        ok.then_some(out)
    }

    fn account(&mut self, e: &Entry, kind: Account) -> Option<Located<String>> {
        let s = self.string(e, "\"taskd\"")?;
        let what = kind.as_str();
        if s.is_empty() {
            self.error(
                e.value_span(),
                &e.path,
                format!("{what} cannot be empty"),
                Some(format!("name an existing {what}, or remove `{}`", e.name)),
            );
            return None;
        }
        let found = match kind {
            Account::User => nix::unistd::User::from_name(s).map(|u| u.is_some()),
            Account::Group => nix::unistd::Group::from_name(s).map(|g| g.is_some()),
        };
        match found {
            Ok(true) => Some(Located {
                value: s.to_string(),
                span: e.value_span(),
                key: e.path.clone(),
            }),
            Ok(false) => {
                let fix = match kind {
                    Account::User => format!(
                        "create the user (`useradd --system {s}`), or remove `user` to run tasks as taskd's own user"
                    ),
                    Account::Group => format!(
                        "create the group (`groupadd --system {s}`), or remove `group` to use the user's primary group"
                    ),
                };
                self.error(
                    e.value_span(),
                    &e.path,
                    format!("{what} `{s}` does not exist on this system"),
                    Some(fix),
                );
                None
            }
            Err(errno) => {
                self.error(
                    e.value_span(),
                    &e.path,
                    format!("failed to look up {what} `{s}`: {errno}"),
                    Some(format!("check that the {what} database (NSS) is reachable")),
                );
                None
            }
        }
    }

    /// `umask`: a string of octal digits ("027", "0o027") or an integer; an integer must be
    /// written in octal (`0o027`) unless it is 0, since `umask = 27` is almost surely meant
    /// as 027 and would silently be 033.
    fn umask(&mut self, e: &Entry) -> Option<u32> {
        let name = e.name;
        let example = format!("write it as an octal string such as `{name} = \"027\"`");
        let value = if let Some(n) = e.item.as_integer() {
            let raw = e
                .value_span()
                .and_then(|s| self.text.get(s))
                .unwrap_or("")
                .trim();
            let radix_literal = ["0o", "0x", "0b"].iter().any(|p| raw.starts_with(p));
            if n != 0 && !radix_literal {
                let digits = n.to_string();
                let fix = if n > 0 && digits.chars().all(|c| ('0'..='7').contains(&c)) {
                    format!("write `{name} = \"{digits:0>3}\"` (octal)")
                } else {
                    example
                };
                self.error(
                    e.value_span(),
                    &e.path,
                    format!("umask {n} is a decimal number, but a umask is written in octal"),
                    Some(fix),
                );
                return None;
            }
            n
        } else if let Some(s) = e.item.as_str() {
            let t = s.trim();
            let digits = t.strip_prefix("0o").unwrap_or(t);
            let parsed = if !digits.is_empty()
                && digits.len() <= 6
                && digits.chars().all(|c| ('0'..='7').contains(&c))
            {
                i64::from_str_radix(digits, 8).ok()
            } else {
                None
            };
            let Some(n) = parsed else {
                self.error(
                    e.value_span(),
                    &e.path,
                    format!("\"{s}\" is not a umask: it must be octal digits (0 to 7)"),
                    Some(example),
                );
                return None;
            };
            n
        } else {
            self.wrong_type(e, "an octal string such as \"027\"", example);
            return None;
        };
        if !(0..=0o777).contains(&value) {
            self.error(
                e.value_span(),
                &e.path,
                format!(
                    "umask {value:o} (octal) is out of range: a umask holds permission bits only, 000 to 777"
                ),
                Some(example),
            );
            return None;
        }
        u32::try_from(value).ok()
    }

    /// `limits = { nofile, nproc, as, cpu, fsize, core }`.
    fn limits(&mut self, e: &Entry) -> Option<Limits> {
        let t = self.table(
            e,
            "a table such as `limits = { nofile = 4096, nproc = 100, as = \"4GiB\", cpu = \"10m\" }`",
        )?;
        let mut out = Limits::default();
        for sub in entries(t, &e.path) {
            match sub.name {
                "nofile" => out.nofile = self.limit_count(&sub, nr_open(), false),
                "nproc" => out.nproc = self.limit_count(&sub, i64::MAX as u64, true),
                "as" => {
                    out.address_space = self.limit_size(&sub, limits::MIN_ADDRESS_SPACE, "4GiB")
                }
                "fsize" => out.fsize = self.limit_size(&sub, 0, "1GiB"),
                "core" => out.core = self.limit_size(&sub, 0, "0"),
                "cpu" => out.cpu = self.limit_cpu(&sub),
                "memory" | "mem" | "rss" | "vmem" | "memlock" => self.error(
                    sub.key_span(),
                    &sub.path,
                    format!("unknown key `{}` in {}", sub.name, e.path),
                    Some("limit memory with `as` (address space), such as `as = \"4GiB\"`".into()),
                ),
                _ => {
                    let label = format!("in {}", e.path);
                    self.unknown_key(&sub, Section::Limits, &label, LIMIT_KEYS)
                }
            }
        }
        Some(out)
    }

    /// The string forms every limit shares: `"unlimited"`, and a refused `"soft:hard"` pair.
    /// `Err(())`: an error was reported. `Ok(None)`: not one of them; read the value itself.
    fn limit_word(&mut self, e: &Entry, unlimited_ok: bool) -> Result<Option<LimitValue>, ()> {
        let Some(s) = e.item.as_str() else {
            return Ok(None);
        };
        let name = e.name;
        if s.contains(':') {
            let soft = s.split(':').next().unwrap_or("").trim();
            self.error(
                e.value_span(),
                &e.path,
                format!("\"{s}\" looks like a soft:hard pair, which taskd does not take: one value sets both the soft and the hard limit"),
                Some(format!("write one value, such as `{name} = {}`", quote_unless_number(soft))),
            );
            return Err(());
        }
        if s.trim().eq_ignore_ascii_case("unlimited") {
            if unlimited_ok {
                return Ok(Some(LimitValue::Unlimited));
            }
            self.error(
                e.value_span(),
                &e.path,
                format!(
                    "{name} cannot be unlimited: the kernel caps open files at fs.nr_open ({})",
                    nr_open()
                ),
                Some(format!("write a number, such as `{name} = 65536`")),
            );
            return Err(());
        }
        Ok(None)
    }

    /// A count limit (`nofile`, `nproc`): an integer from 1 to `max`, or `"unlimited"`.
    fn limit_count(&mut self, e: &Entry, max: u64, unlimited_ok: bool) -> Option<LimitValue> {
        match self.limit_word(e, unlimited_ok) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        let example = if e.name == "nofile" { "4096" } else { "100" };
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.int_in_range(e, 1, max, example)
            .map(|n| LimitValue::Finite(n as u64)) // 1..=max: positive
    }

    /// A byte-size limit (`as`, `fsize`, `core`): bytes, a size string, or `"unlimited"`.
    fn limit_size(&mut self, e: &Entry, min: u64, example: &str) -> Option<LimitValue> {
        match self.limit_word(e, true) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        // u64::MAX is RLIM_INFINITY: a finite limit stays below it.
        self.size(e, min, u64::MAX - 1, example)
            .map(LimitValue::Finite)
    }

    /// `cpu`: whole seconds, as an integer or a duration string, or `"unlimited"`.
    fn limit_cpu(&mut self, e: &Entry) -> Option<LimitValue> {
        match self.limit_word(e, true) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        if e.item.is_integer() {
            return self
                .int_in_range(e, 1, i64::MAX, "60")
                .map(|n| LimitValue::Finite(n as u64)); // positive
        }
        if !e.item.is_str() {
            self.wrong_type(
                e,
                "seconds (an integer) or a duration string such as \"10m\"",
                "write `cpu = 600` or `cpu = \"10m\"`".into(),
            );
            return None;
        }
        let d = self.duration(e)?;
        if d.subsec_nanos() != 0 {
            self.error(
                e.value_span(),
                &e.path,
                format!(
                    "cpu time is limited in whole seconds, and {} is not",
                    units::show_duration(d)
                ),
                Some(format!("write `cpu = \"{}s\"`", d.as_secs() + 1)),
            );
            return None;
        }
        Some(LimitValue::Finite(d.as_secs()))
    }

    /// `env_inherit = ["LANG", "TZ"]`: names of the daemon's variables tasks get.
    fn env_inherit(&mut self, e: &Entry) -> Option<Vec<String>> {
        let example =
            "write a list of variable names such as `env_inherit = [\"LC_TIME\", \"http_proxy\"]`";
        let Some(array) = e.item.as_array() else {
            self.wrong_type(e, "an array of variable names", example.into());
            return None;
        };
        let mut out: Vec<String> = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", e.path);
            let Some(name) = v.as_str() else {
                self.error(
                    v.span(),
                    &key,
                    format!(
                        "env_inherit must hold variable names as strings, found {}",
                        with_article(v.type_name())
                    ),
                    Some(example.into()),
                );
                ok = false;
                continue;
            };
            let problem = if never_inherited(name) {
                let why = if name.to_ascii_uppercase().starts_with("TASKD_") {
                    "taskd sets the TASKD_ variables of a task itself"
                } else {
                    "it belongs to the daemon's own connection to its service manager (systemd), and a task that used it would speak for the daemon"
                };
                Some((
                    format!("`{name}` is never passed to tasks: {why}"),
                    format!("remove \"{name}\" from env_inherit"),
                ))
            } else if name.contains('*') {
                Some((
                    format!("env_inherit takes exact variable names; the pattern `{name}` is not supported"),
                    "list each variable by name, such as \"LC_TIME\"".to_string(),
                ))
            } else {
                check_env_name(name).err()
            };
            if let Some((message, fix)) = problem {
                self.error(v.span(), &key, message, Some(fix));
                ok = false;
                continue;
            }
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
        ok.then_some(out)
    }

    /// Could the daemon run this queue's tasks as its `user` and `group`? Only root can
    /// switch; a daemon that is not root may only name itself.
    fn check_privileges(&mut self, s: &Settings) {
        let Some(id) = self.identity else { return };
        if id.euid == 0 || (s.user.is_none() && s.group.is_none()) {
            return;
        }
        let me = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id.euid)) {
            Ok(Some(u)) => format!("`{}` (uid {})", u.name, id.euid),
            _ => format!("uid {}", id.euid),
        };
        // The group the task would get, and the key that decides it.
        let mut target: Option<(u32, String, &Located<String>)> = None;
        if let Some(u) = &s.user {
            // An unknown user was reported where it was read.
            let Ok(Some(pw)) = nix::unistd::User::from_name(&u.value) else {
                return;
            };
            if pw.uid.as_raw() != id.euid {
                self.error(
                    u.span.clone(),
                    &u.key,
                    format!(
                        "tasks cannot run as user `{}`: taskd runs as {me}, not root, and the daemon must run as root to switch users",
                        u.value
                    ),
                    Some("run taskd as root (its systemd unit does), or remove `user` to run the tasks as taskd's own user".into()),
                );
                return;
            }
            let primary = nix::unistd::Group::from_gid(pw.gid)
                .ok()
                .flatten()
                .map_or_else(|| pw.gid.to_string(), |g| g.name);
            target = Some((pw.gid.as_raw(), primary, u));
        }
        if let Some(g) = &s.group {
            let Ok(Some(gr)) = nix::unistd::Group::from_name(&g.value) else {
                return;
            };
            target = Some((gr.gid.as_raw(), gr.name, g));
        }
        if let Some((gid, name, at)) = target {
            if gid != id.egid {
                self.error(
                    at.span.clone(),
                    &at.key,
                    format!(
                        "tasks cannot run with group `{name}`: taskd runs as {me} with group id {}, not root, and the daemon must run as root to switch groups",
                        id.egid
                    ),
                    Some("run taskd as root (its systemd unit does), or remove `group`".into()),
                );
            }
        }
    }

    fn queue(&mut self, e: &Entry, base: &Settings) -> Option<QueueConfig> {
        // `taskd submit -rf` reads a leading `-` as a flag (and after `--` as argv): such a
        // queue could never be addressed from the command line.
        let name = match QueueName::try_from(e.name.to_string()).and_then(|n| {
            if n.as_str().starts_with('-') {
                Err(
                    "a queue name cannot start with `-`, which the command line reads as an option"
                        .into(),
                )
            } else {
                Ok(n)
            }
        }) {
            Ok(n) => Some(n),
            Err(why) => {
                self.error(
                    e.key_span(),
                    &e.path,
                    format!("`{}` cannot be a queue name: {why}", e.name),
                    Some(format!(
                        "rename it, e.g. [queues.{}]",
                        suggest_queue_name(e.name)
                    )),
                );
                None
            }
        };
        let Some(t) = e.item.as_table_like() else {
            self.error(
                e.value_span(),
                &e.path,
                format!("queue `{}` must be a table, found {}", e.name, e.found()),
                Some(format!(
                    "write a [queues.{}] table with `command` or `shell`",
                    suggest_queue_name(e.name)
                )),
            );
            return None;
        };
        let (layer, program_entries) = self.layer(t, &e.path, Section::Queue);
        let backoff = layer.backoff.clone();
        let settings = base.with(layer);
        if let Some(b) = backoff {
            self.check_backoff(&b, &settings.backoff);
        }
        self.check_privileges(&settings);
        let program = self.program(e, &program_entries);
        let (name, program) = (name?, program?);
        Some(QueueConfig {
            name,
            concurrency: settings.concurrency,
            program,
            timeout: settings.timeout,
            max_attempts: settings.max_attempts,
            backoff: settings.backoff,
            kill_grace: settings.kill_grace,
            fail_exit_codes: settings.fail_exit_codes,
            env: settings.env,
            cwd: settings.cwd,
            user: settings.user.map(|u| u.value),
            group: settings.group.map(|g| g.value),
            umask: settings.umask,
            limits: settings.limits,
            env_inherit: settings.env_inherit,
            output_tail: settings.output_tail,
            log_output: settings.log_output,
            log_dir: settings.log_dir,
            log_max: settings.log_max,
        })
    }

    /// Exactly one of `command`, `shell` and `worker`; the worker settings only with `worker`.
    fn program(&mut self, queue: &Entry, found: &[Entry]) -> Option<Program> {
        let mut chosen: Option<&Entry> = None;
        let mut worker_keys: Vec<&Entry> = Vec::new();
        let mut ok = true;
        for e in found {
            if WORKER_KEYS.contains(&e.name) {
                worker_keys.push(e);
                continue;
            }
            if let Some(first) = chosen {
                self.error(
                    e.key_span(),
                    &e.path,
                    format!(
                        "a queue runs one of `command`, `shell` or `worker`, but queue `{}` sets both `{}` and `{}`",
                        queue.name, first.name, e.name
                    ),
                    Some(format!("remove `{}` or `{}`", first.name, e.name)),
                );
                ok = false;
            } else {
                chosen = Some(e);
            }
        }
        let Some(e) = chosen else {
            self.error(
                queue.value_span(),
                &queue.path,
                format!(
                    "queue `{}` has nothing to run: it needs `command`, `shell` or `worker`",
                    queue.name
                ),
                Some(
                    "add `command = [\"/path/to/program\", \"{field}\"]`, `shell = \"...\"` or `worker = [\"/path/to/worker\"]`"
                        .into(),
                ),
            );
            return None;
        };
        if e.name != "worker" {
            for w in &worker_keys {
                self.error(
                    w.key_span(),
                    &w.path,
                    format!(
                        "`{}` applies to long-lived workers, but queue `{}` runs `{}`",
                        w.name, queue.name, e.name
                    ),
                    Some(format!(
                        "remove `{}`, or replace `{}` with `worker = [\"/path/to/worker\"]`",
                        w.name, e.name
                    )),
                );
                ok = false;
            }
        }
        let program = match e.name {
            "command" => self.command(e),
            "shell" => self.shell(e),
            _ => self.worker(e, &worker_keys),
        };
        if ok {
            program
        } else {
            None
        }
    }

    /// `worker = [argv]` and its settings.
    fn worker(&mut self, e: &Entry, settings: &[&Entry]) -> Option<Program> {
        let example = "write an argv list such as `worker = [\"python3\", \"/srv/app/worker.py\"]`";
        let Some(array) = e.item.as_array() else {
            self.wrong_type(e, "an array of strings", example.into());
            return None;
        };
        let mut argv = Vec::new();
        let mut ok = true;
        if array.is_empty() {
            self.error(
                e.value_span(),
                &e.path,
                "worker is empty: it needs at least the program to run",
                Some(example.into()),
            );
            ok = false;
        }
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", e.path);
            let problem = match v.as_str() {
                None => Some((
                    format!(
                        "worker elements must be strings, found {}",
                        with_article(v.type_name())
                    ),
                    "put the element in quotes",
                )),
                Some(s) if s.contains('\0') => Some((
                    "a worker element cannot contain a NUL byte".to_string(),
                    "remove the \\u0000",
                )),
                Some(s) if i == 0 && s.trim().is_empty() => Some((
                    "the program name (the first element of worker) is empty".to_string(),
                    "put the program's path first, such as \"/usr/local/bin/my-worker\"",
                )),
                Some(s) => {
                    argv.push(s.to_string());
                    None
                }
            };
            if let Some((message, fix)) = problem {
                self.error(v.span(), &key, message, Some(fix.into()));
                ok = false;
            }
        }
        let mut w = crate::config::WorkerProgram::new(argv);
        for s in settings {
            match s.name {
                "max_tasks_per_worker" => match self.int_in_range(s, 1, i64::MAX, "1000") {
                    Some(n) => w.max_tasks = u64::try_from(n).ok(),
                    None => ok = false,
                },
                "max_worker_memory" => {
                    match self.size(s, limits::MIN_WORKER_MEMORY, u64::MAX, "512MiB") {
                        Some(n) => w.max_memory = Some(n),
                        None => ok = false,
                    }
                }
                "start_secs" => {
                    // Zero is allowed: a worker is then RUNNING as soon as it is ready.
                    let zero = s.item.as_str().is_some_and(|t| {
                        humantime::parse_duration(t.trim()).is_ok_and(|d| d.is_zero())
                    });
                    if zero {
                        w.start_secs = Duration::ZERO;
                    } else {
                        match self.duration(s) {
                            Some(d) => w.start_secs = d,
                            None => ok = false,
                        }
                    }
                }
                "start_retries" => match self.int_in_range(s, 1, limits::MAX_START_RETRIES, "3") {
                    Some(n) => w.start_retries = n as u32,
                    None => ok = false,
                },
                _ => {}
            }
        }
        ok.then_some(Program::Worker(w))
    }

    fn command(&mut self, e: &Entry) -> Option<Program> {
        let example = "write an argv list such as `command = [\"/usr/local/bin/make-thumb\", \"--size\", \"{size}\"]`";
        let Some(array) = e.item.as_array() else {
            let fix = if e.item.is_str() {
                format!("{example}, or use `shell = \"...\"` to run a shell command line")
            } else {
                example.to_string()
            };
            self.wrong_type(e, "an array of strings", fix);
            return None;
        };
        if array.is_empty() {
            self.error(
                e.value_span(),
                &e.path,
                "command is empty: it needs at least the program to run",
                Some(example.into()),
            );
            return None;
        }
        let mut argv = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", e.path);
            let Some(s) = v.as_str() else {
                self.error(
                    v.span(),
                    &key,
                    format!(
                        "command elements must be strings, found {}",
                        with_article(v.type_name())
                    ),
                    Some("put the element in quotes".into()),
                );
                ok = false;
                continue;
            };
            if s.contains('\0') {
                self.error(
                    v.span(),
                    &key,
                    "a command element cannot contain a NUL byte",
                    Some("remove the \\u0000".into()),
                );
                ok = false;
                continue;
            }
            if i == 0 && s.trim().is_empty() {
                self.error(
                    v.span(),
                    &key,
                    "the program name (the first element of command) is empty",
                    Some(
                        "put the program's path first, such as \"/usr/local/bin/make-thumb\""
                            .into(),
                    ),
                );
                ok = false;
                continue;
            }
            match ArgTemplate::parse(s) {
                Ok(t) if i == 0 && !t.is_literal() => {
                    // The payload must never choose which program runs.
                    self.error(
                        v.span(),
                        &key,
                        "the program name (the first element of command) cannot hold a `{field}` placeholder: a payload must not choose the program",
                        Some("name the program literally; pass payload fields as later arguments".into()),
                    );
                    ok = false;
                }
                Ok(t) => argv.push(t),
                Err(why) => {
                    self.error(
                        v.span(),
                        &key,
                        why,
                        Some("write `{field}` with a payload field name, and `{{` / `}}` for literal braces".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(Program::Command(argv))
    }

    fn shell(&mut self, e: &Entry) -> Option<Program> {
        let s = self.string(e, "\"/opt/reports/build.sh \\\"$TASKD_ARG_month\\\"\"")?;
        if s.trim().is_empty() {
            self.error(
                e.value_span(),
                &e.path,
                "shell is empty",
                Some(
                    "write the command line for /bin/sh -c, such as `shell = \"/opt/app/run.sh\"`"
                        .into(),
                ),
            );
            return None;
        }
        if s.contains('\0') {
            self.error(
                e.value_span(),
                &e.path,
                "shell cannot contain a NUL byte",
                Some("remove the \\u0000".into()),
            );
            return None;
        }
        Some(Program::Shell(s.to_string()))
    }
}

#[derive(Clone, Copy)]
enum Account {
    User,
    Group,
}

impl Account {
    fn as_str(self) -> &'static str {
        match self {
            Account::User => "user",
            Account::Group => "group",
        }
    }
}

/// `fs.nr_open`, the most open files a process may be allowed.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(limits::NR_OPEN)
}

/// `s` as a TOML value: bare if it is a whole number, else quoted.
fn quote_unless_number(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        s.to_string()
    } else {
        format!("\"{s}\"")
    }
}

/// Pulls (key, table) out of toml_edit's "duplicate key `a` in table `queues`".
fn parse_duplicate(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("duplicate key `")?;
    let (key, rest) = rest.split_once('`')?;
    let key = unquote(key);
    let table = match rest.trim() {
        "in document root" | "" => String::new(),
        other => other
            .strip_prefix("in table `")?
            .strip_suffix('`')?
            .to_string(),
    };
    Some((key, table))
}

/// toml_edit shows a quoted key with its quotes; the name inside is what users call it.
fn unquote(key: &str) -> String {
    for q in ['"', '\''] {
        if key.len() >= 2 && key.starts_with(q) && key.ends_with(q) {
            return key[1..key.len() - 1].to_string();
        }
    }
    key.to_string()
}

/// Why `name` cannot be an environment variable set by the config, with a fix.
fn check_env_name(name: &str) -> Result<(), (String, String)> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        let suggestion: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        let suggestion = if suggestion.starts_with(|c: char| c.is_ascii_digit()) {
            format!("_{suggestion}")
        } else {
            suggestion
        };
        return Err((
            format!("`{name}` is not a valid environment variable name: use ASCII letters, digits and `_`, not starting with a digit"),
            format!("rename it, e.g. `{suggestion}`"),
        ));
    }
    if name.to_ascii_uppercase().starts_with("TASKD_") {
        return Err((
            format!("`{name}` starts with TASKD_, a prefix taskd keeps for the variables it sets itself"),
            "choose a name without the TASKD_ prefix".into(),
        ));
    }
    Ok(())
}

fn suggest_queue_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let s = s.trim_start_matches('-').to_string();
    if s.is_empty() {
        "my-queue".into()
    } else {
        s
    }
}

/// Parses `broker`: `sqlite:///abs.db`, `sqlite://rel.db` or `sqlite:rel.db`. Errors carry
/// (message, fix).
fn parse_broker(s: &str, dir: &Path) -> Result<BrokerUrl, (String, String)> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("sqlite:") {
        let rest = &t["sqlite:".len()..];
        let p = rest.strip_prefix("//").unwrap_or(rest);
        if p.is_empty() {
            return Err((
                format!("the broker URL \"{s}\" names no database file"),
                "write `broker = \"sqlite:///var/lib/taskd/taskd.db\"`, or remove `broker` to use taskd.db in state_dir".into(),
            ));
        }
        return Ok(BrokerUrl::Sqlite {
            path: resolve(dir, Path::new(p)),
        });
    }
    let scheme = lower.split_once("://").map(|(scheme, _)| scheme);
    if matches!(scheme, Some("redis" | "rediss")) {
        // Parsed as the client will parse it; the message never repeats the URL, which may
        // hold a password.
        return match redis::IntoConnectionInfo::into_connection_info(t) {
            Ok(_) => Ok(BrokerUrl::Redis {
                url: super::Secret::new(t.to_string()),
            }),
            Err(e) => Err((
                format!(
                    "the redis broker URL is invalid: {}",
                    e.to_string().replace(t, "<url>")
                ),
                "write `broker = \"redis://[:password@]host[:port][/db]\"` (or `rediss://` for TLS)"
                    .into(),
            )),
        };
    }
    if matches!(scheme, Some("postgres" | "postgresql")) {
        return Err((
            "the postgres broker is not available in this version".into(),
            "use `redis://host:6379/0` for a shared broker, or remove `broker` to use the embedded SQLite store".into(),
        ));
    }
    let fix = if scheme.is_none() && !t.is_empty() && !t.contains(':') {
        // A bare path: they meant SQLite.
        if t.starts_with('/') {
            format!("write `broker = \"sqlite://{t}\"`")
        } else {
            format!("write `broker = \"sqlite:{t}\"`")
        }
    } else {
        "write `broker = \"sqlite:///path/to/taskd.db\"`, or remove `broker` to use the embedded SQLite store".into()
    };
    Err((
        format!("unsupported broker URL \"{s}\": taskd accepts `sqlite:` URLs (sqlite:///absolute/path.db, sqlite:relative/path.db) and `redis://` URLs"),
        fix,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let dir = Path::new("/etc/taskd");
        let sqlite = |p: &str| {
            Ok(BrokerUrl::Sqlite {
                path: PathBuf::from(p),
            })
        };
        assert_eq!(
            parse_broker("sqlite:///var/lib/t.db", dir),
            sqlite("/var/lib/t.db")
        );
        assert_eq!(
            parse_broker("sqlite://t.db", dir),
            sqlite("/etc/taskd/t.db")
        );
        assert_eq!(parse_broker("sqlite:t.db", dir), sqlite("/etc/taskd/t.db"));
        assert_eq!(
            parse_broker("sqlite:./data/t.db", dir),
            sqlite("/etc/taskd/data/t.db")
        );
        assert!(parse_broker("sqlite://", dir).is_err());
        let redis = |u: &str| match parse_broker(u, dir) {
            Ok(BrokerUrl::Redis { url }) => url.expose().to_string(),
            other => panic!("{u}: {other:?}"),
        };
        assert_eq!(
            redis("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redis("rediss://h"), "rediss://h");
        assert_eq!(
            redis("redis://:s3cret@h:7000/2"),
            "redis://:s3cret@h:7000/2"
        );
        let (m, _) = parse_broker("redis://:s3cret@h:notaport/2", dir).unwrap_err();
        assert!(m.contains("redis broker URL is invalid"), "{m}");
        assert!(!m.contains("s3cret"), "a message repeats the password: {m}");
        assert!(parse_broker("postgres://h/db", dir)
            .unwrap_err()
            .0
            .contains("postgres broker"));
        let (m, f) = parse_broker("/var/lib/t.db", dir).unwrap_err();
        assert!(m.contains("sqlite:"), "{m}");
        assert_eq!(f, "write `broker = \"sqlite:///var/lib/t.db\"`");
        assert!(parse_broker("mysql://h", dir).is_err());
    }

    #[test]
    fn env_names() {
        assert!(check_env_name("REPORT_DIR").is_ok());
        assert!(check_env_name("_x1").is_ok());
        assert!(check_env_name("1X").is_err());
        assert!(check_env_name("A-B").unwrap_err().1.contains("A_B"));
        assert!(check_env_name("").is_err());
        assert!(check_env_name("TASKD_QUEUE").is_err());
        assert!(check_env_name("taskd_x").is_err());
    }

    #[test]
    fn duplicate_messages() {
        assert_eq!(
            parse_duplicate("duplicate key `a` in table `queues`"),
            Some(("a".into(), "queues".into()))
        );
        assert_eq!(
            parse_duplicate("duplicate key `\"a b\"` in table `queues`"),
            Some(("a b".into(), "queues".into()))
        );
        assert_eq!(
            parse_duplicate("duplicate key `x` in document root"),
            Some(("x".into(), String::new()))
        );
        assert_eq!(parse_duplicate("something else"), None);
    }

    #[test]
    fn paths_and_keys() {
        assert_eq!(
            resolve(Path::new("/a"), Path::new("./b/./c")),
            PathBuf::from("/a/b/c")
        );
        assert_eq!(
            resolve(Path::new("/a"), Path::new("/x/y")),
            PathBuf::from("/x/y")
        );
        assert_eq!(join_key("queues", "a.b"), "queues.\"a.b\"");
        assert_eq!(join_key("queues", "thumbs"), "queues.thumbs");
        assert_eq!(join_key("", "taskd"), "taskd");
        assert!(config_dir(Path::new("taskd.toml")).is_absolute());
    }
}
