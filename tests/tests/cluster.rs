//! A three-node lab: bootstrap and replication, the Patroni-compatible health checks, metrics,
//! and the agent API's authentication and error documents.

use pgwarden_tests::{spec, wait_for, TestLab};
use reqwest::Method;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_three_nodes_and_replicate() {
    let t = TestLab::up(spec(1, 3)).await;
    t.exec(
        "n1",
        "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'hello')",
    )
    .await
    .unwrap();
    for n in ["n2", "n3"] {
        wait_for(Duration::from_secs(20), &format!("row on {n}"), || async {
            t.sql(n, "SELECT v FROM t WHERE id = 1")
                .await
                .is_ok_and(|r| r.len() == 1 && r[0].get::<_, String>(0) == "hello")
        })
        .await;
    }
    // The primary's status is refreshed every loop: wait for both WAL senders to stream.
    wait_for(
        Duration::from_secs(10),
        "n1 reports two streaming replicas",
        || async {
            t.status("n1").await.is_some_and(|p| {
                p.replication
                    .iter()
                    .filter(|r| r.state == "streaming")
                    .count()
                    == 2
            })
        },
    )
    .await;
    let p = t.status("n1").await.unwrap();
    assert!(p.is_writable_primary());
    assert_eq!(p.timeline, Some(1));
    assert!(p.server_version.unwrap() >= 150000);
    let apps: Vec<&str> = p
        .replication
        .iter()
        .filter(|r| r.state == "streaming")
        .map(|r| r.application_name.as_str())
        .collect();
    assert_eq!(apps, ["n2", "n3"], "{:?}", p.replication);
    for n in ["n2", "n3"] {
        let r = t.status(n).await.unwrap();
        assert!(r.is_streaming());
        assert_eq!(r.upstream.as_deref(), Some("n1"));
        assert_eq!(r.system_identifier, p.system_identifier);
    }
    // initdb settings: checksums, UTF8, replication-ready parameters.
    for (q, want) in [
        ("SHOW data_checksums", "on"),
        ("SHOW server_encoding", "UTF8"),
        ("SHOW wal_level", "replica"),
        ("SHOW hot_standby", "on"),
        ("SHOW wal_log_hints", "on"),
    ] {
        let v: String = t.sql("n2", q).await.unwrap()[0].get(0);
        assert_eq!(v, want, "{q}");
    }
    // One physical slot per replica, in use.
    let rows = t
        .sql(
            "n1",
            "SELECT slot_name::text FROM pg_replication_slots WHERE active ORDER BY 1",
        )
        .await
        .unwrap();
    let slots: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(slots, ["n2", "n3"]);
    assert!(t.event_kinds("n1").contains(&"bootstrapped".to_string()));
    let n2 = t.event_kinds("n2");
    assert!(n2.contains(&"cloned".to_string()), "{n2:?}");
    assert!(!n2.contains(&"bootstrapped".to_string()), "{n2:?}");
    let cloned = t
        .events("n2")
        .into_iter()
        .find(|e| e["kind"] == "cloned")
        .unwrap();
    assert!(
        cloned["message"].as_str().unwrap().contains(" of "),
        "the clone reports its size: {cloned}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_like_patroni() {
    let t = TestLab::up(spec(2, 2)).await;
    let expect = [
        ("/primary", 200, 503),
        ("/master", 200, 503),
        ("/leader", 200, 503),
        ("/read-write", 200, 503),
        ("/replica", 503, 200),
        ("/read-only", 200, 200),
        ("/health", 200, 200),
        ("/sync", 503, 503),
        ("/async", 503, 200),
        ("/liveness", 200, 200),
        ("/readiness", 200, 200),
    ];
    for (path, on_primary, on_replica) in expect {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert_eq!(
                t.check("n1", m.clone(), path).await,
                on_primary,
                "{m} {path} on primary"
            );
            assert_eq!(
                t.check("n2", m.clone(), path).await,
                on_replica,
                "{m} {path} on replica"
            );
        }
    }
    assert_eq!(t.check("n1", Method::GET, "/nope").await, 404);
    assert_eq!(t.check("n2", Method::GET, "/replica?lag=fast").await, 400);
    assert_eq!(t.check("n2", Method::POST, "/primary").await, 405);

    // The status document.
    let v: serde_json::Value = t
        .http
        .get(format!("{}/", t.lab.health_url("n2").unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for k in [
        "role",
        "state",
        "server_version",
        "timeline",
        "wal",
        "lag_bytes",
        "replication",
        "pending_restart",
        "last_error",
    ] {
        assert!(v.get(k).is_some(), "status lacks {k}: {v}");
    }
    assert_eq!(v["role"], "replica");

    // Lag: pause replay on the replica and write on the primary.
    t.exec("n2", "SELECT pg_wal_replay_pause()").await.unwrap();
    t.exec(
        "n1",
        "CREATE TABLE big AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 30000) g",
    )
    .await
    .unwrap();
    wait_for(Duration::from_secs(20), "replica lag above 1MB", || async {
        t.status("n2")
            .await
            .and_then(|s| s.lag_bytes)
            .is_some_and(|l| l > 1 << 20)
    })
    .await;
    assert_eq!(t.check("n2", Method::GET, "/replica?lag=1MB").await, 503);
    assert_eq!(
        t.check("n2", Method::GET, "/replica?lag=1048576").await,
        503
    );
    assert_eq!(t.check("n2", Method::GET, "/replica?lag=1GB").await, 200);
    assert_eq!(t.check("n2", Method::GET, "/replica").await, 200);
    assert_eq!(t.check("n2", Method::GET, "/readiness?lag=1MB").await, 503);
    let metrics = t
        .http
        .get(format!("{}/metrics", t.lab.health_url("n2").unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lag_line = metrics
        .lines()
        .find(|l| l.starts_with("pgwarden_replication_lag_bytes{"))
        .expect("lag metric");
    let lag: f64 = lag_line.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert!(lag > (1 << 20) as f64, "{lag_line}");
    assert!(metrics.contains("pgwarden_role{cluster=\"t2\",node=\"n2\",role=\"replica\"} 1"));
    t.exec("n2", "SELECT pg_wal_replay_resume()").await.unwrap();
    wait_for(Duration::from_secs(20), "replica caught up", || async {
        t.check("n2", Method::GET, "/replica?lag=1MB").await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_a_token_and_names_bad_fields() {
    let t = TestLab::up(spec(3, 2)).await;
    let url = format!("{}/v1/failover", t.lab.api_url("n2").unwrap());
    let r = t.http.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = t
        .http
        .post(&url)
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        t.check("n2", Method::GET, "/primary").await,
        503,
        "nothing was promoted"
    );

    let (code, v) = t
        .api("n1", "/v1/failover", Some(serde_json::json!({})))
        .await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["field"], "candidate", "{v}");
    let (code, v) = t
        .api(
            "n1",
            "/v1/switchover",
            Some(serde_json::json!({"candidate": "zz"})),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["field"], "candidate", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("n1, n2"), "{v}");
    let (code, v) = t
        .api(
            "n1",
            "/v1/switchover",
            Some(serde_json::json!({"candidate": "n2", "extra": 1})),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["field"], "extra", "{v}");
    let (code, v) = t
        .api(
            "n2",
            "/v1/switchover",
            Some(serde_json::json!({"candidate": "n1"})),
        )
        .await;
    assert_eq!(code, 422, "switch over to the primary itself: {v}");
    assert_eq!(v["field"], "candidate", "{v}");
    let (code, v) = t
        .api(
            "n1",
            "/v1/switchover",
            Some(serde_json::json!({"scheduled_at": "tomorrow"})),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["field"], "scheduled_at", "{v}");
    let (code, v) = t
        .api(
            "n1",
            "/v1/failover",
            Some(serde_json::json!({"candidate": "n2"})),
        )
        .await;
    assert_eq!(code, 409, "failover while the primary is healthy: {v}");
    let (code, v) = t.api("n1", "/v1/reinitialize", None).await;
    assert_eq!(code, 409, "reinitialize on the primary: {v}");
    let (code, _) = t.api("n1", "/v1/nope", None).await;
    assert_eq!(code, 404);
    // Nothing above changed the cluster.
    assert_eq!(t.check("n1", Method::GET, "/primary").await, 200);
    assert_eq!(t.check("n2", Method::GET, "/replica").await, 200);

    // Restart keeps the role and records an event.
    let before = t.status("n2").await.unwrap().postmaster_start_time;
    t.op("n2", "/v1/restart", None).await;
    let after = t.status("n2").await.unwrap();
    assert_ne!(after.postmaster_start_time, before);
    assert_eq!(after.role, pgwarden_core::status::Role::Replica);
    assert!(t
        .event_kinds("n2")
        .contains(&"postgres_restarted".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinitialize_keeps_the_old_data_directory() {
    let t = TestLab::up(spec(4, 2)).await;
    t.exec("n1", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let n2 = t.lab.node("n2").unwrap().clone();
    std::fs::write(n2.data_dir.join("keep-me.txt"), "operator notes").unwrap();
    // Some data, so that the copy takes a moment; watch the status while it runs.
    t.exec(
        "n1",
        "CREATE TABLE pad AS SELECT g, repeat('x', 500) AS p FROM generate_series(1, 60000) g",
    )
    .await
    .unwrap();
    t.wait_count("n2", "SELECT count(*) FROM pad", 60000).await;
    let watcher = {
        let http = t.http.clone();
        let url = format!("{}/status", t.lab.health_url("n2").unwrap());
        tokio::spawn(async move {
            let mut seen = None;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Ok(r) = http.get(&url).timeout(Duration::from_secs(1)).send().await {
                    if let Ok(s) = r.json::<pgwarden_core::status::NodeStatus>().await {
                        if let Some(p) = s.basebackup {
                            seen = Some((s.state, p));
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let msg = t.op("n2", "/v1/reinitialize", None).await;
    assert!(!msg.is_empty());
    let (state, progress) = watcher
        .await
        .unwrap()
        .expect("base-backup progress in the status");
    assert_eq!(state, pgwarden_core::status::PgState::Cloning);
    assert!(
        progress.total_bytes > 30 << 20 && progress.done_bytes <= progress.total_bytes,
        "{progress:?}"
    );
    t.wait_streaming_from("n1", Duration::from_secs(60)).await;
    let parent = n2.data_dir.parent().unwrap();
    let moved: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.pgwarden-moved-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "exactly one moved-aside directory");
    let old = moved[0].path();
    assert_eq!(
        std::fs::read_to_string(old.join("keep-me.txt")).unwrap(),
        "operator notes"
    );
    assert!(old.join("PG_VERSION").exists());
    assert!(
        !n2.data_dir.join("keep-me.txt").exists(),
        "the new data directory is a fresh copy"
    );
    assert_eq!(t.count("n2", "SELECT count(*) FROM t").await, 1);
    let kinds = t.event_kinds("n2");
    assert!(
        kinds.contains(&"data_dir_moved_aside".to_string()),
        "{kinds:?}"
    );
}
