//! The `[taskd]` table, and its keys whose values need more than a shared value type: the
//! broker URL, the listen address, the lease, the control socket and the API token. Which
//! keys the table has is `keys::TASKD`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::TableLike;

use super::super::units::{self, DurationError};
use super::{entries, keys, resolve, Cx, Entry, Section, Span};
use crate::config::{defaults, ApiToken, BrokerUrl, Listen, LogTasks, Secret, DEFAULT_TOKEN};

/// The `[taskd]` table as read.
#[derive(Default)]
pub(in crate::config) struct TaskdLayer {
    pub(in crate::config) broker: Option<BrokerUrl>,
    pub(in crate::config) state_dir: Option<PathBuf>,
    /// `listen`, each address with where it was written (for the "non-loopback needs a
    /// token" diagnostic).
    pub(in crate::config) listen: Option<Vec<(Listen, Span)>>,
    pub(in crate::config) listen_group: Option<String>,
    pub(in crate::config) shutdown_grace: Option<Duration>,
    pub(in crate::config) lease: Option<Duration>,
    pub(in crate::config) max_payload: Option<usize>,
    pub(in crate::config) control_socket: Option<PathBuf>,
    pub(in crate::config) cgroup_root: Option<PathBuf>,
    pub(in crate::config) state_group: Option<String>,
    /// `token` or `token_file`, named [`DEFAULT_TOKEN`].
    pub(in crate::config) token: Option<TokenRead>,
    /// `tokens`, in file order.
    pub(in crate::config) named: Vec<TokenRead>,
    /// `token`, `token_file` or `tokens` is written, valid or not (an invalid one is
    /// reported by itself, not again as a `listen` without a token).
    pub(in crate::config) token_written: bool,
    pub(in crate::config) log_tasks: Option<LogTasks>,
    pub(in crate::config) audit_keep: Option<usize>,
}

/// One API token as read: its name, its secret, where each was written.
pub(in crate::config) struct TokenRead {
    name: String,
    /// `None`: a token file a client did not open (see [`ApiToken::secret`]).
    secret: Option<Secret>,
    /// Where the name was written (for `token`/`token_file`: the key) and its dotted key.
    name_at: (Span, String),
    /// Where the secret (or its file) was written.
    secret_at: (Span, String),
}

/// A token name: what the audit trail records, and what an operator reads there.
fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("a token name must be 1 to 64 characters long".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(c) => Err(format!(
            "a token name may hold only ASCII letters, digits, `_`, `-` and `.`, not {c:?}"
        )),
        None => Ok(()),
    }
}

impl Cx<'_> {
    pub(super) fn taskd(&mut self, table: &dyn TableLike, path: &str) -> TaskdLayer {
        let mut out = TaskdLayer::default();
        for e in entries(table, path) {
            match keys::find(keys::TASKD, e.name) {
                Some(key) => {
                    // (`tokens = []` names no token.)
                    out.token_written |= matches!(e.name, "token" | "token_file")
                        || (e.name == "tokens" && e.item.as_array().is_none_or(|a| !a.is_empty()));
                    (key.read)(self, &e, &mut out);
                }
                None => {
                    let valid: Vec<&str> = keys::names(keys::TASKD).collect();
                    self.unknown_key(&e, Section::Taskd, "in [taskd]", &valid)
                }
            }
        }
        self.check_tokens(&out);
        out
    }

    /// Whether this read may open secret files. A client command (`submit`, `cancel`, …,
    /// read with no identity to check) never checks a token, and may run as a user who
    /// cannot read the daemon's token files: it does not open them.
    fn reads_secrets(&self) -> bool {
        self.identity.is_some()
    }

    /// Every token's name once, and every secret once (the audit trail names the token a
    /// request carried: two names for one secret could not be told apart).
    fn check_tokens(&mut self, layer: &TaskdLayer) {
        let all: Vec<&TokenRead> = layer.token.iter().chain(layer.named.iter()).collect();
        for (i, a) in all.iter().enumerate() {
            let Some(first) = all[..i].iter().find(|b| b.name == a.name) else {
                continue;
            };
            let (line, _) = first
                .name_at
                .0
                .clone()
                .map_or((0, 0), |s| self.position(s.start));
            let (message, fix) = if a.name == DEFAULT_TOKEN || first.name == DEFAULT_TOKEN {
                (
                    format!("the token name `{DEFAULT_TOKEN}` is taken by `token`/`token_file` (line {line})"),
                    "give this token another name, or move the single token into `tokens`".to_string(),
                )
            } else {
                (
                    format!("the token name `{}` is used twice (first on line {line})", a.name),
                    "give each token its own name: the audit trail records it for every change made with the token".to_string(),
                )
            };
            self.error(a.name_at.0.clone(), &a.name_at.1, message, Some(fix));
        }
        for (i, a) in all.iter().enumerate() {
            let Some(sa) = &a.secret else { continue };
            let Some(first) = all[..i]
                .iter()
                .find(|b| b.secret.as_ref().is_some_and(|sb| sb.matches(sa.expose())))
            else {
                continue;
            };
            self.error(
                a.secret_at.0.clone(),
                &a.secret_at.1,
                format!(
                    "tokens `{}` and `{}` hold the same token, so a request with it could not be told apart",
                    first.name, a.name
                ),
                Some("generate a token per name: `head -c 32 /dev/urandom | base64`".into()),
            );
        }
    }

    /// `tokens = [{ name = "ci", token_file = "/etc/taskd/ci.token" }, …]`, or the same as
    /// `[[taskd.tokens]]` tables; `false` when anything in it is invalid.
    pub(in crate::config) fn tokens(&mut self, entry: &Entry, out: &mut TaskdLayer) -> bool {
        const EXAMPLE: &str = "tokens = [{ name = \"ci\", token_file = \"/etc/taskd/ci.token\" }]";
        let mut tables: Vec<(&dyn TableLike, Span, String)> = Vec::new();
        let mut ok = true;
        if let Some(array) = entry.item.as_array() {
            for (i, v) in array.iter().enumerate() {
                let path = format!("{}[{i}]", entry.path);
                match v.as_inline_table() {
                    Some(t) => tables.push((t, v.span(), path)),
                    None => {
                        self.error(
                            v.span(),
                            &path,
                            format!(
                                "each entry of tokens must be a table with a name and a token file, found {}",
                                super::with_article(v.type_name())
                            ),
                            Some(format!("write `{EXAMPLE}`")),
                        );
                        ok = false;
                    }
                }
            }
        } else if let Some(array) = entry.item.as_array_of_tables() {
            for (i, t) in array.iter().enumerate() {
                tables.push((t, t.span(), format!("{}[{i}]", entry.path)));
            }
        } else {
            self.wrong_type(entry, "an array of tables", format!("write `{EXAMPLE}`"));
            return false;
        }
        for (t, span, path) in tables {
            let mut name: Option<(String, Span, String)> = None;
            let mut secret: Option<(Option<Secret>, Span, String)> = None;
            let mut entry_ok = true;
            for f in entries(t, &path) {
                match f.name {
                    "name" => match self.string(&f, "\"ci\"") {
                        Some(n) => match check_token_name(n) {
                            Ok(()) => name = Some((n.to_string(), f.value_span(), f.path.clone())),
                            Err(why) => {
                                self.error(
                                    f.value_span(),
                                    &f.path,
                                    why,
                                    Some(
                                        "name it as you would a queue, such as `name = \"ci\"`"
                                            .into(),
                                    ),
                                );
                                entry_ok = false;
                            }
                        },
                        None => entry_ok = false,
                    },
                    "token" | "token_file" => {
                        let read = if f.name == "token" {
                            self.string(&f, "\"a-long-random-string\"")
                                .and_then(|text| self.token_text(&f, text, "token"))
                                .map(Some)
                        } else {
                            self.token_file_secret(&f)
                        };
                        match read {
                            Some(value) => {
                                if secret.is_some() {
                                    self.error(
                                        f.key_span(),
                                        &f.path,
                                        "both `token` and `token_file` are set in one `tokens` entry",
                                        Some("keep one of them (token_file keeps the secret out of the config file)".into()),
                                    );
                                    entry_ok = false;
                                }
                                secret = Some((value, f.value_span(), f.path.clone()));
                            }
                            None => entry_ok = false,
                        }
                    }
                    _ => {
                        self.unknown_key(
                            &f,
                            Section::Tokens,
                            "in a `tokens` entry",
                            &["name", "token_file", "token"],
                        );
                        entry_ok = false;
                    }
                }
            }
            match (name, secret) {
                (Some((name, name_span, name_path)), Some((secret, secret_span, secret_path)))
                    if entry_ok =>
                {
                    out.named.push(TokenRead {
                        name,
                        secret,
                        name_at: (name_span, name_path),
                        secret_at: (secret_span, secret_path),
                    });
                }
                (None, _) if entry_ok => {
                    self.error(
                        span,
                        &path,
                        "this `tokens` entry has no `name`; the audit trail records it for every change made with the token",
                        Some(format!("add a name: `{EXAMPLE}`")),
                    );
                    entry_ok = false;
                }
                (Some((name, _, _)), None) if entry_ok => {
                    self.error(
                        span,
                        &path,
                        format!("the token `{name}` has neither `token_file` nor `token`"),
                        Some(format!("add the file that holds it: `{EXAMPLE}`")),
                    );
                    entry_ok = false;
                }
                _ => {}
            }
            ok &= entry_ok;
        }
        ok
    }

    /// `audit_keep`: how many audit records the broker keeps.
    pub(in crate::config) fn audit_keep(&mut self, entry: &Entry) -> Option<usize> {
        self.int_in_range(entry, 1, crate::config::limits::MAX_AUDIT_KEEP, "100000")
            .and_then(|n| usize::try_from(n).ok())
    }

    /// `state_group`: a group that exists on this system.
    pub(in crate::config) fn state_group(&mut self, entry: &Entry) -> Option<String> {
        self.group(
            entry,
            "\"taskd-producers\"",
            "add the producers' users to it",
        )
    }

    /// `listen_group`: a group that exists on this system.
    pub(in crate::config) fn listen_group(&mut self, entry: &Entry) -> Option<String> {
        self.group(
            entry,
            "\"www-data\"",
            "add the users of the API's Unix socket to it",
        )
    }

    /// A group's name that exists on this system; `then` says what to do once it is made.
    fn group(&mut self, entry: &Entry, example: &str, then: &str) -> Option<String> {
        let key = entry.name;
        let s = self.string(entry, example)?;
        match nix::unistd::Group::from_name(s) {
            Ok(Some(_)) => Some(s.to_string()),
            Ok(None) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("group `{s}` does not exist on this system"),
                    Some(format!(
                        "create the group (`groupadd --system {s}`) and {then}, or remove `{key}`"
                    )),
                );
                None
            }
            Err(err) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("failed to look up group `{s}`: {err}"),
                    Some(format!(
                        "check the system's group database (/etc/group, NSS), or remove `{key}`"
                    )),
                );
                None
            }
        }
    }

    pub(in crate::config) fn broker(&mut self, entry: &Entry) -> Option<BrokerUrl> {
        let s = self.string(entry, "\"sqlite:///var/lib/taskd/taskd.db\"")?;
        match parse_broker(s, &self.dir) {
            Ok(b) => Some(b),
            Err((message, fix)) => {
                self.error(entry.value_span(), &entry.path, message, Some(fix));
                None
            }
        }
    }

    /// `listen`: one address, or a list of them; each an IP address and port, or
    /// `unix:/path` (absolute, or relative to the config's directory).
    pub(in crate::config) fn listen(&mut self, entry: &Entry) -> Option<Vec<(Listen, Span)>> {
        let items: Vec<(&toml_edit::Value, String)> = match (
            entry.item.as_str(),
            entry.item.as_array(),
        ) {
            (Some(_), _) => match entry.item.as_value() {
                Some(v) => vec![(v, entry.path.clone())],
                None => return None,
            },
            (None, Some(array)) => array
                .iter()
                .enumerate()
                .map(|(i, v)| (v, format!("{}[{i}]", entry.path)))
                .collect(),
            (None, None) => {
                self.wrong_type(
                    entry,
                    "a string or a list of strings",
                    "write `listen = \"127.0.0.1:7070\"`, `listen = \"unix:/run/taskd/api.sock\"` or a list of both".into(),
                );
                return None;
            }
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (v, key) in items {
            let span = v.span().or_else(|| entry.value_span());
            match v.as_str().map(|s| self.one_listen(s)) {
                Some(Ok(l)) => out.push((l, span)),
                Some(Err((message, fix))) => {
                    self.error(span, &key, message, Some(fix));
                    ok = false;
                }
                None => {
                    self.error(
                        span,
                        &key,
                        format!("an address of `listen` must be a string, found {}", v.type_name()),
                        Some("write it in quotes, such as \"127.0.0.1:7070\" or \"unix:/run/taskd/api.sock\"".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// One address of `listen`, or what is wrong with it and the fix.
    fn one_listen(&self, address: &str) -> Result<Listen, (String, String)> {
        let Some(path) = address.trim().strip_prefix("unix:") else {
            return address.trim().parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
                (
                    format!("\"{address}\" is not an IP address and port, nor a `unix:` socket path"),
                    "write an address and port such as \"127.0.0.1:7070\" or \"[::1]:7070\" (host names are not accepted), or a Unix socket such as \"unix:/run/taskd/api.sock\"".into(),
                )
            });
        };
        if path.is_empty() || path.contains('\0') || path.starts_with('~') || path.starts_with('$')
        {
            return Err((
                format!("\"{address}\" does not name a socket file"),
                "write `unix:` and an absolute path, such as \"unix:/run/taskd/api.sock\" (no `~` or `$` expansion), or a path relative to the config file's directory".into(),
            ));
        }
        let p = resolve(&self.dir, Path::new(path));
        // sun_path holds 108 bytes with its terminating NUL.
        if p.as_os_str().len() > 107 {
            return Err((
                format!(
                    "the socket path {} is {} bytes long; a Unix socket path must be at most 107",
                    p.display(),
                    p.as_os_str().len()
                ),
                "choose a shorter path, such as \"unix:/run/taskd/api.sock\"".into(),
            ));
        }
        if let Some(dir) = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return Err((
                format!("the directory {} of the socket does not exist", dir.display()),
                format!("create {} (under systemd: `RuntimeDirectory=taskd` and `RuntimeDirectoryPreserve=yes`), or choose another path", dir.display()),
            ));
        }
        Ok(Listen::Unix(p))
    }

    pub(in crate::config) fn lease(&mut self, entry: &Entry) -> Option<Duration> {
        // A lease past a year is refused by the duration parser as well; the message must
        // give the lease's own bounds, not the parser's.
        let over_a_year = entry.item.as_str().map(units::parse_positive_duration)
            == Some(Err(DurationError::TooLong));
        let d = if over_a_year {
            None
        } else {
            self.duration(entry)
        };
        match (d, over_a_year) {
            (Some(d), _) if (defaults::MIN_LEASE..=defaults::MAX_LEASE).contains(&d) => Some(d),
            (Some(_), _) | (None, true) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!(
                        "lease must be between {} and {} (found {})",
                        units::show_duration(defaults::MIN_LEASE),
                        units::show_duration(defaults::MAX_LEASE),
                        entry
                            .item
                            .as_str()
                            .map_or_else(String::new, |s| format!("\"{s}\""))
                    ),
                    Some("write `lease = \"30s\"`, or remove it for the broker's default".into()),
                );
                None
            }
            _ => None,
        }
    }

    /// The control socket's path. One too long for a socket, or in a missing directory, is
    /// reported and kept: the error alone refuses the config.
    pub(in crate::config) fn control_socket(&mut self, entry: &Entry) -> Option<PathBuf> {
        let p = self.path(entry, "/run/taskd/taskd.sock")?;
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        // sun_path holds 108 bytes with its terminating NUL.
        if p.as_os_str().len() > 107 {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "the path is {} bytes long; a Unix socket path must be at most 107",
                    p.as_os_str().len()
                ),
                Some("choose a shorter path, such as \"/run/taskd/taskd.sock\"".into()),
            );
        } else if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            // The daemon binds the socket at start; a missing directory would only show
            // then, after a restart loop under systemd.
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "the directory {} of the control socket does not exist",
                    dir.display()
                ),
                Some(format!("create {} (under systemd: `RuntimeDirectory=taskd` and `RuntimeDirectoryPreserve=yes`), or remove `control_socket` for the default in state_dir", dir.display())),
            );
        }
        Some(p)
    }

    /// `cgroup_root`: a directory of a cgroup v2 hierarchy (one that does not exist yet is
    /// created by the daemon, so its parent must be one).
    pub(in crate::config) fn cgroup_root(&mut self, entry: &Entry) -> Option<PathBuf> {
        let p = self.path(entry, "/sys/fs/cgroup/taskd")?;
        let probe = if p.exists() {
            Some(p.clone())
        } else {
            p.parent().map(|d| d.to_path_buf())
        };
        let in_v2 = probe.as_deref().is_some_and(|d| {
            nix::sys::statfs::statfs(d)
                .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
                .unwrap_or(false)
        });
        if !in_v2 {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "{} is not in a cgroup v2 hierarchy (cgroup2 file system)",
                    p.display()
                ),
                Some("name a directory under a cgroup2 mount, such as `cgroup_root = \"/sys/fs/cgroup/taskd\"` (see `mount -t cgroup2`), or remove `cgroup_root` to use the daemon's own cgroup".into()),
            );
            return None;
        }
        Some(p)
    }

    /// `log_tasks = "failures" | "all" | "none"`.
    pub(in crate::config) fn log_tasks(&mut self, entry: &Entry) -> Option<LogTasks> {
        let s = self.string(entry, "\"failures\"")?;
        let value = LogTasks::parse(s);
        if value.is_none() {
            let fix = match units::closest(s, &LogTasks::NAMES) {
                Some(near) => format!("did you mean `log_tasks = \"{near}\"`?"),
                None => "write `log_tasks = \"failures\"`, `\"all\"` or `\"none\"`".into(),
            };
            self.error(
                entry.value_span(),
                &entry.path,
                format!("unknown value \"{s}\" (expected \"failures\", \"all\" or \"none\")"),
                Some(fix),
            );
        }
        value
    }

    /// `token = "…"`; `false` when it is invalid.
    pub(in crate::config) fn token(&mut self, entry: &Entry, out: &mut TaskdLayer) -> bool {
        let Some(s) = self.string(entry, "\"a-long-random-string\"") else {
            return false;
        };
        let Some(t) = self.token_text(entry, s, "token") else {
            return false;
        };
        self.set_token(entry, out, Some(t));
        true
    }

    /// `token_file = "/path"`: the token is the file's text, trimmed.
    pub(in crate::config) fn token_file(&mut self, entry: &Entry, out: &mut TaskdLayer) -> bool {
        match self.token_file_secret(entry) {
            Some(t) => {
                self.set_token(entry, out, t);
                true
            }
            None => false,
        }
    }

    /// A token file's token: `None` when it is invalid (reported); `Some(None)` when this
    /// read does not open secret files ([`Self::reads_secrets`]). The file must be a
    /// regular file that no other user can read or change: not readable or writable by
    /// others, not writable by its group, owned by root or by the user reading it (the
    /// daemon's user, under `taskd check` run as that user).
    fn token_file_secret(&mut self, entry: &Entry) -> Option<Option<Secret>> {
        use std::os::unix::fs::MetadataExt;
        let p = self.path(entry, "/etc/taskd/token")?;
        if !self.reads_secrets() {
            return Some(None);
        }
        let problem = match std::fs::metadata(&p) {
            Err(err) => Some((
                format!("failed to read the token file {}: {err}", p.display()),
                "create the file with the token on one line, readable by the daemon's user only (mode 0600)".to_string(),
            )),
            Ok(m) if !m.is_file() => Some((
                format!("the token file {} is not a regular file", p.display()),
                "point it at a file that holds the token on one line".to_string(),
            )),
            Ok(m) if m.mode() & 0o027 != 0 => Some((
                format!(
                    "the token file {} can be {} (mode {:04o}): anyone who can read it can change tasks through the API",
                    p.display(),
                    if m.mode() & 0o007 != 0 {
                        "read or changed by every user of this machine"
                    } else {
                        "changed by its group"
                    },
                    m.mode() & 0o7777
                ),
                format!(
                    "`chmod 600 {}` (or 640, with a group only the daemon's user is in)",
                    p.display()
                ),
            )),
            Ok(m) if m.uid() != 0 && Some(m.uid()) != self.identity.map(|i| i.euid) => Some((
                format!(
                    "the token file {} belongs to uid {}, neither root nor the user reading the config: its owner can change the token",
                    p.display(),
                    m.uid()
                ),
                format!("`chown root {}` (or the daemon's user)", p.display()),
            )),
            Ok(_) => None,
        };
        if let Some((message, fix)) = problem {
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        match std::fs::read_to_string(&p) {
            Ok(text) => self.token_text(entry, text.trim(), "token_file").map(Some),
            Err(err) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("failed to read the token file {}: {err}", p.display()),
                    Some("create the file with the token on one line, readable by the daemon's user only (mode 0600)".into()),
                );
                None
            }
        }
    }

    /// Checks an API token's text (never echoed in a diagnostic: it is a secret).
    fn token_text(&mut self, entry: &Entry, text: &str, what: &str) -> Option<Secret> {
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
                    entry.value_span(),
                    &entry.path,
                    message,
                    Some("generate one with `head -c 32 /dev/urandom | base64`".into()),
                );
                None
            }
            None => Some(Secret::new(text.to_string())),
        }
    }

    fn set_token(&mut self, entry: &Entry, out: &mut TaskdLayer, token: Option<Secret>) {
        if out.token.is_some() {
            self.error(
                entry.key_span(),
                &entry.path,
                "both `token` and `token_file` are set",
                Some(
                    "keep one of them (token_file keeps the secret out of the config file)".into(),
                ),
            );
        }
        out.token = Some(TokenRead {
            name: DEFAULT_TOKEN.to_string(),
            secret: token,
            name_at: (entry.key_span(), entry.path.clone()),
            secret_at: (entry.value_span(), entry.path.clone()),
        });
    }
}

impl TaskdLayer {
    /// The tokens, the single one first.
    pub(in crate::config) fn api_tokens(&self) -> Vec<ApiToken> {
        self.token
            .iter()
            .chain(self.named.iter())
            .map(|t| ApiToken {
                name: t.name.clone(),
                secret: t.secret.clone(),
            })
            .collect()
    }
}

/// Parses `broker`: `sqlite:///abs.db`, `sqlite://rel.db` or `sqlite:rel.db`. Errors carry
/// (message, fix).
fn parse_broker(text: &str, dir: &Path) -> Result<BrokerUrl, (String, String)> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("sqlite:") {
        let rest = &t["sqlite:".len()..];
        let p = rest.strip_prefix("//").unwrap_or(rest);
        if p.is_empty() {
            return Err((
                format!("the broker URL \"{text}\" names no database file"),
                "write `broker = \"sqlite:///var/lib/taskd/taskd.db\"`, or remove `broker` to use taskd.db in state_dir".into(),
            ));
        }
        return Ok(BrokerUrl::Sqlite {
            path: resolve(dir, Path::new(p)),
        });
    }
    let scheme = lower.split_once("://").map(|(scheme, _)| scheme);
    if matches!(scheme, Some("redis" | "rediss")) {
        return parse_redis(t);
    }
    if matches!(scheme, Some("postgres" | "postgresql")) {
        return parse_postgres(t);
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
        format!(
            "unsupported broker URL \"{text}\": taskd accepts `sqlite:` URLs (sqlite:///absolute/path.db, sqlite:relative/path.db){}",
            if cfg!(feature = "redis") { " and `redis://` URLs" } else { "" }
        ),
        fix,
    ))
}

/// A `postgres://` or `postgresql://` URL, parsed as the broker will parse it; the message
/// never repeats the URL, which may hold a password.
#[cfg(feature = "postgres")]
fn parse_postgres(text: &str) -> Result<BrokerUrl, (String, String)> {
    match crate::config::postgres_url::parse_url(text) {
        Ok(_) => Ok(BrokerUrl::Postgres {
            url: Secret::new(text.to_string()),
        }),
        Err(e) => Err((
            e.replace(text, "<url>"),
            "write `broker = \"postgres://user[:password]@host[:port]/database[?schema=taskd&pool_size=8&statement_timeout=30s&sslmode=require]\"` (docs/postgres.md)".into(),
        )),
    }
}

/// A build without the PostgreSQL broker refuses a `postgres://` URL, saying so.
#[cfg(not(feature = "postgres"))]
fn parse_postgres(_: &str) -> Result<BrokerUrl, (String, String)> {
    Err((
        "this taskd was built without the PostgreSQL broker (the `postgres` feature)".into(),
        "use the embedded SQLite store (remove `broker`), or a taskd built with the default features".into(),
    ))
}

/// A `redis://` or `rediss://` URL, parsed as the client will parse it; the message never
/// repeats the URL, which may hold a password.
#[cfg(feature = "redis")]
fn parse_redis(text: &str) -> Result<BrokerUrl, (String, String)> {
    match redis::IntoConnectionInfo::into_connection_info(text) {
        Ok(_) => Ok(BrokerUrl::Redis {
            url: Secret::new(text.to_string()),
        }),
        Err(e) => Err((
            format!(
                "the redis broker URL is invalid: {}",
                e.to_string().replace(text, "<url>")
            ),
            "write `broker = \"redis://[:password@]host[:port][/db]\"` (or `rediss://` for TLS)"
                .into(),
        )),
    }
}

/// A build without the Redis broker refuses a `redis://` URL, saying so.
#[cfg(not(feature = "redis"))]
fn parse_redis(_: &str) -> Result<BrokerUrl, (String, String)> {
    Err((
        "this taskd was built without the Redis broker (the `redis` feature)".into(),
        "use the embedded SQLite store (remove `broker`, or write `broker = \"sqlite:///var/lib/taskd/taskd.db\"`), or a taskd built with the default features".into(),
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
        #[cfg(feature = "postgres")]
        {
            let pg = |u: &str| match parse_broker(u, dir) {
                Ok(BrokerUrl::Postgres { url }) => url.expose().to_string(),
                other => panic!("{u}: {other:?}"),
            };
            assert_eq!(pg("postgres://h/db"), "postgres://h/db");
            assert_eq!(
                pg("postgresql://u:pw@h:5433/db?schema=jobs&pool_size=4"),
                "postgresql://u:pw@h:5433/db?schema=jobs&pool_size=4"
            );
            let (m, _) = parse_broker("postgres://u:s3cret@h/db?schema=Bad-Name", dir).unwrap_err();
            assert!(m.contains("schema=Bad-Name"), "{m}");
            assert!(!m.contains("s3cret"), "{m}");
            let (m, _) = parse_broker("postgres://u:s3cret@h/db?pool_size=0", dir).unwrap_err();
            assert!(m.contains("pool_size=0"), "{m}");
            let (m, _) = parse_broker("postgres://u:s3cret@h:notaport/db", dir).unwrap_err();
            assert!(m.contains("PostgreSQL URL is invalid"), "{m}");
            assert!(!m.contains("s3cret"), "{m}");
        }
        let (m, f) = parse_broker("/var/lib/t.db", dir).unwrap_err();
        assert!(m.contains("sqlite:"), "{m}");
        assert_eq!(f, "write `broker = \"sqlite:///var/lib/t.db\"`");
        assert!(parse_broker("mysql://h", dir).is_err());
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_broker_urls() {
        let dir = Path::new("/etc/taskd");
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
    }

    #[cfg(not(feature = "redis"))]
    #[test]
    fn a_build_without_redis_refuses_redis_urls_saying_why() {
        let dir = Path::new("/etc/taskd");
        for url in ["redis://127.0.0.1:6379/0", "rediss://:s3cret@h"] {
            let (m, f) = parse_broker(url, dir).unwrap_err();
            assert!(m.contains("built without the Redis broker"), "{m}");
            assert!(f.contains("sqlite"), "{f}");
            assert!(!m.contains("s3cret") && !f.contains("s3cret"), "{m} {f}");
        }
        let (_, f) = parse_broker("postgres://h/db", dir).unwrap_err();
        assert!(
            !f.contains("redis"),
            "a fix that names what this build lacks: {f}"
        );
    }
}
