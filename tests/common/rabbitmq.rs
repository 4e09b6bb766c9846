//! A private RabbitMQ for a test: its own node name, AMQP port, distribution port and Erlang
//! port mapper (epmd), with its data, logs, config and Erlang cookie in a temp dir; killed with
//! every Erlang process it started when dropped, and restartable on the same ports and data.
//!
//! Why a private epmd: an Erlang node registers its name with the port mapper on
//! `ERL_EPMD_PORT` (4369 by default), which a machine's own RabbitMQ also uses. A test node
//! that registered there would share that registry with the machine's node and every other
//! test's node, and a node that starts epmd itself leaves it running as a daemon after the
//! test. So each server runs its own `epmd` on a free port (a child of the test, in the
//! server's process group) and the node is pointed at it; the AMQP port, the distribution
//! port (`RABBITMQ_DIST_PORT`) and the node name are fresh too, so nothing collides with the
//! machine's RabbitMQ on 5672/25672 or with other tests.
//!
//! The server is the upstream start script `/usr/lib/rabbitmq/bin/rabbitmq-server` of
//! Debian's `rabbitmq-server` package (the `/usr/sbin` wrapper switches to the `rabbitmq`
//! user and its directories), or the script named by `TASKD_TEST_RABBITMQ_SERVER`. Where it
//! is missing, [`RabbitServer::start`] skips the test visibly (`common::skip`) and returns
//! `None`, except under `CI=true`, where it fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RabbitServer {
    /// The AMQP listener, on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    /// `rabbit-taskd-<pid>-<n>@localhost`.
    pub node: String,
    dir: tempfile::TempDir,
    /// The private epmd (the process group's leader) and the server's start script.
    epmd: Option<Child>,
    server: Option<Child>,
}

const DEFAULT_SCRIPT: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

fn script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TASKD_TEST_RABBITMQ_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(DEFAULT_SCRIPT);
    p.is_file().then_some(p)
}

fn in_path(name: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Does an AMQP 0-9-1 server answer on this port? (The protocol header gets a
/// `connection.start` method frame back, type 1.) RabbitMQ opens its listener last, when the
/// node has booted.
pub fn amqp_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut buf = [0u8; 1];
    matches!(s.read(&mut buf), Ok(1) if buf[0] == 1)
}

/// Every process in process group `pgid`, and all their descendants (Erlang's port helpers,
/// `erl_child_setup` and what it starts, live in sessions of their own).
fn tree_of_group(pgid: i32) -> Vec<i32> {
    let mut procs = Vec::new(); // (pid, ppid, pgid)
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            if f.len() > 3 {
                let ppid = f[1].parse::<i32>().unwrap_or(0);
                let pg = f[2].parse::<i32>().unwrap_or(0);
                procs.push((pid, ppid, pg));
            }
        }
    }
    let mut found: Vec<i32> = procs.iter().filter(|p| p.2 == pgid).map(|p| p.0).collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for p in &procs {
            if p.1 == parent && !found.contains(&p.0) {
                found.push(p.0);
            }
        }
        i += 1;
    }
    found
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.contains(") Z ") || s.contains(") X "),
        Err(_) => true,
    }
}

impl RabbitServer {
    /// Start a fresh server and wait until it accepts AMQP connections, or `None` (with a
    /// message) when RabbitMQ or epmd is not installed.
    pub fn start(test: &str) -> Option<RabbitServer> {
        if script().is_none() || !in_path("epmd") {
            crate::common::skip::skip_named(
                test,
                "rabbitmq-server is not installed",
                "apt-get install -y rabbitmq-server",
            );
            return None;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // A port can be taken between choosing and binding it: try a few.
        for _ in 0..4 {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut s = RabbitServer {
                port: free_port(),
                dist_port: free_port(),
                epmd_port: free_port(),
                node: format!("rabbit-taskd-{}-{n}@localhost", std::process::id()),
                dir: tempfile::tempdir().expect("temp dir for rabbitmq"),
                epmd: None,
                server: None,
            };
            if s.port == s.dist_port || s.port == s.epmd_port || s.dist_port == s.epmd_port {
                continue;
            }
            s.write_config();
            if s.spawn() {
                return Some(s);
            }
            s.kill();
        }
        panic!(
            "{test}: could not start rabbitmq-server on free ports: {}",
            DEFAULT_SCRIPT
        );
    }

    /// The broker URL as Celery writes it (vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}//", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node's log (RabbitMQ writes it under the log base, named after the node).
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        for name in [format!("log/{}.log", self.node), "out.log".to_string()] {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(&name)) {
                text.push_str(&format!("--- {name}\n{t}"));
            }
        }
        text
    }

    fn write_config(&self) {
        let d = self.dir.path();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(d.join(sub)).expect("rabbitmq dirs");
        }
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\n\
                 disk_free_limit.absolute = 10MB\n\
                 log.console = false\n\
                 log.file.level = info\n",
                self.port
            ),
        )
        .expect("rabbitmq.conf");
        std::fs::write(d.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        // Read instead of /etc/rabbitmq/rabbitmq-env.conf, which belongs to the machine.
        std::fs::write(d.join("rabbitmq-env.conf"), "").expect("rabbitmq-env.conf");
    }

    /// The environment that makes the start script and `rabbitmqctl` use this node's files.
    fn env(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.env("HOME", d.join("home")) // the Erlang cookie
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d.join("rabbitmq.pid"))
            .env_remove("RABBITMQ_USE_LONGNAME")
            .env_remove("NOTIFY_SOCKET");
    }

    /// Start epmd and the node; wait until AMQP answers. False if either exited (a port was
    /// taken); panics with the node's log if it is still booting after 90 s.
    fn spawn(&mut self) -> bool {
        use std::os::unix::process::CommandExt;
        let d = self.dir.path().to_path_buf();
        let epmd_log = std::fs::File::create(d.join("epmd.log")).expect("epmd log");
        let epmd = Command::new("epmd")
            .args([
                "-port",
                &self.epmd_port.to_string(),
                "-address",
                "127.0.0.1",
            ])
            .stdin(Stdio::null())
            .stdout(epmd_log.try_clone().expect("log"))
            .stderr(epmd_log)
            .process_group(0)
            .spawn()
            .expect("spawn epmd");
        let group = epmd.id() as i32;
        self.epmd = Some(epmd);
        // epmd listens at once; wait for it so that the node registers with this one.
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err() {
            if self.epmd_exited() || start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::fs::File::create(d.join("out.log")).expect("rabbitmq out log");
        let mut cmd = Command::new(script().expect("rabbitmq-server script"));
        self.env(&mut cmd);
        let server = cmd
            .current_dir(&d)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .process_group(group)
            .spawn()
            .expect("spawn rabbitmq-server");
        self.server = Some(server);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(90) {
            if self.server_exited() || self.epmd_exited() {
                return false;
            }
            if amqp_answers(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "rabbitmq-server did not answer AMQP on port {} within 90 s; its logs:\n{}",
            self.port,
            self.log_text()
        );
    }

    fn server_exited(&mut self) -> bool {
        matches!(
            self.server.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_)))
        )
    }

    fn epmd_exited(&mut self) -> bool {
        matches!(self.epmd.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
    }

    /// The pids of every process this server runs now (epmd, the start script, the Erlang VM
    /// and its helpers).
    pub fn pids(&self) -> Vec<i32> {
        match &self.epmd {
            Some(e) => tree_of_group(e.id() as i32),
            None => Vec::new(),
        }
    }

    /// SIGKILL every process of the server (what a durable queue must survive) and wait until
    /// they are all gone.
    pub fn kill(&mut self) {
        let Some(epmd) = self.epmd.as_ref() else {
            return;
        };
        let group = epmd.id() as i32;
        let pids = tree_of_group(group);
        // SAFETY: kill(2) on our own process group and on processes found in it or below it
        // a moment ago; no memory is involved.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
            for &p in &pids {
                libc::kill(p, libc::SIGKILL);
            }
        }
        for c in [self.server.take(), self.epmd.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.wait();
        }
        let start = Instant::now();
        while !pids.iter().all(|&p| gone(p)) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill it and start it again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Start it again after [`Self::kill`].
    pub fn start_again(&mut self) {
        assert!(self.epmd.is_none(), "the server is still running");
        // The listener's port can linger a moment after the kill: a few tries.
        for _ in 0..5 {
            if self.spawn() {
                return;
            }
            self.kill();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "rabbitmq-server did not come back on port {}:\n{}",
            self.port,
            self.log_text()
        );
    }

    /// Run `rabbitmqctl -q ARGS` against this node; its stdout (panics when it fails).
    pub fn ctl(&self, args: &[&str]) -> String {
        let script = script().expect("rabbitmq-server script");
        let ctl = script.with_file_name("rabbitmqctl");
        let mut cmd = Command::new(ctl);
        self.env(&mut cmd);
        // The CLI is an Erlang node too: its distribution port must not be one another
        // rabbitmqctl on this machine holds.
        let p = free_port().to_string();
        cmd.env("RABBITMQ_CTL_DIST_PORT_MIN", &p)
            .env("RABBITMQ_CTL_DIST_PORT_MAX", &p)
            .current_dir(self.dir.path())
            .args(["-q", "-n", &self.node])
            .args(args);
        let out = cmd.output().expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rabbitmqctl list_queues` as (name → (ready, unacknowledged, consumers)).
    pub fn queues(&self) -> std::collections::BTreeMap<String, (u64, u64, u64)> {
        let text = self.ctl(&[
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() == 4 {
                let n = |s: &str| s.trim().parse::<u64>().unwrap_or(0);
                out.insert(f[0].to_string(), (n(f[1]), n(f[2]), n(f[3])));
            }
        }
        out
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill();
    }
}
