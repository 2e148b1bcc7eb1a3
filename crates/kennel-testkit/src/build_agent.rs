//! [`KennelAgent`]: the real `kennel agent` binary (a build agent) as a child process, synced
//! with the rendezvous of a [`KennelServer`](crate::KennelServer), with its own data directory.
//!
//! Readiness is the line the agent prints when its sync comes up, never a sleep. The child is
//! killed on drop and by [`KennelAgent::kill9`]; [`KennelAgent::start_again`] starts it on the
//! same data directory (and so the same node id, key and copy of the pipeline).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::process::Child;

use crate::server::config_file;
use crate::worker::{kill9, spawn_logged, Lines};

/// How long an agent may take to print that it syncs.
const SYNC_DEADLINE: Duration = Duration::from_secs(30);

/// What the agent prints when its sync with the rendezvous comes up.
const SYNCING_PREFIX: &str = "kennel: syncing with ";

/// What the agent prints when it starts: `kennel: agent <node> running …`.
const RUNNING_PREFIX: &str = "kennel: agent ";

pub struct KennelAgent {
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: tempfile::NamedTempFile,
    rendezvous: String,
    token: String,
    args: Vec<String>,
    node: String,
    child: Option<Child>,
    stdout: Arc<Lines>,
}

impl KennelAgent {
    /// Starts `kennel agent --rendezvous URL --join-token TOKEN ARGS…` with `toml` as its config
    /// file (agent profiles, capacity). Returns once it syncs.
    pub async fn start(
        bin: &Path,
        rendezvous: &str,
        token: &str,
        toml: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kennel-test-agent-")
            .tempdir()
            .context("failed to create the agent's data directory")?;
        let mut a = KennelAgent {
            bin: bin.to_path_buf(),
            dir,
            config: config_file(toml)?,
            rendezvous: rendezvous.to_string(),
            token: token.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            node: String::new(),
            child: None,
            stdout: Default::default(),
        };
        a.launch().await?;
        Ok(a)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        // Lines of this run only: a restart prints them again.
        let from = self.stdout.len();
        let mut cmd = crate::server::isolated_command(&self.bin);
        cmd.arg("--config")
            .arg(self.config.path())
            .arg("agent")
            .arg("--rendezvous")
            .arg(&self.rendezvous)
            .arg("--join-token")
            .arg(&self.token)
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.args);
        self.child = Some(spawn_logged(cmd, "agent", self.stdout.clone())?);
        let running = self
            .stdout
            .wait(from, SYNC_DEADLINE, |l| l.starts_with(RUNNING_PREFIX))
            .await
            .ok_or_else(|| {
                anyhow!("the agent did not start within {SYNC_DEADLINE:?}; its log is above")
            })?;
        self.node = running
            .trim_start_matches(RUNNING_PREFIX)
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        self.stdout
            .wait(from, SYNC_DEADLINE, |l| l.starts_with(SYNCING_PREFIX))
            .await
            .ok_or_else(|| anyhow!("the agent did not sync within {SYNC_DEADLINE:?}"))?;
        Ok(())
    }

    /// Every line the agent printed on stdout, across restarts.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.all()
    }

    /// The agent's node id in the pipeline.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, as a crash would; waits until it is gone. Its agent processes, in groups of
    /// their own, are left running, as after a real crash.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        kill9(self.child.take(), "agent").await
    }

    /// Starts the agent again on the same data directory after it stopped; returns once it
    /// syncs again.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// The first line the agent printed (since it was first started) for which `pred` holds,
    /// waiting at most `deadline` for it.
    pub async fn wait_line(
        &self,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        self.stdout
            .wait(0, deadline, pred)
            .await
            .ok_or_else(|| anyhow!("the agent printed no matching line within {deadline:?}"))
    }
}

impl Drop for KennelAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
