//! What the bridge writes where Celery's client reads a task's state: the result meta (the
//! JSON document Celery's result backends store), and the [`ResultSink`] a result backend
//! implements.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::message::ResultTo;
use crate::model::UnixMs;

/// A state of a Celery task, as written for its client.
#[derive(Clone, Debug, PartialEq)]
pub enum CeleryState {
    /// It started (only for routes with `track_started`): on this host, in this process.
    Started { hostname: String, pid: u32 },
    /// It succeeded with this value (`null` when the task returned none).
    Success(Value),
    /// It failed: the client raises `module.class(message)`.
    Failure {
        module: String,
        class: String,
        message: String,
        /// What the client shows as the traceback (the task's last stderr lines).
        traceback: Option<String>,
    },
    /// It was revoked (`revoke`, `taskd cancel`) or expired before it started: the client
    /// raises `celery.exceptions.TaskRevokedError` with this reason (`"revoked"`,
    /// `"expired"`, `"terminated"`).
    Revoked(String),
}

impl CeleryState {
    /// Celery's state name.
    pub fn status(&self) -> &'static str {
        match self {
            CeleryState::Started { .. } => "STARTED",
            CeleryState::Success(_) => "SUCCESS",
            CeleryState::Failure { .. } => "FAILURE",
            CeleryState::Revoked(_) => "REVOKED",
        }
    }

    /// A ready state: the client's `get()` returns or raises on it.
    pub fn is_ready(&self) -> bool {
        !matches!(self, CeleryState::Started { .. })
    }

    /// The result meta of task `id`, as Celery's backends store it (`status`, `result`,
    /// `traceback`, `children`, `date_done`, `task_id`: every field, since a client reading
    /// a meta without `task_id` fails).
    pub fn meta(&self, id: &str, now: UnixMs) -> Value {
        let (result, traceback) = match self {
            CeleryState::Started { hostname, pid } => {
                (json!({"pid": pid, "hostname": hostname}), Value::Null)
            }
            CeleryState::Success(v) => (v.clone(), Value::Null),
            CeleryState::Failure {
                module,
                class,
                message,
                traceback,
            } => (
                exception(module, class, message),
                traceback.clone().map_or(Value::Null, Value::String),
            ),
            CeleryState::Revoked(reason) => (
                exception("celery.exceptions", "TaskRevokedError", reason),
                Value::Null,
            ),
        };
        let date_done = if self.is_ready() {
            Value::String(iso_time(now))
        } else {
            Value::Null
        };
        json!({
            "status": self.status(),
            "result": result,
            "traceback": traceback,
            "children": [],
            "date_done": date_done,
            "task_id": id,
        })
    }
}

/// An exception as Celery serializes it: `exc_message` is the exception's `args`.
fn exception(module: &str, class: &str, message: &str) -> Value {
    json!({"exc_type": class, "exc_message": [message], "exc_module": module})
}

/// `ms` as Celery writes `date_done`: ISO 8601 in UTC with microseconds and `+00:00`.
///
/// The ends written together share one instant: the last one formatted is kept (per
/// thread) and handed out again for the same millisecond instead of formatted anew.
pub fn iso_time(ms: UnixMs) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(UnixMs, String)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((at, text)) if *at == ms => text.clone(),
            _ => {
                let t =
                    jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                let text = format!("{}+00:00", t.strftime("%Y-%m-%dT%H:%M:%S%.6f"));
                *last = Some((ms, text.clone()));
                text
            }
        }
    })
}

/// Where results go: a Celery result backend. The bridge calls [`ResultSink::store`] for
/// every state it writes; a sink is shared by every task of the daemon.
#[async_trait]
pub trait ResultSink: Send + Sync + 'static {
    /// Write `state` for the task `to` names, and wake the client waiting for it. Returns
    /// once the backend has it (the bridge acknowledges a refused message only then). A
    /// ready state already stored is never replaced by STARTED, and a stored SUCCESS never
    /// by anything (Celery's own rule: a result, once there, stays).
    async fn store(&self, to: &ResultTo, state: &CeleryState) -> Result<(), String>;

    /// [`ResultSink::store`] for several tasks at once (the final states of the tasks that
    /// ended together), in as few round trips as the backend allows. `Ok` once the backend
    /// has every one; on `Err` some may be written, and the caller writes them all again
    /// (writing a state twice leaves the same result).
    async fn store_many(&self, items: &[(ResultTo, CeleryState)]) -> Result<(), String> {
        for (to, state) in items {
            self.store(to, state).await?;
        }
        Ok(())
    }

    /// For people: where the results go (no password).
    fn describe(&self) -> String;

    /// Remember that task `id` owes a final state (from its ingest until
    /// [`ResultSink::pending_done`]), so that a state missed (a node that died between a
    /// task's end and its write, a cancel from `taskd cancel`, an expiry found by a claim)
    /// is written by the sweep ([`crate::celery::Bridge::sweep`]). A sink that cannot keep
    /// it keeps nothing: its results are written only as tasks end.
    async fn pending_add(&self, _ids: &[String]) -> Result<(), String> {
        Ok(())
    }

    /// Its final state is written (or nothing is owed): forget it.
    async fn pending_done(&self, _ids: &[String]) -> Result<(), String> {
        Ok(())
    }

    /// Up to `limit` ids remembered longer than `age` ago, each then put at the back
    /// (looked at again after `age`).
    async fn pending_due(
        &self,
        _age: std::time::Duration,
        _limit: usize,
    ) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metas_have_every_field_celery_reads() {
        let at = 1_764_980_000_123;
        let ok = CeleryState::Success(json!({"sent": 3})).meta("id-1", at);
        assert_eq!(
            ok,
            json!({"status": "SUCCESS", "result": {"sent": 3}, "traceback": null, "children": [],
                   "date_done": "2025-12-06T00:13:20.123000+00:00", "task_id": "id-1"})
        );
        let failed = CeleryState::Failure {
            module: "builtins".into(),
            class: "RuntimeError".into(),
            message: "exit code 3".into(),
            traceback: Some("disk full\n".into()),
        }
        .meta("id-2", at);
        assert_eq!(failed["status"], "FAILURE");
        assert_eq!(
            failed["result"],
            json!({"exc_type": "RuntimeError", "exc_message": ["exit code 3"], "exc_module": "builtins"})
        );
        assert_eq!(failed["traceback"], "disk full\n");
        let revoked = CeleryState::Revoked("expired".into()).meta("id-3", at);
        assert_eq!(revoked["result"]["exc_type"], "TaskRevokedError");
        assert_eq!(revoked["result"]["exc_module"], "celery.exceptions");
        assert_eq!(revoked["result"]["exc_message"], json!(["expired"]));
        let started = CeleryState::Started {
            hostname: "h".into(),
            pid: 7,
        }
        .meta("id-4", at);
        assert_eq!(started["status"], "STARTED");
        assert_eq!(started["date_done"], Value::Null);
        assert_eq!(started["result"], json!({"pid": 7, "hostname": "h"}));
    }

    #[test]
    fn iso_times_follow_the_instant_asked_for() {
        // The same instant twice (the second from the kept text), then others.
        let at = 1_764_980_000_123;
        assert_eq!(iso_time(at), "2025-12-06T00:13:20.123000+00:00");
        assert_eq!(iso_time(at), "2025-12-06T00:13:20.123000+00:00");
        assert_eq!(iso_time(at + 1), "2025-12-06T00:13:20.124000+00:00");
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(iso_time(at), "2025-12-06T00:13:20.123000+00:00");
    }
}
