//! Group commit: the one writer thread of a process, and how a write reaches it. Every write
//! is a closure run inside its own savepoint within one `BEGIN IMMEDIATE … COMMIT` shared by
//! whatever else was waiting; its caller is answered once the commit is on disk. It must not
//! hold queries of the broker's operations, and never holds a transaction across an `.await`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::conn::{retry_busy, storage};
use super::SqliteBroker;
use crate::broker::{BrokerError, Result};

/// A commit this soon after the previous one means writes are arriving back to back.
const BUSY_WINDOW: Duration = Duration::from_millis(2);
/// How long non-urgent writes wait for company when the store is busy.
const LINGER: Duration = Duration::from_millis(3);
/// Most writes folded into one transaction.
const MAX_BATCH: usize = 512;

type Deliver = Box<dyn FnOnce(Option<&BrokerError>) + Send>;
type Work = Box<dyn FnOnce(&Connection) -> Deliver + Send>;

/// One write for the writer thread.
pub(super) struct Job {
    work: Work,
    /// Someone is waiting on this write to go on (an enqueue, a claim). A write that is only
    /// bookkeeping (an attempt's result) may wait a little for company instead.
    urgent: bool,
    /// The wake-up datagram to send once this write is committed. The writer sends each
    /// kind once per commit, so a burst of enqueues costs one datagram, not one each.
    wake: Option<&'static [u8]>,
}

/// The writer thread: take one job, fold in whatever else is waiting, commit once.
///
/// Urgent writes (enqueues, claims) commit at once with whatever else is waiting. A batch of
/// only non-urgent writes (attempt results) waits up to [`LINGER`] for more when writes are
/// arriving back to back, so that under load several results share one fsync; an urgent
/// write arriving meanwhile ends the wait.
pub(super) fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>, wake_path: PathBuf) {
    let mut last_commit = Instant::now() - BUSY_WINDOW;
    let waker = UnixDatagram::unbound().ok();
    if let Some(w) = &waker {
        let _ = w.set_nonblocking(true);
    }
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut urgent = batch[0].urgent;
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => {
                    urgent |= j.urgent;
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        if !urgent && last_commit.elapsed() < BUSY_WINDOW {
            // Parked, not blocked on the channel: a sender of a non-urgent write then does not
            // wake this thread (no futex call, no context switch per result); an urgent one
            // unparks it (see `send`).
            let until = Instant::now() + LINGER;
            'linger: while batch.len() < MAX_BATCH {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                while batch.len() < MAX_BATCH {
                    match jobs.try_recv() {
                        Ok(j) => {
                            let u = j.urgent;
                            batch.push(j);
                            if u {
                                break 'linger;
                            }
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => break 'linger,
                    }
                }
            }
        }
        if let Err(e) = retry_busy(|| run(&conn, "BEGIN IMMEDIATE")) {
            // A job must not run outside a transaction: dropping it unrun tells its caller
            // that the write did not happen.
            tracing::error!(error = %storage(e), "failed to begin a write transaction");
            drop(batch);
            continue;
        }
        let mut delivers: Vec<Deliver> = Vec::with_capacity(batch.len());
        let mut wakes: Vec<&'static [u8]> = Vec::new();
        for job in batch {
            if let Some(w) = job.wake {
                if !wakes.contains(&w) {
                    wakes.push(w);
                }
            }
            if let Err(e) = run(&conn, "SAVEPOINT job") {
                tracing::error!(error = %e, "failed to open a savepoint");
            }
            delivers.push((job.work)(&conn));
        }
        let commit = run(&conn, "COMMIT").map_err(storage);
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        last_commit = Instant::now();
        if commit.is_ok() {
            if let Some(w) = &waker {
                for kind in wakes {
                    let _ = w.send_to(kind, &wake_path);
                }
            }
        }
        let err = commit.err();
        for d in delivers {
            d(err.as_ref());
        }
    }
}

/// Run one of the writer's transaction statements (`BEGIN IMMEDIATE`, `SAVEPOINT job`,
/// `RELEASE job`, `COMMIT`) from the connection's statement cache: every write runs each of
/// them, and compiling them anew each time was part of every enqueue.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

impl SqliteBroker {
    /// Run `work` in the next write transaction, inside its own savepoint.
    pub(super) async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.write_as(true, work).await
    }

    /// Like [`Self::write`]; a non-`urgent` write may wait a little to share a commit.
    pub(super) async fn write_as<T, F>(&self, urgent: bool, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.send(urgent, None, work).await
    }

    /// Queue a write for the writer thread; `wake` is sent once it is committed.
    pub(super) async fn send<T, F>(
        &self,
        urgent: bool,
        wake: Option<&'static [u8]>,
        work: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        answer(self.queue(urgent, wake, work)?).await
    }

    /// Queue a write for the writer thread now, and return where its answer will arrive
    /// ([`answer`]). The writer takes jobs in the order they were queued, so a write queued
    /// after this one is never committed before it.
    pub(super) fn queue<T, F>(
        &self,
        urgent: bool,
        wake: Option<&'static [u8]>,
        write: F,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        if let Some(why) = &self.read_only {
            return Err(BrokerError::Unavailable(why.clone()));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn: &Connection| {
            let r = write(conn);
            let end = if r.is_ok() {
                run(conn, "RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            if let Err(e) = end {
                tracing::error!(error = %e, "failed to close a savepoint");
            }
            Box::new(move |commit: Option<&BrokerError>| {
                let r = match commit {
                    Some(e) => Err(e.clone()),
                    None => r,
                };
                let _ = tx.send(r);
            })
        });
        self.jobs
            .send(Job { work, urgent, wake })
            .map_err(|_| BrokerError::Storage("the database writer thread stopped".into()))?;
        if urgent {
            // Ends a linger at once (a no-op unless the writer is parked in one).
            if let Some(w) = &self.writer {
                w.thread().unpark();
            }
        }
        Ok(rx)
    }
}

/// The answer to a write queued with [`SqliteBroker::queue`].
pub(super) async fn answer<T>(rx: tokio::sync::oneshot::Receiver<Result<T>>) -> Result<T> {
    rx.await.map_err(|_| {
        BrokerError::Storage(
            "the write was dropped: the database could not begin a transaction".into(),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::super::SqliteBroker;
    use crate::broker::Broker;
    use crate::model::{NewTask, QueueName};

    /// One enqueue at a time, each its own commit (a producer with one thread): once the
    /// first checkpoint has copied the WAL back into the database, later commits write over
    /// the WAL from its start instead of growing it, so that their `fdatasync` has only data
    /// to flush, not the file's new size as well (on ext4 that is a journal commit more, about
    /// twice the wait per enqueue). A reader left holding an old snapshot, or a checkpoint
    /// that cannot finish, would make every commit grow the file again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_commit_at_a_time_overwrites_the_wal_once_it_restarted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("taskd.db");
        let broker = SqliteBroker::open(&path).await.expect("open");
        let wal = dir.path().join("taskd.db-wal");
        let queue: QueueName = "q".parse().expect("a queue name");
        const N: usize = 1200;
        let mut sizes = Vec::with_capacity(N);
        for i in 0..N {
            broker
                .enqueue(vec![NewTask::new(queue.clone(), format!("{{\"i\":{i}}}"))])
                .await
                .expect("enqueue");
            sizes.push(std::fs::metadata(&wal).expect("the WAL").len());
        }
        let grew = |s: &[u64]| s.windows(2).filter(|w| w[1] > w[0]).count();
        let (first, last) = sizes.split_at(N / 2);
        // The first commits after the store was made grow the WAL, up to the automatic
        // checkpoint (1,000 pages).
        assert!(grew(first) > 100, "the WAL grew {} times", grew(first));
        // Later ones write over it: it grows only when a checkpoint cycle happens to end a
        // page or two past the longest one before (a commit that split a B-tree page).
        assert!(
            grew(last) <= 8,
            "the WAL grew on {} of the last {} commits (sizes {:?}…)",
            grew(last),
            last.len(),
            &last[..20]
        );
        let max = *sizes.iter().max().expect("sizes");
        assert!(
            max < 6 * 1024 * 1024,
            "the WAL reached {max} bytes: it is not checkpointed"
        );
    }
}
