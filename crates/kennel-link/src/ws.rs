//! Accepting a daemon link's WebSocket with the limits an upgrade through axum cannot
//! express. Used by the coordinator's hub and by the relay's downstream side.
//!
//! - **Before authentication** a connection may carry at most `pre_auth_bytes` (the
//!   `authenticate` frame and nothing much else). The budget is enforced on the bytes read
//!   from the socket, so a client that starts a 15 MiB first frame is cut off after the budget,
//!   not after the frame; [`Budget::lift`] ends it once the key is checked.
//! - **Connections waiting to authenticate are counted** ([`PreAuthSlots`]); past the cap a new
//!   one is refused with 503 before the upgrade, so a crowd of idle sockets cannot hold memory.
//! - **Small buffers**: a 4 KiB read buffer per link instead of tungstenite's 128 KiB, so ten
//!   thousand idle daemons cost little memory; larger frames still arrive (the buffer grows
//!   for them).
//!
//! It must not know the protocol: it hands over a WebSocket; what the frames mean is the
//! caller's business.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::outbound::LinkRx;

/// The socket under an accepted link.
pub type LinkSocket = WebSocketStream<Budgeted<TokioIo<hyper::upgrade::Upgraded>>>;

/// Limits of one accepted link.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes the client may send before [`Budget::lift`].
    pub pre_auth_bytes: usize,
    /// Largest message (and frame) after authentication; beyond it the connection ends.
    pub max_message_bytes: usize,
}

/// Read buffer per link: enough for a heartbeat or an ack batch; it grows for bigger frames.
const READ_BUFFER_BYTES: usize = 4096;

/// How many bytes a connection may still read before it has authenticated.
#[derive(Debug, Clone)]
pub struct Budget(Arc<AtomicUsize>);

impl Budget {
    fn new(bytes: usize) -> Self {
        Budget(Arc::new(AtomicUsize::new(bytes)))
    }

    /// The client has authenticated: no byte budget from now on (the message limit stays).
    pub fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }

    /// Takes `n` bytes from the budget; false if they do not fit.
    fn take(&self, n: usize) -> bool {
        let mut left = self.0.load(Ordering::Relaxed);
        loop {
            if left == usize::MAX {
                return true;
            }
            if n > left {
                return false;
            }
            match self
                .0
                .compare_exchange_weak(left, left - n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => left = now,
            }
        }
    }
}

/// A stream whose reads are charged to a [`Budget`]; reading past it fails, which ends the
/// WebSocket.
#[derive(Debug)]
pub struct Budgeted<S> {
    inner: S,
    budget: Budget,
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = buf.filled().len() - before;
            if !self.budget.take(n) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the client sent more than the pre-authentication limit",
                )));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why an upgrade request was not accepted; answered as plain text.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    status: StatusCode,
    message: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let retry = [(header::RETRY_AFTER, HeaderValue::from_static("5"))];
            return (self.status, retry, self.message).into_response();
        }
        (self.status, self.message).into_response()
    }
}

/// Bad frames on one link are answered one by one but logged at most once per
/// [`BadFrameLog::EVERY`], with a count of those not logged: a peer sending garbage must not fill
/// the disk with warnings.
#[derive(Debug, Default)]
pub struct BadFrameLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl BadFrameLog {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// A bad frame arrived: `Some(n)` when it should be logged, `n` being how many were not
    /// logged since the last one; `None` to stay quiet.
    pub fn due(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Counts connections that have not authenticated yet.
#[derive(Debug, Clone)]
pub struct PreAuthSlots(Arc<Semaphore>);

impl PreAuthSlots {
    pub fn new(max: usize) -> Self {
        PreAuthSlots(Arc::new(Semaphore::new(max.max(1))))
    }

    /// A slot for one new connection, or a 503 answer when all are taken.
    pub fn take(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.0.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("kennel_links_refused_total", "reason" => "preAuthCap").increment(1);
            Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "too many connections are waiting to authenticate; retry shortly\n",
            }
        })
    }
}

/// Answers a daemon link's upgrade request: takes a [`PreAuthSlots`] slot (503 if none is
/// free), switches protocols (400/426 for a bad request), and runs `serve` on the link in a
/// task of its own; `serve` gets the slot to release once the daemon has authenticated.
pub fn accept<F, Fut>(req: Request, limits: Limits, slots: &PreAuthSlots, serve: F) -> Response
where
    F: FnOnce(Accepted, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slot = match slots.take() {
        Ok(s) => s,
        Err(busy) => return busy.into_response(),
    };
    match upgrade(req, limits) {
        Err(refused) => refused.into_response(),
        Ok((switching, accepted)) => {
            tokio::spawn(async move {
                if let Some(a) = accepted.await {
                    serve(a, slot).await;
                }
            });
            switching
        }
    }
}

/// What the upgrade hands over once the client has switched protocols.
pub struct Accepted {
    pub socket: LinkSocket,
    /// Lift it once the client has authenticated.
    pub budget: Budget,
}

/// Answers a WebSocket upgrade request: the 101 response to return now, and a future that
/// yields the link once the protocol switch is done. A request that is not a valid upgrade
/// gets a 400 (or 426) saying why.
pub fn upgrade(
    mut req: Request,
    limits: Limits,
) -> Result<
    (
        Response,
        impl std::future::Future<Output = Option<Accepted>> + Send,
    ),
    Refusal,
> {
    let bad = |status: StatusCode, message: &'static str| Refusal { status, message };
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(bad(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send `Connection: upgrade` and `Upgrade: websocket`\n",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version: send `Sec-WebSocket-Version: 13`\n",
        ));
    }
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "missing `Sec-WebSocket-Key` header\n",
        ));
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let rh = response.headers_mut();
    rh.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    rh.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&accept) {
        Ok(v) => {
            rh.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        Err(_) => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "invalid `Sec-WebSocket-Key` header\n",
            ))
        }
    }
    let budget = Budget::new(limits.pre_auth_bytes);
    let link_budget = budget.clone();
    let accepted = async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "WebSocket upgrade did not complete"
                );
                return None;
            }
        };
        let io = Budgeted {
            inner: TokioIo::new(upgraded),
            budget: link_budget,
        };
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = READ_BUFFER_BYTES;
        config.max_message_size = Some(limits.max_message_bytes);
        config.max_frame_size = Some(limits.max_message_bytes);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        Some(Accepted { socket, budget })
    };
    Ok((response, accepted))
}

/// A close frame; the reason is cut to fit the 123-byte limit of the WebSocket protocol.
pub fn close_message(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from(&reason[..end]),
    }))
}

/// What a link's writer does with one queued item: send a text frame, or close.
pub enum Frame {
    Text(String),
    Close(u16, String),
}

/// Items a link's outbound queue carries (the coordinator's messages, the relay's frames as
/// received).
pub trait IntoFrame {
    fn into_frame(self) -> Frame;
}

/// Items that can carry the close ending a link, queued behind whatever is still waiting so
/// the daemon reads those first.
pub trait Closing {
    fn closing(code: u16, reason: String) -> Self;
}

/// The writer of one daemon link: sends what is queued, batching whatever is ready into one
/// flush, until the queue closes, a close is queued, or the queue overflows (then it tries
/// briefly to say so with a close frame: the peer is not reading, so it may not get through).
pub async fn write_loop<T: IntoFrame>(
    mut sink: futures_util::stream::SplitSink<LinkSocket, Message>,
    mut rx: LinkRx<T>,
) {
    let tripwire = rx.tripwire();
    loop {
        let first = tokio::select! {
            biased;
            (code, reason) = tripwire.overflowed() => {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(200),
                    sink.send(close_message(code, &reason)),
                )
                .await;
                return;
            }
            o = rx.recv() => match o {
                Some(o) => o,
                None => return,
            },
        };
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item.into_frame() {
                Frame::Text(t) => {
                    metrics::counter!("kennel_frames_sent_total").increment(1);
                    if sink.feed(Message::Text(t.into())).await.is_err() {
                        return;
                    }
                }
                Frame::Close(code, reason) => {
                    let _ = sink.flush().await;
                    let _ = sink.send(close_message(code, &reason)).await;
                    return;
                }
            }
            // Feed what is queued already, flush once: fewer syscalls under load.
            next = rx.try_recv();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_runs_out_and_can_be_lifted() {
        let b = Budget::new(10);
        assert!(b.take(6));
        assert!(!b.take(5), "only 4 left");
        assert!(b.take(4));
        assert!(!b.take(1));
        b.lift();
        assert!(b.take(usize::MAX / 2));
    }
}
