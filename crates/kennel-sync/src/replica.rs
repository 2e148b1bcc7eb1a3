//! One peer's copy of the pipeline, shared by its sync connections and its own edits: the
//! rendezvous and every build agent hold one. Every change, made here or received from a
//! peer, is appended to the document's file before anyone hears of it; then every connection
//! is woken to send it on.
//!
//! The sync protocol is Automerge's: each connection keeps its own [`sync::State`], feeds the
//! messages it receives to [`Replica::receive`] and sends what [`Replica::generate`] returns
//! until it returns nothing, then waits for the peer or for [`Replica::subscribe`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync::{self, SyncDoc};

use crate::store::DocFileError;
use crate::{DocFile, Pipeline, PipelineError, Stage};

/// Why a replica could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    File(#[from] DocFileError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("a peer's sync message was refused")]
    Sync(#[source] Box<automerge::AutomergeError>),
    #[error("a peer sent a frame that is not an Automerge sync message: {0}")]
    NotSync(String),
}

/// A story whose stage moved: id, from, to.
pub type Moved = (String, Stage, Stage);

struct Inner {
    pipeline: Pipeline,
    file: DocFile,
}

/// A peer's copy of the pipeline.
pub struct Replica {
    inner: Mutex<Inner>,
    /// Bumped on every stored change, so connections send it on.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Replica {
    /// Opens (or starts) the document stored at `path`, as node `me`.
    pub fn open(path: &Path, me: &str) -> Result<Arc<Replica>, ReplicaError> {
        let file = DocFile::new(path);
        let doc = file.load()?;
        Ok(Arc::new(Replica {
            inner: Mutex::new(Inner {
                pipeline: Pipeline::from_doc(doc, me),
                file,
            }),
            changed: tokio::sync::watch::channel(0).0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the pipeline as it is now.
    pub fn read<T>(&self, f: impl FnOnce(&Pipeline) -> T) -> T {
        f(&self.lock().pipeline)
    }

    /// Runs `f` on the pipeline and stores what it changed; returns its answer and the
    /// stories whose stage moved.
    pub fn edit<T>(
        &self,
        f: impl FnOnce(&mut Pipeline) -> Result<T, PipelineError>,
    ) -> Result<(T, Vec<Moved>), ReplicaError> {
        let mut inner = self.lock();
        let before = stages(&inner.pipeline);
        let out = f(&mut inner.pipeline)?;
        let moved = self.store(&mut inner, &before)?;
        Ok((out, moved))
    }

    /// Applies a peer's sync message; returns the stories whose stage moved.
    pub fn receive(
        &self,
        state: &mut sync::State,
        bytes: &[u8],
    ) -> Result<Vec<Moved>, ReplicaError> {
        let message =
            sync::Message::decode(bytes).map_err(|e| ReplicaError::NotSync(e.to_string()))?;
        let mut inner = self.lock();
        let before = stages(&inner.pipeline);
        inner
            .pipeline
            .doc_mut()
            .sync()
            .receive_sync_message(state, message)
            .map_err(|e| ReplicaError::Sync(Box::new(e)))?;
        self.store(&mut inner, &before)
    }

    /// The next sync message for a connection, if it needs one.
    pub fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        let message = inner
            .pipeline
            .doc_mut()
            .sync()
            .generate_sync_message(state)?;
        Some(message.encode())
    }

    /// Changes whenever the document does.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Rewrites the file as the whole document; returns its size.
    pub fn compact(&self) -> Result<u64, ReplicaError> {
        let mut inner = self.lock();
        let Inner { pipeline, file } = &mut *inner;
        Ok(file.compact(pipeline.doc_mut())?)
    }

    fn store(
        &self,
        inner: &mut Inner,
        before: &BTreeMap<String, Stage>,
    ) -> Result<Vec<Moved>, ReplicaError> {
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
}

fn stages(p: &Pipeline) -> BTreeMap<String, Stage> {
    p.stories().into_iter().map(|s| (s.id, s.stage)).collect()
}
