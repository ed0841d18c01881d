//! Client endpoints that follow the primary: the local VIP (netlink + gratuitous ARP), the EC2
//! secondary private IP, the Elastic IP and the route-table overlay IP, and fencing of an old
//! primary that did not step down. The decisions are `pgwarden_core::endpoints`; this module
//! makes the calls.
//!
//! The local addresses are reconciled every loop: only the lease-holding writable primary
//! carries them; every other node removes them (a VIP removed by hand comes back, an old
//! primary that returns from a partition drops it). The EC2 moves are made once per lease
//! epoch (no steady-state Describe polling: the EC2 API is rate-limited per account).

use crate::agent::Shared;
use crate::aws::{Ec2, Identity, Imds};
use crate::netaddr::Netlink;
use anyhow::{Context, Result};
use pgwarden_core::config::Fencing;
use pgwarden_core::endpoints::{
    address_move, ec2_moves, endpoint_readiness, fencing_target, os_addresses, AddressMove,
    EndpointStatus, OsAddress, Permission,
};
use pgwarden_core::lease::Placement;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The local addresses the primary carries, shared with the lease task (which drops them
/// first when the lease runs out) and written to `<state_dir>/endpoints.json` for the guard.
pub struct Local {
    net: Netlink,
    addrs: RwLock<Vec<OsAddress>>,
    file: PathBuf,
}

impl Local {
    pub fn new(net: Netlink, state_dir: &str) -> Local {
        Local {
            net,
            addrs: RwLock::new(Vec::new()),
            file: PathBuf::from(state_dir).join("endpoints.json"),
        }
    }

    pub fn addrs(&self) -> Vec<OsAddress> {
        self.addrs.read().map(|a| a.clone()).unwrap_or_default()
    }

    fn set(&self, addrs: Vec<OsAddress>) {
        if let Ok(text) = serde_json::to_string(&addrs) {
            if let Err(e) = crate::sys::write_atomic(&self.file, &text) {
                tracing::warn!(error = %format!("{e:#}"), "write endpoints.json");
            }
        }
        if let Ok(mut a) = self.addrs.write() {
            *a = addrs;
        }
    }

    /// Removes every managed address from this host; returns those that were there.
    pub async fn drop_all(&self) -> Vec<String> {
        remove_addresses(&self.net, &self.addrs()).await
    }
}

/// Removes `addrs` from their interfaces; returns the ones that were there.
pub async fn remove_addresses(net: &Netlink, addrs: &[OsAddress]) -> Vec<String> {
    let mut removed = Vec::new();
    for a in addrs {
        let res = async {
            let link = net.link(&a.interface).await?;
            net.remove(link.index, a.ip).await
        }
        .await;
        match res {
            Ok(true) => removed.push(format!("{} on {}", a.cidr(), a.interface)),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(address = %a.cidr(), error = %format!("{e:#}"), "remove address")
            }
        }
    }
    removed
}

/// Drops the local addresses (at most `limit` of waiting): the first thing a primary does when
/// it steps down or its lease runs out.
pub async fn drop_local(shared: &Shared, why: &str, limit: Duration) {
    let Some(local) = &shared.local else { return };
    if let Ok(removed) = tokio::time::timeout(limit, local.drop_all()).await {
        if !removed.is_empty() {
            shared.events.record(
                "address_removed",
                format!("removed {} ({why})", removed.join(", ")),
            );
        }
    }
}

struct AwsCtx {
    ec2: Ec2,
    me: Identity,
}

/// The endpoint manager of the agent loop.
pub struct Endpoints {
    shared: Arc<Shared>,
    aws: Option<AwsCtx>,
    aws_error: Option<String>,
    next_aws_try: Instant,
    /// The epoch whose EC2 moves are done.
    moved_epoch: Option<u64>,
    /// This node made EC2 moves it has not undone yet.
    ec2_held: bool,
    fenced_epoch: Option<u64>,
    permissions: Vec<Permission>,
    permissions_checked: Option<(Instant, u64)>,
    permission_targets: Vec<String>,
    /// The EC2 moves done for `moved_epoch`'s successor attempt, and when to try again.
    moves_done: Vec<pgwarden_core::endpoints::Ec2Move>,
    moves_epoch: Option<u64>,
    ec2_failures: u32,
    next_ec2_try: Instant,
    placement_committed: bool,
    /// When to propose the placement again after a proposal that did not commit (without a
    /// majority a proposal waits seconds; the loop must not do that at every step): 1 s, 2 s,
    /// 4 s … up to 30 s.
    next_placement_try: Instant,
    placement_failures: u32,
    /// The epoch whose first address addition is in its failover record.
    local_epoch: Option<u64>,
    last_error: Option<String>,
    missing_interfaces: Vec<String>,
}

impl Endpoints {
    pub fn new(shared: Arc<Shared>) -> Endpoints {
        let local = shared.cfg.vip.as_ref();
        if let Some(l) = &shared.local {
            // Until IMDS tells the subnet, only the VIP is known.
            l.set(os_addresses(local, None, None));
        }
        Endpoints {
            shared,
            aws: None,
            aws_error: None,
            next_aws_try: Instant::now(),
            moved_epoch: None,
            ec2_held: false,
            fenced_epoch: None,
            permissions: Vec::new(),
            permissions_checked: None,
            permission_targets: Vec::new(),
            moves_done: Vec::new(),
            moves_epoch: None,
            ec2_failures: 0,
            next_ec2_try: Instant::now(),
            placement_committed: false,
            next_placement_try: Instant::now(),
            placement_failures: 0,
            local_epoch: None,
            last_error: None,
            missing_interfaces: Vec::new(),
        }
    }

    pub fn configured(&self) -> bool {
        self.shared.cfg.vip.is_some() || self.shared.cfg.aws.is_some()
    }

    /// Finds this instance (IMDS), builds the EC2 client, reports the placement to the group
    /// and checks the permissions (at start, then every `permission_check_interval`).
    pub async fn prepare(&mut self) {
        let Some(cfg) = self.shared.cfg.aws.clone() else {
            return;
        };
        if self.aws.is_none() && Instant::now() >= self.next_aws_try {
            let endpoint = cfg
                .metadata_endpoint
                .clone()
                .unwrap_or_else(|| "http://169.254.169.254".into());
            let res = async {
                let me = Imds::new(&endpoint)
                    .identity(&cfg)
                    .await
                    .context("find this instance through the instance metadata service")?;
                let region = cfg.region.clone().unwrap_or_else(|| me.region.clone());
                let ec2 = Ec2::new(&cfg, &region).await;
                anyhow::Ok(AwsCtx { ec2, me })
            }
            .await;
            match res {
                Ok(ctx) => {
                    let prefix = pgwarden_core::config::parse_cidr(&ctx.me.subnet_cidr)
                        .ok()
                        .map(|(_, p)| p);
                    if let Some(l) = &self.shared.local {
                        l.set(os_addresses(
                            self.shared.cfg.vip.as_ref(),
                            Some(&cfg),
                            prefix,
                        ));
                    }
                    self.shared.events.record(
                        "ec2_identity",
                        format!(
                            "running on {} ({}, ENI {}, subnet {}, {})",
                            ctx.me.instance_id,
                            ctx.me.availability_zone,
                            ctx.me.eni_id,
                            ctx.me.subnet_id,
                            ctx.me.private_ip
                        ),
                    );
                    self.aws = Some(ctx);
                    self.aws_error = None;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.aws_error.as_deref() != Some(&msg) {
                        self.shared.events.record("ec2_error", msg.clone());
                    }
                    self.aws_error = Some(msg);
                    self.next_aws_try = Instant::now() + Duration::from_secs(5);
                }
            }
        }
        let Some(ctx) = &self.aws else { return };
        if !self.placement_committed && Instant::now() >= self.next_placement_try {
            let placement = Self::placement(&ctx.me);
            let st = self.shared.consensus.sm.state();
            let me = &self.shared.cfg.node.name;
            let known = st.placements.get(me) == Some(&placement);
            self.placement_committed = known
                || self
                    .shared
                    .consensus
                    .propose(pgwarden_core::lease::Proposal::SetPlacement {
                        node: me.clone(),
                        placement,
                    })
                    .await
                    .is_ok();
            if !self.placement_committed {
                let wait = (1u64 << self.placement_failures.min(5)).min(30);
                self.placement_failures += 1;
                self.next_placement_try = Instant::now() + Duration::from_secs(wait);
            }
        }
        // Checked at start, every `permission_check_interval`, and when the members whose
        // instances this node may have to fence become known.
        let targets = if cfg.fencing == Fencing::None {
            Vec::new()
        } else {
            self.fencing_targets()
        };
        let due = self
            .permissions_checked
            .is_none_or(|(t, _)| t.elapsed() >= cfg.permission_check_interval.0)
            || targets != self.permission_targets;
        if due {
            self.permission_targets = targets.clone();
            let checks = ctx.ec2.check_permissions(&cfg, &ctx.me, &targets).await;
            let perms: Vec<Permission> = checks
                .into_iter()
                .map(|c| Permission {
                    action: c.action,
                    allowed: c.allowed,
                    error: c.error,
                })
                .collect();
            for p in perms.iter().filter(|p| !p.allowed) {
                if !self.permissions.contains(p) {
                    self.shared.events.record(
                        "ec2_permission_denied",
                        format!(
                            "ec2:{} is not permitted{}: this node could not take over the \
                             endpoints (see deploy/aws/iam-policy.json)",
                            p.action,
                            p.error
                                .as_ref()
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        ),
                    );
                }
            }
            self.permissions = perms;
            self.permissions_checked = Some((Instant::now(), crate::sys::now_ms()));
        }
    }

    /// The instances of the other members (configuration first, else what they reported).
    fn fencing_targets(&self) -> Vec<String> {
        let st = self.shared.consensus.sm.state();
        self.shared
            .cfg
            .peers()
            .filter(|m| !m.witness)
            .filter_map(|m| {
                m.instance_id
                    .clone()
                    .or_else(|| st.placements.get(&m.name).map(|p| p.instance_id.clone()))
            })
            .collect()
    }

    fn instance_of(&self, node: &str) -> Option<String> {
        let st = self.shared.consensus.sm.state();
        self.shared
            .cfg
            .member(node)
            .and_then(|m| m.instance_id.clone())
            .or_else(|| st.placements.get(node).map(|p| p.instance_id.clone()))
    }

    /// Before promoting under `epoch`: fence the old primary when it lost the lease without
    /// stepping down and fencing is configured. An error means: do not promote (yet).
    pub async fn fence_before_promote(&mut self, epoch: u64) -> Result<()> {
        let Some(cfg) = self.shared.cfg.aws.clone() else {
            return Ok(());
        };
        if cfg.fencing == Fencing::None || self.fenced_epoch == Some(epoch) {
            return Ok(());
        }
        let st = self.shared.consensus.sm.state();
        let me = self.shared.cfg.node.name.clone();
        let Some(record) = st.failovers.iter().rev().find(|r| r.epoch == epoch) else {
            return Ok(());
        };
        let Some(target) = fencing_target(record, cfg.fencing, &me) else {
            self.fenced_epoch = Some(epoch);
            return Ok(());
        };
        crate::lease::record_step(
            &self.shared,
            epoch,
            "fencing_started",
            format!("{} {target}", cfg.fencing.as_str()),
        )
        .await;
        match self
            .fence(&target, "before promoting: it did not step down")
            .await
        {
            Ok(msg) => {
                crate::lease::record_step(&self.shared, epoch, "fenced", msg).await;
                self.fenced_epoch = Some(epoch);
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                crate::lease::record_step(&self.shared, epoch, "fencing_failed", msg.clone()).await;
                anyhow::bail!("{msg}; not promoting")
            }
        }
    }

    /// The two-node arbiter: stop `peer`'s instance and wait until it is stopped. Refuses
    /// when this node's own instance is not running (the peer fenced it first).
    pub async fn fence_peer(&mut self, peer: &str) -> Result<String> {
        self.prepare().await;
        if let Some(ctx) = &self.aws {
            let own = ctx.ec2.instance_state(&ctx.me.instance_id).await?;
            if own != "running" {
                anyhow::bail!("this instance is {own}: {peer} fenced it first");
            }
        }
        self.fence(peer, "two-node cluster, it does not answer")
            .await
    }

    /// Stops `target`'s instance as `aws.fencing` says and waits for it, with the events
    /// `fencing` and `fenced` or `fencing_failed`. Returns what happened.
    async fn fence(&self, target: &str, why: &str) -> Result<String> {
        let result = async {
            let Some(cfg) = self.shared.cfg.aws.as_ref() else {
                anyhow::bail!("no [aws] section: no fencing");
            };
            let Some(ctx) = &self.aws else {
                anyhow::bail!(
                    "fencing {target} is required, but the EC2 client is not ready: {}",
                    self.aws_error.as_deref().unwrap_or("starting")
                );
            };
            let Some(instance) = self.instance_of(target) else {
                anyhow::bail!(
                    "fencing {target} is required, but its instance is unknown (set \
                     cluster.members.instance_id or let its agent report it once)"
                );
            };
            self.shared.events.record(
                "fencing",
                format!(
                    "fencing {target} ({instance}, fencing = {}): {why}",
                    cfg.fencing.as_str()
                ),
            );
            let out = ctx
                .ec2
                .fence(&instance, cfg.fencing, cfg.fencing_timeout.0)
                .await
                .map_err(|e| anyhow::anyhow!("fencing {target} ({instance}) failed: {e}"))?;
            Ok(format!(
                "fenced {target} ({instance}): {} → {} in {} ms",
                out.action, out.final_state, out.elapsed_ms
            ))
        }
        .await;
        match &result {
            Ok(msg) => self.shared.events.record("fenced", msg.clone()),
            Err(e) => self
                .shared
                .events
                .record("fencing_failed", format!("{e:#}")),
        }
        result
    }

    /// Where this node runs, as reported to the group and in the status.
    fn placement(me: &Identity) -> Placement {
        Placement {
            instance_id: me.instance_id.clone(),
            eni_id: me.eni_id.clone(),
            availability_zone: me.availability_zone.clone(),
            private_ip: me.private_ip.clone(),
        }
    }

    /// One round: `hold` = this node holds lease `epoch` and runs the writable primary.
    pub async fn reconcile(&mut self, hold: bool, epoch: Option<u64>) {
        if !self.configured() {
            return;
        }
        self.prepare().await;
        if hold {
            if let (Some(e), Some(cfg)) = (epoch, self.shared.cfg.aws.clone()) {
                let due = self.moves_epoch != Some(e) || Instant::now() >= self.next_ec2_try;
                if self.moved_epoch != Some(e) && due {
                    self.ec2_moves(&cfg, e).await;
                }
            }
        } else if self.ec2_held {
            self.release_ec2();
        }
        self.local_addresses(hold, epoch).await;
    }

    async fn ec2_moves(&mut self, cfg: &pgwarden_core::config::AwsSection, epoch: u64) {
        let Some(ctx) = &self.aws else { return };
        if self.moves_epoch != Some(epoch) {
            self.moves_epoch = Some(epoch);
            self.moves_done.clear();
            self.ec2_failures = 0;
        }
        let mut ok = true;
        for mv in ec2_moves(cfg, &ctx.me.private_ip) {
            if self.moves_done.contains(&mv) {
                continue;
            }
            let res = match &mv {
                pgwarden_core::endpoints::Ec2Move::SecondaryIp { ip } => {
                    ctx.ec2.assign_secondary_ip(&ctx.me.eni_id, ip).await
                }
                pgwarden_core::endpoints::Ec2Move::ElasticIp {
                    allocation_id,
                    private_ip,
                } => {
                    ctx.ec2
                        .associate_elastic_ip(allocation_id, &ctx.me.eni_id, private_ip)
                        .await
                }
                pgwarden_core::endpoints::Ec2Move::Route {
                    route_table,
                    destination,
                } => {
                    ctx.ec2
                        .point_route(route_table, destination, &ctx.me.eni_id)
                        .await
                }
            };
            match res {
                Ok(()) => {
                    self.ec2_held = true;
                    self.moves_done.push(mv.clone());
                    let msg = format!("{} now points at {}", mv.describe(), ctx.me.eni_id);
                    self.shared.events.record(mv.step(), msg.clone());
                    crate::lease::record_step(&self.shared, epoch, mv.step(), msg).await;
                }
                Err(e) => {
                    ok = false;
                    let msg = format!("{}: {e}", mv.describe());
                    if self.last_error.as_deref() != Some(&msg) {
                        self.shared.events.record("ec2_error", msg.clone());
                        crate::lease::record_step(&self.shared, epoch, "ec2_error", msg.clone())
                            .await;
                    }
                    self.last_error = Some(msg);
                }
            }
        }
        if ok {
            self.moved_epoch = Some(epoch);
            self.last_error = None;
            self.ec2_failures = 0;
        } else {
            // The SDK already retried throttling and 5xx; what is left is retried with an
            // exponential backoff (1 s … 64 s), not at every loop.
            self.ec2_failures += 1;
            self.next_ec2_try = Instant::now() + Duration::from_secs(1 << self.ec2_failures.min(6));
        }
    }

    /// Stepping down: after the local addresses, before PostgreSQL stops, the EC2 secondary
    /// IP is given up (in the background; it only ever touches this node's own ENI).
    pub fn step_down(&mut self) {
        if self.ec2_held {
            self.release_ec2();
        }
    }

    /// Best effort, in the background: the new primary reassigns the address anyway.
    fn release_ec2(&mut self) {
        self.ec2_held = false;
        self.moved_epoch = None;
        self.moves_epoch = None;
        self.moves_done.clear();
        self.next_ec2_try = Instant::now();
        let (Some(ctx), Some(cfg)) = (&self.aws, self.shared.cfg.aws.as_ref()) else {
            return;
        };
        let Some(ip) = cfg.secondary_ip.clone() else {
            return;
        };
        let (ec2, eni, shared) = (ctx.ec2.clone(), ctx.me.eni_id.clone(), self.shared.clone());
        tokio::spawn(async move {
            match ec2.unassign_secondary_ip(&eni, &ip).await {
                Ok(()) => shared.events.record(
                    "secondary_ip_unassigned",
                    format!("unassigned {ip} from {eni}"),
                ),
                Err(e) => shared
                    .events
                    .record("ec2_error", format!("unassign {ip} from {eni}: {e}")),
            }
        });
    }

    async fn local_addresses(&mut self, hold: bool, epoch: Option<u64>) {
        let Some(local) = self.shared.local.clone() else {
            return;
        };
        let mut missing = Vec::new();
        for a in local.addrs() {
            let link = match local.net.link(&a.interface).await {
                Ok(l) => l,
                Err(_) => {
                    missing.push(a.interface.clone());
                    continue;
                }
            };
            let present = match local.net.find(link.index, a.ip).await {
                Ok(p) => p.is_some(),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "list addresses");
                    continue;
                }
            };
            match address_move(hold, present) {
                AddressMove::Keep => {}
                AddressMove::Add => {
                    match local
                        .net
                        .add(link.index, a.ip, a.prefix, a.label.as_deref())
                        .await
                    {
                        Ok(_) => {
                            if let Err(e) = crate::netaddr::announce(&link, a.ip, a.announce).await
                            {
                                tracing::warn!(error = %format!("{e:#}"), "gratuitous ARP");
                            }
                            let msg = format!(
                                "added {} ({}) on {} and announced it",
                                a.cidr(),
                                a.source,
                                a.interface
                            );
                            self.shared.events.record("address_added", msg.clone());
                            if let Some(e) = epoch.filter(|e| self.local_epoch != Some(*e)) {
                                crate::lease::record_step(&self.shared, e, "address_added", msg)
                                    .await;
                                self.local_epoch = Some(e);
                            }
                        }
                        Err(e) => {
                            let msg = format!("add {}: {e:#}", a.cidr());
                            self.shared.events.record("address_error", msg.clone());
                            self.last_error = Some(msg);
                        }
                    }
                }
                AddressMove::Remove => match local.net.remove(link.index, a.ip).await {
                    Ok(true) => self.shared.events.record(
                        "address_removed",
                        format!(
                            "removed {} ({}) from {}: this node is not the primary",
                            a.cidr(),
                            a.source,
                            a.interface
                        ),
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "remove address")
                    }
                },
            }
        }
        missing.dedup();
        self.missing_interfaces = missing;
    }

    /// The endpoints part of the status.
    pub async fn status(&self) -> Option<EndpointStatus> {
        if !self.configured() {
            return None;
        }
        let cfg = &self.shared.cfg;
        let mut configured = Vec::new();
        if let Some(v) = &cfg.vip {
            configured.push(format!("vip {} on {}", v.address, v.interface));
        }
        if let Some(a) = &cfg.aws {
            if let Some(ip) = &a.secondary_ip {
                configured.push(format!("secondary_ip {ip}"));
            }
            if let Some(e) = &a.elastic_ip_allocation_id {
                configured.push(format!("elastic_ip {e}"));
            }
            if let Some(ip) = &a.overlay_ip {
                configured.push(format!("overlay_ip {ip} via {}", a.route_tables.join(", ")));
            }
            configured.push(format!("fencing {}", a.fencing.as_str()));
        }
        let mut held = Vec::new();
        if let Some(local) = &self.shared.local {
            for a in local.addrs() {
                if let Ok(link) = local.net.link(&a.interface).await {
                    if let Ok(Some(_)) = local.net.find(link.index, a.ip).await {
                        held.push(format!("{} on {} ({})", a.cidr(), a.interface, a.source));
                    }
                }
            }
        }
        let placement = self.aws.as_ref().map(|c| Self::placement(&c.me));
        let unknown = match (&self.aws, &self.aws_error) {
            (None, Some(e)) => Some(e.as_str()),
            (None, None) => Some("not asked yet"),
            _ => None,
        };
        let (ready, mut problems) = endpoint_readiness(
            &self.missing_interfaces,
            cfg.aws.is_some(),
            unknown,
            &self.permissions,
        );
        if let Some(e) = &self.last_error {
            problems.push(format!("last error: {e}"));
        }
        Some(EndpointStatus {
            configured,
            held,
            ec2_moved_epoch: self.moved_epoch,
            placement,
            ready,
            problems,
            permissions: self.permissions.clone(),
            permissions_checked_ms: self.permissions_checked.map(|(_, ms)| ms),
        })
    }
}
