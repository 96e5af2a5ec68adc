//! The outgoing HTTP client: rustls, keep-alive pooling, no redirects, and the SSRF guard.
//!
//! The guard lives in the DNS resolver so that the address checked is the address connected
//! to: a hostname is resolved once, non-global addresses are removed, and the connector gets
//! only what passed. A DNS answer that changes between check and connect (rebinding) cannot
//! slip past because there is no second lookup. IP-literal URLs never reach a resolver, so
//! they are checked before the request is built.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a destination was refused. The message leaves the addresses out: it is shown to
/// whoever can read deliveries or test an endpoint (a tenant, perhaps), and a refused name's
/// addresses would map the private network for them; courier's log has them.
#[derive(Debug, thiserror::Error)]
#[error(
    "destination {host} is not a public address (or resolves only to non-public ones); set delivery.allow_private_networks = true to allow it"
)]
pub struct SsrfBlocked {
    pub host: String,
}

/// A hostname that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {reason}")]
pub struct DnsFailed {
    pub host: String,
    pub reason: String,
}

struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> Box<dyn StdError + Send + Sync> {
                    Box::new(DnsFailed {
                        host: host.clone(),
                        reason: e.to_string(),
                    })
                })?
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(DnsFailed {
                    host,
                    reason: "no addresses".into(),
                }) as Box<dyn StdError + Send + Sync>);
            }
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                let list = addrs
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::warn!(%host, addresses = %list, "delivery refused: the destination resolves only to non-public addresses");
                return Err(Box::new(SsrfBlocked { host }) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The delivery client with the SSRF setting its resolver was built with: one value, so
/// that an attempt checks an IP-literal URL (which bypasses the resolver) by the same setting
/// its name lookups use, even as a reload swaps in a client with the other one.
pub struct Outbound {
    pub http: reqwest::Client,
    pub allow_private_networks: bool,
}

/// Builds the delivery client for `[delivery]`'s settings.
pub fn build(delivery: &crate::config::DeliveryConfig) -> Outbound {
    let allow_private_networks = delivery.allow_private_networks;
    Outbound {
        http: http(allow_private_networks, delivery.connect_timeout),
        allow_private_networks,
    }
}

fn http(allow_private_networks: bool, connect_timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private: allow_private_networks,
        }))
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .expect("the delivery client configuration is valid")
}

/// Checks an IP-literal URL host (which bypasses the resolver).
pub fn check_literal(url: &url::Url, allow_private: bool) -> Result<(), SsrfBlocked> {
    if allow_private {
        return Ok(());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return Ok(()),
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(SsrfBlocked {
            host: url.host_str().unwrap_or_default().to_string(),
        })
    }
}

/// Whether an address is globally routable (not loopback, private, link-local, multicast,
/// unspecified, documentation, shared, reserved, …), looking through IPv4-mapped, NAT64 and
/// 6to4 IPv6 forms to the IPv4 address inside.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0                                  // 0.0.0.0/8 "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64)       // 100.64.0.0/10 shared (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)    // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18)       // 198.18.0.0/15 benchmarking
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)  // 192.88.99.0/24 6to4 relay (deprecated)
        || o == [168, 63, 129, 16]                    // Azure's platform endpoint (wireserver)
        || o[0] >= 240) // 240.0.0.0/4 reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_public_v4(v4);
    }
    // IPv4-translated ::ffff:0:0/96 (SIIT) embeds one in its last 32 bits too.
    if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return is_public_v4(v4);
    }
    // 6to4 2002::/16 embeds an IPv4 address in the next 32 bits.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00              // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80              // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0              // fec0::/10 site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8)     // 2001:db8::/32 documentation
        || (s[0] == 0x3fff && (s[1] & 0xf000) == 0) // 3fff::/20 documentation
        || s[0] == 0x5f00                         // 5f00::/16 segment routing SIDs
        || (s[0] == 0x2001 && s[1] == 0)          // 2001::/32 Teredo
        || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0) // 2001:2::/48 benchmarking
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x10) // 2001:10::/28 ORCHID (deprecated)
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48 local-use NAT64
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64 discard
        || s[0..6] == [0, 0, 0, 0, 0, 0]) // ::/96 IPv4-compatible (deprecated)
}

/// The error class of a failed request: `timeout`, `ssrf_blocked`, `dns`, `tls`, `connect`,
/// `request`. Stored in the audit trail and used as a metric label.
pub fn classify(err: &reqwest::Error) -> &'static str {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    let mut text = String::new();
    while let Some(e) = source {
        if e.is::<SsrfBlocked>() {
            return "ssrf_blocked";
        }
        if e.is::<DnsFailed>() {
            return "dns";
        }
        // Not the outermost error's text: it names the URL, whose path may say anything
        // (`/tls-hooks`).
        if !std::ptr::addr_eq(e, err) {
            text.push_str(&e.to_string().to_ascii_lowercase());
            text.push(' ');
        }
        source = e.source();
    }
    if err.is_timeout() && err.is_connect() {
        // No connection (TLS handshake included) within `connect_timeout`: the receiver was
        // not reached.
        "connect"
    } else if err.is_timeout() {
        "timeout"
    } else if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
        "tls"
    } else if err.is_connect() {
        "connect"
    } else {
        "request"
    }
}

/// The whole error chain as one line, for the audit trail.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class comes from what failed, not from the URL: a refused connection is
    /// `connect` whatever words the path holds.
    #[tokio::test]
    async fn a_refused_connection_is_connect_whatever_the_url_says() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut delivery = crate::config::Config::defaults().delivery;
        delivery.allow_private_networks = true;
        let client = build(&delivery).http;
        for path in ["/hooks", "/tls-handshake/certificate"] {
            let err = client
                .post(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap_err();
            assert_eq!(classify(&err), "connect", "{path}: {}", describe(&err));
        }
    }

    #[test]
    fn non_global_addresses_are_refused() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "64:ff9b:1::a00:1",
            "192.88.99.1",
            "::ffff:0:7f00:1",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "3fff::1",
            "3fff:fff::1",
            "5f00::1",
            "2001:2::1",
            "2001:10::1",
            "2001:1f::1",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad} should be refused");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "168.63.129.17",
            "2001:2:1::1",
            "2001:20::1",
            "3ffe::1",
            "2a00:1450::1",
        ] {
            assert!(is_public(good.parse().unwrap()), "{good} should be allowed");
        }
    }

    #[test]
    fn literal_hosts_are_checked() {
        let u = url::Url::parse("http://127.0.0.1:9/x").unwrap();
        assert!(check_literal(&u, false).is_err());
        assert!(check_literal(&u, true).is_ok());
        let u = url::Url::parse("http://[::ffff:7f00:1]/x").unwrap();
        assert!(check_literal(&u, false).is_err());
        let u = url::Url::parse("https://example.com/x").unwrap();
        assert!(check_literal(&u, false).is_ok());
    }
}
