//! The pipeline document: stories and nodes in one Automerge document.
//!
//! Layout (every container is created once, by one writer, so merges never hide one):
//! - `story:<id>`: a map made by whoever adds the story: `title`, `body`, `stage` (where a
//!   person put it), `profile`, `repo`, `baseBranch`, `dependsOn` (a list), `maxRetries`,
//!   `blocked` (why, when blocked), `deleted` (a tombstone: set, never cleared), and two maps
//!   keyed by node id, each entry written only by that node or about it:
//!   - `claims[node] = {since, released, granted}`: the node asked for the story; `released`
//!     once it, or a node that saw it gone, gave it up; `granted` once the rendezvous saw it
//!     first;
//!   - `progress[node] = {stage, branch, commit, failures, error, log}`: what that node did,
//!     `log` a list of one line per attempt.
//! - `node:<id>`: a map made by the node itself: `heartbeat` (a counter it increments) and
//!   `addr` (where it serves `/crdt-sync`).
//!
//! **Who owns a story** is computed, never stored: among the claims not released, those whose
//! node's build is done (progress at QA or beyond) if there are any; among those, the granted
//! one if there is one, else the one whose `sha256(node id, story id)` is lowest. Every node
//! computes it the same way from the same merged document, so concurrent claims settle on one
//! winner after merging, whoever merged first. The rendezvous grants a story's first claim it
//! sees ([`Pipeline::grant`]): agents connected to it build only granted claims, so a claim
//! that reaches it later cannot take over a story already being built; agents cut off from
//! it fall back on the ranks. A build done while cut off is not done again when the rendezvous
//! is back and grants the story to another claim it heard of first: the finished claim owns
//! it. **Where a story is** is the owner's progress if it has any, else the stage a person
//! set: a node that lost the claim may have pushed a branch while cut off, but its progress is
//! not the owner's and moves nothing.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use sha2::{Digest, Sha256};

/// The stages of a story, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Backlog,
    Current,
    Qa,
    Merge,
    Done,
    Archived,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Backlog,
        Stage::Current,
        Stage::Qa,
        Stage::Merge,
        Stage::Done,
        Stage::Archived,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Backlog => "1_backlog",
            Stage::Current => "2_current",
            Stage::Qa => "3_qa",
            Stage::Merge => "4_merge",
            Stage::Done => "5_done",
            Stage::Archived => "6_archived",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Why a change to the pipeline was refused.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("no story `{0}`")]
    NoStory(String),
    #[error("story `{0}` exists already")]
    Exists(String),
    #[error("story `{story}` belongs to node `{owner}`, not to this node (`{me}`)")]
    NotOwner {
        story: String,
        owner: String,
        me: String,
    },
    #[error("the pipeline document is malformed: {0}")]
    Malformed(String),
    #[error("the pipeline document refused a change")]
    Doc(#[source] Box<automerge::AutomergeError>),
}

impl From<automerge::AutomergeError> for PipelineError {
    fn from(e: automerge::AutomergeError) -> Self {
        PipelineError::Doc(Box::new(e))
    }
}

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// A story to add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewStory {
    pub id: String,
    pub title: String,
    pub body: String,
    pub profile: String,
    pub repo: String,
    pub base_branch: String,
    pub depends_on: Vec<String>,
    pub max_retries: u32,
}

/// What a node reports of its work on a story it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoryUpdate {
    pub stage: Option<Stage>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    /// One more failed attempt, with why.
    pub failed: Option<String>,
    /// A line for the story's attempt log (`attempt 2: built …`, `attempt 1 failed: …`).
    pub note: Option<String>,
}

/// A story as the document says it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Story {
    pub id: String,
    pub title: String,
    pub body: String,
    /// Where it is: its owner's progress, else where a person put it.
    pub stage: Stage,
    pub profile: String,
    pub repo: String,
    pub base_branch: String,
    pub depends_on: Vec<String>,
    pub max_retries: u32,
    pub blocked: Option<String>,
    /// The winning claim's node.
    pub owner: Option<String>,
    /// Whether the winning claim was granted by the rendezvous ([`Pipeline::grant`]).
    pub granted: bool,
    /// Every node with a claim not released.
    pub claimants: Vec<String>,
    /// The owner's result so far.
    pub branch: Option<String>,
    pub commit: Option<String>,
    /// The owner's failed attempts.
    pub failures: u32,
    /// The owner's attempt log, oldest first.
    pub log: Vec<String>,
    pub last_error: Option<String>,
}

/// The deterministic rank of `node`'s claim on `story`: lowest wins.
pub fn claim_rank(node: &str, story: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(story.as_bytes());
    h.finalize().into()
}

/// The pipeline as one node sees and edits it.
pub struct Pipeline {
    doc: AutoCommit,
    me: String,
}

fn story_key(id: &str) -> String {
    format!("story:{id}")
}

fn node_key(id: &str) -> String {
    format!("node:{id}")
}

impl Pipeline {
    /// An empty pipeline, edited as node `me`.
    pub fn new(me: &str) -> Pipeline {
        Pipeline::from_doc(AutoCommit::new(), me)
    }

    /// The pipeline in `doc` (loaded from disk, or received), edited as node `me`.
    pub fn from_doc(doc: AutoCommit, me: &str) -> Pipeline {
        Pipeline {
            doc,
            me: me.to_string(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The document, for saving and syncing.
    pub fn doc_mut(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }

    pub fn doc(&self) -> &AutoCommit {
        &self.doc
    }

    fn obj(&self, parent: &ObjId, key: &str) -> Option<ObjId> {
        match self.doc.get(parent, key).ok()?? {
            (Value::Object(_), id) => Some(id),
            _ => None,
        }
    }

    fn scalar(&self, obj: &ObjId, key: &str) -> Option<ScalarValue> {
        match self.doc.get(obj, key).ok()?? {
            (Value::Scalar(v), _) => Some(v.into_owned()),
            _ => None,
        }
    }

    fn text(&self, obj: &ObjId, key: &str) -> Option<String> {
        self.scalar(obj, key)
            .and_then(|v| v.to_str().map(str::to_string))
    }

    fn int(&self, obj: &ObjId, key: &str) -> Option<i64> {
        self.scalar(obj, key).and_then(|v| v.to_i64())
    }

    fn flag(&self, obj: &ObjId, key: &str) -> bool {
        self.scalar(obj, key)
            .and_then(|v| v.to_bool())
            .unwrap_or(false)
    }

    fn story_obj(&self, id: &str) -> Result<ObjId> {
        let obj = self
            .obj(&ROOT, &story_key(id))
            .ok_or_else(|| PipelineError::NoStory(id.to_string()))?;
        if self.flag(&obj, "deleted") {
            return Err(PipelineError::NoStory(id.to_string()));
        }
        Ok(obj)
    }

    /// Adds a story in the backlog.
    pub fn add_story(&mut self, new: &NewStory, now: i64) -> Result<()> {
        let key = story_key(&new.id);
        if self.obj(&ROOT, &key).is_some() {
            return Err(PipelineError::Exists(new.id.clone()));
        }
        let s = self.doc.put_object(ROOT, key, ObjType::Map)?;
        self.doc.put(&s, "title", new.title.as_str())?;
        self.doc.put(&s, "body", new.body.as_str())?;
        self.doc.put(&s, "stage", Stage::Backlog.as_str())?;
        self.doc.put(&s, "profile", new.profile.as_str())?;
        self.doc.put(&s, "repo", new.repo.as_str())?;
        self.doc.put(&s, "baseBranch", new.base_branch.as_str())?;
        self.doc.put(&s, "maxRetries", i64::from(new.max_retries))?;
        self.doc.put(&s, "createdAt", now)?;
        self.doc.put(&s, "deleted", false)?;
        let deps = self.doc.put_object(&s, "dependsOn", ObjType::List)?;
        for (i, d) in new.depends_on.iter().enumerate() {
            self.doc.insert(&deps, i, d.as_str())?;
        }
        self.doc.put_object(&s, "claims", ObjType::Map)?;
        self.doc.put_object(&s, "progress", ObjType::Map)?;
        Ok(())
    }

    /// Deletes a story: a tombstone, so no concurrent edit brings it back.
    pub fn delete_story(&mut self, id: &str) -> Result<()> {
        let s = self.story_obj(id)?;
        self.doc.put(&s, "deleted", true)?;
        Ok(())
    }

    /// A person moves a story (to `2_current` for agents to take it, say).
    pub fn move_story(&mut self, id: &str, stage: Stage) -> Result<()> {
        let s = self.story_obj(id)?;
        self.doc.put(&s, "stage", stage.as_str())?;
        Ok(())
    }

    /// Blocks a story with a reason (retries used up, or a person's call); `None` unblocks.
    pub fn block(&mut self, id: &str, reason: Option<&str>) -> Result<()> {
        let s = self.story_obj(id)?;
        match reason {
            Some(r) => self.doc.put(&s, "blocked", r)?,
            None => self.doc.delete(&s, "blocked")?,
        }
        Ok(())
    }

    /// This node claims a story (again: a released claim of its own is renewed).
    pub fn claim(&mut self, id: &str, now: i64) -> Result<()> {
        let s = self.story_obj(id)?;
        let claims = self.container(&s, "claims")?;
        let mine = match self.obj(&claims, &self.me) {
            Some(c) => c,
            None => self
                .doc
                .put_object(&claims, self.me.as_str(), ObjType::Map)?,
        };
        self.doc.put(&mine, "since", now)?;
        self.doc.put(&mine, "released", false)?;
        self.doc.put(&mine, "granted", false)?;
        Ok(())
    }

    /// The rendezvous grants each story claimed by nodes but granted to none the claim that
    /// ranks first among those it has; returns the stories it granted. A granted claim owns
    /// the story before any claim that is not (see [`Pipeline::story`]): claims reach the
    /// rendezvous one after the other, so the first it saw keeps the story, however a later
    /// concurrent claim ranks. Only the rendezvous calls this.
    ///
    /// `stories` are the stories to look at, as read before (a caller keeping them current
    /// passes those that may need a grant); each is read again here, as it is now: claims
    /// merged since the caller read it count.
    pub fn grant(&mut self, stories: &[Story]) -> Result<Vec<String>> {
        let mut granted = Vec::new();
        for s in stories {
            let Some(s) = self.story(&s.id) else {
                continue;
            };
            if s.granted || s.claimants.is_empty() {
                continue;
            }
            let Some(owner) = &s.owner else {
                continue;
            };
            let obj = self.story_obj(&s.id)?;
            let claims = self.container(&obj, "claims")?;
            if let Some(c) = self.obj(&claims, owner) {
                self.doc.put(&c, "granted", true)?;
                granted.push(s.id.clone());
            }
        }
        Ok(granted)
    }

    /// Releases `node`'s claim on a story: its own giving up, or another node's for a node it
    /// saw gone ([`crate::Liveness`]).
    pub fn release(&mut self, id: &str, node: &str) -> Result<()> {
        let s = self.story_obj(id)?;
        let claims = self.container(&s, "claims")?;
        if let Some(c) = self.obj(&claims, node) {
            self.doc.put(&c, "released", true)?;
        }
        Ok(())
    }

    /// Records this node's work on a story it owns; refused when another node owns it (the
    /// stage change checks the claim it is made under).
    pub fn record(&mut self, id: &str, update: &StoryUpdate) -> Result<()> {
        let story = self
            .story(id)
            .ok_or_else(|| PipelineError::NoStory(id.to_string()))?;
        if story.owner.as_deref() != Some(self.me.as_str()) {
            return Err(PipelineError::NotOwner {
                story: id.to_string(),
                owner: story.owner.unwrap_or_else(|| "nobody".into()),
                me: self.me.clone(),
            });
        }
        let s = self.story_obj(id)?;
        let progress = self.container(&s, "progress")?;
        let mine = match self.obj(&progress, &self.me) {
            Some(p) => p,
            None => {
                let p = self
                    .doc
                    .put_object(&progress, self.me.as_str(), ObjType::Map)?;
                self.doc.put(&p, "failures", 0i64)?;
                p
            }
        };
        if let Some(stage) = update.stage {
            self.doc.put(&mine, "stage", stage.as_str())?;
        }
        if let Some(b) = &update.branch {
            self.doc.put(&mine, "branch", b.as_str())?;
        }
        if let Some(c) = &update.commit {
            self.doc.put(&mine, "commit", c.as_str())?;
        }
        if let Some(e) = &update.failed {
            let failures = self.int(&mine, "failures").unwrap_or(0) + 1;
            self.doc.put(&mine, "failures", failures)?;
            self.doc.put(&mine, "error", e.as_str())?;
        }
        if let Some(note) = &update.note {
            let log = match self.obj(&mine, "log") {
                Some(l) => l,
                None => self.doc.put_object(&mine, "log", ObjType::List)?,
            };
            let at = self.doc.length(&log);
            self.doc.insert(&log, at, note.as_str())?;
        }
        Ok(())
    }

    fn container(&self, story: &ObjId, key: &str) -> Result<ObjId> {
        self.obj(story, key)
            .ok_or_else(|| PipelineError::Malformed(format!("a story has no `{key}`")))
    }

    /// This node is alive: its heartbeat counter goes up by one; `addr` is where it serves
    /// `/crdt-sync`.
    pub fn heartbeat(&mut self, addr: &str) -> Result<i64> {
        let key = node_key(&self.me);
        let n = match self.obj(&ROOT, &key) {
            Some(n) => n,
            None => {
                let n = self.doc.put_object(ROOT, key, ObjType::Map)?;
                self.doc.put(&n, "heartbeat", ScalarValue::counter(0))?;
                n
            }
        };
        self.doc.increment(&n, "heartbeat", 1)?;
        self.doc.put(&n, "addr", addr)?;
        Ok(self.int(&n, "heartbeat").unwrap_or(0))
    }

    /// A node's heartbeat counter and sync address.
    pub fn node(&self, id: &str) -> Option<(i64, String)> {
        let n = self.obj(&ROOT, &node_key(id))?;
        Some((
            self.int(&n, "heartbeat").unwrap_or(0),
            self.text(&n, "addr").unwrap_or_default(),
        ))
    }

    /// Every node with its heartbeat counter and sync address.
    pub fn nodes(&self) -> BTreeMap<String, (i64, String)> {
        let mut out = BTreeMap::new();
        for key in self.doc.keys(ROOT) {
            let Some(id) = key.strip_prefix("node:") else {
                continue;
            };
            let Some(n) = self.obj(&ROOT, &key) else {
                continue;
            };
            let beat = self.int(&n, "heartbeat").unwrap_or(0);
            let addr = self.text(&n, "addr").unwrap_or_default();
            out.insert(id.to_string(), (beat, addr));
        }
        out
    }

    /// One story, unless it does not exist or was deleted.
    pub fn story(&self, id: &str) -> Option<Story> {
        let s = self.story_obj(id).ok()?;
        let claims = self.obj(&s, "claims")?;
        let mut claimants: Vec<String> = self
            .doc
            .keys(&claims)
            .filter(|node| {
                self.obj(&claims, node)
                    .is_some_and(|c| !self.flag(&c, "released"))
            })
            .collect();
        claimants.sort();
        let progress = self.obj(&s, "progress")?;
        let stage_of = |node: &str| {
            self.obj(&progress, node)
                .and_then(|p| self.text(&p, "stage"))
                .and_then(|st| Stage::parse(&st))
        };
        // A claimant whose build is done (its progress reached QA) wins first: nodes cut off
        // from the rendezvous settle a story by rank and build it, and the rendezvous, when
        // it is back, grants the first claim it hears of, which may be another's. Then a
        // granted claim; among equals, the lowest rank.
        let finished: Vec<&String> = claimants
            .iter()
            .filter(|node| stage_of(node).is_some_and(|st| st >= Stage::Qa))
            .collect();
        let pool = if finished.is_empty() {
            claimants.iter().collect()
        } else {
            finished
        };
        let granted: Vec<&String> = pool
            .iter()
            .copied()
            .filter(|node| {
                self.obj(&claims, node)
                    .is_some_and(|c| self.flag(&c, "granted"))
            })
            .collect();
        let owner = if granted.is_empty() { pool } else { granted }
            .into_iter()
            .min_by_key(|node| claim_rank(node, id))
            .cloned();
        let owner_granted = owner.as_ref().is_some_and(|o| {
            self.obj(&claims, o)
                .is_some_and(|c| self.flag(&c, "granted"))
        });
        let mine = owner.as_ref().and_then(|o| self.obj(&progress, o));
        let base = self
            .text(&s, "stage")
            .and_then(|st| Stage::parse(&st))
            .unwrap_or(Stage::Backlog);
        let stage = mine
            .as_ref()
            .and_then(|p| self.text(p, "stage"))
            .and_then(|st| Stage::parse(&st))
            .unwrap_or(base);
        let deps = self.obj(&s, "dependsOn");
        let depends_on = match deps {
            Some(d) => self
                .doc
                .values(&d)
                .filter_map(|(v, _)| match v {
                    Value::Scalar(s) => s.to_str().map(str::to_string),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        Some(Story {
            id: id.to_string(),
            title: self.text(&s, "title").unwrap_or_default(),
            body: self.text(&s, "body").unwrap_or_default(),
            stage,
            profile: self.text(&s, "profile").unwrap_or_default(),
            repo: self.text(&s, "repo").unwrap_or_default(),
            base_branch: self.text(&s, "baseBranch").unwrap_or_default(),
            depends_on,
            max_retries: u32::try_from(self.int(&s, "maxRetries").unwrap_or(0)).unwrap_or(0),
            blocked: self.text(&s, "blocked"),
            branch: mine.as_ref().and_then(|p| self.text(p, "branch")),
            commit: mine.as_ref().and_then(|p| self.text(p, "commit")),
            failures: mine
                .as_ref()
                .and_then(|p| self.int(p, "failures"))
                .map_or(0, |n| u32::try_from(n).unwrap_or(0)),
            log: mine
                .as_ref()
                .and_then(|p| self.obj(p, "log"))
                .map(|l| {
                    self.doc
                        .values(&l)
                        .filter_map(|(v, _)| match v {
                            Value::Scalar(s) => s.to_str().map(str::to_string),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            last_error: mine.as_ref().and_then(|p| self.text(p, "error")),
            owner,
            granted: owner_granted,
            claimants,
        })
    }

    /// Every story not deleted, by id.
    pub fn stories(&self) -> Vec<Story> {
        let mut out: Vec<Story> = self
            .doc
            .keys(ROOT)
            .filter_map(|k| k.strip_prefix("story:").map(str::to_string))
            .filter_map(|id| self.story(&id))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests;
