//! The agent's sync connection to the rendezvous: Automerge's sync protocol over a WebSocket
//! (binary frames, one sync message each, a fresh sync state per connection), reconnecting
//! after 1 s, doubling to 30 s, while the rendezvous is unreachable. The agent works on
//! meanwhile; the first sync after a reconnect merges what both sides did apart.

use std::sync::Arc;
use std::time::Duration;

use automerge::sync;
use futures_util::{SinkExt, StreamExt};
use kennel_sync::Replica;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::AgentError;

/// First and longest wait before reconnecting.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Largest sync message accepted from a peer.
pub(crate) const MAX_SYNC_BYTES: usize = 16 << 20;

/// The rendezvous's sync endpoint and its HTTP base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls {
    /// `ws(s)://host:port/crdt-sync`.
    pub ws: String,
    /// `http(s)://host:port`, for the join token's exchange.
    pub http: String,
}

impl Urls {
    /// From `ws://host:port/crdt-sync` (the path may be left out) or `http://host:port`.
    pub fn parse(url: &str) -> Result<Urls, AgentError> {
        let bad = || AgentError::Url(url.to_string());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let (ws, http) = match scheme {
            "ws" | "http" => ("ws", "http"),
            "wss" | "https" => ("wss", "https"),
            _ => return Err(bad()),
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Urls {
            ws: format!("{ws}://{host}/crdt-sync"),
            http: format!("{http}://{host}"),
        })
    }
}

/// Keeps the agent synced with the peer (the rendezvous, or a mesh peer) at `url`, presenting
/// `key`, until `stop`; `synced` says whether a connection is up.
pub async fn run(
    url: String,
    key: String,
    replica: Arc<Replica>,
    synced: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = BACKOFF.0;
    loop {
        let end = tokio::select! {
            end = session(&url, &key, &replica, &synced) => end,
            _ = stop.changed() => return,
        };
        let _ = synced.send(false);
        match end {
            Ended::Closed => wait = BACKOFF.0,
            Ended::Failed(reason) => {
                tracing::warn!(
                    peer = %url,
                    "sync failed: {reason}; working on, retrying in {}s",
                    wait.as_secs()
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        wait = (wait * 2).min(BACKOFF.1);
    }
}

pub(crate) enum Ended {
    /// The peer closed the connection after it was up.
    Closed,
    Failed(String),
}

async fn session(url: &str, key: &str, replica: &Replica, synced: &watch::Sender<bool>) -> Ended {
    let mut req = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    match format!("Bearer {key}").parse() {
        Ok(v) => {
            req.headers_mut().insert("authorization", v);
        }
        Err(_) => return Ended::Failed("the agent's key is not a valid header".into()),
    }
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_SYNC_BYTES));
    let ws = match tokio_tungstenite::connect_async_with_config(req, Some(config), true).await {
        Ok((ws, _)) => ws,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    tracing::info!(peer = %url, "syncing");
    let _ = synced.send(true);
    carry(ws, replica).await
}

/// Syncs `replica` over an open WebSocket until either side ends it.
pub(crate) async fn carry<S>(ws: WebSocketStream<S>, replica: &Replica) -> Ended
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let mut state = sync::State::new();
    let mut changed = replica.subscribe();
    loop {
        while let Some(bytes) = replica.generate(&mut state) {
            tracing::debug!(bytes = bytes.len(), "sync message sent");
            if let Err(e) = tx.send(Message::Binary(bytes.into())).await {
                return Ended::Failed(e.to_string());
            }
        }
        tokio::select! {
            frame = rx.next() => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    if let Err(e) = replica.receive(&mut state, &bytes) {
                        return Ended::Failed(e.to_string());
                    }
                    tracing::debug!(bytes = bytes.len(), "sync message received");
                }
                Some(Ok(Message::Close(_))) | None => return Ended::Closed,
                Some(Err(e)) => return Ended::Failed(e.to_string()),
                Some(Ok(_)) => {}
            },
            r = changed.changed() => if r.is_err() {
                return Ended::Closed;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_urls_in_either_form() {
        let want = Urls {
            ws: "ws://h:3001/crdt-sync".into(),
            http: "http://h:3001".into(),
        };
        for given in ["ws://h:3001/crdt-sync", "ws://h:3001", "http://h:3001/"] {
            assert_eq!(Urls::parse(given).unwrap(), want, "{given}");
        }
        assert_eq!(
            Urls::parse("https://h").unwrap().ws,
            "wss://h/crdt-sync".to_string()
        );
        for bad in ["h:3001", "ftp://h", "ws://"] {
            assert!(Urls::parse(bad).is_err(), "{bad}");
        }
    }
}
