//! The cluster's dynamic configuration on a lab: one PATCH reaches every node (reloaded, no
//! restart); a restart-only parameter shows up as pending_restart until the node restarts;
//! pg_hba lines land in every node's file; every change is in the history; bad input is
//! refused naming the field, and changes nothing.

use pgwarden_tests::{spec, wait_for, TestLab};
use serde_json::json;
use std::time::Duration;

async fn patch(t: &TestLab, node: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    t.patch_config(node, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_reaches_every_node() {
    let t = TestLab::up(spec(19, 3)).await;
    let all = ["n1", "n2", "n3"];
    let before: Vec<Option<String>> = {
        let mut v = Vec::new();
        for n in all {
            v.push(t.status(n).await.unwrap().postmaster_start_time);
        }
        v
    };

    // Through a Raft follower: the change is forwarded to the leader, and the follower's answer
    // (and what it serves next) already includes it.
    let follower = t.raft_follower().await;
    let follower = follower.as_str();
    let (code, v) = patch(&t, follower, json!({"parameters": {"work_mem": "7MB"}})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["config"]["version"], 1,
        "{follower} answered with its own state: {v}"
    );
    let r = t.api_get(follower, "/v1/config").await;
    assert_eq!(r["config"]["version"], 1, "read-your-writes on {follower}");
    for n in all {
        t.wait_text(n, "SHOW work_mem", "7MB").await;
    }
    for (i, n) in all.iter().enumerate() {
        assert_eq!(
            t.status(n).await.unwrap().postmaster_start_time,
            before[i],
            "{n} reloaded, it did not restart"
        );
    }

    // A restart-only parameter is flagged on every node until it restarts.
    let (code, _) = patch(&t, "n1", json!({"parameters": {"max_connections": 41}})).await;
    assert_eq!(code, 200);
    for n in all {
        wait_for(
            Duration::from_secs(20),
            &format!("pending_restart on {n}"),
            || async {
                t.status(n).await.is_some_and(|s| {
                    s.pending_restart
                        && s.pending_restart_params.contains(&"max_connections".into())
                })
            },
        )
        .await;
    }
    t.op("n2", "/v1/restart", None).await;
    t.wait_text("n2", "SHOW max_connections", "41").await;
    assert!(!t.status("n2").await.unwrap().pending_restart);
    assert!(t.status("n3").await.unwrap().pending_restart);

    // pg_hba lines reach every node's file.
    let rule = "host all all 10.99.0.0/16 scram-sha-256";
    let (code, _) = patch(&t, "n2", json!({"pg_hba": [rule]})).await;
    assert_eq!(code, 200);
    for n in &t.lab.nodes {
        let f = n.data_dir.join("pg_hba.conf");
        wait_for(
            Duration::from_secs(20),
            &format!("pg_hba on {}", n.name),
            || async { std::fs::read_to_string(&f).is_ok_and(|s| s.contains(rule)) },
        )
        .await;
    }

    // Bad input: refused with the field named, nothing committed.
    for (body, field) in [
        (json!({"parameters": {"port": 6000}}), "parameters.port"),
        (
            json!({"parameters": {"wal_level": "minimal"}}),
            "parameters.wal_level",
        ),
        (
            json!({"parameters": {"work_mem": [1]}}),
            "parameters.work_mem",
        ),
        (json!({"pg_hba": [""]}), "pg_hba[0]"),
        (json!({"paramters": {}}), "paramters"),
    ] {
        let (code, v) = patch(&t, "n1", body.clone()).await;
        assert_eq!(code, 422, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }

    // The history: who, when, what.
    let r = t.api_get("n1", "/v1/config").await;
    assert_eq!(r["config"]["version"], 3, "{r}");
    let h = r["history"].as_array().unwrap();
    assert_eq!(h.len(), 3);
    assert_eq!(h[0]["changes"][0]["name"], "work_mem");
    assert_eq!(h[0]["changes"][0]["new"], "'7MB'");
    assert!(h[0]["by"].as_str().unwrap().contains(follower));
    assert!(h[1]["at_ms"].as_u64().unwrap() >= h[0]["at_ms"].as_u64().unwrap());
    assert_eq!(h[2]["changes"][0]["name"], "pg_hba");
}
