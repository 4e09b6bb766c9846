//! Schedules with real daemons and real time (`every = "1s"`, 6-field cron): one task per
//! slot on SQLite and with two daemons sharing a Redis, kill -9 and restart under each
//! `missed` policy, `overlap = "skip"` with a task longer than the period, a reload that
//! changes the spec, one that adds and removes schedules, pause and resume, `fire`, a schedule on a paused queue, and the
//! `taskd schedules` table read cell by cell against `--json`.
//!
//! Outcomes are polled with deadlines. Where a test needs time to pass with no daemon (to
//! make missed slots), it waits for the wall clock to pass an instant; that is the scenario,
//! never a wait for an outcome.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::table;
use common::{poll, Daemon, Env, SIGHUP};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(40);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// A config: `[taskd]` (state in the temp dir, plus `taskd_extra`), then `body`.
fn env_with(taskd_extra: &str, body: &str) -> Env {
    Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n{taskd_extra}\n\n{body}\n"
    ))
}

/// `taskd schedules show NAME --json` (every record the broker keeps).
fn detail(env: &Env, name: &str) -> Value {
    json_of(&env.ok(&["schedules", "show", name, "--json", "--limit", "500"]))
}

/// The slot records of `name`, oldest first.
fn records(env: &Env, name: &str) -> Vec<Value> {
    let mut h = detail(env, name)["history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    h.reverse();
    h
}

fn handled_through(env: &Env, name: &str) -> i64 {
    detail(env, name)["schedule"]["handled_through"]
        .as_i64()
        .unwrap_or(0)
}

/// The tasks of schedule `name`, as `tasks --json` lists them.
fn tasks_of(env: &Env, name: &str) -> Vec<Value> {
    let all = json_of(&env.ok(&["tasks", "--json", "--limit", "100000"]));
    all.as_array()
        .expect("a list")
        .iter()
        .filter(|t| t["schedule"] == name)
        .cloned()
        .collect()
}

/// Wait until the schedule's record is begun (a daemon took it up); its `through`.
fn wait_begun(env: &Env, name: &str, d: &Daemon) -> i64 {
    let mut through = 0;
    let ok = poll(DEADLINE, || {
        through = handled_through(env, name);
        through > 0
    });
    assert!(ok, "schedule {name} was not begun:\n{}", d.log_text());
    through
}

/// Wait until every slot up to `t` is handled.
fn wait_through(env: &Env, name: &str, t: i64, d: &Daemon) {
    let mut last = 0;
    let ok = poll(DEADLINE, || {
        last = handled_through(env, name);
        last >= t
    });
    assert!(
        ok,
        "schedule {name} did not handle its slots up to {t} (handled up to {last}):\n{}",
        d.log_text()
    );
}

/// Wait until the wall clock passes `t` (to let slots come due with nobody firing them).
fn pass(t: i64) {
    while now_ms() <= t {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every slot of a 1 s schedule after `from` appears once in the records (fired, caught up,
/// or in a skipped run), none twice, none missing, up to the newest record.
fn check_every_slot_accounted(recs: &[Value], from: i64) {
    let mut seen = BTreeSet::new();
    for r in recs {
        let (first, slot, count) = (
            r["first"].as_i64().unwrap(),
            r["slot"].as_i64().unwrap(),
            r["count"].as_u64().unwrap(),
        );
        assert_eq!(
            (slot - first) / 1000 + 1,
            count as i64,
            "a run's count: {r}"
        );
        for s in (first..=slot).step_by(1000) {
            if s > from {
                assert!(seen.insert(s), "slot {s} recorded twice: {recs:#?}");
            }
        }
    }
    if let (Some(lo), Some(hi)) = (seen.first(), seen.last()) {
        let want: BTreeSet<i64> = (*lo..=*hi).step_by(1000).collect();
        let missing: Vec<&i64> = want.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "slots missing from the records: {missing:?}\n{recs:#?}"
        );
    }
}

/// One task per slot for ten slots: each slot's task exists once, with `schedule` and
/// `slot`, and nothing else was enqueued.
fn one_task_per_slot(env: &Env, daemons: &[&Daemon]) {
    wait_begun(env, "tick", daemons[0]);
    // From the first slot that has a task, ten slots on.
    let mut first = None;
    let ok = poll(DEADLINE, || {
        first = tasks_of(env, "tick")
            .iter()
            .filter_map(|t| t["slot"].as_i64())
            .min();
        first.is_some()
    });
    assert!(ok, "no slot fired:\n{}", daemons[0].log_text());
    let t0 = first.unwrap() - 1000;
    let until = t0 + 10_000;
    wait_through(env, "tick", until, daemons[0]);
    let tasks = tasks_of(env, "tick");
    let mut by_slot: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for t in &tasks {
        let slot = t["slot"].as_i64().expect("a slot task has its slot");
        by_slot
            .entry(slot)
            .or_default()
            .push(t["id"].as_str().unwrap().to_string());
        assert_eq!(slot % 1000, 0, "slots are whole seconds");
        assert_eq!(
            t["unique_key"].as_str().unwrap(),
            format!("schedule:tick@{}", rfc3339(slot))
        );
    }
    for (slot, ids) in &by_slot {
        assert_eq!(ids.len(), 1, "slot {slot} has {} tasks: {ids:?}", ids.len());
    }
    let want: Vec<i64> = ((t0 / 1000 + 1)..=(until / 1000))
        .map(|s| s * 1000)
        .collect();
    let got: Vec<i64> = by_slot.keys().copied().filter(|s| *s <= until).collect();
    assert_eq!(got, want, "a slot is missing or extra");
    let recs = records(env, "tick");
    check_every_slot_accounted(&recs, t0);
    for r in recs.iter().filter(|r| r["slot"].as_i64().unwrap() <= until) {
        assert!(
            r["outcome"] == "fired" || r["outcome"] == "caught_up",
            "on a running daemon every slot gets its task: {r}"
        );
    }
}

/// `2026-03-29T01:00:00Z` for a slot.
fn rfc3339(ms: i64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", ms / 1000),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const TICK: &str = "\
[queues.q]
shell = 'echo \"$TASKD_SCHEDULE $TASKD_SLOT\"'
concurrency = 4

[schedules.tick]
queue = \"q\"
every = \"1s\"
";

/// [`TICK`] where every slot gets its task whatever the machine's load: a slot found late
/// runs as caught up (`missed = "all"`), and beside a previous run (`overlap = "allow"`).
fn tick_every_slot() -> String {
    format!("{TICK}missed = \"all\"\noverlap = \"allow\"\n")
}

#[test]
fn a_one_second_schedule_enqueues_one_task_per_slot() {
    let env = env_with("listen = \"127.0.0.1:0\"", &tick_every_slot());
    let d = env.daemon();
    one_task_per_slot(&env, &[&d]);
    // Every fired slot is counted on /metrics.
    let fired = records(&env, "tick")
        .iter()
        .filter(|r| r["outcome"] == "fired")
        .count()
        .max(1);
    let metrics = ureq::get(&format!("{}/metrics", d.api_base()))
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("metrics text");
    let counted: usize = metrics
        .lines()
        .find(|l| {
            l.starts_with("taskd_schedule_slots_total{")
                && l.contains("schedule=\"tick\"")
                && l.contains("outcome=\"fired\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fired count for tick:\n{metrics}"));
    assert!(
        counted >= fired,
        "metrics say {counted} fired, the records {fired}"
    );
    // The task saw its schedule and slot.
    let t = &tasks_of(&env, "tick")[0];
    let id = t["id"].as_str().unwrap();
    let done = env.wait_state(id, "succeeded", DEADLINE);
    let out = done["history"][0]["stdout_tail"].as_str().unwrap().trim();
    assert_eq!(
        out,
        format!("tick {}", rfc3339(t["slot"].as_i64().unwrap()))
    );
    let shown = env.ok(&["show", id]);
    assert!(
        shown.contains(&format!(
            "schedule  tick (slot {})",
            rfc3339(t["slot"].as_i64().unwrap())
        )),
        "{shown}"
    );
}

#[test]
fn two_daemons_on_one_redis_fire_each_slot_once() {
    let Some(server) = redis_server::RedisServer::start("two daemons sharing schedules") else {
        return;
    };
    let broker = format!(
        "broker = \"redis://127.0.0.1:{}/0\"\nlease = \"3s\"",
        server.port
    );
    let a = env_with(&broker, &tick_every_slot());
    let b = env_with(&broker, &tick_every_slot());
    let da = a.daemon();
    let db = b.daemon();
    one_task_per_slot(&a, &[&da, &db]);
}

/// Kill -9 a daemon of a 1 s schedule, leave it down for about four slots, start it again:
/// the missed slots follow `missed`, and every slot is accounted for once.
fn kill_and_restart(policy: &str) -> (Vec<Value>, i64) {
    let env = env_with(
        "",
        &format!("{TICK}missed = \"{policy}\"\noverlap = \"allow\"\n"),
    );
    let d = env.daemon();
    let t0 = wait_begun(&env, "tick", &d);
    wait_through(&env, "tick", t0 + 2000, &d);
    d.kill9();
    let down = handled_through(&env, "tick");
    pass(down + 4_500);
    let d = env.daemon();
    wait_through(&env, "tick", down + 5_000, &d);
    let recs = records(&env, "tick");
    check_every_slot_accounted(&recs, t0);
    let after: Vec<Value> = recs
        .into_iter()
        .filter(|r| r["slot"].as_i64().unwrap() > down)
        .collect();
    (after, down)
}

fn outcomes(recs: &[Value]) -> Vec<(String, u64)> {
    recs.iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The records after a restart begin with how the missed slots were handled, then the
/// on-time slot. `missed` slots: those due at the restart but the newest.
fn missed_part(recs: &[Value]) -> Vec<(String, u64)> {
    let missed = |r: &Value| {
        r["outcome"] == "caught_up"
            || (r["outcome"] == "skipped"
                && r["reason"].as_str().unwrap_or("").starts_with("missed"))
    };
    let n = recs.iter().take_while(|r| missed(r)).count();
    assert!(
        n < recs.len(),
        "no on-time slot after the missed ones: {recs:#?}"
    );
    outcomes(&recs[..n])
}

#[test]
fn kill_9_and_restart_with_missed_skip_runs_none() {
    let (recs, _) = kill_and_restart("skip");
    let part = missed_part(&recs);
    assert_eq!(part.len(), 1, "one skipped run: {recs:#?}");
    assert_eq!(part[0].0, "skipped");
    assert!(
        part[0].1 >= 3,
        "at least three slots were missed: {recs:#?}"
    );
    assert!(recs[0]["reason"]
        .as_str()
        .unwrap()
        .contains("`missed = \"skip\"`"));
    assert!(!recs.iter().any(|r| r["outcome"] == "caught_up"));
}

#[test]
fn kill_9_and_restart_with_missed_latest_runs_the_newest_once() {
    let (recs, _) = kill_and_restart("latest");
    let part = missed_part(&recs);
    assert_eq!(part.len(), 2, "{recs:#?}");
    assert_eq!(part[0].0, "skipped");
    assert_eq!(part[1], ("caught_up".to_string(), 1));
    // The caught-up slot is the newest missed one: right before the on-time slot.
    let caught = recs[1]["slot"].as_i64().unwrap();
    assert_eq!(recs[2]["slot"].as_i64().unwrap(), caught + 1000);
    assert_eq!(recs[0]["slot"].as_i64().unwrap(), caught - 1000);
    assert!(recs[1]["task"].is_string());
}

#[test]
fn kill_9_and_restart_with_missed_all_runs_every_missed_slot() {
    let (recs, down) = kill_and_restart("all");
    let part = missed_part(&recs);
    assert!(part.len() >= 3, "{recs:#?}");
    assert!(
        part.iter().all(|p| *p == ("caught_up".to_string(), 1)),
        "{recs:#?}"
    );
    assert_eq!(
        recs[0]["slot"].as_i64().unwrap(),
        down + 1000,
        "from the first missed slot"
    );
}

#[test]
fn overlap_skip_never_runs_two_of_a_schedule_at_once() {
    let env = env_with(
        "",
        "\
[queues.slow]
shell = 'sleep 2.5'
concurrency = 4

[schedules.slow]
queue = \"slow\"
cron = \"* * * * * *\"
",
    );
    let d = env.daemon();
    let t0 = wait_begun(&env, "slow", &d);
    wait_through(&env, "slow", t0 + 8_000, &d);
    let recs = records(&env, "slow");
    check_every_slot_accounted(&recs, t0);
    let fired: Vec<&Value> = recs.iter().filter(|r| r["outcome"] == "fired").collect();
    let skipped: Vec<&Value> = recs.iter().filter(|r| r["outcome"] == "skipped").collect();
    assert!(fired.len() >= 2 && skipped.len() >= 3, "{recs:#?}");
    // Each skipped slot names a fired task that was still waiting or running.
    let fired_ids: BTreeSet<&str> = fired.iter().map(|r| r["task"].as_str().unwrap()).collect();
    for s in &skipped {
        assert!(s["reason"].as_str().unwrap().contains("overlap"), "{s}");
        assert!(fired_ids.contains(s["task"].as_str().unwrap()), "{s}");
    }
    // The runs never overlap in time.
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for r in &fired {
        let t = env.wait_state(r["task"].as_str().unwrap(), "succeeded", DEADLINE);
        let a = &t["history"][0];
        runs.push((
            a["started_at"].as_i64().unwrap(),
            a["ended_at"].as_i64().unwrap(),
        ));
    }
    runs.sort();
    for w in runs.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlap: {runs:?}");
    }
}

#[test]
fn reload_changing_the_spec_starts_at_the_next_slot_of_the_new_spec() {
    let env = env_with("", TICK);
    let d = env.daemon();
    let t0 = wait_begun(&env, "tick", &d);
    wait_through(&env, "tick", t0 + 2000, &d);
    let new = TICK.replace(
        "every = \"1s\"",
        "cron = \"*/3 * * * * *\"\nmissed = \"all\"",
    );
    std::fs::write(
        &env.config,
        format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n{new}\n"),
    )
    .unwrap();
    let out = env.ok(&["reload"]);
    assert!(
        out.contains("schedule tick: every \"1s\" → cron \"*/3 * * * * *\"")
            && out.contains("starts at the next slot of the new spec"),
        "{out}"
    );
    let reloaded = now_ms();
    wait_through(&env, "tick", reloaded + 7_000, &d);
    let after: Vec<Value> = records(&env, "tick")
        .into_iter()
        .filter(|r| r["slot"].as_i64().unwrap() > reloaded)
        .collect();
    assert!(after.len() >= 2, "{after:#?}");
    for r in &after {
        assert_eq!(r["outcome"], "fired", "no old slot runs late: {r}");
        assert_eq!(
            r["slot"].as_i64().unwrap() / 1000 % 3,
            0,
            "a slot of the new spec: {r}"
        );
    }
    // Changed while the daemon is stopped, with `missed = "all"`: the old spec's slots
    // since do not run either.
    drop(d);
    let down = handled_through(&env, "tick");
    let newer = new.replace("*/3 * * * * *", "* * * * * *");
    std::fs::write(
        &env.config,
        format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n{newer}\n"),
    )
    .unwrap();
    pass(down + 4_000);
    let d = env.daemon();
    let started = now_ms();
    wait_through(&env, "tick", started + 2_000, &d);
    let later: Vec<Value> = records(&env, "tick")
        .into_iter()
        .filter(|r| r["slot"].as_i64().unwrap() > down)
        .collect();
    assert!(!later.is_empty());
    for r in &later {
        assert_eq!(r["outcome"], "fired", "{later:#?}");
        assert!(r["slot"].as_i64().unwrap() > started - 1000, "{later:#?}");
    }
}

#[test]
fn reload_adds_and_removes_schedules() {
    let env = env_with("", TICK);
    let d = env.daemon();
    let t0 = wait_begun(&env, "tick", &d);
    wait_through(&env, "tick", t0 + 1000, &d);
    // SIGHUP with `tick` renamed `tock`: one removed, one added.
    let write = |body: &str| {
        std::fs::write(
            &env.config,
            format!("[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n{body}\n"),
        )
        .unwrap()
    };
    write(&TICK.replace("[schedules.tick]", "[schedules.tock]"));
    d.signal(SIGHUP);
    // The daemon says what changed in its reload's audit record (and its log).
    let mut changes = String::new();
    let ok = poll(DEADLINE, || {
        let trail = json_of(&env.ok(&["audit", "--json", "-n", "0"]));
        changes = trail
            .as_array()
            .expect("records")
            .iter()
            .rev()
            .find(|r| r["action"] == "reload")
            .map(|r| r["detail"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        !changes.is_empty()
    });
    assert!(ok, "no reload record:\n{}", d.log_text());
    let reloaded = now_ms();
    assert!(
        changes.contains("schedule tock: added (every \"1s\"")
            && changes.contains("queue q)")
            && changes.contains("schedule tick: removed"),
        "{changes}"
    );
    let listed: Vec<Value> = json_of(&env.ok(&["schedules", "--json"]))["schedules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["schedule"], "tock");
    // `tock` fires from the next slot on; `tick` never again (a step already in flight at
    // the reload may still land, one slot at most).
    let begun = wait_begun(&env, "tock", &d);
    assert!(
        begun >= reloaded - 2_000,
        "tock began at {begun}, reload at {reloaded}"
    );
    wait_through(&env, "tock", reloaded + 3_000, &d);
    let late: Vec<i64> = tasks_of(&env, "tick")
        .iter()
        .filter_map(|t| t["slot"].as_i64())
        .filter(|s| *s > reloaded + 1_000)
        .collect();
    assert!(late.is_empty(), "tick fired after its removal: {late:?}");
    let tock: BTreeSet<i64> = tasks_of(&env, "tock")
        .iter()
        .filter_map(|t| t["slot"].as_i64())
        .collect();
    assert!(tock.len() >= 3, "{tock:?}");
    // `taskd reload` prints the changes: `tick` back.
    write(&format!(
        "{TICK}\n[schedules.tock]\nqueue = \"q\"\nevery = \"1s\"\n"
    ));
    let out = env.ok(&["reload"]);
    assert!(
        out.contains("schedule tick: added (every \"1s\"") && !out.contains("tock"),
        "{out}"
    );
    let back = now_ms();
    wait_through(&env, "tick", back + 2_000, &d);
}

#[test]
fn pause_and_resume_apply_missed_to_the_slots_slept_through() {
    // `overlap = "skip"`, the default: the catch-up runs of `all` are all enqueued, and the
    // on-time slot right after them may be skipped while they wait.
    let env = env_with("", &format!("{TICK}missed = \"all\"\n"));
    let d = env.daemon();
    let t0 = wait_begun(&env, "tick", &d);
    wait_through(&env, "tick", t0 + 1000, &d);
    let out = env.ok(&["schedules", "pause", "tick"]);
    assert!(out.contains("schedule tick paused"), "{out}");
    let listed = json_of(&env.ok(&["schedules", "--json"]));
    assert_eq!(listed["schedules"][0]["paused"], true);
    assert!(listed["schedules"][0]["next"].is_null());
    // The pause survives a restart of the daemon.
    drop(d);
    let d = env.daemon();
    let paused_at = handled_through(&env, "tick");
    pass(paused_at + 4_500);
    assert_eq!(
        handled_through(&env, "tick"),
        paused_at,
        "a paused schedule fired:\n{}",
        d.log_text()
    );
    env.ok(&["schedules", "resume", "tick"]);
    wait_through(&env, "tick", paused_at + 4_000, &d);
    let recs: Vec<Value> = records(&env, "tick")
        .into_iter()
        .filter(|r| r["slot"].as_i64().unwrap() > paused_at)
        .collect();
    let part = missed_part(&recs);
    assert!(part.len() >= 3, "{recs:#?}");
    assert!(part.iter().all(|p| p.0 == "caught_up"), "{recs:#?}");
    assert_eq!(recs[0]["slot"].as_i64().unwrap(), paused_at + 1000);
}

#[test]
fn fire_enqueues_now_without_a_slot_and_unknown_names_exit_2() {
    let env = env_with("", &TICK.replace("every = \"1s\"", "cron = \"0 3 * * *\""));
    let id = env.ok(&["schedules", "fire", "tick"]).trim().to_string();
    let t = env.show(&id);
    assert_eq!(t["schedule"], "tick");
    assert!(t["slot"].is_null());
    assert_eq!(t["state"], "queued");
    let d = detail(&env, "tick");
    assert!(
        d["schedule"]["handled_through"].is_null(),
        "the record is untouched: {d}"
    );
    assert_eq!(d["history"].as_array().unwrap().len(), 0);
    let fired = json_of(&env.ok(&["schedules", "fire", "tick", "--json"]));
    assert_eq!(fired["schedule"], "tick");
    assert_eq!(fired["task"]["schedule"], "tick");
    for args in [
        vec!["schedules", "fire", "nope"],
        vec!["schedules", "pause", "nope"],
        vec!["schedules", "resume", "nope"],
        vec!["schedules", "show", "nope"],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unknown schedule `nope`") && err.contains("known schedules: tick"),
            "{err}"
        );
    }
}

#[test]
fn a_schedule_on_a_paused_queue_enqueues_and_its_tasks_wait() {
    let env = env_with(
        "",
        "\
[queues.q]
shell = 'true'

[schedules.piles]
queue = \"q\"
every = \"1s\"
overlap = \"allow\"

[schedules.waits]
queue = \"q\"
every = \"1s\"
",
    );
    env.ok(&["pause", "q"]);
    let d = env.daemon();
    let t0 = wait_begun(&env, "piles", &d);
    wait_through(&env, "piles", t0 + 3_000, &d);
    wait_through(&env, "waits", t0 + 3_000, &d);
    let piles = tasks_of(&env, "piles");
    assert!(piles.len() >= 3, "{piles:#?}");
    assert!(piles.iter().all(|t| t["state"] == "queued"));
    let waits = tasks_of(&env, "waits");
    assert_eq!(
        waits.len(),
        1,
        "overlap = \"skip\": one task waits: {waits:#?}"
    );
    let skipped = records(&env, "waits")
        .into_iter()
        .filter(|r| r["outcome"] == "skipped")
        .count();
    assert!(skipped >= 2);
    env.ok(&["resume", "q"]);
    for t in piles.iter().chain(&waits) {
        env.wait_state(t["id"].as_str().unwrap(), "succeeded", DEADLINE);
    }
}

#[test]
fn the_schedules_table_says_what_json_says() {
    let env = env_with(
        "",
        "\
[queues.q]
shell = 'true'

[schedules.daily]
queue = \"q\"
cron = \"30 2 * * *\"
timezone = \"Europe/Berlin\"

[schedules.off]
queue = \"q\"
every = \"10m\"
enabled = false
",
    );
    env.ok(&["schedules", "pause", "daily"]);
    let text = env.ok(&["schedules"]);
    let json = json_of(&env.ok(&["schedules", "--json"]));
    let t = table::find(&text, "schedule");
    for s in json["schedules"].as_array().unwrap() {
        let name = s["schedule"].as_str().unwrap();
        let row = t.row(name);
        assert_eq!(t.cell(row, "queue"), s["queue"].as_str().unwrap());
        assert_eq!(t.cell(row, "spec"), s["spec"].as_str().unwrap());
        assert_eq!(t.cell(row, "time zone"), s["timezone"].as_str().unwrap());
        assert_eq!(
            t.cell(row, "next (local)"),
            s["next_local"].as_str().unwrap_or("-")
        );
        assert_eq!(
            t.cell(row, "next (UTC)"),
            s["next_utc"].as_str().unwrap_or("-")
        );
        assert_eq!(t.cell(row, "fired"), s["fired"].to_string());
        assert_eq!(t.cell(row, "skipped"), s["skipped"].to_string());
        assert_eq!(t.cell(row, "last slot"), "-");
    }
    assert_eq!(t.cell(t.row("daily"), "state"), "PAUSED");
    assert_eq!(t.cell(t.row("off"), "state"), "disabled");
    assert_eq!(t.cell(t.row("daily"), "spec"), "cron \"30 2 * * *\"");
    // Resumed: its next slot is 02:30 Berlin time, shown in both zones.
    env.ok(&["schedules", "resume", "daily"]);
    let json = json_of(&env.ok(&["schedules", "--json"]));
    let daily = &json["schedules"][0];
    assert!(
        daily["next_local"]
            .as_str()
            .unwrap()
            .contains("T02:30:00+0"),
        "{daily}"
    );
    let text = env.ok(&["schedules"]);
    let t = table::find(&text, "schedule");
    assert_eq!(
        t.cell(t.row("daily"), "next (UTC)"),
        daily["next_utc"].as_str().unwrap()
    );
    assert_eq!(t.cell(t.row("daily"), "state"), "enabled");
}
