//! The audit trail's vocabulary: who changed what, through which path, and how it went.
//!
//! Every change an operator makes (cancel, retry, pause, resume, restart, reload, a bulk
//! retry or cancel, a schedule's fire, pause and resume, and the daemon's own start and
//! stop) becomes one [`AuditEntry`], which
//! the caller hands to [`crate::broker::Broker::audit`] once the change is done, with its
//! outcome. The broker keeps the trail (bounded, newest kept) beside the tasks, so that the
//! CLI, which changes tasks straight in the store, records its changes where the daemon
//! records its own. Enqueues are not recorded: they are the workload, not an operator's
//! change.
//!
//! This module holds the records and how a caller is identified ([`Actor`]: the Unix user
//! of a local CLI or a control-socket peer, the token's name of an HTTP request). It sees
//! the model only; it never writes anything (the caller does, through the broker).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{QueueName, TaskId, UnixMs};

/// The path a change came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// A `taskd` command that changed the store itself (`cancel`, `retry`, `pause`, `resume`).
    Cli,
    /// The daemon's control socket (`taskd reload`, `taskd restart`).
    Socket,
    /// The HTTP API (and the dashboard, which uses it).
    Api,
    /// A signal to the daemon (SIGHUP reloads, SIGTERM/SIGINT stop); its sender is unknown.
    Signal,
    /// The daemon itself (its start).
    Daemon,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Socket => "socket",
            Via::Api => "api",
            Via::Signal => "signal",
            Via::Daemon => "daemon",
        }
    }
}

/// Who asked for a change. Which fields are set depends on [`Via`]: a local CLI and a
/// control-socket peer have a Unix user (`uid`, `user`, and `login_uid` when the session
/// was opened by another user: `sudo` keeps the login uid of the one who logged in); an
/// HTTP request has the name of the token it carried (`None` when the daemon has no token)
/// and the client's address; a signal has its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub via: Via,
    /// The Unix uid: the CLI's real uid, or the control-socket peer's (SO_PEERCRED).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The name of `uid`, when the user database has one.
    #[serde(default)]
    pub user: Option<String>,
    /// The login uid (`/proc/PID/loginuid`) when it is set and differs from `uid`: the user
    /// who logged in before `sudo` or `su`.
    #[serde(default)]
    pub login_uid: Option<u32>,
    #[serde(default)]
    pub login_user: Option<String>,
    /// The process: the CLI's, the socket peer's, or the daemon's.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The machine the change was made on (several share a Redis broker).
    #[serde(default)]
    pub host: Option<String>,
    /// HTTP: the name of the bearer token the request carried (`default` for `token` or
    /// `token_file`; a name from `tokens`); `None` when the daemon has no token.
    #[serde(default)]
    pub token: Option<String>,
    /// HTTP: the client's address (`ip:port`), when known.
    #[serde(default)]
    pub addr: Option<String>,
    /// A signal's name (`SIGHUP`).
    #[serde(default)]
    pub signal: Option<String>,
}

impl Actor {
    /// This process, run from the command line: its real uid (who ran it, also under a
    /// set-uid wrapper), its user name, and its login uid when that is another user.
    pub fn local_cli() -> Actor {
        let uid = nix::unistd::getuid().as_raw();
        Actor::unix_user(Via::Cli, uid, std::process::id())
    }

    /// Nothing known yet but the path.
    pub(crate) fn blank(via: Via) -> Actor {
        Actor {
            via,
            uid: None,
            user: None,
            login_uid: None,
            login_user: None,
            pid: None,
            host: None,
            token: None,
            addr: None,
            signal: None,
        }
    }

    /// A peer of the control socket, as the kernel reports it (SO_PEERCRED).
    pub(crate) fn socket_peer(uid: u32, pid: Option<u32>) -> Actor {
        match pid {
            Some(pid) => Actor::unix_user(Via::Socket, uid, pid),
            None => Actor {
                uid: Some(uid),
                user: user_name(uid),
                host: crate::model::host_name().map(String::from),
                ..Actor::blank(Via::Socket)
            },
        }
    }

    /// An HTTP request that carried token `token` (its name; `None`: the daemon has no
    /// token) from `addr`.
    pub fn api(token: Option<String>, addr: Option<String>) -> Actor {
        Actor {
            token,
            addr,
            host: crate::model::host_name().map(String::from),
            ..Actor::blank(Via::Api)
        }
    }

    /// An HTTP request on the API's Unix socket, from the peer the kernel reports
    /// (SO_PEERCRED): no token is asked for there.
    pub(crate) fn api_unix(uid: u32, pid: Option<u32>) -> Actor {
        Actor {
            uid: Some(uid),
            user: user_name(uid),
            pid,
            addr: Some("unix socket".to_string()),
            host: crate::model::host_name().map(String::from),
            ..Actor::blank(Via::Api)
        }
    }

    /// A signal the daemon received (its sender is not known).
    pub(crate) fn signal(name: &str) -> Actor {
        Actor {
            signal: Some(name.to_string()),
            pid: Some(std::process::id()),
            host: crate::model::host_name().map(String::from),
            ..Actor::blank(Via::Signal)
        }
    }

    /// The daemon itself (this process).
    pub(crate) fn daemon() -> Actor {
        let uid = nix::unistd::getuid().as_raw();
        Actor::unix_user(Via::Daemon, uid, std::process::id())
    }

    fn unix_user(via: Via, uid: u32, pid: u32) -> Actor {
        let login_uid = login_uid(pid).filter(|l| *l != uid);
        Actor {
            uid: Some(uid),
            user: user_name(uid),
            login_uid,
            login_user: login_uid.and_then(user_name),
            pid: Some(pid),
            host: crate::model::host_name().map(String::from),
            ..Actor::blank(via)
        }
    }

    /// Who, for people: `local cli uid 1000 (alice) on web-1`, `socket uid 0 (root), login
    /// uid 1000 (alice) on web-1`, `api token "ci" from 10.0.0.5:41234`, `signal SIGHUP on
    /// web-1`. The host is named for all but HTTP requests, whose client address says more.
    pub(crate) fn describe(&self) -> String {
        let user = |uid: Option<u32>, name: &Option<String>| match (uid, name) {
            (Some(u), Some(n)) => format!("uid {u} ({n})"),
            (Some(u), None) => format!("uid {u}"),
            (None, _) => "uid unknown".to_string(),
        };
        let mut s = match self.via {
            Via::Cli => format!("local cli {}", user(self.uid, &self.user)),
            Via::Socket => format!("socket {}", user(self.uid, &self.user)),
            Via::Daemon => format!("daemon {}", user(self.uid, &self.user)),
            Via::Api => {
                let token = match (&self.token, self.uid) {
                    (Some(t), _) => format!("api token {t:?}"),
                    (None, Some(_)) => format!("api {}", user(self.uid, &self.user)),
                    (None, None) => "api without a token".to_string(),
                };
                match &self.addr {
                    Some(a) => format!("{token} from {a}"),
                    None => token,
                }
            }
            Via::Signal => format!("signal {}", self.signal.as_deref().unwrap_or("(unknown)")),
        };
        if self.login_uid.is_some() {
            s.push_str(&format!(
                ", login {}",
                user(self.login_uid, &self.login_user)
            ));
        }
        if let (Some(h), false) = (&self.host, self.via == Via::Api) {
            s.push_str(&format!(" on {h}"));
        }
        s
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The name of `uid` in the user database (`/etc/passwd`, NSS).
fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// `/proc/PID/loginuid`: the uid of the user whose login session `pid` belongs to
/// (unchanged by `sudo` and `su`); `None` when the session has none (4294967295: a service,
/// a container without pam_loginuid).
fn login_uid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/loginuid")).ok()?;
    text.trim().parse::<u32>().ok().filter(|u| *u != u32::MAX)
}

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Cancel a task (`taskd cancel`, `POST …/cancel`).
    Cancel,
    /// Queue a failed or cancelled task again (`taskd retry`, `POST …/retry`).
    Retry,
    /// Stop claiming from a queue.
    Pause,
    /// Claim from a paused queue again.
    Resume,
    /// Restart a worker queue's long-lived workers one at a time.
    Restart,
    /// Re-read the config (`taskd reload`, SIGHUP).
    Reload,
    /// Cancel every task a filter selects (one record for the whole operation).
    BulkCancel,
    /// Retry every task a filter selects (one record for the whole operation).
    BulkRetry,
    /// Delete finished tasks past their `keep_*` now (`taskd prune`, not a dry run).
    Prune,
    /// The daemon started (on this host).
    Start,
    /// The daemon began to stop (drain).
    Stop,
    /// Enqueue a schedule's task now, outside its slots (`taskd schedules fire`,
    /// `POST /api/v1/schedules/{name}/fire`).
    ScheduleFire,
    /// Stop firing a schedule (`taskd schedules pause`, `POST …/pause`).
    SchedulePause,
    /// Fire a paused schedule again (`taskd schedules resume`, `POST …/resume`).
    ScheduleResume,
}

impl Action {
    pub const ALL: [Action; 14] = [
        Action::Cancel,
        Action::Retry,
        Action::Pause,
        Action::Resume,
        Action::Restart,
        Action::Reload,
        Action::BulkCancel,
        Action::BulkRetry,
        Action::Prune,
        Action::Start,
        Action::Stop,
        Action::ScheduleFire,
        Action::SchedulePause,
        Action::ScheduleResume,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Restart => "restart",
            Action::Reload => "reload",
            Action::BulkCancel => "bulk_cancel",
            Action::BulkRetry => "bulk_retry",
            Action::Prune => "prune",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::ScheduleFire => "schedule_fire",
            Action::SchedulePause => "schedule_pause",
            Action::ScheduleResume => "schedule_resume",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(text: &str) -> Result<Action, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
                format!("unknown action `{text}` (one of {})", names.join(", "))
            })
    }
}

/// How a change went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done (the detail says what happened: `cancelled`, `stop requested`, …).
    Ok,
    /// Asked for and refused by the store or the daemon: no such task, a task in a state
    /// the action does not apply to, a config the daemon would not load. `detail` says why.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change to record: who did what to which target, and how it went. The store adds
/// when ([`AuditRecord::at`], by its own clock) and an id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub actor: Actor,
    pub action: Action,
    /// The task acted on (cancel, retry).
    #[serde(default)]
    pub task: Option<TaskId>,
    /// The queue acted on (pause, resume, restart), or the queue of the task acted on (or
    /// of the schedule).
    #[serde(default)]
    pub queue: Option<QueueName>,
    /// The schedule acted on (`[schedules.NAME]`: fire, pause, resume).
    #[serde(default)]
    pub schedule: Option<String>,
    /// A bulk operation's filter, as its caller names it (`queue`, `state`, …).
    #[serde(default)]
    pub filter: Option<BTreeMap<String, String>>,
    /// A bulk operation: how many tasks it changed.
    #[serde(default)]
    pub count: Option<u64>,
    pub outcome: Outcome,
    /// What happened, or why it was refused, in a sentence.
    #[serde(default)]
    pub detail: String,
}

impl AuditEntry {
    /// `action` by `actor`, `Ok`, with no target yet.
    pub fn new(actor: Actor, action: Action) -> AuditEntry {
        AuditEntry {
            actor,
            action,
            task: None,
            queue: None,
            schedule: None,
            filter: None,
            count: None,
            outcome: Outcome::Ok,
            detail: String::new(),
        }
    }

    pub fn task(mut self, id: TaskId) -> Self {
        self.task = Some(id);
        self
    }

    pub fn queue(mut self, queue: QueueName) -> Self {
        self.queue = Some(queue);
        self
    }

    pub fn schedule(mut self, name: impl Into<String>) -> Self {
        self.schedule = Some(name.into());
        self
    }

    pub fn ok(mut self, detail: impl Into<String>) -> Self {
        self.outcome = Outcome::Ok;
        self.detail = detail.into();
        self
    }

    pub fn refused(mut self, why: impl Into<String>) -> Self {
        self.outcome = Outcome::Refused;
        self.detail = why.into();
        self
    }

    /// A bulk operation's record: the filter that selected the tasks (its fields, as the
    /// request named them) and how many tasks it changed. One record per operation, never
    /// one per task.
    pub fn bulk(
        actor: Actor,
        action: Action,
        filter: BTreeMap<String, String>,
        changed: u64,
    ) -> AuditEntry {
        let queue = filter.get("queue").and_then(|q| q.parse().ok());
        AuditEntry {
            queue,
            filter: Some(filter),
            count: Some(changed),
            ..AuditEntry::new(actor, action)
        }
    }

    /// A schedule's pause or resume (`missed`: the schedule's policy, which decides what
    /// becomes of the slots it slept through).
    pub(crate) fn schedule_paused(
        actor: Actor,
        name: &str,
        queue: QueueName,
        paused: bool,
        missed: &str,
    ) -> AuditEntry {
        let (action, detail) = if paused {
            (
                Action::SchedulePause,
                "paused: it fires no slot until it is resumed".to_string(),
            )
        } else {
            (
                Action::ScheduleResume,
                format!(
                    "resumed: the slots it slept through are missed slots (missed = \"{missed}\")"
                ),
            )
        };
        AuditEntry::new(actor, action)
            .schedule(name)
            .queue(queue)
            .ok(detail)
    }

    /// The target, for people: `task ID`, `queue Q`, `queue=q state=failed (12 tasks)`,
    /// `schedule S (queue Q)`, `schedule S, task ID (queue Q)` (a fire), or `-`.
    pub(crate) fn target(&self) -> String {
        let mut parts = Vec::new();
        if let Some(f) = &self.filter {
            let text: Vec<String> = f.iter().map(|(k, v)| format!("{k}={v}")).collect();
            parts.push(if text.is_empty() {
                "every task".to_string()
            } else {
                text.join(" ")
            });
            if let Some(n) = self.count {
                parts.push(format!("({n} task{})", if n == 1 { "" } else { "s" }));
            }
        } else {
            if let Some(s) = &self.schedule {
                parts.push(match self.task {
                    Some(_) => format!("schedule {s},"),
                    None => format!("schedule {s}"),
                });
            }
            if let Some(t) = self.task {
                parts.push(format!("task {t}"));
            }
            if let Some(q) = &self.queue {
                parts.push(if self.task.is_some() || self.schedule.is_some() {
                    format!("(queue {q})")
                } else {
                    format!("queue {q}")
                });
            }
        }
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// A recorded change: the entry, when the store took it, and its id in the trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Opaque, unique in the store, ordered as the records were taken (a cursor for
    /// "older than this").
    pub id: String,
    /// When the store took it, in ms since the epoch by the store's clock.
    pub at: UnixMs,
    pub entry: AuditEntry,
}

/// Which records to read: newest first, at most `limit`, none older than `since`, only
/// those older than the record `before` (a cursor: the id of the last record of the
/// previous page).
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub since: Option<UnixMs>,
    pub before: Option<String>,
    pub limit: usize,
}

/// `--since` and `since=`: a duration back from `now` (`"2h"`, `"1d 12h"`), or a time
/// (RFC 3339, `"2026-12-01T03:00:00Z"`, or Unix seconds). The error starts with the value.
pub(crate) fn parse_since(text: &str, now: UnixMs) -> Result<UnixMs, String> {
    let t = text.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    if let Ok(secs) = t.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .filter(|ms| (0..=253_402_300_799_000).contains(ms))
            .ok_or_else(|| format!("{t}: Unix seconds must be between 0 and the year 9999"));
    }
    let when = humantime::parse_rfc3339_weak(t).map_err(|_| {
        format!("{t:?} is neither a duration (\"2h\", \"1d\") nor a time (2026-12-01T03:00:00Z, or Unix seconds)")
    })?;
    Ok(when
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{t:?} is before 1970"))?
        .as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_reads_as_people_say_it() {
        let cli = Actor {
            uid: Some(1000),
            user: Some("alice".into()),
            ..Actor::blank(Via::Cli)
        };
        assert_eq!(cli.describe(), "local cli uid 1000 (alice)");
        let sudo = Actor {
            uid: Some(0),
            user: Some("root".into()),
            login_uid: Some(1000),
            login_user: Some("alice".into()),
            ..Actor::blank(Via::Socket)
        };
        assert_eq!(
            sudo.describe(),
            "socket uid 0 (root), login uid 1000 (alice)"
        );
        assert_eq!(
            Actor::api(Some("ci".into()), Some("10.0.0.5:41234".into())).describe(),
            "api token \"ci\" from 10.0.0.5:41234"
        );
        assert_eq!(Actor::api(None, None).describe(), "api without a token");
        let mut hup = Actor::signal("SIGHUP");
        hup.host = Some("web-1".into());
        assert_eq!(hup.describe(), "signal SIGHUP on web-1");
        let me = Actor::local_cli();
        assert_eq!(me.uid, Some(nix::unistd::getuid().as_raw()));
        assert_eq!(me.pid, Some(std::process::id()));
        assert!(me.describe().starts_with("local cli uid "), "{me}");
    }

    #[test]
    fn targets_read_as_people_say_them() {
        let id: TaskId = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20".parse().unwrap();
        let a = AuditEntry::new(Actor::blank(Via::Cli), Action::Cancel)
            .task(id)
            .queue("emails".parse().unwrap());
        assert_eq!(
            a.target(),
            "task 0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20 (queue emails)"
        );
        let q =
            AuditEntry::new(Actor::blank(Via::Cli), Action::Pause).queue("emails".parse().unwrap());
        assert_eq!(q.target(), "queue emails");
        let bulk = AuditEntry::bulk(
            Actor::blank(Via::Cli),
            Action::BulkRetry,
            BTreeMap::from([
                ("queue".to_string(), "emails".to_string()),
                ("state".to_string(), "failed".to_string()),
            ]),
            12,
        );
        assert_eq!(bulk.target(), "queue=emails state=failed (12 tasks)");
        assert_eq!(bulk.queue.as_ref().map(|q| q.as_str()), Some("emails"));
        assert_eq!(
            AuditEntry::new(Actor::blank(Via::Cli), Action::Reload).target(),
            "-"
        );
        let paused = AuditEntry::new(Actor::blank(Via::Cli), Action::SchedulePause)
            .schedule("nightly")
            .queue("reports".parse().unwrap());
        assert_eq!(paused.target(), "schedule nightly (queue reports)");
        let fired = paused.task(id);
        assert_eq!(
            fired.target(),
            "schedule nightly, task 0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20 (queue reports)"
        );
    }

    #[test]
    fn entries_round_trip_through_json() {
        let e = AuditEntry::bulk(
            Actor::api(Some("ci".into()), None),
            Action::BulkCancel,
            BTreeMap::from([("payload.user_id".to_string(), "42".to_string())]),
            3,
        )
        .refused("the store refused");
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<AuditEntry>(&text).unwrap(), e);
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now = 1_764_800_000_000;
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1d 12h", now), Ok(now - 129_600_000));
        assert_eq!(parse_since("1764800000", now), Ok(1_764_800_000_000));
        assert_eq!(
            parse_since("2025-12-03T22:13:20Z", now),
            Ok(1_764_800_000_000)
        );
        let e = parse_since("yesterday", now).unwrap_err();
        assert!(e.contains("neither a duration"), "{e}");
    }
}
