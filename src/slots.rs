//! Slot arithmetic for `[schedules.NAME]`: which instants a schedule fires at, and what to
//! do with the slots that came due while nobody fired them. Pure functions of their
//! arguments (no clock, no broker): the config validates specs with them, and the daemon's
//! scheduler asks them for the next slot and for a plan when it finds slots already due.
//!
//! - **`cron`**: 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds
//!   first, parsed by `croner`, and searched on the *wall clock* of the schedule's time zone
//!   (`jiff`, IANA names). Each matching local time becomes one instant: a local time that
//!   does not exist that day (the spring-forward gap) fires once, at the first instant after
//!   the gap; one that occurs twice (the fall-back fold) fires once, at its first occurrence.
//!   Several local times of one gap map to the same instant and fire once between them.
//! - **`every`**: whole seconds; the slots are the multiples of the period counted from the
//!   Unix epoch (`every = "10m"` fires at :00, :10, … UTC), the same on every node and after
//!   every restart. Time zones do not move them.
//!
//! A slot is identified by its instant (UTC milliseconds); slots are always whole seconds.

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;

use crate::model::UnixMs;

/// The newest due slot still counts as on time while it is less late than this (and its
/// successor is not due yet); see [`plan`].
pub const ON_TIME_MS: i64 = 5_000;
/// How many due slots [`Calendar::due`] walks forward before it counts no further.
pub const COUNT_CAP: u64 = 100_000;
/// The longest fold (a repeated hour) any time zone has now; backward searches start this far
/// ahead of their target so that a second pass of a fold is searched too.
const FOLD_SLACK_MS: i64 = 3 * 3_600_000;

/// The fields of a cron expression in order, for messages: `(name, what it takes)`.
const FIELDS_5: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31, L, or W after a day"),
    ("month", "1-12 or JAN-DEC"),
    (
        "day of week",
        "0-7 (0 and 7 are Sunday) or SUN-SAT, L and # after a day",
    ),
];

/// A time zone with the name taskd shows for it.
#[derive(Clone, Debug)]
pub struct Zone {
    tz: TimeZone,
    name: String,
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}

impl Zone {
    /// The IANA zone `name` ("Europe/Berlin"), or why it is not one.
    pub fn named(name: &str) -> Result<Zone, String> {
        let t = name.trim();
        if t.is_empty() {
            return Err("the time zone is empty".into());
        }
        TimeZone::get(t)
            .map(|tz| Zone {
                tz,
                name: t.to_string(),
            })
            .map_err(|_| format!("unknown time zone \"{t}\" (not in the time zone database)"))
    }

    /// The machine's local zone, as cron reads it: `TZ`, else `/etc/localtime`; UTC when
    /// neither names one.
    pub fn local() -> Zone {
        match TimeZone::try_system() {
            Ok(tz) => {
                let name = tz
                    .iana_name()
                    .map(str::to_string)
                    .or_else(|| std::env::var("TZ").ok().filter(|s| !s.is_empty()))
                    .unwrap_or_else(|| "local".to_string());
                Zone { tz, name }
            }
            Err(_) => Zone::utc(),
        }
    }

    pub fn utc() -> Zone {
        Zone {
            tz: TimeZone::UTC,
            name: "UTC".to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every zone name the database knows, for did-you-mean suggestions.
    pub fn known_names() -> Vec<String> {
        jiff::tz::db().available().map(|n| n.to_string()).collect()
    }

    /// `at` as a local time with its offset: `2026-03-29T03:00:00+02:00`.
    pub fn show(&self, at: UnixMs) -> String {
        match Timestamp::from_millisecond(at) {
            Ok(ts) => ts
                .to_zoned(self.tz.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string(),
            Err(_) => at.to_string(),
        }
    }
}

/// `at` in RFC 3339 UTC, to the second: `2026-03-29T01:00:00Z`. A slot's name.
pub fn show_utc(at: UnixMs) -> String {
    match Timestamp::from_millisecond(at) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => at.to_string(),
    }
}

/// When a schedule fires, without its zone.
#[derive(Clone, Debug)]
pub enum Spec {
    /// A cron expression, as written (whitespace collapsed); checked when it was read.
    /// The parsed pattern is not kept: croner's takes ~5 KiB (a bit per year up to 5000),
    /// and parsing it again takes microseconds, once per slot.
    Cron { text: String },
    /// A fixed period in milliseconds (whole seconds), as written (`"10m"`).
    Every { ms: i64, text: String },
}

impl PartialEq for Spec {
    fn eq(&self, other: &Spec) -> bool {
        match (self, other) {
            (Spec::Cron { text: a }, Spec::Cron { text: b }) => a == b,
            (Spec::Every { ms: a, .. }, Spec::Every { ms: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Spec {
    /// As the config writes it: `cron = "0 3 * * *"` or `every = "10m"`.
    pub fn show(&self) -> String {
        match self {
            Spec::Cron { text, .. } => format!("cron \"{text}\""),
            Spec::Every { text, .. } => format!("every \"{text}\""),
        }
    }
}

/// Why a cron expression was refused: a sentence that names the field at fault.
pub fn parse_cron(text: &str) -> Result<Spec, String> {
    let norm: Vec<&str> = text.split_whitespace().collect();
    let joined = norm.join(" ");
    if joined.is_empty() {
        return Err("the cron expression is empty".into());
    }
    if joined.eq_ignore_ascii_case("@reboot") {
        return Err("`@reboot` names no time: taskd schedules run at times, and a task that must run when the machine starts belongs in a systemd unit (or `taskd submit` from its ExecStartPost=)".into());
    }
    if let Some(macro_) = joined.strip_prefix('@') {
        if ![
            "yearly", "annually", "monthly", "weekly", "daily", "midnight", "hourly",
        ]
        .iter()
        .any(|m| m.eq_ignore_ascii_case(macro_))
        {
            return Err(format!(
                "unknown cron macro `@{macro_}` (taskd knows @yearly, @annually, @monthly, @weekly, @daily, @midnight and @hourly)"
            ));
        }
    } else if norm.len() != 5 && norm.len() != 6 {
        return Err(format!(
            "a cron expression has 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first; \"{joined}\" has {}",
            norm.len()
        ));
    }
    let parser = parser();
    match parser.parse(&croner_text(&joined)) {
        Ok(_) => Ok(Spec::Cron { text: joined }),
        Err(e) => Err(field_at_fault(&parser, &norm).unwrap_or_else(|| {
            format!("\"{joined}\" is not a cron expression: {}", croner_says(&e))
        })),
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// The text croner reads for an expression (`@midnight` is its `@daily`).
fn croner_text(text: &str) -> String {
    if text.eq_ignore_ascii_case("@midnight") {
        "@daily".to_string()
    } else {
        text.to_string()
    }
}

/// The pattern of a spec's text (checked by [`parse_cron`] when the config was read).
fn compile(text: &str) -> Option<Cron> {
    parser().parse(&croner_text(text)).ok()
}

/// The first field of `fields` that croner refuses on its own (every other field `*`),
/// described for a person.
fn field_at_fault(parser: &CronParser, fields: &[&str]) -> Option<String> {
    let names: Vec<(&str, &str)> = if fields.len() == 6 {
        std::iter::once(("second", "0-59"))
            .chain(FIELDS_5)
            .collect()
    } else {
        FIELDS_5.to_vec()
    };
    for (i, field) in fields.iter().enumerate() {
        let alone: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { *field } else { "*" })
            .collect();
        if let Err(e) = parser.parse(&alone.join(" ")) {
            let (name, takes) = names[i];
            return Some(format!(
                "field {} ({name}) `{field}` is not valid: {} (it takes {takes}, `*`, ranges `a-b`, lists `a,b` and steps `*/n`)",
                i + 1,
                croner_says(&e)
            ));
        }
    }
    None
}

/// croner's message, without its type prefixes, as a lower-case phrase.
fn croner_says(error: &croner::errors::CronError) -> String {
    let s = error.to_string();
    let s = s
        .trim_start_matches("Component error: ")
        .trim_start_matches("Invalid pattern: ")
        .trim_start_matches("Pattern contains illegal characters: ")
        .trim_end_matches('.');
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s.to_string(),
    }
}

/// `every`'s period in ms, or why it cannot be one: whole seconds, at least one.
pub fn parse_every(text: &str, period: std::time::Duration) -> Result<Spec, String> {
    if period < std::time::Duration::from_secs(1) || period.subsec_nanos() != 0 {
        return Err(format!(
            "every = \"{}\" is not a whole number of seconds (at least 1s): slots are whole seconds",
            text.trim()
        ));
    }
    Ok(Spec::Every {
        ms: period.as_millis() as i64,
        text: text.trim().to_string(),
    })
}

/// A spec in a zone: the slots of one schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Calendar {
    pub spec: Spec,
    pub zone: Zone,
}

/// The slots that came due between two instants (see [`Calendar::due`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// How many; exact unless [`COUNT_CAP`] was reached (then at least that many).
    pub count: u64,
    pub exact: bool,
    /// The oldest due slot.
    pub first: Option<UnixMs>,
    /// The newest due slots, oldest first (at most the number asked for).
    pub newest: Vec<UnixMs>,
}

impl Calendar {
    /// What identifies these slots, stored with the schedule's record in the broker: a
    /// changed spec or zone starts the schedule afresh. `cron "0 3 * * *" in Europe/Berlin`.
    pub fn fingerprint(&self) -> String {
        match &self.spec {
            Spec::Cron { .. } => format!("{} in {}", self.spec.show(), self.zone.name()),
            Spec::Every { ms, .. } => format!("every {}s", ms / 1000),
        }
    }

    /// The first slot strictly after `at`; `None` if there is none (before the year 9999).
    pub fn next_after(&self, at: UnixMs) -> Option<UnixMs> {
        match &self.spec {
            Spec::Every { ms, .. } => Some((at.div_euclid(*ms) + 1) * ms),
            Spec::Cron { text } => self.next_cron(&compile(text)?, at),
        }
    }

    fn next_cron(&self, cron: &Cron, at: UnixMs) -> Option<UnixMs> {
        let ts = Timestamp::from_millisecond(at).ok()?;
        let mut c = ts.to_zoned(self.zone.tz.clone()).datetime();
        // Local times after a fold's second pass began map to its first pass, before `at`:
        // skip them (at most a fold's worth of matches).
        for _ in 0..200_000 {
            c = cron.find_next_occurrence(&c, false).ok()?;
            let s = self.instant(c)?;
            if s > at {
                return Some(s);
            }
        }
        None
    }

    /// The last slot strictly before `at`.
    pub fn prev_before(&self, at: UnixMs) -> Option<UnixMs> {
        match &self.spec {
            Spec::Every { ms, .. } => Some((at - 1).div_euclid(*ms) * ms),
            Spec::Cron { text } => {
                let cron = compile(text)?;
                let ts = Timestamp::from_millisecond(at.saturating_add(FOLD_SLACK_MS)).ok()?;
                let mut c = ts.to_zoned(self.zone.tz.clone()).datetime();
                for _ in 0..200_000 {
                    c = cron.find_previous_occurrence(&c, false).ok()?;
                    let s = self.instant(c)?;
                    if s < at {
                        return Some(s);
                    }
                }
                None
            }
        }
    }

    /// Whether the spec fires at all after `at` (`0 0 31 2 *` never does).
    pub fn ever_after(&self, at: UnixMs) -> bool {
        self.next_after(at).is_some()
    }

    /// The slots in `(after, upto]`, with the newest `keep` of them.
    pub fn due(&self, after: UnixMs, upto: UnixMs, keep: usize) -> Due {
        let mut out = Due {
            exact: true,
            ..Due::default()
        };
        if upto <= after {
            return out;
        }
        if let Spec::Every { ms, .. } = &self.spec {
            let first = (after.div_euclid(*ms) + 1) * ms;
            if first > upto {
                return out;
            }
            let last = upto.div_euclid(*ms) * ms;
            out.count = ((last - first) / ms + 1) as u64;
            out.first = Some(first);
            let n = (keep as u64).min(out.count) as i64;
            out.newest = (0..n).rev().map(|i| last - i * ms).collect();
            return out;
        }
        // Walk forward, keeping the newest `keep`; past the cap, find the newest backward.
        let Spec::Cron { text } = &self.spec else {
            return out;
        };
        let Some(cron) = compile(text) else {
            return out;
        };
        let mut t = after;
        let mut ring = std::collections::VecDeque::with_capacity(keep + 1);
        while let Some(s) = self.next_cron(&cron, t).filter(|s| *s <= upto) {
            out.first.get_or_insert(s);
            out.count += 1;
            ring.push_back(s);
            if ring.len() > keep {
                ring.pop_front();
            }
            t = s;
            if out.count >= COUNT_CAP {
                out.exact = false;
                let later = self.newest_upto(&cron, upto, t, keep);
                let mut all: Vec<UnixMs> = ring.into_iter().chain(later).collect();
                all.dedup();
                let from = all.len().saturating_sub(keep);
                out.newest = all.split_off(from);
                return out;
            }
        }
        out.newest = ring.into_iter().collect();
        out
    }

    /// The newest `keep` slots in `(after, upto]`, oldest first, found backward from `upto`.
    fn newest_upto(&self, cron: &Cron, upto: UnixMs, after: UnixMs, keep: usize) -> Vec<UnixMs> {
        let Ok(ts) = Timestamp::from_millisecond(upto.saturating_add(FOLD_SLACK_MS)) else {
            return Vec::new();
        };
        let mut c = ts.to_zoned(self.zone.tz.clone()).datetime();
        let mut out: Vec<UnixMs> = Vec::with_capacity(keep);
        while out.len() < keep {
            let Ok(prev) = cron.find_previous_occurrence(&c, false) else {
                break;
            };
            c = prev;
            let Some(s) = self.instant(c) else { break };
            if s <= after {
                break;
            }
            if s <= upto && out.last() != Some(&s) {
                out.push(s);
            }
        }
        out.reverse();
        out
    }

    /// The instant of local `time`: itself when it exists once; the first instant after the
    /// gap when it does not exist; its first occurrence when it exists twice.
    fn instant(&self, time: DateTime) -> Option<UnixMs> {
        let amb = self.zone.tz.to_ambiguous_timestamp(time);
        let ts = match amb.offset() {
            AmbiguousOffset::Unambiguous { .. } => amb.compatible().ok()?,
            AmbiguousOffset::Fold { .. } => amb.earlier().ok()?,
            AmbiguousOffset::Gap { after, .. } => {
                // Read with the offset after the gap, `time` is an instant before the clock
                // jumped; the transition that follows it is where the gap ends.
                let before_jump = after.to_timestamp(time).ok()?;
                self.zone
                    .tz
                    .following(before_jump)
                    .next()
                    .map(|tr| tr.timestamp())
                    .or_else(|| amb.compatible().ok())?
            }
        };
        Some(ts.as_millisecond())
    }
}

/// What a schedule does with the slots that passed while nobody fired them (`missed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Missed {
    /// Run none of them.
    Skip,
    /// One run, for the newest of them.
    #[default]
    Latest,
    /// Every one of them, at most `max_catch_up` (the newest).
    All,
}

impl Missed {
    pub const NAMES: [&'static str; 3] = ["skip", "latest", "all"];

    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::Latest => "latest",
            Missed::All => "all",
        }
    }

    pub fn parse(text: &str) -> Option<Missed> {
        match text {
            "skip" => Some(Missed::Skip),
            "latest" => Some(Missed::Latest),
            "all" => Some(Missed::All),
            _ => None,
        }
    }
}

/// One thing to record for a schedule, in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Fire `slot`; `caught_up` when it was missed and runs late because of `missed`.
    Fire { slot: UnixMs, caught_up: bool },
    /// Record `count` missed slots from `first` to `last` as skipped, saying why.
    Skip {
        first: UnixMs,
        last: UnixMs,
        count: u64,
        exact: bool,
        why: String,
    },
}

impl Step {
    /// The newest slot this step handles.
    pub fn last(&self) -> UnixMs {
        match self {
            Step::Fire { slot, .. } => *slot,
            Step::Skip { last, .. } => *last,
        }
    }
}

/// What to do with the slots in `(through, now]` (every slot up to `through` is handled).
///
/// The newest of them is *on time* when it is less than [`ON_TIME_MS`] late: it fires.
/// Every other one is *missed*: its time passed with nobody firing it (the daemon was down,
/// the schedule paused, the wall clock jumped forward, or the machine stalled past the next
/// slot), and `missed` decides: `skip` runs none, `latest` the newest, `all` the newest
/// `max_catch_up` (oldest first). Missed slots that do not run are one `Skip` step.
pub fn plan(
    cal: &Calendar,
    through: UnixMs,
    now: UnixMs,
    missed: Missed,
    max_catch_up: u32,
) -> Vec<Step> {
    let due = cal.due(through, now, max_catch_up as usize + 1);
    let Some(&newest) = due.newest.last() else {
        return Vec::new();
    };
    let on_time = now - newest < ON_TIME_MS;
    let mut missed_newest: Vec<UnixMs> = due.newest.clone();
    let mut n_missed = due.count;
    if on_time {
        missed_newest.pop();
        n_missed -= 1;
    }
    let runs: usize = match missed {
        Missed::Skip => 0,
        Missed::Latest => 1,
        Missed::All => max_catch_up as usize,
    }
    .min(missed_newest.len())
    .min(n_missed as usize);
    let run_from = missed_newest.len() - runs;
    let mut steps = Vec::new();
    let skipped = n_missed - runs as u64;
    if skipped > 0 {
        let first = due.first.expect("slots are due");
        let last = if run_from > 0 {
            missed_newest[run_from - 1]
        } else {
            // Every missed slot held here runs; the skipped ones are older than all of them.
            cal.prev_before(missed_newest[0]).unwrap_or(first)
        };
        let why = match missed {
            Missed::Skip => "missed (nobody fired it in time); `missed = \"skip\"` runs none".to_string(),
            Missed::Latest => "missed (nobody fired it in time); `missed = \"latest\"` runs only the newest".to_string(),
            Missed::All => format!(
                "missed (nobody fired it in time); more than `max_catch_up = {max_catch_up}` missed slots, the newest run"
            ),
        };
        steps.push(Step::Skip {
            first,
            last,
            count: skipped,
            exact: due.exact,
            why,
        });
    }
    for &slot in &missed_newest[run_from..] {
        steps.push(Step::Fire {
            slot,
            caught_up: true,
        });
    }
    if on_time {
        steps.push(Step::Fire {
            slot: newest,
            caught_up: false,
        });
    }
    steps
}

/// The `unique_key` of a slot's task: `schedule:<name>@<slot, RFC 3339 UTC>`.
pub fn unique_key(schedule: &str, slot: UnixMs) -> String {
    format!("schedule:{schedule}@{}", show_utc(slot))
}

#[cfg(test)]
mod tests;
