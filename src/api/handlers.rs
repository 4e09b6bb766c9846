//! One function per endpoint. Each reads the request, asks the broker, and answers JSON;
//! errors are [`ApiError`]s.

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::{audit, enqueue as parse, AppState, BATCH_BODY_EXTRA};
use crate::audit::{Action, Actor, AuditEntry};
use crate::broker::{BrokerError, ListFilter};
use crate::config::{Config, QueueConfig};
use crate::model::{QueueName, TaskId, TaskRecord, TaskState};
use crate::view;

const DASHBOARD: &str = include_str!("dashboard.html");
/// Most tasks one page of `GET /api/v1/tasks` returns.
const MAX_PAGE: usize = 1000;
/// How far into a listing a cursor may point (the broker lists newest first by count).
const MAX_SCAN: usize = 200_000;

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

/// The queue named in the path, from the config; 404 naming the known queues otherwise.
fn find_queue<'a>(config: &'a Config, name: &str) -> Result<&'a QueueConfig, ApiError> {
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
    let queues: Vec<view::QueueView> = crate::broker::queue_rows(config.queues.keys(), counts)
        .iter()
        .map(|(name, r)| {
            let concurrency = name
                .parse::<QueueName>()
                .ok()
                .and_then(|q| config.queues.get(&q).map(|c| c.concurrency));
            view::QueueView::new(name, r, concurrency)
        })
        .collect();
    // Long-lived workers live in the daemon, which keeps state_dir/workers.json current.
    let now = crate::model::now_ms();
    let workers = crate::worker::status::read_status(&config.state_dir)
        .filter(|f| f.daemon_pid == std::process::id())
        .map(|f| f.workers)
        .unwrap_or_default()
        .into_iter()
        .map(|w| view::WorkerView::new(w, now))
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
    body: Body,
) -> Result<Response, ApiError> {
    let config = state.config();
    let q = find_queue(&config, &queue)?;
    // Room for the other fields and JSON escaping around the payload.
    let bytes = read_body(body, config.max_payload.saturating_mul(2) + 64 * 1024).await?;
    let task = parse::parse_one(&config, q, &bytes)?;
    let name = task.queue.clone();
    let asked = task.clone();
    let enqueued = state.broker(state.broker.enqueue(vec![task]).await)?;
    let e = enqueued.first().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "broker_error",
            "the broker enqueued nothing",
        )
    })?;
    if !e.existing {
        state.metrics.enqueued(&name, 1);
        // A new task's record is what was asked plus what the broker said: no read back.
        if let Ok(payload) = serde_json::from_str(&asked.payload) {
            let task = crate::model::TaskRecord {
                id: e.id,
                queue: asked.queue,
                state: e.state,
                payload,
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
    let q = find_queue(&config, &queue)?;
    let bytes = read_body(body, config.max_payload.saturating_add(BATCH_BODY_EXTRA)).await?;
    let tasks = parse::parse_batch(&config, q, &bytes)?;
    let n = tasks.len();
    let name = q.name.clone();
    let enqueued = state.broker(state.broker.enqueue(tasks).await)?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    queue: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Newest first. `cursor` is the `next_cursor` of the previous page: the id of its last
/// task. A cursor whose task has since left the filter (it changed state) is refused.
pub async fn list_tasks(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<view::TaskPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let queue: Option<QueueName> = match &query.queue {
        Some(q) => Some(
            q.parse()
                .map_err(|e: String| ApiError::bad_request("bad_query", format!("queue: {e}")))?,
        ),
        None => None,
    };
    let task_state: Option<TaskState> = match &query.state {
        Some(s) => Some(
            s.parse()
                .map_err(|e: String| ApiError::bad_request("bad_query", format!("state: {e}")))?,
        ),
        None => None,
    };
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let cursor = query.cursor.as_deref().map(parse_id).transpose()?;
    // The broker lists newest first with a limit; a page after a cursor is found by listing
    // far enough to see it. (O(depth); fine for a dashboard and scripts.)
    let mut fetch = (limit + 1) * 4;
    loop {
        let list = state.broker(
            state
                .broker
                .list(&ListFilter {
                    queue: queue.clone(),
                    state: task_state,
                    limit: fetch,
                })
                .await,
        )?;
        let exhausted = list.len() < fetch;
        let start = match cursor {
            None => Some(0),
            Some(c) => list.iter().position(|t| t.id == c).map(|i| i + 1),
        };
        match start {
            Some(s) if exhausted || list.len() > s + limit => {
                let more = list.len() > s + limit;
                let page: Vec<TaskRecord> = list.into_iter().skip(s).take(limit).collect();
                let next_cursor = more
                    .then(|| page.last().map(|t| t.id.to_string()))
                    .flatten();
                return Ok(Json(view::TaskPage {
                    tasks: page,
                    next_cursor,
                }));
            }
            None if exhausted => {
                return Err(ApiError::bad_request(
                    "bad_cursor",
                    "the cursor's task is no longer in this listing (it changed state or was removed); start again without a cursor",
                ))
            }
            _ if fetch >= MAX_SCAN => {
                return Err(ApiError::bad_request(
                    "cursor_too_deep",
                    format!("the cursor is more than {MAX_SCAN} tasks deep; narrow the listing with `queue` or `state`"),
                ))
            }
            _ => fetch = (fetch * 4).min(MAX_SCAN),
        }
    }
}

/// The audit record of a change to task `id` the broker refused (no such task, a state the
/// action does not apply to), with the task's queue when it exists; `None` for a failure
/// of the store itself, which could not take a record either.
async fn refusal(
    state: &AppState,
    entry: AuditEntry,
    id: TaskId,
    e: &BrokerError,
) -> Option<AuditEntry> {
    let entry = entry.refused(e.to_string());
    match e {
        BrokerError::NotFound(_) => Some(entry),
        BrokerError::Conflict(_) => Some(match state.broker.get(id).await {
            Ok(Some(d)) => entry.queue(d.task.queue),
            _ => entry,
        }),
        _ => None,
    }
}

pub async fn retry(
    State(state): State<AppState>,
    Extension(who): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>, ApiError> {
    let id = parse_id(&id)?;
    let entry = AuditEntry::new(who, Action::Retry).task(id);
    if let Err(e) = state.broker.retry(id).await {
        if let Some(refused) = refusal(&state, entry, id, &e).await {
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
    Extension(who): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<view::CancelView>, ApiError> {
    let id = parse_id(&id)?;
    let entry = AuditEntry::new(who, Action::Cancel).task(id);
    let outcome = match state.broker.cancel(id).await {
        Ok(o) => o,
        Err(e) => {
            if let Some(refused) = refusal(&state, entry, id, &e).await {
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
    Extension(who): Extension<Actor>,
    Path(queue): Path<String>,
) -> Result<Json<view::PauseView>, ApiError> {
    set_paused(&state, who, &queue, true).await
}

pub async fn resume(
    State(state): State<AppState>,
    Extension(who): Extension<Actor>,
    Path(queue): Path<String>,
) -> Result<Json<view::PauseView>, ApiError> {
    set_paused(&state, who, &queue, false).await
}

/// Restarts a `worker` queue's long-lived workers one at a time (as `taskd restart`): 202
/// with what restarts; 404 for an unknown queue, 409 for a queue without workers. The
/// daemon records it in the audit trail, as it does a restart asked on its socket.
pub async fn restart(
    State(state): State<AppState>,
    Extension(who): Extension<Actor>,
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
