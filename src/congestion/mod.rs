//! Congestion control, sans I/O: per-subscriber estimates, per-subscriber allocation,
//! per-room decisions for publishers.
//!
//! - [`estimate`]: the subscriber connection's estimate, from its transport-wide CC
//!   feedback (webrtc-rs's GCC plus an acknowledged-rate ceiling, queuing delay, loss);
//! - [`allocate`]: which of a subscriber's videos fit, with hysteresis and padding
//!   probes to find headroom again;
//! - [`policy`]: what each publisher is told (REMB, or an event for RTMP pushers).
//!
//! The media task drives these on its clock; nothing here owns a socket or a timer.

pub mod allocate;
pub mod estimate;
pub mod policy;

pub use allocate::{Allocation, Allocator, Change, CongestionState, Priority, Signals, VideoTrack};
pub use estimate::{SharedEstimator, Snapshot};
pub use policy::{publisher_target, Policy};
