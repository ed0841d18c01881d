//! Direct-agent mode (`--agent URL`): the commands over one agent's API, as before the control
//! plane. Any member answers for the whole cluster and forwards changes through the
//! replicated log.

use crate::{editconfig, history, list, switchover, Cli, Cmd};
use anyhow::{bail, Context, Result};
use pgwarden_core::api::ClusterView;

/// One agent, with the command line's token and TLS options.
pub struct Agent<'a> {
    cli: &'a Cli,
    /// The agent's API URL as given.
    base: String,
}

fn client(cli: &Cli) -> Result<reqwest::Client> {
    let identity = match (&cli.cert, &cli.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    crate::server::http_client(
        cli.ca.as_deref(),
        identity,
        Some(std::time::Duration::from_secs(10)),
        None,
    )
}

/// How long an API call may take: operations (a restart, a switchover waiting for the
/// candidate to catch up) run to completion before the agent answers.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl<'a> Agent<'a> {
    pub fn new(cli: &'a Cli, base: &str) -> Agent<'a> {
        Agent {
            cli,
            base: base.to_string(),
        }
    }

    fn token(&self) -> Result<&str> {
        match &self.cli.token {
            Some(t) => Ok(t),
            None => bail!("a token is required: --token or PGWARDEN_TOKEN"),
        }
    }

    async fn get_view(&self) -> Result<ClusterView> {
        let token = self.token()?;
        let url = self.url("/v1/cluster");
        let r = client(self.cli)?
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
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let token = self.token()?;
        let mut req = client(self.cli)?
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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }

    /// A member's API URL, with the scheme of `--agent`.
    fn member_url(&self, m: &pgwarden_core::api::MemberView, path: &str) -> String {
        let scheme = if self.base.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}{path}", m.host, m.api_port)
    }

    fn print(&self, v: &serde_json::Value, text: impl FnOnce() -> String) -> Result<()> {
        if self.cli.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            println!("{}", text());
        }
        Ok(())
    }

    /// Unless `force`: shows the cluster and the plan, asks `question`; then POSTs `body` to
    /// `path` and prints the operation's result.
    async fn confirm_and_post<P: std::fmt::Display>(
        &self,
        force: bool,
        plan: impl Fn(&ClusterView) -> Result<P>,
        question: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<()> {
        if !force {
            let view = self.get_view().await?;
            let plan = plan(&view)?;
            println!(
                "Current cluster topology\n{}\n{plan}\n",
                list::render(&view)
            );
            crate::ask(question)?;
        }
        let body = serde_json::to_value(body)?;
        let v = self
            .call(reqwest::Method::POST, &self.url(path), Some(body))
            .await?;
        print_operation(self.cli, &v)
    }

    pub async fn run(&self) -> Result<()> {
        use reqwest::Method;
        let cli = self.cli;
        if let Some(flag) = cli.cmd.server_only_flag() {
            bail!(
                "{flag} is for the control plane (--server); an agent acts on its own cluster \
                 and its own members"
            );
        }
        match &cli.cmd {
            Cmd::List { .. } => {
                let v = self.get_view().await?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", list::render(&v));
                }
                Ok(())
            }
            Cmd::Pause { .. } | Cmd::Resume { .. } => {
                let path = if matches!(cli.cmd, Cmd::Pause { .. }) {
                    "/v1/pause"
                } else {
                    "/v1/resume"
                };
                let v = self.call(Method::POST, &self.url(path), None).await?;
                self.print(&v, || v["message"].as_str().unwrap_or("done").to_string())
            }
            Cmd::ShowConfig => {
                let v = self
                    .call(Method::GET, &self.url("/v1/config"), None)
                    .await?;
                let c: pgwarden_core::dynconfig::DynamicConfig =
                    serde_json::from_value(v["config"].clone())
                        .context("read the configuration")?;
                self.print(&v, || editconfig::to_editable(&c))
            }
            Cmd::EditConfig { force } => {
                let v = self
                    .call(Method::GET, &self.url("/v1/config"), None)
                    .await?;
                let c: pgwarden_core::dynconfig::DynamicConfig =
                    serde_json::from_value(v["config"].clone())
                        .context("read the configuration")?;
                let text = editconfig::edit_in_editor(&editconfig::to_editable(&c))?;
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
                let v = self
                    .call(
                        Method::PATCH,
                        &self.url("/v1/config"),
                        Some(serde_json::to_value(&patch)?),
                    )
                    .await?;
                self.print(&v, || {
                    format!("configuration version {} applied", v["config"]["version"])
                })
            }
            Cmd::History { last, .. } => {
                let v = self
                    .call(Method::GET, &self.url("/v1/history"), None)
                    .await?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let h: pgwarden_core::record::History =
                        serde_json::from_value(v).context("read the history")?;
                    print!("{}", history::render(&h, *last));
                }
                Ok(())
            }
            Cmd::Restart {
                member, pending, ..
            } => {
                let view = self.get_view().await?;
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
                    self.call(Method::POST, &self.member_url(m, "/v1/restart"), None)
                        .await?;
                    done.push(m.name.clone());
                }
                let v = serde_json::json!({ "restarted": done });
                self.print(&v, || {
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
                ..
            } => {
                switchover::check_confirmable(cli.json, *force)?;
                let req =
                    switchover::switchover_request(candidate.as_deref(), scheduled.as_deref());
                let question = switchover::switchover_question().to_string();
                let plan = |view: &ClusterView| switchover::switchover_plan(view, &req);
                self.confirm_and_post(*force, plan, &question, "/v1/switchover", &req)
                    .await
            }
            Cmd::Failover {
                candidate, force, ..
            } => {
                switchover::check_confirmable(cli.json, *force)?;
                let req = switchover::failover_request(candidate);
                let question = switchover::failover_question(candidate);
                let plan = |view: &ClusterView| switchover::failover_plan(view, &req);
                self.confirm_and_post(*force, plan, &question, "/v1/failover", &req)
                    .await
            }
            other => bail!(
                "`{}` needs the control plane: use --server URL (or PGWARDEN_SERVER) instead \
                 of --agent",
                other.name()
            ),
        }
    }
}

/// Prints an operation's answer (an `OperationResult`: its message, or the JSON); an answer
/// with `ok: false` is an error.
pub fn print_operation(cli: &Cli, v: &serde_json::Value) -> Result<()> {
    let message = v["message"].as_str().unwrap_or("done").to_string();
    if v["ok"] == serde_json::Value::Bool(false) {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        }
        bail!("{message}");
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{message}");
    }
    Ok(())
}
