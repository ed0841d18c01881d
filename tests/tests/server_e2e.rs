//! The control plane end to end on a lab of real hosts: `pgwarden-lab up --server` starts
//! pgwarden-server on its own host and enrolls every agent with a one-time join token; a used
//! or expired token is refused; a switchover goes through the server to the agents' vote; and
//! while the server is down the cluster fails over on its own, the agents keep their events,
//! and the server's log afterwards holds every event of every agent once, in order.

use pgwarden_lab::Fault;
use pgwarden_tests::{require_root, spec, TestLab};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    fn of(t: &TestLab) -> Api {
        let s = t.lab.server.as_ref().expect("the lab has a server");
        Api {
            http: pgwarden_pki::tls::client(
                &s.ca_file().display().to_string(),
                None,
                Duration::from_secs(30),
            )
            .expect("client"),
            url: s.url(),
            token: s.admin_token.clone(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        match rb.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                (
                    s,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    /// Every event of `cluster`, through the cursor pages.
    async fn all_events(&self, cluster: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .get(&format!(
                    "/api/v1/events?cluster={cluster}&limit=1000{cursor}"
                ))
                .await;
            out.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return out,
            }
        }
    }

    async fn wait_command(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.get(&format!("/api/v1/commands/{id}")).await;
            if matches!(
                c["state"].as_str(),
                Some("succeeded" | "failed" | "timed_out")
            ) {
                return c;
            }
            assert!(Instant::now() < deadline, "command {id} not finished: {c}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `pgwarden-agent join` on a node's host with a token; returns (exit code, stderr).
fn join(t: &TestLab, node: &str, token: &str) -> (i32, String) {
    let s = t.lab.server.as_ref().expect("server");
    let n = t.lab.node(node).expect("node");
    let argv: Vec<String> = [
        t.lab.agent_bin.display().to_string(),
        "join".into(),
        "--config".into(),
        n.config.display().to_string(),
        "--server".into(),
        s.url(),
        "--token".into(),
        token.into(),
        "--ca-fingerprint".into(),
        s.ca_fingerprint.clone(),
        "--force".into(),
    ]
    .to_vec();
    let out = t
        .lab
        .exec(node, &argv)
        .expect("exec")
        .output()
        .expect("run join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn local_join_token(t: &TestLab, ttl: &str) -> String {
    let s = t.lab.server.as_ref().expect("server");
    let out = std::process::Command::new(&s.bin)
        .args([
            "--config",
            &s.config.display().to_string(),
            "join-token",
            "--cluster",
            &t.lab.name,
            "--ttl",
            ttl,
            "--json",
        ])
        .output()
        .expect("join-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    v["token"].as_str().expect("token").to_string()
}

/// The ids in a node's own durable event log (`<state_dir>/events.jsonl`).
fn local_event_ids(t: &TestLab, node: &str) -> BTreeSet<String> {
    let n = t.lab.node(node).expect("node");
    std::fs::read_to_string(n.dir.join("state/events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_enrolls_agents_runs_a_switchover_and_keeps_every_event_across_its_outage() {
    if !require_root("server_e2e") {
        return;
    }
    let mut s = spec(41, 3);
    s.server = true;
    let mut t = TestLab::up(s).await;
    let api = Api::of(&t);
    let cluster = t.lab.name.clone();

    // Every agent enrolled with its own certificate and reports.
    let certs = api.get("/api/v1/certificates").await;
    let mut enrolled: Vec<&str> = certs
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["node"].as_str())
        .collect();
    enrolled.sort();
    assert_eq!(enrolled, ["n1", "n2", "n3"], "{certs}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = api.get(&format!("/api/v1/clusters/{cluster}")).await;
        let roles: BTreeMap<String, String> = c["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| {
                        (
                            n["name"].as_str().unwrap_or("").to_string(),
                            n["role"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if c["primary"] == "n1"
            && roles.len() == 3
            && roles.values().filter(|r| *r == "replica").count() == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never saw the three nodes: {c}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A join token works once, and not after it expired.
    let token = local_join_token(&t, "1h");
    let (code, err) = join(&t, "n3", &token);
    assert_eq!(code, 0, "a fresh token enrolls: {err}");
    let (code, err) = join(&t, "n3", &token);
    assert_eq!(code, 1);
    assert!(err.contains("already used"), "{err}");
    let short = local_join_token(&t, "1s");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, err) = join(&t, "n3", &short);
    assert_eq!(code, 1);
    assert!(err.contains("expired"), "{err}");

    // Rotation: n3 gets a new certificate with its current one, restarts with it, and the
    // older ones are revoked; n3 goes on reporting.
    let n3 = t.lab.node("n3").expect("n3").clone();
    let argv: Vec<String> = vec![
        t.lab.agent_bin.display().to_string(),
        "renew-cert".into(),
        "--config".into(),
        n3.config.display().to_string(),
    ];
    let out = t
        .lab
        .exec("n3", &argv)
        .expect("exec")
        .output()
        .expect("renew");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_fp = pgwarden_pki::certs::fingerprint(
        &std::fs::read_to_string(n3.dir.join("state/tls/node.pem")).expect("node.pem"),
    )
    .expect("fingerprint");
    t.lab
        .fault(Fault::KillAgent, "n3")
        .expect("kill n3's agent");
    t.lab.start_agent("n3").expect("restart n3's agent");
    let certs = api.get("/api/v1/certificates").await;
    let old: Vec<String> = certs
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["node"] == "n3" && c["fingerprint"] != new_fp.as_str())
        .filter_map(|c| c["fingerprint"].as_str().map(String::from))
        .collect();
    assert_eq!(
        old.len(),
        2,
        "the lab's enrollment and the one above: {certs}"
    );
    for fp in &old {
        let (s, v) = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/certificates/{fp}/revoke"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let since = pgwarden_server::store::now_ms();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = api
            .get(&format!("/api/v1/clusters/{cluster}/nodes/n3"))
            .await;
        if n["last_report_ms"].as_i64().unwrap_or(0) > since + 1500 && n["agent_up"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 stopped reporting after the rotation: {n}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A switchover with pgwardenctl through the server: the command reaches an agent, which
    // hands it to the vote; its outcome and the agents' events come back.
    let srv = t.lab.server.as_ref().expect("server");
    let out = std::process::Command::new(pgwarden_tests::workspace_bin("pgwardenctl"))
        .args([
            "--server",
            &srv.url(),
            "--ca",
            &srv.ca_file().display().to_string(),
        ])
        .args([
            "switchover",
            "--cluster",
            &cluster,
            "--candidate",
            "n2",
            "--force",
        ])
        .env("PGWARDEN_TOKEN", &srv.admin_token)
        .env("PGWARDENCTL_CONFIG", t.lab.dir.join("no-cli-config.toml"))
        .output()
        .expect("pgwardenctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgwardenctl switchover: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("succeeded"),
        "it follows the command to its outcome: {stdout}"
    );
    let cmds = api.get("/api/v1/commands?state=succeeded").await;
    let done = cmds["items"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["kind"] == "switchover"))
        .cloned()
        .expect("the switchover command");
    assert_eq!(done["args"]["candidate"], "n2", "{done}");
    assert_eq!(
        t.wait_new_primary("n1", Duration::from_secs(30)).await,
        "n2"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (released, acquired, promoted) = loop {
        let evs = api.all_events(&cluster).await;
        let at = |node: &str, kind: &str| {
            evs.iter()
                .find(|e| e["node"] == node && e["type"] == kind)
                .and_then(|e| e["ts_ms"].as_i64())
        };
        if let (Some(r), Some(a), Some(p)) = (
            at("n1", "lease_released"),
            at("n2", "lease_acquired"),
            at("n2", "promoted"),
        ) {
            break (r, a, p);
        }
        assert!(
            Instant::now() < deadline,
            "switchover events missing on the server"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        released <= acquired && acquired <= promoted,
        "in order: {released} {acquired} {promoted}"
    );

    // The dynamic configuration: read from an agent, a bad change refused with its field,
    // a good one sent to the vote and kept in the history.
    let cfg = api.get(&format!("/api/v1/clusters/{cluster}/config")).await;
    assert!(
        cfg["config"]["version"].as_u64().is_some() && cfg["fetched_from"].is_string(),
        "{cfg}"
    );
    let path = format!("/api/v1/clusters/{cluster}/config");
    let (s, v) = api
        .call(reqwest::Method::PATCH, &path, Some(json!({"ttl": "soon"})))
        .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("ttl")), "{v}");
    let (s, c) = api
        .call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"parameters": {"work_mem": "8MB"}})),
        )
        .await;
    assert_eq!(s, 202, "{c}");
    let done = api
        .wait_command(c["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let cfg2 = api.get(&path).await;
    // Stored as it goes into postgresql.conf.
    assert_eq!(cfg2["config"]["parameters"]["work_mem"], "'8MB'", "{cfg2}");
    let hist = api.get(&format!("{path}/history")).await;
    assert_eq!(hist.as_array().map(|h| h.len()), Some(1), "{hist}");
    assert_eq!(hist[0]["patch"]["parameters"]["work_mem"], "8MB");

    // The server goes away; the primary's host dies; the agents fail over by themselves.
    t.lab.stop_server().expect("stop server");
    t.lab.fault(Fault::StopNode, "n2").expect("stop n2");
    let new = t.wait_new_primary("n2", Duration::from_secs(60)).await;
    t.exec(&new, "CREATE TABLE after_failover (x int)")
        .await
        .expect("write");
    // The server returns while n2 is still down: it notices n2 is gone.
    t.lab.start_server().expect("start server");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let evs = api.all_events(&cluster).await;
        if evs
            .iter()
            .any(|e| e["node"] == "n2" && e["type"] == "agent_down")
        {
            break;
        }
        assert!(Instant::now() < deadline, "n2 never marked down");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    t.lab.fault(Fault::StartNode, "n2").expect("start n2");
    t.wait_streaming_from(&new, Duration::from_secs(90)).await;

    // Every event each agent wrote is on the server once, nothing more, nothing missing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let evs = loop {
        let evs = api.all_events(&cluster).await;
        let on_server: BTreeSet<String> = evs
            .iter()
            .filter_map(|e| e["id"].as_str())
            .filter(|id| !id.starts_with("server-"))
            .map(String::from)
            .collect();
        let local: BTreeSet<String> = ["n1", "n2", "n3"]
            .iter()
            .flat_map(|n| local_event_ids(&t, n))
            .collect();
        if local.is_subset(&on_server) {
            assert_eq!(
                on_server, local,
                "the server holds exactly the agents' events"
            );
            break evs;
        }
        assert!(
            Instant::now() < deadline,
            "events missing on the server: {:?}",
            local.difference(&on_server).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ids: Vec<&str> = evs.iter().filter_map(|e| e["id"].as_str()).collect();
    let unique: BTreeSet<&&str> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "no event twice");
    // Per agent run (`<node>-<start>-<seq>`): sequence numbers 1, 2, 3 … without a gap, and in
    // the log's time order.
    let mut runs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for id in ids.iter().filter(|id| !id.starts_with("server-")) {
        let (run, seq) = id.rsplit_once('-').expect("id");
        runs.entry(run.to_string())
            .or_default()
            .push(seq.parse().expect("seq"));
    }
    for (run, seqs) in &runs {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &want, "{run}: events in order, no gaps");
    }
    assert!(
        runs.keys().filter(|r| r.starts_with("n2-")).count() >= 2,
        "n2's run before and after its restart"
    );
    // The failover happened while the server was down, and is there.
    let promoted: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "promoted" && e["node"] == new.as_str())
        .collect();
    assert!(!promoted.is_empty(), "{new}'s promotion is in the log");
    let down = evs
        .iter()
        .position(|e| e["node"] == "n2" && e["type"] == "agent_down")
        .expect("down");
    let up = evs
        .iter()
        .position(|e| e["node"] == "n2" && e["type"] == "agent_up")
        .expect("n2 back up");
    assert!(down < up);
    let records = api
        .get(&format!("/api/v1/clusters/{cluster}/failovers"))
        .await;
    let kinds: Vec<&str> = records
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"switchover") && kinds.contains(&"failover"),
        "records fetched from the agents: {kinds:?}"
    );
}

/// Two servers on one PostgreSQL store, both taking commands and both delivering: each
/// command reaches an agent once and runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgresql_store_deliver_each_command_exactly_once() {
    if !require_root("server_e2e two servers") {
        return;
    }
    let pg = pgwarden_tests::temp_pg::TempPostgres::start_for_labs("two").expect("PostgreSQL");
    pg.create_db("pgwarden").expect("createdb");
    let mut s = spec(42, 3);
    // The lab hosts reach this machine's PostgreSQL at the lab bridge's address.
    let bridge_ip = s.subnet.replace(".0/24", ".1");
    s.server = true;
    s.second_server = true;
    s.server_database_url = Some(format!(
        "postgres://postgres@{bridge_ip}:{}/pgwarden",
        pg.port
    ));
    let mut t = TestLab::up(s).await;
    let first = Api::of(&t);
    let second = Api {
        url: t.lab.second_server.as_ref().expect("second server").url(),
        http: first.http.clone(),
        token: first.token.clone(),
    };
    let cluster = t.lab.name.clone();
    // Both answer from the same store.
    assert_eq!(
        first.get("/api/v1/certificates").await,
        second.get("/api/v1/certificates").await
    );

    // Commands for n3 while its agent is down: both servers keep trying to deliver them.
    // When the agent is back, both race for every one of them.
    t.lab
        .fault(Fault::KillAgent, "n3")
        .expect("kill n3's agent");
    let mut ids = Vec::new();
    for i in 0..10 {
        let api = if i % 2 == 0 { &first } else { &second };
        let (st, c) = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/clusters/{cluster}/commands"),
                Some(json!({"kind": "restart", "node": "n3"})),
            )
            .await;
        assert_eq!(st, 202, "{c}");
        ids.push(c["id"].as_str().expect("id").to_string());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        let c = first.get(&format!("/api/v1/commands/{id}")).await;
        assert_eq!(c["state"], "queued", "{c}");
        assert!(
            c["attempts"].as_i64().unwrap_or(0) >= 2,
            "the servers kept trying: {c}"
        );
    }
    t.lab.start_agent("n3").expect("start n3's agent");
    for id in &ids {
        let c = first.wait_command(id, Duration::from_secs(180)).await;
        assert!(
            matches!(c["state"].as_str(), Some("succeeded" | "failed")),
            "the agent answered: {c}"
        );
        assert_eq!(c["delivered_to"], "n3");
    }
    // Each command was posted to exactly one agent, once, and started once.
    let mut posted: BTreeMap<String, u64> = BTreeMap::new();
    for n in ["n3"] {
        let list = t.api_get(n, "/v1/commands").await;
        for c in list.as_array().expect("commands") {
            *posted
                .entry(c["id"].as_str().unwrap_or("").to_string())
                .or_default() += c["deliveries"].as_u64().unwrap_or(0);
        }
    }
    let mut started: BTreeMap<String, usize> = BTreeMap::new();
    for n in ["n1", "n2", "n3"] {
        for e in t.events(n) {
            if e["kind"] == "command_started" {
                for id in &ids {
                    if e["message"].as_str().unwrap_or("").contains(id.as_str()) {
                        *started.entry(id.clone()).or_default() += 1;
                    }
                }
            }
        }
    }
    for id in &ids {
        assert_eq!(posted.get(id), Some(&1), "{id} delivered once: {posted:?}");
        assert_eq!(started.get(id), Some(&1), "{id} started once");
    }
    // Each server counted only its own deliveries: together, ten.
    let mut delivered = 0;
    for api in [&first, &second] {
        let m = api
            .http
            .get(format!("{}/metrics", api.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        delivered += m
            .lines()
            .find_map(|l| l.strip_prefix("pgwarden_server_commands_delivered_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("the delivery counter");
    }
    assert_eq!(delivered, 10);
}
