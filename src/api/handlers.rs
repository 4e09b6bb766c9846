//! One function per endpoint. Each reads the request, asks the broker, and answers JSON;
//! errors are [`ApiError`]s.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::{audit, enqueue as parse, AppState, Who, BATCH_BODY_EXTRA};
use crate::audit::{Action, Actor, AuditEntry};
use crate::broker::ListFilter;
use crate::config::{Config, QueueConfig};
use crate::model::{QueueName, TaskId, TaskRecord, TaskState};
use crate::view;

const DASHBOARD: &str = include_str!("dashboard.html");
/// Most tasks one page of `GET /api/v1/tasks` returns.
const MAX_PAGE: usize = 1000;

/// Read a body of at most `limit` bytes; 413 past it.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over the limit of {limit} bytes (set by `max_payload` in [taskd])"),
        )
        .with("limit", limit)),
        Err(e) => Err(ApiError::bad_request(
            "bad_body",
            format!("failed to read the request body: {e}"),
        )),
    }
}

/// An error found before the request's body was read, answered once the body is read (up
/// to `limit`): answering first leaves the body unread, so the connection is closed under a
/// client that may still be sending it, and the client's next write fails with a broken
/// pipe instead of reading the answer (a submit to an unknown queue over a kept-alive
/// connection, say). Any answer does get up to 64 KiB of its body read (`api::unread`);
/// this reads a caller the guard let through as far as its request's own limit.
async fn refuse_after_body(body: Body, limit: usize, refusal: ApiError) -> ApiError {
    let _ = read_body(body, limit).await;
    refusal
}

/// The queue named in the path, from the config; 404 naming the known queues otherwise.
pub(super) fn find_queue<'a>(config: &'a Config, name: &str) -> Result<&'a QueueConfig, ApiError> {
    let known: Vec<String> = config.queues.keys().map(|q| q.to_string()).collect();
    let unknown = |why: String| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_queue", why).with("known", known.clone())
    };
    let q: QueueName = name
        .parse()
        .map_err(|e: String| unknown(format!("`{name}` is not a queue name: {e}")))?;
    config.queues.get(&q).ok_or_else(|| {
        unknown(format!(
            "unknown queue `{name}`; known queues: {}",
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

fn parse_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError::bad_request("bad_task_id", e))
}

async fn record(state: &AppState, id: TaskId) -> Result<TaskRecord, ApiError> {
    state
        .broker(state.broker.get(id).await)?
        .map(|d| d.task)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "task_not_found",
                format!("no task with id {id}"),
            )
        })
}

pub async fn dashboard() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        Html(DASHBOARD),
    )
        .into_response()
}

pub async fn healthz(State(state): State<AppState>) -> Result<Json<view::Health>, ApiError> {
    state.broker(state.broker.count_state(TaskState::Running).await)?;
    Ok(Json(view::Health { status: "ok" }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.broker.counts().await {
        Ok(c) => state.metrics.set_counts(&c),
        Err(e) => {
            state.metrics.broker_error();
            tracing::warn!(error = %e, "metrics: failed to read the queue counts");
        }
    }
    match state.broker.store_size().await {
        Ok(Some(size)) => state.metrics.set_store_bytes(size.bytes),
        Ok(None) => {}
        Err(e) => {
            state.metrics.broker_error();
            tracing::warn!(error = %e, "metrics: failed to read the store's size");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

pub async fn list_queues(State(state): State<AppState>) -> Result<Json<view::Overview>, ApiError> {
    let config = state.config();
    let counts = state.broker(state.broker.counts().await)?;
    let rows = crate::broker::queue_rows(config.queues.keys(), counts);
    let queues = view::QueueView::all(&rows, &config);
    // Long-lived workers live in the daemon, which keeps state_dir/workers.json current.
    let now = crate::model::now_ms();
    let workers = crate::worker::status::read_status(&config.state_dir)
        .filter(|f| f.daemon_pid == std::process::id())
        .map(|f| f.workers)
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            let rss = w.pid.and_then(crate::worker::status::rss_bytes);
            view::WorkerView::new(w, now, rss)
        })
        .collect();
    // The nodes sharing the broker (none for the embedded store).
    let nodes = state.broker(state.broker.nodes().await)?;
    Ok(Json(view::Overview {
        queues,
        workers,
        nodes,
    }))
}

fn created(existing: bool, task: TaskRecord) -> Response {
    let status = if existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, Json(view::EnqueuedTask { task, existing })).into_response()
}

pub async fn enqueue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let config = state.config();
    let limit = config.max_payload.saturating_mul(2) + 64 * 1024;
    let q = match find_queue(&config, &queue) {
        Ok(q) => q,
        Err(e) => return Err(refuse_after_body(body, limit, e).await),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let task = if parse::is_raw(content_type) {
        // A raw payload: the body is the payload, byte for byte.
        let bytes = read_body(body, config.max_payload).await?;
        parse::parse_raw(&config, q, &bytes, query.as_deref())?
    } else {
        // Room for the other fields and JSON escaping around the payload.
        let bytes = read_body(body, limit).await?;
        parse::parse_one(&config, q, &bytes)?
    };
    let name = task.queue.clone();
    let asked = task.clone();
    let enqueued = state.enqueued(state.broker.enqueue(vec![task]).await)?;
    let e = enqueued.first().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "broker_error",
            "the broker enqueued nothing",
        )
    })?;
    if !e.existing {
        state.metrics.enqueued(&name, 1);
    }
    // A task with parents may have been cancelled at once (a parent had failed): read back.
    if !e.existing && asked.after.is_empty() {
        // A new task's record is what was asked plus what the broker said: no read back.
        if let Ok((payload, payload_b64)) = crate::model::read_stored_payload(&asked.payload) {
            let task = crate::model::TaskRecord {
                id: e.id,
                queue: asked.queue,
                state: e.state,
                payload,
                payload_b64,
                args: asked.args,
                priority: asked.priority,
                unique_key: asked.unique_key,
                run_at: e.run_at,
                attempts: 0,
                created_at: e.created_at,
                updated_at: e.created_at,
                finished_at: None,
                last_error: None,
                cancel_requested: false,
                node: None,
                schedule: None,
                slot: None,
                after: asked.after,
                expires_at: asked.expires_at,
            };
            return Ok(created(false, task));
        }
    }
    let task = record(&state, e.id).await?;
    Ok(created(e.existing, task))
}

pub async fn enqueue_batch(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let config = state.config();
    let limit = config.max_payload.saturating_add(BATCH_BODY_EXTRA);
    let q = match find_queue(&config, &queue) {
        Ok(q) => q,
        Err(e) => return Err(refuse_after_body(body, limit, e).await),
    };
    let bytes = read_body(body, limit).await?;
    let tasks = parse::parse_batch(&config, q, &bytes)?;
    let n = tasks.len();
    let name = q.name.clone();
    let enqueued = state.enqueued(state.broker.enqueue(tasks).await)?;
    let fresh = enqueued.iter().filter(|e| !e.existing).count();
    state.metrics.enqueued(&name, fresh as u64);
    let ids: Vec<TaskId> = enqueued.iter().map(|e| e.id).collect();
    Ok((
        StatusCode::CREATED,
        Json(view::BatchEnqueued {
            enqueued: n,
            existing: n - fresh,
            ids,
        }),
    )
        .into_response())
}

pub async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::model::TaskDetail>, ApiError> {
    let id = parse_id(&id)?;
    let detail = state.broker(state.broker.get(id).await)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "task_not_found",
            format!("no task with id {id}"),
        )
    })?;
    Ok(Json(detail))
}

/// `GET /api/v1/tasks/{id}/why`: every reason the task is not running (`taskd why`). The
/// daemon serving this API serves the store; its workers are in its `workers.json`.
pub async fn why_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<view::WhyView>, ApiError> {
    let id = parse_id(&id)?;
    let config = state.config();
    let serving = crate::why::Serving {
        daemon: true,
        workers: crate::worker::status::read_status(&config.state_dir)
            .filter(|f| f.daemon_pid == std::process::id())
            .map(|f| f.workers)
            .unwrap_or_default(),
    };
    state
        .broker(crate::why::explain(&config, state.broker.as_ref(), id, &serving).await)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "task_not_found",
                format!("no task with id {id}"),
            )
        })
}

/// The conditions of a task listing, as `GET /api/v1/tasks` takes them in its query and
/// `POST /api/v1/tasks/bulk` in its `filter`.
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct FilterQuery {
    queue: Option<String>,
    state: Option<String>,
    /// Created at or after (ms since the epoch).
    since: Option<i64>,
    /// Created before (ms since the epoch).
    until: Option<i64>,
    id: Option<String>,
    unique_key: Option<String>,
    /// `FIELD = VALUE` (`user_id=42`, `payload.user.id = 42`).
    payload: Option<String>,
}

impl FilterQuery {
    /// The fields that are set, by name (times in ms since the epoch): a bulk operation's
    /// filter as its audit record keeps it.
    fn fields(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v.filter(|v| !v.trim().is_empty()) {
                out.insert(k.to_string(), v.trim().to_string());
            }
        };
        put("queue", self.queue.clone());
        put("state", self.state.clone());
        put("since", self.since.map(|t| t.to_string()));
        put("until", self.until.map(|t| t.to_string()));
        put("id", self.id.clone());
        put("unique_key", self.unique_key.clone());
        put("payload", self.payload.clone());
        out
    }

    /// The broker's filter; 400 naming the parameter that is wrong.
    fn to_filter(&self) -> Result<ListFilter, ApiError> {
        let bad =
            |what: &str, e: String| ApiError::bad_request("bad_query", format!("{what}: {e}"));
        let empty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(ListFilter {
            queue: empty(&self.queue)
                .map(|q| q.parse().map_err(|e| bad("queue", e)))
                .transpose()?,
            state: empty(&self.state)
                .map(|s| s.parse().map_err(|e| bad("state", e)))
                .transpose()?,
            limit: 0,
            since: self.since,
            until: self.until,
            id: empty(&self.id)
                .map(|i| i.parse().map_err(|e| bad("id", e)))
                .transpose()?,
            unique_key: empty(&self.unique_key),
            payload: empty(&self.payload)
                .map(|p| crate::broker::PayloadMatch::parse(&p).map_err(|e| bad("payload", e)))
                .transpose()?,
            after: None,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    queue: Option<String>,
    state: Option<String>,
    since: Option<String>,
    until: Option<String>,
    id: Option<String>,
    unique_key: Option<String>,
    payload: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Newest first, filtered by the broker. `cursor` is the `next_cursor` of the previous
/// page: the id of its last task; the next page holds the tasks older than it that match.
pub async fn list_tasks(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<view::TaskPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let ms = |what: &str, v: Option<String>| -> Result<Option<i64>, ApiError> {
        v.filter(|v| !v.is_empty())
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(
                        "bad_query",
                        format!("{what}: `{v}` is not a time in ms since the epoch"),
                    )
                })
            })
            .transpose()
    };
    let mut filter = FilterQuery {
        queue: query.queue,
        state: query.state,
        since: ms("since", query.since)?,
        until: ms("until", query.until)?,
        id: query.id,
        unique_key: query.unique_key,
        payload: query.payload,
    }
    .to_filter()?;
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    filter.after = query.cursor.as_deref().map(parse_id).transpose()?;
    // One more than a page tells whether another follows.
    filter.limit = limit + 1;
    let mut list = match state.broker.list(&filter).await {
        Err(crate::broker::BrokerError::NotFound(_)) if filter.after.is_some() => {
            return Err(ApiError::bad_request(
                "bad_cursor",
                "no task has the cursor's id (it was removed); start again without a cursor",
            ))
        }
        r => state.broker(r)?,
    };
    let more = list.len() > limit;
    list.truncate(limit);
    let next_cursor = more
        .then(|| list.last().map(|t| t.id.to_string()))
        .flatten();
    Ok(Json(view::TaskPage {
        tasks: list,
        next_cursor,
    }))
}

/// The most tasks one bulk operation acts on.
pub const MAX_BULK: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    action: view::BulkAction,
    #[serde(default)]
    filter: FilterQuery,
    /// Count only: change nothing.
    #[serde(default)]
    dry_run: bool,
    /// The count the operator confirmed: refused (409) when the filter now matches more.
    expect: Option<usize>,
}

impl BulkRequest {
    /// A bulk request's body as the API reads it, with the broker's filter it names; 400
    /// naming what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<(BulkRequest, ListFilter), ApiError> {
        let request: BulkRequest = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request("bad_body", format!("the bulk request: {e}")))?;
        let filter = request.filter.to_filter()?;
        Ok((request, filter))
    }
}

/// The tasks `filter` matches that `action` applies to, newest first (at most
/// [`MAX_BULK`] + 1, which tells that there are too many).
async fn bulk_targets(
    state: &AppState,
    action: view::BulkAction,
    filter: &ListFilter,
) -> Result<Vec<TaskRecord>, ApiError> {
    let applies: &[TaskState] = match action {
        view::BulkAction::Cancel => &[
            TaskState::Scheduled,
            TaskState::Queued,
            TaskState::Running,
            TaskState::Retrying,
        ],
        view::BulkAction::Retry => &[TaskState::Failed, TaskState::Cancelled],
    };
    let mut out = Vec::new();
    for s in applies {
        if filter.state.is_some_and(|f| f != *s) {
            continue;
        }
        let mut f = filter.clone();
        f.state = Some(*s);
        f.limit = MAX_BULK + 1 - out.len();
        out.extend(state.broker(state.broker.list(&f).await)?);
        if out.len() > MAX_BULK {
            break;
        }
    }
    Ok(out)
}

/// Retry or cancel every task a filter matches (those the action applies to), after the
/// operator saw the count (`dry_run`, then `expect`).
pub async fn bulk(
    State(state): State<AppState>,
    Who(who): Who,
    body: Body,
) -> Result<Json<view::BulkView>, ApiError> {
    let bytes = read_body(body, 64 * 1024).await?;
    let (req, filter) = BulkRequest::parse(&bytes)?;
    let targets = bulk_targets(&state, req.action, &filter).await?;
    if targets.len() > MAX_BULK {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many",
            format!("the filter matches more than {MAX_BULK} tasks, the most one bulk operation changes; narrow it (queue, state, time range) and repeat"),
        )
        .with("limit", MAX_BULK));
    }
    let matched = targets.len();
    if let Some(expect) = req.expect {
        if matched > expect {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "count_changed",
                format!("the filter now matches {matched} tasks, more than the {expect} confirmed; confirm the new count"),
            )
            .with("matched", matched));
        }
    }
    let mut answer = view::BulkView {
        action: req.action,
        dry_run: req.dry_run,
        matched,
        done: 0,
        skipped: 0,
        errors: Vec::new(),
    };
    if req.dry_run {
        return Ok(Json(answer));
    }
    for t in &targets {
        let r = match req.action {
            view::BulkAction::Cancel => state
                .broker
                .cancel(t.id)
                .await
                .map(|o| !matches!(o, crate::broker::CancelOutcome::AlreadyFinished(_))),
            view::BulkAction::Retry => match state.broker.retry(t.id).await {
                Ok(()) => Ok(true),
                // Retried by someone else meanwhile, or gone: nothing to do.
                Err(crate::broker::BrokerError::Conflict(_))
                    if still_waiting(&state, t.id).await =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(true) => answer.done += 1,
            Ok(false) | Err(crate::broker::BrokerError::NotFound(_)) => answer.skipped += 1,
            Err(e) => {
                if matches!(
                    e,
                    crate::broker::BrokerError::Unavailable(_)
                        | crate::broker::BrokerError::Storage(_)
                        | crate::broker::BrokerError::Full(_)
                ) {
                    state.metrics.broker_error();
                }
                if answer.errors.len() < 100 {
                    answer.errors.push(view::BulkFailure {
                        id: t.id,
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    record_bulk_operation(&state, who, &req.filter, &answer).await;
    Ok(Json(answer))
}

/// Whether task `id` is waiting or running now (a retry that found it so was beaten to it).
async fn still_waiting(state: &AppState, id: TaskId) -> bool {
    matches!(state.broker.get(id).await, Ok(Some(d)) if !d.task.state.is_terminal())
}

/// The one place a bulk operation is recorded once it has run: one audit record for the
/// whole operation (never one per task), with the filter that was asked and how many tasks
/// it changed; and a line in the daemon's log. A dry run changes nothing and is not
/// recorded. `refused` when the store refused every task it was asked to change.
async fn record_bulk_operation(
    state: &AppState,
    who: Actor,
    filter: &FilterQuery,
    answer: &view::BulkView,
) {
    tracing::info!(
        action = ?answer.action,
        filter = ?filter,
        matched = answer.matched,
        done = answer.done,
        skipped = answer.skipped,
        failed = answer.errors.len(),
        who = %who,
        "bulk operation through the API"
    );
    let (action, verb) = match answer.action {
        view::BulkAction::Retry => (Action::BulkRetry, "queued again"),
        view::BulkAction::Cancel => (Action::BulkCancel, "cancelled or asked to stop"),
    };
    let failed = answer.errors.len();
    let mut detail = format!("{} of {} tasks {verb}", answer.done, answer.matched);
    if answer.skipped > 0 {
        detail.push_str(&format!("; {} had moved on meanwhile", answer.skipped));
    }
    if failed > 0 {
        detail.push_str(&format!(
            "; refused for {failed}: {}",
            answer
                .errors
                .first()
                .map(|f| f.error.as_str())
                .unwrap_or("")
        ));
    }
    let entry = AuditEntry::bulk(who, action, filter.fields(), answer.done as u64);
    let entry = if answer.done == 0 && failed > 0 {
        entry.refused(detail)
    } else {
        entry.ok(detail)
    };
    audit::record(state, entry).await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    window: Option<String>,
    queue: Option<String>,
}

/// Finished attempts per bucket over the last hour (60 one-minute buckets) or day (96 of
/// 15 minutes), from the counters in the broker.
pub async fn stats(
    State(state): State<AppState>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<view::StatsView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let window = query.window.unwrap_or_else(|| "1h".to_string());
    let (bucket_ms, n): (i64, i64) = match window.as_str() {
        "1h" => (60_000, 60),
        "24h" => (15 * 60_000, 96),
        other => {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("window: `{other}` is not a window; use 1h or 24h"),
            ))
        }
    };
    let queue: Option<QueueName> = match query.queue.as_deref().filter(|q| !q.is_empty()) {
        Some(q) => Some(
            q.parse()
                .map_err(|e: String| ApiError::bad_request("bad_query", format!("queue: {e}")))?,
        ),
        None => None,
    };
    let now = crate::model::now_ms();
    let to = (now.div_euclid(bucket_ms) + 1) * bucket_ms;
    let from = to - n * bucket_ms;
    let rows = state.broker(state.broker.stats(from).await)?;
    let rows: Vec<&crate::broker::StatRow> = rows
        .iter()
        .filter(|r| queue.as_ref().is_none_or(|q| &r.queue == q))
        .filter(|r| r.minute * 60_000 >= from && r.minute * 60_000 < to)
        .collect();
    let buckets = (0..n)
        .map(|i| {
            let start = from + i * bucket_ms;
            view::StatBucket::sum(
                start,
                rows.iter()
                    .copied()
                    .filter(|r| (r.minute * 60_000 - start).div_euclid(bucket_ms) == 0),
            )
        })
        .collect();
    Ok(Json(view::StatsView {
        window,
        queue: queue.map(|q| q.to_string()),
        bucket_s: (bucket_ms / 1000) as u64,
        from,
        to,
        buckets,
        total: view::StatBucket::sum(from, rows.iter().copied()),
    }))
}

pub async fn retry(
    State(state): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>, ApiError> {
    let id = parse_id(&id)?;
    let entry = AuditEntry::new(who, Action::Retry).task(id);
    if let Err(e) = state.broker.retry(id).await {
        if let Some(refused) = crate::broker::refusal(state.broker.as_ref(), entry, id, &e).await {
            audit::record(&state, refused).await;
        }
        return Err(state.broker_error(e));
    }
    let task = record(&state, id).await;
    let entry = entry.ok("queued again with a fresh attempt budget");
    audit::record(
        &state,
        match &task {
            Ok(t) => entry.queue(t.queue.clone()),
            Err(_) => entry,
        },
    )
    .await;
    Ok(Json(task?))
}

pub async fn cancel(
    State(state): State<AppState>,
    Who(who): Who,
    Path(id): Path<String>,
) -> Result<Json<view::CancelView>, ApiError> {
    let id = parse_id(&id)?;
    let entry = AuditEntry::new(who, Action::Cancel).task(id);
    let outcome = match state.broker.cancel(id).await {
        Ok(o) => o,
        Err(e) => {
            if let Some(refused) =
                crate::broker::refusal(state.broker.as_ref(), entry, id, &e).await
            {
                audit::record(&state, refused).await;
            }
            return Err(state.broker_error(e));
        }
    };
    let task = record(&state, id).await;
    let entry = outcome.audited(entry);
    audit::record(
        &state,
        match &task {
            Ok(t) => entry.queue(t.queue.clone()),
            Err(_) => entry,
        },
    )
    .await;
    Ok(Json(view::CancelView {
        outcome,
        task: task?,
    }))
}

async fn set_paused(
    state: &AppState,
    who: Actor,
    queue: &str,
    paused: bool,
) -> Result<Json<view::PauseView>, ApiError> {
    let config = state.config();
    let q = find_queue(&config, queue)?;
    state.broker(state.broker.set_paused(&q.name, paused).await)?;
    let (action, detail) = if paused {
        (Action::Pause, "paused: no task starts until it is resumed")
    } else {
        (Action::Resume, "resumed")
    };
    audit::record(
        state,
        AuditEntry::new(who, action)
            .queue(q.name.clone())
            .ok(detail),
    )
    .await;
    Ok(Json(view::PauseView {
        queue: q.name.clone(),
        paused,
    }))
}

pub async fn pause(
    State(state): State<AppState>,
    Who(who): Who,
    Path(queue): Path<String>,
) -> Result<Json<view::PauseView>, ApiError> {
    set_paused(&state, who, &queue, true).await
}

pub async fn resume(
    State(state): State<AppState>,
    Who(who): Who,
    Path(queue): Path<String>,
) -> Result<Json<view::PauseView>, ApiError> {
    set_paused(&state, who, &queue, false).await
}

/// Restarts a `worker` queue's long-lived workers one at a time (as `taskd restart`): 202
/// with what restarts; 404 for an unknown queue, 409 for a queue without workers. The
/// daemon records it in the audit trail, as it does a restart asked on its socket.
pub async fn restart(
    State(state): State<AppState>,
    Who(who): Who,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    let config = state.config();
    let q = find_queue(&config, &queue)?;
    if q.worker().is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_a_worker_queue",
            format!("queue `{}` runs a new process per task (`command` or `shell`), not long-lived workers: its next task already runs the new code; nothing to restart", q.name),
        ));
    }
    let reply = state
        .ask_daemon(
            crate::control::Request::Restart {
                queue: q.name.to_string(),
            },
            who,
        )
        .await
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "daemon_unavailable",
                "the daemon did not take the request (it is stopping); try again once it runs"
                    .to_string(),
            )
        })?;
    if !reply.ok {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_restarted",
            reply.errors.join("; "),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(view::RestartView {
            queue: q.name.clone(),
            restarting: true,
            message: reply.changes.join("; "),
        }),
    )
        .into_response())
}
