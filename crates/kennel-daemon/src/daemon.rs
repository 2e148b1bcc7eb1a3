//! Assembles a running daemon: data directory, identity, outbox, executor (with preflight and
//! crash recovery), the upstream link, the worktree sweep and the status file that
//! `kennel daemon status` reads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{normalize_url, DaemonConfig};
use crate::executor::{Executor, RunningInfo};
use crate::link::{Identity, Link, LinkError, LinkState};
use crate::outbox::Outbox;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("no API key: set daemon.api_key (KENNEL_DAEMON__API_KEY) to a key with the daemon scope (`kennel keys create --name worker --scope daemon`)")]
    NoKey,
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("failed to prepare the data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `<data_dir>/status.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusFile {
    pub pid: u32,
    pub upstream: String,
    pub connected: bool,
    pub daemon_id: Option<String>,
    pub last_error: Option<String>,
    pub reconnects: u64,
    pub agents: Vec<String>,
    pub max_concurrent_tasks: u32,
    pub running: Vec<RunningStatus>,
    pub outbox_depth: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningStatus {
    pub task_id: String,
    pub attempt: u32,
}

impl From<RunningInfo> for RunningStatus {
    fn from(r: RunningInfo) -> Self {
        RunningStatus {
            task_id: r.task_id,
            attempt: r.attempt,
        }
    }
}

/// A started daemon.
pub struct DaemonHandle {
    shutdown: watch::Sender<bool>,
    /// Set when a clean stop begins; the link then offers no capacity upstream.
    stopping: watch::Sender<bool>,
    outbox: Arc<Outbox>,
    link: JoinHandle<Result<(), LinkError>>,
    pub state: watch::Receiver<LinkState>,
    pub exec: Arc<Executor>,
    pub data_dir: PathBuf,
    /// The agent profiles that passed preflight at start: what this daemon offers.
    pub agents: Vec<String>,
}

impl DaemonHandle {
    /// A clean stop. Stops taking work (the upstream is told the daemon's capacity is 0, and
    /// spawns that still arrive are refused as `shuttingDown`), gives running agents
    /// `shutdown_grace` to finish, then interrupts what is left and hands those attempts
    /// back (`returned`), so the upstream retries them without charging the tasks. `again`
    /// (a second signal) skips the wait and interrupts at once. Finally it waits briefly for
    /// the upstream to acknowledge what was reported and closes the link with a Close frame.
    pub async fn stop(self, again: impl std::future::Future<Output = ()>) {
        let cfg = self.exec.config();
        let grace = cfg.shutdown_grace.get();
        let interrupt = cfg.interrupt_grace.get();
        self.exec.begin_shutdown();
        let _ = self.stopping.send(true);
        tokio::pin!(again);
        let mut forced = false;
        let running = self.exec.running_now().len();
        if running > 0 {
            tracing::info!(
                running,
                "waiting up to {}s for running agents to finish (a second signal stops them now)",
                grace.as_secs()
            );
            tokio::select! {
                () = self.exec.idle() => {}
                () = tokio::time::sleep(grace) => {}
                () = &mut again => forced = true,
            }
        }
        if !self.exec.running_now().is_empty() {
            let grace = if forced { Duration::ZERO } else { interrupt };
            tracing::info!(
                running = self.exec.running_now().len(),
                "interrupting running agents; their tasks go back to the queue"
            );
            self.exec.return_all(grace);
            // SIGINT, SIGTERM and SIGKILL are `grace` apart; a little more for the reports.
            let _ =
                tokio::time::timeout(grace * 3 + Duration::from_secs(5), self.exec.idle()).await;
        }
        // Deliver what was reported, if the upstream is there to take it; the outbox keeps
        // anything left for the next start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut state = self.state.clone();
        while state.borrow().connected
            && self.outbox.depth().unwrap_or(0) > 0
            && tokio::time::Instant::now() < deadline
        {
            let _ = tokio::time::timeout(Duration::from_millis(50), state.changed()).await;
        }
        let _ = self.shutdown.send(true);
        let _ = self.link.await;
    }

    /// Waits until the link ends (a refused key); otherwise runs forever.
    pub async fn wait(&mut self) -> Result<(), LinkError> {
        match (&mut self.link).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

/// The id kept in `<dir>/machine-id`, made once (`<host>-<16 hex>`).
pub fn read_or_create_machine_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("machine-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if kennel_proto::validate_id("machine id", s.trim()).is_ok() => {
            Ok(s.trim().to_string())
        }
        _ => {
            let mut buf = [0u8; 8];
            getrandom::fill(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
            let host = hostname()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect::<String>();
            let id = format!(
                "{}-{}",
                if host.is_empty() {
                    "daemon".into()
                } else {
                    host
                },
                hex(&buf)
            );
            std::fs::write(&path, &id)?;
            Ok(id)
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The host's name, for display.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Starts the daemon in `data_dir`.
pub async fn start(cfg: DaemonConfig, data_dir: PathBuf) -> Result<DaemonHandle, StartError> {
    cfg.validate()?;
    let api_key = cfg.api_key.clone().ok_or(StartError::NoKey)?;
    let urls: Vec<String> = std::iter::once(&cfg.server)
        .chain(&cfg.fallback_servers)
        .map(|u| normalize_url(u).unwrap_or_else(|| u.clone()))
        .collect();
    let dir_err = |source| StartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&data_dir).map_err(dir_err)?;
    let machine_id = match &cfg.machine_id {
        Some(m) => m.clone(),
        None => read_or_create_machine_id(&data_dir).map_err(dir_err)?,
    };
    let outbox = Arc::new(Outbox::open(&data_dir.join("outbox.db"))?);
    let cfg = Arc::new(cfg);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let exec = Executor::new(cfg.clone(), data_dir.clone(), outbox.clone(), out_tx);
    exec.recover();
    let agents = exec.preflight_all().await;
    if agents.is_empty() {
        tracing::warn!("no agent profile passed preflight; this daemon will not be given tasks until one does (see daemon.agents)");
    }
    let id = Identity {
        urls: urls.clone(),
        api_key,
        machine_id,
        hostname: cfg.hostname.clone().unwrap_or_else(hostname),
        max_concurrent_tasks: cfg.max_concurrent_tasks,
        labels: cfg.labels.clone(),
        agents: agents.clone(),
    };
    let (stopping, stopping_rx) = watch::channel(false);
    let (link, state) = Link::new(id, outbox.clone(), exec.clone(), out_rx, stopping_rx);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let link = tokio::spawn(link.run(shutdown_rx.clone()));

    // The status file: rewritten when the link changes state, and every 2 s for the counts.
    {
        let (mut state, exec, outbox, dir, cfg, mut stop, agents) = (
            state.clone(),
            exec.clone(),
            outbox.clone(),
            data_dir.clone(),
            cfg.clone(),
            shutdown_rx.clone(),
            agents.clone(),
        );
        tokio::spawn(async move {
            loop {
                let s = state.borrow().clone();
                let file = StatusFile {
                    pid: std::process::id(),
                    upstream: s.upstream.clone().unwrap_or_else(|| urls[0].clone()),
                    connected: s.connected,
                    daemon_id: s.daemon_id,
                    last_error: s.last_error,
                    reconnects: s.reconnects,
                    agents: agents.clone(),
                    max_concurrent_tasks: cfg.max_concurrent_tasks,
                    running: exec.running_now().into_iter().map(Into::into).collect(),
                    outbox_depth: outbox.depth().unwrap_or(0),
                    updated_at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                };
                write_status(&dir, &file);
                tokio::select! {
                    _ = state.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    // The retention sweep: hourly, removes worktrees older than the retention.
    {
        let (exec, mut stop, wt_dir) = (exec.clone(), shutdown_rx, data_dir.join("worktrees"));
        let retention = cfg.worktree_retention.get();
        tokio::spawn(async move {
            loop {
                // Worktrees of attempts still running are never swept, however old.
                let keep: Vec<PathBuf> = exec
                    .running_now()
                    .into_iter()
                    .map(|r| wt_dir.join(format!("{}-{}", r.task_id, r.attempt)))
                    .collect();
                match exec.cache().sweep(retention, &keep).await {
                    Ok(r) if r.removed > 0 => tracing::info!(
                        removed = r.removed,
                        bytes = r.bytes,
                        "worktree sweep reclaimed disk"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "worktree sweep failed"
                    ),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    Ok(DaemonHandle {
        shutdown,
        stopping,
        outbox,
        link,
        state,
        exec,
        data_dir,
        agents,
    })
}

fn write_status(dir: &Path, file: &StatusFile) {
    let tmp = dir.join("status.json.tmp");
    let Ok(json) = serde_json::to_vec_pretty(file) else {
        return;
    };
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("status.json"));
    }
}

/// Reads the status file a daemon in `dir` writes; `None` if there is none.
pub fn read_status(dir: &Path) -> Option<StatusFile> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}
