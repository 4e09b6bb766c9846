//! The dashboard in a real headless browser (chromium over the DevTools protocol), against
//! a real daemon: counts that open filtered task lists, pages, search by id, unique key and
//! payload field, bulk cancel behind a confirmation that shows the count, the task page, the
//! workers panel, charts whose axes and numbers are the API's, the schedules panel (next
//! fire time, last outcome, fire, pause, resume), live updates, a phone-width
//! layout without horizontal scrolling, and keyboard focus. One browser for the whole file
//! (starting chromium is the slow part); screenshots go to a temp dir whose path is printed.
//! Without chromium the test is skipped, visibly, and under `CI=true` it fails.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::{find_chromium, screenshot_dir, Browser};
use common::{poll, Env};
use serde_json::{json, Value};

const TOKEN: &str = "dashboard-token-0123456789";
/// A named token: the audit trail records its name for the changes made with it.
const OPS_TOKEN: &str = "ops-token-abcdefghijklmnop";

fn call(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let req = ureq::request(method, url)
        .timeout(Duration::from_secs(20))
        .set("Authorization", &format!("Bearer {TOKEN}"));
    let r = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// `POST url` with the named token `ops`.
fn post_as_ops(url: &str, body: Option<&Value>) -> (u16, Value) {
    let req = ureq::post(url)
        .timeout(Duration::from_secs(20))
        .set("Authorization", &format!("Bearer {OPS_TOKEN}"));
    let r = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// The rows of the audit table inside `box_id`, cell by cell, as the page shows them.
fn audit_rows(b: &mut Browser, box_id: &str) -> Vec<Value> {
    b.eval(&format!(
        "[...document.querySelectorAll('#{box_id} table.audit tbody tr[data-audit]')].map(r => ({{ id: r.dataset.audit, at: Number(r.querySelector('[data-at]').dataset.at), when: r.children[0].textContent, who: r.children[1].textContent, action: r.children[2].textContent, target: r.children[3].textContent, outcome: r.children[4].textContent, detail: r.children[5].textContent }}))"
    ))
    .as_array()
    .cloned()
    .unwrap_or_default()
}

/// The page's rows are the API's records, in order, every cell.
fn assert_audit_rows(shown: &[Value], records: &[Value]) {
    assert_eq!(
        shown.len(),
        records.len(),
        "rows {shown:#?}\nrecords {records:#?}"
    );
    for (row, rec) in shown.iter().zip(records) {
        assert_eq!(row["id"], rec["id"], "{row:#}");
        assert_eq!(row["at"], rec["at"], "{row:#}");
        assert!(
            row["when"].as_str().is_some_and(|w| !w.is_empty()),
            "{row:#}"
        );
        for k in ["who", "action", "target", "outcome", "detail"] {
            assert_eq!(row[k], rec[k], "cell {k} of {row:#}\nrecord {rec:#}");
        }
    }
}

fn get(url: &str) -> Value {
    let (code, v) = call("GET", url, None);
    assert_eq!(code, 200, "GET {url}: {v:#}");
    v
}

fn enqueue(url: &str, queue: &str, body: Value) -> String {
    let (code, v) = call(
        "POST",
        &format!("{url}/api/v1/queues/{queue}/tasks"),
        Some(&body),
    );
    assert!(code < 300, "enqueue on {queue}: {v:#}");
    v["id"].as_str().expect("an id").to_string()
}

fn count(url: &str, queue: &str, state: &str) -> u64 {
    let q = get(&format!("{url}/api/v1/queues"));
    q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|x| x["queue"] == queue)
        .map_or(0, |x| x["counts"][state].as_u64().unwrap_or(0))
}

fn wait_count(url: &str, queue: &str, state: &str, n: u64) {
    let mut last = 0;
    assert!(
        poll(Duration::from_secs(30), || {
            last = count(url, queue, state);
            last == n
        }),
        "{queue} never had {n} {state} tasks (last {last})"
    );
}

/// The worker script of queue `hello`: answers each task.
fn worker_script(dir: &Path) -> PathBuf {
    let path = dir.join("w.py");
    std::fs::write(
        &path,
        r#"
import os, sys
sys.path.insert(0, os.environ["HELPER_DIR"])
import taskd_worker

@taskd_worker.task
def handle(payload, job):
    print("hello", payload.get("name"))
    return {"greeted": payload.get("name")}

taskd_worker.run()
"#,
    )
    .expect("write the worker");
    path
}

/// The page's text, for messages when a wait fails.
fn text(b: &mut Browser) -> String {
    b.eval("document.body.innerText")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Navigate inside the page (no reload) and wait for `ready`.
fn show(b: &mut Browser, hash: &str, ready: &str) {
    b.eval(&format!("location.hash = {}; true", json!(hash)));
    b.wait_for(ready, hash);
}

fn rows(b: &mut Browser) -> Vec<Value> {
    b.eval(
        "[...document.querySelectorAll('#tasks tbody tr[data-task]')].map(r => ({ id: r.dataset.task, queue: r.children[1].textContent, state: r.querySelector('[data-state]').dataset.state }))",
    )
    .as_array()
    .cloned()
    .unwrap_or_default()
}

/// The page is no wider than the viewport (no horizontal scrolling of the page itself).
fn no_overflow(b: &mut Browser, what: &str) {
    let v = b.eval(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]",
    );
    let w: Vec<i64> = v
        .as_array()
        .expect("widths")
        .iter()
        .map(|x| x.as_i64().unwrap_or(i64::MAX))
        .collect();
    assert!(
        w[0] <= w[2] && w[1] <= w[2],
        "{what}: the page scrolls sideways at {}px: scrollWidth {} (body {}); widest elements: {}",
        w[2],
        w[0],
        w[1],
        b.eval("[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5 && !e.closest('.scroll')).slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)).join(', ')")
    );
}

#[test]
fn dashboard_drives_every_view() {
    let Some(chromium) = find_chromium() else {
        common::skip::skip("chromium is not installed", "apt-get install -y chromium");
        return;
    };
    let shots = screenshot_dir("dashboard");
    let env = Env::new("");
    let w = worker_script(env.path());
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/python");
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\ntokens = [{{ name = \"ops\", token = \"{OPS_TOKEN}\" }}]\n\n\
             [queues.mail]\ncommand = [\"/bin/echo\", \"{{to}}\"]\n\n\
             [queues.users]\nshell = \"echo user $TASKD_ARG_user_id\"\n\n\
             [queues.fail]\nshell = \"echo 'cannot reach db: connection refused' >&2; exit 3\"\nmax_attempts = 1\n\n\
             [queues.slow]\nshell = \"sleep 30\"\nconcurrency = 1\nkill_grace = \"1s\"\n\n\
             [queues.ticker]\nshell = \"echo first line; echo \\\"<img src=x onerror='window.__out=1'> on stderr\\\" >&2; while [ ! -e \\\"$TASKD_ARG_release\\\" ]; do sleep 0.1; done; echo last line\"\nconcurrency = 2\n\n\
             [queues.hello]\nworker = [\"python3\", \"{}\"]\nconcurrency = 1\nstart_secs = \"200ms\"\nenv = {{ HELPER_DIR = '{}' }}\n\n\
             [queues.reports]\nshell = \"echo report\"\n\n\
             [queues.held]\nshell = \"true\"\n\n\
             [schedules.leap]\nqueue = \"reports\"\ncron = \"0 3 29 2 *\"\ntimezone = \"UTC\"\n\n\
             [schedules.tick]\nqueue = \"held\"\nevery = \"1s\"\n",
            w.display(),
            helper.display()
        ),
    )
    .expect("write the config");
    // `held` is paused before the daemon starts: `tick`'s first task waits there, and every
    // slot after it is skipped (`overlap = "skip"`), so no task of it ever runs and counts.
    env.ok(&["pause", "held"]);
    let d = env.daemon();
    let url = d.api_base();

    // A few queues and tasks: 30 mails (two pages), users with a payload to search, one
    // task with a unique key, failures, a slow queue with a backlog, a long-lived worker.
    for i in 0..30 {
        enqueue(
            &url,
            "mail",
            json!({ "payload": { "to": format!("u{i}@example.com") } }),
        );
    }
    let mut user = std::collections::BTreeMap::new();
    for i in 40..46 {
        user.insert(
            i,
            enqueue(&url, "users", json!({ "payload": { "user_id": i } })),
        );
    }
    let keyed = enqueue(
        &url,
        "users",
        json!({ "payload": { "user_id": 7 }, "unique": "report-2026-11" }),
    );
    let failed = enqueue(&url, "fail", json!({}));
    enqueue(&url, "fail", json!({}));
    let slow: Vec<String> = (0..4).map(|_| enqueue(&url, "slow", json!({}))).collect();
    let greeted: Vec<String> = ["ann", "bob"]
        .iter()
        .map(|name| enqueue(&url, "hello", json!({ "payload": { "name": name } })))
        .collect();
    wait_count(&url, "mail", "succeeded", 30);
    wait_count(&url, "users", "succeeded", 7);
    wait_count(&url, "fail", "failed", 2);
    wait_count(&url, "slow", "running", 1);
    wait_count(&url, "hello", "succeeded", 2);
    // The charts read counters the daemon writes to the store every few seconds.
    let mut stats = Value::Null;
    assert!(
        poll(Duration::from_secs(20), || {
            stats = get(&format!("{url}/api/v1/stats?window=1h"));
            stats["total"]["succeeded"] == 39 && stats["total"]["failed"] == 2
        }),
        "the stats never counted 39 succeeded and 2 failed: {stats:#}"
    );

    let mut b = Browser::open(&chromium, &format!("{url}/"));
    b.viewport(1280, 900, false);

    // --- overview: counts, workers, charts --------------------------------------------------
    b.wait_for(
        "document.querySelector('#count-mail-succeeded')?.textContent === '30'",
        "mail's 30 succeeded tasks",
    );
    // Set once the page is loaded: a reload would lose it.
    b.eval(&format!(
        "const t = document.querySelector('#token'); t.value = '{TOKEN}'; t.dispatchEvent(new Event('change')); window.__sameDocument = 'yes'; true"
    ));
    b.wait_for(
        "document.querySelector('#queues tr.total [data-count=succeeded]')?.textContent === '39'",
        "the total row",
    );
    // The workers panel: pid, state, uptime, tasks done, memory, and the restart button.
    b.wait_for(
        "document.querySelector('#workers tr[data-worker=\"hello/0\"] [data-worker-state]')?.dataset.workerState === 'running'",
        "the running worker",
    );
    let worker = b.eval(
        "(() => { const r = document.querySelector('#workers tr[data-worker=\"hello/0\"]'); return { pid: r.querySelector('[data-pid]').textContent, uptime: r.querySelector('[data-uptime]').textContent, done: r.querySelector('[data-tasks-done]').textContent, mem: r.querySelector('[data-memory]').textContent }; })()",
    );
    let api_workers = get(&format!("{url}/api/v1/queues"))["workers"].clone();
    let api_worker = &api_workers[0];
    assert_eq!(
        worker["pid"].as_str(),
        Some(api_worker["pid"].to_string().as_str())
    );
    assert_eq!(worker["done"], "2", "{worker}");
    assert!(
        worker["uptime"].as_str().is_some_and(|u| u.ends_with('s')),
        "{worker}"
    );
    assert!(
        worker["mem"]
            .as_str()
            .is_some_and(|m| m.ends_with("MiB") || m.ends_with("KiB")),
        "memory shown as MiB: {worker}; the API says {}",
        api_worker["rss_bytes"]
    );
    assert!(api_worker["rss_bytes"]
        .as_u64()
        .is_some_and(|m| m > 1 << 20));
    assert_eq!(
        b.eval("document.querySelector('#restart-hello')?.tagName"),
        json!("BUTTON")
    );

    // Charts: inline SVG with both axes; their numbers are the API's.
    b.wait_for(
        "document.querySelector('#tp-succeeded')?.textContent === '39'",
        "the throughput total",
    );
    let chart = b.eval(
        "(() => { const s = document.querySelector('svg#throughput'); const sum = (k) => [...s.querySelectorAll('g.bucket')].reduce((a, g) => a + Number(g.dataset[k]), 0); return { buckets: s.querySelectorAll('g.bucket').length, ok: sum('succeeded'), failed: sum('failed'), y: [...s.querySelectorAll('.y-axis text.tick')].map(t => Number(t.dataset.value)), x: [...s.querySelectorAll('.x-axis text.tick')].map(t => t.textContent), xt: [...s.querySelectorAll('.x-axis text.tick')].map(t => Number(t.dataset.time)), lat: document.querySelectorAll('svg#latency .y-axis text.tick').length, latx: document.querySelectorAll('svg#latency .x-axis text.tick').length }; })()",
    );
    let api = get(&format!("{url}/api/v1/stats?window=1h"));
    assert_eq!(
        chart["buckets"],
        json!(api["buckets"].as_array().map(Vec::len))
    );
    assert_eq!(chart["ok"], api["total"]["succeeded"], "{chart}");
    assert_eq!(chart["failed"], api["total"]["failed"], "{chart}");
    let per_bucket_max = api["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| {
            b["succeeded"].as_u64().unwrap_or(0)
                + b["failed"].as_u64().unwrap_or(0)
                + b["retried"].as_u64().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let y: Vec<f64> = chart["y"]
        .as_array()
        .expect("y ticks")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(y.len(), 5, "{chart}");
    assert_eq!(y[0], 0.0);
    let top = y[4];
    assert!(
        top >= per_bucket_max as f64 && top < 2.5 * per_bucket_max as f64,
        "the y axis tops at {top} for a tallest bar of {per_bucket_max}"
    );
    let xt: Vec<i64> = chart["xt"]
        .as_array()
        .expect("x ticks")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(xt.first().copied(), api["from"].as_i64(), "{chart}");
    assert_eq!(xt.last().copied(), api["to"].as_i64(), "{chart}");
    assert!(chart["x"].as_array().expect("x labels").iter().all(|l| l
        .as_str()
        .is_some_and(|l| l.len() == 5 && l.as_bytes()[2] == b':')));
    assert!(
        chart["lat"].as_u64() == Some(5) && chart["latx"].as_u64() >= Some(6),
        "{chart}"
    );
    b.screenshot(&shots.join("overview-1280.png"));
    b.eval("document.querySelector('#window-24h').click(); true");
    b.wait_for(
        "document.querySelector('#window-24h').getAttribute('aria-pressed') === 'true' && document.querySelectorAll('svg#throughput g.bucket').length === 96",
        "the 24-hour chart",
    );
    let day = get(&format!("{url}/api/v1/stats?window=24h"));
    assert_eq!(
        b.eval("document.querySelector('#tp-succeeded').textContent"),
        json!(day["total"]["succeeded"].to_string())
    );
    b.eval("document.querySelector('#window-1h').click(); true");

    // Live: a task enqueued now shows up in the counts without a reload.
    enqueue(
        &url,
        "mail",
        json!({ "payload": { "to": "late@example.com" } }),
    );
    b.wait_for(
        "document.querySelector('#count-mail-succeeded')?.textContent === '31'",
        "the new task, live",
    );
    assert_eq!(
        b.eval("window.__sameDocument"),
        json!("yes"),
        "the page reloaded"
    );

    // --- a count opens the filtered list; pages -------------------------------------------
    b.eval("document.querySelector('#count-mail-succeeded').click(); true");
    b.wait_for(
        "location.hash === '#tasks?queue=mail&state=succeeded' && document.querySelectorAll('#tasks tbody tr[data-task]').length === 25",
        "the first page of mail's succeeded tasks",
    );
    let first = rows(&mut b);
    assert!(first
        .iter()
        .all(|r| r["queue"] == "mail" && r["state"] == "succeeded"));
    assert_eq!(
        b.eval(
            "[document.querySelector('#f-queue').value, document.querySelector('#f-state').value]"
        ),
        json!(["mail", "succeeded"]),
        "the filter form shows the filter"
    );
    let api_page = get(&format!(
        "{url}/api/v1/tasks?queue=mail&state=succeeded&limit=25"
    ));
    let api_ids: Vec<&str> = api_page["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    let shown: Vec<&str> = first.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(shown, api_ids, "the page is the API's page");
    b.screenshot(&shots.join("tasks-filtered.png"));
    b.eval("document.querySelector('#page-older').click(); true");
    b.wait_for(
        "document.querySelectorAll('#tasks tbody tr[data-task]').length === 6",
        "the second page",
    );
    let second = rows(&mut b);
    assert!(second
        .iter()
        .all(|r| !shown.contains(&r["id"].as_str().unwrap_or(""))));
    assert_eq!(
        b.eval("document.querySelector('#page-older').disabled"),
        json!(true)
    );
    b.eval("document.querySelector('#page-newer').click(); true");
    b.wait_for(
        "document.querySelectorAll('#tasks tbody tr[data-task]').length === 25",
        "the first page again",
    );
    assert_eq!(
        rows(&mut b)
            .iter()
            .filter_map(|r| r["id"].as_str().map(String::from))
            .collect::<Vec<_>>(),
        shown.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );

    // --- search: payload field, unique key, id --------------------------------------------
    let search = |b: &mut Browser, q: &str| {
        b.eval(&format!(
            "document.querySelector('#f-queue').value = ''; document.querySelector('#f-state').value = ''; document.querySelector('#f-q').value = {}; document.querySelector('#filters').requestSubmit(); true",
            json!(q)
        ));
    };
    search(&mut b, "payload.user_id = 42");
    b.wait_for(
        "location.hash.includes('q=payload.user_id') && document.querySelectorAll('#tasks tbody tr[data-task]').length === 1",
        "the task with user_id 42",
    );
    assert_eq!(rows(&mut b)[0]["id"], json!(user[&42]));
    b.screenshot(&shots.join("tasks-search-payload.png"));
    search(&mut b, "key:report-2026-11");
    b.wait_for(
        &format!("document.querySelector('#tasks tbody tr[data-task]')?.dataset.task === '{keyed}' && document.querySelectorAll('#tasks tbody tr[data-task]').length === 1"),
        "the task with the unique key",
    );
    search(&mut b, &failed);
    b.wait_for(
        &format!("document.querySelector('#tasks tbody tr[data-task]')?.dataset.task === '{failed}' && document.querySelectorAll('#tasks tbody tr[data-task]').length === 1"),
        "the task searched by id",
    );
    search(&mut b, "no such thing");
    b.wait_for(
        "document.querySelector('#flash').textContent.includes('payload.FIELD = VALUE')",
        "what a search can be",
    );

    // --- bulk cancel behind a confirmation that shows the count ---------------------------
    show(
        &mut b,
        "#tasks?queue=slow&state=queued",
        "document.querySelectorAll('#tasks tbody tr[data-task]').length === 3",
    );
    b.eval("document.querySelector('#bulk-cancel').click(); true");
    b.wait_for(
        "document.querySelector('#confirm').open && document.querySelector('#confirm-count')?.textContent === '3'",
        "the confirmation with the count",
    );
    assert_eq!(
        count(&url, "slow", "queued"),
        3,
        "nothing changed before the confirmation"
    );
    b.screenshot(&shots.join("bulk-confirm.png"));
    // Keeping them changes nothing.
    b.eval("document.querySelector('#confirm-no').click(); true");
    b.wait_for(
        "!document.querySelector('#confirm').open",
        "the dialog closed",
    );
    assert_eq!(count(&url, "slow", "queued"), 3);
    b.eval("document.querySelector('#bulk-cancel').click(); true");
    b.wait_for(
        "document.querySelector('#confirm').open && document.querySelector('#confirm-count')?.textContent === '3'",
        "the confirmation again",
    );
    b.eval("document.querySelector('#confirm-yes').click(); true");
    wait_count(&url, "slow", "cancelled", 3);
    assert_eq!(
        count(&url, "slow", "running"),
        1,
        "the running one was not in the filter"
    );
    b.wait_for(
        "document.querySelector('#flash').textContent.startsWith('cancel: 3 done') && document.body.innerText.includes('no tasks match')",
        "the bulk cancel's answer and the emptied list",
    );

    // --- the task page ----------------------------------------------------------------------
    show(
        &mut b,
        &format!("#task/{failed}"),
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'failed' && document.querySelectorAll('.attempt').length === 1",
    );
    assert!(text(&mut b).contains("cannot reach db: connection refused"));
    assert_eq!(
        b.eval("[document.querySelector('#task-result').hidden, document.querySelector('#task-deps').hidden, !!document.querySelector('#task-retry')]"),
        json!([true, true, true]),
        "no result or dependencies yet; a retry button"
    );
    b.screenshot(&shots.join("task-failed.png"));
    // A task that returned a value shows it.
    show(
        &mut b,
        &format!("#task/{}", greeted[0]),
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'succeeded' && !document.querySelector('#task-result').hidden",
    );
    assert_eq!(
        b.eval("JSON.parse(document.querySelector('#result-json').textContent)"),
        json!({"greeted": "ann"}),
        "the task's result"
    );
    let running = slow[0].clone();
    show(
        &mut b,
        &format!("#task/{running}"),
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'running'",
    );
    assert_eq!(
        b.eval("[document.querySelector('#task-output').hidden, !!document.querySelector('#task-cancel')]"),
        json!([false, true])
    );

    // --- live output: a running task's lines appear before it ends ---------------------------
    // Each ticker task writes two lines, then waits for its release file: it cannot end
    // before the test has seen its output. First without a token typed (an EventSource reads
    // the stream), then with one (the page reads it with fetch and the Authorization header).
    for (n, with_token) in [(1, false), (2, true)] {
        let release = env.path().join(format!("release-{n}"));
        let id = enqueue(
            &url,
            "ticker",
            json!({ "payload": { "release": release.display().to_string() } }),
        );
        wait_count(&url, "ticker", "running", 1);
        let token = if with_token { TOKEN } else { "" };
        b.eval(&format!(
            "(() => {{ const t = document.querySelector('#token'); t.value = '{token}'; t.dispatchEvent(new Event('change')); return true; }})()"
        ));
        // The page of this task, not the previous round's (whose state may still read
        // `running` until the next refresh, with the same lines in its output box).
        show(
            &mut b,
            &format!("#task/{id}"),
            &format!(
                "document.querySelector('#task-head code')?.textContent === {} && document.querySelector('#task-state [data-state]')?.dataset.state === 'running'",
                json!(id)
            ),
        );
        b.wait_for(
            "[...document.querySelectorAll('#output-live [data-stream=stderr]')].map(s => s.textContent).join('').includes('on stderr') && document.querySelector('#output-live').textContent.includes('first line')",
            "the running task's first lines, live",
        );
        assert_eq!(
            get(&format!("{url}/api/v1/tasks/{id}"))["state"],
            json!("running"),
            "seen before the task ended"
        );
        assert_eq!(
            b.eval("[document.querySelector('#token').value, document.querySelector('#output-live').dataset.via]"),
            json!([token, if with_token { "fetch" } else { "eventsource" }]),
            "how the page reads the stream"
        );
        assert_eq!(
            b.eval("[document.querySelector('#task-output').hidden, document.querySelectorAll('#output-live img').length, window.__out ?? null, document.querySelector('#output-live').textContent.includes('last line')]"),
            json!([false, 0, null, false]),
            "the output is shown as text, and the task has not ended"
        );
        if n == 1 {
            b.screenshot(&shots.join("task-live-output.png"));
        }
        std::fs::write(&release, "").expect("release the task");
        b.wait_for(
            "document.querySelector('#output-live').dataset.ended === 'succeeded' && document.querySelector('#output-live').textContent.includes('last line')",
            "the rest of the output and the stream's end",
        );
        let done = get(&format!("{url}/api/v1/tasks/{id}"));
        let shown = b.eval(
            "['stdout', 'stderr'].map(k => [...document.querySelectorAll(`#output-live [data-stream=${k}]`)].map(s => s.textContent).join(''))",
        );
        assert_eq!(
            shown,
            json!([
                done["history"][0]["stdout_tail"],
                done["history"][0]["stderr_tail"]
            ]),
            "the live output is the attempt's whole output, each stream in order"
        );
    }
    assert_eq!(
        b.eval("document.querySelector('#token').value"),
        json!(TOKEN)
    );

    // --- keyboard: every control is reached with Tab, and shows where focus is -----------
    show(
        &mut b,
        "#",
        "document.querySelector('#count-mail-succeeded')?.textContent === '31'",
    );
    b.eval("document.activeElement.blur(); window.scrollTo(0, 0); true");
    let mut reached = std::collections::BTreeSet::new();
    let mut unseen_focus = Vec::new();
    for _ in 0..90 {
        b.press("Tab", "Tab", 9);
        let f = b.eval(
            "(() => { const e = document.activeElement; const s = getComputedStyle(e); return { id: e.id, tag: e.tagName, outline: s.outlineStyle, width: parseFloat(s.outlineWidth) }; })()",
        );
        let id = f["id"].as_str().unwrap_or_default().to_string();
        if f["tag"] != "BODY" && (f["outline"] == "none" || f["width"].as_f64() < Some(2.0)) {
            unseen_focus.push(f.clone());
        }
        reached.insert(id);
    }
    for want in [
        "token",
        "count-mail-succeeded",
        "count-all-failed",
        "pause-mail",
        "restart-hello",
        "window-24h",
    ] {
        assert!(
            reached.contains(want),
            "Tab never reached #{want}; it reached {reached:?}"
        );
    }
    assert!(
        unseen_focus.is_empty(),
        "focus without a visible outline: {unseen_focus:?}"
    );
    // Enter on a focused count opens its list.
    b.eval("document.querySelector('#count-fail-failed').focus(); true");
    b.press("Enter", "Enter", 13);
    b.wait_for(
        "location.hash === '#tasks?queue=fail&state=failed' && document.querySelectorAll('#tasks tbody tr[data-task]').length === 2",
        "the list opened with Enter",
    );
    // Every form control has a label.
    let unlabelled = b.eval(
        "[...document.querySelectorAll('input, select')].filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)",
    );
    assert_eq!(unlabelled, json!([]), "controls without a label");

    // --- schedules: next fire time, last outcome; fire, pause, resume ---------------------
    show(
        &mut b,
        "#",
        "!document.querySelector('#schedules-section').hidden && document.querySelectorAll('#schedules tr[data-schedule]').length === 2",
    );
    let sched = |b: &mut Browser, name: &str| {
        b.eval(&format!(
            "(() => {{ const r = document.querySelector('#schedules tr[data-schedule=\"{name}\"]'); return {{ queue: r.children[1].textContent, spec: r.children[2].textContent, next: r.querySelector('[data-next]').innerText, last: r.querySelector('[data-last]').textContent, outcome: r.querySelector('[data-last] [data-outcome]')?.dataset.outcome ?? null, state: r.querySelector('[data-schedule-state]').textContent }}; }})()"
        ))
    };
    let api_leap = get(&format!("{url}/api/v1/schedules/leap"))["schedule"].clone();
    let leap = sched(&mut b, "leap");
    assert_eq!(leap["queue"], "reports", "{leap}");
    assert_eq!(leap["spec"], "cron \"0 3 29 2 *\" UTC", "{leap}");
    assert_eq!(
        leap["next"],
        json!(format!(
            "{}\n{}",
            api_leap["next_local"].as_str().expect("a next slot"),
            api_leap["next_utc"].as_str().expect("a next slot")
        )),
        "the next fire time, local and UTC, is the API's"
    );
    assert!(
        api_leap["next_utc"]
            .as_str()
            .is_some_and(|n| n.contains("-02-29T03:00:00")),
        "{api_leap}"
    );
    assert_eq!(
        (&leap["last"], &leap["state"]),
        (&json!("none yet"), &json!("enabled"))
    );
    // `tick`'s last outcome: its slots are skipped while its first task waits, and the page
    // says why, as the API does.
    b.wait_for(
        "document.querySelector('#schedules tr[data-schedule=\"tick\"] [data-last] [data-outcome]')?.dataset.outcome === 'skipped'",
        "tick's skipped slots",
    );
    let api_tick = get(&format!("{url}/api/v1/schedules/tick"))["schedule"].clone();
    let reason = api_tick["last"]["reason"]
        .as_str()
        .expect("a skipped slot's reason")
        .to_string();
    assert!(reason.starts_with("overlap: "), "{api_tick}");
    let tick = sched(&mut b, "tick");
    assert!(
        tick["last"].as_str().is_some_and(|l| l.contains(&reason)),
        "the page shows why the slot was skipped: {tick}"
    );
    assert!(api_tick["fired"].as_u64() == Some(1), "{api_tick}");
    assert_eq!(count(&url, "held", "queued"), 1);
    // Fire: the schedule's task runs now; the schedule's slot record is untouched.
    b.eval("document.querySelector('#fire-leap').click(); true");
    wait_count(&url, "reports", "succeeded", 1);
    let fired = get(&format!("{url}/api/v1/tasks?queue=reports"))["tasks"][0].clone();
    assert_eq!(
        (&fired["schedule"], &fired["slot"]),
        (&json!("leap"), &Value::Null),
        "{fired}"
    );
    b.wait_for(
        "document.querySelector('#flash').textContent.includes('fire schedule leap')",
        "the fire's answer",
    );
    assert_eq!(
        sched(&mut b, "leap")["last"],
        "none yet",
        "a fire is not a slot"
    );
    // Pause, then resume: the row and the API agree.
    b.eval("document.querySelector('#pause-schedule-leap').click(); true");
    b.wait_for(
        "document.querySelector('#schedules tr[data-schedule=\"leap\"] [data-schedule-state]')?.textContent === 'PAUSED' && !!document.querySelector('#resume-schedule-leap')",
        "the paused schedule",
    );
    let paused = get(&format!("{url}/api/v1/schedules/leap"))["schedule"].clone();
    assert_eq!(
        (&paused["paused"], &paused["next"]),
        (&json!(true), &Value::Null)
    );
    assert_eq!(
        sched(&mut b, "leap")["next"],
        "-",
        "no next fire time while paused"
    );
    b.screenshot(&shots.join("schedules-paused.png"));
    b.eval("document.querySelector('#resume-schedule-leap').click(); true");
    b.wait_for(
        "document.querySelector('#schedules tr[data-schedule=\"leap\"] [data-schedule-state]')?.textContent === 'enabled' && !!document.querySelector('#pause-schedule-leap')",
        "the resumed schedule",
    );
    assert_eq!(
        get(&format!("{url}/api/v1/schedules/leap"))["schedule"]["paused"],
        json!(false)
    );
    let trail = get(&format!("{url}/api/v1/audit?limit=3"));
    let actions: Vec<&str> = trail["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["schedule_resume", "schedule_pause", "schedule_fire"],
        "the dashboard's changes, in the trail: {trail:#}"
    );

    // --- the audit trail: a cancel and a pause made with the named token ------------------
    let victim = enqueue(&url, "slow", json!({}));
    let (code, v) = post_as_ops(&format!("{url}/api/v1/tasks/{victim}/cancel"), None);
    assert!(code < 300, "cancel: {v:#}");
    let (code, v) = post_as_ops(&format!("{url}/api/v1/queues/fail/pause"), None);
    assert!(code < 300, "pause: {v:#}");
    // A bulk operation's filter is text the client chose: the page shows it as text.
    let hostile = "note = <img src=x onerror=\"window.__injected=1\">";
    let (code, v) = post_as_ops(
        &format!("{url}/api/v1/tasks/bulk"),
        Some(&json!({ "action": "cancel", "filter": { "queue": "users", "payload": hostile } })),
    );
    assert!(code < 300, "bulk cancel: {v:#}");
    let trail = get(&format!("{url}/api/v1/audit?limit=10"));
    let records: Vec<Value> = trail["records"].as_array().expect("records").clone();
    let (bulk_rec, pause, cancel) = (&records[0], &records[1], &records[2]);
    assert_eq!(
        (&bulk_rec["action"], &pause["action"], &cancel["action"]),
        (&json!("bulk_cancel"), &json!("pause"), &json!("cancel")),
        "newest first: {trail:#}"
    );
    for r in [bulk_rec, pause, cancel] {
        assert!(
            r["who"].as_str().is_some_and(|w| w.contains("\"ops\"")),
            "made with the token named ops: {r:#}"
        );
    }
    assert_eq!(
        cancel["target"],
        json!(format!("task {victim} (queue slow)"))
    );
    assert_eq!(pause["target"], json!("queue fail"));
    assert!(bulk_rec["target"]
        .as_str()
        .is_some_and(|t| t.contains("<img src=x")));
    show(
        &mut b,
        "#",
        "document.querySelectorAll('#audit-box tr[data-audit]').length > 0",
    );
    b.wait_for(
        &format!(
            "document.querySelector('#audit-box tr[data-audit]')?.dataset.audit === {}",
            json!(bulk_rec["id"])
        ),
        "the newest change in the overview's panel",
    );
    assert!(!b
        .eval("document.querySelector('#audit-section').hidden")
        .as_bool()
        .unwrap_or(true));
    let panel = audit_rows(&mut b, "audit-box");
    assert_audit_rows(&panel, &records);
    assert_eq!(
        b.eval("[document.querySelectorAll('#audit-box img').length, window.__injected ?? null]"),
        json!([0, null]),
        "the filter's markup was shown as text, never run"
    );
    b.screenshot(&shots.join("audit-panel.png"));
    // The full trail pages with the API's cursor: two records a page, newest first.
    show(
        &mut b,
        "#audit?limit=2",
        "document.querySelectorAll('#audit-full tr[data-audit]').length === 2",
    );
    let page1 = get(&format!("{url}/api/v1/audit?limit=2"));
    assert_audit_rows(
        &audit_rows(&mut b, "audit-full"),
        page1["records"].as_array().expect("records"),
    );
    let next = page1["next_cursor"]
        .as_str()
        .expect("older records follow")
        .to_string();
    assert_eq!(
        b.eval("[document.querySelector('#audit-older').dataset.cursor, document.querySelector('#audit-newer').disabled]"),
        json!([next, true])
    );
    b.eval("document.querySelector('#audit-older').click(); true");
    b.wait_for(
        &format!(
            "location.hash.includes('cursor=') && document.querySelector('#audit-full tr[data-audit]')?.dataset.audit === {}",
            json!(records[2]["id"])
        ),
        "the older page",
    );
    let page2 = get(&format!("{url}/api/v1/audit?limit=2&cursor={next}"));
    assert_audit_rows(
        &audit_rows(&mut b, "audit-full"),
        page2["records"].as_array().expect("records"),
    );
    assert_eq!(page2["records"][0]["id"], cancel["id"]);
    b.screenshot(&shots.join("audit-page2.png"));
    b.eval("document.querySelector('#audit-newer').click(); true");
    b.wait_for(
        &format!(
            "document.querySelector('#audit-full tr[data-audit]')?.dataset.audit === {} && document.querySelector('#audit-newer').disabled",
            json!(bulk_rec["id"])
        ),
        "the newest page again",
    );

    // --- phone width: nothing scrolls sideways --------------------------------------------
    b.viewport(375, 812, true);
    show(
        &mut b,
        "#",
        "document.querySelector('#count-mail-succeeded')?.textContent === '31' && !!document.querySelector('svg#throughput')",
    );
    no_overflow(&mut b, "the overview");
    b.screenshot(&shots.join("overview-375.png"));
    show(
        &mut b,
        "#tasks?queue=mail&state=succeeded",
        "document.querySelectorAll('#tasks tbody tr[data-task]').length === 25",
    );
    no_overflow(&mut b, "the task list");
    b.screenshot(&shots.join("tasks-375.png"));
    show(
        &mut b,
        &format!("#task/{failed}"),
        "document.querySelectorAll('.attempt').length === 1",
    );
    no_overflow(&mut b, "the task page");
    b.screenshot(&shots.join("task-375.png"));

    // The overview at desktop width, for docs/dashboard.png.
    b.viewport(1280, 1000, false);
    show(
        &mut b,
        "#",
        "document.querySelector('#count-mail-succeeded')?.textContent === '31' && !!document.querySelector('#workers tr[data-worker]')",
    );
    b.eval("document.activeElement.blur(); document.querySelector('#flash').style.display = 'none'; window.scrollTo(0, 0); true");
    let overview = shots.join("overview.png");
    b.screenshot(&overview);
    if std::env::var("TASKD_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        std::fs::copy(
            &overview,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png"),
        )
        .expect("refresh docs/dashboard.png");
    }
}

/// Poison pills on the task page: a task lost past `max_lost` (its daemon killed under it)
/// and one its long-lived worker died on `max_crashes` times show how often, beside the
/// error that says why they failed and each attempt's reason.
#[test]
fn a_poison_task_page_counts_its_lost_runs_and_crashes() {
    let Some(chromium) = find_chromium() else {
        common::skip::skip("chromium is not installed", "apt-get install -y chromium");
        return;
    };
    let shots = screenshot_dir("dashboard-poison");
    let env = Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [queues.poison]\nshell = \"sleep 30\"\nmax_lost = 0\n\n\
         [queues.dies]\nmax_attempts = 10\nmax_crashes = 2\nstart_secs = \"0s\"\n\
         worker = [\"sh\", \"-c\", \"echo '{{\\\"type\\\":\\\"ready\\\",\\\"protocol\\\":1}}' >&4; while read -r l <&3; do exit 3; done\"]\n"
    ));
    let first = env.daemon();
    let lost = env.submit("poison", "{}");
    env.wait_state(&lost, "running", Duration::from_secs(30));
    first.kill9();
    // The next start takes the run back: lost once, more than max_lost = 0.
    let d = env.daemon();
    let v = env.wait_state(&lost, "failed", Duration::from_secs(30));
    assert_eq!(v["lost"], 1, "{v:#}");
    let crashed = env.submit("dies", "{}");
    let v = env.wait_state(&crashed, "failed", Duration::from_secs(40));
    assert_eq!(v["crashes"], 2, "{v:#}");
    let url = d.api_base();

    let mut b = Browser::open(&chromium, &format!("{url}/"));
    b.viewport(1280, 900, false);
    b.wait_for(
        "document.querySelector('#count-poison-failed')?.textContent === '1' && document.querySelector('#count-dies-failed')?.textContent === '1'",
        "one failed task in each queue",
    );
    // The audit trail's record of the second start says what it did with the lost task.
    b.wait_for(
        "document.body.innerText.includes('(2 queues; 1 task failed, lost more often than max_lost)')",
        "the start's audit record counting the failed task",
    );
    show(
        &mut b,
        &format!("#task/{lost}"),
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'failed' && !!document.querySelector('#task-lost')",
    );
    assert_eq!(
        b.eval("document.querySelector('#task-lost').textContent"),
        json!("1 (the daemon or node running it died; past max_lost it fails)")
    );
    assert_eq!(
        b.eval("document.querySelector('#task-crashes')"),
        Value::Null,
        "no crashes, no line"
    );
    let page = text(&mut b);
    assert!(
        page.contains("lost 1 times") && page.contains("more than max_lost = 0"),
        "the error says why: {page}"
    );
    assert_eq!(
        b.eval("[...document.querySelectorAll('.attempt h2')].map(h => h.textContent)"),
        json!(["attempt 1 — lost"]),
        "{page}"
    );
    b.screenshot(&shots.join("task-lost.png"));

    show(
        &mut b,
        &format!("#task/{crashed}"),
        "document.querySelector('#task-state [data-state]')?.dataset.state === 'failed' && !!document.querySelector('#task-crashes')",
    );
    assert_eq!(
        b.eval("document.querySelector('#task-crashes').textContent"),
        json!("2 (its worker died running it; at max_crashes it fails)")
    );
    assert_eq!(b.eval("document.querySelector('#task-lost')"), Value::Null);
    let page = text(&mut b);
    assert!(
        page.contains("died running this task 2 times (max_crashes = 2)"),
        "the newest attempt says why: {page}"
    );
    let heads = b.eval("[...document.querySelectorAll('.attempt h2')].map(h => h.textContent)");
    assert!(
        heads.as_array().is_some_and(|h| h.len() == 2
            && h.iter()
                .all(|t| t.as_str().unwrap_or("").contains("— crash"))),
        "{heads}"
    );
    b.screenshot(&shots.join("task-crashes.png"));
}
