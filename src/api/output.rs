//! The output streams, as Server-Sent Events: a task's (`GET /api/v1/tasks/{id}/output`) and
//! a queue's (`GET /api/v1/queues/{queue}/output`). Each event's `event:` names its kind,
//! `data:` is the [`crate::view::OutputEvent`] as JSON, and `id:` the follower's position,
//! which a reconnect gives back (`Last-Event-ID`, or `from=`) to resume without repeating or
//! losing output. The sessions themselves are [`crate::follow`]'s.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::{AppState, MAX_STREAMS, STREAM_KEEP_ALIVE};
use crate::follow::{FollowError, Position, QueueFollow, Session, TaskFollow, TaskRequest};
use crate::model::{QueueName, TaskId};
use crate::view::OutputEvent;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Until the task ends; otherwise what exists now.
    #[serde(default)]
    follow: bool,
    /// Begin with this run (`taskd show`'s numbering).
    attempt: Option<u32>,
    /// Resume after this position (an event's id), for clients that cannot set
    /// `Last-Event-ID`.
    from: Option<String>,
}

/// One open stream, counted in [`AppState::streams`] until it is dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(state: &AppState) -> Result<Slot, ApiError> {
        let open = state.streams.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = Slot(state.streams.clone());
        if open > MAX_STREAMS {
            drop(slot);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!("{MAX_STREAMS} output streams are open, the most this daemon serves; try again later"),
            )
            .with("limit", MAX_STREAMS));
        }
        Ok(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn sse_event(ev: &OutputEvent) -> Event {
    let mut e = Event::default()
        .event(ev.name())
        .data(serde_json::to_string(ev).unwrap_or_else(|_| "{}".into()));
    if let Some(id) = ev.id() {
        e = e.id(id);
    }
    e
}

/// The session as an SSE response; it ends when the session does, or says the daemon is
/// stopping when it drains.
fn respond(state: &AppState, session: Session, slot: Slot) -> Response {
    let draining = state.draining.clone();
    let stream = futures_util::stream::unfold(
        (session, slot, draining, false),
        |(mut session, slot, draining, said)| async move {
            if said {
                return None;
            }
            match session.next().await {
                Some(ev) => Some((
                    Ok::<Event, Infallible>(sse_event(&ev)),
                    (session, slot, draining, false),
                )),
                None if draining.is_cancelled() => {
                    let ev = OutputEvent::Notice {
                        task: None,
                        message: "the daemon is stopping; this stream ends".into(),
                    };
                    Some((Ok(sse_event(&ev)), (session, slot, draining, true)))
                }
                None => None,
            }
        },
    );
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(STREAM_KEEP_ALIVE))
        .into_response();
    // A reverse proxy must pass events on as they come.
    r.headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    r
}

fn parse_query(
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<OutputQuery, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    Ok(q)
}

/// `GET /api/v1/tasks/{id}/output`.
pub async fn task_output(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = parse_query(query)?;
    let id: TaskId = id
        .parse()
        .map_err(|e: String| ApiError::bad_request("bad_task_id", e))?;
    let from = match q.from.as_deref().or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
    }) {
        Some(p) => Some(
            Position::parse(p)
                .map_err(|e| ApiError::bad_request("bad_query", format!("from: {e}")))?,
        ),
        None => None,
    };
    if from == Some(Position::End) {
        // The follower had the end: nothing more will come (204 tells an EventSource to
        // stop reconnecting).
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let slot = Slot::take(&state)?;
    let req = TaskRequest {
        task: id,
        follow: q.follow,
        run: q.attempt,
        from,
    };
    let session = TaskFollow::open(state.follow.clone(), req, state.draining.child_token())
        .await
        .map_err(|e| match e {
            FollowError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "task_not_found", e.to_string())
            }
            FollowError::NoSuchRun { runs, .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "attempt_not_found", e.to_string())
                    .with("attempts", runs)
            }
            FollowError::Broker(b) => state.broker::<()>(Err(b)).unwrap_err(),
        })?;
    Ok(respond(&state, Session::Task(Box::new(session)), slot))
}

/// `GET /api/v1/queues/{queue}/output`.
pub async fn queue_output(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: Result<Query<QueueOutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(_) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let config = state.config();
    let q: QueueName = super::handlers::find_queue(&config, &queue)?.name.clone();
    let Some(live) = state.follow.live.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_live_output",
            "this API is served without a daemon: no task runs here",
        ));
    };
    let slot = Slot::take(&state)?;
    let session = QueueFollow::open(live, q, state.draining.child_token());
    Ok(respond(&state, Session::Queue(Box::new(session)), slot))
}

/// A queue's stream takes no parameters (unknown ones are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueOutputQuery {}
