//! An admitted daemon link's session on the server side (the coordinator's hub, the relay's
//! downstream): a writer task drains the outbound queue; frames are read in batches until the
//! daemon leaves, falls silent past the heartbeat limit, or stops reading what it is sent;
//! then the link closes with a code and reason (`kennel_proto::link::close`).
//!
//! It must not know what the frames mean: each batch goes to the caller's handler.

use std::future::Future;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use kennel_proto::link::close;
use tokio_tungstenite::tungstenite::Message;

use crate::outbound::{LinkRx, LinkTx};
use crate::ws::{self, Closing, IntoFrame, LinkSocket};

/// How long the writer may take to send the close once a link has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs an admitted link until it ends and returns why: the writer task sends what `tx`
/// queues; frames are read in batches of up to `batch` ([`next_batch`]) and each batch goes to
/// `handle`, which may end the link. Silence past `silence`, the daemon leaving, or an
/// overflowing queue end it too. The close is queued behind what is waiting, and the writer
/// gets [`CLOSE_GRACE`] to send it before the socket is dropped.
pub async fn serve<T, H, Fut>(
    socket: LinkSocket,
    tx: &LinkTx<T>,
    rx: LinkRx<T>,
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
            let frames = match next_batch(&mut stream, silence, batch).await {
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
}
