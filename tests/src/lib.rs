//! Helpers for pgwarden's end-to-end tests: a lab that removes itself, SQL, the agent API,
//! health checks and polling with timeouts.
//!
//! Tests need real PostgreSQL binaries. As root they run on network-namespace hosts; without
//! root on loopback ports. In CI (`CI=true`) anything missing is a failure, never a skip.

use anyhow::{bail, Context, Result};
use pgwarden_core::status::NodeStatus;
use pgwarden_lab::{Lab, LabSpec};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

pub use pgwarden_lab;

pub use pgwarden_lab::temp_pg;

pub use pgwarden_lab::in_ci;

/// Fails in CI, and says so loudly elsewhere, when a test cannot run here. Returns false when
/// the caller should return early (only outside CI).
pub fn require_root(test: &str) -> bool {
    if pgwarden_lab::is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test} needs root (network namespaces); CI runs as root");
    }
    eprintln!("SKIPPED {test}: needs root for network namespaces (runs in CI)");
    false
}

/// A lab that is torn down when the test ends, however it ends.
pub struct TestLab {
    pub lab: Lab,
    pub http: reqwest::Client,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if std::env::var("PGWARDEN_KEEP_LAB").is_ok() {
            eprintln!("keeping lab at {}", self.lab.dir.display());
            return;
        }
        if let Err(e) = self.lab.down() {
            eprintln!("lab down: {e:#}");
        }
    }
}

/// A lab spec unique to a test: name `t<id>`, subnet 10.77.<100+id>.0/24, own port range.
pub fn spec(id: u8, nodes: usize) -> LabSpec {
    assert!(
        Path::new("/usr/lib/postgresql/15/bin/postgres").exists() || !in_ci(),
        "PostgreSQL 15 binaries are required in CI"
    );
    let name = format!("t{id}");
    let mut s = LabSpec::new(&name);
    s.nodes = nodes;
    s.subnet = format!("10.77.{}.0/24", 100 + id as u16);
    s.base_port = 26000 + id as u16 * 100;
    s.dir = std::path::PathBuf::from("/var/tmp/pgwarden-test").join(&name);
    if in_ci() && !pgwarden_lab::is_root() {
        panic!("CI runs as root and must use network namespaces");
    }
    s
}

impl TestLab {
    /// Builds the lab and waits until it is healthy. Removes a leftover lab of the same name.
    pub async fn up(spec: LabSpec) -> TestLab {
        match Lab::load(&spec.dir) {
            Ok(old) => {
                let _ = old.down();
            }
            Err(_) => {
                let _ = Lab::purge(&spec.name);
                let _ = std::fs::remove_dir_all(&spec.dir);
            }
        }
        let lab = Lab::create(&spec).expect("create lab");
        let http = lab
            .http_client(Duration::from_secs(120))
            .expect("http client");
        let t = TestLab { lab, http };
        t.lab
            .wait_healthy(Duration::from_secs(120))
            .await
            .expect("lab healthy");
        t
    }

    pub async fn status(&self, node: &str) -> Option<NodeStatus> {
        let url = format!("{}/status", self.lab.health_url(node).ok()?);
        let r = self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Runs SQL with psql inside a node's host, so it reaches that node's PostgreSQL even
    /// while the host is partitioned. Returns psql's output, or its error.
    pub fn psql_in(&self, node: &str, sql: &str) -> Result<String> {
        let argv: Vec<String> = ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let out = self.lab.exec(node, &argv)?.output().context("run psql")?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `PATCH /v1/config` on a node's agent.
    pub async fn patch_config(
        &self,
        node: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .patch(format!(
                "{}/v1/config",
                self.lab.api_url(node).expect("node")
            ))
            .bearer_auth(&self.lab.token)
            .json(&body)
            .send()
            .await
            .expect("PATCH /v1/config");
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    /// The members answering 200 on `/primary` right now.
    pub async fn primaries(&self) -> Vec<String> {
        // All at once, with a short timeout: a stopped or partitioned host must not make one
        // poll last seconds (that would blur the failover times the tests print).
        let mut set = tokio::task::JoinSet::new();
        for n in &self.lab.nodes {
            let url = format!("{}/primary", self.lab.health_url(&n.name).expect("node"));
            let (http, name) = (self.http.clone(), n.name.clone());
            set.spawn(async move {
                let code = http
                    .get(url)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                (name, code == 200)
            });
        }
        let mut out: Vec<String> = set
            .join_all()
            .await
            .into_iter()
            .filter(|(_, p)| *p)
            .map(|(n, _)| n)
            .collect();
        out.sort();
        out
    }

    /// Asserts, every 500 ms for `checks` times, that no member answers 200 on `/primary`.
    pub async fn assert_no_primary(&self, checks: usize) {
        for _ in 0..checks {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let p = self.primaries().await;
            assert!(p.is_empty(), "no member may be primary, but {p:?} is");
        }
    }

    /// Waits until a member other than `old` is the only primary; returns it.
    pub async fn wait_new_primary(&self, old: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.primaries().await;
            if p.len() == 1 && p[0] != old {
                return p[0].clone();
            }
            if Instant::now() >= deadline {
                self.dump_state().await;
                panic!("no new primary other than {old} within {timeout:?} (primaries now: {p:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The status code of a health check (`/primary`, `/replica?lag=1MB`, …).
    pub async fn check(&self, node: &str, method: reqwest::Method, path: &str) -> u16 {
        let url = format!("{}{path}", self.lab.health_url(node).expect("node"));
        self.http
            .request(method, url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// POSTs to the agent API; returns the status code and the JSON body.
    pub async fn api(
        &self,
        node: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}{path}", self.lab.api_url(node).expect("node"));
        let mut req = self.http.post(url).bearer_auth(&self.lab.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("agent API request");
        let code = r.status().as_u16();
        let v = r.json().await.unwrap_or(serde_json::Value::Null);
        (code, v)
    }

    /// GETs from the agent API; the body must be JSON and the call must succeed.
    pub async fn api_get(&self, node: &str, path: &str) -> serde_json::Value {
        let url = format!("{}{path}", self.lab.api_url(node).expect("node"));
        let r = self
            .http
            .get(&url)
            .bearer_auth(&self.lab.token)
            .send()
            .await
            .expect("agent API request");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.expect("JSON body")
    }

    /// Like `api` but the operation must succeed.
    pub async fn op(&self, node: &str, path: &str, body: Option<serde_json::Value>) -> String {
        let (code, v) = self.api(node, path, body).await;
        assert_eq!(code, 200, "{node} {path}: {v}");
        v["message"].as_str().unwrap_or_default().to_string()
    }

    pub async fn sql(&self, node: &str, query: &str) -> Result<Vec<tokio_postgres::Row>> {
        sql(&self.lab.dsn(node)?, query).await
    }

    pub async fn exec(&self, node: &str, statements: &str) -> Result<()> {
        exec(&self.lab.dsn(node)?, statements).await
    }

    /// A member that is a Raft follower with a known leader (waits up to 20 s for one).
    pub async fn raft_follower(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for n in &self.lab.nodes {
                let c = self.status(&n.name).await.and_then(|s| s.consensus);
                if c.is_some_and(|c| c.raft_state == "follower" && c.leader.is_some()) {
                    return n.name.clone();
                }
            }
            assert!(Instant::now() < deadline, "no Raft follower with a leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (20 s at most) until a query's first column on `node` equals `want`.
    async fn wait_value<T>(&self, node: &str, query: &str, want: T)
    where
        T: for<'a> tokio_postgres::types::FromSql<'a> + PartialEq + std::fmt::Display,
    {
        wait_for(
            Duration::from_secs(20),
            &format!("{query} = {want} on {node}"),
            || async {
                self.sql(node, query)
                    .await
                    .is_ok_and(|r| r[0].try_get::<_, T>(0).is_ok_and(|v| v == want))
            },
        )
        .await;
    }

    /// Waits until a query reads `want` as text on `node` (`SHOW work_mem` → `8MB`).
    pub async fn wait_text(&self, node: &str, query: &str, want: &str) {
        self.wait_value(node, query, want.to_string()).await;
    }

    /// Waits until a bigint query returns `want` on `node` (`SELECT count(*) FROM t` → 2).
    pub async fn wait_count(&self, node: &str, query: &str, want: i64) {
        self.wait_value(node, query, want).await;
    }

    /// A single bigint from a query such as `SELECT count(*) FROM t`.
    pub async fn count(&self, node: &str, query: &str) -> i64 {
        let rows = self.sql(node, query).await.expect("query");
        rows[0].get(0)
    }

    /// Waits until every node except `primary` streams from it.
    pub async fn wait_streaming_from(&self, primary: &str, timeout: Duration) {
        let names: Vec<String> = self
            .lab
            .nodes
            .iter()
            .filter(|n| !n.witness)
            .map(|n| n.name.clone())
            .collect();
        let deadline = Instant::now() + timeout;
        let ok = || async {
            for n in &names {
                let st = self.status(n).await;
                let ok = if n == primary {
                    st.is_some_and(|s| s.is_writable_primary())
                } else {
                    st.is_some_and(|s| s.is_streaming() && s.upstream.as_deref() == Some(primary))
                };
                if !ok {
                    return false;
                }
            }
            true
        };
        while !ok().await {
            if Instant::now() > deadline {
                self.dump_state().await;
                panic!(
                    "timed out after {timeout:?} waiting for all replicas streaming from {primary}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts the write probe on every node; stop it with the returned sender.
    pub fn start_probe(
        &self,
        interval: Duration,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<pgwarden_lab::probe::ProbeReport>>,
    ) {
        let targets = self
            .lab
            .nodes
            .iter()
            .filter(|n| !n.witness)
            .map(|n| (n.name.clone(), self.lab.dsn(&n.name).expect("dsn")))
            .collect();
        let cfg = pgwarden_lab::probe::ProbeConfig {
            targets,
            interval,
            write_timeout: Duration::from_secs(1),
            identify: false,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(pgwarden_lab::probe::run(cfg, async move {
            let _ = rx.await;
        }));
        (tx, task)
    }

    /// Prints every node's status summary and its last events: what a failed wait needs to
    /// be understood after the lab is gone.
    pub async fn dump_state(&self) {
        for n in &self.lab.nodes {
            match self.status(&n.name).await {
                Some(s) => eprintln!(
                    "{}: {:?}/{:?} tl={:?} waiting_for={:?} last_error={:?} consensus={:?}",
                    n.name, s.role, s.state, s.timeline, s.waiting_for, s.last_error, s.consensus
                ),
                None => eprintln!("{}: agent not answering", n.name),
            }
            let ev = self.events(&n.name);
            for e in ev.iter().skip(ev.len().saturating_sub(12)) {
                eprintln!("  {} {} {}", e["ts_ms"], e["kind"], e["message"]);
            }
        }
    }

    /// The kinds of the events a node's agent recorded, oldest first.
    pub fn event_kinds(&self, node: &str) -> Vec<String> {
        self.events(node)
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn events(&self, node: &str) -> Vec<serde_json::Value> {
        let n = self.lab.node(node).expect("node");
        std::fs::read_to_string(n.dir.join("state/events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client> {
    let mut cfg: tokio_postgres::Config = dsn.parse().context("parse dsn")?;
    cfg.connect_timeout(Duration::from_secs(3));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect {dsn}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs one statement on a DSN and returns its rows.
pub async fn sql(dsn: &str, query: &str) -> Result<Vec<tokio_postgres::Row>> {
    let client = connect(dsn).await?;
    tokio::time::timeout(Duration::from_secs(30), client.query(query, &[]))
        .await
        .context("query timed out")?
        .with_context(|| format!("run {query:?}"))
}

/// Runs several statements on a DSN.
pub async fn exec(dsn: &str, statements: &str) -> Result<()> {
    let client = connect(dsn).await?;
    tokio::time::timeout(Duration::from_secs(30), client.batch_execute(statements))
        .await
        .context("statements timed out")?
        .with_context(|| format!("run {statements:?}"))
}

/// Polls `f` every 200 ms until it returns true; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a program and returns (exit code, stdout, stderr).
pub fn run(prog: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("run {}", prog.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// A workspace binary next to the test executable (`target/<profile>/<name>`).
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found next to {} (build the workspace first)",
        exe.display()
    );
}

pub fn agent_bin() -> std::path::PathBuf {
    let p = pgwarden_lab::default_agent_bin();
    if !p.is_file() {
        panic!(
            "pgwarden-agent not found at {} (build the workspace first)",
            p.display()
        );
    }
    p
}

/// Asserts a condition on a value, failing with context.
pub fn ensure(cond: bool, msg: &str) -> Result<()> {
    if !cond {
        bail!("{msg}");
    }
    Ok(())
}
