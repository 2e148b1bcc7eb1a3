//! The relay's one link upstream (a coordinator or another relay), where it poses as one big
//! daemon. It authenticates, replays buffered daemon messages, sends heartbeats at the
//! interval the upstream announces and hands commands to the [`Relay`] core. When the link
//! drops it reconnects forever, with exponential backoff and jitter from 1 s to 60 s.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use kennel_proto::{decode_server_frame, Decoded, ServerMessage};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::relay::Relay;

/// How long the upstream has to answer `authenticate`.
const AUTH_DEADLINE: Duration = Duration::from_secs(10);

use kennel_link::reconnect_backoff as backoff;

/// Why an upstream session ended.
enum Ended {
    /// `POST /reconnect` asked for a new connection now.
    ReconnectRequested,
    /// The link failed or was closed; why, for the log.
    Lost(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::ReconnectRequested => f.write_str("reconnect requested"),
            Ended::Lost(reason) => f.write_str(reason),
        }
    }
}

/// Runs until `shutdown` fires; never gives up otherwise.
pub async fn run(relay: Arc<Relay>, mut shutdown: watch::Receiver<bool>) {
    let mut delays = backoff();
    loop {
        let mut fresh = false;
        let ended = tokio::select! {
            r = session(&relay, &mut fresh) => Ended::Lost(r),
            _ = relay.reconnect.notified() => Ended::ReconnectRequested,
            _ = shutdown.changed() => return,
        };
        let reason = ended.to_string();
        relay.upstream_down(&reason);
        if fresh {
            delays = backoff();
        }
        if let Ended::ReconnectRequested = ended {
            delays = backoff();
            continue;
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(60));
        relay.log(
            "error",
            &format!(
                "upstream link down ({reason}); retrying in {:.1}s",
                delay.as_secs_f64()
            ),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = relay.reconnect.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One connection, from connect to its end; returns why it ended. `fresh` is set once the
/// upstream accepted the relay, so the backoff starts over.
async fn session(relay: &Arc<Relay>, fresh: &mut bool) -> String {
    let url = match relay.cfg.upstream_endpoint() {
        Ok(url) => url,
        Err(e) => return format!("relay.upstream: {e}"),
    };
    let (ws, _) = match tokio_tungstenite::connect_async_with_config(&url, None, true).await {
        Ok(c) => c,
        Err(e) => return format!("cannot connect to {url}: {e}"),
    };
    let (mut sink, mut stream) = ws.split();
    if let Err(e) = sink
        .send(Message::Text(relay.hello().to_json().into()))
        .await
    {
        return format!("failed to authenticate: {e}");
    }
    let authenticated = loop {
        let frame = match tokio::time::timeout(AUTH_DEADLINE, stream.next()).await {
            Err(_) => return "no answer to authenticate within 10s".into(),
            Ok(None) => return "connection closed during authentication".into(),
            Ok(Some(Err(e))) => return format!("connection failed: {e}"),
            Ok(Some(Ok(f))) => f,
        };
        match frame {
            Message::Text(t) => match decode_server_frame(t.as_str(), usize::MAX) {
                Ok(Decoded::Known(ServerMessage::Authenticated(a))) => break a,
                Ok(Decoded::Known(ServerMessage::Error(e))) => {
                    return format!(
                        "upstream refused the relay: {} (check relay.api_key; it needs the daemon or relay scope)",
                        e.message
                    )
                }
                Ok(other) => return format!("unexpected first answer: {other:?}"),
                Err(e) => return format!("bad frame from upstream: {e}"),
            },
            Message::Close(c) => {
                let reason = c
                    .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                    .unwrap_or_default();
                return format!("closed during authentication: {reason}");
            }
            _ => continue,
        }
    };
    *fresh = true;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    relay.upstream_up(&authenticated.daemon_id, tx);
    let every = Duration::from_secs(authenticated.heartbeat_interval_secs.max(1));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(first) = out else { return "relay stopped".into() };
                if let Err(e) = sink.feed(Message::Text(first.into())).await {
                    return format!("send failed: {e}");
                }
                while let Ok(next) = rx.try_recv() {
                    if let Err(e) = sink.feed(Message::Text(next.into())).await {
                        return format!("send failed: {e}");
                    }
                }
                if let Err(e) = sink.flush().await {
                    return format!("send failed: {e}");
                }
            }
            _ = beat.tick() => {
                let hb = relay.upstream_heartbeat().to_json();
                if let Err(e) = sink.send(Message::Text(hb.into())).await {
                    return format!("heartbeat failed: {e}");
                }
            }
            frame = stream.next() => {
                let mut frames = vec![frame];
                // Whatever else already arrived is handled together (acks in one transaction).
                while frames.len() < 128 {
                    match stream.next().now_or_never() {
                        Some(f) => frames.push(f),
                        None => break,
                    }
                }
                let mut texts = Vec::with_capacity(frames.len());
                let mut end = None;
                for frame in frames {
                    match frame {
                        None => end = Some("upstream closed the connection".to_string()),
                        Some(Err(e)) => end = Some(format!("connection failed: {e}")),
                        Some(Ok(Message::Close(c))) => {
                            let reason = c
                                .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                                .unwrap_or_default();
                            end = Some(format!("upstream closed the connection: {reason}"));
                        }
                        Some(Ok(Message::Text(t))) => texts.push(t),
                        Some(Ok(_)) => {}
                    }
                    if end.is_some() {
                        break;
                    }
                }
                handle(relay, &texts);
                if let Some(reason) = end {
                    return reason;
                }
            }
        }
    }
}

/// Handles frames from upstream in order; runs of acks are applied together.
fn handle(relay: &Arc<Relay>, texts: &[tokio_tungstenite::tungstenite::Utf8Bytes]) {
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
