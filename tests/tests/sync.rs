//! Synchronous mode, priorities and two-node clusters on real PostgreSQL in the lab.

use pgwarden_lab::Fault;
use pgwarden_tests::{spec, TestLab};
use serde_json::json;
use std::time::Duration;

/// Waits until `primary` has a committed synchronous set, every other member streams from it,
/// and PostgreSQL reports the set's members synchronous.
async fn wait_sync(t: &TestLab, primary: &str) -> Vec<String> {
    t.wait_streaming_from(primary, Duration::from_secs(90))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = t.status(primary).await {
            let set = st.consensus.map(|c| c.sync).unwrap_or_default();
            let confirmed = set.iter().all(|m| {
                st.replication
                    .iter()
                    .any(|r| &r.application_name == m && r.sync_state == "sync")
            });
            if !set.is_empty() && confirmed {
                return set;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no committed synchronous set on {primary}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_loses_no_acknowledged_write_across_20_failovers() {
    let mut t = TestLab::up(spec(29, 3)).await;
    // The fast lease keeps 20 failovers short; synchronous mode is what is tested.
    let (code, v) = t
        .patch_config(
            "n1",
            json!({"synchronous_mode": "on", "ttl": "1200ms", "clock_drift": "100ms"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let mut primary = "n1".to_string();
    wait_sync(&t, &primary).await;
    let (stop, probe) = t.start_probe(Duration::from_millis(10));
    for round in 0..20 {
        let set = wait_sync(&t, &primary).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.lab.fault(Fault::StopNode, &primary).unwrap();
        let t0 = std::time::Instant::now();
        let new = t.wait_new_primary(&primary, Duration::from_secs(30)).await;
        eprintln!(
            "round {round}: {primary} stopped, {new} primary after {} ms (set {set:?})",
            t0.elapsed().as_millis()
        );
        assert!(
            set.contains(&new),
            "round {round}: {new} was promoted but the synchronous set was {set:?}"
        );
        t.lab.fault(Fault::StartNode, &primary).unwrap();
        primary = new;
    }
    wait_sync(&t, &primary).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    eprintln!(
        "synchronous mode, 20 failovers: {}",
        serde_json::to_string(&r).unwrap()
    );
    assert_eq!(r.lost_acknowledged, 0, "{r:?}");
    assert_eq!(r.split_brain_writes, 0, "{r:?}");
    assert!(r.acknowledged > 500, "{r:?}");
    let history: pgwarden_core::record::History =
        serde_json::from_value(t.api_get(&primary, "/v1/history").await).unwrap();
    let failovers = history
        .failovers
        .iter()
        .filter(|f| f.kind == pgwarden_core::record::ChangeKind::Failover)
        .count();
    assert_eq!(failovers, 20, "one record per failover");
    let last = history.failovers.last().unwrap();
    assert!(last.candidates.iter().any(|c| c.synchronous), "{last:?}");
}

/// A new synchronous primary with no standby left must still come up as the primary (and, in
/// `on` mode, degrade and accept writes): nothing on the promotion path may wait for a
/// synchronous standby. (The agent's role maintenance after a promotion once did, and the
/// promotion then hung until a standby connected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_primary_without_any_standby_is_promoted_and_degrades() {
    let mut s = spec(40, 3);
    s.agent_env = vec![("PGWARDEN_FAILPOINT_FILE".into(), "failpoints".into())];
    let mut t = TestLab::up(s).await;
    let (code, v) = t
        .patch_config("n1", json!({"synchronous_mode": "on"}))
        .await;
    assert_eq!(code, 200, "{v}");
    t.exec("n1", "CREATE TABLE t (id int)").await.unwrap();
    // n3's PostgreSQL stays down (its agent votes on): n2 is the only standby.
    let dir = t.lab.node("n3").unwrap().dir.clone();
    std::fs::write(dir.join("failpoints"), "postgres_start\n").unwrap();
    t.lab.fault(Fault::KillPostgres, "n3").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let set = t
            .status("n1")
            .await
            .and_then(|s| s.consensus)
            .map(|c| c.sync)
            .unwrap_or_default();
        if set == ["n2".to_string()] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "set {set:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The primary's host dies: n2, the synchronous standby, takes over with no standby left.
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(20)).await;
    assert_eq!(new, "n2");
    // `on` degrades to asynchronous: the write is acknowledged without a standby.
    tokio::time::timeout(
        Duration::from_secs(20),
        t.exec("n2", "INSERT INTO t VALUES (1)"),
    )
    .await
    .expect("on mode degraded: the write completes")
    .unwrap();
    let names = t.sql("n2", "SHOW synchronous_standby_names").await.unwrap();
    assert_eq!(
        names[0].get::<_, String>(0),
        "",
        "asynchronous without a standby"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_blocks_writes_without_a_standby_until_one_returns() {
    let mut s = spec(30, 3);
    // Each agent reads `failpoints` in its node directory: the standbys' PostgreSQL can be
    // kept down while their agents (and the majority) stay up.
    s.agent_env = vec![("PGWARDEN_FAILPOINT_FILE".into(), "failpoints".into())];
    let mut t = TestLab::up(s).await;
    let (code, v) = t
        .patch_config("n1", json!({"synchronous_mode": "strict"}))
        .await;
    assert_eq!(code, 200, "{v}");
    wait_sync(&t, "n1").await;
    t.exec("n1", "CREATE TABLE t (id int)").await.unwrap();
    for n in ["n2", "n3"] {
        let dir = t.lab.node(n).unwrap().dir.clone();
        std::fs::write(dir.join("failpoints"), "postgres_start\n").unwrap();
        t.lab.fault(Fault::KillPostgres, n).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // No standby: the write waits instead of being acknowledged without one.
    let dsn = t.lab.dsn("n1").unwrap();
    let write =
        tokio::spawn(async move { pgwarden_tests::exec(&dsn, "INSERT INTO t VALUES (1)").await });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !write.is_finished(),
        "strict mode acknowledged a write with no standby"
    );
    assert_eq!(t.primaries().await, vec!["n1".to_string()]);
    // A standby returns: the write completes.
    let dir = t.lab.node("n2").unwrap().dir.clone();
    std::fs::remove_file(dir.join("failpoints")).unwrap();
    tokio::time::timeout(Duration::from_secs(60), write)
        .await
        .expect("the write completes once a standby is back")
        .unwrap()
        .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_priority_decides_and_nofailover_is_never_promoted() {
    let mut s = spec(31, 3);
    s.node_config = vec![
        ("n2".into(), "[tags]\nfailover_priority = 1".into()),
        ("n3".into(), "[tags]\nfailover_priority = 5".into()),
    ];
    let mut t = TestLab::up(s).await;
    t.exec("n1", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 1).await;
    t.wait_count("n3", "SELECT count(*) FROM t", 1).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    assert_eq!(
        new, "n3",
        "the higher failover_priority wins among caught-up replicas"
    );
    let history: pgwarden_core::record::History =
        serde_json::from_value(t.api_get("n3", "/v1/history").await).unwrap();
    let rec = history.failovers.last().unwrap();
    assert_eq!(rec.new_holder, "n3");
    assert_eq!(rec.old_holder.as_deref(), Some("n1"));
    let names: Vec<&str> = rec.candidates.iter().map(|c| c.name.as_str()).collect();
    for n in ["n1", "n2", "n3"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let steps: Vec<&str> = rec.steps.iter().map(|s| s.step.as_str()).collect();
    for s in [
        "lease_expired",
        "elected",
        "promoted",
        "first_write_accepted",
    ] {
        assert!(steps.contains(&s), "{s} in {steps:?}");
    }
    assert!(
        rec.steps.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "{:?}",
        rec.steps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nofailover_is_never_promoted_even_as_the_only_candidate() {
    // n3 may never lead either (priority 0): once n1 is gone, n2 is the only replica that
    // could take over, and it is tagged nofailover.
    let mut s = spec(32, 3);
    s.node_config = vec![
        ("n2".into(), "[tags]\nnofailover = true".into()),
        ("n3".into(), "[tags]\nfailover_priority = 0".into()),
    ];
    let mut t = TestLab::up(s).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    t.assert_no_primary(20).await;
    let st = t.status("n2").await.unwrap();
    assert!(
        st.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("no eligible candidate")),
        "{:?}",
        st.waiting_for
    );
    let verdicts = st.failover_readiness.unwrap().candidates;
    assert!(
        verdicts
            .iter()
            .any(|(n, v)| n == "n2" && format!("{v:?}").contains("nofailover")),
        "{verdicts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_without_a_witness_never_promote_on_peer_loss() {
    let mut t = TestLab::up(spec(33, 2)).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    t.assert_no_primary(20).await;
    let st = t.status("n2").await.unwrap();
    let why = st.waiting_for.unwrap_or_default();
    assert!(why.contains("majority"), "the status says why: {why}");
    let ready = st.failover_readiness.unwrap();
    assert!(!ready.ready, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_and_a_witness_fail_over() {
    let mut s = spec(34, 2);
    s.witnesses = 1;
    let mut t = TestLab::up(s).await;
    let w = t.status("w1").await.unwrap();
    assert!(
        w.witness && w.consensus.as_ref().unwrap().members.len() == 3,
        "{w:?}"
    );
    let (stop, probe) = t.start_probe(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    assert_eq!(new, "n2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    assert_eq!(r.split_brain_writes, 0, "{r:?}");
    assert_eq!(r.final_primary.as_deref(), Some("n2"), "{r:?}");
    // The witness never takes the lease; it forwards operations to the members that run them.
    let (code, v) = t
        .api("w1", "/v1/failover", Some(json!({"candidate": "w1"})))
        .await;
    assert_eq!(code, 409, "{v}");
    t.lab.fault(Fault::StartNode, "n1").unwrap();
    t.wait_streaming_from("n2", Duration::from_secs(90)).await;
}
