//! The second stage: walk the span-keeping TOML tree by hand, collect every problem as a
//! [`Diagnostic`], and build a [`Config`] only when there is none.
//!
//! Each reader records its own errors and returns `None` for a bad value; the caller then falls
//! back to the default, so one mistake never causes a cascade of follow-on errors.
//!
//! Which keys exist, and which reader each one uses, is defined in `config/keys.rs`; this
//! module walks the tables and holds the readers, one file per concern:
//!
//! - `mod.rs`: the walk's context (positions, diagnostics), the entries of a table, unknown
//!   keys, and the top level, where `[taskd]`, `[defaults]` and the queues become a [`Config`];
//! - `syntax.rs`: TOML syntax errors, with the hint for an unquoted duration;
//! - `values.rs`: the value types every table shares (string, integer, duration, size, path);
//! - `taskd.rs`: the `[taskd]` keys (broker URL, listen address, lease, token);
//! - `queue.rs`: `[defaults]` and queue tables: layering, backoff, env, accounts, umask, and
//!   whether the daemon could run tasks as the queue's user;
//! - `limits.rs`: the `limits` sub-keys;
//! - `program.rs`: what a queue runs (`command`, `shell`, `worker` and its settings).
//!
//! It must not start anything or touch the broker: it reads text (and the user database).

mod celery;
mod flow;
mod limits;
mod program;
mod queue;
mod schedule;
mod syntax;
mod taskd;
mod values;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml_edit::{ImDocument, Item, Key, TableLike};

use super::keys::{self, Settings};
use super::units;
use super::{defaults, BrokerUrl, Config, Diagnostic};

pub(super) use celery::CeleryLayer;
pub(super) use limits::nr_open;
pub(super) use queue::{Account, BackoffLayer};
pub(super) use schedule::ScheduleLayer;
pub(super) use taskd::TaskdLayer;

type Span = Option<Range<usize>>;

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
        cgroup_uses: Vec::new(),
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
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// `path` made absolute against `dir` (the config file's directory).
fn resolve(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        normalize(path)
    } else {
        normalize(&dir.join(path))
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
pub(in crate::config) struct Entry<'a> {
    name: &'a str,
    key: &'a Key,
    item: &'a Item,
    pub(in crate::config) path: String,
}

impl<'a> Entry<'a> {
    fn key_span(&self) -> Span {
        self.key.span().or_else(|| self.item.span())
    }

    pub(in crate::config) fn value_span(&self) -> Span {
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
    /// An entry of `[taskd] tokens`.
    Tokens,
    Schedule,
    Celery,
    /// An entry of `[celery.tasks]` written as a table.
    CeleryTask,
}

/// Where a value was written: its span and dotted key, for an error found after the value
/// was read (such as a `user` the daemon cannot switch to, known only after inheritance).
#[derive(Clone)]
pub(in crate::config) struct Place {
    span: Span,
    key: String,
}

impl Place {
    pub(in crate::config) fn of(entry: &Entry) -> Place {
        Place {
            span: entry.value_span(),
            key: entry.path.clone(),
        }
    }
}

/// The walk's context: the text (for positions), the file, and the diagnostics so far.
pub(in crate::config) struct Cx<'t> {
    text: &'t str,
    file: PathBuf,
    dir: PathBuf,
    diags: Vec<Diagnostic>,
    /// Who will run the tasks; `None`: do not check privileges.
    identity: Option<Identity>,
    /// Queue keys that need a cgroup per task, where each was written and the controller it
    /// needs: checked against the machine once the whole file is read (`cgroup_root` may
    /// come after the queues).
    cgroup_uses: Vec<(Place, &'static str, &'static str)>,
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

    fn unknown_key(&mut self, entry: &Entry, section: Section, label: &str, valid: &[&str]) {
        let name = entry.name;
        let (message, fix) = if keys::is_taskd(name) && section != Section::Taskd {
            (
                format!("`{name}` belongs in [taskd], not {label}"),
                "move it under the [taskd] table".to_string(),
            )
        } else if keys::is_queue(name) && matches!(section, Section::Root | Section::Taskd) {
            (
                format!("`{name}` is a queue setting and does not belong {label}"),
                "move it under [defaults] (for every queue) or a [queues.NAME] table".to_string(),
            )
        } else if keys::is_queue_only(name) && section != Section::Queue {
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
        self.error(entry.key_span(), &entry.path, message, Some(fix));
    }

    /// The queue keys that need a cgroup per task, against what this machine offers (only
    /// for a reader that will run tasks: `taskd check`, `taskd start`): never a silent
    /// no-op.
    fn check_cgroups(&mut self, root: Option<&Path>) {
        if self.cgroup_uses.is_empty() {
            return;
        }
        let probe = crate::cgroupfs::probe(root);
        for (place, key, controller) in std::mem::take(&mut self.cgroup_uses) {
            let problem = match &probe {
                Err(why) => Some(format!(
                    "`{key}` needs a cgroup per task, and taskd cannot create cgroups here: {why}"
                )),
                Ok(p) if !p.can_limit(controller) => Some(format!(
                    "`{key}` needs the `{controller}` cgroup controller, which {} does not offer and no writable cgroup v1 `{controller}` hierarchy gives",
                    p.base.display()
                )),
                Ok(_) => None,
            };
            if let Some(message) = problem {
                self.error(
                    place.span,
                    &place.key,
                    message,
                    Some(format!("run taskd where it may create cgroups (as root, under systemd with `Delegate=yes`, or with `cgroup_root`), or remove `{key}`; see docs/config.md, Containment")),
                );
            }
        }
    }

    fn root(&mut self, root: &dyn TableLike, state_directory: Option<OsString>) -> Config {
        let mut taskd = TaskdLayer::default();
        let mut defaults_layer = None;
        let mut queue_tables = Vec::new();
        let mut schedule_tables = Vec::new();
        let mut celery_table = None;
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
                "schedules" => {
                    if let Some(t) = self.table(&e, "[schedules.NAME] tables") {
                        schedule_tables = entries(t, &e.path);
                    }
                }
                "celery" => celery_table = Some(e),
                _ => self.unknown_key(&e, Section::Root, "at the top level", keys::ROOT),
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

        self.check_cgroups(taskd.cgroup_root.as_deref());
        let tokens = taskd.api_tokens();
        let max_payload = taskd.max_payload.unwrap_or(defaults::MAX_PAYLOAD);
        let queues_broken = queues.len() < queue_tables.len();
        let schedules = self.schedules(&schedule_tables, &queues, max_payload, queues_broken);
        let celery = celery_table.and_then(|e| self.celery(&e, &queues, queues_broken));

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
        let listen = taskd.listen.unwrap_or_default();
        for (addr, span) in listen.iter().filter(|_| !taskd.token_written) {
            if let Some(addr) = addr.tcp().filter(|a| !a.ip().is_loopback()) {
                self.error(
                    span.clone(),
                    "taskd.listen",
                    format!("listen = \"{addr}\" is reachable from other hosts, and no API token is set: anyone could enqueue and cancel tasks"),
                    Some("set `token_file = \"/etc/taskd/token\"` (or `tokens = [{ name = \"ci\", token_file = \"…\" }]`) in [taskd], or listen on a loopback address such as \"127.0.0.1:7070\" or a Unix socket such as \"unix:/run/taskd/api.sock\"".into()),
                );
            }
        }
        Config {
            control_socket,
            state_group: taskd.state_group,
            path: self.file.clone(),
            broker,
            state_dir,
            listen: listen.into_iter().map(|(l, _)| l).collect(),
            listen_group: taskd.listen_group,
            tokens,
            audit_keep: taskd.audit_keep.unwrap_or(defaults::AUDIT_KEEP),
            cgroup_root: taskd.cgroup_root,
            shutdown_grace: taskd.shutdown_grace.unwrap_or(defaults::SHUTDOWN_GRACE),
            lease: taskd.lease,
            max_payload,
            log_tasks: taskd.log_tasks.unwrap_or_default(),
            queues,
            schedules,
            celery,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
