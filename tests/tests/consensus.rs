//! The agents' replicated log on a lab: the members form one group, a change committed through
//! any member is seen by all, the group elects a new leader when its leader's host dies and a
//! restarted member catches up from its durable log; without a majority nothing commits.

use pgwarden_core::status::Consensus;
use pgwarden_lab::Fault;
use pgwarden_tests::{spec, wait_for, TestLab};
use std::time::Duration;

async fn views(t: &TestLab, nodes: &[&str]) -> Vec<Option<Consensus>> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(t.status(n).await.and_then(|s| s.consensus));
    }
    out
}

/// Waits until every listed member reports the same leader (one of them) and term.
async fn agreed_leader(t: &TestLab, nodes: &[&str]) -> (String, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = views(t, nodes).await;
        let seen: Vec<Option<(Option<String>, u64)>> = v
            .iter()
            .map(|c| c.as_ref().map(|c| (c.leader.clone(), c.term)))
            .collect();
        if let Some(Some((Some(l), term))) = seen.first().cloned() {
            if nodes.contains(&l.as_str())
                && seen.iter().all(|x| *x == Some((Some(l.clone()), term)))
            {
                return (l, term);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no leader agreed by {nodes:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_form_one_group_that_survives_its_leader() {
    let mut t = TestLab::up(spec(15, 3)).await;
    let all = ["n1", "n2", "n3"];
    let (leader, term) = agreed_leader(&t, &all).await;
    let c = t.status("n1").await.unwrap().consensus.unwrap();
    let mut members = c.members.clone();
    members.sort();
    assert_eq!(members, ["n1", "n2", "n3"]);

    // A change proposed through a follower is committed by the leader and seen by all.
    let follower = all.iter().find(|n| **n != leader).unwrap();
    let msg = t.op(follower, "/v1/pause", None).await;
    assert!(msg.contains("committed"), "{msg}");
    wait_for(Duration::from_secs(10), "paused everywhere", || async {
        views(&t, &all)
            .await
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.paused))
    })
    .await;

    // The leader's host dies: the other two elect a new leader in a newer term.
    t.lab.fault(Fault::StopNode, &leader).unwrap();
    let rest: Vec<&str> = all.iter().copied().filter(|n| *n != leader).collect();
    let (new_leader, new_term) = agreed_leader(&t, &rest).await;
    assert_ne!(new_leader, leader);
    assert!(new_term > term);
    // Still committing with two of three.
    t.op(rest[0], "/v1/resume", None).await;

    // The survivors recorded once that it stopped answering.
    wait_for(
        Duration::from_secs(10),
        "a peer_unreachable event",
        || async {
            t.events(rest[0]).iter().any(|e| {
                e["kind"] == "peer_unreachable"
                    && e["message"].as_str().unwrap_or("").starts_with(&leader)
            })
        },
    )
    .await;

    // The old leader comes back, catches up from its log and the new leader.
    t.lab.fault(Fault::StartNode, &leader).unwrap();
    wait_for(
        Duration::from_secs(20),
        "a peer_reachable event",
        || async {
            t.events(rest[0])
                .iter()
                .any(|e| e["kind"] == "peer_reachable")
        },
    )
    .await;
    let (l, _) = agreed_leader(&t, &all).await;
    assert!(all.contains(&l.as_str()));
    wait_for(
        Duration::from_secs(20),
        "the returning member applied the resume",
        || async {
            t.status(&leader)
                .await
                .and_then(|s| s.consensus)
                .is_some_and(|c| !c.paused)
        },
    )
    .await;

    // With two of three members gone nothing commits, and the API says so.
    t.lab.fault(Fault::StopNode, rest[0]).unwrap();
    t.lab.fault(Fault::StopNode, rest[1]).unwrap();
    let (code, v) = t.api(&leader, "/v1/pause", None).await;
    assert_eq!(code, 503, "{v}");
    assert!(
        !t.status(&leader).await.unwrap().consensus.unwrap().paused,
        "a minority committed a change"
    );
}
