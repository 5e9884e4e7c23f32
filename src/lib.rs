//! Weir: a self-hosted WebRTC SFU and RTMP⇄WebRTC gateway.
//!
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod auth;
pub mod cli;
pub mod config;
pub mod media;
pub mod metrics;
pub mod room;
pub mod server;
