//! The relay's one link upstream (a coordinator or another relay), where it poses as one big
//! daemon. The session (connect, authenticate, heartbeats at the interval the upstream
//! announces, reconnecting forever with backoff) is `kennel_link::client`'s; this says what
//! the relay sends and does: the attempts it holds, the buffered daemon messages it replays,
//! the commands it hands to the [`Relay`] core.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kennel_link::client::{self, SessionEnd, Upstream};
use kennel_proto::link::Authenticated;
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::relay::Relay;

/// Runs until `shutdown` fires; never gives up otherwise.
pub async fn run(relay: Arc<Relay>, shutdown: watch::Receiver<bool>) {
    let mut link = RelayLink { relay, rx: None };
    // A refusal is retried (the relay never gives up), so this only returns on shutdown.
    let _ = client::run(
        &mut link,
        shutdown,
        client::AUTH_DEADLINE,
        kennel_link::reconnect_backoff,
    )
    .await;
}

/// The relay as one end of an upstream session.
struct RelayLink {
    relay: Arc<Relay>,
    /// What the relay core queues for the current session's upstream.
    rx: Option<mpsc::UnboundedReceiver<String>>,
}

impl Upstream for RelayLink {
    fn urls(&self) -> Result<Vec<String>, String> {
        self.relay
            .cfg
            .upstream_endpoints()
            .map_err(|e| format!("relay.upstream: {e}"))
    }

    fn hello(&mut self) -> Result<DaemonMessage, String> {
        Ok(self.relay.hello())
    }

    fn accepted(&mut self, url: &str, answer: &Authenticated) -> Result<Vec<String>, String> {
        tracing::info!(url, relay_id = %answer.daemon_id, "connected upstream");
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        self.rx = Some(rx);
        // The core replays what the upstream has not acked through `tx`, in order.
        self.relay.upstream_up(&answer.daemon_id, tx);
        Ok(Vec::new())
    }

    async fn outgoing(&mut self) -> Option<String> {
        self.rx.as_mut()?.recv().await
    }

    fn try_outgoing(&mut self) -> Option<String> {
        self.rx.as_mut()?.try_recv().ok()
    }

    fn heartbeat(&mut self) -> DaemonMessage {
        self.relay.upstream_heartbeat()
    }

    async fn received(&mut self, frames: &[Utf8Bytes]) -> Vec<String> {
        handle(&self.relay, frames);
        Vec::new()
    }

    fn ended(&mut self, end: &SessionEnd, retry_in: Option<Duration>) {
        self.rx = None;
        let reason = match end {
            // The relay stops with the process; nothing to spill or say.
            SessionEnd::Shutdown => return,
            SessionEnd::Refused(r) => format!(
                "upstream refused the relay: {} (check relay.api_key; it needs the daemon or relay scope)",
                r.message()
            ),
            end => end.to_string(),
        };
        self.relay.upstream_down(&reason);
        if let Some(delay) = retry_in {
            self.relay.log(
                "error",
                &format!(
                    "upstream link down ({reason}); retrying in {:.1}s",
                    delay.as_secs_f64()
                ),
            );
        }
    }

    fn reconnect_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let relay = self.relay.clone();
        async move { relay.reconnect.notified().await }
    }
}

/// Handles frames from upstream in order; runs of acks are applied together.
fn handle(relay: &Arc<Relay>, texts: &[Utf8Bytes]) {
    let mut acks: Vec<(kennel_proto::link::Ack, &str)> = Vec::new();
    for text in texts {
        match decode_server_frame(text.as_str(), usize::MAX) {
            Ok(Decoded::Known(ServerMessage::Ack(a))) => acks.push((a, text.as_str())),
            Ok(Decoded::Known(m)) => {
                if !acks.is_empty() {
                    relay.acks(&acks);
                    acks.clear();
                }
                relay.from_upstream(m, text.as_str())
            }
            Ok(Decoded::Unknown { type_name }) => {
                tracing::debug!(type_name, "broadcasting an unknown upstream command");
                relay.broadcast(text.as_str());
            }
            Err(e) => relay.log("error", &format!("bad frame from upstream: {e}")),
        }
    }
    if !acks.is_empty() {
        relay.acks(&acks);
    }
}
