//! The body a request's answer left unread, read before that answer goes out.
//!
//! Many answers come before the body is read: the guard's refusals (a missing or wrong
//! token, a foreign `Host` or `Origin`, a draining daemon), a route or method that does
//! not exist, a handler that takes no body, a 413 past the body's limit, a 408. Sent with
//! the body unread, such an answer ends the connection: hyper cannot tell where the next
//! request starts, so it closes the socket, under a client that may still be sending the
//! body (Python's `http.client` sends the head and the body in two writes). The client's
//! next write then fails with a broken pipe, and it never reads the status it was given.
//!
//! So every request's body is [`track`]ed: a handler that drops it before its end hands it
//! back, and [`Unread::settle`] reads what is left, discarding it, before the answer is
//! sent, which keeps the connection. Bounded, since anyone who can connect can be refused:
//! at most [`UNREAD_BODY_LIMIT`] bytes within [`UNREAD_BODY_TIMEOUT`]; a body with more
//! left (or slower) is answered at once with `Connection: close`, and the connection
//! closed, as before.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

/// The most bytes of a body read (and dropped) after its answer left them unread.
///
/// The guard refuses before any token is checked, so this is what a client without a
/// token can make the daemon read for nothing: 64 KiB, as much as one request's headers
/// may take ([`super::MAX_HEADER_BYTES`]), so a refused request costs no more than its
/// headers already could. Nothing is kept (each piece is dropped as it arrives): memory
/// stays hyper's read buffer. It is enough for the bodies clients send and get refused
/// (a submit is a few hundred bytes); a handler that refuses a caller the guard let
/// through, such as a submit to an unknown queue, reads the body up to its own limit
/// first.
pub const UNREAD_BODY_LIMIT: usize = 64 * 1024;

/// How long the rest of such a body may take to arrive: as long as a request's headers
/// ([`super::HEADER_TIMEOUT`]). Meanwhile the connection counts as idle (`serve_on`), so a
/// flood of slow refused bodies cannot keep new connections out.
pub const UNREAD_BODY_TIMEOUT: Duration = super::HEADER_TIMEOUT;

/// A body dropped before its end, handed back for [`Unread::settle`].
struct Left {
    body: Incoming,
    /// The handler asked for some of it (with `Expect: 100-continue`, hyper has then told
    /// the client to send it).
    polled: bool,
}

/// The body a request's handler reads: the connection's, handed back when dropped unread.
pub struct Tracked {
    body: Option<Incoming>,
    ended: bool,
    polled: bool,
    back: Arc<Mutex<Option<Left>>>,
}

/// What a request's handler left of its body, for [`Unread::settle`].
pub struct Unread {
    left: Arc<Mutex<Option<Left>>>,
    /// The client sent `Expect: 100-continue`: it waits for a word before it sends the body.
    expect_continue: bool,
}

/// `request` with its body [`Tracked`], and where what its handler leaves of it is found.
pub fn track(request: hyper::Request<Incoming>) -> (hyper::Request<Tracked>, Unread) {
    let expect_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let left = Arc::new(Mutex::new(None));
    let request = request.map(|body| Tracked {
        body: Some(body),
        ended: false,
        polled: false,
        back: left.clone(),
    });
    (
        request,
        Unread {
            left,
            expect_continue,
        },
    )
}

impl Unread {
    /// `response`, once what its request's handler left of the body is read (see the
    /// module); marked `Connection: close` when the rest was over [`UNREAD_BODY_LIMIT`],
    /// slower than [`UNREAD_BODY_TIMEOUT`] or broken (hyper then closes the connection).
    pub async fn settle(self, mut response: Response) -> Response {
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(left) = left else {
            return response;
        };
        // A client that sent `Expect: 100-continue` and was never asked for its body sends
        // it only once told to: answered now, it sends nothing (hyper closes the
        // connection, since the body's bytes could still come).
        let waiting = self.expect_continue && !left.polled;
        let read = !waiting
            && matches!(
                tokio::time::timeout(UNREAD_BODY_TIMEOUT, discard(left.body, UNREAD_BODY_LIMIT))
                    .await,
                Ok(true)
            );
        if !read {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Reads `body` to its end, dropping what it reads; false when it is over `limit` bytes
/// (known at once from a `Content-Length`) or breaks.
async fn discard(mut body: Incoming, limit: usize) -> bool {
    if body.size_hint().lower() > limit as u64 {
        return false;
    }
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        read += frame.data_ref().map_or(0, |data| data.len());
        if read > limit {
            return false;
        }
    }
    true
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let frame = std::pin::Pin::new(body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        *self.back.lock().unwrap_or_else(|p| p.into_inner()) = Some(Left {
            body,
            polled: self.polled,
        });
    }
}
