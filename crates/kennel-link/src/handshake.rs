//! The server side of a daemon link's handshake, used by the coordinator's hub and the relay's
//! downstream: the `authenticate` frame within the deadline, decoded with the frame limit; the
//! key; the protocol version; the machine; refusals as an `error` frame and a close code
//! (`kennel_proto::link::close`). What differs between the two ends (how a key is checked,
//! whether a machine may use it) is a [`Gate`].
//!
//! It must not attach the daemon nor assign its id: it says who is knocking and whether they
//! may come in, and hands the socket over.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kennel_proto::link::{close, negotiate_version, Authenticate, Authenticated, ErrorCode};
use kennel_proto::{decode_daemon_frame, DaemonMessage, Decoded, ServerMessage};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Message;

use crate::outbound::{self, LinkRx, LinkTx};
use crate::ws::{close_message, Accepted, LinkSocket};

/// The rules of one end's handshake.
#[derive(Debug, Clone, Copy)]
pub struct Handshake {
    /// How long a new connection may take to send `authenticate`.
    pub auth_timeout: Duration,
    /// Largest frame accepted, in bytes, the `authenticate` frame included.
    pub max_frame_bytes: usize,
    /// What this end calls itself when no protocol version is common ("server", "relay").
    pub end: &'static str,
}

/// Why a daemon was turned away: sent as an `error` frame, then as the close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// The close code (`kennel_proto::link::close`).
    pub close: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, close: u16, message: impl Into<String>) -> Self {
        Refusal {
            code,
            close,
            message: message.into(),
        }
    }
}

/// What one end checks of a daemon's `authenticate`, in order: the key (before the protocol
/// version, so a stranger learns nothing else), then, once a version is agreed, whether this
/// machine may use that key.
pub trait Gate: Sync {
    /// What a valid key yields.
    type Key: Send;
    /// What an admitted daemon carries into its session.
    type Admitted: Send;

    fn check_key(
        &self,
        hello: &Authenticate,
    ) -> impl Future<Output = Result<Self::Key, Refusal>> + Send;

    fn check_machine(
        &self,
        hello: &Authenticate,
        key: Self::Key,
    ) -> impl Future<Output = Result<Self::Admitted, Refusal>> + Send;
}

/// A daemon that passed the handshake: the budget and the pre-authentication slot are gone.
pub struct Admitted<A> {
    pub socket: LinkSocket,
    pub hello: Authenticate,
    /// The protocol version both ends speak.
    pub version: u32,
    /// What the [`Gate`] returned.
    pub admitted: A,
    /// Largest frame accepted, in bytes (from the [`Handshake`]).
    pub max_frame_bytes: usize,
}

impl<A> Admitted<A> {
    /// The `authenticated` answer telling the daemon its id and the link's terms.
    pub fn authenticated(&self, daemon_id: String, heartbeat_interval_secs: u64) -> ServerMessage {
        ServerMessage::Authenticated(Authenticated {
            daemon_id,
            heartbeat_interval_secs,
            protocol_version: self.version,
            max_frame_bytes: self.max_frame_bytes,
        })
    }

    /// The link's outbound queue: `at_least` frames, and at least twice the daemon's slots
    /// (each running task may have an assignment and a cancel waiting).
    pub fn queue<T>(&self, at_least: usize) -> (LinkTx<T>, LinkRx<T>) {
        outbound::channel(at_least.max(2 * self.hello.max_concurrent_tasks as usize))
    }
}

impl Handshake {
    /// Reads and checks the `authenticate` frame. `None` when the daemon was refused (it was
    /// told why) or left; then the socket is done with.
    pub async fn run<G: Gate>(
        &self,
        accepted: Accepted,
        pre_auth_slot: OwnedSemaphorePermit,
        gate: &G,
    ) -> Option<Admitted<G::Admitted>> {
        let Accepted { mut socket, budget } = accepted;
        let first = match tokio::time::timeout(self.auth_timeout, socket.next()).await {
            Err(_) => {
                let reason = format!(
                    "no authenticate frame within {}s",
                    self.auth_timeout.as_secs()
                );
                let _ = socket
                    .send(close_message(close::AUTH_TIMEOUT, &reason))
                    .await;
                return None;
            }
            Ok(None) => return None,
            Ok(Some(Err(e))) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "connection ended before authenticate"
                );
                metrics::counter!("kennel_links_refused_total", "reason" => "preAuth").increment(1);
                return None;
            }
            Ok(Some(Ok(m))) => m,
        };
        let Message::Text(text) = first else {
            let reason = "expected an authenticate text frame first";
            let _ = socket.send(close_message(close::PROTOCOL, reason)).await;
            return None;
        };
        let hello = match decode_daemon_frame(text.as_str(), self.max_frame_bytes) {
            Ok(Decoded::Known(DaemonMessage::Authenticate(a))) => a,
            Ok(_) => {
                let msg = "the first frame must be `authenticate`";
                let refusal = Refusal::new(ErrorCode::NotAuthenticated, close::PROTOCOL, msg);
                refuse(&mut socket, &refusal).await;
                return None;
            }
            Err(e) => {
                let msg = format!("the first frame must be a valid `authenticate`: {e}");
                let refusal = Refusal::new(ErrorCode::NotAuthenticated, close::PROTOCOL, msg);
                refuse(&mut socket, &refusal).await;
                return None;
            }
        };
        let checked = match self.check(&hello, gate).await {
            Ok(checked) => checked,
            Err(refusal) => {
                tracing::warn!(machine_id = %hello.machine_id, "daemon refused: {}", refusal.message);
                refuse(&mut socket, &refusal).await;
                return None;
            }
        };
        // Authenticated: no byte budget and no pre-authentication slot from here on.
        budget.lift();
        drop(pre_auth_slot);
        let (version, admitted) = checked;
        Some(Admitted {
            socket,
            hello,
            version,
            admitted,
            max_frame_bytes: self.max_frame_bytes,
        })
    }

    /// The key, the protocol version, then the machine.
    async fn check<G: Gate>(
        &self,
        hello: &Authenticate,
        gate: &G,
    ) -> Result<(u32, G::Admitted), Refusal> {
        let key = gate.check_key(hello).await?;
        let Some(version) = negotiate_version(hello.protocol_version, hello.min_protocol_version)
        else {
            return Err(Refusal::new(
                ErrorCode::UnsupportedVersion,
                close::UNSUPPORTED_VERSION,
                format!(
                    "no common protocol version: daemon speaks {}..={}, {} speaks {}..={}",
                    hello.min_protocol_version.unwrap_or(hello.protocol_version),
                    hello.protocol_version,
                    self.end,
                    kennel_proto::MIN_PROTOCOL_VERSION,
                    kennel_proto::PROTOCOL_VERSION
                ),
            ));
        };
        let admitted = gate.check_machine(hello, key).await?;
        Ok((version, admitted))
    }
}

/// Tells the daemon why it is turned away, then closes.
async fn refuse(socket: &mut LinkSocket, refusal: &Refusal) {
    let error = ServerMessage::error(refusal.code, &refusal.message);
    let _ = socket.send(Message::Text(error.to_json().into())).await;
    let _ = socket
        .send(close_message(refusal.close, &refusal.message))
        .await;
}

/// Closes a link before its session starts (the daemon was admitted but could not be
/// attached), with no `error` frame.
pub async fn close_now(socket: &mut LinkSocket, code: u16, reason: &str) {
    let _ = socket.send(close_message(code, reason)).await;
}
