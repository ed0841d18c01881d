//! Request and response bodies of the agent API, shared by the agent, the CLI and the lab.

use crate::status::NodeStatus;
use serde::{Deserialize, Serialize};

/// `POST /v1/demote`: stop cleanly, then run as a standby of `primary`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoteRequest {
    pub primary: String,
}

/// `POST /v1/follow`: stream from `primary` instead (a replica only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowRequest {
    pub primary: String,
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
