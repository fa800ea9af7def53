//! Who the client is: the socket peer, or, behind trusted proxies (a CDN, a load balancer),
//! the address they report in `X-Forwarded-For`. Never what an untrusted client claims.

use std::net::IpAddr;

/// A network in CIDR form, for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (address, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| ())?)),
            None => (s, None),
        };
        let network: IpAddr = address.parse().map_err(|_| ())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max)
            .then_some(Cidr { network, prefix })
            .ok_or(())
    }
}

impl Cidr {
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)),
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.network.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            return true;
        }
        let shift = width - u32::from(self.prefix);
        bits(self.network) >> shift == bits(ip) >> shift
    }
}

/// The client's address: the socket peer, unless the peer is a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub(crate) fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let chain: Vec<IpAddr> = forwarded_for
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.trim().parse().ok())
        .collect();
    Some(
        chain
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(*ip))
            .unwrap_or(peer),
    )
}

/// The `X-Forwarded-For` to send upstream: the incoming chain plus the peer when the peer is
/// a trusted proxy; just the peer otherwise, so a client cannot plant addresses.
pub(crate) fn forwarded_for(peer: IpAddr, incoming: Option<&str>, trusted: &[Cidr]) -> String {
    match incoming {
        Some(chain) if trusted.iter().any(|c| c.contains(peer)) => format!("{chain}, {peer}"),
        _ => peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_membership() {
        let net: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(net.contains(ip("10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        let one: Cidr = "127.0.0.1".parse().expect("cidr");
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/8"
            .parse::<Cidr>()
            .expect("v6")
            .contains(ip("fd12::1")));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        // A direct client cannot claim another address.
        assert_eq!(
            client_ip(Some(ip("203.0.113.9")), Some("1.2.3.4"), &trusted),
            Some(ip("203.0.113.9"))
        );
        // Through a trusted proxy: the right-most untrusted entry.
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.5")),
                Some("1.2.3.4, 198.51.100.7, 10.0.0.9"),
                &trusted
            ),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), None, &trusted),
            Some(ip("10.0.0.5"))
        );
    }

    #[test]
    fn forwarded_for_chain() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        assert_eq!(
            forwarded_for(ip("203.0.113.9"), Some("1.2.3.4"), &trusted),
            "203.0.113.9"
        );
        assert_eq!(
            forwarded_for(ip("10.0.0.5"), Some("1.2.3.4"), &trusted),
            "1.2.3.4, 10.0.0.5"
        );
        assert_eq!(forwarded_for(ip("10.0.0.5"), None, &trusted), "10.0.0.5");
    }
}
