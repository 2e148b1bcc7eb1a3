//! `[server.http]`, `[gateway.http]` and `[relay.http]`: how the listener treats connections.
//! Each service checks the values with [`HttpConfig::check`] and reports a problem under its
//! own section.

use std::time::Duration;

use kennel_proto::Span;
use serde::{Deserialize, Serialize};

/// How the HTTP listener treats connections (`[server.http]`; the gateway's `[gateway.http]`
/// and the relay's `[relay.http]` have the same keys). Slow or idle clients must not be able to
/// hold sockets, and so file descriptors, for long; see [`crate::serve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// How long a client has to send a complete request head (request line and headers),
    /// counted from the connection's accept, or from its first byte on a kept-alive
    /// connection; a connection that is slower is closed.
    pub header_read_timeout: Span,
    /// How long a kept-alive connection may wait for its next request before it is closed.
    /// Upgraded connections (WebSockets) and responses being streamed are not idle.
    pub idle_timeout: Span,
    /// Connections open at once, WebSockets included; further ones are closed as soon as they
    /// are accepted. Also bounded by what the open-files limit leaves after a reserve of 64
    /// descriptors (halved for the gateway, whose requests each open an outgoing connection),
    /// so the store, logs and outgoing connections always have room.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: Span::from_millis(10_000),
            idle_timeout: Span::from_secs(60),
            max_connections: 65_536,
        }
    }
}

/// An [`HttpConfig`] value that cannot work: the key below the section and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfigProblem {
    /// `header_read_timeout`, `idle_timeout` or `max_connections`.
    pub field: &'static str,
    pub problem: &'static str,
}

impl HttpConfig {
    /// Checks ranges; each service reports the problem under its own section.
    pub fn check(&self) -> Result<(), HttpConfigProblem> {
        let bad = |field, problem| Err(HttpConfigProblem { field, problem });
        if self.header_read_timeout.as_millis() < 100 {
            return bad("header_read_timeout", "must be at least 100ms");
        }
        if self.idle_timeout.as_secs() == 0 {
            return bad("idle_timeout", "must be at least 1s");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        Ok(())
    }

    /// How long a client may take to send a request head.
    pub fn header_read_timeout(&self) -> Duration {
        self.header_read_timeout.get()
    }

    /// How long a kept-alive connection may wait for its next request.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.get()
    }
}
