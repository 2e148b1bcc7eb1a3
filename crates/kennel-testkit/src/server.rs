//! [`KennelServer`]: the real `kennel` binary as a child process on a free port, with its own
//! data directory and a known admin key.
//!
//! Readiness is the `kennel: listening on http://ADDR` line the binary prints on stdout, not a
//! poll loop or a sleep. stderr is inherited so that a failing test shows the server's log.
//! This module owns the child's lifetime: it kills it on drop and on [`KennelServer::kill9`],
//! and it must not touch any process it did not start.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::api::Api;

/// How long the binary may take to print its listening line.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a killed child may take to be reaped.
const REAP_DEADLINE: Duration = Duration::from_secs(10);
/// What the binary prints once it accepts connections; the address follows.
const READY_PREFIX: &str = "kennel: listening on http://";
/// Environment variable a developer can set to see more of the server's log in tests.
const LOG_OVERRIDE_ENV: &str = "KENNEL_TEST_LOG";

/// Where the server keeps its state: a temporary directory this struct owns (and removes on
/// drop), or a directory the caller owns (so it can outlive one server, e.g. for restarts in
/// a new process).
pub(crate) enum DataDir {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

impl DataDir {
    pub(crate) fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Given(p) => p,
        }
    }
}

/// A running `kennel server`, killed when dropped.
pub struct KennelServer {
    bin: PathBuf,
    data_dir: DataDir,
    /// Kept alive for as long as the server may be restarted with `--config` pointing at it.
    config: Option<tempfile::NamedTempFile>,
    extra_args: Vec<OsString>,
    admin_key: String,
    addr: SocketAddr,
    /// `None` between [`KennelServer::kill9`] and [`KennelServer::restart`].
    child: Option<Child>,
}

impl KennelServer {
    /// Starts the binary on `127.0.0.1:0` with a fresh temporary data directory.
    pub async fn start(bin: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kennel-test-data-")
            .tempdir()
            .context("failed to create a temporary data directory")?;
        Self::launch(
            bin,
            DataDir::Temp(dir),
            None,
            os_args(extra_args),
            None,
            None,
        )
        .await
    }

    /// Starts the binary with `toml` as its configuration file (for timing settings and the
    /// like). The file lives outside the data directory, so the server never mistakes it for
    /// state, and it is kept for restarts.
    pub async fn start_with_config(bin: &Path, toml: &str) -> anyhow::Result<Self> {
        let file = config_file(toml)?;
        let dir = tempfile::Builder::new()
            .prefix("kennel-test-data-")
            .tempdir()
            .context("failed to create a temporary data directory")?;
        let args = vec![
            OsString::from("--config"),
            file.path().as_os_str().to_owned(),
        ];
        Self::launch(bin, DataDir::Temp(dir), Some(file), args, None, None).await
    }

    /// Starts the binary on a data directory the caller owns (it is not removed), optionally
    /// on a fixed address, e.g. the address of a server that was stopped.
    pub async fn start_in(
        bin: &Path,
        data_dir: PathBuf,
        extra_args: &[&str],
        listen: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        Self::launch(
            bin,
            DataDir::Given(data_dir),
            None,
            os_args(extra_args),
            listen,
            None,
        )
        .await
    }

    async fn launch(
        bin: &Path,
        data_dir: DataDir,
        config: Option<tempfile::NamedTempFile>,
        extra_args: Vec<OsString>,
        listen: Option<SocketAddr>,
        admin_key: Option<String>,
    ) -> anyhow::Result<Self> {
        let admin_key = match admin_key {
            Some(k) => k,
            None => random_admin_key()?,
        };
        let (child, addr) =
            spawn_ready(bin, data_dir.path(), &extra_args, listen, &admin_key).await?;
        Ok(KennelServer {
            bin: bin.to_path_buf(),
            data_dir,
            config,
            extra_args,
            admin_key,
            addr,
            child: Some(child),
        })
    }

    /// The configuration file it was started with, if any: rewrite it before
    /// [`KennelServer::restart`] to restart with other settings.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_ref().map(|f| f.path())
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:PORT/ws/daemon`, where daemons connect.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/daemon", self.addr)
    }

    /// The address the server listens on; stays the same across [`KennelServer::restart`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin key the server was started with (passed through the environment).
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// A REST client authenticated with the admin key.
    pub fn api(&self) -> Api {
        Api::new(self.url(), Some(self.admin_key.clone()))
    }

    /// True while a child process is running (it may still have exited on its own).
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The server's resident memory in KiB (`VmRSS`), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server with SIGKILL, as a crash or power loss would, and waits for it to go.
    /// Nothing is flushed or shut down gracefully. Does nothing if it is not running.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // An error here means the child already exited, which is what we want anyway.
        let _ = child.start_kill();
        tokio::time::timeout(REAP_DEADLINE, child.wait())
            .await
            .map_err(|_| anyhow!("kennel server did not exit within {REAP_DEADLINE:?} of SIGKILL"))?
            .context("failed to wait for the killed kennel server")?;
        Ok(())
    }

    /// Kills the server (SIGKILL) if it runs, then starts it again with the same data
    /// directory, address, admin key and arguments.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await?;
        let (child, addr) = spawn_ready(
            &self.bin,
            self.data_dir.path(),
            &self.extra_args,
            Some(self.addr),
            &self.admin_key,
        )
        .await
        .with_context(|| format!("failed to restart the kennel server on {}", self.addr))?;
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for KennelServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // `kill_on_drop` would do this too; doing it first makes the intent explicit.
            let _ = child.start_kill();
        }
    }
}

/// A `kennel` command isolated from the developer's shell: no inherited `KENNEL_*`,
/// `MAKIMA_*` or `ZEPTOCLAW_*` settings (tests must not pick them up), log level from
/// `KENNEL_TEST_LOG` (default `warn`), stdout piped for readiness lines, stderr inherited so a
/// failing test shows the process's log, and killed when dropped.
pub fn isolated_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("KENNEL_") || n.starts_with("MAKIMA_") || n.starts_with("ZEPTOCLAW_") {
            cmd.env_remove(&name);
        }
    }
    let log = std::env::var(LOG_OVERRIDE_ENV).unwrap_or_else(|_| "warn".to_string());
    cmd.env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// A fresh temporary data directory `<prefix>XXXX` and a name unique to it (`<name>-XXXX`,
/// letters and digits only), usable as a machine id or agent name.
pub fn named_data_dir(prefix: &str, name: &str) -> anyhow::Result<(tempfile::TempDir, String)> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("failed to create a temporary directory for {name}"))?;
    let suffix: String = dir
        .path()
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "")
        })
        .unwrap_or_default();
    Ok((dir, format!("{name}-{suffix}")))
}

/// Writes `toml` to a temporary `.toml` file, for `--config`. Keep the returned handle alive
/// as long as the file is needed: dropping it deletes the file.
pub fn config_file(toml: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("kennel-test-config-")
        .suffix(".toml")
        .tempfile()
        .context("failed to create a temporary config file")?;
    file.write_all(toml.as_bytes())
        .and_then(|()| file.flush())
        .context("failed to write the temporary config file")?;
    Ok(file)
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A fresh admin key. Random per server so tests cannot depend on a well-known key, and long
/// enough for the server's 24-character minimum.
fn random_admin_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("failed to get random bytes: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("test-admin-{hex}"))
}

/// Spawns the binary and waits for its listening line; returns the child and its address.
async fn spawn_ready(
    bin: &Path,
    data_dir: &Path,
    extra_args: &[OsString],
    listen: Option<SocketAddr>,
    admin_key: &str,
) -> anyhow::Result<(Child, SocketAddr)> {
    let listen = listen.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
    let mut cmd = isolated_command(bin);
    cmd.arg("server")
        .arg("--listen")
        .arg(&listen)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra_args)
        .env("KENNEL_SERVER__AUTH__ADMIN_KEY", admin_key);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", bin.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("the kennel server's stdout was not captured"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let ready = tokio::time::timeout(READY_DEADLINE, read_until_ready(&mut lines, &mut seen)).await;
    let addr = match ready {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => {
            let status = tokio::time::timeout(REAP_DEADLINE, child.wait()).await;
            let status = match status {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("unknown status ({e})"),
                Err(_) => "closed its stdout but is still running".to_string(),
            };
            let _ = child.start_kill();
            bail!(
                "kennel server exited before it was ready ({status}); its stderr is above; \
                 stdout was:\n{}",
                show_lines(&seen)
            );
        }
        Ok(Err(e)) => {
            let _ = child.start_kill();
            return Err(e.context(format!(
                "failed to read the kennel server's stdout; it printed:\n{}",
                show_lines(&seen)
            )));
        }
        Err(_) => {
            let _ = child.start_kill();
            bail!(
                "kennel server did not print `{READY_PREFIX}...` within {READY_DEADLINE:?}; \
                 stdout was:\n{}",
                show_lines(&seen)
            );
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe; echo it so it shows up
    // next to the inherited stderr when a test fails.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[kennel stdout] {line}");
        }
    });
    Ok((child, addr))
}

/// Reads lines until the listening line; `None` when stdout closes first.
async fn read_until_ready(
    lines: &mut Lines<BufReader<ChildStdout>>,
    seen: &mut Vec<String>,
) -> anyhow::Result<Option<SocketAddr>> {
    while let Some(line) = lines.next_line().await? {
        let addr = parse_ready_line(&line);
        seen.push(line);
        if let Some(addr) = addr {
            return addr.map(Some);
        }
    }
    Ok(None)
}

/// `Some(Ok(addr))` for the listening line, `Some(Err)` for a listening line whose address
/// does not parse, `None` for any other line.
fn parse_ready_line(line: &str) -> Option<anyhow::Result<SocketAddr>> {
    let (_, rest) = line.split_once(READY_PREFIX)?;
    let addr = rest
        .split(|c: char| c.is_whitespace() || c == '/')
        .next()
        .unwrap_or_default();
    Some(
        addr.parse::<SocketAddr>()
            .with_context(|| format!("the listening line `{line}` has no valid address")),
    )
}

fn show_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        "(nothing)".to_string()
    } else {
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let addr = parse_ready_line("kennel: listening on http://127.0.0.1:4242")
            .unwrap()
            .unwrap();
        assert_eq!(addr, "127.0.0.1:4242".parse::<SocketAddr>().unwrap());
        let addr = parse_ready_line("kennel: listening on http://127.0.0.1:80/ (pid 3)")
            .unwrap()
            .unwrap();
        assert_eq!(addr.port(), 80);
        assert!(parse_ready_line("kennel: opening store").is_none());
        assert!(parse_ready_line("kennel: listening on http://nowhere")
            .unwrap()
            .is_err());
    }

    #[test]
    fn admin_keys_are_long_and_distinct() {
        let a = random_admin_key().unwrap();
        let b = random_admin_key().unwrap();
        assert!(a.len() >= 24, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn config_file_holds_the_text() {
        let f = config_file("[scheduler]\ndefault_max_attempts = 2\n").unwrap();
        let text = std::fs::read_to_string(f.path()).unwrap();
        assert!(text.contains("default_max_attempts = 2"));
        assert_eq!(f.path().extension().and_then(|e| e.to_str()), Some("toml"));
    }
}
