//! The benchmark's lab: built fresh for every run, torn down however the run ends, with the
//! waits a failover scenario needs (a node accepting writes, a node streaming again, the whole
//! cluster settled) returning errors instead of panicking, so one bad run never stops the rest.

use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::status::NodeStatus;
use pgwarden_lab::probe::{ProbeConfig, ProbeReport};
use pgwarden_lab::{Fault, Lab, LabSpec};
use std::path::Path;
use std::time::{Duration, Instant};

/// The lab's name, subnet and directory: distinct from the demo (`lab`, 10.77.0.0/24) and from
/// the tests (`t<id>`, 10.77.100+.0/24).
pub const LAB_NAME: &str = "bench";
pub const LAB_SUBNET: &str = "10.77.90.0/24";
/// The VIP of `--vip` runs.
pub const LAB_VIP: &str = "10.77.90.100/24";

pub fn spec() -> LabSpec {
    let mut s = LabSpec::new(LAB_NAME);
    s.nodes = 3;
    s.subnet = LAB_SUBNET.into();
    s
}

/// A lab owned by one benchmark run. `teardown` removes it; dropping it does the same as a
/// last resort (a panic or Ctrl-C in the middle of a run).
pub struct BenchLab {
    pub lab: Lab,
    http: reqwest::Client,
    removed: bool,
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if !self.removed {
            self.removed = true;
            if let Err(e) = tokio::task::block_in_place(|| self.lab.down()) {
                eprintln!("bench: lab down: {e:#}");
            }
        }
    }
}

impl BenchLab {
    /// Removes what an earlier, interrupted benchmark left, creates the lab and waits until
    /// it is healthy. Returns the lab and its primary.
    pub async fn up(spec: LabSpec, timeout: Duration) -> Result<(BenchLab, String)> {
        let created = tokio::task::spawn_blocking(move || {
            remove_leftover(&spec);
            let r = Lab::create(&spec);
            if r.is_err() {
                // `create` saves its state early: remove whatever it got to.
                remove_leftover(&spec);
            }
            r
        })
        .await
        .context("lab creation task")?
        .context("create the lab")?;
        let http = match created.http_client(Duration::from_secs(120)) {
            Ok(h) => h,
            Err(e) => {
                let _ = tokio::task::block_in_place(|| created.down());
                return Err(e.context("API client"));
            }
        };
        let mut lab = BenchLab {
            lab: created,
            http,
            removed: false,
        };
        match lab.lab.wait_healthy(timeout).await {
            Ok(primary) => Ok((lab, primary)),
            Err(e) => {
                let _ = lab.teardown().await;
                Err(e)
            }
        }
    }

    /// Stops every process of the lab and removes its hosts, links and directory.
    pub async fn teardown(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        tokio::task::block_in_place(|| self.lab.down())
    }

    pub fn fault(&mut self, fault: Fault, node: &str) -> Result<()> {
        tokio::task::block_in_place(|| self.lab.fault(fault, node))
            .with_context(|| format!("fault {fault:?} on {node}"))
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

    /// A call to the agent API (bearer token, mutual TLS); the status code and JSON body.
    pub async fn api(
        &self,
        method: reqwest::Method,
        node: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<(u16, serde_json::Value)> {
        let url = format!("{}{path}", self.lab.api_url(node)?);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.lab.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let code = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((code, v))
    }

    /// PATCHes the cluster's dynamic configuration through `node`'s agent, then waits until
    /// every agent serves that version and the cluster is healthy again.
    pub async fn patch_config(&self, node: &str, patch: &serde_json::Value) -> Result<()> {
        let (code, v) = self
            .api(
                reqwest::Method::PATCH,
                node,
                "/v1/config",
                Some(patch),
                Duration::from_secs(30),
            )
            .await?;
        if !(200..300).contains(&code) {
            bail!("PATCH /v1/config on {node}: HTTP {code}: {}", short(&v));
        }
        if let Some(version) = v["config"]["version"].as_u64() {
            let deadline = Instant::now() + Duration::from_secs(30);
            for n in self.node_names() {
                loop {
                    let got = self
                        .api(
                            reqwest::Method::GET,
                            &n,
                            "/v1/config",
                            None,
                            Duration::from_secs(5),
                        )
                        .await
                        .ok()
                        .and_then(|(_, v)| v["config"]["version"].as_u64());
                    if got.is_some_and(|g| g >= version) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("{n} did not get configuration version {version} within 30 s");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // The agents write and reload the files in their next loop.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.lab
            .wait_healthy(Duration::from_secs(60))
            .await
            .context("after the configuration patch")?;
        Ok(())
    }

    pub fn node_names(&self) -> Vec<String> {
        self.lab.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Whether a client can open a new session on `node` and get a transaction ID (which
    /// only a server that accepts writes hands out).
    pub async fn accepts_writes(dsn: String) -> bool {
        let attempt = async move {
            let mut cfg: tokio_postgres::Config = dsn.parse().ok()?;
            cfg.connect_timeout(Duration::from_secs(1));
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
            let conn = tokio::spawn(conn);
            let ok = client.query_one("SELECT txid_current()", &[]).await.is_ok();
            drop(client);
            let _ = conn.await;
            Some(ok)
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(1500), attempt).await,
            Ok(Some(true))
        )
    }

    /// Polls every node except `exclude` (every 100 ms, in parallel) until one accepts a
    /// write; returns its name.
    pub async fn wait_writable(&self, exclude: Option<&str>, deadline: Instant) -> Result<String> {
        let targets: Vec<(String, String)> = self
            .lab
            .nodes
            .iter()
            .filter(|n| Some(n.name.as_str()) != exclude)
            .filter_map(|n| Some((n.name.clone(), self.lab.dsn(&n.name).ok()?)))
            .collect();
        loop {
            let mut set = tokio::task::JoinSet::new();
            for (name, dsn) in targets.clone() {
                set.spawn(async move { (name, BenchLab::accepts_writes(dsn).await) });
            }
            let mut found = None;
            while let Some(r) = set.join_next().await {
                if let Ok((name, true)) = r {
                    found.get_or_insert(name);
                }
            }
            if let Some(n) = found {
                return Ok(n);
            }
            if Instant::now() > deadline {
                let who = match exclude {
                    Some(x) => format!("no node other than {x}"),
                    None => "no node".to_string(),
                };
                bail!("{who} accepted writes in time: {}", self.summary().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `node` is a replica streaming from `primary`.
    pub async fn wait_replica_of(
        &self,
        node: &str,
        primary: &str,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            let st = self.status(node).await;
            if st
                .as_ref()
                .is_some_and(|s| s.is_streaming() && s.upstream.as_deref() == Some(primary))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{node} did not stream from {primary} in time: {}",
                    self.summary().await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until exactly one node is a writable primary and every other streams from it.
    pub async fn wait_settled(&self, deadline: Instant) -> Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lab.wait_healthy(left).await
    }

    /// The single writable primary by the agents' statuses, if there is exactly one.
    pub async fn current_primary(&self) -> Option<String> {
        let st = self.lab.statuses().await;
        let p: Vec<&String> = st
            .iter()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_writable_primary()))
            .map(|(n, _)| n)
            .collect();
        (p.len() == 1).then(|| p[0].clone())
    }

    /// One line: every node's role, state, what it waits for and its last error.
    pub async fn summary(&self) -> String {
        self.lab
            .statuses()
            .await
            .iter()
            .map(|(n, s)| match s {
                Some(s) => {
                    let mut t = format!("{n} {:?}/{:?}", s.role, s.state);
                    if let Some(u) = &s.upstream {
                        t.push_str(&format!(" upstream={u}"));
                    }
                    if let Some(w) = &s.waiting_for {
                        t.push_str(&format!(" waiting_for={w:?}"));
                    }
                    if let Some(e) = &s.last_error {
                        t.push_str(&format!(" last_error={e:?}"));
                    }
                    t
                }
                None => format!("{n} agent not answering"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Starts the write probe on every node of the lab, or (`vip`) only through the VIP,
    /// naming the server that answered each write. The root namespace is on the lab's bridge,
    /// so it reaches the VIP like any client of that subnet (gratuitous ARP included).
    pub fn start_probe(&self, interval: Duration, vip: bool) -> Result<Probe> {
        let targets = if vip {
            let ip = LAB_VIP.split('/').next().unwrap_or_default();
            vec![(
                "vip".to_string(),
                format!(
                    "postgresql://postgres:{}@{ip}:5432/postgres",
                    self.lab.superuser_password
                ),
            )]
        } else {
            self.lab
                .nodes
                .iter()
                .map(|n| Ok((n.name.clone(), self.lab.dsn(&n.name)?)))
                .collect::<Result<Vec<_>>>()?
        };
        let cfg = ProbeConfig {
            targets,
            interval,
            write_timeout: Duration::from_secs(1),
            identify: vip,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(pgwarden_lab::probe::run(cfg, async move {
            let _ = rx.await;
        }));
        Ok(Probe {
            stop: Some(tx),
            task: Some(task),
        })
    }
}

/// A running write probe; aborted if dropped before `finish`.
pub struct Probe {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<ProbeReport>>>,
}

impl Probe {
    /// Stops writing and returns the report (the probe then checks the final primary's table,
    /// waiting up to a minute for a writable one).
    pub async fn finish(mut self) -> Result<ProbeReport> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self
            .task
            .take()
            .ok_or_else(|| anyhow!("probe already finished"))?;
        let abort = task.abort_handle();
        match tokio::time::timeout(Duration::from_secs(90), task).await {
            Ok(r) => r.context("probe task")?.context("write probe"),
            Err(_) => {
                abort.abort();
                bail!("the write probe did not finish within 90 s")
            }
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A short rendering of an API body for error messages.
pub fn short(v: &serde_json::Value) -> String {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        // Problem details (`detail`, `title`) or an operation result (`message`).
        serde_json::Value::Object(o) => ["detail", "error", "message", "title"]
            .iter()
            .find_map(|k| o.get(*k).and_then(|m| m.as_str()))
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string()),
        _ => v.to_string(),
    };
    let s = s.trim();
    if s.is_empty() {
        "(empty body)".to_string()
    } else if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Removes a lab of the benchmark's name that an interrupted run left behind. Only processes
/// that provably belong to it are stopped: those in its namespaces, and a recorded agent or
/// postmaster PID only while that process still runs with this lab's files.
fn remove_leftover(spec: &LabSpec) {
    match Lab::load(&spec.dir) {
        Ok(mut old) => {
            for n in &mut old.nodes {
                if n.agent_pid.is_some_and(|p| !cmdline_mentions(p, &n.config)) {
                    n.agent_pid = None;
                }
                let pidfile = n.data_dir.join("postmaster.pid");
                let stale = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
                    .is_some_and(|p| !cmdline_mentions(p, &n.data_dir));
                if stale {
                    let _ = std::fs::remove_file(&pidfile);
                }
            }
            if let Err(e) = old.down() {
                eprintln!("bench: removing the previous lab: {e:#}");
            }
        }
        Err(_) => {
            let _ = Lab::purge(&spec.name);
            let _ = std::fs::remove_dir_all(&spec.dir);
        }
    }
}

/// Whether process `pid`'s command line contains `path` as one argument.
pub fn cmdline_mentions(pid: i32, path: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    raw.split(|b| *b == 0).any(|a| a == want)
}
