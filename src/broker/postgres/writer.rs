//! The ordered writer (rule 6): results (`finish`) and starts (`started`) of this client go
//! to one task over a channel, in the order they were called, and are applied in that
//! order: whatever is waiting is folded into one transaction (one commit, one WAL flush, for
//! many results under load). A start is one statement; finishes in a row are one statement
//! together, over arrays (one row each), so that the server plans and runs one statement
//! per batch rather than one per result. A batch is sent in one round trip: `BEGIN`, the
//! statements and `COMMIT` pipelined (PostgreSQL runs them in the order sent); a batch of
//! one statement is that statement alone, which commits by itself. A batch that
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
        match apply_all(&client, &calls, now).await {
            Ok(answers) => {
                for (j, a) in batch.into_iter().zip(answers) {
                    let _ = j.answer.send(a);
                }
            }
            Err(BrokerError::Storage(_)) if batch.len() > 1 => {
                // One write broke the batch: apply each by itself, in order.
                for (j, call) in batch.into_iter().zip(&calls) {
                    let one = match apply_all(&client, std::slice::from_ref(call), now).await {
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
/// decided inside its statement before it changes anything: no row is changed for it and
/// the statement does not answer it, which leaves the transaction usable.
enum Call {
    Started {
        lease: Lease,
        id: String,
        args: Vec<Box<dyn ToSql + Sync + Send>>,
    },
    Finish(Box<FinishRow>),
}

/// A finish as one row of the finish statement's arrays.
struct FinishRow {
    lease: Lease,
    id: String,
    token: i64,
    node: String,
    next: &'static str,
    retry_at: Option<i64>,
    number: i32,
    pid: Option<i32>,
    started_at: i64,
    ended_at: i64,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<&'static str>,
    error: Option<String>,
    stdout_tail: Vec<u8>,
    stderr_tail: Vec<u8>,
    memory_peak: Option<i64>,
    cpu_usec: Option<i64>,
    attempt_node: String,
    result: Option<String>,
}

impl Call {
    fn new(write: &Write, now: i64) -> Call {
        match write {
            Write::Started {
                lease,
                pid,
                pid_start,
            } => Call::Started {
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
                Call::Finish(Box::new(FinishRow {
                    lease: lease.clone(),
                    id: lease.task.to_string(),
                    token: lease.token,
                    node: lease.node.as_str().to_string(),
                    next,
                    retry_at,
                    number: attempt.number as i32,
                    pid: attempt.pid,
                    started_at: attempt.started_at,
                    ended_at: attempt.ended_at,
                    exit_code: attempt.exit_code,
                    signal: attempt.signal,
                    reason: attempt.reason.map(|r| r.as_str()),
                    error: attempt.error.as_deref().map(|e| text(e).into_owned()),
                    stdout_tail: attempt.stdout_tail.as_bytes().to_vec(),
                    stderr_tail: attempt.stderr_tail.as_bytes().to_vec(),
                    memory_peak: attempt.memory_peak.and_then(|n| i64::try_from(n).ok()),
                    cpu_usec: attempt.cpu_usec.and_then(|n| i64::try_from(n).ok()),
                    attempt_node: attempt.node.as_str().to_string(),
                    result: result.clone(),
                }))
            }
        }
    }

    fn lease(&self) -> &Lease {
        match self {
            Call::Started { lease, .. } => lease,
            Call::Finish(f) => &f.lease,
        }
    }
}

/// The statements of a batch, as ranges of its writes: each start by itself, and each run
/// of finishes in a row as one statement over arrays, cut where a task would come twice
/// (one statement could not apply both in order). `writes` gives a finish's task id, and
/// `None` for a start.
fn units<'a>(writes: impl Iterator<Item = Option<&'a str>>) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut ids: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut in_run = false;
    for (i, w) in writes.enumerate() {
        match (w, out.last_mut()) {
            (Some(id), Some(last)) if in_run && !ids.contains(id) => {
                last.end = i + 1;
                ids.insert(id);
            }
            _ => {
                out.push(i..i + 1);
                ids.clear();
                in_run = w.is_some();
                ids.extend(w);
            }
        }
    }
    out
}

/// The finish statement's arguments for `rows`: one array per column, then the time.
fn finish_params(rows: &[&FinishRow], now: i64) -> Vec<Box<dyn ToSql + Sync + Send>> {
    fn col<T: ToSql + Sync + Send + 'static>(
        rows: &[&FinishRow],
        field: impl Fn(&FinishRow) -> T,
    ) -> Box<dyn ToSql + Sync + Send> {
        Box::new(rows.iter().map(|r| field(r)).collect::<Vec<T>>())
    }
    vec![
        col(rows, |r| r.id.clone()),
        col(rows, |r| r.token),
        col(rows, |r| r.node.clone()),
        col(rows, |r| r.next.to_string()),
        col(rows, |r| r.retry_at),
        col(rows, |r| r.number),
        col(rows, |r| r.pid),
        col(rows, |r| r.started_at),
        col(rows, |r| r.ended_at),
        col(rows, |r| r.exit_code),
        col(rows, |r| r.signal),
        col(rows, |r| r.reason.map(str::to_string)),
        col(rows, |r| r.error.clone()),
        col(rows, |r| r.stdout_tail.clone()),
        col(rows, |r| r.stderr_tail.clone()),
        col(rows, |r| r.memory_peak),
        col(rows, |r| r.cpu_usec),
        col(rows, |r| r.attempt_node.clone()),
        col(rows, |r| r.result.clone()),
        Box::new(now),
    ]
}

/// Apply `calls` in order and commit: one statement alone, or several between `BEGIN` and
/// `COMMIT`, all sent at once. `Ok` holds each write's answer (a lost lease refuses only its
/// own write); `Err` is an error that broke the batch (nothing of it was committed, unless
/// the connection was lost during the `COMMIT`, as with any commit).
async fn apply_all(
    client: &deadpool_postgres::Object,
    calls: &[Call],
    now: i64,
) -> Result<Vec<Result<()>>> {
    // Prepared first: a statement sent while its preparation is still on its way would
    // reach the server after the `COMMIT`.
    let finish = client.prepare_cached(FINISH).await.map_err(pg)?;
    let started = client.prepare_cached(STARTED).await.map_err(pg)?;
    let units = units(calls.iter().map(|c| match c {
        Call::Finish(f) => Some(f.id.as_str()),
        Call::Started { .. } => None,
    }));
    // Each unit's statement and arguments; a start's id is its `$1`.
    let args: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = units
        .iter()
        .map(|u| match &calls[u.start] {
            Call::Started { .. } => Vec::new(),
            Call::Finish(_) => {
                let rows: Vec<&FinishRow> = calls[u.clone()]
                    .iter()
                    .filter_map(|c| match c {
                        Call::Finish(f) => Some(&**f),
                        Call::Started { .. } => None,
                    })
                    .collect();
                finish_params(&rows, now)
            }
        })
        .collect();
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = units
        .iter()
        .zip(&args)
        .map(|(u, a)| match &calls[u.start] {
            Call::Started { id, args, .. } => {
                let mut p: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(args.len() + 1);
                p.push(id);
                p.extend(args.iter().map(|a| &**a as &(dyn ToSql + Sync)));
                p
            }
            Call::Finish(_) => a.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect(),
        })
        .collect();
    let send = |u: &std::ops::Range<usize>, p| {
        let statement = match &calls[u.start] {
            Call::Started { .. } => &started,
            Call::Finish(_) => &finish,
        };
        send_unit(client, statement, &calls[u.start], p)
    };
    let applied: Vec<Vec<String>> = if units.len() == 1 {
        vec![send(&units[0], &params[0]).await.map_err(pg)?]
    } else {
        let mut sent: Vec<Sent<'_>> = Vec::with_capacity(units.len() + 2);
        sent.push(Box::pin(async {
            client.batch_execute("BEGIN").await.map(|()| Vec::new())
        }));
        for (u, p) in units.iter().zip(&params) {
            sent.push(send(u, p));
        }
        sent.push(Box::pin(async {
            client.batch_execute("COMMIT").await.map(|()| Vec::new())
        }));
        // The first error is the cause; those after it say only that the transaction was
        // aborted (and the `COMMIT` of an aborted transaction rolls it back, answering no
        // error).
        let mut applied = Vec::with_capacity(units.len());
        for (i, a) in in_order(sent).await.into_iter().enumerate() {
            let ids = a.map_err(pg)?;
            if i > 0 && i <= units.len() {
                applied.push(ids);
            }
        }
        applied
    };
    let mut out = Vec::with_capacity(calls.len());
    for (u, ids) in units.iter().zip(applied) {
        for c in &calls[u.clone()] {
            let id = match c {
                Call::Started { id, .. } => id,
                Call::Finish(f) => &f.id,
            };
            out.push(if ids.iter().any(|i| i == id) {
                Ok(())
            } else {
                Err(BrokerError::LeaseLost(c.lease().task))
            });
        }
    }
    Ok(out)
}

type Sent<'a> = Pin<
    Box<dyn Future<Output = std::result::Result<Vec<String>, tokio_postgres::Error>> + Send + 'a>,
>;

/// Send one statement of a batch (`first` is its first write): its answer is the ids of the
/// tasks whose write it applied.
fn send_unit<'a>(
    client: &'a deadpool_postgres::Object,
    statement: &'a Statement,
    first: &'a Call,
    params: &'a [&'a (dyn ToSql + Sync)],
) -> Sent<'a> {
    match first {
        Call::Started { id, .. } => {
            let run = client.execute(statement, params);
            Box::pin(async move {
                Ok(if run.await? > 0 {
                    vec![id.clone()]
                } else {
                    Vec::new()
                })
            })
        }
        Call::Finish(_) => {
            let run = client.query(statement, params);
            Box::pin(async move { Ok(run.await?.iter().map(|r| r.get(0)).collect()) })
        }
    }
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

/// Results in one statement (one round trip, however many): the finishes come as arrays,
/// a row each. The leased rows are locked by id, token and node; a finish whose row does
/// not match writes nothing and is not in the answer: its lease is lost.
const FINISH: &str = "
WITH w AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                         $6::int[], $7::int[], $8::bigint[], $9::bigint[], $10::int[],
                         $11::int[], $12::text[], $13::text[], $14::bytea[], $15::bytea[],
                         $16::bigint[], $17::bigint[], $18::text[], $19::text[])
        AS w(id, token, node, asked, retry_at, number, pid, started_at, ended_at, exit_code,
             signal, reason, error, stdout_tail, stderr_tail, memory_peak, cpu_usec,
             attempt_node, result)),
held AS (
    SELECT t.seq, t.cancel_requested, t.state = 'running' AS counted, w.*
      FROM w JOIN tasks t ON t.id = w.id
     WHERE t.lease_token = w.token AND t.lease_node = w.node AND t.state IN ('queued', 'running')
     FOR UPDATE OF t),
-- An operator's cancel that arrived while the task ran outweighs a retry, a requeue or a
-- release.
n AS (
    SELECT h.*, CASE WHEN h.cancel_requested AND h.asked IN ('retry', 'requeue', 'release')
                     THEN 'cancelled' ELSE h.asked END AS outcome
      FROM held h),
c AS (
    SELECT n.*, CASE n.outcome WHEN 'requeue' THEN false WHEN 'release' THEN false
                               WHEN 'cancelled' THEN n.pid IS NOT NULL ELSE true END AS charged
      FROM n),
attempt AS (
    INSERT INTO attempts (task_seq, n, number, node, pid, started_at, ended_at, exit_code, signal,
                          reason, error, stdout_tail, stderr_tail, memory_peak, cpu_usec)
    SELECT c.seq, (SELECT coalesce(max(a.n), 0) + 1 FROM attempts a WHERE a.task_seq = c.seq),
           c.number, c.attempt_node, c.pid, c.started_at, c.ended_at, c.exit_code, c.signal,
           c.reason, c.error, c.stdout_tail, c.stderr_tail, c.memory_peak, c.cpu_usec
      FROM c WHERE c.asked <> 'release'),
done AS (
    UPDATE tasks t SET
        state = CASE c.outcome WHEN 'succeeded' THEN 'succeeded' WHEN 'retry' THEN 'retrying'
                               WHEN 'failed' THEN 'failed' WHEN 'cancelled' THEN 'cancelled'
                               ELSE 'queued' END,
        run_at = CASE WHEN c.outcome = 'retry' THEN c.retry_at ELSE t.run_at END,
        finished_at = CASE WHEN c.outcome IN ('succeeded', 'failed', 'cancelled') THEN $20::bigint END,
        attempts = greatest(t.attempts + CASE WHEN c.charged AND NOT c.counted THEN 1
                                              WHEN NOT c.charged AND c.counted THEN -1
                                              ELSE 0 END, 0),
        last_error = CASE WHEN c.outcome = 'release' THEN t.last_error
                          WHEN c.outcome = 'succeeded' THEN NULL
                          WHEN c.outcome = 'cancelled' AND c.cancel_requested THEN 'cancelled by an operator'
                          ELSE c.error END,
        updated_at = $20, lease_node = NULL, lease_expires = NULL, cancel_requested = false,
        pid = NULL, pid_start = NULL
      FROM c WHERE t.seq = c.seq
    RETURNING t.seq, t.id, c.result),
kept AS (
    INSERT INTO results (task_seq, value) SELECT seq, result FROM done WHERE result IS NOT NULL
    ON CONFLICT (task_seq) DO UPDATE SET value = excluded.value)
SELECT id FROM done";

#[cfg(test)]
mod tests {
    use super::units;

    #[test]
    fn finishes_in_a_row_share_a_statement_and_starts_and_repeats_cut_the_run() {
        let of = |w: &[Option<&'static str>]| units(w.iter().copied());
        assert!(of(&[]).is_empty());
        assert_eq!(of(&[Some("a")]).len(), 1);
        assert_eq!(of(&[Some("a"), Some("b"), Some("c")]), vec![0..3]);
        // A start stands alone and ends the run before it.
        assert_eq!(
            of(&[Some("a"), None, Some("b"), Some("c")]),
            vec![0..1, 1..2, 2..4]
        );
        assert_eq!(of(&[None, None]), vec![0..1, 1..2]);
        // The same task twice: the second begins a new statement, after the first.
        assert_eq!(
            of(&[Some("a"), Some("b"), Some("a"), Some("c")]),
            vec![0..2, 2..4]
        );
    }
}
