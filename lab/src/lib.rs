//! `pgwarden-lab`: a cluster of real hosts on one machine, for the test suite, the benchmarks
//! and anyone who wants to try pgwarden in five minutes. As root every node is a Linux network
//! namespace on a bridge with its own address, PostgreSQL and agent; without root the nodes
//! share loopback with distinct ports (and network faults are not available).
//!
//! The lab's state (what it created, and the PIDs it started) lives in `<dir>/lab.json`, so
//! `status`, `fault`, `exec` and `down` work from any later process.

pub mod net;
pub mod probe;
pub mod temp_pg;

use anyhow::{anyhow, bail, Context, Result};
use net::Subnet;
use pgwarden_core::status::{NodeStatus, PgState, Role};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One network namespace per node (needs root).
    Netns,
    /// All nodes on 127.0.0.1 with distinct ports.
    Loopback,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    pub subnet: String,
    pub dir: PathBuf,
    pub mode: Mode,
    pub agent_bin: PathBuf,
    pub pg_bin: PathBuf,
    /// First port in loopback mode.
    pub base_port: u16,
    pub loop_wait: String,
    /// Extra environment for every agent (e.g. `PGWARDEN_FAILPOINTS` in tests).
    pub agent_env: Vec<(String, String)>,
    /// Mutual TLS on the agents' API (a lab CA, a certificate per node and one for the
    /// operator).
    pub tls: bool,
    /// Extra TOML appended to a node's agent configuration, e.g. `("n3", "[tags]\nclonefrom = true")`.
    pub node_config: Vec<(String, String)>,
    /// Witness hosts (`w1`, …) after the PostgreSQL nodes: an agent without PostgreSQL.
    pub witnesses: usize,
    /// A local virtual IP (`10.77.0.100/24`) that follows the primary (network namespaces).
    pub vip: Option<String>,
    /// Start the EC2 emulator and one metadata responder per node, and configure the
    /// secondary private IP (the VIP address), an Elastic IP, a route-table IP and fencing.
    pub ec2: bool,
    /// With `ec2`: the agents' `fencing` setting.
    pub fencing: String,
    /// Start `pgwarden-server` (SQLite) on its own host, and enroll every agent with a join
    /// token (its certificates come from the server's CA).
    pub server: bool,
    pub server_bin: PathBuf,
    /// With `server`: the store's URL instead of the embedded SQLite file.
    pub server_database_url: Option<String>,
    /// With `server` and a PostgreSQL store: a second server on its own host, on the same
    /// store and CA (agents report to the first).
    pub second_server: bool,
}

impl LabSpec {
    pub fn new(name: &str) -> LabSpec {
        LabSpec {
            name: name.to_string(),
            nodes: 3,
            subnet: "10.77.0.0/24".into(),
            dir: PathBuf::from("/var/tmp/pgwarden-lab").join(name),
            mode: if is_root() {
                Mode::Netns
            } else {
                Mode::Loopback
            },
            agent_bin: default_agent_bin(),
            pg_bin: PathBuf::from("/usr/lib/postgresql/15/bin"),
            base_port: 25400,
            loop_wait: "1s".into(),
            agent_env: Vec::new(),
            tls: true,
            node_config: Vec::new(),
            witnesses: 0,
            vip: None,
            ec2: false,
            fencing: "stop".into(),
            server: false,
            server_bin: default_server_bin(),
            server_database_url: None,
            second_server: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub host: String,
    pub netns: Option<String>,
    pub veth: Option<String>,
    pub pg_port: u16,
    pub health_port: u16,
    pub api_port: u16,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub agent_pid: Option<i32>,
    /// Runs only the agent (no PostgreSQL).
    #[serde(default)]
    pub witness: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub mode: Mode,
    pub subnet: String,
    pub bridge: Option<String>,
    pub dir: PathBuf,
    pub token: String,
    pub superuser_password: String,
    pub agent_bin: PathBuf,
    pub pg_bin: PathBuf,
    #[serde(default)]
    pub agent_env: Vec<(String, String)>,
    /// The operator's client certificate and the lab CA, when TLS is on.
    #[serde(default)]
    pub tls: Option<LabTls>,
    pub nodes: Vec<LabNode>,
    /// The `client` host: its own namespace on the bridge (network-namespace labs).
    #[serde(default)]
    pub client: Option<LabClient>,
    #[serde(default)]
    pub vip: Option<String>,
    /// The EC2 emulator, when the lab was made with `ec2`.
    #[serde(default)]
    pub ec2: Option<LabEc2>,
    /// The control plane, when the lab was made with `server`.
    #[serde(default)]
    pub server: Option<LabServer>,
    /// A second server on the same store, when the lab was made with `second_server`.
    #[serde(default)]
    pub second_server: Option<LabServer>,
}

/// The lab's `pgwarden-server`: its host, files, process and first admin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabServer {
    pub host: String,
    pub netns: Option<String>,
    pub veth: Option<String>,
    pub port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub bin: PathBuf,
    pub pid: Option<i32>,
    pub admin_user: String,
    pub admin_password: String,
    pub admin_token: String,
    pub ca_fingerprint: String,
}

impl LabServer {
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.pem")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabClient {
    pub host: String,
    pub netns: String,
    pub veth: String,
}

/// The EC2 emulator of a lab: its process and the world it created (the emulator's own
/// description: endpoint, ids of the VPC, subnet, route table, Elastic IP, and per node its
/// instance, ENI and metadata endpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabEc2 {
    pub pid: i32,
    pub endpoint: String,
    pub overlay_ip: String,
    pub world: serde_json::Value,
}

impl LabEc2 {
    pub fn node(&self, name: &str) -> Option<&serde_json::Value> {
        self.world["nodes"].get(name)
    }
    pub fn instance_id(&self, name: &str) -> Option<String> {
        self.node(name)?["instance_id"].as_str().map(String::from)
    }
    pub fn eni_id(&self, name: &str) -> Option<String> {
        self.node(name)?["eni_id"].as_str().map(String::from)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A command for `prog`, run inside `netns` when given (`ip netns exec` execs it in place, so
/// the child's PID is the program's).
fn in_netns(netns: Option<&str>, prog: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(prog);
            c
        }
        None => Command::new(prog),
    }
}

/// Starts `cmd` detached (its own process group, output appended to `log`) and reaps it in
/// the background; returns its PID.
fn spawn_detached(mut cmd: Command, log: &Path, what: &Path) -> Result<i32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("start {}", what.display()))?;
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let mut c = child;
        let _ = c.wait();
    });
    Ok(pid)
}

/// Whether this runs in CI (`CI=true`), where tests that need root or PostgreSQL must run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// The agent binary: `$PGWARDEN_AGENT_BIN`, else next to this executable (or one level up, for
/// test binaries in `target/*/deps`), else `pgwarden-agent` on PATH.
/// The server binary: `$PGWARDEN_SERVER_BIN`, else next to the agent binary.
pub fn default_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PGWARDEN_SERVER_BIN") {
        return PathBuf::from(p);
    }
    default_agent_bin().with_file_name("pgwarden-server")
}

pub fn default_agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PGWARDEN_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("pgwarden-agent");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("pgwarden-agent")
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn check_lab_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 8
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("lab name {name:?}: use 1-8 lower-case letters or digits (it names network links)");
    }
    Ok(())
}

impl Lab {
    fn state_file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    /// Loads a lab that `up` created.
    pub fn load(dir: &Path) -> Result<Lab> {
        let f = Self::state_file(dir);
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("no lab at {} (read {})", dir.display(), f.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", f.display()))
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(Self::state_file(&self.dir), text).context("write lab.json")
    }

    pub fn node(&self, name: &str) -> Result<&LabNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in lab {}", self.name))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut LabNode> {
        let lab = self.name.clone();
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in lab {lab}"))
    }

    /// Creates the hosts and writes every node's configuration, then starts the agents.
    /// Call `wait_healthy` to wait for the cluster.
    pub fn create(spec: &LabSpec) -> Result<Lab> {
        check_lab_name(&spec.name)?;
        if spec.nodes == 0 || spec.nodes + spec.witnesses > 9 {
            bail!("--nodes must be between 1 and 9 (witnesses included)");
        }
        if spec.mode == Mode::Netns && !is_root() {
            bail!("network namespaces need root; use loopback mode");
        }
        if Self::state_file(&spec.dir).exists() {
            bail!(
                "a lab already exists at {} (run `pgwarden-lab down --name {}` first)",
                spec.dir.display(),
                spec.name
            );
        }
        let subnet = Subnet::parse(&spec.subnet)?;
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("create {}", spec.dir.display()))?;
        set_mode(&spec.dir, 0o755)?;
        let mut lab = Lab {
            name: spec.name.clone(),
            mode: spec.mode,
            subnet: subnet.cidr(),
            bridge: None,
            dir: spec.dir.clone(),
            token: random_hex(16)?,
            superuser_password: random_hex(12)?,
            agent_bin: spec.agent_bin.clone(),
            pg_bin: spec.pg_bin.clone(),
            agent_env: spec.agent_env.clone(),
            tls: None,
            nodes: Vec::new(),
            client: None,
            vip: None,
            ec2: None,
            server: None,
            second_server: None,
        };
        if (spec.vip.is_some() || spec.ec2) && spec.mode != Mode::Netns {
            bail!("--vip and --ec2 need network namespaces: run the lab as root");
        }
        lab.vip = match (&spec.vip, spec.ec2) {
            (Some(v), _) => Some(v.clone()),
            (None, true) => Some(format!("{}/24", subnet.addr(100))),
            (None, false) => None,
        };
        if let Some(v) = &lab.vip {
            let (ip, _) =
                pgwarden_core::config::parse_cidr(v).map_err(|e| anyhow!("--vip: {e}"))?;
            if !subnet_contains(&subnet, &ip.to_string()) {
                bail!(
                    "--vip {v}: the address must be inside the lab's subnet {}",
                    subnet.cidr()
                );
            }
        }
        for i in 1..=spec.nodes + spec.witnesses {
            let witness = i > spec.nodes;
            let name = if witness {
                format!("w{}", i - spec.nodes)
            } else {
                format!("n{i}")
            };
            let dir = spec.dir.join(&name);
            let (host, netns, veth, ports) = match spec.mode {
                Mode::Netns => (
                    subnet.addr(10 + i as u8),
                    Some(format!("pgwl-{}-{name}", spec.name)),
                    Some(format!("pw{}{i}", spec.name)),
                    (5432, 8008, 8443),
                ),
                Mode::Loopback => {
                    let p = spec.base_port + (i as u16) * 10;
                    ("127.0.0.1".to_string(), None, None, (p, p + 1, p + 2))
                }
            };
            lab.nodes.push(LabNode {
                name,
                host,
                netns,
                veth,
                pg_port: ports.0,
                health_port: ports.1,
                api_port: ports.2,
                data_dir: dir.join("data"),
                config: dir.join("agent.toml"),
                dir,
                agent_pid: None,
                witness,
            });
        }
        lab.save()?;
        if spec.mode == Mode::Netns {
            net::add_blackhole(&subnet)?;
            let bridge = format!("pwbr{}", spec.name);
            net::add_bridge(&bridge, &subnet)?;
            lab.bridge = Some(bridge.clone());
            lab.save()?;
            for n in &lab.nodes {
                if let (Some(ns), Some(veth)) = (&n.netns, &n.veth) {
                    net::add_host(ns, veth, &bridge, &n.host)?;
                }
            }
            let client = LabClient {
                host: subnet.addr(200),
                netns: format!("pgwl-{}-client", spec.name),
                veth: format!("pw{}c", spec.name),
            };
            net::add_host(&client.netns, &client.veth, &bridge, &client.host)?;
            lab.client = Some(client);
            lab.save()?;
        }
        if spec.ec2 {
            lab.start_ec2(&subnet)?;
        }
        if spec.server {
            lab.setup_server(spec, &subnet)?;
        } else if spec.tls {
            lab.make_certs()?;
        }
        let replication_password = random_hex(12)?;
        for n in &lab.nodes {
            std::fs::create_dir_all(&n.dir)?;
            set_mode(&n.dir, 0o755)?;
            let mut text = lab.agent_config(n, spec, &replication_password);
            for (node, extra) in &spec.node_config {
                if *node == n.name {
                    text.push('\n');
                    text.push_str(extra);
                    text.push('\n');
                }
            }
            std::fs::write(&n.config, text)?;
        }
        if spec.server {
            lab.start_server()?;
            lab.enroll_agents()?;
        }
        let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
        for n in names {
            lab.start_agent(&n)?;
        }
        Ok(lab)
    }

    /// Runs a program (inside `netns` when given) and returns its standard output.
    fn run_in(netns: Option<&str>, prog: &Path, args: &[&str]) -> Result<String> {
        let out = in_netns(netns, prog)
            .args(args)
            .output()
            .with_context(|| format!("run {}", prog.display()))?;
        if !out.status.success() {
            bail!(
                "{} {}: {}",
                prog.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The control plane: its host, `init` (CA, server certificate, store, first admin), and
    /// the operator's certificate from the same CA.
    fn setup_server(&mut self, spec: &LabSpec, subnet: &Subnet) -> Result<()> {
        let dir = self.dir.join("server");
        std::fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o755)?;
        if spec.second_server && (spec.server_database_url.is_none() || self.mode != Mode::Netns) {
            bail!("a second server needs a PostgreSQL store and network namespaces");
        }
        let host_for = |lab: &Lab,
                        suffix: &str,
                        veth: &str,
                        ip: u8,
                        port: u16|
         -> Result<(String, Option<String>, Option<String>, u16)> {
            Ok(match lab.mode {
                Mode::Netns => {
                    let ns = format!("pgwl-{}-{suffix}", lab.name);
                    let veth = format!("pw{}{veth}", lab.name);
                    let host = subnet.addr(ip);
                    let bridge = lab.bridge.clone().context("no bridge")?;
                    net::add_host(&ns, &veth, &bridge, &host)?;
                    (host, Some(ns), Some(veth), 8440)
                }
                Mode::Loopback => ("127.0.0.1".to_string(), None, None, port),
            })
        };
        let (host, netns, veth, port) = host_for(self, "srv", "s", 240, spec.base_port + 5)?;
        let second = if spec.second_server {
            Some(host_for(self, "srv2", "t", 241, spec.base_port + 6)?)
        } else {
            None
        };
        let hosts = match &second {
            Some(s2) => format!("\"{host}\", \"{}\"", s2.0),
            None => format!("\"{host}\""),
        };
        let write_config = |path: &Path, host: &str, port: u16| -> Result<()> {
            let db = spec
                .server_database_url
                .as_ref()
                .map(|u| format!("database_url = \"{u}\"\n"))
                .unwrap_or_default();
            std::fs::write(
                path,
                format!(
                    "# Written by pgwarden-lab.\nlisten = \"{host}:{port}\"\ndata_dir = \"{}\"\n{db}\n[tls]\nhosts = [{hosts}]\n\n[agents]\nreport_interval = \"1s\"\ndown_after = \"5s\"\n",
                    dir.display()
                ),
            )?;
            Ok(())
        };
        let config = dir.join("server.toml");
        write_config(&config, &host, port)?;
        let second_config = dir.join("server2.toml");
        if let Some(s2) = &second {
            write_config(&second_config, &s2.0, s2.3)?;
        }
        let cfg_s = config.display().to_string();
        let init = Self::run_in(
            None,
            &spec.server_bin,
            &["--config", &cfg_s, "init", "--json"],
        )?;
        let init: serde_json::Value = serde_json::from_str(&init).context("parse init's JSON")?;
        let field = |k: &str| -> Result<String> {
            init[k]
                .as_str()
                .map(String::from)
                .with_context(|| format!("init did not print {k}"))
        };
        self.server = Some(LabServer {
            host,
            netns,
            veth,
            port,
            config,
            bin: spec.server_bin.clone(),
            pid: None,
            admin_user: field("admin_user")?,
            admin_password: field("admin_password")?,
            admin_token: field("admin_token")?,
            ca_fingerprint: field("ca_fingerprint")?,
            dir: dir.clone(),
        });
        if let (Some(first), Some((host, netns, veth, port))) = (self.server.clone(), second) {
            self.second_server = Some(LabServer {
                host,
                netns,
                veth,
                port,
                config: second_config,
                pid: None,
                ..first
            });
        }
        self.save()?;
        let pki = dir.join("pki").display().to_string();
        let op = dir.join("operator").display().to_string();
        Self::run_in(
            None,
            &self.agent_bin,
            &[
                "certs", "issue", "--ca-dir", &pki, "--name", "operator", "--out", &op,
            ],
        )?;
        self.tls = Some(LabTls {
            ca: dir.join("pki/ca.pem"),
            cert: dir.join("operator/operator.pem"),
            key: dir.join("operator/operator.key"),
        });
        self.save()
    }

    /// Starts the lab's servers (each in its namespace) and waits until they listen.
    pub fn start_server(&mut self) -> Result<()> {
        self.start_one_server(false)?;
        if self.second_server.is_some() {
            self.start_one_server(true)?;
        }
        Ok(())
    }

    fn slot(&mut self, second: bool) -> &mut Option<LabServer> {
        if second {
            &mut self.second_server
        } else {
            &mut self.server
        }
    }

    fn start_one_server(&mut self, second: bool) -> Result<()> {
        let s = self
            .slot(second)
            .clone()
            .context("this lab has no server")?;
        if s.pid.is_some_and(pid_alive) {
            return Ok(());
        }
        let mut cmd = in_netns(s.netns.as_deref(), &s.bin);
        cmd.arg("--config").arg(&s.config).current_dir(&s.dir);
        let pid = spawn_detached(cmd, &s.config.with_extension("log"), &s.bin)?;
        if let Some(srv) = self.slot(second).as_mut() {
            srv.pid = Some(pid);
        }
        self.save()?;
        let addr: std::net::SocketAddr = format!("{}:{}", s.host, s.port).parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                return Ok(());
            }
            if !pid_alive(pid) {
                bail!(
                    "pgwarden-server exited; see {}",
                    s.config.with_extension("log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("pgwarden-server did not listen on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the lab's servers (SIGTERM, then SIGKILL).
    pub fn stop_server(&mut self) -> Result<()> {
        if self.second_server.is_some() {
            self.stop_one_server(true)?;
        }
        self.stop_one_server(false)
    }

    fn stop_one_server(&mut self, second: bool) -> Result<()> {
        let s = self
            .slot(second)
            .clone()
            .context("this lab has no server")?;
        if let Some(pid) = s.pid {
            if pid_alive(pid) {
                kill(pid, libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if pid_alive(pid) {
                    kill(pid, libc::SIGKILL);
                    wait_dead(pid);
                }
            }
        }
        if let Some(srv) = self.slot(second).as_mut() {
            srv.pid = None;
        }
        self.save()
    }

    /// Enrolls every agent: a join token each (made in the store), then `pgwarden-agent join`
    /// on the node's host, which writes its certificate to the node's state directory.
    fn enroll_agents(&mut self) -> Result<()> {
        let s = self.server.clone().context("this lab has no server")?;
        let cfg_s = s.config.display().to_string();
        for n in self.nodes.clone() {
            let out = Self::run_in(
                None,
                &s.bin,
                &[
                    "--config",
                    &cfg_s,
                    "join-token",
                    "--cluster",
                    &self.name,
                    "--json",
                ],
            )?;
            let v: serde_json::Value = serde_json::from_str(&out).context("join-token JSON")?;
            let token = v["token"].as_str().context("no token")?;
            Self::run_in(
                n.netns.as_deref(),
                &self.agent_bin,
                &[
                    "join",
                    "--config",
                    &n.config.display().to_string(),
                    "--server",
                    &s.url(),
                    "--token",
                    token,
                    "--ca-fingerprint",
                    &s.ca_fingerprint,
                ],
            )
            .with_context(|| format!("enroll {}", n.name))?;
        }
        Ok(())
    }

    /// A lab CA, a certificate per node (valid for its address) and one for the operator,
    /// made with `pgwarden-agent certs`.
    fn make_certs(&mut self) -> Result<()> {
        let ca = self.dir.join("ca");
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new(&self.agent_bin)
                .args(args)
                .output()
                .with_context(|| format!("run {} certs", self.agent_bin.display()))?;
            if !out.status.success() {
                bail!(
                    "pgwarden-agent {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        let ca_s = ca.to_string_lossy().to_string();
        run(&["certs", "init", "--dir", &ca_s])?;
        for n in &self.nodes {
            let out = n.dir.join("tls").to_string_lossy().to_string();
            run(&[
                "certs", "issue", "--ca-dir", &ca_s, "--name", &n.name, "--host", &n.host, "--out",
                &out,
            ])?;
        }
        let op = ca.join("operator").to_string_lossy().to_string();
        run(&[
            "certs", "issue", "--ca-dir", &ca_s, "--name", "operator", "--out", &op,
        ])?;
        self.tls = Some(LabTls {
            ca: ca.join("ca.pem"),
            cert: ca.join("operator/operator.pem"),
            key: ca.join("operator/operator.key"),
        });
        self.save()
    }

    /// An HTTPS client for the agents' API: trusts the lab CA and presents the operator's
    /// certificate (plain HTTP when the lab runs without TLS).
    pub fn http_client(&self, timeout: Duration) -> Result<reqwest::Client> {
        let b = reqwest::Client::builder().timeout(timeout);
        let b = match &self.tls {
            Some(t) => {
                let mut ident = std::fs::read(&t.cert)?;
                ident.extend(std::fs::read(&t.key)?);
                b.use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&t.ca)?)?)
                    .identity(reqwest::Identity::from_pem(&ident)?)
            }
            None => b,
        };
        Ok(b.build()?)
    }

    /// The `[vip]` and `[aws]` sections of a PostgreSQL node's configuration.
    fn endpoint_config(&self, n: &LabNode, spec: &LabSpec) -> String {
        let mut out = String::new();
        if n.witness {
            return out;
        }
        if let Some(v) = &self.vip {
            out.push_str(&format!(
                "\n[vip]\naddress = \"{v}\"\ninterface = \"eth0\"\nlabel = \"eth0:pgw\"\n"
            ));
        }
        if let Some(e) = &self.ec2 {
            let vip_ip = self.vip_ip().unwrap_or_default();
            let imds = e
                .node(&n.name)
                .and_then(|x| x["imds"].as_str())
                .unwrap_or_default();
            out.push_str(&format!(
                "\n[aws]\nendpoint_url = \"{}\"\nmetadata_endpoint = \"{imds}\"\nsecondary_ip = \"{vip_ip}\"\nelastic_ip_allocation_id = \"{}\"\nroute_tables = [\"{}\"]\noverlay_ip = \"{}\"\nfencing = \"{}\"\nfencing_timeout = \"30s\"\n",
                e.endpoint,
                e.world["allocation_id"].as_str().unwrap_or_default(),
                e.world["route_table_id"].as_str().unwrap_or_default(),
                e.overlay_ip,
                spec.fencing,
            ));
        }
        out
    }

    /// Starts the EC2 emulator on the bridge's address (reachable from every host, never
    /// routed off the machine) and waits for the world it creates.
    fn start_ec2(&mut self, subnet: &Subnet) -> Result<()> {
        let gw = subnet.addr(1);
        let python = std::env::var("PGWARDEN_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("/var/tmp/pgwarden-venv"))
            .join("bin/python");
        let script = emulator_script()?;
        let dir = self.dir.join("ec2");
        std::fs::create_dir_all(&dir)?;
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.witness)
            .map(|(i, n)| {
                serde_json::json!({
                    "name": n.name,
                    "private_ip": n.host,
                    "imds_listen": format!("{gw}:{}", 5101 + i),
                })
            })
            .collect();
        // The emulated VPC and subnet are the lower half of the lab's /24 (the nodes, the
        // VIP); the overlay address is in the upper half: outside the VPC as AWS requires, and
        // still inside the lab's subnet, so nothing could route it off the machine.
        let vpc = format!("{}/25", subnet.addr(0));
        let world = serde_json::json!({
            "region": "us-east-1",
            "availability_zone": "us-east-1a",
            "vpc_cidr": vpc,
            "subnet_cidr": vpc,
            "nodes": nodes,
            "elastic_ip": true,
            "route_table": true,
        });
        let world_file = dir.join("world.json");
        let out_file = dir.join("state.json");
        std::fs::write(&world_file, serde_json::to_string_pretty(&world)?)?;
        let lab_bin = self.agent_bin.with_file_name("pgwarden-lab");
        let hook = format!(
            "{} --name {} --dir {} ec2-hook",
            lab_bin.display(),
            self.name,
            self.dir.display()
        );
        let log = std::fs::File::create(dir.join("emulator.log"))?;
        use std::os::unix::process::CommandExt;
        let child = Command::new(&python)
            .arg(&script)
            .arg("--listen")
            .arg(format!("{gw}:5000"))
            .arg("--world")
            .arg(&world_file)
            .arg("--out")
            .arg(&out_file)
            .arg("--hook")
            .arg(&hook)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!(
                    "start the EC2 emulator with {} (scripts/install-deps.sh installs it)",
                    python.display()
                )
            })?;
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            let mut c = child;
            let _ = c.wait();
        });
        self.ec2 = Some(LabEc2 {
            pid,
            endpoint: format!("http://{gw}:5000"),
            overlay_ip: subnet.addr(250),
            world: serde_json::Value::Null,
        });
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            if let Ok(text) = std::fs::read_to_string(&out_file) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    break v;
                }
            }
            if !pid_alive(pid) {
                bail!(
                    "the EC2 emulator exited; see {}",
                    dir.join("emulator.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("the EC2 emulator did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if let Some(e) = &mut self.ec2 {
            e.world = state;
        }
        self.save()
    }

    /// What the EC2 emulator calls when an instance is stopped, started or rebooted: the
    /// host really goes down or comes back.
    pub fn ec2_hook(&mut self, action: &str, node: &str) -> Result<()> {
        match action {
            "stop" => self.fault(Fault::StopNode, node),
            "start" => self.fault(Fault::StartNode, node),
            "reboot" => {
                self.fault(Fault::StopNode, node)?;
                self.fault(Fault::StartNode, node)
            }
            _ => bail!("unknown EC2 hook action {action:?}"),
        }
    }

    fn agent_config(&self, n: &LabNode, spec: &LabSpec, replication_password: &str) -> String {
        let mut members = String::new();
        for m in &self.nodes {
            members.push_str(&format!(
                "\n[[cluster.members]]\nname = \"{}\"\nhost = \"{}\"\npg_port = {}\nhealth_port = {}\napi_port = {}\n{}",
                m.name,
                m.host,
                m.pg_port,
                m.health_port,
                m.api_port,
                if m.witness { "witness = true\n" } else { "" }
            ));
        }
        let (listen, extra_hba) = match self.mode {
            Mode::Netns => ("*", format!("host all all {} scram-sha-256", self.subnet)),
            Mode::Loopback => (
                "127.0.0.1",
                "host all all 127.0.0.1/32 scram-sha-256".into(),
            ),
        };
        let bind = match self.mode {
            Mode::Netns => "0.0.0.0",
            Mode::Loopback => "127.0.0.1",
        };
        format!(
            r#"# Written by pgwarden-lab for node {name}.
[node]
name = "{name}"
state_dir = "{dir}/state"
loop_wait = "{loop_wait}"

[cluster]
name = "{cluster}"
initial_primary = "n1"
{members}
[api]
listen = "{bind}:{api}"
token = "{token}"

[health]
listen = "{bind}:{health}"
{tls}
[postgresql]
bin_dir = "{pg_bin}"
data_dir = "{data}"
socket_dir = "{dir}/run"
listen_addresses = "{listen}"
superuser_password = "{su}"
replication_password = "{rp}"
start_timeout = "120s"
pg_hba = ["{extra_hba}"]

[postgresql.parameters]
shared_buffers = "32MB"
max_connections = 40
log_line_prefix = "%m [%p] %q%a "
{endpoints}"#,
            name = n.name,
            dir = n.dir.display(),
            loop_wait = spec.loop_wait,
            cluster = self.name,
            bind = bind,
            api = n.api_port,
            health = n.health_port,
            token = self.token,
            pg_bin = self.pg_bin.display(),
            data = n.data_dir.display(),
            su = self.superuser_password,
            rp = replication_password,
            endpoints = self.endpoint_config(n, spec),
            tls = match &self.tls {
                Some(_) if self.server.is_some() => String::new(),
                Some(t) => format!(
                    "\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    t.ca.display(),
                    n.dir.join(format!("tls/{}.pem", n.name)).display(),
                    n.dir.join(format!("tls/{}.key", n.name)).display()
                ),
                None => String::new(),
            },
        )
    }

    /// Starts a node's agent (inside its namespace), detached from this process.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let n = self.node(node)?.clone();
        if let Some(pid) = n.agent_pid {
            if pid_alive(pid) {
                return Ok(());
            }
        }
        let mut cmd = in_netns(n.netns.as_deref(), &self.agent_bin);
        cmd.envs(self.agent_env.iter().cloned());
        // Relative paths in the agent's environment (a failpoint file) are per node.
        cmd.current_dir(&n.dir);
        cmd.arg("--config")
            .arg(&n.config)
            .envs(std::env::var("RUST_LOG").ok().map(|v| ("RUST_LOG", v)));
        let pid = spawn_detached(cmd, &n.dir.join("agent.log"), &self.agent_bin)?;
        self.node_mut(node)?.agent_pid = Some(pid);
        self.save()
    }

    /// The PID of a node's postmaster, from its lock file.
    pub fn postmaster_pid(&self, node: &str) -> Option<i32> {
        let n = self.node(node).ok()?;
        let text = std::fs::read_to_string(n.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Every process of a node: its namespace's processes, or (loopback) the agent and
    /// PostgreSQL's process group.
    fn node_pids(&self, node: &str) -> Result<Vec<i32>> {
        let n = self.node(node)?;
        let mut pids = match &n.netns {
            Some(ns) => net::netns_pids(ns),
            None => Vec::new(),
        };
        pids.extend(n.agent_pid.filter(|p| pid_alive(*p)));
        if let Some(pm) = self.postmaster_pid(node) {
            pids.push(pm);
            pids.extend(children_of(pm));
        }
        pids.sort();
        pids.dedup();
        Ok(pids)
    }

    /// Injects a fault on one node.
    pub fn fault(&mut self, kind: Fault, node: &str) -> Result<()> {
        match kind {
            Fault::KillPostgres => {
                let pid = self
                    .postmaster_pid(node)
                    .ok_or_else(|| anyhow!("{node}: PostgreSQL is not running"))?;
                kill(pid, libc::SIGKILL);
            }
            Fault::KillAgent => {
                let pid = self
                    .node(node)?
                    .agent_pid
                    .filter(|p| pid_alive(*p))
                    .ok_or_else(|| anyhow!("{node}: the agent is not running"))?;
                kill(pid, libc::SIGKILL);
                wait_dead(pid);
                self.node_mut(node)?.agent_pid = None;
                self.save()?;
            }
            Fault::StopNode => {
                if let Some(veth) = &self.node(node)?.veth {
                    net::set_link(veth, false)?;
                }
                for pid in self.node_pids(node)? {
                    kill(pid, libc::SIGKILL);
                }
                for pid in self.node_pids(node)? {
                    wait_dead(pid);
                }
                let n = self.node(node)?;
                if let Some(ns) = &n.netns {
                    net::drop_extra_addrs(ns, &n.host);
                }
                self.node_mut(node)?.agent_pid = None;
                self.save()?;
            }
            Fault::StartNode => {
                if let Some(veth) = &self.node(node)?.veth {
                    net::set_link(veth, true)?;
                }
                self.start_agent(node)?;
            }
            Fault::Partition => {
                let ns = self.node(node)?.netns.clone().ok_or_else(|| {
                    anyhow!("partition needs network namespaces: run the lab as root")
                })?;
                net::partition(&ns)?;
            }
            Fault::Heal => {
                if let Some(ns) = &self.node(node)?.netns {
                    net::heal(ns);
                }
            }
        }
        Ok(())
    }

    /// A command that runs inside a node's host, with libpq variables pointing at its own
    /// PostgreSQL (so `psql` just works there, even while the host is partitioned).
    pub fn exec(&self, node: &str, argv: &[String]) -> Result<Command> {
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("exec needs a command"))?;
        if node == "client" {
            let mut cmd = match &self.client {
                Some(c) => {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", &c.netns, prog]);
                    cmd
                }
                None => Command::new(prog),
            };
            cmd.args(args);
            self.client_env(&mut cmd);
            if let Some(v) = self.vip_ip() {
                cmd.env("PGHOST", v);
            }
            return Ok(cmd);
        }
        let n = self.node(node)?;
        let mut cmd = match &n.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
            None => Command::new(prog),
        };
        cmd.args(args)
            .env(
                "PGHOST",
                if n.netns.is_some() {
                    "127.0.0.1"
                } else {
                    &n.host
                },
            )
            .env("PGPORT", n.pg_port.to_string());
        self.client_env(&mut cmd);
        Ok(cmd)
    }

    /// libpq's user, password and database for the lab's superuser, PostgreSQL's `bin` first on
    /// `PATH`.
    fn client_env(&self, cmd: &mut Command) {
        cmd.env("PGUSER", "postgres")
            .env("PGPASSWORD", &self.superuser_password)
            .env("PGDATABASE", "postgres")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.pg_bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
    }

    /// The VIP's address without its prefix.
    pub fn vip_ip(&self) -> Option<&str> {
        self.vip.as_deref().and_then(|v| v.split('/').next())
    }

    /// Stops everything the lab started and removes everything it created.
    pub fn down(&self) -> Result<()> {
        for n in &self.nodes {
            for pid in self.node_pids(&n.name).unwrap_or_default() {
                kill(pid, libc::SIGKILL);
            }
        }
        for n in &self.nodes {
            for pid in self.node_pids(&n.name).unwrap_or_default() {
                wait_dead(pid);
            }
            if let (Some(ns), Some(veth)) = (&n.netns, &n.veth) {
                net::del_host(ns, veth);
            }
        }
        for s in self.server.iter().chain(self.second_server.iter()) {
            if let Some(pid) = s.pid.filter(|p| pid_alive(*p)) {
                kill(pid, libc::SIGKILL);
                wait_dead(pid);
            }
            if let (Some(ns), Some(veth)) = (&s.netns, &s.veth) {
                net::del_host(ns, veth);
            }
        }
        if let Some(c) = &self.client {
            for pid in net::netns_pids(&c.netns) {
                kill(pid, libc::SIGKILL);
                wait_dead(pid);
            }
            net::del_host(&c.netns, &c.veth);
        }
        if let Some(e) = &self.ec2 {
            if pid_alive(e.pid) {
                kill(e.pid, libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(e.pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if pid_alive(e.pid) {
                    kill(e.pid, libc::SIGKILL);
                    wait_dead(e.pid);
                }
            }
        }
        if let Some(b) = &self.bridge {
            net::sh_quiet("ip", &["link", "del", b]);
        }
        if self.mode == Mode::Netns {
            // Last, once nothing is left that could send to the subnet.
            net::del_blackhole(&Subnet::parse(&self.subnet)?);
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("remove {}", self.dir.display()))?;
        Ok(())
    }

    /// Removes what a lab named `name` left behind when its state file is gone: processes in
    /// its namespaces, the namespaces, links, bridge and the bridge subnet's blackhole route.
    pub fn purge(name: &str) -> Result<()> {
        check_lab_name(name)?;
        let prefix = format!("pgwl-{name}-");
        let bridge = format!("pwbr{name}");
        let subnet = net::sh("ip", &["-4", "-o", "addr", "show", "dev", &bridge])
            .ok()
            .and_then(|o| {
                o.split_whitespace()
                    .skip_while(|w| *w != "inet")
                    .nth(1)
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| Subnet::parse(&format!("{a}/24")).ok())
            });
        let list = net::sh("ip", &["netns", "list"]).unwrap_or_default();
        for ns in list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
        {
            for pid in net::netns_pids(ns) {
                kill(pid, libc::SIGKILL);
                wait_dead(pid);
            }
            let node = &ns[prefix.len()..];
            let veth = if node == "client" {
                format!("pw{name}c")
            } else if node == "srv" {
                format!("pw{name}s")
            } else if node == "srv2" {
                format!("pw{name}t")
            } else {
                format!("pw{name}{}", node.trim_start_matches('n'))
            };
            net::del_host(ns, &veth);
        }
        net::sh_quiet("ip", &["link", "del", &bridge]);
        if let Some(s) = subnet {
            net::del_blackhole(&s);
        }
        Ok(())
    }

    pub fn dsn(&self, node: &str) -> Result<String> {
        let n = self.node(node)?;
        Ok(format!(
            "postgresql://postgres:{}@{}:{}/postgres",
            self.superuser_password, n.host, n.pg_port
        ))
    }

    pub fn health_url(&self, node: &str) -> Result<String> {
        let n = self.node(node)?;
        Ok(format!("http://{}:{}", n.host, n.health_port))
    }

    pub fn api_url(&self, node: &str) -> Result<String> {
        let n = self.node(node)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}:{}", n.host, n.api_port))
    }

    /// Each node's live status (None when its agent does not answer).
    pub async fn statuses(&self) -> Vec<(String, Option<NodeStatus>)> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let mut out = Vec::new();
        for n in &self.nodes {
            let url = format!("http://{}:{}/status", n.host, n.health_port);
            let st = match http.get(&url).send().await {
                Ok(r) => r.json::<NodeStatus>().await.ok(),
                Err(_) => None,
            };
            out.push((n.name.clone(), st));
        }
        out
    }

    /// Waits until exactly one node is a writable primary and every other node streams from it.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.statuses().await;
            let primaries: Vec<&String> = st
                .iter()
                .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_writable_primary()))
                .map(|(n, _)| n)
                .collect();
            if primaries.len() == 1 {
                let p = primaries[0].clone();
                let all_streaming = st.iter().all(|(n, s)| {
                    *n == p
                        || s.as_ref().is_some_and(|s| s.witness)
                        || s.as_ref().is_some_and(|s| {
                            s.is_streaming() && s.upstream.as_deref() == Some(p.as_str())
                        })
                });
                if all_streaming {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                let summary: Vec<String> = st
                    .iter()
                    .map(|(n, s)| match s {
                        Some(s) => format!(
                            "{n}: {:?}/{:?} waiting={:?} error={:?}",
                            s.role, s.state, s.waiting_for, s.last_error
                        ),
                        None => format!("{n}: agent not answering"),
                    })
                    .collect();
                bail!(
                    "lab {} not healthy after {timeout:?}: {}",
                    self.name,
                    summary.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The JSON description `up` and `status` print.
    pub async fn describe(&self, live: bool) -> serde_json::Value {
        let statuses = if live {
            self.statuses().await
        } else {
            Vec::new()
        };
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                let st = statuses
                    .iter()
                    .find(|(name, _)| *name == n.name)
                    .and_then(|(_, s)| s.as_ref());
                serde_json::json!({
                    "name": n.name,
                    "host": n.host,
                    "netns": n.netns,
                    "pg_port": n.pg_port,
                    "dsn": format!("postgresql://postgres:{}@{}:{}/postgres", self.superuser_password, n.host, n.pg_port),
                    "health_url": format!("http://{}:{}", n.host, n.health_port),
                    "api_url": self.api_url(&n.name).unwrap_or_default(),
                    "data_dir": n.data_dir,
                    "agent_pid": n.agent_pid,
                    "role": st.map(|s| s.role).unwrap_or(Role::Unknown),
                    "state": st.map(|s| s.state).unwrap_or(PgState::Unknown),
                    "timeline": st.and_then(|s| s.timeline),
                    "lag_bytes": st.and_then(|s| s.lag_bytes),
                    "upstream": st.and_then(|s| s.upstream.clone()),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "mode": self.mode,
            "subnet": if self.mode == Mode::Netns { Some(&self.subnet) } else { None },
            "bridge": self.bridge,
            "dir": self.dir,
            "token": self.token,
            "tls": self.tls,
            "superuser": "postgres",
            "superuser_password": self.superuser_password,
            "nodes": nodes,
            "client": self.client,
            "server": self.server.as_ref().map(|s| serde_json::json!({
                "url": s.url(),
                "host": s.host,
                "pid": s.pid,
                "ca_file": s.ca_file(),
                "ca_fingerprint": s.ca_fingerprint,
                "user": s.admin_user,
                "password": s.admin_password,
                "token": s.admin_token,
                "config": s.config,
                "log": s.dir.join("server.log"),
            })),
            "second_server": self.second_server.as_ref().map(|s| serde_json::json!({
                "url": s.url(),
                "host": s.host,
                "pid": s.pid,
                "config": s.config,
            })),
            "vip": self.vip,
            "ec2": self.ec2.as_ref().map(|e| serde_json::json!({
                "endpoint": e.endpoint,
                "overlay_ip": e.overlay_ip,
                "vpc_id": e.world["vpc_id"],
                "subnet_id": e.world["subnet_id"],
                "route_table_id": e.world["route_table_id"],
                "allocation_id": e.world["allocation_id"],
                "public_ip": e.world["public_ip"],
                "nodes": e.world["nodes"],
            })),
        })
    }
}

/// The faults the lab can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillPostgres,
    KillAgent,
    StopNode,
    StartNode,
    Partition,
    Heal,
}

impl std::str::FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Fault> {
        Ok(match s {
            "kill-postgres" => Fault::KillPostgres,
            "kill-agent" => Fault::KillAgent,
            "stop-node" => Fault::StopNode,
            "start-node" => Fault::StartNode,
            "partition" => Fault::Partition,
            "heal" => Fault::Heal,
            _ => bail!(
                "unknown fault {s:?}: kill-postgres, kill-agent, stop-node, start-node, partition, heal"
            ),
        })
    }
}

fn subnet_contains(subnet: &Subnet, ip: &str) -> bool {
    let net = subnet.addr(0);
    let prefix: Vec<&str> = net.split('.').take(3).collect();
    let other: Vec<&str> = ip.split('.').take(3).collect();
    prefix == other
}

/// `tests/fixtures/ec2/emulator.py` of this source tree (or `$PGWARDEN_EC2_EMULATOR`).
fn emulator_script() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PGWARDEN_EC2_EMULATOR") {
        return Ok(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ec2/emulator.py");
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "the EC2 emulator script is not at {} (set PGWARDEN_EC2_EMULATOR)",
        p.display()
    )
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => false,
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|x| x.parse::<i32>().ok());
                if ppid == Some(pid) {
                    out.push(p);
                }
            }
        }
    }
    out
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a positive pid of a process this lab started only sends a signal.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits (up to 10 s) until a killed process is gone, not just a zombie.
fn wait_dead(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
