use super::*;
use crate::auth::AppKeys;
use crate::config::AppConfig;

struct Nobody;
impl RoomView for Nobody {
    fn members(&self, _: &RoomKey) -> Vec<ViewMember> {
        Vec::new()
    }
}

struct Browsers(Vec<(RoomKey, ViewMember)>);
impl RoomView for Browsers {
    fn members(&self, room: &RoomKey) -> Vec<ViewMember> {
        self.0
            .iter()
            .filter(|(k, _)| k == room)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

const APP: u64 = 1_400_000_000;

fn service() -> RoomService {
    let config: AppConfig = AppKeys::generate_config(APP);
    let keyring = Keyring::from_configs(&[config]).unwrap();
    RoomService::new(
        Settings {
            sdk_app_id: APP,
            issue_user_sigs: true,
            ..Settings::default()
        },
        Issuer {
            keyring: Arc::new(keyring),
            rtmp_base: "rtmp://h:1935/live".into(),
            flv_base: "http://h:8080/live".into(),
        },
    )
}

fn call(kind: Kind, action: &str, user: &str, token: &str, body: Value) -> Call {
    Call {
        kind,
        action: action.into(),
        user_id: Some(user.into()),
        token: Some(token.into()),
        body,
    }
}

fn rng() -> impl FnMut() -> u32 {
    let mut n = 12345u32;
    move || {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12345);
        n
    }
}

#[test]
fn push_stream_names_never_read_as_room_bound_ones() {
    assert_eq!(push_stream_name(APP, "alice"), "1400000000_alice");
    assert_eq!(push_stream_app("1400000000_alice"), Some(APP));
    // A userID that would spell a room-bound name is digested instead.
    let odd = push_stream_name(APP, "1234_bob");
    assert!(odd.starts_with("1400000000_h-"), "{odd}");
    assert!(crate::room::names::bound_stream(&odd).is_none());
    assert_eq!(push_stream_app(&odd), Some(APP));
    assert_eq!(push_stream_app("1400000000_1234_bob"), None);
    assert!(push_stream_name(APP, "用户").starts_with("1400000000_h-"));
}

#[test]
fn room_ids_are_numeric_when_they_can_be() {
    assert_eq!(room_id_of("1234"), Some(RoomId::Num(1234)));
    assert_eq!(room_id_of("0123"), Some(RoomId::Str("0123".into())));
    assert_eq!(
        room_id_of("99999999999"),
        Some(RoomId::Str("99999999999".into()))
    );
    assert_eq!(room_id_of("room_a"), Some(RoomId::Str("room_a".into())));
    assert_eq!(room_id_of(""), None);
    assert_eq!(room_id_of("a\nb"), None);
}

#[test]
fn every_call_but_login_needs_the_token_of_its_user() {
    let mut s = service();
    let token = s.login(APP, "alice", u64::MAX, [7; 16], 0);
    let body = json!({"userID": "alice", "roomInfo": "r"});
    let good = s.handle(
        &call(Kind::Multi, "create_room", "alice", &token, body.clone()),
        &Nobody,
        1,
        rng(),
    );
    assert_eq!(good["code"], 0, "{good:?}");
    let other = s.handle(
        &call(Kind::Multi, "create_room", "bob", &token, body.clone()),
        &Nobody,
        1,
        rng(),
    );
    assert_eq!(other["code"], code::AUTH);
    let forged = s.handle(
        &call(Kind::Multi, "create_room", "alice", "00", body),
        &Nobody,
        1,
        rng(),
    );
    assert_eq!(forged["code"], code::AUTH);
    // Idle tokens are forgotten.
    let late = s.settings.token_idle_ms + 2;
    let stale = s.handle(
        &call(Kind::Multi, "get_room_list", "alice", &token, json!({})),
        &Nobody,
        late,
        rng(),
    );
    assert_eq!(stale["code"], code::AUTH);
}

#[test]
fn a_pusher_registers_its_own_push_url_only_and_browsers_are_listed_beside_it() {
    let mut s = service();
    let t = s.login(APP, "alice", u64::MAX, [1; 16], 0);
    let url = s.handle(
        &call(
            Kind::Multi,
            "get_push_url",
            "alice",
            &t,
            json!({"userID": "alice"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    let push = url["pushURL"].as_str().unwrap().to_owned();
    assert!(
        push.starts_with("rtmp://h:1935/live/1400000000_alice?"),
        "{push}"
    );
    let made = s.handle(
        &call(
            Kind::Multi,
            "create_room",
            "alice",
            &t,
            json!({"userID": "alice", "roomInfo": "hearing"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    let room = made["roomID"].as_str().unwrap().to_owned();
    // bob's URL is not alice's to register.
    let tb = s.login(APP, "bob", u64::MAX, [2; 16], 0);
    let bobs = s.handle(
        &call(Kind::Multi, "get_push_url", "bob", &tb, json!({})),
        &Nobody,
        0,
        rng(),
    );
    let stolen = s.handle(
        &call(Kind::Multi, "add_pusher", "alice", &t, json!({"roomID": room, "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": bobs["pushURL"]})),
        &Nobody, 0, rng());
    assert_eq!(stolen["code"], code::AUTH, "{stolen:?}");
    let added = s.handle(
        &call(Kind::Multi, "add_pusher", "alice", &t, json!({"roomID": room, "userID": "alice", "userName": "A", "userAvatar": "a.png", "pushURL": push})),
        &Nobody, 0, rng());
    assert_eq!(added["code"], 0, "{added:?}");
    let key = RoomKey {
        sdk_app_id: APP,
        room: room_id_of(&room).unwrap(),
    };
    assert_eq!(
        s.take_effects(),
        vec![Effect::Bind {
            stream: "1400000000_alice".into(),
            room: key.clone(),
            user_id: "alice".into()
        }]
    );
    let view = Browsers(vec![(
        key.clone(),
        ViewMember {
            user_id: "carol".into(),
            stream: Some("1400000000_x_carol_main".into()),
        },
    )]);
    let p = s.handle(
        &call(
            Kind::Multi,
            "get_pushers",
            "alice",
            &t,
            json!({"roomID": room}),
        ),
        &view,
        0,
        rng(),
    );
    let pushers = p["pushers"].as_array().unwrap();
    assert_eq!(pushers.len(), 2, "{p:?}");
    assert_eq!(pushers[0]["userID"], "alice");
    assert_eq!(pushers[0]["userAvatar"], "a.png");
    assert!(pushers[1]["accelerateURL"]
        .as_str()
        .unwrap()
        .starts_with("rtmp://h:1935/live/1400000000_x_carol_main?txSecret="));
    assert_eq!(p["roomCreator"], "alice");
}

#[test]
fn heartbeats_keep_a_pusher_and_their_absence_removes_it_everywhere() {
    let mut s = service();
    let t = s.login(APP, "alice", u64::MAX, [1; 16], 0);
    let url = s.handle(
        &call(
            Kind::Live,
            "get_anchor_url",
            "alice",
            &t,
            json!({"userID": "alice"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    let added = s.handle(
        &call(Kind::Live, "add_anchor", "alice", &t, json!({"roomID": "lesson1", "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": url["pushURL"]})),
        &Nobody, 0, rng());
    assert_eq!(added["code"], 0, "{added:?}");
    assert!(added["timestamp"].is_number());
    s.take_effects();
    let hb = s.handle(
        &call(
            Kind::Live,
            "anchor_heartbeat",
            "alice",
            &t,
            json!({"roomID": "lesson1", "userID": "alice"}),
        ),
        &Nobody,
        15_000,
        rng(),
    );
    assert_eq!(hb["code"], 0);
    assert_eq!(hb["pushers"].as_array().unwrap().len(), 1);
    s.tick(&Nobody, 30_000);
    assert!(
        s.take_effects().is_empty(),
        "heartbeat at 15 s keeps it until 35 s"
    );
    s.tick(&Nobody, 35_001);
    let key = RoomKey {
        sdk_app_id: APP,
        room: RoomId::Str("lesson1".into()),
    };
    assert_eq!(
        s.take_effects(),
        vec![Effect::Remove {
            room: key,
            user_id: "alice".into()
        }]
    );
    s.tick(&Nobody, 35_001 + 30_000);
    assert_eq!(s.room_count(), 0, "an empty room goes after the idle time");
}

#[test]
fn rooms_fill_up_and_fields_are_bounded() {
    let mut s = service();
    let mut room = String::new();
    for (i, u) in ["user_a", "user_b", "user_c", "user_d", "user_e"]
        .iter()
        .enumerate()
    {
        let r = if i == 0 {
            s.handle(
                &call(
                    Kind::WebRtc,
                    "create_room",
                    "",
                    "",
                    json!({"userID": u, "roomInfo": "x"}),
                ),
                &Nobody,
                0,
                rng(),
            )
        } else {
            s.handle(
                &call(
                    Kind::WebRtc,
                    "enter_room",
                    "",
                    "",
                    json!({"userID": u, "roomID": room}),
                ),
                &Nobody,
                0,
                rng(),
            )
        };
        if i == 0 {
            room = r["roomID"].as_str().unwrap().to_owned();
            assert!(r["privateMapKey"].as_str().unwrap().len() > 20);
        }
        let want = if i < 4 { 0 } else { code::FULL };
        assert_eq!(r["code"], want, "{u}: {r:?}");
    }
    let long = "x".repeat(1025);
    let r = s.handle(
        &call(
            Kind::WebRtc,
            "create_room",
            "",
            "",
            json!({"userID": "user_f", "roomInfo": long}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(r["code"], code::EXISTS_OR_TOO_LONG);
    let r = s.handle(
        &call(
            Kind::WebRtc,
            "create_room",
            "",
            "",
            json!({"userID": "9bad", "roomInfo": ""}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(r["code"], code::AUTH);
    let r = s.handle(
        &call(
            Kind::WebRtc,
            "enter_room",
            "",
            "",
            json!({"userID": "user_f"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(r["code"], code::MISSING_PARAM);
    let r = s.handle(
        &call(
            Kind::WebRtc,
            "enter_room",
            "",
            "",
            json!({"userID": "user_f", "roomID": {"a": 1}}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(r["code"], code::MISSING_PARAM);
    let r = s.handle(
        &call(
            Kind::WebRtc,
            "enter_room",
            "",
            "",
            json!({"userID": "user_f", "roomID": "777"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(r["code"], code::ROOM_OR_OWNER);
}

#[test]
fn webrtc_room_hands_out_nothing_unless_the_operator_allows_it() {
    let mut s = service();
    s.settings.issue_user_sigs = false;
    for action in [
        "get_login_info",
        "create_room",
        "enter_room",
        "get_room_list",
    ] {
        let r = s.handle(
            &call(
                Kind::WebRtc,
                action,
                "",
                "",
                json!({"userID": "user_a", "roomInfo": "x", "roomID": "1"}),
            ),
            &Nobody,
            0,
            rng(),
        );
        assert_eq!(r["code"], code::AUTH, "{action}: {r:?}");
        assert!(r.get("userSig").is_none() && r.get("privateMapKey").is_none());
    }
}

/// The live room's stage: an audience member asks, the presenter (the room's creator)
/// answers; `add_pusher` lets on only those the presenter accepted; a kick ends the push.
#[test]
fn the_presenter_decides_who_joins_the_stage() {
    use weir_signaling::{ErrorCode, LinkMicAction::*};
    let mut s = service();
    let pat = s.login(APP, "pat", u64::MAX, [1; 16], 0);
    let carol = s.login(APP, "carol", u64::MAX, [2; 16], 0);
    let dave = s.login(APP, "dave", u64::MAX, [3; 16], 0);
    let made = s.handle(
        &call(
            Kind::Live,
            "create_room",
            "pat",
            &pat,
            json!({"userID": "pat", "roomInfo": "class", "roomID": "stage1"}),
        ),
        &Nobody,
        0,
        rng(),
    );
    assert_eq!(made["code"], 0, "{made:?}");
    let key = RoomKey {
        sdk_app_id: APP,
        room: RoomId::Str("stage1".into()),
    };
    let url = |s: &mut RoomService, who: &str, token: &str| {
        s.handle(
            &call(
                Kind::Live,
                "get_push_url",
                who,
                token,
                json!({"userID": who}),
            ),
            &Nobody,
            0,
            rng(),
        )["pushURL"]
            .clone()
    };
    let add = |s: &mut RoomService, who: &str, token: &str, push: &Value, at: u64| {
        s.handle(
            &call(Kind::Live, "add_pusher", who, token, json!({"roomID": "stage1", "userID": who, "userName": who, "userAvatar": "", "pushURL": push})),
            &Nobody, at, rng())["code"].clone()
    };
    let pat_url = url(&mut s, "pat", &pat);
    assert_eq!(add(&mut s, "pat", &pat, &pat_url, 0), 0, "the presenter");
    let carol_url = url(&mut s, "carol", &carol);
    assert_eq!(
        add(&mut s, "carol", &carol, &carol_url, 0),
        code::AUTH,
        "not accepted yet"
    );
    // Only a live room has a stage; only its presenter answers; answers need a request.
    let other = RoomKey {
        sdk_app_id: APP,
        room: RoomId::Num(77),
    };
    assert_eq!(
        s.link_mic(&other, "carol", Request, None, 0)
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    assert_eq!(
        s.link_mic(&key, "pat", Accept, Some("carol"), 0)
            .unwrap_err()
            .code,
        ErrorCode::NotFound,
        "nobody asked"
    );
    assert_eq!(
        s.link_mic(&key, "carol", Request, None, 1_000),
        Ok("pat".into())
    );
    assert_eq!(
        s.link_mic(&key, "dave", Request, None, 1_000),
        Ok("pat".into())
    );
    assert_eq!(
        s.link_mic(&key, "dave", Accept, Some("carol"), 0)
            .unwrap_err()
            .code,
        ErrorCode::MissingPrivilege,
        "only the presenter answers"
    );
    assert_eq!(
        s.link_mic(&key, "pat", Reject, Some("dave"), 2_000),
        Ok("dave".into())
    );
    assert_eq!(
        s.link_mic(&key, "pat", Accept, Some("carol"), 2_000),
        Ok("carol".into())
    );
    let dave_url = url(&mut s, "dave", &dave);
    assert_eq!(
        add(&mut s, "dave", &dave, &dave_url, 2_500),
        code::AUTH,
        "refused"
    );
    assert_eq!(
        add(&mut s, "carol", &carol, &carol_url, 2_500),
        0,
        "accepted"
    );
    s.take_effects();
    assert_eq!(
        s.link_mic(&key, "carol", Request, None, 3_000)
            .unwrap_err()
            .code,
        ErrorCode::BadRequest,
        "already on the stage"
    );
    // The presenter takes carol off: her push ends, and she must ask again.
    assert_eq!(
        s.link_mic(&key, "pat", Kick, Some("carol"), 4_000),
        Ok("carol".into())
    );
    assert_eq!(
        s.take_effects(),
        vec![Effect::EndPush {
            room: key.clone(),
            user_id: "carol".into(),
            else_remove: false,
        }]
    );
    assert_eq!(add(&mut s, "carol", &carol, &carol_url, 4_500), code::AUTH);
    assert_eq!(
        s.link_mic(&key, "pat", Kick, Some("carol"), 5_000)
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    // Requests and unused acceptances expire.
    s.link_mic(&key, "dave", Request, None, 10_000).unwrap();
    s.link_mic(&key, "pat", Accept, Some("dave"), 10_000)
        .unwrap();
    s.tick(&Nobody, 10_000 + STAGE_TTL_MS + 1);
    assert_eq!(
        add(&mut s, "dave", &dave, &dave_url, 10_000 + STAGE_TTL_MS + 2),
        code::AUTH
    );
}
