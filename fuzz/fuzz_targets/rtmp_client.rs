//! The RTMP client a node relays a push with, on arbitrary bytes from the far side
//! after a valid handshake: replies, control messages, chunk sizes, in any split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::rtmp::client::ClientPublish;
use weir::rtmp::session::HANDSHAKE_SIZE;

fuzz_target!(|data: &[u8]| {
    let mut c = ClientPublish::new("live", "rtmp://b/live", "s?x=1", 1);
    let _ = c.take_output();
    let mut hs = vec![3u8];
    hs.extend_from_slice(&[0u8; 2 * HANDSHAKE_SIZE]);
    c.handle_input(&hs).expect("a valid handshake");
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for piece in data.get(1..).unwrap_or(&[]).chunks(step) {
        if c.handle_input(piece).is_err() {
            break;
        }
        while c.poll_event().is_some() {}
        c.send(9, 0, bytes::Bytes::from_static(&[0x17, 0, 0, 0, 0]));
        let _ = c.take_output();
    }
});
