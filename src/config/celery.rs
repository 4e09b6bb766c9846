//! `[celery]`: the Celery bridge's settings (docs/celery.md). The bridge ingests the
//! messages Celery producers publish to their broker into taskd's own store, and writes each
//! task's end where Celery's client reads it. The keys are defined in `keys.rs` (`CELERY`),
//! read in `validate/celery.rs`.

use std::time::Duration;

use super::Secret;
use crate::model::QueueName;

/// A validated `[celery]` table.
#[derive(Clone, Debug)]
pub struct CeleryConfig {
    /// The broker the producers publish to (`broker`).
    pub broker: CeleryBroker,
    /// Where results are written (`result_backend`); `None`: nowhere.
    pub result_backend: Option<CeleryBackend>,
    /// The Celery queues consumed (`queues`), in the order they are served.
    pub queues: Vec<String>,
    /// Task name → taskd queue (`[celery.tasks]`), exact names first, then patterns in the
    /// order written.
    pub tasks: Vec<Route>,
    /// Write STARTED when a task starts, for routes that do not say (`track_started`).
    pub track_started: bool,
    /// How long a result stays in the result backend (`result_expires`).
    pub result_expires: Duration,
    /// After how long an unacknowledged message of a consumer that went away is delivered
    /// again (`visibility_timeout`, kombu's Redis transport option of the same name).
    pub visibility_timeout: Duration,
    /// AMQP: at most this many delivered and not yet acknowledged messages per consumed
    /// queue (`prefetch`, `basic.qos`).
    pub prefetch: u16,
}

/// `broker`: where the producers publish.
#[derive(Clone, Debug)]
pub enum CeleryBroker {
    /// `redis://` or `rediss://`: kombu's Redis transport.
    Redis { url: Secret },
    /// `amqp://` or `amqps://`: AMQP 0-9-1 (RabbitMQ).
    Amqp { url: Secret },
}

/// `result_backend`: where results are written.
#[derive(Clone, Debug)]
pub enum CeleryBackend {
    /// `redis://…`: Celery's Redis result backend (`celery-task-meta-<id>`).
    Redis { url: Secret },
    /// `rpc://`: replies over the AMQP broker to the producer's `reply_to` queue.
    Rpc,
}

/// One entry of `[celery.tasks]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// A task name, or a pattern where `*` stands for any run of characters.
    pub pattern: String,
    pub queue: QueueName,
    /// Write STARTED when the task starts (its own `track_started`, else the table's).
    pub track_started: bool,
}

impl Route {
    fn is_pattern(&self) -> bool {
        self.pattern.contains('*')
    }

    fn matches(&self, name: &str) -> bool {
        if !self.is_pattern() {
            return self.pattern == name;
        }
        glob(&self.pattern, name)
    }
}

/// `*` matches any run of characters (dots included); everything else matches itself.
fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = parts.split_first().expect("split yields one part at least");
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

impl CeleryConfig {
    /// The route of task `name`: its exact entry, else the first pattern (in the order
    /// written) that matches it; `None`: the name is not mapped.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.tasks
            .iter()
            .find(|r| !r.is_pattern() && r.matches(name))
            .or_else(|| {
                self.tasks
                    .iter()
                    .find(|r| r.is_pattern() && r.matches(name))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(pattern: &str, queue: &str) -> Route {
        Route {
            pattern: pattern.into(),
            queue: queue.parse().unwrap(),
            track_started: false,
        }
    }

    #[test]
    fn exact_names_win_then_patterns_in_order() {
        let c = CeleryConfig {
            broker: CeleryBroker::Redis {
                url: Secret::new("redis://x".into()),
            },
            result_backend: None,
            queues: vec!["celery".into()],
            tasks: vec![
                route("app.*", "default"),
                route("app.tasks.alert", "alerts"),
                route("app.tasks.*", "tasks"),
                route("*.report", "reports"),
            ],
            track_started: false,
            result_expires: Duration::from_secs(86400),
            visibility_timeout: Duration::from_secs(3600),
            prefetch: 100,
        };
        let q = |name: &str| c.route(name).map(|r| r.queue.to_string());
        assert_eq!(q("app.tasks.alert").as_deref(), Some("alerts"));
        assert_eq!(q("app.tasks.other").as_deref(), Some("default"));
        assert_eq!(q("billing.report").as_deref(), Some("reports"));
        assert_eq!(q("billing.reports"), None);
        assert_eq!(q("app"), None);
        assert_eq!(q("app."), Some("default".into()));
    }

    #[test]
    fn glob_matches_runs_of_any_characters() {
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "abc"));
        assert!(glob("a*b*c", "a.x.b.y.c"));
        assert!(!glob("a*b*c", "a.x.c"));
        assert!(
            !glob("ab*ba", "aba"),
            "the prefix and suffix may not overlap"
        );
        assert!(glob("a*ba", "aba"));
        assert!(glob("a*a", "aa"));
        assert!(!glob("a*a", "a"));
    }
}
