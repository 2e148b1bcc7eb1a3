//! [`TestDaemon`]: a daemon at the protocol level, over a real WebSocket, that does exactly
//! what a test tells it and nothing else: no heartbeats of its own, no replays, no agents.
//!
//! A background reader decodes every server frame and queues it; the test takes messages with
//! deadlines. The `expect_*` calls skip acknowledgements (remembering them, since acks are
//! cumulative and may arrive in any grouping) and set aside other messages for later calls, so
//! a test is not broken by an `ack` and a `spawnTask` arriving in either order. Sequence
//! numbers are counted per (task, attempt) like a real daemon's outbox would, and can be
//! rewound to replay. This module never retries or reconnects on its own: that is what tests
//! check the server for.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use kennel_proto::link::{
    Ack, Authenticate, Authenticated, ErrorFrame, Heartbeat, OutputStream, Secret, SpawnTask,
    TaskAccepted, TaskComplete, TaskOutput, TaskProgress, TaskRef, TaskRejected, TaskStatusChange,
};
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::deadline::within;

/// A raw WebSocket message, for tests that send what no well-behaved daemon would.
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long connecting and authenticating may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Close code recorded when the connection ended without a close frame (RFC 6455 reserves
/// 1006 for exactly this; it never appears on the wire).
pub const ABNORMAL_CLOSE: u16 = 1006;
/// Close code recorded for a close frame without a code.
pub const NO_STATUS_CLOSE: u16 = 1005;
/// How many recent server messages are quoted when a wait fails.
const RECENT_LOG: usize = 30;
/// Longest piece of one message quoted in an error.
const RECENT_CHARS: usize = 300;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the daemon says about itself in `authenticate`.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// A key with the `daemon` scope.
    pub api_key: String,
    /// Stable identity; reconnecting with the same id is the same daemon.
    pub machine_id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    pub agents: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Attempts to re-attach on connect.
    pub running_tasks: Vec<TaskRef>,
    /// Highest protocol version claimed; the build's own by default.
    pub protocol_version: u32,
    pub min_protocol_version: Option<u32>,
}

impl Default for DaemonOpts {
    /// One slot, agents `claude` and `command`, and a machine id unique in this process so two
    /// test daemons are never taken for the same machine by accident.
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        DaemonOpts {
            api_key: String::new(),
            machine_id: format!("test-machine-{}-{n}", std::process::id()),
            hostname: "testkit-host".to_string(),
            max_concurrent_tasks: 1,
            agents: vec!["claude".to_string(), "command".to_string()],
            labels: BTreeMap::new(),
            running_tasks: Vec::new(),
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: None,
        }
    }
}

impl DaemonOpts {
    /// Defaults with the given key.
    pub fn with_key(api_key: impl Into<String>) -> Self {
        DaemonOpts {
            api_key: api_key.into(),
            ..DaemonOpts::default()
        }
    }

    /// The `authenticate` frame these options describe.
    pub fn authenticate(&self) -> DaemonMessage {
        DaemonMessage::Authenticate(Authenticate {
            api_key: Secret(self.api_key.clone()),
            machine_id: self.machine_id.clone(),
            hostname: self.hostname.clone(),
            max_concurrent_tasks: self.max_concurrent_tasks,
            protocol_version: self.protocol_version,
            min_protocol_version: self.min_protocol_version,
            version: "testkit".to_string(),
            labels: self.labels.clone(),
            agents: self.agents.clone(),
            running_tasks: self.running_tasks.clone(),
        })
    }
}

/// Next `seq` per (task, attempt), starting at 1, as a daemon's outbox counts them.
#[derive(Debug, Clone, Default)]
pub struct SeqCounters {
    next: HashMap<(String, u32), u64>,
}

impl SeqCounters {
    /// The seq the next message of (task, attempt) will carry.
    pub fn peek(&self, task_id: &str, attempt: u32) -> u64 {
        self.next
            .get(&(task_id.to_string(), attempt))
            .copied()
            .unwrap_or(1)
    }

    /// Hands out the next seq of (task, attempt) and counts it as used.
    pub fn take(&mut self, task_id: &str, attempt: u32) -> u64 {
        let n = self.next.entry((task_id.to_string(), attempt)).or_insert(1);
        let seq = *n;
        *n += 1;
        seq
    }

    /// Makes `next` the seq of the next message, e.g. to replay from an earlier one.
    pub fn set(&mut self, task_id: &str, attempt: u32, next: u64) {
        self.next.insert((task_id.to_string(), attempt), next);
    }
}

/// What the reader task hands over.
#[derive(Debug)]
// A test daemon's queue of frames: boxing the large variant would buy nothing here.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Msg(ServerMessage),
    /// A frame that is not a valid server message; a server bug the test should see.
    Bad(String),
}

/// One WebSocket connection: the write half, the queue the reader fills, and how it closed.
struct Link {
    /// `None` once the test dropped the connection.
    sink: Option<SplitSink<Ws, WsMessage>>,
    rx: mpsc::UnboundedReceiver<Incoming>,
    closed: watch::Receiver<Option<(u16, String)>>,
    reader: JoinHandle<()>,
}

impl Link {
    async fn open(ws_url: &str) -> anyhow::Result<Link> {
        let (ws, _) = within(
            CONNECT_DEADLINE,
            "the WebSocket connection",
            tokio_tungstenite::connect_async_with_config(ws_url, None, true),
        )
        .await?
        .with_context(|| format!("failed to connect to {ws_url}"))?;
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(None);
        let reader = tokio::spawn(read_frames(stream, tx, closed_tx));
        Ok(Link {
            sink: Some(sink),
            rx,
            closed,
            reader,
        })
    }

    async fn send(&mut self, m: WsMessage) -> anyhow::Result<()> {
        let sink = self
            .sink
            .as_mut()
            .ok_or_else(|| anyhow!("the test dropped this connection; reconnect first"))?;
        sink.send(m)
            .await
            .context("failed to send a frame to the server")
    }

    fn close_state(&self) -> Option<(u16, String)> {
        self.closed.borrow().clone()
    }

    async fn wait_closed(&mut self, deadline: Duration) -> anyhow::Result<(u16, String)> {
        let mut closed = self.closed.clone();
        let state = within(
            deadline,
            "the server to close the connection",
            closed.wait_for(|c| c.is_some()),
        )
        .await?
        .map_err(|_| anyhow!("the connection was dropped by the test, not closed"))?
        .clone();
        state.ok_or_else(|| anyhow!("the connection has no close state"))
    }

    /// Ends the connection without a close frame; returns once the socket is gone.
    async fn abort(&mut self) {
        // A JoinHandle must not be awaited again once it has returned (reconnect after
        // drop_connection would), so only wait for a reader that is still running.
        if !self.reader.is_finished() {
            self.reader.abort();
            let _ = (&mut self.reader).await;
        }
        self.sink = None;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads until the connection ends. Keeps reading after a close frame so that tungstenite
/// can send its reply and the close handshake completes.
async fn read_frames(
    mut stream: SplitStream<Ws>,
    tx: mpsc::UnboundedSender<Incoming>,
    closed: watch::Sender<Option<(u16, String)>>,
) {
    let end = loop {
        let frame = match stream.next().await {
            None => break "connection ended without a close frame".to_string(),
            Some(Err(e)) => break format!("connection failed without a close frame: {e}"),
            Some(Ok(f)) => f,
        };
        let item = match frame {
            WsMessage::Text(t) => match decode_server_frame(t.as_str(), usize::MAX) {
                Ok(Decoded::Known(m)) => Incoming::Msg(m),
                Ok(Decoded::Unknown { type_name }) => Incoming::Bad(format!(
                    "server sent a message of unknown type `{type_name}`"
                )),
                Err(e) => Incoming::Bad(format!("server sent an undecodable frame ({e}): {t}")),
            },
            WsMessage::Binary(b) => Incoming::Bad(format!(
                "server sent a binary frame of {} bytes; protocol v1 uses text frames only",
                b.len()
            )),
            WsMessage::Close(f) => {
                let state = match f {
                    Some(f) => (u16::from(f.code), f.reason.to_string()),
                    None => (NO_STATUS_CLOSE, String::new()),
                };
                closed.send_if_modified(|c| {
                    let first = c.is_none();
                    if first {
                        *c = Some(state.clone());
                    }
                    first
                });
                continue;
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
        };
        // The test may have stopped listening; the frames are then of no interest.
        let _ = tx.send(item);
    };
    closed.send_if_modified(|c| {
        let first = c.is_none();
        if first {
            *c = Some((ABNORMAL_CLOSE, end.clone()));
        }
        first
    });
}

/// How an `expect_*` call judges one message.
enum Verdict<T> {
    /// The message it waits for.
    Take(T),
    /// An ack it does not want: remembered as unclaimed.
    SkipAck(Ack),
    /// Another message: set aside for later calls, in order.
    Keep(ServerMessage),
    Fail(anyhow::Error),
}

/// A protocol-level daemon connected to a kennel server.
pub struct TestDaemon {
    ws_url: String,
    opts: DaemonOpts,
    authenticated: Authenticated,
    link: Link,
    seqs: SeqCounters,
    /// Every ack received, in order.
    acks: Vec<Ack>,
    /// Acks skipped by `expect_*` calls that no `expect_ack` has used yet.
    unclaimed: Vec<Ack>,
    /// Messages set aside by `expect_*` calls, delivered first.
    stash: VecDeque<Incoming>,
    recent: VecDeque<String>,
}

impl TestDaemon {
    /// Connects, sends `authenticate` and waits for `authenticated` (10 s at most).
    pub async fn connect(ws_url: &str, opts: DaemonOpts) -> anyhow::Result<TestDaemon> {
        let (link, authenticated) = handshake(ws_url, &opts).await?;
        Ok(TestDaemon {
            ws_url: ws_url.to_string(),
            opts,
            authenticated,
            link,
            seqs: SeqCounters::default(),
            acks: Vec::new(),
            unclaimed: Vec::new(),
            stash: VecDeque::new(),
            recent: VecDeque::new(),
        })
    }

    /// Drops the current connection without a close frame (if it is still open) and connects
    /// again as the same machine, listing `running_tasks`. Seq counters and the ack history
    /// are kept, as a real daemon keeps its outbox; messages not yet taken are discarded.
    pub async fn reconnect(&mut self, running_tasks: Vec<TaskRef>) -> anyhow::Result<()> {
        self.link.abort().await;
        self.opts.running_tasks = running_tasks;
        let (link, authenticated) = handshake(&self.ws_url, &self.opts).await?;
        self.link = link;
        self.authenticated = authenticated;
        self.stash.clear();
        Ok(())
    }

    /// Opens a socket, sends `first_frame` as text, and reports the first server message and
    /// how the server closed the connection (within 10 s). For authentication failures.
    pub async fn connect_raw(
        ws_url: &str,
        first_frame: String,
    ) -> anyhow::Result<(Option<ServerMessage>, Option<(u16, String)>)> {
        Self::connect_raw_with(ws_url, vec![WsMessage::text(first_frame)], CONNECT_DEADLINE).await
    }

    /// Like [`TestDaemon::connect_raw`] with any frames (none, to test the authentication
    /// deadline) and any deadline. Returns early on `authenticated`, since the server will
    /// not close then. The close is `None` if the connection is still open at the deadline,
    /// and [`ABNORMAL_CLOSE`] if it ended without a close frame.
    pub async fn connect_raw_with(
        ws_url: &str,
        frames: Vec<WsMessage>,
        deadline: Duration,
    ) -> anyhow::Result<(Option<ServerMessage>, Option<(u16, String)>)> {
        let until = Instant::now() + deadline;
        let mut link = Link::open(ws_url).await?;
        for f in frames {
            // The server may close after the first frame; later sends may fail, which is fine.
            if link.send(f).await.is_err() {
                break;
            }
        }
        let mut first = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, link.rx.recv()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(Incoming::Bad(e))) => bail!("{e}"),
                Ok(Some(Incoming::Msg(m))) => {
                    let done = matches!(m, ServerMessage::Authenticated(_));
                    if first.is_none() {
                        first = Some(m);
                    }
                    if done {
                        return Ok((first, None));
                    }
                }
            }
        }
        Ok((first, link.close_state()))
    }

    pub fn daemon_id(&self) -> &str {
        &self.authenticated.daemon_id
    }

    /// The server's `authenticated` answer (heartbeat interval, frame limit, version).
    pub fn authenticated(&self) -> &Authenticated {
        &self.authenticated
    }

    pub fn opts(&self) -> &DaemonOpts {
        &self.opts
    }

    pub fn machine_id(&self) -> &str {
        &self.opts.machine_id
    }

    // -----------------------------------------------------------------------------------------
    // receiving

    fn note(&mut self, m: &ServerMessage) {
        if let ServerMessage::Ack(a) = m {
            self.acks.push(a.clone());
        }
        if self.recent.len() == RECENT_LOG {
            self.recent.pop_front();
        }
        let mut s = format!("{m:?}");
        if s.len() > RECENT_CHARS {
            let cut = (0..=RECENT_CHARS)
                .rev()
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            s.truncate(cut);
            s.push('…');
        }
        self.recent.push_back(s);
    }

    /// The most recent server messages, one per line, oldest first.
    pub fn recent_report(&self) -> String {
        if self.recent.is_empty() {
            "(none)".to_string()
        } else {
            self.recent.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    fn closed_note(&self) -> String {
        match self.link.close_state() {
            Some((code, reason)) => format!("the connection closed with {code} `{reason}`"),
            None => "the connection was dropped".to_string(),
        }
    }

    /// The next message: set-aside ones first, then from the connection.
    async fn next_message(&mut self, deadline: Duration) -> anyhow::Result<ServerMessage> {
        let item = match self.stash.pop_front() {
            Some(i) => i,
            None => match tokio::time::timeout(deadline, self.link.rx.recv()).await {
                Err(_) => bail!(
                    "timed out after {deadline:?} waiting for a server message; recent messages:\n{}",
                    self.recent_report()
                ),
                Ok(None) => bail!(
                    "{} while waiting for a server message; recent messages:\n{}",
                    self.closed_note(),
                    self.recent_report()
                ),
                Ok(Some(Incoming::Msg(m))) => {
                    self.note(&m);
                    return Ok(m);
                }
                Ok(Some(i)) => i,
            },
        };
        match item {
            Incoming::Msg(m) => Ok(m),
            Incoming::Bad(e) => Err(anyhow!(e)),
        }
    }

    /// The next server message of any kind, within `deadline`.
    pub async fn recv(&mut self, deadline: Duration) -> anyhow::Result<ServerMessage> {
        self.next_message(deadline).await
    }

    /// A message that has already arrived, without waiting.
    pub fn try_recv_now(&mut self) -> Option<ServerMessage> {
        match self.stash.pop_front() {
            Some(Incoming::Msg(m)) => return Some(m),
            Some(bad) => {
                // Leave it for the next `recv`, which reports it as an error.
                self.stash.push_front(bad);
                return None;
            }
            None => {}
        }
        match self.link.rx.try_recv() {
            Ok(Incoming::Msg(m)) => {
                self.note(&m);
                Some(m)
            }
            Ok(bad) => {
                self.stash.push_front(bad);
                None
            }
            Err(_) => None,
        }
    }

    async fn expect<T>(
        &mut self,
        deadline: Duration,
        what: &str,
        mut judge: impl FnMut(ServerMessage) -> Verdict<T>,
    ) -> anyhow::Result<T> {
        let until = Instant::now() + deadline;
        let mut kept = Vec::new();
        let result = loop {
            let left = until.saturating_duration_since(Instant::now());
            let m = match self.next_message(left).await {
                Ok(m) => m,
                Err(e) => break Err(e.context(format!("expected {what}"))),
            };
            match judge(m) {
                Verdict::Take(t) => break Ok(t),
                Verdict::SkipAck(a) => self.unclaimed.push(a),
                Verdict::Keep(m) => kept.push(m),
                Verdict::Fail(e) => break Err(e),
            }
        };
        for m in kept.into_iter().rev() {
            self.stash.push_front(Incoming::Msg(m));
        }
        result
    }

    /// The next `spawnTask`. Acks are skipped (and remembered); other commands are set aside
    /// for later calls; an `error` frame fails the wait.
    pub async fn expect_spawn(&mut self, deadline: Duration) -> anyhow::Result<SpawnTask> {
        self.expect(deadline, "a spawnTask", |m| match m {
            ServerMessage::SpawnTask(s) => Verdict::Take(s),
            ServerMessage::Ack(a) => Verdict::SkipAck(a),
            ServerMessage::Error(e) => Verdict::Fail(anyhow!(
                "expected a spawnTask, the server sent an error: {e:?}"
            )),
            other => Verdict::Keep(other),
        })
        .await
    }

    /// The next `error` frame. Acks are skipped (and remembered); other messages are set aside.
    pub async fn expect_error(&mut self, deadline: Duration) -> anyhow::Result<ErrorFrame> {
        self.expect(deadline, "an error frame", |m| match m {
            ServerMessage::Error(e) => Verdict::Take(e),
            ServerMessage::Ack(a) => Verdict::SkipAck(a),
            other => Verdict::Keep(other),
        })
        .await
    }

    /// Waits until the server has acknowledged (task, attempt) up to at least `seq`. Acks are
    /// cumulative, so an ack with a higher seq counts, and one skipped earlier by another
    /// `expect_*` call counts too. Each ack satisfies one `expect_ack` only, so after a replay
    /// the test can wait for the repeated ack. An `error` frame fails the wait.
    pub async fn expect_ack(
        &mut self,
        task_id: &str,
        attempt: u32,
        seq: u64,
        deadline: Duration,
    ) -> anyhow::Result<Ack> {
        let same = |a: &Ack| a.task_id == task_id && a.attempt == attempt;
        let earlier = self
            .unclaimed
            .iter()
            .filter(|a| same(a) && a.seq >= seq)
            .max_by_key(|a| a.seq)
            .cloned();
        let ack = match earlier {
            Some(a) => a,
            None => {
                let what = format!("an ack of {task_id} attempt {attempt} up to seq {seq}");
                self.expect(deadline, &what, |m| match m {
                    ServerMessage::Ack(a) if same(&a) && a.seq >= seq => Verdict::Take(a),
                    ServerMessage::Ack(a) => Verdict::SkipAck(a),
                    ServerMessage::Error(e) => Verdict::Fail(anyhow!(
                        "expected an ack of {task_id} attempt {attempt} seq {seq}, \
                         the server sent an error: {e:?}"
                    )),
                    other => Verdict::Keep(other),
                })
                .await?
            }
        };
        self.unclaimed.retain(|a| !(same(a) && a.seq <= ack.seq));
        Ok(ack)
    }

    /// Every ack received on any connection of this daemon, in order.
    pub fn acks(&self) -> &[Ack] {
        &self.acks
    }

    /// The highest seq acknowledged for (task, attempt) so far.
    pub fn highest_ack(&self, task_id: &str, attempt: u32) -> Option<u64> {
        self.acks
            .iter()
            .filter(|a| a.task_id == task_id && a.attempt == attempt)
            .map(|a| a.seq)
            .max()
    }

    // -----------------------------------------------------------------------------------------
    // sending

    /// Sends a message as given; seq counters are not touched.
    pub async fn send(&mut self, m: &DaemonMessage) -> anyhow::Result<()> {
        self.link.send(WsMessage::text(m.to_json())).await
    }

    pub async fn send_raw_text(&mut self, text: String) -> anyhow::Result<()> {
        self.link.send(WsMessage::text(text)).await
    }

    pub async fn send_raw_binary(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.link.send(WsMessage::binary(bytes)).await
    }

    /// Sends any WebSocket message (ping, close with a chosen code, ...).
    pub async fn send_ws(&mut self, m: WsMessage) -> anyhow::Result<()> {
        self.link.send(m).await
    }

    pub async fn heartbeat(&mut self, active: Vec<TaskRef>) -> anyhow::Result<()> {
        self.send(&DaemonMessage::Heartbeat(Heartbeat {
            active_tasks: active,
        }))
        .await
    }

    /// Sends a sequenced message built from the next seq of (task, attempt); returns the seq.
    pub async fn send_seq(
        &mut self,
        task_id: &str,
        attempt: u32,
        build: impl FnOnce(u64) -> DaemonMessage,
    ) -> anyhow::Result<u64> {
        let seq = self.seqs.take(task_id, attempt);
        self.send(&build(seq)).await?;
        Ok(seq)
    }

    pub async fn accept(&mut self, task_id: &str, attempt: u32) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskAccepted(TaskAccepted {
                task_id: task_id.to_string(),
                attempt,
                seq,
            })
        })
        .await
    }

    pub async fn reject(
        &mut self,
        task_id: &str,
        attempt: u32,
        reason: &str,
    ) -> anyhow::Result<u64> {
        self.reject_with(task_id, attempt, reason, None).await
    }

    /// A `taskRejected` with a typed reason (`atCapacity`, `shuttingDown`).
    pub async fn reject_with(
        &mut self,
        task_id: &str,
        attempt: u32,
        reason: &str,
        code: Option<kennel_proto::link::RejectCode>,
    ) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskRejected(TaskRejected {
                task_id: task_id.to_string(),
                attempt,
                seq,
                reason: reason.to_string(),
                code,
            })
        })
        .await
    }

    /// One complete line of stdout.
    pub async fn output(&mut self, task_id: &str, attempt: u32, text: &str) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskOutput(TaskOutput {
                task_id: task_id.to_string(),
                attempt,
                seq,
                stream: OutputStream::Stdout,
                output: text.to_string(),
                is_partial: false,
            })
        })
        .await
    }

    pub async fn progress(
        &mut self,
        task_id: &str,
        attempt: u32,
        summary: &str,
    ) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskProgress(TaskProgress {
                task_id: task_id.to_string(),
                attempt,
                seq,
                summary: summary.to_string(),
                detail: None,
            })
        })
        .await
    }

    /// `old` and `new` are status names as on the wire (`running`, `paused`).
    pub async fn status_change(
        &mut self,
        task_id: &str,
        attempt: u32,
        old: &str,
        new: &str,
    ) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskStatusChange(TaskStatusChange {
                task_id: task_id.to_string(),
                attempt,
                seq,
                old_status: old.to_string(),
                new_status: new.to_string(),
            })
        })
        .await
    }

    /// `taskComplete` with exit code 0 on success, else 1 and an error text. For other fields
    /// use [`TestDaemon::send_seq`].
    pub async fn complete(
        &mut self,
        task_id: &str,
        attempt: u32,
        success: bool,
    ) -> anyhow::Result<u64> {
        self.send_seq(task_id, attempt, |seq| {
            DaemonMessage::TaskComplete(TaskComplete {
                task_id: task_id.to_string(),
                attempt,
                seq,
                success,
                error: (!success).then(|| "the test daemon reported a failure".to_string()),
                exit_code: Some(if success { 0 } else { 1 }),
                branch: None,
                commit: None,
            })
        })
        .await
    }

    /// Makes `next` the seq of the next message of (task, attempt), to replay or skip.
    pub fn set_seq(&mut self, task_id: &str, attempt: u32, next: u64) {
        self.seqs.set(task_id, attempt, next);
    }

    /// The seq the next message of (task, attempt) will carry.
    pub fn next_seq(&self, task_id: &str, attempt: u32) -> u64 {
        self.seqs.peek(task_id, attempt)
    }

    // -----------------------------------------------------------------------------------------
    // ending

    /// Starts a graceful close (code 1000). Use [`TestDaemon::wait_closed`] to see the reply.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.link
            .send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "test daemon closing".into(),
            })))
            .await
    }

    /// Ends the connection without a close frame, as a crashed daemon would. Returns once the
    /// socket is closed. [`TestDaemon::reconnect`] can connect again.
    pub async fn drop_connection(&mut self) {
        self.link.abort().await;
    }

    /// Waits for the connection to close; returns the code and reason of the server's close
    /// frame, or [`ABNORMAL_CLOSE`] with a description if it ended without one.
    pub async fn wait_closed(&mut self, deadline: Duration) -> anyhow::Result<(u16, String)> {
        self.link.wait_closed(deadline).await
    }

    /// How the connection closed, if it has.
    pub fn close_state(&self) -> Option<(u16, String)> {
        self.link.close_state()
    }
}

/// Connects and authenticates; any answer but `authenticated` is an error that says what the
/// server sent and how it closed.
async fn handshake(ws_url: &str, opts: &DaemonOpts) -> anyhow::Result<(Link, Authenticated)> {
    let until = Instant::now() + CONNECT_DEADLINE;
    let mut link = Link::open(ws_url).await?;
    link.send(WsMessage::text(opts.authenticate().to_json()))
        .await?;
    let left = until.saturating_duration_since(Instant::now());
    let first = within(left, "`authenticated`", link.rx.recv()).await?;
    match first {
        Some(Incoming::Msg(ServerMessage::Authenticated(a))) => Ok((link, a)),
        Some(Incoming::Msg(ServerMessage::Error(e))) => {
            let left = until.saturating_duration_since(Instant::now());
            let close = link
                .wait_closed(left)
                .await
                .map(|(c, r)| format!("closed with {c} `{r}`"))
                .unwrap_or_else(|_| "did not close".to_string());
            bail!(
                "the server refused authentication of {}: {} `{}` (and {close})",
                opts.machine_id,
                e.code.as_str(),
                e.message
            )
        }
        Some(Incoming::Msg(m)) => bail!(
            "expected `authenticated`, the server sent `{}`: {m:?}",
            m.type_name()
        ),
        Some(Incoming::Bad(e)) => bail!("expected `authenticated`: {e}"),
        None => {
            let close = link
                .close_state()
                .map(|(c, r)| format!("{c} `{r}`"))
                .unwrap_or_else(|| "no close frame".to_string());
            bail!("the server closed the connection before `authenticated`: {close}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_count_per_task_and_attempt_from_one() {
        let mut s = SeqCounters::default();
        assert_eq!(s.peek("t1", 1), 1);
        assert_eq!(s.take("t1", 1), 1);
        assert_eq!(s.take("t1", 1), 2);
        assert_eq!(s.take("t1", 2), 1);
        assert_eq!(s.take("t2", 1), 1);
        assert_eq!(s.peek("t1", 1), 3);
        s.set("t1", 1, 2);
        assert_eq!(s.take("t1", 1), 2);
        assert_eq!(s.take("t1", 1), 3);
    }

    #[test]
    fn default_opts_are_distinct_machines_with_valid_ids() {
        let a = DaemonOpts::default();
        let b = DaemonOpts::with_key("k");
        assert_ne!(a.machine_id, b.machine_id);
        assert!(kennel_proto::validate_id("machine id", &a.machine_id).is_ok());
        assert_eq!(b.api_key, "k");
        let DaemonMessage::Authenticate(auth) = a.authenticate() else {
            panic!("not an authenticate message");
        };
        assert_eq!(auth.protocol_version, PROTOCOL_VERSION);
        assert_eq!(auth.agents, vec!["claude", "command"]);
        assert!(a.authenticate().validate().is_ok());
    }
}
