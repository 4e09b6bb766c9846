//! The control socket: how `taskd reload` and `taskd restart` talk to a running daemon.
//!
//! A Unix stream socket (mode 0600: only its owner, normally root, may connect) at the
//! config's `control_socket` (default `state_dir/taskd.sock`). One request per connection, one JSON line each way:
//! `{"cmd":"reload"}` or `{"cmd":"restart","queue":"q"}` → `{"ok":true,"changes":[…]}` or
//! `{"ok":false,"errors":[…]}`. `{"cmd":"follow",…}` and `{"cmd":"tail",…}` are answered
//! with a stream instead (a header line, then one event per line), by the [`Streamer`] the
//! daemon hands in. The daemon owns the reload and the restart itself; this
//! module only carries requests to it and answers back, so that SIGHUP and `taskd reload` do
//! exactly the same thing, and so do `taskd restart` and the API's restart (which sends its
//! requests on the same channel). Each request carries who sent it: the peer's uid, as the
//! kernel reports it (SO_PEERCRED), which the daemon records in the audit trail.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// What a client may ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Reload,
    /// Restart the long-lived workers of a queue, one at a time.
    Restart {
        queue: String,
    },
    /// Stream a task's output (`taskd logs`): the answer is a header line, then one JSON
    /// event per line (see `follow`).
    Follow {
        task: String,
        /// Until the task ends; otherwise what exists now.
        #[serde(default)]
        follow: bool,
        /// Begin with this run (`taskd show`'s numbering).
        #[serde(default)]
        run: Option<u32>,
        /// Resume after this position (an event's id).
        #[serde(default)]
        from: Option<String>,
    },
    /// Stream the output of a queue's tasks as they run here (`taskd tail`).
    Tail {
        queue: String,
    },
}

impl Request {
    /// Answered with a stream on the connection, not with one line from the main loop.
    pub fn is_stream(&self) -> bool {
        matches!(self, Request::Follow { .. } | Request::Tail { .. })
    }
}

/// Answers the streaming requests ([`Request::is_stream`]) on the connection itself.
pub type Streamer = Arc<dyn Fn(Request, UnixStream) + Send + Sync>;

/// The daemon's answer to a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReply {
    pub ok: bool,
    /// What changed, one line per queue ("queue q: concurrency 1 → 4"); for a restart, what
    /// is being restarted.
    #[serde(default)]
    pub changes: Vec<String>,
    /// Why the new config was refused (its diagnostics), or why a restart was, when `ok` is
    /// false.
    #[serde(default)]
    pub errors: Vec<String>,
}

/// A request on its way to the daemon's main loop: what, who sent it (for the audit
/// trail: the socket peer's uid as the kernel reports it, or the API's caller), and the way
/// back.
pub struct Incoming {
    pub request: Request,
    pub who: crate::audit::Actor,
    pub reply: oneshot::Sender<ReloadReply>,
}

/// Bind the socket at `path` (replacing a stale one: the caller holds the state directory
/// lock, so no other daemon can be using it), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve a socket from [`bind`] until the returned task is aborted: every request goes to
/// the daemon's main loop through `to_daemon`, and its answer back.
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    to_daemon: mpsc::Sender<Incoming>,
    streamer: Option<Streamer>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let to_daemon = to_daemon.clone();
            let streamer = streamer.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, to_daemon, streamer).await {
                    tracing::debug!(error = %e, "control connection ended early");
                }
            });
        }
    }))
}

async fn answer(
    stream: UnixStream,
    to_daemon: mpsc::Sender<Incoming>,
    streamer: Option<Streamer>,
) -> std::io::Result<()> {
    // The kernel's word for who is on the other end (SO_PEERCRED), taken as the connection
    // was made: a request cannot claim another user.
    let who = match stream.peer_cred() {
        Ok(cred) => crate::audit::Actor::socket_peer(
            cred.uid(),
            cred.pid().and_then(|p| u32::try_from(p).ok()),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot tell who connected; refusing");
            return Err(e);
        }
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; a client that sends nothing is not waited on forever.
    let mut reader = BufReader::new(read.take(64 * 1024));
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) if req.is_stream() => match streamer {
            Some(streamer) => {
                let read = reader.into_inner().into_inner();
                let stream = read.reunite(write).map_err(std::io::Error::other)?;
                streamer(req, stream);
                return Ok(());
            }
            None => ReloadReply {
                ok: false,
                errors: vec!["this daemon does not stream output".into()],
                ..Default::default()
            },
        },
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            let incoming = Incoming {
                request,
                who,
                reply: tx,
            };
            if to_daemon.send(incoming).await.is_err() {
                ReloadReply {
                    ok: false,
                    errors: vec!["the daemon is shutting down".into()],
                    ..Default::default()
                }
            } else {
                rx.await.unwrap_or_else(|_| ReloadReply {
                    ok: false,
                    errors: vec!["the daemon dropped the request (shutting down?)".into()],
                    ..Default::default()
                })
            }
        }
        Err(e) => ReloadReply {
            ok: false,
            errors: vec![format!("bad request {line:?}: {e}")],
            ..Default::default()
        },
    };
    let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

/// Send `req` to the daemon at `path` and wait for its answer.
pub async fn request(path: &Path, req: &Request, wait: Duration) -> std::io::Result<ReloadReply> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut req = serde_json::to_string(req).map_err(std::io::Error::other)?;
    req.push('\n');
    write.write_all(req.as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(wait, BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer")
        })??;
    serde_json::from_str(line.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// An open stream answer ([`Request::is_stream`]): the daemon's header, then event lines.
pub struct StreamAnswer {
    pub header: ReloadReply,
    pub lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    /// Held, never written, while the stream is read: the daemon ends the session when it
    /// closes.
    pub _keep: tokio::net::unix::OwnedWriteHalf,
}

/// Send a streaming request to the daemon at `path` and read its header line.
pub async fn request_stream(path: &Path, req: &Request) -> std::io::Result<StreamAnswer> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(req).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer")
        })??
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            )
        })?;
    let header = serde_json::from_str(first.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(StreamAnswer {
        header,
        lines,
        _keep: write,
    })
}
