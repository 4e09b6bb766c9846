//! A private PostgreSQL server for tests: `initdb` into a temp dir, `postgres` on a free
//! port of 127.0.0.1 with its Unix socket in that dir, trust authentication, `fsync` off
//! (a test's data need not survive a power loss; a killed server still finds its writes in
//! the page cache); stopped and removed when dropped, restartable on the same data.
//!
//! The binaries are searched in `/usr/lib/postgresql/<version>/bin` (Debian's `postgresql`
//! package, newest version first), then `/usr/local/bin` and `PATH`. Where they are missing,
//! [`PgServer::start`] skips the test visibly (`common::skip`) and returns `None`, except
//! under `CI=true`, where it fails the test. Running as root, the server runs as the
//! `postgres` system user (PostgreSQL refuses root), which owns the temp dir. The machine's
//! own PostgreSQL service is never touched.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    /// The uid and gid the server runs as, when this process is root.
    user: Option<(u32, u32)>,
}

/// The directory holding `initdb`, `postgres` and `psql`, if any.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Newest version first: "15" sorts after "9.6" only as a number.
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.reverse();
    dirs.push(PathBuf::from("/usr/local/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// The `postgres` system user's uid and gid, when this process is root.
fn server_user() -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("running as root, the tests run PostgreSQL as the `postgres` system user, which does not exist (apt-get install -y postgresql creates it)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

impl PgServer {
    /// Start a fresh server, or `None` (with a message) when PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            crate::common::skip::skip_named(
                test,
                "PostgreSQL (initdb, postgres) is not installed",
                "apt-get install -y postgresql",
            );
            return None;
        };
        let user = server_user();
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown pg dir");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod pg dir");
        let mut s = PgServer {
            port: 0,
            dir,
            bin,
            child: None,
            user,
        };
        let out = s
            .command("initdb")
            .arg("-D")
            .arg(s.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port can be taken between choosing and binding it: try a few.
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn() {
                return Some(s);
            }
        }
        panic!(
            "{test}: could not start postgres on a free port; its log:\n{}",
            s.log()
        );
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A command of the server's binaries, run as the server's user.
    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.dir.path());
        c.env_remove("PGDATA");
        c
    }

    /// A URL of database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Start the server process and wait until it answers; false if it exited.
    fn spawn(&mut self) -> bool {
        let log_path = self.dir.path().join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("postgres log");
        if let Some((uid, gid)) = self.user {
            let _ = std::os::unix::fs::chown(&log_path, Some(uid), Some(gid));
        }
        let sock = self.dir.path().display().to_string();
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={sock}")])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent: a test process that dies without dropping the server takes it along.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        // The parent-death signal goes with the *thread* that forked: a thread that lives as
        // long as the test process does, so that the server outlives the test that started it
        // (other tests share it) but not the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        });
        let child = rx
            .recv()
            .expect("the spawning thread")
            .expect("spawn postgres");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if self.ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres did not answer within 60 s; its log:\n{}",
            self.log()
        );
    }

    /// Whether the server accepts connections.
    pub fn ready(&self) -> bool {
        self.psql_output("postgres", "SELECT 1")
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn psql_output(&self, db: &str, sql: &str) -> std::io::Result<Output> {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
    }

    /// Run `sql` with `psql` on database `db`; its output (unaligned, tuples only). Panics
    /// when psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.psql_output(db, sql).expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `psql` on database `db` with `sql` fed on standard input (several statements, a
    /// transaction); the whole output.
    pub fn psql_script(&self, db: &str, sql: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        child
            .stdin
            .take()
            .expect("psql stdin")
            .write_all(sql.as_bytes())
            .expect("write to psql");
        child.wait_with_output().expect("psql output")
    }

    /// A new, empty database; its name.
    pub fn new_db(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Stop the server at once (SIGQUIT: immediate shutdown, as a crash) and wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = c.wait();
        }
    }

    /// Start it again after [`Self::kill`], on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        assert!(
            self.spawn(),
            "postgres did not come back on port {}; its log:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test binary's server, shared by the tests that are running; the last one to finish
/// stops it (a later test starts another).
static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());

/// The binary's shared server, started when none runs; `None` after a visible skip.
pub fn shared(test: &str) -> Option<Arc<PgServer>> {
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(server) = slot.upgrade() {
        return Some(server);
    }
    let server = Arc::new(PgServer::start(test)?);
    *slot = Arc::downgrade(&server);
    Some(server)
}
