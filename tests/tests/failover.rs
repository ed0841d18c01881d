//! The vote on real PostgreSQL in the lab: what a client sees when the primary's host dies, is
//! partitioned away, loses its agent, or only hiccups; maintenance mode; a manual failover.
//! Every scenario runs the write probe (a client writing through whichever server accepts)
//! and asserts that two servers never accepted writes in overlapping windows.

use pgwarden_lab::Fault;
use pgwarden_tests::{spec, wait_for, TestLab};
use serde_json::json;
use std::time::Duration;

const PROBE_EVERY: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_primary_host_fails_over_and_the_old_primary_rejoins() {
    let mut t = TestLab::up(spec(22, 3)).await;
    t.exec("n1", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let (stop, probe) = t.start_probe(PROBE_EVERY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    t.exec(&new, "INSERT INTO t VALUES (2)").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    eprintln!("stop-node: {}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.split_brain_writes, 0, "{r:?}");
    assert_eq!(r.final_primary.as_deref(), Some(new.as_str()), "{r:?}");
    assert!(r.per_node.get(&new).is_some_and(|&n| n > 5), "{r:?}");
    let st = t.status(&new).await.unwrap();
    assert_eq!(st.timeline, Some(2), "promoted once");
    let lease = st.consensus.unwrap().lease.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), (new.as_str(), 2));

    // The old primary comes back by itself and follows the new one.
    t.lab.fault(Fault::StartNode, "n1").unwrap();
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;
    t.wait_count("n1", "SELECT count(*) FROM t", 2).await;
    assert_eq!(t.primaries().await, vec![new.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_stops_writing_before_the_majority_promotes() {
    let mut t = TestLab::up(spec(23, 3)).await;
    t.exec(
        "n1",
        "CREATE TABLE t (id serial, at timestamptz default clock_timestamp())",
    )
    .await
    .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 0).await;
    t.lab.fault(Fault::Partition, "n1").unwrap();
    // A client on the isolated host keeps writing to it; record every write it acknowledged.
    let mut last_ok_on_n1: Option<String> = None;
    let mut refused = 0;
    for _ in 0..100 {
        match t.psql_in("n1", "INSERT INTO t DEFAULT VALUES RETURNING at::text") {
            Ok(at) => last_ok_on_n1 = Some(at),
            Err(_) => refused += 1,
        }
        if refused >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_ok_on_n1 = last_ok_on_n1.expect("n1 accepted writes before its lease ran out");
    assert!(refused >= 5, "the isolated primary kept accepting writes");
    assert!(
        t.psql_in("n1", "INSERT INTO t DEFAULT VALUES").is_err(),
        "a write to the isolated node fails"
    );
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    // The old primary's last acknowledged write happened before the new one was promoted
    // (both clocks are this machine's).
    let last_ok_ms: i64 = t
        .sql(
            &new,
            &format!("SELECT (extract(epoch FROM '{last_ok_on_n1}'::timestamptz) * 1000)::bigint"),
        )
        .await
        .unwrap()[0]
        .get(0);
    let kinds = t.event_kinds("n1");
    assert!(kinds.contains(&"lease_lost".to_string()), "{kinds:?}");
    let lost_at = event_ts(&t, "n1", "lease_lost");
    let promoted_at = event_ts(&t, &new, "promoted");
    assert!(
        lost_at < promoted_at && (last_ok_ms as u64) < promoted_at,
        "n1 wrote last at {last_ok_ms} and gave up at {lost_at}, {new} promoted at {promoted_at}"
    );

    // Heal: one primary, the old one a replica (rewound if its last writes diverged).
    t.lab.fault(Fault::Heal, "n1").unwrap();
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;
    assert_eq!(t.primaries().await, vec![new.clone()]);
    t.exec(&new, "INSERT INTO t DEFAULT VALUES").await.unwrap();
    let n = t.sql(&new, "SELECT count(*) FROM t").await.unwrap()[0].get::<_, i64>(0);
    t.wait_count("n1", "SELECT count(*) FROM t", n).await;
}

fn event_ts(t: &TestLab, node: &str, kind: &str) -> u64 {
    t.events(node)
        .iter()
        .rev()
        .find(|e| e["kind"] == kind)
        .and_then(|e| e["ts_ms"].as_u64())
        .unwrap_or_else(|| panic!("{node} has a {kind} event"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agent_never_leaves_two_primaries() {
    // PostgreSQL outlives its agent (so agent restarts cause no failover); the guard process
    // stops a writable PostgreSQL when the lease runs out with nobody renewing it.
    let mut t = TestLab::up(spec(24, 3)).await;
    let (stop, probe) = t.start_probe(PROBE_EVERY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = t.lab.postmaster_pid("n1").unwrap();
    t.lab.fault(Fault::KillAgent, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    eprintln!("kill-agent: {}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.split_brain_writes, 0, "{r:?}");
    assert!(r.per_node.get("n1").is_some_and(|&n| n > 5), "{r:?}");
    assert!(r.per_node.get(&new).is_some_and(|&n| n > 5), "{r:?}");
    assert!(
        !pgwarden_lab::pid_alive(pid),
        "the guard stopped n1's PostgreSQL"
    );
    let dir = t.lab.node("n1").unwrap().dir.clone();
    let guard = std::fs::read_to_string(dir.join("state/guard.log")).unwrap();
    assert!(guard.contains("the lease deadline passed"), "{guard}");

    t.lab.fault(Fault::StartNode, "n1").unwrap();
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_stops_automatic_failover_and_a_manual_failover_still_works() {
    let mut t = TestLab::up(spec(25, 3)).await;
    t.op("n2", "/v1/pause", None).await;
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    // Well past the lease (3 s) and drift: nobody takes over on its own.
    t.assert_no_primary(16).await;
    let st = t.status("n2").await.unwrap();
    assert!(
        st.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("maintenance")),
        "{:?}",
        st.waiting_for
    );
    assert!(!st.failover_readiness.unwrap().ready);
    // A failover to a healthy primary is refused; to n3 through n2's agent it works.
    let msg = t
        .op("n2", "/v1/failover", Some(json!({"candidate": "n3"})))
        .await;
    assert!(msg.contains("n3 took the lease"), "{msg}");
    assert_eq!(t.primaries().await, vec!["n3".to_string()]);
    let (code, v) = t
        .api("n2", "/v1/failover", Some(json!({"candidate": "n2"})))
        .await;
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("switchover"), "{v}");
    let (code, v) = t
        .api("n2", "/v1/failover", Some(json!({"candidate": "n9"})))
        .await;
    assert_eq!((code, v["field"].as_str()), (422, Some("candidate")), "{v}");
    t.op("n2", "/v1/resume", None).await;
    t.lab.fault(Fault::StartNode, "n1").unwrap();
    t.wait_streaming_from("n3", Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_network_hiccup_does_not_move_the_primary() {
    let mut t = TestLab::up(spec(26, 3)).await;
    let (stop, probe) = t.start_probe(PROBE_EVERY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::Partition, "n1").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::Heal, "n1").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    eprintln!("1 s hiccup: {}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.final_primary.as_deref(), Some("n1"), "{r:?}");
    assert_eq!(r.lost_acknowledged, 0, "{r:?}");
    assert_eq!(r.per_node.len(), 1, "only n1 ever accepted writes: {r:?}");
    let kinds = t.event_kinds("n1");
    assert!(!kinds.contains(&"lease_lost".to_string()), "{kinds:?}");
    assert_eq!(t.status("n1").await.unwrap().timeline, Some(1));
    wait_for(
        Duration::from_secs(10),
        "all replicas stream again",
        || async {
            t.status("n2").await.is_some_and(|s| s.is_streaming())
                && t.status("n3").await.is_some_and(|s| s.is_streaming())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_postgres_cannot_restart_gives_the_lease_up() {
    let mut s = spec(28, 3);
    // Each agent reads `failpoints` in its node's directory: n1's PostgreSQL can be made
    // impossible to start while the test runs.
    s.agent_env = vec![("PGWARDEN_FAILPOINT_FILE".into(), "failpoints".into())];
    let mut t = TestLab::up(s).await;
    let (code, v) = t
        .patch_config("n2", json!({"primary_start_timeout": "3s"}))
        .await;
    assert_eq!(code, 200, "{v}");
    let fp = t.lab.node("n1").unwrap().dir.join("failpoints");
    std::fs::write(&fp, "postgres_start\n").unwrap();
    t.lab.fault(Fault::KillPostgres, "n1").unwrap();
    let new = t.wait_new_primary("n1", Duration::from_secs(40)).await;
    let released = t
        .events("n1")
        .into_iter()
        .find(|e| e["kind"] == "lease_released")
        .expect("n1 released the lease");
    assert!(
        released["message"]
            .as_str()
            .unwrap()
            .contains("primary_start_timeout"),
        "{released}"
    );
    // Once PostgreSQL can start again, n1 comes back as a replica of the new primary.
    std::fs::remove_file(&fp).unwrap();
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;
}
