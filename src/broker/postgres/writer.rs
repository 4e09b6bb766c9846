//! The ordered writer (rule 6): results (`finish`) and starts (`started`) of this client go
//! to one task over a channel, in the order they were called, and are applied in that
//! order: whatever is waiting is folded into one transaction (one commit for many results
//! under load). A batch that fails on an SQL error is rolled back and its writes are
//! applied one transaction each, so one refused write does not undo its neighbours.

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::conn::{pg, pool_error, Clock};
use super::rows::{exec, insert_attempt, mark_running, opt, text};
use crate::broker::{BrokerError, Finish, Lease, Result};
use crate::model::{AttemptRecord, TaskState};
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

async fn finish(
    tx: &deadpool_postgres::Transaction<'_>,
    held: &Lease,
    attempt: &AttemptRecord,
    next: Finish,
    result: Option<&str>,
    now: i64,
) -> Result<()> {
    let row = opt(
        tx,
        "SELECT seq, cancel_requested, state FROM tasks
         WHERE id = $1 AND lease_token = $2 AND lease_node = $3 AND state IN ('queued', 'running')
         FOR UPDATE",
        &[&held.task.to_string(), &held.token, &held.node.as_str()],
    )
    .await?
    .ok_or(BrokerError::LeaseLost(held.task))?;
    let seq: i64 = row.get(0);
    let cancel_requested: bool = row.get(1);
    let state: String = row.get(2);
    // `started` counts the attempt when it is recorded; a task finished before that record
    // (it never started, or the record is still on its way) is counted here.
    let counted = state == "running";
    if next != Finish::Release {
        insert_attempt(tx, seq, attempt).await?;
    }
    // An operator's cancel that arrived while the task ran outweighs a retry or a requeue.
    let next = match next {
        Finish::Retry { .. } | Finish::Requeue | Finish::Release if cancel_requested => {
            Finish::Cancelled
        }
        n => n,
    };
    let charged = match next {
        Finish::Requeue | Finish::Release => false,
        Finish::Cancelled => attempt.pid.is_some(),
        _ => true,
    };
    let delta: i32 = match (charged, counted) {
        (true, false) => 1,
        (false, true) => -1,
        _ => 0,
    };
    let (state, run_at, finished) = match next {
        Finish::Succeeded => (TaskState::Succeeded, None, Some(now)),
        Finish::Retry { at } => (TaskState::Retrying, Some(at), None),
        Finish::Failed => (TaskState::Failed, None, Some(now)),
        Finish::Cancelled => (TaskState::Cancelled, None, Some(now)),
        Finish::Requeue | Finish::Release => (TaskState::Queued, None, None),
    };
    let error = match next {
        Finish::Succeeded | Finish::Release => None,
        Finish::Cancelled if cancel_requested => Some("cancelled by an operator".to_string()),
        _ => attempt.error.as_deref().map(|e| text(e).into_owned()),
    };
    let keep_error = next == Finish::Release;
    exec(
        tx,
        "UPDATE tasks SET state = $2, run_at = coalesce($3, run_at), finished_at = $4,
            attempts = greatest(attempts + $5, 0),
            last_error = CASE WHEN $8 THEN last_error ELSE $6 END, updated_at = $7,
            lease_node = NULL, lease_expires = NULL, cancel_requested = false, pid = NULL, pid_start = NULL
         WHERE seq = $1",
        &[
            &seq,
            &state.as_str(),
            &run_at,
            &finished,
            &delta,
            &error,
            &now,
            &keep_error,
        ],
    )
    .await?;
    if let Some(value) = result {
        exec(
            tx,
            "INSERT INTO results (task_seq, value) VALUES ($1, $2)
             ON CONFLICT (task_seq) DO UPDATE SET value = excluded.value",
            &[&seq, &value],
        )
        .await?;
    }
    Ok(())
}
