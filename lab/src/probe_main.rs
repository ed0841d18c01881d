//! `pgwarden-probe`: writes through every node of a lab (or given DSNs) and reports the write
//! gap, lost acknowledged writes and split-brain writes as JSON.

use anyhow::{Context, Result};
use clap::Parser;
use pgwarden_lab::probe::{run, ProbeConfig};
use pgwarden_lab::Lab;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pgwarden-probe",
    version,
    about = "Write probe: gaps, lost writes, split brain"
)]
struct Cli {
    /// Take the nodes from this lab.
    #[arg(long, default_value = "lab")]
    lab: String,
    /// Or give `name=DSN` targets explicitly (repeatable).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Milliseconds between writes.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// How long to run, in seconds (Ctrl-C or SIGTERM stops earlier).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Attribute each write to the server that answered (for one target such as a VIP).
    #[arg(long)]
    identify: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let targets = if cli.targets.is_empty() {
        let lab = Lab::load(&PathBuf::from("/var/tmp/pgwarden-lab").join(&cli.lab))?;
        lab.nodes
            .iter()
            .map(|n| Ok((n.name.clone(), lab.dsn(&n.name)?)))
            .collect::<Result<Vec<_>>>()?
    } else {
        cli.targets
            .iter()
            .map(|t| {
                t.split_once('=')
                    .map(|(n, d)| (n.to_string(), d.to_string()))
                    .context("--target takes name=DSN")
            })
            .collect::<Result<Vec<_>>>()?
    };
    let cfg = ProbeConfig {
        targets,
        interval: Duration::from_millis(cli.interval_ms),
        write_timeout: Duration::from_secs(1),
        identify: cli.identify,
    };
    let secs = cli.seconds;
    let stop = async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => { s.recv().await; }
                    Err(_) => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    let report = run(cfg, stop).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
