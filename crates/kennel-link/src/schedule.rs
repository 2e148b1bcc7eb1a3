//! The scheduling rules every end that hands out attempts applies: the coordinator to its
//! daemons and the relay to its downstream daemons. Which daemon takes a task (the least-loaded
//! pick), what becomes of the attempts a reconnecting daemon does or does not list
//! (kept, stale, lost), and when a disconnected daemon's reattach grace costs it its attempts.
//!
//! Pure and typed: callers describe their daemons and attempts as they see them and act on the
//! answer. Nothing here sends, stores, logs or reads a clock.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use kennel_proto::link::TaskRef;

/// One daemon as the pick sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its id, returned when it is picked; the last tie-break (lowest first).
    pub id: &'a str,
    /// It has a live connection.
    pub connected: bool,
    /// Its operator is draining it: it keeps what it runs and gets nothing new.
    pub draining: bool,
    /// Attempts it may hold at once.
    pub max: u32,
    /// Attempts it holds now.
    pub running: u32,
    /// It refused a task for capacity and has not reported a free slot since.
    pub full: bool,
    /// The agent profiles it offers.
    pub agents: &'a BTreeSet<String>,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The dispatch counter at its last pick (0: never picked); lower has been idle longer.
    pub last_pick: u64,
}

impl Candidate<'_> {
    /// Slots it could take more attempts in now: none while marked full.
    pub fn free(&self) -> u32 {
        if self.full {
            return 0;
        }
        self.max.saturating_sub(self.running)
    }

    /// Whether it could ever run a task that needs `needs` (free slots aside): it offers the
    /// agent and carries every label the task asks for, with the same value.
    pub fn serves(&self, needs: &Needs<'_>) -> bool {
        self.agents.contains(needs.agent)
            && needs
                .labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// Whether it may be given a task that needs `needs` now.
    pub fn can_take(&self, needs: &Needs<'_>) -> bool {
        self.connected && !self.draining && self.free() > 0 && self.serves(needs)
    }
}

/// What a task needs of a daemon.
#[derive(Debug, Clone, Copy)]
pub struct Needs<'a> {
    /// The agent profile it runs with.
    pub agent: &'a str,
    /// Labels the daemon must carry, with these values.
    pub labels: &'a BTreeMap<String, String>,
}

/// No labels: what a task needs when its spawn does not carry any.
pub static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// How the pick chooses between daemons that run equally many attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ties {
    /// The one with the most free slots, then the one idle longest (the coordinator).
    MostFreeThenIdlest,
    /// The one idle longest (the relay).
    Idlest,
}

/// The daemon a task that needs `needs` goes to: of those that may take it now, the one that
/// runs the fewest attempts, ties broken as `ties` says and finally by the lowest id. `None`
/// when no daemon may take it.
pub fn pick<'a>(
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    needs: &Needs<'_>,
    ties: Ties,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| c.can_take(needs))
        .min_by_key(|c| {
            let most_free = match ties {
                Ties::MostFreeThenIdlest => c.free(),
                Ties::Idlest => 0,
            };
            (c.running, std::cmp::Reverse(most_free), c.last_pick, c.id)
        })
        .map(|c| c.id)
}

/// What becomes of a reconnecting daemon's attempts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reattach {
    /// Held for it and listed by it: they carry on.
    pub kept: Vec<TaskRef>,
    /// Listed by it but not held for it (another attempt, another daemon, or ended): it must
    /// stop them and drop their messages. In the order it listed them.
    pub stale: Vec<TaskRef>,
    /// Held for it but not listed: it no longer runs them, so they are lost. In the order
    /// they were held.
    pub lost: Vec<TaskRef>,
}

/// Settles a reconnecting daemon's attempts: `held` are those the scheduler holds for it,
/// `running` those it lists in its `authenticate`. An attempt matches only with the same task
/// and the same attempt number.
pub fn reattach(held: impl IntoIterator<Item = TaskRef>, running: &[TaskRef]) -> Reattach {
    let listed: HashSet<(&str, u32)> = running
        .iter()
        .map(|r| (r.task_id.as_str(), r.attempt))
        .collect();
    let mut out = Reattach::default();
    let mut held_keys: HashSet<(String, u32)> = HashSet::new();
    for h in held {
        held_keys.insert((h.task_id.clone(), h.attempt));
        if listed.contains(&(h.task_id.as_str(), h.attempt)) {
            out.kept.push(h);
        } else {
            out.lost.push(h);
        }
    }
    for r in running {
        if !held_keys.contains(&(r.task_id.clone(), r.attempt)) {
            out.stale.push(r.clone());
        }
    }
    out
}

/// Counts a daemon's connects and disconnects, so a reattach grace started at one disconnect
/// knows whether anything has happened since.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

impl Generation {
    /// A connect or a disconnect: returns the new generation.
    pub fn bump(&mut self) -> Generation {
        self.0 += 1;
        *self
    }

    /// The reattach grace started at the disconnect that made generation `at_disconnect` has
    /// run out: whether the daemon's attempts are lost now. Only if it is still disconnected
    /// and has neither come back nor gone again since (a later disconnect starts its own grace).
    pub fn grace_lapsed(self, at_disconnect: Generation, connected: bool) -> bool {
        self == at_disconnect && !connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon for the tables; [`daemon`] makes one connected, not draining, not full, never
    /// picked, offering `command`.
    struct Daemon {
        id: &'static str,
        connected: bool,
        draining: bool,
        max: u32,
        running: u32,
        full: bool,
        agents: BTreeSet<String>,
        labels: BTreeMap<String, String>,
        last_pick: u64,
    }

    fn daemon(id: &'static str, max: u32, running: u32) -> Daemon {
        Daemon {
            id,
            connected: true,
            draining: false,
            max,
            running,
            full: false,
            agents: ["command".to_string()].into(),
            labels: BTreeMap::new(),
            last_pick: 0,
        }
    }

    impl Daemon {
        fn candidate(&self) -> Candidate<'_> {
            Candidate {
                id: self.id,
                connected: self.connected,
                draining: self.draining,
                max: self.max,
                running: self.running,
                full: self.full,
                agents: &self.agents,
                labels: &self.labels,
                last_pick: self.last_pick,
            }
        }
        fn picked(mut self, n: u64) -> Self {
            self.last_pick = n;
            self
        }
        fn off(mut self) -> Self {
            self.connected = false;
            self
        }
        fn draining(mut self) -> Self {
            self.draining = true;
            self
        }
        fn full(mut self) -> Self {
            self.full = true;
            self
        }
        fn agents(mut self, a: &[&str]) -> Self {
            self.agents = a.iter().map(|s| s.to_string()).collect();
            self
        }
        fn labels(mut self, l: &[(&str, &str)]) -> Self {
            self.labels = labels(l);
            self
        }
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_pick_follows_load_then_ties_then_requirements() {
        use Ties::*;
        /// What the case shows, the daemons, the task's agent and labels, the ties rule, the pick.
        type Case = (
            &'static str,
            Vec<Daemon>,
            &'static str,
            &'static [(&'static str, &'static str)],
            Ties,
            Option<&'static str>,
        );
        let none: &[(&str, &str)] = &[];
        let cases: Vec<Case> = vec![
            ("no daemons", vec![], "command", none, Idlest, None),
            (
                "fewest running wins",
                vec![daemon("a", 4, 2), daemon("b", 4, 1), daemon("c", 4, 3)],
                "command",
                none,
                Idlest,
                Some("b"),
            ),
            (
                "equal load: idle longest",
                vec![daemon("a", 2, 1).picked(7), daemon("b", 2, 1).picked(3)],
                "command",
                none,
                Idlest,
                Some("b"),
            ),
            (
                "equal load, idle longest ignores free slots",
                vec![daemon("a", 8, 1).picked(7), daemon("b", 2, 1).picked(3)],
                "command",
                none,
                Idlest,
                Some("b"),
            ),
            (
                "equal load, most free first for the coordinator",
                vec![daemon("a", 8, 1).picked(7), daemon("b", 2, 1).picked(3)],
                "command",
                none,
                MostFreeThenIdlest,
                Some("a"),
            ),
            (
                "equal load and free: idle longest for the coordinator too",
                vec![daemon("a", 2, 1).picked(7), daemon("b", 2, 1).picked(3)],
                "command",
                none,
                MostFreeThenIdlest,
                Some("b"),
            ),
            (
                "a full tie: the lowest id",
                vec![daemon("b", 2, 0), daemon("a", 2, 0), daemon("c", 2, 0)],
                "command",
                none,
                Idlest,
                Some("a"),
            ),
            (
                "load beats free slots",
                vec![daemon("a", 8, 2), daemon("b", 2, 1)],
                "command",
                none,
                MostFreeThenIdlest,
                Some("b"),
            ),
            (
                "no free slot: nothing",
                vec![daemon("a", 2, 2), daemon("b", 1, 3)],
                "command",
                none,
                Idlest,
                None,
            ),
            (
                "no slots at all (shutting down): nothing",
                vec![daemon("a", 0, 0)],
                "command",
                none,
                Idlest,
                None,
            ),
            (
                "full daemons are skipped even with slots",
                vec![daemon("a", 4, 0).full(), daemon("b", 4, 3)],
                "command",
                none,
                Idlest,
                Some("b"),
            ),
            (
                "draining and disconnected daemons are skipped",
                vec![
                    daemon("a", 4, 0).draining(),
                    daemon("b", 4, 0).off(),
                    daemon("c", 4, 3),
                ],
                "command",
                none,
                MostFreeThenIdlest,
                Some("c"),
            ),
            (
                "only a daemon offering the agent",
                vec![
                    daemon("a", 4, 0),
                    daemon("b", 4, 2).agents(&["command", "claude"]),
                ],
                "claude",
                none,
                Idlest,
                Some("b"),
            ),
            (
                "no daemon offers the agent",
                vec![daemon("a", 4, 0)],
                "codex",
                none,
                Idlest,
                None,
            ),
            (
                "every label, with the same value",
                vec![
                    daemon("a", 4, 0).labels(&[("gpu", "a100")]),
                    daemon("b", 4, 1).labels(&[("gpu", "h100")]),
                    daemon("c", 4, 2).labels(&[("gpu", "h100"), ("zone", "eu")]),
                ],
                "command",
                &[("gpu", "h100"), ("zone", "eu")],
                MostFreeThenIdlest,
                Some("c"),
            ),
            (
                "extra labels on the daemon do not matter",
                vec![daemon("a", 4, 0).labels(&[("gpu", "h100")])],
                "command",
                none,
                Idlest,
                Some("a"),
            ),
            (
                "a label no daemon carries",
                vec![daemon("a", 4, 0).labels(&[("gpu", "h100")])],
                "command",
                &[("zone", "eu")],
                Idlest,
                None,
            ),
        ];
        for (what, daemons, agent, want_labels, ties, want) in cases {
            let want_labels = labels(want_labels);
            let needs = Needs {
                agent,
                labels: &want_labels,
            };
            let got = pick(daemons.iter().map(Daemon::candidate), &needs, ties);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn free_slots_count_what_runs_and_the_full_flag() {
        // (max, running, full, free)
        let cases = [
            (4, 0, false, 4),
            (4, 3, false, 1),
            (4, 4, false, 0),
            (2, 5, false, 0),
            (4, 0, true, 0),
            (0, 0, false, 0),
        ];
        for (max, running, full, want) in cases {
            let mut d = daemon("a", max, running);
            d.full = full;
            assert_eq!(
                d.candidate().free(),
                want,
                "max {max} running {running} full {full}"
            );
        }
    }

    fn r(task: &str, attempt: u32) -> TaskRef {
        TaskRef {
            task_id: task.into(),
            attempt,
        }
    }

    #[test]
    fn a_reconnecting_daemon_keeps_what_it_lists_and_loses_the_rest() {
        // (what the case shows, held for it, listed by it, kept, stale, lost)
        type Refs = Vec<TaskRef>;
        let cases: Vec<(&str, Refs, Refs, Refs, Refs, Refs)> = vec![
            ("nothing either way", vec![], vec![], vec![], vec![], vec![]),
            (
                "all listed: all kept",
                vec![r("t1", 1), r("t2", 3)],
                vec![r("t2", 3), r("t1", 1)],
                vec![r("t1", 1), r("t2", 3)],
                vec![],
                vec![],
            ),
            (
                "held, not listed: lost",
                vec![r("t1", 1), r("t2", 1)],
                vec![r("t2", 1)],
                vec![r("t2", 1)],
                vec![],
                vec![r("t1", 1)],
            ),
            (
                "listed, not held: stale",
                vec![],
                vec![r("t9", 2), r("t8", 1)],
                vec![],
                vec![r("t9", 2), r("t8", 1)],
                vec![],
            ),
            (
                "another attempt of a held task: the held one lost, the listed one stale",
                vec![r("t1", 2)],
                vec![r("t1", 1)],
                vec![],
                vec![r("t1", 1)],
                vec![r("t1", 2)],
            ),
            (
                "a mix",
                vec![r("a", 1), r("b", 1), r("c", 4)],
                vec![r("c", 4), r("d", 1), r("a", 2)],
                vec![r("c", 4)],
                vec![r("d", 1), r("a", 2)],
                vec![r("a", 1), r("b", 1)],
            ),
        ];
        for (what, held, running, kept, stale, lost) in cases {
            let got = reattach(held, &running);
            assert_eq!(got, Reattach { kept, stale, lost }, "{what}");
        }
    }

    #[test]
    fn a_grace_costs_the_attempts_only_if_nothing_happened_since_the_disconnect() {
        let mut g = Generation::default();
        g.bump(); // connected
        let at = g.bump(); // disconnected: the grace starts here
                           // (what the case shows, connects and disconnects since, connected now, lapsed)
        let cases = [
            ("still away", 0, false, true),
            ("came back and is connected", 1, true, false),
            (
                "came back and left again: the later grace decides",
                2,
                false,
                false,
            ),
            ("a connection that is current anyway", 0, true, false),
        ];
        for (what, since, connected, lapsed) in cases {
            let mut now = at;
            for _ in 0..since {
                now.bump();
            }
            assert_eq!(now.grace_lapsed(at, connected), lapsed, "{what}");
        }
    }
}
