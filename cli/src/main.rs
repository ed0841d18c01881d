//! `pgwardenctl`: the command line for pgwarden. Today it talks to any agent's API; the
//! control-plane work adds the server as its default target.

mod editconfig;
mod history;
mod list;
mod switchover;

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
    /// Every change of primary (failovers, switchovers): who, when, why, how long, in detail.
    History {
        /// Show only the newest N records in detail (the table lists them all).
        #[arg(long, value_name = "N")]
        last: Option<usize>,
    },
    /// Restart PostgreSQL on members: one by name, or every member with --pending.
    Restart {
        member: Option<String>,
        /// Only (all) members with a parameter change pending a restart.
        #[arg(long)]
        pending: bool,
    },
    /// Hand the primary role over to a replica cleanly, now or at a scheduled time.
    Switchover {
        /// The member to promote; by default the primary's agent chooses the best replica.
        #[arg(long, value_name = "NAME")]
        candidate: Option<String>,
        /// `now` (the default) or an RFC 3339 time, e.g. 2026-11-22T10:00:00Z.
        #[arg(long, value_name = "TIME")]
        scheduled: Option<String>,
        /// Do not ask for confirmation (required with --json).
        #[arg(long)]
        force: bool,
    },
    /// Promote a replica when there is no healthy primary (may lose acknowledged writes).
    Failover {
        /// The member to promote.
        #[arg(long, value_name = "NAME")]
        candidate: String,
        /// Do not ask for confirmation (required with --json).
        #[arg(long)]
        force: bool,
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

/// How long an API call may take: operations (a restart, a switchover waiting for the
/// candidate to catch up) run to completion before the agent answers.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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
        .timeout(CALL_TIMEOUT);
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

/// Prints an operation's answer (an `OperationResult`: its message, or the JSON); an answer
/// with `ok: false` is an error.
fn print_operation(cli: &Cli, v: &serde_json::Value) -> Result<()> {
    let message = v["message"].as_str().unwrap_or("done").to_string();
    if v["ok"] == serde_json::Value::Bool(false) {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        }
        bail!("{message}");
    }
    print(cli, v, || message)
}

/// Asks the operator on the terminal; a no is `switchover::Aborted`.
fn ask(question: &str) -> Result<()> {
    if switchover::confirm(
        question,
        &mut std::io::stdin().lock(),
        &mut std::io::stderr(),
    )? {
        Ok(())
    } else {
        Err(switchover::Aborted.into())
    }
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
        Cmd::History { last } => {
            let v = call(cli, Method::GET, &agent_url(cli, "/v1/history"), None).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let h: pgwarden_core::record::History =
                    serde_json::from_value(v).context("read the history")?;
                print!("{}", history::render(&h, *last));
            }
            Ok(())
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
        Cmd::Switchover {
            candidate,
            scheduled,
            force,
        } => {
            switchover::check_confirmable(cli.json, *force)?;
            let req = switchover::switchover_request(candidate.as_deref(), scheduled.as_deref());
            let question = switchover::switchover_question().to_string();
            let plan = |view: &ClusterView| switchover::switchover_plan(view, &req);
            confirm_and_post(cli, *force, plan, &question, "/v1/switchover", &req).await
        }
        Cmd::Failover { candidate, force } => {
            switchover::check_confirmable(cli.json, *force)?;
            let req = switchover::failover_request(candidate);
            let question = switchover::failover_question(candidate);
            let plan = |view: &ClusterView| switchover::failover_plan(view, &req);
            confirm_and_post(cli, *force, plan, &question, "/v1/failover", &req).await
        }
    }
}

/// Unless `force`: shows the cluster and the plan, asks `question`; then POSTs `body` to
/// `path` and prints the operation's result.
async fn confirm_and_post<P: std::fmt::Display>(
    cli: &Cli,
    force: bool,
    plan: impl Fn(&ClusterView) -> Result<P>,
    question: &str,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<()> {
    if !force {
        let view = get_view(cli).await?;
        let plan = plan(&view)?;
        println!(
            "Current cluster topology\n{}\n{plan}\n",
            list::render(&view)
        );
        ask(question)?;
    }
    let body = serde_json::to_value(body)?;
    let v = call(
        cli,
        reqwest::Method::POST,
        &agent_url(cli, path),
        Some(body),
    )
    .await?;
    print_operation(cli, &v)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = run(&cli).await;
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<switchover::Aborted>() => {
            eprintln!("aborted");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pgwardenctl").chain(args.iter().copied()))
    }

    #[test]
    fn switchover_arguments() {
        let cli = parse(&[
            "switchover",
            "--candidate",
            "pg2",
            "--scheduled",
            "2026-11-22T10:00:00Z",
        ])
        .unwrap();
        let Cmd::Switchover {
            candidate,
            scheduled,
            force,
        } = &cli.cmd
        else {
            panic!("not a switchover");
        };
        assert_eq!(candidate.as_deref(), Some("pg2"));
        assert_eq!(scheduled.as_deref(), Some("2026-11-22T10:00:00Z"));
        assert!(!force);
        assert!(!cli.json);

        let cli = parse(&["switchover", "--force", "--json"]).unwrap();
        let Cmd::Switchover {
            candidate,
            scheduled,
            force,
        } = &cli.cmd
        else {
            panic!("not a switchover");
        };
        assert_eq!(candidate, &None);
        assert_eq!(scheduled, &None);
        assert!(force);
        assert!(cli.json);
        assert!(parse(&["switchover", "pg2"]).is_err());
    }

    #[test]
    fn history_arguments() {
        let cli = parse(&["history", "--last", "3"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::History { last: Some(3) }));
        let cli = parse(&["history", "--json"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::History { last: None }));
        assert!(cli.json);
        assert!(parse(&["history", "--last", "-1"]).is_err());
    }

    #[test]
    fn failover_needs_a_candidate() {
        let cli = parse(&["failover", "--candidate", "pg3", "--force"]).unwrap();
        let Cmd::Failover { candidate, force } = &cli.cmd else {
            panic!("not a failover");
        };
        assert_eq!(candidate, "pg3");
        assert!(force);
        let e = parse(&["failover"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn json_without_force_asks_nothing_and_sends_nothing() {
        // An agent that does not exist: the refusal comes before any request.
        for args in [
            &[
                "--agent",
                "http://127.0.0.1:9",
                "--token",
                "t",
                "--json",
                "switchover",
            ][..],
            &[
                "--agent",
                "http://127.0.0.1:9",
                "--token",
                "t",
                "--json",
                "failover",
                "--candidate",
                "pg2",
            ],
        ] {
            let e = run(&parse(args).unwrap()).await.unwrap_err().to_string();
            assert_eq!(
                e,
                "--json needs --force: there is no one to answer the confirmation"
            );
        }
    }

    #[test]
    fn an_operation_that_failed_is_an_error() {
        let cli = parse(&["switchover", "--force"]).unwrap();
        let ok = serde_json::json!({ "operation": "switchover", "ok": true, "message": "pg2 is the primary" });
        assert!(print_operation(&cli, &ok).is_ok());
        let failed = serde_json::json!({ "operation": "switchover", "ok": false, "message": "pg2 did not catch up" });
        assert_eq!(
            print_operation(&cli, &failed).unwrap_err().to_string(),
            "pg2 did not catch up"
        );
    }
}
