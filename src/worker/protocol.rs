//! The worker protocol, version 1 (docs/worker-protocol.md): line-delimited JSON on two
//! dedicated pipes, tasks on the worker's fd 3 and messages back on its fd 4.
//!
//! Pure data and parsing: no processes, no I/O.

use serde::{Deserialize, Serialize};

use crate::model::{QueueName, TaskId};

/// The protocol version this daemon speaks, announced in `TASKD_WORKER_PROTOCOL`.
pub const VERSION: u32 = 1;
/// The minor version, announced in `TASKD_WORKER_PROTOCOL_MINOR`: what this daemon
/// understands within [`VERSION`] (1: `result` in an `ok` answer; 2: `after` in a task
/// message; 3: `payload_b64` in a task message, for a raw payload; 4: `worker_fork`, a parent
/// that forks the workers). A minor version only adds optional fields and opt-in features, so
/// a worker written for an older one works unchanged.
pub const MINOR: u32 = 4;
/// The worker's descriptor on which tasks arrive (`TASKD_TASK_FD`).
pub const TASK_FD: i32 = 3;
/// The worker's descriptor on which it answers (`TASKD_RESULT_FD`).
pub const RESULT_FD: i32 = 4;
/// The worker parent's descriptor for the fork conversation (`TASKD_WORKER_FORK_FD`), with
/// `worker_fork`: one end of a `SOCK_SEQPACKET` socket pair, one JSON object per message.
pub const FORK_FD: i32 = 5;
/// A message line longer than this is a protocol error (memory stays bounded). A queue's
/// `max_result` is allowed on top, for an `ok` answer that carries a result.
pub const MAX_LINE: usize = 1024 * 1024;
/// How much of an offending line the log and the attempt's error keep.
pub const SHOWN_LINE: usize = 200;

/// One task, as sent to a worker (one line).
#[derive(Debug, Serialize)]
pub struct TaskMessage<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: TaskId,
    pub queue: &'a QueueName,
    pub attempt: u32,
    pub max_attempts: u32,
    pub payload: &'a serde_json::Value,
    pub args: &'a [String],
    /// The ids of the tasks this one ran after (`--after`; minor version 2), all of which
    /// succeeded; empty for most tasks.
    pub after: &'a [TaskId],
    /// A raw payload's bytes, base64-encoded (minor version 3); `payload` is then `null`.
    /// Absent for a JSON payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_b64: Option<&'a str>,
}

/// What a result says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// The task succeeded.
    Ok,
    /// The task failed for good: it is not retried.
    Error,
    /// The attempt failed: the task is retried with the queue's backoff while attempts remain.
    Retry,
}

/// A message from a worker (one line on fd 4).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
/// Fields taskd does not know are ignored, so that a worker may send more than version 1 needs.
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WorkerMessage {
    Ready {
        protocol: u32,
    },
    Result {
        id: TaskId,
        status: ResultStatus,
        #[serde(default)]
        message: Option<String>,
        /// What an `ok` task returned (minor version 1); ignored with `error` and `retry`.
        #[serde(default)]
        result: Option<serde_json::Value>,
    },
    Progress {
        id: TaskId,
        #[serde(default)]
        message: Option<String>,
    },
}

/// A message from a worker parent (`worker_fork`), one per `SOCK_SEQPACKET` message on
/// [`FORK_FD`]. Unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ParentMessage {
    /// The parent has loaded the program and takes `fork` requests.
    Forkserver { protocol: u32 },
    /// The worker for `slot` was forked as `pid`.
    Forked { slot: usize, pid: i32 },
    /// The parent could not fork the worker for `slot`.
    Error {
        slot: usize,
        #[serde(default)]
        message: String,
    },
    /// A forked worker ended; `status` as `waitpid` gives it.
    Exited { pid: i32, status: i32 },
}

/// Parses one message of a worker parent.
pub fn parse_parent(msg: &[u8]) -> Result<ParentMessage, String> {
    let text = std::str::from_utf8(msg).map_err(|_| "not UTF-8".to_string())?;
    serde_json::from_str(text.trim_end()).map_err(|e| e.to_string())
}

/// Parses one line; `Err` says why it is not a valid message.
pub fn parse(line: &[u8]) -> Result<WorkerMessage, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    serde_json::from_str(text.trim_end_matches('\r')).map_err(|e| e.to_string())
}

/// A line as shown in the log and in an attempt's error: lossy UTF-8, at most
/// [`SHOWN_LINE`] bytes, with a marker when cut.
pub fn show_line(line: &[u8]) -> String {
    let cut = line.len() > SHOWN_LINE;
    let text = String::from_utf8_lossy(&line[..line.len().min(SHOWN_LINE)]);
    let text: String = text.escape_debug().collect();
    if cut {
        format!("\"{text}\" … ({} bytes)", line.len())
    } else {
        format!("\"{text}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse(br#"{"type":"ready","protocol":1}"#),
            Ok(WorkerMessage::Ready { protocol: 1 })
        );
        let id = TaskId::new();
        let line =
            format!(r#"{{"type":"result","id":"{id}","status":"retry","message":"db down"}}"#);
        assert_eq!(
            parse(line.as_bytes()),
            Ok(WorkerMessage::Result {
                id,
                status: ResultStatus::Retry,
                message: Some("db down".into()),
                result: None,
            })
        );
        let line = format!(
            r#"{{"type":"result","id":"{id}","status":"ok","result":{{"n":123456789012345678901234567890,"s":"é"}}}}"#
        );
        let Ok(WorkerMessage::Result { result, .. }) = parse(line.as_bytes()) else {
            panic!("an ok answer with a result parses")
        };
        assert_eq!(
            serde_json::to_string(&result).unwrap(),
            r#"{"n":123456789012345678901234567890,"s":"é"}"#,
            "the result keeps its numbers as written"
        );
        let line = format!(r#"{{"type":"progress","id":"{id}"}}"#);
        assert!(matches!(
            parse(line.as_bytes()),
            Ok(WorkerMessage::Progress { .. })
        ));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(parse(b"hello").is_err());
        assert!(
            parse(br#"{"type":"result","status":"ok"}"#).is_err(),
            "no id"
        );
        assert!(parse(br#"{"type":"hello"}"#).is_err(), "unknown type");
        assert!(
            parse(br#"{"type":"result","id":"x","status":"ok"}"#).is_err(),
            "bad id"
        );
        assert!(parse(
            br#"{"type":"result","id":"0190f3c2-0000-7000-8000-000000000000","status":"done"}"#
        )
        .is_err());
        assert_eq!(
            parse(br#"{"type":"ready","protocol":1,"pid":7}"#),
            Ok(WorkerMessage::Ready { protocol: 1 }),
            "unknown fields are ignored"
        );
        assert!(parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn parent_messages_parse() {
        assert_eq!(
            parse_parent(br#"{"type":"forkserver","protocol":1}"#),
            Ok(ParentMessage::Forkserver { protocol: 1 })
        );
        assert_eq!(
            parse_parent(br#"{"type":"forked","slot":2,"pid":4711}"#),
            Ok(ParentMessage::Forked { slot: 2, pid: 4711 })
        );
        assert_eq!(
            parse_parent(b"{\"type\":\"exited\",\"pid\":4711,\"status\":9}\n"),
            Ok(ParentMessage::Exited {
                pid: 4711,
                status: 9
            })
        );
        assert!(parse_parent(br#"{"type":"ready","protocol":1}"#).is_err());
    }

    #[test]
    fn shown_lines_are_cut() {
        assert_eq!(show_line(b"abc\n"), "\"abc\\n\"");
        let long = vec![b'x'; 1000];
        let s = show_line(&long);
        assert!(s.ends_with("… (1000 bytes)"), "{s}");
        assert!(s.len() < 260);
    }
}
