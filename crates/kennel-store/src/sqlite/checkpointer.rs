//! Background WAL checkpoints: copies committed pages from the WAL into the database file on
//! its own thread and connection, so the two fsyncs a checkpoint needs do not stall the writer
//! (and every caller queued behind it) as SQLite's automatic checkpoint at commit would.
//!
//! The writer keeps a much larger automatic checkpoint as a backstop: under sustained load the
//! WAL can only restart from its beginning after a checkpoint that nothing writes past, and
//! that one is cheap because this thread has copied nearly everything already. Checkpoints
//! never decide durability: a commit is safe once it is in the WAL.

use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

/// Least time between two checkpoints; bounds their I/O to a few per second.
const PAUSE: Duration = Duration::from_millis(250);

/// Wakes the checkpoint thread after commits. The thread ends when this handle is dropped.
pub(super) struct Checkpointer {
    poke: mpsc::SyncSender<()>,
}

impl Checkpointer {
    /// Starts the checkpoint thread on its own read-write connection.
    pub(super) fn start(conn: Connection) -> std::io::Result<Checkpointer> {
        // One pending poke is enough: pokes while one is pending or a checkpoint runs coalesce.
        let (poke, pokes) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("kennel-store-checkpoint".into())
            .spawn(move || run(&conn, &pokes))?;
        Ok(Checkpointer { poke })
    }

    /// Asks for a checkpoint soon; never blocks.
    pub(super) fn poke(&self) {
        let _ = self.poke.try_send(());
    }
}

fn run(conn: &Connection, pokes: &mpsc::Receiver<()>) {
    while pokes.recv().is_ok() {
        // PASSIVE: copies what no reader still needs, never waits for the writer or readers.
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match done {
            Ok((wal_frames, copied)) => {
                tracing::trace!(wal_frames, copied, "checkpointed the WAL");
            }
            Err(e) => {
                tracing::warn!(error = %e, "background WAL checkpoint failed; the writer's own checkpoint will catch up");
            }
        }
        std::thread::sleep(PAUSE);
    }
}
