//! What makes a task runnable by its queue: the checks `taskd submit` and the API make before
//! a task is accepted, and that the supervisor makes again before it starts one (a task may
//! arrive by plain Redis commands, or the config may have changed since).
//!
//! A process receives its argv and environment as C strings through `execve`, which refuses
//! a string over `MAX_ARG_STRLEN` (128 KiB) and argv plus environment over a quarter of the
//! stack limit (2 MiB with the usual 8 MiB), and cannot carry a NUL byte at all. So a task is
//! refused when its argv cannot be passed, and the environment made from its payload is kept
//! within a budget by leaving variables out: the whole payload is always on stdin. This
//! module decides; it must not build specs or touch processes.

use serde_json::Value;

use super::{Program, QueueConfig};

/// The longest argv element, in bytes: the kernel's `MAX_ARG_STRLEN` (128 KiB) counts the
/// terminating NUL.
pub(crate) const MAX_ARG_LEN: usize = 128 * 1024 - 1;
/// The most a task's argv may take, each element counted with its NUL and its pointer: half
/// of the 2 MiB the kernel allows argv and environment together with an 8 MiB stack limit.
pub(crate) const MAX_ARGV_BYTES: usize = 1024 * 1024;
/// The longest `TASKD_PAYLOAD=…` or `TASKD_ARG_<field>=…` variable passed, in bytes.
pub(crate) const MAX_ENV_VAR: usize = 64 * 1024;
/// The most the variables made from the payload may take together (counted as for argv).
pub(crate) const MAX_PAYLOAD_ENV: usize = 256 * 1024;

/// Checks a task for an exec queue (`command` or `shell`) and returns its argv: the command
/// with its placeholders filled, or `/bin/sh -c script`, then the task's extra `args`. `Err`
/// says why the task cannot run, naming the limit or the setting that refuses it. A `worker`
/// queue takes every task that is valid JSON (it travels as JSON on a pipe): `Ok(vec![])`.
pub(crate) fn argv(
    queue: &QueueConfig,
    payload: &Value,
    args: &[String],
) -> Result<Vec<String>, String> {
    let mut argv = match &queue.program {
        Program::Worker(_) => return Ok(Vec::new()),
        Program::Shell(script) => vec![
            "/bin/sh".into(),
            "-c".into(),
            script.clone(),
            format!("taskd-{}", queue.name),
        ],
        Program::Command(parts) => {
            let mut argv = Vec::with_capacity(parts.len() + args.len());
            let mut after_dashes = false;
            for part in parts {
                let value = part.render(payload)?;
                // A value that starts the element with `-` is read by most programs as an
                // option (`--output=/etc/x`), unless it comes after `--`.
                if value.starts_with('-')
                    && part.starts_with_field()
                    && !after_dashes
                    && !queue.allow_dash_values
                {
                    return Err(format!(
                        "the argument {value:?} made from `{part}` starts with `-`, so the program would read it as an option; \
                         put \"--\" before `{part}` in the queue's `command` (if the program takes it), or set `allow_dash_values = true` for queue `{}`",
                        queue.name
                    ));
                }
                after_dashes |= part.is_literal() && value == "--";
                argv.push(value);
            }
            argv
        }
    };
    for (i, a) in args.iter().enumerate() {
        if a.contains('\0') {
            return Err(format!(
                "extra argument {} holds a NUL byte, which a program cannot receive",
                i + 1
            ));
        }
    }
    argv.extend(args.iter().cloned());
    if let Some(long) = argv.iter().find(|a| a.len() > MAX_ARG_LEN) {
        return Err(format!(
            "an argument would be {} bytes long, over the kernel's limit of {MAX_ARG_LEN} bytes per argument (MAX_ARG_STRLEN); \
             pass large values in the payload, which the program reads on stdin",
            long.len()
        ));
    }
    let total: usize = argv.iter().map(|a| cost(a.len())).sum();
    if total > MAX_ARGV_BYTES {
        return Err(format!(
            "the arguments would take {total} bytes, over taskd's limit of {MAX_ARGV_BYTES} bytes for a task's argv; \
             pass large values in the payload, which the program reads on stdin"
        ));
    }
    for (k, v) in payload.as_object().into_iter().flatten() {
        if let Value::String(s) = v {
            if is_env_name(k) && s.contains('\0') {
                return Err(format!(
                    "payload field `{k}` holds a NUL byte, which the environment variable TASKD_ARG_{k} cannot carry"
                ));
            }
        }
    }
    // A field the script reads as `$TASKD_ARG_<field>` must reach it: one left out of the
    // environment (over the bounds of `payload_env`) would run the script with it empty.
    if let Program::Shell(script) = &queue.program {
        let read = script_fields(script);
        if !read.is_empty() {
            let passed = payload_env(&payload.to_string(), payload);
            for (k, v) in payload.as_object().into_iter().flatten() {
                let name = format!("TASKD_ARG_{k}");
                if !v.is_null()
                    && read.contains(k.as_str())
                    && !passed.iter().any(|(n, _)| *n == name)
                {
                    return Err(format!(
                        "payload field `{k}` is too big for the environment variable {name} the script reads \
                         (at most {MAX_ENV_VAR} bytes each, {MAX_PAYLOAD_ENV} for all the payload's variables); \
                         let the script read it from the payload on stdin"
                    ));
                }
            }
        }
    }
    Ok(argv)
}

/// Whether the queue takes data from its tasks' payload fields: `Some(what does)` for a
/// command with `{field}` placeholders, a script that reads `$TASKD_ARG_<field>`, or a
/// `concurrency_key`/`rate_key` with placeholders. Such a queue refuses raw payloads.
pub(crate) fn reads_payload_fields(queue: &QueueConfig) -> Option<String> {
    match &queue.program {
        Program::Command(parts) => {
            if let Some(part) = parts.iter().find(|p| !p.is_literal()) {
                return Some(format!("fills `{part}` in its command from the payload"));
            }
        }
        Program::Shell(script) => {
            if let Some(field) = script_fields(script).into_iter().next() {
                return Some(format!("has a script that reads $TASKD_ARG_{field}"));
            }
        }
        Program::Worker(_) => {}
    }
    for (name, key) in [
        ("concurrency_key", &queue.concurrency_key),
        ("rate_key", &queue.rate_key),
    ] {
        if let Some(t) = key.as_ref().filter(|t| !t.is_literal()) {
            return Some(format!("fills its {name} \"{t}\" from the payload"));
        }
    }
    None
}

/// The fields a script reads as `TASKD_ARG_<field>` (the longest name after each prefix,
/// as the shell reads `$TASKD_ARG_month` or `${TASKD_ARG_month:-}`).
fn script_fields(script: &str) -> std::collections::BTreeSet<&str> {
    const PREFIX: &str = "TASKD_ARG_";
    let mut out = std::collections::BTreeSet::new();
    let mut rest = script;
    while let Some(i) = rest.find(PREFIX) {
        rest = &rest[i + PREFIX.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 {
            out.insert(&rest[..end]);
        }
        rest = &rest[end..];
    }
    out
}

/// The environment variables made from a task's payload: `TASKD_PAYLOAD` (the JSON text) and
/// `TASKD_ARG_<field>` for each top-level field whose name is a valid variable name, in field
/// name order; null fields are left out. A variable over [`MAX_ENV_VAR`], one holding a NUL,
/// and those that would take the total past [`MAX_PAYLOAD_ENV`] are left out too.
pub(crate) fn payload_env(payload_text: &str, payload: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let mut budget = MAX_PAYLOAD_ENV;
    let mut add = |name: String, value: String| {
        let len = name.len() + 1 + value.len();
        if len <= MAX_ENV_VAR && cost(len) <= budget && !value.contains('\0') {
            budget -= cost(len);
            env.push((name, value));
        }
    };
    add("TASKD_PAYLOAD".into(), payload_text.to_string());
    if let Value::Object(fields) = payload {
        for (k, v) in fields {
            if !is_env_name(k) {
                continue;
            }
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            add(format!("TASKD_ARG_{k}"), value);
        }
    }
    env
}

/// What a string of `len` bytes costs in the kernel's argv and environment area: its bytes,
/// its NUL and its pointer.
fn cost(len: usize) -> usize {
    len + 1 + std::mem::size_of::<usize>()
}

/// A name a shell can expand: a letter or `_`, then letters, digits and `_`.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queue(toml: &str) -> QueueConfig {
        let text = format!("[queues.q]\n{toml}\n");
        let mut c = crate::config::parse_str(&text, std::path::Path::new("/etc/taskd/taskd.toml"))
            .expect("valid config");
        c.queues.pop_first().expect("one queue").1
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("month"));
        assert!(is_env_name("_a1"));
        assert!(!is_env_name("1a"));
        assert!(!is_env_name("a-b"));
        assert!(!is_env_name(""));
    }

    #[test]
    fn dash_values_only_where_they_cannot_be_options() {
        let q = queue(r#"command = ["thumb", "--size={size}", "{src}", "--", "{dst}"]"#);
        let ok = json!({"size": "-1", "src": "a.png", "dst": "-out.png"});
        assert_eq!(
            argv(&q, &ok, &[]).expect("runnable"),
            ["thumb", "--size=-1", "a.png", "--", "-out.png"]
        );
        let e = argv(
            &q,
            &json!({"size": 1, "src": "--output=/etc/x", "dst": "b"}),
            &[],
        )
        .expect_err("an option");
        assert!(
            e.contains("\"--output=/etc/x\"") && e.contains("allow_dash_values = true"),
            "{e}"
        );
        let e = argv(&q, &json!({"size": 1, "src": -3, "dst": "b"}), &[]).expect_err("number");
        assert!(e.contains("\"-3\""), "{e}");
        let q = queue("command = [\"thumb\", \"{src}\"]\nallow_dash_values = true");
        assert!(argv(&q, &json!({"src": "-x"}), &[]).is_ok());
    }

    #[test]
    fn nul_bytes_and_kernel_limits() {
        let q = queue(r#"shell = 'echo "$TASKD_ARG_a"'"#);
        let e = argv(&q, &json!({"a": "x\u{0}y"}), &[]).expect_err("NUL in env");
        assert!(e.contains("TASKD_ARG_a"), "{e}");
        assert!(
            argv(&q, &json!({"a-b": "x\u{0}y"}), &[]).is_ok(),
            "not a variable"
        );
        let e = argv(&q, &json!({}), &["a\u{0}".into()]).expect_err("NUL in args");
        assert!(e.contains("extra argument 1"), "{e}");
        let e = argv(&q, &json!({}), &["x".repeat(MAX_ARG_LEN + 1)]).expect_err("long");
        assert!(e.contains("131071"), "{e}");
        assert!(argv(&q, &json!({}), &["x".repeat(MAX_ARG_LEN)]).is_ok());
        let many = vec!["x".repeat(100_000); 11];
        let e = argv(&q, &json!({}), &many).expect_err("total");
        assert!(e.contains("1048576"), "{e}");
        let w = queue(r#"worker = ["w"]"#);
        assert!(argv(&w, &json!({"a": "x\u{0}"}), &["\u{0}".into()]).is_ok());
    }

    #[test]
    fn a_field_the_script_reads_must_fit_in_the_environment() {
        let q = queue(r#"shell = 'echo "${TASKD_ARG_small:-}" "$TASKD_ARG_big"'"#);
        assert_eq!(
            script_fields(r#"a $TASKD_ARG_x ${TASKD_ARG_y_2:-z} TASKD_ARG_ TASKD_ARG_x"#)
                .into_iter()
                .collect::<Vec<_>>(),
            ["x", "y_2"]
        );
        let big = "v".repeat(MAX_ENV_VAR);
        let e = argv(&q, &json!({"small": 1, "big": big}), &[]).expect_err("too big");
        assert!(e.contains("`big`") && e.contains("TASKD_ARG_big"), "{e}");
        assert!(
            argv(&q, &json!({"small": 1, "other": big}), &[]).is_ok(),
            "not read"
        );
        assert!(argv(&q, &json!({"small": 1, "big": "ok"}), &[]).is_ok());
        assert!(
            argv(&q, &json!({"big": null}), &[]).is_ok(),
            "null is never passed"
        );
    }

    #[test]
    fn payload_env_stays_within_its_budget() {
        let big = "v".repeat(60_000);
        let fields: serde_json::Map<String, Value> =
            (0..40).map(|i| (format!("f{i:02}"), json!(big))).collect();
        let payload = Value::Object(fields);
        let env = payload_env(&payload.to_string(), &payload);
        let total: usize = env.iter().map(|(k, v)| cost(k.len() + 1 + v.len())).sum();
        assert!(total <= MAX_PAYLOAD_ENV);
        assert_eq!(env.len(), 4, "four 60 KB fields fit in 256 KiB");
        assert_eq!(env[0].0, "TASKD_ARG_f00");
        let long_name = "n".repeat(140_000);
        let payload = json!({ long_name: 1, "small": "s", "nothing": null, "n": 5 });
        let env = payload_env(&payload.to_string(), &payload);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["TASKD_ARG_n", "TASKD_ARG_small"]);
    }
}
