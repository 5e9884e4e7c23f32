//! The mini program room service (`/weapp/...`): any call, with any JSON body, from a
//! logged-in user and from strangers, into one long-lived service (so state built by
//! earlier inputs is exercised too). The first byte picks the call.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use weir::room::RoomKey;
use weir::weapp::{Call, Issuer, Kind, RoomService, RoomView, Settings, ViewMember};

struct Nobody;
impl RoomView for Nobody {
    fn members(&self, _: &RoomKey) -> Vec<ViewMember> {
        Vec::new()
    }
}

const ACTIONS: [&str; 24] = [
    "get_login_info",
    "create_room",
    "enter_room",
    "quit_room",
    "heartbeat",
    "get_room_list",
    "get_room_members",
    "logout",
    "get_push_url",
    "get_pushers",
    "destroy_room",
    "add_pusher",
    "delete_pusher",
    "pusher_heartbeat",
    "add_audience",
    "delete_audience",
    "get_audiences",
    "get_custom_info",
    "set_custom_field",
    "merge_stream",
    "get_anchor_url",
    "add_anchor",
    "anchor_heartbeat",
    "get_anchors",
];
const KINDS: [Kind; 4] = [Kind::WebRtc, Kind::Multi, Kind::Double, Kind::Live];

thread_local! {
    static SERVICE: RefCell<(RoomService, String, u64)> = RefCell::new({
        let app = 1_400_000_000;
        let keyring = weir::auth::Keyring::from_configs(&[weir::auth::AppKeys::generate_config(app)]).unwrap();
        let mut s = RoomService::new(
            Settings { sdk_app_id: app, issue_user_sigs: true, max_rooms: 64, ..Settings::default() },
            Issuer { keyring: Arc::new(keyring), rtmp_base: "rtmp://h/live".into(), flv_base: "http://h/live".into() },
        );
        let token = s.login(app, "alice", u64::MAX, [9; 16], 0);
        (s, token, 0)
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let body = serde_json::from_slice(rest).unwrap_or_else(
        |_| serde_json::json!({"roomID": String::from_utf8_lossy(rest), "userID": "alice"}),
    );
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = weir::weapp::room_id_of(text);
        let _ = weir::weapp::push_stream_app(text);
        let _ = weir::weapp::push_stream_name(1, text);
    }
    SERVICE.with(|cell| {
        let (service, token, now) = &mut *cell.borrow_mut();
        *now += 1000;
        let call = Call {
            kind: KINDS[usize::from(pick & 3)],
            action: ACTIONS[usize::from(pick >> 2) % ACTIONS.len()].into(),
            user_id: Some(if pick & 0x80 == 0 {
                "alice".into()
            } else {
                "mallory".into()
            }),
            token: Some(token.clone()),
            body,
        };
        let mut n = u32::from(pick);
        let answer = service.handle(&call, &Nobody, *now, move || {
            n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            n
        });
        assert!(answer.get("code").is_some_and(|c| c.is_i64()), "{answer:?}");
        service.tick(&Nobody, *now);
        let _ = service.take_effects();
    });
});
