//! The HTTP listener shared by the coordinator, the gateway and the relay: accepts TCP
//! connections, serves HTTP/1.1 on them (WebSocket upgrades included) and keeps slow, idle and
//! surplus clients from holding sockets, following [`HttpConfig`]:
//!
//! - a new connection must deliver a complete request head within `header_read_timeout`
//!   of its accept, and a kept-alive one within that much of its next request's first byte;
//! - a kept-alive connection waiting for its next request is closed after `idle_timeout`;
//! - at most `max_connections` connections (bounded by the open-files limit) are open at once,
//!   WebSockets included; a connection beyond that is closed as soon as it is accepted.
//!
//! While a request is being answered (a streamed response, an SSE stream, a slow handler) no
//! timeout applies; once a connection is upgraded it belongs to its WebSocket handler and only
//! its connection slot stays taken. Graceful shutdown works as `axum::serve`'s does: stop
//! accepting, let requests in progress finish, close idle connections.
//!
//! This module knows nothing of routes; each service hands it its `Router`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::Service as HyperService;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::HttpConfig;

/// Open files kept out of the connection budget: the store, logs, outgoing connections.
const FD_RESERVE: u64 = 64;

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets the
/// requests in progress finish and returns. Errors accepting a connection are logged and
/// retried, so this only returns once shut down. `fds_per_connection` is what one connection
/// costs in open files: 1 where a connection is only itself (the coordinator, a relay: mostly
/// daemon links), 2 where each request also opens an outgoing one (the gateway).
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    http: &HttpConfig,
    fds_per_connection: u64,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let cap = connection_cap(http.max_connections, fds_per_connection);
    if cap < http.max_connections {
        // The default asks for more than most limits allow on purpose ("as many as the
        // limit allows"): say so quietly; a configured value that cannot be met is a warning.
        if http.max_connections == HttpConfig::default().max_connections {
            tracing::info!(
                allowed = cap,
                "accepting up to {cap} connections (the open-files limit less a reserve)"
            );
        } else {
            tracing::warn!(
                configured = http.max_connections,
                allowed = cap,
                "the open-files limit allows fewer connections than max_connections; raise it \
                 (`ulimit -n`) to accept more"
            );
        }
    }
    let timeouts = Timeouts {
        header: http.header_read_timeout(),
        idle: http.idle_timeout(),
    };
    let slots = Arc::new(Semaphore::new(cap));
    // Dropping `stop_tx` tells every connection to finish its request and close.
    let (stop_tx, stop_rx) = watch::channel(());
    // Every connection task holds a receiver; `closed()` resolves when the last one ends.
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut saturated = false;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, usually: wait for some to close instead of spinning.
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "failed to accept a connection; retrying in 1 s"
                );
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !saturated {
                saturated = true;
                tracing::warn!(
                    max_connections = cap,
                    "connection limit reached; closing new connections until some end \
                     (raise max_connections in the http section if this load is expected)"
                );
            }
            drop(tcp);
            continue;
        };
        if saturated {
            saturated = false;
            tracing::info!("below the connection limit again; accepting connections");
        }
        // Small frames (spawnTask, acks, stream chunks) must not wait for Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "failed to set TCP_NODELAY"
            );
        }
        tokio::spawn(serve_connection(
            tcp,
            remote,
            slot,
            router.clone(),
            timeouts,
            stop_rx.clone(),
            done_rx.clone(),
        ));
    }
    drop(listener);
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// The most connections the open-files limit leaves room for: what remains after
/// [`FD_RESERVE`], divided by what one connection costs, at least 1.
fn connection_cap(configured: usize, fds_per_connection: u64) -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => {
            let room = (soft.saturating_sub(FD_RESERVE) / fds_per_connection.max(1)).max(1);
            configured.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
        Err(_) => configured,
    }
}

/// Accept errors that concern only the one connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// One connection, until it closes or is upgraded.
#[tracing::instrument(level = "debug", skip_all, fields(%remote))]
async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    router: Router,
    timeouts: Timeouts,
    mut stop: watch::Receiver<()>,
    _done: watch::Receiver<()>,
) {
    let watch = Arc::new(ConnWatch::new());
    let io = TokioIo::new(Watched {
        tcp,
        watch: watch.clone(),
        _slot: slot,
    });
    let service = Tracked {
        inner: TowerToHyperService::new(router),
        watch: watch.clone(),
        remote,
    };
    // No header-read timer of hyper's own: it would also cut kept-alive connections after
    // the header timeout, not the idle one. `ConnWatch` runs both.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = &e as &dyn std::error::Error, "connection ended with an error");
                }
                break;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            reason = watch.expired(timeouts) => {
                tracing::debug!(reason, "closing a connection");
                break;
            }
        }
    }
}

/// Where a connection is between requests, shared by its socket, its service and its watch.
struct ConnWatch {
    phase: Mutex<Phase>,
    /// Set while a kept-alive connection waits for its next request's first byte, so reads
    /// only take the lock when that byte may be the one.
    awaiting_first_byte: AtomicBool,
    changed: Notify,
}

enum Phase {
    /// No request in progress.
    Waiting {
        /// The accept, or the end of the last response.
        since: Instant,
        /// When the next request's first byte arrived (kept-alive connections only).
        first_byte: Option<Instant>,
        /// A request was answered on this connection before.
        kept_alive: bool,
    },
    /// This many requests are being answered (HTTP/1.1: one, pipelining aside).
    Busy(u32),
}

impl ConnWatch {
    fn new() -> Self {
        ConnWatch {
            phase: Mutex::new(Phase::Waiting {
                since: Instant::now(),
                first_byte: None,
                kept_alive: false,
            }),
            awaiting_first_byte: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request head arrived: no timeout until its response is done.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        {
            let mut p = self.lock();
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Waiting { .. } => Phase::Busy(1),
            };
            self.awaiting_first_byte.store(false, Ordering::Relaxed);
        }
        self.changed.notify_one();
        BusyGuard(self.clone())
    }

    fn response_done(&self) {
        {
            let mut p = self.lock();
            *p = match *p {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => {
                    self.awaiting_first_byte.store(true, Ordering::Relaxed);
                    Phase::Waiting {
                        since: Instant::now(),
                        first_byte: None,
                        kept_alive: true,
                    }
                }
            };
        }
        self.changed.notify_one();
    }

    fn first_byte(&self) {
        {
            let mut p = self.lock();
            if let Phase::Waiting {
                first_byte: first @ None,
                kept_alive: true,
                ..
            } = &mut *p
            {
                *first = Some(Instant::now());
            }
            self.awaiting_first_byte.store(false, Ordering::Relaxed);
        }
        self.changed.notify_one();
    }

    /// When the connection must close if nothing changes, and why.
    fn deadline(&self, t: Timeouts) -> Option<(Instant, &'static str)> {
        match *self.lock() {
            Phase::Busy(_) => None,
            Phase::Waiting {
                since,
                kept_alive: false,
                ..
            } => Some((since + t.header, "no complete request head in time")),
            Phase::Waiting {
                first_byte: Some(at),
                ..
            } => Some((at + t.header, "no complete request head in time")),
            Phase::Waiting { since, .. } => Some((since + t.idle, "idle")),
        }
    }

    /// Resolves once the connection has outstayed its current deadline.
    async fn expired(&self, t: Timeouts) -> &'static str {
        loop {
            let changed = self.changed.notified();
            match self.deadline(t) {
                None => changed.await,
                Some((at, _)) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {
                            // The phase may have moved on at the same instant.
                            if let Some((at, why)) = self.deadline(t) {
                                if at <= Instant::now() {
                                    return why;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Held from a request's head until its response body is done (or dropped).
struct BusyGuard(Arc<ConnWatch>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.response_done();
    }
}

/// The socket, telling the watch when a kept-alive connection's next request starts. It
/// holds the connection's slot, so an upgraded connection keeps it until the socket closes.
struct Watched {
    tcp: TcpStream,
    watch: Arc<ConnWatch>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before && this.watch.awaiting_first_byte.load(Ordering::Relaxed) {
            this.watch.first_byte();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The router as hyper calls it: adds the peer's address (`ConnectInfo<SocketAddr>`) and
/// marks the connection busy until the response body is done.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    watch: Arc<ConnWatch>,
    remote: SocketAddr,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl HyperService<Request<Incoming>> for Tracked {
    type Response = Response<GuardedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let guard = self.watch.busy();
        req.extensions_mut().insert(ConnectInfo(self.remote));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|body| GuardedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its connection busy until it is finished or dropped.
struct GuardedBody {
    inner: axum::body::Body,
    _guard: BusyGuard,
}

impl HttpBody for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_never_exceeds_the_configuration() {
        assert!(connection_cap(10, 2) <= 10);
        assert!(connection_cap(1, 1) == 1);
    }

    #[tokio::test]
    async fn deadlines_follow_the_phase() {
        let t = Timeouts {
            header: Duration::from_millis(200),
            idle: Duration::from_secs(600),
        };
        let w = Arc::new(ConnWatch::new());
        let (at, why) = w.deadline(t).unwrap();
        assert!(
            at <= Instant::now() + t.header,
            "a new connection gets the header timeout"
        );
        assert_eq!(why, "no complete request head in time");
        let guard = w.busy();
        assert!(w.deadline(t).is_none(), "no timeout while answering");
        assert!(!w.awaiting_first_byte.load(Ordering::Relaxed));
        drop(guard);
        let (at, why) = w.deadline(t).unwrap();
        assert_eq!(why, "idle");
        assert!(
            at > Instant::now() + t.idle / 2,
            "kept-alive: the idle timeout"
        );
        assert!(w.awaiting_first_byte.load(Ordering::Relaxed));
        w.first_byte();
        assert!(!w.awaiting_first_byte.load(Ordering::Relaxed));
        let started = Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(10), w.expired(t))
            .await
            .expect("the header timeout fires");
        assert_eq!(why, "no complete request head in time");
        assert!(
            started.elapsed() < t.idle / 2,
            "after the first byte: the header timeout"
        );
    }
}
