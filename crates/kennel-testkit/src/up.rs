//! [`KennelUp`]: the real `kennel up` (coordinator and local daemon in one process) as a child
//! process on a free port, with a config file and a data directory the test owns, so it can be
//! stopped and started again on the same data. Readiness is the `kennel: up at URL` line it
//! prints, never a sleep; later lines can be waited for the same way. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::api::Api;

/// What `kennel up` prints once it serves.
const UP_PREFIX: &str = "kennel: up at ";

pub struct KennelUp {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    url: String,
    data: PathBuf,
    before_url: Vec<String>,
}

/// How [`KennelUp::start_with`] runs `kennel up`.
#[derive(Debug, Default, Clone)]
pub struct UpOptions {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Leave out `--data-dir`: `kennel up` uses its default data directory.
    pub implicit_data_dir: bool,
}

impl KennelUp {
    /// Runs `kennel --config CONFIG up --listen 127.0.0.1:0 --data-dir DATA` (with the
    /// isolated environment of every test process) and waits up to `deadline` for its URL.
    pub async fn start(
        bin: &Path,
        config: &Path,
        data: &Path,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, config, data, &UpOptions::default(), deadline).await
    }

    /// [`KennelUp::start`] with extra environment variables, and without `--data-dir` when
    /// `options.implicit_data_dir` is set (then `data` must be the directory the environment
    /// makes the default, e.g. `$XDG_DATA_HOME/kennel`).
    pub async fn start_with(
        bin: &Path,
        config: &Path,
        data: &Path,
        options: &UpOptions,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        let mut cmd = crate::server::isolated_command(bin);
        // Not the test's directory: no stray ./kennel.toml is read.
        cmd.current_dir(data.parent().unwrap_or(data))
            .arg("--config")
            .arg(config)
            .args(["up", "--listen", "127.0.0.1:0"]);
        if !options.implicit_data_dir {
            cmd.arg("--data-dir").arg(data);
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start {} up", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("kennel up's stdout was not piped"))?;
        let mut up = KennelUp {
            child,
            lines: BufReader::new(stdout).lines(),
            url: String::new(),
            data: data.to_path_buf(),
            before_url: Vec::new(),
        };
        let mut before = Vec::new();
        let line = up
            .wait_line(deadline, |l| {
                let up = l.starts_with(UP_PREFIX);
                if !up {
                    before.push(l.to_string());
                }
                up
            })
            .await
            .context("kennel up did not print its URL")?;
        up.before_url = before;
        up.url = line.trim_start_matches(UP_PREFIX).trim().to_string();
        Ok(up)
    }

    /// The lines printed before the `up at` line.
    pub fn lines_before_url(&self) -> &[String] {
        &self.before_url
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin key `kennel up` keeps in its data directory.
    pub fn admin_key(&self) -> anyhow::Result<String> {
        let path = self.data.join("admin.key");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_string())
    }

    /// A REST client with the admin key.
    pub fn api(&self) -> anyhow::Result<Api> {
        Ok(Api::new(self.url.clone(), Some(self.admin_key()?)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (SIGINT for Ctrl-C, SIGTERM) to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("kennel up has exited"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .with_context(|| format!("failed to send {signal} to kennel up"))
    }

    /// The next line on stdout for which `pred` holds (lines before it are skipped), within
    /// `deadline`.
    pub async fn wait_line(
        &mut self,
        deadline: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let lines = &mut self.lines;
        crate::within(deadline, "a line from kennel up", async {
            while let Some(line) = lines.next_line().await? {
                eprintln!("[kennel up stdout] {line}");
                if pred(&line) {
                    return Ok(line);
                }
            }
            anyhow::bail!("kennel up exited before printing the line")
        })
        .await?
    }

    /// Waits up to `deadline` for the process to exit; returns how it exited and what it
    /// printed on stdout meanwhile.
    pub async fn wait_exit(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        let (child, lines) = (&mut self.child, &mut self.lines);
        crate::within(deadline, "kennel up to exit", async {
            let mut rest = Vec::new();
            while let Some(line) = lines.next_line().await? {
                rest.push(line);
            }
            Ok((child.wait().await?, rest))
        })
        .await?
    }
}
