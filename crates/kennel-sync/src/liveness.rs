//! When a node counts as gone. Each observer judges by its own clock: a node is live while
//! its heartbeat counter was last seen to move less than the TTL ago, as this observer
//! measured it. No timestamp written on another machine is ever compared with this one's
//! clock, so a skewed clock elsewhere cannot make a live holder look dead (or a dead one
//! live): only silence can. A node first seen now is live for a TTL from now.

use std::collections::HashMap;

/// Heartbeats as one observer saw them.
#[derive(Debug, Clone)]
pub struct Liveness {
    ttl_ms: i64,
    /// Node → the counter last seen, and when (this observer's clock) it was first seen.
    seen: HashMap<String, (i64, i64)>,
}

impl Liveness {
    pub fn new(ttl_ms: i64) -> Liveness {
        Liveness {
            ttl_ms,
            seen: HashMap::new(),
        }
    }

    /// Records `node`'s heartbeat counter as read from the document at `now`.
    pub fn observe(&mut self, node: &str, counter: i64, now: i64) {
        match self.seen.get_mut(node) {
            Some((c, _)) if *c == counter => {}
            Some(entry) => *entry = (counter, now),
            None => {
                self.seen.insert(node.to_string(), (counter, now));
            }
        }
    }

    /// Whether `node` counts as alive at `now`: its counter moved within the TTL.
    pub fn is_live(&self, node: &str, now: i64) -> bool {
        self.seen
            .get(node)
            .is_some_and(|(_, at)| now - at < self.ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_live_while_its_counter_moves_and_gone_after_a_silent_ttl() {
        let mut l = Liveness::new(600_000);
        l.observe("a", 1, 0);
        assert!(l.is_live("a", 599_999));
        assert!(!l.is_live("a", 600_000));
        // The same counter seen again is not a heartbeat.
        l.observe("a", 1, 500_000);
        assert!(!l.is_live("a", 600_000));
        // It moved: live again from when this observer saw it move.
        l.observe("a", 2, 700_000);
        assert!(l.is_live("a", 1_299_999));
        assert!(!l.is_live("b", 0), "never seen: not live");
    }
}
