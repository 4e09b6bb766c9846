//! The HTTP API (axum) on `listen`: `/api/v1` (enqueue, batch, read, list, retry, cancel,
//! queues, pause/resume, restart), `/healthz`, `/metrics`, the OpenAPI document and the dashboard.
//!
//! It sees the config, the model and the [`Broker`] trait, never supervisor internals: the
//! broker is the system of record, and the API is one more client of it (as the CLI is).
//! What only the daemon can do (restart a queue's workers) goes to the daemon's main loop
//! as a [`crate::control::Request`], exactly as `taskd restart` sends it.
//!
//! Security: with a token configured, every mutating request must carry
//! `Authorization: Bearer TOKEN`; so must reads when `listen` is not a loopback address (the
//! config refuses a non-loopback `listen` without a token). Bodies are read up to a limit
//! derived from `max_payload`, headers are bounded, and every request has a deadline.
//!
//! A page open in the operator's browser must not drive the API: requests that change
//! anything are refused when their `Origin` is another site, and a loopback `listen` answers
//! only to local `Host` names (against DNS rebinding).
//!
//! Draining: once the daemon drains, every endpoint but `/metrics` answers 503; the server
//! itself stops when the drain is over.
//!
//! An answer given before the request's body was read (a refusal, most often) goes out once
//! the body is read, up to a small bound ([`unread`]), so that the connection stays open
//! under a client still sending it.

pub mod audit;
pub mod enqueue;
pub mod error;
mod handlers;
pub mod openapi;
mod output;
mod schedules;
pub mod unix;
mod unread;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
pub use error::ApiError;

/// How long one request may take, end to end, before it is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request line and headers (an idle keep-alive
/// connection too: the clock starts when the connection waits for a request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most header lines of one request.
pub const MAX_HEADERS: usize = 64;
/// The read buffer of a connection, which bounds the size of the headers.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A batch may carry this many bytes on top of `max_payload`.
pub const BATCH_BODY_EXTRA: usize = 64 * 1024 * 1024;
/// The most output streams (`…/output`) served at once.
pub const MAX_STREAMS: usize = 64;
/// How often an output stream sends a keep-alive comment while nothing else is sent.
pub const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<dyn Broker>,
    /// The current config (a reload swaps it: new queues, `max_payload`, token).
    config: Arc<RwLock<Arc<Config>>>,
    pub metrics: Arc<Metrics>,
    /// Set when the daemon drains: every request but `/metrics` gets 503.
    pub draining: CancellationToken,
    /// `listen` is not a loopback address: reads need the token too.
    reads_need_token: bool,
    /// `listen` is a loopback address: only local host names are served (DNS rebinding).
    loopback: bool,
    /// Served on a Unix socket: its file's permissions say who may connect, so no token is
    /// asked for, and no browser can reach it (no host name check).
    unix: bool,
    /// The most connections served at once ([`connection_limit`]; the daemon sets it from
    /// its open-files limit and its queues, again on reload).
    pub max_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The daemon's main loop, for requests only it can carry out (restart); `None` when
    /// the API is served without a daemon.
    control: Option<tokio::sync::mpsc::Sender<crate::control::Incoming>>,
    /// What the output streams read: the broker, and the daemon's live output when there
    /// is a daemon.
    pub follow: crate::follow::Source,
    /// Output streams open now (at most [`MAX_STREAMS`]).
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests refused for their token, for the log.
    refusals: Arc<Refusals>,
}

impl AppState {
    pub fn new(broker: Arc<dyn Broker>, config: Config, metrics: Arc<Metrics>) -> AppState {
        let tcp = || config.listen.iter().filter_map(|l| l.tcp());
        let reads_need_token = tcp().any(|a| !a.ip().is_loopback());
        let loopback = tcp().next().is_some() && tcp().all(|a| a.ip().is_loopback());
        AppState {
            loopback,
            unix: false,
            broker: broker.clone(),
            config: Arc::new(RwLock::new(Arc::new(config))),
            metrics,
            draining: CancellationToken::new(),
            reads_need_token,
            max_connections: Arc::new(std::sync::atomic::AtomicUsize::new(MAX_CONNECTIONS)),
            control: None,
            follow: crate::follow::Source {
                broker: broker.clone(),
                live: None,
                node: None,
            },
            streams: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            refusals: Arc::new(Refusals::default()),
        }
    }

    /// Serve the output streams from the daemon's live output (`source.live`).
    pub fn with_follow(mut self, source: crate::follow::Source) -> AppState {
        self.follow = source;
        self
    }

    /// The state for a listener bound to `addr`, which may differ from `listen` (a daemon
    /// started from code, on a port the caller chose): a loopback address answers only to
    /// local host names, any other needs the token for reads too.
    pub fn listening_on(mut self, addr: std::net::SocketAddr) -> AppState {
        self.loopback = addr.ip().is_loopback();
        self.reads_need_token = !self.loopback;
        self.unix = false;
        self
    }

    /// The state for a Unix socket listener: no token asked for (whoever can connect was
    /// let in by the file's permissions), no host name check (no browser reaches it).
    pub fn listening_on_unix(mut self) -> AppState {
        self.loopback = false;
        self.reads_need_token = false;
        self.unix = true;
        self
    }

    /// Hands requests only the daemon can carry out (restart) to its main loop.
    pub fn with_control(
        mut self,
        control: tokio::sync::mpsc::Sender<crate::control::Incoming>,
    ) -> AppState {
        self.control = Some(control);
        self
    }

    /// Sends `req`, made by `who`, to the daemon's main loop and waits for its answer (the
    /// daemon records it in the audit trail).
    pub async fn ask_daemon(
        &self,
        req: crate::control::Request,
        who: crate::audit::Actor,
    ) -> Option<crate::control::ReloadReply> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.control
            .as_ref()?
            .send(crate::control::Incoming {
                request: req,
                who,
                reply: tx,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Take a reloaded config (queues, `max_payload`, token).
    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// A broker result, counting failures in `taskd_broker_errors_total`.
    pub fn broker<T>(&self, result: crate::broker::Result<T>) -> Result<T, ApiError> {
        result.map_err(|e| self.broker_error(e))
    }

    /// An enqueue's answer: a parent that does not exist (broker rule 13) is the request's
    /// fault, answered 422 with the id.
    pub fn enqueued<T>(&self, result: crate::broker::Result<T>) -> Result<T, ApiError> {
        result.map_err(|e| match e {
            crate::broker::BrokerError::NotFound(p) => {
                ApiError::invalid(crate::submission::unknown_parent(p))
            }
            e => self.broker_error(e),
        })
    }

    /// A broker error as the API answers it, counted in `taskd_broker_errors_total` when the
    /// store failed (not when it refused a request).
    pub fn broker_error(&self, error: crate::broker::BrokerError) -> ApiError {
        if matches!(
            error,
            crate::broker::BrokerError::Unavailable(_)
                | crate::broker::BrokerError::Storage(_)
                | crate::broker::BrokerError::Full(_)
        ) {
            self.metrics.broker_error();
        }
        ApiError::from(error)
    }
}

/// Every route: method, path (axum syntax), handler. The router is built from this list, and
/// a test checks it against the OpenAPI document, both ways.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    use axum::routing::{get, post};
    use handlers as h;
    vec![
        (Method::GET, "/", get(h::dashboard)),
        (Method::GET, "/healthz", get(h::healthz)),
        (Method::GET, "/metrics", get(h::metrics)),
        (Method::GET, "/api/v1/openapi.json", get(h::openapi)),
        (Method::GET, "/api/v1/queues", get(h::list_queues)),
        (
            Method::POST,
            "/api/v1/queues/{queue}/tasks",
            post(h::enqueue),
        ),
        (
            Method::POST,
            "/api/v1/queues/{queue}/tasks/batch",
            post(h::enqueue_batch),
        ),
        (Method::POST, "/api/v1/queues/{queue}/pause", post(h::pause)),
        (
            Method::POST,
            "/api/v1/queues/{queue}/resume",
            post(h::resume),
        ),
        (
            Method::POST,
            "/api/v1/queues/{queue}/restart",
            post(h::restart),
        ),
        (Method::GET, "/api/v1/tasks", get(h::list_tasks)),
        (Method::POST, "/api/v1/tasks/bulk", post(h::bulk)),
        (Method::GET, "/api/v1/stats", get(h::stats)),
        (Method::GET, "/api/v1/tasks/{id}", get(h::get_task)),
        (Method::GET, "/api/v1/tasks/{id}/why", get(h::why_task)),
        (
            Method::GET,
            "/api/v1/tasks/{id}/output",
            get(output::task_output),
        ),
        (
            Method::GET,
            "/api/v1/queues/{queue}/output",
            get(output::queue_output),
        ),
        (Method::POST, "/api/v1/tasks/{id}/retry", post(h::retry)),
        (Method::POST, "/api/v1/tasks/{id}/cancel", post(h::cancel)),
        (Method::GET, "/api/v1/schedules", get(schedules::list)),
        (Method::GET, "/api/v1/schedules/{name}", get(schedules::get)),
        (
            Method::POST,
            "/api/v1/schedules/{name}/fire",
            post(schedules::fire),
        ),
        (
            Method::POST,
            "/api/v1/schedules/{name}/pause",
            post(schedules::pause),
        ),
        (
            Method::POST,
            "/api/v1/schedules/{name}/resume",
            post(schedules::resume),
        ),
        (Method::GET, "/api/v1/audit", get(audit::list)),
    ]
}

/// The application: routes, auth, drain, deadline.
pub fn router(state: AppState) -> Router {
    let mut r = Router::new();
    for (_, path, handler) in routes() {
        r = r.route(path, handler);
    }
    r.fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no endpoint {} {}; see /api/v1/openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {}; see /api/v1/openapi.json",
            req.uri().path(),
            req.method()
        ),
    )
}

/// The client of a request, as the server accepted its connection: a TCP address, or a
/// Unix socket's peer as the kernel reports it (SO_PEERCRED).
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix { uid: u32, pid: Option<u32> },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix {
                uid,
                pid: Some(pid),
            } => write!(f, "unix socket uid {uid} pid {pid}"),
            Peer::Unix { uid, pid: None } => write!(f, "unix socket uid {uid}"),
        }
    }
}

/// Drain and token checks, before any handler runs. A request that passes them carries
/// who made it (a [`Caller`]: the name of its token, the client's address) in its
/// extensions, for the audit trail ([`Who`]).
async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().copied();
    let path = req.uri().path().to_string();
    let path = path.as_str();
    if state.draining.is_cancelled() && path != "/metrics" {
        return ApiError::draining().into_response();
    }
    let mutating = req.method() != Method::GET && req.method() != Method::HEAD;
    // A web page in the operator's browser must not drive the API: browsers send `Origin`
    // with cross-site requests (which a loopback API without a token would otherwise obey),
    // and a rebound DNS name reaches loopback with a foreign `Host`.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if state.loopback && !state.unix && !local_host(host) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_host",
            format!("this daemon listens on a loopback address and answers only to local host names (127.0.0.1, [::1], localhost), not `{host}`"),
        )
        .into_response();
    }
    if mutating {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            if origin_host != host {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "cross_origin",
                    format!(
                        "a request from the web page at `{origin}` may not change anything here"
                    ),
                )
                .into_response();
            }
        }
    }
    let needs_token = path.starts_with("/api/v1/")
        && path != "/api/v1/openapi.json"
        && !state.unix
        && (mutating || state.reads_need_token);
    let config = state.config();
    let mut token_name = None;
    if needs_token && config.has_tokens() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials);
        let refused = match given.map(|t| config.token_name(t.trim())) {
            None => Some(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "this endpoint needs `Authorization: Bearer TOKEN` (a token of [taskd] in the daemon's config)",
            )),
            Some(None) => Some(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "the bearer token is none of the daemon's tokens",
            )),
            Some(Some(name)) => {
                token_name = Some(name.to_string());
                None
            }
        };
        if let Some(refused) = refused {
            // Not an operator's change, so not in the audit trail (anyone who reaches the
            // port could push real records out of it): in the log, at most a line a second.
            if mutating {
                state.refusals.note(req.method(), path, peer, refused.code);
            }
            return refused.into_response();
        }
    }
    req.extensions_mut().insert(Caller {
        peer,
        token: token_name,
    });
    next.run(req).await
}

/// Who made a request, as the guard let it through: its peer and the name of the token it
/// carried. Only a handler that records a change turns it into an [`crate::audit::Actor`]
/// ([`Who`]), which looks a Unix peer's uid up in the user database: an enqueue, which
/// records nothing, does not pay for reading `/etc/passwd` on every call.
#[derive(Clone)]
struct Caller {
    peer: Option<Peer>,
    token: Option<String>,
}

/// The [`crate::audit::Actor`] of a request, for its audit record: a handler takes it with
/// `Who(who): Who`.
pub struct Who(pub crate::audit::Actor);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Who {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let caller = parts.extensions.get::<Caller>();
        let peer = caller.and_then(|c| c.peer);
        Ok(Who(match peer {
            Some(Peer::Unix { uid, pid }) => crate::audit::Actor::api_unix(uid, pid),
            _ => crate::audit::Actor::api(
                caller.and_then(|c| c.token.clone()),
                peer.map(|p| p.to_string()),
            ),
        }))
    }
}

/// Mutating requests refused for their token, logged at warn at most once a second (with
/// how many were not logged since), so that a flood cannot fill the log.
#[derive(Default)]
pub struct Refusals {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Refusals {
    fn note(&self, method: &Method, path: &str, peer: Option<Peer>, code: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if s.0
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            s.1 += 1;
            return;
        }
        let unlogged = std::mem::take(&mut s.1);
        s.0 = Some(now);
        let peer = peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
        tracing::warn!(
            %method,
            path,
            %peer,
            code,
            unlogged,
            "API: refused {method} {path} from {peer}: {code} (not an operator's change, so not in the audit trail)"
        );
    }
}

/// The credentials of an `Authorization: Bearer …` value. The scheme name is
/// case-insensitive (RFC 9110 §11.1), so `bearer` and `BEARER` are accepted too.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim_start())
}

/// `127.0.0.1`, `[::1]` or `localhost`, with any port.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Bind `addr`. Separate from [`serve_on`] so the daemon fails at start-up, before READY, when
/// the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The fewest API connections a daemon serves at once, however few descriptors it has.
pub const MIN_CONNECTIONS: usize = 8;
/// The most API connections a daemon serves at once, however many descriptors it has.
pub const MAX_CONNECTIONS: usize = 1024;

/// How many API connections a daemon with this open-files soft limit serves at once, when
/// `reserved` descriptors are its own and its task slots' (`executor::reserved_fds`: 64 for
/// the store, sockets and log; per slot up to 8 for a running task's pipes, log files and
/// pidfd, and its cgroup's open files). Tasks come first: the API gets half of what is
/// left, so that a flood of connections can never take the descriptors a task needs to
/// start.
pub fn connection_limit(nofile_soft: u64, reserved: u64) -> usize {
    let spare = nofile_soft.saturating_sub(reserved) / 2;
    usize::try_from(spare)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// The connections being served, oldest first, so that a new one beyond the limit can take
/// the place of the oldest that is not in the middle of a request (an idle keep-alive
/// connection, or one that has not finished sending its headers).
#[derive(Default)]
struct Connections {
    next: u64,
    open: std::collections::BTreeMap<u64, Conn>,
    /// When the limit was last reported in the log (once a minute at most).
    warned: Option<std::time::Instant>,
}

struct Conn {
    /// Requests of this connection a handler is working on.
    busy: Arc<std::sync::atomic::AtomicUsize>,
    close: CancellationToken,
}

impl Connections {
    /// Make room for one more connection: close the oldest idle one when `limit` are open.
    /// `false` when every open connection is in the middle of a request.
    fn make_room(&mut self, limit: usize) -> bool {
        if self.open.len() < limit {
            return true;
        }
        let idle = self.open.iter().find(|(_, c)| {
            c.busy.load(std::sync::atomic::Ordering::Acquire) == 0 && !c.close.is_cancelled()
        });
        let room = match idle {
            Some((_, c)) => {
                c.close.cancel();
                true
            }
            None => false,
        };
        let now = std::time::Instant::now();
        if !matches!(self.warned, Some(t) if now.duration_since(t) < Duration::from_secs(60)) {
            self.warned = Some(now);
            tracing::warn!(
                limit,
                "API: {limit} connections open, the most this daemon serves (see docs/api.md); {}",
                if room {
                    "closing the oldest idle one for each new one"
                } else {
                    "every one is busy: refusing new ones"
                }
            );
        }
        room
    }
}

/// A socket the API accepts connections on.
pub enum ApiSocket {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

/// An accepted connection.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl ApiSocket {
    async fn accept(&self) -> std::io::Result<(Accepted, Peer)> {
        match self {
            ApiSocket::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Accepted::Tcp(stream), Peer::Tcp(addr)))
            }
            ApiSocket::Unix(l) => {
                let (stream, _) = l.accept().await?;
                // The kernel's word for who connected, taken as the connection was made.
                let cred = stream.peer_cred()?;
                let peer = Peer::Unix {
                    uid: cred.uid(),
                    pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                };
                Ok((Accepted::Unix(stream), peer))
            }
        }
    }
}

/// Serve `state` on `listener` (TCP, or a Unix socket whose state should come from
/// [`AppState::listening_on_unix`]) until `stop` is cancelled; then finish open requests (at
/// most a second) and return. At most [`AppState::max_connections`] are served at once (see
/// [`connection_limit`]): past that, a new connection closes the oldest idle one, or is
/// refused when all are busy.
pub async fn serve_on(listener: ApiSocket, state: AppState, stop: CancellationToken) {
    let limit = state.max_connections.clone();
    let app = router(state);
    let conns = TaskTracker::new();
    let open = Arc::new(std::sync::Mutex::new(Connections::default()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, mostly: back off instead of spinning.
                    tracing::warn!(error = %e, "API: failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let (id, busy, close) = {
            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
            if !o.make_room(limit.load(std::sync::atomic::Ordering::Relaxed)) {
                drop(stream);
                continue;
            }
            let id = o.next;
            o.next += 1;
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let close = CancellationToken::new();
            o.open.insert(
                id,
                Conn {
                    busy: busy.clone(),
                    close: close.clone(),
                },
            );
            (id, busy, close)
        };
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer);
                let app = app.clone();
                let busy = busy.clone();
                busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                async move {
                    let (req, unread) = unread::track(req);
                    let Ok(response) = tower::ServiceExt::oneshot(app, req).await;
                    // Reading what the answer left of the body counts as idle: a flood of
                    // refused requests with slow bodies cannot keep new connections out.
                    busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    Ok::<_, std::convert::Infallible>(unread.settle(response).await)
                }
            });
        let stop = stop.clone();
        let open = open.clone();
        conns.spawn(async move {
            let r = match stream {
                Accepted::Tcp(s) => connection(s, svc, &close, &stop).await,
                Accepted::Unix(s) => connection(s, svc, &close, &stop).await,
            };
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .open
                .remove(&id);
            if let Some(Err(e)) = r {
                tracing::debug!(peer = %peer, error = %e, "API connection ended with an error");
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
}

/// One connection served until it ends, `close` (closed to make room for a newer one:
/// `None`) or `stop` (its open requests finished first).
async fn connection<S, Svc>(
    stream: S,
    svc: Svc,
    close: &CancellationToken,
    stop: &CancellationToken,
) -> Option<Result<(), hyper::Error>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Send,
    Svc::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => Some(r),
        // Closed to make room for a newer connection: dropping it closes the socket.
        _ = close.cancelled() => None,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            Some(conn.await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_half_of_what_tasks_leave() {
        // 1024 descriptors, 4 task slots: 64 + 32 reserved, half of the rest.
        assert_eq!(connection_limit(1024, 64 + 8 * 4), 464);
        // Never fewer than MIN_CONNECTIONS, never more than MAX_CONNECTIONS.
        assert_eq!(connection_limit(100, 64 + 8 * 64), MIN_CONNECTIONS);
        assert_eq!(connection_limit(1 << 20, 64 + 8), MAX_CONNECTIONS);
    }

    #[test]
    fn a_new_connection_closes_the_oldest_idle_one() {
        let mut c = Connections::default();
        let add = |c: &mut Connections, busy: usize| {
            let conn = Conn {
                busy: Arc::new(std::sync::atomic::AtomicUsize::new(busy)),
                close: CancellationToken::new(),
            };
            let close = conn.close.clone();
            c.open.insert(c.next, conn);
            c.next += 1;
            close
        };
        let busy = add(&mut c, 1);
        let idle = add(&mut c, 0);
        assert!(c.make_room(3), "room without closing anything");
        assert!(!idle.is_cancelled());
        assert!(c.make_room(2), "the idle one makes room");
        assert!(idle.is_cancelled() && !busy.is_cancelled());
        c.open.remove(&1);
        assert!(!c.make_room(1), "every open connection is busy");
        assert!(!busy.is_cancelled());
    }
}
