//! `[schedules.NAME]` tables: their keys (`keys::SCHEDULE`) and what only the whole table
//! can say: exactly one of `cron` and `every`, a queue of the config, a spec that fires at
//! all, and a payload that makes a task the queue can start (`config::runnable`, as at
//! submit).

use std::collections::BTreeMap;

use serde_json::Value;
use toml_edit::Item;

use super::super::units;
use super::{entries, keys, Cx, Entry, Place, Section};
use crate::config::schedule::MAX_CATCH_UP;
use crate::config::{runnable, Overlap, QueueConfig, ScheduleConfig};
use crate::model::QueueName;
use crate::slots::{self, Calendar, Missed, Spec, Zone};

/// A `[schedules.NAME]` table as read, before the checks that need all of it.
#[derive(Default)]
pub(in crate::config) struct ScheduleLayer {
    pub(in crate::config) queue: Option<(String, Place)>,
    pub(in crate::config) cron: Option<(Spec, Place)>,
    pub(in crate::config) every: Option<(Spec, Place)>,
    pub(in crate::config) timezone: Option<Zone>,
    pub(in crate::config) payload: Option<(Value, Place)>,
    pub(in crate::config) args: Option<Vec<String>>,
    pub(in crate::config) priority: Option<i32>,
    pub(in crate::config) missed: Option<Missed>,
    pub(in crate::config) max_catch_up: Option<u32>,
    pub(in crate::config) overlap: Option<Overlap>,
    pub(in crate::config) enabled: Option<bool>,
}

impl Cx<'_> {
    /// `cron = "…"`: 5 or 6 fields; the message names the field at fault.
    pub(in crate::config) fn cron(&mut self, entry: &Entry) -> Option<Spec> {
        let s = self.string(entry, "\"0 3 * * *\"")?;
        match slots::parse_cron(s) {
            Ok(spec) => Some(spec),
            Err(why) => {
                let fix = if s.trim().eq_ignore_ascii_case("@reboot") {
                    "remove the schedule; run the command from a systemd unit (see docs/config.md, \"From crontab\")".to_string()
                } else {
                    "write 5 fields `minute hour day-of-month month day-of-week` such as `cron = \"30 3 * * mon-fri\"`, or 6 with seconds first".to_string()
                };
                self.error(entry.value_span(), &entry.path, why, Some(fix));
                None
            }
        }
    }

    /// `every = "10m"`: a duration of whole seconds.
    pub(in crate::config) fn every(&mut self, entry: &Entry) -> Option<Spec> {
        let d = self.duration(entry)?;
        let text = entry.item.as_str().unwrap_or_default();
        match slots::parse_every(text, d) {
            Ok(spec) => Some(spec),
            Err(why) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    why,
                    Some(
                        "write whole seconds, such as `every = \"1s\"`, `\"90s\"` or `\"10m\"`"
                            .into(),
                    ),
                );
                None
            }
        }
    }

    /// `timezone = "Europe/Berlin"`: a name of the time zone database.
    pub(in crate::config) fn time_zone(&mut self, entry: &Entry) -> Option<Zone> {
        let s = self.string(entry, "\"Europe/Berlin\"")?;
        match Zone::named(s) {
            Ok(z) => Some(z),
            Err(why) => {
                let known = Zone::known_names();
                let refs: Vec<&str> = known.iter().map(String::as_str).collect();
                let lower = s.trim().to_ascii_lowercase();
                let fix = match refs
                    .iter()
                    .find(|n| n.to_ascii_lowercase() == lower)
                    .copied()
                    .or_else(|| units::closest(s.trim(), &refs))
                {
                    Some(near) => format!("did you mean `timezone = \"{near}\"`?"),
                    None => "write an IANA name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\" (`timedatectl list-timezones` lists them)".to_string(),
                };
                self.error(entry.value_span(), &entry.path, why, Some(fix));
                None
            }
        }
    }

    /// A table read as a JSON object (`payload = { month = "last" }`).
    pub(in crate::config) fn json_table(&mut self, entry: &Entry) -> Option<Value> {
        let Some(t) = entry.item.as_table_like() else {
            self.wrong_type(
                entry,
                "a table (the JSON object of the task's payload)",
                format!("write it as `{} = {{ month = \"last\" }}`", entry.name),
            );
            return None;
        };
        let mut out = serde_json::Map::new();
        for (k, item) in t.iter() {
            out.insert(k.to_string(), toml_to_json(item));
        }
        Some(Value::Object(out))
    }

    /// An array of strings (`args = ["--fast"]`).
    pub(in crate::config) fn strings(&mut self, entry: &Entry) -> Option<Vec<String>> {
        let list = entry.item.as_array().and_then(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
        });
        if list.is_none() {
            self.wrong_type(
                entry,
                "an array of strings",
                format!("write it as `{} = [\"--fast\", \"--\", \"x\"]`", entry.name),
            );
        }
        list
    }

    /// A string that is one of `names`.
    pub(in crate::config) fn one_of<'a>(
        &mut self,
        entry: &Entry<'a>,
        names: &[&str],
    ) -> Option<&'a str> {
        let s = self.string(entry, &format!("\"{}\"", names[0]))?;
        if names.contains(&s) {
            return Some(s);
        }
        let choices = names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let fix = match units::closest(s, names) {
            Some(near) => format!("did you mean `{} = \"{near}\"`?", entry.name),
            None => format!("write one of {choices}"),
        };
        self.error(
            entry.value_span(),
            &entry.path,
            format!("{} must be one of {choices}, found \"{s}\"", entry.name),
            Some(fix),
        );
        None
    }

    /// Every `[schedules.NAME]` table, checked against the queues of the config.
    pub(super) fn schedules(
        &mut self,
        tables: &[Entry],
        queues: &BTreeMap<QueueName, QueueConfig>,
        max_payload: usize,
        queues_broken: bool,
    ) -> crate::config::Schedules {
        let mut out = BTreeMap::new();
        for e in tables {
            if let Some(s) = self.schedule(e, queues, max_payload, queues_broken) {
                out.insert(s.name.clone(), std::sync::Arc::new(s));
            }
        }
        out
    }

    fn schedule(
        &mut self,
        entry: &Entry,
        queues: &BTreeMap<QueueName, QueueConfig>,
        max_payload: usize,
        queues_broken: bool,
    ) -> Option<ScheduleConfig> {
        let name_ok = match QueueName::check(entry.name) {
            Ok(()) if entry.name.starts_with('-') => Err(
                "it cannot start with `-`, which the command line reads as an option".to_string(),
            ),
            Ok(()) => Ok(()),
            Err(why) => Err(why.replace("a queue name", "a schedule name")),
        };
        if let Err(why) = &name_ok {
            self.error(
                entry.key_span(),
                &entry.path,
                format!("`{}` cannot be a schedule name: {why}", entry.name),
                Some("use 1 to 64 ASCII letters, digits, `_`, `-` and `.`, such as [schedules.nightly-report]".into()),
            );
        }
        let Some(t) = entry.item.as_table_like() else {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "schedule `{}` must be a table, found {}",
                    entry.name,
                    entry.found()
                ),
                Some(format!(
                    "write a [schedules.{}] table with `queue` and `cron` or `every`",
                    entry.name
                )),
            );
            return None;
        };
        let mut l = ScheduleLayer::default();
        let mut ok = name_ok.is_ok();
        for sub in entries(t, &entry.path) {
            match keys::find(keys::SCHEDULE, sub.name) {
                Some(key) => ok &= (key.read)(self, &sub, &mut l),
                None => {
                    let valid: Vec<&str> = keys::names(keys::SCHEDULE).collect();
                    self.unknown_key(
                        &sub,
                        Section::Schedule,
                        &format!("in [{}]", entry.path),
                        &valid,
                    );
                    ok = false;
                }
            }
        }
        let spec = match (l.cron.take(), l.every.take()) {
            (Some((c, _)), None) => Some(c),
            (None, Some((v, _))) => Some(v),
            (Some(_), Some((_, at))) => {
                self.error(
                    at.span,
                    &at.key,
                    format!("schedule `{}` sets both `cron` and `every`", entry.name),
                    Some("keep one of them".into()),
                );
                None
            }
            (None, None) => {
                if ok {
                    self.error(
                        entry.value_span(),
                        &entry.path,
                        format!(
                            "schedule `{}` has no time: it needs `cron` or `every`",
                            entry.name
                        ),
                        Some(
                            "add `cron = \"0 3 * * *\"` (03:00 every day) or `every = \"10m\"`"
                                .into(),
                        ),
                    );
                }
                None
            }
        };
        let queue = match l.queue.take() {
            None => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!(
                        "schedule `{}` has no `queue`: it does not say what to run",
                        entry.name
                    ),
                    Some("add `queue = \"NAME\"`, one of the [queues.NAME] of this file".into()),
                );
                None
            }
            Some((q, at)) => match q
                .parse::<QueueName>()
                .ok()
                .filter(|q| queues.contains_key(q))
            {
                Some(q) => Some(q),
                // An invalid queue table was reported already; its schedule would only repeat it.
                None if queues_broken => None,
                None => {
                    let known: Vec<&str> = queues.keys().map(|q| q.as_str()).collect();
                    let fix = match units::closest(&q, &known) {
                        Some(near) => format!("did you mean `queue = \"{near}\"`?"),
                        None if known.is_empty() => "add a [queues.NAME] table for it".to_string(),
                        None => {
                            format!("name one of the queues of this file: {}", known.join(", "))
                        }
                    };
                    self.error(at.span, &at.key, format!("unknown queue `{q}`"), Some(fix));
                    None
                }
            },
        };
        let zone_set = l.timezone.is_some();
        let zone = l.timezone.take().unwrap_or_else(Zone::local);
        let calendar = spec.map(|spec| Calendar { spec, zone });
        if let Some(c) = &calendar {
            if !c.ever_after(crate::model::now_ms()) {
                let at = Place::of(
                    &entries(t, &entry.path)
                        .into_iter()
                        .find(|x| x.name == "cron")
                        .expect("a cron spec came from `cron`"),
                );
                self.error(
                    at.span,
                    &at.key,
                    format!(
                        "{} never fires: no date matches it (such as February 30th, or the 31st of a 30-day month)",
                        c.spec.show()
                    ),
                    Some("fix the day of month or the month; `L` means the last day of the month".into()),
                );
                ok = false;
            }
        }
        let payload = l.payload.take();
        let args = l.args.take().unwrap_or_default();
        let mut flow_keys = (None, None);
        let expires = queue
            .as_ref()
            .and_then(|q| queues.get(q))
            .and_then(|q| q.expires);
        if let Some(q) = queue.as_ref().and_then(|q| queues.get(q)) {
            let value = payload
                .as_ref()
                .map(|(v, _)| v.clone())
                .unwrap_or_else(|| Value::Object(Default::default()));
            let (span, key) = match &payload {
                Some((_, at)) => (at.span.clone(), at.key.clone()),
                None => (entry.value_span(), entry.path.clone()),
            };
            let text = value.to_string();
            let checked =
                runnable::argv(q, &value, &args).and_then(|_| crate::config::flow::keys(q, &value));
            if let Ok(keys) = &checked {
                flow_keys = keys.clone();
            }
            if let Err(why) = checked {
                self.error(
                    span.clone(),
                    &key,
                    format!(
                        "schedule `{}` would enqueue a task queue `{}` cannot run: {why}",
                        entry.name, q.name
                    ),
                    Some(format!(
                        "give `payload` the fields queue `{}` needs, such as `payload = {{ {} }}`",
                        q.name,
                        q.required_fields()
                            .iter()
                            .map(|f| format!("{f} = \"…\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
                ok = false;
            } else if text.len() > max_payload {
                self.error(
                    span,
                    &key,
                    format!(
                        "the payload is {} bytes, over `max_payload` ({max_payload} bytes)",
                        text.len()
                    ),
                    Some("make the payload smaller, or raise `max_payload` in [taskd]".into()),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let (queue, calendar) = (queue?, calendar?);
        let payload = payload
            .map(|(v, _)| v.to_string())
            .unwrap_or_else(|| "{}".to_string());
        Some(ScheduleConfig {
            name: entry.name.to_string(),
            queue,
            calendar,
            zone_set,
            payload,
            args,
            priority: l.priority.unwrap_or(0),
            missed: l.missed.unwrap_or_default(),
            max_catch_up: l.max_catch_up.unwrap_or(MAX_CATCH_UP),
            overlap: l.overlap.unwrap_or_default(),
            enabled: l.enabled.unwrap_or(true),
            flow_key: flow_keys.0,
            rate_key: flow_keys.1,
            expires,
        })
    }
}

/// A TOML value as JSON: tables become objects, datetimes their RFC 3339 text.
fn toml_to_json(item: &Item) -> Value {
    use toml_edit::Value as T;
    fn value(item: &T) -> Value {
        match item {
            T::String(s) => Value::String(s.value().clone()),
            T::Integer(i) => Value::from(*i.value()),
            T::Float(f) => serde_json::Number::from_f64(*f.value())
                .map(Value::Number)
                .unwrap_or(Value::Null),
            T::Boolean(b) => Value::Bool(*b.value()),
            T::Datetime(d) => Value::String(d.value().to_string()),
            T::Array(a) => Value::Array(a.iter().map(value).collect()),
            T::InlineTable(t) => {
                Value::Object(t.iter().map(|(k, v)| (k.to_string(), value(v))).collect())
            }
        }
    }
    match item {
        Item::Value(v) => value(v),
        Item::Table(t) => Value::Object(
            t.iter()
                .map(|(k, i)| (k.to_string(), toml_to_json(i)))
                .collect(),
        ),
        Item::ArrayOfTables(a) => Value::Array(
            a.iter()
                .map(|t| {
                    Value::Object(
                        t.iter()
                            .map(|(k, i)| (k.to_string(), toml_to_json(i)))
                            .collect(),
                    )
                })
                .collect(),
        ),
        Item::None => Value::Null,
    }
}
