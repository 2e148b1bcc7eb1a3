//! Bringing a PostgreSQL schema up to date: the files in `migrations/postgres/`, embedded in the
//! binary and applied in order at connect, recorded in `kennel_migrations` (one row per
//! applied version). Migrations are append-only: an applied file is never edited, a change is
//! a new file.
//!
//! Several coordinators may start at once on one database: the first to take the schema's
//! advisory lock migrates, in one transaction, and the others wait for it and then find the
//! schema current. A schema at a version this binary does not know was migrated by a newer
//! kennel and is refused untouched.

use sqlx::postgres::PgPool;
use sqlx::Executor;

use crate::{Result, StoreError};

/// Migration `n` is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_daemon_load.sql"),
    include_str!("../../migrations/postgres/0003_agents.sql"),
    include_str!("../../migrations/postgres/0004_event_sequence.sql"),
];

/// The first key of the migration lock (`pg_advisory_xact_lock(key, hash of the schema)`):
/// "kenl" in ASCII, so it does not collide with other applications' locks by chance.
const LOCK_KEY: i32 = 0x6b65_6e6c;

/// The version this binary brings a schema to.
fn latest() -> u32 {
    // A list of four billion migrations does not fit in a binary.
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Applies every migration the schema has not seen yet, in one transaction under the
/// schema's migration lock; returns the version reached.
pub(super) async fn migrate(pool: &PgPool) -> Result<u32> {
    let mut tx = pool.begin().await?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await?;
    let Some(schema) = schema else {
        let search_path: String = sqlx::query_scalar("SHOW search_path")
            .fetch_one(&mut *tx)
            .await?;
        return Err(StoreError::NoSchema { search_path });
    };
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_KEY)
        .bind(&schema)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS kennel_migrations (\
         version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    let found: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM kennel_migrations")
        .fetch_one(&mut *tx)
        .await?;
    let known = latest();
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for version in found + 1..=known {
        let apply = |source: sqlx::Error| StoreError::Migrate {
            version,
            source: source.into(),
        };
        // No parameters: sent as a simple query, which may hold several statements.
        tx.execute(MIGRATIONS[version as usize - 1])
            .await
            .map_err(apply)?;
        sqlx::query("INSERT INTO kennel_migrations (version) VALUES ($1)")
            .bind(i64::from(version))
            .execute(&mut *tx)
            .await
            .map_err(apply)?;
    }
    tx.commit().await?;
    if found < known {
        tracing::info!(
            schema,
            from = found,
            to = known,
            "migrated the PostgreSQL schema"
        );
    }
    Ok(known)
}
