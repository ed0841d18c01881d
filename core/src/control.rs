//! The contract between the control plane (`pgwarden-server`) and the agents: enrollment with a
//! join token, the agent's reports (status and events, pushed), and the commands the server
//! pushes to an agent. Shared by the server, the agent, the CLI and the lab.
//!
//! Routes (server, HTTPS):
//! - `GET  /api/v1/enroll/ca` — the installation's CA certificate (PEM), no authentication; the
//!   agent checks its SHA-256 fingerprint against the one the operator gave it.
//! - `POST /api/v1/enroll` — [`EnrollRequest`] → [`EnrollResponse`]; authenticated by the
//!   one-time join token in the body.
//! - `POST /api/v1/agent/report` — [`AgentReport`] → [`ReportAck`]; mutual TLS, the client
//!   certificate names the node (`CN = <node>`, `OU = <cluster>`).
//! - `POST /api/v1/agent/renew` — [`RenewRequest`] → [`EnrollResponse`]; mutual TLS.
//!
//! Routes (agent API, HTTPS, the server authenticates with its CA-signed certificate):
//! - `POST /v1/commands` — [`AgentCommand`] → `202` [`AgentCommandState`]; idempotent by id.
//! - `GET  /v1/commands/{id}` — [`AgentCommandState`]; `GET /v1/commands` — the recent ones.

use crate::event::Event;
use crate::status::NodeStatus;
use serde::{Deserialize, Serialize};

/// The most events one report carries; the rest follow in the next report.
pub const REPORT_EVENTS_MAX: usize = 500;

/// `POST /api/v1/enroll`: exchange a join token and a certificate signing request for a
/// certificate signed by the installation's CA. The private key never leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// Must be the cluster the token was created for.
    pub cluster: String,
    pub node: String,
    /// PEM `CERTIFICATE REQUEST`; its subject alternative names are the node's addresses.
    pub csr_pem: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub cluster: String,
    pub node: String,
    /// The node's certificate (PEM), valid for server and client authentication.
    pub cert_pem: String,
    pub ca_pem: String,
    /// SHA-256 of the node certificate (`AB:CD:…`), the id the server revokes it by.
    pub fingerprint: String,
}

/// `POST /api/v1/agent/renew`: a new certificate for the same node (rotation), authenticated by
/// the current one. The old certificate stays valid until it is revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// `POST /api/v1/agent/report`: what an agent pushes every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub cluster: String,
    pub node: String,
    pub agent_version: String,
    /// Where the server reaches this agent's API (`https://host:8443`).
    pub api_url: String,
    pub status: NodeStatus,
    /// Events not yet acknowledged, oldest first, at most [`REPORT_EVENTS_MAX`]. Delivered
    /// again after a failed report; the server stores each id once.
    pub events: Vec<Event>,
    /// The newest failover record's epoch this agent knows; the server fetches
    /// `GET /v1/history` when it is newer than what it stored.
    #[serde(default)]
    pub history_epoch: Option<u64>,
    /// Commands whose state changed since the last acknowledged report.
    #[serde(default)]
    pub commands: Vec<AgentCommandState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    /// How many of the report's events are now stored (new and already known); the agent
    /// moves its delivery cursor past exactly that many.
    pub events_stored: usize,
    /// SHA-256 fingerprints of revoked certificates: agents refuse peers presenting them.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// How often the server wants reports.
    pub report_interval_ms: u64,
}

/// What a command does. Cluster-level commands (switchover, failover, pause, resume, config)
/// are handed to the vote by whichever agent receives them; restart and reinitialize act on
/// the receiving node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Switchover,
    Failover,
    Restart,
    Reinitialize,
    Pause,
    Resume,
    Config,
}

impl CommandKind {
    pub const ALL: [CommandKind; 7] = [
        CommandKind::Switchover,
        CommandKind::Failover,
        CommandKind::Restart,
        CommandKind::Reinitialize,
        CommandKind::Pause,
        CommandKind::Resume,
        CommandKind::Config,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Switchover => "switchover",
            CommandKind::Failover => "failover",
            CommandKind::Restart => "restart",
            CommandKind::Reinitialize => "reinitialize",
            CommandKind::Pause => "pause",
            CommandKind::Resume => "resume",
            CommandKind::Config => "config",
        }
    }

    pub fn parse(s: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Restart and reinitialize act on one node and must be sent to that node's agent.
    pub fn node_level(self) -> bool {
        matches!(self, CommandKind::Restart | CommandKind::Reinitialize)
    }

    /// The agent API call that carries it out: method and path.
    pub fn agent_route(self) -> (&'static str, &'static str) {
        match self {
            CommandKind::Switchover => ("POST", "/v1/switchover"),
            CommandKind::Failover => ("POST", "/v1/failover"),
            CommandKind::Restart => ("POST", "/v1/restart"),
            CommandKind::Reinitialize => ("POST", "/v1/reinitialize"),
            CommandKind::Pause => ("POST", "/v1/pause"),
            CommandKind::Resume => ("POST", "/v1/resume"),
            CommandKind::Config => ("PATCH", "/v1/config"),
        }
    }
}

/// Where a command is. The server moves it queued → delivered (the agent accepted it) →
/// running → succeeded / failed, or timed out when no answer came before its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandPhase {
    Queued,
    Delivered,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

impl CommandPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandPhase::Queued => "queued",
            CommandPhase::Delivered => "delivered",
            CommandPhase::Running => "running",
            CommandPhase::Succeeded => "succeeded",
            CommandPhase::Failed => "failed",
            CommandPhase::TimedOut => "timed_out",
        }
    }
    pub fn parse(s: &str) -> Option<CommandPhase> {
        [
            CommandPhase::Queued,
            CommandPhase::Delivered,
            CommandPhase::Running,
            CommandPhase::Succeeded,
            CommandPhase::Failed,
            CommandPhase::TimedOut,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandPhase::Succeeded | CommandPhase::Failed | CommandPhase::TimedOut
        )
    }
}

/// `POST /v1/commands` on an agent. `args` is the body of the agent API call that carries it
/// out (e.g. a `SwitchoverRequest`, a configuration patch; `{}` for pause).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCommand {
    pub id: String,
    pub kind: CommandKind,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// A command as the agent that received it sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentCommandState {
    pub id: String,
    pub kind: CommandKind,
    /// `running`, `succeeded` or `failed`.
    pub state: CommandPhase,
    pub message: String,
    /// The agent API's answer (status code and body) once finished.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    pub started_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// How many times it was posted; it runs once whatever this says.
    pub deliveries: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in CommandKind::ALL {
            assert_eq!(CommandKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).expect("json");
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(CommandKind::parse("promote"), None);
        assert!(CommandKind::Restart.node_level());
        assert!(!CommandKind::Switchover.node_level());
    }

    #[test]
    fn phases_round_trip_and_know_which_are_final() {
        for p in [
            "queued",
            "delivered",
            "running",
            "succeeded",
            "failed",
            "timed_out",
        ] {
            assert_eq!(CommandPhase::parse(p).map(|x| x.as_str()), Some(p));
        }
        assert!(CommandPhase::TimedOut.is_final());
        assert!(!CommandPhase::Delivered.is_final());
    }
}
