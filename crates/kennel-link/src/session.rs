//! An admitted daemon link's session on the server side (the coordinator's hub, the relay's
//! downstream): a writer task drains the outbound queue; frames are read in batches until the
//! daemon leaves, falls silent past the heartbeat limit, or stops reading what it is sent;
//! then the link closes with a code and reason (`kennel_proto::link::close`).
//!
//! It must not know what the frames mean: each batch goes to the caller's handler.

use std::future::Future;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use kennel_clock::Clock;
use kennel_proto::link::close;
use tokio_tungstenite::tungstenite::Message;

use crate::outbound::{LinkRx, LinkTx};
use crate::ws::{self, Closing, IntoFrame, LinkSocket};

/// How long the writer may take to send the close once a link has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs an admitted link until it ends and returns why: the writer task sends what `tx`
/// queues; frames are read in batches of up to `batch` ([`next_batch`]) and each batch goes to
/// `handle`, which may end the link. Silence past `silence` on `clock`, the daemon leaving, or an
/// overflowing queue end it too. The close is queued behind what is waiting, and the writer
/// gets [`CLOSE_GRACE`] to send it before the socket is dropped.
pub async fn serve<T, H, Fut>(
    socket: LinkSocket,
    tx: &LinkTx<T>,
    rx: LinkRx<T>,
    clock: &dyn Clock,
    silence: Duration,
    batch: usize,
    mut handle: H,
) -> LinkEnd
where
    T: IntoFrame + Closing + Send + 'static,
    H: FnMut(Vec<Message>) -> Fut,
    Fut: Future<Output = Option<LinkEnd>>,
{
    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(ws::write_loop(sink, rx));
    let read = async {
        loop {
            // Whatever already arrived is handled together.
            let frames = match next_batch(&mut stream, clock, silence, batch).await {
                Ok(frames) => frames,
                Err(end) => return end,
            };
            if let Some(end) = handle(frames).await {
                return end;
            }
        }
    };
    let (code, reason) = tokio::select! {
        r = read => r,
        r = tx.overflowed() => r,
    };
    tx.send(T::closing(code, reason.clone()));
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        // Stuck writing to a peer that does not read: drop the socket.
        writer.abort();
    }
    (code, reason)
}

/// Why a link ended, as the close code and reason to record.
pub type LinkEnd = (u16, String);

/// The next frames from the other end: waits up to `silence` on `clock` for one (heartbeat
/// silence runs on the injected clock, so it is tested without waiting), then takes whatever else
/// has already arrived, up to `max` in all, so they can be handled under one lock and one store
/// transaction. `Err` says how the link ended: silent past the limit ([`close::SILENT`]),
/// closed (1000) or a transport failure (1002).
pub async fn next_batch<S, E>(
    stream: &mut S,
    clock: &dyn Clock,
    silence: Duration,
    max: usize,
) -> Result<Vec<Message>, LinkEnd>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    // Under load a frame is usually waiting already: take it without arming the limit.
    let next = match stream.next().now_or_never() {
        Some(next) => next,
        None => {
            let limit =
                clock.sleep_until(clock.now_ms().saturating_add(silence.as_millis() as i64));
            tokio::select! {
                next = stream.next() => next,
                () = limit => {
                    return Err((
                        close::SILENT,
                        format!("no frame for {}s (heartbeats missed)", silence.as_secs()),
                    ))
                }
            }
        }
    };
    let first = match next {
        None => return Err((1000, "connection closed".into())),
        Some(Err(e)) => return Err((1002, format!("transport error: {e}"))),
        Some(Ok(m)) => m,
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
    use kennel_clock::ManualClock;

    fn text(s: &str) -> Result<Message, String> {
        Ok(Message::text(s))
    }

    /// Lets spawned tasks run up to their next wait.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_batch_takes_what_has_arrived_up_to_the_limit() {
        let clock = ManualClock::new(0);
        let mut s = futures_util::stream::iter([text("a"), text("b"), text("c")]);
        let b = next_batch(&mut s, &clock, Duration::from_secs(1), 2)
            .await
            .unwrap();
        assert_eq!(b, [Message::text("a"), Message::text("b")]);
        let b = next_batch(&mut s, &clock, Duration::from_secs(1), 2)
            .await
            .unwrap();
        assert_eq!(b, [Message::text("c")]);
        assert_eq!(
            next_batch(&mut s, &clock, Duration::from_secs(1), 2).await,
            Err((1000, "connection closed".into()))
        );
    }

    #[tokio::test]
    async fn a_failed_transport_ends_the_link() {
        let clock = ManualClock::new(0);
        let mut s = futures_util::stream::iter([Err::<Message, _>("reset".to_string())]);
        assert_eq!(
            next_batch(&mut s, &clock, Duration::from_secs(1), 8).await,
            Err((1002, "transport error: reset".into()))
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn silence_is_counted_on_the_clock_from_the_last_frame() {
        let clock = ManualClock::new(1_000);
        let (frames, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Message, String>>();
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let reader = {
            let clock = clock.clone();
            tokio::spawn(async move {
                let mut stream = Box::pin(stream);
                let mut got = Vec::new();
                loop {
                    match next_batch(&mut stream, &clock, Duration::from_secs(30), 8).await {
                        Ok(batch) => got.extend(batch),
                        Err(end) => return (got, end, clock.now_ms()),
                    }
                }
            })
        };
        settle().await;
        // A heartbeat 20 s in restarts the count: 29 s after it the link is still up.
        clock.advance(Duration::from_secs(20));
        frames.send(text("heartbeat")).unwrap();
        settle().await;
        clock.advance(Duration::from_secs(29));
        settle().await;
        assert!(!reader.is_finished(), "ended before 30 s of silence");
        clock.advance(Duration::from_secs(1));
        let (got, end, at) = reader.await.unwrap();
        assert_eq!(got, [Message::text("heartbeat")]);
        assert_eq!(
            end,
            (close::SILENT, "no frame for 30s (heartbeats missed)".into())
        );
        assert_eq!(at, 1_000 + 50_000);
    }
}
