//! The agents' mesh: so work goes on while the rendezvous is down, each agent started with
//! `--listen` serves `/crdt-sync` to other agents and syncs with up to `max_peers` of those it
//! saw alive, found in the document's node entries (where each writes the address it serves
//! on with its heartbeat). The peers it keeps are those it ranks first (lowest
//! `sha256(me, peer)`), so links spread over the agents; a peer that goes silent or leaves
//! the document is dropped and replaced.
//!
//! Agents present to one another the mesh secret the rendezvous gave each with its key
//! (`Authorization: Bearer`); anything else is refused before the WebSocket opens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use kennel_sync::Replica;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::peer;

/// Serves `/crdt-sync` on `listener` to agents presenting `secret`, until `stop`.
pub async fn serve(
    listener: TcpListener,
    secret: String,
    replica: Arc<Replica>,
    mut stop: watch::Receiver<bool>,
) {
    let secret = Arc::new(secret);
    loop {
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "mesh: accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (secret, replica, mut stop) = (secret.clone(), replica.clone(), stop.clone());
        tokio::spawn(async move {
            // The callback's signature is tungstenite's.
            #[allow(clippy::result_large_err)]
            let check = |req: &Request, resp: Response| check(req, resp, &secret);
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(peer::MAX_SYNC_BYTES));
            let ws =
                match tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
                    .await
                {
                    Ok(ws) => ws,
                    Err(e) => {
                        tracing::debug!(%from, "mesh: refused a connection: {e}");
                        return;
                    }
                };
            tracing::info!(%from, "mesh: a peer connected");
            tokio::select! {
                _ = peer::carry(ws, &replica) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// Accepts the upgrade only on `/crdt-sync` with the mesh secret.
#[allow(clippy::result_large_err)] // the signature tungstenite's callback has
fn check(req: &Request, resp: Response, secret: &str) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut r = ErrorResponse::new(Some(why.to_string()));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/crdt-sync" {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "only /crdt-sync is served here",
        ));
    }
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "a mesh peer must present the mesh secret its rendezvous gave it",
        ));
    }
    Ok(resp)
}

/// One outgoing mesh link.
struct Link {
    addr: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The agent's outgoing mesh links.
pub struct Mesh {
    secret: String,
    replica: Arc<Replica>,
    links: BTreeMap<String, Link>,
}

impl Mesh {
    pub fn new(secret: String, replica: Arc<Replica>) -> Mesh {
        Mesh {
            secret,
            replica,
            links: BTreeMap::new(),
        }
    }

    /// Keeps links to exactly `peers` (node → address): new ones are opened, those no longer
    /// wanted (or whose address changed) closed. Returns whether the set changed.
    pub fn keep(&mut self, peers: &BTreeMap<String, String>) -> bool {
        let before: Vec<String> = self.links.keys().cloned().collect();
        self.links.retain(|node, link| {
            let keep = peers.get(node) == Some(&link.addr);
            if !keep {
                let _ = link.stop.send(true);
                link.task.abort();
            }
            keep
        });
        for (node, addr) in peers {
            if self.links.contains_key(node) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(peer::run(
                addr.clone(),
                self.secret.clone(),
                self.replica.clone(),
                watch::channel(false).0,
                stopped,
            ));
            self.links.insert(
                node.clone(),
                Link {
                    addr: addr.clone(),
                    stop,
                    task,
                },
            );
        }
        self.links.keys().cloned().collect::<Vec<_>>() != before
    }

    /// The peers it keeps links to.
    pub fn peers(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for link in self.links.values() {
            let _ = link.stop.send(true);
            link.task.abort();
        }
    }
}

/// The address peers reach `/crdt-sync` on, from where it listens.
pub fn advertised(listen: SocketAddr) -> String {
    format!("ws://{listen}/crdt-sync")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, auth: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).expect("a request")
    }

    #[test]
    fn only_crdt_sync_with_the_mesh_secret_is_accepted() {
        let ok = check(
            &req("/crdt-sync", Some("Bearer s3cret")),
            Response::new(()),
            "s3cret",
        );
        assert!(ok.is_ok());
        for (path, auth, status) in [
            ("/crdt-sync", None, 401),
            ("/crdt-sync", Some("Bearer wrong"), 401),
            ("/crdt-sync", Some("Bearer s3cre"), 401),
            ("/crdt-sync", Some("s3cret"), 401),
            ("/other", Some("Bearer s3cret"), 404),
        ] {
            let refused = check(&req(path, auth), Response::new(()), "s3cret");
            let status_of = refused.map(|_| 200).unwrap_or_else(|e| e.status().as_u16());
            assert_eq!(status_of, status, "{path} {auth:?}");
        }
    }
}
