//! Every token entry point on arbitrary text: B64X + zlib + JSON, v1 and v2 field
//! handling, the userbuf record, and JWT framing. Nothing may panic, and inflation
//! stays under its cap.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weir::auth::{envelope, AppKeys, RoomId, UserBuf};

fn app() -> &'static AppKeys {
    static APP: OnceLock<AppKeys> = OnceLock::new();
    APP.get_or_init(|| AppKeys::from_config(&AppKeys::generate_config(1_400_000_000)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let _ = UserBuf::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(doc) = envelope::open(text) {
        assert!(serde_json::to_vec(&doc).unwrap().len() <= 4 * envelope::MAX_INFLATED);
    }
    let app = app();
    let _ = app.verify_user_sig(text, "alice", 1_700_000_000);
    let _ = app.verify_private_map_key(text, "alice", &RoomId::Num(1234), 1_700_000_000);
    let _ = app.verify_private_map_key(text, "alice", &RoomId::Str("r".into()), 1_700_000_000);
});
