//! The ordered writer (rule 6): results (`finish`) and starts (`started`) of this client go
//! to one task over a channel, in the order they were called, and are applied in that
//! order: whatever is waiting is folded into one transaction (one commit, one WAL flush, for
//! many results under load), and while writes arrive back to back a batch waits a moment
//! for more ([`gather`]). The starts of a batch are one statement and its finishes another,
//! each over arrays (one row per write), so that the server plans and runs at most two
//! statements per batch rather than one per write; a task's own writes keep their order
//! (the batch is cut where they would not, [`units`]). A batch is sent in one round trip:
//! `BEGIN`, the statements and `COMMIT` pipelined (PostgreSQL runs them in the order
//! sent); a batch of one statement is that statement alone, which commits by itself. A
//! batch that fails on an SQL error is rolled back (an error aborts the transaction, and
//! the `COMMIT` behind it then rolls back) and its writes are applied one statement each,
//! so one refused write does not undo its neighbours.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
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
/// A batch this soon after the previous commit means writes are arriving back to back.
const BUSY_WINDOW: Duration = Duration::from_millis(2);
/// How long a batch waits for company when writes arrive back to back.
const LINGER: Duration = Duration::from_millis(2);
/// The writer keeps its connection from one batch to the next until it has had no write
/// for this long. Its statements are planned per connection: the first five runs of a
/// prepared statement on a connection are planned with their arguments, the sixth makes the
/// plan it keeps, and a plan of the finish statement costs the server 0.6 to 1.6 ms. Taking
/// a connection from the pool for each batch (from a pool handing them out in turn), the
/// writer had every connection plan it: 36 plans in a W1 run of 2,000 tasks on 6
/// connections (20 to 40 ms of the server's 0.5 s), where one connection plans it 6 times.
/// The pool is LIFO now (`conn::pool`), but between two batches a claim may take the
/// connection the writer gave back; kept, it stays the writer's.
const KEEP_IDLE: Duration = Duration::from_millis(200);
/// A pool this small is not held from: the claims and operator calls need its connections.
const KEEP_MIN_POOL: usize = 3;

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

/// Prepare the start and finish statements on `client` and run each once over no rows (it
/// changes nothing): a connection's first use of a statement costs its preparation and,
/// on a new server process, the catalog reads of its first plan (warm-up, `PgBroker::warm`).
pub(super) async fn warm(client: &deadpool_postgres::Object, now: i64) -> Result<()> {
    let started = client.prepare_cached(STARTED).await.map_err(pg)?;
    let finish = client.prepare_cached(FINISH).await.map_err(pg)?;
    for (statement, args) in [
        (&started, start_params(&[], now)),
        (&finish, finish_params(&[], now)),
    ] {
        client.query(statement, &refs(&args)).await.map_err(pg)?;
    }
    Ok(())
}

async fn writer_loop(
    pool: Pool,
    addr: String,
    clock: Arc<Clock>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let mut last_commit = Instant::now() - BUSY_WINDOW;
    // The connection kept between batches (see [`KEEP_IDLE`]).
    let mut kept: Option<Object> = None;
    loop {
        let first = match kept {
            Some(_) => match tokio::time::timeout(KEEP_IDLE, jobs.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    kept = None;
                    jobs.recv().await
                }
            },
            None => jobs.recv().await,
        };
        let Some(first) = first else { break };
        let batch = gather(first, &mut jobs, last_commit.elapsed() < BUSY_WINDOW).await;
        let client = match kept.take() {
            Some(c) => c,
            None => match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    let e = pool_error(&addr, e);
                    for j in batch {
                        let _ = j.answer.send(Err(e.clone()));
                    }
                    continue;
                }
            },
        };
        let now = clock.now();
        let calls: Vec<Call> = batch.iter().map(|j| Call::new(&j.write)).collect();
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
        last_commit = Instant::now();
        if !client.is_closed() && pool.status().max_size >= KEEP_MIN_POOL {
            kept = Some(client);
        }
    }
}

/// A batch: `first`, whatever else is waiting, and, when the writer is `busy` (its last
/// commit ended within [`BUSY_WINDOW`]), what arrives within [`LINGER`] more. Under a
/// sustained run more results then share a commit: the server's work per commit (about
/// 0.4 ms of its CPU, the WAL flush half of it) is what W1 spent most on, and nothing waits
/// on a result's commit to go on (rule 6: a slot is handed on once `finish` has queued).
/// A lone write after a pause is sent at once.
async fn gather<T>(first: T, jobs: &mut mpsc::UnboundedReceiver<T>, busy: bool) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    if busy {
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, jobs.recv()).await {
                Ok(Some(j)) => batch.push(j),
                Ok(None) | Err(_) => break,
            }
        }
    }
    batch
}

/// One write as a row of its statement's arrays. A write's logical refusal (a lost lease) is
/// decided inside its statement before it changes anything: no row is changed for it and
/// the statement does not answer it, which leaves the transaction usable.
enum Call {
    Started(StartRow),
    Finish(Box<FinishRow>),
}

/// A start as one row of the start statement's arrays.
struct StartRow {
    lease: Lease,
    id: String,
    token: i64,
    node: String,
    pid: i32,
    pid_start: i64,
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
    fn new(write: &Write) -> Call {
        match write {
            Write::Started {
                lease,
                pid,
                pid_start,
            } => Call::Started(StartRow {
                lease: lease.clone(),
                id: lease.task.to_string(),
                token: lease.token,
                node: lease.node.as_str().to_string(),
                pid: *pid,
                pid_start: *pid_start as i64,
            }),
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
            Call::Started(s) => &s.lease,
            Call::Finish(f) => &f.lease,
        }
    }

    fn id(&self) -> &str {
        match self {
            Call::Started(s) => &s.id,
            Call::Finish(f) => &f.id,
        }
    }
}

/// A stretch of a batch stored by at most two statements: its starts (indices into the
/// batch, in order) as one, then its finishes as one.
#[derive(Debug, PartialEq, Eq, Default)]
struct Unit {
    starts: Vec<usize>,
    finishes: Vec<usize>,
}

/// The statements of a batch, as stretches of its writes (`true` for a finish, and the
/// task's id). Rule 6 orders the writes of one task: writes to different tasks commute
/// inside the one transaction (no other client sees it before the commit, and neither
/// statement reads other tasks' rows), so a stretch runs its starts before its finishes,
/// and is cut where that would put a task's writes out of order or one statement would
/// meet a task twice: before a start whose task already has a write in the stretch, and
/// before a finish whose task already has a finish there.
fn units<'a>(writes: impl Iterator<Item = (bool, &'a str)>) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    let mut started: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut finished: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, (finish, id)) in writes.enumerate() {
        let fits = if finish {
            !finished.contains(id)
        } else {
            !started.contains(id) && !finished.contains(id)
        };
        if !fits || out.is_empty() {
            out.push(Unit::default());
            started.clear();
            finished.clear();
        }
        let unit = out.last_mut().expect("pushed above");
        if finish {
            unit.finishes.push(i);
            finished.insert(id);
        } else {
            unit.starts.push(i);
            started.insert(id);
        }
    }
    out
}

/// A statement's arguments.
type Args = Vec<Box<dyn ToSql + Sync + Send>>;

/// `args` as the parameters a query takes.
fn refs(args: &Args) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect()
}

/// The start statement's arguments for `rows`: one array per column, then the time and
/// this machine's boot id.
fn start_params(rows: &[&StartRow], now: i64) -> Args {
    vec![
        Box::new(rows.iter().map(|r| r.id.clone()).collect::<Vec<String>>()),
        Box::new(rows.iter().map(|r| r.token).collect::<Vec<i64>>()),
        Box::new(rows.iter().map(|r| r.node.clone()).collect::<Vec<String>>()),
        Box::new(rows.iter().map(|r| r.pid).collect::<Vec<i32>>()),
        Box::new(rows.iter().map(|r| r.pid_start).collect::<Vec<i64>>()),
        Box::new(now),
        Box::new(boot_id().to_string()),
    ]
}

/// The finish statement's arguments for `rows`: one array per column, then the time.
fn finish_params(rows: &[&FinishRow], now: i64) -> Args {
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
    // Each statement: the writes it stores (indices into `calls`) and its arguments.
    let mut statements: Vec<(&Statement, &[usize], Args)> = Vec::new();
    let units = units(calls.iter().map(|c| (matches!(c, Call::Finish(_)), c.id())));
    for u in &units {
        if !u.starts.is_empty() {
            let rows: Vec<&StartRow> = u
                .starts
                .iter()
                .filter_map(|&i| match &calls[i] {
                    Call::Started(s) => Some(s),
                    Call::Finish(_) => None,
                })
                .collect();
            statements.push((&started, &u.starts, start_params(&rows, now)));
        }
        if !u.finishes.is_empty() {
            let rows: Vec<&FinishRow> = u
                .finishes
                .iter()
                .filter_map(|&i| match &calls[i] {
                    Call::Finish(f) => Some(&**f),
                    Call::Started(_) => None,
                })
                .collect();
            statements.push((&finish, &u.finishes, finish_params(&rows, now)));
        }
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> =
        statements.iter().map(|(_, _, args)| refs(args)).collect();
    let applied: Vec<Vec<String>> = if statements.len() == 1 {
        vec![send(client, statements[0].0, &params[0])
            .await
            .map_err(pg)?]
    } else {
        let mut sent: Vec<Sent<'_>> = Vec::with_capacity(statements.len() + 2);
        sent.push(Box::pin(async {
            client.batch_execute("BEGIN").await.map(|()| Vec::new())
        }));
        for ((statement, _, _), p) in statements.iter().zip(&params) {
            sent.push(send(client, statement, p));
        }
        sent.push(Box::pin(async {
            client.batch_execute("COMMIT").await.map(|()| Vec::new())
        }));
        // The first error is the cause; those after it say only that the transaction was
        // aborted (and the `COMMIT` of an aborted transaction rolls it back, answering no
        // error).
        let mut applied = Vec::with_capacity(statements.len());
        for (i, a) in in_order(sent).await.into_iter().enumerate() {
            let ids = a.map_err(pg)?;
            if i > 0 && i <= statements.len() {
                applied.push(ids);
            }
        }
        applied
    };
    let mut out: Vec<Option<Result<()>>> = calls.iter().map(|_| None).collect();
    for ((_, writes, _), ids) in statements.iter().zip(applied) {
        for &i in writes.iter() {
            let c = &calls[i];
            out[i] = Some(if ids.iter().any(|id| id == c.id()) {
                Ok(())
            } else {
                Err(BrokerError::LeaseLost(c.lease().task))
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every write is in one statement"))
        .collect())
}

type Sent<'a> = Pin<
    Box<dyn Future<Output = std::result::Result<Vec<String>, tokio_postgres::Error>> + Send + 'a>,
>;

/// Send one statement of a batch: its answer is the ids of the tasks whose write it applied.
fn send<'a>(
    client: &'a deadpool_postgres::Object,
    statement: &'a Statement,
    params: &'a [&'a (dyn ToSql + Sync)],
) -> Sent<'a> {
    let run = client.query(statement, params);
    Box::pin(async move { Ok(run.await?.iter().map(|r| r.get(0)).collect()) })
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

/// Starts in one statement, as arrays (a row each): each task becomes `running` (its
/// attempt counted once) with its pid, if its lease still holds. A start whose row does not
/// match changes nothing and is not in the answer: its lease is lost.
const STARTED: &str = "
UPDATE tasks t SET attempts = t.attempts + (t.state = 'queued')::int, state = 'running',
    started_at = CASE WHEN t.state = 'queued' THEN $6 ELSE t.started_at END,
    updated_at = $6, pid = s.pid, pid_start = s.pid_start, pid_boot = $7
  FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[], $5::bigint[])
       AS s(id, token, node, pid, pid_start)
 WHERE t.id = s.id AND t.lease_token = s.token AND t.lease_node = s.node
   AND t.state IN ('queued', 'running')
RETURNING t.id";

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
    use super::{gather, units, Unit, LINGER, MAX_BATCH};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Sends `late` after `after`, from another task.
    fn send_later(tx: &mpsc::UnboundedSender<u32>, late: u32, after: Duration) {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(late);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_writer_waits_for_company_and_an_idle_one_does_not() {
        let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
        // Idle: what is waiting goes at once, a write a moment later does not join it.
        tx.send(2).unwrap();
        send_later(&tx, 3, Duration::from_millis(1));
        assert_eq!(gather(1, &mut rx, false).await, vec![1, 2]);
        assert_eq!(rx.recv().await, Some(3));
        // Busy: a write within the linger joins the batch, one after it does not.
        send_later(&tx, 5, LINGER / 2);
        send_later(&tx, 6, LINGER * 3);
        assert_eq!(gather(4, &mut rx, true).await, vec![4, 5]);
        assert_eq!(rx.recv().await, Some(6));
        // A full batch does not wait.
        for n in 0..MAX_BATCH as u32 {
            tx.send(n).unwrap();
        }
        let begun = tokio::time::Instant::now();
        assert_eq!(gather(0, &mut rx, true).await.len(), MAX_BATCH);
        assert_eq!(begun.elapsed(), Duration::ZERO);
        assert_eq!(rx.try_recv(), Ok(MAX_BATCH as u32 - 1));
    }

    /// The units of `writes` (`S` a start, `F` a finish, then the task), as (starts,
    /// finishes) index lists.
    fn of(writes: &[&str]) -> Vec<(Vec<usize>, Vec<usize>)> {
        units(writes.iter().map(|w| (w.starts_with('F'), &w[1..])))
            .into_iter()
            .map(|Unit { starts, finishes }| (starts, finishes))
            .collect()
    }

    #[test]
    fn a_batch_is_its_starts_then_its_finishes_cut_where_a_task_would_go_out_of_order() {
        assert!(of(&[]).is_empty());
        assert_eq!(of(&["Fa"]), vec![(vec![], vec![0])]);
        assert_eq!(of(&["Sa"]), vec![(vec![0], vec![])]);
        assert_eq!(of(&["Fa", "Fb", "Fc"]), vec![(vec![], vec![0, 1, 2])]);
        // Starts and finishes of different tasks interleaved: one statement each, the
        // starts first (they commute with the other tasks' finishes).
        assert_eq!(
            of(&["Sa", "Fb", "Sc", "Fd", "Se"]),
            vec![(vec![0, 2, 4], vec![1, 3])]
        );
        // A task's start and then its finish keep their order.
        assert_eq!(of(&["Sa", "Fb", "Fa"]), vec![(vec![0], vec![1, 2])]);
        // A start after its task's finish would run before it: the stretch ends there.
        assert_eq!(
            of(&["Fa", "Sb", "Sa", "Fc"]),
            vec![(vec![1], vec![0]), (vec![2], vec![3])]
        );
        // The same task twice in one statement: cut, the second after the first.
        assert_eq!(
            of(&["Fa", "Fb", "Fa", "Fc"]),
            vec![(vec![], vec![0, 1]), (vec![], vec![2, 3])]
        );
        assert_eq!(
            of(&["Sa", "Sa"]),
            vec![(vec![0], vec![]), (vec![1], vec![])]
        );
    }
}
