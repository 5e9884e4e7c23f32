//! Limits on what strangers can make the node hold or compute, before any login.
//!
//! - [`Connections`]: open TCP connections per listener, in total and per client IP
//!   (HTTP, RTMP and ICE-TCP each have one). A connection over either limit is closed
//!   at accept, counted in `weir_connections_refused_total{listener,reason}`.
//! - [`FailedJoins`]: a client IP whose credentials failed to verify too often in a
//!   window is refused before the next verification (each costs an ECDSA verify),
//!   until the window passes. IPs that only send valid credentials are never slowed,
//!   so a crowd behind one enterprise NAT joins as fast as it likes.
//!
//! - [`TrustedProxies`]: reverse proxies (a load balancer, an ingress, the TLS proxy in
//!   front of RTMP) that carry many clients on one address. They are not held to the
//!   per-IP connection limit, and on HTTP the client behind them is the one their
//!   `X-Forwarded-For` names, so per-client limits count clients, not the proxy.
//!
//! Both are bounded in memory: an entry per IP that holds a connection or failed
//! recently, and at most `MAX_TRACKED_IPS` of the latter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Who a client is, for per-client limits: its IPv4 address, or its IPv6 /64 (one
/// host owns a whole /64, and would otherwise have 2^64 fresh addresses).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// The reverse proxies a deployment puts in front of Weir (`trusted_proxies`: addresses
/// or networks, `10.0.0.0/8`, `127.0.0.1`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("trusted_proxies: {s:?} is not an address or a network"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client a request from `peer` comes from: `peer` itself, unless it is a
    /// trusted proxy; then the nearest address in `X-Forwarded-For` (its values in
    /// order, read from the right) that is not a trusted proxy. Anything unreadable on
    /// the way stops the walk at the last proxy: a client can prepend what it likes to
    /// the header, but cannot make a trusted proxy append it.
    pub fn client(&self, peer: IpAddr, forwarded_for: &[&str]) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = forwarded_for
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.into_iter().rev().take(32) {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = ip;
            if !self.contains(ip) {
                return ip;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, with or without a port (`[v6]:port`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Open connections of one listener.
pub struct Connections {
    listener: &'static str,
    max_total: usize,
    max_per_ip: usize,
    /// Proxies carry many clients: held to the total only.
    proxies: TrustedProxies,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// An accepted connection's place; dropping it frees the place.
pub struct ConnectionPermit {
    owner: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    pub fn new(
        listener: &'static str,
        max_total: usize,
        max_per_ip: usize,
        proxies: TrustedProxies,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let _ = metrics.connections.with_label_values(&[listener]);
        Arc::new(Self {
            listener,
            max_total,
            max_per_ip,
            proxies,
            open: Mutex::new((0, HashMap::new())),
            metrics,
        })
    }

    /// A place for a connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, &'static str> {
        let proxy = self.proxies.contains(ip);
        let ip = client_key(ip);
        let mut open = self.open.lock().expect("connections lock");
        let refused = if open.0 >= self.max_total {
            Some("total")
        } else if !proxy && open.1.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            Some("per_ip")
        } else {
            None
        };
        if let Some(reason) = refused {
            self.metrics
                .connections_refused
                .with_label_values(&[self.listener, reason])
                .inc();
            return Err(reason);
        }
        open.0 += 1;
        *open.1.entry(ip).or_default() += 1;
        self.metrics
            .connections
            .with_label_values(&[self.listener])
            .inc();
        Ok(ConnectionPermit {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().expect("connections lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
        self.owner
            .metrics
            .connections
            .with_label_values(&[self.owner.listener])
            .dec();
    }
}

/// Client IPs tracked for failed joins at most; past that the oldest windows go.
pub const MAX_TRACKED_IPS: usize = 100_000;

/// Failed credential checks per client IP in fixed windows (sans-I/O: the caller
/// passes the time).
pub struct FailedJoins {
    max_failures: u32,
    window_ms: u64,
    by_ip: HashMap<IpAddr, (u64, u32)>,
}

impl FailedJoins {
    pub fn new(max_failures: u32, window_ms: u64) -> Self {
        Self {
            max_failures,
            window_ms,
            by_ip: HashMap::new(),
        }
    }

    /// Whether `ip` may have its credentials checked now; if not, the seconds until
    /// it may.
    pub fn check(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        let ip = client_key(ip);
        if self.max_failures == 0 {
            return Ok(());
        }
        match self.by_ip.get(&ip) {
            Some(&(start, n)) if now_ms < start + self.window_ms && n >= self.max_failures => {
                Err((start + self.window_ms - now_ms).div_ceil(1000))
            }
            _ => Ok(()),
        }
    }

    /// `ip`'s credentials failed to verify at `now_ms`.
    pub fn failed(&mut self, ip: IpAddr, now_ms: u64) {
        let ip = client_key(ip);
        if self.max_failures == 0 {
            return;
        }
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= MAX_TRACKED_IPS {
            let window = self.window_ms;
            self.by_ip.retain(|_, (start, _)| now_ms < *start + window);
            if self.by_ip.len() >= MAX_TRACKED_IPS {
                // Every entry is live (a flood from many addresses): start afresh, so
                // the cost stays linear overall rather than a scan per failure.
                self.by_ip.clear();
            }
        }
        let e = self.by_ip.entry(ip).or_insert((now_ms, 0));
        if now_ms >= e.0 + self.window_ms {
            *e = (now_ms, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn connections_are_limited_in_total_and_per_ip_and_freed_on_drop() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let c = Connections::new("http", 3, 2, TrustedProxies::default(), metrics.clone());
        let a1 = c.admit(ip(1)).unwrap();
        let _a2 = c.admit(ip(1)).unwrap();
        assert_eq!(c.admit(ip(1)).err(), Some("per_ip"));
        let _b1 = c.admit(ip(2)).unwrap();
        assert_eq!(c.admit(ip(3)).err(), Some("total"));
        drop(a1);
        let _c1 = c.admit(ip(3)).unwrap();
        let text = metrics.render();
        assert!(
            text.contains("weir_connections{listener=\"http\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weir_connections_refused_total{listener=\"http\",reason=\"per_ip\"} 1")
        );
    }

    #[test]
    fn an_ip_that_keeps_failing_waits_for_its_window_and_others_do_not() {
        let mut f = FailedJoins::new(3, 10_000);
        for t in 0..3 {
            assert_eq!(f.check(ip(1), t), Ok(()));
            f.failed(ip(1), t);
        }
        assert_eq!(f.check(ip(1), 100), Err(10));
        assert_eq!(f.check(ip(1), 9_001), Err(1));
        assert_eq!(f.check(ip(2), 100), Ok(()));
        assert_eq!(f.check(ip(1), 10_000), Ok(()));
        f.failed(ip(1), 10_000);
        assert_eq!(f.check(ip(1), 10_001), Ok(()), "a new window");
    }

    /// Behind trusted proxies the client is the nearest untrusted address of
    /// `X-Forwarded-For`; what a client writes there itself counts for nothing past
    /// that, and a stranger's header is not read at all.
    #[test]
    fn the_client_behind_trusted_proxies_is_the_nearest_untrusted_hop() {
        let p = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.1".into()]).unwrap();
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        let lb = ip(5);
        // Not through a proxy: the header is ignored.
        assert_eq!(p.client(client, &["198.51.100.1"]), client);
        // Through one proxy, and through two (an ingress behind a load balancer).
        assert_eq!(p.client(lb, &["203.0.113.9"]), client);
        assert_eq!(p.client(lb, &["203.0.113.9, 192.0.2.1"]), client);
        assert_eq!(p.client(lb, &["203.0.113.9", "192.0.2.1"]), client);
        // A forged left part is not believed past the first untrusted hop.
        assert_eq!(p.client(lb, &["1.2.3.4, 203.0.113.9"]), client);
        // Ports and brackets; garbage stops the walk at the last proxy.
        assert_eq!(p.client(lb, &["203.0.113.9:5555"]), client);
        assert_eq!(
            p.client(lb, &["[2001:db8::7]"]),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(p.client(lb, &["nonsense"]), lb);
        assert_eq!(p.client(lb, &[]), lb);
        assert!(TrustedProxies::parse(&["not/an/ip".into()]).is_err());
        // A proxy is held to the total of connections, not to the per-IP limit.
        let c = Connections::new("http", 4, 1, p, Arc::new(crate::metrics::Metrics::new()));
        let _a = c.admit(lb).unwrap();
        let _b = c.admit(lb).unwrap();
        let _c = c.admit(client).unwrap();
        assert_eq!(c.admit(client).err(), Some("per_ip"));
    }

    #[test]
    fn an_ipv6_host_is_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), ip(1));
    }

    #[test]
    fn failed_joins_track_a_bounded_number_of_ips() {
        let mut f = FailedJoins::new(1, 10_000);
        for n in 0..(MAX_TRACKED_IPS as u32 + 10) {
            f.failed(IpAddr::from(n.to_be_bytes()), 0);
        }
        assert!(f.by_ip.len() <= MAX_TRACKED_IPS);
    }
}
