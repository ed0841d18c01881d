//! The agent's side of the control-plane contract against a stand-in server on 127.0.0.1:
//! enrollment (`join`: fingerprint check, token refusal, files written, `--force`) and reports
//! over mutual TLS (events delivered once and in order through the cursor, revocations kept).
//! No root, no PostgreSQL.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use pgwarden_agent::commands::Commands;
use pgwarden_agent::join::{self, JoinArgs};
use pgwarden_agent::server_link::{self, Link};
use pgwarden_agent::tls::{PeerCert, Revoked};
use pgwarden_core::api::Problem;
use pgwarden_core::config::AgentConfig;
use pgwarden_core::control::{AgentReport, EnrollRequest, EnrollResponse, ReportAck};
use pgwarden_core::event::Event;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Who presented the client certificate of a report: its CN and OU.
type Who = Option<(String, Option<String>)>;

/// What the stand-in server saw and will answer.
#[derive(Default)]
struct Fake {
    ca_dir: PathBuf,
    reports: Vec<(AgentReport, Who)>,
    /// How many of a report's events to acknowledge (all when `None`).
    store_at_most: Option<usize>,
    revoked: Vec<String>,
    enrollments: usize,
}

type S = Arc<Mutex<Fake>>;

fn problem(status: u16, title: &str, detail: &str) -> Response {
    (
        StatusCode::from_u16(status).expect("status code"),
        [("content-type", "application/problem+json")],
        Json(Problem::new(status, title, detail)),
    )
        .into_response()
}

async fn ca(State(s): State<S>) -> String {
    let dir = s.lock().expect("state").ca_dir.clone();
    std::fs::read_to_string(dir.join("ca.pem")).expect("read ca.pem")
}

async fn enroll(State(s): State<S>, Json(r): Json<EnrollRequest>) -> Response {
    if r.token != "good-token" {
        return problem(401, "Unauthorized", "the join token is unknown or was used");
    }
    let mut g = s.lock().expect("state");
    g.enrollments += 1;
    let ca = pgwarden_pki::certs::Ca::load(&g.ca_dir).expect("load the CA");
    let cert = ca
        .sign_csr(&r.csr_pem, &r.cluster, &r.node, 30)
        .expect("sign the request");
    Json(EnrollResponse {
        cluster: r.cluster,
        node: r.node,
        fingerprint: pgwarden_pki::certs::fingerprint(&cert).expect("fingerprint"),
        cert_pem: cert,
        ca_pem: ca.pem().to_string(),
    })
    .into_response()
}

async fn report(
    State(s): State<S>,
    Extension(peer): Extension<PeerCert>,
    Json(r): Json<AgentReport>,
) -> Response {
    let Some(id) = peer.0.clone() else {
        return problem(401, "Unauthorized", "a client certificate is required");
    };
    let mut g = s.lock().expect("state");
    let stored = g
        .store_at_most
        .map_or(r.events.len(), |n| n.min(r.events.len()));
    let revoked = g.revoked.clone();
    g.reports.push((r, Some((id.cn, id.ou))));
    Json(ReportAck {
        events_stored: stored,
        revoked,
        report_interval_ms: 1500,
    })
    .into_response()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgwarden-cp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the test directory");
    d
}

/// Starts the stand-in server; returns its URL, the CA's fingerprint and its state.
async fn server(root: &Path) -> (String, String, S) {
    let ca_dir = root.join("ca");
    let fp = pgwarden_pki::certs::init(&ca_dir).expect("create the CA");
    let srv = root.join("srv");
    pgwarden_pki::certs::issue(&ca_dir, "server", &["127.0.0.1".into()], &srv)
        .expect("issue the server certificate");
    let state: S = Arc::new(Mutex::new(Fake {
        ca_dir: ca_dir.clone(),
        ..Fake::default()
    }));
    let app = Router::new()
        .route("/api/v1/enroll/ca", get(ca))
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/agent/report", post(report))
        .with_state(state.clone());
    let s = |p: &Path| p.display().to_string();
    let acceptor = pgwarden_pki::tls::acceptor(
        &s(&ca_dir.join("ca.pem")),
        &s(&srv.join("server.pem")),
        &s(&srv.join("server.key")),
    )
    .expect("TLS acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("local address"));
    tokio::spawn(pgwarden_pki::tls::serve(
        listener,
        acceptor,
        app,
        Revoked::default(),
    ));
    (url, fp, state)
}

fn config(state_dir: &Path) -> AgentConfig {
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
api_port = 18443
[api]
token = "0123456789abcdef0123"
[postgresql]
data_dir = "/nonexistent"
superuser_password = "x"
replication_password = "y"
"#,
        state_dir.display()
    );
    AgentConfig::parse(&text, "agent.toml").expect("test config")
}

fn args(url: &str, token: &str, fp: &str, force: bool) -> JoinArgs {
    JoinArgs {
        server: url.into(),
        token: token.into(),
        ca_fingerprint: fp.into(),
        force,
    }
}

fn event_line(i: u64) -> String {
    let ev = Event {
        id: format!("n1-1-{i}"),
        ts_ms: i,
        cluster: "main".into(),
        node: "n1".into(),
        kind: "test".into(),
        message: format!("event {i}"),
    };
    format!(
        "{}\n",
        serde_json::to_string(&ev).expect("encode the event")
    )
}

#[tokio::test]
async fn join_checks_the_ca_and_enrolls_then_reports_deliver_every_event_once() {
    let root = tmp("join");
    let (url, fp, fake) = server(&root).await;
    let state_dir = root.join("state");
    let cfg = config(&state_dir);
    let tls_dir = join::tls_dir(&state_dir);

    // A wrong fingerprint: both named, nothing written.
    let wrong = "00".repeat(32);
    let e = join::join(&cfg, &args(&url, "good-token", &wrong, false))
        .await
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(&fp), "{msg}");
    assert!(
        msg.contains(&join::normalize_fingerprint(&wrong).unwrap()),
        "{msg}"
    );
    assert!(!tls_dir.exists(), "nothing may be written");
    assert_eq!(fake.lock().unwrap().enrollments, 0);

    // A refused token: the problem's detail, no certificate.
    let lower = fp.replace(':', "").to_lowercase();
    let e = join::join(&cfg, &args(&url, "used-token", &lower, false))
        .await
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("401"), "{msg}");
    assert!(
        msg.contains("the join token is unknown or was used"),
        "{msg}"
    );
    assert!(!tls_dir.join("node.pem").exists());
    assert!(
        std::fs::read_dir(&tls_dir).unwrap().next().is_none(),
        "the temporary CA file is removed"
    );

    // Enrolled.
    let j = join::join(&cfg, &args(&format!("{url}/"), "good-token", &lower, false))
        .await
        .unwrap();
    let cert = std::fs::read_to_string(tls_dir.join("node.pem")).unwrap();
    assert_eq!(
        j.fingerprint,
        pgwarden_pki::certs::fingerprint(&cert).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tls_dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let sf = join::read_server_file(&state_dir).unwrap().unwrap();
    assert_eq!(sf.url, url);
    assert_eq!(sf.ca_fingerprint, fp);
    assert_eq!(join::tls_from_state_dir(&state_dir), Some(j.tls.clone()));
    let target = server_link::target(&cfg).unwrap().unwrap();
    assert_eq!(target.url, url);

    // Enrolled already: refused without --force, replaced with it.
    let e = join::join(&cfg, &args(&url, "good-token", &fp, false))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("--force"), "{e:#}");
    assert_eq!(fake.lock().unwrap().enrollments, 1);
    let j2 = join::join(&cfg, &args(&url, "good-token", &fp, true))
        .await
        .unwrap();
    assert_ne!(j2.fingerprint, j.fingerprint);

    // Reports: three events, the server stores two, then the rest.
    let log = state_dir.join("events.jsonl");
    std::fs::write(&log, (1..=3).map(event_line).collect::<String>()).unwrap();
    fake.lock().unwrap().store_at_most = Some(2);
    let revoked_fp = "ab".repeat(32);
    fake.lock().unwrap().revoked = vec![revoked_fp.clone()];
    let (commands, _) = Commands::load(&state_dir);
    let revoked = Revoked::default();
    let mut link = Link::new(&cfg, &target.url, &j2.tls, revoked.clone()).unwrap();
    let p = link
        .push(Default::default(), Some(7), &commands)
        .await
        .unwrap();
    assert_eq!((p.events_sent, p.events_stored, p.more), (3, 2, false));
    assert_eq!(p.interval, Some(std::time::Duration::from_millis(1500)));
    let two = (event_line(1) + &event_line(2)).len() as u64;
    assert_eq!(link.cursor(), two);
    assert_eq!(
        std::fs::read_to_string(server_link::cursor_file(&state_dir))
            .unwrap()
            .trim(),
        two.to_string()
    );
    let canonical = join::normalize_fingerprint(&revoked_fp).unwrap();
    assert!(revoked.contains(&canonical));
    assert!(server_link::load_revoked(&server_link::revoked_file(&state_dir)).contains(&canonical));

    // A new link (an agent restart) resumes at the cursor; a fourth event arrives meanwhile.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, event_line(4).as_bytes()))
        .unwrap();
    fake.lock().unwrap().store_at_most = None;
    let mut link = Link::new(&cfg, &target.url, &j2.tls, revoked.clone()).unwrap();
    let p = link
        .push(Default::default(), None, &commands)
        .await
        .unwrap();
    assert_eq!((p.events_sent, p.events_stored), (2, 2));
    let p = link
        .push(Default::default(), None, &commands)
        .await
        .unwrap();
    assert_eq!(p.events_sent, 0);

    let g = fake.lock().unwrap();
    let seen: Vec<Vec<u64>> = g
        .reports
        .iter()
        .map(|(r, _)| r.events.iter().map(|e| e.ts_ms).collect())
        .collect();
    assert_eq!(seen, vec![vec![1, 2, 3], vec![3, 4], vec![]]);
    let (first, who) = &g.reports[0];
    assert_eq!(
        who.clone(),
        Some(("n1".to_string(), Some("main".to_string())))
    );
    assert_eq!(first.node, "n1");
    assert_eq!(first.cluster, "main");
    assert_eq!(first.api_url, "https://127.0.0.1:18443");
    assert_eq!(first.history_epoch, Some(7));
    assert_eq!(first.agent_version, env!("CARGO_PKG_VERSION"));
    drop(g);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_failed_report_keeps_the_cursor() {
    let root = tmp("down");
    let (_url, fp, _fake) = server(&root).await;
    let _ = fp;
    let state_dir = root.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let cfg = config(&state_dir);
    // Certificates from the CA directly (as `[tls]` would name them).
    let ca_dir = root.join("ca");
    pgwarden_pki::certs::issue(&ca_dir, "n1", &["127.0.0.1".into()], &state_dir).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    let tls = pgwarden_core::config::TlsSection {
        ca_file: s(ca_dir.join("ca.pem")),
        cert_file: s(state_dir.join("n1.pem")),
        key_file: s(state_dir.join("n1.key")),
    };
    std::fs::write(state_dir.join("events.jsonl"), event_line(1)).unwrap();
    let (commands, _) = Commands::load(&state_dir);
    // Nothing listens on port 1.
    let mut link = Link::new(&cfg, "https://127.0.0.1:1", &tls, Revoked::default()).unwrap();
    assert!(link
        .push(Default::default(), None, &commands)
        .await
        .is_err());
    assert_eq!(link.cursor(), 0);
    assert!(!server_link::cursor_file(&state_dir).exists());
    let _ = std::fs::remove_dir_all(&root);
}
