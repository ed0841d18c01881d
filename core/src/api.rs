//! Request and response bodies of the agent API, shared by the agent, the CLI and the lab.

use crate::status::NodeStatus;
use serde::{Deserialize, Serialize};

/// `POST /v1/switchover`: hand the primary role over to `candidate` (or the best replica when
/// absent), now or at `scheduled_at` (RFC 3339, e.g. `2026-11-22T10:00:00Z`). The old primary
/// shuts down cleanly, the candidate waits until it has received every WAL record, takes the
/// lease and promotes; the old primary follows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

/// `POST /v1/failover`: make `candidate` the primary when there is no healthy primary (the
/// lease expired or was released). Allowed in maintenance mode; refused while a healthy
/// primary holds the lease (use a switchover).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub candidate: String,
}

/// The answer to an operation: done (or failed), and the status afterwards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationResult {
    pub operation: String,
    pub ok: bool,
    pub message: String,
    pub status: NodeStatus,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    pub fn new(status: u16, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: title.into(),
            status,
            detail: detail.into(),
            field: None,
        }
    }
    pub fn field(mut self, f: &str) -> Problem {
        self.field = Some(f.into());
        self
    }
}

/// `GET /v1/cluster`: every member as this agent last saw it (its own status and its peers').
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster: String,
    /// The agent that answered.
    pub reported_by: String,
    pub members: Vec<MemberView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub host: String,
    pub pg_port: u16,
    #[serde(default)]
    pub api_port: u16,
    /// `None` when the member's agent did not answer.
    pub status: Option<NodeStatus>,
}
