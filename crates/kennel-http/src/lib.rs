//! The HTTP listener the coordinator, the gateway and the relay serve through ([`serve`]), and
//! its configuration ([`HttpConfig`], the `[server.http]`, `[gateway.http]` and `[relay.http]`
//! sections). A crate of its own so that a service needs neither the coordinator nor the others
//! to serve HTTP.
//!
//! It knows nothing of routes, keys or any service's state.

mod config;
mod listener;

pub use config::{HttpConfig, HttpConfigProblem};
pub use listener::serve;
