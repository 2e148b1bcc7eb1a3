//! Opening SQLite connections with kennel's settings, and bringing the schema up to date.
//!
//! Migrations are the files in `migrations/sqlite/`, embedded in the binary and applied in
//! order; `PRAGMA user_version` records how many have run. They run once at open, in one
//! transaction, before any other connection exists. Migrations are append-only: an applied
//! file is never edited, a change is a new file.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::{Result, StoreError};

/// Migration `n` is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_gateway.sql"),
    include_str!("../../migrations/sqlite/0003_returned_attempts.sql"),
    include_str!("../../migrations/sqlite/0004_daemon_key.sql"),
];

/// How long a connection waits for a lock another process holds before it reports busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page cache per connection, in KiB (SQLite's negative `cache_size` unit).
const CACHE_KIB: i64 = 32_000;

/// WAL frames after which the writer checkpoints at commit (16 MiB of 4 KiB pages), instead of
/// SQLite's 1000: fewer checkpoints, each cheap because [`super::wal_flusher`] has already
/// flushed most of the WAL, so the writer stalls less in total.
const CHECKPOINT_FRAMES: i64 = 4_000;

/// Prepared statements kept per connection; above the number of distinct statements the
/// store issues, so the hot ones are never re-parsed.
const STATEMENT_CACHE: usize = 128;

/// Opens the one read-write connection: WAL, `synchronous=NORMAL`, foreign keys on.
///
/// `synchronous=NORMAL` in WAL mode keeps every committed transaction across a `kill -9` of
/// the process (the WAL is written before commit returns; the OS page cache holds it); only a
/// power loss can drop the last commits.
pub(super) fn open_writer(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "SQLite refused WAL mode; readers will block the writer"
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    // Each job of a group commit runs in a savepoint; its sub-journal must stay in memory
    // (and so be truncated at every release) instead of growing a temporary file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_FRAMES)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Opens a read-only connection; in WAL mode it reads the last committed state without
/// blocking the writer or being blocked by it.
pub(super) fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Applies every migration the database has not seen yet, in one transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let known = MIGRATIONS.len() as u32;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut version: u32 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version == 0 {
        version = sqlx_version(&tx)?;
    }
    if version > known {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known,
        });
    }
    for (n, sql) in (1..).zip(MIGRATIONS).skip(version as usize) {
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migrate { version: n, source })?;
        tracing::info!(version = n, "applied database migration");
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

/// The schema version of a database written before kennel moved to `user_version`: sqlx
/// recorded applied migrations in `_sqlx_migrations`, with the same numbering. 0 otherwise.
fn sqlx_version(conn: &Connection) -> Result<u32> {
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if has_table.is_none() {
        return Ok(0);
    }
    let v: Option<i64> = conn.query_row(
        "SELECT MAX(version) FROM _sqlx_migrations WHERE success",
        [],
        |row| row.get(0),
    )?;
    Ok(v.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_record_the_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        let mut conn = open_writer(&path).expect("open");
        migrate(&mut conn).expect("first run");
        migrate(&mut conn).expect("second run is a no-op");
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, MIGRATIONS.len() as u32);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_writer(&dir.path().join("m.db")).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set");
        let err = migrate(&mut conn).expect_err("newer schema");
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }));
    }

    #[test]
    fn a_database_migrated_by_sqlx_is_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_writer(&dir.path().join("m.db")).expect("open");
        conn.execute_batch(MIGRATIONS[0]).expect("schema v1");
        conn.execute_batch(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, success BOOLEAN NOT NULL);
             INSERT INTO _sqlx_migrations VALUES (1, TRUE);",
        )
        .expect("sqlx table");
        // Adopted at version 1 (migration 1 is not run again: its tables exist), then the
        // newer migrations run.
        migrate(&mut conn).expect("adopt");
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, MIGRATIONS.len() as u32);
    }
}
