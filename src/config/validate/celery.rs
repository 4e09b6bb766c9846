//! `[celery]`: its keys (`keys::CELERY`) and what only the whole file can say: `broker` and
//! `[celery.tasks]` are set, each entry names a queue of the config, and `rpc://` goes with
//! an AMQP broker.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{entries, keys, Cx, Entry, Place, Section};
use crate::config::celery::{CeleryBackend, CeleryBroker, CeleryConfig, Route};
use crate::config::{QueueConfig, Secret};
use crate::model::QueueName;

/// Celery's own default for `result_expires`: one day.
const RESULT_EXPIRES: Duration = Duration::from_secs(86_400);
/// kombu's default `visibility_timeout`: one hour.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3_600);
/// AMQP: unacknowledged messages per consumed queue.
pub(in crate::config) const PREFETCH: u16 = 2000;

/// One `[celery.tasks]` entry as read, with where its queue was written.
pub(in crate::config) struct RouteLayer {
    pattern: String,
    queue: (String, Place),
    track_started: Option<bool>,
}

/// `[celery]` as read, before the checks that need the whole file.
#[derive(Default)]
pub(in crate::config) struct CeleryLayer {
    pub(in crate::config) broker: Option<CeleryBroker>,
    pub(in crate::config) result_backend: Option<CeleryBackend>,
    pub(in crate::config) queues: Option<Vec<String>>,
    pub(in crate::config) tasks: Option<Vec<RouteLayer>>,
    pub(in crate::config) track_started: Option<bool>,
    pub(in crate::config) result_expires: Option<Duration>,
    pub(in crate::config) visibility_timeout: Option<Duration>,
    pub(in crate::config) prefetch: Option<u16>,
    /// Where `result_backend` was written, for the check against `broker`.
    backend_place: Option<Place>,
}

fn scheme(text: &str) -> Option<String> {
    text.trim()
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
}

impl Cx<'_> {
    /// `broker = "redis://…"` or `"amqp://…"`.
    pub(in crate::config) fn celery_broker(&mut self, entry: &Entry) -> Option<CeleryBroker> {
        let s = self.string(entry, "\"redis://127.0.0.1:6379/0\"")?;
        let url = Secret::new(s.trim().to_string());
        match scheme(s).as_deref() {
            Some("redis" | "rediss") => match self.celery_redis_url(entry, s) {
                true => Some(CeleryBroker::Redis { url }),
                false => None,
            },
            Some("amqp" | "amqps") => Some(CeleryBroker::Amqp { url }),
            _ => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    "the Celery broker must be a `redis://`, `rediss://`, `amqp://` or `amqps://` URL",
                    Some("write the URL your Celery app's `broker_url` names, such as `broker = \"redis://127.0.0.1:6379/0\"` or `broker = \"amqp://guest:guest@127.0.0.1:5672//\"`".into()),
                );
                None
            }
        }
    }

    /// Whether `text` is a Redis URL the client reads; says why not (never repeating the
    /// URL, which may hold a password).
    fn celery_redis_url(&mut self, entry: &Entry, text: &str) -> bool {
        #[cfg(feature = "redis")]
        {
            match redis::IntoConnectionInfo::into_connection_info(text.trim()) {
                Ok(_) => true,
                Err(e) => {
                    self.error(
                        entry.value_span(),
                        &entry.path,
                        format!("the Redis URL is invalid: {}", e.detail().unwrap_or("unreadable")),
                        Some("write it as `redis://[:password@]host[:port][/db]`, such as \"redis://127.0.0.1:6379/0\"".into()),
                    );
                    false
                }
            }
        }
        #[cfg(not(feature = "redis"))]
        {
            let _ = text;
            self.error(
                entry.value_span(),
                &entry.path,
                "this taskd was built without Redis support (the `redis` feature)",
                Some("use a taskd built with the default features".into()),
            );
            false
        }
    }

    /// `result_backend = "redis://…"` or `"rpc://"`.
    pub(in crate::config) fn celery_backend(&mut self, entry: &Entry) -> Option<CeleryBackend> {
        let s = self.string(entry, "\"redis://127.0.0.1:6379/1\"")?;
        match scheme(s).as_deref() {
            Some("redis" | "rediss") => {
                self.celery_redis_url(entry, s)
                    .then(|| CeleryBackend::Redis {
                        url: Secret::new(s.trim().to_string()),
                    })
            }
            Some("rpc") => Some(CeleryBackend::Rpc),
            _ => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    "the Celery result backend must be a `redis://` (or `rediss://`) URL or `rpc://`",
                    Some("write the URL your Celery app's `result_backend` names, such as `result_backend = \"redis://127.0.0.1:6379/1\"`, or remove the key to write no results".into()),
                );
                None
            }
        }
    }

    /// `queues = ["celery", "alerts"]`: at least one, none empty, none twice.
    pub(in crate::config) fn celery_queues(&mut self, entry: &Entry) -> Option<Vec<String>> {
        let list = self.strings(entry)?;
        let problem = if list.is_empty() {
            Some("queues is empty: the bridge would consume nothing".to_string())
        } else if list.iter().any(|q| q.trim().is_empty()) {
            Some("a Celery queue name cannot be empty".to_string())
        } else {
            list.iter()
                .enumerate()
                .find(|(i, q)| list[..*i].contains(q))
                .map(|(_, q)| format!("the queue \"{q}\" is listed twice"))
        };
        match problem {
            Some(message) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    message,
                    Some("list the Celery queues to consume once each, such as `queues = [\"celery\", \"alerts\"]`".into()),
                );
                None
            }
            None => Some(list),
        }
    }

    /// `[celery.tasks]`: name → `"queue"` or `{ queue = "…", track_started = … }`.
    pub(in crate::config) fn celery_tasks(&mut self, entry: &Entry) -> Option<Vec<RouteLayer>> {
        let t = self.table(entry, "a [celery.tasks] table")?;
        let mut out = Vec::new();
        for e in entries(t, &entry.path) {
            if e.name.trim().is_empty() {
                self.error(
                    e.key_span(),
                    &e.path,
                    "a Celery task name cannot be empty",
                    Some("write the task's name as Celery registers it, such as `\"app.tasks.alert_friends\" = \"alerts\"`".into()),
                );
                continue;
            }
            if let Some(q) = e.item.as_str() {
                out.push(RouteLayer {
                    pattern: e.name.to_string(),
                    queue: (q.to_string(), Place::of(&e)),
                    track_started: None,
                });
                continue;
            }
            let Some(sub) = e.item.as_table_like() else {
                self.wrong_type(
                    &e,
                    "a queue name or a table",
                    format!("write `\"{}\" = \"default\"` or `\"{}\" = {{ queue = \"default\", track_started = true }}`", e.name, e.name),
                );
                continue;
            };
            let mut queue = None;
            let mut track_started = None;
            let mut known = true;
            for s in entries(sub, &e.path) {
                match s.name {
                    "queue" => {
                        queue = self
                            .string(&s, "\"default\"")
                            .map(|q| (q.to_string(), Place::of(&s)))
                    }
                    "track_started" => track_started = self.boolean(&s),
                    _ => {
                        self.unknown_key(
                            &s,
                            Section::CeleryTask,
                            &format!("in {}", e.path),
                            &["queue", "track_started"],
                        );
                        known = false;
                    }
                }
            }
            match queue {
                Some(queue) => out.push(RouteLayer {
                    pattern: e.name.to_string(),
                    queue,
                    track_started,
                }),
                None if !known => {}
                None => {
                    self.error(
                        e.value_span(),
                        &e.path,
                        format!("`{}` names no queue", e.name),
                        Some(format!(
                            "add `queue = \"default\"`: `\"{}\" = {{ queue = \"default\" }}`",
                            e.name
                        )),
                    );
                }
            }
        }
        // Entries read well are checked against the queues even when others were not: every
        // problem is reported at once (the file is refused either way).
        Some(out)
    }

    /// The `[celery]` table, checked against the queues of the config.
    pub(super) fn celery(
        &mut self,
        entry: &Entry,
        queues: &BTreeMap<QueueName, QueueConfig>,
        queues_broken: bool,
    ) -> Option<CeleryConfig> {
        let t = self.table(entry, "a [celery] table")?;
        let mut l = CeleryLayer::default();
        let mut ok = true;
        for sub in entries(t, &entry.path) {
            match keys::find(keys::CELERY, sub.name) {
                Some(key) => {
                    ok &= (key.read)(self, &sub, &mut l);
                    if sub.name == "result_backend" {
                        l.backend_place = Some(Place::of(&sub));
                    }
                }
                None => {
                    let valid: Vec<&str> = keys::names(keys::CELERY).collect();
                    self.unknown_key(&sub, Section::Celery, "in [celery]", &valid);
                    ok = false;
                }
            }
        }
        if l.broker.is_none() && t.get("broker").is_none() {
            self.error(
                entry.value_span(),
                &entry.path,
                "[celery] has no `broker`: the bridge needs the broker the producers publish to",
                Some("add `broker = \"redis://127.0.0.1:6379/0\"` (the URL of your Celery app's `broker_url`)".into()),
            );
            ok = false;
        }
        if l.tasks.is_none() && t.get("tasks").is_none() {
            self.error(
                entry.value_span(),
                &entry.path,
                "[celery] has no [celery.tasks] table: no Celery task would have a queue to run on",
                Some("add a [celery.tasks] table such as `\"app.tasks.*\" = \"default\"`, naming queues of this file".into()),
            );
            ok = false;
        }
        if let (Some(CeleryBroker::Redis { .. }), Some(CeleryBackend::Rpc), Some(at)) =
            (&l.broker, &l.result_backend, &l.backend_place)
        {
            self.error(
                at.span.clone(),
                &at.key,
                "`rpc://` replies over an AMQP broker, and the Celery broker here is Redis",
                Some("write `result_backend = \"redis://…/1\"` (what your Celery app's `result_backend` names)".into()),
            );
            ok = false;
        }
        let track_started = l.track_started.unwrap_or(false);
        let mut tasks = Vec::new();
        for r in l.tasks.unwrap_or_default() {
            let (name, at) = r.queue;
            let queue = name
                .parse::<QueueName>()
                .ok()
                .filter(|q| queues.contains_key(q));
            match queue {
                Some(queue) => tasks.push(Route {
                    pattern: r.pattern,
                    queue,
                    track_started: r.track_started.unwrap_or(track_started),
                }),
                None => {
                    if !queues_broken {
                        let known: Vec<&str> = queues.keys().map(|q| q.as_str()).collect();
                        let fix = match crate::config::units::closest(&name, &known) {
                            Some(near) => format!("did you mean \"{near}\"?"),
                            None if known.is_empty() => {
                                "define the queue as a [queues.NAME] table in this file".to_string()
                            }
                            None => {
                                format!("name one of the queues of this file: {}", known.join(", "))
                            }
                        };
                        self.error(
                            at.span,
                            &at.key,
                            format!("Celery tasks `{}` go to queue \"{name}\", which this file does not define", r.pattern),
                            Some(fix),
                        );
                    }
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        // Exact names are looked up before patterns; keep each group in the order written.
        tasks.sort_by_key(|r| r.pattern.contains('*'));
        Some(CeleryConfig {
            broker: l.broker?,
            result_backend: l.result_backend,
            queues: l.queues.unwrap_or_else(|| vec!["celery".to_string()]),
            tasks,
            track_started,
            result_expires: l.result_expires.unwrap_or(RESULT_EXPIRES),
            visibility_timeout: l.visibility_timeout.unwrap_or(VISIBILITY_TIMEOUT),
            prefetch: l.prefetch.unwrap_or(PREFETCH),
        })
    }
}
