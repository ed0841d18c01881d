//! `pgwardenctl`: the command line for pgwarden. Today it talks to any agent's API; the
//! control-plane work adds the server as its default target.

mod list;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pgwarden_core::api::ClusterView;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "pgwardenctl", version, about = "Operate pgwarden clusters")]
struct Cli {
    /// An agent's API URL.
    #[arg(
        long,
        global = true,
        env = "PGWARDEN_AGENT",
        default_value = "http://127.0.0.1:8443"
    )]
    agent: String,
    /// The agent API's bearer token.
    #[arg(long, global = true, env = "PGWARDEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The installation's CA certificate (PEM), to verify an https:// agent.
    #[arg(long, global = true, env = "PGWARDEN_CA")]
    ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) signed by the installation's CA, with --key.
    #[arg(long, global = true, env = "PGWARDEN_CERT", requires = "key")]
    cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "PGWARDEN_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every member of the cluster: role, state, timeline, lag.
    List,
}

fn client(cli: &Cli) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = &cli.ca {
        let pem = std::fs::read(ca).with_context(|| format!("read --ca {}", ca.display()))?;
        b = b
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("parse --ca")?);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        let mut ident =
            std::fs::read(cert).with_context(|| format!("read --cert {}", cert.display()))?;
        ident.extend(std::fs::read(key).with_context(|| format!("read --key {}", key.display()))?);
        b = b.identity(reqwest::Identity::from_pem(&ident).context("parse --cert/--key")?);
    }
    b.build().context("build the HTTP client")
}

async fn get_view(cli: &Cli) -> Result<ClusterView> {
    let Some(token) = &cli.token else {
        bail!("a token is required: --token or PGWARDEN_TOKEN");
    };
    let url = format!("{}/v1/cluster", cli.agent.trim_end_matches('/'));
    let r = client(cli)?
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !r.status().is_success() {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {body}");
    }
    r.json().await.with_context(|| format!("read {url}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::List => get_view(&cli).await.and_then(|v| {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list::render(&v));
            }
            Ok(())
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
