//! `[defaults]` and `[queues.NAME]` tables: reading a table's queue keys into a [`Layer`],
//! layering it over `[defaults]` and the built-in defaults, and the readers of the queue
//! keys that need their own: `max_attempts`, `backoff`, `fail_exit_codes`, `env`, `user`
//! and `group`, `umask`, `env_inherit`; then whether the daemon could run the queue's tasks
//! as its `user` and `group`. Which keys a queue has is `keys::QUEUE`.

use std::collections::BTreeMap;
use std::time::Duration;

use toml_edit::TableLike;

use super::super::units;
use super::{entries, keys, with_article, Cx, Entry, Place, Section, Span};
use crate::config::keys::{Layer, Settings};
use crate::config::{limits, never_inherited, Backoff, BackoffKind, QueueConfig};
use crate::model::QueueName;

/// A `backoff` table as one table sets it.
#[derive(Clone, Default)]
pub(in crate::config) struct BackoffLayer {
    pub(in crate::config) kind: Option<BackoffKind>,
    pub(in crate::config) base: Option<Duration>,
    pub(in crate::config) max: Option<Duration>,
    pub(in crate::config) jitter: Option<bool>,
    /// Where to point a "base > max" error, and under which key.
    pub(in crate::config) base_at: Option<(Span, String)>,
    pub(in crate::config) max_at: Option<(Span, String)>,
    table_at: (Span, String),
    /// A sub-key was invalid: skip the base/max comparison, it would only repeat that error.
    broken: bool,
}

impl BackoffLayer {
    pub(in crate::config) fn over(&self, lower: &Backoff) -> Backoff {
        Backoff {
            kind: self.kind.unwrap_or(lower.kind),
            base: self.base.unwrap_or(lower.base),
            max: self.max.unwrap_or(lower.max),
            jitter: self.jitter.unwrap_or(lower.jitter),
        }
    }
}

impl Cx<'_> {
    /// Reads the queue keys of `[defaults]` or a queue table. In a queue table, the entries
    /// of the keys only a queue has (`command`, `shell`, `worker` and the worker settings)
    /// are handed back unread.
    pub(super) fn layer<'a>(
        &mut self,
        table: &'a dyn TableLike,
        path: &str,
        section: Section,
    ) -> (Layer, Vec<Entry<'a>>) {
        let mut layer = Layer::default();
        let mut program = Vec::new();
        let label = format!("in [{path}]");
        for e in entries(table, path) {
            if let Some(key) = keys::find(keys::QUEUE, e.name) {
                (key.read)(self, &e, &mut layer);
            } else if section == Section::Queue && keys::is_queue_only(e.name) {
                program.push(e)
            } else {
                let valid = if section == Section::Queue {
                    keys::queue_table_keys()
                } else {
                    keys::names(keys::QUEUE).collect()
                };
                self.unknown_key(&e, section, &label, &valid)
            }
        }
        (layer, program)
    }

    /// `max_attempts`: every run counts, the first included, and there is always a limit.
    pub(in crate::config) fn max_attempts(&mut self, entry: &Entry) -> Option<u32> {
        match self.integer(entry, "5") {
            Some(n) if n < 1 => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("max_attempts must be at least 1, found {n}: it counts every run, the first included"),
                    Some("set `max_attempts = 1` for no retries, or more".into()),
                );
                None
            }
            Some(n) if n > limits::MAX_ATTEMPTS => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("max_attempts must be at most {}, found {n}: taskd never retries without limit", limits::MAX_ATTEMPTS),
                    Some(format!("set `max_attempts = {}` or less", limits::MAX_ATTEMPTS)),
                );
                None
            }
            Some(n) => u32::try_from(n).ok(),
            None => None,
        }
    }

    pub(in crate::config) fn backoff(&mut self, entry: &Entry) -> Option<BackoffLayer> {
        let t = self.table(
            entry,
            "a table such as `backoff = { kind = \"exponential\", base = \"10s\", max = \"1h\", jitter = true }`",
        )?;
        let mut out = BackoffLayer {
            table_at: (entry.value_span(), entry.path.clone()),
            ..BackoffLayer::default()
        };
        for sub in entries(t, &entry.path) {
            match keys::find(keys::BACKOFF, sub.name) {
                Some(key) => out.broken |= !(key.read)(self, &sub, &mut out),
                None => {
                    let label = format!("in {}", entry.path);
                    let valid: Vec<&str> = keys::names(keys::BACKOFF).collect();
                    self.unknown_key(&sub, Section::Backoff, &label, &valid)
                }
            }
        }
        Some(out)
    }

    /// `kind = "exponential" | "fixed"`.
    pub(in crate::config) fn backoff_kind(&mut self, entry: &Entry) -> Option<BackoffKind> {
        match self.string(entry, "\"exponential\"")? {
            "exponential" => Some(BackoffKind::Exponential),
            "fixed" => Some(BackoffKind::Fixed),
            other => {
                let fix = match units::closest(other, &["exponential", "fixed"]) {
                    Some(near) => format!("did you mean `kind = \"{near}\"`?"),
                    None => "write `kind = \"exponential\"` or `kind = \"fixed\"`".into(),
                };
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!(
                        "unknown backoff kind \"{other}\" (expected \"exponential\" or \"fixed\")"
                    ),
                    Some(fix),
                );
                None
            }
        }
    }

    /// Reports `base > max` once, in the table whose `backoff` produced it. `merged` is the
    /// policy that table ends up with after inheritance.
    pub(super) fn check_backoff(&mut self, layer: &BackoffLayer, merged: &Backoff) {
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

    pub(in crate::config) fn exit_codes(&mut self, entry: &Entry) -> Option<Vec<i32>> {
        let Some(array) = entry.item.as_array() else {
            self.wrong_type(
                entry,
                "an array of exit codes",
                "write a list such as `fail_exit_codes = [2, 64]`".into(),
            );
            return None;
        };
        let mut codes = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", entry.path);
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

    pub(in crate::config) fn env(&mut self, entry: &Entry) -> Option<BTreeMap<String, String>> {
        let t = self.table(
            entry,
            "a table such as `env = { REPORT_DIR = \"/srv/reports\" }`",
        )?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for var in entries(t, &entry.path) {
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

    pub(in crate::config) fn account(&mut self, entry: &Entry, kind: Account) -> Option<String> {
        let s = self.string(entry, "\"taskd\"")?;
        let what = kind.as_str();
        if s.is_empty() {
            self.error(
                entry.value_span(),
                &entry.path,
                format!("{what} cannot be empty"),
                Some(format!(
                    "name an existing {what}, or remove `{}`",
                    entry.name
                )),
            );
            return None;
        }
        let found = match kind {
            Account::User => nix::unistd::User::from_name(s).map(|u| u.is_some()),
            Account::Group => nix::unistd::Group::from_name(s).map(|g| g.is_some()),
        };
        match found {
            Ok(true) => Some(s.to_string()),
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
                    entry.value_span(),
                    &entry.path,
                    format!("{what} `{s}` does not exist on this system"),
                    Some(fix),
                );
                None
            }
            Err(errno) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
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
    pub(in crate::config) fn umask(&mut self, entry: &Entry) -> Option<u32> {
        let name = entry.name;
        let example = format!("write it as an octal string such as `{name} = \"027\"`");
        let value = if let Some(n) = entry.item.as_integer() {
            let raw = entry
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
                    entry.value_span(),
                    &entry.path,
                    format!("umask {n} is a decimal number, but a umask is written in octal"),
                    Some(fix),
                );
                return None;
            }
            n
        } else if let Some(s) = entry.item.as_str() {
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
                    entry.value_span(),
                    &entry.path,
                    format!("\"{s}\" is not a umask: it must be octal digits (0 to 7)"),
                    Some(example),
                );
                return None;
            };
            n
        } else {
            self.wrong_type(entry, "an octal string such as \"027\"", example);
            return None;
        };
        if !(0..=0o777).contains(&value) {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "umask {value:o} (octal) is out of range: a umask holds permission bits only, 000 to 777"
                ),
                Some(example),
            );
            return None;
        }
        u32::try_from(value).ok()
    }

    /// `env_inherit = ["LANG", "TZ"]`: names of the daemon's variables tasks get.
    pub(in crate::config) fn env_inherit(&mut self, entry: &Entry) -> Option<Vec<String>> {
        let example =
            "write a list of variable names such as `env_inherit = [\"LC_TIME\", \"http_proxy\"]`";
        let Some(array) = entry.item.as_array() else {
            self.wrong_type(entry, "an array of variable names", example.into());
            return None;
        };
        let mut out: Vec<String> = Vec::new();
        let mut ok = true;
        for (i, v) in array.iter().enumerate() {
            let key = format!("{}[{i}]", entry.path);
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
    fn check_privileges(&mut self, settings: &Settings) {
        let Some(id) = self.identity else { return };
        if id.euid == 0 || (settings.user.is_none() && settings.group.is_none()) {
            return;
        }
        let me = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id.euid)) {
            Ok(Some(u)) => format!("`{}` (uid {})", u.name, id.euid),
            _ => format!("uid {}", id.euid),
        };
        // A key in the settings was set by a table, which recorded where.
        let place = |key: &str| {
            settings
                .at
                .get(key)
                .cloned()
                .expect("a queue's user or group is set only by a table, which records where")
        };
        // The group the task would get, and the key that decides it.
        let mut target: Option<(u32, String, Place)> = None;
        if let Some(user) = &settings.user {
            // An unknown user was reported where it was read.
            let Ok(Some(pw)) = nix::unistd::User::from_name(user) else {
                return;
            };
            let at = place("user");
            if pw.uid.as_raw() != id.euid {
                self.error(
                    at.span,
                    &at.key,
                    format!(
                        "tasks cannot run as user `{user}`: taskd runs as {me}, not root, and the daemon must run as root to switch users"
                    ),
                    Some("run taskd as root (its systemd unit does), or remove `user` to run the tasks as taskd's own user".into()),
                );
                return;
            }
            let primary = nix::unistd::Group::from_gid(pw.gid)
                .ok()
                .flatten()
                .map_or_else(|| pw.gid.to_string(), |g| g.name);
            target = Some((pw.gid.as_raw(), primary, at));
        }
        if let Some(group) = &settings.group {
            let Ok(Some(gr)) = nix::unistd::Group::from_name(group) else {
                return;
            };
            target = Some((gr.gid.as_raw(), gr.name, place("group")));
        }
        if let Some((gid, name, at)) = target {
            if gid != id.egid {
                self.error(
                    at.span,
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

    pub(super) fn queue(&mut self, entry: &Entry, base: &Settings) -> Option<QueueConfig> {
        // `taskd submit -rf` reads a leading `-` as a flag (and after `--` as argv): such a
        // queue could never be addressed from the command line.
        let name = match QueueName::try_from(entry.name.to_string()).and_then(|n| {
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
                    entry.key_span(),
                    &entry.path,
                    format!("`{}` cannot be a queue name: {why}", entry.name),
                    Some(format!(
                        "rename it, e.g. [queues.{}]",
                        suggest_queue_name(entry.name)
                    )),
                );
                None
            }
        };
        let Some(t) = entry.item.as_table_like() else {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "queue `{}` must be a table, found {}",
                    entry.name,
                    entry.found()
                ),
                Some(format!(
                    "write a [queues.{}] table with `command` or `shell`",
                    suggest_queue_name(entry.name)
                )),
            );
            return None;
        };
        let (layer, program_entries) = self.layer(t, &entry.path, Section::Queue);
        let backoff = layer.backoff.clone();
        let settings = base.with(layer);
        if let Some(b) = backoff {
            self.check_backoff(&b, &settings.backoff);
        }
        self.check_privileges(&settings);
        if self.identity.is_some() {
            for (key, set, controller) in [
                ("memory_max", settings.memory_max.is_some(), "memory"),
                ("pids_max", settings.pids_max.is_some(), "pids"),
                ("cpu_weight", settings.cpu_weight.is_some(), "cpu"),
            ] {
                if let (true, Some(place)) = (set, settings.at.get(key)) {
                    self.cgroup_uses.push((place.clone(), key, controller));
                }
            }
        }
        let program = self.program(entry, &program_entries);
        let (name, program) = (name?, program?);
        Some(QueueConfig::with_settings(name, program, settings))
    }
}

/// Which account database `user` or `group` names an entry of.
#[derive(Clone, Copy)]
pub(in crate::config) enum Account {
    User,
    Group,
}

impl Account {
    pub(in crate::config) fn as_str(self) -> &'static str {
        match self {
            Account::User => "user",
            Account::Group => "group",
        }
    }
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
