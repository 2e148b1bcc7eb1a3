//! The rendezvous for build agents: the coordinator's copy of the pipeline document
//! (`kennel-sync`), synced with agents over `WS /crdt-sync`, shown on the story API and edited
//! there by people (`kennel story`). Its copy lives in `<data_dir>/pipeline.automerge`, the
//! one file of the state; every change is appended there before it counts.
//!
//! The sync protocol is Automerge's: binary frames, each one sync message, with a sync state
//! per connection. The rendezvous answers every message it receives and sends what changed
//! whenever its document changes (a story added here, or another agent's changes). It grants
//! each story's first claim it receives ([`Pipeline::grant`]). A story's stage changes become
//! `story.stage` events in the event log.

use std::sync::Arc;

use automerge::sync;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use kennel_proto::api::Scope;
pub use kennel_sync::{Moved, ReplicaError as RendezvousError};
use kennel_sync::{Pipeline, PipelineError, Replica, Story};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

/// The node id of the rendezvous in the document.
pub const NODE: &str = "rendezvous";

/// Largest sync message accepted from an agent.
const MAX_SYNC_BYTES: usize = 16 << 20;

/// The coordinator's copy of the pipeline.
pub struct Rendezvous {
    replica: Arc<Replica>,
    /// What agents present to one another on their mesh (`<data_dir>/mesh.key`, made once),
    /// handed to each with its key.
    mesh_secret: String,
}

impl Rendezvous {
    /// Opens (or starts) the pipeline file in `data_dir`.
    pub fn open(data_dir: &std::path::Path) -> Result<Arc<Rendezvous>, RendezvousError> {
        let replica = Replica::open(&data_dir.join("pipeline.automerge"), NODE)?;
        let path = data_dir.join("mesh.key");
        let mesh_secret = match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let secret = kennel_auth::random_hex(32);
                kennel_auth::write_private(&path, &secret).map_err(|source| {
                    RendezvousError::File(kennel_sync::store::DocFileError::Io {
                        path: path.display().to_string(),
                        source,
                    })
                })?;
                secret
            }
        };
        Ok(Arc::new(Rendezvous {
            replica,
            mesh_secret,
        }))
    }

    /// The secret build agents present to one another on their mesh.
    pub fn mesh_secret(&self) -> &str {
        &self.mesh_secret
    }

    pub fn stories(&self) -> Vec<Story> {
        self.replica.stories()
    }

    pub fn story(&self, id: &str) -> Option<Story> {
        self.replica.story(id)
    }

    /// Runs `f` on the pipeline, stores what it changed and tells the connections; returns
    /// its answer and the stories whose stage moved.
    pub fn edit<T>(
        &self,
        f: impl FnOnce(&mut Pipeline) -> Result<T, PipelineError>,
    ) -> Result<(T, Vec<Moved>), RendezvousError> {
        self.replica.edit(f)
    }
}

/// Records each moved story as a `story.stage` event and publishes them.
pub async fn announce(app: &AppState, moved: Vec<Moved>) {
    for (id, from, to) in moved {
        let data = serde_json::json!({ "storyId": id, "from": from.as_str(), "to": to.as_str() });
        match app
            .store
            .record_event("story.stage", None, None, data, app.clock.now_ms())
            .await
        {
            Ok(ev) => app.coord.publish_events(vec![ev]),
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to record a story's stage change"
            ),
        }
    }
}

/// Applies an agent's sync message, then grants the claims it brought that are the first on
/// their story ([`Pipeline::grant`]): the grant goes back to the agent in the answer.
fn receive_and_grant(
    rv: &Replica,
    state: &mut sync::State,
    bytes: &[u8],
) -> Result<Vec<Moved>, RendezvousError> {
    let mut moved = rv.receive(state, bytes)?;
    let (granted, more) = rv.grant()?;
    tracing::debug!(bytes = bytes.len(), ?granted, "sync message received");
    moved.extend(more);
    Ok(moved)
}

/// `WS /crdt-sync`: an agent (an `agent`-scope key) syncing its copy of the pipeline.
pub async fn crdt_sync(
    p: Principal,
    State(app): State<Arc<AppState>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    p.require(&[Scope::Agent])?;
    let ws = ws.map_err(|e| {
        ApiError::invalid(format!(
            "/crdt-sync speaks WebSocket only: {}",
            axum::response::IntoResponse::into_response(e).status()
        ))
    })?;
    Ok(ws
        .max_message_size(MAX_SYNC_BYTES)
        .on_upgrade(move |socket| serve(app, socket)))
}

async fn serve(app: Arc<AppState>, mut socket: WebSocket) {
    let Some(rv) = app.rendezvous.clone() else {
        return;
    };
    let rv = rv.replica.clone();
    let mut state = sync::State::new();
    let mut changed = rv.subscribe();
    loop {
        while let Some(bytes) = rv.generate(&mut state) {
            if socket.send(WsMessage::Binary(bytes.into())).await.is_err() {
                return;
            }
        }
        tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => match receive_and_grant(&rv, &mut state, &bytes) {
                    Ok(moved) => announce(&app, moved).await,
                    Err(e) => {
                        tracing::warn!(error = &e as &dyn std::error::Error, "closing a /crdt-sync connection");
                        let _ = socket.send(WsMessage::Close(Some(axum::extract::ws::CloseFrame {
                            code: 1003,
                            reason: "not an Automerge sync message".into(),
                        }))).await;
                        return;
                    }
                },
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            r = changed.changed() => if r.is_err() { return },
        }
    }
}
