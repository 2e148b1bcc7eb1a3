//! [`KennelRelay`]: the real `kennel relay` binary as a child process between a
//! [`KennelServer`](crate::KennelServer) and test daemons, with its own data directory, a
//! relay key for the upstream, one daemon key and one admin key.
//!
//! Readiness is the `kennel: relay listening on http://ADDR` line; each time the upstream
//! link comes up the relay prints `kennel: relay connected to …`, which
//! [`KennelRelay::wait_upstream`] waits for. Never a sleep. The child is killed on drop and by
//! [`KennelRelay::kill9`]; [`KennelRelay::restart`] starts it on the same address and data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use kennel_proto::api::Scope;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::api::Api;
use crate::server::{config_file, KennelServer};

const READY_DEADLINE: Duration = Duration::from_secs(30);
const READY_PREFIX: &str = "kennel: relay listening on http://";
const CONNECTED_PREFIX: &str = "kennel: relay connected to ";

/// Keys the relay is started with.
pub const RELAY_DAEMON_KEY: &str = "test-relay-daemon-key-0123456789";
pub const RELAY_ADMIN_KEY: &str = "test-relay-admin-key-0123456789";

pub struct KennelRelay {
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: tempfile::NamedTempFile,
    addr: Option<SocketAddr>,
    child: Option<Child>,
    /// One `()` per upstream connection the relay announced.
    connected: Option<mpsc::UnboundedReceiver<()>>,
}

impl KennelRelay {
    /// Starts `kennel relay` in front of `server`, with `extra_toml` appended to its `[relay]`
    /// section (timings). Returns once it listens; see [`KennelRelay::wait_upstream`].
    pub async fn start(
        bin: &Path,
        server: &KennelServer,
        extra_toml: &str,
    ) -> anyhow::Result<Self> {
        let key = server
            .api()
            .create_key("test relay", &[Scope::Relay])
            .await
            .context("failed to create a relay key")?
            .key;
        Self::start_to(bin, &server.url(), &key, extra_toml).await
    }

    /// Starts a relay whose upstream is `upstream` (a coordinator or another relay).
    pub async fn start_to(
        bin: &Path,
        upstream: &str,
        key: &str,
        extra_toml: &str,
    ) -> anyhow::Result<Self> {
        let (dir, name) = crate::server::named_data_dir("kennel-test-relay-", "test-relay")?;
        let toml = format!(
            "[relay]\nupstream = \"{upstream}\"\napi_key = \"{key}\"\nagent_name = \"{name}\"\n\
             daemon_keys = [\"{RELAY_DAEMON_KEY}\"]\nadmin_keys = [\"{RELAY_ADMIN_KEY}\"]\n{extra_toml}\n"
        );
        let mut r = KennelRelay {
            bin: bin.to_path_buf(),
            dir,
            config: config_file(&toml)?,
            addr: None,
            child: None,
            connected: None,
        };
        r.launch().await?;
        Ok(r)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let listen = self
            .addr
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let mut cmd = crate::server::isolated_command(&self.bin);
        cmd.arg("--config")
            .arg(self.config.path())
            .arg("relay")
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(self.dir.path());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start {} relay", self.bin.display()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the relay's stdout was not captured"))?;
        self.child = Some(child);
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        self.connected = Some(conn_rx);
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[kennel relay stdout] {line}");
                if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                    let _ = ready_tx.send(rest.trim().to_string());
                }
                if line.starts_with(CONNECTED_PREFIX) {
                    let _ = conn_tx.send(());
                }
            }
        });
        let addr = tokio::time::timeout(READY_DEADLINE, ready_rx.recv())
            .await
            .map_err(|_| anyhow!("the relay did not listen within {READY_DEADLINE:?}"))?
            .ok_or_else(|| anyhow!("the relay exited before it listened; its log is above"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("the relay printed a bad address `{addr}`"))?;
        self.addr = Some(addr);
        Ok(())
    }

    /// Waits for the next upstream connection the relay announces (counting ones already
    /// announced and not yet waited for).
    pub async fn wait_upstream(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let rx = self
            .connected
            .as_mut()
            .ok_or_else(|| anyhow!("the relay is not running"))?;
        match tokio::time::timeout(deadline, rx.recv()).await {
            Ok(Some(())) => Ok(()),
            Ok(None) => bail!("the relay exited before it connected upstream; its log is above"),
            Err(_) => bail!("the relay did not connect upstream within {deadline:?}"),
        }
    }

    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        self.addr.ok_or_else(|| anyhow!("the relay never listened"))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.addr.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Where downstream daemons connect.
    pub fn ws_url(&self) -> String {
        self.addr
            .map(|a| format!("ws://{a}/ws/daemon"))
            .unwrap_or_default()
    }

    /// A client for the admin endpoints, with the admin key.
    pub fn api(&self) -> Api {
        Api::new(self.url(), Some(RELAY_ADMIN_KEY.to_string()))
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL; waits until it is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.connected = None;
        let _ = child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .map_err(|_| anyhow!("kennel relay did not exit within 10s of SIGKILL"))??;
        Ok(())
    }

    /// Kills the relay if it runs and starts it again on the same address and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await?;
        self.launch().await
    }
}

impl Drop for KennelRelay {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
