//! The control plane's REST API against a real store: the embedded SQLite default and a real
//! PostgreSQL server. Every endpoint: success, 401 without a token, 403 for a role too low,
//! 4xx naming the field on bad input, pagination, the live stream; enrollment with join
//! tokens, agent reports (events stored once), commands through their states.

use pgwarden_core::control::{AgentReport, EnrollResponse};
use pgwarden_core::event::Event;
use pgwarden_core::server_config::ServerConfig;
use pgwarden_core::status::{NodeStatus, PgState, Role};
use pgwarden_tests::temp_pg::TempPostgres;
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Srv {
    base: String,
    dir: PathBuf,
    admin: String,
    http: reqwest::Client,
    _running: pgwarden_server::Running,
}

impl Srv {
    async fn start(name: &str, db_url: Option<String>) -> Srv {
        let dir = std::env::temp_dir().join(format!("pgwarden-srv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.display()
        );
        if let Some(u) = &db_url {
            text.push_str(&format!("database_url = \"{u}\"\n"));
        }
        text.push_str("[agents]\nreport_interval = \"1s\"\ndown_after = \"3s\"\n");
        let cfg = ServerConfig::parse(&text, "server.toml").expect("config");
        let out = pgwarden_server::init(&cfg).await.expect("init");
        let admin = out.admin_token.expect("a first admin token");
        // init twice keeps everything and creates no second admin.
        let again = pgwarden_server::init(&cfg).await.expect("init again");
        assert!(again.admin_token.is_none());
        assert_eq!(again.ca_fingerprint, out.ca_fingerprint);
        let running = pgwarden_server::start(cfg.clone()).await.expect("start");
        let http = pgwarden_pki::tls::client(&cfg.ca_file(), None, Duration::from_secs(10))
            .expect("client");
        Srv {
            base: format!("https://localhost:{}", running.addr.port()),
            dir,
            admin,
            http,
            _running: running,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        call(&self.http, &self.base, method, path, token, body).await
    }
    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }
    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Enrolls `node` of `cluster` with a fresh join token; returns an mTLS client.
    async fn enroll(&self, cluster: &str, node: &str) -> (reqwest::Client, EnrollResponse) {
        let e = pgwarden_server::testkit::enroll(
            &self.http,
            &self.base,
            &self.admin,
            &self.dir.join("pki/ca.pem"),
            &self.dir,
            cluster,
            node,
        )
        .await
        .expect("enroll");
        (e.client, e.response)
    }

    async fn report(&self, agent: &reqwest::Client, rep: &AgentReport) -> (u16, Value) {
        call(
            agent,
            &self.base,
            Method::POST,
            "/api/v1/agent/report",
            None,
            Some(serde_json::to_value(rep).expect("json")),
        )
        .await
    }
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r.text().await.expect("body");
    if status >= 400 && status != 404 || ct.contains("problem") {
        assert_eq!(
            ct, "application/problem+json",
            "error answers are problem documents: {status} {text}"
        );
    }
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn status(node: &str, role: Role, lag: Option<u64>) -> NodeStatus {
    NodeStatus {
        name: node.into(),
        cluster: "main".into(),
        role,
        state: PgState::Running,
        timeline: Some(1),
        lag_bytes: lag,
        agent_version: "test".into(),
        ..Default::default()
    }
}

fn events(node: &str, boot: u64, from: u64, n: u64) -> Vec<Event> {
    (from..from + n)
        .map(|i| Event {
            id: format!("{node}-{boot}-{i}"),
            ts_ms: 1_700_000_000_000 + i * 10,
            cluster: "main".into(),
            node: node.into(),
            kind: if i % 2 == 0 {
                "even".into()
            } else {
                "odd".into()
            },
            message: format!("event {i}"),
        })
        .collect()
}

fn report(node: &str, role: Role, evs: Vec<Event>) -> AgentReport {
    AgentReport {
        cluster: "main".into(),
        node: node.into(),
        agent_version: "test".into(),
        // Nothing listens there: commands cannot be delivered.
        api_url: "https://127.0.0.1:9".into(),
        status: status(
            node,
            role,
            if role == Role::Replica {
                Some(4096)
            } else {
                None
            },
        ),
        events: evs,
        history_epoch: None,
        commands: Vec::new(),
    }
}

fn field(v: &Value) -> &str {
    v["field"].as_str().unwrap_or("")
}

async fn suite(srv: &Srv) {
    let admin = srv.admin.clone();

    // ---- health, metrics, OpenAPI ----
    let (s, _) = srv.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, 200);
    let (s, _) = srv.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, 200);
    let (s, doc) = srv
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );

    // ---- every route of the document: 401 without a token, 403 for a viewer's change ----
    let (_, login) = srv
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({"name": "peek", "role": "viewer", "password": "peek-password-1"})),
        )
        .await;
    assert_eq!(login["role"], "viewer");
    let (_, t) = srv
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"user": "peek", "password": "peek-password-1"})),
        )
        .await;
    let peek = t["token"].as_str().expect("token").to_string();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{cluster}", "main")
            .replace("{node}", "n1")
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in item.as_object().expect("item") {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let secured = op.get("security").is_some();
            if !secured {
                continue;
            }
            let body = (m != Method::GET && m != Method::DELETE).then(|| json!({}));
            let (s, v) = srv.call(m.clone(), &concrete, None, body.clone()).await;
            assert_eq!(s, 401, "{method} {path} without a token: {v}");
            // Changes need more than the viewer role, except a viewer's own API tokens.
            if m != Method::GET && !path.starts_with("/api/v1/tokens") {
                let (s, v) = srv.call(m, &concrete, Some(&peek), body).await;
                assert_eq!(s, 403, "{method} {path} as a viewer: {v}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} routes in the document");

    // ---- authentication ----
    let (s, _) = srv.call(Method::GET, "/api/v1/clusters", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = srv.get("/api/v1/clusters", "pgw_not_a_token").await;
    assert_eq!(s, 401);
    let (s, me) = srv.get("/api/v1/me", &admin).await;
    assert_eq!((s, me["role"].as_str()), (200, Some("admin")));

    // ---- users ----
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "vic", "role": "viewer", "password": "viewer-password-1"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "ollie", "role": "operator", "password": "operator-password"}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "vic", "role": "viewer"}),
        )
        .await;
    assert_eq!((s, field(&v)), (409, "name"));
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "bad name", "role": "viewer"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "name"));
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "x", "role": "root"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "role"));
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "x", "role": "viewer", "password": "short"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "password"));
    let (s, v) = srv
        .post(
            "/api/v1/users",
            &admin,
            json!({"name": "x", "role": "viewer", "colour": "red"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "colour"));
    let (s, _) = srv
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"user": "vic", "password": "wrong"})),
        )
        .await;
    assert_eq!(s, 401);
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"user": "vic", "password": "viewer-password-1"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let viewer = v["token"].as_str().expect("token").to_string();
    let (_, v) = srv
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"user": "ollie", "password": "operator-password"})),
        )
        .await;
    let operator = v["token"].as_str().expect("token").to_string();
    let (s, me) = srv.get("/api/v1/me", &viewer).await;
    assert_eq!((s, me["role"].as_str()), (200, Some("viewer")));
    let (s, _) = srv.get("/api/v1/users", &viewer).await;
    assert_eq!(s, 403);
    let (s, users) = srv.get("/api/v1/users", &admin).await;
    assert_eq!((s, users.as_array().map(|a| a.len())), (200, Some(4)));
    let (s, v) = srv
        .call(
            Method::PATCH,
            "/api/v1/users/vic",
            Some(&admin),
            Some(json!({"role": "operator"})),
        )
        .await;
    assert_eq!((s, v["role"].as_str()), (200, Some("operator")));
    let (s, _) = srv
        .call(
            Method::PATCH,
            "/api/v1/users/vic",
            Some(&admin),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = srv
        .call(
            Method::PATCH,
            "/api/v1/users/vic",
            Some(&admin),
            Some(json!({"role": "boss"})),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "role"));
    let (s, _) = srv
        .call(
            Method::PATCH,
            "/api/v1/users/vic",
            Some(&viewer),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, 403);

    // ---- API tokens ----
    let (s, v) = srv
        .post(
            "/api/v1/tokens",
            &viewer,
            json!({"name": "ci", "ttl": "1d"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let ci_id = v["id"].as_str().expect("id").to_string();
    let ci_token = v["token"].as_str().expect("token").to_string();
    let (s, _) = srv.get("/api/v1/me", &ci_token).await;
    assert_eq!(s, 200);
    let (s, v) = srv
        .post(
            "/api/v1/tokens",
            &viewer,
            json!({"name": "x", "user": "admin"}),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = srv
        .post(
            "/api/v1/tokens",
            &viewer,
            json!({"name": "x", "ttl": "forever"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "ttl"));
    let (s, mine) = srv.get("/api/v1/tokens", &viewer).await;
    assert_eq!(s, 200);
    assert!(
        mine.as_array()
            .expect("list")
            .iter()
            .all(|t| t["user"] == "vic"),
        "{mine}"
    );
    assert!(
        !mine.to_string().contains(&ci_token),
        "tokens are never listed"
    );
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{ci_id}"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = srv.get("/api/v1/me", &ci_token).await;
    assert_eq!(s, 401, "a deleted token stops working");
    let (s, _) = srv
        .call(Method::DELETE, "/api/v1/tokens/nope", Some(&viewer), None)
        .await;
    assert_eq!(s, 404);

    // ---- join tokens and enrollment ----
    let (s, _) = srv
        .post("/api/v1/join-tokens", &operator, json!({"cluster": "main"}))
        .await;
    assert_eq!(s, 403);
    let (s, v) = srv
        .post(
            "/api/v1/join-tokens",
            &admin,
            json!({"cluster": "no such/cluster"}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "cluster"));
    let (n1, cert1) = srv.enroll("main", "n1").await;
    let (n2, _) = srv.enroll("main", "n2").await;
    let (_, jt) = srv
        .post(
            "/api/v1/join-tokens",
            &admin,
            json!({"cluster": "main", "ttl": "1s"}),
        )
        .await;
    let short = jt["token"].as_str().expect("token").to_string();
    let (_, csr) = pgwarden_pki::certs::new_request("n3", &[]).expect("csr");
    let enroll = |token: &str, cluster: &str, csr: &str| json!({"token": token, "cluster": cluster, "node": "n3", "csr_pem": csr});
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&short, "main", "garbage")),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "csr_pem"), "{v}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&short, "main", &csr)),
        )
        .await;
    assert_eq!((s, field(&v)), (401, "token"));
    assert!(
        v["detail"].as_str().unwrap_or("").contains("expired"),
        "{v}"
    );
    let (_, jt) = srv
        .post("/api/v1/join-tokens", &admin, json!({"cluster": "main"}))
        .await;
    let t3 = jt["token"].as_str().expect("token").to_string();
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&t3, "other", &csr)),
        )
        .await;
    assert_eq!((s, field(&v)), (403, "cluster"), "{v}");
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&t3, "main", &csr)),
        )
        .await;
    assert_eq!(
        (s, field(&v)),
        (401, "token"),
        "a token is spent by its first use: {v}"
    );
    assert!(
        v["detail"].as_str().unwrap_or("").contains("already used"),
        "{v}"
    );
    let (s, jts) = srv.get("/api/v1/join-tokens", &admin).await;
    assert_eq!(s, 200);
    assert!(
        !jts.to_string().contains("pgwj_"),
        "join tokens are never listed: {jts}"
    );
    let jid = jts[0]["id"].as_str().expect("id").to_string();
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/api/v1/join-tokens/{jid}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = srv.call(Method::GET, "/api/v1/enroll/ca", None, None).await;
    assert_eq!(s, 200);

    // ---- reports: status, events stored once ----
    let (s, v) = srv
        .call(
            Method::POST,
            "/api/v1/agent/report",
            None,
            Some(serde_json::to_value(report("n1", Role::Primary, vec![])).expect("json")),
        )
        .await;
    assert_eq!(s, 403, "a report needs the enrolled certificate: {v}");
    let (s, v) = srv.report(&n1, &report("n2", Role::Replica, vec![])).await;
    assert_eq!(s, 403, "n1's certificate cannot report for n2: {v}");
    let batch = events("n1", 1, 0, 250);
    let (s, ack) = srv
        .report(&n1, &report("n1", Role::Primary, batch[..150].to_vec()))
        .await;
    assert_eq!(
        (s, ack["events_stored"].as_u64()),
        (200, Some(150)),
        "{ack}"
    );
    assert_eq!(ack["report_interval_ms"].as_u64(), Some(1000));
    // The agent did not see the answer and sends the same events again, with the rest.
    let (s, ack) = srv
        .report(&n1, &report("n1", Role::Primary, batch[100..].to_vec()))
        .await;
    assert_eq!((s, ack["events_stored"].as_u64()), (200, Some(150)));
    let (s, _) = srv
        .report(&n2, &report("n2", Role::Replica, events("n2", 7, 0, 3)))
        .await;
    assert_eq!(s, 200);
    let mut bad = report("n2", Role::Replica, events("n1", 9, 0, 1));
    bad.events[0].node = "n1".into();
    let (s, v) = srv.report(&n2, &bad).await;
    assert_eq!((s, field(&v)), (422, "events"), "{v}");

    // ---- events: filters and pagination ----
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => {
                format!("/api/v1/events?cluster=main&node=n1&type=odd,even&limit=100&cursor={c}")
            }
            None => "/api/v1/events?cluster=main&node=n1&type=odd,even&limit=100".into(),
        };
        let (s, page) = srv.get(&path, &viewer).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        for e in page["items"].as_array().expect("items") {
            seen.push(e["id"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let want: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
    assert_eq!(pages, 3);
    assert_eq!(seen, want, "every event once, in order, across pages");
    let (_, odd) = srv
        .get("/api/v1/events?node=n1&type=odd&limit=1000", &viewer)
        .await;
    assert_eq!(odd["items"].as_array().map(|a| a.len()), Some(125));
    let (_, two) = srv
        .get("/api/v1/events?type=odd,even&node=n2", &viewer)
        .await;
    assert_eq!(two["items"].as_array().map(|a| a.len()), Some(3));
    let (_, since) = srv
        .get(
            "/api/v1/events?node=n1&since=1700000002000&until=1700000002100",
            &viewer,
        )
        .await;
    assert_eq!(since["items"].as_array().map(|a| a.len()), Some(10));
    let (s, v) = srv.get("/api/v1/events?cursor=nonsense", &viewer).await;
    assert_eq!((s, field(&v)), (400, "cursor"));
    let (s, v) = srv.get("/api/v1/events?nodes=n1", &viewer).await;
    assert_eq!((s, field(&v)), (400, "nodes"));
    let (s, v) = srv.get("/api/v1/events?since=yesterday", &viewer).await;
    assert_eq!((s, field(&v)), (400, "since"));
    let (s, _) = srv.call(Method::GET, "/api/v1/events", None, None).await;
    assert_eq!(s, 401);

    // ---- the live stream ----
    let resp = srv
        .http
        .get(format!(
            "{}/api/v1/events/stream?cluster=main&type=live",
            srv.base
        ))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let mut live = events("n2", 8, 0, 2);
    for e in &mut live {
        e.kind = "live".into();
    }
    let (s, _) = srv.report(&n2, &report("n2", Role::Replica, live)).await;
    assert_eq!(s, 200);
    let mut resp = resp;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(text.contains("n2-8-0") && text.contains("n2-8-1")) {
        assert!(
            Instant::now() < deadline,
            "the stream did not deliver the new events: {text}"
        );
        match tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await {
            Ok(Ok(Some(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("stream ended: {other:?} after {text}"),
        }
    }
    assert!(!text.contains("n1-1-"), "only matching, new events: {text}");
    assert!(text.contains("id: "), "{text}");
    drop(resp);

    // ---- clusters and nodes ----
    let (s, cl) = srv.get("/api/v1/clusters", &viewer).await;
    assert_eq!(s, 200);
    let main = cl
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["name"] == "main")
        .expect("main")
        .clone();
    assert_eq!(main["primary"], "n1");
    assert_eq!(
        (
            main["replicas_total"].as_u64(),
            main["replicas_up"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(main["worst_lag_bytes"].as_i64(), Some(4096));
    let (s, c) = srv.get("/api/v1/clusters/main", &viewer).await;
    assert_eq!((s, c["nodes"].as_array().map(|a| a.len())), (200, Some(2)));
    let (s, _) = srv.get("/api/v1/clusters/nope", &viewer).await;
    assert_eq!(s, 404);
    let (s, n) = srv.get("/api/v1/clusters/main/nodes/n2", &viewer).await;
    assert_eq!(
        (s, n["role"].as_str(), n["timeline"].as_i64()),
        (200, Some("replica"), Some(1))
    );
    let (s, _) = srv.get("/api/v1/clusters/main/nodes/n9", &viewer).await;
    assert_eq!(s, 404);
    let (s, ns) = srv.get("/api/v1/nodes", &viewer).await;
    assert_eq!((s, ns.as_array().map(|a| a.len())), (200, Some(2)));
    let (s, ns) = srv.get("/api/v1/clusters/main/nodes", &viewer).await;
    assert_eq!((s, ns.as_array().map(|a| a.len())), (200, Some(2)));
    let (s, lag) = srv.get("/api/v1/clusters/main/lag?node=n2", &viewer).await;
    assert_eq!(s, 200);
    assert!(
        lag.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x["lag_bytes"] == 4096)),
        "{lag}"
    );
    let (s, v) = srv
        .get("/api/v1/clusters/main/lag?since=soon", &viewer)
        .await;
    assert_eq!((s, field(&v)), (400, "since"));
    let (s, f) = srv.get("/api/v1/clusters/main/failovers", &viewer).await;
    assert_eq!((s, f.as_array().map(|a| a.len())), (200, Some(0)));

    // ---- commands ----
    let path = "/api/v1/clusters/main/commands";
    let (s, _) = srv.post(path, &viewer, json!({"kind": "pause"})).await;
    assert_eq!(s, 403, "a viewer cannot act");
    let (s, v) = srv.post(path, &operator, json!({"kind": "promote"})).await;
    assert_eq!((s, field(&v)), (422, "kind"));
    let (s, v) = srv.post(path, &operator, json!({"kind": "restart"})).await;
    assert_eq!((s, field(&v)), (422, "node"));
    let (s, v) = srv
        .post(path, &operator, json!({"kind": "restart", "node": "n9"}))
        .await;
    assert_eq!((s, field(&v)), (422, "node"));
    let (s, v) = srv
        .post(path, &operator, json!({"kind": "failover", "args": {}}))
        .await;
    assert_eq!((s, field(&v)), (422, "args.candidate"), "{v}");
    let (s, v) = srv
        .post(
            path,
            &operator,
            json!({"kind": "switchover", "args": {"scheduled_at": "tomorrow"}}),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "args.scheduled_at"), "{v}");
    let (s, v) = srv
        .post(path, &operator, json!({"kind": "pause", "args": {"x": 1}}))
        .await;
    assert_eq!((s, field(&v)), (422, "args"));
    let (s, v) = srv
        .post(path, &operator, json!({"kind": "pause", "timeout": "0s"}))
        .await;
    assert_eq!((s, field(&v)), (422, "timeout"));
    let (s, _) = srv
        .post(
            "/api/v1/clusters/nope/commands",
            &operator,
            json!({"kind": "pause"}),
        )
        .await;
    assert_eq!(s, 404);
    let idem = |key: &str, body: Value| {
        srv.http
            .post(format!("{}{path}", srv.base))
            .bearer_auth(&operator)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let r = idem(
        "sw-1",
        json!({"kind": "switchover", "args": {"candidate": "n2"}}),
    )
    .await
    .expect("post");
    assert_eq!(r.status().as_u16(), 202);
    let first: Value = r.json().await.expect("json");
    assert_eq!(first["state"], "queued");
    assert_eq!(first["created_by"], "ollie");
    let r = idem(
        "sw-1",
        json!({"kind": "switchover", "args": {"candidate": "n2"}}),
    )
    .await
    .expect("post");
    assert_eq!(
        r.status().as_u16(),
        200,
        "the same key gives the same command"
    );
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    let r = idem("sw-1", json!({"kind": "pause"})).await.expect("post");
    assert_eq!(r.status().as_u16(), 409);
    // Nothing answers at the agents' address: the command times out, with the reason.
    let (s, c) = srv
        .post(path, &operator, json!({"kind": "pause", "timeout": "2s"}))
        .await;
    assert_eq!(s, 202, "{c}");
    let id = c["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = loop {
        let (_, c) = srv.get(&format!("/api/v1/commands/{id}"), &viewer).await;
        if c["state"] == "timed_out" {
            break c;
        }
        assert!(Instant::now() < deadline, "command never timed out: {c}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(last["attempts"].as_i64().unwrap_or(0) >= 1, "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or("")
            .contains("never delivered"),
        "{last}"
    );
    let (s, _) = srv.get("/api/v1/commands/nope", &viewer).await;
    assert_eq!(s, 404);
    let (s, page) = srv.get("/api/v1/commands?limit=1", &viewer).await;
    assert_eq!(s, 200);
    assert_eq!(
        page["items"][0]["id"].as_str(),
        Some(id.as_str()),
        "newest first"
    );
    let cur = page["next_cursor"].as_str().expect("more").to_string();
    let (_, page2) = srv
        .get(&format!("/api/v1/commands?limit=1&cursor={cur}"), &viewer)
        .await;
    assert_eq!(page2["items"][0]["id"], first["id"]);
    let (s, v) = srv.get("/api/v1/commands?state=done", &viewer).await;
    assert_eq!((s, field(&v)), (400, "state"));
    let (s, p) = srv
        .get("/api/v1/clusters/main/commands?state=timed_out", &viewer)
        .await;
    assert_eq!((s, p["items"].as_array().map(|a| a.len())), (200, Some(1)));
    let (_, ev) = srv.get("/api/v1/events?type=command_result", &viewer).await;
    assert_eq!(
        ev["items"].as_array().map(|a| a.len()),
        Some(1),
        "the outcome is an event: {ev}"
    );

    // ---- configuration ----
    let (s, v) = srv.get("/api/v1/clusters/main/config", &viewer).await;
    assert_eq!(s, 503, "no agent answers here: {v}");
    let (s, v) = srv
        .call(
            Method::PATCH,
            "/api/v1/clusters/main/config",
            Some(&operator),
            Some(json!({"tll": "3s"})),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "tll"), "{v}");
    let (s, _) = srv
        .call(
            Method::PATCH,
            "/api/v1/clusters/main/config",
            Some(&viewer),
            Some(json!({"ttl": "3s"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, h) = srv
        .get("/api/v1/clusters/main/config/history", &viewer)
        .await;
    assert_eq!((s, h.as_array().map(|a| a.len())), (200, Some(0)));

    // ---- agents down, certificates, removal ----
    // n1 and n2 stopped reporting and nothing answers at their address: marked down.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, ev) = srv.get("/api/v1/events?type=agent_down", &viewer).await;
        if ev["items"].as_array().map(|a| a.len()) == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "agents never marked down: {ev}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (s, _) = srv.report(&n1, &report("n1", Role::Primary, vec![])).await;
    assert_eq!(s, 200);
    let (_, ev) = srv
        .get("/api/v1/events?type=agent_up&node=n1", &viewer)
        .await;
    assert_eq!(ev["items"].as_array().map(|a| a.len()), Some(1), "{ev}");
    let (s, certs) = srv.get("/api/v1/certificates", &admin).await;
    assert_eq!((s, certs.as_array().map(|a| a.len())), (200, Some(2)));
    let (s, _) = srv.get("/api/v1/certificates", &operator).await;
    assert_eq!(s, 403);
    let (s, c) = srv
        .post(
            &format!("/api/v1/certificates/{}/revoke", cert1.fingerprint),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(c["revoked_ms"].as_i64().is_some());
    let (s, v) = srv.report(&n1, &report("n1", Role::Primary, vec![])).await;
    assert_eq!(s, 403, "a revoked certificate stops working: {v}");
    let (s, ack) = srv.report(&n2, &report("n2", Role::Replica, vec![])).await;
    assert_eq!(s, 200);
    assert_eq!(
        ack["revoked"],
        json!([cert1.fingerprint]),
        "agents learn the revocation"
    );
    let (s, _) = srv
        .call(
            Method::DELETE,
            "/api/v1/clusters/main/nodes/n2",
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = srv
        .call(
            Method::DELETE,
            "/api/v1/clusters/main/nodes/n2",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!((s, v["revoked"].as_u64()), (200, Some(1)), "{v}");
    let (s, _) = srv.report(&n2, &report("n2", Role::Replica, vec![])).await;
    assert_eq!(s, 403, "a removed node's certificate stops working");
    let (s, _) = srv
        .call(
            Method::DELETE,
            "/api/v1/clusters/main/nodes/n2",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // ---- users removed, audit ----
    let (s, _) = srv
        .call(Method::DELETE, "/api/v1/users/vic", Some(&admin), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = srv.get("/api/v1/me", &viewer).await;
    assert_eq!(s, 401, "a deleted user's tokens stop working");
    let (s, v) = srv
        .call(Method::DELETE, "/api/v1/users/admin", Some(&admin), None)
        .await;
    assert_eq!((s, field(&v)), (422, "name"));
    let (s, audit) = srv.get("/api/v1/audit?limit=500", &admin).await;
    assert_eq!(s, 200);
    let items = audit["items"].as_array().expect("items");
    let created = items
        .iter()
        .find(|a| a["path"] == "/api/v1/users" && a["method"] == "POST" && a["status"] == 201)
        .expect("user creation audited");
    assert_eq!(created["actor"], "admin");
    assert!(created["remote"]
        .as_str()
        .unwrap_or("")
        .starts_with("127.0.0.1:"));
    assert!(
        items
            .iter()
            .any(|a| a["path"] == "/api/v1/clusters/main/commands"
                && a["actor"] == "vic"
                && a["status"] == 403),
        "refused calls are audited too"
    );
    assert!(
        items
            .iter()
            .any(|a| a["path"] == "/api/v1/enroll" && a["status"] == 201),
        "enrollments are audited"
    );
    assert!(
        !items.iter().any(|a| a["path"] == "/api/v1/agent/report"),
        "reports are not operator actions"
    );
    let (s, _) = srv.get("/api/v1/audit", &operator).await;
    assert_eq!(s, 403);
    let (s, v) = srv.get("/api/v1/audit?limit=x", &admin).await;
    assert_eq!((s, field(&v)), (400, "limit"));
    let (s, m) = srv.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, 200);
    let m = m.as_str().unwrap_or("").to_string();
    assert!(
        m.contains("pgwarden_server_reports_total")
            && m.contains("pgwarden_server_node_agent_up{cluster=\"main\",node=\"n1\""),
        "{m}"
    );
    let (s, _) = srv.get("/api/v1/nothing-here", &admin).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_on_the_embedded_sqlite_store() {
    let srv = Srv::start("sqlite", None).await;
    suite(&srv).await;
    assert!(
        srv.dir.join("pgwarden.db").is_file(),
        "SQLite is the default store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_on_a_postgresql_store() {
    let Some(pg) = TempPostgres::start_or_skip("api") else {
        return;
    };
    let url = pg.create_db("pgwarden").expect("createdb");
    let srv = Srv::start("postgres", Some(url)).await;
    suite(&srv).await;
    assert!(
        !srv.dir.join("pgwarden.db").exists(),
        "database_url replaces SQLite"
    );
}

/// A store whose schema is newer than the binary is refused, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_a_newer_schema_is_refused() {
    let dir = std::env::temp_dir().join(format!("pgwarden-newer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sqlite = format!("sqlite://{}/s.db", dir.display());
    let pg = TempPostgres::start_or_skip("newer");
    let mut urls = vec![sqlite];
    if let Some(pg) = &pg {
        urls.push(pg.create_db("newer").expect("createdb"));
    }
    for url in urls {
        let store = pgwarden_server::store::Store::open(&url)
            .await
            .expect("open");
        sqlx_like_insert(&store).await;
        let err = match pgwarden_server::store::Store::open(&url).await {
            Ok(_) => panic!("{url}: a newer schema was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("newer than this binary") && err.contains("20991231000000"),
            "{url}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn sqlx_like_insert(store: &pgwarden_server::store::Store) {
    // As a newer pgwarden-server would have left it: one more applied migration.
    store
        .raw("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (20991231000000, 'from the future', TRUE, X'00', 1)",
             "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (20991231000000, 'from the future', TRUE, '\\x00', 1)")
        .await
        .expect("insert");
}

/// Two servers on one PostgreSQL store: each command is claimed by exactly one of them, and
/// the monitor lease has one holder at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_store_claim_each_command_once() {
    let Some(pg) = TempPostgres::start_or_skip("claims") else {
        return;
    };
    let url = pg.create_db("claims").expect("createdb");
    let a = pgwarden_server::store::Store::open(&url).await.expect("a");
    let b = pgwarden_server::store::Store::open(&url).await.expect("b");
    a.create_cluster("main").await.expect("cluster");
    let args = json!({});
    for i in 0..40 {
        let id = format!("c{i}");
        a.insert_command(&pgwarden_server::store::NewCommand {
            id: &id,
            idempotency_key: &id,
            cluster: "main",
            node: None,
            kind: pgwarden_core::control::CommandKind::Pause,
            args: &args,
            created_by: "t",
            deadline_ms: i64::MAX,
        })
        .await
        .expect("insert");
    }
    let claim_all = |s: pgwarden_server::store::Store, me: &'static str| async move {
        let mut got = Vec::new();
        let now = pgwarden_server::store::now_ms();
        for c in s.claimable_commands(now, 100).await.expect("list") {
            if s.claim_command(&c.id, me, now + 60_000, now)
                .await
                .expect("claim")
            {
                got.push(c.id);
            }
        }
        got
    };
    let (ga, gb) = tokio::join!(
        claim_all(a.clone(), "server-a"),
        claim_all(b.clone(), "server-b")
    );
    let mut all: Vec<String> = ga.iter().chain(gb.iter()).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(
        ga.len() + gb.len(),
        40,
        "each command claimed exactly once (a {}, b {})",
        ga.len(),
        gb.len()
    );
    assert_eq!(all.len(), 40);
    let now = pgwarden_server::store::now_ms();
    assert!(a
        .worker_lease("monitor", "server-a", now + 5000, now)
        .await
        .expect("lease"));
    assert!(!b
        .worker_lease("monitor", "server-b", now + 5000, now)
        .await
        .expect("lease"));
    assert!(a
        .worker_lease("monitor", "server-a", now + 5000, now)
        .await
        .expect("renew"));
    assert!(b
        .worker_lease("monitor", "server-b", now + 20_000, now + 6000)
        .await
        .expect("expired lease taken"));
}

/// The OpenAPI document in the repository is the one the server serves.
#[test]
fn the_openapi_document_is_kept_in_the_repository() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let served = pgwarden_server::api::openapi_text();
    if std::env::var("PGWARDEN_WRITE_OPENAPI").is_ok() {
        std::fs::write(path, format!("{served}\n")).expect("write");
    }
    let kept = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        kept.trim_end() == served.trim_end(),
        "docs/openapi.json differs from the served document: run PGWARDEN_WRITE_OPENAPI=1 cargo test -p pgwarden-tests --test server_api the_openapi"
    );
}
