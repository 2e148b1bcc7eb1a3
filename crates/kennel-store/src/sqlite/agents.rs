//! The SQLite side of the lifecycle manager's state: [`Sql`] on a rusqlite connection, and
//! [`AgentStore`](crate::agents::AgentStore) from the operations written once in
//! [`crate::agents`]. Writes run on the writer thread (with the events they record, in its
//! group commit); reads on the read pool.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, ToSql};

use super::{insert_event, SqliteStore};
use crate::agents::impl_agent_store;
use crate::events::NewEvent;
use crate::rows::Columns;
use crate::sql::{Param, Row, Sql};
use crate::{Millis, Result, StoreError};

/// A connection of the store, as the operations take it.
pub(super) struct SqliteSql<'c>(pub(super) &'c Connection);

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Text(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Int(Some(n)) => ToSqlOutput::Owned(Value::Integer(*n)),
            Param::Flag(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
            Param::Text(None) | Param::Int(None) => ToSqlOutput::Owned(Value::Null),
        })
    }
}

/// A row read off SQLite, owned.
struct Owned(Vec<Value>);

impl Owned {
    fn at(&self, at: usize) -> Result<&Value> {
        self.0
            .get(at)
            .ok_or_else(|| StoreError::Corrupt(format!("a row has no column {at}")))
    }

    fn wrong(&self, at: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!("column {at} is not {want}: {:?}", self.0.get(at)))
    }
}

impl Columns for Owned {
    fn text(&self, at: usize) -> Result<String> {
        self.text_opt(at)?.ok_or_else(|| self.wrong(at, "text"))
    }
    fn text_opt(&self, at: usize) -> Result<Option<String>> {
        match self.at(at)? {
            Value::Text(s) => Ok(Some(s.clone())),
            Value::Null => Ok(None),
            _ => Err(self.wrong(at, "text")),
        }
    }
    fn int(&self, at: usize) -> Result<i64> {
        self.int_opt(at)?
            .ok_or_else(|| self.wrong(at, "an integer"))
    }
    fn int_opt(&self, at: usize) -> Result<Option<i64>> {
        match self.at(at)? {
            Value::Integer(n) => Ok(Some(*n)),
            Value::Null => Ok(None),
            _ => Err(self.wrong(at, "an integer")),
        }
    }
    fn flag(&self, at: usize) -> Result<bool> {
        Ok(self.int(at)? != 0)
    }
    fn bytes(&self, at: usize) -> Result<Vec<u8>> {
        match self.at(at)? {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(self.wrong(at, "bytes")),
        }
    }
}

impl Sql for SqliteSql<'_> {
    async fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }

    async fn fetch(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out: Vec<Row> = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..width)
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            out.push(Box::new(Owned(values)));
        }
        Ok(out)
    }

    fn event(&mut self, event: NewEvent, now: Millis) -> Result<kennel_proto::api::Event> {
        insert_event(self.0, event, now)
    }
}

/// Runs `$op` on the writer thread, in its transaction.
macro_rules! sqlite_write {
    ($self:ident, $s:ident => $op:expr) => {
        $self
            .write(move |conn| {
                let mut sql = SqliteSql(conn);
                let $s = &mut sql;
                crate::sql::run_ready($op)?
            })
            .await
    };
}

/// Runs `$op` on a read-only connection.
macro_rules! sqlite_read {
    ($self:ident, $s:ident => $op:expr) => {
        $self
            .read(move |conn| {
                let mut sql = SqliteSql(conn);
                let $s = &mut sql;
                crate::sql::run_ready($op)?
            })
            .await
    };
}

impl_agent_store!(SqliteStore, sqlite_write, sqlite_read);
