//! The lifecycle manager's state (`AgentStore`) on both backends, by the same test bodies:
//! policies and their history, the registry's session guard, messages (addresses, idempotency,
//! delivery, claims, expiry) and commands. On PostgreSQL, two coordinators racing for one
//! claim: exactly one wins.

use kennel_proto::agents::{Address, CommandState, MessageState, RegisterAgent, SessionGuard};
use kennel_proto::policy::SpawnPolicy;
use kennel_store::{
    Advance, Claim, GuardCheck, NewCommand, NewMessage, PolicyChange, Redeem, Spawned,
};

use crate::db::Db;
use crate::NOW;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::db::Db::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::db::Db::postgres().await).await
                }
            )*
        }
    };
}

on_both_backends!(
    policies_keep_every_version_and_their_state,
    a_stale_agent_instance_is_refused_and_silent_agents_go_offline,
    messages_reach_every_address_form_once_and_duplicates_are_not_stored_twice,
    the_first_claim_wins_and_an_expired_claim_is_released,
    messages_expire_unread_and_are_read_by_their_recipients_only,
    commands_move_forward_and_expire_past_their_deadline,
    a_join_token_is_taken_once_and_not_after_it_expires,
);

fn policy(name: &str, mode: &str) -> SpawnPolicy {
    serde_json::from_value(serde_json::json!({
        "name": name, "provider": "command", "mode": mode,
    }))
    .unwrap()
}

fn agent(id: &str, instance: &str) -> RegisterAgent {
    RegisterAgent {
        id: id.into(),
        name: format!("agent {id}"),
        machine: "m1".into(),
        instance_id: instance.into(),
        ..RegisterAgent::default()
    }
}

fn message(id: &str, to: &str) -> NewMessage {
    NewMessage {
        id: id.into(),
        from: "user".into(),
        to: Address::parse(to).unwrap(),
        kind: "chat".into(),
        subject: None,
        body: format!("body of {id}"),
        payload: None,
        idempotency_key: None,
        claimable: false,
        expires_at: None,
        reply_to: None,
    }
}

fn kinds(events: &[kennel_proto::api::Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

async fn policies_keep_every_version_and_their_state(db: Db) {
    let store = db.open().await;
    let p = policy("reviewer", "on-demand");
    let c = store.put_policy(&p, NOW).await.unwrap();
    assert_eq!(c.value.1, PolicyChange::Created);
    assert_eq!(c.value.0.version, 1);
    assert_eq!(kinds(&c.events), ["policy.created"]);
    assert!(c.events[0].id > 0, "events are numbered once committed");

    let same = store.put_policy(&p, NOW + 1).await.unwrap();
    assert_eq!(same.value.1, PolicyChange::Unchanged);
    assert_eq!(same.value.0.version, 1);
    assert!(same.events.is_empty());

    let mut changed = p.clone();
    changed.mode = kennel_proto::policy::PolicyMode::AlwaysOn;
    let c = store.put_policy(&changed, NOW + 2).await.unwrap();
    assert_eq!((c.value.0.version, c.value.1), (2, PolicyChange::Updated));
    assert_eq!(
        store.get_policy("reviewer").await.unwrap().unwrap().policy,
        changed
    );

    let gone = store.delete_policy("reviewer", NOW + 3).await.unwrap();
    assert!(gone.value);
    assert_eq!(kinds(&gone.events), ["policy.deleted"]);
    assert!(
        !store
            .delete_policy("reviewer", NOW + 4)
            .await
            .unwrap()
            .value
    );
    assert!(store.get_policy("reviewer").await.unwrap().is_none());

    // Back under the same name: the history goes on.
    let again = store.put_policy(&p, NOW + 5).await.unwrap();
    assert_eq!(
        (again.value.0.version, again.value.1),
        (4, PolicyChange::Created)
    );
    let history = store.policy_history("reviewer").await.unwrap();
    let versions: Vec<(i64, Option<kennel_proto::policy::PolicyMode>)> = history
        .iter()
        .map(|v| (v.version, v.policy.as_ref().map(|p| p.mode)))
        .collect();
    use kennel_proto::policy::PolicyMode::*;
    assert_eq!(
        versions,
        [
            (1, Some(OnDemand)),
            (2, Some(AlwaysOn)),
            (3, None),
            (4, Some(OnDemand))
        ]
    );
    store
        .put_policy(&policy("triager", "always-on"), NOW)
        .await
        .unwrap();
    let names: Vec<String> = store
        .list_policies()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.policy.name)
        .collect();
    assert_eq!(names, ["reviewer", "triager"]);

    // The reconciler's state: stored as given, an event only when its status changed.
    let state = serde_json::json!({ "status": "running", "spawns": 3 });
    let saved = store
        .save_policy_state("reviewer", "running", &state, true, NOW)
        .await
        .unwrap();
    assert_eq!(kinds(&saved.events), ["policy.state.changed"]);
    assert_eq!(saved.events[0].data["status"], "running");
    let quiet = store
        .save_policy_state("reviewer", "running", &state, false, NOW)
        .await
        .unwrap();
    assert!(quiet.events.is_empty());
    let reopened = db.open().await;
    assert_eq!(
        reopened.policy_states().await.unwrap(),
        [("reviewer".to_string(), state)]
    );
    reopened.forget_policy_state("reviewer").await.unwrap();
    assert!(reopened.policy_states().await.unwrap().is_empty());
}

async fn a_stale_agent_instance_is_refused_and_silent_agents_go_offline(db: Db) {
    let store = db.open().await;
    let spawned = Spawned {
        daemon_id: "d1".into(),
        policy: "reviewer".into(),
        spawn_request_id: "reviewer-1".into(),
    };
    let first = store
        .register_agent(&agent("a1", "i1"), Some(&spawned), Some("k1"), NOW)
        .await
        .unwrap();
    let a1 = first.value.clone().unwrap();
    assert_eq!(a1.epoch, 1);
    assert!(a1.online);
    assert_eq!(a1.policy.as_deref(), Some("reviewer"));
    assert_eq!(kinds(&first.events), ["agent.registered"]);
    let old = SessionGuard {
        instance_id: "i1".into(),
        epoch: 1,
    };
    assert_eq!(
        store.agent_heartbeat("a1", &old, NOW + 1).await.unwrap(),
        GuardCheck::Current
    );

    // A new instance registers: the old one is fenced out.
    let second = store
        .register_agent(&agent("a1", "i2"), Some(&spawned), Some("k1"), NOW + 2)
        .await
        .unwrap();
    assert_eq!(second.value.unwrap().epoch, 2);
    // Another key cannot take the id over.
    let taken = store
        .register_agent(&agent("a1", "evil"), None, Some("k2"), NOW + 2)
        .await
        .unwrap();
    assert!(taken.value.is_none());
    assert!(taken.events.is_empty());
    assert_eq!(
        store.get_agent("a1").await.unwrap().unwrap().instance_id,
        "i2"
    );
    assert_eq!(
        store.agent_heartbeat("a1", &old, NOW + 3).await.unwrap(),
        GuardCheck::Stale { epoch: 2 }
    );
    let current = SessionGuard {
        instance_id: "i2".into(),
        epoch: 2,
    };
    assert_eq!(
        store
            .agent_heartbeat("a1", &current, NOW + 4)
            .await
            .unwrap(),
        GuardCheck::Current
    );
    assert_eq!(
        store
            .agent_heartbeat("nobody", &current, NOW)
            .await
            .unwrap(),
        GuardCheck::Unknown
    );

    // Silent past the deadline: offline, with why. A spawned agent (a1) lives as long as its
    // process, whatever its heartbeats.
    for (id, at) in [("a2", NOW + 100), ("a3", NOW)] {
        store
            .register_agent(&agent(id, "j1"), None, Some("k1"), at)
            .await
            .unwrap();
    }
    let stale = store.mark_stale_agents(NOW + 50, NOW + 200).await.unwrap();
    let ids: Vec<&str> = stale.value.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a3"]);
    assert_eq!(kinds(&stale.events), ["agent.offline"]);
    let a3 = store.get_agent("a3").await.unwrap().unwrap();
    assert!(!a3.online);
    assert!(a3.offline_reason.unwrap().contains("no heartbeat since"));
    assert!(store.get_agent("a2").await.unwrap().unwrap().online);
    assert!(store.get_agent("a1").await.unwrap().unwrap().online);
    // Offline once.
    assert!(store
        .agent_offline("a3", "again", NOW + 300)
        .await
        .unwrap()
        .value
        .is_none());
    // A heartbeat of the current instance brings it back.
    let a3_guard = SessionGuard {
        instance_id: "j1".into(),
        epoch: 1,
    };
    store
        .agent_heartbeat("a3", &a3_guard, NOW + 400)
        .await
        .unwrap();
    assert!(store.get_agent("a3").await.unwrap().unwrap().online);
    assert_eq!(store.list_agents().await.unwrap().len(), 3);
}

async fn messages_reach_every_address_form_once_and_duplicates_are_not_stored_twice(db: Db) {
    let store = db.open().await;
    let mut reg = agent("a1", "i1");
    reg.label = Some("triage".into());
    reg.tags = vec!["rust".into()];
    reg.capabilities = vec!["review".into()];
    reg.channels = vec!["builds".into()];
    let spawned = Spawned {
        daemon_id: "d1".into(),
        policy: "reviewer".into(),
        spawn_request_id: "reviewer-1".into(),
    };
    store
        .register_agent(&reg, Some(&spawned), Some("k1"), NOW)
        .await
        .unwrap();
    store
        .register_agent(&agent("a2", "i1"), None, Some("k1"), NOW)
        .await
        .unwrap();

    let mut seqs = Vec::new();
    for (id, to) in [
        ("m1", "a1"),
        ("m2", "policy:reviewer"),
        ("m3", "label:triage"),
        ("m4", "tag:rust"),
        ("m5", "cap:review"),
        ("m6", "channel:builds"),
        ("m7", "a2"),
        ("m8", "tag:go"),
    ] {
        let sent = store.send_message(&message(id, to), NOW).await.unwrap();
        assert_eq!(sent.value.1, kennel_store::Sent::New);
        assert_eq!(kinds(&sent.events), ["message.available"]);
        assert_eq!(sent.value.0.state, MessageState::Queued);
        seqs.push(sent.value.0.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(
        store
            .queued_for(&Address::Policy("reviewer".into()))
            .await
            .unwrap(),
        1
    );

    let inbox = store.inbox("a1", 0, 100, NOW + 1).await.unwrap();
    let ids: Vec<&str> = inbox.value.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    assert!(inbox
        .value
        .iter()
        .all(|m| m.state == MessageState::Delivered && m.delivered_to.as_deref() == Some("a1")));
    assert_eq!(inbox.events.len(), 6);
    assert_eq!(
        store
            .queued_for(&Address::Policy("reviewer".into()))
            .await
            .unwrap(),
        0
    );
    // The cursor: after the third, the rest; a second read records nothing new.
    let rest = store.inbox("a1", seqs[2], 100, NOW + 2).await.unwrap();
    assert_eq!(rest.value.len(), 3);
    assert!(rest.events.is_empty());
    let limited = store.inbox("a1", 0, 2, NOW + 2).await.unwrap();
    assert_eq!(limited.value.len(), 2);
    // Messages still queued with a seq at or below the cursor (committed late by another
    // coordinator) are listed anyway, once.
    let late = store
        .send_message(&message("late", "a1"), NOW)
        .await
        .unwrap();
    let later = store
        .send_message(&message("later", "a1"), NOW)
        .await
        .unwrap();
    assert!(later.value.0.seq > late.value.0.seq);
    let cursor = later.value.0.seq;
    let got = store.inbox("a1", cursor, 100, NOW + 3).await.unwrap();
    let ids: Vec<&str> = got.value.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["late", "later"]);
    let again = store.inbox("a1", cursor, 100, NOW + 4).await.unwrap();
    assert!(again.value.is_empty(), "delivered now, not listed twice");
    let other = store.inbox("a2", 0, 100, NOW + 2).await.unwrap();
    let ids: Vec<&str> = other.value.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m7"]);
    assert!(store
        .inbox("nobody", 0, 100, NOW)
        .await
        .unwrap()
        .value
        .is_empty());
    // A name outside the registry reads what was sent to it.
    store
        .send_message(&message("to-user", "user"), NOW)
        .await
        .unwrap();
    let user = store.inbox("user", 0, 100, NOW).await.unwrap();
    let ids: Vec<&str> = user.value.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["to-user"]);

    // Idempotency: the same key from the same sender is the first message.
    let mut keyed = message("k1", "a1");
    keyed.idempotency_key = Some("once".into());
    let first = store.send_message(&keyed, NOW).await.unwrap();
    let mut again = keyed.clone();
    again.id = "k2".into();
    let dup = store.send_message(&again, NOW + 1).await.unwrap();
    assert_eq!(dup.value.1, kennel_store::Sent::Duplicate);
    assert!(dup.events.is_empty());
    assert_eq!(dup.value.0.id, "k1");
    assert_eq!(dup.value.0, first.value.0);
    assert!(store.get_message("k2").await.unwrap().is_none());
    // The key again for another message: refused, the first is what the key names.
    let mut other = again.clone();
    other.id = "k3".into();
    other.body = "another body".into();
    let reused = store.send_message(&other, NOW + 2).await.unwrap();
    assert_eq!(reused.value.1, kennel_store::Sent::KeyReused);
    assert_eq!(reused.value.0.id, "k1");
    assert!(store.get_message("k3").await.unwrap().is_none());
    // Another sender may use the same key.
    let mut other_sender = other.clone();
    other_sender.from = "a2".into();
    let sent = store.send_message(&other_sender, NOW).await.unwrap();
    assert_eq!(sent.value.1, kennel_store::Sent::New);

    assert!(store.delete_message("m8", NOW).await.unwrap().value);
    assert!(store.get_message("m8").await.unwrap().is_none());
}

async fn the_first_claim_wins_and_an_expired_claim_is_released(db: Db) {
    let store = db.open().await;
    for id in ["a1", "a2"] {
        let mut reg = agent(id, "i");
        reg.tags = vec!["worker".into()];
        store
            .register_agent(&reg, None, Some("k1"), NOW)
            .await
            .unwrap();
    }
    let mut job = message("job", "tag:worker");
    job.claimable = true;
    store.send_message(&job, NOW).await.unwrap();
    // Listed for both while unclaimed, delivered to neither.
    for id in ["a1", "a2"] {
        let inbox = store.inbox(id, 0, 10, NOW).await.unwrap();
        assert_eq!(inbox.value.len(), 1);
        assert_eq!(inbox.value[0].state, MessageState::Queued);
    }

    let won = store
        .claim_message("job", "a1", 30_000, NOW + 1)
        .await
        .unwrap();
    let Claim::Won(m) = &won.value else {
        panic!("a1 claims first: {:?}", won.value)
    };
    assert_eq!(m.claimed_by.as_deref(), Some("a1"));
    assert_eq!(kinds(&won.events), ["message.claimed"]);
    let lost = store
        .claim_message("job", "a2", 30_000, NOW + 2)
        .await
        .unwrap();
    assert_eq!(
        lost.value,
        Claim::Held {
            by: "a1".into(),
            until: NOW + 30_001
        }
    );
    // Now only the holder lists it.
    assert!(store
        .inbox("a2", 0, 10, NOW + 3)
        .await
        .unwrap()
        .value
        .is_empty());
    assert_eq!(
        store.inbox("a1", 0, 10, NOW + 3).await.unwrap().value.len(),
        1
    );

    // Not before it runs out...
    assert!(store
        .release_expired_claims(NOW + 30_000)
        .await
        .unwrap()
        .value
        .is_empty());
    // ...then released, and another agent can have it.
    let released = store.release_expired_claims(NOW + 30_001).await.unwrap();
    assert_eq!(released.value, ["job"]);
    assert_eq!(kinds(&released.events), ["message.claim.released"]);
    let m = store.get_message("job").await.unwrap().unwrap();
    assert_eq!((m.state, m.claimed_by), (MessageState::Queued, None));
    let won = store
        .claim_message("job", "a2", 30_000, NOW + 30_002)
        .await
        .unwrap();
    assert!(matches!(won.value, Claim::Won(_)), "{:?}", won.value);
    // The holder gives it up.
    assert!(
        store
            .release_claim("job", "a2", NOW + 30_003)
            .await
            .unwrap()
            .value
    );
    assert!(
        !store
            .release_claim("job", "a2", NOW + 30_004)
            .await
            .unwrap()
            .value
    );

    // Not claimable, not addressed to the agent, or missing.
    store
        .send_message(&message("plain", "a1"), NOW)
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_message("plain", "a1", 1_000, NOW)
            .await
            .unwrap()
            .value,
        Claim::NotClaimable
    );
    let mut elsewhere = message("elsewhere", "tag:other");
    elsewhere.claimable = true;
    store.send_message(&elsewhere, NOW).await.unwrap();
    assert_eq!(
        store
            .claim_message("elsewhere", "a1", 1_000, NOW)
            .await
            .unwrap()
            .value,
        Claim::NotClaimable
    );
    assert_eq!(
        store
            .claim_message("none", "a1", 1_000, NOW)
            .await
            .unwrap()
            .value,
        Claim::Missing
    );
    // Read by its holder: closed to claims.
    store
        .claim_message("job", "a1", 30_000, NOW + 40_000)
        .await
        .unwrap();
    store.mark_read("job", "a1", NOW + 40_001).await.unwrap();
    assert_eq!(
        store
            .claim_message("job", "a2", 30_000, NOW + 40_002)
            .await
            .unwrap()
            .value,
        Claim::Closed(MessageState::Read)
    );
}

async fn messages_expire_unread_and_are_read_by_their_recipients_only(db: Db) {
    let store = db.open().await;
    store
        .register_agent(&agent("a1", "i"), None, Some("k1"), NOW)
        .await
        .unwrap();
    store
        .register_agent(&agent("a2", "i"), None, Some("k1"), NOW)
        .await
        .unwrap();
    let mut short = message("short", "a1");
    short.expires_at = Some(NOW + 1_000);
    store.send_message(&short, NOW).await.unwrap();
    store
        .send_message(&message("kept", "a1"), NOW)
        .await
        .unwrap();

    // Read only by a recipient.
    assert!(store
        .mark_read("kept", "a2", NOW)
        .await
        .unwrap()
        .value
        .is_none());
    let read = store.mark_read("kept", "a1", NOW + 1).await.unwrap();
    let m = read.value.unwrap();
    assert_eq!(m.state, MessageState::Read);
    assert!(m.read_at.is_some());
    assert_eq!(kinds(&read.events), ["message.read"]);
    // Reading twice records nothing.
    assert!(store
        .mark_read("kept", "a1", NOW + 2)
        .await
        .unwrap()
        .events
        .is_empty());

    assert!(store
        .expire_messages(NOW + 999)
        .await
        .unwrap()
        .value
        .is_empty());
    let expired = store.expire_messages(NOW + 1_000).await.unwrap();
    assert_eq!(expired.value, ["short"]);
    assert_eq!(kinds(&expired.events), ["message.expired"]);
    // An expired message is in nobody's inbox, and a read one stays read.
    let inbox = store.inbox("a1", 0, 10, NOW + 2_000).await.unwrap();
    let ids: Vec<&str> = inbox.value.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["kept"]);
    assert_eq!(inbox.value[0].state, MessageState::Read);
}

async fn commands_move_forward_and_expire_past_their_deadline(db: Db) {
    let store = db.open().await;
    let new = |id: &str, deadline| NewCommand {
        id: id.into(),
        kind: "agent.spawn".into(),
        policy: Some("reviewer".into()),
        target: "reviewer-1".into(),
        args: serde_json::json!({ "graceful": true }),
        deadline_at: deadline,
    };
    let c = store
        .create_command(&new("c1", NOW + 10_000), NOW)
        .await
        .unwrap();
    assert_eq!(c.value.state, CommandState::Requested);
    assert_eq!(kinds(&c.events), ["command.requested"]);
    for next in [
        CommandState::Delivered,
        CommandState::Running,
        CommandState::Succeeded,
    ] {
        let moved = store
            .advance_command("c1", next, None, NOW + 1)
            .await
            .unwrap();
        assert!(
            matches!(&moved.value, Advance::Done(c) if c.state == next),
            "{:?}",
            moved.value
        );
        assert_eq!(kinds(&moved.events), ["command.state.changed"]);
    }
    let refused = store
        .advance_command("c1", CommandState::Failed, Some("late"), NOW + 2)
        .await
        .unwrap();
    assert_eq!(refused.value, Advance::Refused(CommandState::Succeeded));
    assert!(refused.events.is_empty());
    assert_eq!(
        store
            .advance_command("nope", CommandState::Running, None, NOW)
            .await
            .unwrap()
            .value,
        Advance::Missing
    );

    store
        .create_command(&new("c2", NOW + 5_000), NOW)
        .await
        .unwrap();
    store
        .create_command(&new("c3", NOW + 50_000), NOW)
        .await
        .unwrap();
    store
        .advance_command("c2", CommandState::Delivered, None, NOW + 1)
        .await
        .unwrap();
    let expired = store.expire_commands(NOW + 5_000).await.unwrap();
    let ids: Vec<&str> = expired.value.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c2"]);
    assert_eq!(expired.value[0].state, CommandState::Expired);
    assert!(expired.value[0]
        .error
        .as_deref()
        .unwrap()
        .contains("deadline"));
    let open: Vec<String> = store
        .list_commands(true, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(open, ["c3"]);
    assert_eq!(store.list_commands(false, 10).await.unwrap().len(), 3);
    assert_eq!(
        store.get_command("c1").await.unwrap().unwrap().args["graceful"],
        true
    );
}

async fn a_join_token_is_taken_once_and_not_after_it_expires(db: Db) {
    let store = db.open().await;
    store
        .create_join_token("t1", "laptop", "abcd", NOW + 1_000, NOW)
        .await
        .unwrap();
    store
        .create_join_token("t2", "ci-box", "ef01", NOW + 1_000, NOW)
        .await
        .unwrap();
    assert_eq!(
        store.join_token_hash("t1").await.unwrap().as_deref(),
        Some("abcd")
    );
    assert_eq!(
        store.redeem_join_token("t1", "k1", NOW + 1).await.unwrap(),
        Redeem::Taken {
            name: "laptop".into()
        }
    );
    assert_eq!(
        store.redeem_join_token("t1", "k2", NOW + 2).await.unwrap(),
        Redeem::Used
    );
    assert_eq!(
        store
            .redeem_join_token("t2", "k3", NOW + 1_000)
            .await
            .unwrap(),
        Redeem::Expired
    );
    assert_eq!(
        store.redeem_join_token("nope", "k4", NOW).await.unwrap(),
        Redeem::Unknown
    );
    assert!(store.join_token_hash("nope").await.unwrap().is_none());
}

/// Two coordinators (two stores on one schema) claim one message at the same moment, many
/// times over: exactly one wins each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_racing_for_one_claim_give_it_to_exactly_one_agent() {
    let db = Db::postgres().await;
    let (a, b) = (db.open().await, db.open().await);
    for id in ["a1", "a2"] {
        let mut reg = agent(id, "i");
        reg.tags = vec!["worker".into()];
        a.register_agent(&reg, None, Some("k1"), NOW).await.unwrap();
    }
    for n in 0..20 {
        let id = format!("job{n}");
        let mut job = message(&id, "tag:worker");
        job.claimable = true;
        a.send_message(&job, NOW).await.unwrap();
        let (x, y) = tokio::join!(
            a.claim_message(&id, "a1", 30_000, NOW + 1),
            b.claim_message(&id, "a2", 30_000, NOW + 1)
        );
        let won = [x.unwrap().value, y.unwrap().value]
            .into_iter()
            .filter(|c| matches!(c, Claim::Won(_)))
            .count();
        assert_eq!(won, 1, "claim {n}");
    }
}
