//! The server's store: one implementation over SQLite (embedded default) and PostgreSQL,
//! through sqlx's `Any` driver with portable SQL (`$1` parameters, `ON CONFLICT`,
//! `RETURNING`). Each backend has its own migrations (`migrations/sqlite`,
//! `migrations/postgres`) because their DDL differs; the queries are shared.
//!
//! Every new event is stored in one transaction with its webhook deliveries (the outbox,
//! `store/webhooks.rs`).
//!
//! Work several servers could do twice (delivering a command, a webhook delivery, watching
//! agents) is coordinated here with conditional updates: a row is claimed by
//! `UPDATE … WHERE claim expired`, and the one server whose update changed the row does the
//! work.

mod webhooks;

pub use webhooks::{
    AttemptResult, AttemptRow, DeliveryRow, DeliveryState, Outbox, Webhook, WebhookRow,
};

use crate::webhooks::{severity_of, EventDoc};
use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::control::{AgentCommandState, AgentReport, CommandKind, CommandPhase};
use pgwarden_core::server_config::{backend_of, Backend};
use serde::Serialize;
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, Row};
use utoipa::ToSchema;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    pub backend: Backend,
}

/// A value bound to a `$n` parameter of a query built at run time.
#[derive(Clone, Debug)]
pub enum Val {
    I(i64),
    S(String),
    NI(Option<i64>),
    NS(Option<String>),
}

fn bind_all<'q>(
    mut q: Query<'q, Any, AnyArguments<'q>>,
    vals: &'q [Val],
) -> Query<'q, Any, AnyArguments<'q>> {
    for v in vals {
        q = match v {
            Val::I(i) => q.bind(*i),
            Val::S(s) => q.bind(s.as_str()),
            Val::NI(i) => q.bind(*i),
            Val::NS(s) => q.bind(s.as_deref()),
        };
    }
    q
}

/// Builds `WHERE a = $1 AND b > $2 …` with numbered parameters.
#[derive(Default)]
pub struct Where {
    parts: Vec<String>,
    pub vals: Vec<Val>,
}

impl Where {
    /// `cond` holds `?` where the parameter goes.
    pub fn and(&mut self, cond: &str, v: Val) -> &mut Self {
        self.vals.push(v);
        let n = self.vals.len();
        self.parts.push(cond.replace('?', &format!("${n}")));
        self
    }
    /// The same value for several `?` in `cond` (bound once per `?`).
    pub fn and_n(&mut self, cond: &str, v: Val) -> &mut Self {
        let mut out = String::new();
        for (i, piece) in cond.split('?').enumerate() {
            if i > 0 {
                self.vals.push(v.clone());
                out.push_str(&format!("${}", self.vals.len()));
            }
            out.push_str(piece);
        }
        self.parts.push(out);
        self
    }
    pub fn sql(&self) -> String {
        if self.parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.parts.join(" AND "))
        }
    }
    /// The next parameter number.
    pub fn next(&self) -> usize {
        self.vals.len() + 1
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NodeRow {
    pub cluster: String,
    pub name: String,
    pub api_url: String,
    pub agent_version: String,
    /// `primary`, `replica` or `unknown`.
    pub role: String,
    /// PostgreSQL's state as the agent observed it (`running`, `stopped`, …).
    pub pg_state: String,
    pub timeline: Option<i64>,
    pub lag_bytes: Option<i64>,
    /// When the agent last reported (ms since the epoch).
    pub last_report_ms: i64,
    /// False when the agent stopped reporting and did not answer a poll.
    pub agent_up: bool,
    /// The agent's full status as last reported.
    #[schema(value_type = Object)]
    pub status: serde_json::Value,
}

fn node_row(r: &AnyRow) -> Result<NodeRow> {
    Ok(NodeRow {
        cluster: r.try_get("cluster")?,
        name: r.try_get("name")?,
        api_url: r.try_get("api_url")?,
        agent_version: r.try_get("agent_version")?,
        role: r.try_get("role")?,
        pg_state: r.try_get("pg_state")?,
        timeline: r.try_get("timeline")?,
        lag_bytes: r.try_get("lag_bytes")?,
        last_report_ms: r.try_get("last_report_ms")?,
        agent_up: r.try_get::<i64, _>("agent_up")? != 0,
        status: serde_json::from_str(&r.try_get::<String, _>("status_json")?)
            .unwrap_or(serde_json::Value::Null),
    })
}

const NODE_COLS: &str = "cluster, name, api_url, agent_version, role, pg_state, timeline, \
     lag_bytes, status_json, last_report_ms, agent_up";

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventRow {
    /// Position in the store (the cursor and the SSE id).
    pub seq: i64,
    /// The event's own id, stable across deliveries.
    pub id: String,
    pub ts_ms: i64,
    pub received_ms: i64,
    pub cluster: String,
    pub node: String,
    /// `promoted`, `lease_acquired`, `fenced`, `agent_down`, …
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

fn event_row(r: &AnyRow) -> Result<EventRow> {
    Ok(EventRow {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        ts_ms: r.try_get("ts_ms")?,
        received_ms: r.try_get("received_ms")?,
        cluster: r.try_get("cluster")?,
        node: r.try_get("node")?,
        kind: r.try_get("kind")?,
        message: r.try_get("message")?,
    })
}

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub kinds: Vec<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Continue after `(ts_ms, seq)`.
    pub after: Option<(i64, i64)>,
    /// Only events stored after this seq (the live stream).
    pub after_seq: Option<i64>,
    pub limit: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CommandRow {
    pub id: String,
    pub idempotency_key: String,
    pub cluster: String,
    /// The node a node-level command (restart, reinitialize) acts on.
    pub node: Option<String>,
    #[schema(value_type = String)]
    pub kind: CommandKind,
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// `queued`, `delivered`, `running`, `succeeded`, `failed` or `timed_out`.
    #[schema(value_type = String)]
    pub state: CommandPhase,
    pub message: String,
    /// The agent API's answer once finished.
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
    /// The agent it was handed to.
    pub delivered_to: Option<String>,
    pub created_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub deadline_ms: i64,
    pub attempts: i64,
}

fn command_row(r: &AnyRow) -> Result<CommandRow> {
    let kind: String = r.try_get("kind")?;
    let state: String = r.try_get("state")?;
    Ok(CommandRow {
        id: r.try_get("id")?,
        idempotency_key: r.try_get("idempotency_key")?,
        cluster: r.try_get("cluster")?,
        node: r.try_get("node")?,
        kind: CommandKind::parse(&kind).ok_or_else(|| anyhow!("unknown command kind {kind}"))?,
        args: serde_json::from_str(&r.try_get::<String, _>("args_json")?)?,
        state: CommandPhase::parse(&state).ok_or_else(|| anyhow!("unknown state {state}"))?,
        message: r.try_get("message")?,
        result: r
            .try_get::<Option<String>, _>("result_json")?
            .and_then(|s| serde_json::from_str(&s).ok()),
        delivered_to: r.try_get("delivered_to")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        deadline_ms: r.try_get("deadline_ms")?,
        attempts: r.try_get("attempts")?,
    })
}

const COMMAND_COLS: &str = "id, idempotency_key, cluster, node, kind, args_json, state, message, \
     result_json, delivered_to, created_by, created_ms, updated_ms, deadline_ms, attempts";

/// The order of command states: an update never moves a command backwards.
fn phase_rank(p: CommandPhase) -> i64 {
    match p {
        CommandPhase::Queued => 0,
        CommandPhase::Delivered => 1,
        CommandPhase::Running => 2,
        CommandPhase::Succeeded | CommandPhase::Failed | CommandPhase::TimedOut => 3,
    }
}

pub struct NewCommand<'a> {
    pub id: &'a str,
    pub idempotency_key: &'a str,
    pub cluster: &'a str,
    pub node: Option<&'a str>,
    pub kind: CommandKind,
    pub args: &'a serde_json::Value,
    pub created_by: &'a str,
    pub deadline_ms: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UserRow {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    pub created_ms: i64,
    pub disabled: bool,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiTokenRow {
    pub id: String,
    pub user: String,
    pub name: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JoinTokenRow {
    pub id: String,
    pub cluster: String,
    pub created_by: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
    pub used_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CertificateRow {
    pub fingerprint: String,
    pub cluster: String,
    pub node: String,
    pub issued_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
    pub revoked_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AuditRow {
    pub seq: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub remote: String,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LagSample {
    pub node: String,
    pub ts_ms: i64,
    pub lag_bytes: Option<i64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ConfigChange {
    pub seq: i64,
    pub ts_ms: i64,
    pub actor: String,
    #[schema(value_type = Object)]
    pub patch: serde_json::Value,
    /// The configuration the patch was checked against.
    #[schema(value_type = Object)]
    pub before: Option<serde_json::Value>,
    pub command_id: String,
}

/// What storing a report did.
#[derive(Clone, Debug, Default)]
pub struct Ingested {
    pub events_stored: usize,
    pub events_new: usize,
    /// The agent had been marked down.
    pub came_back: bool,
    /// The agent knows a newer failover record than the store.
    pub wants_history: bool,
    /// Webhook deliveries queued for the new events.
    pub deliveries_queued: usize,
}

impl Store {
    /// Opens the database at `url` (creating a SQLite file if needed) and applies the
    /// migrations. Refuses a database whose schema is newer than this binary.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url).ok_or_else(|| {
            anyhow!("database_url must start with sqlite: or postgres:// (got {url:?})")
        })?;
        let (url, max) = match backend {
            Backend::Sqlite => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or(path);
                if let Some(dir) = std::path::Path::new(path).parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("create {}", dir.display()))?;
                    }
                }
                let sep = if url.contains('?') { '&' } else { '?' };
                // One connection: SQLite has one writer at a time, and a transaction that
                // reads before it writes fails at once ("database is locked") when another
                // connection writes in between. The embedded store's load fits one connection.
                (format!("{url}{sep}mode=rwc"), 1)
            }
            Backend::Postgres => (url.to_string(), 10),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("connect to the store ({})", redact(&url)))?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// The newest schema version this binary knows.
    pub fn known_version(&self) -> i64 {
        self.migrator().iter().map(|m| m.version).max().unwrap_or(0)
    }

    async fn migrate(&self) -> Result<()> {
        match self.migrator().run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(sqlx::migrate::MigrateError::VersionMissing(v)) => bail!(
                "the store's schema has migration {v}, which this pgwarden-server does not know \
                 (it knows up to {}): the schema is newer than this binary; upgrade \
                 pgwarden-server instead of running an older one against this store",
                self.known_version()
            ),
            Err(e) => Err(anyhow!(e).context("apply the store's migrations")),
        }
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Runs a statement written for this store's backend (tests, maintenance).
    pub async fn raw(&self, sqlite: &str, postgres: &str) -> Result<u64> {
        let sql = match self.backend {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        };
        Ok(sqlx::query(sql).execute(&self.pool).await?.rows_affected())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    // ---- clusters and nodes ----

    async fn ensure_cluster(&self, name: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO clusters (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a report: the node's status, its events (each id once), a lag sample at most
    /// every `lag_interval_ms`, and the states of its commands. One transaction.
    pub async fn ingest_report(
        &self,
        rep: &AgentReport,
        now: i64,
        lag_interval_ms: i64,
    ) -> Result<Ingested> {
        self.ensure_cluster(&rep.cluster, now).await?;
        let mut tx = self.pool.begin().await?;
        let mut out = Ingested::default();
        let mut outbox = Outbox::default();
        let prev =
            sqlx::query("SELECT agent_up, removed_ms FROM nodes WHERE cluster = $1 AND name = $2")
                .bind(&rep.cluster)
                .bind(&rep.node)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(p) = &prev {
            out.came_back = p.try_get::<i64, _>("agent_up")? == 0;
        }
        let st = &rep.status;
        let role = serde_json::to_value(st.role)?
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        let pg_state = serde_json::to_value(st.state)?
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        let status_json = serde_json::to_string(st)?;
        sqlx::query(
            "INSERT INTO nodes (cluster, name, api_url, agent_version, role, pg_state, timeline, \
             lag_bytes, status_json, last_report_ms, agent_up) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1) \
             ON CONFLICT (cluster, name) DO UPDATE SET api_url = excluded.api_url, \
             agent_version = excluded.agent_version, role = excluded.role, \
             pg_state = excluded.pg_state, timeline = excluded.timeline, \
             lag_bytes = excluded.lag_bytes, status_json = excluded.status_json, \
             last_report_ms = excluded.last_report_ms, agent_up = 1, removed_ms = NULL",
        )
        .bind(&rep.cluster)
        .bind(&rep.node)
        .bind(&rep.api_url)
        .bind(&rep.agent_version)
        .bind(&role)
        .bind(&pg_state)
        .bind(st.timeline.map(i64::from))
        .bind(st.lag_bytes.map(|l| l as i64))
        .bind(&status_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for ev in &rep.events {
            if ev.cluster != rep.cluster || ev.node != rep.node {
                bail!(
                    "event {} names {}/{}, not the reporting node",
                    ev.id,
                    ev.cluster,
                    ev.node
                );
            }
            let new = store_event_tx(
                &mut tx,
                &mut outbox,
                NewEvent {
                    id: &ev.id,
                    ts_ms: i64::try_from(ev.ts_ms).unwrap_or(i64::MAX),
                    received_ms: now,
                    cluster: &ev.cluster,
                    node: &ev.node,
                    kind: &ev.kind,
                    message: &ev.message,
                },
            )
            .await?;
            out.events_new += usize::from(new);
            out.events_stored += 1;
        }
        if out.came_back {
            insert_event_tx(
                &mut tx,
                &mut outbox,
                &server_event_id("agent_up", &rep.cluster, &rep.node, now),
                now,
                &rep.cluster,
                &rep.node,
                "agent_up",
                "the agent reports again",
            )
            .await?;
        }
        if st.role == pgwarden_core::status::Role::Replica || st.lag_bytes.is_some() {
            let last: Option<i64> = sqlx::query(
                "SELECT MAX(ts_ms) AS m FROM lag_samples WHERE cluster = $1 AND node = $2",
            )
            .bind(&rep.cluster)
            .bind(&rep.node)
            .fetch_one(&mut *tx)
            .await?
            .try_get("m")?;
            if last.is_none_or(|l| now - l >= lag_interval_ms) {
                sqlx::query(
                    "INSERT INTO lag_samples (cluster, node, ts_ms, lag_bytes) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(&rep.cluster)
                .bind(&rep.node)
                .bind(now)
                .bind(st.lag_bytes.map(|l| l as i64))
                .execute(&mut *tx)
                .await?;
            }
        }
        for c in &rep.commands {
            update_command_tx(&mut tx, &mut outbox, c, &rep.node, now).await?;
        }
        if let Some(epoch) = rep.history_epoch {
            let have: Option<i64> =
                sqlx::query("SELECT MAX(epoch) AS m FROM failover_records WHERE cluster = $1")
                    .bind(&rep.cluster)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("m")?;
            out.wants_history = have.is_none_or(|h| (epoch as i64) > h);
        }
        tx.commit().await?;
        out.deliveries_queued = outbox.queued;
        Ok(out)
    }

    pub async fn clusters(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT name, created_ms FROM clusters ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("created_ms")?)))
            .collect()
    }

    pub async fn cluster_exists(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT name FROM clusters WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Creates a cluster record (a join token may be made before any agent reported).
    pub async fn create_cluster(&self, name: &str) -> Result<()> {
        self.ensure_cluster(name, now_ms()).await
    }

    pub async fn nodes(&self, cluster: Option<&str>) -> Result<Vec<NodeRow>> {
        let mut w = Where::default();
        w.parts.push("removed_ms IS NULL".into());
        if let Some(c) = cluster {
            w.and("cluster = ?", Val::S(c.into()));
        }
        let sql = format!(
            "SELECT {NODE_COLS} FROM nodes{} ORDER BY cluster, name",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(node_row).collect()
    }

    pub async fn node(&self, cluster: &str, name: &str) -> Result<Option<NodeRow>> {
        let sql = format!(
            "SELECT {NODE_COLS} FROM nodes WHERE cluster = $1 AND name = $2 AND removed_ms IS NULL"
        );
        sqlx::query(&sql)
            .bind(cluster)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(node_row)
            .transpose()
    }

    /// Marks a node removed (its certificates are revoked by the caller).
    pub async fn remove_node(&self, cluster: &str, name: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE nodes SET removed_ms = $1 WHERE cluster = $2 AND name = $3 AND removed_ms IS NULL",
        )
        .bind(now_ms())
        .bind(cluster)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Nodes whose agent has not reported since `before` and is still marked up.
    pub async fn silent_nodes(&self, before: i64) -> Result<Vec<NodeRow>> {
        let sql = format!(
            "SELECT {NODE_COLS} FROM nodes WHERE agent_up = 1 AND removed_ms IS NULL AND last_report_ms < $1"
        );
        let rows = sqlx::query(&sql).bind(before).fetch_all(&self.pool).await?;
        rows.iter().map(node_row).collect()
    }

    /// Records a pulled status (the agent answered a poll).
    pub async fn touch_node(&self, cluster: &str, name: &str, status_json: &str) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET status_json = $1, last_report_ms = $2 WHERE cluster = $3 AND name = $4",
        )
        .bind(status_json)
        .bind(now_ms())
        .bind(cluster)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a node's agent down with an `agent_down` event, once.
    pub async fn mark_down(&self, cluster: &str, name: &str, why: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE nodes SET agent_up = 0 WHERE cluster = $1 AND name = $2 AND agent_up = 1",
        )
        .bind(cluster)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 1 {
            insert_event_tx(
                &mut tx,
                &mut Outbox::default(),
                &server_event_id("agent_down", cluster, name, now),
                now,
                cluster,
                name,
                "agent_down",
                why,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- events ----

    pub async fn insert_event(
        &self,
        id: &str,
        cluster: &str,
        node: &str,
        kind: &str,
        message: &str,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        insert_event_tx(
            &mut tx,
            &mut Outbox::default(),
            id,
            now,
            cluster,
            node,
            kind,
            message,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events matching `f`, in time order (`ts_ms`, then arrival), or in arrival order when
    /// following the live stream (`after_seq`).
    pub async fn events(&self, f: &EventFilter) -> Result<Vec<EventRow>> {
        let mut w = Where::default();
        if let Some(c) = &f.cluster {
            w.and("cluster = ?", Val::S(c.clone()));
        }
        if let Some(n) = &f.node {
            w.and("node = ?", Val::S(n.clone()));
        }
        if !f.kinds.is_empty() {
            let first = w.next();
            let list: Vec<String> = (0..f.kinds.len())
                .map(|i| format!("${}", first + i))
                .collect();
            w.parts.push(format!("kind IN ({})", list.join(", ")));
            w.vals.extend(f.kinds.iter().map(|k| Val::S(k.clone())));
        }
        if let Some(s) = f.since_ms {
            w.and("ts_ms >= ?", Val::I(s));
        }
        if let Some(u) = f.until_ms {
            w.and("ts_ms < ?", Val::I(u));
        }
        if let Some((ts, seq)) = f.after {
            w.and("ts_ms >= ?", Val::I(ts));
            let a = w.next();
            w.vals.push(Val::I(ts));
            w.vals.push(Val::I(seq));
            w.parts.push(format!("(ts_ms > ${a} OR seq > ${})", a + 1));
        }
        let order = if let Some(s) = f.after_seq {
            w.and("seq > ?", Val::I(s));
            "seq"
        } else {
            "ts_ms, seq"
        };
        let n = w.next();
        w.vals.push(Val::I(f.limit.clamp(1, 1000)));
        let sql = format!(
            "SELECT seq, id, ts_ms, received_ms, cluster, node, kind, message FROM events{} ORDER BY {order} LIMIT ${n}",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_row).collect()
    }

    pub async fn last_event(&self, cluster: &str) -> Result<Option<EventRow>> {
        let rows = sqlx::query(
            "SELECT seq, id, ts_ms, received_ms, cluster, node, kind, message FROM events \
             WHERE cluster = $1 ORDER BY ts_ms DESC, seq DESC LIMIT 1",
        )
        .bind(cluster)
        .fetch_optional(&self.pool)
        .await?;
        rows.as_ref().map(event_row).transpose()
    }

    // ---- lag samples and failover records ----

    pub async fn lag_samples(
        &self,
        cluster: &str,
        node: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<LagSample>> {
        let mut w = Where::default();
        w.and("cluster = ?", Val::S(cluster.into()));
        w.and("ts_ms >= ?", Val::I(since_ms));
        if let Some(n) = node {
            w.and("node = ?", Val::S(n.into()));
        }
        let sql = format!(
            "SELECT node, ts_ms, lag_bytes FROM lag_samples{} ORDER BY ts_ms, node LIMIT 100000",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LagSample {
                    node: r.try_get("node")?,
                    ts_ms: r.try_get("ts_ms")?,
                    lag_bytes: r.try_get("lag_bytes")?,
                })
            })
            .collect()
    }

    /// Deletes lag samples older than `before`; returns how many.
    pub async fn prune_lag(&self, before: i64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM lag_samples WHERE ts_ms < $1")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn put_failover_record(
        &self,
        cluster: &str,
        epoch: i64,
        record: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO failover_records (cluster, epoch, record_json) VALUES ($1, $2, $3) \
             ON CONFLICT (cluster, epoch) DO UPDATE SET record_json = excluded.record_json",
        )
        .bind(cluster)
        .bind(epoch)
        .bind(serde_json::to_string(record)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn failover_records(&self, cluster: &str) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT record_json FROM failover_records WHERE cluster = $1 ORDER BY epoch",
        )
        .bind(cluster)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::from_str(
                    &r.try_get::<String, _>("record_json")?,
                )?)
            })
            .collect()
    }

    // ---- configuration ----

    pub async fn set_cluster_config(
        &self,
        cluster: &str,
        config: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("UPDATE clusters SET config_json = $1, config_ms = $2 WHERE name = $3")
            .bind(serde_json::to_string(config)?)
            .bind(now_ms())
            .bind(cluster)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn add_config_change(
        &self,
        cluster: &str,
        actor: &str,
        patch: &serde_json::Value,
        before: Option<&serde_json::Value>,
        command_id: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO config_history (cluster, ts_ms, actor, patch_json, before_json, command_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(cluster)
        .bind(now_ms())
        .bind(actor)
        .bind(serde_json::to_string(patch)?)
        .bind(before.map(serde_json::to_string).transpose()?)
        .bind(command_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn config_history(&self, cluster: &str) -> Result<Vec<ConfigChange>> {
        let rows = sqlx::query(
            "SELECT seq, ts_ms, actor, patch_json, before_json, command_id FROM config_history \
             WHERE cluster = $1 ORDER BY seq DESC LIMIT 500",
        )
        .bind(cluster)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ConfigChange {
                    seq: r.try_get("seq")?,
                    ts_ms: r.try_get("ts_ms")?,
                    actor: r.try_get("actor")?,
                    patch: serde_json::from_str(&r.try_get::<String, _>("patch_json")?)?,
                    before: r
                        .try_get::<Option<String>, _>("before_json")?
                        .and_then(|s| serde_json::from_str(&s).ok()),
                    command_id: r.try_get("command_id")?,
                })
            })
            .collect()
    }

    // ---- commands ----

    /// Stores a command; with an idempotency key already used in this cluster, returns the
    /// existing command instead (`false`).
    pub async fn insert_command(&self, c: &NewCommand<'_>) -> Result<(CommandRow, bool)> {
        let now = now_ms();
        let r = sqlx::query(
            "INSERT INTO commands (id, idempotency_key, cluster, node, kind, args_json, state, \
             created_by, created_ms, updated_ms, deadline_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $8, $9) \
             ON CONFLICT (cluster, idempotency_key) DO NOTHING",
        )
        .bind(c.id)
        .bind(c.idempotency_key)
        .bind(c.cluster)
        .bind(c.node)
        .bind(c.kind.as_str())
        .bind(serde_json::to_string(c.args)?)
        .bind(c.created_by)
        .bind(now)
        .bind(c.deadline_ms)
        .execute(&self.pool)
        .await?;
        let created = r.rows_affected() == 1;
        let sql = format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE cluster = $1 AND idempotency_key = $2"
        );
        let row = sqlx::query(&sql)
            .bind(c.cluster)
            .bind(c.idempotency_key)
            .fetch_one(&self.pool)
            .await?;
        Ok((command_row(&row)?, created))
    }

    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>> {
        let sql = format!("SELECT {COMMAND_COLS} FROM commands WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(command_row)
            .transpose()
    }

    /// Commands, newest first, continuing before `before` (a `created_ms`, id pair).
    pub async fn commands(
        &self,
        cluster: Option<&str>,
        state: Option<CommandPhase>,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<CommandRow>> {
        let mut w = Where::default();
        if let Some(c) = cluster {
            w.and("cluster = ?", Val::S(c.into()));
        }
        if let Some(s) = state {
            w.and("state = ?", Val::S(s.as_str().into()));
        }
        if let Some((ms, id)) = before {
            w.and("created_ms <= ?", Val::I(ms));
            let a = w.next();
            w.vals.push(Val::I(ms));
            w.vals.push(Val::S(id));
            w.parts
                .push(format!("(created_ms < ${a} OR id < ${})", a + 1));
        }
        let n = w.next();
        w.vals.push(Val::I(limit.clamp(1, 500)));
        let sql = format!(
            "SELECT {COMMAND_COLS} FROM commands{} ORDER BY created_ms DESC, id DESC LIMIT ${n}",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(command_row).collect()
    }

    /// Commands that need a server's attention (queued, or delivered/running and not final)
    /// and that no other server holds a claim on.
    pub async fn claimable_commands(&self, now: i64, limit: i64) -> Result<Vec<CommandRow>> {
        let sql = format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE state IN ('queued', 'delivered', 'running') \
             AND (claim_until_ms IS NULL OR claim_until_ms < $1) ORDER BY created_ms LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(command_row).collect()
    }

    /// Claims a command for `server` until `until`: true when this server got it (no other
    /// server holds an unexpired claim). A server renews its own claim the same way.
    pub async fn claim_command(
        &self,
        id: &str,
        server: &str,
        until: i64,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE commands SET claimed_by = $1, claim_until_ms = $2 WHERE id = $3 \
             AND state IN ('queued', 'delivered', 'running') \
             AND (claim_until_ms IS NULL OR claim_until_ms < $4 OR claimed_by = $1)",
        )
        .bind(server)
        .bind(until)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn release_command(&self, id: &str, server: &str) -> Result<()> {
        sqlx::query(
            "UPDATE commands SET claimed_by = NULL, claim_until_ms = NULL WHERE id = $1 AND claimed_by = $2",
        )
        .bind(id)
        .bind(server)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a command forward (never back) and records the answer; returns whether it moved.
    pub async fn advance_command(
        &self,
        id: &str,
        state: CommandPhase,
        message: &str,
        result: Option<&serde_json::Value>,
        delivered_to: Option<&str>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let moved = advance_tx(
            &mut tx,
            &mut Outbox::default(),
            id,
            state,
            message,
            result,
            delivered_to,
            now_ms(),
        )
        .await?;
        tx.commit().await?;
        Ok(moved)
    }

    pub async fn count_attempt(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE commands SET attempts = attempts + 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- users and tokens ----

    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    pub async fn create_user(
        &self,
        name: &str,
        role: &str,
        password_hash: Option<&str>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO users (name, role, password_hash, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role)
        .bind(password_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT name, role, created_ms, disabled FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UserRow {
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    created_ms: r.try_get("created_ms")?,
                    disabled: r.try_get::<i64, _>("disabled")? != 0,
                })
            })
            .collect()
    }

    pub async fn user(&self, name: &str) -> Result<Option<(UserRow, Option<String>)>> {
        let r = sqlx::query(
            "SELECT name, role, created_ms, disabled, password_hash FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok((
                UserRow {
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    created_ms: r.try_get("created_ms")?,
                    disabled: r.try_get::<i64, _>("disabled")? != 0,
                },
                r.try_get("password_hash")?,
            ))
        })
        .transpose()
    }

    pub async fn update_user(
        &self,
        name: &str,
        role: Option<&str>,
        password_hash: Option<&str>,
        disabled: Option<bool>,
    ) -> Result<bool> {
        let mut found = false;
        if let Some(role) = role {
            found |= sqlx::query("UPDATE users SET role = $1 WHERE name = $2")
                .bind(role)
                .bind(name)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1;
        }
        if let Some(h) = password_hash {
            found |= sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
                .bind(h)
                .bind(name)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1;
        }
        if let Some(d) = disabled {
            found |= sqlx::query("UPDATE users SET disabled = $1 WHERE name = $2")
                .bind(i64::from(d))
                .bind(name)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1;
        }
        Ok(found)
    }

    /// Deletes a user and its API tokens.
    pub async fn delete_user(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM api_tokens WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn create_api_token(
        &self,
        id: &str,
        user: &str,
        name: &str,
        hash: &str,
        expires_ms: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, user_name, name, token_hash, created_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(user)
        .bind(name)
        .bind(hash)
        .bind(now_ms())
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The user and role behind a token hash, when the token is valid now.
    pub async fn token_user(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<(String, String, String)>> {
        let r = sqlx::query(
            "SELECT t.id AS id, u.name AS name, u.role AS role FROM api_tokens t \
             JOIN users u ON u.name = t.user_name \
             WHERE t.token_hash = $1 AND u.disabled = 0 AND (t.expires_ms IS NULL OR t.expires_ms > $2)",
        )
        .bind(hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        match r {
            None => Ok(None),
            Some(r) => {
                let id: String = r.try_get("id")?;
                sqlx::query("UPDATE api_tokens SET last_used_ms = $1 WHERE id = $2")
                    .bind(now)
                    .bind(&id)
                    .execute(&self.pool)
                    .await?;
                Ok(Some((id, r.try_get("name")?, r.try_get("role")?)))
            }
        }
    }

    pub async fn api_tokens(&self, user: Option<&str>) -> Result<Vec<ApiTokenRow>> {
        let mut w = Where::default();
        if let Some(u) = user {
            w.and("user_name = ?", Val::S(u.into()));
        }
        let sql = format!(
            "SELECT id, user_name, name, created_ms, expires_ms, last_used_ms FROM api_tokens{} ORDER BY created_ms",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiTokenRow {
                    id: r.try_get("id")?,
                    user: r.try_get("user_name")?,
                    name: r.try_get("name")?,
                    created_ms: r.try_get("created_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    last_used_ms: r.try_get("last_used_ms")?,
                })
            })
            .collect()
    }

    /// Deletes a token (of `user` only, when given).
    pub async fn delete_api_token(&self, id: &str, user: Option<&str>) -> Result<bool> {
        let r = match user {
            Some(u) => {
                sqlx::query("DELETE FROM api_tokens WHERE id = $1 AND user_name = $2")
                    .bind(id)
                    .bind(u)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM api_tokens WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(r.rows_affected() == 1)
    }

    // ---- join tokens and certificates ----

    pub async fn create_join_token(
        &self,
        id: &str,
        cluster: &str,
        hash: &str,
        by: &str,
        expires_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (id, cluster, token_hash, created_by, created_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(cluster)
        .bind(hash)
        .bind(by)
        .bind(now_ms())
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Uses a join token once: returns its cluster, or why it is refused.
    pub async fn use_join_token(
        &self,
        hash: &str,
        node: &str,
        now: i64,
    ) -> Result<Result<String, &'static str>> {
        let row = sqlx::query(
            "SELECT cluster, expires_ms, used_ms FROM join_tokens WHERE token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Err("unknown join token"));
        };
        if row.try_get::<Option<i64>, _>("used_ms")?.is_some() {
            return Ok(Err("this join token was already used"));
        }
        if row.try_get::<i64, _>("expires_ms")? <= now {
            return Ok(Err("this join token has expired"));
        }
        // The conditional update makes the token single-use even with concurrent requests.
        let r = sqlx::query(
            "UPDATE join_tokens SET used_ms = $1, used_by = $2 WHERE token_hash = $3 AND used_ms IS NULL",
        )
        .bind(now)
        .bind(node)
        .bind(hash)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(Err("this join token was already used"));
        }
        Ok(Ok(row.try_get("cluster")?))
    }

    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenRow>> {
        let rows = sqlx::query(
            "SELECT id, cluster, created_by, created_ms, expires_ms, used_ms, used_by FROM join_tokens ORDER BY created_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JoinTokenRow {
                    id: r.try_get("id")?,
                    cluster: r.try_get("cluster")?,
                    created_by: r.try_get("created_by")?,
                    created_ms: r.try_get("created_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    used_ms: r.try_get("used_ms")?,
                    used_by: r.try_get("used_by")?,
                })
            })
            .collect()
    }

    pub async fn delete_join_token(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM join_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    pub async fn add_certificate(
        &self,
        fingerprint: &str,
        cluster: &str,
        node: &str,
        expires_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO certificates (fingerprint, cluster, node, issued_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(fingerprint)
        .bind(cluster)
        .bind(node)
        .bind(now_ms())
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn certificate(&self, fingerprint: &str) -> Result<Option<CertificateRow>> {
        let rows = self
            .certificates_where("fingerprint = $1", fingerprint)
            .await?;
        Ok(rows.into_iter().next())
    }

    pub async fn certificates(&self) -> Result<Vec<CertificateRow>> {
        self.certificates_where("1 = 1 OR fingerprint = $1", "")
            .await
    }

    async fn certificates_where(&self, cond: &str, arg: &str) -> Result<Vec<CertificateRow>> {
        let sql = format!(
            "SELECT fingerprint, cluster, node, issued_ms, expires_ms, revoked_ms, revoked_by \
             FROM certificates WHERE {cond} ORDER BY issued_ms"
        );
        let rows = sqlx::query(&sql).bind(arg).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(CertificateRow {
                    fingerprint: r.try_get("fingerprint")?,
                    cluster: r.try_get("cluster")?,
                    node: r.try_get("node")?,
                    issued_ms: r.try_get("issued_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                    revoked_by: r.try_get("revoked_by")?,
                })
            })
            .collect()
    }

    /// Revokes one certificate, or every certificate of a node when `fingerprint` is `None`.
    pub async fn revoke(
        &self,
        fingerprint: Option<&str>,
        node: Option<(&str, &str)>,
        by: &str,
    ) -> Result<u64> {
        let now = now_ms();
        let r = match (fingerprint, node) {
            (Some(fp), _) => {
                sqlx::query(
                    "UPDATE certificates SET revoked_ms = $1, revoked_by = $2 WHERE fingerprint = $3 AND revoked_ms IS NULL",
                )
                .bind(now)
                .bind(by)
                .bind(fp)
                .execute(&self.pool)
                .await?
            }
            (None, Some((c, n))) => {
                sqlx::query(
                    "UPDATE certificates SET revoked_ms = $1, revoked_by = $2 WHERE cluster = $3 AND node = $4 AND revoked_ms IS NULL",
                )
                .bind(now)
                .bind(by)
                .bind(c)
                .bind(n)
                .execute(&self.pool)
                .await?
            }
            (None, None) => return Ok(0),
        };
        Ok(r.rows_affected())
    }

    pub async fn revoked_fingerprints(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT fingerprint FROM certificates WHERE revoked_ms IS NOT NULL ORDER BY fingerprint",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("fingerprint")?)).collect()
    }

    // ---- audit ----

    pub async fn audit(
        &self,
        actor: &str,
        method: &str,
        path: &str,
        status: u16,
        remote: &str,
        detail: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit (ts_ms, actor, method, path, status, remote, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(now_ms())
        .bind(actor)
        .bind(method)
        .bind(path)
        .bind(i64::from(status))
        .bind(remote)
        .bind(detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn audit_log(&self, before_seq: Option<i64>, limit: i64) -> Result<Vec<AuditRow>> {
        let mut w = Where::default();
        if let Some(b) = before_seq {
            w.and("seq < ?", Val::I(b));
        }
        let n = w.next();
        w.vals.push(Val::I(limit.clamp(1, 500)));
        let sql = format!(
            "SELECT seq, ts_ms, actor, method, path, status, remote, detail FROM audit{} ORDER BY seq DESC LIMIT ${n}",
            w.sql()
        );
        let rows = bind_all(sqlx::query(&sql), &w.vals)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get("seq")?,
                    ts_ms: r.try_get("ts_ms")?,
                    actor: r.try_get("actor")?,
                    method: r.try_get("method")?,
                    path: r.try_get("path")?,
                    status: r.try_get("status")?,
                    remote: r.try_get("remote")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    // ---- leases between servers ----

    /// Takes or renews the named lease for `holder` until `until`: true when `holder` has it.
    pub async fn worker_lease(
        &self,
        name: &str,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO worker_leases (name, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE worker_leases.holder = excluded.holder OR worker_leases.until_ms < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// The id of an event the server itself records (agent up/down): the same on every server
/// for the same second, so two servers noticing it store it once.
pub fn server_event_id(kind: &str, cluster: &str, node: &str, now: i64) -> String {
    format!("server-{kind}-{cluster}-{node}-{}", now / 1000)
}

/// An event to store.
struct NewEvent<'a> {
    id: &'a str,
    ts_ms: i64,
    received_ms: i64,
    cluster: &'a str,
    node: &'a str,
    kind: &'a str,
    message: &'a str,
}

/// Stores an event once by id and, when it is new, queues its webhook deliveries in the same
/// transaction. Returns whether it was new.
async fn store_event_tx(
    tx: &mut sqlx::Transaction<'_, Any>,
    outbox: &mut Outbox,
    ev: NewEvent<'_>,
) -> Result<bool> {
    let row = sqlx::query(
        "INSERT INTO events (id, ts_ms, received_ms, cluster, node, kind, message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING seq",
    )
    .bind(ev.id)
    .bind(ev.ts_ms)
    .bind(ev.received_ms)
    .bind(ev.cluster)
    .bind(ev.node)
    .bind(ev.kind)
    .bind(ev.message)
    .fetch_optional(&mut **tx)
    .await?;
    // No row: the id was stored before (a report delivered twice), and so were its deliveries.
    let Some(row) = row else {
        return Ok(false);
    };
    let doc = EventDoc {
        seq: row.try_get("seq")?,
        id: ev.id.to_string(),
        ts_ms: ev.ts_ms,
        received_ms: ev.received_ms,
        cluster: ev.cluster.to_string(),
        node: ev.node.to_string(),
        kind: ev.kind.to_string(),
        message: ev.message.to_string(),
        severity: severity_of(ev.kind),
    };
    outbox.add(tx, &doc, ev.received_ms).await?;
    Ok(true)
}

/// Stores an event the server itself records (at `now`), with its webhook deliveries.
#[allow(clippy::too_many_arguments)]
async fn insert_event_tx(
    tx: &mut sqlx::Transaction<'_, Any>,
    outbox: &mut Outbox,
    id: &str,
    now: i64,
    cluster: &str,
    node: &str,
    kind: &str,
    message: &str,
) -> Result<bool> {
    store_event_tx(
        tx,
        outbox,
        NewEvent {
            id,
            ts_ms: now,
            received_ms: now,
            cluster,
            node,
            kind,
            message,
        },
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn advance_tx(
    tx: &mut sqlx::Transaction<'_, Any>,
    outbox: &mut Outbox,
    id: &str,
    state: CommandPhase,
    message: &str,
    result: Option<&serde_json::Value>,
    delivered_to: Option<&str>,
    now: i64,
) -> Result<bool> {
    let row = sqlx::query("SELECT state, cluster, kind FROM commands WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let cur: String = row.try_get("state")?;
    let cur = CommandPhase::parse(&cur).unwrap_or(CommandPhase::Queued);
    if phase_rank(state) <= phase_rank(cur) {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE commands SET state = $1, message = $2, result_json = COALESCE($3, result_json), \
         delivered_to = COALESCE($4, delivered_to), updated_ms = $5 WHERE id = $6",
    )
    .bind(state.as_str())
    .bind(message)
    .bind(result.map(serde_json::to_string).transpose()?)
    .bind(delivered_to)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    if state.is_final() {
        let cluster: String = row.try_get("cluster")?;
        let kind: String = row.try_get("kind")?;
        insert_event_tx(
            tx,
            outbox,
            &format!("server-command-{id}"),
            now,
            &cluster,
            delivered_to.unwrap_or("server"),
            "command_result",
            &format!("command {id} ({kind}) {}: {message}", state.as_str()),
        )
        .await?;
    }
    Ok(true)
}

async fn update_command_tx(
    tx: &mut sqlx::Transaction<'_, Any>,
    outbox: &mut Outbox,
    c: &AgentCommandState,
    node: &str,
    now: i64,
) -> Result<()> {
    let result = c.result.clone();
    advance_tx(
        tx,
        outbox,
        &c.id,
        c.state,
        &c.message,
        result.as_ref(),
        Some(node),
        now,
    )
    .await?;
    Ok(())
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((u, _)) => format!("{}{u}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[test]
    fn where_numbers_parameters_in_order() {
        let mut w = Where::default();
        w.and("a = ?", Val::I(1)).and("b > ?", Val::S("x".into()));
        assert_eq!(w.sql(), " WHERE a = $1 AND b > $2");
        assert_eq!(w.next(), 3);
    }
}
