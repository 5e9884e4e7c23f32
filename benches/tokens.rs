//! Cost of verifying each credential kind: one verification happens per join and
//! per push, so this bounds how fast a node can admit participants.
//!
//! Run: `cargo bench --bench tokens`

use std::hint::black_box;
use std::time::Instant;

use weir::auth::{AppKeys, Privileges, RoomId, TokenKind};

fn main() {
    let app = AppKeys::from_config(&AppKeys::generate_config(1_400_000_000)).unwrap();
    let now = 1_700_000_000;
    let room = RoomId::Num(1234);
    println!("{:<28} {:>10} {:>12}", "operation", "iterations", "µs/op");
    for kind in [TokenKind::V2, TokenKind::V1, TokenKind::Jwt] {
        let sig = app.issue_user_sig(kind, "alice", now, 3600).unwrap();
        let key = app
            .issue_private_map_key(kind, "alice", &room, Privileges::ALL, now, 3600)
            .unwrap();
        let n = if kind == TokenKind::V2 { 20_000 } else { 2_000 };
        measure(&format!("verify userSig {kind:?}"), n, || {
            black_box(app.verify_user_sig(black_box(&sig), "alice", now).unwrap());
        });
        measure(&format!("verify privateMapKey {kind:?}"), n, || {
            black_box(
                app.verify_private_map_key(black_box(&key), "alice", &room, now)
                    .unwrap(),
            );
        });
        measure(&format!("issue userSig {kind:?}"), n, || {
            black_box(app.issue_user_sig(kind, "alice", now, 3600).unwrap());
        });
    }
}

fn measure(name: &str, n: u32, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("{name:<28} {n:>10} {per:>12.1}");
}
