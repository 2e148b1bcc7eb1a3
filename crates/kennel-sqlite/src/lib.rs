//! kennel's one way to keep SQLite, shared by the coordinator's store, the daemon's outbox and
//! the relay's history: [`open`] a database file with kennel's pragmas, and [`migrate`] it to
//! the [`Schema`] the binary knows, refusing a newer one.
//!
//! It owns how a connection is set up and how a schema version is recorded; it must not know
//! what any database holds, create directories, or hold connections of its own.

mod connection;
mod schema;

pub use connection::{open, open_read_only, Options};
pub use schema::{migrate, version, MigrateError, Schema};
