//! Watching output with the real daemon and real tasks: `taskd logs ID [--follow]`, `taskd
//! tail QUEUE`, and the output streams of the HTTP API read with a plain HTTP client. Tasks
//! wait on gate files the test creates, so "seen before the task ended" is a fact of the
//! test, not of timing; every wait polls with a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{poll, secs, Env, BIN};
use serde_json::Value;

/// A shell queue `q` whose tasks see the test's directory as `$D`, with `extra` settings.
fn env_with(taskd_extra: &str, script: &str, extra: &str) -> Env {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    let text = format!(
        "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n{taskd_extra}\n\n\
         [queues.q]\nconcurrency = 2\nshell = '''{script}'''\nenv = {{ D = '{d}' }}\n{extra}\n"
    );
    std::fs::write(&env.config, text).expect("write config");
    env
}

/// A line of shell that waits for the gate file `$D/NAME`.
fn gate(name: &str) -> String {
    format!("while [ ! -e \"$D/{name}\" ]; do sleep 0.02; done")
}

fn open_gate(env: &Env, name: &str) {
    std::fs::write(env.path().join(name), "").expect("open the gate");
}

/// A running `taskd` command whose stdout is read line by line as it comes, and whose
/// stderr goes to a file.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Watcher {
    fn spawn(mut cmd: Command, dir: &Path) -> Watcher {
        let stderr = dir.join(format!("watcher-{}.err", common::unique()));
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("start taskd");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next line of its stdout, within `deadline`.
    fn line(&self, deadline: Duration) -> String {
        match self.lines.recv_timeout(deadline) {
            Ok(l) => l,
            Err(e) => panic!(
                "no line on stdout within {deadline:?} ({e}); stderr so far:\n{}",
                self.stderr()
            ),
        }
    }

    /// Wait for it to exit; its code.
    fn wait(&mut self, deadline: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            assert!(
                start.elapsed() < deadline,
                "taskd did not exit within {deadline:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What is left on stdout once it exited.
    fn rest(&self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(secs(5)) {
            v.push(l);
        }
        v
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a `logs`/`tail` stderr.
fn meta_lines(stderr: &str) -> Vec<String> {
    stderr.lines().map(str::to_string).collect()
}

/// The lines of a follower's stderr from the first attempt on: a follower that came before
/// the task started first says what it waits for.
fn from_first_attempt(stderr: &str) -> Vec<String> {
    let lines = meta_lines(stderr);
    let waiting = lines
        .iter()
        .take_while(|l| l.starts_with("── waiting: "))
        .count();
    for l in &lines[..waiting] {
        assert_eq!(
            l, "── waiting: the task is queued (attempt 1 starts when a slot is free) ──",
            "{stderr}"
        );
    }
    lines[waiting..].to_vec()
}

fn node_of(env: &Env, id: &str) -> String {
    common::history(&env.show(id))[0]["node"]
        .as_str()
        .expect("a node")
        .to_string()
}

/// `── attempt N · started TIME on NODE · WHAT ──`, with TIME the attempt's start.
fn assert_attempt_header(line: &str, attempt: &str, node: &str, what: &str) {
    let rest = line
        .strip_prefix(&format!("── {attempt} · started "))
        .unwrap_or_else(|| panic!("not the header of {attempt}: {line:?}"));
    let (time, rest) = rest.split_once(' ').expect("a time");
    assert!(
        time.len() == 20 && time.ends_with('Z') && time.contains('T'),
        "not an RFC 3339 time: {time:?} in {line:?}"
    );
    assert_eq!(rest, format!("on {node} · {what} ──"), "in {line:?}");
}

/// `── attempt N ended after DURATION: HOW ──`.
fn assert_attempt_end(line: &str, attempt: &str, how: &str) {
    let rest = line
        .strip_prefix(&format!("── {attempt} ended after "))
        .unwrap_or_else(|| panic!("not the end of {attempt}: {line:?}"));
    let (_, said) = rest.split_once(": ").expect("a duration, then how");
    assert_eq!(said, format!("{how} ──"), "in {line:?}");
}

#[test]
fn follow_shows_output_while_the_task_runs_then_its_end() {
    let script = format!(
        "echo \"step one\"; echo \"warming up\" >&2; {}; echo \"step two\"; echo \"done\" >&2",
        gate("go")
    );
    let env = env_with("", &script, "");
    let _d = env.daemon();
    let id = env.submit("q", "{}");
    let mut w = Watcher::spawn(env.cmd(&["logs", &id, "--follow"]), env.path());
    // The task cannot print its second line, nor end, before the gate opens.
    assert_eq!(w.line(secs(20)), "step one");
    env.wait_state(&id, "running", secs(20));
    assert!(!env.path().join("go").exists());
    open_gate(&env, "go");
    assert_eq!(w.line(secs(20)), "step two");
    assert_eq!(w.wait(secs(20)), Some(0), "{}", w.stderr());
    assert!(w.rest().is_empty());
    let node = node_of(&env, &id);
    let err = from_first_attempt(&w.stderr());
    assert_eq!(err.len(), 5, "{err:#?}");
    assert_attempt_header(&err[0], "attempt 1", &node, "live");
    assert_eq!(err[1], "warming up");
    assert_eq!(err[2], "done");
    assert_attempt_end(&err[3], "attempt 1", "exit code 0; the task succeeded");
    assert_eq!(err[4], format!("── task {id} succeeded after 1 attempt ──"));
}

#[test]
fn a_failed_task_followed_through_its_retries_exits_4() {
    let script = format!(
        "echo \"try $TASKD_ATTEMPT\"; {}; exit 3",
        gate("go-$TASKD_ATTEMPT")
    );
    let env = env_with(
        "",
        &script,
        "max_attempts = 2\nbackoff = { kind = \"fixed\", base = \"100ms\" }",
    );
    let _d = env.daemon();
    let id = env.submit("q", "{}");
    let mut w = Watcher::spawn(env.cmd(&["logs", &id, "--follow"]), env.path());
    assert_eq!(w.line(secs(20)), "try 1");
    open_gate(&env, "go-1");
    assert_eq!(w.line(secs(20)), "try 2");
    open_gate(&env, "go-2");
    assert_eq!(w.wait(secs(20)), Some(4), "{}", w.stderr());
    let node = node_of(&env, &id);
    let err = from_first_attempt(&w.stderr());
    assert_attempt_header(&err[0], "attempt 1", &node, "live");
    let retry = err[1]
        .strip_prefix("── attempt 1 ended after ")
        .and_then(|r| r.split_once(": ").map(|(_, s)| s))
        .unwrap_or_else(|| panic!("{err:#?}"));
    assert!(
        retry.starts_with("exit code 3; it runs again at "),
        "{retry:?}"
    );
    // Lines about the wait may come between (the retry's backoff), then the second attempt.
    let second = err
        .iter()
        .position(|l| l.starts_with("── attempt 2 · started"))
        .unwrap_or_else(|| panic!("{err:#?}"));
    for l in &err[2..second] {
        assert!(
            l.starts_with("── waiting: attempt 2 runs at ")
                || l == "── waiting: the task is queued (attempt 2 starts when a slot is free) ──",
            "{err:#?}"
        );
    }
    assert_attempt_header(&err[second], "attempt 2", &node, "live");
    assert_attempt_end(
        &err[second + 1],
        "attempt 2",
        "exit code 3; gave up after 2 attempts; the task failed",
    );
    assert_eq!(
        err[second + 2],
        format!("── task {id} failed after 2 attempts: exit code 3; gave up after 2 attempts ──")
    );
    assert_eq!(err.len(), second + 3, "{err:#?}");
}

#[test]
fn logs_of_a_finished_task_print_its_stored_tails_without_a_daemon() {
    let env = env_with(
        "",
        "echo \"out $TASKD_ATTEMPT\"; echo \"err $TASKD_ATTEMPT\" >&2; [ \"$TASKD_ATTEMPT\" -ge 2 ]",
        "max_attempts = 3\nbackoff = { kind = \"fixed\", base = \"100ms\" }",
    );
    let id = {
        let _d = env.daemon();
        let id = env.submit("q", "{}");
        env.wait_state(&id, "succeeded", secs(20));
        id
    }; // the daemon is stopped here: stored tails come from the store
    let node = node_of(&env, &id);
    let run = |args: &[&str]| {
        let out = env.run(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = run(&["logs", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "out 2\n");
    let err = meta_lines(&err);
    assert_eq!(err.len(), 4, "{err:#?}");
    assert_attempt_header(&err[0], "attempt 2", &node, "stored output");
    assert_eq!(err[1], "err 2");
    assert_attempt_end(&err[2], "attempt 2", "exit code 0; the task succeeded");
    assert_eq!(
        err[3],
        format!("── task {id} succeeded after 2 attempts ──")
    );

    // An earlier attempt: its own tails, and how it ended.
    let (code, out, err) = run(&["logs", &id, "--attempt", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "out 1\n");
    let err = meta_lines(&err);
    assert_attempt_header(&err[0], "attempt 1", &node, "stored output");
    assert_eq!(err[1], "err 1");
    assert_attempt_end(&err[2], "attempt 1", "exit code 1");
    assert_eq!(
        err[3],
        format!("── task {id} succeeded after 2 attempts ──")
    );

    // --follow of a finished task: the same, and the exit status says how it ended.
    let (code, out, _) = run(&["logs", &id, "--follow"]);
    assert_eq!((code, out.as_str()), (Some(0), "out 2\n"));

    // --json: one event per line.
    let (code, out, _) = run(&["logs", &id, "--json"]);
    assert_eq!(code, Some(0));
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON event per line");
            v["event"].as_str().expect("event").to_string()
        })
        .collect();
    assert_eq!(kinds, ["attempt", "output", "output", "attempt_end", "end"]);

    // Unknown ids, and attempts the task does not have, are usage errors.
    let unknown = "0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20";
    let (code, out, err) = run(&["logs", unknown, "--follow"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty());
    assert!(
        err.starts_with(&format!("taskd: no task with id {unknown} in sqlite:")),
        "{err}"
    );
    let (code, _, err) = run(&["logs", "not-an-id"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("`not-an-id` is not a task id"), "{err}");
    let (code, _, err) = run(&["logs", &id, "--attempt", "3"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim(),
        format!("taskd: task {id} has no attempt 3: its attempts are 1 to 2")
    );
}

#[test]
fn logs_of_a_running_task_without_follow_show_what_it_wrote_so_far() {
    let env = env_with(
        "",
        &format!("echo \"so far\"; {}; echo after", gate("go")),
        "",
    );
    let _d = env.daemon();
    let id = env.submit("q", "{}");
    env.wait_state(&id, "running", secs(20));
    let mut out = String::new();
    let ok = poll(secs(20), || {
        out = env.ok(&["logs", &id]);
        !out.is_empty()
    });
    assert!(ok, "nothing shown of the running task");
    assert_eq!(out, "so far\n");
    let o = env.run(&["logs", &id]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let last = err.lines().last().unwrap_or_default().to_string();
    assert_eq!(
        last,
        format!("── the attempt is still running; `taskd logs --follow {id}` follows it ──")
    );
    open_gate(&env, "go");
    env.wait_state(&id, "succeeded", secs(20));
}

#[test]
fn tail_prefixes_each_line_with_its_task_through_the_socket_and_the_api() {
    let script = format!(
        "echo \"$TASKD_ARG_name one\"; {}; echo \"$TASKD_ARG_name two\"",
        gate("go")
    );
    let env = env_with("listen = \"127.0.0.1:0\"", &script, "");
    let d = env.daemon();
    let url = d.api_base();
    let local = Watcher::spawn(env.cmd(&["tail", "q"]), env.path());
    let remote = Watcher::spawn(env.cmd(&["tail", "q", "--server", &url]), env.path());
    for w in [&local, &remote] {
        let ok = poll(secs(20), || {
            w.stderr().contains("── following the tasks of queue q")
        });
        assert!(ok, "tail did not start: {}", w.stderr());
    }
    let a = env.submit("q", r#"{"name":"alpha"}"#);
    let b = env.submit("q", r#"{"name":"beta"}"#);
    let short = |id: &str| id.replace('-', "")[24..].to_string();
    let (sa, sb) = (short(&a), short(&b));
    assert_ne!(sa, sb);
    for w in [&local, &remote] {
        // Both run at once (each waits for the gate): each first line, in either order.
        let mut first = vec![w.line(secs(20)), w.line(secs(20))];
        first.sort();
        let mut want = vec![format!("{sa} | alpha one"), format!("{sb} | beta one")];
        want.sort();
        assert_eq!(first, want, "{}", w.stderr());
    }
    env.wait_state(&a, "running", secs(20));
    env.wait_state(&b, "running", secs(20));
    open_gate(&env, "go");
    for w in [&local, &remote] {
        let mut second = vec![w.line(secs(20)), w.line(secs(20))];
        second.sort();
        let mut want = vec![format!("{sa} | alpha two"), format!("{sb} | beta two")];
        want.sort();
        assert_eq!(second, want);
    }
    // taskd's own lines, on stderr, carry the prefix too.
    for w in [&local, &remote] {
        let ok = poll(secs(20), || {
            let err = w.stderr();
            [&sa, &sb].iter().all(|s| {
                err.lines().any(|l| {
                    l.starts_with(&format!("{s} | ── attempt 1 ended after "))
                        && l.ends_with(": exit code 0; the task succeeded ──")
                })
            })
        });
        assert!(ok, "{}", w.stderr());
        let err = w.stderr();
        for s in [&sa, &sb] {
            assert!(
                err.lines()
                    .any(|l| l.starts_with(&format!("{s} | ── attempt 1 · started "))
                        && l.ends_with(" · live ──")),
                "{err}"
            );
        }
    }
    // A queue that does not exist is a usage error.
    let o = env.run(&["tail", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown queue `nope`"));
}

#[test]
fn tail_needs_a_running_daemon() {
    let env = env_with("", "true", "");
    let o = env.run(&["tail", "q"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no taskd daemon is running for the state directory")
            && err.contains("`taskd tail` shows the tasks a running daemon runs"),
        "{err}"
    );
}

/// A plain HTTP/1.1 client for a stream: the status line, the headers, then the body as it
/// comes (chunked), read event by event.
struct Sse {
    reader: BufReader<std::net::TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    /// Decoded body not yet split into events.
    body: String,
    chunk_left: usize,
}

#[derive(Debug, Clone)]
struct Event {
    event: String,
    id: Option<String>,
    data: Value,
}

impl Sse {
    fn get(base: &str, path: &str, headers: &[(&str, &str)]) -> Sse {
        let addr = base.trim_start_matches("http://");
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(secs(30))).expect("timeout");
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        (&s).write_all(req.as_bytes()).expect("send");
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("a header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("a header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        Sse {
            reader,
            status,
            headers,
            body: String::new(),
            chunk_left: 0,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// More of the chunked body; false at its end.
    fn fill(&mut self) -> bool {
        if self.chunk_left == 0 {
            let mut size = String::new();
            if self.reader.read_line(&mut size).unwrap_or(0) == 0 {
                return false;
            }
            if size.trim().is_empty() {
                size.clear();
                if self.reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return false;
                }
            }
            self.chunk_left = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if self.chunk_left == 0 {
                return false;
            }
        }
        let mut buf = vec![0u8; self.chunk_left.min(64 * 1024)];
        let n = self.reader.read(&mut buf).expect("read the body");
        if n == 0 {
            return false;
        }
        self.chunk_left -= n;
        self.body
            .push_str(std::str::from_utf8(&buf[..n]).expect("UTF-8 events"));
        true
    }

    /// The next event (comments skipped); `None` at the end of the stream.
    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(i) = self.body.find("\n\n") {
                let block: String = self.body[..i].to_string();
                self.body.drain(..i + 2);
                let mut event = None;
                let mut id = None;
                let mut data = None;
                for l in block.lines() {
                    if let Some(v) = l.strip_prefix("event: ") {
                        event = Some(v.to_string());
                    } else if let Some(v) = l.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = l.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).expect("data is JSON"));
                    } else {
                        assert!(l.starts_with(':'), "not an SSE line: {l:?}");
                    }
                }
                let Some(data) = data else { continue };
                let event = event.expect("every event is named");
                assert_eq!(data["event"], event.as_str(), "event: and data agree");
                assert_eq!(data.get("id").and_then(Value::as_str), id.as_deref());
                return Some(Event { event, id, data });
            }
            if !self.fill() {
                return None;
            }
        }
    }
}

#[test]
fn the_output_stream_frames_events_and_resumes_from_last_event_id() {
    let script = format!(
        "echo alpha; {}; echo beta; echo warn >&2; {}; echo gamma",
        gate("g1"),
        gate("g2")
    );
    let env = env_with("listen = \"127.0.0.1:0\"", &script, "");
    let d = env.daemon();
    let url = d.api_base();
    let id = env.submit("q", "{}");
    let path = format!("/api/v1/tasks/{id}/output?follow=true");
    let mut s = Sse::get(&url, &path, &[]);
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    // A follower that comes before the task starts is told what it waits for.
    let mut first = s.next().expect("an event");
    while first.event == "notice" {
        first = s.next().expect("an event");
    }
    assert_eq!(first.event, "attempt");
    assert_eq!(first.data["live"], true);
    assert_eq!(first.data["run"], 1);
    assert_eq!(first.id.as_deref(), Some("1:0:0"));
    let alpha = s.next().expect("an event");
    assert_eq!(alpha.event, "output");
    assert_eq!(alpha.data["stream"], "stdout");
    assert_eq!(alpha.data["data"], "alpha\n");
    assert_eq!(alpha.id.as_deref(), Some("1:6:0"));
    // The client goes away; the task goes on meanwhile.
    drop(s);
    open_gate(&env, "g1");
    let ok = poll(secs(20), || {
        // What the running task wrote so far (a stream without follow ends at once).
        let mut probe = Sse::get(&url, &format!("/api/v1/tasks/{id}/output"), &[]);
        let (mut out, mut err) = (String::new(), String::new());
        while let Some(e) = probe.next() {
            let text = e.data["data"].as_str().unwrap_or_default();
            match e.data["stream"].as_str() {
                Some("stdout") => out.push_str(text),
                Some("stderr") => err.push_str(text),
                _ => {}
            }
        }
        out == "alpha\nbeta\n" && err == "warn\n"
    });
    assert!(ok, "the task did not write its second part");
    // Reconnecting with the last id: neither `alpha` again nor anything lost. (Two pipes
    // written a moment apart may be read in either order: the order is the daemon's.)
    let mut s = Sse::get(&url, &path, &[("Last-Event-ID", "1:6:0")]);
    assert_eq!(s.status, 200);
    let mut two = [s.next().expect("an event"), s.next().expect("an event")];
    two.sort_by_key(|e| e.data["stream"].as_str().unwrap_or_default().to_string());
    let (err_ev, out_ev) = (&two[0], &two[1]);
    assert_eq!(
        (out_ev.data["stream"].as_str(), out_ev.data["data"].as_str()),
        (Some("stdout"), Some("beta\n"))
    );
    assert_eq!(
        (err_ev.data["stream"].as_str(), err_ev.data["data"].as_str()),
        (Some("stderr"), Some("warn\n"))
    );
    let ids: Vec<&str> = [&two[0], &two[1]]
        .iter()
        .map(|e| e.id.as_deref().unwrap_or_default())
        .collect();
    assert!(
        ids.contains(&"1:11:5"),
        "the later of the two is at 11 bytes of stdout and 5 of stderr: {ids:?}"
    );
    open_gate(&env, "g2");
    let gamma = s.next().expect("an event");
    assert_eq!(gamma.data["data"], "gamma\n");
    let end = s.next().expect("an event");
    assert_eq!(end.event, "attempt_end");
    assert_eq!(end.data["state"], "succeeded");
    assert_eq!(end.data["exit_code"], 0);
    assert_eq!(end.id.as_deref(), Some("1:end"));
    let fin = s.next().expect("an event");
    assert_eq!(fin.event, "end");
    assert_eq!(fin.data["state"], "succeeded");
    assert_eq!(fin.id.as_deref(), Some("end"));
    assert!(s.next().is_none(), "the stream closes after the end");
    // The same position given as `from`, for clients that cannot set the header.
    let mut s = Sse::get(&url, &format!("{path}&from=1:11:5"), &[]);
    let mut texts = Vec::new();
    while let Some(e) = s.next() {
        if e.event == "output" {
            texts.push(e.data["data"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(
        texts,
        ["gamma\n"],
        "the ended attempt is still held: resumed exactly"
    );
    // A client that had the end is told there is nothing more (no reconnect loop).
    let s = Sse::get(&url, &path, &[("Last-Event-ID", "end")]);
    assert_eq!(s.status, 204);
    // Errors are JSON, before any stream begins.
    let (code, body) = get_json(
        &url,
        "/api/v1/tasks/0190f3c2-7d4e-7a51-9c3b-2f1e8d6a4b20/output",
    );
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "task_not_found");
    let (code, body) = get_json(&url, &format!("/api/v1/tasks/{id}/output?from=nonsense"));
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "bad_query");
    let (code, body) = get_json(&url, &format!("/api/v1/tasks/{id}/output?attempt=2"));
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "attempt_not_found");
    let (code, body) = get_json(&url, "/api/v1/queues/nope/output");
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "unknown_queue");

    // `taskd logs --server` reads the same stream.
    let elsewhere = Env::raw("");
    let out = Command::new(BIN)
        .args(["logs", "--server", &url, &id, "--follow"])
        .env_remove("TASKD_CONFIG")
        .current_dir(elsewhere.path())
        .output()
        .expect("run taskd");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha\nbeta\ngamma\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| *l == "warn")
            .count(),
        1
    );
}

fn get_json(url: &str, path: &str) -> (u16, Value) {
    match ureq::get(&format!("{url}{path}")).timeout(secs(20)).call() {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

#[test]
fn the_output_stream_follows_the_same_token_rules_as_every_read() {
    const TOKEN: &str = "test-token-0123456789abcdef";
    let env = Env::raw(&format!(
        "[taskd]\nstate_dir = \"state\"\nlisten = \"0.0.0.0:0\"\ntoken = \"{TOKEN}\"\n\n[queues.q]\nshell = \"echo hi\"\n"
    ));
    let d = env.daemon();
    let url = d.api_base().replace("0.0.0.0", "127.0.0.1");
    let id = env.submit("q", "{}");
    env.wait_state(&id, "succeeded", secs(20));
    for path in [
        format!("/api/v1/tasks/{id}/output"),
        "/api/v1/queues/q/output".to_string(),
    ] {
        let s = Sse::get(&url, &path, &[]);
        assert_eq!(s.status, 401, "{path} without the token");
        let s = Sse::get(
            &url,
            &path,
            &[("Authorization", "Bearer wrong-token-0123456789")],
        );
        assert_eq!(s.status, 401, "{path} with a wrong token");
        let s = Sse::get(
            &url,
            &path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        );
        assert_eq!(s.status, 200, "{path} with the token");
    }
}

#[test]
fn a_worker_queue_task_is_followed_live() {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    std::fs::write(
        env.path().join("w.py"),
        r#"
import json, os, sys, time
d = os.environ["D"]
os.write(4, b'{"type":"ready","protocol":1}\n')
tasks = os.fdopen(3, "r")
for line in tasks:
    msg = json.loads(line)
    print("worker got", msg["payload"]["n"], flush=True)
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.02)
    print("worker done", file=sys.stderr, flush=True)
    os.write(4, (json.dumps({"type": "result", "id": msg["id"], "status": "ok"}) + "\n").encode())
"#,
    )
    .expect("write the worker");
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\n\n[queues.w]\nworker = [\"python3\", \"{d}/w.py\"]\nstart_secs = \"100ms\"\nenv = {{ D = '{d}' }}\n"
        ),
    )
    .expect("write config");
    let _daemon = env.daemon();
    let id = env.submit("w", r#"{"n": 7}"#);
    let mut w = Watcher::spawn(env.cmd(&["logs", &id, "--follow"]), env.path());
    assert_eq!(w.line(secs(30)), "worker got 7");
    // Its start is recorded a moment after it began: it is running, not ended.
    env.wait_state(&id, "running", secs(20));
    open_gate(&env, "go");
    assert_eq!(w.wait(secs(20)), Some(0), "{}", w.stderr());
    // The follower may have come before the worker was ready.
    let err = from_first_attempt(&w.stderr());
    let node = node_of(&env, &id);
    assert_attempt_header(&err[0], "attempt 1", &node, "live");
    assert_eq!(err[1], "worker done");
    assert_attempt_end(
        &err[2],
        "attempt 1",
        "the worker answered ok; the task succeeded",
    );
    assert_eq!(err[3], format!("── task {id} succeeded after 1 attempt ──"));
}

#[test]
fn a_follower_that_does_not_read_never_holds_the_task_up() {
    // 8 MiB, far more than a pipe and the daemon's ring hold, once the gate opens.
    let script = format!(
        "echo start; {}; head -c 8388608 /dev/zero | tr '\\0' x; echo; echo last line",
        gate("go")
    );
    let env = env_with("", &script, "");
    let _d = env.daemon();
    let id = env.submit("q", "{}");
    // The follower's stdout is a pipe nobody reads until the task has ended.
    let stderr = env.path().join("slow.err");
    let mut child = env
        .cmd(&["logs", &id, "--follow"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start the follower");
    let ok = poll(secs(20), || {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("── attempt 1 · started")
    });
    assert!(ok, "the follower did not attach");
    open_gate(&env, "go");
    // The task ends while its follower is stuck on a full pipe.
    env.wait_state(&id, "succeeded", secs(60));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the follower should still be blocked on its full stdout"
    );
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read the follower");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"start"));
    assert_eq!(lines.last(), Some(&"last line"));
    // Each time the follower fell behind what the daemon holds, one marker on a line of its
    // own says how much it missed.
    let skipped: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("[… ") && l.ends_with(" bytes skipped]"))
        .map(|l| {
            l.trim_start_matches("[… ")
                .trim_end_matches(" bytes skipped]")
                .parse()
                .expect("a byte count")
        })
        .collect();
    assert!(!skipped.is_empty(), "no gap marked ({} lines)", lines.len());
    let n: u64 = skipped.iter().sum();
    let shown: usize = lines
        .iter()
        .filter(|l| l.starts_with('x'))
        .map(|l| l.len())
        .sum();
    assert_eq!(
        n as usize + shown,
        8 * 1024 * 1024,
        "what was skipped and what was shown add up to what the task wrote"
    );
}

#[test]
fn a_terminal_gets_control_characters_escaped_unless_raw() {
    let env = env_with("", "printf 'title\\033]0;pwned\\007 and\\rover\\n'", "");
    let id = {
        let _d = env.daemon();
        let id = env.submit("q", "{}");
        env.wait_state(&id, "succeeded", secs(20));
        id
    };
    // A pipe gets the bytes as the task wrote them.
    let out = env.run(&["logs", &id]);
    assert_eq!(out.stdout, b"title\x1b]0;pwned\x07 and\rover\n");
    // A terminal gets them as escapes; --raw gives them as they came.
    let on_a_terminal = |extra: &[&str]| -> Vec<u8> {
        let mut args = vec!["logs", id.as_str()];
        args.extend_from_slice(extra);
        run_on_pty(env.cmd(&args))
    };
    let shown = on_a_terminal(&[]);
    let text = String::from_utf8_lossy(&shown);
    assert!(
        text.contains("title\\x1b]0;pwned\\x07 and\\rover"),
        "escaped on a terminal: {text:?}"
    );
    assert!(
        !shown.contains(&0x1b),
        "no escape byte reached the terminal: {text:?}"
    );
    let raw = on_a_terminal(&["--raw"]);
    assert!(
        raw.windows(9).any(|w| w == b"title\x1b]0;"),
        "--raw writes the bytes as they came: {:?}",
        String::from_utf8_lossy(&raw)
    );
}

/// Run `cmd` with its stdout on a pseudo-terminal (stderr to a pipe); what it wrote there.
fn run_on_pty(mut cmd: Command) -> Vec<u8> {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let (master, slave) = (std::fs::File::from(pty.master), pty.slave);
    cmd.stdout(Stdio::from(slave)).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start taskd on a terminal");
    drop(cmd); // the parent's copy of the slave: reads see EIO once the child is done
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let status = child.wait().expect("wait");
    assert!(status.success(), "taskd on a terminal: {status}");
    reader.join().expect("the reader")
}

#[test]
fn at_most_64_output_streams_are_open_at_once() {
    let env = env_with("listen = \"127.0.0.1:0\"", "true", "");
    let d = env.daemon();
    let url = d.api_base();
    // A queue's stream stays open: 64 of them take every place.
    let open: Vec<Sse> = (0..64)
        .map(|_| {
            let s = Sse::get(&url, "/api/v1/queues/q/output", &[]);
            assert_eq!(s.status, 200);
            s
        })
        .collect();
    let (code, body) = get_json(&url, "/api/v1/queues/q/output");
    assert_eq!(code, 503);
    assert_eq!(body["error"]["code"], "too_many_streams");
    assert_eq!(body["error"]["limit"], 64);
    // Everything else is still served.
    let (code, _) = get_json(&url, "/api/v1/queues");
    assert_eq!(code, 200);
    drop(open);
}

#[test]
fn a_follower_outlives_a_daemon_restart() {
    let env = Env::raw("");
    let d = env.path().display().to_string();
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"200ms\"\n\n\
             [queues.q]\nshell = '''echo started; {}; echo finished'''\nkill_grace = \"1s\"\nenv = {{ D = '{d}' }}\n",
            gate("go")
        ),
    )
    .expect("write config");
    let first = env.daemon();
    let id = env.submit("q", "{}");
    let mut w = Watcher::spawn(env.cmd(&["logs", &id, "--follow"]), env.path());
    assert_eq!(w.line(secs(20)), "started");
    // The daemon stops: the task is put back (not charged); the follower goes on through
    // the broker.
    first.signal(common::SIGTERM);
    assert_eq!(first.wait_exit(secs(30)), Some(0));
    let ok = poll(secs(20), || {
        w.stderr().contains(
            "── the daemon closed the stream (the daemon stopped?); following the task through the broker from here ──",
        )
    });
    assert!(ok, "{}", w.stderr());
    assert_eq!(env.state(&id), "queued");
    open_gate(&env, "go");
    let _second = env.daemon();
    assert_eq!(w.wait(secs(30)), Some(0), "{}", w.stderr());
    // The second run, from its stored tails, and the end.
    let rest = w.rest();
    assert_eq!(
        rest.iter().rev().take(2).rev().collect::<Vec<_>>(),
        ["started", "finished"],
        "{rest:?}"
    );
    let err = meta_lines(&w.stderr());
    let stored = err
        .iter()
        .filter(|l| {
            l.starts_with("── attempt 2 (TASKD_ATTEMPT=1) · started ")
                && l.ends_with(" · stored output ──")
        })
        .count();
    assert_eq!(stored, 1, "{err:#?}");
    assert_eq!(
        err.last().map(String::as_str),
        Some(format!("── task {id} succeeded after 1 attempt ──").as_str()),
        "{err:#?}"
    );
}
