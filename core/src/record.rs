//! Per-failover records: for every change of lease holder — automatic failover, switchover,
//! manual failover — who held the lease and why it was lost, every candidate with its WAL
//! position, lag, tags and verdict, who won and why, and the time of each step. Kept in the
//! replicated state so any member can answer `GET /v1/history`.

use crate::candidate::Verdict;
use crate::lsn::Lsn;
use serde::{Deserialize, Serialize};

/// What kind of change of holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The first lease of the cluster.
    Bootstrap,
    /// The lease ran out or was given up and the best candidate took it.
    Failover,
    /// Planned: the holder handed the lease to a successor.
    Switchover,
    /// An operator named the new primary.
    ManualFailover,
}

/// One candidate as the winner saw it when it took the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateRecord {
    pub name: String,
    pub received_lsn: Option<Lsn>,
    /// Bytes behind the old primary's last reported position, when both are known.
    pub lag_bytes: Option<u64>,
    pub nofailover: bool,
    pub failover_priority: u32,
    /// In the committed synchronous set (synchronous mode).
    pub synchronous: bool,
    pub verdict: Verdict,
}

/// A step and when it happened (wall clock of the member that did it, ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// `detected`, `lease_acquired`, `promoted`, `first_write_accepted`, `fenced`, …
    pub step: String,
    pub at_ms: u64,
    pub by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// The epoch of the new lease.
    pub epoch: u64,
    pub kind: ChangeKind,
    pub old_holder: Option<String>,
    /// Why the old holder lost the lease (expired, released, …).
    pub lost_because: String,
    /// The old holder released the lease (it stepped down cleanly); false when it ran out.
    #[serde(default)]
    pub old_released: bool,
    pub new_holder: String,
    /// Why this member won.
    pub won_because: String,
    pub candidates: Vec<CandidateRecord>,
    /// The old primary's last reported WAL position.
    pub old_primary_lsn: Option<Lsn>,
    pub steps: Vec<Step>,
}

/// `GET /v1/history`: the records, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub failovers: Vec<FailoverRecord>,
}
