//! Which peers a relay sends to. A TURN relay that forwards to any address lets anyone
//! with credentials reach what sits behind it: its own loopback services, the private
//! network it runs in, cloud metadata on link-local addresses (coturn's
//! CVE-2020-26262 class). So loopback, private, link-local, shared, multicast and
//! reserved addresses, and the node's own addresses, are refused unless an allow-list
//! names them (tests allow loopback). The node's own addresses are the exception the
//! relay needs: two users of one cluster talk relayed address to relayed address, so
//! the node's own addresses are allowed on its relay ports, and refused on every other
//! port (its XMPP, HTTPS and link services), whatever the allow-list says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

/// The relay's rule for peer addresses.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// Blocks allowed even though they are refused by default.
    pub allow: Vec<Cidr>,
    /// This node's own addresses (its listeners, its external address): allowed on
    /// the relay ports only.
    pub own: Vec<IpAddr>,
    /// The relay ports (none: no port of the node's own addresses is allowed).
    pub relay_ports: Option<std::ops::RangeInclusive<u16>>,
}

impl PeerPolicy {
    /// Whether a permission may be installed for `ip` (permissions are per address;
    /// the port is checked by [`PeerPolicy::allows_addr`] for each packet).
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        if self.is_own(ip) {
            return self.relay_ports.is_some();
        }
        self.allow.iter().any(|c| c.contains(ip)) || !special(ip)
    }

    /// Whether a packet may go to `addr`: the node's own addresses on relay ports
    /// only (never its services, even inside an allowed block), others by
    /// [`PeerPolicy::allows`].
    pub fn allows_addr(&self, addr: std::net::SocketAddr) -> bool {
        let ip = unmapped(addr.ip());
        if self.is_own(ip) {
            return self
                .relay_ports
                .as_ref()
                .is_some_and(|r| r.contains(&addr.port()));
        }
        self.allows(ip)
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        self.own.iter().any(|o| unmapped(*o) == ip)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses no relay should send to unless told.
fn special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            const BLOCKS: &[(Ipv4Addr, u8)] = &[
                (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network"
                (Ipv4Addr::new(10, 0, 0, 0), 8),     // private
                (Ipv4Addr::new(100, 64, 0, 0), 10),  // shared (carrier NAT)
                (Ipv4Addr::new(127, 0, 0, 0), 8),    // loopback
                (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
                (Ipv4Addr::new(172, 16, 0, 0), 12),  // private
                (Ipv4Addr::new(192, 0, 0, 0), 24),   // protocol assignments
                (Ipv4Addr::new(192, 168, 0, 0), 16), // private
                (Ipv4Addr::new(198, 18, 0, 0), 15),  // benchmarking
                (Ipv4Addr::new(224, 0, 0, 0), 4),    // multicast
                (Ipv4Addr::new(240, 0, 0, 0), 4),    // reserved, broadcast
            ];
            BLOCKS.iter().any(|(net, prefix)| {
                Cidr {
                    addr: IpAddr::V4(*net),
                    prefix: *prefix,
                }
                .contains(IpAddr::V4(ip))
            })
        }
        IpAddr::V6(ip) => {
            const BLOCKS: &[(Ipv6Addr, u8)] = &[
                (Ipv6Addr::UNSPECIFIED, 128),
                (Ipv6Addr::LOCALHOST, 128),
                (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64: an IPv4 inside
                (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),     // unique local
                (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),    // link-local
                (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),     // multicast
            ];
            BLOCKS.iter().any(|(net, prefix)| {
                Cidr {
                    addr: IpAddr::V6(*net),
                    prefix: *prefix,
                }
                .contains(IpAddr::V6(ip))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_refused_unless_allowed() {
        let p = PeerPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!p.allows(ip(refused)), "{refused} should be refused");
        }
        for allowed in [
            "198.51.100.7",
            "8.8.8.8",
            "172.32.0.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.allows(ip(allowed)), "{allowed} should be allowed");
        }
        let loopback = PeerPolicy {
            allow: vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            own: vec![ip("198.51.100.7"), ip("10.0.0.5")],
            relay_ports: Some(49152..=65535),
        };
        assert!(loopback.allows(ip("127.0.0.2")));
        assert!(loopback.allows(ip("::1")));
        assert!(loopback.allows(ip("10.0.0.1")));
        assert!(!loopback.allows(ip("192.168.0.1")));
        // The node's own addresses: its relay ports (two users of one relay), never
        // its services, also inside an allowed block.
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(loopback.allows(ip("10.0.0.5")));
        assert!(loopback.allows_addr(at("10.0.0.5:50000")));
        assert!(!loopback.allows_addr(at("10.0.0.5:5222")));
        assert!(!loopback.allows_addr(at("198.51.100.7:8443")));
        assert!(loopback.allows_addr(at("198.51.100.7:65535")));
        assert!(loopback.allows_addr(at("10.0.0.1:5222")));
        let no_ports = PeerPolicy {
            own: vec![ip("198.51.100.7")],
            ..PeerPolicy::default()
        };
        assert!(!no_ports.allows(ip("198.51.100.7")));
    }

    #[test]
    fn blocks_parse() {
        assert!(
            "10.0.0.0/8"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("10.255.0.1"))
        );
        assert!(
            !"10.0.0.0/8"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("11.0.0.1"))
        );
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("1.2.3.4")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001:db8::1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }
}
