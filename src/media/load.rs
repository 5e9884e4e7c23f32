//! How loaded the media plane is: the share of each second it spends working rather
//! than waiting, and datagrams the kernel dropped because it did not read them in
//! time. A node past its capacity must refuse new load, not let every member's media
//! degrade (nor have its own lateness read as the subscribers' congestion).
//!
//! Sans-I/O: the loop reports how long it worked, how much of that was setting
//! connections up, and, once a second, the socket's drop counter; [`Load::judge`] says
//! when the node becomes or stops being overloaded.
//!
//! Setting a connection up (its offer and answer, ICE checks and the DTLS handshake)
//! is work a member costs once, when it joins; carrying its media is what it costs
//! for the rest of the call. A join storm (a class of several hundred starting
//! together) is mostly the first kind: judged on all work, its handshakes alone could
//! read as overload, and the joins after them were refused although the node carries
//! the whole class once it is in (`tests/capacity.rs`: a storm of 30 joins one after
//! another was refused from its first busy second; the load bench at 480 lean
//! subscribers tripped the old judge at 90 % during the storm). So the verdict reads
//! the busy share *without* setup work; setup still shows in what is published
//! (`weir_media_worker_setup_percent`), and a node too busy to read its socket (drops)
//! is overloaded whatever the work was.

use std::time::{Duration, Instant};

/// How often the load is judged.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Percentage points under the threshold the busy share must fall to before an
/// overloaded node takes joins again (no flapping at the edge).
const HYSTERESIS: f64 = 15.0;

/// One second's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// All work, as a share of the window.
    pub busy_percent: f64,
    /// Of which setting connections up.
    pub setup_percent: f64,
    /// Datagrams dropped since the last judgement.
    pub drops: u64,
    /// `Some(state)` when the node became (true) or stopped being (false) overloaded.
    pub changed: Option<bool>,
}

#[derive(Debug)]
pub struct Load {
    /// Percent of a second above which the node is overloaded (0: never).
    threshold: f64,
    since: Instant,
    busy: Duration,
    setup: Duration,
    drops: Option<u64>,
    overloaded: bool,
}

impl Load {
    pub fn new(threshold_percent: u8, now: Instant) -> Self {
        Self {
            threshold: f64::from(threshold_percent.min(100)),
            since: now,
            busy: Duration::ZERO,
            setup: Duration::ZERO,
            drops: None,
            overloaded: false,
        }
    }

    /// The loop worked from `from` to `to` (not waiting for input).
    pub fn worked(&mut self, from: Instant, to: Instant) {
        self.busy += to.saturating_duration_since(from);
    }

    /// Of the work reported to [`worked`](Self::worked), `took` went to setting a
    /// connection up (a handshake datagram, an offer or answer).
    pub fn setup(&mut self, took: Duration) {
        self.setup += took;
    }

    /// Whether a judgement is due (then read the drop counter and call `judge`).
    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= WINDOW
    }

    #[cfg(test)]
    fn overloaded(&self) -> bool {
        self.overloaded
    }

    /// Closes the window: how busy it was, drops since the last reading of the socket's
    /// cumulative counter `drops_total` (None: not known), and whether the overload
    /// state changed. Overloaded: busy carrying media (all work but setup) at or over
    /// the threshold, or dropping datagrams while at least half as busy in all;
    /// no longer: busy carrying media under the threshold by the hysteresis, with no
    /// drops.
    pub fn judge(&mut self, now: Instant, drops_total: Option<u64>) -> Judgement {
        let elapsed = now
            .saturating_duration_since(self.since)
            .max(Duration::from_millis(1));
        let share = |d: Duration| (100.0 * d.as_secs_f64() / elapsed.as_secs_f64()).min(100.0);
        let busy_percent = share(self.busy);
        let setup_percent = share(self.setup.min(self.busy));
        let carrying = busy_percent - setup_percent;
        let drops = match (self.drops, drops_total) {
            (Some(before), Some(total)) => total.saturating_sub(before),
            _ => 0,
        };
        if drops_total.is_some() {
            self.drops = drops_total;
        }
        self.since = now;
        self.busy = Duration::ZERO;
        self.setup = Duration::ZERO;
        let mut changed = None;
        if self.threshold > 0.0 {
            let over =
                carrying >= self.threshold || (drops > 0 && busy_percent >= self.threshold / 2.0);
            let clear = carrying < self.threshold - HYSTERESIS && drops == 0;
            if !self.overloaded && over {
                self.overloaded = true;
                changed = Some(true);
            } else if self.overloaded && clear {
                self.overloaded = false;
                changed = Some(false);
            }
        }
        Judgement {
            busy_percent,
            setup_percent,
            drops,
            changed,
        }
    }
}

/// The kernel's drop counter of the UDP socket bound to `port` (IPv6 sockets in
/// /proc/net/udp6), Linux only.
pub fn udp_socket_drops(port: u16, v6: bool) -> Option<u64> {
    let table = std::fs::read_to_string(if v6 {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    })
    .ok()?;
    parse_udp_drops(&table, port)
}

/// How many UDP sockets the kernel has bound to `addr` (None: no table to read).
pub fn udp_sockets_at(addr: std::net::SocketAddr) -> Option<usize> {
    let table = std::fs::read_to_string(if addr.is_ipv6() {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    })
    .ok()?;
    Some(count_udp_sockets(&table, addr))
}

/// One row of a /proc/net/udp table: local address and port (hex, as written), and
/// the socket's drop counter.
struct UdpRow<'a> {
    ip: &'a str,
    port: &'a str,
    drops: Option<u64>,
}

/// The rows of a table, each socket once. The kernel writes the table in chunks
/// while sockets come and go, so a read can list a socket twice (and miss another):
/// a row whose inode was already seen is the same socket again. (Counted twice, a
/// group's own socket read as another process's, and a node starting while others
/// bound and closed sockets refused to start.)
fn udp_rows(table: &str) -> impl Iterator<Item = UdpRow<'_>> {
    let mut seen = std::collections::HashSet::new();
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ip, port) = fields.get(1)?.rsplit_once(':')?;
        let inode = *fields.get(9)?;
        seen.insert(inode).then(|| UdpRow {
            ip,
            port,
            drops: fields.last().and_then(|d| d.parse().ok()),
        })
    })
}

/// The sockets of a /proc/net/udp table bound to `addr` (IPv4 by address and port;
/// IPv6 by port).
fn count_udp_sockets(table: &str, addr: std::net::SocketAddr) -> usize {
    let port = format!("{:04X}", addr.port());
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => Some(format!("{:08X}", u32::from_le_bytes(v4.octets()))),
        std::net::IpAddr::V6(_) => None,
    };
    udp_rows(table)
        .filter(|r| r.port == port && ip.as_deref().is_none_or(|ip| ip == r.ip))
        .count()
}

/// The `drops` column summed over the sockets whose local port is `port` in a
/// /proc/net/udp table (the media workers' sockets share the port).
fn parse_udp_drops(table: &str, port: u16) -> Option<u64> {
    let want = format!("{port:04X}");
    let mut rows = udp_rows(table)
        .filter(|r| r.port == want)
        .filter_map(|r| r.drops);
    let first = rows.next()?;
    Some(first + rows.sum::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(load: &mut Load, at: Instant, busy_ms: u64, drops: Option<u64>) -> Judgement {
        load.worked(at, at + Duration::from_millis(busy_ms));
        load.judge(at + WINDOW, drops)
    }

    #[test]
    fn a_node_busy_past_the_threshold_is_overloaded_until_it_is_well_under() {
        let t = Instant::now();
        let mut load = Load::new(90, t);
        let j = second(&mut load, t, 500, None);
        assert_eq!(j.changed, None);
        assert!((j.busy_percent - 50.0).abs() < 0.5, "{j:?}");
        let j = second(&mut load, t + WINDOW, 950, None);
        assert_eq!(j.changed, Some(true));
        assert!(load.overloaded());
        // 80 % is under the threshold but within the hysteresis: still overloaded.
        let j = second(&mut load, t + WINDOW * 2, 800, None);
        assert_eq!(j.changed, None);
        assert!(load.overloaded());
        let j = second(&mut load, t + WINDOW * 3, 600, None);
        assert_eq!(j.changed, Some(false));
        assert!(!load.overloaded());
    }

    #[test]
    fn setting_connections_up_is_not_overload_but_carrying_media_is() {
        let t = Instant::now();
        let mut load = Load::new(90, t);
        // A join storm on a node carrying media at 70 %: handshakes take the rest of
        // the second. Judged on all work this was overload, and the storm's tail was
        // refused.
        load.worked(t, t + Duration::from_millis(1_000));
        load.setup(Duration::from_millis(300));
        let j = load.judge(t + WINDOW, Some(0));
        assert_eq!(j.changed, None, "{j:?}");
        assert!((j.busy_percent - 100.0).abs() < 0.5, "{j:?}");
        assert!((j.setup_percent - 30.0).abs() < 0.5, "{j:?}");
        // Once they have joined, carrying them all is.
        let j = second(&mut load, t + WINDOW, 950, Some(0));
        assert_eq!(j.changed, Some(true));
        // A handshake in an overloaded second does not make it look lighter than the
        // media it carries, nor more setup than work.
        load.worked(t + WINDOW * 2, t + WINDOW * 2 + Duration::from_millis(800));
        load.setup(Duration::from_millis(900));
        let j = load.judge(t + WINDOW * 3, Some(0));
        assert!((j.setup_percent - 80.0).abs() < 0.5, "{j:?}");
        assert_eq!(j.changed, Some(false));
        // Setup does not excuse a socket the loop does not read in time.
        load.worked(t + WINDOW * 3, t + WINDOW * 3 + Duration::from_millis(900));
        load.setup(Duration::from_millis(600));
        let j = load.judge(t + WINDOW * 4, Some(40));
        assert_eq!((j.drops, j.changed), (40, Some(true)));
    }

    #[test]
    fn dropped_datagrams_count_only_when_the_loop_is_busy_too() {
        let t = Instant::now();
        let mut load = Load::new(90, t);
        // The first reading is the baseline, whatever it holds.
        let j = second(&mut load, t, 10, Some(1_000));
        assert_eq!((j.drops, j.changed), (0, None));
        // Drops while idle: a burst the buffer could not hold, not overload.
        let j = second(&mut load, t + WINDOW, 10, Some(1_005));
        assert_eq!((j.drops, j.changed), (5, None));
        // Drops while busy: overloaded.
        let j = second(&mut load, t + WINDOW * 2, 600, Some(1_020));
        assert_eq!((j.drops, j.changed), (15, Some(true)));
        // Quiet, but not clear while it still drops.
        let j = second(&mut load, t + WINDOW * 3, 100, Some(1_021));
        assert_eq!(j.changed, None);
        let j = second(&mut load, t + WINDOW * 4, 100, Some(1_021));
        assert_eq!(j.changed, Some(false));
    }

    #[test]
    fn a_zero_threshold_never_refuses() {
        let t = Instant::now();
        let mut load = Load::new(0, t);
        let j = second(&mut load, t, 1_000, Some(0));
        assert_eq!(j.changed, None);
        assert!(!load.overloaded());
    }

    #[test]
    fn the_drop_counter_is_read_from_the_rows_of_the_port() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1234 2 0000000000000000 0\n\
  2: 0100007F:1ECA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5678 2 0000000000000000 42\n\
  3: 0100007F:1ECA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5679 2 0000000000000000 8\n";
        // The workers' sockets on one port: their drops together.
        assert_eq!(parse_udp_drops(table, 7882), Some(50));
        assert_eq!(
            count_udp_sockets(table, "127.0.0.1:7882".parse().unwrap()),
            2
        );
        assert_eq!(count_udp_sockets(table, "0.0.0.0:7882".parse().unwrap()), 0);
        assert_eq!(count_udp_sockets(table, "0.0.0.0:68".parse().unwrap()), 1);
        assert_eq!(parse_udp_drops(table, 68), Some(0));
        assert_eq!(parse_udp_drops(table, 9999), None);
        // A socket listed twice (the table changed while it was read) is one socket.
        let torn = format!(
            "{table}  4: 0100007F:1ECA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5678 2 0000000000000000 42\n"
        );
        assert_eq!(
            count_udp_sockets(&torn, "127.0.0.1:7882".parse().unwrap()),
            2
        );
        assert_eq!(parse_udp_drops(&torn, 7882), Some(50));
    }
}
