//! The ordered writer (rule 6): results (`finish`) and starts (`started`) of this client go
//! to one task over a channel, in the order they were called, and are applied in that
//! order: whatever is waiting is folded into one transaction (one commit, one WAL flush, for
//! many results under load). Each write is one statement, and a batch is sent in one round
//! trip: `BEGIN`, the statements and `COMMIT` pipelined (PostgreSQL runs them in the order
//! sent); a batch of one write is its statement alone, which commits by itself. A batch that
//! fails on an SQL error is rolled back (an error aborts the transaction, and the `COMMIT`
//! behind it then rolls back) and its writes are applied one statement each, so one refused
//! write does not undo its neighbours.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use super::conn::{pg, pool_error, Clock};
use super::rows::{boot_id, text};
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
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let e = pool_error(&addr, e);
                for j in batch {
                    let _ = j.answer.send(Err(e.clone()));
                }
                continue;
            }
        };
        let now = clock.now();
        let calls: Vec<Call> = batch.iter().map(|j| Call::new(&j.write, now)).collect();
        match apply_all(&client, &calls).await {
            Ok(answers) => {
                for (j, a) in batch.into_iter().zip(answers) {
                    let _ = j.answer.send(a);
                }
            }
            Err(BrokerError::Storage(_)) if batch.len() > 1 => {
                // One write broke the batch: apply each by itself, in order.
                for (j, call) in batch.into_iter().zip(&calls) {
                    let one = match apply_all(&client, std::slice::from_ref(call)).await {
                        Ok(mut a) => a.pop().unwrap_or(Ok(())),
                        Err(e) => Err(e),
                    };
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

/// One write as its statement's arguments. A write's logical refusal (a lost lease) is
/// decided inside its statement before it changes anything: no row is changed and the
/// statement answers 0 rows, which leaves the transaction usable.
struct Call {
    kind: Kind,
    lease: Lease,
    id: String,
    args: Vec<Box<dyn ToSql + Sync + Send>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Finish,
    Started,
}

impl Call {
    fn new(write: &Write, now: i64) -> Call {
        match write {
            Write::Started {
                lease,
                pid,
                pid_start,
            } => Call {
                kind: Kind::Started,
                lease: lease.clone(),
                id: lease.task.to_string(),
                args: vec![
                    Box::new(*pid),
                    Box::new(*pid_start as i64),
                    Box::new(lease.token),
                    Box::new(now),
                    Box::new(lease.node.as_str().to_string()),
                    Box::new(boot_id().to_string()),
                ],
            },
            Write::Finish {
                lease,
                attempt,
                next,
                result,
            } => {
                let (next, retry_at) = match next {
                    Finish::Succeeded => ("succeeded", None),
                    Finish::Retry { at } => ("retry", Some(*at)),
                    Finish::Failed => ("failed", None),
                    Finish::Cancelled => ("cancelled", None),
                    Finish::Requeue => ("requeue", None),
                    Finish::Release => ("release", None),
                };
                let error = attempt.error.as_deref().map(|e| text(e).into_owned());
                Call {
                    kind: Kind::Finish,
                    lease: lease.clone(),
                    id: lease.task.to_string(),
                    args: vec![
                        Box::new(lease.token),
                        Box::new(lease.node.as_str().to_string()),
                        Box::new(next),
                        Box::new(retry_at),
                        Box::new(attempt.number as i32),
                        Box::new(attempt.pid),
                        Box::new(attempt.started_at),
                        Box::new(attempt.ended_at),
                        Box::new(attempt.exit_code),
                        Box::new(attempt.signal),
                        Box::new(attempt.reason.map(|r| r.as_str())),
                        Box::new(error.clone()),
                        Box::new(attempt.stdout_tail.as_bytes().to_vec()),
                        Box::new(attempt.stderr_tail.as_bytes().to_vec()),
                        Box::new(attempt.memory_peak.and_then(|n| i64::try_from(n).ok())),
                        Box::new(attempt.cpu_usec.and_then(|n| i64::try_from(n).ok())),
                        Box::new(now),
                        Box::new(attempt.node.as_str().to_string()),
                        Box::new(error),
                        Box::new(result.clone()),
                    ],
                }
            }
        }
    }

    /// `$1` is the task's id; the rest follow in the statement's order.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(self.args.len() + 1);
        p.push(&self.id);
        p.extend(self.args.iter().map(|a| &**a as &(dyn ToSql + Sync)));
        p
    }
}

/// Apply `calls` in order and commit: one statement alone, or several between `BEGIN` and
/// `COMMIT`, all sent at once. `Ok` holds each write's answer (a lost lease refuses only its
/// own write); `Err` is an error that broke the batch (nothing of it was committed, unless
/// the connection was lost during the `COMMIT`, as with any commit).
async fn apply_all(client: &deadpool_postgres::Object, calls: &[Call]) -> Result<Vec<Result<()>>> {
    // Prepared first: a statement sent while its preparation is still on its way would
    // reach the server after the `COMMIT`.
    let finish = client.prepare_cached(FINISH).await.map_err(pg)?;
    let started = client.prepare_cached(STARTED).await.map_err(pg)?;
    let statement = |c: &Call| -> &Statement {
        match c.kind {
            Kind::Finish => &finish,
            Kind::Started => &started,
        }
    };
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = calls.iter().map(Call::params).collect();
    let counts: Vec<u64> = if calls.len() == 1 {
        vec![client
            .execute(statement(&calls[0]), &params[0])
            .await
            .map_err(pg)?]
    } else {
        type Sent<'a> = Pin<
            Box<dyn Future<Output = std::result::Result<u64, tokio_postgres::Error>> + Send + 'a>,
        >;
        let mut sent: Vec<Sent<'_>> = Vec::with_capacity(calls.len() + 2);
        sent.push(Box::pin(async {
            client.batch_execute("BEGIN").await.map(|()| 0)
        }));
        for (c, p) in calls.iter().zip(&params) {
            sent.push(Box::pin(client.execute(statement(c), p)));
        }
        sent.push(Box::pin(async {
            client.batch_execute("COMMIT").await.map(|()| 0)
        }));
        let mut answers = in_order(sent).await.into_iter();
        // The first error is the cause; those after it say only that the transaction was
        // aborted (and the `COMMIT` of an aborted transaction rolls it back, answering no
        // error).
        let mut counts = Vec::with_capacity(calls.len());
        for (i, a) in answers.by_ref().enumerate() {
            let n = a.map_err(pg)?;
            if i > 0 && i <= calls.len() {
                counts.push(n);
            }
        }
        counts
    };
    Ok(calls
        .iter()
        .zip(counts)
        .map(|(c, n)| {
            if n == 0 {
                Err(BrokerError::LeaseLost(c.lease.task))
            } else {
                Ok(())
            }
        })
        .collect())
}

/// Run `futures` together, polling each in the order given: tokio-postgres sends a request
/// when its future is first polled, so the server receives them in this order (one round
/// trip for all). Their outputs, in the same order.
async fn in_order<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match Pin::new(f).poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A start: the task becomes `running` (its attempt counted once) with its pid, if the
/// lease still holds.
const STARTED: &str = "
UPDATE tasks SET attempts = attempts + (state = 'queued')::int, state = 'running',
    started_at = CASE WHEN state = 'queued' THEN $5 ELSE started_at END,
    updated_at = $5, pid = $2, pid_start = $3, pid_boot = $7
 WHERE id = $1 AND lease_token = $4 AND lease_node = $6 AND state IN ('queued', 'running')";

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
SELECT seq FROM done";
