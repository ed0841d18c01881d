//! `pgwardenctl` against the control plane: a real `pgwarden-server` in-process (SQLite,
//! 127.0.0.1:0) and the real `pgwardenctl` binary (build it first: `cargo build -p
//! pgwarden-cli`). Join tokens that enroll, users, API tokens, `list` and `nodes` after a
//! report, events paged and followed, commands to their outcome (a fake agent that succeeds,
//! an unreachable one that times out), errors naming the field, the target and the CLI
//! configuration file, webhooks (add, list, set, test sends to real HTTP receivers, the
//! delivery log, delete). No root, no PostgreSQL.

use pgwarden_core::control::{AgentReport, EnrollRequest};
use pgwarden_core::event::Event;
use pgwarden_core::server_config::ServerConfig;
use pgwarden_core::status::{Intent, NodeStatus, PgState, Role};
use pgwarden_tests::workspace_bin;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a `pgwardenctl` run gave.
#[derive(Debug)]
struct Out {
    code: i32,
    out: String,
    err: String,
}

impl Out {
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "stdout:\n{}\nstderr:\n{}", self.out, self.err);
        &self.out
    }
    fn failed(&self) -> &str {
        assert_eq!(self.code, 1, "stdout:\n{}\nstderr:\n{}", self.out, self.err);
        &self.err
    }
}

/// Runs `pgwardenctl` with `args`, `env` and `stdin`, in an environment without the user's
/// PGWARDEN_* variables or configuration file.
async fn run_ctl(
    dir: &std::path::Path,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: String,
) -> Out {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut c = std::process::Command::new(workspace_bin("pgwardenctl"));
        for v in [
            "PGWARDEN_SERVER",
            "PGWARDEN_AGENT",
            "PGWARDEN_TOKEN",
            "PGWARDEN_CA",
            "PGWARDEN_CERT",
            "PGWARDEN_KEY",
            "PGWARDENCTL_CONFIG",
            "XDG_CONFIG_HOME",
        ] {
            c.env_remove(v);
        }
        c.env("HOME", &dir)
            .env("PGWARDENCTL_CONFIG", dir.join("no-such-cli.toml"))
            .envs(env)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("run pgwardenctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("pgwardenctl output");
        Out {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).into(),
            err: String::from_utf8_lossy(&out.stderr).into(),
        }
    })
    .await
    .expect("join")
}

struct Srv {
    base: String,
    dir: PathBuf,
    ca: PathBuf,
    ca_fingerprint: String,
    admin: String,
    http: reqwest::Client,
    _running: pgwarden_server::Running,
}

impl Srv {
    async fn start(name: &str, extra: &str) -> Srv {
        let dir = std::env::temp_dir().join(format!("pgwarden-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [agents]\nreport_interval = \"1s\"\ndown_after = \"1h\"\n{extra}",
            dir.display()
        );
        let cfg = ServerConfig::parse(&text, "server.toml").expect("config");
        let out = pgwarden_server::init(&cfg).await.expect("init");
        let running = pgwarden_server::start(cfg.clone()).await.expect("start");
        let http = pgwarden_pki::tls::client(&cfg.ca_file(), None, Duration::from_secs(10))
            .expect("client");
        Srv {
            base: format!("https://localhost:{}", running.addr.port()),
            ca: PathBuf::from(cfg.ca_file()),
            ca_fingerprint: out.ca_fingerprint,
            dir,
            admin: out.admin_token.expect("a first admin token"),
            http,
            _running: running,
        }
    }

    /// `pgwardenctl --server … --ca … --token <admin> args…`.
    async fn ctl(&self, args: &[&str]) -> Out {
        self.ctl_as(&self.admin, args, "").await
    }

    async fn ctl_as(&self, token: &str, args: &[&str], stdin: &str) -> Out {
        let mut all: Vec<String> = vec![
            "--server".into(),
            self.base.clone(),
            "--ca".into(),
            self.ca.display().to_string(),
            "--token".into(),
            token.into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        run_ctl(&self.dir, all, vec![], stdin.into()).await
    }

    /// Runs `pgwardenctl` as a process whose stdout lines arrive on the returned channel.
    fn spawn_ctl(
        &self,
        args: &[&str],
    ) -> (
        std::process::Child,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let mut child = std::process::Command::new(workspace_bin("pgwardenctl"))
            .env_remove("PGWARDEN_AGENT")
            .env_remove("PGWARDEN_SERVER")
            .env("PGWARDENCTL_CONFIG", self.dir.join("no-such-cli.toml"))
            .arg("--server")
            .arg(&self.base)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--token")
            .arg(&self.admin)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn pgwardenctl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Enrolls `node` of `cluster` with `token`; returns the answer's status and body.
    async fn enroll_with(&self, token: &str, cluster: &str, node: &str) -> (u16, Value, String) {
        let (key, csr) =
            pgwarden_pki::certs::new_request(node, &["127.0.0.1".into()]).expect("csr");
        let req = EnrollRequest {
            token: token.into(),
            cluster: cluster.into(),
            node: node.into(),
            csr_pem: csr,
        };
        let r = self
            .http
            .post(format!("{}/api/v1/enroll", self.base))
            .json(&req)
            .send()
            .await
            .expect("enroll");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null), key)
    }

    /// Enrolls `node` of `cluster` with a fresh join token; returns its mTLS client.
    async fn enroll(&self, cluster: &str, node: &str) -> reqwest::Client {
        pgwarden_server::testkit::enroll(
            &self.http,
            &self.base,
            &self.admin,
            &self.ca,
            &self.dir,
            cluster,
            node,
        )
        .await
        .expect("enroll")
        .client
    }

    async fn report(&self, agent: &reqwest::Client, rep: &AgentReport) {
        let r = agent
            .post(format!("{}/api/v1/agent/report", self.base))
            .json(rep)
            .send()
            .await
            .expect("report");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
    }

    async fn commands(&self) -> usize {
        let (s, v) = self
            .call(Method::GET, "/api/v1/commands?limit=500", None)
            .await;
        assert_eq!(s, 200);
        v["items"].as_array().map_or(0, |a| a.len())
    }
}

fn report(cluster: &str, node: &str, role: Role, api_url: &str, events: Vec<Event>) -> AgentReport {
    let status = NodeStatus {
        name: node.into(),
        cluster: cluster.into(),
        role,
        state: PgState::Running,
        intent: if role == Role::Primary {
            Intent::primary()
        } else {
            Intent::replica_of("n1")
        },
        timeline: Some(1),
        lag_bytes: (role == Role::Replica).then_some(2 * 1_048_576),
        agent_version: "test".into(),
        ..Default::default()
    };
    AgentReport {
        cluster: cluster.into(),
        node: node.into(),
        agent_version: "test".into(),
        api_url: api_url.into(),
        status,
        events,
        history_epoch: None,
        commands: Vec::new(),
    }
}

/// Nothing listens there: commands cannot be delivered.
const UNREACHABLE: &str = "https://127.0.0.1:9";

fn event(cluster: &str, node: &str, i: u64, kind: &str) -> Event {
    Event {
        id: format!("{node}-{kind}-{i}"),
        ts_ms: 1_700_000_000_000 + i * 10,
        cluster: cluster.into(),
        node: node.into(),
        kind: kind.into(),
        message: format!("{kind} {i}"),
    }
}

/// The table row of `name`, as trimmed cells.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {name} ")))
        .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_enroll_agents() {
    let srv = Srv::start("jt", "").await;
    let out = srv
        .ctl(&["token", "create", "--cluster", "main", "--ttl", "1h"])
        .await;
    let text = out.ok();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("pgwarden-agent join "))
        .unwrap_or_else(|| panic!("no join command line:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let arg = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .unwrap_or_else(|| panic!("no {flag} in {line}"))
            .to_string()
    };
    assert_eq!(arg("--server"), srv.base);
    assert_eq!(arg("--ca-fingerprint"), srv.ca_fingerprint);
    assert!(
        text.contains(&format!("CA fingerprint: {}", srv.ca_fingerprint)),
        "{text}"
    );
    let token = arg("--token");
    assert!(
        text.contains("(in 59m") || text.contains("(in 1h"),
        "{text}"
    );

    // Listed, unused, without the token itself.
    let (_, v) = srv.call(Method::GET, "/api/v1/join-tokens", None).await;
    let id = v[0]["id"].as_str().expect("id").to_string();
    assert!(
        text.contains(&format!("Join token {id} for cluster main")),
        "{text}"
    );
    let list = srv.ctl(&["token", "list"]).await;
    let r = row(list.ok(), &id);
    assert_eq!(
        (r[2].as_str(), r[6].as_str()),
        ("main", "unused"),
        "{}",
        list.out
    );
    assert!(!list.out.contains(&token));

    // The printed token enrolls a node once.
    let (s, v, _) = srv.enroll_with(&token, "main", "n1").await;
    assert_eq!(s, 201, "{v}");
    let (s, _, _) = srv.enroll_with(&token, "main", "n2").await;
    assert_eq!(s, 401, "a join token is usable once");
    let list = srv.ctl(&["token", "list"]).await;
    assert!(
        row(list.ok(), &id)[6].starts_with("by n1 at "),
        "{}",
        list.out
    );

    // --json gives the server's answer; delete removes a token.
    let out = srv
        .ctl(&["--json", "token", "create", "--cluster", "other"])
        .await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    let other = v["id"].as_str().expect("id").to_string();
    assert!(v["token"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    assert!(srv.ctl(&["token", "list"]).await.ok().contains(&other));
    let out = srv.ctl(&["token", "delete", &other]).await;
    assert!(out.ok().contains("deleted"));
    assert!(!srv.ctl(&["token", "list"]).await.ok().contains(&other));
    let err = srv.ctl(&["token", "delete", &other]).await;
    assert!(err.failed().contains("no join token"), "{}", err.err);

    // A bad value: exit 1, the field named.
    let out = srv
        .ctl(&["token", "create", "--cluster", "main", "--ttl", "forever"])
        .await;
    assert!(out.failed().contains("(field ttl)"), "{}", out.err);
    let out = srv.ctl(&["token", "create", "--cluster", "no/pe"]).await;
    assert!(out.failed().contains("(field cluster)"), "{}", out.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_login() {
    let srv = Srv::start("users", "").await;
    let out = srv
        .ctl_as(
            &srv.admin,
            &[
                "user",
                "add",
                "bob",
                "--role",
                "operator",
                "--password-stdin",
            ],
            "correct horse battery\n",
        )
        .await;
    assert!(
        out.ok()
            .contains("user bob added as operator, with a password"),
        "{}",
        out.out
    );
    let out = srv.ctl(&["user", "add", "carl", "--role", "viewer"]).await;
    assert!(out.ok().contains("without a password"), "{}", out.out);
    let list = srv.ctl(&["user", "list"]).await;
    assert_eq!(row(list.ok(), "bob")[2..4], ["operator", "active"]);
    assert_eq!(row(&list.out, "carl")[2..4], ["viewer", "active"]);

    // Errors name the field.
    let out = srv.ctl(&["user", "add", "dave", "--role", "wizard"]).await;
    assert!(out.failed().contains("(field role)"), "{}", out.err);
    let out = srv
        .ctl_as(
            &srv.admin,
            &[
                "user",
                "add",
                "dave",
                "--role",
                "viewer",
                "--password-stdin",
            ],
            "short\n",
        )
        .await;
    assert!(out.failed().contains("(field password)"), "{}", out.err);
    let out = srv.ctl(&["user", "add", "bob", "--role", "viewer"]).await;
    assert!(out.failed().contains("(field name)"), "{}", out.err);
    let out = srv.ctl(&["user", "set", "bob"]).await;
    assert!(out.failed().contains("nothing to change"), "{}", out.err);

    // Login stores server, token and CA in a private file that later runs use alone.
    let cfg = srv.dir.join("cli").join("pgwardenctl.toml");
    let env = vec![("PGWARDENCTL_CONFIG".to_string(), cfg.display().to_string())];
    let login = |password: &str| {
        run_ctl(
            &srv.dir,
            vec![
                "--server".into(),
                srv.base.clone(),
                "--ca".into(),
                srv.ca.display().to_string(),
                "login".into(),
                "--user".into(),
                "bob".into(),
            ],
            env.clone(),
            format!("{password}\n"),
        )
    };
    let out = login("wrong password!").await;
    assert!(out.failed().contains("wrong password"), "{}", out.err);
    assert!(!cfg.exists());
    let out = login("correct horse battery").await;
    assert!(out.ok().contains("logged in to"), "{}", out.out);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cfg)
        .expect("config file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&cfg).expect("read");
    for key in ["server = ", "token = ", "ca_file = "] {
        assert!(text.contains(key), "{text}");
    }
    let out = run_ctl(
        &srv.dir,
        vec!["api-token".into(), "list".into()],
        env.clone(),
        String::new(),
    )
    .await;
    assert!(
        out.ok().contains("| bob "),
        "bob's login token is listed: {}",
        out.out
    );
    let out = run_ctl(
        &srv.dir,
        vec!["user".into(), "list".into()],
        env.clone(),
        String::new(),
    )
    .await;
    assert!(
        out.failed().contains("admin role"),
        "bob is an operator: {}",
        out.err
    );

    // set: role and disabled flag; a disabled user's token stops working.
    let out = srv
        .ctl(&["user", "set", "bob", "--role", "viewer", "--disable"])
        .await;
    assert!(
        out.ok().contains("user bob: viewer, disabled"),
        "{}",
        out.out
    );
    assert_eq!(
        row(srv.ctl(&["user", "list"]).await.ok(), "bob")[2..4],
        ["viewer", "disabled"]
    );
    let out = run_ctl(&srv.dir, vec!["nodes".into()], env.clone(), String::new()).await;
    let err = out.failed();
    assert!(err.contains("not valid") && err.contains("hint:"), "{err}");
    let out = srv.ctl(&["user", "set", "bob", "--enable"]).await;
    assert!(out.ok().contains("active"), "{}", out.out);
    run_ctl(&srv.dir, vec!["nodes".into()], env.clone(), String::new())
        .await
        .ok();

    let out = srv.ctl(&["user", "delete", "bob"]).await;
    assert!(out.ok().contains("user bob deleted"));
    assert!(!srv.ctl(&["user", "list"]).await.ok().contains("| bob "));
    let out = srv.ctl(&["user", "delete", "bob"]).await;
    assert!(out.failed().contains("no user \"bob\""), "{}", out.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_round_trip() {
    let srv = Srv::start("apitok", "").await;
    let out = srv
        .ctl(&["api-token", "create", "--name", "ci", "--ttl", "1h"])
        .await;
    let text = out.ok();
    let token = text.lines().last().expect("token line").trim().to_string();
    assert!(token.starts_with("pgw_"), "{text}");
    let id = text.split_whitespace().nth(2).expect("id").to_string();
    // It works.
    srv.ctl_as(&token, &["nodes"], "").await.ok();
    let list = srv.ctl(&["api-token", "list"]).await;
    let r = row(list.ok(), &id);
    assert_eq!(r[3], "ci", "{}", list.out);
    assert_ne!(r[6], "never", "used once: {}", list.out);
    assert!(!list.out.contains(&token));

    let out = srv
        .ctl(&["api-token", "create", "--name", "x", "--ttl", "forever"])
        .await;
    assert!(out.failed().contains("(field ttl)"), "{}", out.err);
    let out = srv
        .ctl(&["api-token", "create", "--name", "x", "--user", "nobody"])
        .await;
    assert!(out.failed().contains("(field user)"), "{}", out.err);

    let out = srv.ctl(&["api-token", "delete", &id]).await;
    assert!(out.ok().contains("deleted"));
    assert!(!srv.ctl(&["api-token", "list"]).await.ok().contains(&id));
    let out = srv.ctl_as(&token, &["nodes"], "").await;
    assert!(
        out.failed().contains("hint: "),
        "a deleted token: {}",
        out.err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_nodes_show_reporting_nodes() {
    let srv = Srv::start("list", "").await;
    let out = srv.ctl(&["list"]).await;
    assert!(out.ok().contains("no cluster yet"), "{}", out.out);
    let n1 = srv.enroll("main", "n1").await;
    let n2 = srv.enroll("main", "n2").await;
    srv.report(
        &n1,
        &report("main", "n1", Role::Primary, UNREACHABLE, vec![]),
    )
    .await;
    srv.report(
        &n2,
        &report("main", "n2", Role::Replica, UNREACHABLE, vec![]),
    )
    .await;

    let out = srv.ctl(&["list"]).await;
    let t = out.ok();
    assert!(t.starts_with("+ Cluster: main "), "{t}");
    assert_eq!(
        row(t, "n1")[1..7],
        ["n1", "Primary", "running", "1", "", "up"]
    );
    assert_eq!(
        row(t, "n2")[1..7],
        ["n2", "Replica", "running", "1", "2.0", "up"]
    );
    let out = srv.ctl(&["--json", "list", "--cluster", "main"]).await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(v["primary"], "n1");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(2));
    let out = srv.ctl(&["list", "--cluster", "nope"]).await;
    assert!(
        out.failed().contains("no cluster named \"nope\""),
        "{}",
        out.err
    );

    let out = srv.ctl(&["nodes"]).await;
    let t = out.ok();
    for n in ["n1", "n2"] {
        let r = t
            .lines()
            .find(|l| l.starts_with("| main ") && l.contains(&format!("| {n} ")))
            .unwrap_or_else(|| panic!("no {n}:\n{t}"));
        assert!(r.contains("| up ") && r.contains(UNREACHABLE), "{r}");
    }
    let out = srv.ctl(&["--json", "nodes", "--cluster", "main"]).await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_page_and_follow() {
    let srv = Srv::start("events", "").await;
    let n1 = srv.enroll("main", "n1").await;
    let bulk: Vec<Event> = (0..250).map(|i| event("main", "n1", i, "bulk")).collect();
    srv.report(&n1, &report("main", "n1", Role::Primary, UNREACHABLE, bulk))
        .await;

    // 250 events over pages of 100: each printed once, in order.
    let out = srv
        .ctl(&["events", "--type", "bulk", "--limit", "1000"])
        .await;
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 250, "{}", out.out);
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l.ends_with(&format!("  main/n1  bulk  bulk {i}")),
            "line {i}: {l}"
        );
    }
    let out = srv
        .ctl(&["events", "--type", "bulk", "--limit", "120"])
        .await;
    assert_eq!(out.ok().lines().count(), 120);
    let out = srv
        .ctl(&[
            "--json",
            "events",
            "--node",
            "n1",
            "--type",
            "bulk,other",
            "--limit",
            "1000",
        ])
        .await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(250));
    let out = srv.ctl(&["events", "--since", "yesterday"]).await;
    assert!(out.failed().contains("(field since)"), "{}", out.err);

    // --follow: the log first, then what comes.
    srv.report(
        &n1,
        &report(
            "main",
            "n1",
            Role::Primary,
            UNREACHABLE,
            vec![event("main", "n1", 0, "live")],
        ),
    )
    .await;
    let (mut child, mut rx) = srv.spawn_ctl(&["events", "--type", "live", "--follow"]);
    let first = next_line(&mut rx).await;
    assert!(
        first
            .as_deref()
            .is_some_and(|l| l.ends_with("main/n1  live  live 0")),
        "{first:?}"
    );
    let sent = Instant::now();
    srv.report(
        &n1,
        &report(
            "main",
            "n1",
            Role::Primary,
            UNREACHABLE,
            vec![event("main", "n1", 1, "live")],
        ),
    )
    .await;
    let second = next_line(&mut rx).await;
    assert!(
        second
            .as_deref()
            .is_some_and(|l| l.ends_with("main/n1  live  live 1")),
        "the new event was not printed: {second:?}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        child.try_wait().expect("wait").is_none(),
        "--follow keeps going"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

/// The next line a spawned `pgwardenctl` printed, if one comes within 10 s.
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .ok()
        .flatten()
}

/// A fake agent over plain HTTP: hands out a configuration and carries out every command at
/// once, recording what it was sent.
async fn fake_agent(received: Arc<Mutex<Vec<Value>>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let states: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (received, states) = (received.clone(), states.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_string();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        while buf.len() < p + 4 + len {
                            let n = sock.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, buf[p + 4..p + 4 + len].to_vec());
                    }
                };
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let (status, answer) = match (method, path) {
                    ("GET", "/v1/config") => (
                        200,
                        json!({"config": pgwarden_core::dynconfig::DynamicConfig::default()}),
                    ),
                    ("POST", "/v1/commands") => {
                        let cmd: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        received.lock().expect("lock").push(cmd.clone());
                        let st = json!({
                            "id": cmd["id"], "kind": cmd["kind"], "state": "succeeded",
                            "message": format!("{} done", cmd["kind"].as_str().unwrap_or("")),
                            // A configuration change answers with the configuration.
                            "result": if cmd["kind"] == "config" {
                                json!({"status": 200, "body": {"config": {"version": 1}}})
                            } else {
                                Value::Null
                            },
                            "started_ms": 1, "finished_ms": 2, "deliveries": 1,
                        });
                        states
                            .lock()
                            .expect("lock")
                            .insert(cmd["id"].as_str().unwrap_or("").to_string(), st.clone());
                        (202, st)
                    }
                    ("GET", p) if p.starts_with("/v1/commands/") => {
                        match states.lock().expect("lock").get(&p[13..]) {
                            Some(st) => (200, st.clone()),
                            None => (404, json!({})),
                        }
                    }
                    _ => (404, json!({})),
                };
                let text = answer.to_string();
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_to_their_outcome() {
    let srv = Srv::start("cmds", "[commands]\ntimeout = \"3s\"\n").await;
    // "good": an agent that carries out every command; "main": one nothing answers for.
    let received = Arc::new(Mutex::new(Vec::new()));
    let good_url = fake_agent(received.clone()).await;
    let g1 = srv.enroll("good", "n1").await;
    srv.report(&g1, &report("good", "n1", Role::Primary, &good_url, vec![]))
        .await;
    let n1 = srv.enroll("main", "n1").await;
    let n2 = srv.enroll("main", "n2").await;
    srv.report(
        &n1,
        &report("main", "n1", Role::Primary, UNREACHABLE, vec![]),
    )
    .await;
    srv.report(
        &n2,
        &report("main", "n2", Role::Replica, UNREACHABLE, vec![]),
    )
    .await;

    let out = srv.ctl(&["pause", "--cluster", "good"]).await;
    let t = out.ok();
    assert!(
        t.starts_with("command cmd-") && t.contains("(pause, cluster good)"),
        "{t}"
    );
    assert!(
        t.contains("  queued\n") && t.contains("  succeeded: pause done"),
        "{t}"
    );
    let out = srv
        .ctl(&["restart", "--cluster", "good", "--node", "n1", "--json"])
        .await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(
        (v["state"].as_str(), v["node"].as_str()),
        (Some("succeeded"), Some("n1"))
    );
    let out = srv
        .ctl(&[
            "switchover",
            "--cluster",
            "good",
            "--candidate",
            "n2",
            "--force",
        ])
        .await;
    out.ok();
    {
        let got = received.lock().expect("lock");
        let kinds: Vec<&str> = got.iter().filter_map(|c| c["kind"].as_str()).collect();
        assert_eq!(kinds, ["pause", "restart", "switchover"]);
        assert_eq!(got[2]["args"], json!({"candidate": "n2"}));
    }

    // The configuration through the server.
    let out = srv.ctl(&["config", "show", "--cluster", "good"]).await;
    let t = out.ok();
    assert!(
        t.contains("version 0") && t.contains("ttl = \"3s\"") && t.contains("n1"),
        "{t}"
    );
    let out = srv
        .ctl(&[
            "config",
            "set",
            "--cluster",
            "good",
            "ttl=5s",
            "work_mem=16MB",
        ])
        .await;
    assert!(
        out.ok()
            .contains("  succeeded: configuration version 1 applied"),
        "{}",
        out.out
    );
    let patch = received.lock().expect("lock").last().expect("config")["args"].clone();
    assert_eq!(patch["ttl"], "5s");
    assert_eq!(patch["parameters"]["work_mem"], "16MB");
    let out = srv
        .ctl(&["config", "set", "--cluster", "good", "ttl=100ms"])
        .await;
    assert!(out.failed().contains("(field ttl)"), "{}", out.err);
    let file = srv.dir.join("patch.json");
    std::fs::write(&file, r#"{"parameters": {"work_mem": null}}"#).expect("write");
    let out = srv
        .ctl(&[
            "config",
            "patch",
            "--cluster",
            "good",
            "--file",
            &file.display().to_string(),
        ])
        .await;
    out.ok();
    let out = srv.ctl(&["config", "history", "--cluster", "good"]).await;
    let t = out.ok();
    assert_eq!(t.matches("work_mem").count(), 2, "{t}");

    // Nobody answers for "main": the command ends timed_out, exit 1, with the reason.
    let before = srv.commands().await;
    let started = Instant::now();
    let out = srv.ctl(&["pause", "--cluster", "main"]).await;
    let err = out.failed();
    assert!(
        out.out.contains("  queued\n") && out.out.contains("  timed_out"),
        "{}",
        out.out
    );
    assert!(
        err.contains("timed_out: ") && err.contains("never delivered"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        srv.commands().await,
        before + 1,
        "one command, however often it was polled"
    );

    // Bad values name their field; nothing is queued.
    let before = srv.commands().await;
    for (args, field) in [
        (
            &["resume", "--cluster", "main", "--timeout", "0s"][..],
            "(field timeout)",
        ),
        (
            &["restart", "--cluster", "main", "--node", "n9"],
            "(field node)",
        ),
        (
            &[
                "switchover",
                "--cluster",
                "main",
                "--scheduled",
                "tomorrow",
                "--force",
            ],
            "(field args.scheduled_at)",
        ),
    ] {
        let out = srv.ctl(args).await;
        assert!(out.failed().contains(field), "{args:?}: {}", out.err);
    }
    let out = srv.ctl(&["pause", "--cluster", "nope"]).await;
    assert!(out.failed().contains("no cluster named"), "{}", out.err);
    let out = srv.ctl(&["pause"]).await;
    assert!(out.failed().contains("--cluster"), "{}", out.err);

    // Confirmation: the plan, then no means nothing is sent.
    let out = srv
        .ctl_as(
            &srv.admin,
            &["failover", "--cluster", "main", "--candidate", "n2"],
            "n\n",
        )
        .await;
    assert_eq!(out.code, 1, "{}{}", out.out, out.err);
    assert!(
        out.out.contains("Current primary: n1") && out.out.contains("Candidate:       n2"),
        "{}",
        out.out
    );
    assert!(out.err.contains("aborted"), "{}", out.err);
    let out = srv
        .ctl_as(
            &srv.admin,
            &["switchover", "--cluster", "main", "--candidate", "n1"],
            "y\n",
        )
        .await;
    assert!(
        out.failed().contains("n1 is already the primary"),
        "{}",
        out.err
    );
    let out = srv
        .ctl(&["--json", "switchover", "--cluster", "main"])
        .await;
    assert!(out.failed().contains("--json needs --force"), "{}", out.err);
    assert_eq!(srv.commands().await, before, "nothing was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_and_the_configuration_file() {
    let dir = std::env::temp_dir().join(format!("pgwarden-cli-target-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");

    // Nothing names a server or an agent.
    let out = run_ctl(&dir, vec!["list".into()], vec![], String::new()).await;
    let err = out.failed();
    for needle in [
        "--server",
        "PGWARDEN_SERVER",
        "--agent",
        "no-such-cli.toml",
        "login",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Two flags.
    let out = run_ctl(
        &dir,
        ["--server", "https://a:1", "--agent", "http://b:2", "list"]
            .map(String::from)
            .to_vec(),
        vec![],
        String::new(),
    )
    .await;
    assert!(out.failed().contains("give one"), "{}", out.err);
    // An https server needs the CA.
    let out = run_ctl(
        &dir,
        ["--server", "https://a:1", "--token", "t", "list"]
            .map(String::from)
            .to_vec(),
        vec![],
        String::new(),
    )
    .await;
    assert!(out.failed().contains("--ca"), "{}", out.err);

    // An unknown key in the file: file, line and key.
    let file = dir.join("pgwardenctl.toml");
    std::fs::write(
        &file,
        "server = \"https://cp:9443\"\n# the token\ntokn = \"x\"\n",
    )
    .expect("write");
    let env = vec![("PGWARDENCTL_CONFIG".to_string(), file.display().to_string())];
    let out = run_ctl(&dir, vec!["list".into()], env.clone(), String::new()).await;
    let want = format!("{}:3: key `tokn`: unknown key", file.display());
    assert!(out.failed().contains(&want), "{want}: {}", out.err);
    // The agent mode does not read it.
    let out = run_ctl(
        &dir,
        ["--agent", "http://127.0.0.1:9", "list"]
            .map(String::from)
            .to_vec(),
        env,
        String::new(),
    )
    .await;
    assert!(
        out.failed()
            .contains("a token is required: --token or PGWARDEN_TOKEN"),
        "{}",
        out.err
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a webhook receiver was sent: the request head (lowercased header names kept as sent)
/// and the body.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A webhook receiver over plain HTTP on 127.0.0.1:0, answering every request with `status`
/// and `answer`, recording what it was sent. Returns its URL.
async fn receiver(status: u16, answer: &'static str, received: Received) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let received = received.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_string();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        while buf.len() < p + 4 + len {
                            let n = sock.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, buf[p + 4..p + 4 + len].to_vec());
                    }
                };
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                received.lock().expect("lock").push((head, body));
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// The id in `added webhook wh-… (…` / `updated webhook wh-… (…`.
fn webhook_id(text: &str) -> String {
    text.split_whitespace()
        .nth(2)
        .filter(|id| id.starts_with("wh-"))
        .unwrap_or_else(|| panic!("no webhook id in:\n{text}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_round_trip() {
    // A failing receiver's test delivery is given up after 3 s.
    let srv = Srv::start(
        "hooks",
        "[webhooks]\ntimeout = \"1s\"\nmax_age = \"3s\"\nretry_base = \"200ms\"\n",
    )
    .await;
    let good = Arc::new(Mutex::new(Vec::new()));
    let good_url = format!("{}/hook?k=v", receiver(200, "ok", good.clone()).await);
    let bad = Arc::new(Mutex::new(Vec::new()));
    let bad_url = receiver(500, "upstream down", bad.clone()).await;

    let out = srv.ctl(&["webhook", "list"]).await;
    assert!(out.ok().contains("no webhook"), "{}", out.out);

    // add: the secret the server made is printed once.
    let out = srv
        .ctl(&[
            "webhook",
            "add",
            "--name",
            "ops",
            "--url",
            &good_url,
            "--format",
            "json",
            "--type",
            "agent_down,fenced",
            "--cluster",
            "main",
            "--min-severity",
            "warning",
        ])
        .await;
    let text = out.ok();
    let id = webhook_id(text);
    assert!(
        text.contains(&format!(
            "added webhook {id} (\"ops\"): format json, enabled\n  url:    {good_url}\n  \
             filter: types agent_down,fenced; clusters main; severity >= warning\n"
        )),
        "{text}"
    );
    let secret = text.lines().last().expect("secret line").trim();
    assert!(
        text.contains("signing secret (made by the server, shown only once):")
            && secret.starts_with("whsec_"),
        "{text}"
    );

    // list: the table, and the server's JSON as it is (no secret).
    let list = srv.ctl(&["webhook", "list"]).await;
    assert_eq!(
        row(list.ok(), &id)[2..7],
        [
            "ops",
            "json",
            "yes",
            good_url.as_str(),
            "types agent_down,fenced; clusters main; severity >= warning"
        ],
        "{}",
        list.out
    );
    let out = srv.ctl(&["--json", "webhook", "list"]).await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(v[0]["id"], json!(id), "{v}");
    assert_eq!(v[0]["event_types"], json!(["agent_down", "fenced"]));
    assert_eq!(v[0]["clusters"], json!(["main"]));
    assert_eq!(v[0]["min_severity"], json!("warning"));
    assert!(!out.out.contains(secret), "{}", out.out);

    // A viewer sees the URL as the server shows it to viewers: without its path.
    let (s, _) = srv
        .call(
            Method::POST,
            "/api/v1/users",
            Some(json!({"name": "vera", "role": "viewer"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, t) = srv
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "v", "user": "vera"})),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    let viewer = t["token"].as_str().expect("token").to_string();
    let list = srv.ctl_as(&viewer, &["webhook", "list"], "").await;
    let host = good_url.split("/hook").next().expect("host");
    assert_eq!(row(list.ok(), &id)[5], format!("{host}/…"), "{}", list.out);
    let out = srv
        .ctl_as(&viewer, &["webhook", "set", &id, "--enable"], "")
        .await;
    assert!(out.failed().contains("admin"), "{}", out.err);

    // set: PATCH only what was given; `--type ''` means every type.
    let out = srv
        .ctl(&[
            "webhook",
            "set",
            &id,
            "--disable",
            "--name",
            "ops2",
            "--type",
            "",
        ])
        .await;
    assert!(
        out.ok().starts_with(&format!(
            "updated webhook {id} (\"ops2\"): format json, disabled\n"
        )),
        "{}",
        out.out
    );
    assert!(
        out.out
            .contains("filter: clusters main; severity >= warning"),
        "{}",
        out.out
    );
    let (s, w) = srv
        .call(Method::GET, &format!("/api/v1/webhooks/{id}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (&w["name"], &w["enabled"], &w["event_types"], &w["clusters"]),
        (&json!("ops2"), &json!(false), &json!([]), &json!(["main"])),
        "{w}"
    );
    let out = srv.ctl(&["webhook", "set", &id]).await;
    assert!(out.failed().contains("nothing to change"), "{}", out.err);

    // test: a disabled webhook still gets the test send, followed until delivered.
    let out = srv.ctl(&["webhook", "test", &id]).await;
    let text = out.ok();
    assert!(
        text.contains(&format!("to webhook {id} queued (event webhook-test-")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("  attempt 1 by ") && l.ends_with(": HTTP 200: ok")),
        "{text}"
    );
    assert!(text.ends_with("delivered\n"), "{text}");
    {
        let got = good.lock().expect("lock");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].0.starts_with("POST /hook?k=v "), "{}", got[0].0);
        assert_eq!(got[0].1["type"], json!("webhook_test"), "{}", got[0].1);
        assert!(
            got[0]
                .0
                .to_ascii_lowercase()
                .contains("x-pgwarden-signature: v1="),
            "{}",
            got[0].0
        );
    }

    // deliveries: the table and the JSON, filtered.
    let out = srv.ctl(&["webhook", "deliveries", &id]).await;
    let delivery = text
        .split_whitespace()
        .nth(2)
        .expect("delivery id")
        .to_string();
    assert_eq!(
        row(out.ok(), &delivery)[3..7],
        ["webhook_test", "delivered", "1", "200"],
        "{}",
        out.out
    );
    let out = srv
        .ctl(&[
            "--json",
            "webhook",
            "deliveries",
            &id,
            "--state",
            "delivered",
            "--limit",
            "1",
        ])
        .await;
    let v: Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["attempt_log"][0]["status_code"], json!(200), "{v}");
    let out = srv
        .ctl(&["--json", "webhook", "deliveries", &id, "--state", "failed"])
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(out.ok()).expect("json"),
        json!([])
    );

    // A receiver that fails: the attempts are printed, the test fails when it is given up.
    let out = srv
        .ctl(&[
            "webhook",
            "add",
            "--name",
            "bad",
            "--url",
            &bad_url,
            "--format",
            "slack",
            "--secret",
            "0123456789abcdef0123",
        ])
        .await;
    let bad_id = webhook_id(out.ok());
    assert!(!out.out.contains("signing secret"), "{}", out.out);
    let out = srv
        .ctl(&["webhook", "test", &bad_id, "--wait", "30s"])
        .await;
    assert!(
        out.failed().starts_with("error: test delivery ") && out.err.contains(" failed: "),
        "{}",
        out.err
    );
    assert!(
        out.out
            .lines()
            .any(|l| l.starts_with("  attempt 1 by ") && l.ends_with(": HTTP 500: upstream down")),
        "{}",
        out.out
    );
    assert!(!bad.lock().expect("lock").is_empty());
    let out = srv
        .ctl(&["webhook", "deliveries", &bad_id, "--state", "failed"])
        .await;
    assert!(out.ok().contains("| failed "), "{}", out.out);

    // Errors are the server's problem documents, naming the field.
    let out = srv
        .ctl(&[
            "webhook",
            "add",
            "--name",
            "pd",
            "--url",
            "https://events.pagerduty.com/v2/enqueue",
            "--format",
            "pagerduty",
        ])
        .await;
    assert!(out.failed().contains("(field routing_key)"), "{}", out.err);
    let out = srv
        .ctl(&["webhook", "set", &id, "--url", "ftp://x.example/"])
        .await;
    assert!(out.failed().contains("(field url)"), "{}", out.err);
    let out = srv
        .ctl_as(
            &srv.admin,
            &[
                "webhook",
                "add",
                "--name",
                "s",
                "--url",
                &good_url,
                "--format",
                "json",
                "--secret-stdin",
            ],
            "short\n",
        )
        .await;
    assert!(out.failed().contains("(field secret)"), "{}", out.err);
    let out = srv.ctl(&["webhook", "test", "wh-none"]).await;
    assert!(out.failed().contains("no webhook"), "{}", out.err);

    // delete: gone, with its deliveries.
    let out = srv.ctl(&["webhook", "delete", &id]).await;
    assert!(
        out.ok().contains(&format!("webhook {id} deleted")),
        "{}",
        out.out
    );
    let list = srv.ctl(&["webhook", "list"]).await;
    assert!(!list.ok().contains(&id), "{}", list.out);
    assert!(list.out.contains(&bad_id), "{}", list.out);
    let out = srv.ctl(&["webhook", "deliveries", &id]).await;
    assert!(out.failed().contains("no webhook"), "{}", out.err);
    let out = srv.ctl(&["webhook", "delete", &id]).await;
    assert!(out.failed().contains("no webhook"), "{}", out.err);

    // An agent has no webhooks.
    let out = run_ctl(
        &srv.dir,
        vec![
            "--agent".into(),
            "http://127.0.0.1:9".into(),
            "webhook".into(),
            "list".into(),
        ],
        vec![],
        String::new(),
    )
    .await;
    assert!(
        out.failed().contains("`webhook` needs the control plane"),
        "{}",
        out.err
    );
}
