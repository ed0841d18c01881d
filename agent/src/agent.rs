//! The agent's loop: every `loop_wait` it observes PostgreSQL and its peers, asks
//! `pgwarden_core::decide::next_action` what to do, and does it. API operations change the
//! intent (or ask for a one-shot restart/reinitialize) and then run the same loop until it
//! converges, so there is one code path for everything the agent does. Operations run inside
//! the loop task: they are single-flight and finish even if the caller disconnects.

use crate::events::EventLog;
use crate::pg::{Pg, SqlStatus};
use crate::sys::{self, now_ms};
use anyhow::{anyhow, Context, Result};
use pgwarden_core::config::{AgentConfig, Member};
use pgwarden_core::decide::{next_action, Action, DataDir, Observed, OneShot, Postmaster};
use pgwarden_core::dynconfig::SyncMode;
use pgwarden_core::elect::Move;
use pgwarden_core::pgtext::{self, RewindNeed};
use pgwarden_core::record::ChangeKind;
use pgwarden_core::status::{
    DesiredRole, Intent, NodeStatus, PgState, Progress, Role, WalPositions,
};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// An operation requested through the API.
#[derive(Clone, Debug)]
pub enum Op {
    /// Hand the primary role to `candidate` (or the best replica), now or at `at_ms`.
    Switchover {
        candidate: Option<String>,
        at_ms: Option<u64>,
    },
    /// Take the lease and promote this node when there is no healthy primary.
    Failover,
    /// The old holder of epoch `epoch` released the lease to this node (switchover): take it
    /// once every WAL record it wrote has arrived, and promote.
    Takeover {
        from: String,
        epoch: u64,
    },
    Restart,
    Reinitialize,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Switchover { .. } => "switchover",
            Op::Failover => "failover",
            Op::Takeover { .. } => "takeover",
            Op::Restart => "restart",
            Op::Reinitialize => "reinitialize",
        }
    }
}

/// Why an operation was refused or failed, with the HTTP status and the field at fault.
#[derive(Clone, Debug)]
pub struct OpError {
    pub status: u16,
    pub message: String,
    pub field: Option<String>,
}

impl OpError {
    pub fn new(status: u16, message: impl Into<String>) -> OpError {
        OpError {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(status: u16, field: &str, message: impl Into<String>) -> OpError {
        OpError {
            status,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

pub struct OpRequest {
    pub op: Op,
    pub reply: oneshot::Sender<Result<String, OpError>>,
}

/// State shared with the HTTP servers.
pub struct Shared {
    /// The postmaster's PID (0 when none), kept by the loop for the health checks.
    pub postmaster_pid: std::sync::atomic::AtomicI32,
    /// The peers' statuses from the last poll (`None`: no answer).
    pub peers: RwLock<Vec<(Member, Option<NodeStatus>)>>,
    pub cfg: Arc<AgentConfig>,
    pub consensus: Arc<crate::raft::node::Consensus>,
    pub status: RwLock<NodeStatus>,
    pub events: EventLog,
    pub token: String,
    pub ops: mpsc::Sender<OpRequest>,
    pub lease: crate::lease::LeaseKeeper,
    /// The local addresses that follow the primary (VIP, EC2 secondary and overlay IPs);
    /// `None` when none are configured.
    pub local: Option<Arc<crate::endpoints::Local>>,
    /// Commands pushed by the control plane (`POST /v1/commands`).
    pub commands: crate::commands::Commands,
    /// Fingerprints of revoked certificates: the API listener refuses them; the control
    /// plane's report acknowledgements update them.
    pub revoked: crate::tls::Revoked,
}

impl Shared {
    pub fn status(&self) -> NodeStatus {
        let pid = self
            .postmaster_pid
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut s = self
            .status
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
            .with_postmaster_alive(pid > 0 && sys::pid_alive(pid));
        // Writable only while the lease's deadline has not passed, whatever the last loop saw.
        if s.intent.role == DesiredRole::Primary && self.lease.holding().is_none() {
            s.intent = Intent::standby();
        }
        s
    }

    /// Every member: this node's status and the peers' from the last poll.
    pub fn cluster_view(&self) -> pgwarden_core::api::ClusterView {
        let me = self.status();
        let peers = self.peers.read().map(|p| p.clone()).unwrap_or_default();
        let members = self
            .cfg
            .cluster
            .members
            .iter()
            .map(|m| pgwarden_core::api::MemberView {
                name: m.name.clone(),
                host: m.host.clone(),
                pg_port: m.pg_port,
                api_port: m.api_port,
                status: if m.name == self.cfg.node.name {
                    Some(me.clone())
                } else {
                    peers
                        .iter()
                        .find(|(p, _)| p.name == m.name)
                        .and_then(|(_, s)| s.clone())
                },
            })
            .collect();
        pgwarden_core::api::ClusterView {
            cluster: self.cfg.cluster.name.clone(),
            reported_by: self.cfg.node.name.clone(),
            members,
        }
    }
    fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        if let Ok(mut s) = self.status.write() {
            f(&mut s);
        }
    }
}

pub struct Agent {
    shared: Arc<Shared>,
    cfg: Arc<AgentConfig>,
    pg: Pg,
    intent: Intent,
    pending: Option<OneShot>,
    http: reqwest::Client,
    peers: Vec<(Member, Option<NodeStatus>)>,
    crash_restarts: u64,
    last_error: Option<String>,
    last_refusal: Option<String>,
    state_override: Option<PgState>,
    /// A detail for the answer to the running operation (e.g. the demoted node's last LSN).
    note: Option<String>,
    /// Since when a running replica has not been streaming.
    not_streaming_since: Option<Instant>,
    /// Whether each peer's agent answered at the last poll (None before the first).
    peer_reachable: Vec<Option<bool>>,
    /// Since when each peer has not answered, counted only after it answered once since this
    /// agent started (the two-node arbiter fences only a peer it saw alive and then lost).
    peer_lost_since: Vec<Option<Instant>>,
    /// Since when PostgreSQL has not been running (with a usable data directory).
    pg_down_since: Option<Instant>,
    /// A switchover to run at a wall-clock time (ms), to a candidate or the best replica.
    scheduled: Option<(u64, Option<String>)>,
    /// The last lease decision that was a wait, for the status.
    lease_wait: Option<String>,
    last_lease_error: Option<String>,
    /// The last SQL observation (for the synchronous-replication step).
    last_sql: Option<SqlStatus>,
    /// The VIP and EC2 endpoints, and fencing.
    endpoints: crate::endpoints::Endpoints,
    /// PostgreSQL was promoted in this round (the status still shows the replica).
    promoted_now: bool,
    /// The two-node arbiter stopped the peer: (epoch of the lease on record then, what
    /// happened, when).
    arbiter_fenced: Option<(u64, String, u64)>,
}

/// How long an API operation waits on a condition it cannot change (e.g. an unreachable
/// upstream) before answering; the agent keeps working towards the intent afterwards.
const OP_MAX_WAIT: Duration = Duration::from_secs(30);

impl Agent {
    pub fn new(shared: Arc<Shared>, pg: Pg) -> Result<Agent> {
        let cfg = shared.cfg.clone();
        let intent = Intent::standby();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(
                (cfg.node.loop_wait.0.as_millis() as u64 / 2).clamp(200, 2000),
            ))
            .build()
            .context("build HTTP client")?;
        let peers: Vec<(Member, Option<NodeStatus>)> =
            cfg.peers().map(|m| (m.clone(), None)).collect();
        let peer_reachable = vec![None; peers.len()];
        let peer_lost_since = vec![None; peers.len()];
        let agent = Agent {
            shared: shared.clone(),
            cfg,
            pg,
            intent,
            pending: None,
            http,
            peers,
            crash_restarts: 0,
            last_error: None,
            last_refusal: None,
            state_override: None,
            note: None,
            not_streaming_since: None,
            peer_reachable,
            peer_lost_since,
            pg_down_since: None,
            scheduled: None,
            lease_wait: None,
            last_lease_error: None,
            last_sql: None,
            endpoints: crate::endpoints::Endpoints::new(shared.clone()),
            promoted_now: false,
            arbiter_fenced: None,
        };
        Ok(agent)
    }

    fn member(&self, name: &str) -> Result<Member> {
        self.cfg
            .member(name)
            .cloned()
            .ok_or_else(|| anyhow!("{name:?} is not a member of the cluster"))
    }

    /// Runs the loop forever: ticks and operations, one at a time.
    pub async fn run(mut self, mut ops: mpsc::Receiver<OpRequest>) {
        if let Some(pid) = self.pg.adopt_running() {
            self.shared.events.record(
                "postgres_adopted",
                format!("adopted the running postmaster (pid {pid})"),
            );
        }
        let mut next = Instant::now();
        loop {
            tokio::select! {
                req = ops.recv() => {
                    let Some(req) = req else { return };
                    let res = self.handle_op(req.op).await;
                    let _ = req.reply.send(res);
                }
                _ = tokio::time::sleep_until(next.into()) => {
                    self.run_scheduled().await;
                    self.step().await;
                    next = Instant::now() + self.next_wake();
                }
            }
        }
    }

    /// When to run the next step: every `loop_wait`, but right when another member's lease
    /// becomes free (expiry + drift), and soon again after a failed lease proposal, so a
    /// failover does not wait for the next regular step.
    fn next_wake(&self) -> Duration {
        Duration::from_millis(pgwarden_core::elect::next_check_ms(
            &self.cfg.node.name,
            &self.shared.consensus.sm.state(),
            now_ms(),
            self.cfg.node.loop_wait.0.as_millis() as u64,
            self.last_lease_error.is_some(),
        ))
    }

    async fn handle_op(&mut self, op: Op) -> Result<String, OpError> {
        let name = op.name();
        self.shared.events.record(
            "operation",
            format!("{name} requested through the API ({op:?})"),
        );
        self.note = None;
        match op {
            Op::Switchover { candidate, at_ms } => match at_ms.filter(|t| *t > now_ms()) {
                Some(at) => {
                    self.holder_check()?;
                    self.poll_peers().await;
                    let cand = self.switchover_candidate(candidate.as_deref())?;
                    self.scheduled = Some((at, candidate.clone()));
                    let who = candidate.unwrap_or_else(|| format!("the best replica (now {cand})"));
                    let msg = format!(
                        "switchover to {who} scheduled in {} s",
                        (at - now_ms()).div_ceil(1000)
                    );
                    self.shared
                        .events
                        .record("switchover_scheduled", msg.clone());
                    Ok(msg)
                }
                None => self.switchover(candidate.as_deref()).await,
            },
            Op::Failover => self.failover().await,
            Op::Takeover { from, epoch } => self.takeover(&from, epoch).await,
            Op::Restart => {
                self.pending = Some(OneShot::Restart);
                self.converge(name).await
            }
            Op::Reinitialize => {
                let status = self.shared.status();
                if self.intent.role != DesiredRole::Replica
                    || self.intent.upstream.is_none()
                    || status.role == Role::Primary
                {
                    return Err(OpError::new(409, "only a replica can be reinitialized"));
                }
                self.pending = Some(OneShot::Reinitialize);
                self.converge(name).await
            }
        }
    }

    /// Runs the loop until it converges (nothing left to do), for an operation's answer.
    async fn converge(&mut self, name: &str) -> Result<String, OpError> {
        let deadline = Instant::now()
            + self.cfg.postgresql.start_timeout.0
            + self.cfg.postgresql.stop_timeout.0
            + Duration::from_secs(600);
        let mut waiting_since: Option<Instant> = None;
        loop {
            self.last_error = None;
            let action = self.step().await;
            if let Some(e) = &self.last_error {
                return Err(OpError::new(
                    500,
                    format!("{name} failed: {e} (the agent keeps trying)"),
                ));
            }
            match action {
                Action::Nothing if self.pending.is_none() => {
                    return Ok(self.note.take().unwrap_or_else(|| format!("{name} done")));
                }
                Action::Refuse(why) => {
                    self.pending = None;
                    return Err(OpError::new(409, why));
                }
                Action::Wait(why) => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > OP_MAX_WAIT {
                        return Err(OpError::new(
                            503,
                            format!("{name} is waiting: {why} (the agent keeps trying)"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Action::Nothing => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => waiting_since = None,
            }
            if Instant::now() > deadline {
                return Err(OpError::new(
                    504,
                    format!("{name} did not complete in time (the agent keeps trying)"),
                ));
            }
        }
    }

    /// This node must hold the lease and run a writable primary.
    fn holder_check(&self) -> Result<u64, OpError> {
        let Some(epoch) = self.shared.lease.holding() else {
            return Err(OpError::new(409, "this node does not hold the lease"));
        };
        if !self.shared.status().is_writable_primary() {
            return Err(OpError::new(
                409,
                "PostgreSQL does not run as a writable primary here",
            ));
        }
        Ok(epoch)
    }

    /// The replica a switchover hands over to: the one asked for, checked, or the best one
    /// by the failover rules.
    fn switchover_candidate(&self, asked: Option<&str>) -> Result<String, OpError> {
        use pgwarden_core::candidate::{choose, verdict, Verdict};
        let me = self.shared.status();
        let mut rules = pgwarden_core::elect::rules(&self.shared.consensus.sm.state());
        rules.primary_lsn = me.wal.write;
        let cands: Vec<_> = candidates(&me, &self.peers)
            .into_iter()
            .filter(|c| c.name != me.name)
            .collect();
        let Some(name) = asked else {
            return choose(&cands, &rules).map(|c| c.name.clone()).ok_or_else(|| {
                OpError::new(409, "no replica is eligible for a switchover (see failover_readiness in the status)")
            });
        };
        let bad = |code: u16, m: String| OpError::field(code, "candidate", m);
        if name == me.name {
            return Err(bad(422, format!("{name} is already the primary")));
        }
        if self.cfg.member(name).is_none() {
            return Err(bad(
                422,
                format!(
                    "{name:?} is not a member ({})",
                    self.cfg.member_names().join(", ")
                ),
            ));
        }
        let Some(st) = self.peer_status(name) else {
            return Err(bad(409, format!("{name}'s agent does not answer")));
        };
        if !st.is_streaming() || st.upstream.as_deref() != Some(me.name.as_str()) {
            return Err(bad(
                409,
                format!(
                    "{name} is not streaming from the primary {} (it is {:?}/{:?}, WAL receiver {}, \
                     upstream {})",
                    me.name,
                    st.role,
                    st.state,
                    st.wal_receiver
                        .as_ref()
                        .map_or("none", |w| w.status.as_str()),
                    st.upstream.as_deref().unwrap_or("none")
                ),
            ));
        }
        let c = cands
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| bad(409, format!("{name} is not a candidate")))?;
        match verdict(c, &rules) {
            Verdict::Eligible => Ok(name.to_string()),
            Verdict::Ineligible(why) => Err(bad(409, format!("{name} cannot be promoted: {why}"))),
        }
    }

    /// The planned switchover, on the lease holder: checkpoint, clean shutdown (the WAL
    /// senders send every record before PostgreSQL exits), release the lease to the candidate
    /// with the final WAL position, let the candidate take over, then follow it.
    async fn switchover(&mut self, asked: Option<&str>) -> Result<String, OpError> {
        let epoch = self.holder_check()?;
        // Judge the candidate on fresh statuses, not on the last loop's.
        self.poll_peers().await;
        let cand = self.switchover_candidate(asked)?;
        let up = self
            .member(&cand)
            .map_err(|e| OpError::new(422, format!("{e:#}")))?;
        let me = self.cfg.node.name.clone();
        // A checkpoint now makes the shutdown checkpoint (inside the write gap) short.
        if let Ok(c) = self.pg.connect().await {
            let _ = c.batch_execute("CHECKPOINT").await;
        }
        let t0 = Instant::now();
        crate::endpoints::drop_local(
            &self.shared,
            &format!("switchover to {cand}"),
            Duration::from_millis(500),
        )
        .await;
        self.endpoints.step_down();
        self.set_state(PgState::Stopping);
        let clean = self
            .pg
            .stop(true)
            .await
            .map_err(|e| OpError::new(500, format!("stop PostgreSQL: {e:#}")))?;
        let end = self.pg.controldata().await.ok().map(|cd| cd.checkpoint_lsn);
        self.shared.events.record(
            "postgres_stopped",
            format!(
                "stopped for a switchover to {cand} (clean: {clean}, WAL ends at {})",
                end.map(|l| l.to_string()).unwrap_or_default()
            ),
        );
        if let Err(e) = crate::lease::release(
            &self.shared,
            end,
            Some(cand.clone()),
            &format!("switchover to {cand}"),
        )
        .await
        {
            self.state_override = None;
            return Err(OpError::new(
                500,
                format!(
                    "switchover: PostgreSQL stopped but the lease could not be released ({e:#}); \
                     when it runs out the members elect a primary"
                ),
            ));
        }
        let body = serde_json::json!({ "from": me, "epoch": epoch });
        let addr = format!("{}:{}", up.host, up.api_port);
        let res = self
            .shared
            .consensus
            .call(&addr, "/v1/takeover", &body, Duration::from_secs(120))
            .await;
        let gap = t0.elapsed();
        self.state_override = None;
        let took = match res {
            Ok((200, v)) => v["message"].as_str().unwrap_or("").to_string(),
            Ok((code, v)) => {
                let detail = v["detail"].as_str().unwrap_or("").to_string();
                return Err(OpError::new(
                    502,
                    format!(
                        "switchover: {cand} did not take over ({code}: {detail}); the lease is \
                         reserved for it for a while, then the best member takes it"
                    ),
                ));
            }
            Err(e) => {
                return Err(OpError::new(
                    502,
                    format!(
                        "switchover: {cand} did not answer ({e:#}); the lease is reserved for it \
                         for a while, then the best member takes it"
                    ),
                ))
            }
        };
        self.shared.events.record(
            "switchover",
            format!(
                "switched over from {me} to {cand}: {} ms from the shutdown to the new primary",
                gap.as_millis()
            ),
        );
        self.converge("switchover").await?;
        Ok(format!(
            "switched over from {me} to {cand} in {} ms; {me}'s WAL ended at {}; {took}",
            gap.as_millis(),
            end.map(|l| l.to_string()).unwrap_or_default()
        ))
    }

    /// On the switchover candidate: wait until the old holder's release is visible here and
    /// every WAL record it wrote has arrived, take the lease, promote.
    async fn takeover(&mut self, from: &str, epoch: u64) -> Result<String, OpError> {
        let me = self.cfg.node.name.clone();
        let t0 = Instant::now();
        let end = loop {
            let st = self.shared.consensus.sm.state();
            match &st.lease {
                Some(l) if l.epoch == epoch && l.released => {
                    if l.successor.as_deref() != Some(me.as_str()) {
                        return Err(OpError::new(
                            409,
                            format!(
                                "epoch {epoch} was released to {:?}, not to {me}",
                                l.successor
                            ),
                        ));
                    }
                    break l.last_lsn;
                }
                Some(l) if l.epoch > epoch => {
                    if l.holder == me {
                        return self.converge("takeover").await;
                    }
                    return Err(OpError::new(
                        409,
                        format!("stale epoch {epoch}: the lease is at epoch {}", l.epoch),
                    ));
                }
                _ if t0.elapsed() > Duration::from_secs(3) => {
                    return Err(OpError::new(
                        409,
                        format!("{from} did not release epoch {epoch} to {me}"),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        if let Some(end) = end {
            loop {
                match self.pg.received_lsn().await {
                    Ok(Some(l)) if l > end => break,
                    _ if t0.elapsed() > Duration::from_secs(15) => {
                        return Err(OpError::new(
                            409,
                            format!("{me} did not receive {from}'s WAL up to {end}"),
                        ))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        let reason = format!("switchover from {from}");
        let record = self.change_record(ChangeKind::Switchover, &reason);
        crate::lease::acquire(&self.shared, &reason, true, Some(record))
            .await
            .map_err(|e| OpError::new(409, format!("take the lease: {e:#}")))?;
        self.converge("takeover").await?;
        Ok(format!(
            "{me} took the lease and was promoted {} ms after {from} released it",
            t0.elapsed().as_millis()
        ))
    }

    /// An operator's failover to this node: allowed when no healthy primary holds the lease
    /// (also in maintenance mode); waits for an expiring lease to run out.
    async fn failover(&mut self) -> Result<String, OpError> {
        let me = self.cfg.node.name.clone();
        let t0 = Instant::now();
        loop {
            if self.shared.lease.holding().is_some() {
                return self.converge("failover").await;
            }
            let st = self.shared.consensus.sm.state();
            let drift = st.config.failover.drift_ms();
            let status = self.shared.status();
            if st.acquirable(now_ms(), drift) {
                if !status.is_running_replica() {
                    return Err(OpError::field(
                        409,
                        "candidate",
                        format!("{me}: PostgreSQL does not run as a replica here"),
                    ));
                }
                let record = self.change_record(ChangeKind::ManualFailover, "manual failover");
                let epoch =
                    crate::lease::acquire(&self.shared, "manual failover", true, Some(record))
                        .await
                        .map_err(|e| OpError::new(409, format!("take the lease: {e:#}")))?;
                self.converge("failover").await?;
                return Ok(format!(
                    "{me} took the lease (epoch {epoch}) and was promoted {} ms after the request",
                    t0.elapsed().as_millis()
                ));
            }
            let holder = st
                .lease
                .as_ref()
                .map(|l| l.holder.clone())
                .unwrap_or_default();
            if self
                .peer_status(&holder)
                .is_some_and(|p| p.is_writable_primary())
            {
                return Err(OpError::new(
                    409,
                    format!("{holder} is a healthy primary holding the lease: use a switchover"),
                ));
            }
            let limit = Duration::from_millis(st.config.failover.ttl_ms() + drift) * 2
                + Duration::from_secs(5);
            if t0.elapsed() > limit {
                return Err(OpError::new(
                    409,
                    format!(
                        "{holder} still holds the lease (its agent renews it while it restarts \
                         PostgreSQL, up to primary_start_timeout); try again later"
                    ),
                ));
            }
            self.poll_peers().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a scheduled switchover when it is due.
    async fn run_scheduled(&mut self) {
        let Some((at, cand)) = self.scheduled.clone() else {
            return;
        };
        if now_ms() < at {
            return;
        }
        self.scheduled = None;
        if self.shared.lease.holding().is_none() {
            self.shared.events.record(
                "switchover_failed",
                "the scheduled switchover was dropped: this node no longer holds the lease",
            );
            return;
        }
        match self.switchover(cand.as_deref()).await {
            Ok(m) => self.shared.events.record("switchover_done", m),
            Err(e) => self.shared.events.record(
                "switchover_failed",
                format!("scheduled switchover: {}", e.message),
            ),
        }
    }

    /// The lease part of a round: renew, acquire or release as `elect::next_move` says, then
    /// derive the intent from the lease.
    async fn lease_step(&mut self) {
        let st = self.shared.consensus.sm.state();
        let me = self.shared.status();
        let cands = candidates(&me, &self.peers);
        let inputs = pgwarden_core::elect::Inputs {
            me: &self.cfg.node.name,
            state: &st,
            now_ms: now_ms(),
            holding: self.shared.lease.holding().is_some(),
            candidates: &cands,
            initial_primary: &self.cfg.cluster.initial_primary,
            local_primary_running: me.role == Role::Primary && me.state == PgState::Running,
            pg_down_ms: self.pg_down_since.map(|t| t.elapsed().as_millis() as u64),
            peer_has_cluster: self.peer_has_cluster(),
            arbiter_holding: self.shared.lease.arbiter(),
        };
        let mut mv = pgwarden_core::elect::next_move(&inputs);
        self.lease_wait = None;
        if self.shared.lease.arbiter() {
            Box::pin(self.arbiter_step()).await;
        }
        // Two members, one gone: nothing can commit, so do not block the loop proposing (the
        // arbiter below decides, and its lease must be extended at every loop).
        if let Some(peer) = self.arbiter_peer() {
            let gone = self.peer_status(&peer).is_none();
            if gone
                && matches!(
                    mv,
                    Move::Acquire { .. } | Move::Renew | Move::Release { .. }
                )
            {
                mv = Move::Wait(format!(
                    "no majority: {peer} does not answer, so nothing can be committed"
                ));
            }
        }
        let res = match mv {
            Move::Nothing => Ok(()),
            Move::Wait(w) => {
                self.lease_wait = Some(w);
                Ok(())
            }
            Move::Renew => crate::lease::renew(&self.shared).await,
            Move::Acquire { reason } => {
                let kind = if st.lease.is_none() {
                    ChangeKind::Bootstrap
                } else if st.lease.as_ref().is_some_and(|l| l.successor.is_some()) {
                    ChangeKind::Switchover
                } else {
                    ChangeKind::Failover
                };
                let mut record = pgwarden_core::elect::failover_record(
                    kind,
                    &self.cfg.node.name,
                    &st,
                    &cands,
                    now_ms(),
                    &reason,
                );
                if let Some((_, msg, at)) = self
                    .arbiter_fenced
                    .as_ref()
                    .filter(|_| self.shared.lease.arbiter())
                {
                    record.steps.push(pgwarden_core::record::Step {
                        step: "fenced".into(),
                        at_ms: *at,
                        by: self.cfg.node.name.clone(),
                        detail: format!(
                            "{msg} (two-node fencing arbiter; promoted before this commit)"
                        ),
                    });
                }
                let acquire = crate::lease::acquire(&self.shared, &reason, false, Some(record));
                match self
                    .shared
                    .lease
                    .remaining()
                    .filter(|_| self.shared.lease.arbiter())
                {
                    // On the arbiter: extended first, and never waiting past its deadline.
                    Some(left) => {
                        let left = left.saturating_sub(Duration::from_millis(300));
                        match tokio::time::timeout(left, acquire).await {
                            Ok(r) => r.map(|_| ()),
                            Err(_) => Err(anyhow!("not committed within {left:?}")),
                        }
                    }
                    None => acquire.await.map(|_| ()),
                }
            }
            Move::Release { reason } => {
                crate::lease::release(&self.shared, None, None, &reason).await
            }
        };
        match res {
            Ok(()) => self.last_lease_error = None,
            Err(e) => {
                let msg = format!("{e:#}");
                if self.last_lease_error.as_deref() != Some(&msg) {
                    tracing::info!(error = %msg, "lease");
                }
                self.last_lease_error = Some(msg);
            }
        }
        Box::pin(self.arbiter_step()).await;
        let st = self.shared.consensus.sm.state();
        self.intent = pgwarden_core::elect::intent(
            &self.cfg.node.name,
            &st,
            self.shared.lease.holding().is_some(),
            &self.cfg.cluster.initial_primary,
        );
    }

    /// The other member of a two-node cluster without a witness (None otherwise).
    fn arbiter_peer(&self) -> Option<String> {
        let members = &self.cfg.cluster.members;
        if members.len() != 2 || members.iter().any(|m| m.witness) {
            return None;
        }
        self.cfg.peers().next().map(|m| m.name.clone())
    }

    /// The two-node fencing arbiter (`elect::arbiter`): with the peer gone, stop its instance,
    /// see it stopped, then hold the lease locally until the group can commit again.
    async fn arbiter_step(&mut self) {
        let Some(peer) = self.arbiter_peer() else {
            return;
        };
        let st = self.shared.consensus.sm.state();
        let epoch_on_record = st.lease.as_ref().map(|l| l.epoch);
        // The arbiter's lease was committed in the group (a proposal that timed out here may
        // still commit): from now on it is renewed like any lease.
        if let (Some(held), Some(l)) = (self.shared.lease.holding(), &st.lease) {
            if self.shared.lease.arbiter()
                && l.holder == self.cfg.node.name
                && l.epoch == held
                && !l.released
            {
                if let Err(e) = crate::lease::renew(&self.shared).await {
                    tracing::info!(error = %format!("{e:#}"), "renew the arbiter's committed lease");
                }
                return;
            }
        }
        let me = self.shared.status();
        let cands = candidates(&me, &self.peers);
        let fencing = self
            .cfg
            .aws
            .as_ref()
            .is_some_and(|a| a.fencing != pgwarden_core::config::Fencing::None);
        let inputs = pgwarden_core::elect::ArbiterInputs {
            me: &self.cfg.node.name,
            peer: &peer,
            state: &st,
            now_ms: now_ms(),
            fencing,
            peer_answering: self.peer_status(&peer).is_some(),
            me_candidate: cands.iter().find(|c| c.name == self.cfg.node.name),
            peer_fenced: self
                .arbiter_fenced
                .as_ref()
                .is_some_and(|f| Some(f.0) == epoch_on_record),
            arbiter_epoch: self
                .shared
                .lease
                .holding()
                .filter(|_| self.shared.lease.arbiter()),
            peer_gone_ms: self
                .peers
                .iter()
                .position(|(m, _)| m.name == peer)
                .and_then(|i| self.peer_lost_since[i])
                .map(|t| t.elapsed().as_millis() as u64),
            held_here: st.lease.as_ref().is_some_and(|l| {
                l.holder == self.cfg.node.name && self.shared.lease.held_since_start(l.epoch)
            }),
        };
        use pgwarden_core::elect::ArbiterMove;
        match pgwarden_core::elect::arbiter(&inputs) {
            ArbiterMove::NotNeeded => {}
            ArbiterMove::Wait(w) => self.lease_wait = Some(w),
            ArbiterMove::Fence { peer } => {
                self.lease_wait = Some(format!("fencing {peer} (two-node fencing arbiter)"));
                match self.endpoints.fence_peer(&peer).await {
                    Ok(msg) => {
                        if let Some(e) = epoch_on_record {
                            self.arbiter_fenced = Some((e, msg, now_ms()));
                        }
                    }
                    Err(e) => {
                        self.lease_wait =
                            Some(format!("the fencing arbiter could not stop {peer}: {e:#}"));
                    }
                }
            }
            ArbiterMove::Hold { epoch } => {
                let f = st.config.failover;
                if !self.shared.lease.arbiter() {
                    self.shared.events.record(
                        "lease_arbiter",
                        format!(
                            "holding the lease (epoch {epoch}) on the fencing arbiter: {peer}'s \
                             instance was seen stopped; it is committed in the group when {peer} \
                             is back"
                        ),
                    );
                }
                self.shared
                    .lease
                    .arbiter_hold(epoch, f.ttl_ms(), f.margin_ms());
            }
        }
    }

    fn peer_has_cluster(&self) -> bool {
        self.peers.iter().any(|(_, s)| {
            s.as_ref()
                .is_some_and(|s| s.system_identifier.is_some() || s.state == PgState::Running)
        })
    }

    /// A failover record for an acquisition this node is about to propose.
    fn change_record(&self, kind: ChangeKind, why: &str) -> pgwarden_core::record::FailoverRecord {
        let st = self.shared.consensus.sm.state();
        let cands = candidates(&self.shared.status(), &self.peers);
        pgwarden_core::elect::failover_record(kind, &self.cfg.node.name, &st, &cands, now_ms(), why)
    }

    /// Synchronous mode on the primary: one step of `core::sync::plan` per loop — wait for a
    /// standby before committing it, commit a removal before dropping it.
    async fn sync_step(&mut self, sql: &SqlStatus) {
        use pgwarden_core::sync::{self, Standby, SyncStep};
        let st = self.shared.consensus.sm.state();
        let f = st.config.failover;
        if sql.in_recovery {
            // A standby keeps the value it will need as a primary (the committed set without
            // itself), so that its promotion needs no reload (one right before `pg_promote`
            // delays the promotion by about a second).
            let names = self.standby_sync_names(&st);
            if sync::render(&names) != sql.synchronous_standby_names {
                if let Err(e) = self
                    .pg
                    .set_synchronous_standby_names(&sync::render(&names))
                    .await
                {
                    tracing::warn!(error = %format!("{e:#}"), "prepare synchronous_standby_names");
                }
            }
            return;
        }
        let Some(epoch) = self.shared.lease.holding() else {
            return;
        };
        let standbys: Vec<Standby> = sql
            .replication
            .iter()
            .filter(|r| self.cfg.member(&r.application_name).is_some())
            .map(|r| {
                let tags = self
                    .peer_status(&r.application_name)
                    .map(|p| p.tags.clone())
                    .unwrap_or_default();
                Standby {
                    name: r.application_name.clone(),
                    streaming: r.state == "streaming",
                    confirmed: r.sync_state == "sync" || r.sync_state == "quorum",
                    nosync: tags.nosync,
                    sync_priority: tags.sync_priority.unwrap_or(1),
                    flush_lsn: r.flush_lsn,
                }
            })
            .collect();
        let waiting = sync::parse(&sql.synchronous_standby_names);
        let step = sync::plan(
            f.synchronous_mode,
            f.synchronous_node_count,
            &st.sync,
            &waiting,
            &standbys,
        );
        let res = match &step {
            SyncStep::Nothing => return,
            SyncStep::Commit(members) => {
                let p = pgwarden_core::lease::Proposal::SetSync {
                    node: self.cfg.node.name.clone(),
                    epoch,
                    members: members.clone(),
                };
                match self.shared.consensus.propose(p).await {
                    Ok(crate::raft::Applied(Ok(()))) => Ok(()),
                    Ok(crate::raft::Applied(Err(r))) => Err(anyhow!("{r}")),
                    Err(e) => Err(e),
                }
            }
            SyncStep::Wait(names) => {
                self.pg
                    .set_synchronous_standby_names(&sync::render(names))
                    .await
            }
        };
        match (res, step) {
            (Ok(()), SyncStep::Commit(m)) if m.is_empty() && f.synchronous_mode == SyncMode::On => {
                self.shared.events.record(
                    "synchronous_degraded",
                    "no synchronous standby is available: writes are acknowledged without one \
                     (synchronous_mode on); failover falls back to maximum_lag_on_failover",
                );
            }
            (Ok(()), SyncStep::Commit(m)) => self.shared.events.record(
                "sync_set_committed",
                format!("committed synchronous set: [{}]", m.join(", ")),
            ),
            (Ok(()), SyncStep::Wait(n)) => self.shared.events.record(
                "synchronous_standby_names",
                format!("PostgreSQL now waits for: {:?}", sync::render(&n)),
            ),
            (Err(e), _) => {
                tracing::warn!(error = %format!("{e:#}"), "synchronous replication step")
            }
            _ => {}
        }
    }

    fn standby_sync_names(&self, st: &pgwarden_core::lease::ClusterState) -> Vec<String> {
        pgwarden_core::sync::names_for_promotion(
            st.config.failover.synchronous_mode,
            &st.sync,
            &self.cfg.node.name,
        )
    }

    /// Refuses to make PostgreSQL writable without the lease.
    fn require_lease(&self, what: &str) -> Result<u64> {
        self.shared
            .lease
            .holding()
            .ok_or_else(|| anyhow!("{what}: this node does not hold the lease (any more)"))
    }

    /// One observe → decide → execute round. Returns the action it took.
    pub async fn step(&mut self) -> Action {
        let obs = self.observe().await;
        self.lease_step().await;
        if let Some(sql) = self.last_sql.take() {
            self.sync_step(&sql).await;
        }
        let action = next_action(&self.intent, &obs, self.pending);
        // A node that does not hold the lease drops the endpoints before anything else.
        if self.shared.lease.holding().is_none() {
            Box::pin(self.endpoints.reconcile(false, None)).await;
        }
        let waiting = match &action {
            Action::Wait(w) => Some(w.clone()),
            _ => self.lease_wait.clone().or_else(|| {
                self.last_lease_error.as_ref().map(|e| {
                    let total = self.peers.len() + 1;
                    let up = 1 + self.peers.iter().filter(|(_, s)| s.is_some()).count();
                    if up * 2 <= total {
                        format!(
                            "no majority: only {up} of {total} members answer, so nothing can be \
                             committed and no member may take the lease (a two-node cluster \
                             needs a witness to fail over); last attempt: {e}"
                        )
                    } else {
                        format!("cannot commit to the lease: {e}")
                    }
                })
            }),
        };
        self.shared.update(|s| s.waiting_for = waiting);
        match &action {
            Action::Nothing | Action::Wait(_) => {}
            Action::Refuse(why) => {
                if self.last_refusal.as_deref() != Some(why) {
                    self.shared.events.record("refused", why.clone());
                    tracing::error!("{why}");
                }
                self.last_refusal = Some(why.clone());
                self.pending = None;
                self.shared.update(|s| {
                    s.state = PgState::Refused;
                    s.last_error = Some(why.clone());
                });
            }
            a => {
                tracing::info!(action = ?a, "acting");
                if let Err(e) = self.execute(a).await {
                    let msg = format!("{e:#}");
                    tracing::error!(action = ?a, error = %msg, "action failed");
                    self.shared
                        .events
                        .record("action_failed", format!("{a:?}: {msg}"));
                    self.last_error = Some(msg);
                }
                self.state_override = None;
                self.publish_pid();
                let err = self.last_error.clone();
                self.shared.update(|s| {
                    s.basebackup = None;
                    s.last_error = err;
                });
            }
        }
        let epoch = self.shared.lease.holding();
        let hold =
            epoch.is_some() && (self.promoted_now || self.shared.status().is_writable_primary());
        self.promoted_now = false;
        Box::pin(self.endpoints.reconcile(hold, epoch)).await;
        let endpoints = self.endpoints.status().await;
        self.shared.update(|s| {
            s.last_loop_ms = now_ms();
            s.endpoints = endpoints;
        });
        action
    }

    async fn poll_peers(&mut self) {
        let mut set = tokio::task::JoinSet::new();
        for (i, (m, _)) in self.peers.iter().enumerate() {
            let (http, m) = (self.http.clone(), m.clone());
            set.spawn(async move { (i, fetch_status(&http, &m).await) });
        }
        while let Some(Ok((i, st))) = set.join_next().await {
            let (was, now) = (self.peer_reachable[i], st.is_some());
            self.peer_lost_since[i] = match (now, was, self.peer_lost_since[i]) {
                (true, _, _) => None,
                (false, Some(true), _) => Some(Instant::now()),
                (false, _, since) => since,
            };
            if was != Some(now) {
                let name = &self.peers[i].0.name;
                match (was, now) {
                    (Some(true), false) | (None, false) => {
                        tracing::warn!(peer = %name, "peer unreachable");
                        self.shared.events.record(
                            "peer_unreachable",
                            format!("{name}'s agent does not answer"),
                        );
                    }
                    (Some(false), true) => {
                        self.shared
                            .events
                            .record("peer_reachable", format!("{name}'s agent answers again"));
                    }
                    _ => {}
                }
                self.peer_reachable[i] = Some(now);
            }
            self.peers[i].1 = st;
        }
        if let Ok(mut p) = self.shared.peers.write() {
            *p = self.peers.clone();
        }
    }

    fn peer_status(&self, name: &str) -> Option<&NodeStatus> {
        self.peers
            .iter()
            .find(|(m, _)| m.name == name)
            .and_then(|(_, s)| s.as_ref())
    }

    async fn observe(&mut self) -> Observed {
        let last_pid = self
            .shared
            .postmaster_pid
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some(how) = self.pg.check_exit() {
            let stopped = self
                .shared
                .lease
                .stopped_postgres
                .swap(0, std::sync::atomic::Ordering::Relaxed);
            if stopped != 0 && stopped == last_pid {
                self.shared.events.record(
                    "postgres_stopped",
                    format!("PostgreSQL stopped at the end of the lease ({how})"),
                );
            } else {
                self.crash_restarts += 1;
                self.shared.events.record(
                    "postgres_crashed",
                    format!("the postmaster died ({how}); restarting it in place"),
                );
            }
        }
        self.poll_peers().await;
        self.publish_pid();
        self.apply_dynamic_config().await;
        let data_dir = self.pg.data_dir_state();
        let mut sql: Option<SqlStatus> = None;
        let postmaster = if self.pg.is_running() {
            match self.pg.query_status().await {
                Ok(st) => {
                    let role = if st.in_recovery {
                        Role::Replica
                    } else {
                        Role::Primary
                    };
                    sql = Some(st);
                    Postmaster::Running(role)
                }
                Err(_) => Postmaster::Starting,
            }
        } else {
            Postmaster::Stopped
        };
        if postmaster == Postmaster::Stopped && matches!(data_dir, DataDir::Valid { .. }) {
            self.pg_down_since.get_or_insert_with(Instant::now);
        } else {
            self.pg_down_since = None;
        }
        if let Some(st) = &sql {
            if let Err(e) = self.pg.maintain_slots(st.in_recovery).await {
                tracing::warn!(error = %format!("{e:#}"), "maintain replication slots");
            }
        }
        let following = match data_dir {
            DataDir::Valid { .. } => self.pg.configured_upstream(),
            _ => None,
        };
        let upstream = self.intent.upstream.clone();
        let upstream_status = upstream
            .as_deref()
            .and_then(|u| self.peer_status(u))
            .cloned();
        let upstream_ready = upstream_status
            .as_ref()
            .is_some_and(|s| s.state == PgState::Running);
        let streaming = sql.as_ref().is_some_and(|st| {
            st.wal_receiver
                .as_ref()
                .is_some_and(|w| w.status == "streaming")
        });
        if streaming || !sql.as_ref().is_some_and(|st| st.in_recovery) {
            self.not_streaming_since = None;
        } else if self.not_streaming_since.is_none() {
            self.not_streaming_since = Some(Instant::now());
        }
        // A diverged replica never streams again; one that merely reconnects (after a reload
        // or an upstream restart) streams within a few seconds. Only the first kind is checked.
        let settle = (self.cfg.node.loop_wait.0 * 3).max(Duration::from_secs(3));
        let stuck = self
            .not_streaming_since
            .is_some_and(|t| t.elapsed() >= settle);
        let diverged = match (&sql, upstream_status) {
            (Some(st), Some(up))
                if stuck
                    && following == upstream
                    && up.timeline.is_some()
                    && up.timeline != st.timeline
                    && st.wal_receiver.as_ref().and_then(|w| w.received_tli) != up.timeline =>
            {
                self.check_diverged(st).await
            }
            _ => false,
        };
        let peer_has_cluster = self.peer_has_cluster();
        self.last_sql = sql.clone();
        self.publish(&data_dir, postmaster, sql.as_ref(), following.clone());
        Observed {
            data_dir,
            postmaster,
            following,
            diverged,
            may_bootstrap: self.cfg.node.name == self.cfg.cluster.initial_primary,
            peer_has_cluster,
            upstream_ready,
        }
    }

    /// A running replica that does not stream and whose upstream moved to a newer timeline:
    /// has its WAL gone past the point where the upstream's timeline forked?
    async fn check_diverged(&self, st: &SqlStatus) -> bool {
        let Some(up) = self
            .intent
            .upstream
            .as_deref()
            .and_then(|u| self.cfg.member(u))
        else {
            return false;
        };
        let Some(local_tli) = st.timeline else {
            return false;
        };
        let local_end = st
            .replayed
            .map(pgtext::LocalEnd::ReplayedEnd)
            .unwrap_or(pgtext::LocalEnd::Unknown);
        match self.pg.upstream_timeline(up).await {
            Ok((tli, hist)) => {
                let need = pgtext::rewind_need(local_tli, local_end, tli, &hist);
                if let RewindNeed::Yes(why) = &need {
                    tracing::warn!(upstream = %up.name, "diverged from upstream: {why}");
                }
                matches!(need, RewindNeed::Yes(_))
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot read upstream timeline");
                false
            }
        }
    }

    /// Publishes what was observed as the node status.
    fn publish(
        &self,
        data_dir: &DataDir,
        pm: Postmaster,
        sql: Option<&SqlStatus>,
        following: Option<String>,
    ) {
        let me = &self.cfg.node.name;
        let primary_peer = self
            .peers
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .find(|s| s.is_writable_primary());
        let state = match (self.state_override, pm, data_dir) {
            (Some(s), _, _) => s,
            (_, _, DataDir::WrongVersion { .. } | DataDir::NotPostgres(_)) => PgState::Refused,
            (_, Postmaster::Running(_), _) => PgState::Running,
            (_, Postmaster::Starting, _) => PgState::Starting,
            (_, Postmaster::Stopped, _) => PgState::Stopped,
        };
        let role = match pm {
            Postmaster::Running(r) => r,
            _ => Role::Unknown,
        };
        let mut primary_lsn = None;
        let mut lag = None;
        let mut sync_state = None;
        if let Some(st) = sql {
            if st.in_recovery {
                let from_receiver = st.wal_receiver.as_ref().and_then(|w| w.latest_end_lsn);
                let from_peer = primary_peer.and_then(|p| p.wal.write);
                primary_lsn = from_receiver.max(from_peer);
                let mine = st.replayed.or(st.received);
                lag = match (primary_lsn, mine) {
                    (Some(p), Some(m)) => Some(p.bytes_after(m)),
                    _ => None,
                };
                sync_state = primary_peer.and_then(|p| {
                    p.replication
                        .iter()
                        .find(|r| &r.application_name == me)
                        .map(|r| r.sync_state.clone())
                });
            } else {
                primary_lsn = st.write;
            }
        }
        let intent = self.intent.clone();
        let crash_restarts = self.crash_restarts;
        let consensus = self.shared.consensus.info();
        // A leader that lost its majority does not always know it yet: count who answers.
        let answering = 1 + self.peers.iter().filter(|(_, s)| s.is_some()).count();
        let quorum = consensus.leader.is_some() && answering * 2 > self.peers.len() + 1;
        self.shared.update(|s| {
            s.consensus = Some(consensus);
            s.name = me.clone();
            s.cluster = self.cfg.cluster.name.clone();
            s.role = role;
            s.state = state;
            s.intent = intent;
            s.upstream = if role == Role::Replica {
                following
            } else {
                None
            };
            s.primary_lsn = primary_lsn;
            s.lag_bytes = lag;
            s.sync_state = sync_state;
            s.crash_restarts = crash_restarts;
            s.agent_version = env!("CARGO_PKG_VERSION").into();
            match sql {
                Some(st) => {
                    s.server_version = Some(st.server_version);
                    s.system_identifier = Some(st.system_identifier.clone());
                    s.timeline = st.timeline;
                    s.postmaster_start_time = Some(st.started.clone());
                    s.wal = WalPositions {
                        write: st.write,
                        flush: st.flush,
                        received: st.received,
                        replayed: st.replayed,
                    };
                    s.wal_receiver = st.wal_receiver.clone();
                    s.replication = st.replication.clone();
                    s.pending_restart = !st.pending_restart.is_empty();
                    s.pending_restart_params = st.pending_restart.clone();
                }
                None => {
                    s.postmaster_start_time = None;
                    s.wal = WalPositions::default();
                    s.wal_receiver = None;
                    s.replication = Vec::new();
                    if matches!(data_dir, DataDir::Empty) {
                        s.system_identifier = None;
                        s.timeline = None;
                    }
                }
            }
            s.tags = self.cfg.tags.clone();
            s.failover_readiness = Some(self.readiness(s, quorum));
        });
    }

    /// Applies a new version of the cluster's dynamic configuration from the replicated log:
    /// rewrite the configuration files and reload. Parameters that need a restart show up as
    /// `pending_restart` in the status.
    async fn apply_dynamic_config(&mut self) {
        let cfg = self.shared.consensus.sm.state().config;
        if cfg.version == self.pg.dynamic.version {
            return;
        }
        let version = cfg.version;
        self.pg.dynamic = cfg;
        if !matches!(self.pg.data_dir_state(), DataDir::Valid { .. }) {
            return; // written when PostgreSQL is set up
        }
        let res = match self.pg.write_conf_files() {
            Ok(()) if self.pg.is_running() => self.pg.reload().await.map(|()| "reloaded"),
            Ok(()) => Ok("written; PostgreSQL is not running"),
            Err(e) => Err(e),
        };
        match res {
            Ok(how) => self.shared.events.record(
                "config_applied",
                format!("applied configuration version {version} ({how})"),
            ),
            Err(e) => {
                self.shared.events.record(
                    "action_failed",
                    format!("apply configuration version {version}: {e:#}"),
                );
                // Try again on the next loop.
                self.pg.dynamic.version = version.saturating_sub(1);
            }
        }
    }

    fn publish_pid(&mut self) {
        let pid = if self.pg.is_running() {
            self.pg.pid().unwrap_or(0)
        } else {
            0
        };
        self.shared
            .postmaster_pid
            .store(pid, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the cluster could fail over right now: a majority agrees on a Raft leader and
    /// some member other than the primary is an eligible candidate (`core::candidate`).
    fn readiness(&self, me: &NodeStatus, quorum: bool) -> pgwarden_core::candidate::Readiness {
        let all = candidates(me, &self.peers);
        let statuses: Vec<&NodeStatus> = std::iter::once(me)
            .chain(self.peers.iter().filter_map(|(_, s)| s.as_ref()))
            .collect();
        let primary = statuses.iter().find(|s| s.is_writable_primary());
        let cands: Vec<_> = all
            .into_iter()
            .filter(|c| primary.is_none_or(|p| p.name != c.name))
            .collect();
        let mut rules = pgwarden_core::elect::rules(&self.shared.consensus.sm.state());
        if let Some(p) = primary {
            rules.primary_lsn = p.wal.write.or(rules.primary_lsn);
        }
        let mut r = pgwarden_core::candidate::readiness(&cands, quorum, &rules);
        if self.shared.consensus.sm.state().paused {
            r.ready = false;
            r.reasons
                .insert(0, "maintenance mode: automatic failover is off".into());
        }
        r
    }

    fn set_state(&mut self, st: PgState) {
        self.state_override = Some(st);
        self.shared.update(|s| {
            s.state = st;
            s.last_loop_ms = now_ms();
        });
    }

    async fn execute(&mut self, action: &Action) -> Result<()> {
        let ev = &self.shared.events;
        match action {
            Action::Nothing | Action::Wait(_) | Action::Refuse(_) => Ok(()),
            Action::Bootstrap => {
                self.require_lease("initdb")?;
                self.set_state(PgState::Bootstrapping);
                self.pg.initdb().await.context("initdb")?;
                self.shared
                    .events
                    .record("bootstrapped", "initialized a new cluster with initdb");
                self.pg.write_config(None)?;
                self.pg.start().await.context("start postgres")?;
                self.pg.ensure_roles().await?;
                self.shared
                    .events
                    .record("postgres_started", "started as primary");
                Ok(())
            }
            Action::Clone { from } => {
                let up = self.member(from)?;
                self.clone_for(&up).await
            }
            Action::Start { standby_of } => {
                match standby_of {
                    Some(up) => {
                        let up = self.member(up)?;
                        self.start_standby_of(&up, false).await?;
                    }
                    None => {
                        self.require_lease("start as primary")?;
                        self.pg.write_config(None)?;
                        self.pg.start().await.context("start postgres")?;
                    }
                }
                let st = self.pg.query_status().await?;
                if !st.in_recovery {
                    self.pg.ensure_roles().await?;
                }
                let how = match standby_of {
                    Some(up) => format!("started as a standby of {up}"),
                    None if st.in_recovery => "started (in recovery)".to_string(),
                    None => "started as primary".to_string(),
                };
                self.shared.events.record("postgres_started", how);
                Ok(())
            }
            Action::StartStandby => {
                self.pg.write_standby_config()?;
                self.pg.start().await.context("start as a standby")?;
                self.shared.events.record(
                    "postgres_started",
                    "started as a standby without an upstream (no primary holds the lease)",
                );
                Ok(())
            }
            Action::StepDown => {
                crate::endpoints::drop_local(
                    &self.shared,
                    "stepping down",
                    Duration::from_millis(500),
                )
                .await;
                self.endpoints.step_down();
                self.set_state(PgState::Stopping);
                self.pg.stop(false).await?;
                self.shared.events.record(
                    "stepped_down",
                    "PostgreSQL ran as a writable primary without the lease: stopped at once",
                );
                Ok(())
            }
            Action::Promote => {
                let epoch = self.require_lease("promote")?;
                // An old primary that did not step down is fenced first (when configured).
                Box::pin(self.endpoints.fence_before_promote(epoch)).await?;
                let epoch = self.require_lease("promote")?;
                // In synchronous mode the new primary waits for the committed set (or, strict
                // with none, for any standby) from its first write on.
                let st = self.shared.consensus.sm.state();
                let mode = st.config.failover.synchronous_mode;
                // Usually already in place (see `sync_step`): then this changes nothing.
                let names = self.standby_sync_names(&st);
                self.pg
                    .set_synchronous_standby_names(&pgwarden_core::sync::render(&names))
                    .await?;
                let t0 = Instant::now();
                self.pg.promote().await?;
                tracing::info!(ms = t0.elapsed().as_millis() as u64, "promoted");
                crate::lease::record_step(&self.shared, epoch, "promoted", String::new()).await;
                self.promoted_now = true;
                self.pg.ensure_roles().await?;
                let ev = &self.shared.events;
                ev.record(
                    "promoted",
                    format!("promoted to primary (lease epoch {epoch})"),
                );
                // A synchronous primary's first write waits for a standby: not measured here.
                let no_wait = mode == SyncMode::Off;
                let wrote = no_wait
                    && matches!(
                        tokio::time::timeout(Duration::from_secs(2), self.pg.write_probe()).await,
                        Ok(Ok(()))
                    );
                if wrote {
                    crate::lease::record_step(
                        &self.shared,
                        epoch,
                        "first_write_accepted",
                        String::new(),
                    )
                    .await;
                }
                // The first checkpoint on the new timeline lets others pg_rewind from here.
                let me = self.cfg.me().clone();
                let client = self.pg.connect_member(&me).await;
                tokio::spawn(async move {
                    if let Ok(c) = client {
                        if let Err(e) = c.batch_execute("CHECKPOINT").await {
                            tracing::warn!(error = %e, "checkpoint after promotion");
                        }
                    }
                });
                Ok(())
            }
            Action::Follow { upstream } => {
                let up = self.member(upstream)?;
                self.pg.follow_running(&up).await?;
                ev.record("followed", format!("now streaming from {upstream}"));
                Ok(())
            }
            Action::Rejoin { from } => {
                let up = self.member(from)?;
                self.set_state(PgState::Stopping);
                self.pg.stop(true).await?;
                self.start_standby_of(&up, true).await?;
                self.shared
                    .events
                    .record("rejoined", format!("rejoined as a standby of {from}"));
                Ok(())
            }
            Action::Restart => {
                self.pending = None;
                self.set_state(PgState::Stopping);
                self.pg.stop(true).await?;
                let up = match &self.intent.upstream {
                    Some(u) if self.intent.role == DesiredRole::Replica => Some(self.member(u)?),
                    _ => None,
                };
                self.pg.write_config(up.as_ref())?;
                self.pg.start().await.context("start postgres")?;
                self.shared
                    .events
                    .record("postgres_restarted", "restarted on request");
                Ok(())
            }
            Action::Reinitialize { from } => {
                self.pending = None;
                let up = self.member(from)?;
                self.set_state(PgState::Stopping);
                self.pg.stop(true).await?;
                self.move_aside()?;
                self.clone_for(&up).await
            }
        }
    }

    fn move_aside(&self) -> Result<()> {
        if matches!(self.pg.data_dir_state(), DataDir::Empty) {
            return Ok(());
        }
        let to = self.pg.move_aside(now_ms())?;
        self.shared.events.record(
            "data_dir_moved_aside",
            format!(
                "moved the old data directory aside to {} (kept, not deleted)",
                to.display()
            ),
        );
        Ok(())
    }

    /// Builds this node as a new replica of `up`, taking the base backup from a peer tagged
    /// `clonefrom` when one runs (see `clone_source`), else from `up`.
    async fn clone_for(&mut self, up: &Member) -> Result<()> {
        let peers: Vec<NodeStatus> = self.peers.iter().filter_map(|(_, s)| s.clone()).collect();
        let source = self.member(&pgwarden_core::decide::clone_source(&up.name, &peers))?;
        self.clone_from(&source, up).await
    }

    async fn clone_from(&mut self, source: &Member, up: &Member) -> Result<()> {
        self.set_state(PgState::Cloning);
        let how = if source.name == up.name {
            format!("building a replica of {} with pg_basebackup", up.name)
        } else {
            format!(
                "building a replica of {} with pg_basebackup from {} (tagged clonefrom)",
                up.name, source.name
            )
        };
        self.shared.events.record("clone_started", how);
        let shared = self.shared.clone();
        let mut last = (0, 0);
        self.pg
            .basebackup(source, |done, total| {
                last = (done, total);
                shared.update(|s| {
                    s.basebackup = Some(Progress {
                        done_bytes: done,
                        total_bytes: total,
                    });
                    s.last_loop_ms = now_ms();
                })
            })
            .await?;
        self.shared.events.record(
            "cloned",
            format!(
                "base backup from {} complete ({} of {} bytes)",
                source.name, last.0, last.1
            ),
        );
        self.pg.write_config(Some(up))?;
        self.pg.start().await.context("start new replica")?;
        self.shared.events.record(
            "postgres_started",
            format!("started as a standby of {}", up.name),
        );
        Ok(())
    }

    /// Starts the stopped PostgreSQL as a standby of `up`, rewinding it first when it diverged
    /// (always checked when `force_rewind`, see `prepare_standby`).
    async fn start_standby_of(&mut self, up: &Member, force_rewind: bool) -> Result<()> {
        self.prepare_standby(up, force_rewind).await?;
        self.pg.write_config(Some(up))?;
        self.pg.start().await.context("start as standby")
    }

    /// Before a stopped node starts as a standby of `up`: if it ran as a primary, or `force`,
    /// compare its WAL with the upstream's timeline history and pg_rewind when it diverged.
    /// When pg_rewind fails the data directory is moved aside and cloned afresh.
    async fn prepare_standby(&mut self, up: &Member, force: bool) -> Result<()> {
        let cd = self.pg.controldata().await?;
        let was_primary = !cd.state.contains("recovery");
        if !force && !was_primary {
            // A replica's WAL is checked against the upstream once it runs.
            return Ok(());
        }
        let (tli, hist) = self.pg.upstream_timeline(up).await.with_context(|| {
            format!(
                "cannot check this node's timeline against {} before starting it as a standby",
                up.name
            )
        })?;
        let need = if force {
            RewindNeed::Yes("the replica's WAL diverged from its upstream".into())
        } else {
            // A promotion reaches the control file only with the next checkpoint: a primary
            // stopped before that has a newer timeline only in its WAL (a .history file).
            pgtext::rewind_need(
                cd.checkpoint_timeline.max(self.pg.newest_local_timeline()),
                pgtext::known_end_of_wal(&cd),
                tli,
                &hist,
            )
        };
        let why = match need {
            RewindNeed::No => return Ok(()),
            RewindNeed::Yes(w) | RewindNeed::Unknown(w) => w,
        };
        self.set_state(PgState::Rewinding);
        self.shared.events.record(
            "rewind_started",
            format!("running pg_rewind from {}: {why}", up.name),
        );
        match self.pg.rewind(up).await {
            Ok(msg) => {
                self.shared
                    .events
                    .record("rewind", format!("pg_rewind from {}: {msg}", up.name));
                Ok(())
            }
            Err(e) => {
                self.shared.events.record(
                    "rewind_failed",
                    format!("pg_rewind from {} failed: {e:#}; cloning afresh", up.name),
                );
                self.move_aside()?;
                // The diverged node takes a fresh copy of the new primary itself.
                self.clone_from(up, up).await?;
                // clone_from started PostgreSQL; stop it so the caller starts it once.
                self.pg.stop(true).await?;
                Ok(())
            }
        }
    }
}

/// Every member as a failover candidate: this node from its own status, the peers from their
/// last answers (no answer: not healthy).
fn candidates(
    me: &NodeStatus,
    peers: &[(Member, Option<NodeStatus>)],
) -> Vec<pgwarden_core::candidate::Candidate> {
    use pgwarden_core::candidate::Candidate;
    let of = |name: &str, s: Option<&NodeStatus>| match s {
        Some(s) => Candidate {
            name: name.to_string(),
            healthy: s.is_running_replica(),
            witness: s.witness,
            nofailover: s.tags.nofailover,
            failover_priority: s.tags.effective_failover_priority(),
            received_lsn: s.wal.received.max(s.wal.replayed),
            writable_primary: s.is_writable_primary(),
        },
        None => Candidate {
            name: name.to_string(),
            healthy: false,
            witness: false,
            nofailover: false,
            failover_priority: 0,
            received_lsn: None,
            writable_primary: false,
        },
    };
    std::iter::once(of(&me.name, Some(me)))
        .chain(peers.iter().map(|(m, s)| of(&m.name, s.as_ref())))
        .collect()
}

/// A member's status from its health server (`None`: no answer).
pub async fn fetch_status(http: &reqwest::Client, m: &Member) -> Option<NodeStatus> {
    let url = format!("http://{}:{}/status", m.host, m.health_port);
    http.get(&url).send().await.ok()?.json().await.ok()
}
