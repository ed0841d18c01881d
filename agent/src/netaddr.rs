//! Addresses on local interfaces over netlink (what `ip addr add/del/show` do), and gratuitous
//! ARP over a raw packet socket so that neighbours and switches learn the new owner of a moved
//! address at once instead of after their ARP cache times out.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use std::net::{IpAddr, Ipv4Addr};

/// A netlink connection to the kernel's routing subsystem of this network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

/// An interface: its index and hardware address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

impl Netlink {
    /// Opens the connection; its I/O runs as a task of the current tokio runtime.
    pub fn open() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("open a netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Link> {
        let msg = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .with_context(|| format!("look up interface {name}"))?
            .ok_or_else(|| anyhow!("no interface {name}"))?;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) if b.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(b);
                    Some(m)
                }
                _ => None,
            })
            .unwrap_or([0; 6]);
        Ok(Link {
            index: msg.header.index,
            mac,
        })
    }

    /// The entries of `ip` on interface `index` (`ip addr show dev … to …`).
    async fn entries(&self, index: u32, ip: Ipv4Addr) -> Result<Vec<AddressMessage>> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(ip))
            .execute()
            .try_collect()
            .await
            .context("list addresses")
    }

    /// The prefix length `ip` has on interface `index`, if it is there.
    pub async fn find(&self, index: u32, ip: Ipv4Addr) -> Result<Option<u8>> {
        Ok(self
            .entries(index, ip)
            .await?
            .first()
            .map(|m| m.header.prefix_len))
    }

    /// Adds `ip/prefix` (with an optional label) to interface `index`. Returns false when it
    /// was already there.
    pub async fn add(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
        label: Option<&str>,
    ) -> Result<bool> {
        if self.find(index, ip).await?.is_some() {
            return Ok(false);
        }
        let mut req = self.handle.address().add(index, IpAddr::V4(ip), prefix);
        if let Some(l) = label {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Label(l.to_string()));
        }
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(false),
            Err(e) => Err(anyhow!("add {ip}/{prefix}: {e}")),
        }
    }

    /// Removes `ip` from interface `index`. Returns false when it was not there.
    pub async fn remove(&self, index: u32, ip: Ipv4Addr) -> Result<bool> {
        let mut removed = false;
        for m in self.entries(index, ip).await? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => removed = true,
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
                Err(e) => bail!("remove {ip}: {e}"),
            }
        }
        Ok(removed)
    }
}

/// A gratuitous ARP request for `ip` from `mac`: "who has ip? tell ip", broadcast.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero; target protocol address = sender's
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends `count` gratuitous ARP requests for `ip` on interface `link`, 100 ms apart (the
/// first at once).
pub async fn announce(link: &Link, ip: Ipv4Addr, count: u32) -> Result<()> {
    let frame = garp_frame(link.mac, ip);
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        send_frame(link.index, &frame)?;
    }
    Ok(())
}

/// Sends one Ethernet frame on interface `index` through an AF_PACKET socket.
#[allow(unsafe_code)]
fn send_frame(index: u32, frame: &[u8]) -> Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2) call; the descriptor is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as libc::c_int) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("open a packet socket (needs CAP_NET_RAW)");
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value that we then fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the buffer and the address outlive the call; the lengths are theirs.
    let rc = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is the descriptor opened above and not used after this.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err).context("send a gratuitous ARP");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 7];
        let f = garp_frame(mac, Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[10, 77, 0, 100]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 77, 0, 100]);
    }
}
