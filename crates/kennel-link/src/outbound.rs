//! The queue of frames waiting to be written to one daemon connection. It is bounded: a daemon
//! that stops reading (or floods the server with frames whose answers it never reads) fills
//! it, and the connection is then closed with a reason instead of the server buffering
//! without limit. Senders never wait: a full queue trips the connection's wire, which the
//! reader and the writer of that connection both watch.
//!
//! It must not decide what to send; it only carries frames and the verdict to close.

use std::sync::{Arc, Mutex};

use kennel_proto::link::close;
use kennel_proto::ServerMessage;
use tokio::sync::{mpsc, Notify};

/// A frame (or a close) for one daemon connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// Boxed: the queue's slots are allocated in blocks of 32, and an idle link should cost
    /// pointers, not 32 full messages.
    Msg(Box<ServerMessage>),
    Close(u16, String),
}

/// Set once, when the connection must end at once (its queue overflowed).
#[derive(Debug, Default)]
struct Wire {
    reason: Mutex<Option<(u16, String)>>,
    notify: Notify,
}

impl Wire {
    fn trip(&self, code: u16, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            metrics::counter!("kennel_links_overflowed_total").increment(1);
            *r = Some((code, reason));
            self.notify.notify_waiters();
        }
    }

    fn tripped(&self) -> Option<(u16, String)> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn wait(&self) -> (u16, String) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if let Some(r) = self.tripped() {
                return r;
            }
            n.await;
        }
    }
}

/// The sending half: cloned into the coordinator's view of the connection. Generic over what
/// is queued, so the relay's downstream links (which queue frames as received) use it too.
#[derive(Debug)]
pub struct LinkTx<T = Outbound> {
    tx: mpsc::Sender<T>,
    wire: Arc<Wire>,
    bound: usize,
}

impl<T> Clone for LinkTx<T> {
    fn clone(&self) -> Self {
        LinkTx {
            tx: self.tx.clone(),
            wire: self.wire.clone(),
            bound: self.bound,
        }
    }
}

/// The receiving half, owned by the connection's writer.
#[derive(Debug)]
pub struct LinkRx<T = Outbound> {
    rx: mpsc::Receiver<T>,
    wire: Arc<Wire>,
}

/// A queue of at most `bound` frames.
pub fn channel<T>(bound: usize) -> (LinkTx<T>, LinkRx<T>) {
    let bound = bound.max(1);
    let (tx, rx) = mpsc::channel(bound);
    let wire = Arc::new(Wire::default());
    (
        LinkTx {
            tx,
            wire: wire.clone(),
            bound,
        },
        LinkRx { rx, wire },
    )
}

impl<T> LinkTx<T> {
    /// Queues a frame without waiting. A full queue closes the connection (close code
    /// [`close::SLOW_READER`]); a closed one drops the frame (the connection is going away and
    /// its disconnect handles the rest).
    pub fn send(&self, o: T) {
        match self.tx.try_send(o) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.wire.trip(
                    close::SLOW_READER,
                    format!(
                        "{} frames are waiting to be sent: the daemon is not reading what the \
                         server sends; reconnect and read",
                        self.bound
                    ),
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Resolves with the close code and reason once the queue has overflowed.
    pub async fn overflowed(&self) -> (u16, String) {
        self.wire.wait().await
    }
}

impl crate::ws::IntoFrame for Outbound {
    fn into_frame(self) -> crate::ws::Frame {
        match self {
            Outbound::Msg(m) => crate::ws::Frame::Text(m.to_json()),
            Outbound::Close(code, reason) => crate::ws::Frame::Close(code, reason),
        }
    }
}

impl crate::ws::Closing for Outbound {
    fn closing(code: u16, reason: String) -> Self {
        Outbound::Close(code, reason)
    }
}

impl LinkTx<Outbound> {
    pub fn msg(&self, m: ServerMessage) {
        self.send(Outbound::Msg(Box::new(m)));
    }
}

impl<T> LinkRx<T> {
    /// The next frame, or `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// A handle that resolves once the queue has overflowed: the writer stops and closes.
    pub fn tripwire(&self) -> Tripwire {
        Tripwire(self.wire.clone())
    }
}

/// See [`LinkRx::tripwire`].
#[derive(Debug, Clone)]
pub struct Tripwire(Arc<Wire>);

impl Tripwire {
    pub async fn overflowed(&self) -> (u16, String) {
        self.0.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_trips_the_wire_once() {
        let (tx, mut rx) = channel::<Outbound>(2);
        for _ in 0..5 {
            tx.msg(ServerMessage::error(kennel_proto::ErrorCode::Internal, "x"));
        }
        let (code, reason) = rx.tripwire().overflowed().await;
        assert_eq!(code, close::SLOW_READER);
        assert!(reason.starts_with("2 frames are waiting"), "{reason}");
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(
            rx.try_recv().is_none(),
            "nothing beyond the bound was queued"
        );
    }
}
