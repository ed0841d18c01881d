//! `pgwarden-server`: `init` prepares an installation, without a subcommand it serves.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgwarden_core::server_config::ServerConfig;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pgwarden-server",
    version,
    about = "The pgwarden control plane"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "/etc/pgwarden/server.toml")]
    config: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the CA, the server certificate, the store's schema and the first admin user
    /// (printed once). Keeps whatever already exists.
    Init {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a one-time join token directly in the store (for bootstrapping before any API
    /// token is at hand; `pgwardenctl token create` does the same through the API).
    JoinToken {
        #[arg(long)]
        cluster: String,
        /// Lifetime, e.g. `1h`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
}

fn load(path: &str) -> anyhow::Result<ServerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    Ok(ServerConfig::parse(&text, path)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Openapi) = cli.cmd {
        println!("{}", pgwarden_server::api::openapi_text());
        return ExitCode::SUCCESS;
    }
    let cfg = match load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgwarden-server: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    if cfg.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgwarden-server: start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Init { json }) => {
                let out = pgwarden_server::init(&cfg).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!("CA: {} (fingerprint {})", out.ca_file, out.ca_fingerprint);
                    match (&out.admin_user, &out.admin_password, &out.admin_token) {
                        (Some(u), Some(p), Some(t)) => {
                            println!("first user: {u}, password {p}");
                            println!("API token for {u} (shown once): {t}");
                        }
                        _ => println!("users exist already: none created"),
                    }
                }
                Ok(())
            }
            Some(Cmd::JoinToken { cluster, ttl, json }) => {
                let ttl = pgwarden_core::duration::parse_duration(&ttl)
                    .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
                let out = pgwarden_server::local_join_token(&cfg, &cluster, ttl).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!("join token for cluster {cluster} (usable once): {}", out.token);
                    println!(
                        "pgwarden-agent join --server https://<this server>:<port> --token {} --ca-fingerprint {}",
                        out.token, out.ca_fingerprint
                    );
                }
                Ok(())
            }
            Some(Cmd::Openapi) => Ok(()),
            None => {
                let running = pgwarden_server::start(cfg).await?;
                tokio::select! {
                    r = running.task => r?,
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            }
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgwarden-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
