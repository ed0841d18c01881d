//! Control of the local PostgreSQL: its files, its process and its SQL. Every function here is
//! one step that the executor combines; none of them decides what to do.

use crate::sys;
use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::config::{slot_name, AgentConfig, Member};
use pgwarden_core::decide::DataDir;
use pgwarden_core::lsn::Lsn;
use pgwarden_core::pgtext::{self, ControlData, HistoryEntry};
use pgwarden_core::status::{ReplicationConn, WalReceiver};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_postgres::{Client, NoTls};

/// How the agent knows its postmaster: started by this agent, or found running at startup.
enum Handle {
    Child(tokio::process::Child),
    Adopted(i32),
}

/// What one status query returned.
#[derive(Debug, Default, Clone)]
pub struct SqlStatus {
    pub in_recovery: bool,
    pub server_version: u32,
    pub system_identifier: String,
    pub started: String,
    pub write: Option<Lsn>,
    pub flush: Option<Lsn>,
    pub received: Option<Lsn>,
    pub replayed: Option<Lsn>,
    pub timeline: Option<u32>,
    pub pending_restart: Vec<String>,
    pub wal_receiver: Option<WalReceiver>,
    pub replication: Vec<ReplicationConn>,
    /// `synchronous_standby_names` in effect.
    pub synchronous_standby_names: String,
}

pub struct Pg {
    pub cfg: Arc<AgentConfig>,
    pub bin: PathBuf,
    pub data: PathBuf,
    pub state_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub passfile: PathBuf,
    /// uid/gid PostgreSQL runs as when the agent is root.
    owner: Option<(u32, u32)>,
    pub superuser_pw: String,
    pub replication_pw: String,
    pub major: u32,
    /// The cluster's dynamic configuration, as last applied from the replicated log.
    pub dynamic: pgwarden_core::dynconfig::DynamicConfig,
    handle: Option<Handle>,
    client: Option<Client>,
    /// Set by `stop`, so that an exit the agent caused is not reported as a crash.
    stopping: bool,
}

fn lsn_opt(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

/// Reads a column without panicking on an unexpected NULL or type: input from PostgreSQL must
/// not be able to crash the agent.
fn col<T>(r: &tokio_postgres::Row, i: usize) -> Option<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    r.try_get::<_, Option<T>>(i).ok().flatten()
}

impl Pg {
    pub fn new(
        cfg: Arc<AgentConfig>,
        superuser_pw: String,
        replication_pw: String,
        major: u32,
    ) -> Result<Pg> {
        let owner = if sys::is_root() {
            Some(sys::lookup_user(&cfg.postgresql.os_user)?)
        } else {
            None
        };
        let state_dir = PathBuf::from(&cfg.node.state_dir);
        Ok(Pg {
            bin: PathBuf::from(&cfg.postgresql.bin_dir),
            data: PathBuf::from(&cfg.postgresql.data_dir),
            socket_dir: PathBuf::from(&cfg.postgresql.socket_dir),
            passfile: state_dir.join("pgpass"),
            state_dir,
            owner,
            superuser_pw,
            replication_pw,
            major,
            dynamic: Default::default(),
            handle: None,
            client: None,
            stopping: false,
            cfg,
        })
    }

    /// Major version of the binaries in `bin_dir`.
    pub async fn binary_major(bin_dir: &str) -> Result<u32> {
        let out = tokio::process::Command::new(Path::new(bin_dir).join("postgres"))
            .arg("--version")
            .output()
            .await
            .with_context(|| format!("run {bin_dir}/postgres --version"))?;
        pgtext::parse_postgres_version_output(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| anyhow!(e))
    }

    /// Creates the directories and files the agent and PostgreSQL need.
    pub fn prepare_dirs(&self) -> Result<()> {
        std::fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("create state_dir {}", self.state_dir.display()))?;
        sys::set_owner_mode(&self.state_dir, None, 0o755)?;
        std::fs::create_dir_all(&self.socket_dir)
            .with_context(|| format!("create socket_dir {}", self.socket_dir.display()))?;
        sys::set_owner_mode(&self.socket_dir, self.owner, 0o700)?;
        let pgpass = pgtext::render_pgpass(&self.cfg, &self.superuser_pw, &self.replication_pw);
        std::fs::write(&self.passfile, pgpass).context("write pgpass")?;
        sys::set_owner_mode(&self.passfile, self.owner, 0o600)?;
        Ok(())
    }

    /// A command that runs as PostgreSQL's user, with the password file and C locale.
    fn command(&self, prog: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c.env("PGPASSFILE", &self.passfile)
            .env("LC_ALL", "C")
            .env_remove("PGPASSWORD")
            .current_dir("/")
            .stdin(Stdio::null());
        c
    }

    /// Runs a PostgreSQL program to completion; a failure carries the end of its stderr.
    async fn run(&self, prog: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(prog)
            .args(args)
            .output()
            .await
            .with_context(|| format!("run {prog}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{prog} failed ({}): {}", out.status, tail.join(" | "));
        }
        Ok(stdout + &String::from_utf8_lossy(&out.stderr))
    }

    pub fn data_dir_state(&self) -> DataDir {
        let d = &self.data;
        match std::fs::metadata(d) {
            Err(_) => return DataDir::Empty,
            Ok(m) if !m.is_dir() => return DataDir::NotPostgres("it is not a directory".into()),
            Ok(_) => {}
        }
        let empty = std::fs::read_dir(d)
            .map(|mut it| it.next().is_none())
            .unwrap_or(false);
        if empty {
            return DataDir::Empty;
        }
        match std::fs::read_to_string(d.join("PG_VERSION")) {
            Err(_) => DataDir::NotPostgres("it has files but no PG_VERSION".into()),
            Ok(text) => match pgtext::parse_pg_version_file(&text) {
                Err(e) => DataDir::NotPostgres(e),
                Ok(found) if found != self.major => DataDir::WrongVersion {
                    found,
                    expected: self.major,
                },
                Ok(_) => DataDir::Valid {
                    standby_signal: d.join("standby.signal").exists(),
                },
            },
        }
    }

    pub async fn controldata(&self) -> Result<ControlData> {
        let d = self.data.to_string_lossy().to_string();
        let out = self.run("pg_controldata", &["-D", &d]).await?;
        pgtext::parse_controldata(&out).map_err(|e| anyhow!(e))
    }

    /// Adopts a postmaster that runs on our data directory (after an agent restart).
    pub fn adopt_running(&mut self) -> Option<i32> {
        if self.handle.is_some() {
            return None;
        }
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let cmd = sys::cmdline(pid)?;
        if sys::pid_alive(pid) && (cmd.contains("postgres") || cmd.contains("postmaster")) {
            self.handle = Some(Handle::Adopted(pid));
            return Some(pid);
        }
        None
    }

    pub fn pid(&self) -> Option<i32> {
        match &self.handle {
            Some(Handle::Child(c)) => c.id().map(|p| p as i32),
            Some(Handle::Adopted(p)) => Some(*p),
            None => None,
        }
    }

    /// Checks whether the postmaster is still alive. Returns a description when it died
    /// without the agent stopping it.
    pub fn check_exit(&mut self) -> Option<String> {
        let died = match &mut self.handle {
            None => return None,
            Some(Handle::Child(c)) => match c.try_wait() {
                Ok(Some(st)) => Some(format!("{st}")),
                Ok(None) => None,
                Err(e) => Some(format!("wait failed: {e}")),
            },
            Some(Handle::Adopted(pid)) => {
                if sys::pid_alive(*pid) {
                    None
                } else {
                    Some("exited".to_string())
                }
            }
        };
        if died.is_some() {
            self.handle = None;
            self.client = None;
            if std::mem::take(&mut self.stopping) {
                return None;
            }
        }
        died
    }

    pub fn is_running(&mut self) -> bool {
        let _ = self.check_exit();
        self.handle.is_some()
    }

    /// Per-node settings, passed on the command line because the config files travel between
    /// nodes with pg_basebackup and pg_rewind.
    fn node_args(&self) -> Vec<String> {
        let me = self.cfg.me();
        vec![
            format!("port={}", me.pg_port),
            format!("listen_addresses={}", self.cfg.postgresql.listen_addresses),
            format!("unix_socket_directories={}", self.socket_dir.display()),
            format!(
                "cluster_name={}/{}",
                self.cfg.cluster.name, self.cfg.node.name
            ),
        ]
    }

    /// Writes postgresql.conf and pg_hba.conf; for a standby also standby.signal and its
    /// upstream in postgresql.auto.conf. Starting as a primary never removes standby.signal:
    /// leaving recovery is always an explicit promotion.
    pub fn write_config(&self, standby_of: Option<&Member>) -> Result<()> {
        self.write_conf_files()?;
        if let Some(up) = standby_of {
            self.write_upstream(Some(up))?;
            self.write_standby_signal()?;
        }
        Ok(())
    }

    fn write_standby_signal(&self) -> Result<()> {
        let sig = self.data.join("standby.signal");
        std::fs::write(&sig, "").context("write standby.signal")?;
        sys::set_owner_mode(&sig, self.owner, 0o600)
    }

    /// The newest timeline this data directory has a history file for in `pg_wal` (1 when
    /// none): a promotion writes it at once, the control file only at the next checkpoint.
    pub fn newest_local_timeline(&self) -> u32 {
        std::fs::read_dir(self.data.join("pg_wal"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let hex = name.strip_suffix(".history")?;
                        u32::from_str_radix(hex, 16).ok()
                    })
                    .max()
                    .unwrap_or(1)
            })
            .unwrap_or(1)
    }

    /// Writes the configuration for a standby without an upstream: read-only, waiting for a
    /// primary to follow.
    pub fn write_standby_config(&self) -> Result<()> {
        self.write_conf_files()?;
        self.write_upstream(None)?;
        self.write_standby_signal()
    }

    /// Writes the generated `postgresql.conf` and `pg_hba.conf` (node file plus the cluster's
    /// dynamic configuration).
    pub fn write_conf_files(&self) -> Result<()> {
        let conf = pgtext::render_postgresql_conf(&self.cfg, self.major, &self.dynamic);
        let hba = pgtext::render_pg_hba(&self.cfg, &self.dynamic);
        for (name, text) in [("postgresql.conf", conf), ("pg_hba.conf", hba)] {
            let p = self.data.join(name);
            sys::write_atomic(&p, &text)?;
            sys::set_owner_mode(&p, self.owner, 0o600)?;
        }
        Ok(())
    }

    /// Asks the running PostgreSQL to reload its configuration files.
    pub async fn reload(&mut self) -> Result<()> {
        let c = self.connect().await?;
        c.batch_execute("SELECT pg_reload_conf()")
            .await
            .context("pg_reload_conf")
    }

    /// Sets (or clears) primary_conninfo and primary_slot_name in postgresql.auto.conf.
    fn write_upstream(&self, up: Option<&Member>) -> Result<()> {
        let p = self.data.join("postgresql.auto.conf");
        let existing = std::fs::read_to_string(&p).unwrap_or_default();
        let passfile = self.passfile.to_string_lossy().to_string();
        let (ci, slot) = match up {
            Some(m) => (
                Some(pgtext::primary_conninfo(&self.cfg, m, &passfile)),
                Some(slot_name(&self.cfg.node.name)),
            ),
            None => (None, None),
        };
        let text = pgtext::rewrite_auto_conf(
            &existing,
            &[
                ("primary_conninfo", ci.as_deref()),
                ("primary_slot_name", slot.as_deref()),
            ],
        );
        sys::write_atomic(&p, &text)?;
        sys::set_owner_mode(&p, self.owner, 0o600)?;
        Ok(())
    }

    /// The member this node's primary_conninfo points at.
    pub fn configured_upstream(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.data.join("postgresql.auto.conf")).ok()?;
        let ci = pgtext::read_auto_conf(&text).remove("primary_conninfo")?;
        pgtext::member_for_conninfo(&ci, &self.cfg.cluster.members).map(|m| m.name.clone())
    }

    /// Starts the postmaster as the agent's child and waits until it answers SQL.
    pub async fn start(&mut self) -> Result<()> {
        if self.adopt_running().is_some() {
            return self.wait_ready().await;
        }
        if sys::failpoint("postgres_start") {
            bail!("PostgreSQL did not start (failpoint postgres_start)");
        }
        // A postmaster killed a moment ago may still hold the lock file and shared memory.
        if let Ok(text) = std::fs::read_to_string(self.data.join("postmaster.pid")) {
            if let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
            {
                let deadline = Instant::now() + Duration::from_secs(10);
                while sys::pid_alive(pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("postgresql.log"))
            .context("open postgresql.log")?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(&self.data);
        for a in self.node_args() {
            cmd.arg("-c").arg(a);
        }
        cmd.stdout(log.try_clone().context("dup log")?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().context("start postgres")?;
        self.handle = Some(Handle::Child(child));
        self.stopping = false;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.cfg.postgresql.start_timeout.0;
        loop {
            if let Some(how) = self.check_exit() {
                bail!(
                    "postgres exited during startup ({how}); see {}",
                    self.state_dir.join("postgresql.log").display()
                );
            }
            if self.handle.is_none() {
                bail!("postgres is not running");
            }
            match self.connect().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("postgres did not accept connections in time: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Stops the postmaster. `fast` is a clean shutdown (checkpoint; WAL senders send
    /// everything first); on timeout it escalates to immediate. Returns true when clean.
    pub async fn stop(&mut self, fast: bool) -> Result<bool> {
        self.client = None;
        let Some(pid) = self.pid() else {
            return Ok(true);
        };
        self.stopping = true;
        let sig = if fast { libc::SIGINT } else { libc::SIGQUIT };
        if let Err(e) = sys::signal(pid, sig) {
            tracing::warn!(pid, error = %e, "signal postmaster");
        }
        let deadline = Instant::now() + self.cfg.postgresql.stop_timeout.0;
        let mut clean = fast;
        loop {
            let gone = match &mut self.handle {
                Some(Handle::Child(c)) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
                Some(Handle::Adopted(p)) => !sys::pid_alive(*p),
                None => true,
            };
            if gone {
                break;
            }
            if Instant::now() > deadline && clean {
                tracing::warn!(pid, "clean shutdown timed out; stopping immediately");
                let _ = sys::signal(pid, libc::SIGQUIT);
                clean = false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.handle = None;
        self.stopping = false;
        Ok(clean)
    }

    fn local_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.cfg.me().pg_port)
            .user(&self.cfg.postgresql.superuser)
            .password(&self.superuser_pw)
            .dbname("postgres")
            .application_name("pgwarden-agent")
            .connect_timeout(Duration::from_secs(3));
        c
    }

    /// A superuser connection to a member over TCP (for timelines and pg_rewind checks).
    pub async fn connect_member(&self, m: &Member) -> Result<Client> {
        let mut c = tokio_postgres::Config::new();
        c.host(&m.host)
            .port(m.pg_port)
            .user(&self.cfg.postgresql.superuser)
            .password(&self.superuser_pw)
            .dbname("postgres")
            .application_name("pgwarden-agent")
            .connect_timeout(Duration::from_secs(3));
        let (client, conn) = c
            .connect(NoTls)
            .await
            .with_context(|| format!("connect to {} ({}:{})", m.name, m.host, m.pg_port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn connect(&mut self) -> Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = self
                .local_config()
                .connect(NoTls)
                .await
                .context("connect to local postgres")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.client = Some(client);
        }
        self.client.as_ref().ok_or_else(|| anyhow!("no connection"))
    }

    pub async fn query_status(&mut self) -> Result<SqlStatus> {
        let c = self.connect().await?;
        let r = c
            .query_one(
                "SELECT pg_is_in_recovery(),
                    current_setting('server_version_num'),
                    (SELECT system_identifier::text FROM pg_control_system()),
                    pg_postmaster_start_time()::text,
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END,
                    pg_last_wal_receive_lsn()::text,
                    pg_last_wal_replay_lsn()::text,
                    CASE WHEN pg_is_in_recovery()
                         THEN (SELECT timeline_id FROM pg_control_checkpoint())::text
                         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text END,
                    (SELECT string_agg(name, ',' ORDER BY name) FROM pg_settings WHERE pending_restart),
                    current_setting('synchronous_standby_names')",
                &[],
            )
            .await
            .context("query status")?;
        let in_recovery: bool =
            col(&r, 0).ok_or_else(|| anyhow!("pg_is_in_recovery() returned nothing"))?;
        let mut st = SqlStatus {
            in_recovery,
            server_version: col::<String>(&r, 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            system_identifier: col(&r, 2).unwrap_or_default(),
            started: col(&r, 3).unwrap_or_default(),
            write: lsn_opt(col(&r, 4)),
            flush: lsn_opt(col(&r, 5)),
            received: lsn_opt(col(&r, 6)),
            replayed: lsn_opt(col(&r, 7)),
            timeline: col::<String>(&r, 8).and_then(|t| t.parse().ok()),
            pending_restart: col::<String>(&r, 9)
                .map(|s| s.split(',').map(String::from).collect())
                .unwrap_or_default(),
            synchronous_standby_names: col(&r, 10).unwrap_or_default(),
            ..Default::default()
        };
        let rows = c
            .query(
                "SELECT status, sender_host, sender_port, received_tli::text,
                        latest_end_lsn::text, slot_name FROM pg_stat_wal_receiver",
                &[],
            )
            .await
            .context("query pg_stat_wal_receiver")?;
        st.wal_receiver = rows.first().map(|r| WalReceiver {
            status: col(r, 0).unwrap_or_default(),
            sender_host: col(r, 1),
            sender_port: col::<i32>(r, 2).and_then(|p| u16::try_from(p).ok()),
            received_tli: col::<String>(r, 3).and_then(|t| t.parse().ok()),
            latest_end_lsn: lsn_opt(col(r, 4)),
            slot_name: col(r, 5),
        });
        if st.in_recovery {
            if let Some(t) = st.wal_receiver.as_ref().and_then(|w| w.received_tli) {
                st.timeline = Some(st.timeline.map_or(t, |x| x.max(t)));
            }
        }
        let rows = c
            .query(
                "SELECT application_name, client_addr::text, state, sent_lsn::text,
                        write_lsn::text, flush_lsn::text, replay_lsn::text, sync_state
                   FROM pg_stat_replication ORDER BY application_name",
                &[],
            )
            .await
            .context("query pg_stat_replication")?;
        st.replication = rows
            .iter()
            .map(|r| ReplicationConn {
                application_name: col(r, 0).unwrap_or_default(),
                client_addr: col(r, 1),
                state: col(r, 2).unwrap_or_default(),
                sent_lsn: lsn_opt(col(r, 3)),
                write_lsn: lsn_opt(col(r, 4)),
                flush_lsn: lsn_opt(col(r, 5)),
                replay_lsn: lsn_opt(col(r, 6)),
                sync_state: col(r, 7).unwrap_or_default(),
            })
            .collect();
        Ok(st)
    }

    /// Sets `synchronous_standby_names` (ALTER SYSTEM, so it survives restarts and a
    /// promotion) and reloads. Works on a standby too, ahead of its promotion.
    pub async fn set_synchronous_standby_names(&mut self, value: &str) -> Result<()> {
        async fn in_effect(c: &Client, value: &str) -> Result<bool> {
            let row = c
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await
                .context("read synchronous_standby_names")?;
            Ok(col::<String>(&row, 0).as_deref() == Some(value))
        }
        let c = self.connect().await?;
        if in_effect(c, value).await? {
            // Nothing to change: no reload (a reload right before a promotion delays it).
            return Ok(());
        }
        let stmt = format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            pgtext::quote_conf(value)
        );
        c.batch_execute(&stmt).await.with_context(|| stmt.clone())?;
        c.batch_execute("SELECT pg_reload_conf()")
            .await
            .context("pg_reload_conf")?;
        // The reload is asynchronous: wait until this backend sees the new value.
        for _ in 0..100 {
            if in_effect(c, value).await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("synchronous_standby_names did not take effect after a reload")
    }

    /// Runs one write (assigns a transaction id) to see that the primary accepts writes.
    pub async fn write_probe(&mut self) -> Result<()> {
        let c = self.connect().await?;
        c.batch_execute("SELECT txid_current()")
            .await
            .context("txid_current")
    }

    /// The last WAL position a standby received (or replayed, when nothing streamed yet).
    pub async fn received_lsn(&mut self) -> Result<Option<Lsn>> {
        let c = self.connect().await?;
        let row = c
            .query_one(
                "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text",
                &[],
            )
            .await
            .context("read the received WAL position")?;
        let parse = |i: usize| {
            col::<Option<String>>(&row, i)
                .flatten()
                .and_then(|t| t.parse::<Lsn>().ok())
        };
        Ok(parse(0).max(parse(1)))
    }

    pub async fn promote(&mut self) -> Result<()> {
        let c = self.connect().await?;
        // Ask without waiting, then poll closely: pg_promote(true) only checks every 100 ms.
        c.query_one("SELECT pg_promote(false)", &[])
            .await
            .context("pg_promote")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .context("pg_is_in_recovery")?;
            if !col::<bool>(&row, 0).unwrap_or(true) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the promotion did not finish within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for stmt in [
            "ALTER SYSTEM RESET primary_conninfo",
            "ALTER SYSTEM RESET primary_slot_name",
            "SELECT pg_reload_conf()",
        ] {
            c.batch_execute(stmt)
                .await
                .with_context(|| stmt.to_string())?;
        }
        Ok(())
    }

    /// Points a running replica at another upstream: ALTER SYSTEM + reload from 13 on, a
    /// restart on 12 (where primary_conninfo is not reloadable).
    pub async fn follow_running(&mut self, up: &Member) -> Result<()> {
        if self.major >= 13 {
            let passfile = self.passfile.to_string_lossy().to_string();
            let ci = pgtext::primary_conninfo(&self.cfg, up, &passfile);
            let slot = slot_name(&self.cfg.node.name);
            let c = self.connect().await?;
            let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
            // One statement at a time: ALTER SYSTEM refuses to run in a transaction block.
            for stmt in [
                format!("ALTER SYSTEM SET primary_conninfo = {}", lit(&ci)),
                format!("ALTER SYSTEM SET primary_slot_name = {}", lit(&slot)),
                "SELECT pg_reload_conf()".to_string(),
            ] {
                c.batch_execute(&stmt)
                    .await
                    .with_context(|| format!("follow {}: {stmt}", up.name))?;
            }
            Ok(())
        } else {
            self.stop(true).await?;
            self.write_config(Some(up))?;
            self.start().await
        }
    }

    /// Creates the replication role if missing (idempotent; runs on every primary start).
    pub async fn ensure_roles(&mut self) -> Result<()> {
        let user = self.cfg.postgresql.replication_user.clone();
        let pw = self.replication_pw.replace('\'', "''");
        let c = self.connect().await?;
        let exists = c
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .context("look up replication role")?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        // Never wait for a synchronous standby here: right after a promotion in synchronous
        // mode none may be connected yet, and the promotion must not hang on this commit
        // (the role exists everywhere already; a lost password change is redone next time).
        c.batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit TO local; \
             {verb} ROLE \"{user}\" WITH REPLICATION LOGIN PASSWORD '{pw}'; COMMIT"
        ))
        .await
        .context("create replication role")?;
        Ok(())
    }

    /// Keeps a physical slot for every other member (created without reserving WAL until it is
    /// used); on a replica, advances inactive slots so they do not hold WAL back.
    pub async fn maintain_slots(&mut self, in_recovery: bool) -> Result<()> {
        let wanted = pgtext::member_slots(&self.cfg);
        let c = self.connect().await?;
        let rows = c
            .query(
                "SELECT slot_name::text, active, restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_type = 'physical'",
                &[],
            )
            .await
            .context("list replication slots")?;
        let have: Vec<(String, bool, bool)> = rows
            .iter()
            .map(|r| {
                (
                    col(r, 0).unwrap_or_default(),
                    col(r, 1).unwrap_or(false),
                    col(r, 2).unwrap_or(false),
                )
            })
            .collect();
        for s in &wanted {
            if !have.iter().any(|(n, _, _)| n == s) {
                c.execute(
                    "SELECT pg_create_physical_replication_slot($1, false)",
                    &[s],
                )
                .await
                .with_context(|| format!("create slot {s}"))?;
            }
        }
        if in_recovery {
            for (name, active, reserved) in &have {
                if !active && *reserved && wanted.contains(name) {
                    let _ = c
                        .execute(
                            "SELECT pg_replication_slot_advance($1, pg_last_wal_replay_lsn()) FROM pg_replication_slots WHERE slot_name = $1 AND restart_lsn < pg_last_wal_replay_lsn()",
                            &[name],
                        )
                        .await;
                }
            }
        }
        Ok(())
    }

    /// initdb with checksums, UTF8 and the superuser's password.
    pub async fn initdb(&self) -> Result<()> {
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("create {}", self.data.display()))?;
        sys::set_owner_mode(&self.data, self.owner, 0o700)?;
        let pwfile = self.state_dir.join("initdb-pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.superuser_pw)).context("write pwfile")?;
        sys::set_owner_mode(&pwfile, self.owner, 0o600)?;
        let d = self.data.to_string_lossy().to_string();
        let pw = format!("--pwfile={}", pwfile.display());
        let user = format!("--username={}", self.cfg.postgresql.superuser);
        let mut args: Vec<&str> = vec![
            "-D",
            &d,
            "--data-checksums",
            "--encoding=UTF8",
            &user,
            &pw,
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
        ];
        let extra = &self.cfg.postgresql.initdb_args;
        if !extra
            .iter()
            .any(|a| a.starts_with("--locale") || a.starts_with("--lc-"))
        {
            args.push("--locale=C.UTF-8");
        }
        args.extend(extra.iter().map(String::as_str));
        let res = self.run("initdb", &args).await;
        let _ = std::fs::remove_file(&pwfile);
        res.map(|_| ())
    }

    /// pg_basebackup from `from` into the (empty) data directory, streaming WAL through this
    /// node's slot, calling `progress(done, total)` as it goes.
    pub async fn basebackup(
        &self,
        from: &Member,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("create {}", self.data.display()))?;
        sys::set_owner_mode(&self.data, self.owner, 0o700)?;
        let conn = format!(
            "host={} port={} user={} application_name={}",
            pgtext::quote_conninfo(&from.host),
            from.pg_port,
            pgtext::quote_conninfo(&self.cfg.postgresql.replication_user),
            pgtext::quote_conninfo(&self.cfg.node.name),
        );
        let mut child = self
            .command("pg_basebackup")
            .arg("-D")
            .arg(&self.data)
            .args(["-d", &conn, "-X", "stream", "-c", "fast", "-P", "-v"])
            .args(["-S", &slot_name(&self.cfg.node.name)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start pg_basebackup")?;
        let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut tail = String::new();
        loop {
            let n = stderr.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(pos) = buf.iter().position(|&b| b == b'\r' || b == b'\n') {
                let line = String::from_utf8_lossy(&buf[..pos]).to_string();
                buf.drain(..=pos);
                if let Some((done, total)) = pgtext::parse_basebackup_progress(&line) {
                    progress(done, total);
                } else if !line.trim().is_empty() {
                    tail = line;
                }
            }
        }
        let st = child.wait().await.context("wait for pg_basebackup")?;
        if !st.success() {
            bail!("pg_basebackup from {} failed ({st}): {tail}", from.name);
        }
        Ok(())
    }

    /// The upstream's current timeline and its history.
    pub async fn upstream_timeline(&self, up: &Member) -> Result<(u32, Vec<HistoryEntry>)> {
        let c = self.connect_member(up).await?;
        let row = c
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery()
                     THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),
                                   (SELECT timeline_id FROM pg_control_checkpoint()))
                     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
                &[],
            )
            .await
            .context("read upstream timeline")?;
        let tli = col::<i32>(&row, 0)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| anyhow!("{} reported no timeline", up.name))?;
        if tli <= 1 {
            return Ok((tli, Vec::new()));
        }
        let file = format!("pg_wal/{tli:08X}.history");
        let row = c
            .query_one("SELECT pg_read_file($1)", &[&file])
            .await
            .with_context(|| format!("read {file} on {}", up.name))?;
        let text: String = col(&row, 0).ok_or_else(|| anyhow!("{file} on {} is empty", up.name))?;
        let hist = pgtext::parse_history(&text).map_err(|e| anyhow!(e))?;
        Ok((tli, hist))
    }

    /// Runs CHECKPOINT on a member. A just-promoted server keeps its old timeline in its
    /// control file until its first checkpoint, and pg_rewind reads the timeline from there.
    pub async fn checkpoint_member(&self, m: &Member) -> Result<()> {
        let c = self.connect_member(m).await?;
        c.batch_execute("CHECKPOINT")
            .await
            .with_context(|| format!("CHECKPOINT on {}", m.name))
    }

    /// pg_rewind from `from` (PostgreSQL must be stopped).
    pub async fn rewind(&self, from: &Member) -> Result<String> {
        if sys::failpoint("pg_rewind") {
            bail!("pg_rewind failed (failpoint)");
        }
        self.checkpoint_member(from).await?;
        let d = self.data.to_string_lossy().to_string();
        let src = format!(
            "host={} port={} user={} dbname=postgres",
            pgtext::quote_conninfo(&from.host),
            from.pg_port,
            pgtext::quote_conninfo(&self.cfg.postgresql.superuser),
        );
        let target = format!("--target-pgdata={d}");
        let source = format!("--source-server={src}");
        let out = self.run("pg_rewind", &[&target, &source]).await?;
        Ok(out.lines().last().unwrap_or("").to_string())
    }

    /// Renames the data directory aside (never deletes it). Returns the new path.
    pub fn move_aside(&self, now_ms: u64) -> Result<PathBuf> {
        let name = format!(
            "{}.pgwarden-moved-{}",
            self.data
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "data".into()),
            now_ms / 1000
        );
        let to = self.data.with_file_name(name);
        std::fs::rename(&self.data, &to)
            .with_context(|| format!("move {} aside to {}", self.data.display(), to.display()))?;
        Ok(to)
    }
}
