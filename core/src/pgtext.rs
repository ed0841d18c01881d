//! PostgreSQL's text formats, read and written without touching a file: `pg_controldata`
//! output, timeline history files, `PG_VERSION`, `postgresql.auto.conf`, conninfo strings,
//! `pg_basebackup --progress` lines, and the configuration files the agent generates.

use crate::config::{slot_name, AgentConfig, Member};
use crate::lsn::Lsn;
use std::collections::BTreeMap;

/// The fields of `pg_controldata` the agent decides on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlData {
    /// `Database cluster state`: `shut down`, `shut down in recovery`, `in production`, …
    pub state: String,
    pub system_identifier: String,
    pub checkpoint_timeline: u32,
    pub checkpoint_lsn: Lsn,
    pub min_recovery_end_lsn: Lsn,
    pub min_recovery_end_timeline: u32,
}

impl ControlData {
    /// Shut down cleanly (as a primary or as a standby).
    pub fn clean_shutdown(&self) -> bool {
        self.state == "shut down" || self.state == "shut down in recovery"
    }
}

/// Parses `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse_controldata(text: &str) -> Result<ControlData, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            map.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let get = |k: &str| {
        map.get(k)
            .cloned()
            .ok_or_else(|| format!("pg_controldata output lacks {k:?}"))
    };
    let num = |k: &str| -> Result<u32, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("pg_controldata: {k:?} is not a number"))
    };
    let lsn = |k: &str| -> Result<Lsn, String> {
        get(k)?
            .parse()
            .map_err(|e| format!("pg_controldata: {k:?}: {e}"))
    };
    Ok(ControlData {
        state: get("Database cluster state")?,
        system_identifier: get("Database system identifier")?,
        checkpoint_timeline: num("Latest checkpoint's TimeLineID")?,
        checkpoint_lsn: lsn("Latest checkpoint location")?,
        min_recovery_end_lsn: lsn("Minimum recovery ending location")?,
        min_recovery_end_timeline: num("Min recovery ending loc's timeline")?,
    })
}

/// One line of a timeline history file: timeline `tli` ended at `switchpoint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: u32,
    pub switchpoint: Lsn,
}

/// Parses a `0000000N.history` file.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut parts = l.split_whitespace();
        let tli = parts
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("bad history line {l:?}"))?;
        let switchpoint = parts
            .next()
            .ok_or_else(|| format!("bad history line {l:?}"))?
            .parse()
            .map_err(|e| format!("bad history line {l:?}: {e}"))?;
        out.push(HistoryEntry { tli, switchpoint });
    }
    Ok(out)
}

/// Whether a node must be rewound before it can stream from an upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewindNeed {
    No,
    Yes(String),
    /// The local end of WAL is not known (crashed primary): let pg_rewind compare.
    Unknown(String),
}

/// What is known of where a node's WAL ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalEnd {
    /// A WAL record starts here (a cleanly stopped primary's shutdown checkpoint): the WAL
    /// extends past this point.
    RecordStart(Lsn),
    /// The end of the last record this node applied (`pg_last_wal_replay_lsn()` on a running
    /// replica). WAL received but not replayed does not count: when PostgreSQL follows the new
    /// timeline it ignores what lies past the fork point.
    ReplayedEnd(Lsn),
    Unknown,
}

/// Decides whether a node whose WAL ends at `local_end` on timeline `local_tli` can follow an
/// upstream on `upstream_tli` with `history` (the upstream's timeline history), or diverged.
pub fn rewind_need(
    local_tli: u32,
    local_end: LocalEnd,
    upstream_tli: u32,
    history: &[HistoryEntry],
) -> RewindNeed {
    if local_tli == upstream_tli {
        return RewindNeed::No;
    }
    if local_tli > upstream_tli {
        return RewindNeed::Yes(format!(
            "local timeline {local_tli} is newer than the upstream's {upstream_tli}"
        ));
    }
    let Some(entry) = history.iter().find(|h| h.tli == local_tli) else {
        return RewindNeed::Yes(format!(
            "local timeline {local_tli} is not in the upstream's history"
        ));
    };
    let fork = entry.switchpoint;
    match local_end {
        LocalEnd::Unknown => RewindNeed::Unknown(format!(
            "the local end of WAL on timeline {local_tli} is unknown"
        )),
        LocalEnd::RecordStart(l) if l >= fork => RewindNeed::Yes(format!(
            "local WAL has a record at {l}, at or after the upstream left timeline {local_tli} at {fork}"
        )),
        LocalEnd::ReplayedEnd(l) if l > fork => RewindNeed::Yes(format!(
            "local WAL was replayed up to {l}, after the upstream left timeline {local_tli} at {fork}"
        )),
        _ => RewindNeed::No,
    }
}

/// Where a stopped node's WAL is known to end, from its control data. A clean primary
/// shutdown ends with its shutdown checkpoint record; anything else is unknown.
pub fn known_end_of_wal(cd: &ControlData) -> LocalEnd {
    if cd.state == "shut down" {
        LocalEnd::RecordStart(cd.checkpoint_lsn)
    } else {
        LocalEnd::Unknown
    }
}

/// Major version from the text of `PG_VERSION` (`15`, or `9.6` for old clusters → 9).
pub fn parse_pg_version_file(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let major = t.split('.').next().unwrap_or("");
    major
        .parse()
        .map_err(|_| format!("PG_VERSION holds {t:?}, not a PostgreSQL version"))
}

/// Major version from `postgres --version` (`postgres (PostgreSQL) 15.18 (Debian 15.18-0)`).
pub fn parse_postgres_version_output(text: &str) -> Result<u32, String> {
    let word = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .ok_or_else(|| format!("no version in {text:?}"))?;
    parse_pg_version_file(word)
}

/// Progress from a `pg_basebackup --progress` line such as
/// `  24316/47318 kB (51%), 0/1 tablespace (...)`.
pub fn parse_basebackup_progress(line: &str) -> Option<(u64, u64)> {
    let t = line.trim();
    let (nums, rest) = t.split_once(' ')?;
    if !rest.trim_start().starts_with("kB") {
        return None;
    }
    let (done, total) = nums.split_once('/')?;
    Some((
        done.parse::<u64>().ok()? * 1024,
        total.parse::<u64>().ok()? * 1024,
    ))
}

/// Quotes a value for `postgresql.conf` / `postgresql.auto.conf`.
pub fn quote_conf(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a value inside a libpq conninfo string.
pub fn quote_conninfo(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && c != '\'' && c != '\\')
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Parses a libpq conninfo string (`host=a port=5432 user='x y'`).
pub fn parse_conninfo(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() || chars[i] != '=' {
            break;
        }
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let mut val = String::new();
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                val.push(chars[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                val.push(chars[i]);
                i += 1;
            }
        }
        if !key.is_empty() {
            out.insert(key, val);
        }
    }
    out
}

/// Parses one configuration-file value (quoted or bare).
pub fn unquote_conf(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        inner.replace("''", "'").replace("\\\\", "\\")
    } else {
        v.to_string()
    }
}

/// Reads the settings of a `postgresql.auto.conf`; the last occurrence of a key wins.
pub fn read_auto_conf(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            out.insert(k.trim().to_string(), unquote_conf(v));
        }
    }
    out
}

/// Rewrites `postgresql.auto.conf`: each key in `set` is removed wherever it appears (pg_rewind
/// and pg_basebackup `-R` append duplicates) and, when it has a value, written once at the end.
pub fn rewrite_auto_conf(existing: &str, set: &[(&str, Option<&str>)]) -> String {
    let mut out = String::new();
    for line in existing.lines() {
        let key = line.split_once('=').map(|(k, _)| k.trim());
        let replaced = key.is_some_and(|k| {
            !line.trim_start().starts_with('#') && set.iter().any(|(s, _)| *s == k)
        });
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    if out.is_empty() {
        out.push_str("# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n");
    }
    for (k, v) in set {
        if let Some(v) = v {
            out.push_str(&format!("{k} = {}\n", quote_conf(v)));
        }
    }
    out
}

/// Which member a `primary_conninfo` points at, by host and port.
pub fn member_for_conninfo<'a>(conninfo: &str, members: &'a [Member]) -> Option<&'a Member> {
    let ci = parse_conninfo(conninfo);
    let host = ci.get("host").or_else(|| ci.get("hostaddr"))?;
    let port: u16 = ci.get("port").and_then(|p| p.parse().ok()).unwrap_or(5432);
    members
        .iter()
        .find(|m| &m.host == host && m.pg_port == port)
}

/// The `primary_conninfo` a replica uses to stream from `upstream`.
pub fn primary_conninfo(cfg: &AgentConfig, upstream: &Member, passfile: &str) -> String {
    [
        ("host", upstream.host.as_str()),
        ("port", &upstream.pg_port.to_string()),
        ("user", cfg.postgresql.replication_user.as_str()),
        ("passfile", passfile),
        ("application_name", cfg.node.name.as_str()),
        ("sslmode", "prefer"),
        ("connect_timeout", "3"),
        ("keepalives", "1"),
        ("keepalives_idle", "5"),
        ("keepalives_interval", "2"),
        ("keepalives_count", "3"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", quote_conninfo(v)))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Renders one parameter value from the config for `postgresql.conf`.
pub fn conf_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => quote_conf(s),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
        other => quote_conf(&other.to_string()),
    }
}

/// The `postgresql.conf` the agent writes into the data directory before every start. Per-node
/// settings (port, addresses, socket, cluster name) are passed on the command line instead,
/// because pg_basebackup and pg_rewind copy this file between nodes.
pub fn render_postgresql_conf(
    cfg: &AgentConfig,
    major: u32,
    dynamic: &crate::dynconfig::DynamicConfig,
) -> String {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let n = cfg.cluster.members.len();
    let defaults: [(&str, String); 9] = [
        ("wal_level", "replica".into()),
        ("wal_log_hints", "on".into()),
        ("max_wal_senders", (n + 5).max(10).to_string()),
        ("max_replication_slots", (n + 5).max(10).to_string()),
        ("hot_standby_feedback", "on".into()),
        ("wal_receiver_status_interval", quote_conf("1s")),
        ("wal_retrieve_retry_interval", quote_conf("1s")),
        ("password_encryption", quote_conf("scram-sha-256")),
        ("unix_socket_permissions", "0700".into()),
    ];
    for (k, v) in defaults {
        params.insert(k.into(), v);
    }
    if major >= 13 {
        params.insert("wal_keep_size".into(), quote_conf("128MB"));
    } else {
        params.insert("wal_keep_segments".into(), "8".into());
    }
    for (k, v) in &cfg.postgresql.parameters {
        params.insert(k.clone(), conf_value(v));
    }
    // The cluster's dynamic configuration overrides the node file's defaults.
    for (k, v) in &dynamic.parameters {
        params.insert(k.clone(), v.clone());
    }
    params.insert("hot_standby".into(), "on".into());
    let mut out = String::from(
        "# Written by pgwarden-agent before every start; edits here are overwritten.\n\
         # Set parameters in [postgresql.parameters] of the agent's configuration instead.\n",
    );
    for (k, v) in params {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

/// The `pg_hba.conf` the agent writes: local and loopback access with passwords, replication
/// and superuser access from every member, then the configured extra lines.
pub fn render_pg_hba(cfg: &AgentConfig, dynamic: &crate::dynconfig::DynamicConfig) -> String {
    let pg = &cfg.postgresql;
    let mut out = String::from(
        "# Written by pgwarden-agent before every start; edits here are overwritten.\n\
         # Add rules with postgresql.pg_hba in the agent's configuration.\n\
         local   all             all                                     scram-sha-256\n\
         host    all             all             127.0.0.1/32            scram-sha-256\n\
         host    all             all             ::1/128                 scram-sha-256\n\
         local   replication     all                                     scram-sha-256\n\
         host    replication     all             127.0.0.1/32            scram-sha-256\n",
    );
    for m in &cfg.cluster.members {
        let addr = host_cidr(&m.host);
        out.push_str(&format!(
            "host    replication     {:<15} {:<23} scram-sha-256\n",
            pg.replication_user, addr
        ));
        out.push_str(&format!(
            "host    all             {:<15} {:<23} scram-sha-256\n",
            pg.superuser, addr
        ));
    }
    for l in pg.pg_hba.iter().chain(&dynamic.pg_hba) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `10.0.0.1` → `10.0.0.1/32`; names are left as names (pg_hba resolves them).
fn host_cidr(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => format!("{host}/32"),
        Ok(std::net::IpAddr::V6(_)) => format!("{host}/128"),
        Err(_) => host.to_string(),
    }
}

/// A `.pgpass` file with the replication and superuser passwords for every member.
pub fn render_pgpass(cfg: &AgentConfig, superuser_pw: &str, replication_pw: &str) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let mut out = String::new();
    for (user, pw) in [
        (&cfg.postgresql.replication_user, replication_pw),
        (&cfg.postgresql.superuser, superuser_pw),
    ] {
        out.push_str(&format!("*:*:*:{}:{}\n", esc(user), esc(pw)));
    }
    out
}

/// The slots a node keeps for the other members, so any of them can stream from it.
pub fn member_slots(cfg: &AgentConfig) -> Vec<String> {
    cfg.peers().map(|m| slot_name(&m.name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROLDATA: &str = "pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7301234567890123456
Database cluster state:               shut down
pg_control last modified:             Sun 22 Nov 2026 05:00:00 AM UTC
Latest checkpoint location:           0/3000028
Latest checkpoint's REDO location:    0/3000028
Latest checkpoint's REDO WAL file:    000000010000000000000003
Latest checkpoint's TimeLineID:       1
Latest checkpoint's PrevTimeLineID:   1
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
Data page checksum version:           1
";

    #[test]
    fn controldata() {
        let cd = parse_controldata(CONTROLDATA).unwrap();
        assert_eq!(cd.state, "shut down");
        assert_eq!(cd.system_identifier, "7301234567890123456");
        assert_eq!(cd.checkpoint_timeline, 1);
        assert_eq!(cd.checkpoint_lsn, "0/3000028".parse().unwrap());
        assert!(cd.clean_shutdown());
        assert_eq!(
            known_end_of_wal(&cd),
            LocalEnd::RecordStart("0/3000028".parse().unwrap())
        );
        let crashed =
            parse_controldata(&CONTROLDATA.replace("shut down", "in production")).unwrap();
        assert!(!crashed.clean_shutdown());
        assert_eq!(known_end_of_wal(&crashed), LocalEnd::Unknown);
        assert!(parse_controldata("garbage").is_err());
    }

    #[test]
    fn history_and_rewind() {
        let h = parse_history("1\t0/5000100\tno recovery target specified\n\n2\t0/7000000\tx\n")
            .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].tli, 1);
        assert_eq!(h[0].switchpoint, "0/5000100".parse().unwrap());
        let rec = |s: &str| LocalEnd::RecordStart(s.parse().unwrap());
        let rep = |s: &str| LocalEnd::ReplayedEnd(s.parse().unwrap());
        assert_eq!(rewind_need(1, rec("0/9000000"), 1, &[]), RewindNeed::No);
        // Clean switchover: the new primary replayed the old one's shutdown checkpoint.
        assert_eq!(rewind_need(1, rec("0/5000028"), 2, &h[..1]), RewindNeed::No);
        // The shutdown checkpoint itself starts at the fork: it was not replayed upstream.
        assert!(matches!(
            rewind_need(1, rec("0/5000100"), 2, &h[..1]),
            RewindNeed::Yes(_)
        ));
        // A replica that replayed exactly up to the fork point can follow.
        assert_eq!(rewind_need(1, rep("0/5000100"), 2, &h[..1]), RewindNeed::No);
        assert!(matches!(
            rewind_need(1, rep("0/5000101"), 2, &h[..1]),
            RewindNeed::Yes(_)
        ));
        assert!(matches!(
            rewind_need(1, LocalEnd::Unknown, 2, &h[..1]),
            RewindNeed::Unknown(_)
        ));
        assert!(matches!(
            rewind_need(3, rep("0/1"), 2, &h),
            RewindNeed::Yes(_)
        ));
        assert!(matches!(
            rewind_need(4, rep("0/1"), 5, &h),
            RewindNeed::Yes(_)
        ));
        // Two timeline switches later: the fork point of our own timeline counts.
        assert_eq!(rewind_need(2, rep("0/6000000"), 3, &h), RewindNeed::No);
        assert!(matches!(
            rewind_need(2, rep("0/8000000"), 3, &h),
            RewindNeed::Yes(_)
        ));
        assert!(parse_history("x y").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_pg_version_file("15\n").unwrap(), 15);
        assert_eq!(parse_pg_version_file("9.6").unwrap(), 9);
        assert!(parse_pg_version_file("hello").is_err());
        assert_eq!(
            parse_postgres_version_output("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n")
                .unwrap(),
            15
        );
        assert_eq!(
            parse_postgres_version_output("postgres (PostgreSQL) 12.4").unwrap(),
            12
        );
    }

    #[test]
    fn basebackup_progress() {
        assert_eq!(
            parse_basebackup_progress("  24316/47318 kB (51%), 0/1 tablespace (...base/1/123)"),
            Some((24316 * 1024, 47318 * 1024))
        );
        assert_eq!(
            parse_basebackup_progress("0/23456 kB (0%), 0/1 tablespace"),
            Some((0, 23456 * 1024))
        );
        assert_eq!(
            parse_basebackup_progress("pg_basebackup: checkpoint completed"),
            None
        );
        assert_eq!(parse_basebackup_progress(""), None);
    }

    #[test]
    fn conninfo_roundtrip() {
        let ci = parse_conninfo("host=10.0.0.1 port=5433 user='rep user' passfile=/x/y application_name=n2 password='it''s'");
        assert_eq!(ci["host"], "10.0.0.1");
        assert_eq!(ci["port"], "5433");
        assert_eq!(ci["user"], "rep user");
        assert_eq!(quote_conninfo("a b"), "'a b'");
        assert_eq!(quote_conninfo("abc"), "abc");
        let q = format!("x={}", quote_conninfo("it's"));
        assert_eq!(parse_conninfo(&q)["x"], "it's");
    }

    #[test]
    fn auto_conf_rewrite_removes_duplicates() {
        let existing = "# Do not edit this file manually!\n\
            primary_conninfo = 'host=a port=1'\n\
            work_mem = '8MB'\n\
            primary_conninfo = 'host=b port=2'\n";
        let out = rewrite_auto_conf(
            existing,
            &[
                ("primary_conninfo", Some("host=c port=3 user='x'")),
                ("primary_slot_name", Some("n2")),
            ],
        );
        assert_eq!(out.matches("primary_conninfo").count(), 1, "{out}");
        assert!(out.contains("work_mem = '8MB'"));
        let read = read_auto_conf(&out);
        assert_eq!(read["primary_conninfo"], "host=c port=3 user='x'");
        assert_eq!(read["primary_slot_name"], "n2");
        let cleared = rewrite_auto_conf(
            &out,
            &[("primary_conninfo", None), ("primary_slot_name", None)],
        );
        assert!(!cleared.contains("primary_"), "{cleared}");
        assert!(rewrite_auto_conf("", &[]).starts_with("# Do not edit"));
    }

    fn cfg() -> AgentConfig {
        AgentConfig::parse(
            r#"
[node]
name = "n2"
[cluster]
name = "c"
initial_primary = "n1"
[[cluster.members]]
name = "n1"
host = "10.0.0.11"
[[cluster.members]]
name = "n2"
host = "10.0.0.12"
pg_port = 5433
[api]
token = "0123456789abcdef"
[postgresql]
data_dir = "/d"
superuser_password = "s"
replication_password = "r:x"
pg_hba = ["host all all 10.0.0.0/24 scram-sha-256"]
[postgresql.parameters]
max_connections = 50
log_connections = true
shared_buffers = "64MB"
"#,
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn conninfo_maps_to_member() {
        let c = cfg();
        let ci = primary_conninfo(&c, c.member("n1").unwrap(), "/state/pgpass");
        assert!(ci.contains("application_name=n2"), "{ci}");
        assert_eq!(
            member_for_conninfo(&ci, &c.cluster.members).unwrap().name,
            "n1"
        );
        assert!(member_for_conninfo("host=10.0.0.12 port=5432", &c.cluster.members).is_none());
        assert_eq!(
            member_for_conninfo("host=10.0.0.12 port=5433", &c.cluster.members)
                .unwrap()
                .name,
            "n2"
        );
    }

    #[test]
    fn generated_files() {
        let c = cfg();
        let mut dynamic = crate::dynconfig::DynamicConfig::default();
        dynamic
            .parameters
            .insert("max_connections".into(), "70".into());
        dynamic
            .pg_hba
            .push("host all all 10.1.0.0/16 scram-sha-256".into());
        let conf = render_postgresql_conf(&c, 15, &crate::dynconfig::DynamicConfig::default());
        assert!(conf.contains("max_connections = 50\n"));
        assert!(conf.contains("log_connections = on\n"));
        assert!(conf.contains("shared_buffers = '64MB'\n"));
        assert!(conf.contains("wal_log_hints = on\n"));
        assert!(conf.contains("hot_standby = on\n"));
        assert!(conf.contains("wal_keep_size"));
        assert!(render_postgresql_conf(&c, 12, &dynamic).contains("wal_keep_segments"));
        assert!(
            render_postgresql_conf(&c, 15, &dynamic).contains("max_connections = 70\n"),
            "the dynamic configuration overrides the node file"
        );
        assert!(render_pg_hba(&c, &dynamic).ends_with("host all all 10.1.0.0/16 scram-sha-256\n"));
        let hba = render_pg_hba(&c, &crate::dynconfig::DynamicConfig::default());
        assert!(
            hba.contains("replication     replicator      10.0.0.11/32"),
            "{hba}"
        );
        assert!(hba.ends_with("host all all 10.0.0.0/24 scram-sha-256\n"));
        assert_eq!(
            render_pgpass(&c, "s", "r:x"),
            "*:*:*:replicator:r\\:x\n*:*:*:postgres:s\n"
        );
        assert_eq!(member_slots(&c), vec!["n1"]);
    }
}
