//! `pgwardenctl`: the command line for pgwarden. Today it talks to any agent's API; the
//! control-plane work adds the server as its default target.

mod editconfig;
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
    /// Maintenance mode on: no automatic failover (committed to the agents' replicated log).
    Pause,
    /// Maintenance mode off.
    Resume,
    /// The cluster's dynamic configuration.
    ShowConfig,
    /// Edit the dynamic configuration in $EDITOR, review the diff, apply it to every node.
    EditConfig {
        /// Apply without asking.
        #[arg(long)]
        force: bool,
    },
    /// Restart PostgreSQL on members: one by name, or every member with --pending.
    Restart {
        member: Option<String>,
        /// Only (all) members with a parameter change pending a restart.
        #[arg(long)]
        pending: bool,
    },
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

/// Sends a request to an agent's API and returns the JSON answer, or the problem's detail.
async fn call(
    cli: &Cli,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let Some(token) = &cli.token else {
        bail!("a token is required: --token or PGWARDEN_TOKEN");
    };
    let mut req = client(cli)?
        .request(method.clone(), url)
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(600));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        let detail = v["detail"].as_str().unwrap_or("");
        match v["field"].as_str() {
            Some(f) => bail!("{method} {url}: {status}: {f}: {detail}"),
            None => bail!("{method} {url}: {status}: {detail}"),
        }
    }
    Ok(v)
}

fn agent_url(cli: &Cli, path: &str) -> String {
    format!("{}{path}", cli.agent.trim_end_matches('/'))
}

/// A member's API URL, with the scheme of `--agent`.
fn member_url(cli: &Cli, m: &pgwarden_core::api::MemberView, path: &str) -> String {
    let scheme = if cli.agent.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}:{}{path}", m.host, m.api_port)
}

fn print(cli: &Cli, v: &serde_json::Value, text: impl FnOnce() -> String) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

async fn run(cli: &Cli) -> Result<()> {
    use reqwest::Method;
    match &cli.cmd {
        Cmd::List => {
            let v = get_view(cli).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list::render(&v));
            }
            Ok(())
        }
        Cmd::Pause | Cmd::Resume => {
            let path = if matches!(cli.cmd, Cmd::Pause) {
                "/v1/pause"
            } else {
                "/v1/resume"
            };
            let v = call(cli, Method::POST, &agent_url(cli, path), None).await?;
            print(cli, &v, || {
                v["message"].as_str().unwrap_or("done").to_string()
            })
        }
        Cmd::ShowConfig => {
            let v = call(cli, Method::GET, &agent_url(cli, "/v1/config"), None).await?;
            let c: pgwarden_core::dynconfig::DynamicConfig =
                serde_json::from_value(v["config"].clone()).context("read the configuration")?;
            print(cli, &v, || editconfig::to_editable(&c))
        }
        Cmd::EditConfig { force } => {
            let v = call(cli, Method::GET, &agent_url(cli, "/v1/config"), None).await?;
            let c: pgwarden_core::dynconfig::DynamicConfig =
                serde_json::from_value(v["config"].clone()).context("read the configuration")?;
            let file =
                std::env::temp_dir().join(format!("pgwarden-config-{}.toml", std::process::id()));
            std::fs::write(&file, editconfig::to_editable(&c))?;
            let editor = std::env::var("VISUAL")
                .or_else(|_| std::env::var("EDITOR"))
                .unwrap_or_else(|_| "vi".into());
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{editor} \"$1\""))
                .arg("sh")
                .arg(&file)
                .status()
                .with_context(|| format!("run the editor {editor}"))?;
            let text = std::fs::read_to_string(&file)?;
            let _ = std::fs::remove_file(&file);
            if !st.success() {
                bail!("the editor exited with {st}; nothing changed");
            }
            let (patch, diff) = editconfig::patch_from(&c, &text)?;
            if diff.is_empty() {
                println!("no changes");
                return Ok(());
            }
            println!("{}", diff.join("\n"));
            if !force {
                eprint!("Apply these changes to every node? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    println!("not applied");
                    return Ok(());
                }
            }
            let v = call(
                cli,
                Method::PATCH,
                &agent_url(cli, "/v1/config"),
                Some(serde_json::to_value(&patch)?),
            )
            .await?;
            print(cli, &v, || {
                format!("configuration version {} applied", v["config"]["version"])
            })
        }
        Cmd::Restart { member, pending } => {
            let view = get_view(cli).await?;
            let targets: Vec<&pgwarden_core::api::MemberView> = view
                .members
                .iter()
                .filter(|m| match member {
                    Some(n) => &m.name == n,
                    None => true,
                })
                .filter(|m| !pending || m.status.as_ref().is_some_and(|s| s.pending_restart))
                .collect();
            if member.is_none() && !pending {
                bail!("name a member, or use --pending to restart every member that needs it");
            }
            if let Some(n) = member {
                if targets.is_empty() && !pending {
                    bail!("{n} is not a member of {}", view.cluster);
                }
            }
            let mut done = Vec::new();
            for m in targets {
                call(cli, Method::POST, &member_url(cli, m, "/v1/restart"), None).await?;
                done.push(m.name.clone());
            }
            let v = serde_json::json!({ "restarted": done });
            print(cli, &v, || {
                if done.is_empty() {
                    "nothing to restart".into()
                } else {
                    format!("restarted {}", done.join(", "))
                }
            })
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = run(&cli).await;
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
