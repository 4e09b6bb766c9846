//! Parsing enqueue requests: one task's JSON body, one raw payload (an
//! `application/octet-stream` body, its options in the query string), or a batch (a JSON
//! array of such bodies, or JSON lines). Pure functions of the config and the bytes, so that a property
//! test can throw anything at them; payload validation is `submission::parse_payload`,
//! the same check `taskd submit` makes.

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::config::{Config, QueueConfig};
use crate::model::NewTask;
use crate::submission::{
    expires_at, parse_at, parse_delay, parse_duration_ms, parse_parents, parse_payload,
    parse_raw_payload, PayloadError,
};

/// The body of `POST /api/v1/queues/{queue}/tasks`. Every field is optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    /// A raw payload (bytes, not JSON), in standard base64; instead of `payload`.
    payload_b64: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    delay: Option<String>,
    run_at: Option<RunAt>,
    #[serde(default)]
    priority: i32,
    unique: Option<String>,
    unique_for: Option<String>,
    #[serde(default)]
    after: Vec<String>,
    expires: Option<RunAt>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RunAt {
    Seconds(i64),
    Text(String),
}

/// Parse one task's body. An empty body means `{}`: a task with payload `{}`.
pub fn parse_one(config: &Config, queue: &QueueConfig, body: &[u8]) -> Result<NewTask, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!(
                "the body is not UTF-8 (invalid byte at {})",
                e.valid_up_to()
            ),
        )
        .with("byte", e.valid_up_to())
    })?;
    parse_text(config, queue, text, "the body")
}

fn parse_text(
    config: &Config,
    queue: &QueueConfig,
    text: &str,
    what: &str,
) -> Result<NewTask, ApiError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let body: Body = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ApiError::invalid(format!("{what}: {e}"))
        } else {
            ApiError::bad_json(what, text, &e)
        }
    })?;
    let payload = match (body.payload, &body.payload_b64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(format!(
                "{what}: give `payload` (JSON) or `payload_b64` (raw bytes), not both"
            )))
        }
        (None, Some(b64)) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    ApiError::invalid(format!("{what}: payload_b64 is not standard base64: {e}"))
                })?;
            parse_raw_payload(config, queue, &bytes, &body.args)
        }
        (payload, None) => parse_payload(
            config,
            queue,
            payload.map(RawValue::get).unwrap_or("{}"),
            &body.args,
        ),
    }
    .map_err(|e| payload_error(config, what, e))?;
    finish(config, queue, payload, body, what)
}

/// A refused payload as the API answers it.
fn payload_error(config: &Config, what: &str, error: PayloadError) -> ApiError {
    match error {
        PayloadError::TooLarge(m) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what}: {m}"),
        )
        .with("limit", config.max_payload),
        // The body parsed, so this is the payload nested deeper than the parser goes: the
        // JSON itself is unusable, not the task.
        PayloadError::Malformed(m) => ApiError::bad_request("bad_json", format!("{what}: {m}")),
        PayloadError::Invalid(m) => ApiError::invalid(format!("{what}: {m}")),
    }
}

/// The options of a raw payload's request (`application/octet-stream`), in its query
/// string: those of a JSON body, `after` as ids separated by commas, `run_at` and `expires`
/// as text (RFC 3339, Unix seconds, or for `expires` a duration).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    delay: Option<String>,
    run_at: Option<String>,
    priority: Option<i32>,
    unique: Option<String>,
    unique_for: Option<String>,
    after: Option<String>,
    expires: Option<String>,
}

/// Whether a request's `Content-Type` says its body is a raw payload:
/// `application/octet-stream` or `application/x-protobuf` (parameters allowed).
pub fn is_raw(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/octet-stream")
        || media.eq_ignore_ascii_case("application/x-protobuf")
}

/// Parse a raw payload's request: the body is the payload, byte for byte; the options are
/// in the query string.
pub fn parse_raw(
    config: &Config,
    queue: &QueueConfig,
    body: &[u8],
    query: Option<&str>,
) -> Result<NewTask, ApiError> {
    let what = "the request";
    let q: RawQuery = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::invalid(format!("{what}: the query string: {e}")))?;
    let payload =
        parse_raw_payload(config, queue, body, &[]).map_err(|e| payload_error(config, what, e))?;
    let body = Body {
        payload: None,
        payload_b64: None,
        args: Vec::new(),
        delay: q.delay,
        run_at: q.run_at.map(RunAt::Text),
        priority: q.priority.unwrap_or(0),
        unique: q.unique,
        unique_for: q.unique_for,
        after: q
            .after
            .map(|a| {
                a.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        expires: q.expires.map(RunAt::Text),
    };
    finish(config, queue, payload, body, what)
}

/// The task: its stored payload, and the body's other fields read.
fn finish(
    _config: &Config,
    queue: &QueueConfig,
    payload: String,
    body: Body,
    what: &str,
) -> Result<NewTask, ApiError> {
    let run_at = match (&body.delay, &body.run_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(format!(
                "{what}: give `delay` or `run_at`, not both"
            )))
        }
        (Some(d), None) => {
            Some(parse_delay(d).map_err(|e| ApiError::invalid(format!("{what}: delay {e}")))?)
        }
        (None, Some(RunAt::Seconds(s))) => Some(
            parse_at(&s.to_string())
                .map_err(|e| ApiError::invalid(format!("{what}: run_at {e}")))?,
        ),
        (None, Some(RunAt::Text(t))) => {
            Some(parse_at(t).map_err(|e| ApiError::invalid(format!("{what}: run_at {e}")))?)
        }
        (None, None) => None,
    };
    if let Some(k) = &body.unique {
        if k.is_empty() || k.len() > 512 {
            return Err(ApiError::invalid(format!(
                "{what}: `unique` must be 1 to 512 bytes long"
            )));
        }
    }
    // Read (and refused when malformed) even without `unique`, which it needs to matter.
    let unique_for = match &body.unique_for {
        Some(d) => Some(
            parse_duration_ms(d)
                .map_err(|e| ApiError::invalid(format!("{what}: unique_for {e}")))?,
        ),
        None => None,
    }
    .filter(|_| body.unique.is_some());
    let after =
        parse_parents(&body.after).map_err(|e| ApiError::invalid(format!("{what}: after: {e}")))?;
    let expires = match &body.expires {
        Some(RunAt::Seconds(s)) => Some(s.to_string()),
        Some(RunAt::Text(t)) => Some(t.clone()),
        None => None,
    };
    let expires_at = expires_at(queue, run_at, expires.as_deref())
        .map_err(|e| ApiError::invalid(format!("{what}: expires {e}")))?;
    let mut t = crate::submission::new_task(queue, payload);
    t.expires_at = expires_at;
    t.args = body.args;
    t.priority = body.priority;
    t.run_at = run_at;
    t.unique_key = body.unique;
    t.unique_for = unique_for;
    t.after = after;
    Ok(t)
}

/// Parse a batch: a JSON array of task bodies, or one task body per line (JSON lines).
/// Any bad item fails the whole batch, naming the item.
pub fn parse_batch(
    config: &Config,
    queue: &QueueConfig,
    body: &[u8],
) -> Result<Vec<NewTask>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!(
                "the body is not UTF-8 (invalid byte at {})",
                e.valid_up_to()
            ),
        )
        .with("byte", e.valid_up_to())
    })?;
    let mut tasks = Vec::new();
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| ApiError::bad_json("the batch", text, &e))?;
        for (i, item) in items.iter().enumerate() {
            tasks.push(
                parse_text(config, queue, item.get(), &format!("item {i}"))
                    .map_err(|e| e.with("item", i))?,
            );
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            tasks.push(
                parse_text(config, queue, line, &format!("line {}", i + 1))
                    .map_err(|e| e.with("line_of_batch", i + 1))?,
            );
        }
    }
    if tasks.is_empty() {
        return Err(ApiError::invalid(
            "the batch holds no tasks (send a JSON array, or one JSON object per line)",
        ));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> Config {
        crate::config::parse_str(
            "[queues.mail]\ncommand = [\"/bin/echo\", \"{to}\"]\n[queues.any]\nshell = \"true\"\n",
            std::path::Path::new("/tmp/taskd-api-test.toml"),
        )
        .expect("valid config")
    }

    fn queue<'a>(config: &'a Config, name: &str) -> &'a QueueConfig {
        config
            .queues
            .get(&name.parse().expect("name"))
            .expect("queue")
    }

    #[test]
    fn reads_every_field() {
        let c = config();
        let t = parse_one(
            &c,
            queue(&c, "mail"),
            br#"{"payload": {"to": "a@b"}, "args": ["-v"], "delay": "1h", "priority": 3, "unique": "k"}"#,
        )
        .expect("valid");
        assert_eq!(t.payload, r#"{"to":"a@b"}"#);
        assert_eq!(t.args, vec!["-v"]);
        assert_eq!(t.priority, 3);
        assert!(t.run_at.expect("delayed") > crate::model::now_ms());
        assert_eq!(t.unique_key.as_deref(), Some("k"));
        let empty = parse_one(&c, queue(&c, "any"), b"").expect("empty body is {}");
        assert_eq!(empty.payload, "{}");
    }

    #[test]
    fn keeps_integers_beyond_64_bits_and_reads_run_at_in_seconds() {
        // serde_json's `arbitrary_precision` keeps a number's text: no rounding to an f64.
        // Integers inside an untagged enum (run_at) must still read as integers.
        let c = config();
        let t = parse_one(
            &c,
            queue(&c, "any"),
            br#"{"payload": {"big": 123456789012345678901234567890, "f": 1.10}, "run_at": 4102444800}"#,
        )
        .expect("valid");
        assert_eq!(
            t.payload,
            r#"{"big":123456789012345678901234567890,"f":1.10}"#
        );
        assert_eq!(t.run_at, Some(4_102_444_800_000));
    }

    #[test]
    fn names_the_problem() {
        let c = config();
        let e = parse_one(&c, queue(&c, "any"), b"{\"payload\": }").expect_err("bad");
        assert_eq!(e.code, "bad_json");
        assert_eq!(e.details["byte"], 12);
        let e = parse_one(&c, queue(&c, "mail"), br#"{"payload": {}}"#).expect_err("no field");
        assert_eq!(e.code, "invalid_task");
        assert!(e.message.contains("to"), "{}", e.message);
        let e = parse_one(&c, queue(&c, "any"), br#"{"colour": 1}"#).expect_err("unknown");
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = parse_batch(
            &c,
            queue(&c, "mail"),
            b"{\"payload\":{\"to\":\"x\"}}\n{\"payload\":{}}\n",
        )
        .expect_err("line 2");
        assert!(e.message.starts_with("line 2"), "{}", e.message);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let c = config();
            let _ = parse_one(&c, queue(&c, "mail"), &body);
            let _ = parse_batch(&c, queue(&c, "mail"), &body);
        }

        #[test]
        fn arbitrary_json_never_panics(
            payload in "\\PC{0,40}",
            delay in proptest::option::of("\\PC{0,12}"),
            run_at in proptest::option::of(any::<i64>()),
            prio in any::<i64>(),
            args in proptest::collection::vec("\\PC{0,8}", 0..3),
        ) {
            let c = config();
            let body = serde_json::json!({
                "payload": {"to": payload},
                "delay": delay,
                "run_at": run_at,
                "priority": prio,
                "args": args,
            });
            let text = body.to_string();
            let _ = parse_one(&c, queue(&c, "mail"), text.as_bytes());
            let _ = parse_batch(&c, queue(&c, "mail"), format!("[{text},{text}]").as_bytes());
        }
    }
}
