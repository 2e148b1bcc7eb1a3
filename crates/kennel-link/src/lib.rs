//! The daemon link's shared pieces, used by every end of it: the coordinator's hub and the
//! relay's downstream (server side), the daemon and the relay's upstream (client side). Each
//! rule here exists once, so the ends cannot drift apart.
//!
//! This crate grows as the link's copies are folded into it (issue 12): for now the server
//! side's frame reading (batches, the silence limit and how a link ends) and the client side's
//! reconnect backoff.

use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::{FutureExt, Stream, StreamExt};
use kennel_proto::link::close;
use tokio_tungstenite::tungstenite::Message;

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

/// Why a link ended, as the close code and reason to record.
pub type LinkEnd = (u16, String);

/// The next frames from the other end: waits up to `silence` for one, then takes whatever else
/// has already arrived, up to `max` in all, so they can be handled under one lock and one store
/// transaction. `Err` says how the link ended: silent past the limit ([`close::SILENT`]),
/// closed (1000) or a transport failure (1002).
pub async fn next_batch<S, E>(
    stream: &mut S,
    silence: Duration,
    max: usize,
) -> Result<Vec<Message>, LinkEnd>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let first = match tokio::time::timeout(silence, stream.next()).await {
        Err(_) => {
            return Err((
                close::SILENT,
                format!("no frame for {}s (heartbeats missed)", silence.as_secs()),
            ))
        }
        Ok(None) => return Err((1000, "connection closed".into())),
        Ok(Some(Err(e))) => return Err((1002, format!("transport error: {e}"))),
        Ok(Some(Ok(m))) => m,
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match stream.next().now_or_never() {
            Some(Some(Ok(m))) => batch.push(m),
            _ => break,
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Result<Message, String> {
        Ok(Message::text(s))
    }

    #[tokio::test]
    async fn a_batch_takes_what_has_arrived_up_to_the_limit() {
        let mut s = futures_util::stream::iter([text("a"), text("b"), text("c")]);
        let b = next_batch(&mut s, Duration::from_secs(1), 2).await.unwrap();
        assert_eq!(b, [Message::text("a"), Message::text("b")]);
        let b = next_batch(&mut s, Duration::from_secs(1), 2).await.unwrap();
        assert_eq!(b, [Message::text("c")]);
        assert_eq!(
            next_batch(&mut s, Duration::from_secs(1), 2).await,
            Err((1000, "connection closed".into()))
        );
    }

    #[tokio::test]
    async fn a_failed_transport_and_silence_end_the_link() {
        let mut s = futures_util::stream::iter([Err::<Message, _>("reset".to_string())]);
        assert_eq!(
            next_batch(&mut s, Duration::from_secs(1), 8).await,
            Err((1002, "transport error: reset".into()))
        );
        // A stream that never yields: the batch ends at the silence limit.
        let mut quiet = futures_util::stream::pending::<Result<Message, String>>();
        let end = next_batch(&mut quiet, Duration::from_millis(20), 8).await;
        assert_eq!(
            end,
            Err((close::SILENT, "no frame for 0s (heartbeats missed)".into()))
        );
    }

    #[test]
    fn the_backoff_starts_near_a_second_and_never_passes_a_minute() {
        let delays: Vec<Duration> = reconnect_backoff().take(12).collect();
        assert!(delays[0] >= Duration::from_secs(1) && delays[0] <= Duration::from_secs(2));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(120)));
        assert!(delays[11] >= Duration::from_secs(60), "{delays:?}");
    }
}
