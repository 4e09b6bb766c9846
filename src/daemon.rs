//! The daemon: the only place that wires config, broker, executor and supervisor together.
//!
//! `taskd start` sets the process up first (`cli::start`: config, exit 78 when invalid →
//! logging → the state directory lock, one daemon per state directory → the store lock
//! ([`storelock`]: one daemon per store, whatever its state directory) → descriptors
//! close-on-exec, child subreaper → runtime); then [`serve`] runs: broker →
//! recovery of tasks a previous daemon left `running` (their process groups are killed,
//! the tasks queued again without charging an attempt) → supervisor → the HTTP API on
//! `listen` (bound before READY) → signals. On a shared broker (Redis) other nodes hold
//! leases too, so there is no recovery at start: every node heartbeats its record and
//! takes back expired leases as it goes, and an unreachable broker is waited for.
//! Draining: the API answers 503 until the drain ends, then closes.
//!
//! Signals: SIGTERM/SIGINT drain (a second one stops at once); SIGHUP reloads the config
//! (an invalid file is refused and the old config kept).
//!
//! The embedded store is watched: when its file is deleted or replaced under the daemon (its
//! state directory removed), the daemon stops claiming, says so in the log and in `taskd
//! status`, and keeps the store lock, so that no second daemon starts beside it.

pub mod storelock;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::audit::{Action, Actor, AuditEntry};
use crate::backoff::Doubling;
use crate::broker::Recover;
use crate::config::{Config, ConfigError};
use crate::control::ReloadReply;
use crate::exit::{self, Failure};
use crate::notify::Notifier;
use crate::supervisor::startlog::StartLog;
use crate::supervisor::Supervisor;

/// A log file that SIGUSR1 reopens, so that logrotate can move it away.
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<std::sync::Mutex<File>>,
}

impl LogFile {
    fn open_file(path: &Path) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(std::sync::Mutex::new(Self::open_file(path)?)),
        })
    }

    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = Self::open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

/// One log line's writer: takes the lock per write, so a reopen never splits a line.
pub struct LogFileWriter(Arc<std::sync::Mutex<File>>);

impl Write for LogFileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Ok(write_or_drop(&mut *file, buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write one whole log line, or drop and count it: logging never fails, so it can neither
/// panic nor stop the work that logs. `buf.len()` either way.
fn write_or_drop(to: &mut impl Write, buf: &[u8]) -> usize {
    if to.write_all(buf).is_err() {
        crate::metrics::log_line_dropped();
    }
    buf.len()
}

/// The daemon's stderr as a log writer. Once the reader of a pipe is gone (`taskd start 2>&1
/// | logger`, and logger died) every write fails with EPIPE: the line is dropped and counted
/// (`taskd_log_lines_dropped_total`), and the daemon carries on.
pub struct LogStderr;

impl Write for LogStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(write_or_drop(&mut std::io::stderr().lock(), buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogFileWriter;
    fn make_writer(&'a self) -> LogFileWriter {
        LogFileWriter(self.file.clone())
    }
}

/// Creates `state_dir` (0700) when missing, then gives it the mode the config asks for,
/// whatever the umask: 0700, only the daemon's user; with `state_group`, that group and 2770
/// (set-group-id, so that what the daemon or a producer of the group creates in it belongs
/// to the group), and the group on what is already in it. The store's files follow the
/// directory's mode when the broker opens them (0600, or 0660 in a group's directory).
pub fn secure_state_dir(state_dir: &Path, group: Option<&str>) -> Result<(), Failure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |what: String, e: &dyn std::fmt::Display| {
        Failure::new(
            exit::FAILURE,
            format!(
                "failed to {what} the state directory {}: {e}",
                state_dir.display()
            ),
        )
    };
    if !state_dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| fail("create".into(), &e))?;
    }
    let mode = match group {
        None => 0o700,
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .map_err(|e| fail(format!("look up group {name} for"), &e))?
                .ok_or_else(|| {
                    fail(
                        format!("find group {name} (`state_group`) for"),
                        &"no such group",
                    )
                })?
                .gid;
            let chgrp = |p: &Path| nix::unistd::chown(p, None, Some(gid));
            chgrp(state_dir).map_err(|e| fail(format!("give group {name}"), &e))?;
            for entry in std::fs::read_dir(state_dir).map_err(|e| fail("read".into(), &e))? {
                let path = entry.map_err(|e| fail("read".into(), &e))?.path();
                if let Err(e) = chgrp(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "failed to give a state file to `state_group`");
                }
            }
            0o2770
        }
    };
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("set mode {mode:04o} on"), &e))
}

/// The lock that keeps a second daemon off a state directory. Held for the process's life.
pub struct StateLock {
    _file: Flock<File>,
    pub path: PathBuf,
}

const LOCK_FILE: &str = "taskd.pid";
/// How long a starting daemon waits for the state directory's lock before it gives up.
const LOCK_WAIT: Duration = Duration::from_secs(2);

impl StateLock {
    /// Creates `state_dir` when missing, gives it its mode (see [`secure_state_dir`]) and
    /// takes its lock.
    pub fn acquire(state_dir: &Path, group: Option<&str>) -> Result<StateLock, Failure> {
        secure_state_dir(state_dir, group)?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!("failed to open {}: {e}", path.display()),
                )
            })?;
        // A holder that is going away (a daemon just killed, whose last child has not yet
        // closed its copy of the descriptor; a `taskd status` reading it) lets go within
        // moments: wait a little before calling it another daemon.
        let give_up = std::time::Instant::now() + LOCK_WAIT;
        let mut file = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((back, _)) if std::time::Instant::now() < give_up => file = back,
                Err((mut back, _)) => {
                    let mut holder = String::new();
                    let _ = back.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "another taskd daemon{} is already using the state directory {}; stop it first, or give this one its own state_dir",
                            if holder.is_empty() { String::new() } else { format!(" (pid {holder})") },
                            state_dir.display()
                        ),
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(StateLock { _file: file, path })
    }
}

/// The pid of the daemon holding `state_dir`, if one does.
pub fn running_daemon(state_dir: &Path) -> Option<u32> {
    let path = state_dir.join(LOCK_FILE);
    let file = File::open(&path).ok()?;
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => return None, // nobody holds it (our shared lock goes with the descriptor)
        Err((file, _)) => file,
    };
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

fn node_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Open the broker. A shared broker that cannot be reached is waited for, with backoff,
/// rather than failing the start: a daemon that exits would be restarted by its service
/// manager into the same error, again and again. `None`: a signal asked to stop meanwhile.
async fn open_broker(config: &Config) -> anyhow::Result<Option<Arc<dyn crate::broker::Broker>>> {
    if !config.broker.is_shared() {
        return Ok(Some(crate::broker::open(&config.broker).await?));
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut backoff = Doubling::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let delay = backoff.next_delay();
        match crate::broker::open(&config.broker).await {
            Ok(b) => return Ok(Some(b)),
            Err(crate::broker::BrokerError::Unavailable(e)) => {
                tracing::error!(broker = %config.broker, retry_in = %humantime::format_duration(delay), "{e}");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
        }
    }
}

/// On a shared broker: keep this node's record fresh, and take back the tasks of nodes
/// whose leases expired (any node may; the first to look does). Their process groups are
/// killed when they ran on this machine.
async fn cluster_loop(
    broker: Arc<dyn crate::broker::Broker>,
    supervisor: Arc<Supervisor>,
    lease: Duration,
) {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    // A dead node's tasks come back within a lease and a tick of it.
    let mut tick = tokio::time::interval((lease / 3).min(CLUSTER_TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down = false;
    loop {
        tick.tick().await;
        let me = crate::broker::NodeInfo {
            id: supervisor.node().to_string(),
            host: host.clone(),
            pid: std::process::id(),
            queues: supervisor.queue_names(),
            running: supervisor.snapshot().running,
            last_heartbeat: 0,
        };
        let beat = broker.heartbeat(&me).await;
        // The heartbeat is a write: it tells whether a full broker has room again.
        match &beat {
            Ok(()) => supervisor.broker_writes(),
            Err(crate::broker::BrokerError::Full(e)) => supervisor.broker_full(e),
            Err(_) => {}
        }
        let recovered = match beat {
            Ok(()) => broker
                .recover(
                    Recover::Expired(crate::model::now_ms()),
                    "the node running this task stopped renewing its lease (it died or lost the broker); queued again, attempt not charged",
                )
                .await,
            Err(e) => Err(e),
        };
        match recovered {
            Ok(orphans) => {
                if down {
                    tracing::info!("the broker is reachable again");
                    down = false;
                }
                if !orphans.is_empty() {
                    // Only by pid and start time: the tasks are already queued again, and a
                    // node on this machine may have started a new run of one of them, which
                    // a search by task id would find and kill.
                    let killed = orphans
                        .iter()
                        .filter(|o| match (o.pid, o.pid_start) {
                            (Some(pid), Some(start)) => {
                                crate::executor::kill_orphan_group(pid, start)
                            }
                            _ => false,
                        })
                        .count();
                    tracing::warn!(
                        tasks = orphans.len(),
                        process_groups_killed = killed,
                        "took back tasks whose lease expired"
                    );
                }
            }
            // Said by the supervisor, which stops claiming until a write passes.
            Err(crate::broker::BrokerError::Full(_)) => {}
            Err(e) => {
                if !down {
                    tracing::error!(error = %e, "the broker is unreachable; running tasks go on, results are kept until it is back");
                    down = true;
                }
            }
        }
    }
}

/// Of the tasks a previous daemon of this state directory noted as started, those whose
/// processes may be killed by task id: every one not held by a live process of this machine
/// (on a shared broker another node here may already run a new attempt of it).
async fn stale_local_runs(
    broker: &dyn crate::broker::Broker,
    noted: impl Iterator<Item = crate::model::TaskId>,
) -> Vec<String> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    // Only the few with a process still alive are looked up (the log may hold many ids).
    let noted: Vec<String> = noted.map(|id| id.to_string()).collect();
    let mut out = Vec::new();
    for id in crate::executor::task_ids_with_processes(&noted) {
        let Ok(tid) = id.parse::<crate::model::TaskId>() else {
            continue;
        };
        let holder = match broker.get(tid).await {
            Ok(Some(t)) => t.task.node,
            Ok(None) => None,
            // Unknown: leave its processes alone rather than risk another node's run.
            Err(_) => continue,
        };
        let held_here_by_a_live_node = holder.as_deref().is_some_and(|n| {
            n.rsplit_once(':').is_some_and(|(h, pid)| {
                h == host
                    && pid.parse::<i32>().is_ok_and(|p| {
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
                    })
            })
        });
        if !held_here_by_a_live_node {
            out.push(id);
        }
    }
    out
}

/// A file's identity: device and inode.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// How often the embedded store's file is looked at.
const STORE_WATCH: Duration = Duration::from_secs(1);

/// Halt the supervisor for good once the store's file is gone or another file took its
/// place: this daemon's writes go to an unlinked file nobody else sees, and tasks stored
/// in the new file by `taskd submit` would never be seen by it. Only a restart mends that.
async fn watch_store(path: PathBuf, id: (u64, u64), supervisor: Arc<Supervisor>) {
    loop {
        tokio::time::sleep(STORE_WATCH).await;
        let now = match std::fs::metadata(&path) {
            Ok(m) if file_id(&m) == id => continue,
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted",
            Err(_) => continue,
        };
        let why = format!(
            "the store {} {now} under the running daemon (was its state directory removed?): this daemon no longer claims tasks, and what it records is lost with the old file; restart it (`systemctl restart taskd`)",
            path.display()
        );
        supervisor.halt(crate::supervisor::Halt::StoreGone, &why);
        tracing::error!("{why}");
        return;
    }
}

/// How often a node on a shared broker writes its record and looks for expired leases.
const CLUSTER_TICK: Duration = Duration::from_secs(5);

/// Kill what is left of recovered tasks' process groups on this machine; how many.
fn kill_orphans(orphans: &[crate::broker::Orphan]) -> usize {
    let mut killed = 0;
    for o in orphans {
        if let (Some(pid), Some(start)) = (o.pid, o.pid_start) {
            if crate::executor::kill_orphan_group(pid, start) {
                killed += 1;
            }
        }
    }
    let ids: Vec<String> = orphans.iter().map(|o| o.task.to_string()).collect();
    killed + crate::executor::kill_task_processes(&ids)
}

/// Serve until SIGTERM/SIGINT (and the drain after it): the daemon once the process is set
/// up (config read, logging on, state directory locked, runtime built).
pub async fn serve(
    path: PathBuf,
    config: Config,
    log_file: Option<LogFile>,
    store_lock: storelock::StoreLock,
) -> anyhow::Result<u8> {
    let Some(broker) = open_broker(&config).await? else {
        tracing::info!("stopped before the broker could be reached");
        return Ok(exit::OK);
    };
    // The embedded store's file as opened: watched for deletion or replacement.
    let store_file = match &config.broker {
        crate::config::BrokerUrl::Sqlite { path } => std::fs::metadata(path)
            .ok()
            .map(|m| (path.clone(), file_id(&m))),
        _ => None,
    };
    let shared = broker.shared();
    if shared {
        match broker.durability_warnings().await {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!(broker = %config.broker, "{w}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the broker's settings"),
        }
    }
    let node = node_id();
    tracing::info!(
        node = %node,
        broker = %config.broker,
        config = %path.display(),
        state_dir = %config.state_dir.display(),
        queues = config.queues.len(),
        "taskd starting"
    );
    let metrics = Arc::new(crate::metrics::Metrics::new());
    // Bound before READY: a taken address fails the start, not a later request.
    let api_listener = match config.listen {
        Some(addr) => Some(crate::api::bind(addr).await.map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("failed to listen on {addr} (`listen` in [taskd]): {e}"),
            )
        })?),
        None => None,
    };
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel::<crate::control::Incoming>(8);
    let control_path = config.control_socket.clone();
    let api_control = control_tx.clone();
    let control = crate::control::serve(&control_path, control_tx).map_err(|e| {
        // A path the daemon cannot bind is a config problem: exit 78, which the systemd
        // unit does not restart into, and before "ready".
        Failure::new(
            exit::CONFIG,
            format!(
                "{}: taskd.control_socket: failed to open the control socket {}: {e} (fix the path or its directory's permissions, or remove `control_socket` for the default in state_dir)",
                config.path.display(),
                control_path.display()
            ),
        )
    })?;

    // Tasks a previous daemon left running: kill what is left of them, queue them again.
    // Held tasks it noted as starting count as started (their history then says `lost`).
    let (start_log, noted) = StartLog::open(&config.state_dir).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "failed to open the start log in {}: {e}",
                config.state_dir.display()
            ),
        )
    })?;
    let mut recovered = 0;
    if shared {
        // Other nodes hold leases too: never `Recover::All`. This node's own tasks from
        // before a crash are taken back when their leases expire (by any node); what is left
        // of their processes on this machine is killed now, so that they do not run twice.
        if !noted.is_empty() {
            let ids = stale_local_runs(broker.as_ref(), noted.iter().copied()).await;
            let killed = crate::executor::kill_task_processes(&ids);
            if killed > 0 {
                tracing::warn!(
                    process_groups_killed = killed,
                    "killed tasks left running by a previous daemon on this machine; their leases expire and they are queued again"
                );
            }
        }
    } else {
        if !noted.is_empty() {
            let noted: Vec<_> = noted.into_iter().collect();
            broker.adopt_started(&noted).await?;
        }
        let orphans = broker
            .recover(Recover::All, "the daemon running this task went away (crash or kill); queued again, attempt not charged")
            .await?;
        recovered = orphans.len();
        let killed = kill_orphans(&orphans);
        if !orphans.is_empty() {
            tracing::warn!(
                tasks = orphans.len(),
                process_groups_killed = killed,
                "recovered tasks left running by a previous daemon"
            );
        }
    }

    let wakeups = broker.subscribe().await?;
    let supervisor = Supervisor::new(broker.clone(), node, start_log, metrics.clone());
    let lease = config.lease.unwrap_or(if shared {
        crate::config::defaults::SHARED_LEASE
    } else {
        crate::supervisor::LEASE
    });
    supervisor.set_lease(lease);
    supervisor.start(&config, wakeups);
    let lock_answers = {
        let sup = supervisor.clone();
        tokio::spawn(store_lock.serve(move || sup.halted()))
    };
    let store_watch =
        store_file.map(|(path, id)| tokio::spawn(watch_store(path, id, supervisor.clone())));
    let cluster =
        shared.then(|| tokio::spawn(cluster_loop(broker.clone(), supervisor.clone(), lease)));
    let api_state = crate::api::AppState::new(broker.clone(), config.clone(), metrics)
        .with_control(api_control);
    fit_api(&api_state, &config);
    let api_stop = CancellationToken::new();
    let api = api_listener.map(|listener| {
        match listener.local_addr() {
            Ok(a) => tracing::info!(
                tokens = config.tokens.len(),
                "API listening on http://{a} (dashboard at /, metrics at /metrics)"
            ),
            Err(e) => tracing::warn!(error = %e, "API listening on an unknown address"),
        }
        // The API gets a thread and a runtime of its own: requests are then served beside
        // the supervisor instead of taking turns with it.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let state = api_state.clone();
        let stop = api_stop.clone();
        let spawned = listener.into_std().and_then(|listener| {
            std::thread::Builder::new()
                .name("taskd-api".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(async move {
                            match tokio::net::TcpListener::from_std(listener) {
                                Ok(l) => crate::api::serve(l, state, stop).await,
                                Err(e) => {
                                    tracing::error!(error = %e, "the API could not use its socket")
                                }
                            }
                        }),
                        Err(e) => tracing::error!(error = %e, "failed to start the API's runtime"),
                    }
                    let _ = done_tx.send(());
                })
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "failed to start the API thread");
        }
        done_rx
    });
    let notifier = Arc::new(Notifier::from_env());
    notifier.send(&format!("READY=1\nSTATUS={}", status_line(&supervisor)));
    tracing::info!("ready");
    {
        let start = AuditEntry::new(Actor::daemon(), Action::Start).ok(format!(
            "taskd {} started on {} ({} queues{})",
            env!("CARGO_PKG_VERSION"),
            supervisor.node(),
            config.queues.len(),
            if recovered > 0 {
                format!("; {recovered} tasks a previous daemon left running were queued again")
            } else {
                String::new()
            }
        ));
        spawn_record(broker.clone(), config.audit_keep, start, None);
    }
    // STATUS= for `systemctl status`, and WATCHDOG=1 when the unit sets WatchdogSec=: sent
    // from this runtime, so a wedged runtime stops the pings.
    let pinger = {
        let n = notifier.clone();
        let sup = supervisor.clone();
        let broker = broker.clone();
        tokio::spawn(async move {
            if !n.enabled() {
                return;
            }
            let every = n
                .watchdog
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5));
            loop {
                tokio::time::sleep(every).await;
                if n.watchdog.is_some() {
                    // Sent before the status query, which a slow store could hold up.
                    n.send("WATCHDOG=1");
                }
                n.send(&format!(
                    "STATUS={}",
                    full_status(&sup, broker.as_ref()).await
                ));
            }
        })
    };

    let reaper = tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            crate::executor::reap_orphans();
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut config = config;
    let stopped_by = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break "SIGTERM"; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break "SIGINT"; }
            _ = hup.recv() => {
                notifier.reloading();
                let answer = reload(&path, &mut config, &supervisor, "SIGHUP");
                fit_api(&api_state, &config);
                api_state.set_config(config.clone());
                notifier.send(&format!("READY=1\nSTATUS={}", status_line(&supervisor)));
                spawn_record(broker.clone(), config.audit_keep, reload_entry(Actor::signal("SIGHUP"), &answer), None);
            }
            _ = usr1.recv() => match &log_file {
                Some(f) => match f.reopen() {
                    Ok(()) => tracing::info!(path = %f.path.display(), "SIGUSR1: log file reopened"),
                    Err(e) => tracing::error!(path = %f.path.display(), error = %e, "SIGUSR1: failed to reopen the log file; still writing to the old one"),
                },
                None => tracing::info!("SIGUSR1: logging to stderr, nothing to reopen"),
            },
            Some(crate::control::Incoming { request, who, reply }) = control_rx.recv() => match request {
                crate::control::Request::Reload => {
                    notifier.reloading();
                    let answer = reload(&path, &mut config, &supervisor, &format!("taskd reload ({who})"));
                    fit_api(&api_state, &config);
                    api_state.set_config(config.clone());
                    notifier.send(&format!("READY=1\nSTATUS={}", status_line(&supervisor)));
                    let entry = reload_entry(who, &answer);
                    spawn_record(broker.clone(), config.audit_keep, entry, Some((reply, answer)));
                }
                crate::control::Request::Restart { queue } => {
                    let mut entry = AuditEntry::new(who, Action::Restart);
                    if let Ok(q) = queue.parse() {
                        entry = entry.queue(q);
                    }
                    let answer = match supervisor.restart_workers(&queue) {
                        Ok(what) => {
                            tracing::info!(queue = %queue, who = %entry.actor, "restart requested: {what}");
                            entry = entry.ok(what.clone());
                            ReloadReply { ok: true, changes: vec![what], errors: Vec::new() }
                        }
                        Err(why) => {
                            entry = entry.refused(why.clone());
                            ReloadReply { ok: false, changes: Vec::new(), errors: vec![why] }
                        }
                    };
                    spawn_record(broker.clone(), config.audit_keep, entry, Some((reply, answer)));
                }
            },
        }
    };
    let stop = AuditEntry::new(Actor::signal(stopped_by), Action::Stop).ok(format!(
        "draining: {} tasks running get shutdown_grace ({}) to finish",
        supervisor.snapshot().running,
        humantime::format_duration(config.shutdown_grace)
    ));
    record(
        broker.as_ref(),
        config.audit_keep,
        &stop,
        Duration::from_secs(2),
    )
    .await;

    // The API answers 503 from now on, and stops once the drain is over.
    api_state.draining.cancel();
    // Tell systemd how long the drain may take, so that it does not kill us mid-drain.
    let drain_bound = config.shutdown_grace
        + config
            .queues
            .values()
            .map(|q| q.kill_grace)
            .max()
            .unwrap_or_default()
        + Duration::from_secs(5);
    notifier.send(&format!(
        "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=draining: {} running",
        drain_bound.as_micros(),
        supervisor.snapshot().running
    ));
    let force = CancellationToken::new();
    let f = force.clone();
    let second = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        f.cancel();
    });
    supervisor.drain(config.shutdown_grace, force).await;
    api_stop.cancel();
    if let Some(api) = api {
        let _ = tokio::time::timeout(Duration::from_secs(2), api).await;
    }
    second.abort();
    lock_answers.abort();
    if let Some(w) = store_watch {
        w.abort();
    }
    reaper.abort();
    pinger.abort();
    control.abort();
    if let Some(c) = cluster {
        c.abort();
        if let Err(e) = broker.leave(supervisor.node()).await {
            tracing::warn!(error = %e, "could not remove this node from the broker's registry");
        }
    }
    let _ = std::fs::remove_file(&control_path);
    crate::executor::reap_orphans();
    tracing::info!("stopped");
    Ok(exit::OK)
}

/// Writes an audit record, waiting at most `wait` (a broker that does not answer must not
/// hold up a stop); a record that cannot be written is logged at warn with what it said.
async fn record(
    broker: &dyn crate::broker::Broker,
    keep: usize,
    entry: &AuditEntry,
    wait: Duration,
) {
    let failed = match tokio::time::timeout(wait, broker.audit(entry, keep)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "the broker did not answer within {}",
            humantime::format_duration(wait)
        ),
    };
    tracing::warn!(
        action = %entry.action,
        who = %entry.actor,
        target = %entry.target(),
        outcome = %entry.outcome,
        detail = %entry.detail,
        "could not write the audit record: {failed}"
    );
}

/// Writes an audit record beside the main loop (which must go on answering signals while
/// the broker takes it); then sends `reply`'s answer, so that whoever asked finds the
/// record once answered.
fn spawn_record(
    broker: Arc<dyn crate::broker::Broker>,
    keep: usize,
    entry: AuditEntry,
    reply: Option<(tokio::sync::oneshot::Sender<ReloadReply>, ReloadReply)>,
) {
    tokio::spawn(async move {
        record(broker.as_ref(), keep, &entry, Duration::from_secs(30)).await;
        if let Some((tx, answer)) = reply {
            let _ = tx.send(answer);
        }
    });
}

/// The audit record of a reload: what changed, or why the new config was refused.
fn reload_entry(who: Actor, answer: &ReloadReply) -> AuditEntry {
    let e = AuditEntry::new(who, Action::Reload);
    if answer.ok {
        if answer.changes.is_empty() {
            e.ok("nothing changed")
        } else {
            e.ok(answer.changes.join("; "))
        }
    } else {
        let n = answer.errors.len();
        e.refused(format!(
            "the new config is invalid ({n} error{}; the old one stays): {}",
            if n == 1 { "" } else { "s" },
            answer.errors.first().map(String::as_str).unwrap_or("")
        ))
    }
}

/// What the daemon's process needs before it runs tasks: the descriptors it inherited
/// marked close-on-exec (no task gets them), its open-files limit fitted to its queues, and
/// the child subreaper flag (orphaned grandchildren of tasks come back to it, to be reaped).
pub fn set_up_process(config: &Config) {
    crate::executor::mark_inherited_fds_cloexec();
    fit_nofile(config);
    if let Err(e) = crate::executor::become_subreaper() {
        tracing::warn!(error = %e, "could not become a child subreaper; orphaned grandchildren go to init");
    }
}

/// Size the daemon's own open-files limit to its queues (see `executor::fit_own_nofile`).
fn fit_nofile(config: &Config) {
    match crate::executor::fit_own_nofile(task_slots(config)) {
        Ok(soft) => tracing::debug!(soft, "open-files limit fitted to the queues"),
        Err(e) => tracing::warn!(error = %e, "could not adjust the open-files limit"),
    }
}

fn task_slots(config: &Config) -> usize {
    config.queues.values().map(|q| q.concurrency).sum()
}

/// Give the API the connection limit that leaves the queues' tasks their descriptors (see
/// `api::connection_limit`); after [`fit_nofile`].
fn fit_api(state: &crate::api::AppState, config: &Config) {
    let soft = crate::executor::host().nofile.0;
    let limit = crate::api::connection_limit(soft, task_slots(config));
    state
        .max_connections
        .store(limit, std::sync::atomic::Ordering::Relaxed);
}

fn status_line(s: &Supervisor) -> String {
    let snap = s.snapshot();
    format!("{} queues, {} tasks running", snap.queues, snap.running)
}

/// The STATUS= line `systemctl status` shows: queues, running, retrying, failed, broker.
async fn full_status(s: &Supervisor, broker: &dyn crate::broker::Broker) -> String {
    use crate::model::TaskState;
    let base = status_line(s);
    match (
        broker.count_state(TaskState::Retrying).await,
        broker.count_state(TaskState::Failed).await,
    ) {
        (Ok(r), Ok(f)) => format!("{base}, {r} retrying, {f} failed; broker up"),
        (Err(e), _) | (_, Err(e)) => format!("{base}; broker DOWN: {e}"),
    }
}

/// What a reload changed about the API's tokens, by name (never a secret).
fn token_changes(old: &[crate::config::ApiToken], new: &[crate::config::ApiToken]) -> Vec<String> {
    let mut out = Vec::new();
    for t in new {
        match old.iter().find(|o| o.name == t.name) {
            None => out.push(format!("API token `{}` added", t.name)),
            Some(o) if o.secret != t.secret => out.push(format!("API token `{}` changed", t.name)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|t| t.name == o.name) {
            out.push(format!("API token `{}` removed", o.name));
        }
    }
    out
}

fn reload(
    path: &Path,
    current: &mut Config,
    supervisor: &Arc<Supervisor>,
    why: &str,
) -> ReloadReply {
    match crate::config::load(path) {
        Ok(new) => {
            let mut changes = Vec::new();
            if new.state_dir != current.state_dir || new.broker != current.broker {
                changes.push(
                    "`state_dir` and `broker` changes need a restart; kept the old ones"
                        .to_string(),
                );
            }
            fit_nofile(&new);
            changes.extend(supervisor.apply(&new));
            if new.shutdown_grace != current.shutdown_grace {
                changes.push(format!(
                    "shutdown_grace {} → {}",
                    humantime::format_duration(current.shutdown_grace),
                    humantime::format_duration(new.shutdown_grace)
                ));
            }
            current.queues = new.queues;
            current.shutdown_grace = new.shutdown_grace;
            current.max_payload = new.max_payload;
            if new.audit_keep != current.audit_keep {
                changes.push(format!(
                    "audit_keep {} → {}",
                    current.audit_keep, new.audit_keep
                ));
            }
            current.audit_keep = new.audit_keep;
            if new.listen != current.listen {
                changes.push("`listen` changes need a restart; kept the old address".to_string());
            }
            changes.extend(token_changes(&current.tokens, &new.tokens));
            current.tokens = new.tokens;
            tracing::info!(changes = ?changes, "{why}: config reloaded from {}", path.display());
            ReloadReply {
                ok: true,
                changes,
                errors: Vec::new(),
            }
        }
        Err(e) => {
            tracing::error!("{why}: the new config is invalid; keeping the old one:\n{e}");
            let errors = match e {
                ConfigError::Invalid(diags) => diags.iter().map(|d| d.to_string()).collect(),
                other => vec![other.to_string()],
            };
            ReloadReply {
                ok: false,
                changes: Vec::new(),
                errors,
            }
        }
    }
}
