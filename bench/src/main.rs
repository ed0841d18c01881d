//! `failover`: runs failover scenarios on lab clusters with the write probe running and prints
//! what a client saw (longest write gap, lost acknowledged writes, split-brain writes), how long
//! the cluster took to recover, and the agents' memory. Figures, not assertions: a run that
//! fails is reported and the benchmark goes on. See bench/README.md.

mod harness;
mod report;
mod rss;
mod scenario;

use anyhow::{bail, Context, Result};
use clap::Parser;
use scenario::{Options, RunResult, Scenario};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "failover",
    about = "Failover benchmark: write gaps, lost and split-brain writes, recovery times, agent memory"
)]
struct Cli {
    /// Runs per scenario (each on a fresh three-node lab).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A scenario to run (repeatable; default: all, in this order).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Milliseconds between the write probe's writes.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// A JSON body PATCHed to /v1/config on the primary's agent before each run's probe starts.
    #[arg(long, value_name = "FILE")]
    config_patch: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Seconds each wait may take (a primary after the fault, the old primary rejoining, the
    /// cluster settling) before the run counts as failed.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Give the lab a VIP (10.77.90.100) and write only through it.
    #[arg(long)]
    vip: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if !pgwarden_lab::is_root() {
        bail!("the failover benchmark needs root: its hosts are network namespaces");
    }
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if cli.interval_ms == 0 {
        bail!("--interval-ms must be at least 1");
    }
    let agent_bin = pgwarden_lab::default_agent_bin();
    if !agent_bin.is_file() {
        bail!(
            "pgwarden-agent not found at {} (build it with `cargo build --release -p pgwarden-agent`, or set PGWARDEN_AGENT_BIN)",
            agent_bin.display()
        );
    }
    let config_patch = match &cli.config_patch {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", f.display()))?;
            Some(v)
        }
        None => None,
    };
    let scenarios: Vec<Scenario> = if cli.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        let mut s = Vec::new();
        for x in &cli.scenarios {
            if !s.contains(x) {
                s.push(*x);
            }
        }
        s
    };
    let opts = Options {
        interval: Duration::from_millis(cli.interval_ms),
        timeout: Duration::from_secs(cli.timeout_secs),
        config_patch,
        vip: cli.vip,
    };
    let settings = report::Settings {
        runs: cli.runs,
        scenarios: scenarios.iter().map(|s| s.name().to_string()).collect(),
        interval_ms: cli.interval_ms,
        timeout_secs: cli.timeout_secs,
        warmup_ms: scenario::WARMUP.as_millis() as u64,
        cooldown_ms: scenario::COOLDOWN.as_millis() as u64,
        nodes: harness::spec().nodes,
        loop_wait: harness::spec().loop_wait,
        lab: format!("{} {}", harness::LAB_NAME, harness::LAB_SUBNET),
        agent_bin: agent_bin.display().to_string(),
        config_patch: opts.config_patch.clone(),
        vip: opts.vip,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    eprintln!(
        "failover benchmark: {} × {} run(s), probe every {} ms, agent {}",
        settings.scenarios.join(", "),
        cli.runs,
        cli.interval_ms,
        settings.agent_bin
    );

    let mut results: Vec<RunResult> = Vec::new();
    let all = async {
        for &scn in &scenarios {
            for run in 1..=cli.runs {
                eprintln!("[{} {run}/{}] starting", scn.name(), cli.runs);
                let r = scenario::run_once(scn, run, &opts).await;
                println!("{}", report::run_line(&r));
                results.push(r);
            }
        }
    };
    let interrupted = tokio::select! {
        _ = all => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        // The run in progress was dropped with its lab, which removed itself.
        eprintln!("interrupted: results so far");
    }

    let out = report::Output::new(settings, &scenarios, results, interrupted);
    println!();
    print!("{}", report::table(&out));
    let json = serde_json::to_string(&out)?;
    println!("JSON {json}");
    if let Some(f) = &cli.json {
        std::fs::write(f, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("write {}", f.display()))?;
        eprintln!("results written to {}", f.display());
    }
    if interrupted {
        std::process::exit(130);
    }
    Ok(())
}
