//! Role changes on real PostgreSQL: switchover through the API, an old primary that diverged
//! coming back with pg_rewind (or a fresh base backup when rewind fails), a killed postmaster
//! restarted in place, and an agent restart adopting the running PostgreSQL.

use pgwarden_core::status::Role;
use pgwarden_lab::Fault;
use pgwarden_tests::{spec, wait_for, TestLab};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_by_api_loses_nothing() {
    let t = TestLab::up(spec(5, 3)).await;
    t.exec(
        "n1",
        "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await
    .unwrap();
    let n3_started = t.status("n3").await.unwrap().postmaster_start_time;
    // Asked of a replica: forwarded to the lease holder, which runs it.
    let msg = t
        .op("n3", "/v1/switchover", Some(json!({"candidate": "n2"})))
        .await;
    assert!(msg.contains("switched over from n1 to n2"), "{msg}");
    t.wait_streaming_from("n2", Duration::from_secs(60)).await;
    assert_eq!(
        t.status("n3").await.unwrap().postmaster_start_time,
        n3_started,
        "follow reloads, it does not restart"
    );
    t.exec("n2", "INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    for n in ["n1", "n3"] {
        t.wait_count(n, "SELECT count(*) FROM t", 200).await;
    }
    let n2 = t.status("n2").await.unwrap();
    assert_eq!(n2.timeline, Some(2));
    assert_eq!(t.check("n2", Method::GET, "/primary").await, 200);
    assert_eq!(t.check("n1", Method::GET, "/replica").await, 200);
    let kinds = t.event_kinds("n1");
    assert!(kinds.contains(&"lease_released".to_string()), "{kinds:?}");
    assert!(
        !kinds.contains(&"rewind_started".to_string()),
        "a clean switchover needs no rewind: {kinds:?}"
    );
}

/// Makes n1 diverge the way a real failover does: n1 is partitioned away and keeps
/// acknowledging local writes until its lease runs out, the majority promotes another member,
/// more is written there; then the partition heals and n1 must rejoin on its own.
async fn diverge_and_heal(t: &mut TestLab) {
    t.exec(
        "n1",
        "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
    )
    .await
    .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 1).await;
    t.wait_count("n3", "SELECT count(*) FROM t", 1).await;
    t.lab.fault(Fault::Partition, "n1").unwrap();
    // Only n1 has these rows: its WAL goes past the point where the new timeline forks.
    t.psql_in("n1", "INSERT INTO t SELECT generate_series(1000, 1999)")
        .expect("n1 still holds its lease");
    let new = t.wait_new_primary("n1", Duration::from_secs(30)).await;
    t.exec(&new, "INSERT INTO t VALUES (2)").await.unwrap();
    t.lab.fault(Fault::Heal, "n1").unwrap();
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;
    for n in ["n1", "n2", "n3"] {
        t.wait_count(n, "SELECT count(*), sum(id) FROM t", 2).await;
    }
    assert_eq!(t.status("n1").await.unwrap().timeline, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_old_primary_rejoins_with_pg_rewind() {
    let mut t = TestLab::up(spec(6, 3)).await;
    diverge_and_heal(&mut t).await;
    let kinds = t.event_kinds("n1");
    assert!(kinds.contains(&"rewind".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"rewind_failed".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"clone_started".to_string()), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rewind_falls_back_to_a_fresh_base_backup() {
    let mut s = spec(7, 3);
    s.agent_env = vec![("PGWARDEN_FAILPOINTS".into(), "pg_rewind".into())];
    let mut t = TestLab::up(s).await;
    diverge_and_heal(&mut t).await;
    let kinds = t.event_kinds("n1");
    for k in ["rewind_failed", "data_dir_moved_aside", "cloned"] {
        assert!(kinds.contains(&k.to_string()), "{k} in {kinds:?}");
    }
    let dir = t.lab.node("n1").unwrap().dir.clone();
    let moved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.pgwarden-moved-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "the diverged data directory is kept aside");
    assert!(moved[0].path().join("PG_VERSION").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_is_restarted_in_place() {
    let mut t = TestLab::up(spec(8, 3)).await;
    t.exec("n1", "CREATE TABLE t (id int)").await.unwrap();
    for node in ["n1", "n3"] {
        let before = t.lab.postmaster_pid(node).unwrap();
        let role = t.status(node).await.unwrap().role;
        t.lab.fault(Fault::KillPostgres, node).unwrap();
        wait_for(Duration::from_secs(30), &format!("{node} back"), || async {
            let st = t.status(node).await;
            let new_pid = t.lab.postmaster_pid(node);
            // No other node may ever become primary meanwhile.
            for other in ["n1", "n2", "n3"].into_iter().filter(|o| *o != "n1") {
                assert_ne!(
                    t.check(other, Method::GET, "/primary").await,
                    200,
                    "{other}"
                );
            }
            st.is_some_and(|s| s.role == role && s.state == pgwarden_core::status::PgState::Running)
                && new_pid.is_some_and(|p| p != before)
        })
        .await;
        let st = t.status(node).await.unwrap();
        assert_eq!(st.crash_restarts, 1, "{node}");
        assert_eq!(st.timeline, Some(1), "no failover happened");
        assert!(t
            .event_kinds(node)
            .contains(&"postgres_crashed".to_string()));
    }
    t.exec("n1", "INSERT INTO t VALUES (1)").await.unwrap();
    t.wait_streaming_from("n1", Duration::from_secs(30)).await;
    // The restarted primary and replica keep their roles.
    assert_eq!(t.status("n3").await.unwrap().role, Role::Replica);
    let _ = &mut t;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_adopts_running_postgres_and_existing_data() {
    let mut t = TestLab::up(spec(9, 3)).await;
    // A lease long enough for the agent's restart below on a slow machine: while the agent
    // is away nobody renews, and the guard would stop PostgreSQL at the end of the lease.
    let (code, v) = t.patch_config("n2", json!({"ttl": "20s"})).await;
    assert_eq!(code, 200, "{v}");
    t.exec("n1", "CREATE TABLE t (id int)").await.unwrap();
    let pid = t.lab.postmaster_pid("n1").unwrap();
    t.lab.fault(Fault::KillAgent, "n1").unwrap();
    // PostgreSQL keeps serving while its agent is gone.
    t.exec("n1", "INSERT INTO t VALUES (1)").await.unwrap();
    t.lab.fault(Fault::StartNode, "n1").unwrap();
    wait_for(Duration::from_secs(20), "n1's agent back", || async {
        t.status("n1")
            .await
            .is_some_and(|s| s.is_writable_primary())
    })
    .await;
    assert_eq!(
        t.lab.postmaster_pid("n1"),
        Some(pid),
        "PostgreSQL was not restarted"
    );
    assert!(t
        .event_kinds("n1")
        .contains(&"postgres_adopted".to_string()));

    // A whole host down and back: its data directory is reused, not cloned again.
    let sysid = t.status("n2").await.unwrap().system_identifier;
    let clones_before = t
        .event_kinds("n2")
        .iter()
        .filter(|k| *k == "clone_started")
        .count();
    t.lab.fault(Fault::StopNode, "n2").unwrap();
    t.exec("n1", "INSERT INTO t VALUES (2)").await.unwrap();
    t.lab.fault(Fault::StartNode, "n2").unwrap();
    t.wait_streaming_from("n1", Duration::from_secs(60)).await;
    assert_eq!(t.status("n2").await.unwrap().system_identifier, sysid);
    let clones_after = t
        .event_kinds("n2")
        .iter()
        .filter(|k| *k == "clone_started")
        .count();
    assert_eq!(clones_before, clones_after, "no new base backup");
    t.wait_count("n2", "SELECT count(*) FROM t", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_with_a_writer_running_loses_no_acknowledged_write() {
    let t = TestLab::up(spec(13, 3)).await;
    let (stop, probe) = t.start_probe(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.op("n1", "/v1/switchover", Some(json!({"candidate": "n2"})))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    eprintln!("switchover by API: {}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.lost_acknowledged, 0, "{r:?}");
    assert_eq!(r.split_brain_writes, 0, "{r:?}");
    assert_eq!(r.final_primary.as_deref(), Some("n2"));
    assert!(r.per_node.get("n1").is_some_and(|&n| n > 10), "{r:?}");
    assert!(r.per_node.get("n2").is_some_and(|&n| n > 10), "{r:?}");
    assert!(
        !r.per_node.contains_key("n3"),
        "a replica never acknowledged a write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reports_two_primaries_and_lost_writes() {
    // Negative control for the probe: a second primary made by hand behind pgwarden's back
    // (n2's agent killed, then its PostgreSQL promoted directly). When n2's agent returns it
    // finds a writable PostgreSQL without the lease, stops it and rewinds it.
    let mut t = TestLab::up(spec(14, 3)).await;
    let (stop, probe) = t.start_probe(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::KillAgent, "n2").unwrap();
    t.exec("n2", "SELECT pg_promote()").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.lab.fault(Fault::StartNode, "n2").unwrap();
    t.wait_streaming_from("n1", Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(()).unwrap();
    let r = probe.await.unwrap().unwrap();
    assert!(r.split_brain_writes > 10, "{r:?}");
    assert!(
        r.lost_acknowledged > 10,
        "the old primary's writes were rewound away: {r:?}"
    );
    let kinds = t.event_kinds("n2");
    assert!(kinds.contains(&"stepped_down".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"rewind".to_string()), "{kinds:?}");
}
