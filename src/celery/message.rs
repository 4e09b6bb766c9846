//! Celery's task message, read: a transport hands a [`Delivery`] (the body's bytes, its
//! content type and encoding, the headers and the few properties the bridge uses), and
//! [`parse`] answers a [`CeleryTask`] taskd can run, or a [`Refused`] saying why not.
//!
//! Protocol v2 (Celery 4 and later): the task's metadata is in the headers (`task`, `id`,
//! `eta`, `expires`, `retries`, `timelimit`, `ignore_result`, …) and the body is the JSON
//! array `[args, kwargs, embed]`, where `embed` holds the workflow (`callbacks`, `errbacks`,
//! `chain`, `chord`). Protocol v1 (Celery 3): everything is in the body, a JSON object
//! (`task`, `id`, `args`, `kwargs`, `eta`, `expires`, `retries`, `timelimit`, `callbacks`,
//! `errbacks`, `chord`). Only the JSON serializer is read.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::model::{TaskId, UnixMs};

/// One message as a transport received it.
#[derive(Clone, Debug, Default)]
pub struct Delivery {
    /// The body's bytes, after the transport's own encoding (kombu's base64) is undone.
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The message's headers (protocol v2's task metadata), as JSON.
    pub headers: Map<String, Value>,
    /// The message's priority property, as the producer set it.
    pub priority: Option<u8>,
    /// `reply_to` and `correlation_id` (the `rpc://` backend replies there).
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// Where a task's result goes: its Celery id, and what a result backend needs to reach the
/// client that waits (kept with the task, in its payload's `celery` object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultTo {
    /// The Celery task id, as the producer wrote it.
    pub id: String,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// The producer asked for no result (`ignore_result`).
    pub ignore_result: bool,
}

/// A Celery task taskd can run.
#[derive(Clone, Debug, PartialEq)]
pub struct CeleryTask {
    /// The Celery id, which is the taskd task's id.
    pub id: TaskId,
    /// The Celery task's name (`app.tasks.alert_friends`).
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Not before (`eta`, or `countdown` which the producer turned into an `eta`).
    pub eta: Option<UnixMs>,
    /// Not started by then, never (`expires`).
    pub expires: Option<UnixMs>,
    /// How often Celery already retried it (0 on first delivery).
    pub retries: u64,
    /// `[hard, soft]` time limits in seconds, as sent.
    pub timelimit: [Option<f64>; 2],
    /// The producer's priority property.
    pub priority: Option<u8>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub result_to: ResultTo,
}

/// Why a message is not run, as a Celery exception the client raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// pickle, yaml, msgpack or another serializer than JSON.
    Serializer,
    /// A compressed body.
    Compression,
    /// Callbacks, errbacks, a chain or a chord in the message.
    Workflow,
    /// No entry of `[celery.tasks]` matches its name.
    Unmapped,
    /// Not a Celery message taskd can read (bad JSON, no id, a field of the wrong type).
    Malformed,
    /// A task its queue cannot run (over `max_payload`, a placeholder it cannot fill).
    Invalid,
}

impl Reason {
    /// The `reason` label of `taskd_celery_refused_total` and of the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Serializer => "serializer",
            Reason::Compression => "compression",
            Reason::Workflow => "workflow",
            Reason::Unmapped => "unmapped",
            Reason::Malformed => "malformed",
            Reason::Invalid => "invalid",
        }
    }

    /// The exception Celery's client raises for it: `(module, class)`. Each module is one
    /// a Celery client has imported, so the client raises that very class.
    pub fn exception(self) -> (&'static str, &'static str) {
        match self {
            Reason::Serializer | Reason::Compression => ("kombu.exceptions", "ContentDisallowed"),
            Reason::Workflow => ("builtins", "NotImplementedError"),
            Reason::Unmapped => ("celery.exceptions", "NotRegistered"),
            Reason::Malformed => ("kombu.exceptions", "DecodeError"),
            Reason::Invalid => ("builtins", "ValueError"),
        }
    }
}

/// A message taskd does not run, and the results it owes: the task's own (when its id could
/// be read) and, for a chain, its last task's, which is the one the caller waits for.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub reason: Reason,
    /// For people: what is wrong and what to do.
    pub detail: String,
    pub name: Option<String>,
    /// The ids to fail, each with where its result goes; empty when no id could be read.
    pub results: Vec<ResultTo>,
}

impl Refused {
    fn new(reason: Reason, detail: impl Into<String>) -> Refused {
        Refused {
            reason,
            detail: detail.into(),
            name: None,
            results: Vec::new(),
        }
    }
}

/// Reads `delivery` as a Celery task message.
pub fn parse(delivery: &Delivery) -> Result<CeleryTask, Box<Refused>> {
    let head = Head::read(delivery);
    let refuse = |reason, detail: String| {
        let mut r = Refused::new(reason, detail);
        r.name = head.name.clone();
        r.results.extend(head.result_to.clone());
        Box::new(r)
    };
    let content_type = delivery
        .content_type
        .as_deref()
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    if content_type != "application/json" {
        return Err(refuse(
            Reason::Serializer,
            format!("the message is serialized as {content_type}; taskd reads JSON only (never pickle, which would run the producer's code): set `task_serializer = \"json\"` in the Celery app"),
        ));
    }
    if let Some(c) = delivery.headers.get("compression").filter(|c| !c.is_null()) {
        let c = c.as_str().unwrap_or("?");
        return Err(refuse(
            Reason::Compression,
            format!("the message body is compressed ({c}); taskd reads uncompressed JSON only: drop `compression` from the call or `task_compression` from the Celery app"),
        ));
    }
    if let Some(e) = delivery.content_encoding.as_deref() {
        if !matches!(e.to_ascii_lowercase().as_str(), "utf-8" | "utf8") {
            return Err(refuse(
                Reason::Serializer,
                format!("the message body's encoding is {e}; taskd reads UTF-8 JSON only"),
            ));
        }
    }
    let body: Value = serde_json::from_slice(&delivery.body).map_err(|e| {
        refuse(
            Reason::Malformed,
            format!("the message body is not JSON: {e}"),
        )
    })?;
    let task = if delivery.headers.contains_key("task") {
        v2(&delivery.headers, body, delivery)
    } else {
        v1(body, delivery)
    };
    task.map_err(|(reason, detail, extra)| {
        let mut r = refuse(reason, detail);
        for x in extra {
            if !r.results.iter().any(|have| have.id == x.id) {
                r.results.push(x);
            }
        }
        r
    })
}

/// What the headers say before the body is read: enough to fail the task when the body
/// cannot be.
struct Head {
    name: Option<String>,
    result_to: Option<ResultTo>,
}

impl Head {
    fn read(delivery: &Delivery) -> Head {
        let h = &delivery.headers;
        let name = h.get("task").and_then(Value::as_str).map(str::to_string);
        let result_to = h
            .get("id")
            .and_then(Value::as_str)
            .map(|id| result_to(id, h.get("ignore_result"), delivery));
        Head { name, result_to }
    }
}

fn result_to(id: &str, ignore_result: Option<&Value>, delivery: &Delivery) -> ResultTo {
    ResultTo {
        id: id.to_string(),
        reply_to: delivery.reply_to.clone().filter(|s| !s.is_empty()),
        correlation_id: delivery.correlation_id.clone().filter(|s| !s.is_empty()),
        ignore_result: ignore_result.and_then(Value::as_bool).unwrap_or(false),
    }
}

type Failure = (Reason, String, Vec<ResultTo>);

fn malformed(detail: impl Into<String>) -> Failure {
    (Reason::Malformed, detail.into(), Vec::new())
}

/// Protocol v2: metadata in the headers, `[args, kwargs, embed]` in the body.
fn v2(
    headers: &Map<String, Value>,
    body: Value,
    delivery: &Delivery,
) -> Result<CeleryTask, Failure> {
    let Value::Array(mut parts) = body else {
        return Err(malformed(
            "a protocol 2 body must be the JSON array [args, kwargs, embed]",
        ));
    };
    if parts.len() < 2 || parts.len() > 3 {
        return Err(malformed(format!(
            "a protocol 2 body must be the JSON array [args, kwargs, embed], found {} elements",
            parts.len()
        )));
    }
    let embed = if parts.len() == 3 { parts.pop() } else { None };
    let kwargs = parts.pop().unwrap_or(Value::Null);
    let args = parts.pop().unwrap_or(Value::Null);
    let workflow = embed
        .as_ref()
        .and_then(Value::as_object)
        .map(|e| {
            ["callbacks", "errbacks", "chain", "chord"]
                .into_iter()
                .filter(|k| {
                    e.get(*k)
                        .is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]))
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if !workflow.is_empty() {
        // The caller of a chain holds its last task's id: `embed.chain[0]`'s.
        let last = embed
            .as_ref()
            .and_then(|e| e.get("chain"))
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .and_then(|s| s.pointer("/options/task_id"))
            .and_then(Value::as_str)
            .map(|id| ResultTo {
                id: id.to_string(),
                reply_to: delivery.reply_to.clone(),
                correlation_id: Some(id.to_string()),
                ignore_result: false,
            });
        return Err((
            Reason::Workflow,
            format!(
                "the message carries a Celery workflow ({}), which taskd does not run: its tasks would never start. Send the tasks one by one, or keep a Celery worker for workflows",
                workflow.join(", ")
            ),
            last.into_iter().collect(),
        ));
    }
    task(headers, Some(args), Some(kwargs), delivery)
}

/// Protocol v1: everything in the body, a JSON object.
fn v1(body: Value, delivery: &Delivery) -> Result<CeleryTask, Failure> {
    let Value::Object(mut fields) = body else {
        return Err(malformed(
            "the message has no `task` header (protocol 2) and its body is no JSON object (protocol 1): not a Celery task message",
        ));
    };
    let rt = fields
        .get("id")
        .and_then(Value::as_str)
        .map(|id| result_to(id, None, delivery));
    if !fields.contains_key("task") {
        return Err((
            Reason::Malformed,
            "the message names no task (no `task` header or field): not a Celery task message"
                .into(),
            rt.into_iter().collect(),
        ));
    }
    let workflow: Vec<&str> = ["callbacks", "errbacks", "chord"]
        .into_iter()
        .filter(|k| {
            fields
                .get(*k)
                .is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]))
        })
        .collect();
    if !workflow.is_empty() {
        return Err((
            Reason::Workflow,
            format!(
                "the message carries a Celery workflow ({}), which taskd does not run",
                workflow.join(", ")
            ),
            rt.into_iter().collect(),
        ));
    }
    let args = fields.remove("args");
    let kwargs = fields.remove("kwargs");
    task(&fields, args, kwargs, delivery).map_err(|(r, d, _)| (r, d, rt.into_iter().collect()))
}

/// The task from its fields (v2: the headers; v1: the body) and its `args` and `kwargs`
/// (v2: from the body; v1: taken out of the body's fields), moved into the task, not copied.
fn task(
    fields: &Map<String, Value>,
    args: Option<Value>,
    kwargs: Option<Value>,
    delivery: &Delivery,
) -> Result<CeleryTask, Failure> {
    let text = |k: &str| fields.get(k).and_then(Value::as_str).map(str::to_string);
    let name = text("task")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| malformed("the task name is not a string"))?;
    let id_text = text("id").ok_or_else(|| malformed("the message has no task id"))?;
    let id = uuid::Uuid::parse_str(&id_text).map(TaskId).map_err(|_| {
        malformed(format!(
            "the task id \"{id_text}\" is not a UUID; taskd keeps a Celery task under its id, so it must be one (Celery's own ids are; drop a custom `task_id`)"
        ))
    })?;
    let args = match args {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(malformed("`args` is not a list")),
    };
    let kwargs = match kwargs {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(malformed("`kwargs` is not an object")),
    };
    let eta = time(fields, "eta")?;
    let expires = time(fields, "expires")?;
    let retries = match fields.get("retries") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| malformed("`retries` is not a count"))?,
    };
    let limits = fields.get("timelimit").and_then(Value::as_array);
    let limit = |i: usize| limits.and_then(|l| l.get(i)).and_then(Value::as_f64);
    Ok(CeleryTask {
        id,
        name,
        args,
        kwargs,
        eta,
        expires,
        retries,
        timelimit: [limit(0), limit(1)],
        priority: delivery.priority,
        root_id: text("root_id"),
        parent_id: text("parent_id"),
        group: text("group"),
        result_to: result_to(&id_text, fields.get("ignore_result"), delivery),
    })
}

/// An ISO 8601 time (`2026-11-27T12:37:22.822314+00:00`); one without an offset is UTC.
fn time(fields: &Map<String, Value>, key: &str) -> Result<Option<UnixMs>, Failure> {
    let Some(v) = fields.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let text = v
        .as_str()
        .ok_or_else(|| malformed(format!("`{key}` is not a time")))?;
    parse_time(text)
        .map(Some)
        .ok_or_else(|| malformed(format!("`{key}` \"{text}\" is not an ISO 8601 time")))
}

pub(crate) fn parse_time(text: &str) -> Option<UnixMs> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Some(t.as_millisecond());
    }
    let civil = text.parse::<jiff::civil::DateTime>().ok()?;
    civil
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp().as_millisecond())
}

/// kombu's JSON envelope (the Redis transport's list element, kombu's virtual transports'
/// message): `{"body", "content-type", "content-encoding", "headers", "properties"}` with
/// the body base64-encoded when `properties.body_encoding` says so.
pub fn from_kombu_envelope(text: &str) -> Result<Delivery, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    delivery_of_envelope(v)
}

/// [`from_kombu_envelope`], and the envelope's delivery tag (kombu's Redis transport names
/// a taken message by it) from the same read: `None` for a text that is no JSON or has no
/// tag.
pub fn read_kombu_envelope(text: &str) -> (Result<Delivery, String>, Option<String>) {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return (Err(format!("not JSON: {e}")), None),
    };
    let tag = v
        .pointer("/properties/delivery_tag")
        .and_then(Value::as_str)
        .map(str::to_string);
    (delivery_of_envelope(v), tag)
}

fn delivery_of_envelope(mut envelope: Value) -> Result<Delivery, String> {
    let headers = match envelope.get_mut("headers").map(Value::take) {
        Some(Value::Object(h)) => h,
        _ => Map::new(),
    };
    let o = envelope.as_object().ok_or("not a JSON object")?;
    let props = o.get("properties").and_then(Value::as_object);
    let prop = |k: &str| props.and_then(|p| p.get(k));
    let body = match o.get("body") {
        Some(Value::String(s)) => {
            if prop("body_encoding").and_then(Value::as_str) == Some("base64") {
                base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| format!("the body is not base64: {e}"))?
            } else {
                s.clone().into_bytes()
            }
        }
        Some(other) => other.to_string().into_bytes(),
        None => return Err("no body".into()),
    };
    let text_of = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(Delivery {
        body,
        content_type: text_of(o.get("content-type")),
        content_encoding: text_of(o.get("content-encoding")),
        headers,
        priority: prop("priority")
            .and_then(Value::as_u64)
            .map(|p| p.min(255) as u8),
        reply_to: text_of(prop("reply_to")),
        correlation_id: text_of(prop("correlation_id")),
    })
}
