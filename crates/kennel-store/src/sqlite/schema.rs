//! Opening SQLite connections with the store's settings, and bringing the schema up to date.
//!
//! Both go through `kennel-sqlite`, as the daemon's outbox and the relay's history do; this
//! module states only what is the store's own: its sizes, its migrations and how to read the
//! version of a database written when kennel used sqlx.
//!
//! Migrations are the files in `migrations/sqlite/`, embedded in the binary and applied in
//! order; `PRAGMA user_version` records how many have run. They run once at open, before any
//! other connection exists. Migrations are append-only: an applied file is never edited, a
//! change is a new file.

use std::path::Path;
use std::time::Duration;

use kennel_sqlite::{MigrateError, Options, Schema};
use rusqlite::{Connection, OptionalExtension};

use crate::{Result, StoreError};

/// Migration `n` is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_gateway.sql"),
    include_str!("../../migrations/sqlite/0003_returned_attempts.sql"),
    include_str!("../../migrations/sqlite/0004_daemon_key.sql"),
    include_str!("../../migrations/sqlite/0005_coordinators.sql"),
    include_str!("../../migrations/sqlite/0006_daemon_load.sql"),
    include_str!("../../migrations/sqlite/0007_agents.sql"),
];

const SCHEMA: Schema = Schema {
    name: "store",
    migrations: MIGRATIONS,
    unversioned: Some(sqlx_version),
};

/// The store's connections. Beyond kennel's common settings (WAL, `synchronous=NORMAL`,
/// foreign keys; see `kennel_sqlite::open`):
const OPTIONS: Options = Options {
    busy_timeout: Duration::from_secs(10),
    cache_kib: Some(32_000),
    // Each job of a group commit runs in a savepoint; its sub-journal must stay in memory
    // (and so be truncated at every release) instead of growing a temporary file.
    temp_store_memory: true,
    // 16 MiB of 4 KiB pages instead of SQLite's 1000 frames: fewer checkpoints, each cheap
    // because [`super::wal_flusher`] has already flushed most of the WAL, so the writer stalls
    // less in total.
    wal_autocheckpoint: Some(4_000),
    // Above the number of distinct statements the store issues, so the hot ones are never
    // re-parsed.
    statement_cache: Some(128),
};

/// Opens the one read-write connection.
pub(super) fn open_writer(path: &Path) -> Result<Connection, rusqlite::Error> {
    kennel_sqlite::open(path, &OPTIONS)
}

/// Opens a read-only connection; in WAL mode it reads the last committed state without
/// blocking the writer or being blocked by it.
pub(super) fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    kennel_sqlite::open_read_only(path, &OPTIONS)
}

/// Applies every migration the database has not seen yet, each in its own transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    kennel_sqlite::migrate(conn, &SCHEMA)?;
    Ok(())
}

impl From<MigrateError> for StoreError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::TooNew { found, known } => StoreError::SchemaTooNew { found, known },
            MigrateError::Apply { version, source } => StoreError::Migrate {
                version,
                source: source.into(),
            },
            MigrateError::Version(e) => StoreError::Database(e),
        }
    }
}

/// The schema version of a database written before kennel moved to `user_version`: sqlx
/// recorded applied migrations in `_sqlx_migrations`, with the same numbering. 0 otherwise.
fn sqlx_version(conn: &Connection) -> rusqlite::Result<u32> {
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
    use crate::{SqliteStore, Store};

    fn user_version(conn: &Connection) -> u32 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version")
    }

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

    /// Writes a database as the store did before it used `kennel-sqlite`: its own pragma code
    /// and every migration up to `version` in one transaction, then `user_version` set. The
    /// migration files are the old schema verbatim (they are append-only).
    fn write_as_before(path: &Path, version: usize, rows: &str) {
        let mut conn = Connection::open(path).expect("open");
        conn.busy_timeout(Duration::from_secs(10)).expect("busy");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.pragma_update(None, "synchronous", "NORMAL")
            .expect("sync");
        conn.pragma_update(None, "foreign_keys", "ON").expect("fk");
        conn.pragma_update(None, "cache_size", -32_000)
            .expect("cache");
        conn.pragma_update(None, "temp_store", "MEMORY")
            .expect("temp");
        conn.pragma_update(None, "wal_autocheckpoint", 4_000)
            .expect("ckpt");
        let tx = conn.transaction().expect("tx");
        for sql in &MIGRATIONS[..version] {
            tx.execute_batch(sql).expect("old migration");
        }
        tx.pragma_update(None, "user_version", version as u32)
            .expect("version");
        tx.execute_batch(rows).expect("rows");
        tx.commit().expect("commit");
    }

    const OLD_TASK: &str = "INSERT INTO tasks (id, name, prompt, agent, labels, priority, env, \
         max_attempts, status, created_at, updated_at) \
         VALUES ('t-old', 'old task', 'say hi', 'command', '{\"team\":\"a\"}', 0, '{}', 3, \
         'queued', 1000, 1000);";

    const OLD_DAEMON: &str = "INSERT INTO daemons (id, machine_id, hostname, \
         max_concurrent_tasks, labels, agents, version, protocol_version) \
         VALUES ('d-old', 'm-old', 'old-host', 2, '{}', '[]', '0.1.0', 1);";

    #[tokio::test]
    async fn a_current_database_written_before_opens_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kennel.db");
        write_as_before(&path, MIGRATIONS.len(), OLD_TASK);

        let store = SqliteStore::open(&path).await.expect("open");
        let task = store.get_task("t-old").await.expect("read").expect("kept");
        assert_eq!(
            (task.name.as_str(), task.prompt.as_str(), task.max_attempts),
            ("old task", "say hi", 3)
        );
        assert_eq!(task.labels.get("team").map(String::as_str), Some("a"));
        drop(store);
        let conn = Connection::open(&path).expect("reopen");
        assert_eq!(user_version(&conn), MIGRATIONS.len() as u32);
    }

    #[tokio::test]
    async fn a_database_of_an_older_kennel_is_upgraded_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kennel.db");
        // Version 3: before daemons were bound to a key (migration 4 adds `daemons.key_id`).
        write_as_before(&path, 3, &format!("{OLD_TASK}{OLD_DAEMON}"));

        let store = SqliteStore::open(&path).await.expect("open");
        let daemon = store
            .get_daemon("d-old")
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(
            (daemon.hostname.as_str(), daemon.key_id),
            ("old-host", None)
        );
        assert!(store.get_task("t-old").await.expect("read").is_some());
        drop(store);
        let conn = Connection::open(&path).expect("reopen");
        assert_eq!(user_version(&conn), MIGRATIONS.len() as u32);
    }
}
