//! Per-room decisions: what a publisher is told it may send.
//!
//! Every subscriber's allocator says how much of a stream it could take (its
//! `capacity`); the room's policy combines those into one target for the publisher,
//! sent as REMB (WebRTC publishers) or as a signaling event (RTMP pushers, which RTCP
//! cannot reach), always within the publisher's own min/max bitrate.

/// How a room weighs its subscribers: `Weakest` (the publisher sends what the worst
/// link can carry: 1v1 calls, small meetings, where everyone must see everyone) or
/// `Majority` (what a strict majority can carry; the others fall back to audio:
/// classes, large rooms). The type lives in the signaling crate: rooms choose it in
/// `join`.
pub use weir_signaling::CongestionPolicy as Policy;

/// The publisher's target from its subscribers' capacities (bit/s), clamped to
/// `min..=max`. `None` when no subscriber has an estimate (the publisher is then left
/// to its own congestion control, capped at `max`).
pub fn publisher_target(policy: Policy, capacities: &[f64], min: f64, max: f64) -> Option<f64> {
    let mut c: Vec<f64> = capacities
        .iter()
        .copied()
        .filter(|c| c.is_finite())
        .collect();
    if c.is_empty() {
        return None;
    }
    c.sort_by(|a, b| b.total_cmp(a)); // largest first
    let chosen = match policy {
        Policy::Weakest => c[c.len() - 1],
        // The largest rate that floor(n/2)+1 subscribers can all take.
        Policy::Majority => c[c.len() / 2],
    };
    Some(chosen.clamp(min, max.max(min)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weakest_follows_the_worst_link() {
        let t = publisher_target(Policy::Weakest, &[2e6, 250e3, 3e6], 100e3, 1.5e6);
        assert_eq!(t, Some(250e3));
    }

    #[test]
    fn majority_ignores_a_minority_of_weak_links() {
        assert_eq!(
            publisher_target(Policy::Majority, &[2e6, 250e3, 3e6], 100e3, 5e6),
            Some(2e6)
        );
        // Two subscribers: a strict majority is both.
        assert_eq!(
            publisher_target(Policy::Majority, &[2e6, 250e3], 100e3, 5e6),
            Some(250e3)
        );
        assert_eq!(
            publisher_target(Policy::Majority, &[2e6], 100e3, 5e6),
            Some(2e6)
        );
    }

    #[test]
    fn the_publishers_bounds_win() {
        assert_eq!(
            publisher_target(Policy::Weakest, &[10e3], 200e3, 1e6),
            Some(200e3)
        );
        assert_eq!(
            publisher_target(Policy::Weakest, &[10e6], 200e3, 1e6),
            Some(1e6)
        );
        assert_eq!(publisher_target(Policy::Weakest, &[], 200e3, 1e6), None);
        assert_eq!(
            publisher_target(Policy::Weakest, &[f64::NAN], 200e3, 1e6),
            None
        );
    }
}
