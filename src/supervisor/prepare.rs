//! Turn a claimed task and its queue's config into an executor [`Spec`].
//!
//! This is where the "payload never becomes code" rule lives: `command` placeholders are
//! filled into argv elements (no shell), and `shell` scripts get payload fields only as
//! `TASKD_ARG_<field>` environment variables.

use std::collections::BTreeMap;

use nix::sys::resource::Resource;

use crate::config::{
    defaults, never_inherited, runnable, LimitValue, Limits, Program, QueueConfig,
};
use crate::executor::cgroup::{CgroupLimits, CgroupSpec, Containment};
use crate::executor::{LogSpec, ResultDir, ResultSpec, Rlimit, Spec, UserSpec, UNLIMITED};
use crate::model::{TaskId, TaskRecord};

/// What is computed once per queue config, not once per task.
pub struct Prepared {
    pub config: std::sync::Arc<QueueConfig>,
    base_env: Vec<(String, String)>,
    user: Option<Result<UserSpec, String>>,
    limits: Vec<Rlimit>,
    /// Where a task's result file goes (`None`: tasks get none).
    results: Option<std::sync::Arc<ResultDir>>,
    /// The daemon's cgroup subtree: each task and worker gets a cgroup there (`None`:
    /// process groups only).
    containment: Option<std::sync::Arc<Containment>>,
}

impl Prepared {
    /// `results`: the directory of result files (none for tasks when `None`).
    pub fn new(
        config: std::sync::Arc<QueueConfig>,
        results: Option<std::sync::Arc<ResultDir>>,
        containment: Option<std::sync::Arc<Containment>>,
    ) -> Self {
        // Looked up here, once, and never between fork and exec. A queue with only `group`
        // runs as the daemon's own user with that group.
        let user = match (config.user.as_deref(), config.group.as_deref()) {
            (None, None) => None,
            (Some(u), g) => Some(UserSpec::lookup(u, g)),
            (None, Some(g)) => Some(UserSpec::lookup(
                &nix::unistd::geteuid().as_raw().to_string(),
                Some(g),
            )),
        }
        .map(|r| r.map_err(|e| e.to_string()));
        let identity = match (&config.user, &user) {
            (Some(_), Some(Ok(u))) => Some(u),
            _ => None,
        };
        let base_env = base_env(std::env::vars(), &config, identity);
        Prepared {
            base_env,
            user,
            limits: rlimits(&config.limits),
            results,
            containment,
            config,
        }
    }

    /// The cgroup `name` in the daemon's subtree with the queue's limits, if there is one
    /// (`kept`: a task's, one of the kept cgroups `name-<n>`, see [`CgroupSpec::kept`]).
    /// `Err` when the queue sets a limit this daemon cannot apply (never ignored).
    fn cgroup(&self, name: String, kept: bool) -> Result<Option<CgroupSpec>, String> {
        let limits = cgroup_limits(&self.config);
        let Some(place) = self.containment.clone() else {
            if limits.any() {
                return Err(format!(
                    "queue {} sets memory_max, pids_max or cpu_weight, and this daemon runs without cgroups (see `taskd status`)",
                    self.config.name
                ));
            }
            return Ok(None);
        };
        for (set, controller, key) in [
            (limits.memory_max.is_some(), "memory", "memory_max"),
            (limits.pids_max.is_some(), "pids", "pids_max"),
            (limits.cpu_weight.is_some(), "cpu", "cpu_weight"),
        ] {
            if set && !place.can_limit(controller) {
                return Err(format!(
                    "queue {} sets {key}, and this daemon's cgroups have no {controller} controller (see `taskd status`)",
                    self.config.name
                ));
            }
        }
        Ok(Some(CgroupSpec {
            place,
            name,
            limits,
            kept,
        }))
    }

    /// The spec of one long-lived worker process of a `worker` queue: its argv, the queue's
    /// environment (no per-task variables: tasks arrive on a pipe; the worker adds the
    /// protocol's), cwd, user, umask and limits. `Err` says why no worker can start.
    pub fn worker_spec(&self) -> Result<Spec, String> {
        let q = &self.config;
        let Program::Worker(w) = &q.program else {
            return Err(format!("queue {} does not run long-lived workers", q.name));
        };
        let env = self.base_env.clone();
        let user = match &self.user {
            None => None,
            Some(Ok(u)) => Some(u.clone()),
            Some(Err(e)) => return Err(format!("cannot run the worker as configured: {e}")),
        };
        Ok(Spec {
            argv: w.argv.clone(),
            env,
            cwd: q.cwd.clone(),
            stdin: Vec::new(),
            timeout: q.timeout,
            kill_grace: q.kill_grace,
            tail_bytes: q.output_tail,
            log_lines: q.log_output,
            log: None,
            user,
            umask: q.umask,
            limits: self.limits.clone(),
            // A worker's tasks answer on its result pipe.
            result: None,
            live: None,
            // `worker-<queue>-<n>`: the worker process adds its number.
            cgroup: self.cgroup(format!("worker-{}", q.name), false)?,
        })
    }

    /// Build the spec for one attempt; `Err` is a permanent failure of the task
    /// (a placeholder its payload cannot fill, a user that does not exist).
    pub fn spec(&self, task: &TaskRecord, attempt: u32) -> Result<Spec, String> {
        let q = &self.config;
        let payload_text = task.payload.to_string();
        // A raw payload's bytes go to stdin as they are; it makes no environment variables.
        let raw = task.raw_payload();
        if task.payload_b64.is_some() && raw.is_none() {
            return Err("the stored raw payload is not valid base64".into());
        }
        if let Program::Worker(_) = &q.program {
            return Err(format!(
                "queue {} runs long-lived workers: its tasks go to a worker, not to a process of their own",
                q.name
            ));
        }
        // The checks submit made, again: the task may have been enqueued another way (plain
        // Redis commands), or the queue's config may have changed since.
        let argv = runnable::argv(q, &task.payload, &task.args)?;
        let mut env = self.base_env.clone();
        env.push(("TASKD_TASK_ID".into(), task.id.to_string()));
        env.push(("TASKD_ATTEMPT".into(), attempt.to_string()));
        // A schedule's task: which schedule, and the slot it runs for (RFC 3339 UTC).
        if let Some(name) = &task.schedule {
            env.push(("TASKD_SCHEDULE".into(), name.clone()));
        }
        if let Some(slot) = task.slot {
            env.push(("TASKD_SLOT".into(), crate::slots::show_utc(slot)));
        }
        // A dependant: the parents it ran after (each one succeeded), comma-separated.
        if !task.after.is_empty() {
            env.push(("TASKD_AFTER".into(), crate::model::join_after(&task.after)));
        }
        if raw.is_none() {
            env.extend(runnable::payload_env(&payload_text, &task.payload));
        }
        let user = match &self.user {
            None => None,
            Some(Ok(u)) => Some(u.clone()),
            Some(Err(e)) => {
                let who = match (&q.user, &q.group) {
                    (Some(u), _) => format!("user {u:?}"),
                    (None, g) => format!("group {:?}", g.as_deref().unwrap_or_default()),
                };
                return Err(format!("cannot run as {who}: {e}"));
            }
        };
        let log = self.log_spec(task.id, attempt);
        Ok(Spec {
            argv,
            env,
            cwd: q.cwd.clone(),
            stdin: raw.unwrap_or_else(|| payload_text.into_bytes()),
            timeout: task.timeout(q.timeout),
            kill_grace: q.kill_grace,
            tail_bytes: q.output_tail,
            log_lines: q.log_output,
            log,
            user,
            umask: q.umask,
            limits: self.limits.clone(),
            // `max_result = 0` keeps no result: no file to make.
            result: self
                .results
                .as_ref()
                .filter(|_| q.max_result > 0)
                .map(|dir| ResultSpec {
                    dir: dir.clone(),
                    max_bytes: q.max_result,
                }),
            live: None,
            // `task-<queue>-<n>`, one per slot of the queue, kept for its next tasks.
            cgroup: self.cgroup(format!("task-{}", q.name), true)?,
        })
    }
}

impl Prepared {
    /// Where attempt `attempt` of task `id` writes its full output, if the queue keeps it
    /// (`log_dir`): `<id>.<attempt>.out` and `.err`, capped at `log_max`.
    pub fn log_spec(&self, id: TaskId, attempt: u32) -> Option<LogSpec> {
        let q = &self.config;
        q.log_dir.as_ref().map(|dir| LogSpec {
            stdout_path: dir.join(format!("{id}.{attempt}.out")),
            stderr_path: dir.join(format!("{id}.{attempt}.err")),
            max_bytes: q.log_max,
        })
    }
}

/// A task's environment before the per-task `TASKD_*` variables: the daemon's variables
/// named in the allowlist ([`defaults::ENV_INHERIT`] and the queue's `env_inherit`), never
/// the service manager's; for a queue with `user`, that user's HOME, USER, LOGNAME and
/// [`defaults::TASK_PATH`]; then the queue's `env`; then `TASKD_QUEUE` and
/// `TASKD_MAX_ATTEMPTS`. A task always has a PATH.
fn base_env(
    daemon_env: impl Iterator<Item = (String, String)>,
    config: &QueueConfig,
    user: Option<&UserSpec>,
) -> Vec<(String, String)> {
    let allowed = |name: &str| {
        !never_inherited(name)
            && (defaults::ENV_INHERIT.contains(&name)
                || config.env_inherit.iter().any(|n| n == name))
    };
    let mut env: BTreeMap<String, String> = daemon_env.filter(|(k, _)| allowed(k)).collect();
    if let Some(u) = user {
        env.insert("HOME".into(), u.home.display().to_string());
        env.insert("USER".into(), u.name.clone());
        env.insert("LOGNAME".into(), u.name.clone());
        // The daemon's PATH is root's, which may name directories the user should not be
        // sent to (or cannot read).
        env.insert("PATH".into(), defaults::TASK_PATH.into());
    }
    env.entry("PATH".into())
        .or_insert_with(|| defaults::TASK_PATH.into());
    for (k, v) in &config.env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("TASKD_QUEUE".into(), config.name.to_string());
    env.insert("TASKD_MAX_ATTEMPTS".into(), config.max_attempts.to_string());
    env.into_iter().collect()
}

/// The queue's `limits` as executor limits, each value both soft and hard.
fn rlimits(limits: &Limits) -> Vec<Rlimit> {
    let value = |v: LimitValue| match v {
        LimitValue::Finite(n) => n,
        LimitValue::Unlimited => UNLIMITED,
    };
    [
        (limits.nofile, Resource::RLIMIT_NOFILE),
        (limits.nproc, Resource::RLIMIT_NPROC),
        (limits.address_space, Resource::RLIMIT_AS),
        (limits.cpu, Resource::RLIMIT_CPU),
        (limits.fsize, Resource::RLIMIT_FSIZE),
        (limits.core, Resource::RLIMIT_CORE),
    ]
    .into_iter()
    .filter_map(|(v, r)| Some(Rlimit::both(r, value(v?))))
    .collect()
}

/// The queue's cgroup limits (`memory_max`, `pids_max`, `cpu_weight`).
fn cgroup_limits(config: &QueueConfig) -> CgroupLimits {
    CgroupLimits {
        memory_max: config.memory_max,
        pids_max: config.pids_max,
        cpu_weight: config.cpu_weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(toml: &str) -> QueueConfig {
        let text = format!("[queues.q]\nshell = \"true\"\n{toml}\n");
        let mut c = crate::config::parse_str(&text, std::path::Path::new("/etc/taskd/taskd.toml"))
            .expect("valid config");
        c.queues.pop_first().expect("one queue").1
    }

    fn env_of(
        daemon: &[(&str, &str)],
        queue: &QueueConfig,
        user: Option<&UserSpec>,
    ) -> BTreeMap<String, String> {
        let daemon = daemon.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        base_env(daemon, queue, user).into_iter().collect()
    }

    const DAEMON_ENV: &[(&str, &str)] = &[
        ("PATH", "/usr/sbin:/usr/bin"),
        ("LANG", "C.UTF-8"),
        ("HOME", "/root"),
        ("SECRET_TOKEN", "s3cret"),
        ("http_proxy", "http://proxy:3128"),
        ("NOTIFY_SOCKET", "/run/systemd/notify"),
        ("WATCHDOG_USEC", "1000000"),
        ("LISTEN_FDS", "1"),
        ("JOURNAL_STREAM", "8:1234"),
        ("TASKD_CONFIG", "/etc/taskd/taskd.toml"),
    ];

    #[test]
    fn env_is_the_allowlist_plus_env_inherit_plus_env() {
        let env = env_of(DAEMON_ENV, &queue(""), None);
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["HOME", "LANG", "PATH", "TASKD_MAX_ATTEMPTS", "TASKD_QUEUE"]
        );
        assert_eq!(
            env["PATH"], "/usr/sbin:/usr/bin",
            "the daemon's PATH is kept"
        );
        assert_eq!(env["TASKD_QUEUE"], "q");

        let q =
            queue("env_inherit = [\"http_proxy\"]\nenv = { LANG = \"de_DE.UTF-8\", X = \"1\" }");
        let env = env_of(DAEMON_ENV, &q, None);
        assert_eq!(env["http_proxy"], "http://proxy:3128");
        assert_eq!(env["LANG"], "de_DE.UTF-8", "the queue's env wins");
        assert_eq!(env["X"], "1");
        assert!(!env.contains_key("SECRET_TOKEN"));
        for k in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "LISTEN_FDS",
            "JOURNAL_STREAM",
            "TASKD_CONFIG",
        ] {
            assert!(!env.contains_key(k), "{k} leaked");
        }
    }

    #[test]
    fn service_manager_variables_never_pass_even_if_listed() {
        // The config refuses such a list; this is the second line of defence.
        let mut q = queue("");
        q.env_inherit = vec![
            "NOTIFY_SOCKET".into(),
            "WATCHDOG_USEC".into(),
            "TASKD_CONFIG".into(),
        ];
        let env = env_of(DAEMON_ENV, &q, None);
        assert!(!env.contains_key("NOTIFY_SOCKET"));
        assert!(!env.contains_key("WATCHDOG_USEC"));
        assert!(!env.contains_key("TASKD_CONFIG"));
    }

    #[test]
    fn a_task_always_has_a_path() {
        let env = env_of(&[("LANG", "C")], &queue(""), None);
        assert_eq!(env["PATH"], defaults::TASK_PATH);
    }

    #[test]
    fn another_user_gets_its_own_identity_and_path() {
        let nobody = UserSpec::lookup("nobody", None).expect("nobody exists");
        let q = queue("user = \"nobody\"");
        let env = env_of(DAEMON_ENV, &q, Some(&nobody));
        assert_eq!(env["HOME"], nobody.home.display().to_string());
        assert_eq!(env["USER"], "nobody");
        assert_eq!(env["LOGNAME"], "nobody");
        assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
        // ... unless the queue's env says otherwise.
        let q = queue("user = \"nobody\"\nenv = { PATH = \"/opt/bin:/usr/bin\" }");
        let env = env_of(DAEMON_ENV, &q, Some(&nobody));
        assert_eq!(env["PATH"], "/opt/bin:/usr/bin");
    }

    #[test]
    fn group_alone_keeps_the_daemons_user() {
        let p = Prepared::new(
            std::sync::Arc::new(queue("group = \"nogroup\"")),
            None,
            None,
        );
        let Some(Ok(u)) = &p.user else {
            panic!("group alone resolves to the daemon's user")
        };
        assert_eq!(u.uid, nix::unistd::geteuid().as_raw());
        let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
        assert_eq!(u.gid, nogroup.gid.as_raw());
        assert!(u.groups.contains(&u.gid));
    }

    #[test]
    fn limits_become_soft_and_hard() {
        let q = queue("limits = { nofile = 2048, nproc = 20, as = \"1GiB\", cpu = \"1m\", fsize = \"unlimited\", core = 0 }");
        let got = rlimits(&q.limits);
        assert_eq!(
            got,
            [
                Rlimit::both(Resource::RLIMIT_NOFILE, 2048),
                Rlimit::both(Resource::RLIMIT_NPROC, 20),
                Rlimit::both(Resource::RLIMIT_AS, 1 << 30),
                Rlimit::both(Resource::RLIMIT_CPU, 60),
                Rlimit::both(Resource::RLIMIT_FSIZE, UNLIMITED),
                Rlimit::both(Resource::RLIMIT_CORE, 0),
            ]
        );
        assert!(rlimits(&queue("").limits).is_empty());
    }
}
