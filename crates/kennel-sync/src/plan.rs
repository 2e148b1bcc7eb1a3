//! What a build agent does next, decided from its copy of the pipeline: a pure function run on
//! each tick of the agent's loop. The loop carries the actions out (claims and releases in the
//! document, agent processes started and stopped) and syncs.
//!
//! The rules, in order, for stories in `2_current` that are not blocked and whose
//! dependencies are done:
//! - a story this node runs but no longer owns (another claim won after a merge): stop it, and
//!   never let its result count ([`crate::Pipeline::record`] refuses);
//! - a story this node owns that has failed `maxRetries` times: block it, with the last error;
//! - a story this node owns and does not run: start it, while there is room; it holds room
//!   whether started or not, so a node never claims more than it can build;
//! - a story owned by a node this one saw go silent for the TTL ([`crate::Liveness`]): release
//!   that claim, then claim it;
//! - a story nobody owns: claim it, while there is room.

use std::collections::{BTreeMap, BTreeSet};

use crate::pipeline::claim_rank;
use crate::{Liveness, Stage, Story};

/// One thing for the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Claim(String),
    /// Release `node`'s claim on the story: the node is gone.
    Release {
        story: String,
        node: String,
    },
    Start(String),
    Stop(String),
    Block {
        story: String,
        reason: String,
    },
}

/// What the loop knows besides the document.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    /// Stories whose agent this node runs now.
    pub running: &'a BTreeSet<String>,
    /// Agents it may run at once.
    pub capacity: usize,
    pub now: i64,
}

/// Whether every dependency of `s` is done.
fn ready(all: &BTreeMap<String, Story>, s: &Story) -> bool {
    s.depends_on.iter().all(|d| {
        all.get(d)
            .is_some_and(|dep| matches!(dep.stage, Stage::Done | Stage::Archived))
    })
}

/// The steps for node `me` now, from every story as its copy of the pipeline has them
/// ([`crate::replica::View`]).
pub fn plan(
    me: &str,
    all: &BTreeMap<String, Story>,
    seen: &Liveness,
    at: &Situation<'_>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    // In the order of this node's claim ranks: nodes claiming at once tend to pick stories
    // they would win, so fewer claims collide.
    let mut stories: Vec<&Story> = all.values().collect();
    stories.sort_by_cached_key(|s| claim_rank(me, &s.id));
    // Lost ones first: they free room.
    for s in &stories {
        if at.running.contains(&s.id) && s.owner.as_deref() != Some(me) {
            steps.push(Step::Stop(s.id.clone()));
        }
    }
    let mut busy = at
        .running
        .iter()
        .filter(|id| !steps.contains(&Step::Stop((*id).clone())))
        .count();
    let eligible: Vec<&Story> = stories
        .iter()
        .copied()
        .filter(|s| s.stage == Stage::Current && s.blocked.is_none() && ready(all, s))
        .collect();
    // What it owns first. Each story it owns and does not run holds room too, started or
    // not, so it never claims more than it can build: what it claims but cannot start would
    // sit unbuilt while every other node sees it taken.
    for s in eligible.iter().filter(|s| s.owner.as_deref() == Some(me)) {
        if s.failures >= s.max_retries.max(1) {
            let reason = format!(
                "{} attempts failed; last: {}",
                s.failures,
                s.last_error.as_deref().unwrap_or("unknown")
            );
            steps.push(Step::Block {
                story: s.id.clone(),
                reason,
            });
        } else if !at.running.contains(&s.id) {
            if busy < at.capacity {
                steps.push(Step::Start(s.id.clone()));
            }
            busy += 1;
        }
    }
    for s in eligible.iter().filter(|s| s.owner.as_deref() != Some(me)) {
        if busy >= at.capacity {
            break;
        }
        match &s.owner {
            Some(owner) if seen.is_live(owner, at.now) => {}
            Some(owner) => {
                steps.push(Step::Release {
                    story: s.id.clone(),
                    node: owner.clone(),
                });
                steps.push(Step::Claim(s.id.clone()));
                busy += 1;
            }
            None => {
                steps.push(Step::Claim(s.id.clone()));
                busy += 1;
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{NewStory, StoryUpdate};
    use crate::Pipeline;

    /// [`plan`] on `p` as read now.
    fn plan_of(p: &Pipeline, seen: &Liveness, at: &Situation<'_>) -> Vec<Step> {
        let all = p.stories().into_iter().map(|s| (s.id.clone(), s)).collect();
        plan(p.me(), &all, seen, at)
    }

    fn pipeline(me: &str, n: usize) -> Pipeline {
        let mut p = Pipeline::new(me);
        for i in 0..n {
            let id = format!("s{i}");
            let new = NewStory {
                id: id.clone(),
                title: id.clone(),
                max_retries: 2,
                ..NewStory::default()
            };
            p.add_story(&new, 0).unwrap();
            p.move_story(&id, Stage::Current).unwrap();
        }
        p
    }

    fn at(running: &BTreeSet<String>, capacity: usize, now: i64) -> Situation<'_> {
        Situation {
            running,
            capacity,
            now,
        }
    }

    #[test]
    fn a_node_claims_what_nobody_owns_up_to_its_capacity_and_starts_what_it_owns() {
        let mut p = pipeline("a", 3);
        let seen = Liveness::new(600_000);
        let none = BTreeSet::new();
        // The two it ranks first (the claims it is likeliest to win).
        let mut ranked = ["s0".to_string(), "s1".into(), "s2".into()];
        ranked.sort_by_key(|s| claim_rank("a", s));
        let (first, second) = (ranked[0].clone(), ranked[1].clone());
        let steps = plan_of(&p, &seen, &at(&none, 2, 0));
        assert_eq!(
            steps,
            [Step::Claim(first.clone()), Step::Claim(second.clone())]
        );
        p.claim(&first, 0).unwrap();
        p.claim(&second, 0).unwrap();
        let steps = plan_of(&p, &seen, &at(&none, 2, 0));
        assert_eq!(
            steps,
            [Step::Start(first.clone()), Step::Start(second.clone())]
        );
        let running: BTreeSet<String> = [first, second].into();
        assert!(plan_of(&p, &seen, &at(&running, 2, 0)).is_empty(), "full");
    }

    #[test]
    fn a_node_claims_no_more_than_it_can_build_even_before_it_starts() {
        let mut p = pipeline("a", 4);
        let seen = Liveness::new(600_000);
        let none = BTreeSet::new();
        for step in plan_of(&p, &seen, &at(&none, 2, 0)) {
            if let Step::Claim(id) = step {
                p.claim(&id, 0).unwrap();
            }
        }
        // Its two claims are not started yet (the loop lets claims settle first): the next
        // plans start them and claim nothing more.
        for _ in 0..3 {
            let steps = plan_of(&p, &seen, &at(&none, 2, 0));
            assert_eq!(steps.len(), 2, "{steps:?}");
            assert!(
                steps.iter().all(|s| matches!(s, Step::Start(_))),
                "{steps:?}"
            );
        }
    }

    #[test]
    fn a_node_stops_what_it_lost_and_takes_over_from_a_silent_owner() {
        let mut base = pipeline("rendezvous", 8);
        let mut a = Pipeline::from_doc(base.doc_mut().fork(), "a");
        let mut b = Pipeline::from_doc(base.doc_mut().fork(), "b");
        b.heartbeat("ws://b").unwrap();
        let ids: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
        for s in &ids {
            a.claim(s, 0).unwrap();
            b.claim(s, 0).unwrap();
        }
        a.doc_mut().merge(b.doc_mut()).unwrap();
        let running: BTreeSet<String> = ids.iter().cloned().collect();
        let mut seen = Liveness::new(1_000);
        seen.observe("b", a.nodes()["b"].0, 0);
        let steps = plan_of(&a, &seen, &at(&running, 8, 0));
        let lost: Vec<&Step> = steps
            .iter()
            .filter(|s| matches!(s, Step::Stop(_)))
            .collect();
        let b_owns = a
            .stories()
            .iter()
            .filter(|s| s.owner.as_deref() == Some("b"))
            .count();
        assert!(
            b_owns > 0 && b_owns < 8,
            "the claims split: {b_owns} of 8 to b"
        );
        assert_eq!(lost.len(), b_owns, "{steps:?}");

        // b goes silent: a releases b's claims and takes the stories.
        let steps = plan_of(&a, &seen, &at(&BTreeSet::new(), 8, 1_000));
        for s in a.stories() {
            if s.owner.as_deref() == Some("b") {
                assert!(steps.contains(&Step::Release {
                    story: s.id.clone(),
                    node: "b".into()
                }));
                assert!(steps.contains(&Step::Claim(s.id.clone())));
            }
        }
    }

    #[test]
    fn a_story_waits_for_its_dependencies_and_is_blocked_after_its_retries() {
        let mut p = pipeline("a", 2);
        let dep = NewStory {
            id: "s2".into(),
            title: "after s0".into(),
            depends_on: vec!["s0".into()],
            max_retries: 1,
            ..NewStory::default()
        };
        p.add_story(&dep, 0).unwrap();
        p.move_story("s2", Stage::Current).unwrap();
        let seen = Liveness::new(600_000);
        let none = BTreeSet::new();
        let claims: Vec<Step> = plan_of(&p, &seen, &at(&none, 9, 0));
        assert!(!claims.contains(&Step::Claim("s2".into())), "{claims:?}");
        p.claim("s0", 0).unwrap();
        p.record(
            "s0",
            &StoryUpdate {
                stage: Some(Stage::Done),
                ..StoryUpdate::default()
            },
        )
        .unwrap();
        assert!(plan_of(&p, &seen, &at(&none, 9, 0)).contains(&Step::Claim("s2".into())));
        p.claim("s2", 0).unwrap();
        p.record(
            "s2",
            &StoryUpdate {
                failed: Some("exit 1".into()),
                ..StoryUpdate::default()
            },
        )
        .unwrap();
        let steps = plan_of(&p, &seen, &at(&none, 9, 0));
        assert!(
            steps.contains(&Step::Block {
                story: "s2".into(),
                reason: "1 attempts failed; last: exit 1".into()
            }),
            "{steps:?}"
        );
    }
}
