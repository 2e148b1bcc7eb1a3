//! The pipeline document's rules under merges: two or more nodes editing apart, then meeting.

use automerge::sync::{self, SyncDoc};
use automerge::AutoCommit;

use super::*;
use crate::{DocFile, Liveness};

fn story(id: &str) -> NewStory {
    NewStory {
        id: id.into(),
        title: format!("story {id}"),
        body: "do it".into(),
        profile: "command".into(),
        repo: "/tmp/repo.git".into(),
        base_branch: "main".into(),
        depends_on: vec![],
        max_retries: 2,
    }
}

/// A node's copy of the document, forked from `base` (as if synced once).
fn fork(base: &mut Pipeline, me: &str) -> Pipeline {
    let mut doc = base.doc_mut().fork();
    doc.set_actor(automerge::ActorId::random());
    Pipeline::from_doc(doc, me)
}

/// Merges `b` into `a` and `a` into `b`: both now hold everything.
fn meet(a: &mut Pipeline, b: &mut Pipeline) {
    a.doc_mut().merge(b.doc_mut()).expect("merge");
    b.doc_mut().merge(a.doc_mut()).expect("merge");
}

#[test]
fn concurrent_claims_settle_on_the_same_owner_on_every_node() {
    let mut base = Pipeline::new("rendezvous");
    for i in 0..50 {
        base.add_story(&story(&format!("s{i}")), 0).unwrap();
        base.move_story(&format!("s{i}"), Stage::Current).unwrap();
    }
    let mut a = fork(&mut base, "node-a");
    let mut b = fork(&mut base, "node-b");
    let mut c = fork(&mut base, "node-c");
    for i in 0..50 {
        let id = format!("s{i}");
        a.claim(&id, 1).unwrap();
        b.claim(&id, 1).unwrap();
        if i % 2 == 0 {
            c.claim(&id, 1).unwrap();
        }
        // Each thinks it owns the story while apart.
        assert_eq!(a.story(&id).unwrap().owner.as_deref(), Some("node-a"));
        assert_eq!(b.story(&id).unwrap().owner.as_deref(), Some("node-b"));
    }
    // Merged in different orders, they agree.
    meet(&mut a, &mut b);
    meet(&mut b, &mut c);
    meet(&mut a, &mut c);
    let mut owners = std::collections::BTreeMap::new();
    for i in 0..50 {
        let id = format!("s{i}");
        let (sa, sb, sc) = (
            a.story(&id).unwrap(),
            b.story(&id).unwrap(),
            c.story(&id).unwrap(),
        );
        assert_eq!(sa.owner, sb.owner, "{id}");
        assert_eq!(sb.owner, sc.owner, "{id}");
        let owner = sa.owner.unwrap();
        let expected = sa
            .claimants
            .iter()
            .min_by_key(|n| claim_rank(n, &id))
            .cloned();
        assert_eq!(Some(owner.clone()), expected);
        *owners.entry(owner).or_insert(0) += 1;
    }
    // The hash spreads stories over the nodes.
    assert_eq!(owners.len(), 3, "{owners:?}");
}

#[test]
fn the_loser_of_a_claim_cannot_move_the_story_and_its_progress_counts_for_nothing() {
    let mut base = Pipeline::new("rendezvous");
    base.add_story(&story("s1"), 0).unwrap();
    base.move_story("s1", Stage::Current).unwrap();
    let mut a = fork(&mut base, "node-a");
    let mut b = fork(&mut base, "node-b");
    a.claim("s1", 1).unwrap();
    b.claim("s1", 1).unwrap();
    // Apart, both finish and record their branches.
    for (p, branch) in [(&mut a, "kennel/a"), (&mut b, "kennel/b")] {
        let update = StoryUpdate {
            stage: Some(Stage::Qa),
            branch: Some(branch.into()),
            commit: Some("c0ffee".into()),
            ..StoryUpdate::default()
        };
        p.record("s1", &update).unwrap();
    }
    meet(&mut a, &mut b);
    let winner = a.story("s1").unwrap().owner.unwrap();
    let (win, lose) = if winner == "node-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let s = lose.story("s1").unwrap();
    assert_eq!(s.stage, Stage::Qa);
    let want = if winner == "node-a" {
        "kennel/a"
    } else {
        "kennel/b"
    };
    assert_eq!(
        s.branch.as_deref(),
        Some(want),
        "only the owner's result is the story's"
    );
    // The loser is refused from now on; the owner is not.
    let refused = lose.record(
        "s1",
        &StoryUpdate {
            stage: Some(Stage::Done),
            ..StoryUpdate::default()
        },
    );
    assert!(
        matches!(refused, Err(PipelineError::NotOwner { .. })),
        "{refused:?}"
    );
    win.record(
        "s1",
        &StoryUpdate {
            stage: Some(Stage::Merge),
            ..StoryUpdate::default()
        },
    )
    .unwrap();
    meet(win, lose);
    assert_eq!(lose.story("s1").unwrap().stage, Stage::Merge);
}

#[test]
fn a_gone_owner_is_released_by_another_node_which_then_owns_the_story() {
    let mut base = Pipeline::new("rendezvous");
    base.add_story(&story("s1"), 0).unwrap();
    base.move_story("s1", Stage::Current).unwrap();
    let mut a = fork(&mut base, "node-a");
    let mut b = fork(&mut base, "node-b");
    a.heartbeat("ws://a").unwrap();
    a.claim("s1", 1).unwrap();
    meet(&mut a, &mut b);
    assert_eq!(b.story("s1").unwrap().owner.as_deref(), Some("node-a"));

    // b watches a's heartbeat; it stops moving for the TTL (b's own clock).
    let mut seen = Liveness::new(600_000);
    let (beat, _) = b.nodes()["node-a"].clone();
    seen.observe("node-a", beat, 1_000);
    assert!(seen.is_live("node-a", 600_999));
    assert!(!seen.is_live("node-a", 601_000));
    b.release("s1", "node-a").unwrap();
    b.claim("s1", 601_000).unwrap();
    assert_eq!(b.story("s1").unwrap().owner.as_deref(), Some("node-b"));

    // a comes back: it sees it lost the story.
    meet(&mut a, &mut b);
    let s = a.story("s1").unwrap();
    assert_eq!(s.owner.as_deref(), Some("node-b"));
    assert_eq!(s.claimants, ["node-b"]);
}

#[test]
fn a_deleted_story_stays_deleted_whatever_a_stale_peer_edits_meanwhile() {
    let mut base = Pipeline::new("rendezvous");
    base.add_story(&story("s1"), 0).unwrap();
    base.add_story(&story("s2"), 0).unwrap();
    let mut stale = fork(&mut base, "node-a");
    base.delete_story("s1").unwrap();
    // The stale peer edits the deleted story and claims it, not knowing.
    stale.move_story("s1", Stage::Current).unwrap();
    stale.claim("s1", 5).unwrap();
    let mut b = Pipeline::from_doc(base.doc_mut().fork(), "rendezvous");
    meet(&mut b, &mut stale);
    for p in [&b, &stale] {
        let ids: Vec<String> = p.stories().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["s2"], "s1 is not resurrected");
        assert!(p.story("s1").is_none());
    }
    assert!(matches!(b.claim("s1", 6), Err(PipelineError::NoStory(_))));
    assert!(matches!(
        b.add_story(&story("s1"), 7),
        Err(PipelineError::Exists(_))
    ));
}

#[test]
fn the_sync_protocol_brings_two_documents_to_the_same_state() {
    let mut a = Pipeline::new("node-a");
    for i in 0..20 {
        a.add_story(&story(&format!("s{i}")), 0).unwrap();
    }
    let mut b = Pipeline::from_doc(AutoCommit::new(), "node-b");
    let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
    let mut rounds = 0;
    loop {
        let to_b = a.doc_mut().sync().generate_sync_message(&mut sa);
        let to_a = b.doc_mut().sync().generate_sync_message(&mut sb);
        if to_b.is_none() && to_a.is_none() {
            break;
        }
        if let Some(m) = to_b {
            let m = sync::Message::decode(&m.encode()).unwrap();
            b.doc_mut().sync().receive_sync_message(&mut sb, m).unwrap();
        }
        if let Some(m) = to_a {
            let m = sync::Message::decode(&m.encode()).unwrap();
            a.doc_mut().sync().receive_sync_message(&mut sa, m).unwrap();
        }
        rounds += 1;
        assert!(rounds < 20, "sync does not settle");
    }
    assert_eq!(a.stories(), b.stories());
    assert_eq!(b.stories().len(), 20);
}

#[test]
fn the_document_survives_a_restart_from_its_file_with_every_change_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = DocFile::new(&dir.path().join("pipeline.automerge"));
    let mut p = Pipeline::from_doc(file.load().unwrap(), "node-a");
    p.add_story(&story("s1"), 0).unwrap();
    file.append(p.doc_mut()).unwrap();
    p.move_story("s1", Stage::Current).unwrap();
    p.claim("s1", 1).unwrap();
    file.append(p.doc_mut()).unwrap();
    p.record(
        "s1",
        &StoryUpdate {
            stage: Some(Stage::Qa),
            branch: Some("kennel/s1".into()),
            commit: Some("abc".into()),
            ..StoryUpdate::default()
        },
    )
    .unwrap();
    p.add_story(&story("s2"), 2).unwrap();
    p.delete_story("s2").unwrap();
    file.append(p.doc_mut()).unwrap();
    let before = p.stories();

    let mut again = Pipeline::from_doc(file.load().unwrap(), "node-a");
    assert_eq!(again.stories(), before);
    assert_eq!(again.story("s1").unwrap().stage, Stage::Qa);
    assert!(again.story("s2").is_none(), "deleted stays deleted");
    // Compacted, the same; and appending goes on after it.
    file.compact(again.doc_mut()).unwrap();
    again.move_story("s1", Stage::Done).unwrap();
    file.append(again.doc_mut()).unwrap();
    let third = Pipeline::from_doc(file.load().unwrap(), "node-a");
    assert_eq!(
        third.story("s1").unwrap().stage,
        Stage::Qa,
        "the owner's progress wins"
    );
    assert_eq!(third.stories().len(), 1);
}

#[test]
fn failures_and_blocking_are_recorded_with_their_reasons() {
    let mut p = Pipeline::new("node-a");
    p.add_story(&story("s1"), 0).unwrap();
    p.claim("s1", 1).unwrap();
    for why in ["exit 1", "exit 2"] {
        p.record(
            "s1",
            &StoryUpdate {
                failed: Some(why.into()),
                ..StoryUpdate::default()
            },
        )
        .unwrap();
    }
    let s = p.story("s1").unwrap();
    assert_eq!((s.failures, s.last_error.as_deref()), (2, Some("exit 2")));
    p.block("s1", Some("2 attempts failed; last: exit 2"))
        .unwrap();
    assert!(p.story("s1").unwrap().blocked.unwrap().contains("exit 2"));
    p.block("s1", None).unwrap();
    assert!(p.story("s1").unwrap().blocked.is_none());
    // Heartbeats count up; nodes are listed with their sync address.
    assert_eq!(p.heartbeat("ws://127.0.0.1:1/crdt-sync").unwrap(), 1);
    assert_eq!(p.heartbeat("ws://127.0.0.1:1/crdt-sync").unwrap(), 2);
    assert_eq!(
        p.nodes()["node-a"],
        (2, "ws://127.0.0.1:1/crdt-sync".into())
    );
}

#[test]
fn the_claim_the_rendezvous_grants_first_keeps_the_story_against_a_later_better_ranked_one() {
    let mut rendezvous = Pipeline::new("rendezvous");
    for i in 0..20 {
        rendezvous.add_story(&story(&format!("s{i}")), 0).unwrap();
        rendezvous
            .move_story(&format!("s{i}"), Stage::Current)
            .unwrap();
    }
    let mut a = fork(&mut rendezvous, "a");
    let mut b = fork(&mut rendezvous, "b");
    // A story on which b's claim ranks first; a claims it first.
    let id = (0..20)
        .map(|i| format!("s{i}"))
        .find(|s| claim_rank("b", s) < claim_rank("a", s))
        .expect("b ranks first on some story");
    a.claim(&id, 0).unwrap();
    b.claim(&id, 0).unwrap();
    // a's claim reaches the rendezvous first, which grants it.
    rendezvous.doc_mut().merge(a.doc_mut()).unwrap();
    let seen = rendezvous.stories();
    assert_eq!(rendezvous.grant(&seen).unwrap(), vec![id.clone()]);
    assert!(
        rendezvous.grant(&rendezvous.stories()).unwrap().is_empty(),
        "once"
    );
    // b's claim arrives later: a keeps the story on every node, though b ranks first.
    rendezvous.doc_mut().merge(b.doc_mut()).unwrap();
    meet(&mut a, &mut rendezvous);
    meet(&mut b, &mut rendezvous);
    for p in [&rendezvous, &a, &b] {
        let s = p.story(&id).unwrap();
        assert_eq!(
            (s.owner.as_deref(), s.granted),
            (Some("a"), true),
            "{}",
            p.me()
        );
        assert_eq!(s.claimants, ["a", "b"]);
    }
    assert!(rendezvous.grant(&rendezvous.stories()).unwrap().is_empty());
    // A granted claim given up (its node gone) no longer counts: the next claim is granted.
    b.release(&id, "a").unwrap();
    meet(&mut b, &mut rendezvous);
    let s = rendezvous.story(&id).unwrap();
    assert_eq!((s.owner.as_deref(), s.granted), (Some("b"), false));
    assert_eq!(
        rendezvous.grant(&rendezvous.stories()).unwrap(),
        vec![id.clone()]
    );
    assert!(rendezvous.story(&id).unwrap().granted);
}

/// A rendezvous with a story in `2_current` on which `b`'s claim ranks before `a`'s, and
/// nodes `a` and `b` that each claimed it apart (neither has heard of the other's claim).
fn claimed_apart() -> (Pipeline, String, Pipeline, Pipeline) {
    let mut rendezvous = Pipeline::new("rendezvous");
    let id = (0..20)
        .map(|i| format!("s{i}"))
        .find(|s| claim_rank("b", s) < claim_rank("a", s))
        .expect("b ranks first on some story");
    rendezvous.add_story(&story(&id), 0).unwrap();
    rendezvous.move_story(&id, Stage::Current).unwrap();
    let mut a = fork(&mut rendezvous, "a");
    let mut b = fork(&mut rendezvous, "b");
    a.claim(&id, 0).unwrap();
    b.claim(&id, 0).unwrap();
    (rendezvous, id, a, b)
}

#[test]
fn a_build_done_while_cut_off_keeps_its_story_when_the_rendezvous_grants_another_claim() {
    // Cut off from the rendezvous and from each other, both claimed it; b builds it while a's
    // claim still settles.
    let (mut rendezvous, id, mut a, mut b) = claimed_apart();
    let done = StoryUpdate {
        stage: Some(Stage::Qa),
        branch: Some("kennel/b".into()),
        commit: Some("c0ffee".into()),
        ..StoryUpdate::default()
    };
    b.record(&id, &done).unwrap();
    // The rendezvous is back and hears of a's claim first.
    rendezvous.doc_mut().merge(a.doc_mut()).unwrap();
    assert_eq!(
        rendezvous.grant(&rendezvous.stories()).unwrap(),
        vec![id.clone()]
    );
    assert_eq!(rendezvous.story(&id).unwrap().owner.as_deref(), Some("a"));
    // b's build reaches everyone: it keeps the story, which is in QA with b's branch, on
    // every node; a has nothing left to build.
    meet(&mut b, &mut rendezvous);
    meet(&mut a, &mut rendezvous);
    for p in [&rendezvous, &a, &b] {
        let s = p.story(&id).unwrap();
        assert_eq!(
            (s.owner.as_deref(), s.stage, s.branch.as_deref()),
            (Some("b"), Stage::Qa, Some("kennel/b")),
            "{}",
            p.me()
        );
    }
    let refused = a.record(&id, &done);
    assert!(
        matches!(refused, Err(PipelineError::NotOwner { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_grant_goes_to_the_claim_that_ranks_first_among_those_known_when_it_is_made() {
    let (mut rendezvous, id, mut a, mut b) = claimed_apart();
    rendezvous.doc_mut().merge(a.doc_mut()).unwrap();
    // Read while only a's claim had arrived; b's arrives before the grant is made.
    let seen = rendezvous.stories();
    assert_eq!(
        seen.iter().find(|s| s.id == id).unwrap().owner.as_deref(),
        Some("a")
    );
    rendezvous.doc_mut().merge(b.doc_mut()).unwrap();
    assert_eq!(rendezvous.grant(&seen).unwrap(), vec![id.clone()]);
    let s = rendezvous.story(&id).unwrap();
    assert_eq!((s.owner.as_deref(), s.granted), (Some("b"), true));
}
