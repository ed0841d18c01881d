//! Webhooks end to end: a server started in-process on SQLite (the real binary for the crash
//! case, two servers on one PostgreSQL store for the claims), an enrolled stand-in agent that
//! reports events over mutual TLS, and real HTTP receivers that check every signature and
//! record what arrives. Waits poll for an outcome with a deadline; no sleep stands in for an
//! assertion.
//!
//! The PostgreSQL case needs the PostgreSQL binaries (`/usr/lib/postgresql/15/bin`); outside
//! CI it says SKIPPED without them, in CI (`CI=true`) it fails.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use pgwarden_core::control::AgentReport;
use pgwarden_core::event::Event;
use pgwarden_core::server_config::ServerConfig;
use pgwarden_core::status::{NodeStatus, PgState, Role};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---- the server and a stand-in agent ----

/// Settings short enough for tests: attempts time out after 1 s, retries start at 100 ms.
const FAST: &str = "[webhooks]\ntimeout = \"1s\"\nmax_age = \"1h\"\nretry_base = \"100ms\"\n";

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgwarden-hooks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn config_text(dir: &Path, listen: &str, extra: &str) -> String {
    // Agents are never marked down here: the stand-in agent has no API to poll.
    format!(
        "listen = \"{listen}\"\ndata_dir = \"{}\"\n[agents]\nreport_interval = \"1s\"\ndown_after = \"1h\"\n{extra}",
        dir.display()
    )
}

/// A client of a running server's API (in-process or a child process).
struct Api {
    base: String,
    dir: PathBuf,
    admin: String,
    http: reqwest::Client,
}

impl Api {
    fn new(dir: &Path, port: u16, admin: String) -> Api {
        let ca = dir.join("pki/ca.pem").display().to_string();
        Api {
            base: format!("https://localhost:{port}"),
            dir: dir.to_path_buf(),
            admin,
            http: pgwarden_pki::tls::client(&ca, None, Duration::from_secs(10)).expect("client"),
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
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(&self.admin), None).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(&self.admin), Some(body))
            .await
    }

    /// Creates a webhook; returns its id.
    async fn webhook(&self, body: Value) -> String {
        let (s, v) = self.post("/api/v1/webhooks", body).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().expect("id").to_string()
    }

    async fn deliveries(&self, hook: &str) -> Vec<Value> {
        let (s, v) = self
            .get(&format!("/api/v1/webhooks/{hook}/deliveries"))
            .await;
        assert_eq!(s, 200, "{v}");
        v.as_array().expect("list").clone()
    }

    /// Waits until `hook` has `n` deliveries, all `delivered`.
    async fn delivered(&self, hook: &str, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} deliveries to {hook}"), 30, || async {
            let d = self.deliveries(hook).await;
            (d.len() == n && d.iter().all(|d| d["state"] == "delivered")).then_some(d)
        })
        .await
    }

    /// Enrolls `node` of `cluster`; returns its mTLS client.
    async fn enroll(&self, cluster: &str, node: &str) -> reqwest::Client {
        pgwarden_server::testkit::enroll(
            &self.http,
            &self.base,
            &self.admin,
            &self.dir.join("pki/ca.pem"),
            &self.dir,
            cluster,
            node,
        )
        .await
        .expect("enroll")
        .client
    }

    /// Reports `events` as `node` of `cluster`.
    async fn report(&self, agent: &reqwest::Client, cluster: &str, node: &str, events: &[Event]) {
        let rep = AgentReport {
            cluster: cluster.into(),
            node: node.into(),
            agent_version: "test".into(),
            api_url: "https://127.0.0.1:9".into(),
            status: NodeStatus {
                name: node.into(),
                cluster: cluster.into(),
                role: Role::Primary,
                state: PgState::Running,
                timeline: Some(1),
                agent_version: "test".into(),
                ..Default::default()
            },
            events: events.to_vec(),
            history_epoch: None,
            commands: Vec::new(),
        };
        let (s, v) = call(
            agent,
            &self.base,
            Method::POST,
            "/api/v1/agent/report",
            None,
            Some(serde_json::to_value(&rep).expect("json")),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["events_stored"].as_u64(), Some(events.len() as u64));
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
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A server started in-process; its directory goes when the test ends.
struct InProcess {
    api: Api,
    _running: pgwarden_server::Running,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.api.dir);
    }
}

async fn start(name: &str, extra: &str) -> InProcess {
    let dir = tmp_dir(name);
    let cfg = ServerConfig::parse(&config_text(&dir, "127.0.0.1:0", extra), "server.toml")
        .expect("config");
    let out = pgwarden_server::init(&cfg).await.expect("init");
    let running = pgwarden_server::start(cfg).await.expect("start");
    InProcess {
        api: Api::new(
            &dir,
            running.addr.port(),
            out.admin_token.expect("admin token"),
        ),
        _running: running,
    }
}

fn event(node: &str, id: &str, kind: &str, message: &str) -> Event {
    Event {
        id: id.into(),
        ts_ms: 1_700_000_000_000,
        cluster: "main".into(),
        node: node.into(),
        kind: kind.into(),
        message: message.into(),
    }
}

/// Polls `f` every 50 ms until it gives a value; fails after `secs` seconds.
async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- a webhook receiver ----

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Got {
    hook: String,
    event_id: String,
    body: Value,
    raw: String,
    /// The signature verified with the hook's secret and the timestamp is recent.
    signed: bool,
    at: Instant,
}

#[derive(Default)]
struct RecvState {
    secrets: HashMap<String, String>,
    got: Vec<Got>,
    /// Scripted answers per hook (status, delay), then `fallback`.
    script: HashMap<String, VecDeque<(u16, Duration)>>,
    fallback: HashMap<String, (u16, Duration)>,
    /// Requests in progress per event id, and the most at once.
    inflight: HashMap<String, usize>,
    max_inflight: HashMap<String, usize>,
}

/// An HTTP receiver on 127.0.0.1: `POST /{hook}` checks the signature with the hook's
/// secret, records the request and answers as scripted (200 by default).
#[derive(Clone)]
struct Receiver {
    base: String,
    st: Arc<Mutex<RecvState>>,
}

/// Verifies `X-Pgwarden-Signature` as docs/webhooks.md tells receivers to.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (ts, sig) = (h("x-pgwarden-timestamp"), h("x-pgwarden-signature"));
    let Ok(t) = ts.parse::<i64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    if (now - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sig == format!("v1={want}")
}

async fn receive(
    State(st): State<Arc<Mutex<RecvState>>>,
    UrlPath(hook): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let event_id = headers
        .get("x-pgwarden-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (status, delay) = {
        let mut s = st.lock().expect("lock");
        let secret = s.secrets.get(&hook).cloned().unwrap_or_default();
        let raw = String::from_utf8_lossy(&body).into_owned();
        s.got.push(Got {
            hook: hook.clone(),
            event_id: event_id.clone(),
            body: serde_json::from_str(&raw).unwrap_or(Value::Null),
            raw,
            signed: verify(&secret, &headers, &body),
            at: Instant::now(),
        });
        let n = s.inflight.entry(event_id.clone()).or_default();
        *n += 1;
        let n = *n;
        let m = s.max_inflight.entry(event_id.clone()).or_default();
        *m = (*m).max(n);
        let fallback = s
            .fallback
            .get(&hook)
            .copied()
            .unwrap_or((200, Duration::ZERO));
        s.script
            .get_mut(&hook)
            .and_then(|q| q.pop_front())
            .unwrap_or(fallback)
    };
    tokio::time::sleep(delay).await;
    if let Some(n) = st.lock().expect("lock").inflight.get_mut(&event_id) {
        *n -= 1;
    }
    let code = StatusCode::from_u16(status).expect("status");
    (code, format!("answer {status} for {event_id}"))
}

impl Receiver {
    async fn start() -> Receiver {
        let st = Arc::new(Mutex::new(RecvState::default()));
        let app = axum::Router::new()
            .route("/{hook}", axum::routing::post(receive))
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            base: format!("http://{addr}"),
            st,
        }
    }

    /// The URL of `hook`, whose deliveries are signed with `secret`.
    fn url(&self, hook: &str, secret: &str) -> String {
        self.st
            .lock()
            .expect("lock")
            .secrets
            .insert(hook.into(), secret.into());
        format!("{}/{hook}", self.base)
    }

    fn script(&self, hook: &str, answers: &[(u16, Duration)]) {
        self.st
            .lock()
            .expect("lock")
            .script
            .insert(hook.into(), answers.iter().copied().collect());
    }

    fn answer(&self, hook: &str, status: u16, delay: Duration) {
        let mut s = self.st.lock().expect("lock");
        s.fallback.insert(hook.into(), (status, delay));
        s.script.remove(hook);
    }

    fn got(&self, hook: &str) -> Vec<Got> {
        self.st
            .lock()
            .expect("lock")
            .got
            .iter()
            .filter(|g| g.hook == hook)
            .cloned()
            .collect()
    }

    fn max_inflight(&self) -> HashMap<String, usize> {
        self.st.lock().expect("lock").max_inflight.clone()
    }
}

fn field(v: &Value) -> &str {
    v["field"].as_str().unwrap_or("")
}

fn ids(d: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = d
        .iter()
        .map(|d| d["event_id"].as_str().unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

// ---- the cases ----

const SECRET: &str = "whsec_0123456789abcdef";
/// Quotes, backslash, newline, tab, control and non-ASCII characters in an event's text.
const NASTY: &str = "lost \"the\" lease\\\nnow\tstopped \u{1} ünïcødé 日本 🐘";

/// Delivery to matching webhooks only, signed, with the event in the body; duplicates of a
/// report queue nothing; test sends; the API's checks, roles and secrecy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_matching_webhooks_signed() {
    let srv = start("match", FAST).await;
    let api = &srv.api;
    let rx = Receiver::start().await;
    let all = api
        .webhook(json!({"name": "all", "url": rx.url("all", SECRET), "format": "json", "secret": SECRET}))
        .await;
    let other = api
        .webhook(json!({"url": rx.url("other", SECRET), "format": "json", "secret": SECRET, "clusters": ["other"]}))
        .await;
    let critical = api
        .webhook(json!({"url": rx.url("critical", SECRET), "format": "json", "secret": SECRET, "min_severity": "critical"}))
        .await;
    let promoted = api
        .webhook(json!({"url": rx.url("promoted", SECRET), "format": "json", "secret": SECRET, "event_types": ["promoted"], "clusters": ["main"]}))
        .await;
    let agent = api.enroll("main", "n1").await;
    let evs = vec![
        event(
            "n1",
            "n1-1-1",
            "promoted",
            "promoted to primary (lease epoch 3)",
        ),
        event("n1", "n1-1-2", "switchover", "switched over from n2 to n1"),
        event("n1", "n1-1-3", "lease_lost", NASTY),
    ];
    api.report(&agent, "main", "n1", &evs).await;

    // The enrollment's event, and the three reported.
    let d = api.delivered(&all, 4).await;
    let mut want = vec!["n1-1-1", "n1-1-2", "n1-1-3"];
    want.push(
        d.iter()
            .find(|d| d["event_type"] == "agent_enrolled")
            .expect("enrolled")["event_id"]
            .as_str()
            .expect("id"),
    );
    want.sort();
    assert_eq!(ids(&d), want);
    for d in &d {
        let a = d["attempt_log"].as_array().expect("attempts");
        assert_eq!(a.len(), 1, "{d}");
        assert_eq!(a[0]["status_code"], 200);
        assert_eq!(a[0]["attempt"], 1);
        assert!(a[0]["response"]
            .as_str()
            .expect("response")
            .starts_with("answer 200"));
    }
    let got = rx.got("all");
    assert_eq!(got.len(), 4);
    for g in &got {
        assert!(g.signed, "signature of {}: {}", g.event_id, g.raw);
        assert_eq!(
            g.body["id"],
            g.event_id.as_str(),
            "the header names the body's event"
        );
    }
    let lost = got
        .iter()
        .find(|g| g.event_id == "n1-1-3")
        .expect("lease_lost");
    assert_eq!(
        lost.body["message"], NASTY,
        "the text survives: {}",
        lost.raw
    );
    assert_eq!(lost.body["type"], "lease_lost");
    assert_eq!(lost.body["severity"], "critical");
    assert_eq!(lost.body["cluster"], "main");
    assert_eq!(lost.body["node"], "n1");
    assert_eq!(lost.body["ts_ms"], 1_700_000_000_000_i64);
    assert!(lost.body["seq"].as_i64().expect("seq") > 0);
    assert!(lost.body["received_ms"].as_i64().expect("received") > 1_700_000_000_000);

    // The filters: the outbox is written with the events, so what is not there now never is.
    assert_eq!(ids(&api.delivered(&critical, 1).await), vec!["n1-1-3"]);
    assert_eq!(ids(&api.delivered(&promoted, 1).await), vec!["n1-1-1"]);
    assert!(api.deliveries(&other).await.is_empty(), "another cluster");

    // A report delivered twice stores its events once and queues nothing new.
    api.report(&agent, "main", "n1", &evs).await;
    assert_eq!(api.deliveries(&all).await.len(), 4);

    // Test send: to that webhook only, whatever its filter.
    let (s, d) = api
        .post(&format!("/api/v1/webhooks/{other}/test"), json!({}))
        .await;
    assert_eq!(s, 202, "{d}");
    assert_eq!(d["event_type"], "webhook_test");
    let test_id = d["event_id"].as_str().expect("id").to_string();
    let d = api.delivered(&other, 1).await;
    assert_eq!(d[0]["event_id"], test_id.as_str());
    let got = rx.got("other");
    assert_eq!(got.len(), 1);
    assert!(got[0].signed);
    assert_eq!(got[0].body["type"], "webhook_test");
    assert_eq!(got[0].body["cluster"], "other");
    assert_eq!(
        api.deliveries(&all).await.len(),
        4,
        "the test went to one webhook"
    );
    let (s, _) = api.post("/api/v1/webhooks/wh-none/test", json!({})).await;
    assert_eq!(s, 404);

    // A disabled webhook gets nothing; a deleted one is gone with its log.
    let (s, v) = api
        .call(
            Method::PATCH,
            &format!("/api/v1/webhooks/{promoted}"),
            Some(&api.admin),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!((s, &v["enabled"]), (200, &json!(false)), "{v}");
    api.report(
        &agent,
        "main",
        "n1",
        &[event("n1", "n1-1-4", "promoted", "again")],
    )
    .await;
    api.delivered(&all, 5).await;
    assert_eq!(api.deliveries(&promoted).await.len(), 1);
    let (s, _) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/webhooks/{promoted}"),
            Some(&api.admin),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = api.get(&format!("/api/v1/webhooks/{promoted}")).await;
    assert_eq!(s, 404);
    let (s, _) = api
        .get(&format!("/api/v1/webhooks/{promoted}/deliveries"))
        .await;
    assert_eq!(s, 404);

    // ---- the API's checks: 422 naming the field ----
    let url = rx.url("x", SECRET);
    for (body, want) in [
        (json!({"url": "not a url", "format": "json"}), "url"),
        (
            json!({"url": "ftp://example.net/x", "format": "json"}),
            "url",
        ),
        (json!({"url": url, "format": "xml"}), "format"),
        (json!({"url": url, "format": "pagerduty"}), "routing_key"),
        (
            json!({"url": url, "format": "slack", "routing_key": "R1"}),
            "routing_key",
        ),
        (
            json!({"url": url, "format": "json", "min_severity": "fatal"}),
            "min_severity",
        ),
        (
            json!({"url": url, "format": "json", "secret": "short"}),
            "secret",
        ),
        (
            json!({"url": url, "format": "json", "event_types": ["Not A Type"]}),
            "event_types",
        ),
        (
            json!({"url": url, "format": "json", "clusters": ["no such/name"]}),
            "clusters",
        ),
        (
            json!({"url": url, "format": "json", "secrets": "x"}),
            "secrets",
        ),
        (json!({"format": "json"}), "url"),
    ] {
        let (s, v) = api.post("/api/v1/webhooks", body.clone()).await;
        assert_eq!((s, field(&v)), (422, want), "{body}: {v}");
    }
    let (s, v) = api
        .call(
            Method::PATCH,
            &format!("/api/v1/webhooks/{all}"),
            Some(&api.admin),
            Some(json!({"format": "pagerduty"})),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "routing_key"), "{v}");
    let (s, v) = api
        .call(
            Method::PATCH,
            &format!("/api/v1/webhooks/{all}"),
            Some(&api.admin),
            Some(json!({"url": "http://"})),
        )
        .await;
    assert_eq!((s, field(&v)), (422, "url"), "{v}");
    let (s, v) = api
        .get(&format!("/api/v1/webhooks/{all}/deliveries?state=lost"))
        .await;
    assert_eq!((s, field(&v)), (400, "state"), "{v}");

    // A PagerDuty webhook with its key; a webhook without a secret gets one, shown once.
    let (s, v) = api
        .post(
            "/api/v1/webhooks",
            json!({"url": rx.url("pd", SECRET), "format": "pagerduty", "routing_key": "R0UTE", "enabled": false}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let made = v["secret"]
        .as_str()
        .expect("a secret made by the server")
        .to_string();
    assert!(made.starts_with("whsec_") && made.len() >= 32, "{made}");
    assert_eq!(
        (&v["routing_key_set"], &v["secret_set"]),
        (&json!(true), &json!(true))
    );
    let (_, listed) = api.get("/api/v1/webhooks").await;
    let text = listed.to_string();
    assert!(
        !text.contains(&made) && !text.contains(SECRET) && !text.contains("R0UTE"),
        "{text}"
    );
    assert!(!text.contains("\"secret\""), "{text}");

    // ---- roles: viewers read (without credentials in URLs), admins change ----
    let (s, _) = api
        .post(
            "/api/v1/users",
            json!({"name": "vic", "role": "viewer", "password": "viewer-password-1"}),
        )
        .await;
    assert_eq!(s, 201);
    let (_, t) = api
        .call(
            Method::POST,
            "/api/v1/login",
            None,
            Some(json!({"user": "vic", "password": "viewer-password-1"})),
        )
        .await;
    let vic = t["token"].as_str().expect("token").to_string();
    let (s, v) = api
        .call(Method::GET, "/api/v1/webhooks", Some(&vic), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let first = &v.as_array().expect("list")[0];
    assert_eq!(first["secret_set"], true);
    assert!(
        first["url"].as_str().expect("url").ends_with("/…"),
        "{first}"
    );
    let (s, _) = api
        .call(
            Method::GET,
            &format!("/api/v1/webhooks/{all}/deliveries"),
            Some(&vic),
            None,
        )
        .await;
    assert_eq!(s, 200);
    for (m, path, body) in [
        (
            Method::POST,
            "/api/v1/webhooks".to_string(),
            Some(json!({"url": url, "format": "json"})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/webhooks/{all}"),
            Some(json!({"enabled": false})),
        ),
        (Method::DELETE, format!("/api/v1/webhooks/{all}"), None),
        (
            Method::POST,
            format!("/api/v1/webhooks/{all}/test"),
            Some(json!({})),
        ),
    ] {
        let (s, v) = api.call(m.clone(), &path, Some(&vic), body).await;
        assert_eq!(s, 403, "{m} {path} as a viewer: {v}");
    }
    let (s, _) = api.call(Method::GET, "/api/v1/webhooks", None, None).await;
    assert_eq!(s, 401);
}

/// A receiver that fails once gets the event on the retry, and the log shows both attempts;
/// one that always fails is given up at the maximum age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_and_logged() {
    let srv = start(
        "retry",
        "[webhooks]\ntimeout = \"1s\"\nmax_age = \"3s\"\nretry_base = \"100ms\"\n",
    )
    .await;
    let api = &srv.api;
    let rx = Receiver::start().await;
    rx.script("flaky", &[(500, Duration::ZERO)]);
    rx.answer("down", 503, Duration::ZERO);
    let flaky = api
        .webhook(json!({"url": rx.url("flaky", SECRET), "format": "json", "secret": SECRET, "event_types": ["fenced"]}))
        .await;
    let down = api
        .webhook(json!({"url": rx.url("down", SECRET), "format": "json", "secret": SECRET, "event_types": ["fenced"]}))
        .await;
    let agent = api.enroll("main", "n2").await;
    api.report(
        &agent,
        "main",
        "n2",
        &[event("n2", "n2-1-1", "fenced", "fenced n1")],
    )
    .await;

    let d = api.delivered(&flaky, 1).await;
    let log = d[0]["attempt_log"].as_array().expect("attempts");
    assert_eq!(d[0]["attempts"], 2, "{}", d[0]);
    assert_eq!(log.len(), 2, "{}", d[0]);
    assert_eq!(
        (&log[0]["attempt"], &log[0]["status_code"]),
        (&json!(1), &json!(500))
    );
    assert_eq!(log[0]["response"], "answer 500 for n2-1-1");
    assert_eq!(
        (&log[1]["attempt"], &log[1]["status_code"]),
        (&json!(2), &json!(200))
    );
    assert!(log
        .iter()
        .all(|a| a["latency_ms"].as_i64().is_some_and(|l| l >= 0)));
    let got = rx.got("flaky");
    assert_eq!(got.len(), 2);
    assert!(
        got.iter().all(|g| g.signed && g.event_id == "n2-1-1"),
        "the same event, signed each time"
    );

    // Always 503: retried until the maximum age (3 s here), then failed.
    let d = wait_for("the failing delivery to be given up", 30, || async {
        let d = api.deliveries(&down).await;
        (d.len() == 1 && d[0]["state"] == "failed").then(|| d[0].clone())
    })
    .await;
    let log = d["attempt_log"].as_array().expect("attempts");
    assert!(log.len() >= 2, "retried before giving up: {d}");
    assert!(log.iter().all(|a| a["status_code"] == 503), "{d}");
    let numbers: Vec<i64> = log
        .iter()
        .map(|a| a["attempt"].as_i64().expect("n"))
        .collect();
    assert_eq!(numbers, (1..=log.len() as i64).collect::<Vec<_>>());
    assert_eq!(d["last_error"], "HTTP 503");
    let age = d["done_ms"].as_i64().expect("done") - d["created_ms"].as_i64().expect("created");
    assert!(
        age >= 3000,
        "given up at the maximum age, not before: {age} ms"
    );
    assert_eq!(
        rx.got("down").len(),
        log.len(),
        "every request is in the log"
    );
}

/// An attempt that hangs until its timeout does not hold up another webhook's delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_delay_other_webhooks() {
    // A long timeout: the other delivery has plenty of time to overtake the hanging attempt,
    // however loaded the machine.
    let srv = start(
        "slow",
        "[webhooks]\ntimeout = \"5s\"\nmax_age = \"1h\"\nretry_base = \"100ms\"\n",
    )
    .await;
    let api = &srv.api;
    let rx = Receiver::start().await;
    rx.answer("slow", 200, Duration::from_secs(30));
    let slow = api
        .webhook(json!({"url": rx.url("slow", SECRET), "format": "json", "secret": SECRET, "event_types": ["lease_lost"]}))
        .await;
    let fast = api
        .webhook(json!({"url": rx.url("fast", SECRET), "format": "json", "secret": SECRET, "event_types": ["promoted"]}))
        .await;
    let agent = api.enroll("main", "n1").await;
    api.report(
        &agent,
        "main",
        "n1",
        &[event("n1", "s-1", "lease_lost", "lost")],
    )
    .await;
    // The slow receiver holds the first attempt; then another webhook's event comes.
    wait_for("the slow receiver to be called", 30, || async {
        (!rx.got("slow").is_empty()).then_some(())
    })
    .await;
    api.report(
        &agent,
        "main",
        "n1",
        &[event("n1", "s-2", "promoted", "promoted")],
    )
    .await;
    let fast_d = api.delivered(&fast, 1).await;
    // Wait for the slow attempt to end (timed out), then compare when things happened.
    let slow_d = wait_for("the slow attempt to be recorded", 30, || async {
        let d = api.deliveries(&slow).await;
        (d.len() == 1 && !d[0]["attempt_log"].as_array().expect("log").is_empty())
            .then(|| d[0].clone())
    })
    .await;
    let a = &slow_d["attempt_log"][0];
    assert!(a["status_code"].is_null(), "{a}");
    assert!(
        a["error"].as_str().expect("error").contains("timed out"),
        "{a}"
    );
    let slow_end = a["started_ms"].as_i64().expect("t") + a["latency_ms"].as_i64().expect("t");
    let f = &fast_d[0]["attempt_log"][0];
    let fast_end = f["started_ms"].as_i64().expect("t") + f["latency_ms"].as_i64().expect("t");
    assert_eq!(f["status_code"], 200);
    assert!(
        fast_end < slow_end,
        "the other webhook was delivered while the slow attempt still ran ({fast_end} vs {slow_end})"
    );
    assert_eq!(
        slow_d["state"], "pending",
        "the timed-out delivery is retried"
    );
}

// ---- the real binary, killed ----

/// The `pgwarden-server` binary, killed (SIGKILL, by its own pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn serve_binary(dir: &Path, extra: &str, run: u32) -> (Proc, u16) {
    let port = free_port();
    let conf = dir.join("server.toml");
    std::fs::write(&conf, config_text(dir, &format!("127.0.0.1:{port}"), extra)).expect("write");
    let log = std::fs::File::create(dir.join(format!("server-{run}.log"))).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_pgwarden-server"))
        .arg("--config")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn pgwarden-server");
    let proc = Proc(child);
    let ca = dir.join("pki/ca.pem").display().to_string();
    let http = pgwarden_pki::tls::client(&ca, None, Duration::from_secs(2)).expect("client");
    wait_for("the server to answer", 60, || async {
        let r = http
            .get(format!("https://localhost:{port}/readyz"))
            .send()
            .await;
        r.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    (proc, port)
}

/// The server dies (SIGKILL) with one delivery's attempt in flight and another waiting for a
/// retry; started again on the same data directory it delivers both: the interrupted attempt
/// was never recorded and is made again once its claim expires (the receiver sees the event
/// twice, with the same id), the waiting one resumes where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_a_crash_of_the_server() {
    let dir = tmp_dir("crash");
    // Attempts may take 5 s: the kill comes well inside the hanging attempt.
    let extra = "[webhooks]\ntimeout = \"5s\"\nmax_age = \"1h\"\nretry_base = \"100ms\"\n";
    std::fs::write(
        dir.join("server.toml"),
        config_text(&dir, "127.0.0.1:0", extra),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden-server"))
        .arg("--config")
        .arg(dir.join("server.toml"))
        .args(["init", "--json"])
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).expect("init output");
    let admin = init["admin_token"].as_str().expect("token").to_string();

    let rx = Receiver::start().await;
    rx.answer("hang", 200, Duration::from_secs(60));
    rx.answer("retry", 500, Duration::ZERO);
    let (proc, port) = serve_binary(&dir, extra, 1).await;
    let api = Api::new(&dir, port, admin.clone());
    let hang = api
        .webhook(json!({"url": rx.url("hang", SECRET), "format": "json", "secret": SECRET, "event_types": ["agent_down"]}))
        .await;
    let retry = api
        .webhook(json!({"url": rx.url("retry", SECRET), "format": "json", "secret": SECRET, "event_types": ["agent_down"]}))
        .await;
    let agent = api.enroll("main", "n3").await;
    api.report(
        &agent,
        "main",
        "n3",
        &[event("n3", "c-1", "agent_down", "n1 is gone")],
    )
    .await;
    wait_for("an attempt in flight and a failed one", 30, || async {
        let failed =
            api.deliveries(&retry).await.first().is_some_and(|d| {
                d["state"] == "pending" && d["attempts"].as_i64().unwrap_or(0) >= 1
            });
        (failed && !rx.got("hang").is_empty()).then_some(())
    })
    .await;
    let first_server = api.deliveries(&retry).await[0]["attempt_log"][0]["server_id"].clone();
    drop(proc); // SIGKILL
    rx.answer("hang", 200, Duration::ZERO);
    rx.answer("retry", 200, Duration::ZERO);

    let (_proc, port) = serve_binary(&dir, extra, 2).await;
    let api = Api::new(&dir, port, admin);
    let h = api.delivered(&hang, 1).await;
    let log = h[0]["attempt_log"].as_array().expect("log");
    assert_eq!(
        log.len(),
        1,
        "the interrupted attempt left no record: {}",
        h[0]
    );
    assert_eq!(log[0]["status_code"], 200);
    let got = rx.got("hang");
    assert_eq!(got.len(), 2, "sent again after the crash");
    assert!(
        got.iter().all(|g| g.event_id == "c-1" && g.signed),
        "same id for receiver dedup"
    );
    assert!(got[1].at > got[0].at);

    let r = api.delivered(&retry, 1).await;
    let log = r[0]["attempt_log"].as_array().expect("log");
    let last = log.last().expect("attempts");
    assert_eq!(last["status_code"], 200);
    assert!(log[..log.len() - 1].iter().all(|a| a["status_code"] == 500));
    assert_eq!(log[0]["server_id"], first_server);
    assert_ne!(
        last["server_id"], first_server,
        "delivered by the restarted server"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- two servers on one PostgreSQL store ----

/// Two servers on one PostgreSQL store deliver the same outbox: every attempt of a delivery
/// is made by one server at a time (the receiver never sees one event twice at once), each
/// attempt is recorded once, and both servers take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_store_never_attempt_a_delivery_twice_at_once() {
    let Some(pg) = pgwarden_lab::temp_pg::TempPostgres::start_or_skip("webhooks-two") else {
        return;
    };
    let url = pg.create_db("hooks").expect("createdb");
    let a = start_shared("two-a", "srv-a", &url).await;
    let b = start_shared("two-b", "srv-b", &url).await;
    assert!(b.api.admin.is_empty(), "one admin for the shared store");
    let api = &a.api;
    let rx = Receiver::start().await;
    // Every request takes a while, and the first 2n are refused: attempts overlap in time
    // and each delivery is retried, by whichever server gets to it.
    let hook = api
        .webhook(json!({"url": rx.url("shared", SECRET), "format": "json", "secret": SECRET, "event_types": ["promoted"]}))
        .await;
    let n = 12;
    rx.answer("shared", 200, Duration::from_millis(150));
    rx.script("shared", &vec![(500, Duration::from_millis(150)); 2 * n]);
    let agent = api.enroll("main", "n1").await;
    let evs: Vec<Event> = (0..n)
        .map(|i| event("n1", &format!("two-{i}"), "promoted", "promoted"))
        .collect();
    api.report(&agent, "main", "n1", &evs).await;
    let d = wait_for("every delivery made", 90, || async {
        let d = api.deliveries(&hook).await;
        (d.len() == n && d.iter().all(|d| d["state"] == "delivered")).then_some(d)
    })
    .await;
    let max = rx.max_inflight();
    for e in &evs {
        assert_eq!(max.get(&e.id), Some(&1), "{}: attempts overlapped", e.id);
    }
    let mut servers = std::collections::BTreeSet::new();
    let mut total = 0;
    for d in &d {
        let log = d["attempt_log"].as_array().expect("log");
        let numbers: Vec<i64> = log
            .iter()
            .map(|a| a["attempt"].as_i64().expect("n"))
            .collect();
        assert_eq!(numbers, (1..=log.len() as i64).collect::<Vec<_>>(), "{d}");
        assert_eq!(d["attempts"].as_i64(), Some(log.len() as i64));
        let event_id = d["event_id"].as_str().expect("id");
        let seen = rx
            .got("shared")
            .iter()
            .filter(|g| g.event_id == event_id)
            .count();
        assert_eq!(
            seen,
            log.len(),
            "{event_id}: every request is one recorded attempt"
        );
        for a in log {
            servers.insert(a["server_id"].as_str().expect("server").to_string());
        }
        total += log.len();
    }
    assert_eq!(total, 3 * n, "2n refusals and one success per event");
    assert_eq!(
        servers.into_iter().collect::<Vec<_>>(),
        vec!["srv-a", "srv-b"],
        "both servers delivered"
    );
}

/// A server named `id` on the store at `url`.
async fn start_shared(name: &str, id: &str, url: &str) -> InProcess {
    let dir = tmp_dir(name);
    let text = format!(
        "server_id = \"{id}\"\ndatabase_url = \"{url}\"\n{}",
        config_text(
            &dir,
            "127.0.0.1:0",
            "[webhooks]\ntimeout = \"2s\"\nmax_age = \"1h\"\nretry_base = \"50ms\"\n"
        )
    );
    let cfg = ServerConfig::parse(&text, "server.toml").expect("config");
    let out = pgwarden_server::init(&cfg).await.expect("init");
    let running = pgwarden_server::start(cfg).await.expect("start");
    InProcess {
        api: Api::new(
            &dir,
            running.addr.port(),
            out.admin_token.unwrap_or_default(),
        ),
        _running: running,
    }
}
