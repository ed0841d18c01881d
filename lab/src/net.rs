//! The lab's network: a bridge in the root namespace, one network namespace per host joined by
//! a veth pair, partitions made with nftables inside a host. The lab's subnet is routed to a
//! blackhole in the root namespace (with a high metric, so the bridge's own route wins while it
//! exists): a lab packet can never follow the default route out of the machine.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;

/// Runs `ip`, `nft` or another command; fails with its stderr.
pub fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("run {prog} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Like `sh`, for clean-up steps whose failure (already gone) does not matter.
pub fn sh_quiet(prog: &str, args: &[&str]) {
    let _ = Command::new(prog).args(args).output();
}

/// A /24 lab subnet, e.g. 10.77.0.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet(pub [u8; 3]);

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "24"));
        if len != "24" {
            bail!("the lab subnet must be a /24, like 10.77.0.0/24 (got {s})");
        }
        let ip: Ipv4Addr = addr.parse().with_context(|| format!("parse subnet {s}"))?;
        let o = ip.octets();
        if o[0] != 10 || o[1] != 77 {
            bail!("the lab subnet must lie inside 10.77.0.0/16 (got {s})");
        }
        Ok(Subnet([o[0], o[1], o[2]]))
    }
    pub fn addr(&self, host: u8) -> String {
        format!("{}.{}.{}.{host}", self.0[0], self.0[1], self.0[2])
    }
    pub fn cidr(&self) -> String {
        format!("{}/24", self.addr(0))
    }
}

pub const BLACKHOLE_METRIC: &str = "4242";

pub fn add_blackhole(subnet: &Subnet) -> Result<()> {
    let cidr = subnet.cidr();
    let existing = sh("ip", &["route", "show", "type", "blackhole"])?;
    if !existing.lines().any(|l| l.contains(&cidr)) {
        sh(
            "ip",
            &[
                "route",
                "add",
                "blackhole",
                &cidr,
                "metric",
                BLACKHOLE_METRIC,
            ],
        )?;
    }
    Ok(())
}

pub fn del_blackhole(subnet: &Subnet) {
    sh_quiet(
        "ip",
        &[
            "route",
            "del",
            "blackhole",
            &subnet.cidr(),
            "metric",
            BLACKHOLE_METRIC,
        ],
    );
}

pub fn add_bridge(bridge: &str, subnet: &Subnet) -> Result<()> {
    sh("ip", &["link", "add", bridge, "type", "bridge"])?;
    sh(
        "ip",
        &[
            "addr",
            "add",
            &format!("{}/24", subnet.addr(1)),
            "dev",
            bridge,
        ],
    )?;
    sh("ip", &["link", "set", bridge, "up"])?;
    Ok(())
}

/// Creates a host: its namespace, a veth pair (host side on the bridge, `eth0` inside), its
/// address. No default route inside: a host reaches only the lab subnet.
pub fn add_host(netns: &str, veth: &str, bridge: &str, addr: &str) -> Result<()> {
    let peer = format!("{veth}p");
    sh("ip", &["netns", "add", netns])?;
    sh(
        "ip",
        &["link", "add", veth, "type", "veth", "peer", "name", &peer],
    )?;
    sh("ip", &["link", "set", &peer, "netns", netns])?;
    sh("ip", &["link", "set", veth, "master", bridge, "up"])?;
    sh("ip", &["-n", netns, "link", "set", "lo", "up"])?;
    sh("ip", &["-n", netns, "link", "set", &peer, "name", "eth0"])?;
    sh(
        "ip",
        &[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ],
    )?;
    sh("ip", &["-n", netns, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// Removes every IPv4 address of the host's `eth0` but its own: what a powered-off host
/// loses (a VIP it carried does not survive a stop).
pub fn drop_extra_addrs(netns: &str, own: &str) {
    let Ok(out) = sh(
        "ip",
        &["-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"],
    ) else {
        return;
    };
    for line in out.lines() {
        let Some(cidr) = line.split_whitespace().skip_while(|w| *w != "inet").nth(1) else {
            continue;
        };
        if cidr.split('/').next() != Some(own) {
            sh_quiet("ip", &["-n", netns, "addr", "del", cidr, "dev", "eth0"]);
        }
    }
}

pub fn del_host(netns: &str, veth: &str) {
    // The veth goes first, or the namespace name can linger for minutes.
    sh_quiet("ip", &["link", "del", veth]);
    sh_quiet("ip", &["netns", "del", netns]);
}

pub fn set_link(veth: &str, up: bool) -> Result<()> {
    sh("ip", &["link", "set", veth, if up { "up" } else { "down" }])?;
    Ok(())
}

/// PIDs of every process inside a namespace.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    sh("ip", &["netns", "pids", netns])
        .map(|o| o.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

const PARTITION: &str = "table netdev pgwarden_lab_partition {
  chain in { type filter hook ingress device \"eth0\" priority -500; policy drop; }
  chain out { type filter hook egress device \"eth0\" priority -500; policy drop; }
}
";

/// Cuts a host off: every frame in and out of its `eth0` is dropped, ARP included. Its own
/// loopback keeps working.
pub fn partition(netns: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("run nft (is the nftables package installed?)")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(PARTITION.as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("nft failed to install the partition in {netns}");
    }
    Ok(())
}

pub fn heal(netns: &str) {
    sh_quiet(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "nft",
            "delete",
            "table",
            "netdev",
            "pgwarden_lab_partition",
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.77.3.0/24").unwrap();
        assert_eq!(s.addr(11), "10.77.3.11");
        assert_eq!(s.cidr(), "10.77.3.0/24");
        assert!(
            Subnet::parse("192.168.1.0/24").is_err(),
            "only 10.77.0.0/16"
        );
        assert!(Subnet::parse("10.77.0.0/16").is_err());
        assert!(Subnet::parse("10.77.x.0/24").is_err());
    }
}
