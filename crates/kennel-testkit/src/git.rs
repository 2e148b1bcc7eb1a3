//! [`GitFixture`]: a bare "remote" repository on disk with one commit on `main`, for tests that
//! need a real repository to clone, branch and push to. Uses the real `git` CLI with a fixed
//! identity, isolated from the developer's global git configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct GitFixture {
    dir: tempfile::TempDir,
}

/// Runs git with an isolated configuration; fails with git's stderr.
pub fn git(cwd: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=kennel test",
            "-c",
            "user.email=test@kennel.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .with_context(|| format!("failed to run git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

impl GitFixture {
    /// A bare repository `remote.git` whose `main` has `README.md` ("hello\n") and any
    /// `files` given as (path, contents).
    pub fn new(files: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kennel-test-git-")
            .tempdir()?;
        let work = dir.path().join("seed");
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "-q", "-b", "main"])?;
        std::fs::write(work.join("README.md"), "hello\n")?;
        for (path, contents) in files {
            let p = work.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(p, contents)?;
        }
        git(&work, &["add", "-A"])?;
        git(&work, &["commit", "-q", "-m", "initial"])?;
        git(dir.path(), &["clone", "-q", "--bare", "seed", "remote.git"])?;
        Ok(GitFixture { dir })
    }

    /// The remote's path, usable as a repository URL.
    pub fn url(&self) -> String {
        self.remote().display().to_string()
    }

    pub fn remote(&self) -> PathBuf {
        self.dir.path().join("remote.git")
    }

    /// `git show <rev>:<path>` in the remote.
    pub fn show(&self, rev: &str, path: &str) -> anyhow::Result<String> {
        git(&self.remote(), &["show", &format!("{rev}:{path}")])
    }

    /// The commit a ref points to in the remote, if it exists.
    pub fn rev(&self, rev: &str) -> Option<String> {
        git(&self.remote(), &["rev-parse", "--verify", "-q", rev]).ok()
    }
}
