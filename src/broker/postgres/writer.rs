//! The ordered writer (rule 6): results (`finish`) and starts (`started`) of this client go
//! to one task over a channel, in the order they were called, and are applied in that
//! order: whatever is waiting is folded into one transaction (one commit for many results
//! under load). A batch that fails on an SQL error is rolled back and its writes are
//! applied one transaction each, so one refused write does not undo its neighbours.

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::conn::{pg, pool_error, Clock};
use super::rows::{mark_running, one, text};
use crate::broker::{BrokerError, Finish, Lease, Result};
use crate::model::AttemptRecord;
use std::sync::Arc;

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 256;

pub(super) enum Write {
    Finish {
        lease: Lease,
        attempt: Box<AttemptRecord>,
        next: Finish,
        /// The result a success keeps (rule 12), as JSON text.
        result: Option<String>,
    },
    Started {
        lease: Lease,
        pid: i32,
        pid_start: u64,
    },
}

pub(super) struct Job {
    pub write: Write,
    pub answer: oneshot::Sender<Result<()>>,
}

pub(super) fn start(pool: Pool, addr: String, clock: Arc<Clock>) -> mpsc::UnboundedSender<Job> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(writer_loop(pool, addr, clock, rx));
    tx
}

async fn writer_loop(
    pool: Pool,
    addr: String,
    clock: Arc<Clock>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let e = pool_error(&addr, e);
                for j in batch {
                    let _ = j.answer.send(Err(e.clone()));
                }
                continue;
            }
        };
        // All in one transaction; each write's logical refusal (a lost lease) is decided
        // before it changes anything, so it leaves the transaction usable.
        let together = async {
            let tx = client.transaction().await.map_err(pg)?;
            let mut answers = Vec::with_capacity(batch.len());
            for j in &batch {
                match apply(&tx, &j.write, clock.now()).await {
                    Ok(()) => answers.push(Ok(())),
                    Err(e @ BrokerError::LeaseLost(_)) | Err(e @ BrokerError::NotFound(_)) => {
                        answers.push(Err(e))
                    }
                    Err(e) => return Err(e),
                }
            }
            tx.commit().await.map_err(pg)?;
            Ok(answers)
        }
        .await;
        match together {
            Ok(answers) => {
                for (j, a) in batch.into_iter().zip(answers) {
                    let _ = j.answer.send(a);
                }
            }
            Err(BrokerError::Storage(_)) if batch.len() > 1 => {
                // One write broke the batch: apply each in its own transaction, in order.
                for j in batch {
                    let one = async {
                        let tx = client.transaction().await.map_err(pg)?;
                        apply(&tx, &j.write, clock.now()).await?;
                        tx.commit().await.map_err(pg)
                    }
                    .await;
                    let _ = j.answer.send(one);
                }
            }
            Err(e) => {
                for j in batch {
                    let _ = j.answer.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn apply(tx: &deadpool_postgres::Transaction<'_>, write: &Write, now: i64) -> Result<()> {
    match write {
        Write::Started {
            lease,
            pid,
            pid_start,
        } => mark_running(tx, lease, Some((*pid, *pid_start)), now).await,
        Write::Finish {
            lease,
            attempt,
            next,
            result,
        } => finish(tx, lease, attempt, *next, result.as_deref(), now).await,
    }
}

/// A result in one statement (one round trip; it was three: lock the row, insert the
/// attempt, update the task). The leased row is locked by id, token and node exactly as
/// before; when none matches, nothing is written and the lease is lost.
const FINISH: &str = "
WITH held AS (
    SELECT seq, cancel_requested, state = 'running' AS counted FROM tasks
     WHERE id = $1 AND lease_token = $2 AND lease_node = $3 AND state IN ('queued', 'running')
     FOR UPDATE),
-- An operator's cancel that arrived while the task ran outweighs a retry, a requeue or a
-- release.
n AS (
    SELECT seq, cancel_requested, counted,
           CASE WHEN cancel_requested AND $4::text IN ('retry', 'requeue', 'release') THEN 'cancelled'
                ELSE $4 END AS next
      FROM held),
c AS (
    SELECT seq, cancel_requested, counted, next,
           CASE next WHEN 'requeue' THEN false WHEN 'release' THEN false
                     WHEN 'cancelled' THEN $7::int IS NOT NULL ELSE true END AS charged
      FROM n),
attempt AS (
    INSERT INTO attempts (task_seq, n, number, node, pid, started_at, ended_at, exit_code, signal,
                          reason, error, stdout_tail, stderr_tail, memory_peak, cpu_usec)
    SELECT c.seq, (SELECT coalesce(max(a.n), 0) + 1 FROM attempts a WHERE a.task_seq = c.seq),
           $6::int, $19::text, $7::int, $8::bigint, $9::bigint, $10::int, $11::int, $12::text,
           $13::text, $14::bytea, $15::bytea, $16::bigint, $17::bigint
      FROM c WHERE $4 <> 'release'),
done AS (
    UPDATE tasks t SET
        state = CASE c.next WHEN 'succeeded' THEN 'succeeded' WHEN 'retry' THEN 'retrying'
                            WHEN 'failed' THEN 'failed' WHEN 'cancelled' THEN 'cancelled'
                            ELSE 'queued' END,
        run_at = CASE WHEN c.next = 'retry' THEN $5::bigint ELSE t.run_at END,
        finished_at = CASE WHEN c.next IN ('succeeded', 'failed', 'cancelled') THEN $18::bigint END,
        attempts = greatest(t.attempts + CASE WHEN c.charged AND NOT c.counted THEN 1
                                              WHEN NOT c.charged AND c.counted THEN -1
                                              ELSE 0 END, 0),
        last_error = CASE WHEN c.next = 'release' THEN t.last_error
                          WHEN c.next = 'succeeded' THEN NULL
                          WHEN c.next = 'cancelled' AND c.cancel_requested THEN 'cancelled by an operator'
                          ELSE $20::text END,
        updated_at = $18, lease_node = NULL, lease_expires = NULL, cancel_requested = false,
        pid = NULL, pid_start = NULL
      FROM c WHERE t.seq = c.seq
    RETURNING t.seq),
kept AS (
    INSERT INTO results (task_seq, value) SELECT seq, $21::text FROM done WHERE $21::text IS NOT NULL
    ON CONFLICT (task_seq) DO UPDATE SET value = excluded.value)
SELECT count(*) FROM done";

async fn finish(
    tx: &deadpool_postgres::Transaction<'_>,
    held: &Lease,
    attempt: &AttemptRecord,
    next: Finish,
    result: Option<&str>,
    now: i64,
) -> Result<()> {
    let (next, retry_at) = match next {
        Finish::Succeeded => ("succeeded", None),
        Finish::Retry { at } => ("retry", Some(at)),
        Finish::Failed => ("failed", None),
        Finish::Cancelled => ("cancelled", None),
        Finish::Requeue => ("requeue", None),
        Finish::Release => ("release", None),
    };
    let error = attempt.error.as_deref().map(text);
    let n: i64 = one(
        tx,
        FINISH,
        &[
            &held.task.to_string(),
            &held.token,
            &held.node.as_str(),
            &next,
            &retry_at,
            &(attempt.number as i32),
            &attempt.pid,
            &attempt.started_at,
            &attempt.ended_at,
            &attempt.exit_code,
            &attempt.signal,
            &attempt.reason.map(|r| r.as_str()),
            &error,
            &attempt.stdout_tail.as_bytes(),
            &attempt.stderr_tail.as_bytes(),
            &attempt.memory_peak.and_then(|n| i64::try_from(n).ok()),
            &attempt.cpu_usec.and_then(|n| i64::try_from(n).ok()),
            &now,
            &attempt.node.as_str(),
            &error,
            &result,
        ],
    )
    .await?
    .get(0);
    if n == 0 {
        return Err(BrokerError::LeaseLost(held.task));
    }
    Ok(())
}
