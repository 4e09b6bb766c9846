//! What every submitted task must be, whoever submits it (`taskd submit`, the HTTP API):
//! a payload that is well-formed JSON within `max_payload` and, with the task's extra args,
//! makes a task the queue can start (`config::runnable`), and a delay or run-at time that
//! reads as one. One definition, so that the
//! CLI and the API refuse the same tasks with the same words.
//!
//! It sees the model and the config only; it never touches the broker (the caller enqueues).

use std::time::Duration;

use crate::config::{flow, runnable, Config, QueueConfig};
use crate::model::{now_ms, NewTask, UnixMs};

/// "30s", "5m", "1h 30m" from now, as a run-at time. The error starts with the value.
pub fn parse_delay(text: &str) -> Result<UnixMs, String> {
    let parsed: Duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e} (write it like \"30s\", \"5m\" or \"1h 30m\")"))?;
    // Refuse what no calendar needs: a delay past 100 years is a typo, and would
    // overflow the millisecond clock further on.
    if parsed > Duration::from_secs(100 * 366 * 24 * 3600) {
        return Err(format!("{text:?}: more than 100 years is surely a mistake"));
    }
    Ok(now_ms() + parsed.as_millis() as i64)
}

/// A duration (`--unique-for`, `unique_for`) in ms: "10m", "1h 30m". The error starts with
/// the value.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let parsed: Duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e} (write it like \"30s\", \"10m\" or \"1h 30m\")"))?;
    if parsed > Duration::from_secs(100 * 366 * 24 * 3600) {
        return Err(format!("{text:?}: more than 100 years is surely a mistake"));
    }
    Ok(parsed.as_millis() as i64)
}

/// When a task expires (`--expires`, `expires`, else the queue's `expires`): `text` is a
/// duration counted from the task's run-at (now when it has none: "30m") or a time (RFC
/// 3339, or Unix seconds). The error starts with the value.
pub fn expires_at(
    queue: &QueueConfig,
    run_at: Option<UnixMs>,
    text: Option<&str>,
) -> Result<Option<UnixMs>, String> {
    let from = run_at.unwrap_or_else(now_ms);
    match text {
        None => Ok(queue.expires.map(|d| from + d.as_millis() as i64)),
        Some(t) => match parse_duration_ms(t) {
            Ok(ms) => Ok(Some(from + ms)),
            Err(_) => parse_at(t).map(Some).map_err(|_| {
                format!("{t:?}: neither a duration (\"30m\", \"1h\") nor a time (RFC 3339, e.g. 2026-12-01T03:00:00Z, or Unix seconds)")
            }),
        },
    }
}

/// The parents a task runs after (`--after`, `after`): task ids. The error names the value.
pub fn parse_parents(ids: &[String]) -> Result<Vec<crate::model::TaskId>, String> {
    ids.iter().map(|id| id.parse()).collect()
}

/// The refusal of a task whose parent does not exist (broker rule 13).
pub fn unknown_parent(id: crate::model::TaskId) -> String {
    format!("after: no task with id {id}: a task can only run after a task already submitted")
}

/// An RFC 3339 time or Unix seconds, as a run-at time. The error starts with the value.
pub fn parse_at(text: &str) -> Result<UnixMs, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return match secs.checked_mul(1000) {
            Some(ms) if (0..=253_402_300_799_000).contains(&ms) => Ok(ms),
            _ => Err(format!(
                "{text}: Unix seconds must be between 0 and the year 9999"
            )),
        };
    }
    let when = humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{text:?}: {e} (write it like 2026-12-01T03:00:00Z, or as Unix seconds)")
    })?;
    let ms = when
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_millis() as i64;
    Ok(ms)
}

/// Why a payload was refused; the API answers each kind with its own status.
#[derive(Debug)]
pub enum PayloadError {
    /// Over `max_payload`.
    TooLarge(String),
    /// Not JSON (or nested deeper than the parser goes).
    Malformed(String),
    /// JSON, but no task the queue can run ([`runnable::argv`]).
    Invalid(String),
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::TooLarge(m) | PayloadError::Malformed(m) | PayloadError::Invalid(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Validate a task for `queue`: a payload of well-formed JSON within the size limit, which
/// with the extra `args` makes a task the queue can start ([`runnable::argv`]: placeholders
/// filled, no value read as an option, no NUL a process cannot receive, argv within the
/// kernel's limits). Returns the payload's compact JSON text to store.
pub fn parse_payload(
    config: &Config,
    queue: &QueueConfig,
    text: &str,
    args: &[String],
) -> Result<String, PayloadError> {
    too_large(config, text.len())?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let offset = byte_offset(text, e.line(), e.column());
        PayloadError::Malformed(format!(
            "malformed JSON payload at byte {offset} (line {}, column {}): {}",
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        ))
    })?;
    check_runnable(queue, &value, args)?;
    Ok(value.to_string())
}

/// [`parse_payload`] for a payload made as a JSON value (`text` is its serialization): the
/// same checks without reading the text back. Returns the text to store.
pub fn check_payload_value(
    config: &Config,
    queue: &QueueConfig,
    value: &serde_json::Value,
    text: String,
) -> Result<String, PayloadError> {
    too_large(config, text.len())?;
    check_runnable(queue, value, &[])?;
    Ok(text)
}

/// A JSON payload of `len` bytes over `max_payload`: refused, saying how to raise it.
fn too_large(config: &Config, len: usize) -> Result<(), PayloadError> {
    if len > config.max_payload {
        return Err(PayloadError::TooLarge(format!(
            "the payload is {len} bytes, over the limit of {} bytes (raise `max_payload` in [taskd] of {})",
            config.max_payload,
            config.path.display()
        )));
    }
    Ok(())
}

/// Whether `queue` can start a task of this payload: its placeholders filled, its flow keys
/// read.
fn check_runnable(
    queue: &QueueConfig,
    value: &serde_json::Value,
    args: &[String],
) -> Result<(), PayloadError> {
    runnable::argv(queue, value, args)
        .map_err(|e| PayloadError::Invalid(format!("queue `{}`: {e}", queue.name)))?;
    flow::keys(queue, value).map_err(PayloadError::Invalid)?;
    Ok(())
}

/// Validate a raw payload (bytes, not JSON: `submit --raw`, the API's
/// `application/octet-stream` body) for `queue`: within `max_payload`, and for a queue that
/// takes its task's data from the payload's fields nowhere else: `{field}` placeholders in its
/// command, `$TASKD_ARG_<field>` in its script, or a `concurrency_key`/`rate_key` filled from
/// the payload need a JSON object, so such a queue refuses raw payloads. Returns the text
/// to store ([`crate::model::raw_payload_text`]).
pub fn parse_raw_payload(
    config: &Config,
    queue: &QueueConfig,
    bytes: &[u8],
    args: &[String],
) -> Result<String, PayloadError> {
    if bytes.len() > config.max_payload {
        return Err(PayloadError::TooLarge(format!(
            "the raw payload is {} bytes, over the limit of {} bytes (raise `max_payload` in [taskd] of {})",
            bytes.len(),
            config.max_payload,
            config.path.display()
        )));
    }
    if let Some(why) = runnable::reads_payload_fields(queue) {
        return Err(PayloadError::Invalid(format!(
            "queue `{}` {why}, which needs a JSON object payload: a raw payload has no fields;              send JSON, or let the program read the bytes on stdin",
            queue.name
        )));
    }
    runnable::argv(queue, &serde_json::Value::Null, args)
        .map_err(|e| PayloadError::Invalid(format!("queue `{}`: {e}", queue.name)))?;
    Ok(crate::model::raw_payload_text(bytes))
}

/// A new task of `queue` with this payload (as [`parse_payload`] returned it), its
/// flow-control key values filled (`concurrency_key`, `rate_key`).
pub fn new_task(queue: &QueueConfig, payload: String) -> NewTask {
    let mut t = NewTask::new(queue.name.clone(), payload);
    if queue.concurrency_key.is_some() || queue.rate_key.is_some() {
        // A raw payload parses as no JSON: its queue's keys are literal (parse_raw_payload).
        if t.payload.starts_with(crate::model::RAW_PAYLOAD_PREFIX) {
            (t.flow_key, t.rate_key) =
                flow::keys(queue, &serde_json::Value::Null).unwrap_or_default();
            return t;
        }
        if let Ok(value) = serde_json::from_str(&t.payload) {
            // parse_payload refused a payload that cannot fill them.
            (t.flow_key, t.rate_key) = flow::keys(queue, &value).unwrap_or_default();
        }
    }
    t
}

/// serde_json reports line and column (1-based); turn them into a 0-based byte offset.
pub fn byte_offset(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return offset + column.saturating_sub(1).min(l.len());
        }
        offset += l.len();
    }
    text.len()
}

/// serde_json's message without its " at line L column C" suffix (the caller says where,
/// as a byte offset too).
pub fn strip_position(msg: &str) -> &str {
    match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_offsets_follow_lines() {
        assert_eq!(byte_offset("{\"a\": x}", 1, 7), 6);
        assert_eq!(byte_offset("{\n\"a\": x}", 2, 6), 7);
    }
}
