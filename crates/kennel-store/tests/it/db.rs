//! Where a test's store lives: a SQLite file in a temporary directory, or a fresh schema
//! (`kennel_t_<pid>_<n>`) of the PostgreSQL at `KENNEL_TEST_POSTGRES_URL` (default
//! `postgres://root@127.0.0.1:5432/test`), dropped when the test ends, passed or failed. A
//! PostgreSQL that cannot be reached fails the test and says how to point it at one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kennel_store::{Backend, PgStore, SqliteStore};
use sqlx::{Connection, PgConnection};

const DEFAULT_URL: &str = "postgres://root@127.0.0.1:5432/test";

/// A fresh database of one backend for one test.
pub enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(Schema),
}

impl Db {
    pub async fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().expect("temporary directory"))
    }

    pub async fn postgres() -> Db {
        Db::Postgres(Schema::create().await)
    }

    /// Another fresh database of the same backend.
    pub async fn another(&self) -> Db {
        match self {
            Db::Sqlite(_) => Db::sqlite().await,
            Db::Postgres(_) => Db::postgres().await,
        }
    }

    /// What `kennel_store::open` takes: the file's path or the schema's URL.
    pub fn location(&self) -> String {
        match self {
            Db::Sqlite(dir) => dir.path().join("kennel.db").display().to_string(),
            Db::Postgres(schema) => schema.url.clone(),
        }
    }

    /// The backend's name, as `Store::backend` gives it.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Opens (or reopens) the store: a new store on the same file or schema each time.
    pub async fn open(&self) -> Arc<dyn Backend> {
        match self {
            Db::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join("kennel.db"))
                    .await
                    .expect("open the SQLite store"),
            ),
            Db::Postgres(schema) => Arc::new(schema.connect().await),
        }
    }

    /// Runs one SQL statement on the database behind the store's back.
    pub async fn execute(&self, sql: &str) {
        match self {
            Db::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("kennel.db"))
                    .expect("open the SQLite file");
                conn.execute(sql, []).expect("run the statement");
            }
            Db::Postgres(schema) => {
                let mut conn = PgConnection::connect(&schema.url)
                    .await
                    .expect("connect to the schema");
                sqlx::raw_sql(sql)
                    .execute(&mut conn)
                    .await
                    .expect("run the statement");
            }
        }
    }
}

impl Db {
    /// How the database would run `sql`: SQLite's `EXPLAIN QUERY PLAN`, PostgreSQL's `EXPLAIN`
    /// with sequential scans priced out (so an index that applies is used even on a tiny
    /// table), one line per step.
    pub async fn plan(&self, sql: &str) -> String {
        match self {
            Db::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("kennel.db"))
                    .expect("open the SQLite file");
                let mut stmt = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .expect("plan the statement");
                let steps = stmt
                    .query_map([], |row| row.get::<_, String>(3))
                    .expect("read the plan");
                steps
                    .map(|s| s.expect("a step"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            Db::Postgres(schema) => {
                let mut conn = PgConnection::connect(&schema.url)
                    .await
                    .expect("connect to the schema");
                sqlx::raw_sql("SET enable_seqscan = off")
                    .execute(&mut conn)
                    .await
                    .expect("price out sequential scans");
                let steps: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
                    .fetch_all(&mut conn)
                    .await
                    .expect("plan the statement");
                steps.join("\n")
            }
        }
    }
}

/// A schema of the test PostgreSQL, made for one test and dropped with this value.
pub struct Schema {
    pub name: String,
    /// The server's URL with this schema as the search path.
    pub url: String,
    server: String,
}

impl Schema {
    /// Makes a new, empty schema (dropping a leftover of the same name).
    pub async fn create() -> Schema {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kennel_t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Not dropped until it exists: a server that cannot be reached fails the test with
        // what to do, not also with a failure to drop the schema there.
        let schema = std::mem::ManuallyDrop::new(Schema::named(&name));
        let mut conn = schema.server_connection().await;
        let sql = format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}");
        sqlx::raw_sql(&sql)
            .execute(&mut conn)
            .await
            .expect("create the test schema");
        std::mem::ManuallyDrop::into_inner(schema)
    }

    /// A schema named `name`, which is not created.
    pub fn named(name: &str) -> Schema {
        let server =
            std::env::var("KENNEL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let sep = if server.contains('?') { '&' } else { '?' };
        Schema {
            name: name.to_string(),
            // The application name marks the schema's connections, to end them at the drop.
            url: format!("{server}{sep}options=-c%20search_path%3D{name}&application_name={name}"),
            server,
        }
    }

    /// The server's `host:port`.
    pub fn host(&self) -> String {
        let rest = self.server.split_once("://").map_or("", |(_, rest)| rest);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        rest.split(['/', '?'])
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// A connection to the server, outside any test schema.
    pub async fn server_connection(&self) -> PgConnection {
        match PgConnection::connect(&self.server).await {
            Ok(conn) => conn,
            Err(e) => {
                let which = match std::env::var("KENNEL_TEST_POSTGRES_URL") {
                    Ok(_) => "at KENNEL_TEST_POSTGRES_URL",
                    Err(_) => "at postgres://root@127.0.0.1:5432/test (the default)",
                };
                panic!(
                    "the store's tests need PostgreSQL and found none {which}: {e}. Start one, \
                     or set KENNEL_TEST_POSTGRES_URL=postgres://USER@HOST:PORT/DATABASE to a \
                     database in which the tests may create and drop schemas"
                )
            }
        }
    }

    /// A store on this schema, as a coordinator opens it.
    pub async fn connect(&self) -> PgStore {
        PgStore::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect a store to schema {}: {e:#?}", self.name))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Dropped inside the test's runtime, maybe while it unwinds: the schema is dropped on
        // a thread with its own runtime. The test's stores may still have connections, even
        // in a transaction whose rollback waits for the test's runtime (blocked here): they
        // are ended first, so their locks cannot hold up the drop.
        let (server, name) = (self.server.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&server).await?;
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1",
                )
                .bind(&name)
                .execute(&mut conn)
                .await?;
                let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE");
                sqlx::raw_sql(&sql).execute(&mut conn).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("failed to drop test schema {}: {e}", self.name),
            Err(_) => eprintln!(
                "failed to drop test schema {}: the thread panicked",
                self.name
            ),
        }
    }
}

/// How long a concurrent test may take before it is taken as hung.
pub const DEADLINE: Duration = Duration::from_secs(60);
