//! The daemon link's shared pieces, used by every end of it: the coordinator's hub and the
//! relay's downstream (server side), the daemon and the relay's upstream (client side). Each
//! rule here exists once, so the ends cannot drift apart.
//!
//! The server side: accepting the WebSocket with its pre-authentication limits ([`ws`]), the
//! handshake ([`handshake`]), the bounded outbound queue ([`outbound`]) and the session
//! ([`session`]: the writer, batches of frames, the silence limit, how a link ends). The client
//! side: the session and its reconnect loop ([`client`]) and the reconnect backoff.

pub mod client;
pub mod handshake;
pub mod outbound;
pub mod session;
pub mod ws;

pub use session::{next_batch, serve, LinkEnd};

pub mod schedule;

use std::time::Duration;

use backon::BackoffBuilder;

/// Delays between reconnect attempts: from 1 s, doubling up to 60 s, with jitter, forever.
/// Start a new one after a session that got as far as being accepted.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(60))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_starts_near_a_second_and_never_passes_a_minute() {
        let delays: Vec<Duration> = reconnect_backoff().take(12).collect();
        assert!(delays[0] >= Duration::from_secs(1) && delays[0] <= Duration::from_secs(2));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(120)));
        assert!(delays[11] >= Duration::from_secs(60), "{delays:?}");
    }
}
