//! The daemon: the only place that wires config, broker, executor, supervisor and API together.
//!
//! [`run`] is the daemon as a library function, in the manner of a server's `run(listener,
//! shutdown)`: handed a validated [`Config`], an opened broker, bound [`Listeners`] and the
//! [`Controls`] it is steered by, it recovers, serves, and once told to stop, drains and
//! returns. It sets nothing up around itself: no signal handler, no lock, no logging, no
//! process-wide setting (the open-files limit a reload fits aside). That is the process
//! set-up's job: for `taskd start`, `cli::start` (config lookup, exit 78 when invalid →
//! logging → the state directory lock, one daemon per state directory → the store lock
//! ([`storelock`]: one daemon per store, whatever its state directory) → descriptors
//! close-on-exec, child subreaper → runtime → signals turned into [`Handle`] calls → the
//! broker opened ([`open_broker`], which waits for a shared one) → [`Listeners::bind`]);
//! its parts are in [`setup`]. A test or a program that embeds the daemon does without it:
//!
//! ```no_run
//! # async fn embed(config: taskd::config::Config) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use taskd::daemon::{self, Controls, Listeners};
//!
//! let broker = Arc::new(taskd::broker::memory::MemoryBroker::new());
//! let api = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let listeners = Listeners { api: vec![api], ..Listeners::default() };
//! let controls = Controls::new();
//! let handle = controls.handle();
//! let daemon = tokio::spawn(daemon::run(config, broker, listeners, controls));
//! // … enqueue over the API or the broker, watch the tasks run …
//! handle.shutdown();
//! daemon.await??;
//! # Ok(()) }
//! ```
//!
//! What [`run`] does, in order: recovery of tasks a previous daemon left `running` on the
//! embedded store (their process groups killed, the tasks queued again without charging an
//! attempt; [`recovery`]) → the broker warmed ([`Broker::warm`]: on PostgreSQL the pool's
//! connections opened and the hot statements prepared, so that the first claims cost what
//! later ones do) → supervisor → the store lock's answers, the store file's watch
//! ([`watch`]) → on a shared broker, the node's heartbeat and the reclaiming of expired
//! leases ([`cluster`]) → the HTTP API on its listeners → READY → requests (reloads,
//! restarts; [`reload`]) until shutdown → drain. On a shared broker (Redis) other nodes hold
//! leases too, so there is no recovery at start: every node heartbeats its record and takes
//! back expired leases as it goes. Draining: the API answers 503 until the drain ends, then
//! closes.

mod celery;
mod cluster;
mod recovery;
mod reload;
mod retention;
pub(crate) mod setup;
mod stats;
mod status;
pub(crate) mod storelock;
mod watch;

pub(crate) use setup::{running_daemon, set_up_process, LogFile, LogStderr, Reaper, StateLock};

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::audit::{Action, Actor, AuditEntry};
use crate::backoff::Doubling;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::control::{Incoming, ReloadReply, Request};
use crate::exit::{self, Failure};
use crate::model::NodeId;
use crate::notify::Notifier;
use crate::scheduler::Scheduler;
use crate::supervisor::Supervisor;

/// The sockets a daemon serves, bound by its caller: a taken address then fails the start
/// before anything runs, and a test can bind `127.0.0.1:0` and learn its port.
///
/// The broker's wake-up socket is not here: it belongs to the broker (SQLite's `<db>.wake`
/// datagram socket, which producers write to; Redis's subscription), which sets it up when
/// the daemon subscribes ([`Broker::subscribe`]).
#[derive(Default)]
pub struct Listeners {
    /// The HTTP API (`listen`), all served by one thread and runtime of the API's own. A
    /// non-loopback one needs the config's `token`. Empty: no API.
    pub api: Vec<TcpListener>,
    /// The API's Unix sockets (`listen = "unix:…"`), as [`crate::api::unix::bind`] makes
    /// them: served without a token. The caller removes their files after [`run`]
    /// ([`crate::api::unix::SocketFile::remove`]).
    pub api_unix: Vec<crate::api::unix::UnixApi>,
    /// The control socket (`taskd reload`, `taskd restart`), as [`crate::control::bind`]
    /// makes it. The caller removes its file after [`run`]. `None`: reloads come only
    /// through [`Handle::reload`].
    pub control: Option<UnixListener>,
    /// The store lock ([`storelock`]), which answers `taskd status` with this daemon's pid
    /// and why it halted, if it did. `None`: no lock, for a store no other daemon opens (an
    /// in-memory one, a test's file).
    pub store_lock: Option<storelock::StoreLock>,
}

impl Listeners {
    /// What `taskd start` binds from the config: `listen` (a taken address fails the start,
    /// exit code 1) and `control_socket` (a path that cannot be bound is a config problem:
    /// exit code 78, which the systemd unit does not restart into). The store lock is the
    /// caller's.
    pub(crate) async fn bind(config: &Config) -> Result<Listeners, Failure> {
        let mut api = Vec::new();
        let mut api_unix: Vec<crate::api::unix::UnixApi> = Vec::new();
        for listen in &config.listen {
            let bound = match listen {
                crate::config::Listen::Tcp(addr) => crate::api::bind(*addr)
                    .await
                    .and_then(|l| l.into_std())
                    .map(|l| api.push(l))
                    .map_err(|e| {
                        Failure::new(
                            exit::FAILURE,
                            format!("failed to listen on {addr} (`listen` in [taskd]): {e}"),
                        )
                    }),
                crate::config::Listen::Unix(path) => {
                    use crate::api::unix::{bind, BindError};
                    bind(path, config.listen_group.as_deref())
                        .map(|u| api_unix.push(u))
                        .map_err(|e| match e {
                            BindError::Taken(m) => Failure::new(
                                exit::FAILURE,
                                format!("failed to listen on {listen} (`listen` in [taskd]): {m}"),
                            ),
                            BindError::Config(m) => Failure::new(
                                exit::CONFIG,
                                format!("{}: {m}", config.path.display()),
                            ),
                        })
                }
            };
            if let Err(e) = bound {
                for u in &api_unix {
                    u.file.remove();
                }
                return Err(e);
            }
        }
        let control = crate::control::bind(&config.control_socket).map_err(|e| {
            for u in &api_unix {
                u.file.remove();
            }
            Failure::new(
                exit::CONFIG,
                format!(
                    "{}: taskd.control_socket: failed to open the control socket {}: {e} (fix the path or its directory's permissions, or remove `control_socket` for the default in state_dir)",
                    config.path.display(),
                    config.control_socket.display()
                ),
            )
        })?;
        Ok(Listeners {
            api,
            api_unix,
            control: Some(control),
            store_lock: None,
        })
    }
}

/// A reload asked through a [`Handle`]: what asked (for the log and the audit trail), and
/// the way back.
type ReloadOrder = (&'static str, oneshot::Sender<ReloadReply>);

/// Who asked through a [`Handle`], for the audit trail: a signal's name (`SIGHUP`,
/// `SIGTERM`, which `taskd start` passes) is a signal; anything else is the daemon's own
/// caller (a program that embeds it), recorded as the daemon.
fn handle_actor(why: &str) -> Actor {
    if why.starts_with("SIG") {
        Actor::signal(why)
    } else {
        Actor::daemon()
    }
}

/// How a running daemon is steered from outside: [`run`] takes these, its caller keeps
/// [`Controls::handle`]s. `taskd start` turns SIGTERM and SIGINT into [`Handle::shutdown`]
/// (a second one into [`Handle::shutdown_now`]) and SIGHUP into [`Handle::reload`].
pub struct Controls {
    handle: Handle,
    reloads: mpsc::Receiver<ReloadOrder>,
}

impl Controls {
    pub fn new() -> Controls {
        let (reloads_tx, reloads) = mpsc::channel(8);
        Controls {
            handle: Handle {
                shutdown: CancellationToken::new(),
                now: CancellationToken::new(),
                reloads: reloads_tx,
                stopped_by: Arc::new(std::sync::Mutex::new(None)),
            },
            reloads,
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

impl Default for Controls {
    fn default() -> Controls {
        Controls::new()
    }
}

/// Steers a daemon from outside; cheap to clone. Calls before [`run`] has started take effect
/// once it has (a shutdown asked during recovery drains right after it).
#[derive(Clone)]
pub struct Handle {
    shutdown: CancellationToken,
    now: CancellationToken,
    reloads: mpsc::Sender<ReloadOrder>,
    /// What asked for the shutdown ([`Self::shutdown_because`]), for the audit trail.
    stopped_by: Arc<std::sync::Mutex<Option<&'static str>>>,
}

impl Handle {
    /// Stop claiming and drain: running tasks get `shutdown_grace` to finish, then are
    /// interrupted and put back; [`run`] returns once every result is recorded.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// [`Self::shutdown`], saying what asked for it (`SIGTERM`): the audit trail's record of
    /// the stop names it.
    pub(crate) fn shutdown_because(&self, why: &'static str) {
        self.stopped_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        self.shutdown();
    }

    /// Drain without the grace: running tasks are killed (SIGKILL, no `kill_grace`) and put
    /// back at once. Implies [`Self::shutdown`].
    pub(crate) fn shutdown_now(&self) {
        self.shutdown.cancel();
        self.now.cancel();
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Until a shutdown is asked.
    pub(crate) async fn shutdown_asked(&self) {
        self.shutdown.cancelled().await
    }

    /// Read the config file again and apply it, as `taskd reload` does; `why` starts the log
    /// line ("SIGHUP: config reloaded from …") and is who the audit trail records: a signal
    /// for a signal's name, else the daemon.
    pub async fn reload(&self, why: &'static str) -> ReloadReply {
        let (tx, rx) = oneshot::channel();
        let gone = || ReloadReply {
            ok: false,
            changes: Vec::new(),
            errors: vec!["the daemon is not running (it stopped, or is stopping)".into()],
        };
        if self.reloads.send((why, tx)).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

/// This machine's host name, as node ids and node records carry it (`localhost` when it
/// cannot be read).
fn host_name() -> String {
    crate::model::host_name().unwrap_or("localhost").to_string()
}

/// Open the broker. A shared broker that cannot be reached is waited for, with backoff,
/// rather than failing the start: a daemon that exits would be restarted by its service
/// manager into the same error, again and again. `None`: a shutdown was asked meanwhile.
pub(crate) async fn open_broker(
    config: &Config,
    handle: &Handle,
) -> anyhow::Result<Option<Arc<dyn Broker>>> {
    if !config.broker.is_shared() {
        return Ok(Some(crate::broker::open(&config.broker).await?));
    }
    let mut backoff = Doubling::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let delay = backoff.next_delay();
        match crate::broker::open(&config.broker).await {
            Ok(b) => return Ok(Some(b)),
            Err(BrokerError::Unavailable(e)) => {
                tracing::error!(broker = %config.broker, retry_in = %humantime::format_duration(delay), "{e}");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = handle.shutdown_asked() => return Ok(None),
        }
    }
}

/// Run the daemon until [`Handle::shutdown`], then drain. `broker` is the store `config`
/// names, opened (or any backend, for a test); `config.state_dir` must exist (the start log
/// and `workers.json` live there). Errors are the start's (the start log cannot be opened,
/// recovery or the broker's subscription fails, an API listener outside loopback without a
/// token); once serving, it returns `Ok` after the drain.
pub async fn run(
    config: Config,
    broker: Arc<dyn Broker>,
    listeners: Listeners,
    controls: Controls,
) -> anyhow::Result<()> {
    check_api_listeners(&config, &listeners.api)?;
    let store_file = watch::store_file(&config);
    let node = NodeId::of_this_process();
    announce(&config, broker.as_ref(), &node).await;
    let (requests_tx, requests) = mpsc::channel::<Incoming>(8);
    let (streamer, followers) = followers_channel(listeners.control.is_some());
    let control = serve_control(listeners.control, &requests_tx, streamer)?;
    let containment = contain(&config);
    let (start_log, recovered) = recovery::recover(&config, broker.as_ref()).await?;
    // Before the first claim: what the hot paths use is made ready now, so that the first
    // claims cost what later ones do. An optimisation only: a store that cannot be warmed
    // is used as it is (a store that is down fails below as it would have).
    if let Err(e) = broker.warm().await {
        tracing::debug!(error = %e, "the broker was not warmed; its connections open on first use");
    }
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (supervisor, lease, wakeups) = start_supervisor(
        &config,
        &broker,
        node,
        start_log,
        metrics.clone(),
        containment.containment().cloned(),
    )
    .await?;
    let scheduler = Scheduler::start(
        broker.clone(),
        &config,
        wakeups,
        metrics.clone(),
        supervisor.node().to_string(),
    );
    let mut background: Vec<JoinHandle<()>> = control.into_iter().collect();
    background.extend(watch_over(
        &supervisor,
        &broker,
        listeners.store_lock,
        store_file,
        lease,
        containment.describe(),
    ));
    let follow = crate::follow::Source {
        broker: broker.clone(),
        live: Some(supervisor.live()),
        node: Some(supervisor.node().to_string()),
    };
    if let Some(rx) = followers {
        spawn_followers(follow.clone(), rx);
    }
    let stats = stats::StatsWriter::start(broker.clone(), metrics.clone());
    let celery = celery::CeleryBridge::start(&config, &broker, metrics.clone(), &supervisor);
    let api = AppState::new(broker.clone(), config.clone(), metrics)
        .with_control(requests_tx)
        .with_follow(follow);
    reload::fit_api(&api, &config);
    background.push(tokio::spawn(retention::prune_loop(
        broker.clone(),
        api.clone(),
        api.metrics.clone(),
    )));
    let api_stop = CancellationToken::new();
    let api_done = serve_api(listeners.api, listeners.api_unix, &api, &config, &api_stop);
    let mut daemon = Running {
        config,
        broker,
        supervisor,
        scheduler,
        api,
        notifier: Arc::new(Notifier::from_env()),
        background,
        api_stop,
        api_done,
        stats: Some(stats),
        containment,
        celery,
    };
    daemon.ready(recovered);
    let now = controls.handle.now.clone();
    let stopped_by = controls.handle.stopped_by.clone();
    daemon.answer_until_shutdown(requests, controls).await;
    let why = *stopped_by.lock().unwrap_or_else(|p| p.into_inner());
    daemon.stop(now, why).await;
    Ok(())
}

/// Serve the control socket, if there is one, into the main loop's `requests`; its follow
/// requests go to `streamer`.
fn serve_control(
    listener: Option<UnixListener>,
    requests: &mpsc::Sender<Incoming>,
    streamer: Option<crate::control::Streamer>,
) -> Result<Option<JoinHandle<()>>, Failure> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    crate::control::serve(listener, requests.clone(), streamer)
        .map(Some)
        .map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("failed to serve the control socket: {e}"),
            )
        })
}

/// A follow request of the control socket, with its connection.
type FollowRequest = (Request, std::os::unix::net::UnixStream);

/// The control socket's follow requests (`taskd logs --follow`, `taskd tail`) on their way to
/// the followers' thread: the [`crate::control::Streamer`] that sends them, and the receiving
/// end for [`spawn_followers`]. None without a control socket. The thread ends when the
/// control socket's loop (which holds the streamer) is aborted.
fn followers_channel(
    control: bool,
) -> (
    Option<crate::control::Streamer>,
    Option<mpsc::UnboundedReceiver<FollowRequest>>,
) {
    if !control {
        return (None, None);
    }
    let (tx, rx) = mpsc::unbounded_channel::<FollowRequest>();
    let streamer: crate::control::Streamer = Arc::new(move |req, stream| match stream.into_std() {
        Ok(s) => {
            let _ = tx.send((req, s));
        }
        Err(e) => {
            tracing::debug!(error = %e, "a follower's connection could not be handed over")
        }
    });
    (Some(streamer), Some(rx))
}

/// The thread that serves the control socket's follow sessions, each a JSON event per line,
/// at most [`crate::follow::MAX_CONTROL_SESSIONS`] at once: a follower never takes the
/// supervisor's turn.
fn spawn_followers(source: crate::follow::Source, mut rx: mpsc::UnboundedReceiver<FollowRequest>) {
    let spawned = std::thread::Builder::new()
        .name("taskd-follow".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "failed to start the followers' runtime; `taskd logs --follow` reads the broker only");
                    return;
                }
            };
            rt.block_on(async move {
                let sessions = Arc::new(tokio::sync::Semaphore::new(
                    crate::follow::MAX_CONTROL_SESSIONS,
                ));
                while let Some((req, stream)) = rx.recv().await {
                    let source = source.clone();
                    match sessions.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(async move {
                                crate::follow::serve_control(source, req, stream).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            use std::io::Write;
                            let mut stream = stream;
                            let _ = stream.set_nonblocking(false);
                            let _ = writeln!(
                                stream,
                                "{}",
                                serde_json::json!({ "ok": false, "errors": [format!("{} followers are connected already, the most this daemon serves; try again later", crate::follow::MAX_CONTROL_SESSIONS)] })
                            );
                        }
                    }
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "failed to start the followers' thread; `taskd logs --follow` reads the broker only");
    }
}

/// The loops that watch over a running supervisor: the store lock's answers (`taskd status`),
/// the embedded store's file, and on a shared broker the node's heartbeat and the reclaiming
/// of expired leases. Aborted once the daemon has drained.
fn watch_over(
    supervisor: &Arc<Supervisor>,
    broker: &Arc<dyn Broker>,
    store_lock: Option<storelock::StoreLock>,
    store_file: Option<(std::path::PathBuf, (u64, u64))>,
    lease: Duration,
    containment: String,
) -> Vec<JoinHandle<()>> {
    let mut loops = Vec::new();
    if let Some(lock) = store_lock {
        let sup = supervisor.clone();
        loops.push(tokio::spawn(
            lock.serve(move || sup.halted(), Some(containment)),
        ));
    }
    if let Some((path, id)) = store_file {
        let sup = supervisor.clone();
        loops.push(tokio::spawn(watch::watch_store(path, id, sup)));
    }
    if broker.shared() {
        let heartbeat = cluster::cluster_loop(broker.clone(), supervisor.clone(), lease);
        loops.push(tokio::spawn(heartbeat));
    }
    loops
}

/// Refuse an API listener outside loopback when the config sets no token: `listen` is
/// checked so when the config is read, and a listener handed in by code must not slip by.
fn check_api_listeners(config: &Config, api: &[TcpListener]) -> Result<(), Failure> {
    for listener in api {
        let addr = listener.local_addr().map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("an API listener has no address: {e}"),
            )
        })?;
        if !addr.ip().is_loopback() && !config.has_tokens() {
            return Err(Failure::new(
                exit::CONFIG,
                format!("{}: the API listens on {addr}, which is not a loopback address, and no `token` is set: set `token` or `token_file` in [taskd], or listen on a loopback address", config.path.display()),
            ));
        }
    }
    Ok(())
}

/// The first lines of the log: the broker's durability warnings (a shared one that may lose
/// writes), then who starts on what.
async fn announce(config: &Config, broker: &dyn Broker, node: &NodeId) {
    if broker.shared() {
        match broker.durability_warnings().await {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!(broker = %config.broker, "{w}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the broker's settings"),
        }
    }
    tracing::info!(
        node = %node,
        broker = %config.broker,
        config = %config.path.display(),
        state_dir = %config.state_dir.display(),
        queues = config.queues.len(),
        "taskd starting"
    );
}

/// How this daemon contains its tasks (see docs/architecture.md, "Containment"): a cgroup
/// subtree when the machine gives a writable cgroup v2 hierarchy, said once in the log; the
/// cgroups a previous daemon of this state directory left (a crash) are killed and removed.
fn contain(config: &Config) -> crate::executor::cgroup::Mode {
    let mode = crate::executor::cgroup::detect(
        config.cgroup_root.as_deref(),
        &storelock::cgroup_key(config),
    );
    match &mode {
        crate::executor::cgroup::Mode::Cgroups(c) => {
            tracing::info!("containment: {}", mode.describe());
            // Each slot's cgroup keeps its files open: a limit fitted before they were
            // known is raised to make room for them (never lowered here).
            let reserved = crate::executor::reserved_fds(setup::task_slots(config));
            if crate::executor::host().nofile.0 < reserved {
                setup::fit_nofile(config);
            }
            let killed = c.kill_leftovers();
            if killed > 0 {
                tracing::warn!(
                    cgroups = killed,
                    "killed the processes of tasks and workers a previous daemon left running in its cgroups"
                );
            }
        }
        crate::executor::cgroup::Mode::ProcessGroups(_) => {
            tracing::warn!("containment: {}", mode.describe());
        }
    }
    mode
}

/// The supervisor, started on `config`'s queues with the broker's wake-ups, the lease it
/// claims with (`lease` from the config, else the default of the broker's kind), and the
/// wake-ups for the scheduler.
async fn start_supervisor(
    config: &Config,
    broker: &Arc<dyn Broker>,
    node: NodeId,
    start_log: crate::supervisor::startlog::StartLog,
    metrics: Arc<crate::metrics::Metrics>,
    containment: Option<Arc<crate::executor::cgroup::Containment>>,
) -> anyhow::Result<(Arc<Supervisor>, Duration, crate::broker::Wakeups)> {
    let wakeups = broker.subscribe().await?;
    let supervisor = Supervisor::new(broker.clone(), node, start_log, metrics);
    supervisor.set_containment(containment);
    let lease = config.lease.unwrap_or(if broker.shared() {
        crate::config::defaults::SHARED_LEASE
    } else {
        crate::supervisor::LEASE
    });
    supervisor.set_lease(lease);
    supervisor.start(config, wakeups.clone());
    Ok((supervisor, lease, wakeups))
}

/// A socket of the API as bound, before the API's runtime takes it.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Serve the API on `listeners` from a thread and a runtime of its own: requests are then
/// served beside the supervisor instead of taking turns with it. Each listener's state says
/// whether its address is loopback (host names checked; reads open), not (reads need the
/// token), or a Unix socket (no token: the file's permissions decide). The receiver answers
/// once every listener stopped (`stop`); `None` without any.
fn serve_api(
    listeners: Vec<TcpListener>,
    unix: Vec<crate::api::unix::UnixApi>,
    state: &AppState,
    config: &Config,
    stop: &CancellationToken,
) -> Option<oneshot::Receiver<()>> {
    if listeners.is_empty() && unix.is_empty() {
        return None;
    }
    let mut served = Vec::new();
    for listener in listeners {
        match listener.local_addr() {
            Ok(addr) => {
                tracing::info!(
                    tokens = config.tokens.len(),
                    "API listening on http://{addr} (dashboard at /, metrics at /metrics)"
                );
                served.push((Bound::Tcp(listener), state.clone().listening_on(addr)));
            }
            Err(e) => tracing::warn!(error = %e, "API listening on an unknown address"),
        }
    }
    for u in unix {
        tracing::info!(
            "API listening on unix:{} (no token asked for: the socket's permissions decide)",
            u.file.path.display()
        );
        served.push((Bound::Unix(u.listener), state.clone().listening_on_unix()));
    }
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("taskd-api".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(serve_api_listeners(served, stop)),
                Err(e) => tracing::error!(error = %e, "failed to start the API's runtime"),
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "failed to start the API thread");
    }
    Some(done_rx)
}

/// On the API's runtime: every listener served until `stop`.
async fn serve_api_listeners(served: Vec<(Bound, AppState)>, stop: CancellationToken) {
    use crate::api::ApiSocket;
    let mut all = tokio::task::JoinSet::new();
    for (listener, state) in served {
        let socket = match listener {
            Bound::Tcp(l) => l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
                .map(ApiSocket::Tcp),
            Bound::Unix(l) => l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(l))
                .map(ApiSocket::Unix),
        };
        match socket {
            Ok(socket) => {
                all.spawn(crate::api::serve_on(socket, state, stop.clone()));
            }
            Err(e) => tracing::error!(error = %e, "the API could not use its socket"),
        }
    }
    while all.join_next().await.is_some() {}
}

/// Writes an audit record, waiting at most `wait` (a broker that does not answer must not
/// hold up a stop); a record that cannot be written is logged at warn with what it said.
async fn record(broker: &dyn Broker, keep: usize, entry: &AuditEntry, wait: Duration) {
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

/// What the daemon holds while it serves, for its main loop and its drain.
struct Running {
    config: Config,
    broker: Arc<dyn Broker>,
    supervisor: Arc<Supervisor>,
    /// The schedules: stopped before the drain, reloaded with the config.
    scheduler: Arc<Scheduler>,
    api: AppState,
    notifier: Arc<Notifier>,
    /// Loops that end with the daemon: aborted once it has drained.
    background: Vec<JoinHandle<()>>,
    api_stop: CancellationToken,
    /// Answers once the API's thread has stopped serving.
    api_done: Option<oneshot::Receiver<()>>,
    /// Writes the dashboard's counters to the broker; the last ones after the drain.
    stats: Option<stats::StatsWriter>,
    /// How tasks are contained: its cgroup subtree is removed after the drain.
    containment: crate::executor::cgroup::Mode,
    /// The Celery bridge (`[celery]`): stops taking messages before the drain.
    celery: Option<celery::CeleryBridge>,
}

impl Running {
    /// Serving: tell systemd (and the log), record the start in the audit trail (with how
    /// many tasks a previous daemon left running were queued again, and how many failed for
    /// being lost more often than `max_lost`), and keep the status line fresh.
    fn ready(&mut self, recovered: recovery::Recovered) {
        self.notifier.send(&format!(
            "READY=1\nSTATUS={}",
            status::status_line(&self.supervisor)
        ));
        tracing::info!("ready");
        let start = AuditEntry::new(Actor::daemon(), Action::Start).ok(format!(
            "taskd {} started as node {} ({} queues{})",
            env!("CARGO_PKG_VERSION"),
            self.supervisor.node(),
            self.config.queues.len(),
            recovered_words(recovered)
        ));
        self.spawn_record(start, None);
        let ping = status::ping(
            self.notifier.clone(),
            self.supervisor.clone(),
            self.broker.clone(),
        );
        self.background.push(tokio::spawn(ping));
    }

    /// The main loop: reloads and restarts, one at a time, until a shutdown is asked.
    async fn answer_until_shutdown(
        &mut self,
        mut requests: mpsc::Receiver<Incoming>,
        controls: Controls,
    ) {
        let Controls {
            handle,
            mut reloads,
        } = controls;
        loop {
            tokio::select! {
                _ = handle.shutdown_asked() => return,
                Some((why, reply)) = reloads.recv() => {
                    let answer = self.reload(why);
                    let entry = reload::audit_entry(handle_actor(why), &answer);
                    self.spawn_record(entry, Some((reply, answer)));
                }
                Some(Incoming { request, who, reply }) = requests.recv() => {
                    if request.is_stream() {
                        // Follow requests are answered on their connection by the
                        // followers' thread; none comes here. Nothing changes: no record.
                        let _ = reply.send(ReloadReply {
                            ok: false,
                            changes: Vec::new(),
                            errors: vec!["not a request for the daemon's main loop".into()],
                        });
                        continue;
                    }
                    let (answer, entry) = self.answer(request, who);
                    self.spawn_record(entry, Some((reply, answer)));
                }
            }
        }
    }

    /// A request from the control socket or the API, made by `who`: the answer, and its
    /// audit record.
    fn answer(&mut self, request: Request, who: Actor) -> (ReloadReply, AuditEntry) {
        match request {
            Request::Follow { .. } | Request::Tail { .. } => {
                unreachable!("the main loop answers follow requests before they come here")
            }
            Request::Reload => {
                let answer = self.reload(&format!("taskd reload ({who})"));
                let entry = reload::audit_entry(who, &answer);
                (answer, entry)
            }
            Request::Restart { queue } => {
                let mut entry = AuditEntry::new(who, Action::Restart);
                if let Ok(q) = queue.parse() {
                    entry = entry.queue(q);
                }
                match self.supervisor.restart_workers(&queue) {
                    Ok(what) => {
                        tracing::info!(queue = %queue, who = %entry.actor, "restart requested: {what}");
                        let answer = ReloadReply {
                            ok: true,
                            changes: vec![what.clone()],
                            errors: Vec::new(),
                        };
                        (answer, entry.ok(what))
                    }
                    Err(why) => {
                        let answer = ReloadReply {
                            ok: false,
                            changes: Vec::new(),
                            errors: vec![why.clone()],
                        };
                        (answer, entry.refused(why))
                    }
                }
            }
        }
    }

    /// Writes an audit record beside the main loop (which must go on answering while the
    /// broker takes it), then sends `reply`'s answer: whoever asked finds the record once
    /// answered.
    fn spawn_record(
        &self,
        entry: AuditEntry,
        reply: Option<(oneshot::Sender<ReloadReply>, ReloadReply)>,
    ) {
        let broker = self.broker.clone();
        let keep = self.config.audit_keep;
        tokio::spawn(async move {
            record(broker.as_ref(), keep, &entry, Duration::from_secs(30)).await;
            if let Some((tx, answer)) = reply {
                let _ = tx.send(answer);
            }
        });
    }

    /// Reload the config (see [`reload`]) and hand it to the API, telling systemd.
    fn reload(&mut self, why: &str) -> ReloadReply {
        self.notifier.reloading();
        let mut answer = reload::reload(&mut self.config, &self.supervisor, why);
        if answer.ok {
            let schedules = self.scheduler.apply(&self.config);
            if !schedules.is_empty() {
                tracing::info!(changes = ?schedules, "{why}: schedules changed");
            }
            answer.changes.extend(schedules);
            // New routes apply to the messages taken from now on; the broker, backend and
            // queues consumed are read at start.
            if let Some(c) = &self.celery {
                c.reload(&self.config);
            }
        }
        reload::fit_api(&self.api, &self.config);
        self.api.set_config(self.config.clone());
        self.notifier.send(&format!(
            "READY=1\nSTATUS={}",
            status::status_line(&self.supervisor)
        ));
        answer
    }

    /// Drain: the API answers 503; running tasks get `shutdown_grace` (`now`: none); then
    /// the API and the background loops stop, and on a shared broker the node leaves its
    /// registry. Returns once every result is recorded.
    async fn stop(mut self, now: CancellationToken, why: Option<&'static str>) {
        self.api.draining.cancel();
        let who = match why {
            Some(signal) => handle_actor(signal),
            None => Actor::daemon(),
        };
        self.supervisor.stop_starting();
        let stop = AuditEntry::new(who, Action::Stop).ok(format!(
            "draining: {} tasks running get shutdown_grace ({}) to finish",
            self.supervisor.snapshot().running,
            humantime::format_duration(self.config.shutdown_grace)
        ));
        // Waited for, briefly: the process may end soon after the drain.
        record(
            self.broker.as_ref(),
            self.config.audit_keep,
            &stop,
            Duration::from_secs(2),
        )
        .await;
        // Tell systemd how long the drain may take, so that it does not kill us mid-drain.
        let drain_bound = self.config.shutdown_grace
            + self
                .config
                .queues
                .values()
                .map(|q| q.kill_grace)
                .max()
                .unwrap_or_default()
            + Duration::from_secs(5);
        self.notifier.send(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=draining: {} running",
            drain_bound.as_micros(),
            self.supervisor.snapshot().running
        ));
        // No slot fires into a draining daemon: those due meanwhile are missed slots of the
        // next start (or another node's).
        self.scheduler.stop().await;
        if let Some(c) = self.celery.take() {
            c.stop().await;
        }
        self.supervisor.drain(self.config.shutdown_grace, now).await;
        // No task runs any more: their result files' directory goes (on a tmpfs, it would
        // outlive a state directory removed after this stop).
        crate::executor::ResultDir::remove(&self.config.state_dir);
        if let Some(stats) = self.stats.take() {
            stats.finish().await;
        }
        self.api_stop.cancel();
        if let Some(done) = self.api_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        if let Some(c) = self.containment.containment() {
            c.close();
        }
        if self.broker.shared() {
            self.leave().await;
        }
    }

    /// On a shared broker: take this node's record out of the registry.
    async fn leave(&self) {
        if let Err(e) = self.broker.leave(self.supervisor.node()).await {
            tracing::warn!(error = %e, "could not remove this node from the broker's registry");
        }
    }
}

/// What the start record says of the tasks a previous daemon left running.
fn recovered_words(recovered: recovery::Recovered) -> String {
    let mut out = String::new();
    if recovered.queued > 0 {
        out += &format!(
            "; {} task{} a previous daemon left running {} queued again",
            recovered.queued,
            if recovered.queued == 1 { "" } else { "s" },
            if recovered.queued == 1 { "was" } else { "were" }
        );
    }
    if recovered.failed > 0 {
        out += &format!(
            "; {} task{} failed, lost more often than max_lost",
            recovered.failed,
            if recovered.failed == 1 { "" } else { "s" }
        );
    }
    out
}
