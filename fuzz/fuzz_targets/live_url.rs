//! Live URL parsing and txSecret checking on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::auth::live_url::{self, LiveUrl, LiveUrlKind};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(url) = LiveUrl::parse(text) {
        let _ = live_url::verify_url(LiveUrlKind::Play, &url, "key", u64::MAX, u64::MAX);
    }
    let _ = live_url::split_path(text);
});
