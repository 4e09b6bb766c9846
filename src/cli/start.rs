//! `taskd start`: the process set-up around the daemon. The config is found and read
//! (exit 78 when invalid), logging set up (text, JSON or journald's priorities; on stderr
//! or a file SIGUSR1 reopens; a line that cannot be written is dropped and counted, never an
//! error), the state directory locked (one daemon per directory) and the store (one daemon per
//! store, see `daemon::storelock`),
//! inherited descriptors marked close-on-exec, the open-files limit fitted, the child
//! subreaper flag set and the runtime built; then [`crate::daemon`] serves.

use std::path::PathBuf;

use super::{config_path, load_or_report};
use crate::daemon::{self, LogFile, StateLock};
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
    let store_lock = daemon::storelock::StoreLock::acquire(&config)?;
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
    let code = rt.block_on(daemon::serve(path, config, log_file, store_lock))?;
    drop(lock);
    Ok(code)
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
