//! Background flushing of the WAL file: a thread that `fsync`s the WAL shortly after commits,
//! so the checkpoints the writer runs find little left to flush and stall the writer (and every
//! caller queued behind it) for much less time.
//!
//! It only makes committed data durable sooner; it never decides what is committed and never
//! writes. It works on its own file handle of `<db>-wal` and touches no SQLite lock (SQLite locks
//! the database and `-shm` files, never the WAL). If it stops, the checkpoints simply get slower.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Least time between two flushes: bounds them to a few dozen a second under load.
const PAUSE: Duration = Duration::from_millis(50);

/// Wakes the flusher thread after commits. The thread ends when this handle is dropped.
pub(super) struct WalFlusher {
    poke: mpsc::SyncSender<()>,
}

impl WalFlusher {
    /// Starts the flusher for the database file at `db`.
    pub(super) fn start(db: PathBuf) -> std::io::Result<WalFlusher> {
        let mut wal = db.into_os_string();
        wal.push("-wal");
        // One pending poke is enough: pokes while one is pending or a flush runs coalesce.
        let (poke, pokes) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("kennel-store-walsync".into())
            .spawn(move || run(&PathBuf::from(wal), &pokes))?;
        Ok(WalFlusher { poke })
    }

    /// Asks for a flush soon; never blocks.
    pub(super) fn poke(&self) {
        let _ = self.poke.try_send(());
    }
}

fn run(wal: &Path, pokes: &mpsc::Receiver<()>) {
    let mut file: Option<File> = None;
    while pokes.recv().is_ok() {
        if file.is_none() {
            // Write access only so that syncing is allowed everywhere; nothing is written.
            file = File::options()
                .read(true)
                .write(true)
                .open(wal)
                .map_err(|e| {
                    tracing::debug!(error = %e, wal = %wal.display(), "cannot open the WAL to flush it yet");
                })
                .ok();
        }
        if let Some(f) = &file {
            if let Err(e) = f.sync_data() {
                tracing::warn!(error = %e, wal = %wal.display(), "failed to flush the WAL in the background; checkpoints will do it");
                file = None;
            }
        }
        std::thread::sleep(PAUSE);
    }
}
