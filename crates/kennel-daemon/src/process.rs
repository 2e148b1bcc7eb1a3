//! One running agent process: spawning it in its own process group, streaming its stdout and
//! stderr line by line, pausing, resuming and interrupting the whole group, and reaping it so
//! that nothing it started outlives it.
//!
//! The supervision model follows nextest: the agent leads a fresh process group, so a signal
//! to the group reaches every tool it started (shells, test runners, language servers);
//! cancellation escalates SIGINT → SIGTERM → SIGKILL with a grace period between steps; output
//! already written is drained before the process is reported finished. The agent also gets
//! `PR_SET_PDEATHSIG = SIGKILL`, so a daemon killed with `kill -9` does not leave it running.
//!
//! This module knows nothing about tasks, agents' output formats or the wire protocol: it
//! runs an argument vector (never a shell string) and hands back [`Line`]s.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use kennel_proto::link::OutputStream;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Default cap on one emitted line, in bytes (16 KiB); longer lines arrive in chunks.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// How long [`AgentProcess::wait`] lets the readers drain after the agent exits, before it
/// kills what is left of the process group (background grandchildren keep the pipes open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long the readers get to see end-of-file once the whole group has been killed. The
/// writers are gone by then, so this only covers scheduling delays.
const DRAIN_AFTER_KILL: Duration = Duration::from_millis(500);

/// Size of one read from a pipe, in bytes. Bounds the memory a reader holds besides the line.
const READ_CHUNK: usize = 8 * 1024;

/// One line (or one chunk of a long line) of the agent's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// `Stdout` or `Stderr`.
    pub stream: OutputStream,
    /// The text without its line ending; invalid UTF-8 is replaced with U+FFFD.
    pub text: String,
    /// The line continues in the next `Line` of the same stream (it was longer than the line
    /// cap), or the stream ended before a newline.
    pub partial: bool,
}

/// What to run and where.
#[derive(Debug, Clone, Copy)]
pub struct SpawnSpec<'a> {
    /// Program and arguments; `argv[0]` is looked up on `PATH` unless it contains a `/`.
    pub argv: &'a [String],
    /// Working directory (the task's worktree).
    pub cwd: &'a Path,
    /// Variables added to (or overriding) the daemon's own environment.
    pub env: &'a BTreeMap<String, String>,
    /// Give the agent a stdin pipe (for agents that take messages while running); otherwise
    /// stdin is `/dev/null`, so an agent that asks a question gets end-of-file, not a hang.
    pub stdin: bool,
}

/// Why an operation on an agent process failed. Messages fit "failed to {error}".
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("start the agent: the command is empty (it needs at least a program name)")]
    EmptyCommand,
    #[error(
        "start `{binary}`: it is not on PATH (install it, or give its full path in the agent command)"
    )]
    NotOnPath { binary: String },
    #[error("start `{binary}`: the file does not exist (or its interpreter does not)")]
    NoSuchFile { binary: String },
    #[error("start `{binary}`: working directory {} does not exist", cwd.display())]
    NoWorkingDirectory { binary: String, cwd: PathBuf },
    #[error("start `{binary}`")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("send {signal} to agent process group {pgid}")]
    Signal {
        signal: Signal,
        pgid: u32,
        #[source]
        source: Errno,
    },
    #[error("write to the agent's stdin: it has none (not requested at spawn, or closed)")]
    NoStdin,
    #[error("write to the agent's stdin")]
    Stdin(#[source] io::Error),
    #[error("wait for agent process {pid}")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// A spawned agent and the two tasks streaming its output.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    /// Pid of the agent, which is also the id of its process group.
    pid: u32,
    stdin: Option<ChildStdin>,
    readers: Vec<JoinHandle<()>>,
    /// Set once the agent has been reaped and its group cleaned up, so `Drop` does not signal
    /// a process group id that may since have been reused.
    finished: Option<ExitStatus>,
}

impl AgentProcess {
    /// Spawns `argv[0]` with its arguments (no shell) in its own process group, with stdout
    /// and stderr piped into two reader tasks that send [`Line`]s to `lines`.
    ///
    /// Lines are split on `\n` (a trailing `\r` is dropped) and decoded lossily. A line longer
    /// than `max_line` bytes (at least 4, so any UTF-8 character fits) arrives in chunks of at
    /// most `max_line` bytes, cut on character boundaries, all but the last marked `partial`;
    /// a last line without a newline arrives with `partial: true`. A reader holds at most one
    /// chunk, so a huge line never sits in memory whole. When `lines` is full the readers stop
    /// reading, which in turn blocks the agent's writes: backpressure instead of buffering.
    ///
    /// Must be called from a runtime worker thread, not a blocking-pool thread: the kernel
    /// sends the parent-death signal when the *thread* that forked exits, and blocking-pool
    /// threads exit when idle.
    pub fn spawn(
        spec: &SpawnSpec<'_>,
        max_line: usize,
        lines: mpsc::Sender<Line>,
    ) -> Result<AgentProcess, ProcessError> {
        let (program, args) = spec.argv.split_first().ok_or(ProcessError::EmptyCommand)?;
        if !spec.cwd.is_dir() {
            return Err(ProcessError::NoWorkingDirectory {
                binary: program.clone(),
                cwd: spec.cwd.to_path_buf(),
            });
        }

        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(spec.cwd)
            .envs(spec.env)
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);

        let mut child = cmd.spawn().map_err(|source| spawn_error(program, source))?;
        let Some(pid) = child.id() else {
            // Not reachable: a freshly spawned child has not been reaped yet.
            return Err(ProcessError::Spawn {
                binary: program.clone(),
                source: io::Error::other("the process exited before its pid could be read"),
            });
        };

        let max_line = max_line.max(4);
        let mut readers = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(
                stdout,
                OutputStream::Stdout,
                max_line,
                lines.clone(),
            )));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_lines(
                stderr,
                OutputStream::Stderr,
                max_line,
                lines,
            )));
        }
        let stdin = child.stdin.take();
        tracing::debug!(pid, program = %program, "agent process started");

        Ok(AgentProcess {
            child,
            pid,
            stdin,
            readers,
            finished: None,
        })
    }

    /// The agent's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops the whole process group (SIGSTOP), so tools the agent started stop too.
    pub fn pause(&self) -> Result<(), ProcessError> {
        self.signal_group(Signal::SIGSTOP)
    }

    /// Continues a paused process group (SIGCONT).
    pub fn resume(&self) -> Result<(), ProcessError> {
        self.signal_group(Signal::SIGCONT)
    }

    /// Writes `text` and a newline to the agent's stdin and flushes it.
    pub async fn write_stdin(&mut self, text: &str) -> Result<(), ProcessError> {
        let stdin = self.stdin.as_mut().ok_or(ProcessError::NoStdin)?;
        let mut data = Vec::with_capacity(text.len() + 1);
        data.extend_from_slice(text.as_bytes());
        data.push(b'\n');
        // One write for text and newline, so a concurrent reader never sees half a message.
        stdin.write_all(&data).await.map_err(ProcessError::Stdin)?;
        stdin.flush().await.map_err(ProcessError::Stdin)
    }

    /// Closes the agent's stdin, so it reads end-of-file.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Stops the agent: SIGCONT (a stopped group cannot act on the signals), then SIGINT to the
    /// group, up to `grace` for the agent to exit, SIGTERM, another `grace`, then SIGKILL.
    /// Whatever is left of the group once the agent has exited is killed, and the output it
    /// wrote is drained to `lines`. Returns the agent's exit status.
    pub async fn interrupt(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.finished {
            return Ok(status);
        }
        self.signal_group_quietly(Signal::SIGCONT);
        let mut exited = None;
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            self.signal_group_quietly(signal);
            if let Ok(waited) = tokio::time::timeout(grace, self.child.wait()).await {
                tracing::debug!(pid = self.pid, %signal, "agent exited after signal");
                exited = Some(self.wait_result(waited)?);
                break;
            }
        }
        let status = match exited {
            Some(status) => status,
            None => {
                tracing::debug!(
                    pid = self.pid,
                    "agent ignored SIGINT and SIGTERM; killing it"
                );
                self.signal_group_quietly(Signal::SIGKILL);
                let waited = self.child.wait().await;
                self.wait_result(waited)?
            }
        };
        // The user asked for it to stop, so leftovers get no extra grace. Killing them loses no
        // output: what they wrote stays in the pipe until the readers drain it.
        self.signal_group_quietly(Signal::SIGKILL);
        self.drain(DRAIN_AFTER_KILL).await;
        self.finished = Some(status);
        Ok(status)
    }

    /// Waits for the agent to exit, then up to ~2 s for the readers to drain its output, then
    /// kills whatever is left in its process group (background grandchildren), so nothing is
    /// orphaned. Returns the agent's exit status.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.finished {
            return Ok(status);
        }
        let waited = self.child.wait().await;
        let status = self.wait_result(waited)?;
        self.stdin = None;
        let drained = tokio::time::timeout(DRAIN_GRACE, join_all(&mut self.readers))
            .await
            .is_ok();
        if !drained {
            tracing::debug!(
                pid = self.pid,
                "agent exited but its output pipes are still open; killing its process group"
            );
        }
        // Even when the pipes closed, a grandchild may have detached them and kept running.
        self.signal_group_quietly(Signal::SIGKILL);
        self.drain(DRAIN_AFTER_KILL).await;
        self.finished = Some(status);
        Ok(status)
    }

    fn wait_result(&self, waited: io::Result<ExitStatus>) -> Result<ExitStatus, ProcessError> {
        waited.map_err(|source| ProcessError::Wait {
            pid: self.pid,
            source,
        })
    }

    /// Lets the readers reach end-of-file within `limit`, then stops any that have not, so a
    /// reader never outlives the process it was reading.
    async fn drain(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, join_all(&mut self.readers)).await;
        for reader in self.readers.drain(..) {
            reader.abort();
        }
    }

    fn signal_group(&self, signal: Signal) -> Result<(), ProcessError> {
        if self.finished.is_some() {
            // The group id may belong to someone else by now.
            return Err(ProcessError::Signal {
                signal,
                pgid: self.pid,
                source: Errno::ESRCH,
            });
        }
        killpg(pgid(self.pid), signal).map_err(|source| ProcessError::Signal {
            signal,
            pgid: self.pid,
            source,
        })
    }

    /// Signals the group when the group may already be gone (that is the point of the call).
    fn signal_group_quietly(&self, signal: Signal) {
        match killpg(pgid(self.pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => {
                tracing::warn!(pid = self.pid, %signal, %err, "failed to signal agent process group")
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // `kill_on_drop` only reaches the leader; an unfinished agent's tools must die too.
        if self.finished.is_none() {
            self.signal_group_quietly(Signal::SIGKILL);
        }
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// The exit code to report: the code, or 128 + signal for a death by signal (as shells do).
pub fn exit_code(status: &ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// Finds `program` the way `execvp` would: as given when it contains a `/`, else in the
/// directories of `path` (the `PATH` value). Only executable regular files count.
pub fn find_program(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return is_executable(&candidate).then_some(candidate);
    }
    std::env::split_paths(path?)
        // An empty PATH entry means the current directory, which an agent command must not
        // silently depend on.
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn spawn_error(program: &str, source: io::Error) -> ProcessError {
    if source.kind() == io::ErrorKind::NotFound {
        if program.contains('/') {
            ProcessError::NoSuchFile {
                binary: program.to_owned(),
            }
        } else {
            ProcessError::NotOnPath {
                binary: program.to_owned(),
            }
        }
    } else {
        ProcessError::Spawn {
            binary: program.to_owned(),
            source,
        }
    }
}

fn pgid(pid: u32) -> Pid {
    // Pids fit in an i32 (the kernel's pid_max is at most 2^22); a value that does not is
    // mapped to one no process has, so a signal fails with ESRCH instead of hitting init.
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Makes the kernel SIGKILL the agent when the daemon dies, so an agent never runs on
/// unsupervised (its worktree, lease and output would all be gone).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe operations are allowed. It calls prctl(2) and getppid(2), both plain
    // system calls, and builds an `io::Error` from a raw errno, which does not allocate. It
    // touches no locks, no allocator and no state shared with other threads of the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // If the daemon died before prctl took effect, the signal will never come: the
            // child has already been re-parented, so give up rather than run unsupervised.
            if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(Errno::ESRCH as i32));
            }
            Ok(())
        });
    }
}

async fn join_all(readers: &mut [JoinHandle<()>]) {
    for reader in readers.iter_mut() {
        if !reader.is_finished() {
            let _ = reader.await;
        }
    }
}

/// Reads one pipe to its end, sending lines as they complete. Keeps reading (and discarding)
/// after the receiver is gone, so the agent never dies of a broken pipe because nobody listens.
async fn read_lines<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: OutputStream,
    max_line: usize,
    lines: mpsc::Sender<Line>,
) {
    let mut splitter = LineSplitter::new(stream, max_line);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    let mut listening = true;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::warn!(stream = stream.as_str(), %err, "failed to read agent output");
                break;
            }
        };
        splitter.feed(&buf[..n], &mut out);
        for line in out.drain(..) {
            if listening && lines.send(line).await.is_err() {
                listening = false;
            }
        }
    }
    if let Some(line) = splitter.finish() {
        if listening {
            let _ = lines.send(line).await;
        }
    }
}

/// Cuts a byte stream into [`Line`]s, holding at most `max_line` bytes of an unfinished line
/// (plus one read).
#[derive(Debug)]
struct LineSplitter {
    stream: OutputStream,
    max_line: usize,
    pending: Vec<u8>,
}

impl LineSplitter {
    fn new(stream: OutputStream, max_line: usize) -> Self {
        LineSplitter {
            stream,
            max_line,
            pending: Vec::new(),
        }
    }

    fn feed(&mut self, mut data: &[u8], out: &mut Vec<Line>) {
        while let Some(newline) = data.iter().position(|&b| b == b'\n') {
            self.append(&data[..newline], out);
            let mut line = std::mem::take(&mut self.pending);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push(self.line(&line, false));
            data = &data[newline + 1..];
        }
        self.append(data, out);
    }

    fn finish(&mut self) -> Option<Line> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.pending);
        Some(self.line(&rest, true))
    }

    /// Adds bytes of the current line, emitting chunks while more than `max_line` are held.
    fn append(&mut self, bytes: &[u8], out: &mut Vec<Line>) {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() > self.max_line {
            let cut = chunk_end(&self.pending[..self.max_line]);
            let chunk: Vec<u8> = self.pending.drain(..cut).collect();
            out.push(self.line(&chunk, true));
        }
    }

    fn line(&self, bytes: &[u8], partial: bool) -> Line {
        Line {
            stream: self.stream,
            text: String::from_utf8_lossy(bytes).into_owned(),
            partial,
        }
    }
}

/// Where to end a chunk taken from the start of `window`: before a UTF-8 character cut in
/// half (so it decodes whole in the next chunk) and before a trailing `\r` (which may be half
/// of a `\r\n` to strip). Never 0, so every chunk makes progress.
fn chunk_end(window: &[u8]) -> usize {
    let mut end = window.len();
    for back in 1..=3.min(end) {
        let byte = window[end - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back for the lead byte
        }
        let width = match byte {
            b if b & 0b1110_0000 == 0b1100_0000 => 2,
            b if b & 0b1111_0000 == 0b1110_0000 => 3,
            b if b & 0b1111_1000 == 0b1111_0000 => 4,
            _ => 1,
        };
        if width > back {
            end -= back;
        }
        break;
    }
    if end > 0 && window[end - 1] == b'\r' {
        end -= 1;
    }
    if end == 0 {
        window.len()
    } else {
        end
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    fn spawn_with(
        argv: &[String],
        stdin: bool,
        max_line: usize,
    ) -> Result<(AgentProcess, mpsc::Receiver<Line>), ProcessError> {
        let (tx, rx) = mpsc::channel(64);
        let env = BTreeMap::new();
        let cwd = std::env::temp_dir();
        let spec = SpawnSpec {
            argv,
            cwd: &cwd,
            env: &env,
            stdin,
        };
        AgentProcess::spawn(&spec, max_line, tx).map(|p| (p, rx))
    }

    fn spawn_sh(script: &str) -> (AgentProcess, mpsc::Receiver<Line>) {
        spawn_with(&sh(script), false, DEFAULT_MAX_LINE).unwrap()
    }

    async fn next_line(rx: &mut mpsc::Receiver<Line>) -> Line {
        timeout(DEADLINE, rx.recv())
            .await
            .expect("no line before the deadline")
            .expect("output channel closed")
    }

    /// Collects everything until both readers are gone (the channel closes).
    async fn collect(mut rx: mpsc::Receiver<Line>) -> Vec<Line> {
        let mut lines = Vec::new();
        while let Some(line) = timeout(DEADLINE, rx.recv())
            .await
            .expect("channel stayed open")
        {
            lines.push(line);
        }
        lines
    }

    fn texts(lines: &[Line], stream: OutputStream) -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.clone())
            .collect()
    }

    /// Whether a process is gone. A zombie counts as gone: it runs nothing, and whether it is
    /// reaped depends on the container's init, not on us.
    fn is_gone(pid: i32) -> bool {
        if nix::sys::signal::kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(true)
    }

    async fn assert_gone(pid: i32) {
        let deadline = Instant::now() + DEADLINE;
        while !is_gone(pid) {
            assert!(Instant::now() < deadline, "process {pid} is still alive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn splitter_strips_crlf_and_marks_unterminated_last_line() {
        let mut s = LineSplitter::new(OutputStream::Stdout, 16);
        let mut out = Vec::new();
        s.feed(b"one\r\ntw", &mut out);
        s.feed(b"o\n\nthree", &mut out);
        let mut got: Vec<(String, bool)> = out.into_iter().map(|l| (l.text, l.partial)).collect();
        got.extend(s.finish().map(|l| (l.text, l.partial)));
        assert_eq!(
            got,
            vec![
                ("one".into(), false),
                ("two".into(), false),
                ("".into(), false),
                ("three".into(), true)
            ]
        );
    }

    #[test]
    fn splitter_cuts_long_lines_on_character_boundaries() {
        // "é" is two bytes and "😀" four; a cap of 5 forces cuts inside characters.
        let text = "aé😀bé😀😀c".repeat(7);
        let mut s = LineSplitter::new(OutputStream::Stderr, 5);
        let mut out = Vec::new();
        for byte in format!("{text}\r\n").as_bytes() {
            s.feed(std::slice::from_ref(byte), &mut out);
        }
        assert!(s.finish().is_none());
        assert!(out.len() > 1);
        let (last, chunks) = out.split_last().unwrap();
        assert!(!last.partial);
        assert!(chunks.iter().all(|l| l.partial && l.text.len() <= 5));
        let joined: String = out.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(joined, text);
    }

    #[test]
    fn splitter_keeps_a_line_of_exactly_max_line_whole() {
        let mut s = LineSplitter::new(OutputStream::Stdout, 4);
        let mut out = Vec::new();
        s.feed(b"abcd\n", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].text.as_str(), out[0].partial), ("abcd", false));
    }

    #[test]
    fn exit_code_reports_signals_like_a_shell() {
        assert_eq!(exit_code(&ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(&ExitStatus::from_raw(9)), 137);
    }

    #[tokio::test]
    async fn streams_stdout_and_stderr_in_order() {
        let (mut p, rx) =
            spawn_sh("for i in 1 2 3; do echo out$i; echo err$i >&2; done; printf 'tail'");
        let status = p.wait().await.unwrap();
        assert!(status.success());
        let lines = collect(rx).await;
        assert_eq!(
            texts(&lines, OutputStream::Stdout),
            ["out1", "out2", "out3", "tail"]
        );
        assert_eq!(
            texts(&lines, OutputStream::Stderr),
            ["err1", "err2", "err3"]
        );
        let tail = lines.iter().find(|l| l.text == "tail").unwrap();
        assert!(tail.partial, "a last line without newline is partial");
        assert!(lines
            .iter()
            .filter(|l| l.text != "tail")
            .all(|l| !l.partial));
    }

    #[tokio::test]
    async fn invalid_utf8_arrives_lossily() {
        let (mut p, rx) = spawn_sh(r"printf 'caf\351\n'");
        p.wait().await.unwrap();
        let lines = collect(rx).await;
        assert_eq!(texts(&lines, OutputStream::Stdout), ["caf\u{FFFD}"]);
    }

    #[tokio::test]
    async fn long_line_arrives_in_partial_chunks() {
        let (mut p, rx) = spawn_sh("head -c 100000 /dev/zero | tr '\\0' x; echo");
        assert!(p.wait().await.unwrap().success());
        let lines = collect(rx).await;
        assert!(lines.len() >= 7, "expected chunks, got {}", lines.len());
        let (last, chunks) = lines.split_last().unwrap();
        assert!(!last.partial);
        assert!(chunks
            .iter()
            .all(|l| l.partial && l.text.len() <= DEFAULT_MAX_LINE));
        let joined: String = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(joined, "x".repeat(100_000));
    }

    #[tokio::test]
    async fn pause_stops_output_and_resume_continues_it() {
        let (mut p, mut rx) = spawn_sh("i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done");
        next_line(&mut rx).await;
        p.pause().unwrap();
        // Lines written before the stop may still be in the pipe; drain them (bounded).
        let deadline = Instant::now() + DEADLINE;
        while timeout(Duration::from_millis(300), rx.recv()).await.is_ok() {
            assert!(Instant::now() < deadline, "output never stopped");
        }
        assert!(
            timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "a paused agent printed"
        );
        p.resume().unwrap();
        next_line(&mut rx).await;
        p.interrupt(Duration::from_secs(2)).await.unwrap();
    }

    #[tokio::test]
    async fn interrupt_kills_the_whole_process_group() {
        let (mut p, mut rx) = spawn_sh("sleep 1000 & echo $!; wait");
        let grandchild: i32 = next_line(&mut rx).await.text.trim().parse().unwrap();
        assert!(!is_gone(grandchild));
        let status = p.interrupt(Duration::from_secs(2)).await.unwrap();
        assert!(!status.success());
        assert_gone(grandchild).await;
        assert_gone(i32::try_from(p.pid()).unwrap()).await;
    }

    #[tokio::test]
    async fn wait_kills_background_leftovers() {
        let (mut p, mut rx) = spawn_sh("sleep 1000 >/dev/null 2>&1 & echo $!");
        let grandchild: i32 = next_line(&mut rx).await.text.trim().parse().unwrap();
        assert!(p.wait().await.unwrap().success());
        assert_gone(grandchild).await;
    }

    #[tokio::test]
    async fn interrupt_stops_at_sigint_when_the_agent_handles_it() {
        let (mut p, mut rx) =
            spawn_sh("trap 'echo bye; exit 0' INT; echo ready; while :; do sleep 0.05; done");
        assert_eq!(next_line(&mut rx).await.text, "ready");
        // Exit code 0 proves the SIGINT trap ended it: SIGTERM and SIGKILL would kill it.
        let status = p.interrupt(Duration::from_secs(5)).await.unwrap();
        assert!(status.success(), "{status:?}");
        assert_eq!(next_line(&mut rx).await.text, "bye");
    }

    #[tokio::test]
    async fn interrupt_escalates_to_sigkill() {
        let (mut p, mut rx) =
            spawn_sh("trap '' INT TERM; echo ready; while :; do sleep 0.05; done");
        next_line(&mut rx).await;
        let status = p.interrupt(Duration::from_millis(200)).await.unwrap();
        assert_eq!(exit_code(&status), 128 + Signal::SIGKILL as i32);
    }

    #[tokio::test]
    async fn interrupt_reaches_a_paused_agent() {
        let (mut p, mut rx) = spawn_sh("echo ready; while :; do sleep 0.05; done");
        next_line(&mut rx).await;
        p.pause().unwrap();
        let status = p.interrupt(Duration::from_secs(5)).await.unwrap();
        assert_eq!(exit_code(&status), 128 + Signal::SIGINT as i32);
    }

    #[tokio::test]
    async fn missing_binary_is_named_in_the_error() {
        let err = spawn_with(
            &["kennel-no-such-agent-xyz".to_string()],
            false,
            DEFAULT_MAX_LINE,
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("`kennel-no-such-agent-xyz`"), "{message}");
        assert!(message.contains("not on PATH"), "{message}");

        let err = spawn_with(&["/no/such/agent".to_string()], false, DEFAULT_MAX_LINE).unwrap_err();
        assert!(err.to_string().contains("/no/such/agent"), "{err}");
    }

    #[tokio::test]
    async fn stdin_text_reaches_the_process() {
        let argv = ["head".to_string(), "-n1".to_string()];
        let (mut p, mut rx) = spawn_with(&argv, true, DEFAULT_MAX_LINE).unwrap();
        p.write_stdin("hello; $(not a shell) 'q'").await.unwrap();
        assert_eq!(next_line(&mut rx).await.text, "hello; $(not a shell) 'q'");
        assert!(p.wait().await.unwrap().success());
        assert!(matches!(
            p.write_stdin("late").await,
            Err(ProcessError::NoStdin)
        ));
    }

    #[tokio::test]
    async fn env_and_cwd_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([("KENNEL_TEST_VAR".to_string(), "set".to_string())]);
        let argv = sh("echo $KENNEL_TEST_VAR; pwd -P");
        let (tx, rx) = mpsc::channel(8);
        let spec = SpawnSpec {
            argv: &argv,
            cwd: dir.path(),
            env: &env,
            stdin: false,
        };
        let mut p = AgentProcess::spawn(&spec, DEFAULT_MAX_LINE, tx).unwrap();
        p.wait().await.unwrap();
        let lines = collect(rx).await;
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(
            texts(&lines, OutputStream::Stdout),
            ["set".to_string(), cwd.display().to_string()]
        );
    }

    #[test]
    fn find_program_searches_path_and_rejects_missing_files() {
        let path = std::env::var_os("PATH");
        assert!(find_program("sh", path.as_deref()).is_some());
        assert!(find_program("kennel-no-such-agent-xyz", path.as_deref()).is_none());
        assert!(find_program("/bin/sh", None).is_some());
        assert!(find_program("/no/such/agent", None).is_none());
    }
}
