//! One peer's copy of the pipeline, shared by its sync connections and its own edits: the
//! rendezvous and every build agent hold one. Every change, made here or received from a
//! peer, is appended to the document's file before anyone hears of it; then every connection
//! is woken to send it on.
//!
//! The sync protocol is Automerge's: each connection keeps its own [`sync::State`], feeds the
//! messages it receives to [`Replica::receive`] and sends what [`Replica::generate`] returns
//! until it returns nothing, then waits for the peer or for [`Replica::subscribe`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::sync::{self, SyncDoc};
use automerge::{PatchAction, Prop, ROOT};

use crate::store::DocFileError;
use crate::{DocFile, Pipeline, PipelineError, Stage, Story};

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

/// The document as read: every story and node, kept current as the document changes by
/// re-reading only what each change touched (Automerge's indexed diff). Reading a story from
/// the document costs a lookup per field; a loop that plans on every change cannot afford to
/// read them all each time.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub stories: BTreeMap<String, Story>,
    /// Node → its heartbeat counter and sync address.
    pub nodes: BTreeMap<String, (i64, String)>,
}

struct Inner {
    pipeline: Pipeline,
    file: DocFile,
    view: View,
}

impl Inner {
    /// Brings the view up to date with the document; returns the stories whose stage moved.
    fn refresh(&mut self) -> Vec<Moved> {
        let patches = self.pipeline.doc_mut().diff_incremental();
        let (mut stories, mut nodes) = (BTreeSet::new(), BTreeSet::new());
        for patch in &patches {
            // The root key under which the change happened: the first step of its path, or
            // the key itself for a change of the root.
            let key = match (patch.path.first(), &patch.action) {
                (Some((obj, Prop::Map(key))), _) if *obj == ROOT => key.as_str(),
                (None, PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key }) => {
                    key.as_str()
                }
                _ => continue,
            };
            if let Some(id) = key.strip_prefix("story:") {
                stories.insert(id.to_string());
            } else if let Some(id) = key.strip_prefix("node:") {
                nodes.insert(id.to_string());
            }
        }
        let mut moved = Vec::new();
        for id in stories {
            let before = self.view.stories.get(&id).map(|s| s.stage);
            match self.pipeline.story(&id) {
                Some(story) => {
                    if let Some(from) = before.filter(|from| *from != story.stage) {
                        moved.push((id.clone(), from, story.stage));
                    }
                    self.view.stories.insert(id, story);
                }
                None => {
                    self.view.stories.remove(&id);
                }
            }
        }
        for id in nodes {
            match self.pipeline.node(&id) {
                Some(n) => self.view.nodes.insert(id, n),
                None => self.view.nodes.remove(&id),
            };
        }
        moved
    }
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
        let mut doc = file.load()?;
        doc.update_diff_cursor();
        let pipeline = Pipeline::from_doc(doc, me);
        let view = View {
            stories: pipeline
                .stories()
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect(),
            nodes: pipeline.nodes(),
        };
        Ok(Arc::new(Replica {
            inner: Mutex::new(Inner {
                pipeline,
                file,
                view,
            }),
            changed: tokio::sync::watch::channel(0).0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the view of the pipeline as it is now.
    pub fn view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.lock().view)
    }

    /// Every story, by id.
    pub fn stories(&self) -> Vec<Story> {
        self.view(|v| v.stories.values().cloned().collect())
    }

    pub fn story(&self, id: &str) -> Option<Story> {
        self.view(|v| v.stories.get(id).cloned())
    }

    /// Grants the first claim of every story claimed but granted to none
    /// ([`Pipeline::grant`]); returns the stories granted and the stories that moved. Only
    /// the rendezvous calls this.
    pub fn grant(&self) -> Result<(Vec<String>, Vec<Moved>), ReplicaError> {
        let waiting: Vec<Story> = self.view(|v| {
            v.stories
                .values()
                .filter(|s| !s.granted && s.owner.is_some())
                .cloned()
                .collect()
        });
        if waiting.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        self.edit(|p| p.grant(&waiting))
    }

    /// Runs `f` on the pipeline and stores what it changed; returns its answer and the
    /// stories whose stage moved.
    pub fn edit<T>(
        &self,
        f: impl FnOnce(&mut Pipeline) -> Result<T, PipelineError>,
    ) -> Result<(T, Vec<Moved>), ReplicaError> {
        let mut inner = self.lock();
        let out = f(&mut inner.pipeline)?;
        let moved = self.store(&mut inner)?;
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
        inner
            .pipeline
            .doc_mut()
            .sync()
            .receive_sync_message(state, message)
            .map_err(|e| ReplicaError::Sync(Box::new(e)))?;
        self.store(&mut inner)
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

    fn store(&self, inner: &mut Inner) -> Result<Vec<Moved>, ReplicaError> {
        let Inner { pipeline, file, .. } = inner;
        if file.append(pipeline.doc_mut())? > 0 {
            let moved = inner.refresh();
            self.changed.send_modify(|n| *n += 1);
            return Ok(moved);
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::NewStory;
    use crate::StoryUpdate;

    /// Syncs `a` and `b` until neither has anything to send.
    fn sync_both(a: &Replica, b: &Replica) {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        loop {
            let mut quiet = true;
            while let Some(m) = a.generate(&mut sa) {
                b.receive(&mut sb, &m).unwrap();
                quiet = false;
            }
            while let Some(m) = b.generate(&mut sb) {
                a.receive(&mut sa, &m).unwrap();
                quiet = false;
            }
            if quiet {
                return;
            }
        }
    }

    #[test]
    fn the_view_follows_every_change_made_here_or_received_and_says_what_moved() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open(&dir.path().join("r.automerge"), "rendezvous").unwrap();
        let a = Replica::open(&dir.path().join("a.automerge"), "a").unwrap();
        let new = NewStory {
            id: "s1".into(),
            title: "one".into(),
            max_retries: 2,
            ..NewStory::default()
        };
        let (_, moved) = r.edit(|p| p.add_story(&new, 0)).unwrap();
        assert!(moved.is_empty(), "a new story moved nowhere");
        r.edit(|p| p.move_story("s1", Stage::Current)).unwrap();
        sync_both(&r, &a);
        assert_eq!(a.story("s1").map(|s| s.stage), Some(Stage::Current));

        a.edit(|p| p.heartbeat("ws://a")).unwrap();
        a.edit(|p| p.claim("s1", 0)).unwrap();
        let update = StoryUpdate {
            stage: Some(Stage::Qa),
            branch: Some("kennel/s1.a".into()),
            ..StoryUpdate::default()
        };
        let (_, moved) = a.edit(|p| p.record("s1", &update)).unwrap();
        assert_eq!(moved, [("s1".to_string(), Stage::Current, Stage::Qa)]);
        let mut state = sync::State::new();
        let mut other = sync::State::new();
        let mut moved_here = Vec::new();
        loop {
            let mut quiet = true;
            while let Some(m) = a.generate(&mut other) {
                moved_here.extend(r.receive(&mut state, &m).unwrap());
                quiet = false;
            }
            while let Some(m) = r.generate(&mut state) {
                a.receive(&mut other, &m).unwrap();
                quiet = false;
            }
            if quiet {
                break;
            }
        }
        assert_eq!(moved_here, [("s1".to_string(), Stage::Current, Stage::Qa)]);
        let s = r.story("s1").unwrap();
        assert_eq!(s.owner.as_deref(), Some("a"));
        assert_eq!(s.branch.as_deref(), Some("kennel/s1.a"));
        assert_eq!(
            r.view(|v| v.nodes.get("a").cloned()),
            Some((1, "ws://a".into()))
        );

        r.edit(|p| p.delete_story("s1")).unwrap();
        sync_both(&r, &a);
        assert!(a.story("s1").is_none() && r.stories().is_empty());
        // The view read again from the file is the same.
        drop(a);
        let again = Replica::open(&dir.path().join("a.automerge"), "a").unwrap();
        assert!(again.stories().is_empty());
        assert_eq!(again.view(|v| v.nodes.len()), 1);
    }
}
