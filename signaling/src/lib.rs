//! Weir's signaling protocol: the JSON messages exchanged over the websocket between
//! clients (browsers, mini program adapters, test clients) and the server.
//!
//! The message types and `PROTOCOL.md` arrive with the SFU (issue 3); this crate is
//! separate from the server so that Rust clients can depend on the protocol alone.
