//! The agents' replicated log, on openraft. The log carries `pgwarden_core::lease::Proposal`s;
//! the state machine applies them with `ClusterState::apply`, so every member holds the same
//! lease, maintenance flag and history. `store` is the durable storage, `network` the RPCs
//! between agents, `node` this agent's member. Who is primary is not decided by the lease yet:
//! that wiring comes with the rest of the voting work.

pub mod network;
pub mod node;
pub mod store;

use pgwarden_core::lease::{Proposal, Rejected};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// What applying a proposal gave: accepted, or refused with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Result<(), Rejected>);

openraft::declare_raft_types!(
    /// openraft's type configuration for pgwarden's replicated log.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);
