//! The data-directory lock: one long-running kennel process per data directory. Two servers
//! on one database would each mint keys and schedule the same queue; two daemons on one
//! directory would share a daemon id, an outbox and worktrees and corrupt each other's work.
//!
//! The lock is an exclusive `flock` on `<dir>/kennel.lock`, held by an open file for the life
//! of the process (the kernel drops it when the process exits, however it exits, so a crash
//! never leaves a stale lock). The holder's PID is written into the file only so a refused
//! second process can name it. This module must not create anything else in the directory:
//! the lock is taken before any other file is, so a refused start changes nothing.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// The name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "kennel.lock";

/// An exclusive hold on a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    /// Kept open: closing it releases the lock.
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if needed and takes its lock without waiting; refuses if another process
    /// holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = dir.join(LOCK_FILE);
        let io = |source: std::io::Error| {
            anyhow::Error::new(source).context(format!(
                "failed to lock the data directory {} (through {}); check that it is writable",
                dir.display(),
                path.display()
            ))
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Not truncated on open: the holder's PID must stay readable for a refused process.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // `File::try_lock` is flock(LOCK_EX | LOCK_NB) on Unix: advisory, per open file, and
        // released by the kernel when the process exits.
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    // The holder locks before it writes its PID; a refusal in between sees none.
                    Err(_) => "pid not yet recorded".to_string(),
                };
                anyhow::bail!(
                    "the data directory {} is in use by another kennel process ({holder}); stop \
                     that process first, or give this one its own directory with --data-dir",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = DataDirLock::acquire(&dir).unwrap();
        let err = DataDirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&dir.display().to_string()), "{err}");
        drop(first);
        DataDirLock::acquire(&dir).unwrap();
    }
}
