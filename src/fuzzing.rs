//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`, docs/fuzzing.md): each takes
//! arbitrary bytes, feeds them to one of taskd's parsers of outside input (a config, a
//! `command` element with a payload, a worker's line, an enqueue body, a Celery message),
//! and asserts what must hold whatever the bytes are. A panic (an assertion here, or one
//! inside taskd) is a finding; every finding becomes a regression test that calls the same
//! function.
//!
//! Not an API: hidden from the docs, and nothing in taskd calls it.

use std::path::Path;

use crate::config::{Config, ConfigError, Diagnostic, Program, QueueConfig};

/// The path the fuzzed configs are read as (it only names the file in diagnostics and
/// places relative paths; it is not read).
const CONFIG_PATH: &str = "/etc/taskd/taskd.toml";

/// The config parser and validator: TOML text → a [`Config`], or diagnostics. Never a
/// panic; an invalid config has at least one diagnostic, and every diagnostic points at a
/// line and column inside the text, with a message.
pub fn config(data: &[u8]) {
    // The config is read with `read_to_string`: a file that is not UTF-8 never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::config::parse_str(text, Path::new(CONFIG_PATH)) {
        Ok(config) => {
            // A valid config's queues are usable: each queue's literal command renders.
            for queue in config.queues.values() {
                let _ = crate::config::runnable::argv(queue, &serde_json::json!({}), &[]);
            }
        }
        Err(ConfigError::Invalid(diags)) => {
            assert!(!diags.is_empty(), "an invalid config without a diagnostic");
            for d in &diags {
                check_location(text, d);
            }
            let shown = ConfigError::Invalid(diags).to_string();
            assert!(
                shown.contains(CONFIG_PATH),
                "the errors name the file: {shown}"
            );
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse_str read a file: {e}"),
    }
}

/// A diagnostic's line and column are inside `text` (1-based; the column counts
/// characters, and may point just past a line's end or at the end of the file).
fn check_location(text: &str, diag: &Diagnostic) {
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        diag.line >= 1 && diag.line <= lines.len(),
        "diagnostic line {} outside the text's {} lines: {diag}",
        diag.line,
        lines.len()
    );
    let chars = lines[diag.line - 1].chars().count();
    assert!(
        diag.column >= 1 && diag.column <= chars + 1,
        "diagnostic column {} outside line {} ({chars} characters): {diag}",
        diag.column,
        diag.line
    );
    assert!(
        !diag.message.is_empty(),
        "a diagnostic without a message: {diag:?}"
    );
}

/// The payload templating of argv: the bytes up to the first newline are one `command`
/// element (placeholders and all), the rest is a task's JSON payload. The element goes
/// through the config validator as a queue's `command` (which parses it), then the payload
/// through [`crate::config::runnable::argv`], which fills it in. A rendered argv carries no
/// NUL, keeps one element per template element, and never lets a value start an element
/// with `-` (an option) unless the queue allows it.
pub fn argv_template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (element, payload) = text.split_once('\n').unwrap_or((text, "{}"));
    let Ok(payload) = serde_json::from_str::<serde_json::Value>(payload) else {
        return;
    };
    let parsed = crate::config::ArgTemplate::parse(element);
    let toml = format!(
        "[queues.q]\ncommand = [\"/bin/echo\", {}]\n",
        toml_edit::Value::from(element)
    );
    let config = crate::config::parse_str(&toml, Path::new(CONFIG_PATH));
    let queue = match (&parsed, &config) {
        (Ok(_), Ok(c)) => &c.queues[&"q".parse().expect("a valid queue name")],
        // Refused: for its placeholders, or for what no argv element may hold (a NUL),
        // which the template parser leaves to the validator. Either way at the element.
        (_, Err(ConfigError::Invalid(diags))) => {
            assert!(
                diags.iter().all(|d| d.key.starts_with("queues.q.command")),
                "an element's problem not reported at its key: {diags:?}"
            );
            for d in diags {
                check_location(&toml, d);
            }
            return;
        }
        (parsed, config) => panic!(
            "the validator accepted {element:?}, which the template parser refuses: {parsed:?} vs {:?}",
            config.as_ref().err()
        ),
    };
    let template = parsed.as_ref().expect("parsed above");
    assert_eq!(template.to_string(), element, "a template shows as written");
    let Program::Command(parts) = &queue.program else {
        panic!("queue q runs a command")
    };
    match crate::config::runnable::argv(queue, &payload, &[]) {
        Ok(argv) => {
            assert_eq!(
                argv.len(),
                parts.len(),
                "one argv element per command element"
            );
            assert_eq!(argv[0], "/bin/echo");
            let value = &argv[1];
            assert!(!value.contains('\0'), "a NUL reached argv: {value:?}");
            if template.starts_with_field() && !queue.allow_dash_values {
                assert!(
                    !value.starts_with('-'),
                    "a payload value became an option: {value:?} from {element:?}"
                );
            }
            if template.is_literal() {
                assert_eq!(value, &element.replace("{{", "{").replace("}}", "}"));
            }
            // Rendering is a function of the payload: the same again.
            assert_eq!(template.render(&payload).as_ref(), Ok(value));
        }
        Err(why) => assert!(!why.is_empty()),
    }
}

/// The worker protocol's line parser: one line of a worker's fd 4, whatever it holds. A
/// line shown in a log or an attempt's error stays bounded.
pub fn worker_line(data: &[u8]) {
    use crate::worker::protocol::{parse, show_line, SHOWN_LINE};
    let _ = parse(data);
    let shown = show_line(data);
    // Each byte of the kept prefix shows as at most 10 characters (`\u{10ffff}` for a
    // character, or the replacement character for a bad byte), plus quotes and the length.
    assert!(
        shown.len() <= SHOWN_LINE * 10 + 40,
        "show_line grew to {} bytes",
        shown.len()
    );
}

/// The config of the HTTP enqueue targets: a command queue with a placeholder, a shell
/// queue, a worker queue and one with flow keys, with a small `max_payload`.
fn enqueue_config() -> &'static Config {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        crate::config::parse_str(
            "[taskd]\nmax_payload = \"64KiB\"\n\
             [queues.mail]\ncommand = [\"/bin/echo\", \"{to}\", \"--\", \"{subject}\"]\n\
             [queues.any]\nshell = \"echo $TASKD_ARG_x\"\n\
             [queues.work]\nworker = [\"/bin/cat\"]\n\
             [queues.keyed]\nshell = \"true\"\nconcurrency_key = \"{user}\"\nrate = \"10/s\"\nrate_key = \"{user}\"\n\
             [queues.bytes]\ncommand = [\"/bin/cat\"]\n",
            Path::new(CONFIG_PATH),
        )
        .expect("the enqueue targets' config is valid")
    })
}

/// The first byte picks the queue, so that one input reaches each kind of queue.
fn pick_queue(config: &Config, byte: u8) -> &QueueConfig {
    let queues: Vec<&QueueConfig> = config.queues.values().collect();
    queues[usize::from(byte) % queues.len()]
}

/// The HTTP enqueue body, JSON: one task's body and a batch (a JSON array, or JSON lines).
/// An answer is a task the queue can run, or an error the client caused (4xx) with a
/// message.
pub fn enqueue_json(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let config = enqueue_config();
    let queue = pick_queue(config, first);
    match crate::api::enqueue::parse_one(config, queue, body) {
        Ok(task) => check_task(config, queue, &task),
        Err(e) => check_refusal(&e),
    }
    match crate::api::enqueue::parse_batch(config, queue, body) {
        Ok(tasks) => {
            assert!(!tasks.is_empty(), "an accepted batch without a task");
            for task in &tasks {
                check_task(config, queue, task);
            }
        }
        Err(e) => check_refusal(&e),
    }
}

/// The HTTP enqueue body, raw (`application/octet-stream`): the bytes up to the first
/// newline are the query string with the options, the rest the payload.
pub fn enqueue_raw(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (query, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let config = enqueue_config();
    let queue = pick_queue(config, first);
    match crate::api::enqueue::parse_raw(config, queue, body, Some(query)) {
        Ok(task) => {
            check_task(config, queue, &task);
            let (_, b64) = crate::model::read_stored_payload(&task.payload)
                .expect("a stored raw payload reads back");
            use base64::Engine as _;
            let back = base64::engine::general_purpose::STANDARD
                .decode(b64.expect("a raw payload"))
                .expect("its base64 decodes");
            assert_eq!(back, body, "a raw payload is kept byte for byte");
        }
        Err(e) => check_refusal(&e),
    }
}

/// An accepted task: for its queue, with a payload that reads back and that the queue can
/// run, within the size limit, its options within their bounds.
fn check_task(config: &Config, queue: &QueueConfig, task: &crate::model::NewTask) {
    assert_eq!(task.queue, queue.name);
    let (payload, b64) =
        crate::model::read_stored_payload(&task.payload).expect("a stored payload reads back");
    if b64.is_none() {
        assert!(
            task.payload.len() <= config.max_payload,
            "an accepted payload of {} bytes over max_payload {}",
            task.payload.len(),
            config.max_payload
        );
    }
    if let Err(why) = crate::config::runnable::argv(queue, &payload, &task.args) {
        panic!("an accepted task that its queue cannot run: {why}");
    }
    if let Some(key) = &task.unique_key {
        assert!(
            !key.is_empty() && key.len() <= 512,
            "unique key of {} bytes",
            key.len()
        );
    }
}

/// A refused request: the client's fault (4xx), with a message.
fn check_refusal(error: &crate::api::error::ApiError) {
    assert!(
        error.status.is_client_error(),
        "{} for a request's content: {}",
        error.status,
        error.message
    );
    assert!(
        !error.message.is_empty(),
        "an error without a message ({})",
        error.code
    );
}

/// The Celery message parser: the bytes up to the first newline are a protocol 2 message's
/// headers (a JSON object; anything else counts as none), the rest its body, as JSON with
/// UTF-8. The whole input is also read as kombu's envelope (the Redis transport's list
/// element) and, when it is one, its message parsed. A task read keeps the Celery id as its
/// own; a refusal says why, and names each result it owes once.
pub fn celery_message(data: &[u8]) {
    use crate::celery::message::{from_kombu_envelope, parse, Delivery};
    let (headers, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let headers = serde_json::from_slice::<serde_json::Value>(headers)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let delivery = Delivery {
        body: body.to_vec(),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers,
        ..Delivery::default()
    };
    check_celery(&delivery);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(delivery) = from_kombu_envelope(text) {
            check_celery(&delivery);
        }
    }

    fn check_celery(delivery: &Delivery) {
        match parse(delivery) {
            Ok(task) => {
                assert!(!task.name.is_empty(), "a Celery task without a name");
                if let Ok(id) = task.result_to.id.parse::<crate::model::TaskId>() {
                    assert_eq!(id, task.id, "the taskd id is not the Celery id");
                }
            }
            Err(refused) => {
                assert!(!refused.detail.is_empty(), "a refusal without a reason");
                let mut ids: Vec<&str> = refused.results.iter().map(|r| r.id.as_str()).collect();
                let n = ids.len();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), n, "a result owed twice: {:?}", refused.results);
            }
        }
    }
}
