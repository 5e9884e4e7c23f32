//! The RTMP server session on arbitrary bytes after a valid handshake: chunk
//! headers, chunk sizes, AMF0 commands, control messages, in any split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::rtmp::session::{ServerSession, HANDSHAKE_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut s = ServerSession::new(1);
    let mut hs = vec![3u8];
    hs.extend_from_slice(&[0u8; 2 * HANDSHAKE_SIZE]);
    s.handle_input(&hs).expect("a valid handshake");
    // The first byte picks how the rest is split into reads.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for piece in data.get(1..).unwrap_or(&[]).chunks(step) {
        if s.handle_input(piece).is_err() {
            break;
        }
        while s.poll_event().is_some() {}
        s.accept_connect();
        let _ = s.take_output();
    }
});
