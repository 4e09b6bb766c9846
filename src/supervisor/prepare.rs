//! Turn a claimed task and its queue's config into an executor [`Spec`].
//!
//! This is where the "payload never becomes code" rule lives: `command` placeholders are
//! filled into argv elements (no shell), and `shell` scripts get payload fields only as
//! `TASKD_ARG_<field>` environment variables.

use std::collections::BTreeMap;

use crate::config::{Program, QueueConfig};
use crate::executor::{LogSpec, Spec, UserSpec};
use crate::model::TaskRecord;

/// Environment variables of the daemon that must never reach a task: they belong to the
/// daemon's own service manager connection.
fn stripped(name: &str) -> bool {
    name == "NOTIFY_SOCKET"
        || name == "JOURNAL_STREAM"
        || name.starts_with("WATCHDOG_")
        || name.starts_with("LISTEN_")
        || name.starts_with("TASKD_")
}

/// Values bigger than this are left out of the environment (the kernel refuses a single
/// environment string over 128 KiB); the whole payload is always on stdin.
pub const MAX_ENV_VALUE: usize = 64 * 1024;

/// What is computed once per queue config, not once per task.
pub struct Prepared {
    pub config: std::sync::Arc<QueueConfig>,
    base_env: Vec<(String, String)>,
    user: Option<Result<UserSpec, String>>,
}

impl Prepared {
    pub fn new(config: std::sync::Arc<QueueConfig>) -> Self {
        let mut env: BTreeMap<String, String> =
            std::env::vars().filter(|(k, _)| !stripped(k)).collect();
        let user = config
            .user
            .as_deref()
            .map(|u| UserSpec::lookup(u, config.group.as_deref()).map_err(|e| e.to_string()));
        if let Some(Ok(u)) = &user {
            env.insert("HOME".into(), u.home.display().to_string());
            env.insert("USER".into(), u.name.clone());
            env.insert("LOGNAME".into(), u.name.clone());
        }
        for (k, v) in &config.env {
            env.insert(k.clone(), v.clone());
        }
        env.insert("TASKD_QUEUE".into(), config.name.to_string());
        env.insert("TASKD_MAX_ATTEMPTS".into(), config.max_attempts.to_string());
        Prepared {
            base_env: env.into_iter().collect(),
            user,
            config,
        }
    }

    /// Build the spec for one attempt; `Err` is a permanent failure of the task
    /// (a placeholder its payload cannot fill, a user that does not exist).
    pub fn spec(&self, task: &TaskRecord, attempt: u32) -> Result<Spec, String> {
        let q = &self.config;
        let payload_text = task.payload.to_string();
        let mut argv: Vec<String> = match &q.program {
            Program::Command(parts) => parts
                .iter()
                .map(|p| p.render(&task.payload))
                .collect::<Result<_, _>>()?,
            Program::Shell(script) => vec![
                "/bin/sh".into(),
                "-c".into(),
                script.clone(),
                format!("taskd-{}", q.name),
            ],
        };
        argv.extend(task.args.iter().cloned());
        let mut env = self.base_env.clone();
        env.push(("TASKD_TASK_ID".into(), task.id.to_string()));
        env.push(("TASKD_ATTEMPT".into(), attempt.to_string()));
        if payload_text.len() <= MAX_ENV_VALUE {
            env.push(("TASKD_PAYLOAD".into(), payload_text.clone()));
        }
        if let serde_json::Value::Object(fields) = &task.payload {
            for (k, v) in fields {
                if !is_env_name(k) {
                    continue;
                }
                let value = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => continue,
                    other => other.to_string(),
                };
                if value.len() <= MAX_ENV_VALUE && !value.contains('\0') {
                    env.push((format!("TASKD_ARG_{k}"), value));
                }
            }
        }
        let user = match &self.user {
            None => None,
            Some(Ok(u)) => Some(u.clone()),
            Some(Err(e)) => {
                return Err(format!(
                    "cannot run as user {:?}: {e}",
                    q.user.as_deref().unwrap_or("")
                ))
            }
        };
        let log = q.log_dir.as_ref().map(|dir| LogSpec {
            stdout_path: dir.join(format!("{}.{attempt}.out", task.id)),
            stderr_path: dir.join(format!("{}.{attempt}.err", task.id)),
            max_bytes: q.log_max,
        });
        Ok(Spec {
            argv,
            env,
            cwd: q.cwd.clone(),
            stdin: payload_text.into_bytes(),
            timeout: q.timeout,
            kill_grace: q.kill_grace,
            tail_bytes: q.output_tail,
            log,
            user,
        })
    }
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert!(is_env_name("month"));
        assert!(is_env_name("_a1"));
        assert!(!is_env_name("1a"));
        assert!(!is_env_name("a-b"));
        assert!(!is_env_name(""));
    }

    #[test]
    fn service_manager_variables_are_stripped() {
        assert!(stripped("NOTIFY_SOCKET"));
        assert!(stripped("WATCHDOG_USEC"));
        assert!(stripped("LISTEN_FDS"));
        assert!(stripped("JOURNAL_STREAM"));
        assert!(!stripped("PATH"));
    }
}
