//! Commands pushed to the agent API (`/v1/commands`) and how the API authenticates the control
//! plane (a CA-signed client certificate, no bearer token; revoked certificates refused), on a
//! one-member cluster whose replicated log runs in a temporary directory. No root, no
//! PostgreSQL.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use pgwarden_agent::agent::Shared;
use pgwarden_agent::commands::Commands;
use pgwarden_agent::events::EventLog;
use pgwarden_agent::http::api_router;
use pgwarden_agent::tls::{PeerCert, Revoked};
use pgwarden_core::config::{AgentConfig, TlsSection};
use pgwarden_core::control::{AgentCommandState, CommandPhase};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tower::ServiceExt;

const TOKEN: &str = "0123456789abcdef0123";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgwarden-cmd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the test directory");
    d
}

fn config(state_dir: &Path, api_port: u16, tls: Option<&TlsSection>) -> AgentConfig {
    let tls = tls.map_or(String::new(), |t| {
        format!(
            "[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            t.ca_file, t.cert_file, t.key_file
        )
    });
    let text = format!(
        r#"
[node]
name = "n1"
state_dir = "{}"
[cluster]
name = "main"
initial_primary = "n1"
[[cluster.members]]
name = "n1"
host = "127.0.0.1"
api_port = {api_port}
[api]
token = "{TOKEN}"
[postgresql]
data_dir = "/nonexistent"
superuser_password = "x"
replication_password = "y"
{tls}
"#,
        state_dir.display()
    );
    AgentConfig::parse(&text, "agent.toml").expect("test config")
}

/// The agent's shared state without a PostgreSQL loop (operations that need the loop answer
/// 503), with the replicated log led by this single member.
async fn shared(cfg: AgentConfig) -> Arc<Shared> {
    let cfg = Arc::new(cfg);
    let state_dir = PathBuf::from(&cfg.node.state_dir);
    let consensus = Arc::new(
        pgwarden_agent::raft::node::Consensus::start(&cfg, TOKEN)
            .await
            .expect("start the replicated log"),
    );
    for _ in 0..100 {
        if consensus.info().raft_state == "leader" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(consensus.info().raft_state, "leader");
    let (tx, _) = tokio::sync::mpsc::channel(1);
    let (commands, _) = Commands::load(&state_dir);
    Arc::new(Shared {
        postmaster_pid: std::sync::atomic::AtomicI32::new(0),
        peers: RwLock::new(Vec::new()),
        cfg: cfg.clone(),
        consensus,
        status: RwLock::new(Default::default()),
        events: EventLog::new("main", "n1", state_dir.join("events.jsonl")),
        token: TOKEN.into(),
        ops: tx,
        lease: pgwarden_agent::lease::LeaseKeeper::new(
            "n1",
            &cfg.node.state_dir,
            &cfg.postgresql.data_dir,
        ),
        local: None,
        commands,
        revoked: Revoked::default(),
    })
}

async fn call(
    s: &Arc<Shared>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: bool,
    peer: Option<PeerCert>,
) -> (StatusCode, serde_json::Value) {
    let mut b = Request::builder().method(method).uri(path);
    if token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Body::from(serde_json::to_vec(&v).expect("encode the body"))
        }
        None => Body::empty(),
    };
    let mut req = b.body(body).expect("build the request");
    if let Some(p) = peer {
        req.extensions_mut().insert(p);
    }
    let resp = api_router(s.clone())
        .oneshot(req)
        .await
        .expect("call the router");
    let code = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("read the answer");
    (
        code,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

async fn finished(s: &Arc<Shared>, id: &str) -> AgentCommandState {
    for _ in 0..100 {
        let (code, v) = call(s, "GET", &format!("/v1/commands/{id}"), None, true, None).await;
        assert_eq!(code, StatusCode::OK, "{v}");
        let st: AgentCommandState = serde_json::from_value(v).expect("a command state");
        if st.state.is_final() {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("command {id} did not finish");
}

#[tokio::test]
async fn a_command_runs_once_through_the_agent_api() {
    let dir = tmp("run");
    let s = shared(config(&dir, 18444, None)).await;
    let pause = serde_json::json!({"id": "c1", "kind": "pause", "args": null});

    let (code, _) = call(&s, "POST", "/v1/commands", Some(pause.clone()), false, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let unverified = Some(PeerCert(None));
    let (code, _) = call(&s, "GET", "/v1/commands", None, false, unverified).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    let (code, v) = call(&s, "POST", "/v1/commands", Some(pause.clone()), true, None).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(v["deliveries"], 1);
    let (code, v) = call(&s, "POST", "/v1/commands", Some(pause.clone()), true, None).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["deliveries"], 2);
    let st = finished(&s, "c1").await;
    assert_eq!(st.state, CommandPhase::Succeeded, "{st:?}");
    assert_eq!(st.result.as_ref().unwrap()["status"], 200);
    assert!(s.consensus.sm.state().paused);

    // The API's refusal becomes the command's failure, with the problem's detail.
    let bad = serde_json::json!({"id": "c2", "kind": "failover", "args": {"candidate": "zz"}});
    let (code, _) = call(&s, "POST", "/v1/commands", Some(bad), true, None).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let st = finished(&s, "c2").await;
    assert_eq!(st.state, CommandPhase::Failed);
    assert!(st.message.contains("not a member"), "{st:?}");
    assert_eq!(st.result.as_ref().unwrap()["status"], 422);

    // The control plane: a CA-verified client certificate, no bearer token.
    let server = Some(PeerCert(Some(pgwarden_pki::certs::Identity {
        cn: "pgwarden-server".into(),
        ou: None,
        fingerprint: "AA".into(),
    })));
    let restart = serde_json::json!({"id": "c3", "kind": "restart"});
    let (code, _) = call(&s, "POST", "/v1/commands", Some(restart), false, server).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let st = finished(&s, "c3").await;
    assert_eq!(st.state, CommandPhase::Failed);
    assert!(st.message.contains("loop is not running"), "{st:?}");

    let (code, v) = call(&s, "GET", "/v1/commands", None, true, None).await;
    assert_eq!(code, StatusCode::OK);
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c3", "c2", "c1"]);
    let (code, v) = call(&s, "GET", "/v1/commands/nope", None, true, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(v["status"], 404);
    let (code, v) = call(
        &s,
        "POST",
        "/v1/commands",
        Some(serde_json::json!({"id": "", "kind": "pause"})),
        true,
        None,
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["field"], "id");

    let log = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert_eq!(log.matches("\"command_started\"").count(), 3, "{log}");
    assert_eq!(log.matches("\"command_finished\"").count(), 3, "{log}");
    let saved = std::fs::read_to_string(dir.join("commands.json")).unwrap();
    let saved: Vec<AgentCommandState> = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved.len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_api_accepts_a_ca_signed_client_and_refuses_it_once_revoked() {
    let dir = tmp("tls");
    let ca = dir.join("ca");
    pgwarden_pki::certs::init(&ca).unwrap();
    let certs = dir.join("certs");
    for name in ["n1", "pgwarden-server"] {
        pgwarden_pki::certs::issue(&ca, name, &["127.0.0.1".into()], &certs).unwrap();
    }
    let p = |f: PathBuf| f.display().to_string();
    let tls = TlsSection {
        ca_file: p(ca.join("ca.pem")),
        cert_file: p(certs.join("n1.pem")),
        key_file: p(certs.join("n1.key")),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let s = shared(config(&state, port, Some(&tls))).await;
    let acceptor =
        pgwarden_pki::tls::acceptor(&tls.ca_file, &tls.cert_file, &tls.key_file).unwrap();
    tokio::spawn(pgwarden_pki::tls::serve(
        listener,
        acceptor,
        api_router(s.clone()),
        s.revoked.clone(),
    ));
    let url = format!("https://127.0.0.1:{port}/v1/commands");
    let server = pgwarden_pki::tls::client(
        &tls.ca_file,
        Some((
            &p(certs.join("pgwarden-server.pem")),
            &p(certs.join("pgwarden-server.key")),
        )),
        Duration::from_secs(5),
    )
    .unwrap();
    let anonymous = pgwarden_pki::tls::client(&tls.ca_file, None, Duration::from_secs(5)).unwrap();

    let r = server.get(&url).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let r = anonymous.get(&url).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    // Another member's certificate is not the control plane's: it needs the token.
    let member = pgwarden_pki::tls::client(
        &tls.ca_file,
        Some((&p(certs.join("n1.pem")), &p(certs.join("n1.key")))),
        Duration::from_secs(5),
    )
    .unwrap();
    let r = member.get(&url).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let r = anonymous.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);

    let server_fp = pgwarden_pki::certs::fingerprint(
        &std::fs::read_to_string(certs.join("pgwarden-server.pem")).unwrap(),
    )
    .unwrap();
    s.revoked.replace([server_fp].into_iter().collect());
    let fresh = pgwarden_pki::tls::client(
        &tls.ca_file,
        Some((
            &p(certs.join("pgwarden-server.pem")),
            &p(certs.join("pgwarden-server.key")),
        )),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        fresh.get(&url).send().await.is_err(),
        "a revoked certificate is refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
