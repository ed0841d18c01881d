//! `pgwarden-agent`: runs on every PostgreSQL node. Reads its configuration, then observes and
//! manages the local PostgreSQL, serving health checks and its API.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pgwarden_agent::{agent, commands, events, http, pg, raft, server_link};
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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The installation's certificate authority and certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Enroll this node with the control plane (pgwarden-server).
    ///
    /// Checks the server's CA against FP, exchanges the join token and a certificate request
    /// for a certificate, and writes <state_dir>/tls/{ca.pem,node.pem,node.key} and
    /// <state_dir>/server.json. Restart the agent afterwards.
    Join {
        /// Configuration file (default: the global --config).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The control plane, https://host:port.
        #[arg(long)]
        server: String,
        /// The one-time join token.
        #[arg(long, env = "PGWARDEN_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The SHA-256 fingerprint of the installation's CA (as printed by the server),
        /// any case, colons optional.
        #[arg(long = "ca-fingerprint", value_name = "FP")]
        ca_fingerprint: String,
        /// Replace an existing enrolled certificate.
        #[arg(long)]
        force: bool,
    },
    /// Rotate this node's certificate with the control plane it enrolled with (the current
    /// certificate authenticates the request). Restart the agent afterwards.
    RenewCert {
        /// Configuration file (default: the global --config).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The lease guard (started by the agent): stops a writable PostgreSQL when the lease
    /// deadline passes while the agent is dead.
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create a CA (`ca.pem`, `ca.key`) in DIR and print its SHA-256 fingerprint.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a certificate for a node or an operator: writes OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// The directory holding the CA.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// An address or DNS name the certificate is valid for (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

fn renew_cmd(config: &Path) -> ExitCode {
    let file = config.display().to_string();
    let cfg = match std::fs::read_to_string(config)
        .map_err(|e| format!("{file}: cannot read: {e}"))
        .and_then(|t| AgentConfig::parse(&t, &file).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let res = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(pgwarden_agent::join::renew(&cfg)));
    match res {
        Ok(fp) => {
            println!(
                "new certificate for {}: SHA-256 fingerprint {fp}",
                cfg.node.name
            );
            println!("restart the agent to use it, then revoke the old one");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn join_cmd(config: &Path, args: pgwarden_agent::join::JoinArgs) -> ExitCode {
    let file = config.display().to_string();
    let cfg = match std::fs::read_to_string(config)
        .map_err(|e| format!("{file}: cannot read: {e}"))
        .and_then(|t| AgentConfig::parse(&t, &file).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(pgwarden_agent::join::join(&cfg, &args)) {
        Ok(j) => {
            println!(
                "enrolled node {} of cluster {} with {}",
                cfg.node.name, cfg.cluster.name, args.server
            );
            println!("certificate SHA-256 fingerprint {}", j.fingerprint);
            println!(
                "wrote {}, {}, {} and {}",
                j.tls.ca_file,
                j.tls.cert_file,
                j.tls.key_file,
                j.server_file.display()
            );
            if cfg.tls.is_some() {
                println!("note: {file} has a [tls] section, which the agent uses instead of the enrolled certificate");
            }
            if cfg.server.is_some() {
                println!("note: {file} has a [server] section, which the agent uses instead of server.json");
            }
            println!("restart the agent to use them");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs_cmd(cmd: CertsCmd) -> ExitCode {
    let res = match cmd {
        CertsCmd::Init { dir } => pgwarden_agent::certs::init(&dir).map(|fp| {
            println!("created {}/ca.pem; SHA-256 fingerprint {fp}", dir.display());
        }),
        CertsCmd::Issue {
            ca_dir,
            name,
            hosts,
            out,
        } => pgwarden_agent::certs::issue(&ca_dir, &name, &hosts, &out).map(|()| {
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    let mut cfg = AgentConfig::parse(&text, &file).map_err(|e| e.to_string())?;
    // Without [tls], the certificate `join` stored in the state directory, if any.
    if cfg.tls.is_none() {
        cfg.tls = pgwarden_agent::join::tls_from_state_dir(Path::new(&cfg.node.state_dir));
    }
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
    if let Some(t) = &cfg.tls {
        for (key, path) in [
            ("tls.ca_file", &t.ca_file),
            ("tls.cert_file", &t.cert_file),
            ("tls.key_file", &t.key_file),
        ] {
            std::fs::metadata(path).map_err(|e| format!("{file}: {key}: {path}: {e}"))?;
        }
    }
    Ok((cfg, s))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Certs { cmd }) => return certs_cmd(cmd),
        Some(Cmd::Join {
            config,
            server,
            token,
            ca_fingerprint,
            force,
        }) => {
            let args = pgwarden_agent::join::JoinArgs {
                server,
                token,
                ca_fingerprint,
                force,
            };
            return join_cmd(config.as_deref().unwrap_or(&cli.config), args);
        }
        Some(Cmd::RenewCert { config }) => {
            return renew_cmd(config.as_deref().unwrap_or(&cli.config));
        }
        Some(Cmd::Guard {
            state_dir,
            data_dir,
        }) => {
            return match pgwarden_agent::guard::run(&state_dir, &data_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {}
    }
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
    // openraft retries an unreachable peer every second and logs each failure; the agent
    // records one event when a peer stops answering instead. RUST_LOG overrides this.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=error",
        )
    });
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
    let witness = cfg.me().witness;
    let (pg, major) = if witness {
        std::fs::create_dir_all(&cfg.node.state_dir)
            .with_context(|| format!("create {}", cfg.node.state_dir))?;
        (None, 0)
    } else {
        let major = match cfg.postgresql.major_version {
            Some(v) => v,
            None => pg::Pg::binary_major(&cfg.postgresql.bin_dir).await?,
        };
        let pg = pg::Pg::new(cfg.clone(), secrets.superuser, secrets.replication, major)?;
        pg.prepare_dirs()?;
        (Some(pg), major)
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let consensus = Arc::new(raft::node::Consensus::start(&cfg, &secrets.token).await?);
    let tls = match &cfg.tls {
        Some(t) => Some(
            pgwarden_agent::tls::acceptor(&t.ca_file, &t.cert_file, &t.key_file)
                .context("set up TLS for the agent API")?,
        ),
        None => {
            tracing::warn!("no [tls] section: the agent API and Raft traffic are plain HTTP (for development only)");
            None
        }
    };
    // A witness carries no endpoints.
    let local = if !witness && (cfg.vip.is_some() || cfg.aws.is_some()) {
        let net = pgwarden_agent::netaddr::Netlink::open()
            .context("netlink for the VIP and EC2 addresses")?;
        Some(Arc::new(pgwarden_agent::endpoints::Local::new(
            net,
            &cfg.node.state_dir,
        )))
    } else {
        None
    };
    let state_dir = Path::new(&cfg.node.state_dir);
    let revoked = pgwarden_agent::tls::Revoked::default();
    revoked.replace(server_link::load_revoked(&server_link::revoked_file(
        state_dir,
    )));
    let (commands, interrupted) = commands::Commands::load(state_dir);
    let shared = Arc::new(agent::Shared {
        local,
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
        lease: pgwarden_agent::lease::LeaseKeeper::new(
            &cfg.node.name,
            &cfg.node.state_dir,
            &cfg.postgresql.data_dir,
        ),
        commands,
        revoked: revoked.clone(),
    });
    if !witness {
        pgwarden_agent::guard::ensure(
            Path::new(&cfg.node.state_dir),
            Path::new(&cfg.postgresql.data_dir),
        )?;
    }
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
        witness,
        "agent starting"
    );
    shared.events.record(
        "agent_started",
        format!("agent {} started", env!("CARGO_PKG_VERSION")),
    );
    for c in interrupted {
        shared.events.record(
            "command_finished",
            format!(
                "command {} ({}) failed: {}",
                c.id,
                c.kind.as_str(),
                c.message
            ),
        );
    }
    match (server_link::target(&cfg), &cfg.tls) {
        (Ok(Some(target)), Some(t)) => {
            tokio::spawn(server_link::run(shared.clone(), target, t.clone()));
        }
        (Ok(Some(target)), None) => tracing::warn!(
            url = %target.url,
            "a control plane is configured but TLS is not: not reporting (run pgwarden-agent join, or add [tls])"
        ),
        (Ok(None), _) => tracing::info!(
            "no [server] section and no server.json in the state directory: not reporting to a control plane"
        ),
        (Err(e), _) => tracing::warn!(
            error = %format!("{e:#}"),
            "cannot tell where the control plane is: not reporting"
        ),
    }
    let agent = match pg {
        Some(pg) => Some(agent::Agent::new(shared.clone(), pg)?),
        None => None,
    };
    let main_loop = {
        let shared = shared.clone();
        async move {
            match agent {
                Some(a) => a.run(rx).await,
                None => pgwarden_agent::witness::run(shared, rx).await,
            }
        }
    };
    let h = axum::serve(health, http::health_router(shared.clone()));
    let a = async {
        match tls {
            Some(acc) => {
                pgwarden_agent::tls::serve(api, acc, http::api_router(shared.clone()), revoked)
                    .await
            }
            None => axum::serve(api, http::api_router(shared.clone()))
                .await
                .map_err(anyhow::Error::from),
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = h => r.context("health server")?,
        r = a => r.context("api server")?,
        _ = main_loop => {},
        _ = pgwarden_agent::lease::run(shared.clone()), if !witness => {},
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; leaving PostgreSQL running"),
        _ = term.recv() => tracing::info!("terminated; leaving PostgreSQL running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn join_takes_its_config_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "pgwarden-agent",
            "join",
            "--config",
            "/tmp/a.toml",
            "--server",
            "https://cp:9443",
            "--token",
            "t",
            "--ca-fingerprint",
            "AB:CD",
        ])
        .unwrap();
        let Some(Cmd::Join { config, force, .. }) = cli.cmd else {
            panic!("join")
        };
        assert_eq!(config, Some(PathBuf::from("/tmp/a.toml")));
        assert!(!force);
        let cli = Cli::try_parse_from([
            "pgwarden-agent",
            "--config",
            "/tmp/b.toml",
            "join",
            "--server",
            "https://cp:9443",
            "--token",
            "t",
            "--ca-fingerprint",
            "AB:CD",
            "--force",
        ])
        .unwrap();
        assert_eq!(cli.config, PathBuf::from("/tmp/b.toml"));
        assert!(matches!(
            cli.cmd,
            Some(Cmd::Join {
                config: None,
                force: true,
                ..
            })
        ));
    }
}
