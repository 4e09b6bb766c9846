//! A reload (SIGHUP, `taskd reload`): the config file read again and, when valid, applied
//! in place: queues (the supervisor's), `shutdown_grace`, `max_payload`, the API's token and
//! connection limit. `state_dir`, `broker` and `listen` need a restart. An invalid file is
//! refused with its diagnostics, and the old config kept.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::control::ReloadReply;
use crate::supervisor::Supervisor;

/// Give the API the connection limit that leaves the queues' tasks their descriptors (see
/// `api::connection_limit`); after [`super::setup::fit_nofile`].
pub(super) fn fit_api(state: &crate::api::AppState, config: &Config) {
    let soft = crate::executor::host().nofile.0;
    let limit = crate::api::connection_limit(soft, super::setup::task_slots(config));
    state
        .max_connections
        .store(limit, std::sync::atomic::Ordering::Relaxed);
}

/// Read `current.path` again and apply what may change in place; `why` (what asked for it)
/// starts the log line.
pub(super) fn reload(current: &mut Config, supervisor: &Arc<Supervisor>, why: &str) -> ReloadReply {
    let path = current.path.clone();
    match crate::config::load(&path) {
        Ok(new) => {
            let mut changes = Vec::new();
            if new.state_dir != current.state_dir || new.broker != current.broker {
                changes.push(
                    "`state_dir` and `broker` changes need a restart; kept the old ones"
                        .to_string(),
                );
            }
            super::setup::fit_nofile(&new);
            changes.extend(supervisor.apply(&new));
            if new.shutdown_grace != current.shutdown_grace {
                changes.push(format!(
                    "shutdown_grace {} → {}",
                    humantime::format_duration(current.shutdown_grace),
                    humantime::format_duration(new.shutdown_grace)
                ));
            }
            current.queues = new.queues;
            current.schedules = new.schedules;
            current.shutdown_grace = new.shutdown_grace;
            current.max_payload = new.max_payload;
            if new.listen != current.listen {
                changes.push("`listen` changes need a restart; kept the old address".to_string());
            }
            if new.token != current.token {
                changes.push("API token changed".to_string());
            }
            current.token = new.token;
            tracing::info!(changes = ?changes, "{why}: config reloaded from {}", path.display());
            ReloadReply {
                ok: true,
                changes,
                errors: Vec::new(),
            }
        }
        Err(e) => {
            tracing::error!("{why}: the new config is invalid; keeping the old one:\n{e}");
            let errors = match e {
                ConfigError::Invalid(diags) => diags.iter().map(|d| d.to_string()).collect(),
                other => vec![other.to_string()],
            };
            ReloadReply {
                ok: false,
                changes: Vec::new(),
                errors,
            }
        }
    }
}
