//! The primary's lease: the replicated state machine that decides who may run PostgreSQL as a
//! writable primary, and the timing rules each side follows.
//!
//! Every change is a `Proposal` committed through the agents' replicated log and applied, in
//! the same order, by `apply` on every member — so `apply` is deterministic: the time it uses
//! is the proposer's wall clock, carried in the proposal.
//!
//! Safety (never two writable primaries) rests on three rules, with clocks whose pairwise
//! offset is at most `drift_ms`:
//! 1. A holder renews by proposing `Renew` stamped with its wall clock `t`; once committed the
//!    lease runs to `t + ttl`. The holder itself trusts it only until `send + ttl - margin` on
//!    its monotonic clock, where `send` is when it sent that renewal, and stops accepting
//!    writes before then unless a later renewal committed (`holder_deadline`).
//! 2. `Acquire` commits only when the proposer's clock is past the expiry plus `drift_ms`
//!    (`apply` checks it, so a delayed proposal cannot sneak in after a renewal).
//! 3. Every lease has an epoch; `Renew`/`Release` of an older epoch are refused, and every
//!    action the agent takes carries the epoch it holds.

use crate::dynconfig::{apply_patch, ConfigChange, ConfigPatch, DynamicConfig, PatchError};
use crate::lsn::Lsn;
use crate::record::{FailoverRecord, Step};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub epoch: u64,
    /// Wall-clock milliseconds at which the lease ends, by the holder's clock.
    pub expires_at_ms: u64,
    /// The holder's WAL position at its last renewal (bounds the loss of a failover).
    pub last_lsn: Option<Lsn>,
    /// The holder stepped down cleanly: the lease is free without waiting for its expiry.
    #[serde(default)]
    pub released: bool,
    /// A switchover: only this member may take the released lease until `reserved_until_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    #[serde(default)]
    pub reserved_until_ms: u64,
}

/// The cluster's replicated state: the lease, the maintenance flag, the dynamic configuration
/// and their histories.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub lease: Option<Lease>,
    /// Maintenance mode: no automatic acquisition.
    pub paused: bool,
    /// Every change of holder, oldest first.
    pub history: Vec<HolderChange>,
    /// PostgreSQL parameters and pg_hba lines shared by every node.
    #[serde(default)]
    pub config: DynamicConfig,
    /// The last `CONFIG_HISTORY` configuration changes, oldest first.
    #[serde(default)]
    pub config_history: Vec<ConfigChange>,
    /// The committed synchronous set (synchronous mode): the standbys every acknowledged
    /// write has reached, so only they may be promoted.
    #[serde(default)]
    pub sync: Vec<String>,
    /// One record per change of holder, oldest first (the last `FAILOVER_RECORDS`).
    #[serde(default)]
    pub failovers: Vec<FailoverRecord>,
    /// Where each member runs on EC2, as it reported itself (for fencing a member that no
    /// longer answers).
    #[serde(default)]
    pub placements: std::collections::BTreeMap<String, Placement>,
}

/// A member's EC2 instance, as its agent found it through the instance metadata service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub instance_id: String,
    pub eni_id: String,
    pub availability_zone: String,
    pub private_ip: String,
}

/// How many failover records the state keeps.
pub const FAILOVER_RECORDS: usize = 100;

/// How many changes of holder the history keeps.
pub const HOLDER_HISTORY: usize = 1000;

/// How many configuration changes the history keeps.
pub const CONFIG_HISTORY: usize = 200;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderChange {
    pub epoch: u64,
    pub holder: String,
    pub previous: Option<String>,
    pub at_ms: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Proposal {
    /// Take the lease with epoch `epoch` (= current epoch + 1). `manual` (an operator's
    /// failover) is allowed while paused, never while another lease is valid.
    Acquire {
        node: String,
        epoch: u64,
        now_ms: u64,
        ttl_ms: u64,
        reason: String,
        manual: bool,
        /// What the acquirer saw: kept as this change's failover record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record: Option<Box<FailoverRecord>>,
    },
    Renew {
        node: String,
        epoch: u64,
        now_ms: u64,
        ttl_ms: u64,
        lsn: Option<Lsn>,
    },
    /// The holder stepped down cleanly (PostgreSQL stopped): the lease ends now. With a
    /// `successor` (a switchover) only that member may take it for the next `reserve_ms`.
    Release {
        node: String,
        epoch: u64,
        lsn: Option<Lsn>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        successor: Option<String>,
        #[serde(default)]
        now_ms: u64,
        #[serde(default)]
        reserve_ms: u64,
    },
    /// The holder commits its synchronous set (before relying on an addition, after
    /// dropping a member from `synchronous_standby_names`).
    SetSync {
        node: String,
        epoch: u64,
        members: Vec<String>,
    },
    /// A step of the failover record of `epoch` (promotion, first write, …).
    RecordStep {
        epoch: u64,
        step: Step,
    },
    Pause,
    Resume,
    /// A member reports where it runs on EC2.
    SetPlacement {
        node: String,
        placement: Placement,
    },
    /// Change the dynamic configuration (validated again when applied).
    SetConfig {
        patch: ConfigPatch,
        by: String,
        now_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejected {
    #[error("the lease is held by {holder} (epoch {epoch}) until {expires_at_ms}")]
    Held {
        holder: String,
        epoch: u64,
        expires_at_ms: u64,
    },
    #[error("stale epoch {given}: the current epoch is {current}")]
    StaleEpoch { given: u64, current: u64 },
    #[error("{node} does not hold the lease")]
    NotHolder { node: String },
    #[error("the lease already expired at {expires_at_ms}")]
    Expired { expires_at_ms: u64 },
    #[error("the cluster is paused (maintenance mode)")]
    Paused,
    #[error("the lease is reserved for {successor} (a switchover) until {until_ms}")]
    Reserved { successor: String, until_ms: u64 },
    #[error("invalid configuration: {0}")]
    BadConfig(PatchError),
}

impl ClusterState {
    pub fn epoch(&self) -> u64 {
        self.lease.as_ref().map_or(0, |l| l.epoch)
    }

    /// Whether the lease is free for an `Acquire` stamped `now_ms`.
    pub fn acquirable(&self, now_ms: u64, drift_ms: u64) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|l| l.released || now_ms >= l.expires_at_ms.saturating_add(drift_ms))
    }

    /// Applies a committed proposal. Deterministic: the same proposals in the same order give
    /// the same state on every member.
    pub fn apply(&mut self, p: &Proposal, drift_ms: u64) -> Result<(), Rejected> {
        match p {
            Proposal::Acquire {
                node,
                epoch,
                now_ms,
                ttl_ms,
                reason,
                manual,
                record,
            } => {
                if self.paused && !manual {
                    return Err(Rejected::Paused);
                }
                let current = self.epoch();
                if *epoch != current + 1 {
                    return Err(Rejected::StaleEpoch {
                        given: *epoch,
                        current,
                    });
                }
                let held = !self.acquirable(*now_ms, drift_ms);
                if let Some(l) = self.lease.as_ref().filter(|_| held) {
                    return Err(Rejected::Held {
                        holder: l.holder.clone(),
                        epoch: l.epoch,
                        expires_at_ms: l.expires_at_ms,
                    });
                }
                if let Some(l) = &self.lease {
                    if let Some(succ) = l.successor.as_ref().filter(|s| *s != node) {
                        if l.released && *now_ms < l.reserved_until_ms {
                            return Err(Rejected::Reserved {
                                successor: succ.clone(),
                                until_ms: l.reserved_until_ms,
                            });
                        }
                    }
                }
                let previous = self.lease.as_ref().map(|l| l.holder.clone());
                let last_lsn = self.lease.as_ref().and_then(|l| l.last_lsn);
                self.lease = Some(Lease {
                    holder: node.clone(),
                    epoch: *epoch,
                    expires_at_ms: now_ms + ttl_ms,
                    last_lsn,
                    released: false,
                    successor: None,
                    reserved_until_ms: 0,
                });
                self.history.push(HolderChange {
                    epoch: *epoch,
                    holder: node.clone(),
                    previous,
                    at_ms: *now_ms,
                    reason: reason.clone(),
                });
                let excess = self.history.len().saturating_sub(HOLDER_HISTORY);
                self.history.drain(..excess);
                // The new primary is no longer a standby of anyone.
                self.sync.retain(|m| m != node);
                if let Some(r) = record {
                    let mut r = (**r).clone();
                    r.epoch = *epoch;
                    self.failovers.push(r);
                    let excess = self.failovers.len().saturating_sub(FAILOVER_RECORDS);
                    self.failovers.drain(..excess);
                }
                Ok(())
            }
            Proposal::Renew {
                node,
                epoch,
                now_ms,
                ttl_ms,
                lsn,
            } => {
                let l = self.holder_lease(node, *epoch)?;
                if l.released || *now_ms > l.expires_at_ms {
                    return Err(Rejected::Expired {
                        expires_at_ms: l.expires_at_ms,
                    });
                }
                l.expires_at_ms = l.expires_at_ms.max(now_ms + ttl_ms);
                if lsn.is_some() {
                    l.last_lsn = l.last_lsn.max(*lsn);
                }
                Ok(())
            }
            Proposal::Release {
                node,
                epoch,
                lsn,
                successor,
                now_ms,
                reserve_ms,
            } => {
                let l = self.holder_lease(node, *epoch)?;
                l.released = true;
                l.successor = successor.clone();
                l.reserved_until_ms = now_ms + reserve_ms;
                if lsn.is_some() {
                    l.last_lsn = l.last_lsn.max(*lsn);
                }
                Ok(())
            }
            Proposal::SetSync {
                node,
                epoch,
                members,
            } => {
                self.holder_lease(node, *epoch)?;
                self.sync = members.clone();
                Ok(())
            }
            Proposal::RecordStep { epoch, step } => {
                if let Some(r) = self.failovers.iter_mut().rev().find(|r| r.epoch == *epoch) {
                    r.steps.push(step.clone());
                }
                Ok(())
            }
            Proposal::SetPlacement { node, placement } => {
                self.placements.insert(node.clone(), placement.clone());
                Ok(())
            }
            Proposal::Pause => {
                self.paused = true;
                Ok(())
            }
            Proposal::Resume => {
                self.paused = false;
                Ok(())
            }
            Proposal::SetConfig { patch, by, now_ms } => {
                let (next, changes) =
                    apply_patch(&self.config, patch).map_err(Rejected::BadConfig)?;
                if !changes.is_empty() {
                    self.config = next;
                    self.config_history.push(ConfigChange {
                        version: self.config.version,
                        at_ms: *now_ms,
                        by: by.clone(),
                        changes,
                    });
                    let excess = self.config_history.len().saturating_sub(CONFIG_HISTORY);
                    self.config_history.drain(..excess);
                }
                Ok(())
            }
        }
    }

    fn holder_lease(&mut self, node: &str, epoch: u64) -> Result<&mut Lease, Rejected> {
        let current = self.epoch();
        match self.lease.as_mut() {
            Some(l) if l.epoch != epoch => Err(Rejected::StaleEpoch {
                given: epoch,
                current,
            }),
            Some(l) if l.holder != node => Err(Rejected::NotHolder {
                node: node.to_string(),
            }),
            Some(l) => Ok(l),
            None => Err(Rejected::NotHolder {
                node: node.to_string(),
            }),
        }
    }
}

/// Until when (on the holder's monotonic clock, in ms) the holder may accept writes after a
/// renewal or acquisition it sent at `sent_mono_ms` was committed.
pub fn holder_deadline(sent_mono_ms: u64, ttl_ms: u64, margin_ms: u64) -> u64 {
    (sent_mono_ms + ttl_ms).saturating_sub(margin_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(node: &str, epoch: u64, now: u64) -> Proposal {
        Proposal::Acquire {
            node: node.into(),
            epoch,
            now_ms: now,
            ttl_ms: 1000,
            reason: "test".into(),
            manual: false,
            record: None,
        }
    }
    fn renew(node: &str, epoch: u64, now: u64) -> Proposal {
        Proposal::Renew {
            node: node.into(),
            epoch,
            now_ms: now,
            ttl_ms: 1000,
            lsn: Some(Lsn(now)),
        }
    }

    #[test]
    fn acquire_renew_expire() {
        let mut s = ClusterState::default();
        s.apply(&acquire("a", 1, 0), 100).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().expires_at_ms, 1000);
        // Held: another node cannot take it before expiry + drift.
        assert!(matches!(
            s.apply(&acquire("b", 2, 1050), 100),
            Err(Rejected::Held { .. })
        ));
        s.apply(&renew("a", 1, 500), 100).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().expires_at_ms, 1500);
        assert_eq!(s.lease.as_ref().unwrap().last_lsn, Some(Lsn(500)));
        assert!(matches!(
            s.apply(&acquire("b", 2, 1599), 100),
            Err(Rejected::Held { .. })
        ));
        s.apply(&acquire("b", 2, 1600), 100).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().holder, "b");
        assert_eq!(
            s.lease.as_ref().unwrap().last_lsn,
            Some(Lsn(500)),
            "kept for the next choice"
        );
        // The old holder's late renewal is refused by epoch.
        assert!(matches!(
            s.apply(&renew("a", 1, 1000), 100),
            Err(Rejected::StaleEpoch { .. })
        ));
        assert_eq!(s.history.len(), 2);
        assert_eq!(s.history[1].previous.as_deref(), Some("a"));
    }

    #[test]
    fn stale_and_foreign_proposals_are_refused() {
        let mut s = ClusterState::default();
        assert!(matches!(
            s.apply(&acquire("a", 2, 0), 0),
            Err(Rejected::StaleEpoch { .. })
        ));
        s.apply(&acquire("a", 1, 0), 0).unwrap();
        assert!(matches!(
            s.apply(&renew("b", 1, 10), 0),
            Err(Rejected::NotHolder { .. })
        ));
        assert!(matches!(
            s.apply(&renew("a", 1, 1001), 0),
            Err(Rejected::Expired { .. })
        ));
        // A delayed, older renewal never shortens the lease.
        s.apply(&renew("a", 1, 900), 0).unwrap();
        s.apply(&renew("a", 1, 100), 0).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().expires_at_ms, 1900);
    }

    #[test]
    fn release_frees_the_lease_at_once() {
        let mut s = ClusterState::default();
        s.apply(&acquire("a", 1, 0), 500).unwrap();
        s.apply(
            &Proposal::Release {
                node: "a".into(),
                epoch: 1,
                lsn: Some(Lsn(7)),
                successor: None,
                now_ms: 5,
                reserve_ms: 0,
            },
            500,
        )
        .unwrap();
        s.apply(&acquire("b", 2, 10), 500).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().last_lsn, Some(Lsn(7)));
    }

    #[test]
    fn a_switchover_reserves_the_lease_for_its_successor() {
        let mut s = ClusterState::default();
        s.apply(&acquire("a", 1, 0), 500).unwrap();
        let release = Proposal::Release {
            node: "a".into(),
            epoch: 1,
            lsn: Some(Lsn(9)),
            successor: Some("b".into()),
            now_ms: 100,
            reserve_ms: 1000,
        };
        s.apply(&release, 500).unwrap();
        assert!(matches!(
            s.apply(&acquire("c", 2, 200), 500),
            Err(Rejected::Reserved { ref successor, .. }) if successor == "b"
        ));
        // After the reservation anyone may take it (the successor failed to).
        let mut late = s.clone();
        late.apply(&acquire("c", 2, 1100), 500).unwrap();
        s.apply(&acquire("b", 2, 200), 500).unwrap();
        assert_eq!(s.lease.as_ref().unwrap().holder, "b");
        assert_eq!(s.lease.as_ref().unwrap().successor, None);
    }

    #[test]
    fn pause_blocks_automatic_acquisition_only() {
        let mut s = ClusterState::default();
        s.apply(&Proposal::Pause, 0).unwrap();
        assert_eq!(s.apply(&acquire("a", 1, 0), 0), Err(Rejected::Paused));
        let manual = Proposal::Acquire {
            node: "a".into(),
            epoch: 1,
            now_ms: 0,
            ttl_ms: 1000,
            reason: "manual failover".into(),
            manual: true,
            record: None,
        };
        s.apply(&manual, 0).unwrap();
        // While paused the holder still renews: health checks and the lease keep working.
        s.apply(&renew("a", 1, 10), 0).unwrap();
        s.apply(&Proposal::Resume, 0).unwrap();
        assert!(!s.paused);
    }

    #[test]
    fn config_changes_are_validated_and_kept_in_history() {
        let mut s = ClusterState::default();
        let set = |v: serde_json::Value| Proposal::SetConfig {
            patch: serde_json::from_value(v).unwrap(),
            by: "alice".into(),
            now_ms: 42,
        };
        s.apply(
            &set(serde_json::json!({"parameters": {"work_mem": "8MB"}})),
            0,
        )
        .unwrap();
        assert_eq!(s.config.version, 1);
        assert_eq!(s.config_history[0].by, "alice");
        assert_eq!(s.config_history[0].changes[0].name, "work_mem");
        let e = s
            .apply(&set(serde_json::json!({"parameters": {"port": 1}})), 0)
            .unwrap_err();
        assert!(
            matches!(e, Rejected::BadConfig(ref p) if p.field == "parameters.port"),
            "{e:?}"
        );
        assert_eq!(s.config.version, 1, "a refused change changes nothing");
        s.apply(
            &set(serde_json::json!({"parameters": {"work_mem": "8MB"}})),
            0,
        )
        .unwrap();
        assert_eq!(s.config_history.len(), 1, "a no-op leaves no history");
    }

    #[test]
    fn deadlines() {
        assert_eq!(holder_deadline(10_000, 5_000, 1_000), 14_000);
        assert_eq!(holder_deadline(0, 100, 1_000), 0);
    }
}
