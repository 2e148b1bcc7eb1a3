//! One spelling of SQL for both backends, for the parts of the store written once: statements
//! with `?1`, `?2`, … placeholders (rewritten to `$1`, … for PostgreSQL), parameters as
//! [`Param`]s, rows read through [`Columns`]. The lifecycle manager's state (`agents`) is
//! stored this way: its operations are async functions over a [`Sql`] connection, run by the
//! SQLite store on its writer thread and by the PostgreSQL store in a write group.
//!
//! Both schemas must use the same table and column names and compatible types (64-bit
//! integers, text, booleans) for what is written here.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use kennel_proto::api::Event;

use crate::events::NewEvent;
use crate::rows::Columns;
use crate::{Millis, Result, StoreError};

/// A statement parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(Option<String>),
    Int(Option<i64>),
    Flag(bool),
}

impl From<&str> for Param {
    fn from(s: &str) -> Param {
        Param::Text(Some(s.to_string()))
    }
}

impl From<String> for Param {
    fn from(s: String) -> Param {
        Param::Text(Some(s))
    }
}

impl From<&String> for Param {
    fn from(s: &String) -> Param {
        Param::Text(Some(s.clone()))
    }
}

impl From<Option<String>> for Param {
    fn from(s: Option<String>) -> Param {
        Param::Text(s)
    }
}

impl From<Option<&str>> for Param {
    fn from(s: Option<&str>) -> Param {
        Param::Text(s.map(str::to_string))
    }
}

impl From<i64> for Param {
    fn from(n: i64) -> Param {
        Param::Int(Some(n))
    }
}

impl From<Option<i64>> for Param {
    fn from(n: Option<i64>) -> Param {
        Param::Int(n)
    }
}

impl From<bool> for Param {
    fn from(b: bool) -> Param {
        Param::Flag(b)
    }
}

/// Parameters of a statement, in placeholder order: `params![a, b]`.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$($crate::sql::Param::from($p)),*]
    };
}
pub(crate) use params;

/// A row read back, owned, readable by column position.
pub(crate) type Row = Box<dyn Columns + Send + Sync>;

/// A connection inside a transaction, of either backend. Its futures are `Send` where the
/// connection is (PostgreSQL's); SQLite's run to their end on the writer thread at once.
pub(crate) trait Sql {
    /// Runs a statement; how many rows it changed.
    async fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64>;
    /// Runs a query; its rows.
    async fn fetch(&mut self, sql: &str, params: &[Param]) -> Result<Vec<Row>>;
    /// Records `event` with this transaction. Its id may be provisional until the transaction
    /// commits (PostgreSQL numbers a write group's events at its end).
    fn event(&mut self, event: NewEvent, now: Millis) -> Result<Event>;

    /// The first row of a query, if any.
    fn fetch_one(
        &mut self,
        sql: &str,
        params: &[Param],
    ) -> impl Future<Output = Result<Option<Row>>> {
        async move { Ok(self.fetch(sql, params).await?.into_iter().next()) }
    }
}

/// `sql` with `?N` placeholders spelled `$N`, as PostgreSQL takes them. The SQL written for
/// both backends never holds a `?` of its own.
pub(crate) fn dollar_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

/// Runs a future whose every await is ready at once (the SQLite [`Sql`], which is
/// synchronous underneath) to its end on the calling thread.
pub(crate) fn run_ready<F: Future>(fut: F) -> Result<F::Output> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => Err(StoreError::Aborted(
            "a SQLite operation waited on something other than SQLite".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_respelled_for_postgres() {
        assert_eq!(
            dollar_placeholders("UPDATE t SET a = ?1 WHERE b = ?2 AND c = ?1"),
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $1"
        );
    }

    #[test]
    fn a_ready_future_runs_and_a_pending_one_is_an_error() {
        assert_eq!(run_ready(async { 7 }).ok(), Some(7));
        assert!(run_ready(std::future::pending::<()>()).is_err());
    }
}
