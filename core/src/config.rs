//! The agent's configuration file (`/etc/pgwarden/agent.toml`): its format, its defaults and its
//! validation. Parsing is pure (text in, config or error out) so that every rule is unit-tested
//! and `pgwarden-agent --check-config` gives the same verdict as a start.
//!
//! Unknown keys are errors: a typo such as `loop_wiat` must not silently leave a default in
//! place. Every error names the file, the line and the key.

use crate::duration::ConfDuration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The whole agent configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub node: NodeSection,
    pub cluster: ClusterSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub health: HealthSection,
    /// Mutual TLS for the agent API and the traffic between agents.
    pub tls: Option<TlsSection>,
    /// This node's tags: how the cluster may use it.
    #[serde(default)]
    pub tags: Tags,
    pub postgresql: PostgresSection,
    /// The local virtual IP that follows the primary.
    pub vip: Option<VipSection>,
    /// EC2: the secondary private IP, Elastic IP and route-table IP that follow the primary,
    /// and fencing of a primary that did not step down.
    pub aws: Option<AwsSection>,
    /// The control plane (`pgwarden-server`) the agent reports to. Without it the agent uses
    /// what `pgwarden-agent join` wrote to its state directory, if anything.
    pub server: Option<ServerSection>,
}

/// The control plane this agent pushes its reports to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// `https://host:port` of `pgwarden-server`.
    pub url: String,
    /// How often the agent reports until the server says otherwise.
    #[serde(default = "default_report_interval")]
    pub report_interval: ConfDuration,
}

impl ServerSection {
    /// The URL without a trailing `/`, ready for `{base}/api/v1/…`.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }
}

/// Checks a control-plane URL: `https://` and a host, nothing else required.
pub fn check_server_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        format!("{url:?} is not an https:// URL (the control plane is reached over TLS only)")
    })?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') || url.contains(char::is_whitespace) {
        return Err(format!(
            "{url:?} is not a URL such as https://pgwarden.example.net:9443"
        ));
    }
    Ok(())
}

/// A virtual IP on a local interface, held by the lease-holding primary only.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// Address and prefix, e.g. `10.0.1.100/24`.
    pub address: String,
    /// The interface that carries it.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Optional label (`ip addr` shows it); Linux requires it to start with the interface
    /// name, e.g. `eth0:pg`.
    pub label: Option<String>,
    /// Gratuitous ARP announcements sent after the address is added.
    #[serde(default = "default_arp_count")]
    pub arp_count: u32,
}

/// What is done to a primary that did not step down cleanly before another node is promoted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fencing {
    /// Nothing: the lease alone keeps one writer (the old primary stops itself).
    #[default]
    None,
    /// `StopInstances` with `Force`, then wait until the instance is `stopped`.
    Stop,
    /// Force-stop as with `stop`, wait for `stopped`, then start the instance again (it
    /// comes back as a replica).
    Reboot,
}

impl Fencing {
    pub fn as_str(self) -> &'static str {
        match self {
            Fencing::None => "none",
            Fencing::Stop => "stop",
            Fencing::Reboot => "reboot",
        }
    }
}

/// EC2 endpoints and fencing. Everything about the instance itself (instance id, region,
/// availability zone, MAC, ENI, subnet) comes from the instance metadata service (IMDSv2)
/// unless overridden here.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsSection {
    /// Default: the instance's region from IMDS.
    pub region: Option<String>,
    /// The EC2 API endpoint; default AWS's regional endpoint.
    pub endpoint_url: Option<String>,
    /// The instance metadata service; default `http://169.254.169.254`.
    pub metadata_endpoint: Option<String>,
    /// Overrides of what IMDS tells.
    pub instance_id: Option<String>,
    pub eni_id: Option<String>,
    /// The OS interface that carries the secondary and overlay addresses; default `eth0`.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// A secondary private IP of the primary's ENI (same subnet), moved with
    /// `AssignPrivateIpAddresses` + `AllowReassignment`.
    pub secondary_ip: Option<String>,
    /// An Elastic IP (`eipalloc-…`) associated with the primary (`AssociateAddress` +
    /// `AllowReassociation`), to the secondary IP when one is set, else the primary address.
    pub elastic_ip_allocation_id: Option<String>,
    /// Route tables (`rtb-…`) whose route to `overlay_ip`/32 points at the primary's ENI.
    #[serde(default)]
    pub route_tables: Vec<String>,
    /// An address outside the VPC CIDR, routed to the primary (clusters across zones).
    pub overlay_ip: Option<String>,
    #[serde(default)]
    pub fencing: Fencing,
    /// How long fencing may take before the promotion is given up (and retried).
    #[serde(default = "default_fencing_timeout")]
    pub fencing_timeout: ConfDuration,
    /// How often the permissions the endpoints need are re-checked with DryRun calls.
    #[serde(default = "default_permission_check_interval")]
    pub permission_check_interval: ConfDuration,
}

/// Per-node tags, as DBAs know them from Patroni. Published in the node's status so that
/// peers (and the vote) see them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// Never promote this node.
    #[serde(default)]
    pub nofailover: bool,
    /// Preference in a failover; higher wins, 0 means never. Default 1.
    pub failover_priority: Option<u32>,
    /// Never make this node a synchronous standby.
    #[serde(default)]
    pub nosync: bool,
    /// Preference for the synchronous standby set; higher wins, 0 means never. Default 1.
    pub sync_priority: Option<u32>,
    /// Take this replica out of read load balancing: `/replica` answers 503.
    #[serde(default)]
    pub noloadbalance: bool,
    /// New replicas prefer this node as their base-backup source.
    #[serde(default)]
    pub clonefrom: bool,
}

impl Tags {
    /// The effective failover priority (0 when the node must never be promoted).
    pub fn effective_failover_priority(&self) -> u32 {
        if self.nofailover {
            0
        } else {
            self.failover_priority.unwrap_or(1)
        }
    }

    /// The effective synchronous-standby priority (0 when never).
    pub fn effective_sync_priority(&self) -> u32 {
        if self.nosync {
            0
        } else {
            self.sync_priority.unwrap_or(1)
        }
    }
}

/// The node's certificate and the installation's CA (`pgwarden-agent certs init|issue`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name; must be one of `cluster.members`.
    pub name: String,
    /// Where the agent keeps its own state (intent, events, logs, password file).
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// How often the agent observes and acts.
    #[serde(default = "default_loop_wait")]
    pub loop_wait: ConfDuration,
    /// `text` or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The cluster's name (also PostgreSQL's `cluster_name` prefix).
    pub name: String,
    /// The node that bootstraps the cluster with initdb when no member has data yet.
    pub initial_primary: String,
    /// Every member of the cluster, this node included. The same list on every node.
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    /// Address peers, clients and health checkers use to reach this member.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub pg_port: u16,
    #[serde(default = "default_health_port")]
    pub health_port: u16,
    #[serde(default = "default_api_port")]
    pub api_port: u16,
    /// A witness runs only the agent (no PostgreSQL): a third vote for a two-node cluster.
    #[serde(default)]
    pub witness: bool,
    /// The member's EC2 instance, for fencing; default: what the member reported itself.
    pub instance_id: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Listen address of the authenticated agent API; default `0.0.0.0:<api_port>`.
    pub listen: Option<String>,
    /// Bearer token required by the agent API.
    pub token: Option<String>,
    /// File holding the bearer token (first line); alternative to `token`.
    pub token_file: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// Listen address of the unauthenticated health checks; default `0.0.0.0:<health_port>`.
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// Directory holding `postgres`, `initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: String,
    pub data_dir: String,
    /// The major version this node runs; a data directory of another version is refused.
    /// Default: the version of `bin_dir`'s binaries.
    pub major_version: Option<u32>,
    #[serde(default = "default_listen_addresses")]
    pub listen_addresses: String,
    /// Directory for the Unix socket; every node on a host needs its own.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: String,
    /// The operating-system user PostgreSQL runs as when the agent runs as root.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    #[serde(default = "default_superuser")]
    pub superuser: String,
    pub superuser_password: Option<String>,
    pub superuser_password_file: Option<String>,
    #[serde(default = "default_replication_user")]
    pub replication_user: String,
    pub replication_password: Option<String>,
    pub replication_password_file: Option<String>,
    /// Extra arguments for initdb (checksums, UTF8 and the superuser are always set).
    #[serde(default)]
    pub initdb_args: Vec<String>,
    /// Extra `pg_hba.conf` lines, appended after the agent's own rules.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// How long PostgreSQL may take to start or stop before the agent reports a failure.
    #[serde(default = "default_pg_timeout")]
    pub start_timeout: ConfDuration,
    #[serde(default = "default_pg_timeout")]
    pub stop_timeout: ConfDuration,
    /// PostgreSQL parameters written to the generated `postgresql.conf`.
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

fn default_state_dir() -> String {
    "/var/lib/pgwarden".into()
}
fn default_loop_wait() -> ConfDuration {
    ConfDuration::secs(1)
}
fn default_pg_port() -> u16 {
    5432
}
fn default_health_port() -> u16 {
    8008
}
fn default_api_port() -> u16 {
    8443
}
fn default_bin_dir() -> String {
    "/usr/lib/postgresql/15/bin".into()
}
fn default_listen_addresses() -> String {
    "*".into()
}
fn default_socket_dir() -> String {
    "/var/run/postgresql".into()
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_superuser() -> String {
    "postgres".into()
}
fn default_replication_user() -> String {
    "replicator".into()
}
fn default_pg_timeout() -> ConfDuration {
    ConfDuration::secs(60)
}
fn default_interface() -> String {
    "eth0".into()
}
fn default_arp_count() -> u32 {
    3
}
fn default_fencing_timeout() -> ConfDuration {
    ConfDuration::secs(90)
}
fn default_permission_check_interval() -> ConfDuration {
    ConfDuration::secs(900)
}
fn default_report_interval() -> ConfDuration {
    ConfDuration::secs(2)
}

/// Parses `a.b.c.d/len` (IPv4 with prefix).
pub fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} needs a prefix length, e.g. 10.0.1.100/24"))?;
    let addr: std::net::Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let len: u8 = p
        .parse()
        .ok()
        .filter(|l| (1..=32).contains(l))
        .ok_or_else(|| format!("{p:?} is not a prefix length (1-32)"))?;
    Ok((addr, len))
}

fn check_interface(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not an interface name"))
    }
}

fn check_aws_id(value: &str, prefix: &str) -> Result<(), String> {
    let rest = value.strip_prefix(prefix).unwrap_or("");
    if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!("{value:?} is not an id of the form {prefix}…"))
    }
}

/// Parameters the agent sets itself, per node; the config may not override them.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "cluster_name",
    "hot_standby",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "data_directory",
    "hba_file",
    "ident_file",
];

/// A configuration error: which file, which line (when known), which key, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(k) = &self.key {
            write!(f, "key `{k}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Converts a byte offset into a 1-based line number.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The dotted key defined on `line` (1-based), e.g. `postgresql.port`, from the nearest table
/// header above it. Used to name the key in type errors, which the TOML parser reports by
/// position only.
pub(crate) fn key_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let local = if here.starts_with('[') {
        None
    } else {
        here.split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
    };
    let section = lines[..line.min(lines.len())]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (section, local) {
        (Some(s), Some(k)) => Some(format!("{s}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(s), None) => Some(s),
        (None, None) => None,
    }
}

/// The 1-based line of `key` inside `[section]` (or `[[section]]` number `index`), if written.
pub(crate) fn find_key_line(
    text: &str,
    section: &str,
    index: Option<usize>,
    key: &str,
) -> Option<usize> {
    let mut in_section = false;
    let mut seen = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.starts_with('[') {
            let name = l.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section
                && match index {
                    None => true,
                    Some(n) => {
                        seen += 1;
                        seen == n + 1
                    }
                };
            continue;
        }
        if in_section {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

impl AgentConfig {
    /// Parses and validates the text of `file`.
    pub fn parse(text: &str, file: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let message = e.message().trim().to_string();
            let key = if message.starts_with("unknown field") {
                // The message names the unknown key itself; name its table too.
                line.and_then(|l| key_at_line(text, l))
            } else if message.starts_with("missing field") {
                None
            } else {
                line.and_then(|l| key_at_line(text, l))
            };
            ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
            }
        })?;
        cfg.validate().map_err(|v| ConfigError {
            file: file.to_string(),
            line: find_key_line(text, &v.section, v.index, &v.key),
            key: Some(match v.index {
                Some(i) => format!("{}[{i}].{}", v.section, v.key),
                None => format!("{}.{}", v.section, v.key),
            }),
            message: v.message,
        })?;
        Ok(cfg)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), Invalid> {
        let inv = |section: &str, index: Option<usize>, key: &str, message: String| Invalid {
            section: section.to_string(),
            index,
            key: key.to_string(),
            message,
        };
        check_name(&self.node.name).map_err(|m| inv("node", None, "name", m))?;
        check_name(&self.cluster.name).map_err(|m| inv("cluster", None, "name", m))?;
        if self.cluster.members.is_empty() {
            return Err(inv(
                "cluster",
                None,
                "members",
                "at least one member is required".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.cluster.members.iter().enumerate() {
            let at = Some(i);
            check_name(&m.name).map_err(|e| inv("cluster.members", at, "name", e))?;
            if !seen.insert(m.name.as_str()) {
                return Err(inv(
                    "cluster.members",
                    at,
                    "name",
                    format!("member {:?} is listed twice", m.name),
                ));
            }
            if m.host.trim().is_empty() || m.host.contains(char::is_whitespace) {
                return Err(inv(
                    "cluster.members",
                    at,
                    "host",
                    format!("{:?} is not a host name or address", m.host),
                ));
            }
            for (key, port) in [
                ("pg_port", m.pg_port),
                ("health_port", m.health_port),
                ("api_port", m.api_port),
            ] {
                if port == 0 {
                    return Err(inv(
                        "cluster.members",
                        at,
                        key,
                        "port 0 is not allowed".into(),
                    ));
                }
            }
        }
        if self.member(&self.node.name).is_none() {
            return Err(inv(
                "node",
                None,
                "name",
                format!(
                    "{:?} is not among cluster.members ({})",
                    self.node.name,
                    self.member_names().join(", ")
                ),
            ));
        }
        if self
            .member(&self.cluster.initial_primary)
            .is_some_and(|m| m.witness)
        {
            return Err(inv(
                "cluster",
                None,
                "initial_primary",
                format!(
                    "{:?} is a witness (it runs no PostgreSQL)",
                    self.cluster.initial_primary
                ),
            ));
        }
        if self.member(&self.cluster.initial_primary).is_none() {
            return Err(inv(
                "cluster",
                None,
                "initial_primary",
                format!(
                    "{:?} is not among cluster.members ({})",
                    self.cluster.initial_primary,
                    self.member_names().join(", ")
                ),
            ));
        }
        if self.node.loop_wait.0 < std::time::Duration::from_millis(100) {
            return Err(inv(
                "node",
                None,
                "loop_wait",
                "must be at least 100ms".into(),
            ));
        }
        if self.api.token.is_some() && self.api.token_file.is_some() {
            return Err(inv(
                "api",
                None,
                "token_file",
                "set either token or token_file, not both".into(),
            ));
        }
        if self.api.token.is_none() && self.api.token_file.is_none() {
            return Err(inv(
                "api",
                None,
                "token",
                "the agent API needs a bearer token: set token or token_file".into(),
            ));
        }
        if let Some(t) = &self.api.token {
            if t.len() < 16 {
                return Err(inv(
                    "api",
                    None,
                    "token",
                    "must be at least 16 characters long".into(),
                ));
            }
        }
        for (section, key, value) in [
            ("api", "listen", &self.api.listen),
            ("health", "listen", &self.health.listen),
        ] {
            if let Some(v) = value {
                if v.parse::<std::net::SocketAddr>().is_err() {
                    return Err(inv(
                        section,
                        None,
                        key,
                        format!("{v:?} is not an address:port such as 0.0.0.0:8008"),
                    ));
                }
            }
        }
        let pg = &self.postgresql;
        for (key, v) in [
            ("bin_dir", &pg.bin_dir),
            ("data_dir", &pg.data_dir),
            ("socket_dir", &pg.socket_dir),
        ] {
            if !v.starts_with('/') {
                return Err(inv(
                    "postgresql",
                    None,
                    key,
                    format!("{v:?} must be an absolute path"),
                ));
            }
        }
        if !self.node.state_dir.starts_with('/') {
            return Err(inv(
                "node",
                None,
                "state_dir",
                format!("{:?} must be an absolute path", self.node.state_dir),
            ));
        }
        for (key, a, b) in [
            (
                "superuser_password",
                &pg.superuser_password,
                &pg.superuser_password_file,
            ),
            (
                "replication_password",
                &pg.replication_password,
                &pg.replication_password_file,
            ),
        ] {
            match (a, b) {
                (Some(_), Some(_)) => {
                    return Err(inv(
                        "postgresql",
                        None,
                        key,
                        format!("set either {key} or {key}_file, not both"),
                    ))
                }
                (None, None) => {
                    return Err(inv(
                        "postgresql",
                        None,
                        key,
                        format!("a password is required: set {key} or {key}_file"),
                    ))
                }
                _ => {}
            }
        }
        for u in [&pg.superuser, &pg.replication_user] {
            check_name(u).map_err(|m| inv("postgresql", None, "superuser", m))?;
        }
        if pg.superuser == pg.replication_user {
            return Err(inv(
                "postgresql",
                None,
                "replication_user",
                "must differ from superuser".into(),
            ));
        }
        if let Some(v) = pg.major_version {
            if v < 12 {
                return Err(inv(
                    "postgresql",
                    None,
                    "major_version",
                    format!("PostgreSQL {v} is not supported: 12 or later is required"),
                ));
            }
        }
        for (name, value) in &pg.parameters {
            let at = |m: String| Invalid {
                section: "postgresql.parameters".into(),
                index: None,
                key: name.clone(),
                message: m,
            };
            if MANAGED_PARAMETERS.contains(&name.as_str()) {
                return Err(at(format!(
                    "{name} is set by pgwarden for each node and cannot be configured here"
                )));
            }
            check_param_name(name).map_err(at)?;
            if name == "wal_level" {
                let ok = matches!(value.as_str(), Some("replica") | Some("logical"));
                if !ok {
                    return Err(at(
                        "wal_level must be replica or logical for replication".into()
                    ));
                }
            }
            if matches!(value, toml::Value::Array(_) | toml::Value::Table(_)) {
                return Err(at("a parameter must be a string, number or boolean".into()));
            }
        }
        let t = &self.tags;
        if t.nofailover && t.failover_priority.is_some_and(|p| p > 0) {
            return Err(inv(
                "tags",
                None,
                "failover_priority",
                "conflicts with nofailover = true: a node that must never be promoted has no failover priority".into(),
            ));
        }
        if t.nosync && t.sync_priority.is_some_and(|p| p > 0) {
            return Err(inv(
                "tags",
                None,
                "sync_priority",
                "conflicts with nosync = true: a node that is never synchronous has no sync priority".into(),
            ));
        }
        if let Some(v) = &self.vip {
            parse_cidr(&v.address).map_err(|m| inv("vip", None, "address", m))?;
            check_interface(&v.interface).map_err(|m| inv("vip", None, "interface", m))?;
            if let Some(l) = &v.label {
                if !l.starts_with(&format!("{}:", v.interface)) || l.len() > 15 {
                    return Err(inv(
                        "vip",
                        None,
                        "label",
                        format!(
                            "{l:?} must start with \"{}:\" and be at most 15 characters",
                            v.interface
                        ),
                    ));
                }
            }
            if v.arp_count > 100 {
                return Err(inv("vip", None, "arp_count", "at most 100".into()));
            }
        }
        if let Some(a) = &self.aws {
            a.validate().map_err(|(k, m)| inv("aws", None, k, m))?;
        }
        if let Some(srv) = &self.server {
            check_server_url(&srv.url).map_err(|m| inv("server", None, "url", m))?;
            let every = srv.report_interval.0;
            if every < std::time::Duration::from_millis(100) {
                return Err(inv(
                    "server",
                    None,
                    "report_interval",
                    "must be at least 100ms".into(),
                ));
            }
            if every > std::time::Duration::from_secs(3600) {
                return Err(inv(
                    "server",
                    None,
                    "report_interval",
                    "must be at most 1h".into(),
                ));
            }
        }
        for (i, m) in self.cluster.members.iter().enumerate() {
            if let Some(id) = &m.instance_id {
                check_aws_id(id, "i-")
                    .map_err(|e| inv("cluster.members", Some(i), "instance_id", e))?;
            }
        }
        for line in &pg.pg_hba {
            if line.contains('\n') || line.trim().is_empty() {
                return Err(inv(
                    "postgresql",
                    None,
                    "pg_hba",
                    format!("{line:?} is not one pg_hba.conf line"),
                ));
            }
        }
        Ok(())
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.cluster.members.iter().find(|m| m.name == name)
    }

    /// This node's own member entry. Validation guarantees it exists.
    pub fn me(&self) -> &Member {
        self.member(&self.node.name)
            .unwrap_or(&self.cluster.members[0])
    }

    /// Every member except this node.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.cluster
            .members
            .iter()
            .filter(move |m| m.name != self.node.name)
    }

    pub fn member_names(&self) -> Vec<String> {
        self.cluster
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    pub fn health_listen(&self) -> String {
        self.health
            .listen
            .clone()
            .unwrap_or_else(|| format!("0.0.0.0:{}", self.me().health_port))
    }

    pub fn api_listen(&self) -> String {
        self.api
            .listen
            .clone()
            .unwrap_or_else(|| format!("0.0.0.0:{}", self.me().api_port))
    }
}

impl AwsSection {
    /// The rules of the `[aws]` section: (key, why) of the first broken one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("endpoint_url", &self.endpoint_url),
            ("metadata_endpoint", &self.metadata_endpoint),
        ] {
            if let Some(u) = v {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err((key, format!("{u:?} is not an http:// or https:// URL")));
                }
            }
        }
        if let Some(r) = &self.region {
            let ok = !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err((
                    "region",
                    format!("{r:?} is not a region name such as eu-west-1"),
                ));
            }
        }
        if let Some(id) = &self.instance_id {
            check_aws_id(id, "i-").map_err(|m| ("instance_id", m))?;
        }
        if let Some(id) = &self.eni_id {
            check_aws_id(id, "eni-").map_err(|m| ("eni_id", m))?;
        }
        if let Some(id) = &self.elastic_ip_allocation_id {
            check_aws_id(id, "eipalloc-").map_err(|m| ("elastic_ip_allocation_id", m))?;
        }
        for rt in &self.route_tables {
            check_aws_id(rt, "rtb-").map_err(|m| ("route_tables", m))?;
        }
        check_interface(&self.interface).map_err(|m| ("interface", m))?;
        for (key, v) in [
            ("secondary_ip", &self.secondary_ip),
            ("overlay_ip", &self.overlay_ip),
        ] {
            if let Some(ip) = v {
                ip.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| (key, format!("{ip:?} is not an IPv4 address")))?;
            }
        }
        match (&self.overlay_ip, self.route_tables.is_empty()) {
            (Some(_), true) => {
                return Err((
                    "route_tables",
                    "overlay_ip needs at least one route table to point at the primary".into(),
                ))
            }
            (None, false) => {
                return Err((
                    "overlay_ip",
                    "route_tables are set but overlay_ip (the routed address) is not".into(),
                ))
            }
            _ => {}
        }
        if self.fencing_timeout.0 < std::time::Duration::from_secs(1) {
            return Err(("fencing_timeout", "must be at least 1s".into()));
        }
        if self.permission_check_interval.0 < std::time::Duration::from_secs(10) {
            return Err((
                "permission_check_interval",
                "must be at least 10s (DryRun calls count against the EC2 API rate limit)".into(),
            ));
        }
        Ok(())
    }
}

/// A validation failure before it is located in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub section: String,
    pub index: Option<usize>,
    pub key: String,
    pub message: String,
}

/// Names of nodes, clusters and roles: letters, digits, `_` and `-`, at most 63 characters,
/// starting with a letter. Node names become replication slot names (with `-` mapped to `_`).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use 1-63 letters, digits, '_' or '-', starting with a letter"
        ))
    }
}

/// A PostgreSQL parameter name: letters, digits, `_` and `.` (for extensions' settings).
pub fn check_param_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        Ok(())
    } else {
        Err(format!("{name:?} is not a parameter name"))
    }
}

/// A member's identity in the replicated log: a stable 64-bit hash (FNV-1a) of its name, so
/// that the order of `cluster.members` does not matter. Never 0.
pub fn member_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// The physical replication slot a member streams through.
pub fn slot_name(member: &str) -> String {
    member.to_ascii_lowercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "n1"
state_dir = "/var/lib/pgwarden"
loop_wait = "500ms"

[cluster]
name = "main"
initial_primary = "n1"

[[cluster.members]]
name = "n1"
host = "10.0.0.11"

[[cluster.members]]
name = "n2"
host = "10.0.0.12"
pg_port = 5433

[api]
token = "0123456789abcdef0123"

[postgresql]
data_dir = "/var/lib/postgresql/15/main"
superuser_password = "pw"
replication_password = "rpw"

[postgresql.parameters]
max_connections = 200
shared_buffers = "128MB"
"#;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(t, "/etc/pgwarden/agent.toml")
    }

    #[test]
    fn endpoint_sections_are_validated_with_the_key_and_line() {
        let ok = format!(
            "{GOOD}\n[vip]\naddress = \"10.0.0.100/24\"\nlabel = \"eth0:pg\"\n\n[aws]\nsecondary_ip = \"10.0.0.100\"\nfencing = \"stop\"\n"
        );
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.vip.as_ref().unwrap().interface, "eth0");
        assert_eq!(cfg.aws.as_ref().unwrap().fencing, Fencing::Stop);
        let cases = [
            ("[vip]\naddress = \"10.0.0.100\"\n", "vip.address", "prefix"),
            (
                "[vip]\naddress = \"10.0.0.100/24\"\nlabel = \"pg\"\n",
                "vip.label",
                "eth0:",
            ),
            (
                "[aws]\nsecondary_ip = \"10.0.0\"\n",
                "aws.secondary_ip",
                "IPv4",
            ),
            (
                "[aws]\noverlay_ip = \"192.168.1.1\"\n",
                "aws.route_tables",
                "overlay_ip",
            ),
            (
                "[aws]\nroute_tables = [\"rtb-1\"]\n",
                "aws.overlay_ip",
                "route_tables",
            ),
            (
                "[aws]\nelastic_ip_allocation_id = \"eip-1\"\n",
                "aws.elastic_ip_allocation_id",
                "eipalloc-",
            ),
            (
                "[aws]\nendpoint_url = \"localhost:5000\"\n",
                "aws.endpoint_url",
                "URL",
            ),
            (
                "[aws]\npermission_check_interval = \"1s\"\n",
                "aws.permission_check_interval",
                "10s",
            ),
        ];
        for (extra, key, why) in cases {
            let text = format!("{GOOD}\n{extra}");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
            assert!(e.message.contains(why), "{extra}: {e}");
            let line = text
                .lines()
                .position(|l| l.starts_with(key.rsplit('.').next().unwrap()));
            assert_eq!(e.line, line.map(|l| l + 1), "{extra}: {e}");
        }
        let e = parse(&format!("{GOOD}\n[aws]\nfencing = \"kill\"\n")).unwrap_err();
        assert!(e.to_string().contains("fencing"), "{e}");
        let e = parse(&format!("{GOOD}\n[vip]\naddres = \"10.0.0.1/24\"\n")).unwrap_err();
        assert!(e.to_string().contains("addres"), "{e}");
    }

    #[test]
    fn server_section_is_optional_and_validated() {
        assert_eq!(parse(GOOD).unwrap().server, None);
        let c = parse(&format!(
            "{GOOD}\n[server]\nurl = \"https://cp.example.net:9443/\"\n"
        ))
        .unwrap();
        let srv = c.server.unwrap();
        assert_eq!(srv.report_interval, ConfDuration::secs(2));
        assert_eq!(srv.base_url(), "https://cp.example.net:9443");
        let c = parse(&format!(
            "{GOOD}\n[server]\nurl = \"https://10.0.0.5:9443\"\nreport_interval = \"500ms\"\n"
        ))
        .unwrap();
        assert_eq!(c.server.unwrap().report_interval, ConfDuration::millis(500));
        let cases = [
            ("url = \"http://cp:9443\"\n", "server.url", "https://"),
            ("url = \"https://\"\n", "server.url", "such as"),
            ("url = \"https://:9443\"\n", "server.url", "such as"),
            (
                "url = \"https://cp:9443\"\nreport_interval = \"10ms\"\n",
                "server.report_interval",
                "100ms",
            ),
            (
                "url = \"https://cp:9443\"\nreport_interval = \"2h\"\n",
                "server.report_interval",
                "1h",
            ),
        ];
        for (extra, key, why) in cases {
            let text = format!("{GOOD}\n[server]\n{extra}");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
            assert!(e.message.contains(why), "{extra}: {e}");
            let name = key.rsplit('.').next().unwrap();
            let line = text.lines().position(|l| l.starts_with(name));
            assert_eq!(e.line, line.map(|l| l + 1), "{extra}: {e}");
        }
        let e = parse(&format!(
            "{GOOD}\n[server]\nurl = \"https://cp\"\nurll = \"x\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.urll"), "{e}");
        assert!(e.message.contains("urll"), "{e}");
        let e = parse(&format!("{GOOD}\n[server]\nreport_interval = \"2s\"\n")).unwrap_err();
        assert!(e.message.contains("missing field `url`"), "{e}");
        let e = parse(&format!(
            "{GOOD}\n[server]\nurl = \"https://cp\"\nreport_interval = \"soon\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.report_interval"), "{e}");
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.loop_wait, ConfDuration::millis(500));
        assert_eq!(c.me().pg_port, 5432);
        assert_eq!(c.member("n2").unwrap().pg_port, 5433);
        assert_eq!(c.health_listen(), "0.0.0.0:8008");
        assert_eq!(c.api_listen(), "0.0.0.0:8443");
        assert_eq!(c.postgresql.os_user, "postgres");
        assert_eq!(
            c.peers().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["n2"]
        );
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let t = GOOD.replace("loop_wait = \"500ms\"", "loop_wiat = \"500ms\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.file, "/etc/pgwarden/agent.toml");
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("loop_wiat"), "{e}");
        assert!(
            e.to_string().starts_with("/etc/pgwarden/agent.toml:5: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_member_table() {
        let t = GOOD.replace("pg_port = 5433", "pgport = 5433");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.line, Some(18));
        assert!(e.message.contains("pgport"), "{e}");
    }

    #[test]
    fn a_witness_cannot_be_the_initial_primary() {
        let t = GOOD.replace("pg_port = 5433", "pg_port = 5433\nwitness = true");
        let c = parse(&t).unwrap();
        assert!(c.member("n2").unwrap().witness);
        let t = t.replace("initial_primary = \"n1\"", "initial_primary = \"n2\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("cluster.initial_primary"), "{e}");
        assert!(e.message.contains("witness"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let t = GOOD.replace("pg_port = 5433", "pg_port = \"fast\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.line, Some(18));
        assert_eq!(e.key.as_deref(), Some("cluster.members.pg_port"), "{e}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let t = GOOD.replace("\"500ms\"", "\"5 parsecs\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.line, Some(5));
        assert_eq!(e.key.as_deref(), Some("node.loop_wait"));
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = parse("[node]\nname = \n").unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn missing_section_is_named() {
        let e = parse("[node]\nname = \"n1\"\n").unwrap_err();
        assert!(e.message.contains("missing field"), "{e}");
    }

    #[test]
    fn node_must_be_a_member() {
        let t = GOOD.replace("name = \"n1\"\nstate_dir", "name = \"n9\"\nstate_dir");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("node.name"));
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("n1, n2"), "{e}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let cases = [
            (
                "initial_primary = \"n1\"",
                "initial_primary = \"zz\"",
                "cluster.initial_primary",
                9,
            ),
            (
                "loop_wait = \"500ms\"",
                "loop_wait = \"10ms\"",
                "node.loop_wait",
                5,
            ),
            (
                "token = \"0123456789abcdef0123\"",
                "token = \"short\"",
                "api.token",
                21,
            ),
            (
                "shared_buffers = \"128MB\"",
                "port = 6543",
                "postgresql.parameters.port",
                30,
            ),
            (
                "host = \"10.0.0.12\"",
                "host = \"10.0.0.11\"\nname = \"n1\"",
                "",
                0,
            ),
        ];
        for (from, to, key, line) in cases {
            let t = GOOD.replace(from, to);
            let e = parse(&t).unwrap_err();
            if key.is_empty() {
                continue; // duplicate key is a TOML error, covered elsewhere
            }
            assert_eq!(e.key.as_deref(), Some(key), "{to}: {e}");
            assert_eq!(e.line, Some(line), "{to}: {e}");
        }
    }

    #[test]
    fn tags_default_and_conflicts() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tags, Tags::default());
        assert_eq!(c.tags.effective_failover_priority(), 1);
        assert_eq!(c.tags.effective_sync_priority(), 1);
        let with = |tags: &str| parse(&format!("{GOOD}\n[tags]\n{tags}\n"));
        let c = with("failover_priority = 5\nnoloadbalance = true\nclonefrom = true").unwrap();
        assert_eq!(c.tags.effective_failover_priority(), 5);
        assert!(c.tags.noloadbalance && c.tags.clonefrom);
        assert_eq!(
            with("nofailover = true")
                .unwrap()
                .tags
                .effective_failover_priority(),
            0
        );
        assert_eq!(
            with("nofailover = true\nfailover_priority = 0")
                .unwrap()
                .tags
                .effective_failover_priority(),
            0
        );
        let e = with("nofailover = true\nfailover_priority = 3").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tags.failover_priority"), "{e}");
        assert!(e.line.is_some(), "{e}");
        let e = with("nosync = true\nsync_priority = 2").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tags.sync_priority"), "{e}");
        assert_eq!(
            with("nosync = true")
                .unwrap()
                .tags
                .effective_sync_priority(),
            0
        );
        let e = with("noloadbalancing = true").unwrap_err();
        assert!(e.message.contains("noloadbalancing"), "{e}");
    }

    #[test]
    fn duplicate_member_is_refused() {
        let t = GOOD.replace("name = \"n2\"", "name = \"n1\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("cluster.members[1].name"));
        assert_eq!(e.line, Some(16));
    }

    #[test]
    fn wal_level_minimal_is_refused() {
        let t = GOOD.replace("max_connections = 200", "wal_level = \"minimal\"");
        let e = parse(&t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("postgresql.parameters.wal_level"));
    }

    #[test]
    fn member_ids_are_stable_and_distinct() {
        assert_eq!(member_id("n1"), member_id("n1"));
        assert_ne!(member_id("n1"), member_id("n2"));
        assert_eq!(
            member_id("a"),
            0xaf63_dc4c_8601_ec8c,
            "FNV-1a 64 test vector"
        );
    }

    #[test]
    fn names_and_slots() {
        assert!(check_name("pg-1").is_ok());
        assert!(check_name("1pg").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("").is_err());
        assert_eq!(slot_name("PG-1"), "pg_1");
    }
}
