//! The audit trail over HTTP: `GET /api/v1/audit`, and [`record`], which every handler that
//! changes something calls once the change is made.
//!
//! Who made a request is in its extensions: the guard (`super::guard`) puts the name of
//! the token it carried and the client's address there for every request it lets through.
//! A handler that records a change takes its [`crate::audit::Actor`] with `Who(who): Who`
//! (`super::Who`), which looks a Unix peer's uid up in the user database then, not on every
//! request.
//!
//! **Bulk operations** record one entry for the whole operation, never one per task:
//!
//! ```ignore
//! let filter = BTreeMap::from([("queue".into(), "emails".into()), ("state".into(), "failed".into())]);
//! let entry = AuditEntry::bulk(who, Action::BulkRetry, filter, retried)
//!     .ok(format!("{retried} of {matched} tasks queued again"));
//! api::audit::record(&state, entry).await;
//! ```

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::audit::{AuditEntry, AuditFilter};
use crate::view;

/// Most records one page of `GET /api/v1/audit` returns.
const MAX_PAGE: usize = 1000;

/// Records `entry` in the broker's audit trail (kept to `audit_keep` records). The change
/// it describes is already made and stays made if the store cannot take the record: that
/// is logged at warn, with everything the record said, and counted as a broker error.
pub async fn record(state: &AppState, entry: AuditEntry) {
    let keep = state.config().audit_keep;
    if let Err(e) = state.broker.audit(&entry, keep).await {
        state.metrics.broker_error();
        tracing::warn!(
            error = %e,
            action = %entry.action,
            who = %entry.actor,
            target = %entry.target(),
            outcome = %entry.outcome,
            detail = %entry.detail,
            "could not write the audit record of a change made through the API"
        );
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    since: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/audit?since=&limit=&cursor=`: the trail, newest first, a page at a time.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<view::AuditPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let since = query
        .since
        .as_deref()
        .map(|s| crate::audit::parse_since(s, crate::model::now_ms()))
        .transpose()
        .map_err(|e| ApiError::bad_request("bad_query", format!("since: {e}")))?;
    if let Some(c) = &query.cursor {
        if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_digit() || ch == '-') {
            return Err(ApiError::bad_request(
                "bad_cursor",
                format!("`{c}` is not an audit cursor: pass back the `next_cursor` of a page"),
            ));
        }
    }
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let read = state
        .broker
        .audit_log(&AuditFilter {
            since,
            before: query.cursor.clone(),
            limit: limit + 1,
        })
        .await;
    let mut records = match read {
        // The one thing a read of the trail refuses: a cursor this store never gave.
        Err(crate::broker::BrokerError::Conflict(why)) => {
            return Err(ApiError::bad_request("bad_cursor", why))
        }
        r => state.broker(r)?,
    };
    let more = records.len() > limit;
    records.truncate(limit);
    let next_cursor = more.then(|| records.last().map(|r| r.id.clone())).flatten();
    Ok(Json(view::AuditPage {
        records: records.into_iter().map(view::AuditView::from).collect(),
        next_cursor,
    }))
}
