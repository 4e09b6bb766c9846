//! The API on a Unix socket (`listen = "unix:/path"`), through the real daemon: served
//! beside a TCP listener, without a token (the file's permissions decide, mode 0660 and
//! `listen_group`), refused to a peer those permissions keep out, a stale file replaced and
//! a live one of another daemon left alone, the file removed at exit; the CLI's
//! `--server unix:/path`.
//!
//! Tests that switch users or create a group need root: they are skipped, visibly, when the
//! tests do not run as root, and fail under `CI=true` (`common::skip`).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{poll, Env, BIN};

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "unix-socket-test-token-0123456789";

/// One HTTP request over the socket at `path`: the status and the body.
fn http(path: &Path, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(path).expect("connect to the API's socket");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A config serving the API on loopback TCP (with a token) and on `sock`.
fn env_with_socket(extra: &str) -> Env {
    let env = Env::new("");
    std::fs::write(
        &env.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nshutdown_grace = \"5s\"\nlisten = [\"127.0.0.1:0\", \"unix:api.sock\"]\ntoken = \"{TOKEN}\"\n{extra}\n[queues.echo]\nshell = 'cat > /dev/null; printf %s \"$TASKD_TASK_ID\" > \"$TASKD_RESULT_FILE\"'\n"
        ),
    )
    .unwrap();
    env
}

fn taskd(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TASKD_CONFIG")
        .env_remove("TASKD_SERVER")
        .env_remove("TASKD_TOKEN")
        .output()
        .expect("run taskd")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_api_is_served_on_a_unix_socket_without_a_token_beside_tcp_with_one() {
    let env = env_with_socket("");
    let d = env.daemon();
    let sock = env.path().join("api.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "mode 0660");
    assert!(
        d.log_text()
            .contains(&format!("API listening on unix:{}", sock.display())),
        "{}",
        d.log_text()
    );

    // Over the socket: enqueue and read with no token.
    let (status, body) = http(
        &sock,
        "POST",
        "/api/v1/queues/echo/tasks",
        Some(r#"{"payload": {"n": 1}}"#),
    );
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(poll(DEADLINE, || {
        let (_, b) = http(&sock, "GET", &format!("/api/v1/tasks/{id}"), None);
        b.contains("\"succeeded\"")
    }));
    // Over TCP the token rules hold as before.
    let url = d.api_base();
    let r = ureq::post(&format!("{url}/api/v1/queues/echo/tasks")).send_string("{}");
    assert!(
        matches!(r, Err(ureq::Error::Status(401, _))),
        "TCP without a token: {r:?}"
    );

    // The CLI: --server unix:PATH, for status (the table people read), submit and result.
    let server = format!("unix:{}", sock.display());
    let out = taskd(&["status", "--server", &server]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("daemon: answering at {server}")),
        "{stdout}"
    );
    assert!(stdout.contains("echo"), "{stdout}");
    let out = taskd(&["submit", "echo", "{}", "--server", &server]);
    assert!(out.status.success(), "{}", text(&out));
    let id2 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = taskd(&[
        "result",
        &id2,
        "--wait",
        "--timeout",
        "30s",
        "--server",
        &server,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("\"{id2}\""),
        "the result over the socket"
    );
    // TASKD_SERVER works as --server does.
    let out = Command::new(BIN)
        .args(["show", &id2])
        .env("TASKD_SERVER", &server)
        .env_remove("TASKD_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));

    // The audit trail names the socket's peer by its uid (the kernel's word).
    let (_, body) = http(&sock, "POST", "/api/v1/queues/echo/pause", None);
    let (_, audit) = http(&sock, "GET", "/api/v1/audit", None);
    let uid = nix::unistd::getuid().as_raw();
    assert!(
        audit.contains(&format!("\"uid\":{uid}")) && audit.contains("unix socket"),
        "pause answered {body}; audit: {audit}"
    );
    // With its user name, looked up when the record is written.
    if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::getuid()) {
        assert!(
            audit.contains(&format!("\"user\":\"{}\"", user.name)),
            "the peer's user name {}: {audit}",
            user.name
        );
    }

    // Removed at exit.
    d.signal(common::SIGTERM);
    assert_eq!(d.wait_exit(DEADLINE), Some(0));
    assert!(!sock.exists(), "the socket file is removed at exit");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_of_another_daemon_is_left_alone() {
    let env = env_with_socket("");
    let sock = env.path().join("api.sock");
    // A daemon killed with SIGKILL leaves its socket file behind.
    let d = env.daemon();
    d.kill9();
    assert!(sock.exists(), "SIGKILL leaves the file");
    let d = env.daemon();
    assert_eq!(http(&sock, "GET", "/healthz", None).0, 200);

    // Another daemon (another store) configured on the same path is refused, and the
    // first one keeps its socket.
    let other = Env::new("");
    std::fs::write(
        &other.config,
        format!(
            "[taskd]\nstate_dir = \"state\"\nlisten = \"unix:{}\"\n[queues.q]\nshell = \"true\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let out = other.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another process is serving the socket") && err.contains("`listen`"),
        "{err}"
    );
    assert_eq!(
        http(&sock, "GET", "/healthz", None).0,
        200,
        "the first daemon still serves"
    );
    drop(d);

    // A file that is not a socket is never removed.
    let plain = Env::new("");
    let path = plain.path().join("not-a-socket");
    std::fs::write(&path, "keep me").unwrap();
    std::fs::write(
        &plain.config,
        "[taskd]\nstate_dir = \"state\"\nlisten = \"unix:not-a-socket\"\n[queues.q]\nshell = \"true\"\n",
    )
    .unwrap();
    let out = plain.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a socket"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

/// A group made for one test, deleted when it ends.
struct TempGroup(String);

impl TempGroup {
    fn create() -> Option<TempGroup> {
        let name = format!("taskdsock{}", std::process::id());
        let ok = Command::new("groupadd")
            .arg(&name)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TempGroup(name))
    }

    fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(&self.0)
            .unwrap()
            .expect("the group exists")
            .gid
            .as_raw()
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.0).status();
    }
}

#[test]
fn listen_group_owns_the_socket_and_a_peer_outside_it_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        common::skip::skip(
            "needs root to create a group and switch users",
            "run the tests as root",
        );
        return;
    }
    let Some(group) = TempGroup::create() else {
        common::skip::skip(
            "groupadd failed",
            "install the passwd package (groupadd, groupdel)",
        );
        return;
    };
    let env = env_with_socket(&format!("listen_group = \"{}\"", group.0));
    // The directory must be open to other users for the socket's own mode to decide.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _d = env.daemon();
    let sock = env.path().join("api.sock");
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(
        meta.gid(),
        group.gid(),
        "the socket belongs to listen_group"
    );
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);

    let server = format!("unix:{}", sock.display());
    let as_nobody = |groups: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534"]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={groups}"));
        }
        c.arg(BIN)
            .args(["status", "--server", &server])
            .env_remove("TASKD_CONFIG")
            .env_remove("TASKD_TOKEN")
            .output()
            .expect("run taskd through setpriv")
    };
    // Outside the group: the kernel refuses the connection.
    let out = as_nobody("");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed to reach the taskd API") && err.contains("ermission denied"),
        "{err}"
    );
    // A member of the group is served, with no token.
    let out = as_nobody(&group.gid().to_string());
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo"));
}
