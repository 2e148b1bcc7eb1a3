//! The one clock of kennel's coordinator, relay and gateway, and the deadline queue that runs
//! their timeouts on it.
//!
//! Every lease, grace period and cooldown is a deadline in milliseconds of a [`Clock`]. In
//! production that is [`SystemClock`]; tests use [`ManualClock`] and move time forward with
//! [`ManualClock::advance`], so timeout behaviour is tested at once, without sleeping.
//!
//! [`Deadlines`] is one timer task per owner instead of a `tokio::spawn(sleep)` per deadline:
//! deadlines go into a heap, the task sleeps (on the clock) until the earliest, and hands each
//! key that is due to the owner's receiver, in deadline order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// A future the clock resolves.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Wall-clock time, injected so state machines can be tested without waiting.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Resolves once [`Clock::now_ms`] has reached `at_ms` (at once if it has).
    fn sleep_until(&self, at_ms: i64) -> Sleep;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep {
        let wait = at_ms.saturating_sub(self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that moves only when told: the test double for everything timed.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<i64>>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        ManualClock {
            now: Arc::new(watch::Sender::new(start_ms)),
        }
    }

    /// Moves the clock forward by `by`; whatever sleeps until a time now reached wakes.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now.send_modify(|now| *now = now.saturating_add(by));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        *self.now.borrow()
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep {
        let mut now = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as any clone of the clock; if it is gone nothing can
            // move time any more, so the sleep never ends, as it would not on a stopped clock.
            if now.wait_for(|now| *now >= at_ms).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Where an owner puts its deadlines; the keys come back on the receiver returned by
/// [`Deadlines::start`] once the clock reaches them. Dropping every `Deadlines` handle ends the
/// timer task after it has handed out what was due.
#[derive(Debug)]
pub struct Deadlines<K> {
    tx: mpsc::UnboundedSender<(i64, K)>,
    clock: Arc<dyn Clock>,
}

impl<K> Clone for Deadlines<K> {
    fn clone(&self) -> Self {
        Deadlines {
            tx: self.tx.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now_ms = {})", self.now_ms())
    }
}

impl<K: Send + 'static> Deadlines<K> {
    /// Starts the timer task on the current tokio runtime.
    pub fn start(clock: Arc<dyn Clock>) -> (Self, mpsc::UnboundedReceiver<K>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (due_tx, due_rx) = mpsc::unbounded_channel();
        tokio::spawn(timer(clock.clone(), rx, due_tx));
        (Deadlines { tx, clock }, due_rx)
    }

    /// Hands `key` back at `at_ms` of the clock.
    pub fn at(&self, at_ms: i64, key: K) {
        // The timer task ends only when every handle is gone or the receiver was dropped;
        // either way nobody waits for the key any more.
        let _ = self.tx.send((at_ms, key));
    }

    /// Hands `key` back `after` from now.
    pub fn after(&self, after: Duration, key: K) {
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        self.at(self.clock.now_ms().saturating_add(after), key);
    }

    /// The clock the deadlines are measured on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// One entry of the heap: earliest deadline first, then first scheduled first.
struct Entry<K> {
    at: i64,
    seq: u64,
    key: K,
}

impl<K> PartialEq for Entry<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<K> Eq for Entry<K> {}
impl<K> PartialOrd for Entry<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Entry<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

async fn timer<K: Send + 'static>(
    clock: Arc<dyn Clock>,
    mut rx: mpsc::UnboundedReceiver<(i64, K)>,
    due: mpsc::UnboundedSender<K>,
) {
    let mut heap: BinaryHeap<Reverse<Entry<K>>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut open = true;
    loop {
        // Take in what was scheduled meanwhile, so that keys due together come out in deadline
        // order whichever arrived first.
        while open {
            match rx.try_recv() {
                Ok((at, key)) => {
                    seq += 1;
                    heap.push(Reverse(Entry { at, seq, key }));
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        // Hand out everything that is due.
        let now = clock.now_ms();
        while heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
            if let Some(Reverse(e)) = heap.pop() {
                if due.send(e.key).is_err() {
                    return;
                }
            }
        }
        let next = heap.peek().map(|Reverse(e)| e.at);
        if !open && next.is_none() {
            return;
        }
        let sleep = match next {
            Some(at) => clock.sleep_until(at),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            () = sleep => {}
            got = rx.recv(), if open => match got {
                Some((at, key)) => {
                    seq += 1;
                    heap.push(Reverse(Entry { at, seq, key }));
                }
                None => open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets spawned tasks run until they wait again (the tests use a current-thread runtime).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn deadlines_come_back_in_order_when_the_manual_clock_reaches_them() {
        let clock = ManualClock::new(1_000);
        let (deadlines, mut due) = Deadlines::start(Arc::new(clock.clone()));
        deadlines.after(Duration::from_secs(30), "lease");
        deadlines.at(1_000 + 5_000, "grace");
        deadlines.at(1_000 + 5_000, "second at the same time");
        deadlines.at(0, "already due");
        settle().await;
        assert_eq!(due.try_recv().ok(), Some("already due"));
        assert!(due.try_recv().is_err(), "nothing else is due yet");

        clock.advance(Duration::from_millis(4_999));
        settle().await;
        assert!(due.try_recv().is_err(), "a millisecond early");
        clock.advance(Duration::from_millis(1));
        settle().await;
        assert_eq!(due.try_recv().ok(), Some("grace"));
        assert_eq!(due.try_recv().ok(), Some("second at the same time"));
        assert!(due.try_recv().is_err());

        // An earlier deadline added later still comes first.
        deadlines.after(Duration::from_secs(1), "late but soon");
        clock.advance(Duration::from_secs(30));
        settle().await;
        assert_eq!(due.try_recv().ok(), Some("late but soon"));
        assert_eq!(due.try_recv().ok(), Some("lease"));
    }

    #[tokio::test]
    async fn the_timer_ends_when_every_handle_is_dropped() {
        let clock = ManualClock::new(0);
        let (deadlines, mut due) = Deadlines::<u8>::start(Arc::new(clock.clone()));
        deadlines.at(10, 1);
        drop(deadlines);
        clock.advance(Duration::from_millis(10));
        assert_eq!(due.recv().await, Some(1), "what was scheduled still comes");
        assert_eq!(due.recv().await, None, "then the queue ends");
    }

    #[tokio::test]
    async fn the_system_clock_sleeps_until_a_time() {
        let clock = SystemClock;
        let start = clock.now_ms();
        clock.sleep_until(start + 20).await;
        assert!(clock.now_ms() >= start + 20);
        clock.sleep_until(start - 1_000).await; // in the past: at once
    }
}
