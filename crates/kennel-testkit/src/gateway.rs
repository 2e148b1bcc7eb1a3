//! [`KennelGateway`]: the real `kennel gateway` as a child process on a free port, with a
//! config file, a data directory and a known admin key (passed through the environment, as
//! for [`crate::KennelServer`]). Readiness is the `kennel: gateway listening on http://ADDR`
//! line on stdout. The child is killed on drop; [`KennelGateway::restart`] kills it with
//! SIGKILL and starts it again on the same address and data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::server::DataDir;

/// How long the binary may take to print its listening line.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// What the binary prints once it accepts connections; the address follows.
const READY_PREFIX: &str = "kennel: gateway listening on http://";

/// A running `kennel gateway`, killed when dropped.
pub struct KennelGateway {
    bin: PathBuf,
    data_dir: DataDir,
    config: tempfile::NamedTempFile,
    admin_key: String,
    addr: SocketAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl KennelGateway {
    /// Starts `kennel gateway` with `toml` as its config file (a `[gateway]` section) and
    /// `env` added to its environment (upstream keys).
    pub async fn start(bin: &Path, toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kennel-gateway-data-")
            .tempdir()
            .context("failed to create a temporary data directory")?;
        Self::launch(bin, toml, env, DataDir::Temp(dir)).await
    }

    /// Like [`KennelGateway::start`], on a data directory the caller owns, e.g. a running
    /// `kennel server`'s, so keys created there work here.
    pub async fn start_in(
        bin: &Path,
        toml: &str,
        env: &[(&str, &str)],
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::launch(bin, toml, env, DataDir::Given(data_dir.to_path_buf())).await
    }

    async fn launch(
        bin: &Path,
        toml: &str,
        env: &[(&str, &str)],
        data_dir: DataDir,
    ) -> anyhow::Result<Self> {
        let config = crate::server::config_file(toml)?;
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| anyhow!("failed to get random bytes: {e}"))?;
        let admin_key: String = format!(
            "test-admin-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, addr) =
            spawn(bin, config.path(), data_dir.path(), None, &admin_key, &env).await?;
        Ok(KennelGateway {
            bin: bin.to_path_buf(),
            data_dir,
            config,
            admin_key,
            addr,
            env,
            child: Some(child),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Kills the gateway with SIGKILL and starts it again on the same address and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(READY_DEADLINE, c.wait()).await;
        }
        let (child, addr) = spawn(
            &self.bin,
            self.config.path(),
            self.data_dir.path(),
            Some(self.addr),
            &self.admin_key,
            &self.env,
        )
        .await?;
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for KennelGateway {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

async fn spawn(
    bin: &Path,
    config: &Path,
    data_dir: &Path,
    listen: Option<SocketAddr>,
    admin_key: &str,
    env: &[(String, String)],
) -> anyhow::Result<(Child, SocketAddr)> {
    let listen = listen.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
    let mut cmd = crate::server::isolated_command(bin);
    cmd.arg("gateway")
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(&listen)
        .arg("--data-dir")
        .arg(data_dir)
        .env("KENNEL_SERVER__AUTH__ADMIN_KEY", admin_key)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", bin.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("the gateway's stdout was not captured"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let ready = tokio::time::timeout(READY_DEADLINE, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                return rest
                    .trim()
                    .parse::<SocketAddr>()
                    .map(Some)
                    .map_err(|e| anyhow!("bad listening line {line:?}: {e}"));
            }
            seen.push(line);
        }
        Ok::<_, anyhow::Error>(None)
    })
    .await;
    let addr = match ready {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => {
            let _ = child.start_kill();
            bail!(
                "kennel gateway exited before it was ready; its stderr is above; stdout was:\n{}",
                seen.join("\n")
            )
        }
        Ok(Err(e)) => {
            let _ = child.start_kill();
            return Err(e);
        }
        Err(_) => {
            let _ = child.start_kill();
            bail!("kennel gateway did not print `{READY_PREFIX}...` within {READY_DEADLINE:?}")
        }
    };
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[kennel gateway stdout] {line}");
        }
    });
    Ok((child, addr))
}
