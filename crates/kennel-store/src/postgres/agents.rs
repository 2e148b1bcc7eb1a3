//! The PostgreSQL side of the lifecycle manager's state: [`Sql`] on a transaction, and
//! [`AgentStore`](crate::agents::AgentStore) from the operations written once in
//! [`crate::agents`]. Each call is its own transaction; its events are stored last, with ids
//! drawn like every other writer's (see [`super::insert_events`]), and the ids handed out
//! while it ran are numbered then.

use kennel_proto::api::Event;
use sqlx::postgres::{PgArguments, PgPool};
use sqlx::{Postgres, Transaction};

use super::{insert_events, PgStore};
use crate::agents::{impl_agent_store, Changed};
use crate::events::NewEvent;
use crate::sql::{dollar_placeholders, Param, Row, Sql};
use crate::{Millis, Result};

/// A transaction of the store, as the operations take it.
pub(super) struct PgSql {
    tx: Transaction<'static, Postgres>,
    events: Vec<(NewEvent, Millis)>,
}

impl PgSql {
    pub(super) async fn begin(pool: &PgPool) -> Result<PgSql> {
        Ok(PgSql {
            tx: pool.begin().await?,
            events: Vec::new(),
        })
    }

    /// Stores the events, numbers those of `changed`, and commits.
    pub(super) async fn commit<T>(mut self, mut changed: Changed<T>) -> Result<Changed<T>> {
        if !self.events.is_empty() {
            let ids = insert_events(&mut self.tx, &self.events).await?;
            changed.events.iter_mut().for_each(|e| ids.number(e));
        }
        self.tx.commit().await?;
        Ok(changed)
    }
}

/// `sql` (already spelled for PostgreSQL) with `params` bound.
fn bind<'q>(sql: &'q str, params: &[Param]) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    let mut query = sqlx::query(sql);
    for p in params {
        query = match p.clone() {
            Param::Text(t) => query.bind(t),
            Param::Int(n) => query.bind(n),
            Param::Flag(b) => query.bind(b),
        };
    }
    query
}

impl Sql for PgSql {
    async fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64> {
        let sql = dollar_placeholders(sql);
        Ok(bind(&sql, params)
            .execute(&mut *self.tx)
            .await?
            .rows_affected())
    }

    async fn fetch(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>> {
        let sql = dollar_placeholders(sql);
        let rows = bind(&sql, params).fetch_all(&mut *self.tx).await?;
        Ok(rows.into_iter().map(|r| Box::new(r) as Row).collect())
    }

    fn event(&mut self, event: NewEvent, now: Millis) -> Result<Event> {
        self.events.push((event.clone(), now));
        Ok(event.stored(-(self.events.len() as i64), now))
    }
}

/// Runs `$op` in a transaction of its own, stores its events and commits.
macro_rules! pg_write {
    ($self:ident, $s:ident => $op:expr) => {{
        let mut sql = PgSql::begin(&$self.pool).await?;
        let changed = {
            let $s = &mut sql;
            $op.await?
        };
        sql.commit(changed).await
    }};
}

/// Runs `$op` in a transaction that is rolled back (it writes nothing).
macro_rules! pg_read {
    ($self:ident, $s:ident => $op:expr) => {{
        let mut sql = PgSql::begin(&$self.pool).await?;
        let $s = &mut sql;
        $op.await
    }};
}

impl_agent_store!(PgStore, pg_write, pg_read);
