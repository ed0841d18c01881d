//! The write probe: writes a sequence number every `interval` to every node at once and
//! reports what a client saw — the longest gap between acknowledged writes, acknowledged writes
//! that the final primary does not have (lost), and writes acknowledged by two servers (two
//! writable primaries at the same moment). Tests assert on it; benchmarks print it.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// `(node name, DSN)` of every server a write could land on.
    pub targets: Vec<(String, String)>,
    pub interval: Duration,
    /// How long one write may take before it counts as failed.
    pub write_timeout: Duration,
    /// Attribute each write to the server that answered (its `cluster_name`), not to the
    /// target: for a single target such as a VIP, which server was behind it.
    pub identify: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeReport {
    pub duration_ms: u64,
    pub attempted: u64,
    pub acknowledged: u64,
    /// The longest time between two acknowledged writes.
    pub max_gap_ms: u64,
    /// Acknowledged writes (by a node) that the final primary does not have as written by it.
    pub lost_acknowledged: u64,
    pub lost_sample: Vec<i64>,
    /// Sequence numbers acknowledged by more than one server.
    pub split_brain_writes: u64,
    pub split_brain_sample: Vec<(i64, Vec<String>)>,
    /// Acknowledged writes per node.
    pub per_node: BTreeMap<String, u64>,
    /// The node that held the final data.
    pub final_primary: Option<String>,
    /// `(first sequence number, node)` each time another node acknowledged than the one
    /// before (in sequence order): with a VIP, every move of the writable endpoint.
    pub switches: Vec<(i64, String)>,
}

#[derive(Default)]
struct Log {
    /// seq → nodes that acknowledged it
    acks: BTreeMap<i64, Vec<String>>,
    /// acknowledgement times, ms since start
    ack_times: Vec<u64>,
    attempted: u64,
}

async fn connect(dsn: &str, timeout: Duration) -> Result<Client> {
    let mut cfg: tokio_postgres::Config = dsn.parse().context("parse DSN")?;
    cfg.connect_timeout(timeout);
    let (client, conn) = tokio::time::timeout(timeout, cfg.connect(NoTls))
        .await
        .context("connect timed out")??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Finds the server that accepts writes and creates the probe's table there.
async fn setup(cfg: &ProbeConfig) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (_, dsn) in &cfg.targets {
            if let Ok(c) = connect(dsn, cfg.write_timeout).await {
                let ok = c
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS pgwarden_probe (seq bigint PRIMARY KEY, node text NOT NULL, at timestamptz NOT NULL DEFAULT now()); TRUNCATE pgwarden_probe",
                    )
                    .await;
                if ok.is_ok() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no server accepted writes for a minute");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the probe until `stop` resolves, then checks the final primary's table.
pub async fn run(
    cfg: ProbeConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ProbeReport> {
    setup(&cfg).await?;
    let log = Arc::new(Mutex::new(Log::default()));
    let start = Instant::now();
    let (tx, _) = tokio::sync::broadcast::channel::<i64>(1024);
    let mut tasks = Vec::new();
    for (name, dsn) in cfg.targets.clone() {
        let mut rx = tx.subscribe();
        let log = log.clone();
        let timeout = cfg.write_timeout;
        let identify = cfg.identify;
        tasks.push(tokio::spawn(async move {
            let mut client: Option<Client> = None;
            while let Ok(seq) = rx.recv().await {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = connect(&dsn, timeout).await.ok();
                }
                let Some(c) = &client else { continue };
                let sql = if identify {
                    "INSERT INTO pgwarden_probe (seq, node) VALUES ($1, split_part(current_setting('cluster_name'), '/', 2)) RETURNING node"
                } else {
                    "INSERT INTO pgwarden_probe (seq, node) VALUES ($1, $2) RETURNING coalesce(inet_server_addr()::text, 'local')"
                };
                let res = if identify {
                    tokio::time::timeout(timeout, c.query_opt(sql, &[&seq])).await
                } else {
                    tokio::time::timeout(timeout, c.query_opt(sql, &[&seq, &name])).await
                };
                match res {
                    // Counted only when the server returned the inserted row's proof (its own
                    // address or name): an acknowledgement the client actually received.
                    Ok(Ok(Some(row))) => {
                        let proof: String = row.get(0);
                        if std::env::var("PGWARDEN_PROBE_DEBUG").is_ok() {
                            eprintln!(
                                "probe: seq {seq} acknowledged by {name} ({proof}) after {} ms",
                                start.elapsed().as_millis()
                            );
                        }
                        let who = if identify { proof } else { name.clone() };
                        let at = start.elapsed().as_millis() as u64;
                        if let Ok(mut l) = log.lock() {
                            l.acks.entry(seq).or_default().push(who);
                            l.ack_times.push(at);
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {}
                    Err(_) => client = None, // timed out: the connection may be dead
                }
            }
        }));
    }
    let ticker = async {
        let mut seq = 0i64;
        let mut iv = tokio::time::interval(cfg.interval);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            iv.tick().await;
            seq += 1;
            if let Ok(mut l) = log.lock() {
                l.attempted += 1;
            }
            let _ = tx.send(seq);
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = ticker => {}
    }
    drop(tx);
    for t in tasks {
        let _ = tokio::time::timeout(cfg.write_timeout * 2, t).await;
    }
    let duration_ms = start.elapsed().as_millis() as u64;
    let (acks, mut times, attempted) = {
        let l = log
            .lock()
            .map_err(|_| anyhow::anyhow!("probe log poisoned"))?;
        (l.acks.clone(), l.ack_times.clone(), l.attempted)
    };
    times.sort();
    let mut max_gap = times.first().copied().unwrap_or(duration_ms);
    for w in times.windows(2) {
        max_gap = max_gap.max(w[1] - w[0]);
    }
    max_gap = max_gap.max(duration_ms.saturating_sub(times.last().copied().unwrap_or(0)));
    let mut report = ProbeReport {
        duration_ms,
        attempted,
        acknowledged: acks.len() as u64,
        max_gap_ms: max_gap,
        ..Default::default()
    };
    for (seq, nodes) in &acks {
        for n in nodes {
            *report.per_node.entry(n.clone()).or_default() += 1;
        }
        if let Some(n) = nodes.first() {
            if report.switches.last().is_none_or(|(_, last)| last != n) {
                report.switches.push((*seq, n.clone()));
            }
        }
        if nodes.len() > 1 {
            report.split_brain_writes += 1;
            if report.split_brain_sample.len() < 10 {
                report.split_brain_sample.push((*seq, nodes.clone()));
            }
        }
    }
    // The final primary's table: every acknowledged write must be there.
    let (primary, present) = final_rows(&cfg).await?;
    report.final_primary = Some(primary);
    // A write is kept only if the final table has that number written by that node.
    for (seq, nodes) in &acks {
        for n in nodes {
            if !present.contains(&(*seq, n.clone())) {
                report.lost_acknowledged += 1;
                if report.lost_sample.len() < 20 {
                    report.lost_sample.push(*seq);
                }
            }
        }
    }
    Ok(report)
}

async fn final_rows(cfg: &ProbeConfig) -> Result<(String, BTreeSet<(i64, String)>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (name, dsn) in &cfg.targets {
            let Ok(c) = connect(dsn, cfg.write_timeout).await else {
                continue;
            };
            let writable = c
                .query_one("SELECT NOT pg_is_in_recovery()", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false);
            if writable {
                let rows = c
                    .query("SELECT seq, node FROM pgwarden_probe", &[])
                    .await
                    .context("read the probe table")?;
                let present = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                return Ok((name.clone(), present));
            }
        }
        if Instant::now() > deadline {
            bail!("no writable primary to check the probe's writes against");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
