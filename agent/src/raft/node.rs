//! This agent's member of the replicated log: starts openraft on the durable store, forms the
//! group from `cluster.members` on first start, and submits proposals (forwarded to the
//! current leader when this member is not it).

use super::network::Network;
use super::store::{LogStore, StateMachine};
use super::{Applied, TypeConfig};
use anyhow::{anyhow, bail, Context, Result};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use pgwarden_core::config::{member_id, AgentConfig};
use pgwarden_core::lease::Proposal;
use pgwarden_core::status::Consensus as ConsensusStatus;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// How long a proposal may wait for a majority.
pub const PROPOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Consensus {
    pub raft: Raft<TypeConfig>,
    pub sm: StateMachine,
    pub id: u64,
    names: BTreeMap<u64, String>,
    net: Network,
}

impl Consensus {
    pub async fn start(cfg: &AgentConfig, token: &str) -> Result<Consensus> {
        let dir = PathBuf::from(&cfg.node.state_dir).join("raft");
        let log =
            LogStore::open(&dir).with_context(|| format!("open the log in {}", dir.display()))?;
        let sm = StateMachine::open(&dir)
            .with_context(|| format!("open the state machine in {}", dir.display()))?;
        let raft_cfg = Config {
            cluster_name: cfg.cluster.name.clone(),
            heartbeat_interval: 150,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 200,
            ..Default::default()
        }
        .validate()
        .context("raft configuration")?;
        let id = member_id(&cfg.node.name);
        let net = Network::new(token.to_string(), cfg.tls.as_ref())?;
        let raft = Raft::new(id, Arc::new(raft_cfg), net.clone(), log, sm.clone())
            .await
            .context("start raft")?;
        let mut members = BTreeMap::new();
        let mut names = BTreeMap::new();
        for m in &cfg.cluster.members {
            let mid = member_id(&m.name);
            members.insert(
                mid,
                BasicNode {
                    addr: format!("{}:{}", m.host, m.api_port),
                },
            );
            names.insert(mid, m.name.clone());
        }
        if !raft
            .is_initialized()
            .await
            .map_err(|e| anyhow!("raft: {e}"))?
        {
            // Every member may do this with the same membership: openraft makes it safe.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "raft group already initialized");
            }
        }
        Ok(Consensus {
            raft,
            sm,
            id,
            names,
            net,
        })
    }

    fn name(&self, id: u64) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// This member's view, for the status.
    pub fn info(&self) -> ConsensusStatus {
        let m = self.raft.metrics().borrow().clone();
        let state = self.sm.state();
        ConsensusStatus {
            raft_state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            term: m.current_term,
            leader: m.current_leader.map(|l| self.name(l)),
            last_applied_index: m.last_applied.map(|l| l.index),
            members: m
                .membership_config
                .membership()
                .voter_ids()
                .map(|id| self.name(id))
                .collect(),
            lease: state.lease.clone(),
            paused: state.paused,
            synchronous_mode: state.config.failover.synchronous_mode,
            sync: state.sync.clone(),
        }
    }

    /// Commits a proposal through the leader (forwarding it when this member is not the
    /// leader) and returns what applying it gave.
    /// Commits a proposal and returns once this member has applied it too, so that what the
    /// caller reads next (status, configuration) includes its own change.
    pub async fn propose(&self, p: Proposal) -> Result<Applied> {
        // Without a majority nothing commits: answer within a few seconds instead of waiting.
        let (applied, index) = tokio::time::timeout(PROPOSE_TIMEOUT, self.propose_inner(p))
            .await
            .map_err(|_| anyhow!("not committed within {PROPOSE_TIMEOUT:?}: no majority of the members is reachable"))??;
        let mut m = self.raft.metrics();
        let caught_up = m.wait_for(|m| m.last_applied.is_some_and(|l| l.index >= index));
        tokio::time::timeout(PROPOSE_TIMEOUT, caught_up)
            .await
            .map_err(|_| anyhow!("committed, but not yet applied on this member"))?
            .map_err(|e| anyhow!("raft stopped: {e}"))?;
        Ok(applied)
    }

    async fn propose_inner(&self, p: Proposal) -> Result<(Applied, u64)> {
        match self.raft.client_write(p.clone()).await {
            Ok(r) => Ok((r.data, r.log_id.index)),
            Err(e) => match e.forward_to_leader::<BasicNode>() {
                Some(f) => {
                    let Some(node) = &f.leader_node else {
                        bail!("no leader is known yet");
                    };
                    self.forward(&node.addr, &p).await
                }
                None => Err(anyhow!("propose: {e}")),
            },
        }
    }

    /// Commits a proposal only if this member leads (used by the forwarding endpoint); returns
    /// the result and the log index it was committed at.
    pub async fn propose_here(&self, p: Proposal) -> Result<(Applied, u64)> {
        tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(p))
            .await
            .map_err(|_| anyhow!("not committed within {PROPOSE_TIMEOUT:?}"))?
            .map(|r| (r.data, r.log_id.index))
            .map_err(|e| anyhow!("propose: {e}"))
    }

    /// Calls another member's agent API (`addr` is host:port) with the cluster's credentials
    /// (bearer token, and the node certificate under mutual TLS). Returns the HTTP status and
    /// the JSON body.
    pub async fn call(
        &self,
        addr: &str,
        path: &str,
        body: &serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<(u16, serde_json::Value)> {
        let r = self
            .net
            .http
            .post(format!("{}://{addr}{path}", self.net.scheme))
            .bearer_auth(&self.net.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .with_context(|| format!("call {addr}{path}"))?;
        let code = r.status().as_u16();
        let v = r.json().await.unwrap_or(serde_json::Value::Null);
        Ok((code, v))
    }

    async fn forward(&self, addr: &str, p: &Proposal) -> Result<(Applied, u64)> {
        let r = self
            .net
            .http
            .post(format!("{}://{addr}/v1/raft/propose", self.net.scheme))
            .bearer_auth(&self.net.token)
            .json(p)
            .send()
            .await
            .with_context(|| format!("forward to the leader at {addr}"))?;
        if !r.status().is_success() {
            bail!("the leader at {addr} answered {}", r.status());
        }
        let res: Result<(Applied, u64), String> =
            r.json().await.context("read the leader's answer")?;
        res.map_err(|e| anyhow!("the leader refused: {e}"))
    }
}
