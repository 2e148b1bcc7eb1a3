//! The daemon's connection to its upstream (a coordinator or a relay). It authenticates,
//! replays the outbox, sends heartbeats, hands commands to the executor and applies acks; when
//! the connection drops it reconnects forever with exponential backoff and jitter (1 s to
//! 60 s), re-attaching the attempts it still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kennel_proto::link::{close, Authenticate, Capacity, ErrorCode, Heartbeat, Secret, TaskRef};
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::executor::{Control, Executor};
use crate::outbox::{Outbox, Pending};

/// Who the daemon says it is.
#[derive(Clone)]
pub struct Identity {
    pub url: String,
    pub api_key: String,
    pub machine_id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<String>,
}

/// The link's state, for `kennel daemon status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkState {
    pub connected: bool,
    pub daemon_id: Option<String>,
    /// Why the last connection ended or failed, if it did.
    pub last_error: Option<String>,
    pub reconnects: u64,
}

/// Why the link stopped (only on shutdown or a refused key: it never gives up otherwise).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the upstream refused this daemon: {0}{hint}", hint = key_hint(.0))]
    Refused(String),
}

/// The hint for a refusal about the key itself; a refusal that already says what to do (a
/// machine id bound to another key, a protocol version) gets none.
fn key_hint(reason: &str) -> &'static str {
    if reason.contains("API key") && !reason.contains("machine id") {
        " (check daemon.api_key; it needs the daemon scope)"
    } else {
        ""
    }
}

pub struct Link {
    id: Identity,
    outbox: Arc<Outbox>,
    exec: Arc<Executor>,
    out: mpsc::UnboundedReceiver<Pending>,
    state: watch::Sender<LinkState>,
    /// True once a clean stop began: offer no capacity upstream.
    stopping: watch::Receiver<bool>,
}

enum End {
    /// Retry after backoff, with this reason.
    Retry(String),
    /// Stop for good.
    Fatal(LinkError),
    Shutdown,
}

impl Link {
    pub fn new(
        id: Identity,
        outbox: Arc<Outbox>,
        exec: Arc<Executor>,
        out: mpsc::UnboundedReceiver<Pending>,
        stopping: watch::Receiver<bool>,
    ) -> (Self, watch::Receiver<LinkState>) {
        let (state, rx) = watch::channel(LinkState::default());
        (
            Link {
                id,
                outbox,
                exec,
                out,
                state,
                stopping,
            },
            rx,
        )
    }

    /// Runs until `shutdown` fires. Reconnects forever otherwise.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), LinkError> {
        let backoff = kennel_link::reconnect_backoff;
        let mut delays = backoff();
        loop {
            let end = self.session(&mut delays, &backoff, &mut shutdown).await;
            self.state.send_modify(|s| s.connected = false);
            match end {
                End::Shutdown => return Ok(()),
                End::Fatal(e) => {
                    self.state
                        .send_modify(|s| s.last_error = Some(e.to_string()));
                    return Err(e);
                }
                End::Retry(reason) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(60));
                    tracing::warn!(url = %self.id.url, "upstream link down ({reason}); retrying in {:.1}s", delay.as_secs_f64());
                    self.state.send_modify(|s| {
                        s.last_error = Some(reason);
                        s.reconnects += 1;
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
        }
    }

    /// The `capacity` message of a daemon that is stopping: it offers nothing.
    fn no_capacity(&self) -> Message {
        let c = DaemonMessage::Capacity(Capacity {
            max_concurrent_tasks: 0,
            agents: self.id.agents.clone(),
            labels: self.id.labels.clone(),
        });
        Message::Text(c.to_json().into())
    }

    /// One connection, from connect to its end. A shutdown during it closes the connection
    /// with a Close frame (going away), so the upstream sees a clean stop.
    async fn session<B: Iterator<Item = Duration>>(
        &mut self,
        delays: &mut B,
        fresh: &impl Fn() -> B,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        if *shutdown.borrow() {
            return End::Shutdown;
        }
        let connect =
            tokio_tungstenite::connect_async_with_config(self.id.url.as_str(), None, true);
        let (ws, _) = tokio::select! {
            c = connect => match c {
                Ok(c) => c,
                Err(e) => return End::Retry(format!("cannot connect to {}: {e}", self.id.url)),
            },
            _ = shutdown.changed() => return End::Shutdown,
        };
        let (mut sink, mut stream) = ws.split();
        let running = match self.outbox.running_tasks() {
            Ok(r) => r,
            Err(e) => return End::Retry(format!("outbox unreadable: {e}")),
        };
        let hello = DaemonMessage::Authenticate(Authenticate {
            api_key: Secret(self.id.api_key.clone()),
            machine_id: self.id.machine_id.clone(),
            hostname: self.id.hostname.clone(),
            max_concurrent_tasks: self.id.max_concurrent_tasks,
            protocol_version: kennel_proto::PROTOCOL_VERSION,
            min_protocol_version: Some(kennel_proto::MIN_PROTOCOL_VERSION),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.id.labels.clone(),
            agents: self.id.agents.clone(),
            running_tasks: running,
        });
        if let Err(e) = sink.send(Message::Text(hello.to_json().into())).await {
            return End::Retry(format!("failed to authenticate: {e}"));
        }
        let authenticated = loop {
            let next = tokio::select! {
                n = tokio::time::timeout(Duration::from_secs(10), stream.next()) => n,
                _ = shutdown.changed() => {
                    let _ = sink.send(going_away()).await;
                    return End::Shutdown;
                }
            };
            let frame = match next {
                Err(_) => return End::Retry("no answer to authenticate within 10s".into()),
                Ok(None) => return End::Retry("connection closed during authentication".into()),
                Ok(Some(Err(e))) => return End::Retry(format!("connection failed: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            match frame {
                Message::Text(t) => match decode_server_frame(t.as_str(), usize::MAX) {
                    Ok(Decoded::Known(ServerMessage::Authenticated(a))) => break a,
                    Ok(Decoded::Known(ServerMessage::Error(e)))
                        if matches!(
                            e.code,
                            ErrorCode::Unauthorized | ErrorCode::UnsupportedVersion
                        ) =>
                    {
                        return End::Fatal(LinkError::Refused(e.message))
                    }
                    Ok(other) => return End::Retry(format!("unexpected first answer: {other:?}")),
                    Err(e) => return End::Retry(format!("bad frame from upstream: {e}")),
                },
                Message::Close(c) => {
                    let reason = c
                        .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_default();
                    return End::Retry(format!("closed during authentication: {reason}"));
                }
                _ => continue,
            }
        };
        *delays = fresh();
        tracing::info!(daemon_id = %authenticated.daemon_id, url = %self.id.url, "connected upstream");
        self.state.send_modify(|s| {
            s.connected = true;
            s.daemon_id = Some(authenticated.daemon_id.clone());
        });

        // Reconnected while stopping: offer nothing before anything else happens.
        if *self.stopping.borrow() {
            if let Err(e) = sink.send(self.no_capacity()).await {
                return End::Retry(format!("send failed: {e}"));
            }
        }
        // Everything queued for the old connection is in the outbox; replay from there.
        while self.out.try_recv().is_ok() {}
        let pending = match self.outbox.pending() {
            Ok(p) => p,
            Err(e) => return End::Retry(format!("outbox unreadable: {e}")),
        };
        for p in pending {
            if let Err(e) = sink.feed(Message::Text(p.frame.into())).await {
                return End::Retry(format!("send failed: {e}"));
            }
        }
        if let Err(e) = sink.flush().await {
            return End::Retry(format!("send failed: {e}"));
        }

        let interval = Duration::from_secs(authenticated.heartbeat_interval_secs.max(1));
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let silence = interval * 3;
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    // Whatever the executor queued goes out before the Close frame.
                    while let Ok(p) = self.out.try_recv() {
                        if sink.feed(Message::Text(p.frame.into())).await.is_err() {
                            return End::Shutdown;
                        }
                    }
                    let _ = sink.send(going_away()).await;
                    // Wait briefly for the upstream's Close reply, so the close is orderly.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(f)) = stream.next().await {
                            if matches!(f, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return End::Shutdown;
                }
                Ok(()) = stopping.changed() => {
                    if *stopping.borrow_and_update() {
                        if let Err(e) = sink.send(self.no_capacity()).await {
                            return End::Retry(format!("send failed: {e}"));
                        }
                    }
                }
                frame = tokio::time::timeout(silence, stream.next()) => {
                    let frame = match frame {
                        Err(_) => return End::Retry(format!("upstream silent for {}s", silence.as_secs())),
                        Ok(None) => return End::Retry("connection closed".into()),
                        Ok(Some(Err(e))) => return End::Retry(format!("connection failed: {e}")),
                        Ok(Some(Ok(f))) => f,
                    };
                    match frame {
                        Message::Text(t) => {
                            if let Some(resend) = self.handle(t.as_str()).await {
                                for p in resend {
                                    if let Err(e) = sink.feed(Message::Text(p.frame.into())).await {
                                        return End::Retry(format!("send failed: {e}"));
                                    }
                                }
                                if let Err(e) = sink.flush().await {
                                    return End::Retry(format!("send failed: {e}"));
                                }
                            }
                        }
                        Message::Close(c) => {
                            let reason = c.map(|c| format!("{} {}", u16::from(c.code), c.reason)).unwrap_or_default();
                            return End::Retry(format!("upstream closed the connection: {reason}"));
                        }
                        _ => {}
                    }
                }
                Some(p) = self.out.recv() => {
                    if let Err(e) = sink.feed(Message::Text(p.frame.into())).await {
                        return End::Retry(format!("send failed: {e}"));
                    }
                    // Batch whatever else is ready into the same flush.
                    while let Ok(p) = self.out.try_recv() {
                        if let Err(e) = sink.feed(Message::Text(p.frame.into())).await {
                            return End::Retry(format!("send failed: {e}"));
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        return End::Retry(format!("send failed: {e}"));
                    }
                }
                _ = heartbeat.tick() => {
                    let active = self.exec.running_now().into_iter()
                        .map(|r| TaskRef { task_id: r.task_id, attempt: r.attempt })
                        .collect();
                    let hb = DaemonMessage::Heartbeat(Heartbeat { active_tasks: active });
                    if let Err(e) = sink.send(Message::Text(hb.to_json().into())).await {
                        return End::Retry(format!("send failed: {e}"));
                    }
                }
            }
        }
    }

    /// Applies one upstream frame; returns messages to resend (after a `seqGap`).
    async fn handle(&self, text: &str) -> Option<Vec<Pending>> {
        let msg = match decode_server_frame(text, usize::MAX) {
            Ok(Decoded::Known(m)) => m,
            Ok(Decoded::Unknown { type_name }) => {
                tracing::debug!(type_name, "ignoring unknown message type from upstream");
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "bad frame from upstream"
                );
                return None;
            }
        };
        match msg {
            ServerMessage::Ack(a) => {
                if let Err(e) = self.outbox.ack(&a.task_id, a.attempt, a.seq) {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "outbox failed to apply an ack"
                    );
                }
            }
            ServerMessage::SpawnTask(s) => self.exec.spawn(s).await,
            ServerMessage::PauseTask(c) => self.exec.control(&c.task_id, c.attempt, Control::Pause),
            ServerMessage::ResumeTask(c) => {
                self.exec.control(&c.task_id, c.attempt, Control::Resume)
            }
            ServerMessage::InterruptTask(c) => self.exec.control(
                &c.task_id,
                c.attempt,
                Control::Interrupt {
                    grace: Duration::from_secs(c.grace_secs),
                },
            ),
            ServerMessage::SendMessage(m) => {
                self.exec
                    .control(&m.task_id, m.attempt, Control::Message(m.message))
            }
            ServerMessage::Error(e) => match (e.code, &e.task_id, e.attempt) {
                (ErrorCode::StaleAttempt, Some(t), Some(a)) => {
                    tracing::warn!(task_id = %t, attempt = a, "upstream refused the attempt as stale: {}", e.message);
                    self.exec.control(t, a, Control::Drop);
                    if let Err(err) = self.outbox.drop_attempt(t, a) {
                        tracing::error!(error = %err, "outbox failed");
                    }
                }
                (ErrorCode::SeqGap, Some(t), Some(a)) => {
                    let from = e.expected_seq.unwrap_or(1);
                    return self.outbox.pending_from(t, a, from).ok();
                }
                _ => tracing::warn!(code = e.code.as_str(), "upstream error: {}", e.message),
            },
            ServerMessage::Authenticated(_) => {}
        }
        None
    }
}

/// The Close frame of a clean stop.
fn going_away() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(close::GOING_AWAY),
        reason: "daemon shutting down".into(),
    }))
}
