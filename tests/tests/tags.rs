//! Per-node tags on a lab: `noloadbalance` takes a replica out of `/replica` (and `/read-only`)
//! while it keeps replicating; `clonefrom` makes a new replica take its base backup from that
//! node and then stream from the primary; the tags appear in the status.

use pgwarden_tests::{spec, TestLab};
use reqwest::Method;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noloadbalance_and_clonefrom() {
    let mut s = spec(18, 3);
    s.node_config = vec![
        ("n2".into(), "[tags]\nnofailover = true".into()),
        (
            "n3".into(),
            "[tags]\nnoloadbalance = true\nclonefrom = true".into(),
        ),
    ];
    let t = TestLab::up(s).await;
    assert_eq!(t.check("n2", Method::GET, "/replica").await, 200);
    assert_eq!(t.check("n3", Method::GET, "/replica").await, 503);
    assert_eq!(t.check("n3", Method::GET, "/read-only").await, 503);
    assert_eq!(t.check("n3", Method::GET, "/health").await, 200);
    assert_eq!(t.check("n3", Method::GET, "/readiness").await, 200);
    let n3 = t.status("n3").await.unwrap();
    assert!(n3.tags.clonefrom && n3.tags.noloadbalance);
    assert!(n3.is_streaming(), "it still replicates");
    assert_eq!(
        t.status("n2")
            .await
            .unwrap()
            .tags
            .effective_failover_priority(),
        0
    );

    t.exec("n1", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    t.wait_count("n3", "SELECT count(*) FROM t", 1).await;
    // n2 is rebuilt: its base backup comes from n3, then it streams from the primary.
    t.op("n2", "/v1/reinitialize", None).await;
    t.wait_streaming_from("n1", Duration::from_secs(60)).await;
    let started = t
        .events("n2")
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "clone_started")
        .unwrap();
    let msg = started["message"].as_str().unwrap();
    assert!(msg.contains("from n3 (tagged clonefrom)"), "{msg}");
    let cloned = t
        .events("n2")
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "cloned")
        .unwrap();
    assert!(cloned["message"]
        .as_str()
        .unwrap()
        .starts_with("base backup from n3"));
    t.exec("n1", "INSERT INTO t VALUES (2)").await.unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_readiness_follows_tags_and_health() {
    let mut s = spec(21, 3);
    s.node_config = vec![("n2".into(), "[tags]\nnofailover = true".into())];
    let mut t = TestLab::up(s).await;
    let readiness = |st: pgwarden_core::status::NodeStatus| st.failover_readiness.unwrap();
    pgwarden_tests::wait_for(
        Duration::from_secs(20),
        "ready with n3 as the best",
        || async {
            t.status("n1")
                .await
                .and_then(|s| s.failover_readiness)
                .is_some_and(|r| r.ready && r.best.as_deref() == Some("n3"))
        },
    )
    .await;
    let r = readiness(t.status("n1").await.unwrap());
    let n2 = r.candidates.iter().find(|(n, _)| n == "n2").unwrap();
    assert!(
        matches!(&n2.1, pgwarden_core::candidate::Verdict::Ineligible(w) if w.contains("nofailover")),
        "{r:?}"
    );

    // n3's host dies: two of three members still agree on a leader, but nobody can be promoted.
    t.lab.fault(pgwarden_lab::Fault::StopNode, "n3").unwrap();
    pgwarden_tests::wait_for(Duration::from_secs(20), "not ready", || async {
        t.status("n1")
            .await
            .and_then(|s| s.failover_readiness)
            .is_some_and(|r| !r.ready)
    })
    .await;
    let r = readiness(t.status("n1").await.unwrap());
    let why = r.reasons.join("; ");
    assert!(why.contains("n2: tagged nofailover"), "{why}");
    assert!(why.contains("n3: not a healthy replica"), "{why}");
    assert!(
        !why.contains("majority"),
        "two of three still form a majority: {why}"
    );
}
