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

async fn get_view(cli: &Cli) -> Result<ClusterView> {
    let Some(token) = &cli.token else {
        bail!("a token is required: --token or PGWARDEN_TOKEN");
    };
    let url = format!("{}/v1/cluster", cli.agent.trim_end_matches('/'));
    let r = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?
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
