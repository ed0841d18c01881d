//! The `pgwarden-lab` command: `up`, `status`, `down`, `fault`, `exec`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pgwarden_lab::{Fault, Lab, LabSpec, Mode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pgwarden-lab",
    version,
    about = "A pgwarden cluster of real hosts on this machine"
)]
struct Cli {
    /// Lab name (1-8 lower-case letters or digits); several labs can coexist.
    #[arg(long, global = true, default_value = "lab")]
    name: String,
    /// Where the lab keeps its files (default /var/tmp/pgwarden-lab/NAME).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the hosts, start PostgreSQL and an agent on each, wait until healthy, print JSON.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Witness hosts (w1, …): an agent without PostgreSQL, e.g. `--nodes 2 --witnesses 1`.
        #[arg(long, default_value_t = 0)]
        witnesses: usize,
        /// The lab's /24 inside 10.77.0.0/16.
        #[arg(long, default_value = "10.77.0.0/24")]
        subnet: String,
        /// Run on loopback ports even as root.
        #[arg(long)]
        loopback: bool,
        /// First port in loopback mode.
        #[arg(long, default_value_t = 25400)]
        base_port: u16,
        #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
        pg_bin: PathBuf,
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        #[arg(long, default_value = "1s")]
        loop_wait: String,
        /// How long to wait for a healthy cluster.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// A virtual IP that follows the primary, e.g. `10.77.0.100/24` (network namespaces).
        #[arg(long)]
        vip: Option<String>,
        /// Start the EC2 emulator and a metadata responder per node; the agents move the
        /// secondary private IP (the VIP address), an Elastic IP and a route, and fence.
        #[arg(long)]
        ec2: bool,
        /// With --ec2: none, stop or reboot.
        #[arg(long, default_value = "stop")]
        fencing: String,
        /// Also start pgwarden-server (SQLite) on its own host and enroll every agent with a
        /// join token; the JSON gains `server` (url, admin user, password and API token).
        #[arg(long)]
        server: bool,
        #[arg(long)]
        server_bin: Option<PathBuf>,
    },
    /// Stop the lab's pgwarden-server.
    StopServer,
    /// Start the lab's pgwarden-server again.
    StartServer,
    /// Print the lab's description with each node's live role and state.
    Status,
    /// Stop every process and remove every namespace, link and directory of the lab.
    Down,
    /// Inject a fault: kill-postgres, kill-agent, stop-node, start-node, partition, heal.
    Fault { kind: Fault, node: String },
    /// Called by the EC2 emulator when it stops, starts or reboots a node's instance.
    #[command(hide = true)]
    Ec2Hook { action: String, node: String },
    /// Run a command inside a node's host: `pgwarden-lab exec n1 -- psql -c 'select 1'`;
    /// `client` is a host of its own whose PGHOST is the VIP.
    Exec {
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp/pgwarden-lab").join(&cli.name));
    match cli.cmd {
        Cmd::Up {
            nodes,
            witnesses,
            subnet,
            loopback,
            base_port,
            pg_bin,
            agent_bin,
            loop_wait,
            timeout,
            vip,
            ec2,
            fencing,
            server,
            server_bin,
        } => {
            let mut spec = LabSpec::new(&cli.name);
            spec.dir = dir;
            spec.nodes = nodes;
            spec.witnesses = witnesses;
            spec.subnet = subnet;
            spec.base_port = base_port;
            spec.pg_bin = pg_bin;
            spec.loop_wait = loop_wait;
            spec.vip = vip;
            spec.ec2 = ec2;
            spec.fencing = fencing;
            spec.server = server;
            if let Some(b) = server_bin {
                spec.server_bin = b;
            }
            if let Some(a) = agent_bin {
                spec.agent_bin = a;
            }
            if loopback {
                spec.mode = Mode::Loopback;
            }
            if spec.mode == Mode::Loopback && !pgwarden_lab::is_root() {
                eprintln!(
                    "note: not running as root: the nodes run on loopback ports instead of \
                     network namespaces (partition and link faults are unavailable)"
                );
            }
            let lab = match Lab::create(&spec) {
                Ok(lab) => lab,
                Err(e) => {
                    if let Ok(lab) = Lab::load(&spec.dir) {
                        let _ = lab.down();
                    }
                    return Err(e);
                }
            };
            eprintln!(
                "lab {}: waiting for the cluster to become healthy…",
                lab.name
            );
            lab.wait_healthy(Duration::from_secs(timeout)).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&lab.describe(true).await)?
            );
        }
        Cmd::Status => {
            let lab = Lab::load(&dir)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&lab.describe(true).await)?
            );
        }
        Cmd::Down => match Lab::load(&dir) {
            Ok(lab) => {
                lab.down()?;
                eprintln!("lab {} removed", lab.name);
            }
            Err(e) => {
                eprintln!("{e:#}; removing whatever lab {} left behind", cli.name);
                Lab::purge(&cli.name)?;
                let _ = std::fs::remove_dir_all(&dir);
            }
        },
        Cmd::Fault { kind, node } => {
            let mut lab = Lab::load(&dir)?;
            lab.fault(kind, &node)?;
            eprintln!("{kind:?} on {node}: done");
        }
        Cmd::StopServer => {
            let mut lab = Lab::load(&dir)?;
            lab.stop_server()?;
            eprintln!("server stopped");
        }
        Cmd::StartServer => {
            let mut lab = Lab::load(&dir)?;
            lab.start_server()?;
            eprintln!("server started");
        }
        Cmd::Ec2Hook { action, node } => {
            let mut lab = Lab::load(&dir)?;
            lab.ec2_hook(&action, &node)?;
        }
        Cmd::Exec { node, cmd } => {
            let lab = Lab::load(&dir)?;
            let st = lab
                .exec(&node, &cmd)?
                .status()
                .with_context(|| format!("run {}", cmd.join(" ")))?;
            return Ok(ExitCode::from(st.code().unwrap_or(1) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}
