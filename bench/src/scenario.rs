//! The failover scenarios and one run of a scenario: a fresh three-node lab, the write probe
//! running, a fault on the primary, the wait for a writable primary and a settled cluster,
//! the old primary brought back where the scenario takes it away.

use crate::harness::{self, BenchLab};
use anyhow::{bail, Context, Result};
use pgwarden_lab::probe::ProbeReport;
use pgwarden_lab::Fault;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long the probe writes before the fault, and after the cluster settled.
pub const WARMUP: Duration = Duration::from_secs(2);
pub const COOLDOWN: Duration = Duration::from_secs(2);
/// How long the lab may take to come up healthy.
const LAB_UP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `POST /v1/switchover` on the primary's agent.
    Switchover,
    /// The primary's host dies (link down, every process killed); restarted after failover.
    StopNode,
    /// The primary's host is cut off (nothing in or out); healed after failover.
    Partition,
    /// The primary's agent is killed, PostgreSQL keeps running; restarted after failover.
    KillAgent,
    /// The primary's postmaster is killed: restarted in place, no failover expected.
    KillPostgres,
    /// The primary is cut off for 1 s: no failover expected.
    Hiccup,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Switchover,
        Scenario::StopNode,
        Scenario::Partition,
        Scenario::KillAgent,
        Scenario::KillPostgres,
        Scenario::Hiccup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Switchover => "switchover",
            Scenario::StopNode => "stop-node",
            Scenario::Partition => "partition",
            Scenario::KillAgent => "kill-agent",
            Scenario::KillPostgres => "kill-postgres",
            Scenario::Hiccup => "hiccup",
        }
    }

    /// Whether another node should become the primary.
    pub fn expects_new_primary(self) -> bool {
        matches!(
            self,
            Scenario::Switchover | Scenario::StopNode | Scenario::Partition | Scenario::KillAgent
        )
    }

    /// What gives the old primary back once a new primary writes.
    fn restore(self) -> Option<Fault> {
        match self {
            Scenario::StopNode | Scenario::KillAgent => Some(Fault::StartNode),
            Scenario::Partition => Some(Fault::Heal),
            _ => None,
        }
    }
}

pub struct Options {
    pub interval: Duration,
    pub timeout: Duration,
    pub config_patch: Option<serde_json::Value>,
    /// Give the lab a VIP and write only through it (what a client of the VIP sees).
    pub vip: bool,
}

/// What one run measured. Times are in milliseconds from the fault.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub run: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub primary_before: Option<String>,
    pub primary_after: Option<String>,
    pub primary_changed: Option<bool>,
    pub expected_primary_change: bool,
    /// Fault → a new session on a primary got a transaction ID (the harness's own check,
    /// polled every 100 ms; the old primary excluded where a new one is expected).
    pub writable_after_ms: Option<u64>,
    /// Fault → exactly one writable primary and every replica streaming from it.
    pub settled_after_ms: Option<u64>,
    /// Old primary given back (start-node or heal) → it streams from the new primary.
    pub rejoin_ms: Option<u64>,
    pub max_gap_ms: Option<u64>,
    pub lost_acknowledged: Option<u64>,
    pub split_brain_writes: Option<u64>,
    /// Peak resident set (max of VmRSS and VmHWM samples) per node's agent, KiB.
    pub agent_peak_rss_kib: BTreeMap<String, u64>,
    pub agent_version: Option<String>,
    pub notes: Vec<String>,
    pub probe: Option<ProbeReport>,
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// One run of a scenario on a fresh lab. Never fails: what went wrong is in `error`.
pub async fn run_once(scn: Scenario, run: usize, opts: &Options) -> RunResult {
    let mut r = RunResult {
        scenario: scn.name().to_string(),
        run,
        expected_primary_change: scn.expects_new_primary(),
        ..Default::default()
    };
    let mut spec = harness::spec();
    if opts.vip {
        spec.vip = Some(harness::LAB_VIP.into());
    }
    let (mut lab, primary) = match BenchLab::up(spec, LAB_UP_TIMEOUT).await {
        Ok(x) => x,
        Err(e) => {
            r.error = Some(format!("lab up: {e:#}"));
            return r;
        }
    };
    let configs = lab
        .lab
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.config.clone()))
        .collect();
    let sampler = crate::rss::RssSampler::start(configs);
    let outcome = body(&mut lab, scn, &primary, opts, &mut r).await;
    r.agent_peak_rss_kib = sampler.finish().await;
    if let Err(e) = outcome {
        r.error = Some(format!("{e:#}"));
    }
    if let Err(e) = lab.teardown().await {
        r.notes.push(format!("lab down: {e:#}"));
    }
    r.ok = r.error.is_none();
    r
}

async fn body(
    lab: &mut BenchLab,
    scn: Scenario,
    old: &str,
    opts: &Options,
    r: &mut RunResult,
) -> Result<()> {
    r.primary_before = Some(old.to_string());
    r.agent_version = lab.status(old).await.map(|s| s.agent_version);
    if let Some(patch) = &opts.config_patch {
        lab.patch_config(old, patch).await?;
    }
    let probe = lab.start_probe(opts.interval, opts.vip)?;
    tokio::time::sleep(WARMUP).await;

    let outcome = fault_and_recover(lab, scn, old, opts, r).await;
    if outcome.is_ok() {
        tokio::time::sleep(COOLDOWN).await;
    }
    let report = probe.finish().await;
    match report {
        Ok(rep) => {
            r.max_gap_ms = Some(rep.max_gap_ms);
            r.lost_acknowledged = Some(rep.lost_acknowledged);
            r.split_brain_writes = Some(rep.split_brain_writes);
            if r.primary_after.is_none() {
                r.primary_after.clone_from(&rep.final_primary);
            }
            r.probe = Some(rep);
        }
        Err(e) if outcome.is_err() => r.notes.push(format!("{e:#}")),
        Err(e) => return Err(e),
    }
    if r.primary_after.is_none() {
        r.primary_after = lab.current_primary().await;
    }
    r.primary_changed = r.primary_after.as_ref().map(|p| p != old);
    if outcome.is_ok()
        && r.primary_changed
            .is_some_and(|c| c != scn.expects_new_primary())
    {
        r.notes.push(if scn.expects_new_primary() {
            "the primary did not change".to_string()
        } else {
            "unexpected failover: the primary changed".to_string()
        });
    }
    outcome
}

/// Injects the scenario's fault on `old` and waits for the cluster to recover. On a timeout
/// the old primary is still given back, so the probe can finish and the lab be removed.
async fn fault_and_recover(
    lab: &mut BenchLab,
    scn: Scenario,
    old: &str,
    opts: &Options,
    r: &mut RunResult,
) -> Result<()> {
    let t0 = Instant::now();
    let deadline = || Instant::now() + opts.timeout;
    let fault_deadline = t0 + opts.timeout;
    match scn {
        Scenario::Switchover => {
            let body = serde_json::json!({});
            let (code, v) = lab
                .api(
                    reqwest::Method::POST,
                    old,
                    "/v1/switchover",
                    Some(&body),
                    opts.timeout,
                )
                .await?;
            if !(200..300).contains(&code) {
                bail!(
                    "POST /v1/switchover on {old}: HTTP {code}: {}",
                    harness::short(&v)
                );
            }
        }
        Scenario::StopNode => lab.fault(Fault::StopNode, old)?,
        Scenario::Partition => lab.fault(Fault::Partition, old)?,
        Scenario::KillAgent => lab.fault(Fault::KillAgent, old)?,
        Scenario::KillPostgres => {
            let pid = lab.lab.postmaster_pid(old);
            lab.fault(Fault::KillPostgres, old)?;
            // Poll for a writable primary only once the killed postmaster is gone.
            while pid.is_some_and(pgwarden_lab::pid_alive) && Instant::now() < fault_deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Scenario::Hiccup => {
            lab.fault(Fault::Partition, old)?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            lab.fault(Fault::Heal, old)?;
        }
    }
    let exclude = scn.expects_new_primary().then_some(old);
    let writer = match lab.wait_writable(exclude, fault_deadline).await {
        Ok(w) => w,
        Err(e) => {
            let e = e.context(format!(
                "no primary within {} s of the fault",
                opts.timeout.as_secs()
            ));
            if let Some(f) = scn.restore() {
                if let Err(re) = lab.fault(f, old) {
                    r.notes.push(format!("giving {old} back: {re:#}"));
                }
            }
            return Err(e);
        }
    };
    r.writable_after_ms = Some(ms(t0));
    if let Some(f) = scn.restore() {
        let t1 = Instant::now();
        lab.fault(f, old)?;
        lab.wait_replica_of(old, &writer, deadline())
            .await
            .with_context(|| format!("{old} rejoining"))?;
        r.rejoin_ms = Some(ms(t1));
    }
    let settled = lab
        .wait_settled(deadline())
        .await
        .context("the cluster settling")?;
    r.settled_after_ms = Some(ms(t0));
    r.primary_after = Some(settled);
    Ok(())
}
