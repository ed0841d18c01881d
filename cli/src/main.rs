//! `pgwardenctl`: the command line for pgwarden. By default it talks to the control plane
//! (`pgwarden-server`, `--server`); `--agent URL` talks to one agent directly, as before the
//! control plane existed.

mod agent;
mod editconfig;
mod events;
mod history;
mod list;
mod remote;
mod server;
mod switchover;
mod target;
mod views;
mod webhook;

use anyhow::Result;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pgwardenctl",
    version,
    about = "Operate pgwarden clusters",
    after_help = "The target is the control plane (--server, PGWARDEN_SERVER, or `server` in the \
                  CLI configuration file, which `pgwardenctl login` writes); --agent URL talks to \
                  one agent directly instead."
)]
struct Cli {
    /// The control plane (pgwarden-server), https://HOST:PORT: the default target.
    #[arg(long, global = true, env = "PGWARDEN_SERVER", value_name = "URL")]
    server: Option<String>,
    /// One agent's API URL: direct-agent mode, without the control plane.
    #[arg(long, global = true, env = "PGWARDEN_AGENT", value_name = "URL")]
    agent: Option<String>,
    /// The API token (the server's, or the agent API's bearer token with --agent).
    #[arg(long, global = true, env = "PGWARDEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The installation's CA certificate (PEM), to verify an https:// server or agent.
    #[arg(long, global = true, env = "PGWARDEN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) signed by the installation's CA, with --key.
    #[arg(long, global = true, env = "PGWARDEN_CERT", requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "PGWARDEN_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// The CLI configuration file (server, token, ca_file) [default:
    /// ~/.config/pgwarden/pgwardenctl.toml].
    #[arg(long, global = true, env = "PGWARDENCTL_CONFIG", value_name = "FILE")]
    cli_config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Where --server and --agent came from (filled after parsing).
    #[arg(skip)]
    sources: Sources,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sources {
    server: Option<target::Source>,
    agent: Option<target::Source>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The nodes of every cluster (or one): role, state, timeline, lag, agent up or down.
    /// With --agent: every member of that agent's cluster.
    List {
        /// Only this cluster (server).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// Every node the server knows, with its agent's version and last report (server).
    Nodes {
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// The event log, oldest first; --follow then prints new events as they come (server).
    Events {
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Only these event types (comma-separated or repeated).
        #[arg(long = "type", value_name = "T,...", value_delimiter = ',')]
        types: Vec<String>,
        /// Only events from this time on: RFC 3339, milliseconds since the epoch, or a
        /// duration meaning that long ago (`1h`).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// At most this many events from the log.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Then print new events as they are stored, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Maintenance mode on: no automatic failover (committed to the agents' replicated log).
    Pause {
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Maintenance mode off.
    Resume {
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// The cluster's dynamic configuration (--agent; with the server: `config show`).
    ShowConfig,
    /// Edit the dynamic configuration in $EDITOR, review the diff, apply it to every node
    /// (--agent; with the server: `config edit`).
    EditConfig {
        /// Apply without asking.
        #[arg(long)]
        force: bool,
    },
    /// A cluster's dynamic configuration through the server: show, set, patch, edit, history.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Every change of primary (failovers, switchovers): who, when, why, how long, in detail.
    History {
        /// Show only the newest N records in detail (the table lists them all).
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// The cluster (server).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// Restart PostgreSQL on members: one by name, or every member with --pending.
    Restart {
        /// The member (with the server, also --node).
        member: Option<String>,
        /// Only (all) members with a parameter change pending a restart.
        #[arg(long)]
        pending: bool,
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Rebuild a replica from the primary (server).
    Reinit {
        #[arg(long, value_name = "NAME")]
        cluster: String,
        #[arg(long, value_name = "NAME")]
        node: String,
        #[command(flatten)]
        wait: Wait,
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
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Promote a replica when there is no healthy primary (may lose acknowledged writes).
    Failover {
        /// The member to promote.
        #[arg(long, value_name = "NAME")]
        candidate: String,
        /// Do not ask for confirmation (required with --json).
        #[arg(long)]
        force: bool,
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Join tokens, to enroll agents with the server (`pgwarden-agent join`).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// API tokens, for pgwardenctl and automation.
    ApiToken {
        #[command(subcommand)]
        cmd: ApiTokenCmd,
    },
    /// The server's users and their roles (viewer, operator, admin).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Webhooks: where the server posts events (JSON, Slack, PagerDuty), their delivery logs.
    Webhook {
        #[command(subcommand)]
        cmd: WebhookCmd,
    },
    /// Exchange a user's password for an API token and store it, with the server and its CA,
    /// in the CLI configuration file.
    Login {
        #[arg(long, value_name = "NAME")]
        user: String,
        /// The token's lifetime (the server's default: 12h).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
}

/// How long the server waits for a command's outcome.
#[derive(clap::Args, Clone, Debug, Default)]
struct Wait {
    /// How long the server waits for the outcome before the command is `timed_out`
    /// (server; its `[commands] timeout`, 5m, by default).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The dynamic configuration, as `config edit` shows it.
    Show {
        #[arg(long, value_name = "NAME")]
        cluster: String,
    },
    /// Change settings and parameters: ttl=5s work_mem=16MB (KEY= resets).
    Set {
        #[arg(long, value_name = "NAME")]
        cluster: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
    /// Send a configuration patch (JSON) as it is.
    Patch {
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// The patch, or `-` for standard input.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Edit the configuration in $EDITOR, review the diff, apply it.
    Edit {
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Apply without asking.
        #[arg(long)]
        force: bool,
    },
    /// Configuration changes made through the server, newest first.
    History {
        #[arg(long, value_name = "NAME")]
        cluster: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// A one-time join token for a node of CLUSTER, and the `pgwarden-agent join` line to run.
    Create {
        #[arg(long, value_name = "NAME")]
        cluster: String,
        /// Lifetime (the server's default: 1h).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Join tokens: used or not, until when.
    List,
    /// Delete a join token.
    Delete { id: String },
}

#[derive(Subcommand)]
enum ApiTokenCmd {
    /// A new API token, shown once.
    Create {
        /// What it is for.
        #[arg(long)]
        name: String,
        /// Its user (admins only; yourself by default).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Lifetime; no expiry by default.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Your API tokens (everyone's for an admin).
    List,
    /// Delete an API token.
    Delete { id: String },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; without --password-stdin it can use API tokens only.
    Add {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Read the password from standard input (asked for on a terminal).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Every user and their role.
    List,
    /// Change a user's role, password or disabled flag.
    Set {
        name: String,
        #[arg(long)]
        role: Option<String>,
        /// The user can no longer log in or use their tokens.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// Read the new password from standard input (asked for on a terminal).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user and their tokens.
    Delete { name: String },
}

/// A webhook's secret, PagerDuty key and filter, as `webhook add` and `webhook set` take them.
#[derive(clap::Args, Clone, Debug, Default)]
struct WebhookOpts {
    /// The signing secret (16 to 256 characters); by default the server makes one (add).
    #[arg(long, conflicts_with = "secret_stdin")]
    secret: Option<String>,
    /// Read the signing secret from standard input (asked for on a terminal).
    #[arg(long)]
    secret_stdin: bool,
    /// The PagerDuty Events API v2 integration key (format pagerduty only; `""` removes it).
    #[arg(long, value_name = "KEY")]
    routing_key: Option<String>,
    /// Only these event types (comma-separated or repeated; `''` for every type).
    #[arg(long = "type", value_name = "T,...", value_delimiter = ',')]
    types: Option<Vec<String>>,
    /// Only events of these clusters (comma-separated or repeated; `''` for every cluster).
    #[arg(long = "cluster", value_name = "C,...", value_delimiter = ',')]
    clusters: Option<Vec<String>>,
    /// Leave out events below this severity.
    #[arg(long, value_name = "SEVERITY", value_parser = ["info", "warning", "critical"])]
    min_severity: Option<String>,
}

#[derive(Subcommand)]
enum WebhookCmd {
    /// Every webhook: format, whether enabled, URL, filter.
    List,
    /// Add a webhook; prints the signing secret once when the server made it.
    Add {
        /// A label.
        #[arg(long)]
        name: String,
        /// Where deliveries are posted: https://… (or http://…).
        #[arg(long)]
        url: String,
        #[arg(long, value_parser = ["json", "slack", "pagerduty"])]
        format: String,
        #[command(flatten)]
        opts: WebhookOpts,
        /// Create it disabled: it queues nothing until enabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change a webhook's settings; the others keep their value.
    Set {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        url: Option<String>,
        #[arg(long, value_parser = ["json", "slack", "pagerduty"])]
        format: Option<String>,
        #[command(flatten)]
        opts: WebhookOpts,
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Delete a webhook with its delivery log.
    Delete { id: String },
    /// Send a `webhook_test` event to the webhook and follow it until delivered or failed.
    Test {
        id: String,
        /// How long to follow the delivery before giving up on watching it.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        wait: String,
    },
    /// The webhook's deliveries, newest first, with their attempts.
    Deliveries {
        id: String,
        #[arg(long, value_parser = ["pending", "delivered", "failed"])]
        state: Option<String>,
        /// At most this many deliveries (1 to 500).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: Option<u16>,
    },
}

impl Cmd {
    /// The command's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Cmd::List { .. } => "list",
            Cmd::Nodes { .. } => "nodes",
            Cmd::Events { .. } => "events",
            Cmd::Pause { .. } => "pause",
            Cmd::Resume { .. } => "resume",
            Cmd::ShowConfig => "show-config",
            Cmd::EditConfig { .. } => "edit-config",
            Cmd::Config { .. } => "config",
            Cmd::History { .. } => "history",
            Cmd::Restart { .. } => "restart",
            Cmd::Reinit { .. } => "reinit",
            Cmd::Switchover { .. } => "switchover",
            Cmd::Failover { .. } => "failover",
            Cmd::Token { .. } => "token",
            Cmd::ApiToken { .. } => "api-token",
            Cmd::User { .. } => "user",
            Cmd::Webhook { .. } => "webhook",
            Cmd::Login { .. } => "login",
        }
    }

    /// A flag given that only means something to the server, if any.
    fn server_only_flag(&self) -> Option<&'static str> {
        let (cluster, node, wait) = match self {
            Cmd::List { cluster } | Cmd::History { cluster, .. } => {
                (cluster.is_some(), false, None)
            }
            Cmd::Pause { cluster, wait }
            | Cmd::Resume { cluster, wait }
            | Cmd::Switchover { cluster, wait, .. }
            | Cmd::Failover { cluster, wait, .. } => (cluster.is_some(), false, Some(wait)),
            Cmd::Restart {
                cluster,
                node,
                wait,
                ..
            } => (cluster.is_some(), node.is_some(), Some(wait)),
            _ => (false, false, None),
        };
        if cluster {
            Some("--cluster")
        } else if node {
            Some("--node")
        } else if wait.is_some_and(|w| w.timeout.is_some()) {
            Some("--timeout")
        } else {
            None
        }
    }
}

fn source(m: &ArgMatches, id: &str) -> Option<target::Source> {
    match m.value_source(id)? {
        clap::parser::ValueSource::CommandLine => Some(target::Source::Flag),
        clap::parser::ValueSource::EnvVariable => Some(target::Source::Env),
        _ => None,
    }
}

impl Cli {
    fn from_matches(m: &ArgMatches) -> Result<Cli, clap::Error> {
        let mut cli = Cli::from_arg_matches(m)?;
        cli.sources = Sources {
            server: source(m, "server"),
            agent: source(m, "agent"),
        };
        Ok(cli)
    }
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
    let choice = target::choose(
        cli.server.as_deref().zip(cli.sources.server),
        cli.agent.as_deref().zip(cli.sources.agent),
    )?;
    match choice {
        target::Choice::Agent(url) => agent::Agent::new(cli, &url).run().await,
        target::Choice::Server(url) => {
            let server = remote::connect(cli, url)?;
            remote::run(cli, &server).await
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let m = Cli::command().get_matches();
    let cli = match Cli::from_matches(&m) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
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
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("pgwardenctl").chain(args.iter().copied()))?;
        Cli::from_matches(&m)
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
            ..
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
            ..
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
        assert!(matches!(cli.cmd, Cmd::History { last: Some(3), .. }));
        let cli = parse(&["history", "--json"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::History { last: None, .. }));
        assert!(cli.json);
        assert!(parse(&["history", "--last", "-1"]).is_err());
    }

    #[test]
    fn failover_needs_a_candidate() {
        let cli = parse(&["failover", "--candidate", "pg3", "--force"]).unwrap();
        let Cmd::Failover {
            candidate, force, ..
        } = &cli.cmd
        else {
            panic!("not a failover");
        };
        assert_eq!(candidate, "pg3");
        assert!(force);
        let e = parse(&["failover"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn where_server_and_agent_came_from() {
        // Global flags count wherever they are written.
        let cli = parse(&["list", "--agent", "http://n1:8443"]).unwrap();
        assert_eq!(cli.sources.agent, Some(target::Source::Flag));
        assert_eq!(cli.sources.server, None);
        let cli = parse(&["--server", "https://cp:9443", "events", "--type", "a,b"]).unwrap();
        assert_eq!(cli.sources.server, Some(target::Source::Flag));
        let Cmd::Events { types, limit, .. } = &cli.cmd else {
            panic!("not events");
        };
        assert_eq!(types, &["a", "b"]);
        assert_eq!(*limit, 100);
    }

    #[test]
    fn webhook_arguments() {
        let cli = parse(&[
            "webhook",
            "set",
            "wh-1",
            "--type",
            "a,b",
            "--cluster",
            "",
            "--disable",
        ])
        .unwrap();
        let Cmd::Webhook {
            cmd: WebhookCmd::Set {
                id, opts, disable, ..
            },
        } = &cli.cmd
        else {
            panic!("not webhook set");
        };
        assert_eq!(id, "wh-1");
        assert_eq!(
            opts.types.as_deref(),
            Some(&["a".to_string(), "b".into()][..])
        );
        assert_eq!(opts.clusters.as_deref(), Some(&[String::new()][..]));
        assert!(*disable);
        assert_eq!(opts.routing_key, None);
        for bad in [
            &[
                "webhook", "add", "--name", "x", "--url", "http://h", "--format", "xml",
            ][..],
            &["webhook", "add", "--url", "http://h", "--format", "json"],
            &["webhook", "set", "wh-1", "--enable", "--disable"],
            &["webhook", "set", "wh-1", "--secret", "s", "--secret-stdin"],
            &["webhook", "set", "wh-1", "--min-severity", "fatal"],
            &["webhook", "deliveries", "wh-1", "--limit", "501"],
            &["webhook", "deliveries", "wh-1", "--state", "lost"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn server_only_flags_are_named() {
        let cli = parse(&["pause", "--cluster", "main"]).unwrap();
        assert_eq!(cli.cmd.server_only_flag(), Some("--cluster"));
        let cli = parse(&["restart", "--node", "n1"]).unwrap();
        assert_eq!(cli.cmd.server_only_flag(), Some("--node"));
        let cli = parse(&["resume", "--timeout", "5s"]).unwrap();
        assert_eq!(cli.cmd.server_only_flag(), Some("--timeout"));
        let cli = parse(&["restart", "n1"]).unwrap();
        assert_eq!(cli.cmd.server_only_flag(), None);
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
            &[
                "--server",
                "http://127.0.0.1:9",
                "--token",
                "t",
                "--json",
                "switchover",
                "--cluster",
                "main",
            ],
        ] {
            let e = run(&parse(args).unwrap()).await.unwrap_err().to_string();
            assert_eq!(
                e,
                "--json needs --force: there is no one to answer the confirmation"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_agent_refuses_server_flags_and_commands() {
        let e = run(&parse(&["--agent", "http://127.0.0.1:9", "pause", "--cluster", "x"]).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--cluster is for the control plane"), "{e}");
        let e = run(&parse(&["--agent", "http://127.0.0.1:9", "nodes"]).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nodes` needs the control plane"), "{e}");
        let e = run(&parse(&["--agent", "http://127.0.0.1:9", "webhook", "list"]).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("`webhook` needs the control plane"), "{e}");
    }

    #[test]
    fn an_operation_that_failed_is_an_error() {
        let cli = parse(&["switchover", "--force"]).unwrap();
        let ok = serde_json::json!({ "operation": "switchover", "ok": true, "message": "pg2 is the primary" });
        assert!(agent::print_operation(&cli, &ok).is_ok());
        let failed = serde_json::json!({ "operation": "switchover", "ok": false, "message": "pg2 did not catch up" });
        assert_eq!(
            agent::print_operation(&cli, &failed)
                .unwrap_err()
                .to_string(),
            "pg2 did not catch up"
        );
    }
}
