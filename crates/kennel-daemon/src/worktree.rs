//! Git worktrees for task attempts: one bare cache per repository, one fresh worktree per
//! attempt on the branch `<prefix><task id>`, and the commit and push of what the agent left.
//!
//! This module owns everything the daemon does with git and the directories under
//! `<data_dir>/repos` and `<data_dir>/worktrees`. It drives the real `git` CLI (so credential
//! helpers, ssh config and hooks behave as users expect) with argument vectors only, never a
//! shell string, and it validates every task id, branch name, URL and destination path before
//! it reaches a path or a git argument. It must not decide whether a task succeeded, talk to
//! the coordinator or run the agent: the executor does that and calls in here.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kennel_proto::link::RepoSpec;
use kennel_proto::{validate_branch_name, validate_id};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::Mutex;

/// Where the cache keeps the remote's base branches: `refs/remotes/origin/<base>`. Fetching
/// there (never into `refs/heads/*`) means a fetch can never try to move a branch a worktree
/// has checked out. Only base branches are kept up to date; other names under that prefix may
/// be left from older daemons that fetched every branch, and nothing reads them.
const REMOTE_TRACKING_PREFIX: &str = "refs/remotes/origin/";
/// How many trailing lines of a command's stderr an error keeps.
const TAIL_LINES: usize = 20;
/// Longest line of stderr an error keeps, in characters.
const TAIL_LINE_CHARS: usize = 400;
/// Most bytes of a setup command's output held in memory, per stream.
const SETUP_CAPTURE_BYTES: usize = 64 * 1024;

/// Variables that would point git at another repository than the one we chose. A daemon
/// started from inside a git hook (or a shell that exported them) must not leak them into its
/// own git calls; the author variables would override the configured commit identity.
const FOREIGN_GIT_ENV: [&str; 13] = [
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
    "GIT_AUTHOR_NAME",
    "GIT_AUTHOR_EMAIL",
    "GIT_COMMITTER_NAME",
    "GIT_COMMITTER_EMAIL",
];

const HINT_REMOTE: &str =
    "check the repository URL, that this machine can reach it and that git has credentials for it";
const HINT_CACHE: &str = "check free disk space and permissions under the daemon's data directory; deleting the repository cache makes the next task clone it again";
const HINT_PUSH: &str = "check that this machine may push to the repository (credentials, branch protection, server-side hooks)";
const HINT_COMMIT: &str =
    "check the repository's commit hooks and the state the agent left the worktree in";
const HINT_SETUP: &str = "fix the repository's setup settings in the daemon configuration";

/// How the daemon names, authors and describes the branches it pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSettings {
    /// Branches are named `<branch_prefix><task id>`.
    pub branch_prefix: String,
    /// Author and committer name of the commit made for uncommitted changes.
    pub author_name: String,
    /// Author and committer email of that commit.
    pub author_email: String,
    /// Message of that commit; `{task_id}` and `{task_name}` are replaced.
    pub commit_message: String,
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            branch_prefix: "kennel/".to_string(),
            author_name: "kennel".to_string(),
            author_email: "kennel@localhost".to_string(),
            commit_message: "kennel: {task_name}".to_string(),
        }
    }
}

impl GitSettings {
    fn render_message(&self, task_id: &str, task_name: &str) -> String {
        // `{task_id}` first, so a task name that happens to contain "{task_id}" stays literal.
        let msg = self
            .commit_message
            .replace("{task_id}", task_id)
            .replace("{task_name}", task_name);
        if msg.trim().is_empty() {
            // git refuses an empty message; a blank template must not lose the agent's work.
            format!("kennel: {task_id}")
        } else {
            msg
        }
    }
}

/// Why a git step failed.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {kind}{}", hint_suffix(.hint))]
pub struct GitError {
    /// What was being done, as a fragment that fits "failed to …".
    pub action: String,
    /// What went wrong; for a failed command, the command line and git's own message.
    pub kind: GitErrorKind,
    /// What the user can do about it; empty when the kind already says.
    pub hint: &'static str,
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!("; {hint}")
    }
}

/// The ways a git step fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitErrorKind {
    /// An id, branch, URL or path was refused before any command ran.
    #[error("{0}")]
    Refused(String),
    /// The program could not be started.
    #[error("could not start `{program}` ({error}); install it and make sure it is on PATH")]
    Spawn { program: String, error: io::Error },
    /// The command ran and failed. `command` and `stderr` have credentials stripped from URLs.
    #[error("`{command}` failed ({status}): {stderr}")]
    Exit {
        command: String,
        status: ExitStatus,
        /// The last lines of the command's stderr (its stdout when stderr was empty).
        stderr: String,
    },
    /// A filesystem step around git failed.
    #[error("{}: {error}", .path.display())]
    Io { path: PathBuf, error: io::Error },
}

impl GitError {
    fn new(action: impl Into<String>, kind: GitErrorKind, hint: &'static str) -> Self {
        GitError {
            action: action.into(),
            kind,
            hint,
        }
    }

    fn refused(action: impl Into<String>, reason: impl Into<String>) -> Self {
        GitError::new(action, GitErrorKind::Refused(reason.into()), "")
    }

    /// Whether the step was refused before any command ran.
    pub fn is_refused(&self) -> bool {
        matches!(self.kind, GitErrorKind::Refused(_))
    }

    /// The tail of the failed command's stderr, if a command ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match &self.kind {
            GitErrorKind::Exit { stderr, .. } => Some(stderr),
            _ => None,
        }
    }

    /// The failed command's exit code, if it ran and exited.
    pub fn exit_code(&self) -> Option<i32> {
        match &self.kind {
            GitErrorKind::Exit { status, .. } => status.code(),
            _ => None,
        }
    }
}

fn io_error(
    action: impl Into<String>,
    path: &Path,
    error: io::Error,
    hint: &'static str,
) -> GitError {
    GitError::new(
        action,
        GitErrorKind::Io {
            path: path.to_path_buf(),
            error,
        },
        hint,
    )
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Worktrees deleted.
    pub removed: usize,
    /// Sum of the sizes of the files they held, in bytes.
    pub bytes: u64,
}

/// What [`Worktree::finish`] did with the agent's work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// The worktree was left as it started: nothing committed, nothing pushed.
    NoChanges,
    /// `commit` was pushed to `refs/heads/<branch>` on the repository's origin.
    Pushed { branch: String, commit: String },
}

/// Bare repository caches and the worktrees made from them, under one data directory.
///
/// Share it (behind an `Arc`) between all tasks of a daemon: it serialises work per cache.
#[derive(Debug)]
pub struct RepoCache {
    /// `<data_dir>/repos`: one bare clone per repository URL.
    root: PathBuf,
    /// `<data_dir>/worktrees`: one directory per task attempt, `<task id>-<attempt>`.
    worktrees: PathBuf,
    settings: Arc<GitSettings>,
    /// One lock per cache directory. Two tasks on the same repository may prepare at once, and
    /// clone, fetch, `worktree add` and prune all write the cache's refs and worktree list.
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

impl RepoCache {
    pub fn new(data_dir: &Path, settings: GitSettings) -> Self {
        // Worktree paths end up in git's metadata and in agents' working directories, so they
        // must not depend on the daemon's current directory later on.
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        RepoCache {
            root: data_dir.join("repos"),
            worktrees: data_dir.join("worktrees"),
            settings: Arc::new(settings),
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// `<data_dir>/repos`, where the bare caches live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<data_dir>/worktrees`, where the attempts' worktrees live.
    pub fn worktrees_dir(&self) -> &Path {
        &self.worktrees
    }

    fn lock_for(&self, cache_dir: &Path) -> Arc<Mutex<()>> {
        // A poisoned map only means another thread panicked while inserting; the map itself
        // is still a valid map of locks.
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(cache_dir.to_path_buf()).or_default().clone()
    }

    /// Makes a fresh worktree for one attempt of a task, on branch `<prefix><task_id>` at the
    /// remote's current `base_branch` (its default branch when that is empty). The repository
    /// is cloned once (bare); every later call
    /// fetches only the base branch, so its cost does not grow with the branches other tasks
    /// have pushed. A retry resets the branch.
    #[tracing::instrument(skip(self, repo), fields(url = %redact_userinfo(&repo.url), base = %repo.base_branch))]
    pub async fn prepare(
        &self,
        repo: &RepoSpec,
        task_id: &str,
        attempt: u32,
    ) -> Result<Worktree, GitError> {
        let check = "accept the task's repository settings";
        validate_id("task id", task_id).map_err(|e| GitError::refused(check, e.to_string()))?;
        kennel_proto::validate_base_branch(&repo.base_branch)
            .map_err(|e| GitError::refused(check, format!("base {e}")))?;
        if attempt == 0 {
            return Err(GitError::refused(check, "attempt numbers start at 1"));
        }
        let branch = format!("{}{}", self.settings.branch_prefix, task_id);
        validate_branch_name(&branch).map_err(|e| {
            GitError::refused(
                check,
                format!("{e}; fix `branch_prefix` in the daemon's git settings"),
            )
        })?;
        let url = normalize_url(&repo.url).map_err(|reason| GitError::refused(check, reason))?;

        let cache_dir = self.root.join(cache_dir_name(&url));
        let lock = self.lock_for(&cache_dir);
        let _guard = lock.lock().await;

        self.ensure_cache(&url, &cache_dir).await?;
        let base = if repo.base_branch.is_empty() {
            default_branch(&cache_dir, &url).await?
        } else {
            repo.base_branch.clone()
        };
        let base_sha = fetch_base(&cache_dir, &url, &base).await?;
        // What the remote holds for our branch as this attempt starts: a retry's forced push
        // may replace exactly that and nothing newer. A first attempt pushes without a lease
        // (see `finish`), so only retries pay for this second round trip to the remote.
        let remote_branch = if attempt > 1 {
            remote_head(
                &cache_dir,
                &format!("refs/heads/{branch}"),
                &format!("look up branch `{branch}` on the remote"),
            )
            .await?
        } else {
            None
        };

        let path = self.worktrees.join(format!("{task_id}-{attempt}"));
        let add_action = format!("create worktree {}", path.display());
        tokio::fs::create_dir_all(&self.worktrees)
            .await
            .map_err(|e| io_error(&add_action, &self.worktrees, e, HINT_CACHE))?;
        if tokio::fs::symlink_metadata(&path).await.is_ok() {
            // The same attempt prepared twice (a daemon restarted mid-prepare): start clean.
            tokio::fs::remove_dir_all(&path)
                .await
                .map_err(|e| io_error(&add_action, &path, e, HINT_CACHE))?;
        }
        // Forget worktrees whose directories are gone, so their branches are free again.
        git_ok(
            &cache_dir,
            &args(["worktree", "prune"]),
            &add_action,
            HINT_CACHE,
        )
        .await?;
        self.release_branch(&cache_dir, &branch, attempt).await?;

        // Parallel checkout (git's own threshold keeps small trees serial) makes a worktree of
        // a large repository several times faster to create.
        let mut add = args([
            "-c",
            "checkout.workers=0",
            "worktree",
            "add",
            "--quiet",
            "--no-track",
            "-B",
            &branch,
        ]);
        add.push(path.clone().into_os_string());
        add.push(base_sha.into());
        git_ok(&cache_dir, &add, &add_action, HINT_CACHE).await?;
        let base_commit =
            git_ok(&path, &args(["rev-parse", "HEAD"]), &add_action, HINT_CACHE).await?;
        tracing::info!(path = %path.display(), %branch, %base_commit, "worktree ready");

        Ok(Worktree {
            path,
            branch,
            base_commit,
            cache_dir,
            cache_lock: lock.clone(),
            remote_branch,
            settings: self.settings.clone(),
        })
    }

    /// Clones the repository into `cache_dir` if it is not there yet. The caller holds the
    /// cache's lock.
    async fn ensure_cache(&self, url: &str, cache_dir: &Path) -> Result<(), GitError> {
        let shown = redact_userinfo(url);
        if !tokio::fs::metadata(cache_dir)
            .await
            .is_ok_and(|m| m.is_dir())
        {
            let action = format!("clone {shown} into the repository cache");
            tokio::fs::create_dir_all(&self.root)
                .await
                .map_err(|e| io_error(&action, &self.root, e, HINT_CACHE))?;
            // Clone beside the final name and rename, so a clone cut short (crash, kill) never
            // looks like a usable cache; the next attempt starts it over.
            let name = cache_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let partial = self.root.join(format!(".{name}.partial"));
            if tokio::fs::symlink_metadata(&partial).await.is_ok() {
                tokio::fs::remove_dir_all(&partial)
                    .await
                    .map_err(|e| io_error(&action, &partial, e, HINT_CACHE))?;
            }
            tracing::info!(url = %shown, cache = %cache_dir.display(), "cloning repository cache");
            let mut clone = args(["clone", "--bare", "--quiet", "--", url]);
            clone.push(partial.clone().into_os_string());
            git_ok(&self.root, &clone, &action, HINT_REMOTE).await?;
            tokio::fs::rename(&partial, cache_dir)
                .await
                .map_err(|e| io_error(&action, cache_dir, e, HINT_CACHE))?;
        }
        Ok(())
    }

    /// git refuses to reset a branch another worktree has checked out. That worktree belongs to
    /// an older attempt of the same task, superseded by this one: detach its HEAD (same commit,
    /// files untouched) so the branch is free, and leave the directory to the sweep.
    async fn release_branch(
        &self,
        cache_dir: &Path,
        branch: &str,
        attempt: u32,
    ) -> Result<(), GitError> {
        let action = format!("free branch `{branch}` from an older attempt's worktree");
        let list = git_ok(
            cache_dir,
            &args(["worktree", "list", "--porcelain"]),
            &action,
            HINT_CACHE,
        )
        .await?;
        let wanted = format!("refs/heads/{branch}");
        for block in list.split("\n\n") {
            let mut path = None;
            let mut head = None;
            let mut holds = false;
            for line in block.lines() {
                if let Some(p) = line.strip_prefix("worktree ") {
                    path = Some(PathBuf::from(p));
                } else if let Some(h) = line.strip_prefix("HEAD ") {
                    head = Some(h.to_string());
                } else if line.strip_prefix("branch ") == Some(wanted.as_str()) {
                    holds = true;
                }
            }
            if let (true, Some(path), Some(head)) = (holds, path, head) {
                tracing::info!(worktree = %path.display(), %branch, attempt, "detaching older attempt's worktree");
                git_ok(
                    &path,
                    &args([
                        "update-ref",
                        "--no-deref",
                        "-m",
                        &format!("kennel: detached for attempt {attempt}"),
                        "HEAD",
                        &head,
                    ]),
                    &action,
                    HINT_CACHE,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Removes worktrees whose directory was last modified `older_than` ago or earlier and
    /// that are not in `keep` (the worktrees of attempts still running), then prunes them from
    /// every cache.
    pub async fn sweep(
        &self,
        older_than: Duration,
        keep: &[PathBuf],
    ) -> Result<SweepReport, GitError> {
        self.sweep_as_of(SystemTime::now(), older_than, keep).await
    }

    async fn sweep_as_of(
        &self,
        now: SystemTime,
        older_than: Duration,
        keep: &[PathBuf],
    ) -> Result<SweepReport, GitError> {
        let action = "sweep old worktrees";
        let keep: Vec<PathBuf> = keep
            .iter()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            .collect();
        let mut report = SweepReport::default();
        let mut entries = match tokio::fs::read_dir(&self.worktrees).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(io_error(action, &self.worktrees, e, HINT_CACHE)),
        };
        loop {
            let entry = match entries.next_entry().await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(e) => return Err(io_error(action, &self.worktrees, e, HINT_CACHE)),
            };
            let path = self.worktrees.join(entry.file_name());
            let Ok(meta) = tokio::fs::symlink_metadata(&path).await else {
                continue;
            };
            if !meta.is_dir() || keep.contains(&path) {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            if age < older_than {
                continue;
            }
            report.bytes += remove_tree(path.clone())
                .await
                .map_err(|e| io_error(action, &path, e, HINT_CACHE))?;
            report.removed += 1;
            tracing::info!(worktree = %path.display(), age_secs = age.as_secs(), "swept worktree");
        }
        if report.removed > 0 {
            self.prune_all().await?;
        }
        Ok(report)
    }

    /// `git worktree prune` in every cache, so deleted worktrees free their branches.
    async fn prune_all(&self) -> Result<(), GitError> {
        let action = "prune deleted worktrees from the repository caches";
        let mut caches = match tokio::fs::read_dir(&self.root).await {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(action, &self.root, e, HINT_CACHE)),
        };
        while let Some(entry) = caches
            .next_entry()
            .await
            .map_err(|e| io_error(action, &self.root, e, HINT_CACHE))?
        {
            // Dot-names are clones in progress or left over from a crash.
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let dir = self.root.join(entry.file_name());
            let lock = self.lock_for(&dir);
            let _guard = lock.lock().await;
            git_ok(&dir, &args(["worktree", "prune"]), action, HINT_CACHE).await?;
        }
        Ok(())
    }
}

/// One attempt's checkout. Dropping it leaves the directory in place (for the sweep);
/// [`Worktree::remove`] deletes it.
#[derive(Debug)]
pub struct Worktree {
    /// The checkout, `<data_dir>/worktrees/<task id>-<attempt>`; the agent works here.
    pub path: PathBuf,
    /// The branch checked out and pushed, `<prefix><task id>`.
    pub branch: String,
    /// The commit the attempt started from (the remote's base branch at prepare time).
    pub base_commit: String,
    /// The bare cache this worktree belongs to.
    cache_dir: PathBuf,
    cache_lock: Arc<Mutex<()>>,
    /// The remote's `refs/heads/<branch>` when this attempt was prepared; `None` if absent.
    /// Looked up for retries (attempt > 1) only: a first attempt's push takes no lease.
    remote_branch: Option<String>,
    settings: Arc<GitSettings>,
}

impl Worktree {
    /// Per-repository preparation before the agent runs: copies each `(source, destination)`
    /// file (source absolute, destination relative inside the worktree), then runs `command`
    /// (an argument vector) in the worktree.
    pub async fn setup(
        &self,
        copy: &[(PathBuf, PathBuf)],
        command: Option<&[String]>,
    ) -> Result<(), GitError> {
        for (src, dest) in copy {
            let action = format!(
                "copy {} to {} in the worktree",
                src.display(),
                dest.display()
            );
            if !src.is_absolute() {
                return Err(GitError::refused(
                    action,
                    "the source must be an absolute path; fix the repository's setup settings",
                ));
            }
            let target = self.safe_destination(dest, &action).await?;
            match tokio::fs::metadata(src).await {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(GitError::refused(
                        action,
                        "the source is not a regular file; only files can be copied",
                    ))
                }
                Err(e) => return Err(io_error(action, src, e, HINT_SETUP)),
            }
            tokio::fs::copy(src, &target)
                .await
                .map_err(|e| io_error(&action, &target, e, HINT_SETUP))?;
        }
        if let Some(argv) = command {
            self.run_setup_command(argv).await?;
        }
        Ok(())
    }

    /// Checks `dest` and creates its parent directories inside the worktree, refusing any path
    /// that would land outside it: absolute, `..`, `.git`, or through a symbolic link the
    /// repository contains.
    async fn safe_destination(&self, dest: &Path, action: &str) -> Result<PathBuf, GitError> {
        let refuse = |why: &str| {
            GitError::refused(
                action,
                format!("the destination {why}; fix the repository's setup settings"),
            )
        };
        let mut parts = Vec::new();
        for c in dest.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                Component::CurDir => {}
                _ => {
                    return Err(refuse(
                        "must be a relative path inside the worktree, without `..`",
                    ))
                }
            }
        }
        let Some((file, dirs)) = parts.split_last() else {
            return Err(refuse("is empty"));
        };
        if parts.first().is_some_and(|p| *p == OsStr::new(".git")) {
            return Err(refuse("must not be inside `.git`"));
        }
        let mut at = self.path.clone();
        for dir in dirs {
            at.push(dir);
            match tokio::fs::symlink_metadata(&at).await {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse("leads through a symbolic link"))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refuse("has a file where a directory should be")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tokio::fs::create_dir(&at)
                        .await
                        .map_err(|e| io_error(action, &at, e, HINT_SETUP))?
                }
                Err(e) => return Err(io_error(action, &at, e, HINT_SETUP)),
            }
        }
        at.push(file);
        if let Ok(m) = tokio::fs::symlink_metadata(&at).await {
            if m.file_type().is_symlink() {
                // Copying onto a link would write wherever it points.
                tokio::fs::remove_file(&at)
                    .await
                    .map_err(|e| io_error(action, &at, e, HINT_SETUP))?;
            }
        }
        Ok(at)
    }

    async fn run_setup_command(&self, argv: &[String]) -> Result<(), GitError> {
        let action = "run the repository's setup command";
        let Some((program, rest)) = argv.split_first() else {
            return Err(GitError::refused(
                action,
                "the setup command is empty; give at least a program name",
            ));
        };
        let mut cmd = Command::new(program);
        cmd.args(rest);
        configure(&mut cmd, &self.path);
        // Cancelling the task must not leave a setup command running on its own.
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|error| {
            GitError::new(
                action,
                GitErrorKind::Spawn {
                    program: program.clone(),
                    error,
                },
                HINT_SETUP,
            )
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (out, err) = tokio::join!(read_tail(stdout), read_tail(stderr));
        let status = child
            .wait()
            .await
            .map_err(|e| io_error(action, &self.path, e, HINT_SETUP))?;
        if status.success() {
            return Ok(());
        }
        let tail = if err.iter().all(u8::is_ascii_whitespace) {
            tail_lines(&out)
        } else {
            tail_lines(&err)
        };
        Err(GitError::new(
            action,
            GitErrorKind::Exit {
                command: redact_userinfo(&argv.join(" ")),
                status,
                stderr: tail,
            },
            HINT_SETUP,
        ))
    }

    /// After the agent exits: commits whatever it left uncommitted (as the configured author),
    /// then pushes `HEAD` to `refs/heads/<branch>` if it differs from the base commit. A retry
    /// (attempt > 1) may replace what the remote held for the branch when it was prepared.
    #[tracing::instrument(skip(self, task_name), fields(path = %self.path.display(), branch = %self.branch))]
    pub async fn finish(
        &self,
        task_id: &str,
        task_name: &str,
        attempt: u32,
    ) -> Result<Finished, GitError> {
        let commit_action = "commit the agent's changes";
        validate_id("task id", task_id)
            .map_err(|e| GitError::refused(commit_action, e.to_string()))?;
        git_ok(&self.path, &args(["add", "-A"]), commit_action, HINT_COMMIT).await?;
        let staged_clean = git_probe(
            &self.path,
            &args(["diff", "--cached", "--quiet"]),
            commit_action,
            HINT_COMMIT,
        )
        .await?
        .is_some();
        if !staged_clean {
            let message = self.settings.render_message(task_id, task_name);
            // Automatic gc is off here: this runs beside other tasks' git commands in the same
            // cache without its lock; fetch under the lock does the maintenance instead.
            let commit = args([
                "-c",
                &format!("user.name={}", self.settings.author_name),
                "-c",
                &format!("user.email={}", self.settings.author_email),
                "-c",
                "gc.auto=0",
                "-c",
                "maintenance.auto=false",
                "commit",
                "--quiet",
                "-m",
                &message,
            ]);
            git_ok(&self.path, &commit, commit_action, HINT_COMMIT).await?;
        }
        let head = git_ok(
            &self.path,
            &args(["rev-parse", "HEAD"]),
            commit_action,
            HINT_COMMIT,
        )
        .await?;
        if head == self.base_commit {
            return Ok(Finished::NoChanges);
        }

        let target = format!("refs/heads/{}", self.branch);
        let mut push = args(["push"]);
        if attempt > 1 {
            // An earlier attempt may have pushed this branch; replace exactly what was there
            // when this attempt started (or require it absent), never something newer.
            let expected = self.remote_branch.as_deref().unwrap_or("");
            push.push(format!("--force-with-lease={target}:{expected}").into());
        }
        push.extend(args(["origin", &format!("HEAD:{target}")]));
        git_ok(
            &self.path,
            &push,
            &format!("push branch `{}`", self.branch),
            HINT_PUSH,
        )
        .await?;
        tracing::info!(commit = %head, attempt, "pushed");
        Ok(Finished::Pushed {
            branch: self.branch.clone(),
            commit: head,
        })
    }

    /// Deletes the worktree and unregisters it from its cache; returns the bytes reclaimed.
    pub async fn remove(self) -> Result<u64, GitError> {
        let action = format!("remove worktree {}", self.path.display());
        // Measured before taking the cache's lock: walking a large tree need not hold up
        // other tasks preparing worktrees of the same repository.
        let bytes = tokio::task::spawn_blocking({
            let path = self.path.clone();
            move || tree_size(&path)
        })
        .await
        .unwrap_or(0);
        let _guard = self.cache_lock.lock().await;
        let mut remove = args(["worktree", "remove", "--force"]);
        remove.push(self.path.clone().into_os_string());
        if let Err(e) = git_ok(&self.cache_dir, &remove, &action, HINT_CACHE).await {
            // git refuses some worktrees (submodules, a lock left by a killed command); the
            // directory still has to go, and prune then drops git's record of it.
            tracing::debug!(error = %e, "git worktree remove failed; deleting the directory");
            remove_tree(self.path.clone())
                .await
                .map_err(|e| io_error(&action, &self.path, e, HINT_CACHE))?;
            git_ok(
                &self.cache_dir,
                &args(["worktree", "prune"]),
                &action,
                HINT_CACHE,
            )
            .await?;
        }
        Ok(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// asking the remote

/// Fetches the remote's `base` into `refs/remotes/origin/<base>` and returns its commit. The
/// caller holds the cache's lock.
///
/// One exact refspec, so over protocol v2 the remote lists only that branch (and the tags fetch
/// follows, as it always did) instead of every branch on it: fetching `refs/heads/*` before
/// each task listed and updated every `kennel/*` branch any task had pushed, under the lock, and
/// slowed each task as they piled up. git fails the fetch when the branch is missing; only then
/// is the remote asked again whether it exists, so the usual case costs one round trip and a
/// missing base still gets a message that says what to do.
async fn fetch_base(cache_dir: &Path, url: &str, base: &str) -> Result<String, GitError> {
    let shown = redact_userinfo(url);
    let tracking = format!("{REMOTE_TRACKING_PREFIX}{base}");
    let lookup = format!("look up base branch `{base}`");
    let missing = || {
        GitError::refused(
            &lookup,
            format!("the repository {shown} has no branch `{base}`; push it or pick another base branch"),
        )
    };
    tracing::debug!(url = %shown, %base, "fetching the base branch into the repository cache");
    let action = format!("fetch branch `{base}` of {shown} into the repository cache");
    // Maintenance that fetch may trigger runs in the foreground, under the cache's lock,
    // rather than detached beside other tasks' git commands.
    let fetch = args([
        "-c",
        "gc.autoDetach=false",
        "-c",
        "maintenance.autoDetach=false",
        "fetch",
        "--quiet",
        "origin",
        &format!("+refs/heads/{base}:{tracking}"),
    ]);
    if let Err(fetch_error) = git_ok(cache_dir, &fetch, &action, HINT_REMOTE).await {
        // git words a missing branch in the user's language and may reword it; the remote's
        // list of refs is the answer that does not change.
        return match remote_head(cache_dir, &format!("refs/heads/{base}"), &lookup).await {
            Ok(None) => Err(missing()),
            // The branch is there or the remote cannot be reached: git's message says why.
            Ok(Some(_)) | Err(_) => Err(fetch_error),
        };
    }
    git_probe(
        cache_dir,
        &args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{tracking}^{{commit}}"),
        ]),
        &lookup,
        HINT_CACHE,
    )
    .await?
    // A branch that points at something other than a commit is no base to start from either.
    .ok_or_else(missing)
}

/// The remote's default branch: the branch its `HEAD` names, asked of the remote itself (the
/// cache's own `HEAD` is whatever it was at clone time).
async fn default_branch(cache_dir: &Path, url: &str) -> Result<String, GitError> {
    let shown = redact_userinfo(url);
    let action = format!("find the default branch of {shown}");
    let out = git_ok(
        cache_dir,
        &args(["ls-remote", "--symref", "origin", "HEAD"]),
        &action,
        HINT_REMOTE,
    )
    .await?;
    // `ref: refs/heads/<name>\tHEAD`, then the commit line.
    let name = out.lines().find_map(|line| {
        let (target, name) = line.strip_prefix("ref: ")?.split_once('\t')?;
        (name == "HEAD")
            .then_some(target)?
            .strip_prefix("refs/heads/")
    });
    let Some(name) = name else {
        return Err(GitError::refused(
            &action,
            format!(
                "the repository {shown} names no default branch (its HEAD points at no branch); \
                 give the branch to start from with --base"
            ),
        ));
    };
    validate_branch_name(name).map_err(|e| {
        GitError::refused(&action, format!("its default branch is not usable: {e}"))
    })?;
    tracing::debug!(url = %shown, base = %name, "base branch: the remote's default");
    Ok(name.to_string())
}

/// What the remote's `refname` (a full name, `refs/heads/…`) points at; `None` when the remote
/// has no such ref. Over protocol v2 `ls-remote` sends the name as a prefix, so the remote
/// lists only refs that start with it, however many branches it holds.
async fn remote_head(
    cache_dir: &Path,
    refname: &str,
    action: &str,
) -> Result<Option<String>, GitError> {
    let out = git_ok(
        cache_dir,
        &args(["ls-remote", "origin", refname]),
        action,
        HINT_REMOTE,
    )
    .await?;
    // The answer holds every ref that starts (v2) or ends (git's pattern rule) with the name,
    // `refs/heads/kennel/t1` brings `refs/heads/kennel/t10` too: keep the exact name only.
    Ok(out.lines().find_map(|line| {
        let (sha, name) = line.split_once('\t')?;
        (name == refname).then(|| sha.to_string())
    }))
}

// ---------------------------------------------------------------------------------------------
// running git

fn args<const N: usize>(items: [&str; N]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// Settings every command we start gets: no prompts (nobody is there to answer), no stdin,
/// no repository variables inherited from whoever started the daemon.
fn configure(cmd: &mut Command, cwd: &Path) {
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("GIT_TERMINAL_PROMPT", "0");
    for var in FOREIGN_GIT_ENV {
        cmd.env_remove(var);
    }
    // If a worktree's `.git` file went missing, git must fail rather than walk up and find
    // whatever repository happens to contain the data directory.
    if let Some(parent) = cwd.parent() {
        cmd.env("GIT_CEILING_DIRECTORIES", parent);
    }
}

async fn run_git(cwd: &Path, argv: &[OsString]) -> Result<Output, GitErrorKind> {
    let mut cmd = Command::new("git");
    // Repository URLs come from whoever submits tasks; the `ext::` transport would run any
    // command they name, so it stays off whatever the user's git config says.
    cmd.args(["-c", "protocol.ext.allow=never"]).args(argv);
    configure(&mut cmd, cwd);
    cmd.output().await.map_err(|error| GitErrorKind::Spawn {
        program: "git".to_string(),
        error,
    })
}

fn exit_kind(argv: &[OsString], out: &Output) -> GitErrorKind {
    let mut command = String::from("git");
    for a in argv {
        let _ = write!(command, " {}", a.to_string_lossy());
    }
    let stream = if out.stderr.iter().all(u8::is_ascii_whitespace) {
        &out.stdout
    } else {
        &out.stderr
    };
    GitErrorKind::Exit {
        command: redact_userinfo(&command),
        status: out.status,
        stderr: tail_lines(stream),
    }
}

/// Runs git and returns its trimmed stdout; any non-zero exit is an error.
async fn git_ok(
    cwd: &Path,
    argv: &[OsString],
    action: &str,
    hint: &'static str,
) -> Result<String, GitError> {
    let out = run_git(cwd, argv)
        .await
        .map_err(|k| GitError::new(action, k, hint))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(GitError::new(action, exit_kind(argv, &out), hint))
    }
}

/// Runs a git command whose exit code 1 is an answer, not a failure (`rev-parse --verify
/// --quiet`, `diff --quiet`): `Some(stdout)` on 0, `None` on 1, an error otherwise.
async fn git_probe(
    cwd: &Path,
    argv: &[OsString],
    action: &str,
    hint: &'static str,
) -> Result<Option<String>, GitError> {
    let out = run_git(cwd, argv)
        .await
        .map_err(|k| GitError::new(action, k, hint))?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        Some(1) => Ok(None),
        _ => Err(GitError::new(action, exit_kind(argv, &out), hint)),
    }
}

/// Reads a stream to its end, keeping only its last [`SETUP_CAPTURE_BYTES`].
async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * SETUP_CAPTURE_BYTES {
                    buf.drain(..buf.len() - SETUP_CAPTURE_BYTES);
                }
            }
        }
    }
    if buf.len() > SETUP_CAPTURE_BYTES {
        buf.drain(..buf.len() - SETUP_CAPTURE_BYTES);
    }
    buf
}

/// The last [`TAIL_LINES`] lines of a command's output, long lines cut, credentials stripped.
fn tail_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let kept: Vec<String> = lines[start..]
        .iter()
        // git pads the remote's sideband lines with spaces; they carry nothing.
        .map(|l| l.trim_end().chars().take(TAIL_LINE_CHARS).collect())
        .collect();
    if kept.is_empty() {
        "(no output)".to_string()
    } else {
        redact_userinfo(&kept.join("\n"))
    }
}

// ---------------------------------------------------------------------------------------------
// URLs and paths

/// Drops the `user:password@` part of every `scheme://` URL in `text`, so errors and logs
/// never carry credentials.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "'\"`".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(match authority.rfind('@') {
            Some(at) => &authority[at + 1..],
            None => authority,
        });
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Checks a repository URL and makes a local path absolute (git would resolve a relative one
/// against each command's working directory, and the worktree's `origin` must keep working).
fn normalize_url(url: &str) -> Result<String, String> {
    if url.is_empty() {
        return Err("the repository URL is empty".into());
    }
    if url.starts_with('-') {
        return Err(format!(
            "the repository URL `{}` starts with `-` and would be read as an option; give a URL or an absolute path",
            redact_userinfo(url)
        ));
    }
    if url.chars().any(char::is_control) {
        return Err("the repository URL contains control characters".into());
    }
    // git's own rule: no `://`, and no `:` before the first `/`, means a local path
    // (`host:path` is scp-style ssh).
    let local = !url.contains("://")
        && match url.find(':') {
            None => true,
            Some(colon) => url[..colon].contains('/'),
        };
    if !local {
        return Ok(url.to_string());
    }
    std::path::absolute(url)
        .ok()
        .and_then(|p| p.into_os_string().into_string().ok())
        .ok_or_else(|| format!("the repository path `{url}` cannot be made absolute"))
}

/// `<first 16 hex digits of sha256(url)>-<last path segment of the URL, sanitised>`: unique per
/// URL, and still recognisable to someone looking at the disk.
fn cache_dir_name(url: &str) -> String {
    let digest = Sha256::digest(url.as_bytes());
    let mut name = String::with_capacity(64);
    for b in &digest[..8] {
        let _ = write!(name, "{b:02x}");
    }
    // The tail comes from the redacted URL: a password must not end up in a directory name.
    let shown = redact_userinfo(url);
    let tail = shown
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', ':', '\\'])
        .next()
        .unwrap_or("");
    let tail = tail.strip_suffix(".git").unwrap_or(tail);
    let tail: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let tail = tail.trim_start_matches(['.', '-']);
    name.push('-');
    name.push_str(if tail.is_empty() { "repo" } else { tail });
    name
}

/// Sum of the sizes of the files under `root`, without following symbolic links. Entries that
/// vanish or cannot be read count as zero: this measures, it does not decide.
fn tree_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Measures, then deletes a directory tree off the async threads; returns the bytes it held.
async fn remove_tree(path: PathBuf) -> io::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let bytes = tree_size(&path);
        std::fs::remove_dir_all(&path)?;
        Ok(bytes)
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tempfile::TempDir;

    /// The test's own git calls: no user or system config, a fixed identity, no auto gc.
    fn git(dir: &Path, argv: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "init.defaultBranch=main",
                "-c",
                "gc.auto=0",
            ])
            .args(argv)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    struct Fixture {
        tmp: TempDir,
        remote: PathBuf,
        seed: PathBuf,
        cache: RepoCache,
    }

    impl Fixture {
        /// A bare "remote" whose `main` has one commit with a README.
        fn new() -> Self {
            let tmp = TempDir::new().unwrap();
            let remote = tmp.path().join("remote.git");
            let seed = tmp.path().join("seed");
            git(
                tmp.path(),
                &["init", "--quiet", "--bare", "-b", "main", "remote.git"],
            );
            git(tmp.path(), &["init", "--quiet", "-b", "main", "seed"]);
            std::fs::write(seed.join("README.md"), "hello\n").unwrap();
            git(&seed, &["add", "-A"]);
            git(&seed, &["commit", "--quiet", "-m", "initial"]);
            git(
                &seed,
                &[
                    "push",
                    "--quiet",
                    remote.to_str().unwrap(),
                    "HEAD:refs/heads/main",
                ],
            );
            let cache = RepoCache::new(&tmp.path().join("data"), GitSettings::default());
            Fixture {
                tmp,
                remote,
                seed,
                cache,
            }
        }

        fn spec(&self) -> RepoSpec {
            RepoSpec {
                url: self.remote.to_str().unwrap().to_string(),
                base_branch: "main".into(),
            }
        }

        fn remote_git(&self, argv: &[&str]) -> String {
            let mut full = vec!["--git-dir", self.remote.to_str().unwrap()];
            full.extend_from_slice(argv);
            git(self.tmp.path(), &full)
        }

        fn remote_ref(&self, name: &str) -> Option<String> {
            let out = std::process::Command::new("git")
                .args(["--git-dir", self.remote.to_str().unwrap()])
                .args(["rev-parse", "--verify", "--quiet", name])
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        }

        /// Commits a file to the remote's `main` through the seed clone; returns the commit.
        fn advance_main(&self, file: &str, content: &str) -> String {
            std::fs::write(self.seed.join(file), content).unwrap();
            git(&self.seed, &["add", "-A"]);
            git(&self.seed, &["commit", "--quiet", "-m", file]);
            git(
                &self.seed,
                &[
                    "push",
                    "--quiet",
                    self.remote.to_str().unwrap(),
                    "HEAD:refs/heads/main",
                ],
            );
            git(&self.seed, &["rev-parse", "HEAD"])
        }

        fn cache_dirs(&self) -> Vec<PathBuf> {
            std::fs::read_dir(self.cache.root())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        }
    }

    #[tokio::test]
    async fn prepare_then_finish_pushes_the_branch() {
        let f = Fixture::new();
        let main = f.remote_ref("refs/heads/main").unwrap();
        let wt = f.cache.prepare(&f.spec(), "t1", 1).await.unwrap();
        assert_eq!(wt.path, f.cache.worktrees_dir().join("t1-1"));
        assert!(wt.path.join("README.md").is_file());
        assert_eq!(wt.branch, "kennel/t1");
        assert_eq!(wt.base_commit, main);
        assert_eq!(
            git(&wt.path, &["symbolic-ref", "HEAD"]),
            "refs/heads/kennel/t1"
        );

        std::fs::write(wt.path.join("hello.txt"), "from the agent\n").unwrap();
        let done = wt.finish("t1", "say hello", 1).await.unwrap();
        let Finished::Pushed { branch, commit } = done else {
            panic!("expected a push, got {done:?}");
        };
        assert_eq!(branch, "kennel/t1");
        assert_eq!(f.remote_ref("refs/heads/kennel/t1").unwrap(), commit);
        assert_eq!(
            f.remote_git(&["show", "kennel/t1:hello.txt"]),
            "from the agent"
        );
        assert_eq!(
            f.remote_git(&["log", "-1", "--format=%an <%ae>|%s", "kennel/t1"]),
            "kennel <kennel@localhost>|kennel: say hello"
        );

        let cache_dir = f.cache_dirs().pop().unwrap();
        let bytes = wt.remove().await.unwrap();
        assert!(bytes > 0);
        assert!(!f.cache.worktrees_dir().join("t1-1").exists());
        let list = git(&cache_dir, &["worktree", "list"]);
        assert!(!list.contains("t1-1"), "{list}");
    }

    #[tokio::test]
    async fn commits_the_agent_made_itself_are_pushed() {
        let f = Fixture::new();
        let wt = f.cache.prepare(&f.spec(), "t2", 1).await.unwrap();
        std::fs::write(wt.path.join("a.txt"), "a\n").unwrap();
        git(&wt.path, &["add", "a.txt"]);
        git(&wt.path, &["commit", "--quiet", "-m", "agent's own commit"]);
        let own = git(&wt.path, &["rev-parse", "HEAD"]);
        let done = wt.finish("t2", "x", 1).await.unwrap();
        assert_eq!(
            done,
            Finished::Pushed {
                branch: "kennel/t2".into(),
                commit: own.clone()
            }
        );
        assert_eq!(f.remote_ref("refs/heads/kennel/t2").unwrap(), own);
    }

    #[tokio::test]
    async fn concurrent_prepares_on_one_repository_get_separate_worktrees() {
        let f = Fixture::new();
        let spec = f.spec();
        let (a, b) = tokio::join!(
            f.cache.prepare(&spec, "ta", 1),
            f.cache.prepare(&spec, "tb", 1)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.path, b.path);
        assert_eq!(f.cache_dirs().len(), 1);
        std::fs::write(a.path.join("a.txt"), "a\n").unwrap();
        std::fs::write(b.path.join("b.txt"), "b\n").unwrap();
        let (ra, rb) = tokio::join!(a.finish("ta", "a", 1), b.finish("tb", "b", 1));
        assert!(matches!(ra.unwrap(), Finished::Pushed { .. }));
        assert!(matches!(rb.unwrap(), Finished::Pushed { .. }));
        assert_eq!(f.remote_git(&["show", "kennel/ta:a.txt"]), "a");
        assert_eq!(f.remote_git(&["show", "kennel/tb:b.txt"]), "b");
    }

    #[tokio::test]
    async fn a_retry_force_pushes_over_the_earlier_attempt() {
        let f = Fixture::new();
        let first = f.cache.prepare(&f.spec(), "t3", 1).await.unwrap();
        std::fs::write(first.path.join("f.txt"), "one\n").unwrap();
        assert!(matches!(
            first.finish("t3", "x", 1).await.unwrap(),
            Finished::Pushed { .. }
        ));

        // The first attempt's worktree is still there, holding the branch.
        let second = f.cache.prepare(&f.spec(), "t3", 2).await.unwrap();
        assert_eq!(second.base_commit, f.remote_ref("refs/heads/main").unwrap());
        assert!(
            !second.path.join("f.txt").exists(),
            "the retry starts from the base"
        );
        assert!(
            first.path.join("f.txt").is_file(),
            "the older attempt is left alone"
        );
        std::fs::write(second.path.join("f.txt"), "two\n").unwrap();
        let Finished::Pushed { commit, .. } = second.finish("t3", "x", 2).await.unwrap() else {
            panic!("expected a push");
        };
        assert_eq!(f.remote_ref("refs/heads/kennel/t3").unwrap(), commit);
        assert_eq!(f.remote_git(&["show", "kennel/t3:f.txt"]), "two");
    }

    #[tokio::test]
    async fn no_changes_pushes_nothing() {
        let f = Fixture::new();
        let wt = f.cache.prepare(&f.spec(), "t4", 1).await.unwrap();
        assert_eq!(wt.finish("t4", "x", 1).await.unwrap(), Finished::NoChanges);
        assert_eq!(f.remote_ref("refs/heads/kennel/t4"), None);
    }

    #[tokio::test]
    async fn a_rejected_push_carries_gits_message() {
        let f = Fixture::new();
        let hook = f.remote.join("hooks/pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\necho 'kennel-test: pushes are closed' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let wt = f.cache.prepare(&f.spec(), "t5", 1).await.unwrap();
        std::fs::write(wt.path.join("x.txt"), "x\n").unwrap();
        let err = wt.finish("t5", "x", 1).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kennel-test: pushes are closed"), "{msg}");
        assert!(msg.starts_with("push branch `kennel/t5`"), "{msg}");
        assert!(
            msg.contains("git push origin HEAD:refs/heads/kennel/t5"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), Some(1));
    }

    #[tokio::test]
    async fn a_vanished_remote_fails_the_push_with_gits_message() {
        let f = Fixture::new();
        let wt = f.cache.prepare(&f.spec(), "t6", 1).await.unwrap();
        std::fs::remove_dir_all(&f.remote).unwrap();
        std::fs::write(wt.path.join("x.txt"), "x\n").unwrap();
        let err = wt.finish("t6", "x", 1).await.unwrap_err();
        assert!(err.stderr().unwrap().contains("fatal"), "{err}");
    }

    #[tokio::test]
    async fn bad_ids_branches_and_urls_are_refused_before_git_runs() {
        let f = Fixture::new();
        let bad_base = RepoSpec {
            base_branch: "../main".into(),
            ..f.spec()
        };
        let spaced_base = RepoSpec {
            base_branch: "a b".into(),
            ..f.spec()
        };
        let dash_url = RepoSpec {
            url: "--upload-pack=touch /tmp/pwned".into(),
            base_branch: "main".into(),
        };
        for (spec, task, attempt) in [
            (f.spec(), "../x", 1),
            (f.spec(), "-rf", 1),
            (f.spec(), "ok", 0),
            (bad_base, "ok", 1),
            (spaced_base, "ok", 1),
            (dash_url, "ok", 1),
        ] {
            let err = f.cache.prepare(&spec, task, attempt).await.unwrap_err();
            assert!(err.is_refused(), "{err}");
        }
        // Nothing was cloned and no worktree was made.
        assert!(!f.cache.root().exists());
        assert!(!f.cache.worktrees_dir().exists());
    }

    #[tokio::test]
    async fn a_missing_base_branch_is_reported() {
        let f = Fixture::new();
        let spec = RepoSpec {
            base_branch: "nope".into(),
            ..f.spec()
        };
        let err = f.cache.prepare(&spec, "t7", 1).await.unwrap_err();
        assert!(err.to_string().contains("has no branch `nope`"), "{err}");
        assert!(err.is_refused(), "{err}");

        // Once the cache exists the base is still looked up on the remote, not in the cache.
        f.cache.prepare(&f.spec(), "t7b", 1).await.unwrap();
        let err = f.cache.prepare(&spec, "t7c", 1).await.unwrap_err();
        assert!(err.to_string().contains("has no branch `nope`"), "{err}");

        // A remote that cannot be reached is not a missing branch: git's own message stays.
        std::fs::remove_dir_all(&f.remote).unwrap();
        let err = f.cache.prepare(&f.spec(), "t7d", 1).await.unwrap_err();
        assert!(!err.is_refused(), "{err}");
        assert!(
            err.to_string().starts_with("fetch branch `main` of /"),
            "{err}"
        );
        assert!(err.stderr().is_some(), "{err}");
    }

    #[tokio::test]
    async fn an_empty_base_starts_from_the_remotes_default_branch_as_it_is_now() {
        let f = Fixture::new();
        let default = RepoSpec {
            base_branch: String::new(),
            ..f.spec()
        };
        let wt = f.cache.prepare(&default, "d1", 1).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(wt.path.join("README.md")).unwrap(),
            "hello\n"
        );

        // The remote's default branch becomes `trunk`, after the cache was cloned: the next
        // task starts from `trunk`, not from the branch the cache was cloned with.
        git(&f.seed, &["checkout", "--quiet", "-b", "trunk"]);
        std::fs::write(f.seed.join("trunk.txt"), "trunk\n").unwrap();
        git(&f.seed, &["add", "-A"]);
        git(&f.seed, &["commit", "--quiet", "-m", "trunk"]);
        let remote = f.remote.to_str().unwrap();
        git(
            &f.seed,
            &["push", "--quiet", remote, "HEAD:refs/heads/trunk"],
        );
        git(&f.remote, &["symbolic-ref", "HEAD", "refs/heads/trunk"]);
        let wt = f.cache.prepare(&default, "d2", 1).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(wt.path.join("trunk.txt")).unwrap(),
            "trunk\n"
        );

        // A remote whose HEAD names no branch that exists is told apart from a missing base.
        git(&f.remote, &["symbolic-ref", "HEAD", "refs/heads/gone"]);
        let err = f.cache.prepare(&default, "d3", 1).await.unwrap_err();
        assert!(err.is_refused(), "{err}");
        assert!(err.to_string().contains("names no default branch"), "{err}");
        assert!(err.to_string().contains("--base"), "{err}");
    }

    #[tokio::test]
    async fn preparing_a_task_fetches_only_its_base_and_a_retry_still_leases_its_branch() {
        let f = Fixture::new();
        f.cache.prepare(&f.spec(), "warm", 1).await.unwrap();
        let cache_dir = f.cache_dirs().pop().unwrap();

        // Fifty branches of other work, all at a commit the cache has never seen.
        git(&f.seed, &["checkout", "--quiet", "-b", "side"]);
        std::fs::write(f.seed.join("side.txt"), "side\n").unwrap();
        git(&f.seed, &["add", "-A"]);
        git(&f.seed, &["commit", "--quiet", "-m", "side"]);
        let side = git(&f.seed, &["rev-parse", "HEAD"]);
        git(&f.seed, &["checkout", "--quiet", "main"]);
        let others: Vec<String> = (0..50)
            .map(|i| format!("side:refs/heads/other/b{i}"))
            .collect();
        let mut push = vec!["push", "--quiet", f.remote.to_str().unwrap()];
        push.extend(others.iter().map(String::as_str));
        git(&f.seed, &push);
        // An earlier attempt of task `r`, run by another daemon with its own cache, pushed.
        let elsewhere = RepoCache::new(&f.tmp.path().join("data2"), GitSettings::default());
        let first = elsewhere.prepare(&f.spec(), "r", 1).await.unwrap();
        std::fs::write(first.path.join("r.txt"), "one\n").unwrap();
        let Finished::Pushed { commit: pushed, .. } = first.finish("r", "x", 1).await.unwrap()
        else {
            panic!("expected a push");
        };
        // A branch whose name starts with another task's branch name.
        git(
            &f.seed,
            &[
                "push",
                "--quiet",
                f.remote.to_str().unwrap(),
                "side:refs/heads/kennel/q0",
            ],
        );
        let newer = f.advance_main("newer.txt", "newer\n");

        let wt = f.cache.prepare(&f.spec(), "q", 1).await.unwrap();
        assert_eq!(wt.base_commit, newer, "the base is fetched");
        let retry = f.cache.prepare(&f.spec(), "r", 2).await.unwrap();
        assert_eq!(retry.remote_branch.as_deref(), Some(pushed.as_str()));
        let prefix_only = f.cache.prepare(&f.spec(), "q", 2).await.unwrap();
        assert_eq!(prefix_only.remote_branch, None, "kennel/q0 is not kennel/q");

        let tracking = git(
            &cache_dir,
            &["for-each-ref", "--format=%(refname)", "refs/remotes/"],
        );
        assert_eq!(tracking, "refs/remotes/origin/main");
        let heads = git(
            &cache_dir,
            &["for-each-ref", "--format=%(refname)", "refs/heads/other/"],
        );
        assert_eq!(heads, "", "other branches reached the cache");
        let side_there = std::process::Command::new("git")
            .args([
                "--git-dir",
                cache_dir.to_str().unwrap(),
                "cat-file",
                "-e",
                &side,
            ])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .status()
            .unwrap()
            .success();
        assert!(!side_there, "other branches' commits were fetched");

        // The retry replaces exactly what the earlier attempt pushed...
        std::fs::write(retry.path.join("r.txt"), "two\n").unwrap();
        let Finished::Pushed { commit: second, .. } = retry.finish("r", "x", 2).await.unwrap()
        else {
            panic!("expected a push");
        };
        assert_eq!(f.remote_ref("refs/heads/kennel/r").unwrap(), second);
        // ...and a retry prepared before something newer landed leaves the newer one alone.
        let third = f.cache.prepare(&f.spec(), "r", 3).await.unwrap();
        git(
            &f.seed,
            &[
                "push",
                "--quiet",
                "--force",
                f.remote.to_str().unwrap(),
                "side:refs/heads/kennel/r",
            ],
        );
        std::fs::write(third.path.join("r.txt"), "three\n").unwrap();
        let err = third.finish("r", "x", 3).await.unwrap_err();
        assert!(err.stderr().is_some(), "{err}");
        assert_eq!(f.remote_ref("refs/heads/kennel/r").unwrap(), side);
        // A retry whose branch was never pushed may create it.
        std::fs::write(prefix_only.path.join("q.txt"), "q\n").unwrap();
        assert!(matches!(
            prefix_only.finish("q", "x", 2).await.unwrap(),
            Finished::Pushed { .. }
        ));
    }

    #[tokio::test]
    async fn a_second_prepare_fetches_instead_of_cloning_again() {
        let f = Fixture::new();
        f.cache.prepare(&f.spec(), "t8", 1).await.unwrap();
        let cache_dir = f.cache_dirs().pop().unwrap();
        std::fs::write(cache_dir.join("kennel-test-marker"), "").unwrap();

        let newer = f.advance_main("new.txt", "new\n");
        let wt = f.cache.prepare(&f.spec(), "t9", 1).await.unwrap();
        assert_eq!(wt.base_commit, newer);
        assert!(wt.path.join("new.txt").is_file());
        assert!(cache_dir.join("kennel-test-marker").exists(), "re-cloned");
        assert_eq!(f.cache_dirs(), vec![cache_dir]);
    }

    #[tokio::test]
    async fn file_urls_work() {
        let f = Fixture::new();
        let spec = RepoSpec {
            url: format!("file://{}", f.remote.display()),
            base_branch: "main".into(),
        };
        let wt = f.cache.prepare(&spec, "t10", 1).await.unwrap();
        std::fs::write(wt.path.join("y.txt"), "y\n").unwrap();
        assert!(matches!(
            wt.finish("t10", "y", 1).await.unwrap(),
            Finished::Pushed { .. }
        ));
        assert_eq!(f.remote_git(&["show", "kennel/t10:y.txt"]), "y");
    }

    #[tokio::test]
    async fn sweep_removes_old_worktrees_and_keeps_listed_ones() {
        let f = Fixture::new();
        let a = f.cache.prepare(&f.spec(), "sa", 1).await.unwrap();
        let b = f.cache.prepare(&f.spec(), "sb", 1).await.unwrap();
        let hour = Duration::from_secs(3600);

        let fresh = f.cache.sweep(hour, &[]).await.unwrap();
        assert_eq!(fresh, SweepReport::default(), "fresh worktrees stay");

        let later = SystemTime::now() + 2 * hour;
        let report = f
            .cache
            .sweep_as_of(later, hour, std::slice::from_ref(&b.path))
            .await
            .unwrap();
        assert_eq!(report.removed, 1);
        assert!(report.bytes > 0);
        assert!(!a.path.exists());
        assert!(b.path.exists());
        let list = git(&f.cache_dirs()[0], &["worktree", "list"]);
        assert!(!list.contains("sa-1") && list.contains("sb-1"), "{list}");

        // A retry of the swept task can take its branch again.
        let again = f.cache.prepare(&f.spec(), "sa", 2).await.unwrap();
        assert_eq!(again.branch, "kennel/sa");
    }

    #[tokio::test]
    async fn setup_copies_files_and_runs_the_command() {
        let f = Fixture::new();
        let wt = f.cache.prepare(&f.spec(), "t11", 1).await.unwrap();
        let src = f.tmp.path().join("local.env");
        std::fs::write(&src, "KEY=1\n").unwrap();
        let cmd = vec![
            "sh".to_string(),
            "-c".to_string(),
            "cat config/local.env > setup-ran".to_string(),
        ];
        wt.setup(
            &[(src.clone(), PathBuf::from("config/local.env"))],
            Some(&cmd),
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(wt.path.join("setup-ran")).unwrap(),
            "KEY=1\n"
        );

        let outside = f.tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, wt.path.join("link")).unwrap();
        for dest in ["../x", "/etc/x", ".git/config", "link/x", ""] {
            let err = wt
                .setup(&[(src.clone(), PathBuf::from(dest))], None)
                .await
                .unwrap_err();
            assert!(err.is_refused(), "{dest}: {err}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let err = wt
            .setup(&[(PathBuf::from("relative"), PathBuf::from("x"))], None)
            .await
            .unwrap_err();
        assert!(err.is_refused(), "{err}");

        let failing = vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo boom >&2; exit 3".to_string(),
        ];
        let err = wt.setup(&[], Some(&failing)).await.unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[tokio::test]
    async fn a_ten_thousand_file_repository_gets_a_worktree() {
        let f = Fixture::new();
        // fast-import writes one pack straight into the remote: the test then spends its time
        // in prepare, not in creating 10,000 files twice to build the fixture.
        let mut stream = String::from(
            "commit refs/heads/main\ncommitter Test <test@example.com> 0 +0000\ndata 3\nbig\nfrom refs/heads/main^0\n",
        );
        for d in 0..100 {
            for i in 0..100 {
                let content = format!("{d} {i}\n");
                let _ = write!(
                    stream,
                    "M 100644 inline d{d:03}/f{i:03}.txt\ndata {}\n{content}\n",
                    content.len()
                );
            }
        }
        let mut import = std::process::Command::new("git")
            .args([
                "--git-dir",
                f.remote.to_str().unwrap(),
                "fast-import",
                "--quiet",
            ])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            import
                .stdin
                .take()
                .unwrap()
                .write_all(stream.as_bytes())
                .unwrap();
        }
        assert!(import.wait().unwrap().success());
        let head = f.remote_ref("refs/heads/main").unwrap();

        let wt = f.cache.prepare(&f.spec(), "big", 1).await.unwrap();
        assert_eq!(wt.base_commit, head);
        assert_eq!(
            std::fs::read_to_string(wt.path.join("d099/f099.txt")).unwrap(),
            "99 99\n"
        );
        assert_eq!(git(&wt.path, &["ls-files"]).lines().count(), 10_001);
        assert_eq!(git(&wt.path, &["status", "--porcelain"]), "");
        assert_eq!(wt.finish("big", "x", 1).await.unwrap(), Finished::NoChanges);
    }

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(
            redact_userinfo("fatal: unable to access 'https://bob:s3cret@example.com/r.git/': 403"),
            "fatal: unable to access 'https://example.com/r.git/': 403"
        );
        assert_eq!(
            redact_userinfo("git clone -- https://tok@h/x /y"),
            "git clone -- https://h/x /y"
        );
        assert_eq!(redact_userinfo("/plain/path"), "/plain/path");
        let name = cache_dir_name("https://bob:s3cret@example.com/org/My Repo.git");
        assert!(!name.contains("s3cret") && !name.contains("bob"), "{name}");
        assert!(name.ends_with("-My_Repo"), "{name}");
        assert_eq!(
            name,
            cache_dir_name("https://bob:s3cret@example.com/org/My Repo.git")
        );
        assert_ne!(name, cache_dir_name("https://example.com/org/My Repo.git"));
        assert!(cache_dir_name("git@host:").ends_with("-repo"));
    }

    #[test]
    fn local_paths_become_absolute_and_remote_urls_stay() {
        assert!(Path::new(&normalize_url("rel/repo").unwrap()).is_absolute());
        assert_eq!(
            normalize_url("git@host:o/r.git").unwrap(),
            "git@host:o/r.git"
        );
        assert_eq!(
            normalize_url("https://h/o/r.git").unwrap(),
            "https://h/o/r.git"
        );
        assert!(normalize_url("-x").is_err());
        assert!(normalize_url("a\nb").is_err());
    }

    #[test]
    fn commit_messages_fill_the_template() {
        let s = GitSettings {
            commit_message: "{task_id}: {task_name}".into(),
            ..GitSettings::default()
        };
        assert_eq!(s.render_message("t1", "fix {task_id}"), "t1: fix {task_id}");
        let blank = GitSettings {
            commit_message: " ".into(),
            ..GitSettings::default()
        };
        assert_eq!(blank.render_message("t1", "x"), "kennel: t1");
    }
}
