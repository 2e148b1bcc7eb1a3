//! A fresh schema in the PostgreSQL at `KENNEL_TEST_POSTGRES_URL` (default
//! `postgres://root@127.0.0.1:5432/test`) for coordinators started by a test, dropped when the
//! test is done with it. Without a reachable PostgreSQL it fails and says how to point at one.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use sqlx::{Connection, PgConnection};

const DEFAULT_URL: &str = "postgres://root@127.0.0.1:5432/test";

/// A schema of its own; [`PgSchema::url`] is what `server.database_url` takes.
pub struct PgSchema {
    name: String,
    server: String,
    url: String,
}

impl PgSchema {
    /// Creates `kennel_e2e_<pid>_<n>` (dropping a leftover of that name first).
    pub async fn create() -> anyhow::Result<PgSchema> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kennel_e2e_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server =
            std::env::var("KENNEL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let sep = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{sep}options=-c%20search_path%3D{name}");
        let schema = PgSchema { name, server, url };
        let mut conn = schema.connect().await?;
        sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
            schema.name
        ))
        .execute(&mut conn)
        .await
        .context("failed to create the test schema")?;
        Ok(schema)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.server).await.with_context(|| {
            format!(
                "these tests need PostgreSQL at {} (set KENNEL_TEST_POSTGRES_URL to a database \
                 where they may create and drop schemas)",
                self.server
            )
        })
    }

    /// Drops the schema (call at the end of the test, after its coordinators stopped).
    pub async fn drop_schema(self) -> anyhow::Result<()> {
        let mut conn = self.connect().await?;
        sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .execute(&mut conn)
            .await
            .context("failed to drop the test schema")?;
        Ok(())
    }
}
