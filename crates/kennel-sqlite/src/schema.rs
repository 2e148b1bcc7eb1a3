//! Versioned migrations. A database's schema is an ordered list of SQL batches; `PRAGMA
//! user_version` records how many of them the file has seen. [`migrate`] applies the pending
//! ones, each in its own transaction together with the version it reaches, so a failing
//! migration leaves the file at the last version that applied whole. A file at a version the
//! binary does not know was written by a newer kennel and is refused untouched.
//!
//! Migrations are append-only: an applied one is never edited, a change is a new one.

use rusqlite::{Connection, TransactionBehavior};

/// What a binary knows about one kind of database.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// Which database this is, for logs (`store`, `outbox`, `relay`).
    pub name: &'static str,
    /// Migration `n` is `migrations[n - 1]`.
    pub migrations: &'static [&'static str],
    /// The version of a file written before it recorded one (its `user_version` reads 0).
    /// `None` takes such a file as version 0, so migration 1 runs on it and must then accept
    /// the tables that are already there (`IF NOT EXISTS`).
    pub unversioned: Option<fn(&Connection) -> rusqlite::Result<u32>>,
}

impl Schema {
    /// The version this binary brings a file to.
    pub fn latest(&self) -> u32 {
        // A list of four billion migrations does not fit in a binary.
        u32::try_from(self.migrations.len()).unwrap_or(u32::MAX)
    }
}

/// Why a database could not be brought to the binary's schema.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database schema is at version {found} but this kennel knows only up to {known}; \
         run a newer kennel or restore a matching backup"
    )]
    TooNew { found: u32, known: u32 },
    #[error("failed to apply database migration {version}")]
    Apply {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("failed to read or record the database schema version")]
    Version(#[from] rusqlite::Error),
}

/// The schema version recorded in the file (`PRAGMA user_version`).
pub fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Brings the database to `schema.latest()`, applying each pending migration in its own
/// immediate transaction; returns the version reached. A file already current is only read.
///
/// Safe against another process migrating the same file at once: the version is read again
/// under the write lock before each step.
pub fn migrate(conn: &mut Connection, schema: &Schema) -> Result<u32, MigrateError> {
    let known = schema.latest();
    match version(conn)? {
        found if found > known => return Err(MigrateError::TooNew { found, known }),
        found if found == known && found > 0 => return Ok(known),
        _ => {}
    }
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let recorded = version(&tx)?;
        let at = match (recorded, schema.unversioned) {
            (0, Some(unversioned)) => unversioned(&tx)?,
            _ => recorded,
        };
        if at > known {
            return Err(MigrateError::TooNew { found: at, known });
        }
        if at == known {
            if recorded != at {
                tx.pragma_update(None, "user_version", at)?;
                tx.commit()?;
            }
            return Ok(known);
        }
        let next = at + 1;
        tx.execute_batch(schema.migrations[at as usize])
            .map_err(|source| MigrateError::Apply {
                version: next,
                source,
            })?;
        tx.pragma_update(None, "user_version", next)?;
        tx.commit()?;
        tracing::info!(
            database = schema.name,
            version = next,
            "applied database migration"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, Options};

    /// Plain `CREATE TABLE`s: running a migration twice would fail.
    const TWO: &[&str] = &[
        "CREATE TABLE a (x INTEGER NOT NULL);",
        "CREATE TABLE b (y TEXT NOT NULL); INSERT INTO b SELECT 'from a ' || x FROM a;",
    ];

    fn schema(migrations: &'static [&'static str]) -> Schema {
        Schema {
            name: "test",
            migrations,
            unversioned: None,
        }
    }

    fn tables(conn: &Connection) -> Vec<String> {
        let mut st = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .expect("prepare");
        let names = st.query_map([], |r| r.get(0)).expect("query");
        names.collect::<Result<_, _>>().expect("names")
    }

    #[test]
    fn a_new_file_gets_every_migration_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open(&dir.path().join("m.db"), &Options::DEFAULT).expect("open");
        assert_eq!(migrate(&mut conn, &schema(TWO)).expect("first"), 2);
        assert_eq!(migrate(&mut conn, &schema(TWO)).expect("again"), 2);
        assert_eq!(version(&conn).expect("version"), 2);
        assert_eq!(tables(&conn), vec!["a", "b"]);
    }

    #[test]
    fn only_pending_migrations_run_and_data_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        {
            let mut conn = open(&path, &Options::DEFAULT).expect("open");
            assert_eq!(migrate(&mut conn, &schema(&TWO[..1])).expect("v1"), 1);
            conn.execute("INSERT INTO a VALUES (41)", []).expect("row");
        }
        let mut conn = open(&path, &Options::DEFAULT).expect("reopen");
        assert_eq!(migrate(&mut conn, &schema(TWO)).expect("v2"), 2);
        let y: String = conn
            .query_row("SELECT y FROM b", [], |r| r.get(0))
            .expect("migrated row");
        assert_eq!(y, "from a 41");
    }

    #[test]
    fn a_failing_migration_rolls_back_alone() {
        const BROKEN: &[&str] = &[
            "CREATE TABLE a (x INTEGER);",
            "CREATE TABLE b (y INTEGER); INSERT INTO no_such_table VALUES (1);",
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open(&dir.path().join("m.db"), &Options::DEFAULT).expect("open");
        let err = migrate(&mut conn, &schema(BROKEN)).expect_err("migration 2 fails");
        assert!(
            matches!(err, MigrateError::Apply { version: 2, .. }),
            "{err:?}"
        );
        assert_eq!(version(&conn).expect("version"), 1, "migration 1 stays");
        assert_eq!(tables(&conn), vec!["a"], "migration 2 left nothing behind");
    }

    #[test]
    fn a_newer_file_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open(&dir.path().join("m.db"), &Options::DEFAULT).expect("open");
        conn.pragma_update(None, "user_version", 3).expect("set");
        let err = migrate(&mut conn, &schema(TWO)).expect_err("newer schema");
        assert!(
            matches!(err, MigrateError::TooNew { found: 3, known: 2 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("run a newer kennel"), "{err}");
        assert_eq!(version(&conn).expect("version"), 3);
        assert!(tables(&conn).is_empty());
    }

    #[test]
    fn an_unversioned_file_starts_where_the_schema_says() {
        // Each migration of `TWO` adds one table.
        fn tables_made(conn: &Connection) -> rusqlite::Result<u32> {
            conn.query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('a', 'b')",
                [],
                |r| r.get(0),
            )
        }
        let adopting = Schema {
            unversioned: Some(tables_made),
            ..schema(TWO)
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open(&dir.path().join("m.db"), &Options::DEFAULT).expect("open");
        // Written by code that kept no version: migration 1 already ran, outside the runner.
        conn.execute_batch(TWO[0]).expect("old schema");
        assert_eq!(version(&conn).expect("version"), 0);
        assert_eq!(migrate(&mut conn, &adopting).expect("adopt"), 2);
        assert_eq!(version(&conn).expect("version"), 2);

        // At the latest version already: only the version is recorded.
        let mut conn = open(&dir.path().join("n.db"), &Options::DEFAULT).expect("open");
        conn.execute_batch(&TWO.concat()).expect("old schema");
        assert_eq!(migrate(&mut conn, &adopting).expect("adopt"), 2);
        assert_eq!(version(&conn).expect("version"), 2);
    }

    #[test]
    fn an_empty_schema_leaves_a_new_file_at_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open(&dir.path().join("m.db"), &Options::DEFAULT).expect("open");
        assert_eq!(migrate(&mut conn, &schema(&[])).expect("nothing"), 0);
        assert_eq!(version(&conn).expect("version"), 0);
    }
}
