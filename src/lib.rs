//! Weir: a self-hosted WebRTC SFU and RTMP⇄WebRTC gateway.
//!
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod auth;
pub mod bridge;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod congestion;
pub mod hooks;
pub mod limits;
pub mod live;
pub mod media;
pub mod metrics;
pub mod record;
pub mod room;
pub mod rtmp;
pub mod server;
pub mod weapp;
