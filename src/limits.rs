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
//! Both are bounded in memory: an entry per IP that holds a connection or failed
//! recently, and at most `MAX_TRACKED_IPS` of the latter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Who a client is, for per-client limits: its IPv4 address, or its IPv6 /64 (one
/// host owns a whole /64, and would otherwise have 2^64 fresh addresses).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Open connections of one listener.
pub struct Connections {
    listener: &'static str,
    max_total: usize,
    max_per_ip: usize,
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
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let _ = metrics.connections.with_label_values(&[listener]);
        Arc::new(Self {
            listener,
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
            metrics,
        })
    }

    /// A place for a connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, &'static str> {
        let ip = client_key(ip);
        let mut open = self.open.lock().expect("connections lock");
        let refused = if open.0 >= self.max_total {
            Some("total")
        } else if open.1.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
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
        let c = Connections::new("http", 3, 2, metrics.clone());
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
