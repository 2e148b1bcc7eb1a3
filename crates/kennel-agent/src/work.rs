//! The agent's loop. Every tick it plans, and beats its heartbeat into the document (at most
//! every tenth of the claim TTL: each beat is a change the document keeps); whenever the
//! document changes (its own edits, a peer's) or an agent reports, it reads who it saw alive,
//! asks [`kennel_sync::plan`] what to do and does it:
//! - a claim is written to the document; the story is built once the rendezvous granted it
//!   (the first claim it saw; no later one can take the story over), or, cut off from the
//!   rendezvous, a tick (at least 1 s) later if the claim still wins by rank;
//! - a story is built by the daemon's executor as an attempt of task `<story>.<node>` (so each
//!   node pushes its own branch, `kennel/<story>.<node>`), attempt = failures so far + 1;
//! - a story lost to another claim is dropped at once (its agent killed, its worktree gone);
//! - what an agent reports is recorded under the claim it was made for: a success moves the
//!   story to `3_qa` with its branch and commit, a failure counts against its retries; a
//!   result for a story this node no longer owns is discarded ([`kennel_sync::Pipeline::record`]
//!   refuses it). Reports stay in the executor's outbox until recorded, so a crash in between
//!   loses nothing: the next start records them first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kennel_daemon::executor::{Control, Executor};
use kennel_daemon::outbox::{Outbox, Pending};
use kennel_proto::link::{DaemonMessage, RejectCode, RepoSpec, SpawnTask, TaskLimits};
use kennel_sync::{plan, Liveness, Replica, Situation, Stage, Step, StoryUpdate};
use tokio::sync::{mpsc, watch};

/// The shortest wait between a claim and its build: claims made at once on other nodes reach
/// this one through the rendezvous well within it (each hop stores the change, fsynced).
const MIN_SETTLE: Duration = Duration::from_secs(1);

/// What the loop needs.
pub struct Setup {
    pub node: String,
    pub replica: Arc<Replica>,
    pub exec: Arc<Executor>,
    pub outbox: Arc<Outbox>,
    pub capacity: usize,
    pub tick: Duration,
    pub claim_ttl: Duration,
    /// Where each attempt's output is kept, one file per attempt.
    pub logs: PathBuf,
    /// What the agent did, one line each, for its operator.
    pub notices: mpsc::UnboundedSender<String>,
    /// Whether the rendezvous connection is up.
    pub synced: watch::Receiver<bool>,
    /// Its links to other agents, when it takes part in the mesh.
    pub mesh: Option<crate::mesh::Mesh>,
    /// Where other agents reach it (written with each heartbeat); empty without a mesh.
    pub advertise: String,
    pub max_mesh_peers: usize,
}

/// The loop's state.
pub struct Worker {
    s: Setup,
    started: Instant,
    seen: Liveness,
    /// Story → the attempt running for it.
    running: BTreeMap<String, u32>,
    /// When this node claimed a story, for the claims it made in this run.
    claimed: HashMap<String, Instant>,
    /// The log file of each attempt writing output, open until the attempt ends.
    logs: HashMap<(String, u32), std::fs::File>,
}

impl Worker {
    pub fn new(s: Setup) -> Worker {
        let ttl = s.claim_ttl.as_millis() as i64;
        Worker {
            s,
            started: Instant::now(),
            seen: Liveness::new(ttl),
            running: BTreeMap::new(),
            claimed: HashMap::new(),
            logs: HashMap::new(),
        }
    }

    /// Milliseconds on this node's own monotonic clock: liveness never compares it with
    /// another machine's.
    fn now(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Time between heartbeats: a tick, but no more often than a tenth of the claim TTL. Each
    /// heartbeat is a change the document keeps for good, and others need to see it move only
    /// once per TTL (ten times is margin).
    fn beat_every(&self) -> Duration {
        self.s.tick.max(self.s.claim_ttl / 10)
    }

    /// How long a new claim waits before its build starts: a tick, and at least
    /// [`MIN_SETTLE`].
    fn settle(&self) -> Duration {
        self.s.tick.max(MIN_SETTLE)
    }

    fn task_id(&self, story: &str) -> String {
        format!("{story}.{}", self.s.node)
    }

    fn story_of<'t>(&self, task_id: &'t str) -> Option<&'t str> {
        task_id
            .strip_suffix(self.s.node.as_str())
            .and_then(|t| t.strip_suffix('.'))
    }

    /// Runs until `stop`, then drops what runs.
    pub async fn run(
        mut self,
        earlier: Vec<Pending>,
        mut reports: mpsc::UnboundedReceiver<Pending>,
        mut stop: watch::Receiver<bool>,
    ) {
        for p in earlier {
            self.report(p);
        }
        let mut changed = self.s.replica.subscribe();
        let now = tokio::time::Instant::now();
        let (mut next_tick, mut next_beat) = (now, now);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next_tick) => {
                    next_tick += self.s.tick;
                    if tokio::time::Instant::now() >= next_beat {
                        next_beat += self.beat_every();
                        let addr = self.s.advertise.clone();
                        if let Err(e) = self.s.replica.edit(|p| p.heartbeat(&addr)) {
                            tracing::error!(error = &e as &dyn std::error::Error, "failed to record the heartbeat");
                        }
                    }
                }
                r = changed.changed() => if r.is_err() { break },
                Some(p) = reports.recv() => self.report(p),
                _ = stop.changed() => break,
            }
            // Reports come in bursts (output lines): take what is queued before planning.
            while let Ok(p) = reports.try_recv() {
                self.report(p);
            }
            changed.mark_unchanged();
            self.act().await;
        }
        for (story, attempt) in std::mem::take(&mut self.running) {
            let task = self.task_id(&story);
            self.s.exec.control(&task, attempt, Control::Drop);
        }
    }

    /// Plans and carries the plan out.
    async fn act(&mut self) {
        let now = self.now();
        let nodes = self.s.replica.view(|v| v.nodes.clone());
        for (node, (counter, _)) in &nodes {
            self.seen.observe(node, *counter, now);
        }
        self.keep_mesh(&nodes, now);
        let running: BTreeSet<String> = self.running.keys().cloned().collect();
        // Slots still held by builds dropped a moment ago, until their processes are gone.
        let winding_down = self
            .s
            .exec
            .running_now()
            .len()
            .saturating_sub(self.running.len());
        let at = Situation {
            running: &running,
            capacity: self.s.capacity.saturating_sub(winding_down),
            now,
        };
        let (me, seen) = (&self.s.node, &self.seen);
        let steps = self.s.replica.view(|v| plan(me, &v.stories, seen, &at));
        for step in steps {
            self.step(step, now).await;
        }
    }

    async fn step(&mut self, step: Step, now: i64) {
        let edited = match &step {
            Step::Claim(id) => {
                self.claimed.insert(id.clone(), Instant::now());
                tracing::info!(story = %id, "claiming");
                self.s.replica.edit(|p| p.claim(id, now))
            }
            Step::Release { story, node } => {
                tracing::info!(story = %story, node = %node, "releasing the claim of a silent node");
                self.s.replica.edit(|p| p.release(story, node))
            }
            Step::Block { story, reason } => {
                self.notice(format!("blocked {story}: {reason}"));
                self.s.replica.edit(|p| p.block(story, Some(reason)))
            }
            Step::Stop(id) => {
                if let Some(attempt) = self.running.remove(id) {
                    self.notice(format!("dropped {id}: another agent's claim won"));
                    self.s
                        .exec
                        .control(&self.task_id(id), attempt, Control::Drop);
                }
                return;
            }
            Step::Start(id) => {
                if self.may_start(id) {
                    self.start(id).await;
                }
                return;
            }
        };
        if let Err(e) = edited {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to change the pipeline"
            );
        }
    }

    /// Keeps mesh links to the live agents it ranks first.
    fn keep_mesh(&mut self, nodes: &BTreeMap<String, (i64, String)>, now: i64) {
        let Some(mesh) = self.s.mesh.as_mut() else {
            return;
        };
        let me = self.s.node.as_str();
        let mut live: Vec<(&String, &String)> = nodes
            .iter()
            .filter(|(node, (_, addr))| {
                node.as_str() != me && !addr.is_empty() && self.seen.is_live(node, now)
            })
            .map(|(node, (_, addr))| (node, addr))
            .collect();
        live.sort_by_cached_key(|(node, _)| kennel_sync::pipeline::claim_rank(me, node));
        let wanted: BTreeMap<String, String> = live
            .into_iter()
            .take(self.s.max_mesh_peers)
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect();
        if mesh.keep(&wanted) {
            let peers = mesh.peers();
            let line = if peers.is_empty() {
                "mesh peers: none".to_string()
            } else {
                format!("mesh peers: {}", peers.join(", "))
            };
            self.notice(line);
        }
    }

    /// Whether a story this node owns may be built now. With the rendezvous connected, once it
    /// granted the claim (no later claim can take the story over then). Cut off from it, a
    /// claim made in this run waits a while for claims made at once elsewhere to merge.
    fn may_start(&self, id: &str) -> bool {
        let granted = self
            .s
            .replica
            .story(id)
            .is_some_and(|s| s.granted && s.owner.as_deref() == Some(self.s.node.as_str()));
        if granted {
            return true;
        }
        if *self.s.synced.borrow() {
            return false;
        }
        self.claimed
            .get(id)
            .is_none_or(|at| at.elapsed() >= self.settle())
    }

    async fn start(&mut self, id: &str) {
        let Some(story) = self.s.replica.story(id) else {
            return;
        };
        let attempt = story.failures + 1;
        let prompt = if story.body.is_empty() {
            story.title.clone()
        } else {
            format!("{}\n\n{}", story.title, story.body)
        };
        let spawn = SpawnTask {
            task_id: self.task_id(id),
            attempt,
            task_name: story.title.clone(),
            prompt,
            repo: (!story.repo.is_empty()).then(|| RepoSpec {
                url: story.repo.clone(),
                base_branch: story.base_branch.clone(),
            }),
            agent: story.profile.clone(),
            env: [("KENNEL_STORY".to_string(), id.to_string())].into(),
            limits: TaskLimits::default(),
            session: None,
        };
        self.notice(format!("building {id} (attempt {attempt})"));
        self.running.insert(id.to_string(), attempt);
        self.claimed.remove(id);
        self.s.exec.spawn(spawn).await;
    }

    /// Handles one report of an agent, then acknowledges it in the outbox.
    fn report(&mut self, p: Pending) {
        match serde_json::from_str::<DaemonMessage>(&p.frame) {
            Ok(m) => self.handle(&p, m),
            Err(e) => tracing::error!("unreadable report in the outbox: {e}"),
        }
        if let Err(e) = self.s.outbox.ack(&p.task_id, p.attempt, p.seq) {
            tracing::error!(error = &e as &dyn std::error::Error, "outbox failed");
        }
    }

    fn handle(&mut self, p: &Pending, m: DaemonMessage) {
        let Some(story) = self.story_of(&p.task_id).map(str::to_string) else {
            return;
        };
        let ended = match m {
            DaemonMessage::TaskOutput(o) => {
                self.log(p, &o.output);
                return;
            }
            DaemonMessage::TaskComplete(c) if c.success => Some(Ok((c.branch, c.commit))),
            DaemonMessage::TaskComplete(c) => {
                Some(Err(c.error.unwrap_or_else(|| match c.exit_code {
                    Some(code) => format!("the agent exited with status {code}"),
                    None => "the agent failed".into(),
                })))
            }
            // No room yet (a dropped build still winding down): not a failure, planned again.
            DaemonMessage::TaskRejected(r) if r.code == Some(RejectCode::AtCapacity) => None,
            DaemonMessage::TaskRejected(r) => Some(Err(r.reason)),
            DaemonMessage::TaskStatusChange(c) if c.new_status == "lost" => Some(Err(
                "the agent process was lost when kennel agent stopped".into(),
            )),
            _ => return,
        };
        if let Some(Err(reason)) = &ended {
            self.log(p, &format!("kennel agent: attempt failed: {reason}"));
        }
        // The attempt has ended: its log is complete.
        self.logs.remove(&(p.task_id.clone(), p.attempt));
        if self.running.get(&story) == Some(&p.attempt) {
            self.running.remove(&story);
        }
        let Some(ended) = ended else {
            return;
        };
        let attempt = p.attempt;
        let update = match ended {
            Ok((branch, commit)) => {
                let on = match (&branch, &commit) {
                    (Some(b), Some(c)) => format!("{b} ({})", &c[..c.len().min(12)]),
                    (Some(b), None) => b.clone(),
                    _ => "no branch".into(),
                };
                self.notice(format!("built {story} on {on}; moving it to 3_qa"));
                StoryUpdate {
                    stage: Some(Stage::Qa),
                    branch,
                    commit,
                    note: Some(format!(
                        "attempt {attempt} on {}: built on {on}",
                        self.s.node
                    )),
                    ..StoryUpdate::default()
                }
            }
            Err(reason) => {
                self.notice(format!("{story} attempt {attempt} failed: {reason}"));
                StoryUpdate {
                    note: Some(format!(
                        "attempt {attempt} on {} failed: {reason}",
                        self.s.node
                    )),
                    failed: Some(reason),
                    ..StoryUpdate::default()
                }
            }
        };
        match self.s.replica.edit(|pl| pl.record(&story, &update)) {
            Ok(_) => {}
            Err(kennel_sync::ReplicaError::Pipeline(e)) => {
                self.notice(format!("result of {story} discarded: {e}"))
            }
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to record a result"
            ),
        }
    }

    fn notice(&self, line: String) {
        tracing::info!("{line}");
        let _ = self.s.notices.send(line);
    }

    /// Appends a line to the attempt's log.
    fn log(&mut self, p: &Pending, line: &str) {
        let key = (p.task_id.clone(), p.attempt);
        let file = match self.logs.entry(key) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = self.s.logs.join(format!("{}-{}.log", p.task_id, p.attempt));
                let opened = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path);
                match opened {
                    Ok(f) => v.insert(f),
                    Err(e) => {
                        tracing::warn!(error = &e as &dyn std::error::Error, path = %path.display(), "failed to keep output");
                        return;
                    }
                }
            }
        };
        if let Err(e) = writeln!(file, "{line}") {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "failed to keep output"
            );
        }
    }
}
