//! Runs task attempts: checks a `spawnTask`, accepts or rejects it, prepares the worktree,
//! runs the agent in its own process group, streams its output, obeys pause / resume /
//! interrupt / messages, and finally commits, pushes and reports `taskComplete`.
//!
//! Every message it produces goes through the [`Outbox`] first (numbered and stored), then to
//! the link; it never talks to the network itself. What the agent's output means (progress,
//! its own reason for failing) is [`agent::OutputReader`]'s to say; this module only sends it.
//!
//! Capacity rule: an attempt's slot is freed before its `taskComplete` (or hand-back) is
//! emitted, so an upstream that frees the slot when that message arrives and dispatches the
//! next task at once never finds this daemon full. Cleanup after it (worktree removal) holds
//! no slot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kennel_proto::link::{
    AgentMessage, MessageDelivered, OutputStream, RejectCode, SpawnTask, TaskAccepted,
    TaskComplete, TaskOutput, TaskProgress, TaskRejected, TaskStatusChange, RETURNED,
};

use kennel_proto::{validate_id, DaemonMessage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::agent::{self, AgentKind, AgentProfile, OutputReader, Progress, Reading};
use crate::config::DaemonConfig;
use crate::outbox::{Outbox, Pending};
use crate::process::{self, AgentProcess, Line, SpawnSpec};
use crate::worktree::{Finished, GitSettings, RepoCache};

/// A command for a running attempt.
#[derive(Debug)]
pub enum Control {
    Pause,
    Resume,
    Interrupt {
        grace: Duration,
    },
    Message(String),
    /// A message for a session agent (`deliverMessage`): written to its stdin once per id.
    Deliver {
        message_id: String,
        from: String,
        body: String,
    },
    /// The upstream refused the attempt as stale: stop at once, report nothing more.
    Drop,
    /// The daemon is stopping: interrupt the agent and hand the attempt back (`returned`), so
    /// the upstream retries it elsewhere without charging the task.
    Return {
        grace: Duration,
    },
}

/// Why an agent stops on `interruptTask`.
const INTERRUPTED: &str = "interrupted by request";

/// What a session agent's run keeps: the messages written to it, and the last one, whose
/// sender its answers go to.
#[derive(Debug, Default)]
struct Session {
    delivered: std::collections::HashSet<String>,
    last: Option<(String, String)>,
}

struct Running {
    attempt: u32,
    control: mpsc::UnboundedSender<Control>,
}

/// What the daemon runs right now, for status and heartbeats.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningInfo {
    pub task_id: String,
    pub attempt: u32,
}

pub struct Executor {
    cfg: Arc<DaemonConfig>,
    data_dir: PathBuf,
    outbox: Arc<Outbox>,
    cache: RepoCache,
    profiles: BTreeMap<String, AgentProfile>,
    running: Mutex<HashMap<String, Running>>,
    dropped: Mutex<HashSet<(String, u32)>>,
    out: mpsc::UnboundedSender<Pending>,
    /// Set when a clean stop begins: new spawns are refused as `shuttingDown`.
    stopping: AtomicBool,
    /// Woken whenever a slot is freed.
    freed: tokio::sync::Notify,
}

impl Executor {
    pub fn new(
        cfg: Arc<DaemonConfig>,
        data_dir: PathBuf,
        outbox: Arc<Outbox>,
        out: mpsc::UnboundedSender<Pending>,
    ) -> Arc<Self> {
        let settings = GitSettings {
            branch_prefix: cfg.git.branch_prefix.clone(),
            author_name: cfg.git.author_name.clone(),
            author_email: cfg.git.author_email.clone(),
            commit_message: cfg.git.commit_message.clone(),
        };
        Arc::new(Executor {
            cache: RepoCache::new(&data_dir, settings),
            profiles: cfg.profiles(),
            cfg,
            data_dir,
            outbox,
            running: Mutex::new(HashMap::new()),
            dropped: Mutex::new(HashSet::new()),
            out,
            stopping: AtomicBool::new(false),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cache(&self) -> &RepoCache {
        &self.cache
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.cfg
    }

    /// Attempts running now.
    pub fn running_now(&self) -> Vec<RunningInfo> {
        let mut v: Vec<_> = self
            .running()
            .iter()
            .map(|(t, r)| RunningInfo {
                task_id: t.clone(),
                attempt: r.attempt,
            })
            .collect();
        v.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        v
    }

    /// Profiles whose binary is present, checked once at start; the daemon advertises these.
    pub async fn preflight_all(&self) -> Vec<String> {
        let mut ok = Vec::new();
        for (name, profile) in &self.profiles {
            match agent::preflight(name, profile).await {
                Ok(p) => {
                    tracing::info!(agent = %name, binary = %p.binary.display(), version = %p.version, "agent available");
                    ok.push(name.clone());
                }
                Err(reason) => tracing::info!(agent = %name, "agent not offered: {reason}"),
            }
        }
        ok
    }

    /// Stores and sends one message of an attempt, unless the attempt was dropped. Returns
    /// the message's seq when it was stored.
    fn emit(
        &self,
        task_id: &str,
        attempt: u32,
        make: impl FnOnce(u64) -> DaemonMessage,
    ) -> Option<u64> {
        let dropped = self
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(task_id.to_string(), attempt));
        if dropped {
            return None;
        }
        match self.outbox.push(task_id, attempt, make) {
            Ok(p) => {
                let seq = p.seq;
                // A send error means the link task is gone (shutdown); the outbox keeps it.
                let _ = self.out.send(p);
                Some(seq)
            }
            Err(e) => {
                tracing::error!(
                    task_id,
                    attempt,
                    error = &e as &dyn std::error::Error,
                    "failed to store a task message; it cannot be delivered"
                );
                None
            }
        }
    }

    fn output(
        &self,
        task_id: &str,
        attempt: u32,
        stream: OutputStream,
        text: String,
        partial: bool,
    ) -> Option<u64> {
        self.emit(task_id, attempt, |seq| {
            DaemonMessage::TaskOutput(TaskOutput {
                task_id: task_id.to_string(),
                attempt,
                seq,
                stream,
                output: text,
                is_partial: partial,
            })
        })
    }

    /// A note from kennel itself in the task's output (on stderr, prefixed).
    fn note(&self, task_id: &str, attempt: u32, text: &str) {
        self.output(
            task_id,
            attempt,
            OutputStream::Stderr,
            format!("kennel: {text}"),
            false,
        );
    }

    fn status_change(&self, task_id: &str, attempt: u32, old: &str, new: &str) {
        self.emit(task_id, attempt, |seq| {
            DaemonMessage::TaskStatusChange(TaskStatusChange {
                task_id: task_id.to_string(),
                attempt,
                seq,
                old_status: old.to_string(),
                new_status: new.to_string(),
            })
        });
    }

    fn reject(&self, spawn: &SpawnTask, reason: String, code: Option<RejectCode>) {
        tracing::warn!(task_id = %spawn.task_id, attempt = spawn.attempt, "rejecting task: {reason}");
        self.emit(&spawn.task_id, spawn.attempt, |seq| {
            DaemonMessage::TaskRejected(TaskRejected {
                task_id: spawn.task_id.clone(),
                attempt: spawn.attempt,
                seq,
                reason,
                code,
            })
        });
        if let Err(e) = self.outbox.finish(&spawn.task_id, spawn.attempt) {
            tracing::error!(error = &e as &dyn std::error::Error, "outbox failed");
        }
    }

    /// Handles `spawnTask`: accept and start, or reject with a reason.
    pub async fn spawn(self: &Arc<Self>, spawn: SpawnTask) {
        if let Err(e) = validate_id("task id", &spawn.task_id) {
            // Not a task id we can use anywhere, not even as an outbox key for a reply.
            tracing::warn!("ignoring spawnTask: {e}");
            return;
        }
        let (profile, full) = {
            let running = self.running();
            if let Some(r) = running.get(&spawn.task_id) {
                if r.attempt == spawn.attempt {
                    return; // already running this attempt
                }
            }
            let full = running.len() as u32 >= self.cfg.max_concurrent_tasks;
            (self.profiles.get(&spawn.agent).cloned(), full)
        };
        if let Err(e) = self.outbox.hold(&spawn.task_id, spawn.attempt) {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "outbox failed; cannot take the task"
            );
            return;
        }
        if self.stopping.load(Ordering::SeqCst) {
            return self.reject(
                &spawn,
                "the daemon is shutting down and takes no new work".into(),
                Some(RejectCode::ShuttingDown),
            );
        }
        if full {
            let n = self.cfg.max_concurrent_tasks;
            return self.reject(
                &spawn,
                format!("daemon at capacity ({n} of {n} tasks running)"),
                Some(RejectCode::AtCapacity),
            );
        }
        let Some(profile) = profile else {
            let names: Vec<_> = self.profiles.keys().cloned().collect();
            return self.reject(
                &spawn,
                format!(
                    "agent profile `{}` is not configured on this daemon (configured: {})",
                    spawn.agent,
                    names.join(", ")
                ),
                None,
            );
        };
        if let Err(reason) = agent::locate(&spawn.agent, &profile) {
            return self.reject(&spawn, reason, None);
        }
        if let Some(repo) = &spawn.repo {
            if let Err(e) = kennel_proto::validate_base_branch(&repo.base_branch) {
                return self.reject(&spawn, e.to_string(), None);
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let previous = self.running().insert(
            spawn.task_id.clone(),
            Running {
                attempt: spawn.attempt,
                control: tx,
            },
        );
        if let Some(old) = previous {
            let _ = old.control.send(Control::Drop);
        }
        self.emit(&spawn.task_id, spawn.attempt, |seq| {
            DaemonMessage::TaskAccepted(TaskAccepted {
                task_id: spawn.task_id.clone(),
                attempt: spawn.attempt,
                seq,
            })
        });
        let me = self.clone();
        tokio::spawn(async move {
            let (task_id, attempt) = (spawn.task_id.clone(), spawn.attempt);
            me.run(spawn, profile, rx).await;
            // Normally done before the last report already; this covers a dropped attempt.
            me.free_slot(&task_id, attempt);
            if let Err(e) = me.outbox.finish(&task_id, attempt) {
                tracing::error!(error = &e as &dyn std::error::Error, "outbox failed");
            }
        });
    }

    /// Frees the attempt's slot, if it still holds one.
    fn free_slot(&self, task_id: &str, attempt: u32) {
        let mut running = self.running();
        if running.get(task_id).is_some_and(|r| r.attempt == attempt) {
            running.remove(task_id);
            self.freed.notify_waiters();
        }
    }

    /// Resolves when no attempt holds a slot.
    pub async fn idle(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.running().is_empty() {
                return;
            }
            freed.await;
        }
    }

    /// A clean stop begins: refuse new work from now on.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Interrupts every running agent and hands its attempt back (clean stop, grace over).
    pub fn return_all(&self, grace: Duration) {
        for r in self.running().values() {
            let _ = r.control.send(Control::Return { grace });
        }
    }

    /// Routes a command to the attempt it names; unknown or stale attempts are ignored.
    pub fn control(&self, task_id: &str, attempt: u32, c: Control) {
        if matches!(c, Control::Drop) {
            self.dropped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((task_id.to_string(), attempt));
        }
        let running = self.running();
        match running.get(task_id) {
            Some(r) if r.attempt == attempt => {
                let _ = r.control.send(c);
            }
            _ => tracing::debug!(task_id, attempt, "command for an attempt not running here"),
        }
    }

    /// Reports the attempt's end. The slot is freed first (see the module doc).
    fn complete(&self, spawn: &SpawnTask, result: Outcome) {
        self.free_slot(&spawn.task_id, spawn.attempt);
        self.emit(&spawn.task_id, spawn.attempt, |seq| {
            DaemonMessage::TaskComplete(TaskComplete {
                task_id: spawn.task_id.clone(),
                attempt: spawn.attempt,
                seq,
                success: result.success,
                error: result.error,
                exit_code: result.exit_code,
                branch: result.branch,
                commit: result.commit,
            })
        });
    }

    /// One attempt, start to finish.
    async fn run(
        self: &Arc<Self>,
        spawn: SpawnTask,
        profile: AgentProfile,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let (tid, att) = (spawn.task_id.as_str(), spawn.attempt);
        // Where the agent works: a fresh worktree of the repository, or a scratch directory.
        let worktree = match &spawn.repo {
            Some(repo) => match self.cache.prepare(repo, tid, att).await {
                Ok(wt) => Some(wt),
                Err(e) => {
                    self.note(tid, att, &format!("failed to prepare the worktree: {e}"));
                    return self.complete(
                        &spawn,
                        Outcome::failed(format!("failed to prepare the worktree: {e}")),
                    );
                }
            },
            None => None,
        };
        let workdir = match &worktree {
            Some(wt) => wt.path.clone(),
            None => {
                let dir = self.data_dir.join("scratch").join(format!("{tid}-{att}"));
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    return self.complete(
                        &spawn,
                        Outcome::failed(format!("failed to create {}: {e}", dir.display())),
                    );
                }
                dir
            }
        };
        if let (Some(wt), Some(repo)) = (&worktree, &spawn.repo) {
            if let Some(setup) = self.cfg.repos.get(&repo.url) {
                if let Err(e) = wt.setup(&setup.copy, setup.setup.as_deref()).await {
                    self.note(tid, att, &format!("repository setup failed: {e}"));
                    return self.complete(
                        &spawn,
                        Outcome::failed(format!("repository setup failed: {e}")),
                    );
                }
            }
        }

        let outcome = self
            .run_agent(&spawn, &profile, &workdir, &mut control)
            .await;
        let outcome = match outcome {
            AgentEnd::Dropped => return,
            AgentEnd::Returned => {
                self.free_slot(tid, att);
                self.status_change(tid, att, "running", RETURNED);
                self.remove_workdir(worktree, &spawn, &workdir).await;
                return;
            }
            AgentEnd::Done(o) => o,
        };
        let outcome = match (&worktree, outcome.success) {
            (Some(wt), true) => match wt.finish(tid, &spawn.task_name, att).await {
                Ok(Finished::Pushed { branch, commit }) => {
                    self.note(tid, att, &format!("pushed {branch} at {commit}"));
                    Outcome {
                        branch: Some(branch),
                        commit: Some(commit),
                        ..outcome
                    }
                }
                Ok(Finished::NoChanges) => {
                    self.note(
                        tid,
                        att,
                        "the agent made no changes; nothing to commit or push",
                    );
                    outcome
                }
                Err(e) => {
                    self.note(tid, att, &format!("failed to commit or push: {e}"));
                    Outcome {
                        success: false,
                        error: Some(format!("failed to commit or push: {e}")),
                        ..outcome
                    }
                }
            },
            _ => outcome,
        };
        self.complete(&spawn, outcome);
        self.remove_workdir(worktree, &spawn, &workdir).await;
    }

    /// Cleanup after the attempt's last report; it holds no slot.
    async fn remove_workdir(
        &self,
        worktree: Option<crate::worktree::Worktree>,
        spawn: &SpawnTask,
        workdir: &std::path::Path,
    ) {
        let tid = spawn.task_id.as_str();
        match worktree {
            Some(wt) if !self.cfg.keep_worktrees => match wt.remove().await {
                Ok(bytes) => tracing::debug!(task_id = tid, bytes, "worktree removed"),
                Err(e) => {
                    tracing::warn!(
                        task_id = tid,
                        error = &e as &dyn std::error::Error,
                        "failed to remove worktree; the sweep will retry"
                    )
                }
            },
            _ => {}
        }
        if worktree_is_scratch(spawn) && !self.cfg.keep_worktrees {
            let _ = std::fs::remove_dir_all(workdir);
        }
    }

    async fn run_agent(
        &self,
        spawn: &SpawnTask,
        profile: &AgentProfile,
        workdir: &std::path::Path,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> AgentEnd {
        let (tid, att) = (spawn.task_id.as_str(), spawn.attempt);
        // A session agent takes messages on stdin for as long as it runs: Claude Code reads
        // them as stream-json turns whatever the profile says.
        let mut session = spawn.session.as_ref().map(|_| Session::default());
        let session_profile;
        let profile = if session.is_some() && profile.kind == AgentKind::Claude {
            session_profile = AgentProfile {
                stream_input: true,
                ..profile.clone()
            };
            &session_profile
        } else {
            profile
        };
        let argv = agent::render_argv(profile, &spawn.prompt, tid, workdir);
        let mut env = profile.env.clone();
        env.extend(spawn.env.clone());
        env.insert("KENNEL_TASK_ID".into(), tid.to_string());
        env.insert("KENNEL_ATTEMPT".into(), att.to_string());
        let wants_stdin = profile.stream_input || profile.kind != AgentKind::Claude;
        let (lines_tx, mut lines) = mpsc::channel::<Line>(1024);
        let spec = SpawnSpec {
            argv: &argv,
            cwd: workdir,
            env: &env,
            stdin: wants_stdin,
        };
        let mut proc = match AgentProcess::spawn(&spec, self.cfg.max_line_bytes, lines_tx) {
            Ok(p) => p,
            Err(e) => {
                self.note(tid, att, &format!("failed to start the agent: {e}"));
                return AgentEnd::Done(Outcome::failed(format!("failed to start the agent: {e}")));
            }
        };
        if let Err(e) = self.outbox.set_pgid(tid, att, proc.pid() as i32) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "outbox failed to record the process group"
            );
        }
        if profile.prompt_on_stdin() && !(session.is_some() && spawn.prompt.trim().is_empty()) {
            let first = agent::claude_user_message(&spawn.prompt);
            if let Err(e) = proc.write_stdin(&first).await {
                self.note(tid, att, &format!("failed to send the prompt: {e}"));
            }
        }
        // A session runs until it is stopped: the profile's limit is for one task's run.
        let profile_limit = profile
            .timeout
            .map(|t| t.get())
            .filter(|_| session.is_none());
        let limit = spawn
            .limits
            .timeout_secs
            .map(Duration::from_secs)
            .or(profile_limit);
        let deadline = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let grace = self.cfg.interrupt_grace.get();
        let claude = profile.kind == AgentKind::Claude;
        let mut reader = OutputReader::new(profile.kind);
        let mut paused = false;
        // Why the agent is being stopped, if it is.
        let mut stopping: Option<(String, Duration)> = None;
        loop {
            if let Some((_, g)) = &stopping {
                let g = *g;
                let status = {
                    let stop = proc.interrupt(g);
                    tokio::pin!(stop);
                    loop {
                        tokio::select! {
                            biased;
                            Some(line) = lines.recv() => self.read(tid, att, &mut reader, line, session.as_ref()),
                            r = &mut stop => break r,
                        }
                    }
                };
                while let Ok(line) = lines.try_recv() {
                    self.read(tid, att, &mut reader, line, session.as_ref());
                }
                let rest = reader.finish();
                self.replies(tid, att, &rest, session.as_ref());
                self.deliver(tid, att, rest);
                let why = stopping.take().map(|(w, _)| w).unwrap_or_default();
                let code = status.as_ref().ok().map(process::exit_code);
                if why == "dropped" {
                    return AgentEnd::Dropped;
                }
                if why == RETURNED {
                    self.note(
                        tid,
                        att,
                        "the daemon is shutting down; the agent was interrupted and the task goes back to the queue",
                    );
                    return AgentEnd::Returned;
                }
                self.note(tid, att, &why);
                // A session agent stopped by request has done what it was for: its work is
                // kept (committed and pushed) and the session ends completed.
                if session.is_some() && why == INTERRUPTED {
                    return AgentEnd::Done(Outcome {
                        success: true,
                        error: None,
                        exit_code: code,
                        branch: None,
                        commit: None,
                    });
                }
                return AgentEnd::Done(Outcome {
                    success: false,
                    error: Some(why),
                    exit_code: code,
                    branch: None,
                    commit: None,
                });
            }
            tokio::select! {
                biased;
                Some(line) = lines.recv() => self.read(tid, att, &mut reader, line, session.as_ref()),
                c = control.recv() => match c {
                    Some(Control::Pause) if !paused => match proc.pause() {
                        Ok(()) => {
                            paused = true;
                            self.note(tid, att, "paused (SIGSTOP to the agent's process group)");
                            self.status_change(tid, att, "running", "paused");
                        }
                        Err(e) => self.note(tid, att, &format!("failed to pause: {e}")),
                    },
                    Some(Control::Resume) if paused => match proc.resume() {
                        Ok(()) => {
                            paused = false;
                            self.note(tid, att, "resumed (SIGCONT)");
                            self.status_change(tid, att, "paused", "running");
                        }
                        Err(e) => self.note(tid, att, &format!("failed to resume: {e}")),
                    },
                    Some(Control::Pause) | Some(Control::Resume) => {}
                    Some(Control::Message(m)) => {
                        if !wants_stdin {
                            self.note(tid, att, "this agent profile takes no input while running (enable stream_input); message dropped");
                        } else {
                            let text = if claude { agent::claude_user_message(&m) } else { m };
                            if let Err(e) = proc.write_stdin(&text).await {
                                self.note(tid, att, &format!("failed to deliver the message: {e}"));
                            }
                        }
                    }
                    Some(Control::Deliver { message_id, from, body }) => match session.as_mut() {
                        None => self.note(tid, att, "a message for a session agent came for a task that is not one; dropped"),
                        Some(sess) => {
                            if !sess.delivered.contains(&message_id) {
                                let text = if claude {
                                    agent::claude_user_message(&body)
                                } else {
                                    // One message a line for a `command` agent.
                                    body.replace(['\r', '\n'], " ")
                                };
                                match proc.write_stdin(&text).await {
                                    Ok(()) => {
                                        sess.delivered.insert(message_id.clone());
                                        sess.last = Some((from, message_id.clone()));
                                    }
                                    Err(e) => {
                                        self.note(tid, att, &format!("failed to deliver message {message_id}: {e}"));
                                        continue;
                                    }
                                }
                            }
                            self.emit(tid, att, |seq| {
                                DaemonMessage::MessageDelivered(MessageDelivered {
                                    task_id: tid.to_string(),
                                    attempt: att,
                                    seq,
                                    message_id,
                                })
                            });
                        }
                    },
                    Some(Control::Interrupt { grace }) => stopping = Some((INTERRUPTED.into(), grace)),
                    Some(Control::Drop) => stopping = Some(("dropped".into(), Duration::ZERO)),
                    Some(Control::Return { grace }) => stopping = Some((RETURNED.into(), grace)),
                    None => stopping = Some((RETURNED.into(), grace)),
                },
                () = &mut deadline => {
                    let after = kennel_proto::Span::from(limit.unwrap_or_default());
                    stopping = Some((format!("timed out after {after}"), grace));
                }
                status = proc.wait() => {
                    while let Some(line) = lines.recv().await {
                        self.read(tid, att, &mut reader, line, session.as_ref());
                    }
                    let rest = reader.finish();
                self.replies(tid, att, &rest, session.as_ref());
                self.deliver(tid, att, rest);
                    return AgentEnd::Done(match status {
                        Ok(s) => {
                            let code = process::exit_code(&s);
                            let error = reader.failure(code);
                            Outcome {
                                success: error.is_none(),
                                error,
                                exit_code: Some(code),
                                branch: None,
                                commit: None,
                            }
                        }
                        Err(e) => Outcome::failed(format!("failed to wait for the agent: {e}")),
                    });
                }
            }
        }
    }

    fn read(
        &self,
        tid: &str,
        att: u32,
        reader: &mut OutputReader,
        line: Line,
        session: Option<&Session>,
    ) {
        let readings = reader.read(line);
        self.replies(tid, att, &readings, session);
        self.deliver(tid, att, readings);
    }

    /// A session agent's answers among `readings`, each sent as `agentMessage` to the sender
    /// of the last message delivered: Claude Code's `result` texts, a `command` agent's
    /// stdout lines.
    fn replies(&self, tid: &str, att: u32, readings: &[Reading], session: Option<&Session>) {
        let Some(session) = session else {
            return;
        };
        for reading in readings {
            let body = match reading {
                Reading::Output(line) if line.stream == OutputStream::Stdout && !line.partial => {
                    Some(line.text.clone())
                }
                Reading::Event { progress, raw } if progress.detail["event"] == "result" => {
                    let text: String = raw.iter().map(|l| l.text.as_str()).collect();
                    agent::result_text(&text)
                }
                _ => None,
            };
            let Some(body) = body.filter(|b| !b.trim().is_empty()) else {
                continue;
            };
            let (to, in_reply_to) = match &session.last {
                Some((from, id)) => (Some(from.clone()), Some(id.clone())),
                None => (None, None),
            };
            self.emit(tid, att, |seq| {
                DaemonMessage::AgentMessage(AgentMessage {
                    task_id: tid.to_string(),
                    attempt: att,
                    seq,
                    body,
                    to,
                    in_reply_to,
                })
            });
        }
    }

    /// Sends what the reader made of the agent's output. An event goes as its progress entry
    /// followed by the raw chunks it was read from, whose seqs the entry names in
    /// `detail.rawSeqs` (`[first, last]`), so a person's view can show the summary in place
    /// of the JSON. The seqs are known before the chunks are stored because only this
    /// attempt's task emits for the attempt, and nothing else is emitted between them.
    fn deliver(&self, tid: &str, att: u32, readings: Vec<Reading>) {
        for reading in readings {
            match reading {
                Reading::Output(line) => {
                    self.output(tid, att, line.stream, line.text, line.partial);
                }
                Reading::Event { progress, raw } => {
                    let chunks = raw.len() as u64;
                    let Progress {
                        summary,
                        mut detail,
                        quiet,
                    } = progress;
                    let first = self.emit(tid, att, |seq| {
                        if let Some(fields) = detail.as_object_mut() {
                            fields.insert("rawSeqs".into(), json!([seq + 1, seq + chunks]));
                            if quiet {
                                fields.insert("quiet".into(), Value::Bool(true));
                            }
                        }
                        DaemonMessage::TaskProgress(TaskProgress {
                            task_id: tid.to_string(),
                            attempt: att,
                            seq,
                            summary,
                            detail: Some(detail),
                        })
                    });
                    for (n, line) in (1..).zip(raw) {
                        let seq = self.output(tid, att, line.stream, line.text, line.partial);
                        if let (Some(first), Some(seq)) = (first, seq) {
                            if seq != first + n {
                                tracing::warn!(task_id = tid, attempt = att, seq, expected = first + n, "a raw agent event was stored under another seq than its progress entry names");
                            }
                        }
                    }
                }
            }
        }
    }

    /// After a restart: attempts whose agent was running died with the old daemon. Kill any
    /// leftover process group and report each attempt as lost, so the coordinator retries it
    /// once the outbox (with all output produced before the crash) has been delivered.
    pub fn recover(&self) {
        let held = match self.outbox.held() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to read the outbox"
                );
                return;
            }
        };
        for h in held.into_iter().filter(|h| !h.finished) {
            if let Some(pgid) = h.pgid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            self.note(
                &h.task_id,
                h.attempt,
                "the daemon restarted while this attempt ran; its agent process was lost",
            );
            self.status_change(&h.task_id, h.attempt, "running", "lost");
            if let Err(e) = self.outbox.finish(&h.task_id, h.attempt) {
                tracing::error!(error = &e as &dyn std::error::Error, "outbox failed");
            }
        }
    }
}

fn worktree_is_scratch(spawn: &SpawnTask) -> bool {
    spawn.repo.is_none()
}

enum AgentEnd {
    Done(Outcome),
    Dropped,
    /// Interrupted by a clean stop: hand the attempt back.
    Returned,
}

struct Outcome {
    success: bool,
    error: Option<String>,
    exit_code: Option<i32>,
    branch: Option<String>,
    commit: Option<String>,
}

impl Outcome {
    fn failed(error: String) -> Self {
        Outcome {
            success: false,
            error: Some(error),
            exit_code: None,
            branch: None,
            commit: None,
        }
    }
}
