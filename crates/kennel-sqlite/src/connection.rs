//! Opening a database file with kennel's settings. Every kennel database is one file in WAL mode
//! with `synchronous=NORMAL` and foreign keys enforced: a committed transaction survives a
//! `kill -9` of the process (the WAL is written before commit returns; only a power loss can
//! drop the last commits), and readers never block the writer. What differs between databases
//! (how long to wait for a lock, cache and checkpoint sizes) each caller states in [`Options`].

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// The settings a caller chooses; everything else is the same for every kennel database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// How long a statement waits for a lock another connection holds before it fails as busy.
    pub busy_timeout: Duration,
    /// Page cache per connection, in KiB; `None` keeps SQLite's default (2,000 KiB).
    pub cache_kib: Option<u32>,
    /// Keeps temporary tables, indices and savepoint sub-journals in memory instead of in
    /// temporary files (read-write connections only).
    pub temp_store_memory: bool,
    /// WAL frames after which a commit checkpoints; `None` keeps SQLite's 1,000.
    pub wal_autocheckpoint: Option<u32>,
    /// Prepared statements kept per connection; `None` keeps rusqlite's 16.
    pub statement_cache: Option<usize>,
}

impl Options {
    /// A 5 s lock wait and SQLite's own sizes: right for a small database with one process
    /// writing it (the daemon's outbox, the relay's history).
    pub const DEFAULT: Options = Options {
        busy_timeout: Duration::from_secs(5),
        cache_kib: None,
        temp_store_memory: false,
        wal_autocheckpoint: None,
        statement_cache: None,
    };
}

impl Default for Options {
    fn default() -> Self {
        Options::DEFAULT
    }
}

/// Opens (creating) the database file at `path` for reading and writing, in WAL mode with
/// `synchronous=NORMAL` and foreign keys on, then applies `options`.
///
/// The path is a file name, never a `file:` URI. A file system that cannot do WAL leaves the
/// database in its old journal mode; that is logged, not refused, as readers then only wait
/// longer.
pub fn open(path: &Path, options: &Options) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // First, so that switching the journal mode below already waits for other connections.
    conn.busy_timeout(options.busy_timeout)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            path = %path.display(),
            "SQLite refused WAL mode; readers will block the writer"
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    if let Some(kib) = options.cache_kib {
        set_cache(&conn, kib)?;
    }
    if options.temp_store_memory {
        conn.pragma_update(None, "temp_store", "MEMORY")?;
    }
    if let Some(frames) = options.wal_autocheckpoint {
        conn.pragma_update(None, "wal_autocheckpoint", frames)?;
    }
    if let Some(n) = options.statement_cache {
        conn.set_prepared_statement_cache_capacity(n);
    }
    Ok(conn)
}

/// Opens an existing database read-only, with the lock wait, cache and statement cache of
/// `options`. In WAL mode it reads the last committed state without blocking the writer or
/// being blocked by it.
pub fn open_read_only(path: &Path, options: &Options) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(options.busy_timeout)?;
    if let Some(kib) = options.cache_kib {
        set_cache(&conn, kib)?;
    }
    if let Some(n) = options.statement_cache {
        conn.set_prepared_statement_cache_capacity(n);
    }
    Ok(conn)
}

/// A negative `cache_size` is SQLite's unit for KiB (a positive one counts pages).
fn set_cache(conn: &Connection, kib: u32) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -i64::from(kib))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> i64 {
        conn.pragma_query_value(None, name, |r| r.get(0))
            .expect(name)
    }

    #[test]
    fn every_database_is_wal_with_normal_sync_and_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = open(&dir.path().join("a.db"), &Options::DEFAULT).expect("open");
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        assert_eq!(pragma(&conn, "synchronous"), 1, "NORMAL");
        assert_eq!(pragma(&conn, "foreign_keys"), 1);
        assert_eq!(pragma(&conn, "busy_timeout"), 5_000);
        // The defaults keep SQLite's own sizes.
        assert_eq!(pragma(&conn, "cache_size"), -2_000);
        assert_eq!(pragma(&conn, "temp_store"), 0, "DEFAULT");
        assert_eq!(pragma(&conn, "wal_autocheckpoint"), 1_000);
    }

    #[test]
    fn a_caller_states_what_differs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let options = Options {
            busy_timeout: Duration::from_millis(1_500),
            cache_kib: Some(32_000),
            temp_store_memory: true,
            wal_autocheckpoint: Some(4_000),
            statement_cache: Some(128),
        };
        let conn = open(&path, &options).expect("open");
        assert_eq!(pragma(&conn, "busy_timeout"), 1_500);
        assert_eq!(pragma(&conn, "cache_size"), -32_000);
        assert_eq!(pragma(&conn, "temp_store"), 2, "MEMORY");
        assert_eq!(pragma(&conn, "wal_autocheckpoint"), 4_000);

        let reader = open_read_only(&path, &options).expect("open read-only");
        assert_eq!(pragma(&reader, "busy_timeout"), 1_500);
        assert_eq!(pragma(&reader, "cache_size"), -32_000);
    }

    #[test]
    fn a_read_only_connection_sees_commits_and_cannot_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let writer = open(&path, &Options::DEFAULT).expect("open");
        writer
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);")
            .expect("write");
        let reader = open_read_only(&path, &Options::DEFAULT).expect("open read-only");
        let x: i64 = reader
            .query_row("SELECT x FROM t", [], |r| r.get(0))
            .expect("read");
        assert_eq!(x, 7);
        let err = reader
            .execute("INSERT INTO t VALUES (8)", [])
            .expect_err("read-only");
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ReadOnly),
            "{err}"
        );
    }

    #[test]
    fn a_read_only_open_does_not_create_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.db");
        assert!(open_read_only(&path, &Options::DEFAULT).is_err());
        assert!(!path.exists());
    }
}
