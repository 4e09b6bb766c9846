//! An in-memory broker: the whole store is a map behind one mutex, gone with the process.
//!
//! It keeps every rule of the trait (see the [module documentation](super)) that one
//! process can observe, so the contract suite runs against it as against SQLite and Redis;
//! what it cannot do is be shared: another process (a CLI call, a second daemon) never sees
//! it, and a "reopened" store is a new, empty one. It is for running the supervisor
//! in-process in tests, with tokio's clock paused where real processes are not the point,
//! and as the smallest worked example of a backend. It never runs processes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::schedules::Plan;
use super::{
    Broker, BrokerError, CancelOutcome, Claimed, Enqueued, Finish, Flow, FlowState, FlowTable,
    Lease, ListFilter, LostLimits, Orphan, PruneRule, Pruned, QueueCounts, Queued, Recover, Result,
    ScheduleKey, ScheduleState, ScheduleStep, SlotRecord, StatRow, StepAnswer, Wakeups,
};
use crate::audit::{AuditEntry, AuditFilter, AuditRecord};
use crate::model::{
    now_ms, AttemptReason, AttemptRecord, NewTask, NodeId, QueueName, TaskDetail, TaskId,
    TaskRecord, TaskState, UnixMs,
};

/// One task as the store holds it: its record, its history and its lease.
struct Row {
    task: TaskRecord,
    history: Vec<AttemptRecord>,
    /// What it returned, once it succeeded.
    result: Option<serde_json::Value>,
    /// The fencing token: bumped by every claim.
    token: i64,
    lease_expires: UnixMs,
    pid: Option<i32>,
    pid_start: Option<u64>,
    /// When its current run's start was recorded.
    started_at: Option<UnixMs>,
    /// Its `concurrency_key` and `rate_key` values (rule 15).
    flow_key: Option<String>,
    rate_key: Option<String>,
    /// Parents not yet succeeded (rule 13): while above 0 the task waits in `scheduled`.
    blocked: usize,
    /// How long (ms) its unique key holds after it finished (rule 14).
    unique_for: Option<i64>,
}

impl Row {
    /// Held by `lease` (same node and token), and still queued or running.
    fn held_by(&self, lease: &Lease) -> bool {
        self.token == lease.token
            && self.task.node.as_ref() == Some(&lease.node)
            && matches!(self.task.state, TaskState::Queued | TaskState::Running)
    }

    fn release(&mut self) {
        self.task.node = None;
        self.lease_expires = 0;
        self.pid = None;
        self.pid_start = None;
    }
}

#[derive(Default)]
struct Store {
    /// By insertion order (`seq`): FIFO within a priority, newest first for lists.
    rows: BTreeMap<u64, Row>,
    by_id: HashMap<TaskId, u64>,
    paused: BTreeSet<QueueName>,
    next_seq: u64,
    /// The audit trail, oldest first; ids are `audit_seq` values.
    audit: VecDeque<AuditRecord>,
    audit_seq: u64,
    /// Throughput and latency counters by (minute, queue).
    stats: BTreeMap<(i64, String), StatRow>,
    /// Each schedule's record and its slot records, newest first.
    schedules: BTreeMap<ScheduleKey, (ScheduleState, std::collections::VecDeque<SlotRecord>)>,
    /// Each rate limit's TAT (µs), by queue and rate key value ("" for the queue's).
    rate_tat: HashMap<(QueueName, String), i64>,
    /// The dependants of each parent not settled yet (rule 13).
    kids: HashMap<TaskId, Vec<TaskId>>,
}

impl Store {
    fn row_mut(&mut self, id: TaskId) -> Option<&mut Row> {
        let seq = *self.by_id.get(&id)?;
        self.rows.get_mut(&seq)
    }

    /// The waiting or running task of `queue` that holds unique key `key`, other than `not`.
    fn unique_holder(&self, queue: &QueueName, key: &str, not: Option<TaskId>) -> Option<&Row> {
        self.rows.values().find(|r| {
            Some(r.task.id) != not
                && &r.task.queue == queue
                && r.task.unique_key.as_deref() == Some(key)
                && !r.task.state.is_terminal()
        })
    }

    /// [`Self::unique_holder`], or else the newest finished task of `queue` whose key still
    /// holds at `now` (finished less than its `unique_for` ago).
    fn unique_debounce(&self, queue: &QueueName, key: &str, now: UnixMs) -> Option<&Row> {
        self.unique_holder(queue, key, None).or_else(|| {
            self.rows.values().rev().find(|r| {
                &r.task.queue == queue
                    && r.task.unique_key.as_deref() == Some(key)
                    && matches!((r.task.finished_at, r.unique_for), (Some(f), Some(d)) if f + d > now)
            })
        })
    }

    /// Settle the dependants of every parent that has ended (rule 13): a success counts
    /// down, a failure or a cancel cancels them, and theirs after them. Returns whether a
    /// dependant was unblocked (work for a daemon).
    fn settle(&mut self, now: UnixMs) -> bool {
        let mut unblocked = false;
        loop {
            let ended: Vec<(TaskId, TaskState)> = self
                .kids
                .keys()
                .filter_map(|id| {
                    let r = &self.rows[&self.by_id[id]];
                    r.task.state.is_terminal().then_some((*id, r.task.state))
                })
                .collect();
            if ended.is_empty() {
                return unblocked;
            }
            for (parent, state) in ended {
                for kid in self.kids.remove(&parent).unwrap_or_default() {
                    let Some(r) = self.row_mut(kid) else { continue };
                    if r.task.state != TaskState::Scheduled || r.blocked == 0 {
                        continue;
                    }
                    r.task.updated_at = now;
                    if state == TaskState::Succeeded {
                        r.blocked -= 1;
                        unblocked |= r.blocked == 0;
                    } else {
                        r.task.state = TaskState::Cancelled;
                        r.task.finished_at = Some(now);
                        r.task.last_error = Some(crate::model::dependency_failed(parent));
                    }
                }
            }
        }
    }
}

/// The store and the wake-ups of its one process.
#[derive(Default)]
pub struct MemoryBroker {
    store: Mutex<Store>,
    wakeups: Wakeups,
    flow: FlowTable,
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store
            .lock()
            .expect("no code panics while holding the store")
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>> {
        let now = now_ms();
        let mut later = false;
        let mut out = Vec::with_capacity(tasks.len());
        {
            let mut s = self.store();
            // All or nothing: every payload is read before anything is stored.
            let mut payloads = Vec::with_capacity(tasks.len());
            let mut ids = std::collections::HashSet::with_capacity(tasks.len());
            for t in &tasks {
                let payload = crate::model::read_stored_payload(&t.payload)
                    .map_err(|e| BrokerError::Storage(format!("task {}: {e}", t.id)))?;
                if s.by_id.contains_key(&t.id) || !ids.insert(t.id) {
                    return Err(BrokerError::Conflict(format!("task id {} is taken", t.id)));
                }
                payloads.push(payload);
            }
            // Parents are known, or earlier in this batch.
            for t in &tasks {
                if let Some(p) = t
                    .after
                    .iter()
                    .find(|p| !s.by_id.contains_key(p) && !ids.contains(p))
                {
                    return Err(BrokerError::NotFound(*p));
                }
            }
            for (t, (payload, payload_b64)) in tasks.into_iter().zip(payloads) {
                if let Some(key) = &t.unique_key {
                    if let Some(r) = s.unique_debounce(&t.queue, key, now) {
                        out.push(Enqueued {
                            id: r.task.id,
                            state: r.task.state,
                            existing: true,
                            created_at: r.task.created_at,
                            run_at: r.task.run_at,
                        });
                        continue;
                    }
                }
                let run_at = t.run_at.unwrap_or(now);
                let mut waits_for: Vec<TaskId> = Vec::new();
                let mut failed_parent = None;
                for p in &t.after {
                    let Some(parent) = s.by_id.get(p).map(|seq| &s.rows[seq].task) else {
                        // Earlier in this batch, but not stored: its unique key was held.
                        return Err(BrokerError::NotFound(*p));
                    };
                    match parent.state {
                        TaskState::Succeeded => {}
                        TaskState::Failed | TaskState::Cancelled => {
                            failed_parent.get_or_insert(*p);
                        }
                        _ if !waits_for.contains(p) => waits_for.push(*p),
                        _ => {}
                    }
                }
                if failed_parent.is_some() {
                    waits_for.clear();
                }
                let state = if failed_parent.is_some() {
                    TaskState::Cancelled
                } else if run_at > now {
                    later = true;
                    TaskState::Scheduled
                } else if !waits_for.is_empty() {
                    TaskState::Scheduled
                } else {
                    TaskState::Queued
                };
                for p in &waits_for {
                    s.kids.entry(*p).or_default().push(t.id);
                }
                let seq = s.next_seq;
                s.next_seq += 1;
                s.by_id.insert(t.id, seq);
                out.push(Enqueued {
                    id: t.id,
                    state,
                    existing: false,
                    created_at: now,
                    run_at,
                });
                s.rows.insert(
                    seq,
                    Row {
                        task: TaskRecord {
                            id: t.id,
                            queue: t.queue,
                            state,
                            payload,
                            args: t.args,
                            priority: t.priority,
                            unique_key: t.unique_key,
                            run_at,
                            attempts: 0,
                            created_at: now,
                            updated_at: now,
                            finished_at: failed_parent.map(|_| now),
                            last_error: failed_parent.map(crate::model::dependency_failed),
                            cancel_requested: false,
                            node: None,
                            schedule: None,
                            slot: None,
                            after: t.after,
                            expires_at: t.expires_at,
                            payload_b64,
                        },
                        history: Vec::new(),
                        result: None,
                        token: 0,
                        lease_expires: 0,
                        pid: None,
                        pid_start: None,
                        started_at: None,
                        flow_key: t.flow_key,
                        rate_key: t.rate_key,
                        blocked: waits_for.len(),
                        unique_for: t.unique_for,
                    },
                );
            }
        }
        if !out.is_empty() {
            if later {
                self.wakeups.sched.notify_one();
            } else {
                self.wakeups.work.notify_one();
            }
        }
        Ok(out)
    }

    async fn claim(
        &self,
        node: &NodeId,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        let mut s = self.store();
        if max == 0 || s.paused.contains(queue) {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut ready: Vec<(i32, u64)> = Vec::new();
        for (seq, r) in s.rows.iter_mut() {
            if &r.task.queue != queue {
                continue;
            }
            let expired = r.task.expires_at.is_some_and(|e| e <= now);
            if matches!(r.task.state, TaskState::Scheduled | TaskState::Retrying)
                && r.task.run_at <= now
                && r.blocked == 0
                && !expired
            {
                r.task.state = TaskState::Queued;
                r.task.updated_at = now;
            }
            if r.task.state == TaskState::Queued && r.task.node.is_none() && !expired {
                ready.push((r.task.priority, *seq));
            }
        }
        ready.sort_by_key(|&(priority, seq)| (-(priority as i64), seq));
        // Rule 13, the simplest way: this store scans anyway. Holders per key are counted
        // from the held tasks; a blocked task is passed over, not parked.
        let flow = self.flow.get(queue);
        let mut holders: HashMap<String, u32> = HashMap::new();
        if flow.per_key.is_some() {
            for r in s.rows.values() {
                if &r.task.queue == queue && r.task.node.is_some() {
                    if let Some(k) = &r.flow_key {
                        *holders.entry(k.clone()).or_default() += 1;
                    }
                }
            }
        }
        let now_us = now * 1000;
        let mut wait: Option<i64> = None;
        let mut take = Vec::new();
        for (_, seq) in ready {
            if take.len() >= max {
                break;
            }
            let r = &s.rows[&seq];
            if let (Some(limit), Some(k)) = (flow.per_key, &r.flow_key) {
                if holders.get(k).copied().unwrap_or(0) >= limit {
                    continue;
                }
            }
            if let Some(rate) = flow.rate {
                let rk = if rate.keyed {
                    r.rate_key.clone().unwrap_or_default()
                } else {
                    String::new()
                };
                let slot = (queue.clone(), rk);
                match rate.take(s.rate_tat.get(&slot).copied(), now_us) {
                    Ok(tat) => {
                        s.rate_tat.insert(slot, tat);
                    }
                    Err(at) => {
                        wait = Some(wait.map_or(at, |w| w.min(at)));
                        if rate.keyed {
                            continue;
                        }
                        break;
                    }
                }
            }
            let r = &s.rows[&seq];
            if let Some(k) = &r.flow_key {
                *holders.entry(k.clone()).or_default() += 1;
            }
            take.push(seq);
        }
        self.flow.set_wait(queue, wait.map(|us| (us + 999) / 1000));
        let mut out = Vec::new();
        for seq in take {
            let r = s.rows.get_mut(&seq).expect("listed above");
            r.token += 1;
            r.task.node = Some(node.clone());
            r.lease_expires = now + lease.as_millis() as i64;
            r.task.updated_at = now;
            r.pid = None;
            r.pid_start = None;
            out.push(Claimed {
                lease: Lease {
                    task: r.task.id,
                    token: r.token,
                    node: node.clone(),
                },
                attempt: r.task.attempts + 1,
                task: r.task.clone(),
            });
        }
        Ok(out)
    }

    fn set_flow(&self, queue: &QueueName, flow: Flow) {
        self.flow.set(queue, flow);
    }

    fn flow_wait(&self, queue: &QueueName) -> Option<UnixMs> {
        self.flow.wait(queue)
    }

    async fn flow_state(&self, queue: &QueueName, id: TaskId) -> Result<FlowState> {
        let s = self.store();
        let Some(seq) = s.by_id.get(&id) else {
            return Err(BrokerError::NotFound(id));
        };
        let row = &s.rows[seq];
        let (flow_key, rate_key) = (row.flow_key.clone(), row.rate_key.clone());
        let key_holders = match &flow_key {
            Some(k) => s
                .rows
                .values()
                .filter(|r| {
                    &r.task.queue == queue
                        && r.task.node.is_some()
                        && r.flow_key.as_ref() == Some(k)
                        && r.task.id != id
                })
                .map(|r| r.task.id)
                .collect(),
            None => Vec::new(),
        };
        let keyed = self.flow.get(queue).rate.is_some_and(|r| r.keyed);
        let rk = if keyed {
            rate_key.clone().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(FlowState {
            key_holders,
            rate_tat_us: s.rate_tat.get(&(queue.clone(), rk)).copied(),
            flow_key,
            rate_key,
        })
    }

    async fn started(&self, lease: &Lease, pid: i32, pid_start: u64) -> Result<()> {
        let now = now_ms();
        let mut s = self.store();
        let r = s
            .row_mut(lease.task)
            .filter(|r| r.held_by(lease))
            .ok_or(BrokerError::LeaseLost(lease.task))?;
        if r.task.state == TaskState::Queued {
            r.task.attempts += 1;
            r.started_at = Some(now);
        }
        r.task.state = TaskState::Running;
        r.task.updated_at = now;
        r.pid = Some(pid);
        r.pid_start = Some(pid_start);
        Ok(())
    }

    async fn renew(&self, leases: &[Lease], lease: Duration) -> Result<Vec<TaskId>> {
        let until = now_ms() + lease.as_millis() as i64;
        let mut s = self.store();
        let mut lost = Vec::new();
        for l in leases {
            match s.row_mut(l.task).filter(|r| r.held_by(l)) {
                Some(r) => r.lease_expires = until,
                None => lost.push(l.task),
            }
        }
        Ok(lost)
    }

    fn finish<'a>(
        &'a self,
        lease: &'a Lease,
        attempt: AttemptRecord,
        next: Finish,
    ) -> Queued<'a, ()> {
        // Applied before this returns: the strictest way to keep rule 6.
        let done = self.finish_now(lease, attempt, next);
        Queued::new(async move { done })
    }

    async fn note_run(&self, id: TaskId, mut attempt: AttemptRecord) -> Result<()> {
        let mut s = self.store();
        let r = s.row_mut(id).ok_or(BrokerError::NotFound(id))?;
        // A run whose finish was refused: what it returned is not the task's.
        attempt.result = None;
        r.history.push(attempt);
        Ok(())
    }

    async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        let now = now_ms();
        let out = {
            let mut s = self.store();
            let r = s.row_mut(id).ok_or(BrokerError::NotFound(id))?;
            let state = r.task.state;
            if state == TaskState::Running || (state == TaskState::Queued && r.task.node.is_some())
            {
                // Its node stops it.
                r.task.cancel_requested = true;
                r.task.updated_at = now;
                CancelOutcome::Requested
            } else if state.is_terminal() {
                CancelOutcome::AlreadyFinished(state)
            } else {
                r.task.state = TaskState::Cancelled;
                r.task.finished_at = Some(now);
                r.task.updated_at = now;
                r.task.last_error = Some("cancelled before it ran".into());
                s.settle(now);
                CancelOutcome::Cancelled
            }
        };
        if out == CancelOutcome::Requested {
            self.wakeups.cancel.notify_one();
        }
        Ok(out)
    }

    async fn retry(&self, id: TaskId) -> Result<()> {
        let now = now_ms();
        {
            let mut s = self.store();
            let seq = *s.by_id.get(&id).ok_or(BrokerError::NotFound(id))?;
            let (state, queue, key) = {
                let t = &s.rows[&seq].task;
                (t.state, t.queue.clone(), t.unique_key.clone())
            };
            if !matches!(state, TaskState::Failed | TaskState::Cancelled) {
                return Err(BrokerError::Conflict(format!(
                    "task {id} is {state}; only failed or cancelled tasks can be retried"
                )));
            }
            if let Some(key) = key {
                if s.unique_holder(&queue, &key, Some(id)).is_some() {
                    return Err(BrokerError::Conflict(format!(
                        "another waiting or running task of this queue holds task {id}'s unique key"
                    )));
                }
            }
            let t = &mut s.rows.get_mut(&seq).expect("found above").task;
            t.state = TaskState::Queued;
            t.attempts = 0;
            t.run_at = now;
            t.finished_at = None;
            t.last_error = None;
            t.cancel_requested = false;
            t.updated_at = now;
        }
        self.wakeups.work.notify_one();
        Ok(())
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        {
            let mut s = self.store();
            if paused {
                s.paused.insert(queue.clone());
            } else {
                s.paused.remove(queue);
            }
        }
        self.wakeups.pause.notify_one();
        Ok(())
    }

    async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        Ok(self.store().paused.clone())
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskDetail>> {
        let s = self.store();
        Ok(s.by_id.get(&id).map(|seq| {
            let r = &s.rows[seq];
            TaskDetail::new(r.task.clone(), r.history.clone(), r.result.clone())
        }))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let s = self.store();
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        let below = match filter.after {
            Some(id) => *s.by_id.get(&id).ok_or(BrokerError::NotFound(id))?,
            None => u64::MAX,
        };
        Ok(s.rows
            .range(..below)
            .rev()
            .map(|(_, r)| r)
            .filter(|r| filter.matches(&r.task))
            .take(limit)
            .map(|r| r.task.clone())
            .collect())
    }

    async fn add_stats(&self, rows: &[StatRow]) -> Result<()> {
        let mut s = self.store();
        for r in rows {
            s.stats
                .entry((r.minute, r.queue.to_string()))
                .or_insert_with(|| StatRow::new(r.queue.clone(), r.minute))
                .add(r);
        }
        let oldest = (now_ms() - super::STATS_KEEP_MS) / 60_000;
        s.stats.retain(|(m, _), _| *m >= oldest);
        Ok(())
    }

    async fn stats(&self, since: UnixMs) -> Result<Vec<StatRow>> {
        let from = since.div_euclid(60_000);
        Ok(self
            .store()
            .stats
            .range((from, String::new())..)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn counts(&self) -> Result<Vec<QueueCounts>> {
        let s = self.store();
        let mut by_queue: BTreeMap<QueueName, QueueCounts> = BTreeMap::new();
        fn entry<'m>(
            map: &'m mut BTreeMap<QueueName, QueueCounts>,
            queue: &QueueName,
        ) -> &'m mut QueueCounts {
            map.entry(queue.clone()).or_insert_with(|| QueueCounts {
                queue: Some(queue.clone()),
                ..Default::default()
            })
        }
        for r in s.rows.values() {
            *entry(&mut by_queue, &r.task.queue)
                .counts
                .entry(r.task.state)
                .or_insert(0) += 1;
        }
        for q in &s.paused {
            entry(&mut by_queue, q).paused = true;
        }
        Ok(by_queue.into_values().collect())
    }

    async fn next_due(&self) -> Result<Option<UnixMs>> {
        let s = self.store();
        Ok(s.rows
            .values()
            .filter(|r| matches!(r.task.state, TaskState::Scheduled | TaskState::Retrying))
            .filter(|r| r.blocked == 0 && !s.paused.contains(&r.task.queue))
            .map(|r| r.task.run_at)
            .min())
    }

    async fn count_state(&self, state: TaskState) -> Result<u64> {
        let s = self.store();
        Ok(s.rows.values().filter(|r| r.task.state == state).count() as u64)
    }

    async fn cancel_requested(&self, node: &NodeId) -> Result<Vec<TaskId>> {
        let s = self.store();
        Ok(s.rows
            .values()
            .filter(|r| r.task.cancel_requested && r.task.node.as_ref() == Some(node))
            .map(|r| r.task.id)
            .collect())
    }

    async fn adopt_started(&self, ids: &[TaskId]) -> Result<u64> {
        let now = now_ms();
        let mut s = self.store();
        let mut n = 0;
        for id in ids {
            if let Some(r) = s.row_mut(*id) {
                if r.task.state == TaskState::Queued && r.task.node.is_some() {
                    r.task.state = TaskState::Running;
                    r.task.attempts += 1;
                    r.started_at = Some(now);
                    r.task.updated_at = now;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn recover_limited(
        &self,
        scope: Recover,
        note: &str,
        limits: &LostLimits,
    ) -> Result<Vec<Orphan>> {
        let now = now_ms();
        let mut orphans = Vec::new();
        {
            let mut s = self.store();
            for r in s.rows.values_mut() {
                let expired = match scope {
                    Recover::All => true,
                    Recover::Expired(t) => r.lease_expires < t,
                };
                if r.task.node.is_none()
                    || !expired
                    || !matches!(r.task.state, TaskState::Queued | TaskState::Running)
                {
                    continue;
                }
                let started = r.task.state == TaskState::Running;
                if started {
                    // It ran: the history says it was lost, and the attempt is given back.
                    r.history.push(AttemptRecord::lost(
                        r.task.attempts,
                        r.task.node.clone().unwrap_or_default(),
                        r.pid,
                        r.started_at.unwrap_or(now),
                        now,
                        note.to_string(),
                    ));
                    r.task.attempts = r.task.attempts.saturating_sub(1);
                }
                let lost = r
                    .history
                    .iter()
                    .filter(|a| a.reason == Some(AttemptReason::Lost))
                    .count() as u32;
                let max_lost = limits.of(&r.task.queue);
                let failed = started && !r.task.cancel_requested && lost > max_lost;
                orphans.push(Orphan {
                    task: r.task.id,
                    queue: r.task.queue.clone(),
                    node: r.task.node.clone(),
                    pid: r.pid,
                    pid_start: r.pid_start,
                    failed,
                });
                if failed {
                    r.task.state = TaskState::Failed;
                    r.task.finished_at = Some(now);
                    r.task.last_error = Some(super::lost_too_often(lost, max_lost));
                } else if r.task.cancel_requested {
                    // The operator asked to cancel it before its node went away.
                    r.task.state = TaskState::Cancelled;
                    r.task.finished_at = Some(now);
                    r.task.last_error = Some("cancelled by an operator".into());
                    r.task.cancel_requested = false;
                } else {
                    r.task.state = TaskState::Queued;
                }
                r.task.updated_at = now;
                r.release();
            }
            s.settle(now);
        }
        if !orphans.is_empty() {
            self.wakeups.work.notify_one();
        }
        Ok(orphans)
    }

    async fn expire(&self) -> Result<Vec<(TaskId, QueueName)>> {
        let now = now_ms();
        let mut s = self.store();
        let mut out = Vec::new();
        for r in s.rows.values_mut() {
            let waits = matches!(r.task.state, TaskState::Scheduled | TaskState::Retrying)
                || (r.task.state == TaskState::Queued && r.task.node.is_none());
            if waits && r.task.expires_at.is_some_and(|e| e <= now) {
                r.task.state = TaskState::Cancelled;
                r.task.finished_at = Some(now);
                r.task.updated_at = now;
                r.task.last_error = Some(crate::model::EXPIRED.into());
                out.push((r.task.id, r.task.queue.clone()));
            }
        }
        s.settle(now);
        Ok(out)
    }

    async fn subscribe(&self) -> Result<Wakeups> {
        Ok(self.wakeups.clone())
    }

    async fn audit(&self, entry: &AuditEntry, keep: usize) -> Result<()> {
        let mut s = self.store();
        s.audit_seq += 1;
        let id = s.audit_seq.to_string();
        s.audit.push_back(AuditRecord {
            id,
            at: now_ms(),
            entry: entry.clone(),
        });
        while s.audit.len() > keep.max(1) {
            s.audit.pop_front();
        }
        Ok(())
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let before: Option<u64> = match &filter.before {
            Some(b) => Some(b.parse().map_err(|_| {
                BrokerError::Conflict(format!("`{b}` is not an audit record id of this store"))
            })?),
            None => None,
        };
        let s = self.store();
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        Ok(s.audit
            .iter()
            .rev()
            .filter(|r| match before {
                Some(b) => r.id.parse::<u64>().is_ok_and(|n| n < b),
                None => true,
            })
            .filter(|r| match filter.since {
                Some(t) => r.at >= t,
                None => true,
            })
            .take(limit)
            .cloned()
            .collect())
    }

    async fn schedule_states(&self, keys: &[ScheduleKey]) -> Result<Vec<ScheduleState>> {
        let s = self.store();
        Ok(keys
            .iter()
            .map(|k| match s.schedules.get(k) {
                Some((st, _)) => st.clone(),
                None => ScheduleState::empty(k.clone()),
            })
            .collect())
    }

    async fn schedule_step(&self, key: &ScheduleKey, step: ScheduleStep) -> Result<StepAnswer> {
        let (answer, work) = self.schedule_step_now(key, step)?;
        if work {
            self.wakeups.work.notify_one();
        }
        Ok(answer)
    }

    async fn schedule_history(&self, key: &ScheduleKey, limit: usize) -> Result<Vec<SlotRecord>> {
        let s = self.store();
        Ok(s.schedules
            .get(key)
            .map(|(_, h)| h.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn set_schedule_paused(&self, key: &ScheduleKey, paused: bool) -> Result<()> {
        {
            let mut s = self.store();
            s.schedules
                .entry(key.clone())
                .or_insert_with(|| (ScheduleState::empty(key.clone()), Default::default()))
                .0
                .paused = paused;
        }
        self.wakeups.schedules.notify_one();
        Ok(())
    }

    async fn prune(&self, rules: &[PruneRule], limit: usize) -> Result<Pruned> {
        let mut s = self.store();
        let (due, more) = s.due(rules, limit);
        let mut pruned = Pruned {
            more,
            ..Default::default()
        };
        for seq in due {
            if let Some(row) = s.rows.remove(&seq) {
                s.by_id.remove(&row.task.id);
                pruned.add(&row.task.queue, row.task.state, 1);
            }
        }
        Ok(pruned)
    }

    async fn prune_slots(&self, key: &ScheduleKey, before: UnixMs) -> Result<u64> {
        let mut s = self.store();
        let Some((_, history)) = s.schedules.get_mut(key) else {
            return Ok(0);
        };
        // Newest first: the old ones are at the back; the newest always stays.
        let mut n = 0;
        while history.len() > 1 && history.back().is_some_and(|r| r.at < before) {
            history.pop_back();
            n += 1;
        }
        Ok(n)
    }

    async fn prune_flow(
        &self,
        queue: &QueueName,
        now_us: i64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        let mut s = self.store();
        let mut lapsed: Vec<(QueueName, String)> = s
            .rate_tat
            .iter()
            .filter(|((q, _), tat)| q == queue && **tat <= now_us)
            .map(|(k, _)| k.clone())
            .take(limit.saturating_add(1))
            .collect();
        let more = lapsed.len() > limit;
        lapsed.truncate(limit);
        for k in &lapsed {
            s.rate_tat.remove(k);
        }
        Ok((lapsed.len() as u64, more))
    }

    async fn prunable(&self, rules: &[PruneRule]) -> Result<Pruned> {
        let s = self.store();
        let mut pruned = Pruned::default();
        for seq in s.due(rules, usize::MAX).0 {
            let t = &s.rows[&seq].task;
            pruned.add(&t.queue, t.state, 1);
        }
        Ok(pruned)
    }
}

impl Store {
    /// The tasks `rules` make due, oldest finish first within each rule, at most `limit`;
    /// and whether more were due. (A map holds no index: it looks at every task.)
    fn due(&self, rules: &[PruneRule], limit: usize) -> (Vec<u64>, bool) {
        let now = now_ms();
        // Parents of a task that has not finished are kept (rule 13).
        let pinned: std::collections::HashSet<TaskId> = self
            .rows
            .values()
            .filter(|r| !r.task.state.is_terminal())
            .flat_map(|r| r.task.after.iter().copied())
            .collect();
        let mut out = Vec::new();
        for rule in rules {
            let mut found: Vec<(UnixMs, u64)> = self
                .rows
                .iter()
                .filter(|(_, r)| {
                    r.task.queue == rule.queue
                        && r.task.state == rule.state
                        && rule.state.is_terminal()
                        && r.task.finished_at.is_some_and(|f| f < rule.before)
                        && !pinned.contains(&r.task.id)
                        // A unique key held past the finish (rule 14) keeps its task.
                        && !matches!((r.task.finished_at, r.unique_for), (Some(f), Some(d)) if f + d > now)
                })
                .map(|(seq, r)| (r.task.finished_at.unwrap_or(0), *seq))
                .collect();
            found.sort_unstable();
            for (_, seq) in found {
                if out.len() == limit {
                    return (out, true);
                }
                out.push(seq);
            }
        }
        (out, false)
    }
}

impl MemoryBroker {
    /// [`Broker::schedule_step`] under the store's lock (rule 10); also whether a task was
    /// enqueued (the caller raises `work`).
    fn schedule_step_now(
        &self,
        key: &ScheduleKey,
        step: ScheduleStep,
    ) -> Result<(StepAnswer, bool)> {
        let now = now_ms();
        let mut s = self.store();
        let (mut state, mut history) = s
            .schedules
            .get(key)
            .cloned()
            .unwrap_or_else(|| (ScheduleState::empty(key.clone()), Default::default()));
        let (record, answer, work) = match state.plan(step, now) {
            Plan::Answer(answer) => return Ok((answer, false)),
            Plan::Begin => {
                s.schedules.insert(key.clone(), (state, history));
                return Ok((StepAnswer::Begun(true), false));
            }
            Plan::Manual(task) => {
                let e = s.add_task(task, now, Some(key.name.clone()), None)?;
                return Ok((StepAnswer::Manual { task: e.id }, true));
            }
            Plan::Record(record, answer) => (record, answer, false),
            Plan::Fire {
                slot,
                task,
                caught_up,
                overlap,
                node,
            } => {
                let live = |id: &TaskId| {
                    s.by_id
                        .get(id)
                        .and_then(|seq| s.rows.get(seq))
                        .is_some_and(|r| !r.task.state.is_terminal())
                };
                match overlap.filter(live) {
                    Some(prev) => {
                        let (record, answer) = state.overlapped(slot, prev, node, now);
                        (record, answer, false)
                    }
                    None => {
                        let e = s.add_task(task, now, Some(key.name.clone()), Some(slot))?;
                        let (record, answer) =
                            state.fired(slot, e.id, e.existing, caught_up, node, now);
                        (record, answer, !e.existing)
                    }
                }
            }
        };
        state.last = Some(record.clone());
        history.push_front(record);
        history.truncate(super::schedules::SLOT_HISTORY);
        s.schedules.insert(key.clone(), (state, history));
        Ok((answer, work))
    }
}

impl Store {
    /// Store one task, as `enqueue` does for each of its tasks, with the schedule and slot
    /// it runs for; a waiting or running task holding its unique key is answered instead.
    fn add_task(
        &mut self,
        task: NewTask,
        now: UnixMs,
        schedule: Option<String>,
        slot: Option<UnixMs>,
    ) -> Result<Enqueued> {
        let (payload, payload_b64) = crate::model::read_stored_payload(&task.payload)
            .map_err(|e| BrokerError::Storage(format!("task {}: {e}", task.id)))?;
        if self.by_id.contains_key(&task.id) {
            return Err(BrokerError::Conflict(format!(
                "task id {} is taken",
                task.id
            )));
        }
        if let Some(key) = &task.unique_key {
            if let Some(r) = self.unique_holder(&task.queue, key, None) {
                return Ok(Enqueued {
                    id: r.task.id,
                    state: r.task.state,
                    existing: true,
                    created_at: r.task.created_at,
                    run_at: r.task.run_at,
                });
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.insert(task.id, seq);
        self.rows.insert(
            seq,
            Row {
                task: TaskRecord {
                    id: task.id,
                    queue: task.queue,
                    state: TaskState::Queued,
                    payload,
                    args: task.args,
                    priority: task.priority,
                    unique_key: task.unique_key,
                    run_at: now,
                    attempts: 0,
                    created_at: now,
                    updated_at: now,
                    finished_at: None,
                    last_error: None,
                    cancel_requested: false,
                    node: None,
                    schedule,
                    slot,
                    after: Vec::new(),
                    expires_at: None,
                    payload_b64,
                },
                history: Vec::new(),
                result: None,
                token: 0,
                lease_expires: 0,
                pid: None,
                pid_start: None,
                started_at: None,
                flow_key: task.flow_key,
                rate_key: task.rate_key,
                blocked: 0,
                unique_for: task.unique_for,
            },
        );
        Ok(Enqueued {
            id: task.id,
            state: TaskState::Queued,
            existing: false,
            created_at: now,
            run_at: now,
        })
    }
}

impl MemoryBroker {
    /// [`Broker::finish`], applied at once (see the trait for the rules).
    fn finish_now(&self, lease: &Lease, mut attempt: AttemptRecord, next: Finish) -> Result<()> {
        let now = now_ms();
        // The result goes with the task (rule 12), not into the history.
        let result = attempt.result.take();
        let requeued = {
            let mut s = self.store();
            let r = s
                .row_mut(lease.task)
                .filter(|r| r.held_by(lease))
                .ok_or(BrokerError::LeaseLost(lease.task))?;
            // `started` counted the attempt if it was recorded.
            let counted = r.task.state == TaskState::Running;
            let cancel_requested = r.task.cancel_requested;
            let error = attempt.error.clone();
            if next != Finish::Release {
                r.history.push(attempt.clone());
            }
            // An operator's cancel outweighs a retry or a requeue.
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
            match (charged, counted) {
                (true, false) => r.task.attempts += 1,
                (false, true) => r.task.attempts = r.task.attempts.saturating_sub(1),
                _ => {}
            }
            let (state, finished) = match next {
                Finish::Succeeded => (TaskState::Succeeded, Some(now)),
                Finish::Retry { at } => {
                    r.task.run_at = at;
                    (TaskState::Retrying, None)
                }
                Finish::Failed => (TaskState::Failed, Some(now)),
                Finish::Cancelled => (TaskState::Cancelled, Some(now)),
                Finish::Requeue | Finish::Release => (TaskState::Queued, None),
            };
            r.task.state = state;
            r.task.finished_at = finished;
            if next == Finish::Succeeded {
                r.result = result;
            }
            match next {
                // A release records nothing: the last error stays what it was.
                Finish::Release => {}
                Finish::Succeeded => r.task.last_error = None,
                Finish::Cancelled if cancel_requested => {
                    r.task.last_error = Some("cancelled by an operator".into())
                }
                _ => r.task.last_error = error,
            }
            r.task.updated_at = now;
            r.task.cancel_requested = false;
            r.started_at = None;
            r.release();
            let unblocked = s.settle(now);
            unblocked
                || matches!(
                    next,
                    Finish::Requeue | Finish::Release | Finish::Retry { .. }
                )
        };
        if requeued {
            self.wakeups.work.notify_one();
        }
        Ok(())
    }
}
