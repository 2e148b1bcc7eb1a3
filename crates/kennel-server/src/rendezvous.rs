//! The rendezvous for build agents: the coordinator's copy of the pipeline document
//! (`kennel-sync`), synced with agents over `WS /crdt-sync`, shown on the story API and edited
//! there by people (`kennel story`). Its copy lives in `<data_dir>/pipeline.automerge`, the
//! one file of the state; every change is appended there before it counts.
//!
//! The sync protocol is Automerge's: binary frames, each one sync message, with a sync state
//! per connection. The rendezvous answers every message it receives and sends what changed
//! whenever its document changes (a story added here, or another agent's changes). A story's
//! stage changes become `story.stage` events in the event log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use automerge::sync::{self, SyncDoc};
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use kennel_proto::api::Scope;
use kennel_sync::store::DocFileError;
use kennel_sync::{DocFile, Pipeline, PipelineError, Stage, Story};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::AppState;

/// The node id of the rendezvous in the document.
pub const NODE: &str = "rendezvous";

/// Largest sync message accepted from an agent.
const MAX_SYNC_BYTES: usize = 16 << 20;

/// Why the rendezvous could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error(transparent)]
    File(#[from] DocFileError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("an agent's sync message was refused")]
    Sync(#[source] Box<automerge::AutomergeError>),
    #[error("an agent sent a frame that is not an Automerge sync message: {0}")]
    NotSync(String),
}

struct Inner {
    pipeline: Pipeline,
    file: DocFile,
}

/// The coordinator's copy of the pipeline.
pub struct Rendezvous {
    inner: Mutex<Inner>,
    /// Bumped on every change, so connections send it on.
    changed: tokio::sync::watch::Sender<u64>,
}

/// A story whose stage moved: id, from, to.
pub type Moved = (String, Stage, Stage);

impl Rendezvous {
    /// Opens (or starts) the pipeline file in `data_dir`.
    pub fn open(data_dir: &std::path::Path) -> Result<Arc<Rendezvous>, RendezvousError> {
        let file = DocFile::new(&data_dir.join("pipeline.automerge"));
        let doc = file.load()?;
        Ok(Arc::new(Rendezvous {
            inner: Mutex::new(Inner {
                pipeline: Pipeline::from_doc(doc, NODE),
                file,
            }),
            changed: tokio::sync::watch::channel(0).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stories(&self) -> Vec<Story> {
        self.lock().pipeline.stories()
    }

    pub fn story(&self, id: &str) -> Option<Story> {
        self.lock().pipeline.story(id)
    }

    /// Runs `f` on the pipeline, stores what it changed and tells the connections; returns
    /// its answer and the stories whose stage moved.
    pub fn edit<T>(
        &self,
        f: impl FnOnce(&mut Pipeline) -> Result<T, PipelineError>,
    ) -> Result<(T, Vec<Moved>), RendezvousError> {
        let mut inner = self.lock();
        let before = stages(&inner.pipeline);
        let out = f(&mut inner.pipeline)?;
        let moved = self.commit(&mut inner, &before)?;
        Ok((out, moved))
    }

    fn commit(
        &self,
        inner: &mut Inner,
        before: &BTreeMap<String, Stage>,
    ) -> Result<Vec<Moved>, RendezvousError> {
        let Inner { pipeline, file } = inner;
        if file.append(pipeline.doc_mut())? > 0 {
            self.changed.send_modify(|n| *n += 1);
        }
        let after = stages(pipeline);
        Ok(after
            .into_iter()
            .filter_map(|(id, to)| match before.get(&id) {
                Some(from) if *from != to => Some((id, *from, to)),
                _ => None,
            })
            .collect())
    }

    /// Applies an agent's sync message.
    fn receive(
        &self,
        state: &mut sync::State,
        bytes: &[u8],
    ) -> Result<Vec<Moved>, RendezvousError> {
        let message =
            sync::Message::decode(bytes).map_err(|e| RendezvousError::NotSync(e.to_string()))?;
        let mut inner = self.lock();
        let before = stages(&inner.pipeline);
        inner
            .pipeline
            .doc_mut()
            .sync()
            .receive_sync_message(state, message)
            .map_err(|e| RendezvousError::Sync(Box::new(e)))?;
        self.commit(&mut inner, &before)
    }

    /// The next sync message for a connection, if it needs one.
    fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let message = inner
            .pipeline
            .doc_mut()
            .sync()
            .generate_sync_message(state)?;
        Some(message.encode())
    }
}

fn stages(p: &Pipeline) -> BTreeMap<String, Stage> {
    p.stories().into_iter().map(|s| (s.id, s.stage)).collect()
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
    let mut state = sync::State::new();
    let mut changed = rv.changed.subscribe();
    loop {
        while let Some(bytes) = rv.generate(&mut state) {
            if socket.send(WsMessage::Binary(bytes.into())).await.is_err() {
                return;
            }
        }
        tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => match rv.receive(&mut state, &bytes) {
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
