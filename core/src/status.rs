//! The node status: what an agent last observed of its PostgreSQL, served as JSON on `GET /`
//! and `GET /status`, used by the health checks and the metrics. Shared by agent, CLI and
//! (later) the server and the browser.

use crate::lsn::Lsn;
use serde::{Deserialize, Serialize};

/// The role PostgreSQL is actually running in, as observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    /// Not known: PostgreSQL is down or did not answer.
    #[default]
    Unknown,
}

/// What the agent is doing with PostgreSQL, as observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgState {
    /// Accepting connections.
    Running,
    /// Postmaster up, not yet accepting connections (crash recovery, startup).
    Starting,
    /// The agent is stopping PostgreSQL (demotion, restart, rejoin, reinitialization).
    Stopping,
    Stopped,
    /// Running initdb for a new cluster.
    Bootstrapping,
    /// Copying the data directory from another member with pg_basebackup.
    Cloning,
    /// Running pg_rewind against the new primary.
    Rewinding,
    /// The data directory is not usable (wrong major version, not PostgreSQL); left untouched.
    Refused,
    #[default]
    Unknown,
}

/// What the agent has been told this node should be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredRole {
    Primary,
    #[default]
    Replica,
}

/// The intent: the role this node should have and, for a replica, which member it follows.
/// It follows from the lease (`elect::intent`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub role: DesiredRole,
    /// The member a replica streams from.
    pub upstream: Option<String>,
}

impl Intent {
    pub fn primary() -> Self {
        Intent {
            role: DesiredRole::Primary,
            upstream: None,
        }
    }
    /// Not writable and no primary to follow: a standby without an upstream.
    pub fn standby() -> Self {
        Intent {
            role: DesiredRole::Replica,
            upstream: None,
        }
    }
    pub fn replica_of(upstream: &str) -> Self {
        Intent {
            role: DesiredRole::Replica,
            upstream: Some(upstream.to_string()),
        }
    }
}

/// One row of `pg_stat_replication` on a primary (or a cascading replica).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationConn {
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub sync_state: String,
}

/// `pg_stat_wal_receiver` on a replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalReceiver {
    pub status: String,
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
    pub received_tli: Option<u32>,
    pub latest_end_lsn: Option<Lsn>,
    pub slot_name: Option<String>,
}

/// Progress of a running base backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// WAL positions. On a primary `write`/`flush` are set; on a replica `received`/`replayed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPositions {
    pub write: Option<Lsn>,
    pub flush: Option<Lsn>,
    pub received: Option<Lsn>,
    pub replayed: Option<Lsn>,
}

/// This member's view of the agents' replicated log and of the lease it carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consensus {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub raft_state: String,
    pub term: u64,
    /// The member currently leading the log, when known.
    pub leader: Option<String>,
    pub last_applied_index: Option<u64>,
    pub members: Vec<String>,
    /// The lease as this member applied it.
    pub lease: Option<crate::lease::Lease>,
    /// Maintenance mode: no automatic failover.
    pub paused: bool,
    /// `off`, `on` or `strict`.
    #[serde(default)]
    pub synchronous_mode: crate::dynconfig::SyncMode,
    /// The committed synchronous set.
    #[serde(default)]
    pub sync: Vec<String>,
}

/// Everything the agent knows about its node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub cluster: String,
    pub role: Role,
    pub state: PgState,
    pub intent: Intent,
    /// `server_version_num`, e.g. 150004.
    pub server_version: Option<u32>,
    pub system_identifier: Option<String>,
    pub timeline: Option<u32>,
    pub postmaster_start_time: Option<String>,
    pub wal: WalPositions,
    /// The newest primary LSN this node knows of (from the primary's agent or its WAL sender).
    pub primary_lsn: Option<Lsn>,
    /// Replay lag behind `primary_lsn`, in bytes; `None` when not known.
    pub lag_bytes: Option<u64>,
    /// The member this replica follows, as configured in `primary_conninfo`.
    pub upstream: Option<String>,
    pub wal_receiver: Option<WalReceiver>,
    /// This replica's `sync_state` as the primary reports it (`sync`, `quorum`, `async`, …).
    pub sync_state: Option<String>,
    /// Replication connections this node serves (`pg_stat_replication`).
    pub replication: Vec<ReplicationConn>,
    pub pending_restart: bool,
    pub pending_restart_params: Vec<String>,
    pub basebackup: Option<Progress>,
    /// How often the agent restarted PostgreSQL after it died.
    pub crash_restarts: u64,
    pub last_error: Option<String>,
    /// What the agent is waiting for before it can act, if anything.
    pub waiting_for: Option<String>,
    /// This node's tags (from its configuration).
    #[serde(default)]
    pub tags: crate::config::Tags,
    /// Whether the cluster could fail over right now, as this member sees it.
    #[serde(default)]
    pub failover_readiness: Option<crate::candidate::Readiness>,
    /// The replicated log and the lease, as this member sees them.
    pub consensus: Option<Consensus>,
    /// When the agent's loop last completed, in milliseconds since the Unix epoch.
    pub last_loop_ms: u64,
    pub agent_version: String,
    /// A witness: an agent without PostgreSQL that only votes.
    #[serde(default)]
    pub witness: bool,
    /// The client endpoints (local VIP, EC2 addresses) and whether this node could take them
    /// over now; `None` when none are configured.
    #[serde(default)]
    pub endpoints: Option<crate::endpoints::EndpointStatus>,
}

impl NodeStatus {
    /// The status as health checks should see it now: the status is published once per loop,
    /// so a postmaster that died since (`postmaster_alive == false`) makes it `stopped` at once
    /// instead of up to a loop later.
    pub fn with_postmaster_alive(mut self, postmaster_alive: bool) -> NodeStatus {
        if !postmaster_alive && self.state == PgState::Running {
            self.state = PgState::Stopped;
        }
        self
    }

    /// A writable primary that the agent intends to be primary.
    pub fn is_writable_primary(&self) -> bool {
        self.state == PgState::Running
            && self.role == Role::Primary
            && self.intent.role == DesiredRole::Primary
    }

    pub fn is_running_replica(&self) -> bool {
        self.state == PgState::Running && self.role == Role::Replica
    }

    pub fn is_streaming(&self) -> bool {
        self.is_running_replica()
            && self
                .wal_receiver
                .as_ref()
                .is_some_and(|w| w.status == "streaming")
    }

    pub fn is_sync_standby(&self) -> bool {
        matches!(self.sync_state.as_deref(), Some("sync") | Some("quorum"))
    }
}
