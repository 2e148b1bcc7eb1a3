//! Read-only connections for queries that need not see the caller's own uncommitted work:
//! a few connections, each used by one blocking task at a time, so reads never wait for the
//! writer nor run on the async runtime's threads.
//!
//! In WAL mode a reader sees every transaction committed before its statement started; since
//! the writer answers only after committing, a read issued after a write's answer sees it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::schema::open_reader;
use crate::{Result, StoreError};

/// Most read connections open at once (and so most reads running at once).
const MAX_READERS: usize = 4;

pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    /// A pool over the database at `path`, starting with `first` (opened by the caller, which
    /// so checks that reading works).
    pub(super) fn new(path: PathBuf, first: Connection) -> Readers {
        Readers {
            path,
            idle: Mutex::new(vec![first]),
            permits: Arc::new(Semaphore::new(MAX_READERS)),
        }
    }

    /// Runs `work` on a read connection in a blocking task.
    pub(super) async fn call<T, F>(self: &Arc<Self>, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Aborted("the read pool is closed".into()))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match pool.take() {
                Some(conn) => conn,
                None => open_reader(&pool.path)?,
            };
            let out = work(&conn);
            pool.put(conn);
            out
        })
        .await
        .map_err(|e| StoreError::Aborted(format!("a database read failed: {e}")))?
    }

    fn take(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}
