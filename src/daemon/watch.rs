//! The watch of the embedded store's file: when it is deleted or replaced under the daemon
//! (its state directory removed), the daemon stops claiming for good, says so in the log and
//! in `taskd status`, and keeps the store lock, so that no second daemon starts beside it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BrokerUrl, Config};
use crate::supervisor::{Halt, Supervisor};

/// How often the embedded store's file is looked at.
const STORE_WATCH: Duration = Duration::from_secs(1);

/// A file's identity: device and inode.
fn file_id(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

/// The embedded store's file as it is now, to be watched: `None` on a shared broker, or when
/// the file does not exist (a broker that is not the configured file, as in a test).
pub(super) fn store_file(config: &Config) -> Option<(PathBuf, (u64, u64))> {
    match &config.broker {
        BrokerUrl::Sqlite { path } => std::fs::metadata(path)
            .ok()
            .map(|m| (path.clone(), file_id(&m))),
        _ => None,
    }
}

/// Halt the supervisor for good once the store's file is gone or another file took its
/// place: this daemon's writes go to an unlinked file nobody else sees, and tasks stored
/// in the new file by `taskd submit` would never be seen by it. Only a restart mends that.
pub(super) async fn watch_store(path: PathBuf, id: (u64, u64), supervisor: Arc<Supervisor>) {
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
        supervisor.halt(Halt::StoreGone, &why);
        tracing::error!("{why}");
        return;
    }
}
