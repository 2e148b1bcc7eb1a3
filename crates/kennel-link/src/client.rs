//! The client side of a daemon link, used by the daemon and the relay's upstream: connect,
//! send `authenticate`, wait for the answer within a deadline, then send heartbeats at the
//! interval the upstream announces, carry frames both ways, and reconnect forever with
//! [`reconnect_backoff`](crate::reconnect_backoff), starting it over after every session the
//! upstream accepted. How a session ends is a [`SessionEnd`]; a refusal is a typed [`Refusal`].
//!
//! What differs between the two ends (who they say they are, which attempts they hold, what
//! they replay, what they do with each frame, whether a refusal stops them) is an
//! [`Upstream`]. This module must not know about outboxes, executors or the relay's queue.

use std::future::Future;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use kennel_proto::link::{close, Authenticated, ErrorCode};
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ws::close_message;

/// How long the upstream has to answer `authenticate`.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(10);

/// Most frames read in one go once one has arrived: those already waiting are handled
/// together (a run of acks in one transaction).
const BATCH: usize = 128;

/// How long a clean stop waits for the upstream's Close reply.
const CLOSE_REPLY: Duration = Duration::from_secs(2);

/// The upstream turned this end away in answer to `authenticate`, with an `error` frame or a
/// close code (`kennel_proto::link::close`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The key is missing, unknown, revoked or lacks the scope.
    Unauthorized(String),
    /// No protocol version in common.
    UnsupportedVersion(String),
    /// Any other `error` answer; the message says what.
    Other { code: ErrorCode, message: String },
}

impl Refusal {
    /// What the upstream said.
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthorized(m) | Refusal::UnsupportedVersion(m) => m,
            Refusal::Other { message, .. } => message,
        }
    }

    fn from_error(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::Unauthorized => Refusal::Unauthorized(message),
            ErrorCode::UnsupportedVersion => Refusal::UnsupportedVersion(message),
            code => Refusal::Other { code, message },
        }
    }

    /// A close during authentication that refuses by its code alone.
    fn from_close(code: u16, reason: &str) -> Option<Self> {
        match code {
            close::UNAUTHORIZED => Some(Refusal::Unauthorized(reason.to_string())),
            close::UNSUPPORTED_VERSION => Some(Refusal::UnsupportedVersion(reason.to_string())),
            _ => None,
        }
    }
}

/// How one session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The stop signal fired.
    #[error("shutting down")]
    Shutdown,
    /// [`Upstream::reconnect_requested`] fired: reconnect now, with a fresh backoff.
    #[error("reconnect requested")]
    ReconnectRequested,
    /// This end could not start or carry on the session (its own reason, e.g. an unreadable
    /// outbox or a bad upstream URL).
    #[error("{0}")]
    Local(String),
    /// The upstream could not be reached.
    #[error("cannot connect to {url}: {error}")]
    Unreachable {
        url: String,
        error: tungstenite::Error,
    },
    /// The upstream turned this end away.
    #[error("the upstream refused: {}", .0.message())]
    Refused(Refusal),
    /// Nothing answered `authenticate` within the deadline.
    #[error("no answer to authenticate within {}s", .0.as_secs())]
    NoAnswer(Duration),
    /// The upstream answered `authenticate` with something else than `authenticated`.
    #[error("unexpected first answer: {0}")]
    UnexpectedAnswer(String),
    /// The connection closed (with the upstream's close frame, if it sent one).
    #[error("{}", closed(*.during_auth, .frame.as_ref()))]
    Closed {
        during_auth: bool,
        frame: Option<(u16, String)>,
    },
    /// The connection failed while reading.
    #[error("connection failed: {0}")]
    Failed(tungstenite::Error),
    /// A frame could not be sent.
    #[error("send failed: {0}")]
    SendFailed(tungstenite::Error),
    /// [`Upstream::outgoing`] has nothing more, ever.
    #[error("nothing more to send upstream: the sender stopped")]
    SenderGone,
}

fn closed(during_auth: bool, frame: Option<&(u16, String)>) -> String {
    match (during_auth, frame) {
        (true, None) => "connection closed during authentication".into(),
        (true, Some((code, reason))) => format!("closed during authentication: {code} {reason}"),
        (false, None) => "upstream closed the connection".into(),
        (false, Some((code, reason))) => {
            format!("upstream closed the connection: {code} {reason}")
        }
    }
}

/// What one client end supplies to the session.
pub trait Upstream: Send {
    /// Where to connect, in order of preference: several coordinators sharing one database,
    /// or one address (a load balancer). `Err` says why there is nowhere.
    fn urls(&self) -> Result<Vec<String>, String>;

    /// The `authenticate` frame, listing the attempts this end holds; asked for on every
    /// connection, once the socket is open.
    fn hello(&mut self) -> Result<DaemonMessage, String>;

    /// The upstream at `url` accepted this end: note it, and return the frames to send first,
    /// in order (what it has not acknowledged).
    fn accepted(&mut self, url: &str, answer: &Authenticated) -> Result<Vec<String>, String>;

    /// The next frame to send; `None` when there will never be one.
    fn outgoing(&mut self) -> impl Future<Output = Option<String>> + Send;

    /// A frame ready to send now, if any (to batch behind the one [`Self::outgoing`] gave).
    fn try_outgoing(&mut self) -> Option<String>;

    /// The heartbeat, due every interval the upstream announced.
    fn heartbeat(&mut self) -> DaemonMessage;

    /// Frames that arrived together, in order. Returns frames to send at once (a resend).
    fn received(&mut self, frames: &[Utf8Bytes]) -> impl Future<Output = Vec<String>> + Send;

    /// The session ended; `retry_in` is the wait before the next one (`None`: none follows,
    /// or it follows at once).
    fn ended(&mut self, end: &SessionEnd, retry_in: Option<Duration>);

    /// Whether a refusal stops the link for good instead of being retried.
    fn gives_up(&self, _refusal: &Refusal) -> bool {
        false
    }

    /// Fires when the running session should end and a new one start at once, with a fresh
    /// backoff. Asked for once per session and once per wait.
    fn reconnect_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    /// The reason of the Close frame (going away) sent on a clean stop, after whatever
    /// [`Self::try_outgoing`] still has; `None` drops the connection without one.
    fn goodbye(&self) -> Option<&'static str> {
        None
    }
}

/// Runs sessions until `shutdown` fires (`Ok`) or a refusal [`Upstream::gives_up`] (`Err`).
/// Between sessions it waits for the next delay of `backoff()`, begun anew after every
/// session the upstream accepted.
///
/// With several URLs, a session the upstream did not accept moves on to the next URL at once;
/// the backoff delay comes only after every URL has failed in a row. A session that was
/// accepted and then ended is retried at the same URL first, after the first delay.
pub async fn run<U, F, B>(
    upstream: &mut U,
    mut shutdown: watch::Receiver<bool>,
    auth_deadline: Duration,
    backoff: F,
) -> Result<(), Refusal>
where
    U: Upstream,
    F: Fn() -> B,
    B: Iterator<Item = Duration>,
{
    let mut delays = backoff();
    // The URL to try next, and how many have failed in a row since the last accepted session.
    let mut at = 0usize;
    let mut misses = 0usize;
    loop {
        let (url, count) = match upstream.urls() {
            Ok(urls) if urls.is_empty() => (Err("no upstream URL is configured".into()), 1),
            Ok(urls) => (Ok(urls[at % urls.len()].clone()), urls.len()),
            Err(reason) => (Err(reason), 1),
        };
        let (end, accepted) = session(upstream, url, &mut shutdown, auth_deadline).await;
        if accepted {
            delays = backoff();
            misses = 0;
        }
        let delay = match &end {
            SessionEnd::Shutdown => {
                upstream.ended(&end, None);
                return Ok(());
            }
            SessionEnd::Refused(r) if upstream.gives_up(r) => {
                upstream.ended(&end, None);
                return Err(r.clone());
            }
            SessionEnd::ReconnectRequested => {
                upstream.ended(&end, None);
                delays = backoff();
                continue;
            }
            _ if !accepted => {
                at = at.wrapping_add(1);
                misses += 1;
                if !misses.is_multiple_of(count) {
                    // Another URL has not been tried in this round: try it now.
                    upstream.ended(&end, Some(Duration::ZERO));
                    continue;
                }
                delays.next().unwrap_or(Duration::from_secs(60))
            }
            _ => delays.next().unwrap_or(Duration::from_secs(60)),
        };
        upstream.ended(&end, Some(delay));
        let again = upstream.reconnect_requested();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = again => {}
            _ = shutdown.changed() => {
                upstream.ended(&SessionEnd::Shutdown, None);
                return Ok(());
            }
        }
    }
}

/// One connection, from connect to its end; also says whether the upstream accepted it.
async fn session<U: Upstream>(
    upstream: &mut U,
    url: Result<String, String>,
    shutdown: &mut watch::Receiver<bool>,
    auth_deadline: Duration,
) -> (SessionEnd, bool) {
    if *shutdown.borrow() {
        return (SessionEnd::Shutdown, false);
    }
    let again = upstream.reconnect_requested();
    tokio::pin!(again);
    let url = match url {
        Ok(url) => url,
        Err(reason) => return (SessionEnd::Local(reason), false),
    };
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true);
    let ws = tokio::select! {
        c = connect => match c {
            Ok((ws, _)) => ws,
            Err(error) => return (SessionEnd::Unreachable { url, error }, false),
        },
        _ = &mut again => return (SessionEnd::ReconnectRequested, false),
        _ = shutdown.changed() => return (SessionEnd::Shutdown, false),
    };
    let mut link = Connection {
        ws,
        goodbye: upstream.goodbye(),
    };
    let answer = tokio::select! {
        a = link.authenticate(upstream, auth_deadline) => a,
        _ = &mut again => return (SessionEnd::ReconnectRequested, false),
        _ = shutdown.changed() => {
            link.close().await;
            return (SessionEnd::Shutdown, false);
        }
    };
    let answer = match answer {
        Ok(a) => a,
        Err(end) => return (end, false),
    };
    let end = link.carry(upstream, &url, &answer, shutdown, again).await;
    (end, true)
}

/// One open connection to the upstream.
struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    goodbye: Option<&'static str>,
}

impl Connection {
    /// Sends `authenticate` and waits for the answer.
    async fn authenticate<U: Upstream>(
        &mut self,
        upstream: &mut U,
        deadline: Duration,
    ) -> Result<Authenticated, SessionEnd> {
        let hello = upstream.hello().map_err(SessionEnd::Local)?;
        self.ws
            .send(Message::Text(hello.to_json().into()))
            .await
            .map_err(SessionEnd::SendFailed)?;
        loop {
            let frame = match tokio::time::timeout(deadline, self.ws.next()).await {
                Err(_) => return Err(SessionEnd::NoAnswer(deadline)),
                Ok(None) => {
                    return Err(SessionEnd::Closed {
                        during_auth: true,
                        frame: None,
                    })
                }
                Ok(Some(Err(e))) => return Err(SessionEnd::Failed(e)),
                Ok(Some(Ok(f))) => f,
            };
            match frame {
                Message::Text(t) => {
                    return match decode_server_frame(t.as_str(), usize::MAX) {
                        Ok(Decoded::Known(ServerMessage::Authenticated(a))) => Ok(a),
                        Ok(Decoded::Known(ServerMessage::Error(e))) => {
                            Err(SessionEnd::Refused(Refusal::from_error(e.code, e.message)))
                        }
                        Ok(other) => Err(SessionEnd::UnexpectedAnswer(format!("{other:?}"))),
                        Err(e) => Err(SessionEnd::UnexpectedAnswer(format!(
                            "bad frame from upstream: {e}"
                        ))),
                    }
                }
                Message::Close(c) => {
                    let frame = c.map(parts);
                    if let Some(r) = frame.as_ref().and_then(|(c, r)| Refusal::from_close(*c, r)) {
                        return Err(SessionEnd::Refused(r));
                    }
                    return Err(SessionEnd::Closed {
                        during_auth: true,
                        frame,
                    });
                }
                _ => continue,
            }
        }
    }

    /// The accepted session: the replay, then frames both ways and heartbeats until it ends.
    /// A stop or a reconnect request is noticed between steps, never inside one: a frame taken
    /// from [`Upstream::outgoing`] is sent, a batch handed to [`Upstream::received`] is
    /// handled to the end.
    async fn carry<U: Upstream>(
        &mut self,
        upstream: &mut U,
        url: &str,
        answer: &Authenticated,
        shutdown: &mut watch::Receiver<bool>,
        mut again: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> SessionEnd {
        match upstream.accepted(url, answer) {
            Ok(first) => {
                if let Err(e) = self.send_all(first).await {
                    return SessionEnd::SendFailed(e);
                }
            }
            Err(reason) => return SessionEnd::Local(reason),
        }
        let every = Duration::from_secs(answer.heartbeat_interval_secs.max(1));
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = &mut again => return SessionEnd::ReconnectRequested,
                _ = shutdown.changed() => {
                    self.stop(upstream).await;
                    return SessionEnd::Shutdown;
                }
                out = upstream.outgoing() => {
                    let Some(first) = out else { return SessionEnd::SenderGone };
                    let mut frames = vec![first];
                    // Whatever else is ready goes in the same flush.
                    while let Some(next) = upstream.try_outgoing() {
                        frames.push(next);
                    }
                    if let Err(e) = self.send_all(frames).await {
                        return SessionEnd::SendFailed(e);
                    }
                }
                _ = beat.tick() => {
                    let hb = upstream.heartbeat().to_json();
                    if let Err(e) = self.ws.send(Message::Text(hb.into())).await {
                        return SessionEnd::SendFailed(e);
                    }
                }
                frame = self.ws.next() => {
                    let mut frames = vec![frame];
                    while frames.len() < BATCH {
                        match self.ws.next().now_or_never() {
                            Some(f) => frames.push(f),
                            None => break,
                        }
                    }
                    let mut texts = Vec::with_capacity(frames.len());
                    let mut end = None;
                    for frame in frames {
                        match frame {
                            None => end = Some(SessionEnd::Closed { during_auth: false, frame: None }),
                            Some(Err(e)) => end = Some(SessionEnd::Failed(e)),
                            Some(Ok(Message::Close(c))) => {
                                end = Some(SessionEnd::Closed { during_auth: false, frame: c.map(parts) });
                            }
                            Some(Ok(Message::Text(t))) => texts.push(t),
                            Some(Ok(_)) => {}
                        }
                        if end.is_some() {
                            break;
                        }
                    }
                    let reply = if texts.is_empty() {
                        Vec::new()
                    } else {
                        upstream.received(&texts).await
                    };
                    if let Some(end) = end {
                        return end;
                    }
                    if let Err(e) = self.send_all(reply).await {
                        return SessionEnd::SendFailed(e);
                    }
                }
            }
        }
    }

    /// Feeds frames and flushes once.
    async fn send_all(&mut self, frames: Vec<String>) -> Result<(), tungstenite::Error> {
        if frames.is_empty() {
            return Ok(());
        }
        for f in frames {
            self.ws.feed(Message::Text(f.into())).await?;
        }
        self.ws.flush().await
    }

    /// A clean stop of an accepted session: what is still queued goes out before the Close
    /// frame, then the upstream's Close reply is awaited briefly, so the close is orderly.
    async fn stop<U: Upstream>(&mut self, upstream: &mut U) {
        if self.goodbye.is_none() {
            return;
        }
        while let Some(f) = upstream.try_outgoing() {
            if self.ws.feed(Message::Text(f.into())).await.is_err() {
                return;
            }
        }
        self.close().await;
        let _ = tokio::time::timeout(CLOSE_REPLY, async {
            while let Some(Ok(f)) = self.ws.next().await {
                if matches!(f, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Sends the Close frame of a clean stop, if this end sends one.
    async fn close(&mut self) {
        if let Some(reason) = self.goodbye {
            let _ = self.ws.send(close_message(close::GOING_AWAY, reason)).await;
        }
    }
}

fn parts(c: CloseFrame) -> (u16, String) {
    (u16::from(c.code), c.reason.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use kennel_proto::link::{Authenticate, Heartbeat, Secret, TaskRef};
    use kennel_proto::{decode_daemon_frame, DEFAULT_MAX_FRAME_BYTES};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, Notify};

    use super::*;

    /// How long a test waits for anything before it fails.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// The server end of one test connection.
    type Served = WebSocketStream<TcpStream>;

    /// A loopback WebSocket server on a free port; every connection it accepts comes out of
    /// the receiver.
    async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<Served>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    if tx.send(ws).is_err() {
                        return;
                    }
                }
            }
        });
        (addr, rx)
    }

    async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Served>) -> Served {
        tokio::time::timeout(PATIENCE, conns.recv())
            .await
            .expect("the client connects")
            .expect("the server runs")
    }

    /// The next frame a connection receives that is not a ping or pong.
    async fn next_frame(ws: &mut Served) -> Message {
        loop {
            let m = tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("a frame arrives")
                .expect("the connection is open")
                .expect("the frame is readable");
            if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
                return m;
            }
        }
    }

    async fn next_text(ws: &mut Served) -> String {
        match next_frame(ws).await {
            Message::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn next_daemon_message(ws: &mut Served) -> DaemonMessage {
        let text = next_text(ws).await;
        match decode_daemon_frame(&text, DEFAULT_MAX_FRAME_BYTES) {
            Ok(Decoded::Known(m)) => m,
            other => panic!("expected a daemon message, got {other:?}"),
        }
    }

    async fn answer(ws: &mut Served, m: ServerMessage) {
        ws.send(Message::Text(m.to_json().into())).await.unwrap();
    }

    /// Takes the next connection, reads its `authenticate` and answers it.
    async fn answer_next(
        conns: &mut mpsc::UnboundedReceiver<Served>,
        reply: ServerMessage,
    ) -> (Served, Authenticate) {
        let mut ws = next_conn(conns).await;
        let DaemonMessage::Authenticate(hello) = next_daemon_message(&mut ws).await else {
            panic!("the first frame must be authenticate");
        };
        answer(&mut ws, reply).await;
        (ws, hello)
    }

    fn authenticated(daemon_id: &str) -> ServerMessage {
        ServerMessage::Authenticated(Authenticated {
            daemon_id: daemon_id.into(),
            heartbeat_interval_secs: 1,
            protocol_version: kennel_proto::PROTOCOL_VERSION,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        })
    }

    /// What the probe saw, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Accepted(String),
        Received(Vec<String>),
        Ended(&'static str, Option<Duration>),
    }

    fn kind(end: &SessionEnd) -> &'static str {
        match end {
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::ReconnectRequested => "reconnectRequested",
            SessionEnd::Refused(Refusal::Unauthorized(_)) => "unauthorized",
            SessionEnd::Refused(Refusal::UnsupportedVersion(_)) => "unsupportedVersion",
            SessionEnd::Refused(Refusal::Other { .. }) => "refused",
            SessionEnd::NoAnswer(_) => "noAnswer",
            SessionEnd::Closed {
                during_auth: true, ..
            } => "closedDuringAuth",
            SessionEnd::Closed {
                during_auth: false,
                frame: Some(_),
            } => "closedWithFrame",
            SessionEnd::Closed { .. } => "closed",
            SessionEnd::Local(_)
            | SessionEnd::Unreachable { .. }
            | SessionEnd::UnexpectedAnswer(_)
            | SessionEnd::Failed(_)
            | SessionEnd::SendFailed(_)
            | SessionEnd::SenderGone => "other",
        }
    }

    /// A client end that holds one attempt, replays one frame and reports what it sees.
    struct Probe {
        urls: Vec<String>,
        held: Vec<TaskRef>,
        replay: Vec<String>,
        out: mpsc::UnboundedReceiver<String>,
        seen: mpsc::UnboundedSender<Seen>,
        give_up: bool,
        reconnect: Arc<Notify>,
    }

    impl Upstream for Probe {
        fn urls(&self) -> Result<Vec<String>, String> {
            Ok(self.urls.clone())
        }

        fn hello(&mut self) -> Result<DaemonMessage, String> {
            Ok(DaemonMessage::Authenticate(Authenticate {
                api_key: Secret("k".into()),
                machine_id: "probe".into(),
                hostname: "probe".into(),
                max_concurrent_tasks: 1,
                protocol_version: kennel_proto::PROTOCOL_VERSION,
                min_protocol_version: Some(kennel_proto::MIN_PROTOCOL_VERSION),
                version: "test".into(),
                labels: Default::default(),
                agents: vec![],
                running_tasks: self.held.clone(),
            }))
        }

        fn accepted(&mut self, _url: &str, answer: &Authenticated) -> Result<Vec<String>, String> {
            let _ = self.seen.send(Seen::Accepted(answer.daemon_id.clone()));
            Ok(self.replay.clone())
        }

        async fn outgoing(&mut self) -> Option<String> {
            self.out.recv().await
        }

        fn try_outgoing(&mut self) -> Option<String> {
            self.out.try_recv().ok()
        }

        fn heartbeat(&mut self) -> DaemonMessage {
            DaemonMessage::Heartbeat(Heartbeat {
                active_tasks: self.held.clone(),
            })
        }

        async fn received(&mut self, frames: &[Utf8Bytes]) -> Vec<String> {
            let texts = frames.iter().map(|f| f.to_string()).collect();
            let _ = self.seen.send(Seen::Received(texts));
            Vec::new()
        }

        fn ended(&mut self, end: &SessionEnd, retry_in: Option<Duration>) {
            let _ = self.seen.send(Seen::Ended(kind(end), retry_in));
        }

        fn gives_up(&self, refusal: &Refusal) -> bool {
            self.give_up && matches!(refusal, Refusal::Unauthorized(_))
        }

        fn reconnect_requested(&self) -> impl Future<Output = ()> + Send + 'static {
            let n = self.reconnect.clone();
            async move { n.notified().await }
        }

        fn goodbye(&self) -> Option<&'static str> {
            Some("probe stops")
        }
    }

    /// Handles to a running probe.
    struct Running {
        seen: mpsc::UnboundedReceiver<Seen>,
        out: mpsc::UnboundedSender<String>,
        stop: watch::Sender<bool>,
        reconnect: Arc<Notify>,
        link: tokio::task::JoinHandle<Result<(), Refusal>>,
    }

    impl Running {
        async fn next(&mut self) -> Seen {
            tokio::time::timeout(PATIENCE, self.seen.recv())
                .await
                .expect("the probe sees something")
                .expect("the probe runs")
        }

        async fn stop(self) -> Result<(), Refusal> {
            self.stop.send_replace(true);
            tokio::time::timeout(PATIENCE, self.link)
                .await
                .expect("the link stops")
                .expect("the link task does not panic")
        }
    }

    fn held() -> Vec<TaskRef> {
        vec![TaskRef {
            task_id: "t1".into(),
            attempt: 2,
        }]
    }

    /// Backoff delays of 20, 40, 60 ms…: a fresh start is told apart from a continued one.
    fn steps() -> impl Iterator<Item = Duration> {
        (1u64..).map(|n| Duration::from_millis(20 * n))
    }

    fn start(addr: SocketAddr, give_up: bool, auth_deadline: Duration) -> Running {
        start_on(vec![addr], give_up, auth_deadline)
    }

    fn start_on(addrs: Vec<SocketAddr>, give_up: bool, auth_deadline: Duration) -> Running {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (out, out_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let reconnect = Arc::new(Notify::new());
        let mut probe = Probe {
            urls: addrs
                .iter()
                .map(|a| format!("ws://{a}/ws/daemon"))
                .collect(),
            held: held(),
            replay: vec!["replayed".into()],
            out: out_rx,
            seen: seen_tx,
            give_up,
            reconnect: reconnect.clone(),
        };
        let link =
            tokio::spawn(async move { run(&mut probe, stop_rx, auth_deadline, steps).await });
        Running {
            seen,
            out,
            stop,
            reconnect,
            link,
        }
    }

    #[tokio::test]
    async fn an_accepted_session_lists_held_attempts_replays_beats_and_closes_on_stop() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, true, AUTH_DEADLINE);
        let (mut ws, hello) = answer_next(&mut conns, authenticated("d-1")).await;
        assert_eq!(hello.running_tasks, held());
        assert_eq!(probe.next().await, Seen::Accepted("d-1".into()));
        assert_eq!(next_text(&mut ws).await, "replayed");

        let ack = r#"{"type":"ack","taskId":"t1","attempt":2,"seq":1}"#;
        ws.send(Message::Text(ack.into())).await.unwrap();
        assert_eq!(probe.next().await, Seen::Received(vec![ack.into()]));
        probe.out.send("queued".into()).unwrap();
        assert_eq!(next_text(&mut ws).await, "queued");

        // The upstream announced one second: a heartbeat listing the held attempt follows.
        let DaemonMessage::Heartbeat(hb) = next_daemon_message(&mut ws).await else {
            panic!("expected a heartbeat");
        };
        assert_eq!(hb.active_tasks, held());

        probe.stop.send_replace(true);
        match next_frame(&mut ws).await {
            Message::Close(Some(c)) => {
                assert_eq!(u16::from(c.code), close::GOING_AWAY);
                assert_eq!(c.reason.as_str(), "probe stops");
            }
            other => panic!("expected a going-away close, got {other:?}"),
        }
        // The Close reply, which the client waits for.
        let _ = ws.flush().await;
        assert_eq!(probe.next().await, Seen::Ended("shutdown", None));
        assert_eq!(probe.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn a_refused_key_ends_the_link_when_the_end_gives_up_on_it() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, true, AUTH_DEADLINE);
        let (mut ws, _) = answer_next(
            &mut conns,
            ServerMessage::error(ErrorCode::Unauthorized, "unknown API key"),
        )
        .await;
        let _ = ws
            .send(close_message(close::UNAUTHORIZED, "unknown API key"))
            .await;
        assert_eq!(probe.next().await, Seen::Ended("unauthorized", None));
        let ended = tokio::time::timeout(PATIENCE, probe.link)
            .await
            .expect("the link ends by itself")
            .unwrap();
        assert_eq!(ended, Err(Refusal::Unauthorized("unknown API key".into())));
    }

    #[tokio::test]
    async fn refusals_are_typed_and_retried_with_a_growing_backoff() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, false, AUTH_DEADLINE);

        let (_refused, _) = answer_next(
            &mut conns,
            ServerMessage::error(ErrorCode::Unauthorized, "unknown API key"),
        )
        .await;
        assert_eq!(
            probe.next().await,
            Seen::Ended("unauthorized", Some(Duration::from_millis(20)))
        );

        // A refusal by close code alone is typed too.
        let mut ws = next_conn(&mut conns).await;
        next_daemon_message(&mut ws).await;
        let _ = ws
            .send(close_message(close::UNSUPPORTED_VERSION, "speak 1..=1"))
            .await;
        assert_eq!(
            probe.next().await,
            Seen::Ended("unsupportedVersion", Some(Duration::from_millis(40)))
        );

        let (_refused, _) = answer_next(
            &mut conns,
            ServerMessage::error(ErrorCode::Internal, "store down"),
        )
        .await;
        assert_eq!(
            probe.next().await,
            Seen::Ended("refused", Some(Duration::from_millis(60)))
        );
        let _ws = next_conn(&mut conns).await;
        assert_eq!(probe.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn no_answer_within_the_deadline_ends_the_session_and_it_is_retried() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, true, Duration::from_millis(200));
        let mut ws = next_conn(&mut conns).await;
        next_daemon_message(&mut ws).await;
        // The server says nothing.
        assert_eq!(
            probe.next().await,
            Seen::Ended("noAnswer", Some(Duration::from_millis(20)))
        );
        let mut again = next_conn(&mut conns).await;
        let DaemonMessage::Authenticate(_) = next_daemon_message(&mut again).await else {
            panic!("the retry authenticates again");
        };
        drop(ws);
        assert_eq!(probe.stop().await, Ok(()));
    }

    /// A loopback address where nothing listens (connections are refused).
    async fn nobody() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_skipped_at_once_and_a_full_round_backs_off() {
        let dead = nobody().await;
        let (addr, mut conns) = server().await;
        let mut probe = start_on(vec![dead, addr], false, AUTH_DEADLINE);
        // The first URL refuses: the second is tried without waiting.
        assert_eq!(
            probe.next().await,
            Seen::Ended("other", Some(Duration::ZERO))
        );
        let (ws, _) = answer_next(&mut conns, authenticated("d-4")).await;
        assert_eq!(probe.next().await, Seen::Accepted("d-4".into()));
        // It ends: the same coordinator first, after the first delay; it refuses this time, so
        // the next (dead) one at once, then a full round has failed: the backoff grows.
        drop(ws);
        assert_eq!(
            probe.next().await,
            Seen::Ended("other", Some(Duration::from_millis(20)))
        );
        let (_refused, _) = answer_next(
            &mut conns,
            ServerMessage::error(ErrorCode::Internal, "busy"),
        )
        .await;
        assert_eq!(
            probe.next().await,
            Seen::Ended("refused", Some(Duration::ZERO))
        );
        assert_eq!(
            probe.next().await,
            Seen::Ended("other", Some(Duration::from_millis(40)))
        );
        let _ws = next_conn(&mut conns).await;
        assert_eq!(probe.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn a_session_that_was_accepted_starts_the_backoff_over() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, false, AUTH_DEADLINE);
        for expected in [20, 40] {
            let (_refused, _) = answer_next(
                &mut conns,
                ServerMessage::error(ErrorCode::Internal, "busy"),
            )
            .await;
            assert_eq!(
                probe.next().await,
                Seen::Ended("refused", Some(Duration::from_millis(expected)))
            );
        }
        let (mut ws, _) = answer_next(&mut conns, authenticated("d-3")).await;
        assert_eq!(probe.next().await, Seen::Accepted("d-3".into()));
        let _ = ws
            .send(close_message(close::STORE_UNAVAILABLE, "store down"))
            .await;
        assert_eq!(
            probe.next().await,
            Seen::Ended("closedWithFrame", Some(Duration::from_millis(20)))
        );

        // It reconnects after the close, and is accepted again.
        let (accepted, _) = answer_next(&mut conns, authenticated("d-4")).await;
        assert_eq!(probe.next().await, Seen::Accepted("d-4".into()));
        // Gone, so the stop does not wait for a Close reply.
        drop(accepted);
        assert_eq!(probe.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn a_reconnect_request_ends_the_session_and_reconnects_at_once() {
        let (addr, mut conns) = server().await;
        let mut probe = start(addr, false, AUTH_DEADLINE);
        let (mut ws, _) = answer_next(&mut conns, authenticated("d-1")).await;
        assert_eq!(probe.next().await, Seen::Accepted("d-1".into()));
        assert_eq!(next_text(&mut ws).await, "replayed");
        probe.reconnect.notify_one();
        assert_eq!(probe.next().await, Seen::Ended("reconnectRequested", None));
        let mut ws = next_conn(&mut conns).await;
        let DaemonMessage::Authenticate(_) = next_daemon_message(&mut ws).await else {
            panic!("the new session authenticates");
        };
        assert_eq!(probe.stop().await, Ok(()));
    }
}
