//! Slot arithmetic with fixed instants: DST days in Europe/Berlin and America/New_York,
//! leap years, specs that never fire, `every`, and the plans for missed slots.

use super::*;

/// Milliseconds of an RFC 3339 instant.
fn at(text: &str) -> UnixMs {
    text.parse::<Timestamp>()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .as_millisecond()
}

fn cal(expr: &str, zone: &str) -> Calendar {
    Calendar {
        spec: parse_cron(expr).unwrap_or_else(|e| panic!("{expr}: {e}")),
        zone: Zone::named(zone).expect("a known zone"),
    }
}

fn every(text: &str) -> Calendar {
    Calendar {
        spec: parse_every(text, humantime::parse_duration(text).unwrap()).unwrap(),
        zone: Zone::utc(),
    }
}

/// The next `count` slots after `from`, as RFC 3339 UTC.
fn next_n(calendar: &Calendar, from: &str, count: usize) -> Vec<String> {
    let mut t = at(from);
    let mut out = Vec::new();
    for _ in 0..count {
        t = calendar.next_after(t).expect("a next slot");
        out.push(show_utc(t));
    }
    out
}

#[test]
fn berlin_spring_forward_fires_a_missing_time_once_at_the_end_of_the_gap() {
    // 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
    let c = cal("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        next_n(&c, "2026-03-27T12:00:00Z", 3),
        [
            "2026-03-28T01:30:00Z", // 02:30 CET
            "2026-03-29T01:00:00Z", // the first instant after the gap: 03:00 CEST
            "2026-03-30T00:30:00Z", // 02:30 CEST
        ]
    );
    assert_eq!(
        c.zone.show(at("2026-03-29T01:00:00Z")),
        "2026-03-29T03:00:00+02:00"
    );
    // 03:00 exists that day and is the same instant: one slot, not two.
    let three = cal("0 3 * * *", "Europe/Berlin");
    assert_eq!(
        next_n(&three, "2026-03-28T12:00:00Z", 1),
        ["2026-03-29T01:00:00Z"]
    );
}

#[test]
fn berlin_every_minute_collapses_the_gap_into_one_slot() {
    let c = cal("* * * * *", "Europe/Berlin");
    assert_eq!(
        next_n(&c, "2026-03-29T00:58:30Z", 4),
        [
            "2026-03-29T00:59:00Z", // 01:59 CET
            "2026-03-29T01:00:00Z", // 02:00…02:59 do not exist, and 03:00 CEST: once
            "2026-03-29T01:01:00Z", // 03:01 CEST
            "2026-03-29T01:02:00Z",
        ]
    );
}

#[test]
fn berlin_fall_back_fires_a_repeated_time_once_at_its_first_occurrence() {
    // 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00 UTC); 02:30 happens twice.
    let c = cal("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        next_n(&c, "2026-10-24T12:00:00Z", 2),
        [
            "2026-10-25T00:30:00Z", // 02:30 CEST, the first pass; not 01:30Z (02:30 CET)
            "2026-10-26T01:30:00Z", // 02:30 CET
        ]
    );
    let half = cal("*/30 * * * *", "Europe/Berlin");
    assert_eq!(
        next_n(&half, "2026-10-24T23:45:00Z", 4),
        [
            "2026-10-25T00:00:00Z", // 02:00 CEST
            "2026-10-25T00:30:00Z", // 02:30 CEST
            "2026-10-25T02:00:00Z", // 03:00 CET: the second pass fires nothing
            "2026-10-25T02:30:00Z",
        ]
    );
}

#[test]
fn a_search_from_inside_the_second_pass_of_a_fold_does_not_go_back() {
    let c = cal("* * * * *", "Europe/Berlin");
    // 01:10Z is 02:10 CET, the second pass: 02:11 … 02:59 fired in the first pass.
    assert_eq!(
        c.next_after(at("2026-10-25T01:10:00Z")),
        Some(at("2026-10-25T02:00:00Z"))
    );
    assert_eq!(
        c.prev_before(at("2026-10-25T01:40:00Z")),
        Some(at("2026-10-25T00:59:00Z"))
    );
    assert_eq!(
        c.prev_before(at("2026-10-25T02:00:30Z")),
        Some(at("2026-10-25T02:00:00Z"))
    );
}

#[test]
fn new_york_dst_days() {
    // 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    let c = cal("30 2 * * *", "America/New_York");
    assert_eq!(
        next_n(&c, "2026-03-07T00:00:00Z", 3),
        [
            "2026-03-07T07:30:00Z", // 02:30 EST
            "2026-03-08T07:00:00Z", // gap: 03:00 EDT
            "2026-03-09T06:30:00Z", // 02:30 EDT
        ]
    );
    // 2026-11-01: 02:00 EDT goes back to 01:00 EST (06:00 UTC); 01:30 happens twice.
    let c = cal("30 1 * * *", "America/New_York");
    assert_eq!(
        next_n(&c, "2026-10-31T12:00:00Z", 2),
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
    );
    assert_eq!(
        c.zone.show(at("2026-11-01T05:30:00Z")),
        "2026-11-01T01:30:00-04:00"
    );
}

#[test]
fn leap_days() {
    let c = cal("0 0 29 2 *", "UTC");
    assert_eq!(
        next_n(&c, "2025-03-01T00:00:00Z", 2),
        ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]
    );
    // 2100 is not a leap year (divisible by 100, not by 400); 2000 was.
    assert_eq!(
        next_n(&c, "2096-03-01T00:00:00Z", 1),
        ["2104-02-29T00:00:00Z"]
    );
    assert_eq!(
        next_n(&c, "1999-03-01T00:00:00Z", 1),
        ["2000-02-29T00:00:00Z"]
    );
    let last = cal("0 12 L 2 *", "UTC");
    assert_eq!(
        next_n(&last, "2027-01-01T00:00:00Z", 2),
        ["2027-02-28T12:00:00Z", "2028-02-29T12:00:00Z"]
    );
}

#[test]
fn a_spec_that_never_fires_is_found() {
    let now = at("2026-01-01T00:00:00Z");
    assert!(!cal("0 0 31 2 *", "UTC").ever_after(now));
    assert!(!cal("0 0 30 2 *", "Europe/Berlin").ever_after(now));
    assert!(!cal("0 0 31 4,6,9,11 *", "UTC").ever_after(now));
    assert!(cal("0 0 31 2,3 *", "UTC").ever_after(now));
    // Day of month and day of week together mean either (as cron does).
    assert!(cal("0 0 31 2 1", "UTC").ever_after(now));
}

#[test]
fn six_fields_have_seconds_first_and_macros_are_known() {
    let c = cal("*/5 * * * * *", "UTC");
    assert_eq!(
        next_n(&c, "2026-05-01T12:00:03Z", 2),
        ["2026-05-01T12:00:05Z", "2026-05-01T12:00:10Z"]
    );
    let d = cal("@daily", "UTC");
    assert_eq!(
        next_n(&d, "2026-05-01T12:00:00Z", 1),
        ["2026-05-02T00:00:00Z"]
    );
    let m = cal("@midnight", "UTC");
    assert_eq!(
        next_n(&m, "2026-05-01T12:00:00Z", 1),
        ["2026-05-02T00:00:00Z"]
    );
    let w = cal("0 9 * * mon-fri", "UTC");
    // 2026-05-01 is a Friday.
    assert_eq!(
        next_n(&w, "2026-05-01T12:00:00Z", 1),
        ["2026-05-04T09:00:00Z"]
    );
}

/// Why `expr` is refused (a valid one fails the test without printing the parsed pattern).
fn refused(expr: &str) -> String {
    match parse_cron(expr) {
        Ok(_) => panic!("{expr:?} was accepted"),
        Err(e) => e,
    }
}

#[test]
fn bad_cron_expressions_name_the_field_at_fault() {
    let e = refused("0 25 * * *");
    assert!(
        e.contains("field 2 (hour) `25`") && e.contains("0-23"),
        "{e}"
    );
    let e = refused("61 * * * *");
    assert!(e.contains("field 1 (minute) `61`"), "{e}");
    let e = refused("0 0 * * 8");
    assert!(e.contains("field 5 (day of week)"), "{e}");
    let e = refused("0 0 0 * *");
    assert!(e.contains("field 3 (day of month) `0`"), "{e}");
    let e = refused("* * *");
    assert!(e.contains("5 fields") && e.contains("has 3"), "{e}");
    let e = refused("@reboot");
    assert!(e.contains("systemd"), "{e}");
    let e = refused("@often");
    assert!(e.contains("unknown cron macro `@often`"), "{e}");
    let e = refused("*/0 * * * *");
    assert!(
        e.contains("field 1 (minute)") && e.contains("step cannot be zero"),
        "{e}"
    );
    assert!(parse_cron("0   3 * *  *").is_ok());
    assert_eq!(
        cal("0   3 * *  *", "UTC").fingerprint(),
        "cron \"0 3 * * *\" in UTC"
    );
}

#[test]
fn unknown_zones_are_refused_and_known_ones_listed() {
    let e = Zone::named("Europe/Berln").unwrap_err();
    assert!(e.contains("unknown time zone \"Europe/Berln\""), "{e}");
    assert!(Zone::named("").is_err());
    assert!(Zone::known_names().iter().any(|n| n == "Europe/Berlin"));
}

#[test]
fn every_is_counted_from_the_epoch() {
    let c = every("10m");
    assert_eq!(
        next_n(&c, "2026-05-01T12:03:00Z", 2),
        ["2026-05-01T12:10:00Z", "2026-05-01T12:20:00Z"]
    );
    assert_eq!(
        c.next_after(at("2026-05-01T12:10:00Z")),
        Some(at("2026-05-01T12:20:00Z"))
    );
    assert_eq!(
        c.prev_before(at("2026-05-01T12:10:00Z")),
        Some(at("2026-05-01T12:00:00Z"))
    );
    assert_eq!(c.fingerprint(), "every 600s");
    assert!(parse_every("1500ms", std::time::Duration::from_millis(1500)).is_err());
    assert!(parse_every("500ms", std::time::Duration::from_millis(500)).is_err());
    let d = c.due(at("2026-05-01T12:00:00Z"), at("2026-05-01T13:00:00Z"), 2);
    assert_eq!((d.count, d.exact), (6, true));
    assert_eq!(d.first, Some(at("2026-05-01T12:10:00Z")));
    assert_eq!(
        d.newest,
        [at("2026-05-01T12:50:00Z"), at("2026-05-01T13:00:00Z")]
    );
    assert_eq!(
        c.due(at("2026-05-01T12:00:00Z"), at("2026-05-01T12:09:59Z"), 2),
        Due {
            exact: true,
            ..Due::default()
        }
    );
}

#[test]
fn due_stops_counting_at_the_cap_and_still_finds_the_newest() {
    let c = cal("* * * * * *", "UTC");
    let from = at("2026-05-01T00:00:00Z");
    let to = from + (COUNT_CAP as i64 + 500) * 1000;
    let d = c.due(from, to, 3);
    assert!(!d.exact);
    assert_eq!(d.count, COUNT_CAP);
    assert_eq!(d.first, Some(from + 1000));
    assert_eq!(d.newest, [to - 2000, to - 1000, to]);
}

fn s(at: UnixMs) -> String {
    show_utc(at)
}

/// A plan as text, for readable assertions.
fn show_plan(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|st| match st {
            Step::Fire { slot, caught_up } => {
                format!(
                    "{} {}",
                    if *caught_up { "catch up" } else { "fire" },
                    s(*slot)
                )
            }
            Step::Skip {
                first, last, count, ..
            } => {
                format!("skip {count} {}..{}", s(*first), s(*last))
            }
        })
        .collect()
}

#[test]
fn plans_for_missed_slots_follow_the_policy() {
    let c = every("1s");
    let t0 = at("2026-05-01T12:00:00Z");
    let now = t0 + 10_200; // slots 1..10 due; 10 is 0.2 s late: on time
    let p = |m, max| show_plan(&plan(&c, t0, now, m, max));
    assert_eq!(
        p(Missed::Skip, 100),
        [
            "skip 9 2026-05-01T12:00:01Z..2026-05-01T12:00:09Z",
            "fire 2026-05-01T12:00:10Z"
        ]
    );
    assert_eq!(
        p(Missed::Latest, 100),
        [
            "skip 8 2026-05-01T12:00:01Z..2026-05-01T12:00:08Z",
            "catch up 2026-05-01T12:00:09Z",
            "fire 2026-05-01T12:00:10Z"
        ]
    );
    let all = p(Missed::All, 100);
    assert_eq!(all.len(), 10);
    assert_eq!(all[0], "catch up 2026-05-01T12:00:01Z");
    assert_eq!(all[9], "fire 2026-05-01T12:00:10Z");
    assert_eq!(
        p(Missed::All, 3),
        [
            "skip 6 2026-05-01T12:00:01Z..2026-05-01T12:00:06Z",
            "catch up 2026-05-01T12:00:07Z",
            "catch up 2026-05-01T12:00:08Z",
            "catch up 2026-05-01T12:00:09Z",
            "fire 2026-05-01T12:00:10Z"
        ]
    );
    // One slot due, on time: it fires, whatever the policy.
    assert_eq!(p(Missed::Skip, 100).len(), 2);
    assert_eq!(
        show_plan(&plan(&c, t0, t0 + 1_050, Missed::Skip, 100)),
        ["fire 2026-05-01T12:00:01Z"]
    );
    // Nothing due.
    assert!(plan(&c, t0, t0 + 999, Missed::All, 100).is_empty());
}

#[test]
fn a_slot_more_than_five_seconds_late_is_missed() {
    let c = cal("0 3 * * *", "Europe/Berlin");
    let through = at("2026-05-01T00:00:00Z");
    let slot = at("2026-05-01T01:00:00Z");
    let p = |now, m| show_plan(&plan(&c, through, now, m, 100));
    assert_eq!(p(slot + 4_000, Missed::Skip), ["fire 2026-05-01T01:00:00Z"]);
    assert_eq!(
        p(slot + 6_000, Missed::Skip),
        ["skip 1 2026-05-01T01:00:00Z..2026-05-01T01:00:00Z"]
    );
    assert_eq!(
        p(slot + 6_000, Missed::Latest),
        ["catch up 2026-05-01T01:00:00Z"]
    );
    // Three days down: `latest` runs yesterday's once, the older two are skipped.
    let now = slot + 2 * 86_400_000 + 3_600_000;
    assert_eq!(
        p(now, Missed::Latest),
        [
            "skip 2 2026-05-01T01:00:00Z..2026-05-02T01:00:00Z",
            "catch up 2026-05-03T01:00:00Z"
        ]
    );
}

#[test]
fn unique_keys_name_the_slot_in_utc() {
    assert_eq!(
        unique_key("nightly", at("2026-03-29T01:00:00Z")),
        "schedule:nightly@2026-03-29T01:00:00Z"
    );
}
