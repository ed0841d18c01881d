//! Client endpoints that follow the primary: which addresses a node must hold on its own
//! interfaces, which EC2 moves make the primary reachable, and whether the old primary must be
//! fenced first. Pure decisions; the agent does the netlink and EC2 calls.
//!
//! Order (as Pacemaker constraints order IPaddr2/awsvip/fence_aws in the hand-built setups):
//! becoming primary: lease → fence the old primary if it did not step down → promote → EC2
//! secondary IP → Elastic IP → route-table IP → local addresses → gratuitous ARP. Stepping
//! down: local addresses first, then (best effort) the EC2 secondary IP, then PostgreSQL.

use crate::config::{parse_cidr, AwsSection, Fencing, VipSection};
use crate::record::{ChangeKind, FailoverRecord};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// The endpoints part of a node's status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// What is configured: `vip 10.0.1.100/24 on eth0`, `secondary_ip 10.0.1.100`, …
    pub configured: Vec<String>,
    /// The local addresses this node carries now.
    pub held: Vec<String>,
    /// The EC2 moves made for the current lease epoch (on the primary).
    pub ec2_moved_epoch: Option<u64>,
    /// Where this node runs on EC2 (from IMDS).
    pub placement: Option<crate::lease::Placement>,
    /// Whether this node could take over the endpoints right now.
    pub ready: bool,
    /// Why not, or what failed last.
    pub problems: Vec<String>,
    /// The EC2 permissions the configuration needs, as the last DryRun check found them.
    pub permissions: Vec<Permission>,
    /// Wall-clock ms of the last permission check.
    pub permissions_checked_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub action: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether a node could take over its endpoints now, and the problems that say why not:
/// the local interfaces exist, and with EC2 endpoints the instance is known (IMDS answered)
/// and every needed action was permitted at the last check.
pub fn endpoint_readiness(
    missing_interfaces: &[String],
    aws_configured: bool,
    placement_known: Option<&str>,
    permissions: &[Permission],
) -> (bool, Vec<String>) {
    let mut problems: Vec<String> = missing_interfaces
        .iter()
        .map(|i| format!("interface {i} does not exist"))
        .collect();
    if aws_configured {
        if let Some(why) = placement_known {
            problems.push(format!("the instance is not known: {why}"));
        }
        if permissions.is_empty() && placement_known.is_none() {
            problems.push("the EC2 permissions have not been checked yet".into());
        }
        for p in permissions.iter().filter(|p| !p.allowed) {
            problems.push(match &p.error {
                Some(e) => format!("ec2:{} is not permitted: {e}", p.action),
                None => format!("ec2:{} is not permitted", p.action),
            });
        }
    }
    (problems.is_empty(), problems)
}

/// An address the primary carries on one of its interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsAddress {
    pub interface: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub label: Option<String>,
    /// Gratuitous ARP announcements after adding it.
    pub announce: u32,
    /// Where it comes from: `vip`, `secondary_ip` or `overlay_ip`.
    pub source: String,
}

impl OsAddress {
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }
}

/// Every address the primary must carry, once each: the local VIP, the EC2 secondary private
/// IP (with the subnet's prefix, `subnet_prefix`, from IMDS) and the route-table overlay IP
/// (/32). When the VIP and the secondary IP are the same address it is carried once, with the
/// VIP's settings.
pub fn os_addresses(
    vip: Option<&VipSection>,
    aws: Option<&AwsSection>,
    subnet_prefix: Option<u8>,
) -> Vec<OsAddress> {
    let mut out: Vec<OsAddress> = Vec::new();
    if let Some(v) = vip {
        if let Ok((ip, prefix)) = parse_cidr(&v.address) {
            out.push(OsAddress {
                interface: v.interface.clone(),
                ip,
                prefix,
                label: v.label.clone(),
                announce: v.arp_count,
                source: "vip".into(),
            });
        }
    }
    if let Some(a) = aws {
        let extra = [
            ("secondary_ip", &a.secondary_ip, subnet_prefix.unwrap_or(32)),
            ("overlay_ip", &a.overlay_ip, 32),
        ];
        for (source, ip, prefix) in extra {
            let Some(ip) = ip.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            if out.iter().any(|o| o.ip == ip) {
                continue;
            }
            out.push(OsAddress {
                interface: a.interface.clone(),
                ip,
                prefix,
                label: None,
                announce: 3,
                source: source.into(),
            });
        }
    }
    out
}

/// What to do about one local address this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressMove {
    Keep,
    Add,
    Remove,
}

/// `hold`: this node holds the lease and runs the writable primary. Only such a node carries
/// the addresses; every other node removes them (also after a partition heals, when the old
/// primary comes back still carrying them).
pub fn address_move(hold: bool, present: bool) -> AddressMove {
    match (hold, present) {
        (true, false) => AddressMove::Add,
        (false, true) => AddressMove::Remove,
        _ => AddressMove::Keep,
    }
}

/// One EC2 call that points an endpoint at the new primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "move", rename_all = "snake_case")]
pub enum Ec2Move {
    /// `AssignPrivateIpAddresses` with `AllowReassignment` on the primary's ENI.
    SecondaryIp { ip: String },
    /// `AssociateAddress` with `AllowReassociation` to the primary's ENI and private IP.
    ElasticIp {
        allocation_id: String,
        private_ip: String,
    },
    /// `ReplaceRoute` of `destination` to the primary's ENI.
    Route {
        route_table: String,
        destination: String,
    },
}

impl Ec2Move {
    /// The step name in the failover record and the events.
    pub fn step(&self) -> &'static str {
        match self {
            Ec2Move::SecondaryIp { .. } => "secondary_ip_assigned",
            Ec2Move::ElasticIp { .. } => "elastic_ip_associated",
            Ec2Move::Route { .. } => "route_replaced",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Ec2Move::SecondaryIp { ip } => format!("secondary private IP {ip}"),
            Ec2Move::ElasticIp {
                allocation_id,
                private_ip,
            } => format!("Elastic IP {allocation_id} → {private_ip}"),
            Ec2Move::Route {
                route_table,
                destination,
            } => format!("route {destination} in {route_table}"),
        }
    }
}

/// The EC2 moves a new primary makes, in order: the secondary IP first (the Elastic IP may be
/// associated to it), then the Elastic IP (to the secondary IP when one is configured, else to
/// the instance's primary private IP), then every route table.
pub fn ec2_moves(aws: &AwsSection, primary_private_ip: &str) -> Vec<Ec2Move> {
    let mut out = Vec::new();
    if let Some(ip) = &aws.secondary_ip {
        out.push(Ec2Move::SecondaryIp { ip: ip.clone() });
    }
    if let Some(a) = &aws.elastic_ip_allocation_id {
        out.push(Ec2Move::ElasticIp {
            allocation_id: a.clone(),
            private_ip: aws
                .secondary_ip
                .clone()
                .unwrap_or_else(|| primary_private_ip.to_string()),
        });
    }
    if let Some(ip) = &aws.overlay_ip {
        for rt in &aws.route_tables {
            out.push(Ec2Move::Route {
                route_table: rt.clone(),
                destination: format!("{ip}/32"),
            });
        }
    }
    out
}

/// Whom to fence before promoting under the lease of `record` (this node's acquisition):
/// the old holder, when it lost the lease by expiry (an automatic or manual failover: it may
/// be alive and unreachable) and fencing is configured. A holder that released the lease
/// (switchover, PostgreSQL down) stepped down cleanly and is not fenced; nor is this node.
pub fn fencing_target(record: &FailoverRecord, fencing: Fencing, me: &str) -> Option<String> {
    if fencing == Fencing::None {
        return None;
    }
    let old = record.old_holder.as_deref()?;
    if old == me {
        return None;
    }
    let expired = matches!(
        record.kind,
        ChangeKind::Failover | ChangeKind::ManualFailover
    ) && !record.old_released;
    expired.then(|| old.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip() -> VipSection {
        VipSection {
            address: "10.0.1.100/24".into(),
            interface: "eth0".into(),
            label: Some("eth0:pg".into()),
            arp_count: 3,
        }
    }

    fn aws() -> AwsSection {
        let mut a: AwsSection = toml::from_str("").unwrap();
        a.secondary_ip = Some("10.0.1.100".into());
        a
    }

    #[test]
    fn readiness_names_what_is_missing() {
        let ok = Permission {
            action: "AssignPrivateIpAddresses".into(),
            allowed: true,
            error: None,
        };
        let denied = Permission {
            action: "AssociateAddress".into(),
            allowed: false,
            error: Some("UnauthorizedOperation".into()),
        };
        assert_eq!(endpoint_readiness(&[], false, None, &[]), (true, vec![]));
        assert_eq!(
            endpoint_readiness(&[], true, None, std::slice::from_ref(&ok)),
            (true, vec![])
        );
        let (ready, why) = endpoint_readiness(&[], true, None, &[ok.clone(), denied]);
        assert!(!ready);
        assert_eq!(
            why,
            vec!["ec2:AssociateAddress is not permitted: UnauthorizedOperation".to_string()]
        );
        let (ready, why) = endpoint_readiness(&["eth9".into()], true, Some("IMDS timed out"), &[]);
        assert!(!ready);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("eth9") && why[1].contains("IMDS timed out"));
        let (ready, why) = endpoint_readiness(&[], true, None, &[]);
        assert!(!ready && why[0].contains("not been checked"), "{why:?}");
    }

    #[test]
    fn the_vip_and_the_same_secondary_ip_are_carried_once() {
        let v = vip();
        let mut a = aws();
        a.overlay_ip = Some("192.168.50.10".into());
        a.route_tables = vec!["rtb-1".into()];
        let addrs = os_addresses(Some(&v), Some(&a), Some(24));
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        assert_eq!(addrs[0].cidr(), "10.0.1.100/24");
        assert_eq!(addrs[0].source, "vip");
        assert_eq!(addrs[0].label.as_deref(), Some("eth0:pg"));
        assert_eq!(addrs[1].cidr(), "192.168.50.10/32");
        assert_eq!(addrs[1].source, "overlay_ip");
    }

    #[test]
    fn a_secondary_ip_alone_takes_the_subnet_prefix() {
        let a = aws();
        let addrs = os_addresses(None, Some(&a), Some(20));
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].cidr(), "10.0.1.100/20");
        assert_eq!(addrs[0].source, "secondary_ip");
        assert!(os_addresses(None, None, None).is_empty());
    }

    #[test]
    fn only_the_holding_primary_carries_the_addresses() {
        assert_eq!(address_move(true, false), AddressMove::Add);
        assert_eq!(address_move(true, true), AddressMove::Keep);
        assert_eq!(address_move(false, true), AddressMove::Remove);
        assert_eq!(address_move(false, false), AddressMove::Keep);
    }

    #[test]
    fn ec2_moves_are_ordered_secondary_then_eip_then_routes() {
        let mut a = aws();
        a.elastic_ip_allocation_id = Some("eipalloc-1".into());
        a.overlay_ip = Some("192.168.50.10".into());
        a.route_tables = vec!["rtb-1".into(), "rtb-2".into()];
        let m = ec2_moves(&a, "10.0.1.11");
        assert_eq!(
            m,
            vec![
                Ec2Move::SecondaryIp {
                    ip: "10.0.1.100".into()
                },
                Ec2Move::ElasticIp {
                    allocation_id: "eipalloc-1".into(),
                    private_ip: "10.0.1.100".into()
                },
                Ec2Move::Route {
                    route_table: "rtb-1".into(),
                    destination: "192.168.50.10/32".into()
                },
                Ec2Move::Route {
                    route_table: "rtb-2".into(),
                    destination: "192.168.50.10/32".into()
                },
            ]
        );
        // Without a secondary IP the Elastic IP goes to the instance's own address.
        a.secondary_ip = None;
        let m = ec2_moves(&a, "10.0.1.11");
        assert_eq!(
            m[0],
            Ec2Move::ElasticIp {
                allocation_id: "eipalloc-1".into(),
                private_ip: "10.0.1.11".into()
            }
        );
    }

    fn record(kind: ChangeKind, old: Option<&str>, lost: &str) -> FailoverRecord {
        FailoverRecord {
            epoch: 5,
            kind,
            old_holder: old.map(String::from),
            lost_because: lost.into(),
            old_released: lost.starts_with("released"),
            new_holder: "n2".into(),
            won_because: String::new(),
            candidates: vec![],
            old_primary_lsn: None,
            steps: vec![],
        }
    }

    #[test]
    fn only_a_primary_that_did_not_step_down_is_fenced() {
        let expired = record(ChangeKind::Failover, Some("n1"), "expired at 12:00:00");
        assert_eq!(
            fencing_target(&expired, Fencing::Stop, "n2").as_deref(),
            Some("n1")
        );
        assert_eq!(
            fencing_target(&expired, Fencing::Reboot, "n2").as_deref(),
            Some("n1")
        );
        assert_eq!(fencing_target(&expired, Fencing::None, "n2"), None);
        let manual = record(ChangeKind::ManualFailover, Some("n1"), "expired");
        assert_eq!(
            fencing_target(&manual, Fencing::Stop, "n2").as_deref(),
            Some("n1")
        );
        let released = record(
            ChangeKind::Failover,
            Some("n1"),
            "released: PostgreSQL down",
        );
        assert_eq!(fencing_target(&released, Fencing::Stop, "n2"), None);
        let switchover = record(ChangeKind::Switchover, Some("n1"), "released");
        assert_eq!(fencing_target(&switchover, Fencing::Stop, "n2"), None);
        let boot = record(ChangeKind::Bootstrap, None, "");
        assert_eq!(fencing_target(&boot, Fencing::Stop, "n1"), None);
        let mine = record(ChangeKind::Failover, Some("n2"), "expired");
        assert_eq!(fencing_target(&mine, Fencing::Stop, "n2"), None);
    }
}
