//! RTMP, sans I/O: the handshake, the chunk stream, AMF0 commands and FLV tag bodies.
//! The socket shell is `server::rtmp`.

pub mod amf0;
pub mod chunk;
pub mod client;
pub mod flv;
pub mod session;

pub use session::{Event, RtmpError, ServerSession};
