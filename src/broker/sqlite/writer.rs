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
/// Prepared statements the writer's connection keeps.
const STATEMENT_CACHE: usize = 64;

type Deliver = Box<dyn FnOnce(Option<&BrokerError>) + Send>;
type Work = Box<dyn FnOnce(&Connection) -> Ran + Send>;

/// What running one job left: how to answer its caller once the transaction ends, and, for a
/// job without a savepoint of its own that failed after it may have written, the error that
/// spoils the whole transaction (it is rolled back, and every job of the batch gets it).
struct Ran {
    deliver: Deliver,
    spoiled: Option<BrokerError>,
}

/// One write for the writer thread.
pub(super) struct Job {
    work: Work,
    /// Run inside a savepoint of its own, so that its failure undoes only its own writes.
    /// Without one (see [`SqliteBroker::queue_bare`]) a refusal it reports has written
    /// nothing, and any other failure rolls back the whole batch.
    savepoint: bool,
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
    // Every statement the writes use stays prepared (rusqlite keeps 16 by default, fewer
    // than the claims, finishes, ingests and the periodic writes use between them).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
        if let Err(e) = retry_busy(|| conn.execute_batch("BEGIN IMMEDIATE")) {
            // A job must not run outside a transaction: dropping it unrun tells its caller
            // that the write did not happen.
            tracing::error!(error = %storage(e), "failed to begin a write transaction");
            drop(batch);
            continue;
        }
        let mut delivers: Vec<Deliver> = Vec::with_capacity(batch.len());
        let mut wakes: Vec<&'static [u8]> = Vec::new();
        let mut spoiled: Option<BrokerError> = None;
        for job in batch {
            if let Some(w) = job.wake {
                if !wakes.contains(&w) {
                    wakes.push(w);
                }
            }
            if job.savepoint {
                // Prepared once: parsing the statement again for every job cost more than
                // running it.
                if let Err(e) = conn
                    .prepare_cached("SAVEPOINT job")
                    .and_then(|mut s| s.execute([]))
                {
                    tracing::error!(error = %e, "failed to open a savepoint");
                }
            }
            let ran = (job.work)(&conn);
            if spoiled.is_none() {
                spoiled = ran.spoiled;
            }
            delivers.push(ran.deliver);
        }
        let commit = match spoiled {
            Some(e) => Err(e),
            None => conn
                .prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .map(|_| ())
                .map_err(storage),
        };
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
        self.writable()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn: &Connection| {
            let r = write(conn);
            let closed = if r.is_ok() {
                conn.prepare_cached("RELEASE job")
                    .and_then(|mut s| s.execute([]))
                    .map(|_| ())
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            if let Err(e) = closed {
                tracing::error!(error = %e, "failed to close a savepoint");
            }
            Ran {
                deliver: deliverer(tx, r),
                spoiled: None,
            }
        });
        self.send_job(Job {
            work,
            savepoint: true,
            urgent,
            wake,
        })?;
        Ok(rx)
    }

    /// Refuses a write when the store was opened read-only, saying why.
    fn writable(&self) -> Result<()> {
        match &self.read_only {
            Some(why) => Err(BrokerError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    /// Hands a job to the writer thread; an urgent one ends a linger at once (a no-op unless
    /// the writer is parked in one).
    fn send_job(&self, job: Job) -> Result<()> {
        let urgent = job.urgent;
        self.jobs
            .send(job)
            .map_err(|_| BrokerError::Storage("the database writer thread stopped".into()))?;
        if urgent {
            if let Some(w) = &self.writer {
                w.thread().unpark();
            }
        }
        Ok(())
    }
}

impl SqliteBroker {
    /// [`SqliteBroker::queue`] for a write without a savepoint of its own, for the writes made
    /// for every task (a finish): a savepoint copies each page the write touches first, and
    /// opening and closing it are two statements more. `write` must report
    /// [`BrokerError::LeaseLost`] only before it has written anything; any other error it
    /// returns rolls back the whole transaction, and every write of the batch gets it (as
    /// when the commit fails), since part of `write` may have been applied.
    pub(super) fn queue_bare<T, F>(
        &self,
        urgent: bool,
        wake: Option<&'static [u8]>,
        write: F,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.writable()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn: &Connection| {
            let r = write(conn);
            let spoiled = match &r {
                Ok(_) | Err(BrokerError::LeaseLost(_)) => None,
                Err(e) => Some(e.clone()),
            };
            Ran {
                deliver: deliverer(tx, r),
                spoiled,
            }
        });
        self.send_job(Job {
            work,
            savepoint: false,
            urgent,
            wake,
        })?;
        Ok(rx)
    }
}

/// How a job's caller is answered once its transaction has ended (`commit`: why it did not
/// commit, if it did not).
fn deliverer<T: Send + 'static>(
    answer: tokio::sync::oneshot::Sender<Result<T>>,
    result: Result<T>,
) -> Deliver {
    Box::new(move |commit: Option<&BrokerError>| {
        let result = match commit {
            Some(e) => Err(e.clone()),
            None => result,
        };
        let _ = answer.send(result);
    })
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
    use super::*;
    use crate::model::TaskId;

    /// The rows of the scratch table, read on the writer's thread.
    async fn rows(broker: &SqliteBroker) -> Vec<i64> {
        broker
            .write(|conn| {
                let mut s = conn
                    .prepare("SELECT x FROM t ORDER BY x")
                    .map_err(storage)?;
                let xs = s
                    .query_map([], |r| r.get(0))
                    .and_then(|it| it.collect())
                    .map_err(storage)?;
                Ok(xs)
            })
            .await
            .unwrap()
    }

    fn insert(conn: &Connection, value: i64) -> Result<()> {
        conn.execute("INSERT INTO t (x) VALUES (?1)", [value])
            .map(|_| ())
            .map_err(storage)
    }

    /// A write for [`one_batch`], with whether it goes without a savepoint.
    type TestWrite = (bool, Box<dyn FnOnce(&Connection) -> Result<()> + Send>);

    /// Queues `writes` so that they share one transaction: the writer is held in the job
    /// before them until all are queued.
    async fn one_batch(broker: &SqliteBroker, writes: Vec<TestWrite>) -> Vec<Result<()>> {
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let (in_tx, in_rx) = std::sync::mpsc::channel::<()>();
        let gate = broker
            .queue(true, None, move |_| {
                in_tx.send(()).unwrap();
                held_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        // The writer runs the gate: everything queued from now on is taken together.
        tokio::task::spawn_blocking(move || in_rx.recv().unwrap())
            .await
            .unwrap();
        let queued: Vec<_> = writes
            .into_iter()
            .map(|(bare, w)| {
                if bare {
                    broker.queue_bare(true, None, w).unwrap()
                } else {
                    broker.queue(true, None, w).unwrap()
                }
            })
            .collect();
        held_tx.send(()).unwrap();
        answer(gate).await.unwrap();
        let mut out = Vec::new();
        for q in queued {
            out.push(answer(q).await);
        }
        out
    }

    async fn scratch() -> (tempfile::TempDir, SqliteBroker) {
        let dir = tempfile::tempdir().unwrap();
        let broker = SqliteBroker::open(&dir.path().join("taskd.db"))
            .await
            .unwrap();
        broker
            .write(|conn| {
                conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
                    .map_err(storage)
            })
            .await
            .unwrap();
        (dir, broker)
    }

    #[tokio::test]
    async fn a_refused_write_undoes_only_its_own_writes() {
        let (_dir, broker) = scratch().await;
        let lost = TaskId::new();
        let answers = one_batch(
            &broker,
            vec![
                (false, Box::new(|c| insert(c, 1))),
                // A savepointed write that wrote, then failed: only its own row goes.
                (
                    false,
                    Box::new(|c| {
                        insert(c, 2)?;
                        Err(BrokerError::Storage("refused".into()))
                    }),
                ),
                // A bare write refused before writing: its neighbours stay.
                (true, Box::new(move |_| Err(BrokerError::LeaseLost(lost)))),
                (true, Box::new(|c| insert(c, 3))),
            ],
        )
        .await;
        assert!(answers[0].is_ok());
        assert!(matches!(&answers[1], Err(BrokerError::Storage(m)) if m == "refused"));
        assert!(matches!(answers[2], Err(BrokerError::LeaseLost(id)) if id == lost));
        assert!(answers[3].is_ok());
        assert_eq!(rows(&broker).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_bare_write_that_fails_after_writing_rolls_back_its_batch() {
        let (_dir, broker) = scratch().await;
        let answers = one_batch(
            &broker,
            vec![
                (false, Box::new(|c| insert(c, 1))),
                (
                    true,
                    Box::new(|c| {
                        insert(c, 2)?;
                        Err(BrokerError::Storage("disk full".into()))
                    }),
                ),
                (true, Box::new(|c| insert(c, 3))),
            ],
        )
        .await;
        // Part of the failed write may be applied: nothing of the batch is committed, and
        // every write of it says so.
        for a in &answers {
            assert!(
                matches!(a, Err(BrokerError::Storage(m)) if m == "disk full"),
                "{a:?}"
            );
        }
        assert_eq!(rows(&broker).await, Vec::<i64>::new());
        // The next batch commits as usual.
        let answers = one_batch(&broker, vec![(true, Box::new(|c| insert(c, 4)))]).await;
        assert!(answers[0].is_ok());
        assert_eq!(rows(&broker).await, vec![4]);
    }
}

#[cfg(test)]
mod wal_tests {
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
