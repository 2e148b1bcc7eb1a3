//! Daemon messages the relay has sent upstream and the upstream has not acked yet, kept in
//! memory while the upstream link is up. Writing each one to `relay.db` before forwarding it
//! cost a commit per message and per ack on the forwarding path; it buys nothing while the link
//! is up, because the daemon that sent a message keeps it in its own outbox until the relay
//! passes the upstream's ack back. When the link drops, the relay moves what is here into
//! `relay.db` (see `Relay::upstream_down`), so a relay restart during an outage still replays it.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// One unacknowledged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub frame: String,
}

/// Unacknowledged messages in arrival order, indexed by attempt for cumulative acks.
#[derive(Debug, Default)]
pub struct Pending {
    next: u64,
    items: BTreeMap<u64, Item>,
    /// task id → attempt → (seq, arrival number), in arrival order.
    by_attempt: HashMap<String, BTreeMap<u32, VecDeque<(u64, u64)>>>,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn push(&mut self, task_id: &str, attempt: u32, seq: u64, frame: &str) {
        let id = self.next;
        self.next += 1;
        self.by_attempt
            .entry(task_id.to_string())
            .or_default()
            .entry(attempt)
            .or_default()
            .push_back((seq, id));
        self.items.insert(
            id,
            Item {
                task_id: task_id.to_string(),
                attempt,
                seq,
                frame: frame.to_string(),
            },
        );
    }

    /// Every (task, attempt) with a message waiting for its ack.
    pub fn attempts(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.by_attempt.iter().flat_map(|(t, by)| {
            by.iter()
                .filter(|(_, q)| !q.is_empty())
                .map(move |(a, _)| (t.as_str(), *a))
        })
    }

    /// Drops everything of (task, attempt) up to and including `seq` (a cumulative ack).
    pub fn ack(&mut self, task_id: &str, attempt: u32, seq: u64) {
        self.remove_where(task_id, attempt, |s| s <= seq);
    }

    /// Drops every message of (task, attempt): the upstream will never apply them.
    pub fn drop_attempt(&mut self, task_id: &str, attempt: u32) {
        self.remove_where(task_id, attempt, |_| true);
    }

    /// Drops one message of (task, attempt) by its seq.
    pub fn remove_seq(&mut self, task_id: &str, attempt: u32, seq: u64) {
        self.remove_where(task_id, attempt, |s| s == seq);
    }

    fn remove_where(&mut self, task_id: &str, attempt: u32, gone: impl Fn(u64) -> bool) {
        let Some(attempts) = self.by_attempt.get_mut(task_id) else {
            return;
        };
        let Some(q) = attempts.get_mut(&attempt) else {
            return;
        };
        // Replays can put a lower seq behind a higher one, so look at the whole queue.
        let items = &mut self.items;
        q.retain(|&(s, id)| {
            if gone(s) {
                items.remove(&id);
                false
            } else {
                true
            }
        });
        if q.is_empty() {
            attempts.remove(&attempt);
            if attempts.is_empty() {
                self.by_attempt.remove(task_id);
            }
        }
    }

    /// Takes everything, oldest first.
    pub fn drain(&mut self) -> Vec<Item> {
        self.by_attempt.clear();
        std::mem::take(&mut self.items).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(p: &mut Pending) -> Vec<(String, u64)> {
        p.drain().into_iter().map(|i| (i.task_id, i.seq)).collect()
    }

    #[test]
    fn cumulative_acks_drop_only_their_attempt() {
        let mut p = Pending::default();
        p.push("a", 1, 1, "a1");
        p.push("b", 1, 1, "b1");
        p.push("a", 1, 2, "a2");
        p.push("a", 2, 1, "a2-1");
        p.push("a", 1, 3, "a3");
        p.ack("a", 1, 2);
        assert_eq!(p.len(), 3);
        p.ack("zzz", 1, 9);
        p.ack("a", 3, 9);
        assert_eq!(
            seqs(&mut p),
            vec![("b".into(), 1), ("a".into(), 1), ("a".into(), 3)]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn replayed_lower_seq_behind_a_higher_one_is_acked_too() {
        let mut p = Pending::default();
        p.push("a", 1, 5, "5");
        p.push("a", 1, 4, "4 again");
        p.push("a", 1, 6, "6");
        p.ack("a", 1, 5);
        let left = p.drain();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].frame, "6");
    }

    #[test]
    fn dropping_an_attempt_keeps_the_others() {
        let mut p = Pending::default();
        p.push("a", 1, 1, "x");
        p.push("a", 2, 1, "y");
        p.drop_attempt("a", 1);
        assert_eq!(p.drain()[0].frame, "y");
    }
}
