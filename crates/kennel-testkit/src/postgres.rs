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
    /// Dropped by [`PgSchema::drop_schema`]: nothing left for `Drop` to do.
    dropped: bool,
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
        let schema = PgSchema {
            name,
            server,
            url,
            dropped: false,
        };
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
    pub async fn drop_schema(mut self) -> anyhow::Result<()> {
        let mut conn = self.connect().await?;
        sqlx::raw_sql(&drop_sql(&self.name))
            .execute(&mut conn)
            .await
            .context("failed to drop the test schema")?;
        self.dropped = true;
        Ok(())
    }
}

/// Drops `name`, waiting at most 5 s for locks (a killed coordinator's connection may linger).
fn drop_sql(name: &str) -> String {
    format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {name} CASCADE")
}

impl Drop for PgSchema {
    /// A schema nobody dropped (a test failed before its end, a benchmark stopped early) is
    /// dropped here, on a thread of its own (this may run inside a runtime), so that failures
    /// leave no schemas behind in the shared database. Best effort: errors are ignored.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server, sql) = (self.server.clone(), drop_sql(&self.name));
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&server).await.ok()?;
                sqlx::raw_sql(&sql).execute(&mut conn).await.ok()
            })
        });
        let _ = cleanup.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(schema: &str) -> bool {
        let server =
            std::env::var("KENNEL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let mut conn = PgConnection::connect(&server).await.unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = $1",
        )
        .bind(schema)
        .fetch_one(&mut conn)
        .await
        .unwrap()
            == 1
    }

    /// A test that fails before its end leaves no schema behind; one that ends drops its own.
    #[tokio::test]
    async fn a_schema_is_dropped_whether_or_not_the_test_reaches_its_end() {
        let forgotten = PgSchema::create().await.unwrap();
        let name = forgotten.name.clone();
        assert!(exists(&name).await);
        drop(forgotten);
        assert!(!exists(&name).await, "dropped when the value was");

        let ended = PgSchema::create().await.unwrap();
        let name = ended.name.clone();
        ended.drop_schema().await.unwrap();
        assert!(!exists(&name).await);
    }
}
