//! A reload (SIGHUP, `taskd reload`): the config file read again and, when valid, applied
//! in place: queues (the supervisor's), `shutdown_grace`, `max_payload`, `audit_keep`, the
//! API's tokens and connection limit. `state_dir`, `broker` and `listen` need a restart. An invalid file is
//! refused with its diagnostics, and the old config kept.

use std::sync::Arc;

use crate::audit::{Action, Actor, AuditEntry};
use crate::config::{ApiToken, Config, ConfigError};
use crate::control::ReloadReply;
use crate::supervisor::Supervisor;

/// Give the API the connection limit that leaves the queues' tasks their descriptors (see
/// `api::connection_limit`); after [`super::setup::fit_nofile`].
pub(super) fn fit_api(state: &crate::api::AppState, config: &Config) {
    let soft = crate::executor::host().nofile.0;
    let reserved = crate::executor::reserved_fds(super::setup::task_slots(config));
    let limit = crate::api::connection_limit(soft, reserved);
    state
        .max_connections
        .store(limit, std::sync::atomic::Ordering::Relaxed);
}

/// What a reload changed about the API's tokens, by name (never a secret).
fn token_changes(old: &[ApiToken], new: &[ApiToken]) -> Vec<String> {
    let mut out = Vec::new();
    for t in new {
        match old.iter().find(|o| o.name == t.name) {
            None => out.push(format!("API token `{}` added", t.name)),
            Some(o) if o.secret != t.secret => out.push(format!("API token `{}` changed", t.name)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|t| t.name == o.name) {
            out.push(format!("API token `{}` removed", o.name));
        }
    }
    out
}

/// The audit record of a reload: what changed, or why the new config was refused.
pub(super) fn audit_entry(who: Actor, answer: &ReloadReply) -> AuditEntry {
    let e = AuditEntry::new(who, Action::Reload);
    if answer.ok {
        if answer.changes.is_empty() {
            e.ok("nothing changed")
        } else {
            e.ok(answer.changes.join("; "))
        }
    } else {
        let n = answer.errors.len();
        e.refused(format!(
            "the new config is invalid ({n} error{}; the old one stays): {}",
            if n == 1 { "" } else { "s" },
            answer.errors.first().map(String::as_str).unwrap_or("")
        ))
    }
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
            if new.audit_keep != current.audit_keep {
                changes.push(format!(
                    "audit_keep {} → {}",
                    current.audit_keep, new.audit_keep
                ));
            }
            current.audit_keep = new.audit_keep;
            if new.listen != current.listen || new.listen_group != current.listen_group {
                changes.push(
                    "`listen` and `listen_group` changes need a restart; kept the old listeners"
                        .to_string(),
                );
            }
            changes.extend(token_changes(&current.tokens, &new.tokens));
            current.tokens = new.tokens;
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
