//! The decisions of a flow-limited claim (rule 15), written once for the backends that park
//! blocked tasks in their store (SQLite, PostgreSQL): a [`FlowWalk`] is told about each
//! ready task it reads and answers what to do with it, asking first for the numbers it does
//! not know yet (a key's holders, a rate's TAT); the backend does the reads and writes it
//! asks for, inside its claim's transaction.

use std::collections::HashMap;

use super::Flow;
use crate::model::UnixMs;

/// `parked` of a task whose concurrency key is full.
pub(crate) const KEY_FULL: i16 = 1;
/// `parked` of a task whose rate key must wait.
pub(crate) const RATE_WAITS: i16 = 2;

/// What a [`FlowWalk`] wants done with the task it was shown.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FlowStep {
    /// Count the held tasks with this concurrency key, tell [`FlowWalk::held`], ask again.
    Holders(String),
    /// Read this rate key's TAT, tell [`FlowWalk::tat`], ask again.
    Tat(String),
    /// Park the task (`kind` [`KEY_FULL`] or [`RATE_WAITS`]) under `key` until `until` (ms;
    /// 0 for a full key); go on with the next task.
    Park {
        kind: i16,
        key: String,
        until: UnixMs,
    },
    /// Claim the task, storing the rate key's new TAT first when there is one.
    Take { tat: Option<(String, i64)> },
    /// The queue's one rate refuses every start now: end the walk.
    Stop,
}

/// One claim's walk over a queue's ready tasks under its limits.
pub(crate) struct FlowWalk {
    flow: Flow,
    now_us: i64,
    holders: HashMap<String, u32>,
    tats: HashMap<String, Option<i64>>,
    stopped_until: Option<i64>,
}

impl FlowWalk {
    pub(crate) fn new(flow: Flow, now: UnixMs) -> FlowWalk {
        FlowWalk {
            flow,
            now_us: now * 1000,
            holders: HashMap::new(),
            tats: HashMap::new(),
            stopped_until: None,
        }
    }

    /// The number of held tasks with concurrency key `key`, as the store counted it.
    pub(crate) fn held(&mut self, key: String, held: u32) {
        self.holders.insert(key, held);
    }

    /// Rate key `key`'s stored TAT (µs), if it has one.
    pub(crate) fn tat(&mut self, key: String, tat: Option<i64>) {
        self.tats.insert(key, tat);
    }

    /// What to do with a ready task of concurrency key `flow_key` and rate key `rate_key`.
    /// A `Take` counts the task as held and moves the rate's TAT at once.
    pub(crate) fn step(&mut self, flow_key: Option<&str>, rate_key: Option<&str>) -> FlowStep {
        if let (Some(limit), Some(k)) = (self.flow.per_key, flow_key) {
            match self.holders.get(k) {
                None => return FlowStep::Holders(k.to_string()),
                Some(&held) if held >= limit => {
                    return FlowStep::Park {
                        kind: KEY_FULL,
                        key: k.to_string(),
                        until: 0,
                    }
                }
                Some(_) => {}
            }
        }
        let mut new_tat = None;
        if let Some(rate) = self.flow.rate {
            let key = if rate.keyed {
                rate_key.unwrap_or_default()
            } else {
                ""
            };
            let Some(&tat) = self.tats.get(key) else {
                return FlowStep::Tat(key.to_string());
            };
            match rate.take(tat, self.now_us) {
                Ok(next) => {
                    self.tats.insert(key.to_string(), Some(next));
                    new_tat = Some((key.to_string(), next));
                }
                Err(at) if rate.keyed => {
                    return FlowStep::Park {
                        kind: RATE_WAITS,
                        key: key.to_string(),
                        until: (at + 999) / 1000,
                    }
                }
                Err(at) => {
                    self.stopped_until = Some(at);
                    return FlowStep::Stop;
                }
            }
        }
        if let Some(k) = flow_key {
            *self.holders.entry(k.to_string()).or_insert(0) += 1;
        }
        FlowStep::Take { tat: new_tat }
    }

    /// Whether the claim's wait needs the earliest `until` of the queue's rate-parked keys.
    pub(crate) fn wants_parked_until(&self) -> bool {
        self.flow.rate.is_some_and(|r| r.keyed)
    }

    /// The first ms another start is allowed, when a rate refused one: the queue's rate
    /// stopped the walk, or (`parked_until`) a parked rate key's time comes.
    pub(crate) fn wait(&self, parked_until: Option<UnixMs>) -> Option<UnixMs> {
        let stopped = self.stopped_until.map(|us| (us + 999) / 1000);
        match (stopped, parked_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How many parked tasks of a `kind` key may go back to the ready index now (`held`: the
/// key's held tasks, needed for a full key under a concurrency limit only); `i64::MAX` when
/// the limit that parked them is gone.
pub(crate) fn room(flow: Flow, kind: i16, until: UnixMs, now: UnixMs, held: Option<u32>) -> i64 {
    if kind == KEY_FULL {
        match flow.per_key {
            Some(limit) => i64::from(limit) - i64::from(held.unwrap_or(0)),
            None => i64::MAX,
        }
    } else {
        match flow.rate {
            Some(_) if until > now => 0,
            Some(rate) => i64::from(rate.burst),
            None => i64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::RateLimit;
    use crate::config::Rate;

    fn rate(starts: u32, burst: u32, keyed: bool) -> Option<RateLimit> {
        Some(RateLimit {
            rate: Rate {
                starts,
                period_ms: 1000,
            },
            burst,
            keyed,
        })
    }

    #[test]
    fn a_full_key_parks_its_tasks_after_asking_for_its_holders() {
        let flow = Flow {
            per_key: Some(2),
            rate: None,
        };
        let mut w = FlowWalk::new(flow, 1_000);
        assert_eq!(w.step(Some("a"), None), FlowStep::Holders("a".into()));
        w.held("a".into(), 1);
        assert_eq!(w.step(Some("a"), None), FlowStep::Take { tat: None });
        let park = FlowStep::Park {
            kind: KEY_FULL,
            key: "a".into(),
            until: 0,
        };
        assert_eq!(w.step(Some("a"), None), park);
        assert_eq!(w.step(None, None), FlowStep::Take { tat: None });
        assert_eq!(w.wait(None), None);
    }

    #[test]
    fn a_queue_rate_stops_the_walk_and_a_keyed_rate_parks() {
        let mut w = FlowWalk::new(
            Flow {
                per_key: None,
                rate: rate(1, 1, false),
            },
            1_000,
        );
        assert_eq!(w.step(None, None), FlowStep::Tat(String::new()));
        w.tat(String::new(), None);
        let first = w.step(None, None);
        assert_eq!(
            first,
            FlowStep::Take {
                tat: Some((String::new(), 2_000_000))
            }
        );
        assert_eq!(w.step(None, None), FlowStep::Stop);
        assert_eq!(w.wait(Some(5_000)), Some(2_000));

        let mut w = FlowWalk::new(
            Flow {
                per_key: None,
                rate: rate(1, 1, true),
            },
            1_000,
        );
        w.tat("k".into(), Some(3_000_000));
        let parked = FlowStep::Park {
            kind: RATE_WAITS,
            key: "k".into(),
            until: 3_000,
        };
        assert_eq!(w.step(None, Some("k")), parked);
        assert!(w.wants_parked_until());
        assert_eq!(w.wait(Some(3_000)), Some(3_000));
    }

    #[test]
    fn room_puts_back_what_the_limits_allow() {
        let flow = Flow {
            per_key: Some(3),
            rate: rate(10, 4, true),
        };
        assert_eq!(room(flow, KEY_FULL, 0, 10, Some(1)), 2);
        assert_eq!(room(flow, KEY_FULL, 0, 10, Some(3)), 0);
        assert_eq!(room(flow, RATE_WAITS, 20, 10, None), 0);
        assert_eq!(room(flow, RATE_WAITS, 10, 10, None), 4);
        assert_eq!(room(Flow::default(), KEY_FULL, 0, 10, None), i64::MAX);
    }
}
