//! `pgwarden-agent`: runs on every PostgreSQL node. Reads its configuration, then observes and
//! manages the local PostgreSQL, serving health checks and its API.

use anyhow::{Context, Result};
use clap::Parser;
use pgwarden_agent::{agent, events, http, pg, raft};
use pgwarden_core::config::{AgentConfig, LogFormat};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

#[derive(Parser, Debug)]
#[command(
    name = "pgwarden-agent",
    version,
    about = "pgwarden agent: keeps the local PostgreSQL highly available"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/pgwarden/agent.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 when valid, 2 when not).
    #[arg(long)]
    check_config: bool,
}

/// Reads a secret given inline or as a file (first line).
fn secret(inline: &Option<String>, file: &Option<String>, key: &str) -> Result<String> {
    if let Some(v) = inline {
        return Ok(v.clone());
    }
    let f = file.as_deref().unwrap_or_default();
    let text = std::fs::read_to_string(f).with_context(|| format!("{key}_file: read {f}"))?;
    let v = text.lines().next().unwrap_or("").trim().to_string();
    if v.is_empty() {
        anyhow::bail!("{key}_file: {f} is empty");
    }
    Ok(v)
}

struct Secrets {
    token: String,
    superuser: String,
    replication: String,
}

fn load(path: &Path) -> Result<(AgentConfig, Secrets), String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    let cfg = AgentConfig::parse(&text, &file).map_err(|e| e.to_string())?;
    let pg = &cfg.postgresql;
    let s = (|| -> Result<Secrets> {
        Ok(Secrets {
            token: secret(&cfg.api.token, &cfg.api.token_file, "api.token")?,
            superuser: secret(
                &pg.superuser_password,
                &pg.superuser_password_file,
                "postgresql.superuser_password",
            )?,
            replication: secret(
                &pg.replication_password,
                &pg.replication_password_file,
                "postgresql.replication_password",
            )?,
        })
    })()
    .map_err(|e| format!("{file}: {e:#}"))?;
    Ok((cfg, s))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cfg, secrets) = match load(&cli.config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "{}: configuration is valid (node {}, cluster {}, {} members)",
            cli.config.display(),
            cfg.node.name,
            cfg.cluster.name,
            cfg.cluster.members.len()
        );
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.node.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, secrets)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "agent stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: AgentConfig, secrets: Secrets) -> Result<()> {
    let cfg = Arc::new(cfg);
    let major = match cfg.postgresql.major_version {
        Some(v) => v,
        None => pg::Pg::binary_major(&cfg.postgresql.bin_dir).await?,
    };
    let pg = pg::Pg::new(cfg.clone(), secrets.superuser, secrets.replication, major)?;
    pg.prepare_dirs()?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let consensus = Arc::new(raft::node::Consensus::start(&cfg, &secrets.token).await?);
    let shared = Arc::new(agent::Shared {
        postmaster_pid: std::sync::atomic::AtomicI32::new(0),
        peers: RwLock::new(Vec::new()),
        consensus,
        cfg: cfg.clone(),
        status: RwLock::new(Default::default()),
        events: events::EventLog::new(
            &cfg.cluster.name,
            &cfg.node.name,
            PathBuf::from(&cfg.node.state_dir).join("events.jsonl"),
        ),
        token: secrets.token,
        ops: tx,
    });
    let health = tokio::net::TcpListener::bind(cfg.health_listen())
        .await
        .with_context(|| format!("listen on {} (health)", cfg.health_listen()))?;
    let api = tokio::net::TcpListener::bind(cfg.api_listen())
        .await
        .with_context(|| format!("listen on {} (api)", cfg.api_listen()))?;
    tracing::info!(
        node = %cfg.node.name,
        cluster = %cfg.cluster.name,
        health = %cfg.health_listen(),
        api = %cfg.api_listen(),
        postgres_major = major,
        "agent starting"
    );
    shared.events.record(
        "agent_started",
        format!("agent {} started", env!("CARGO_PKG_VERSION")),
    );
    let agent = agent::Agent::new(shared.clone(), pg)?;
    let h = axum::serve(health, http::health_router(shared.clone()));
    let a = axum::serve(api, http::api_router(shared.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = h => r.context("health server")?,
        r = a => r.context("api server")?,
        _ = agent.run(rx) => {},
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; leaving PostgreSQL running"),
        _ = term.recv() => tracing::info!("terminated; leaving PostgreSQL running"),
    }
    Ok(())
}
