//! The lab itself: hosts in network namespaces, `exec` inside a host, a partition that cuts a
//! host off (ARP included) while its own PostgreSQL stays reachable from inside, and `down`
//! removing everything it created. Needs root.

use pgwarden_lab::Fault;
use pgwarden_tests::{require_root, spec, TestLab};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn reachable(addr: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .is_ok_and(|r| r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_exec_partition_heal_and_down() {
    if !require_root("hosts_exec_partition_heal_and_down") {
        return;
    }
    let mut t = TestLab::up(spec(10, 3)).await;
    let lab = t.lab.clone();
    // The subnet is blackholed in the root namespace while the lab exists.
    let routes = sh(&["ip", "route", "show"]);
    assert!(routes.contains("blackhole 10.77.110.0/24"), "{routes}");
    assert!(routes.contains("10.77.110.0/24 dev pwbrt10"), "{routes}");
    // No host has a default route: nothing it sends can leave the lab.
    let inner = sh(&["ip", "-n", "pgwl-t10-n2", "route", "show"]);
    assert!(!inner.contains("default"), "{inner}");

    let out = lab
        .exec(
            "n2",
            &[
                "psql".into(),
                "-Atc".into(),
                "SELECT pg_is_in_recovery()".into(),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    let n2 = "10.77.110.12:5432";
    assert!(reachable(n2).await);
    t.lab.fault(Fault::Partition, "n2").unwrap();
    assert!(!reachable(n2).await, "a partitioned host is unreachable");
    // Its peers cannot reach it either, nor it them.
    let out = lab
        .exec(
            "n1",
            &[
                "ping".into(),
                "-c1".into(),
                "-W1".into(),
                "10.77.110.12".into(),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(!out.status.success(), "ping across the partition succeeded");
    let out = lab
        .exec("n2", &["psql".into(), "-Atc".into(), "SELECT 1".into()])
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "inside the host its own PostgreSQL still answers"
    );
    t.lab.fault(Fault::Heal, "n2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reachable(n2).await {
        assert!(Instant::now() < deadline, "healed host reachable again");
    }

    // down removes every namespace, link, route, process and directory.
    let pids: Vec<i32> = t.lab.nodes.iter().filter_map(|n| n.agent_pid).collect();
    let dir = t.lab.dir.clone();
    drop(t);
    assert!(!sh(&["ip", "netns", "list"]).contains("pgwl-t10-"));
    assert!(!sh(&["ip", "link", "show"]).contains("pwbrt10"));
    assert!(!sh(&["ip", "link", "show"]).contains("pwt10"));
    assert!(!sh(&["ip", "route", "show"]).contains("10.77.110."));
    assert!(!dir.exists());
    for p in pids {
        assert!(!pgwarden_lab::pid_alive(p), "agent {p} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_mode_runs_without_namespaces() {
    // The mode a user without root gets; forced here so CI (root) exercises it too.
    let mut s = spec(12, 2);
    s.mode = pgwarden_lab::Mode::Loopback;
    let t = TestLab::up(s).await;
    assert!(t
        .lab
        .nodes
        .iter()
        .all(|n| n.host == "127.0.0.1" && n.netns.is_none()));
    t.exec("n1", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM t", 1).await;
    let err = t.lab.clone().fault(Fault::Partition, "n2").unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
}
