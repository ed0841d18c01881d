//! Server mode: every command against the control plane's REST API (`/api/v1`). Reads go
//! straight to the server; actions become commands the server hands to the cluster's agents,
//! followed here until their outcome.

use crate::server::{
    create_command, follow_command, problem_text, seg, send_idempotent, ClusterDetail, NodeRow,
    Server,
};
use crate::target::{self, FileConfig};
use crate::{
    editconfig, events, history, switchover, views, ApiTokenCmd, Cli, Cmd, ConfigCmd, TokenCmd,
    UserCmd, Wait,
};
use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

/// The server from the flags, the environment and the CLI configuration file. The file's
/// token and CA are used only for the file's own server (or when it names none), so a token
/// is never sent to another server.
pub fn connect(cli: &Cli, url: Option<String>) -> Result<Server> {
    let file_path = cli.cli_config.clone().or_else(target::default_path);
    let file = match &file_path {
        Some(p) => target::load(p)?,
        None => FileConfig::default(),
    };
    let Some(url) = url.or_else(|| file.server.clone()) else {
        return Err(target::no_target(file_path.as_deref()));
    };
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    let file_applies = file.server.as_deref().is_none_or(|s| same(s, &url));
    let (file_token, file_ca) = if file_applies {
        (file.token, file.ca_file)
    } else {
        (None, None)
    };
    let identity = cli.cert.clone().zip(cli.key.clone());
    Server::new(
        &url,
        cli.token.clone().or(file_token),
        cli.ca.clone().or(file_ca),
        identity,
        file_path,
    )
}

/// `--cluster`, which the command needs with the server.
fn need_cluster<'a>(c: &'a Option<String>, cmd: &str) -> Result<&'a str> {
    c.as_deref().ok_or_else(|| {
        anyhow!(
            "{cmd} needs --cluster NAME with the server (`pgwardenctl list` shows the clusters)"
        )
    })
}

pub(crate) fn pretty(v: &Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

/// Prints `v` as JSON with `--json`, else `text`.
pub(crate) fn print(cli: &Cli, v: &Value, text: impl FnOnce() -> String) -> Result<()> {
    if cli.json {
        println!("{}", pretty(v)?);
    } else {
        let t = text();
        if t.ends_with('\n') {
            print!("{t}");
        } else {
            println!("{t}");
        }
    }
    Ok(())
}

async fn cluster_detail(server: &Server, cluster: &str) -> Result<(Value, ClusterDetail)> {
    let v = server
        .get(&format!("/api/v1/clusters/{}", seg(cluster)))
        .await?;
    let d = serde_json::from_value(v.clone()).context("read the cluster")?;
    Ok((v, d))
}

/// Queues a command and follows it to its outcome.
async fn command(
    cli: &Cli,
    server: &Server,
    cluster: &str,
    kind: &str,
    node: Option<&str>,
    args: Option<Value>,
    wait: &Wait,
) -> Result<()> {
    let mut body = json!({ "kind": kind });
    if let Some(n) = node {
        body["node"] = json!(n);
    }
    if let Some(a) = args {
        body["args"] = a;
    }
    if let Some(t) = &wait.timeout {
        body["timeout"] = json!(t);
    }
    let first = create_command(server, cluster, &body).await?;
    follow_command(server, first, cli.json).await
}

/// A node in a few words: role, state, timeline, lag, and whether its agent reports.
fn describe(n: &NodeRow) -> String {
    let mut parts = Vec::new();
    match n.node_status() {
        Some(s) => {
            parts.push(crate::list::role(&s).to_string());
            parts.push(crate::list::state(&s));
            if let Some(tl) = s.timeline {
                parts.push(format!("timeline {tl}"));
            }
            if let Some(l) = s.lag_bytes {
                parts.push(format!("lag {:.1} MB", l as f64 / 1_048_576.0));
            }
        }
        None => {
            parts.push(n.role.clone());
            parts.push(n.pg_state.clone());
        }
    }
    if !n.agent_up {
        parts.push("agent down".into());
    }
    parts.retain(|p| !p.is_empty());
    format!("{} ({})", n.name, parts.join(", "))
}

fn node<'a>(c: &'a ClusterDetail, name: &str) -> Result<&'a NodeRow> {
    c.nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| anyhow!("{name} is not a node of cluster {}", c.name))
}

fn primary(c: &ClusterDetail) -> Option<&NodeRow> {
    c.primary
        .as_ref()
        .and_then(|p| c.nodes.iter().find(|n| &n.name == p))
}

/// What a switchover will do, shown before the confirmation.
fn switchover_plan(c: &ClusterDetail, candidate: Option<&str>, when: &str) -> Result<String> {
    let p = primary(c);
    let cand = match candidate {
        Some(name) => {
            let n = node(c, name)?;
            if p.is_some_and(|p| p.name == name) {
                bail!("{name} is already the primary");
            }
            describe(n)
        }
        None => switchover::BEST_REPLICA.to_string(),
    };
    Ok([
        format!("Cluster:         {}", c.name),
        format!(
            "Current primary: {}",
            p.map_or(
                "none (no node runs a writable primary: a switchover needs one; without \
                 a healthy primary, see `pgwardenctl failover`)"
                    .to_string(),
                describe
            )
        ),
        format!("Candidate:       {cand}"),
        format!("When:            {when}"),
    ]
    .join("\n"))
}

/// What a failover will do, shown before the confirmation.
fn failover_plan(c: &ClusterDetail, candidate: &str) -> Result<String> {
    let n = node(c, candidate)?;
    let p = primary(c);
    let mut out = vec![
        format!("Cluster:         {}", c.name),
        format!(
            "Current primary: {}",
            p.map_or(
                "none (no node runs a writable primary)".to_string(),
                describe
            )
        ),
        format!("Candidate:       {}", describe(n)),
    ];
    if let Some(p) = p {
        out.push(format!(
            "Warning: {} looks like a healthy primary: the agents refuse a failover while a \
             healthy primary holds the lease (use `pgwardenctl switchover`).",
            p.name
        ));
    }
    out.push(format!(
        "Writes acknowledged by the old primary but not received by {candidate} may be lost."
    ));
    Ok(out.join("\n"))
}

/// Reads a secret: asked for on a terminal (without echo), else the first line of standard
/// input.
pub(crate) fn read_secret(prompt: &str, what: &str) -> Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let stty = |arg: &str| {
            std::process::Command::new("stty")
                .arg(arg)
                .stdin(std::process::Stdio::inherit())
                .status()
                .is_ok_and(|s| s.success())
        };
        let quiet = stty("-echo");
        let r = stdin.lock().read_line(&mut line);
        if quiet {
            stty("echo");
            eprintln!();
        }
        r.with_context(|| format!("read the {what}"))?;
    } else {
        stdin
            .lock()
            .read_line(&mut line)
            .with_context(|| format!("read the {what} from standard input"))?;
    }
    let secret = line.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        bail!("the {what} is empty");
    }
    Ok(secret)
}

pub async fn run(cli: &Cli, server: &Server) -> Result<()> {
    let now = views::now_ms();
    match &cli.cmd {
        Cmd::List { cluster } => {
            let names: Vec<String> = match cluster {
                Some(c) => vec![c.clone()],
                None => server
                    .get("/api/v1/clusters")
                    .await?
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c["name"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let mut raw = Vec::new();
            let mut text = Vec::new();
            for n in &names {
                let (v, d) = cluster_detail(server, n).await?;
                text.push(views::cluster(&d, now));
                raw.push(v);
            }
            if cluster.is_some() {
                let v = raw.pop().unwrap_or(Value::Null);
                return print(cli, &v, || text.join("\n"));
            }
            print(cli, &Value::Array(raw), || {
                if text.is_empty() {
                    "no cluster yet: create a join token with `pgwardenctl token create \
                     --cluster NAME` and enroll a node with it"
                        .to_string()
                } else {
                    text.join("\n")
                }
            })
        }
        Cmd::Nodes { cluster } => {
            let path = match cluster {
                Some(c) => format!("/api/v1/clusters/{}/nodes", seg(c)),
                None => "/api/v1/nodes".to_string(),
            };
            let v = server.get(&path).await?;
            let rows: Vec<NodeRow> = serde_json::from_value(v.clone()).context("read the nodes")?;
            print(cli, &v, || {
                if rows.is_empty() {
                    "no node has reported yet".to_string()
                } else {
                    views::nodes(&rows, now)
                }
            })
        }
        Cmd::Events {
            cluster,
            node,
            types,
            since,
            limit,
            follow,
        } => {
            let filter = events::Filter {
                cluster: cluster.clone(),
                node: node.clone(),
                types: types.clone(),
                since: since.as_deref().map(|s| events::since_arg(s, now)),
            };
            // Opened before the log is read: nothing stored meanwhile is missed.
            let stream = if *follow {
                Some(events::open_stream(server, &filter, None).await?)
            } else {
                None
            };
            let mut seen = std::collections::HashSet::new();
            let mut all = Vec::new();
            events::page_through(server, &filter, *limit, |e, raw| {
                seen.insert(e.seq);
                match (cli.json, *follow) {
                    (false, _) => println!("{}", views::event_line(e)),
                    (true, true) => println!("{raw}"),
                    (true, false) => all.push(raw.clone()),
                }
            })
            .await?;
            let Some(stream) = stream else {
                if cli.json {
                    println!("{}", pretty(&Value::Array(all))?);
                }
                return Ok(());
            };
            events::follow(server, &filter, stream, seen, |e, raw| {
                if cli.json {
                    println!("{raw}");
                } else {
                    println!("{}", views::event_line(e));
                }
            })
            .await
        }
        Cmd::Pause { cluster, wait } | Cmd::Resume { cluster, wait } => {
            let kind = cli.cmd.name();
            let c = need_cluster(cluster, kind)?;
            command(cli, server, c, kind, None, None, wait).await
        }
        Cmd::ShowConfig => bail!("with the server: `pgwardenctl config show --cluster NAME`"),
        Cmd::EditConfig { .. } => {
            bail!("with the server: `pgwardenctl config edit --cluster NAME`")
        }
        Cmd::Config { cmd } => config(cli, server, cmd).await,
        Cmd::History { last, cluster } => {
            let c = need_cluster(cluster, "history")?;
            let v = server
                .get(&format!("/api/v1/clusters/{}/failovers", seg(c)))
                .await?;
            if cli.json {
                println!("{}", pretty(&v)?);
            } else {
                let h: pgwarden_core::record::History =
                    serde_json::from_value(json!({ "failovers": v }))
                        .context("read the history")?;
                print!("{}", history::render(&h, *last));
            }
            Ok(())
        }
        Cmd::Restart {
            member,
            pending,
            cluster,
            node,
            wait,
        } => {
            let c = need_cluster(cluster, "restart")?;
            let target = match (member, node) {
                (Some(a), Some(b)) if a != b => {
                    bail!("restart: {a} and --node {b}: name one node")
                }
                (a, b) => a.clone().or(b.clone()),
            };
            if !pending {
                let Some(n) = target else {
                    bail!("restart needs --node NAME, or --pending for every node that needs it");
                };
                return command(cli, server, c, "restart", Some(&n), None, wait).await;
            }
            let (_, d) = cluster_detail(server, c).await?;
            let todo: Vec<String> = d
                .nodes
                .iter()
                .filter(|n| target.as_ref().is_none_or(|t| &n.name == t))
                .filter(|n| n.node_status().is_some_and(|s| s.pending_restart))
                .map(|n| n.name.clone())
                .collect();
            if todo.is_empty() {
                return print(cli, &json!({ "restarted": [] }), || {
                    "nothing to restart".into()
                });
            }
            for n in &todo {
                command(cli, server, c, "restart", Some(n), None, wait).await?;
            }
            if !cli.json {
                println!("restarted {}", todo.join(", "));
            }
            Ok(())
        }
        Cmd::Reinit {
            cluster,
            node,
            wait,
        } => command(cli, server, cluster, "reinitialize", Some(node), None, wait).await,
        Cmd::Switchover {
            candidate,
            scheduled,
            force,
            cluster,
            wait,
        } => {
            switchover::check_confirmable(cli.json, *force)?;
            let c = need_cluster(cluster, "switchover")?;
            let req = switchover::switchover_request(candidate.as_deref(), scheduled.as_deref());
            if !force {
                let (_, d) = cluster_detail(server, c).await?;
                let when = req.scheduled_at.as_deref().unwrap_or("now");
                let plan = switchover_plan(&d, req.candidate.as_deref(), when)?;
                println!(
                    "Current cluster topology\n{}\n{plan}\n",
                    views::cluster(&d, now)
                );
                crate::ask(switchover::switchover_question())?;
            }
            let args = serde_json::to_value(&req)?;
            command(cli, server, c, "switchover", None, Some(args), wait).await
        }
        Cmd::Failover {
            candidate,
            force,
            cluster,
            wait,
        } => {
            switchover::check_confirmable(cli.json, *force)?;
            let c = need_cluster(cluster, "failover")?;
            let req = switchover::failover_request(candidate);
            if !force {
                let (_, d) = cluster_detail(server, c).await?;
                let plan = failover_plan(&d, candidate)?;
                println!(
                    "Current cluster topology\n{}\n{plan}\n",
                    views::cluster(&d, now)
                );
                crate::ask(&switchover::failover_question(candidate))?;
            }
            let args = serde_json::to_value(&req)?;
            command(cli, server, c, "failover", None, Some(args), wait).await
        }
        Cmd::Token { cmd } => join_tokens(cli, server, cmd, now).await,
        Cmd::ApiToken { cmd } => api_tokens(cli, server, cmd).await,
        Cmd::User { cmd } => users(cli, server, cmd).await,
        Cmd::Webhook { cmd } => crate::webhook::run(cli, server, cmd).await,
        Cmd::Login { user, ttl } => login(cli, server, user, ttl.as_deref()).await,
    }
}

/// Sends a configuration patch (`PATCH /api/v1/clusters/{c}/config`) and follows the command
/// it became.
async fn send_patch(cli: &Cli, server: &Server, cluster: &str, patch: &Value) -> Result<()> {
    let patch = &compact(patch);
    let path = format!("/api/v1/clusters/{}/config", seg(cluster));
    let key = crate::server::idempotency_key();
    let first = send_idempotent(server, Method::PATCH, &path, patch, &key).await?;
    follow_command(server, first, cli.json).await
}

/// A patch without its absent settings (`null` at the top level) and without an empty
/// `parameters`; a `null` parameter (a reset) stays.
fn compact(patch: &Value) -> Value {
    match patch {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, v)| {
                    !(v.is_null()
                        || (k.as_str() == "parameters"
                            && v.as_object().is_some_and(|p| p.is_empty())))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

async fn current_config(
    server: &Server,
    cluster: &str,
) -> Result<(Value, pgwarden_core::dynconfig::DynamicConfig)> {
    let v = server
        .get(&format!("/api/v1/clusters/{}/config", seg(cluster)))
        .await?;
    let c = serde_json::from_value(v["config"].clone()).context("read the configuration")?;
    Ok((v, c))
}

async fn config(cli: &Cli, server: &Server, cmd: &ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Show { cluster } => {
            let (v, c) = current_config(server, cluster).await?;
            print(cli, &v, || {
                let mut t = editconfig::to_editable(&c);
                if let Some(n) = v["fetched_from"].as_str() {
                    t.push_str(&format!("\n# Read from the agent of {n}.\n"));
                }
                t
            })
        }
        ConfigCmd::Set {
            cluster,
            assignments,
        } => {
            let patch = editconfig::patch_from_assignments(assignments)?;
            send_patch(cli, server, cluster, &serde_json::to_value(&patch)?).await
        }
        ConfigCmd::Patch { cluster, file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("read the patch from standard input")?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
            };
            let patch: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", file.display()))?;
            if !patch.is_object() {
                bail!(
                    "{}: a patch is a JSON object, e.g. {{\"ttl\": \"5s\", \"parameters\": \
                     {{\"work_mem\": \"16MB\"}}}}",
                    file.display()
                );
            }
            send_patch(cli, server, cluster, &patch).await
        }
        ConfigCmd::Edit { cluster, force } => {
            switchover::check_confirmable(cli.json, *force)?;
            let (_, c) = current_config(server, cluster).await?;
            let text = editconfig::edit_in_editor(&editconfig::to_editable(&c))?;
            let (patch, diff) = editconfig::patch_from(&c, &text)?;
            if diff.is_empty() {
                println!("no changes");
                return Ok(());
            }
            println!("{}", diff.join("\n"));
            if !force {
                crate::ask(&format!("Apply these changes to every node of {cluster}?"))?;
            }
            send_patch(cli, server, cluster, &serde_json::to_value(&patch)?).await
        }
        ConfigCmd::History { cluster } => {
            let v = server
                .get(&format!("/api/v1/clusters/{}/config/history", seg(cluster)))
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            print(cli, &v, || {
                if items.is_empty() {
                    format!("no configuration change made through the server for {cluster}")
                } else {
                    views::config_history(&items)
                }
            })
        }
    }
}

async fn join_tokens(cli: &Cli, server: &Server, cmd: &TokenCmd, now: i64) -> Result<()> {
    match cmd {
        TokenCmd::Create { cluster, ttl } => {
            let mut body = json!({ "cluster": cluster });
            if let Some(t) = ttl {
                body["ttl"] = json!(t);
            }
            let v = server
                .call(Method::POST, "/api/v1/join-tokens", Some(&body))
                .await?;
            print(cli, &v, || {
                let token = v["token"].as_str().unwrap_or_default();
                let fp = v["ca_fingerprint"].as_str().unwrap_or_default();
                let expires = v["expires_ms"].as_i64().unwrap_or(0);
                format!(
                    "Join token {} for cluster {cluster}, usable once until {} ({}):\n  \
                     {token}\nCA fingerprint: {fp}\n\nOn the new node (its configuration names \
                     cluster {cluster}), run:\n  pgwarden-agent join --server {} --token {token} \
                     --ca-fingerprint {fp}",
                    v["id"].as_str().unwrap_or_default(),
                    views::time(expires),
                    views::until(expires, now),
                    server.base,
                )
            })
        }
        TokenCmd::List => {
            let v = server.get("/api/v1/join-tokens").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            print(cli, &v, || {
                if items.is_empty() {
                    "no join token".into()
                } else {
                    views::join_tokens(&items, now)
                }
            })
        }
        TokenCmd::Delete { id } => {
            let v = server
                .call(
                    Method::DELETE,
                    &format!("/api/v1/join-tokens/{}", seg(id)),
                    None,
                )
                .await?;
            print(cli, &v, || format!("join token {id} deleted"))
        }
    }
}

async fn api_tokens(cli: &Cli, server: &Server, cmd: &ApiTokenCmd) -> Result<()> {
    match cmd {
        ApiTokenCmd::Create { name, user, ttl } => {
            let mut body = json!({ "name": name });
            if let Some(u) = user {
                body["user"] = json!(u);
            }
            if let Some(t) = ttl {
                body["ttl"] = json!(t);
            }
            let v = server
                .call(Method::POST, "/api/v1/tokens", Some(&body))
                .await?;
            print(cli, &v, || {
                format!(
                    "API token {} for {} ({name:?}), expires {}; it is shown only once:\n  {}",
                    v["id"].as_str().unwrap_or_default(),
                    v["user"].as_str().unwrap_or_default(),
                    v["expires_ms"]
                        .as_i64()
                        .map_or("never".to_string(), views::time),
                    v["token"].as_str().unwrap_or_default(),
                )
            })
        }
        ApiTokenCmd::List => {
            let v = server.get("/api/v1/tokens").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            print(cli, &v, || views::api_tokens(&items))
        }
        ApiTokenCmd::Delete { id } => {
            let v = server
                .call(Method::DELETE, &format!("/api/v1/tokens/{}", seg(id)), None)
                .await?;
            print(cli, &v, || format!("API token {id} deleted"))
        }
    }
}

async fn users(cli: &Cli, server: &Server, cmd: &UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            role,
            password_stdin,
        } => {
            let mut body = json!({ "name": name, "role": role });
            if *password_stdin {
                body["password"] =
                    json!(read_secret(&format!("Password for {name}: "), "password")?);
            }
            let v = server
                .call(Method::POST, "/api/v1/users", Some(&body))
                .await?;
            print(cli, &v, || {
                let how = if *password_stdin {
                    "with a password"
                } else {
                    "without a password: API tokens only"
                };
                format!(
                    "user {name} added as {}, {how}",
                    v["role"].as_str().unwrap_or(role)
                )
            })
        }
        UserCmd::List => {
            let v = server.get("/api/v1/users").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            print(cli, &v, || views::users(&items))
        }
        UserCmd::Set {
            name,
            role,
            disable,
            enable,
            password_stdin,
        } => {
            let mut body = json!({});
            if let Some(r) = role {
                body["role"] = json!(r);
            }
            if *disable || *enable {
                body["disabled"] = json!(*disable);
            }
            if *password_stdin {
                body["password"] = json!(read_secret(
                    &format!("New password for {name}: "),
                    "password"
                )?);
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                bail!("nothing to change: give --role, --disable, --enable or --password-stdin");
            }
            let v = server
                .call(
                    Method::PATCH,
                    &format!("/api/v1/users/{}", seg(name)),
                    Some(&body),
                )
                .await?;
            print(cli, &v, || {
                format!(
                    "user {name}: {}, {}",
                    v["role"].as_str().unwrap_or_default(),
                    if v["disabled"] == Value::Bool(true) {
                        "disabled"
                    } else {
                        "active"
                    }
                )
            })
        }
        UserCmd::Delete { name } => {
            let v = server
                .call(
                    Method::DELETE,
                    &format!("/api/v1/users/{}", seg(name)),
                    None,
                )
                .await?;
            print(cli, &v, || format!("user {name} deleted"))
        }
    }
}

async fn login(cli: &Cli, server: &Server, user: &str, ttl: Option<&str>) -> Result<()> {
    let Some(path) = server.config_file.clone() else {
        bail!("no place for the CLI configuration file: give --cli-config FILE (HOME is not set)");
    };
    let password = read_secret(
        &format!("Password for {user} at {}: ", server.base),
        "password",
    )?;
    let mut body = json!({ "user": user, "password": password });
    if let Some(t) = ttl {
        body["ttl"] = json!(t);
    }
    let (status, v) = server
        .send(Method::POST, "/api/v1/login", Some(&body), false, &[])
        .await?;
    if !(200..300).contains(&status) {
        // A 401 here is a wrong password, not a missing token.
        let text = problem_text(status, &v);
        bail!("{}", text.split('\n').next().unwrap_or_default());
    }
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server's answer has no token"))?;
    let ca_file: Option<PathBuf> = match &server.ca {
        Some(p) => Some(std::path::absolute(p).with_context(|| p.display().to_string())?),
        None => None,
    };
    let cfg = FileConfig {
        server: Some(server.base.clone()),
        token: Some(token.to_string()),
        ca_file,
    };
    target::write(&path, &cfg)?;
    let expires = v["expires_ms"].as_i64();
    let out = json!({
        "server": server.base,
        "user": user,
        "token_id": v["id"],
        "expires_ms": expires,
        "config_file": path.display().to_string(),
    });
    print(cli, &out, || {
        format!(
            "logged in to {} as {user}; the token expires {}; saved in {}",
            server.base,
            expires.map_or("never".to_string(), views::time),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail() -> ClusterDetail {
        let n = |name: &str, role: &str| NodeRow {
            cluster: "main".into(),
            name: name.into(),
            role: role.into(),
            pg_state: "running".into(),
            agent_up: true,
            ..Default::default()
        };
        ClusterDetail {
            name: "main".into(),
            primary: Some("n1".into()),
            nodes: vec![n("n1", "primary"), n("n2", "replica")],
            ..Default::default()
        }
    }

    #[test]
    fn patches_leave_out_absent_settings() {
        let p = pgwarden_core::dynconfig::ConfigPatch {
            ttl: Some("5s".into()),
            ..Default::default()
        };
        assert_eq!(
            compact(&serde_json::to_value(&p).unwrap()),
            json!({"ttl": "5s"})
        );
        let v = json!({"parameters": {"work_mem": null}, "pg_hba": null});
        assert_eq!(compact(&v), json!({"parameters": {"work_mem": null}}));
    }

    #[test]
    fn plans_name_the_cluster_primary_and_candidate() {
        let d = detail();
        let p = switchover_plan(&d, Some("n2"), "now").unwrap();
        assert!(p.contains("Cluster:         main"), "{p}");
        assert!(p.contains("Current primary: n1 (primary, running)"), "{p}");
        assert!(p.contains("Candidate:       n2 (replica, running)"), "{p}");
        let p = switchover_plan(&d, None, "now").unwrap();
        assert!(p.contains(switchover::BEST_REPLICA), "{p}");
        assert_eq!(
            switchover_plan(&d, Some("n1"), "now")
                .unwrap_err()
                .to_string(),
            "n1 is already the primary"
        );
        assert_eq!(
            switchover_plan(&d, Some("n9"), "now")
                .unwrap_err()
                .to_string(),
            "n9 is not a node of cluster main"
        );
        let p = failover_plan(&d, "n2").unwrap();
        assert!(
            p.contains("Warning: n1 looks like a healthy primary"),
            "{p}"
        );
    }
}
