//! `/api/v1/schedules`: the config's schedules with their records in the broker, one
//! schedule's slot records, and fire, pause and resume, as `taskd schedules` does them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::{audit, AppState, Who};
use crate::audit::{Action, Actor, AuditEntry};
use crate::broker::schedules::{states_with_tasks, task_states};
use crate::broker::{ScheduleKey, ScheduleStep, StepAnswer};
use crate::config::{Config, ScheduleConfig};
use crate::model::now_ms;
use crate::view;

/// The most slot records one `GET /api/v1/schedules/{name}` returns.
const MAX_HISTORY: usize = 500;

fn key(schedule: &ScheduleConfig) -> ScheduleKey {
    ScheduleKey {
        name: schedule.name.clone(),
        queue: schedule.queue.clone(),
    }
}

/// The schedule named in the path; 404 naming the known ones otherwise.
fn find<'a>(config: &'a Config, name: &str) -> Result<&'a ScheduleConfig, ApiError> {
    config.schedules.get(name).map(|s| &**s).ok_or_else(|| {
        let known: Vec<String> = config.schedules.keys().cloned().collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_schedule",
            format!(
                "unknown schedule `{name}`; known schedules: {}",
                if known.is_empty() {
                    "(none)".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
        .with("known", known)
    })
}

pub async fn list(State(state): State<AppState>) -> Result<Json<view::Schedules>, ApiError> {
    let config = state.config();
    let keys: Vec<ScheduleKey> = config.schedules.values().map(|s| key(s)).collect();
    let states = state.broker(states_with_tasks(state.broker.as_ref(), &keys).await)?;
    let now = now_ms();
    Ok(Json(view::Schedules {
        schedules: config
            .schedules
            .values()
            .zip(&states)
            .map(|(cfg, (st, ts))| view::ScheduleView::new(cfg, st, *ts, now))
            .collect(),
    }))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<usize>,
}

pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<view::ScheduleDetail>, ApiError> {
    let config = state.config();
    let cfg = find(&config, &name)?;
    let k = key(cfg);
    let (st, ts) = state
        .broker(states_with_tasks(state.broker.as_ref(), std::slice::from_ref(&k)).await)?
        .remove(0);
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_HISTORY);
    let records = state.broker(state.broker.schedule_history(&k, limit).await)?;
    let states = state.broker(task_states(state.broker.as_ref(), &records).await)?;
    Ok(Json(view::ScheduleDetail {
        schedule: view::ScheduleView::new(cfg, &st, ts, now_ms()),
        history: records
            .iter()
            .zip(states)
            .map(|(r, s)| view::SlotView::new(r, s))
            .collect(),
    }))
}

/// Enqueue the schedule's task now (no slot): 201 with the task. Recorded in the audit
/// trail (`schedule_fire`, with the task's id); an unknown name is refused before anything
/// is attempted and is not.
pub async fn fire(
    State(state): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let config = state.config();
    let cfg = find(&config, &name)?;
    let answer = state.broker(
        state
            .broker
            .schedule_step(&key(cfg), ScheduleStep::Manual { task: cfg.task() })
            .await,
    )?;
    let StepAnswer::Manual { task: id } = answer else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "broker_error",
            format!("the broker answered {answer:?} to a manual fire"),
        ));
    };
    state.metrics.enqueued(&cfg.queue, 1);
    audit::record(
        &state,
        AuditEntry::new(who, Action::ScheduleFire)
            .schedule(cfg.name.clone())
            .queue(cfg.queue.clone())
            .task(id)
            .ok("enqueued now, outside its slots"),
    )
    .await;
    let task = state
        .broker(state.broker.get(id).await)?
        .map(|d| d.task)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "broker_error",
                format!("task {id} vanished"),
            )
        })?;
    Ok((
        StatusCode::CREATED,
        Json(view::ScheduleFired {
            schedule: cfg.name.clone(),
            task,
        }),
    )
        .into_response())
}

async fn set_paused(
    state: &AppState,
    who: Actor,
    name: &str,
    paused: bool,
) -> Result<Json<view::SchedulePaused>, ApiError> {
    let config = state.config();
    let cfg = find(&config, name)?;
    state.broker(state.broker.set_schedule_paused(&key(cfg), paused).await)?;
    let entry = AuditEntry::schedule_paused(
        who,
        &cfg.name,
        cfg.queue.clone(),
        paused,
        cfg.missed.as_str(),
    );
    audit::record(state, entry).await;
    Ok(Json(view::SchedulePaused {
        schedule: cfg.name.clone(),
        paused,
    }))
}

pub async fn pause(
    State(state): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<view::SchedulePaused>, ApiError> {
    set_paused(&state, who, &name, true).await
}

pub async fn resume(
    State(state): State<AppState>,
    Who(who): Who,
    Path(name): Path<String>,
) -> Result<Json<view::SchedulePaused>, ApiError> {
    set_paused(&state, who, &name, false).await
}
