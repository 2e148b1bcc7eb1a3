//! [`KennelDaemon`]: the real `kennel daemon` binary as a child process, connected to a
//! [`KennelServer`](crate::KennelServer) with a daemon-scoped key and its own data directory.
//!
//! Readiness is the line the daemon prints when its link comes up, never a sleep. The child is killed on drop and by
//! [`KennelDaemon::kill9`]; [`KennelDaemon::restart`] starts it again on the same data
//! directory, as an operator restarting a crashed daemon would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use kennel_proto::api::Scope;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::server::{config_file, KennelServer};

/// How long a daemon may take to connect after it starts.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// What the daemon prints when its link to the coordinator comes up.
const CONNECTED_PREFIX: &str = "kennel: connected to ";

pub struct KennelDaemon {
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: tempfile::NamedTempFile,
    ws_url: String,
    key: String,
    machine_id: String,
    child: Option<Child>,
    /// Every line the daemon printed on stdout, across restarts.
    stdout: std::sync::Arc<Lines>,
}

/// Lines a child printed, and a way to wait for one.
#[derive(Default)]
pub(crate) struct Lines {
    seen: std::sync::Mutex<Vec<String>>,
    added: tokio::sync::Notify,
}

impl Lines {
    pub(crate) fn push(&self, line: String) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        self.added.notify_waiters();
    }

    /// The first line from the `from`-th on for which `pred` holds.
    pub(crate) fn find(&self, from: usize, pred: &impl Fn(&str) -> bool) -> Option<String> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .skip(from)
            .find(|l| pred(l))
            .cloned()
    }

    /// Every line printed so far.
    pub(crate) fn all(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many lines were printed so far.
    pub(crate) fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The first line from the `from`-th on for which `pred` holds, waiting at most
    /// `deadline` for it.
    pub(crate) async fn wait(
        &self,
        from: usize,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        tokio::time::timeout(deadline, async {
            loop {
                let added = self.added.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                if let Some(l) = self.find(from, &pred) {
                    return l;
                }
                added.await;
            }
        })
        .await
        .ok()
    }
}

/// Starts `cmd` (stdout piped), printing each line it writes on stdout as
/// `[kennel WHAT stdout] …` and keeping it in `log`.
pub(crate) fn spawn_logged(
    mut cmd: Command,
    what: &'static str,
    log: std::sync::Arc<Lines>,
) -> anyhow::Result<Child> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start kennel {what}"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("the {what}'s stdout was not captured"))?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[kennel {what} stdout] {line}");
            log.push(line);
        }
    });
    Ok(child)
}

/// SIGKILL, as a crash would; waits until the process is gone. Nothing if there is none.
pub(crate) async fn kill9(child: Option<Child>, what: &str) -> anyhow::Result<()> {
    let Some(mut child) = child else {
        return Ok(());
    };
    let _ = child.start_kill();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .map_err(|_| anyhow!("kennel {what} did not exit within 10s of SIGKILL"))??;
    Ok(())
}

impl KennelDaemon {
    /// Starts `kennel daemon` against `server` with `toml` as its config file (agent
    /// profiles, limits). Returns once the coordinator has seen it connect.
    pub async fn start(bin: &Path, server: &KennelServer, toml: &str) -> anyhow::Result<Self> {
        let key = server
            .api()
            .create_key("test daemon", &[Scope::Daemon])
            .await
            .context("failed to create a daemon key")?
            .key;
        let (dir, machine_id) =
            crate::server::named_data_dir("kennel-test-daemon-", "test-daemon")?;
        let mut d = KennelDaemon {
            bin: bin.to_path_buf(),
            dir,
            config: config_file(toml)?,
            ws_url: server.ws_url(),
            key,
            machine_id,
            child: None,
            stdout: Default::default(),
        };
        d.launch().await?;
        Ok(d)
    }

    /// Starts `kennel daemon` against any upstream (a relay, say) at `ws_url` with `key`.
    /// Returns once the daemon says its link is up.
    pub async fn start_at(
        bin: &Path,
        ws_url: &str,
        key: &str,
        machine_id: &str,
        toml: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kennel-test-daemon-")
            .tempdir()
            .context("failed to create the daemon's data directory")?;
        let mut d = KennelDaemon {
            bin: bin.to_path_buf(),
            dir,
            config: config_file(toml)?,
            ws_url: ws_url.to_string(),
            key: key.to_string(),
            machine_id: machine_id.to_string(),
            child: None,
            stdout: Default::default(),
        };
        d.launch().await?;
        Ok(d)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = crate::server::isolated_command(&self.bin);
        cmd.arg("--config")
            .arg(self.config.path())
            .arg("daemon")
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("KENNEL_DAEMON__SERVER", &self.ws_url)
            .env("KENNEL_DAEMON__API_KEY", &self.key)
            .env("KENNEL_DAEMON__MACHINE_ID", &self.machine_id);
        // The daemon prints `kennel: connected to ... as <id>` each time its link comes up.
        let from = self.stdout.len();
        self.child = Some(spawn_logged(cmd, "daemon", self.stdout.clone())?);
        self.stdout
            .wait(from, CONNECT_DEADLINE, |l| l.starts_with(CONNECTED_PREFIX))
            .await
            .ok_or_else(|| {
                anyhow!(
                    "the daemon did not connect within {CONNECT_DEADLINE:?} (or exited); its \
                     log is above"
                )
            })?;
        Ok(())
    }

    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// SIGKILL, as a crash would; waits until it is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        kill9(self.child.take(), "daemon").await
    }

    /// The first line the daemon printed on stdout (since it was first started) for which
    /// `pred` holds, waiting at most `deadline` for it.
    pub async fn wait_line(
        &self,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        self.stdout
            .wait(0, deadline, pred)
            .await
            .ok_or_else(|| anyhow!("the daemon printed no matching line within {deadline:?}"))
    }

    /// Sends SIGTERM, as an operator or a service manager stopping it cleanly would; does not
    /// wait (see [`KennelDaemon::wait_exit`]).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("the daemon is not running"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .context("failed to send SIGTERM to the daemon")
    }

    /// Waits until the daemon has exited and returns how it exited.
    pub async fn wait_exit(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            anyhow::bail!("the daemon is not running");
        };
        let status = tokio::time::timeout(deadline, child.wait())
            .await
            .map_err(|_| anyhow!("kennel daemon did not exit within {deadline:?}"))??;
        Ok(status)
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        self.sigterm()?;
        self.wait_exit(deadline).await
    }

    /// Starts the daemon again on the same data directory after it stopped.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// Kills the daemon if it runs and starts it again on the same data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await?;
        self.launch().await
    }

    /// Runs `kennel daemon status` on this daemon's data directory; returns stdout.
    pub async fn status(&self, json: bool) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .args(["daemon", "status", "--data-dir"])
            .arg(self.dir.path())
            .output()
            .await?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

impl Drop for KennelDaemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
