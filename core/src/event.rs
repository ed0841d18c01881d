//! Events: what happened on a node, in order, with an id that stays the same wherever the event
//! is delivered (so the control plane can drop duplicates).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `<node>-<agent start ms>-<sequence>`: unique per node across agent restarts.
    pub id: String,
    pub ts_ms: u64,
    pub cluster: String,
    pub node: String,
    /// `postgres_crashed`, `promoted`, `demoted`, `rewind`, `data_dir_moved_aside`, …
    pub kind: String,
    pub message: String,
}
