//! Signaling frames: any text a websocket peer sends is parsed into a message or an
//! error, never a panic; what parses serializes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_signaling::{ClientMessage, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = ClientMessage::parse(text) {
        let _ = m.type_name();
        let again = serde_json::to_string(&m).expect("a parsed message serializes");
        assert!(ClientMessage::parse(&again).is_ok(), "{again}");
    }
    let _ = ServerMessage::parse(text);
});
