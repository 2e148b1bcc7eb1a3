//! Where a local coordinator listens, recorded in its data directory so that client commands
//! on the same machine find it without `--url` or `KENNEL_URL`.
//!
//! `kennel up` and `kennel server` write `<data_dir>/endpoint.json` (`{"url": …, "pid": …}`)
//! once they hold the directory's lock and have bound their port (so a port of 0 is recorded
//! as the one chosen), and remove it when they stop cleanly. A process killed outright leaves
//! the file behind; readers ignore a record whose process is gone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's name inside a data directory.
pub const ENDPOINT_FILE: &str = "endpoint.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The coordinator's base URL, `http://host:port`.
    pub url: String,
    /// The process serving it.
    pub pid: u32,
}

/// Removes the record when dropped: hold it for as long as the server serves.
#[derive(Debug)]
pub struct Published {
    path: PathBuf,
}

impl Drop for Published {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records that this process serves `url` from `dir`. Written to a temporary file and renamed,
/// so a reader never sees half a record.
pub fn publish(dir: &Path, url: &str) -> anyhow::Result<Published> {
    let path = dir.join(ENDPOINT_FILE);
    let tmp = dir.join(format!("{ENDPOINT_FILE}.tmp"));
    let record = Endpoint {
        url: url.to_string(),
        pid: std::process::id(),
    };
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, serde_json::to_vec(&record)?)?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "failed to record where this server listens in {}",
            path.display()
        ))
    })?;
    Ok(Published { path })
}

/// The live record in `dir`, if a process that is still running wrote one.
pub fn find(dir: &Path) -> Option<Endpoint> {
    let bytes = std::fs::read(dir.join(ENDPOINT_FILE)).ok()?;
    let record: Endpoint = serde_json::from_slice(&bytes).ok()?;
    alive(record.pid).then_some(record)
}

/// Whether a process with this id exists (signal 0 checks without sending anything; EPERM means
/// it exists but belongs to another user).
fn alive(pid: u32) -> bool {
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    matches!(kill(Pid::from_raw(raw), None), Ok(()) | Err(Errno::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_endpoint_is_found_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(find(tmp.path()), None);
        let published = publish(tmp.path(), "http://127.0.0.1:4321").unwrap();
        let found = find(tmp.path()).unwrap();
        assert_eq!(found.url, "http://127.0.0.1:4321");
        assert_eq!(found.pid, std::process::id());
        drop(published);
        assert_eq!(find(tmp.path()), None);
        assert!(!tmp.path().join(ENDPOINT_FILE).exists());
    }

    #[test]
    fn a_record_left_by_a_dead_process_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        // A child that has exited and been reaped: its pid names no process.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let stale = Endpoint {
            url: "http://127.0.0.1:1".into(),
            pid,
        };
        std::fs::write(
            tmp.path().join(ENDPOINT_FILE),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        assert_eq!(find(tmp.path()), None);
        std::fs::write(tmp.path().join(ENDPOINT_FILE), b"{not json").unwrap();
        assert_eq!(find(tmp.path()), None);
    }
}
