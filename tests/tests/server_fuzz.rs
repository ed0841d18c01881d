//! An OpenAPI-driven fuzz pass over the control plane's REST API: schemathesis (pinned in
//! `tests/fixtures/fuzz/requirements.txt`, installed by `scripts/install-deps.sh`) reads the
//! served `/api/v1/openapi.json` and sends generated, boundary and malformed requests to every
//! operation of a server that holds clusters, two enrolled nodes whose reports brought events,
//! a user, a command and a configuration change (a stand-in agent answers `GET /v1/config`).
//! Any 5xx answer, a dropped connection (a handler that panicked), or an answer whose status,
//! content type or body the document does not describe fails the test with schemathesis'
//! report. `tests/fixtures/fuzz/hooks.py` keeps the admin's own access and accepts the one
//! documented 503. See `docs/server-api.md`.
//!
//! In CI (`CI=true`) a missing schemathesis is a failure; elsewhere the test says SKIPPED.

use pgwarden_core::control::AgentReport;
use pgwarden_core::event::Event;
use pgwarden_core::server_config::ServerConfig;
use pgwarden_core::status::{NodeStatus, PgState, Role};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Test cases per operation and phase: about 3,000 requests, 80 s here on 2 cores.
const MAX_EXAMPLES: &str = "100";
/// The same seed every run, so a failure found in CI is found again by hand.
const SEED: &str = "20261122";
/// A run that takes longer than this is stopped and fails.
const HARD_LIMIT: Duration = Duration::from_secs(600);

/// Operations the fuzzer leaves alone, as schemathesis `--exclude-path` values.
/// `/api/v1/events/stream` is a Server-Sent Events stream that never ends: every call would
/// run into the request timeout. It shares its filter parsing with `/api/v1/events`, which
/// is fuzzed.
const EXCLUDED_PATHS: &[&str] = &["/api/v1/events/stream"];

fn venv() -> PathBuf {
    PathBuf::from(
        std::env::var("PGWARDEN_FUZZ_VENV")
            .unwrap_or_else(|_| "/var/tmp/pgwarden-fuzz-venv".into()),
    )
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz")
}

struct Srv {
    base: String,
    dir: PathBuf,
    admin: String,
    http: reqwest::Client,
    _running: pgwarden_server::Running,
}

impl Srv {
    async fn start() -> Srv {
        let dir = std::env::temp_dir().join(format!("pgwarden-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            // Agents stay up for the whole pass without reporting again.
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[agents]\ndown_after = \"1h\"\n",
            dir.display()
        );
        let cfg = ServerConfig::parse(&text, "server.toml").expect("config");
        let out = pgwarden_server::init(&cfg).await.expect("init");
        let admin = out.admin_token.expect("a first admin token");
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

    fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.pem")
    }

    async fn call(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let r = http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .expect("request");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Enrolls `node` of `cluster`; returns an mTLS client and the files of its certificate
    /// and key.
    async fn enroll(&self, cluster: &str, node: &str) -> (reqwest::Client, PathBuf, PathBuf) {
        let e = pgwarden_server::testkit::enroll(
            &self.http,
            &self.base,
            &self.admin,
            &self.ca_file(),
            &self.dir,
            cluster,
            node,
        )
        .await
        .expect("enroll");
        (e.client, e.cert_file, e.key_file)
    }
}

/// A stand-in for the agents' API (HTTPS with the node's certificate): `GET /v1/config`
/// answers a default dynamic configuration, so the configuration endpoints get past "no agent
/// answered"; everything else (command delivery, polls) is a 404. Returns its URL.
async fn fake_agent(srv: &Srv, cert: &Path, key: &Path) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = pgwarden_pki::tls::acceptor(
        &srv.ca_file().display().to_string(),
        &cert.display().to_string(),
        &key.display().to_string(),
    )
    .expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let config = json!({"config": pgwarden_core::dynconfig::DynamicConfig::default()}).to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, config) = (acceptor.clone(), config.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if head.starts_with(b"GET /v1/config ") {
                    ("200 OK", config)
                } else {
                    ("404 Not Found", "{}".to_string())
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

fn report(node: &str, role: Role, n_events: u64, api_url: &str) -> AgentReport {
    AgentReport {
        cluster: "main".into(),
        node: node.into(),
        agent_version: "test".into(),
        api_url: api_url.into(),
        status: NodeStatus {
            name: node.into(),
            cluster: "main".into(),
            role,
            state: PgState::Running,
            timeline: Some(1),
            lag_bytes: (role == Role::Replica).then_some(4096),
            agent_version: "test".into(),
            ..Default::default()
        },
        events: (0..n_events)
            .map(|i| Event {
                id: format!("{node}-1-{i}"),
                ts_ms: 1_700_000_000_000 + i * 10,
                cluster: "main".into(),
                node: node.into(),
                kind: ["promoted", "postgres_started", "lease_acquired"][i as usize % 3].into(),
                message: format!("event {i}"),
            })
            .collect(),
        history_epoch: None,
        commands: Vec::new(),
    }
}

/// Where schemathesis is, or `None` (outside CI only) when it is not installed here.
fn schemathesis_or_skip(test: &str) -> Option<PathBuf> {
    let bin = venv().join("bin/schemathesis");
    if bin.is_file() {
        return Some(bin);
    }
    if pgwarden_tests::in_ci() {
        panic!(
            "{test} needs schemathesis at {}: scripts/install-deps.sh installs it",
            bin.display()
        );
    }
    eprintln!(
        "\n\n*** SKIPPED {test}: no schemathesis at {} (run scripts/install-deps.sh; CI runs it) ***\n",
        bin.display()
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_get_no_server_errors_and_answers_match_the_document() {
    let test = "server_fuzz";
    let Some(schemathesis) = schemathesis_or_skip(test) else {
        return;
    };
    let srv = Srv::start().await;

    // ---- state for the endpoints to read: a cluster, nodes, events, a command ----
    let (agent, cert, key) = srv.enroll("main", "n1").await;
    let (agent2, _, _) = srv.enroll("main", "n2").await;
    let agent_url = fake_agent(&srv, &cert, &key).await;
    let (_, jt) = srv
        .call(
            &srv.http,
            reqwest::Method::POST,
            "/api/v1/join-tokens",
            json!({"cluster": "spare"}),
        )
        .await;
    assert!(jt["token"].is_string(), "{jt}");
    for (client, rep) in [
        (&agent, report("n1", Role::Primary, 6, &agent_url)),
        (&agent2, report("n2", Role::Replica, 3, &agent_url)),
    ] {
        let r = client
            .post(format!("{}/api/v1/agent/report", srv.base))
            .json(&rep)
            .send()
            .await
            .expect("report");
        assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    }
    let (s, v) = srv
        .call(
            &srv.http,
            reqwest::Method::POST,
            "/api/v1/clusters/main/commands",
            json!({"kind": "pause", "timeout": "2s"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let (s, v) = srv
        .call(
            &srv.http,
            reqwest::Method::PATCH,
            "/api/v1/clusters/main/config",
            json!({"ttl": "20s"}),
        )
        .await;
    assert_eq!(s, 202, "the fake agent answers the configuration: {v}");
    let (s, v) = srv
        .call(
            &srv.http,
            reqwest::Method::POST,
            "/api/v1/users",
            json!({"name": "vic", "role": "viewer", "password": "viewer-password-1"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, me) = srv
        .call(&srv.http, reqwest::Method::GET, "/api/v1/me", Value::Null)
        .await;
    assert_eq!(s, 200, "{me}");

    // ---- the fuzz pass ----
    let work = srv.dir.join("fuzz");
    std::fs::create_dir_all(&work).expect("mkdir");
    let mut args: Vec<String> = vec![
        "run".into(),
        format!("{}/api/v1/openapi.json", srv.base),
        "--url".into(),
        srv.base.clone(),
        "-H".into(),
        format!("Authorization: Bearer {}", srv.admin),
        "--tls-verify".into(),
        srv.ca_file().display().to_string(),
        // The enrolled node's certificate: the agents' routes are fuzzed as that agent.
        "--request-cert".into(),
        cert.display().to_string(),
        "--request-cert-key".into(),
        key.display().to_string(),
        "--checks".into(),
        "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance".into(),
        "--phases".into(),
        "examples,coverage,fuzzing,stateful".into(),
        "--max-examples".into(),
        MAX_EXAMPLES.into(),
        "--seed".into(),
        SEED.into(),
        "--workers".into(),
        "1".into(),
        "--request-timeout".into(),
        "10".into(),
        "--generation-database".into(),
        "none".into(),
        "--generation-with-security-parameters".into(),
        "false".into(),
        "--suppress-health-check".into(),
        "all".into(),
        "--continue-on-failure".into(),
        "--no-color".into(),
        "--report".into(),
        "junit".into(),
        "--report-dir".into(),
        work.join("report").display().to_string(),
    ];
    for p in EXCLUDED_PATHS {
        args.extend(["--exclude-path".into(), p.to_string()]);
    }
    if let Ok(extra) = std::env::var("PGWARDEN_FUZZ_ARGS") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    eprintln!(
        "{} {}",
        schemathesis.display(),
        args.join(" ").replace(&srv.admin, "<admin token>")
    );
    let started = Instant::now();
    let child = tokio::process::Command::new(&schemathesis)
        .args(&args)
        .current_dir(&work)
        .env("SCHEMATHESIS_HOOKS", fixtures().join("hooks.py"))
        .env(
            "PGWARDEN_FUZZ_ADMIN_USER",
            me["user"].as_str().expect("user"),
        )
        .env(
            "PGWARDEN_FUZZ_ADMIN_TOKEN_ID",
            me["token_id"].as_str().expect("token id"),
        )
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(HARD_LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran longer than {HARD_LIMIT:?}"))
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    eprintln!("schemathesis took {:.0?}", started.elapsed());

    // The server is still there and its admin still in: the pass did not lock itself out.
    let (s, v) = srv
        .call(&srv.http, reqwest::Method::GET, "/api/v1/me", Value::Null)
        .await;
    assert_eq!(s, 200, "the admin token still works after the pass: {v}");
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}); its report is above and in {}",
        out.status.code(),
        work.join("report").display()
    );
    let _ = std::fs::remove_dir_all(&srv.dir);
}
