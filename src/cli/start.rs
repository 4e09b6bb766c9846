//! `taskd start`: the process set-up around the daemon. The config is found and read
//! (exit 78 when invalid), logging set up (text, JSON or journald's priorities; on stderr
//! or a file SIGUSR1 reopens; a line that cannot be written is dropped and counted, never an
//! error), the state directory locked (one daemon per directory) and the store (one daemon per
//! store, see `daemon::storelock`),
//! inherited descriptors marked close-on-exec, the open-files limit fitted, the child
//! subreaper flag set and the runtime built; then signals are turned into the daemon's
//! controls (SIGTERM/SIGINT drain, a second one stops at once; SIGHUP reloads), the broker is
//! opened and the API and control socket bound, and [`crate::daemon::run`] serves.

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};

use super::{config_path, load_or_report};
use crate::config::Config;
use crate::daemon::storelock::StoreLock;
use crate::daemon::{self, Handle, LogFile, StateLock};
use crate::exit::{self, Failure};

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// Log format on stderr: `text` (default) or `json`. The level comes from RUST_LOG
    /// (default `info`).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Append the log to FILE instead of stderr. SIGUSR1 reopens it (for logrotate).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// `taskd start`: set the process up, then serve until stopped.
pub fn run(flag: Option<PathBuf>, args: StartArgs) -> anyhow::Result<u8> {
    let path = config_path(flag)?;
    let Some(config) = load_or_report(&path, "not starting")? else {
        return Ok(exit::CONFIG);
    };
    let log_file = match &args.log_file {
        Some(p) => Some(LogFile::open(p).map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("failed to open the log file {}: {e}", p.display()),
            )
        })?),
        None => None,
    };
    init_logging(&args.log_format, log_file.as_ref());
    let lock = StateLock::acquire(&config.state_dir, config.state_group.as_deref())?;
    let store_lock = StoreLock::acquire(&config)?;
    daemon::set_up_process(&config);
    // One thread runs everything but SQLite writes (their own thread) and blocking reads:
    // measured, a second worker costs more in cross-thread wake-ups than it wins.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!("failed to start the async runtime: {e}"),
            )
        })?;
    let code = rt.block_on(serve(config, log_file, store_lock))?;
    drop(lock);
    Ok(code)
}

/// The daemon on this process, until it has drained: signals steer it, the broker is opened
/// (a shared one waited for) and the API and control socket bound before [`daemon::run`];
/// the control socket's file is removed after it.
async fn serve(
    config: Config,
    log_file: Option<LogFile>,
    store_lock: StoreLock,
) -> anyhow::Result<u8> {
    let controls = daemon::Controls::new();
    let signals = tokio::spawn(steer_by_signals(controls.handle(), log_file)?);
    let Some(broker) = daemon::open_broker(&config, &controls.handle()).await? else {
        tracing::info!("stopped before the broker could be reached");
        return Ok(exit::OK);
    };
    let mut listeners = daemon::Listeners::bind(&config).await?;
    listeners.store_lock = Some(store_lock);
    let control_path = config.control_socket.clone();
    let api_sockets: Vec<_> = listeners.api_unix.iter().map(|u| u.file.clone()).collect();
    let reaper = daemon::Reaper::spawn();
    let served = daemon::run(config, broker, listeners, controls).await;
    signals.abort();
    let _ = std::fs::remove_file(&control_path);
    for socket in &api_sockets {
        socket.remove();
    }
    reaper.stop();
    served?;
    tracing::info!("stopped");
    Ok(exit::OK)
}

/// SIGTERM and SIGINT drain (a second one stops at once: running tasks are killed and put
/// back), SIGHUP reloads the config (an invalid file is refused and the old config kept),
/// SIGUSR1 reopens the log file. The handlers are in place when this returns.
fn steer_by_signals(
    daemon: Handle,
    log_file: Option<LogFile>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    Ok(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    daemon.reload("SIGHUP").await;
                    continue;
                }
                _ = usr1.recv() => {
                    reopen(log_file.as_ref());
                    continue;
                }
            };
            if daemon.is_shutting_down() {
                daemon.shutdown_now();
            } else {
                tracing::info!("{name}: draining");
                daemon.shutdown_because(name);
            }
        }
    })
}

/// SIGUSR1: logrotate moved the log file away; write to a new one at its path.
fn reopen(log_file: Option<&LogFile>) {
    match log_file {
        Some(f) => match f.reopen() {
            Ok(()) => tracing::info!(path = %f.path().display(), "SIGUSR1: log file reopened"),
            Err(e) => {
                tracing::error!(path = %f.path().display(), error = %e, "SIGUSR1: failed to reopen the log file; still writing to the old one")
            }
        },
        None => tracing::info!("SIGUSR1: logging to stderr, nothing to reopen"),
    }
}

fn init_logging(format: &str, file: Option<&LogFile>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = match file {
        Some(f) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(f.clone()),
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(|| daemon::LogStderr),
    };
    // A line that cannot be written is dropped and counted by the writers; the subscriber's
    // own report of it would go to the same broken stderr with `eprintln!`, which panics.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(writer)
        .with_ansi(file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else if file.is_none() && stderr_is_journal() {
        // journald stamps each line itself, and reads a `<N>` syslog priority prefix.
        builder
            .without_time()
            .with_ansi(false)
            .event_format(JournalFormat(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .init();
    } else {
        builder.init();
    }
}

/// Is stderr connected to journald? `$JOURNAL_STREAM` holds the device and inode of the
/// stream systemd gave us; it is inherited by children too, so only a matching stderr counts
/// (a daemon started by hand from a service's shell writes to a terminal, not the journal).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The plain format behind a `<N>` syslog priority, which journald turns into the entry's
/// priority (so `journalctl -p warning` works).
struct JournalFormat<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
