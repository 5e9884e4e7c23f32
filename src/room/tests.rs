use super::*;
use crate::auth::{Identity, TokenKind};

pub(crate) const APP: u64 = 1_400_000_000;

/// A verified ticket of `user` for numeric `room` (the other parts' tests use it too).
pub(crate) fn ticket(user: &str, room: u32, privileges: u32) -> RoomTicket {
    RoomTicket {
        identity: Identity {
            kind: TokenKind::V2,
            sdk_app_id: APP,
            user_id: user.into(),
            issued_at: 0,
            expires_at: u64::MAX,
        },
        room: RoomId::Num(room),
        privileges: Privileges(privileges),
        privilege_names: Vec::new(),
        room_expires_at: u64::MAX,
    }
}

fn rooms() -> Rooms {
    Rooms::new(
        Limits {
            max_rooms: 2,
            max_members_per_room: 3,
            max_publishers_per_room: 2,
            max_publishers: 3,
            max_subscriptions_per_member: 100,
            max_subscriptions: 1000,
            congestion_policy: Default::default(),
        },
        UrlBase {
            rtmp: "rtmp://h:1935/live".into(),
            flv: "http://h:8080/live".into(),
            webrtc: "webrtc://h:8080/live".into(),
        },
    )
}

fn drain(r: &mut Rooms) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn sent_to(out: &[Output], to: SessionId) -> Vec<&ServerMessage> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(s, m) if *s == to => Some(m),
            _ => None,
        })
        .collect()
}

fn media(out: &[Output]) -> Vec<&MediaCommand> {
    out.iter()
        .filter_map(|o| match o {
            Output::Media(m) => Some(m),
            _ => None,
        })
        .collect()
}

const A: SessionId = SessionId(1);
const B: SessionId = SessionId(2);
const C: SessionId = SessionId(3);

#[test]
fn creating_a_room_needs_0x01_entering_needs_0x02() {
    let mut r = rooms();
    let e = r.join(A, APP, &ticket("alice", 1, 0x02), true).unwrap_err();
    assert!(e.to_string().contains("create room (0x01)"), "{e}");
    let e = r.join(A, APP, &ticket("alice", 1, 0x01), true).unwrap_err();
    assert!(e.to_string().contains("enter room (0x02)"), "{e}");
    r.join(A, APP, &ticket("alice", 1, 0x03), true).unwrap();
    // the room exists now: entering alone is enough
    r.join(B, APP, &ticket("bob", 1, 0x02), true).unwrap();
    assert_eq!(r.participant_count(), 2);
    assert_eq!(r.room_count(), 1);
}

#[test]
fn join_answer_lists_members_and_their_streams_and_others_are_told() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 7, 0xff), true).unwrap();
    r.publish(A, true, true).unwrap();
    drain(&mut r);
    r.join(B, APP, &ticket("bob", 7, 0xff), true).unwrap();
    let out = drain(&mut r);
    let ServerMessage::Joined { members, room, .. } = sent_to(&out, B)[0] else {
        panic!("{out:?}")
    };
    assert_eq!(room, "7");
    assert_eq!(members.len(), 1);
    let s = &members[0].streams[0];
    assert_eq!(s.stream_id, "1400000000_7_alice_main");
    assert_eq!(s.urls.rtmp, "rtmp://h:1935/live/1400000000_7_alice_main");
    assert_eq!(s.urls.flv, "http://h:8080/live/1400000000_7_alice_main.flv");
    assert!(
        matches!(sent_to(&out, A)[0], ServerMessage::MemberJoined { user_id } if user_id == "bob")
    );
    // auto-subscribe: bob receives alice's audio and video
    assert_eq!(
        media(&out),
        vec![&MediaCommand::Subscribe {
            subscriber: B,
            stream_id: "1400000000_7_alice_main".into(),
            kinds: vec![Kind::Audio, Kind::Video]
        }]
    );
}

#[test]
fn publishing_needs_send_bits_and_names_the_missing_one() {
    let mut r = rooms();
    // enter + create + send audio + receive both, but no send video
    r.join(
        A,
        APP,
        &ticket("alice", 1, 0x01 | 0x02 | 0x04 | 0x08 | 0x20),
        true,
    )
    .unwrap();
    drain(&mut r);
    let e = r.publish(A, true, true).unwrap_err();
    assert_eq!(e.code(), ErrorCode::MissingPrivilege);
    assert!(e.to_string().contains("send video (0x10)"), "{e}");
    assert!(drain(&mut r).is_empty(), "a refusal changes nothing");
    // the session is still fine: audio alone is allowed
    r.publish(A, true, false).unwrap();
}

#[test]
fn subscribers_get_only_the_kinds_they_may_receive() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    // bob may receive audio only
    r.join(B, APP, &ticket("bob", 1, 0x02 | 0x08), true)
        .unwrap();
    drain(&mut r);
    r.publish(A, true, true).unwrap();
    let out = drain(&mut r);
    assert_eq!(
        media(&out)[1],
        &MediaCommand::Subscribe {
            subscriber: B,
            stream_id: "1400000000_1_alice_main".into(),
            kinds: vec![Kind::Audio]
        }
    );
    // asking explicitly for the video is refused with the bit named
    r.unsubscribe(B, &["1400000000_1_alice_main".into()])
        .unwrap();
    let e = r
        .subscribe(B, &["1400000000_1_alice_main".into()])
        .unwrap_err();
    assert!(e.to_string().contains("receive video (0x20)"), "{e}");
    assert!(matches!(
        r.subscribe(B, &["nope".into()]),
        Err(RoomError::NoSuchStream(_))
    ));
}

#[test]
fn leaving_ends_streams_tells_everyone_and_empty_rooms_disappear() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    r.publish(A, true, true).unwrap();
    drain(&mut r);
    r.leave(A, LeaveReason::Disconnected);
    let out = drain(&mut r);
    let to_b = sent_to(&out, B);
    assert!(
        matches!(to_b[0], ServerMessage::StreamRemoved { stream_id, .. } if stream_id == "1400000000_1_alice_main")
    );
    assert!(
        matches!(to_b[1], ServerMessage::MemberLeft { user_id, reason: LeaveReason::Disconnected } if user_id == "alice")
    );
    assert!(media(&out).contains(&&MediaCommand::EndStream {
        stream_id: "1400000000_1_alice_main".into()
    }));
    assert!(media(&out).contains(&&MediaCommand::CloseSession { session: A }));
    r.leave(A, LeaveReason::Disconnected); // idempotent
    r.leave(B, LeaveReason::Left);
    let out = drain(&mut r);
    assert!(matches!(sent_to(&out, B)[0], ServerMessage::Left { .. }));
    assert_eq!(r.room_count(), 0);
    assert_eq!(r.participant_count(), 0);
}

#[test]
fn same_user_again_replaces_the_old_session() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    drain(&mut r);
    r.join(C, APP, &ticket("alice", 1, 0xff), true).unwrap();
    let out = drain(&mut r);
    assert!(out.contains(&Output::Close(A, LeaveReason::Replaced)));
    assert!(out.contains(&Output::Media(MediaCommand::CloseSession { session: A })));
    assert_eq!(r.participant_count(), 2);
    assert!(matches!(
        r.publish(A, true, false),
        Err(RoomError::NotJoined)
    ));
    r.publish(C, true, false).unwrap();
}

#[test]
fn limits_are_enforced() {
    let mut r = rooms();
    r.join(SessionId(10), APP, &ticket("a", 1, 0xff), true)
        .unwrap();
    r.join(SessionId(11), APP, &ticket("b", 2, 0xff), true)
        .unwrap();
    assert!(matches!(
        r.join(SessionId(12), APP, &ticket("c", 3, 0xff), true),
        Err(RoomError::TooManyRooms(2))
    ));
    r.join(SessionId(13), APP, &ticket("d", 1, 0xff), true)
        .unwrap();
    r.join(SessionId(14), APP, &ticket("e", 1, 0xff), true)
        .unwrap();
    assert!(matches!(
        r.join(SessionId(15), APP, &ticket("f", 1, 0xff), true),
        Err(RoomError::RoomFull { limit: 3, .. })
    ));
    let e = r.text(SessionId(10), &"x".repeat(5000), 0).unwrap_err();
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
}

#[test]
fn publishers_are_limited_per_room_and_per_node() {
    let mut r = rooms();
    for (s, user, room) in [
        (10, "a", 1),
        (11, "b", 1),
        (12, "c", 1),
        (13, "d", 2),
        (14, "e", 2),
    ] {
        r.join(SessionId(s), APP, &ticket(user, room, 0xff), true)
            .unwrap();
    }
    r.publish(SessionId(10), true, true).unwrap();
    r.publish(SessionId(11), true, true).unwrap();
    // Room 1 has 2 publishers, its limit.
    let e = r.publish(SessionId(12), true, true).unwrap_err();
    assert!(
        matches!(e, RoomError::TooManyPublishersInRoom { limit: 2, .. }),
        "{e}"
    );
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    // The node carries 3 streams, its limit.
    r.publish(SessionId(13), true, false).unwrap();
    let e = r.publish(SessionId(14), true, false).unwrap_err();
    assert!(matches!(e, RoomError::TooManyPublishers(3)), "{e}");
    // A publisher that stops makes room.
    r.unpublish(SessionId(10), false).unwrap();
    r.publish(SessionId(12), true, true).unwrap();
}

#[test]
fn text_and_mute_reach_the_room() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    drain(&mut r);
    r.text(A, "hello", 42).unwrap();
    let out = drain(&mut r);
    assert!(sent_to(&out, A).is_empty());
    assert!(
        matches!(sent_to(&out, B)[0], ServerMessage::TextMessage { user_id, text, ts: 42 } if user_id == "alice" && text == "hello")
    );
    assert!(matches!(
        r.mute(A, Kind::Audio, true),
        Err(RoomError::NotPublishing)
    ));
    r.publish(A, true, true).unwrap();
    drain(&mut r);
    r.mute(A, Kind::Video, true).unwrap();
    let out = drain(&mut r);
    assert!(matches!(
        sent_to(&out, B)[0],
        ServerMessage::StreamMuted {
            muted: true,
            kind: Kind::Video,
            ..
        }
    ));
}

#[test]
fn strange_room_names_make_url_safe_stream_ids() {
    let key = RoomKey {
        sdk_app_id: 1,
        room: RoomId::Str("会议 #7/a".into()),
    };
    assert_eq!(stream_id_for(&key, "u"), "1_----7-a_u_main");
}

/// A mini program pushes RTMP and hears the room on a socket, both as one user: the
/// two sessions are one member (before, the second replaced the first, so a mini
/// program that followed MINIPROGRAM.md cut off its own push).
#[test]
fn a_push_and_a_signaling_session_of_one_user_are_one_member() {
    const PUSH: SessionId = SessionId(20);
    const PUSH2: SessionId = SessionId(21);
    let mut r = rooms();
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    // The push first, then the mini program's socket with audience privileges.
    r.join_push(PUSH, APP, &ticket("mp", 1, 0x17)).unwrap();
    r.publish_as(PUSH, Some("app_mp".into()), "rtmp", true, true)
        .unwrap();
    drain(&mut r);
    r.join(A, APP, &ticket("mp", 1, 0x2a), false).unwrap();
    let out = drain(&mut r);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Close(..))),
        "nobody is replaced: {out:?}"
    );
    assert!(sent_to(&out, B).is_empty(), "bob knows mp already: {out:?}");
    assert!(
        matches!(sent_to(&out, A)[0], ServerMessage::Joined { members, .. } if members.len() == 1)
    );
    assert_eq!(
        r.members_of(&RoomKey {
            sdk_app_id: APP,
            room: RoomId::Num(1)
        })
        .len(),
        2
    );
    assert_eq!(
        r.session_of(
            &RoomKey {
                sdk_app_id: APP,
                room: RoomId::Num(1)
            },
            "mp"
        ),
        Some(A)
    );
    // Text from the socket reaches bob; the socket cannot end the push's stream.
    r.text(A, "hi", 1).unwrap();
    assert!(
        matches!(sent_to(&drain(&mut r), B)[0], ServerMessage::TextMessage { user_id, .. } if user_id == "mp")
    );
    assert!(matches!(
        r.unpublish(A, false),
        Err(RoomError::NotPublishing)
    ));
    // A new push of the same user replaces only the push.
    r.join_push(PUSH2, APP, &ticket("mp", 1, 0x17)).unwrap();
    let out = drain(&mut r);
    assert!(out.contains(&Output::Close(PUSH, LeaveReason::Replaced)));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Close(s, _) if *s == A)));
    assert!(sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::StreamRemoved { .. })));
    assert!(!sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::MemberLeft { .. })));
    r.publish_as(PUSH2, Some("app_mp".into()), "rtmp", true, true)
        .unwrap();
    drain(&mut r);
    // The push ends (delete_pusher, a kick off the stage): the socket stays.
    let key = RoomKey {
        sdk_app_id: APP,
        room: RoomId::Num(1),
    };
    assert!(r.end_push(&key, "mp", LeaveReason::Removed));
    let out = drain(&mut r);
    assert!(out.contains(&Output::Close(PUSH2, LeaveReason::Removed)));
    assert!(sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::StreamRemoved { user_id, .. } if user_id == "mp")));
    assert!(!sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::MemberLeft { .. })));
    assert!(r.is_joined(A));
    assert!(
        !r.end_push(&key, "mp", LeaveReason::Removed),
        "no push left"
    );
    // A push again, then the socket leaves: the push stays, and hears the room.
    r.join_push(PUSH, APP, &ticket("mp", 1, 0x17)).unwrap();
    r.leave(A, LeaveReason::Disconnected);
    let out = drain(&mut r);
    assert!(!sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::MemberLeft { .. })));
    assert_eq!(r.session_of(&key, "mp"), Some(PUSH));
    // A kick takes both.
    r.join(C, APP, &ticket("mp", 1, 0x2a), false).unwrap();
    drain(&mut r);
    assert!(r.kick(&key, "mp", LeaveReason::Removed));
    let out = drain(&mut r);
    assert!(out.contains(&Output::Close(PUSH, LeaveReason::Removed)));
    assert!(out.contains(&Output::Close(C, LeaveReason::Removed)));
    assert!(sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::MemberLeft { user_id, .. } if user_id == "mp")));
    assert_eq!(r.participant_count(), 1);
}

/// A signaling session replaced by a new one of the same user keeps the member's push.
#[test]
fn a_reconnecting_socket_keeps_the_push_beside_it() {
    const PUSH: SessionId = SessionId(20);
    let mut r = rooms();
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    r.join(A, APP, &ticket("mp", 1, 0xff), false).unwrap();
    r.join_push(PUSH, APP, &ticket("mp", 1, 0xff)).unwrap();
    r.publish_as(PUSH, Some("app_mp".into()), "rtmp", true, true)
        .unwrap();
    drain(&mut r);
    r.join(C, APP, &ticket("mp", 1, 0xff), false).unwrap();
    let out = drain(&mut r);
    assert!(out.contains(&Output::Close(A, LeaveReason::Replaced)));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::Close(s, _) if *s == PUSH)));
    assert!(
        sent_to(&out, B).is_empty(),
        "the stream and the member stay: {out:?}"
    );
    // A WebRTC publish beside a live push is refused: one stream a member.
    assert!(matches!(
        r.publish(C, true, true),
        Err(RoomError::AlreadyPublishing)
    ));
}

/// Subscriptions are bounded per member and on the node; a refused automatic one is
/// told (429) and counted, an explicit one is an error; the count follows every way a
/// subscription ends.
#[test]
fn subscriptions_are_limited_per_member_and_on_the_node() {
    let mut r = Rooms::new(
        Limits {
            max_rooms: 10,
            max_members_per_room: 10,
            max_publishers_per_room: 10,
            max_publishers: 10,
            max_subscriptions_per_member: 2,
            max_subscriptions: 4,
            congestion_policy: Default::default(),
        },
        UrlBase {
            rtmp: "rtmp://h/live".into(),
            flv: "http://h/live".into(),
            webrtc: "webrtc://h/live".into(),
        },
    );
    let s = |n: u64| SessionId(100 + n);
    // Three publishers; the first watcher takes two of them, then is refused the third.
    for (i, u) in ["p1", "p2", "p3"].iter().enumerate() {
        r.join(s(i as u64), APP, &ticket(u, 1, 0xff), false)
            .unwrap();
        r.publish(s(i as u64), true, true).unwrap();
    }
    drain(&mut r);
    r.join(s(10), APP, &ticket("w1", 1, 0xff), true).unwrap();
    let out = drain(&mut r);
    let subs = media(&out)
        .iter()
        .filter(|m| matches!(m, MediaCommand::Subscribe { .. }))
        .count();
    assert_eq!(subs, 2);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Refused(to, RoomError::TooManySubscriptionsForMember(2), "subscribe") if *to == s(10)
    )));
    assert_eq!(
        RoomError::TooManySubscriptionsForMember(2).limit(),
        Some("subscriptions_per_member")
    );
    assert_eq!(r.subscription_count(), 2);
    // The second watcher fills the node (4), the third is refused by the node's limit.
    r.join(s(11), APP, &ticket("w2", 1, 0xff), true).unwrap();
    drain(&mut r);
    assert_eq!(r.subscription_count(), 4);
    r.join(s(12), APP, &ticket("w3", 1, 0x2a), false).unwrap();
    drain(&mut r);
    let p1 = stream_id_for(
        &RoomKey {
            sdk_app_id: APP,
            room: RoomId::Num(1),
        },
        "p1",
    );
    assert_eq!(
        r.subscribe(s(12), std::slice::from_ref(&p1)),
        Err(RoomError::TooManySubscriptions(4))
    );
    // Every way out gives the place back: an unsubscribe, a stream that ends, a member
    // that leaves.
    r.unsubscribe(s(10), std::slice::from_ref(&p1)).unwrap();
    assert_eq!(r.subscription_count(), 3);
    r.subscribe(s(12), std::slice::from_ref(&p1)).unwrap();
    assert_eq!(r.subscription_count(), 4);
    r.unpublish(s(0), false).unwrap();
    assert_eq!(
        r.subscription_count(),
        2,
        "p1's stream ended: w2's and w3's copies"
    );
    r.leave(s(11), LeaveReason::Left);
    assert_eq!(r.subscription_count(), 1);
    r.leave(s(10), LeaveReason::Left);
    assert_eq!(r.subscription_count(), 0);
}

#[test]
fn a_screen_share_is_a_second_stream_on_its_own_identity() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    // bob may receive the camera but not the sub-stream (0x80).
    r.join(B, APP, &ticket("bob", 1, 0x3f), true).unwrap();
    r.join(C, APP, &ticket("carol", 1, 0xff), true).unwrap();
    r.publish(A, true, true).unwrap();
    drain(&mut r);
    // Video only; the screen needs 0x40, which carol's token lacks below.
    assert!(matches!(
        r.publish_full(A, None, "webrtc", (true, true, true), (None, None)),
        Err(RoomError::ScreenVideoOnly)
    ));
    let screen = r.publish_screen(A, (None, Some(1_000_000))).unwrap();
    assert!(screen.screen && screen.video && !screen.audio);
    assert_eq!(screen.stream_id, format!("{APP}_1_alice_aux"));
    assert!(matches!(
        r.publish_screen(A, (None, None)),
        Err(RoomError::AlreadyPublishing)
    ));
    let out = drain(&mut r);
    let cmds = media(&out);
    assert!(
        cmds.iter().any(
            |c| matches!(c, MediaCommand::AllowPublish { session, screen: true, kinds, .. }
            if *session == A.screen() && kinds == &vec![Kind::Video])
        ),
        "{cmds:?}"
    );
    // carol (0x80) receives it; bob (no 0x80) is told of it but not subscribed.
    let subscribed: Vec<SessionId> = cmds
        .iter()
        .filter_map(|c| match c {
            MediaCommand::Subscribe {
                subscriber,
                stream_id,
                ..
            } if *stream_id == screen.stream_id => Some(*subscriber),
            _ => None,
        })
        .collect();
    assert_eq!(subscribed, vec![C]);
    assert!(sent_to(&out, B)
        .iter()
        .any(|m| matches!(m, ServerMessage::StreamAdded { stream } if stream.screen)));
    assert!(matches!(
        r.subscribe(B, std::slice::from_ref(&screen.stream_id)),
        Err(RoomError::Privilege(_))
    ));
    // A newcomer sees both streams, and the room lists both.
    r.leave(B, LeaveReason::Left);
    drain(&mut r);
    r.join(B, APP, &ticket("dave", 1, 0xff), true).unwrap();
    let out = drain(&mut r);
    let joined = sent_to(&out, B);
    let ServerMessage::Joined { members, .. } = joined[0] else {
        panic!("{joined:?}")
    };
    let alice = members.iter().find(|m| m.user_id == "alice").unwrap();
    assert_eq!(alice.streams.len(), 2);
    assert_eq!(r.summaries()[0].streams.len(), 2);
    // Unpublishing the screen leaves the camera; the screen connection's loss ends the
    // screen only, and its owner hears it.
    r.unpublish(A, true).unwrap();
    let out = drain(&mut r);
    assert!(media(&out).iter().any(
        |c| matches!(c, MediaCommand::EndStream { stream_id } if *stream_id == screen.stream_id)
    ));
    assert_eq!(r.summaries()[0].streams.len(), 1);
    r.publish_screen(A, (None, None)).unwrap();
    drain(&mut r);
    r.screen_lost(A);
    let out = drain(&mut r);
    assert!(sent_to(&out, A)
        .iter()
        .any(|m| matches!(m, ServerMessage::StreamRemoved { stream_id, .. } if *stream_id == screen.stream_id)));
    assert!(r.is_joined(A));
    // Leaving ends both.
    r.publish_screen(A, (None, None)).unwrap();
    drain(&mut r);
    r.leave(A, LeaveReason::Left);
    let out = drain(&mut r);
    let ended = media(&out)
        .iter()
        .filter(|c| matches!(c, MediaCommand::EndStream { .. }))
        .count();
    assert_eq!(ended, 2);
}

#[test]
fn a_screen_share_needs_0x40_and_counts_as_a_publisher() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0x3f), true).unwrap();
    let e = r.publish_screen(A, (None, None)).unwrap_err();
    assert!(e.to_string().contains("0x40"), "{e}");
    r.join(B, APP, &ticket("bob", 1, 0xff), true).unwrap();
    // Two streams of one member fill the room's limit of two publishers.
    r.publish(B, true, true).unwrap();
    r.publish_screen(B, (None, None)).unwrap();
    assert!(matches!(
        r.publish(A, true, false),
        Err(RoomError::TooManyPublishersInRoom { .. })
    ));
    assert_eq!(SessionId(7).screen().screen_owner(), Some(SessionId(7)));
    assert_eq!(SessionId(7).screen_owner(), None);
}

#[test]
fn a_relaying_node_hears_the_room_without_being_listed_announced_or_counted() {
    let mut r = rooms();
    r.join(A, APP, &ticket("alice", 1, 0xff), true).unwrap();
    r.publish(A, true, true).unwrap();
    r.join(B, APP, &ticket("bob", 1, 0x2b), true).unwrap();
    r.join(C, APP, &ticket("carol", 1, 0x2b), true).unwrap();
    drain(&mut r);
    // The room is full (3 members), yet a relay of another node gets in, hears the
    // members and their streams, and receives what it may.
    let relay = SessionId(9);
    r.join(relay, APP, &ticket("weir-relay.c", 1, 0x100 | 0x2a), true)
        .unwrap();
    let out = drain(&mut r);
    for s in [A, B, C] {
        assert!(
            sent_to(&out, s).is_empty(),
            "{s:?} heard of the relay: {out:?}"
        );
    }
    assert!(
        !out.iter().any(|o| matches!(o, Output::Event(_))),
        "{out:?}"
    );
    let joined = sent_to(&out, relay);
    let ServerMessage::Joined { members, .. } = joined[0] else {
        panic!("{joined:?}")
    };
    assert_eq!(members.len(), 3);
    assert!(media(&out).iter().any(|m| matches!(m,
        MediaCommand::Subscribe { subscriber, .. } if *subscriber == relay)));
    // Nobody sees it in a listing; a fourth visible member is still refused.
    assert_eq!(r.summaries()[0].members, vec!["alice", "bob", "carol"]);
    assert_eq!(
        r.members_of(&RoomKey {
            sdk_app_id: APP,
            room: RoomId::Num(1)
        })
        .len(),
        3
    );
    assert!(r
        .join(SessionId(10), APP, &ticket("dave", 1, 0x2b), true)
        .is_err());
    // A member who joins later is not told of it, nor when it goes.
    r.leave(C, LeaveReason::Left);
    drain(&mut r);
    r.join(SessionId(11), APP, &ticket("erin", 1, 0x2b), true)
        .unwrap();
    let out = drain(&mut r);
    let ServerMessage::Joined { members, .. } = sent_to(&out, SessionId(11))[0] else {
        panic!()
    };
    assert!(
        members.iter().all(|m| m.user_id != "weir-relay.c"),
        "{members:?}"
    );
    r.leave(relay, LeaveReason::Left);
    let out = drain(&mut r);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Event(_))),
        "{out:?}"
    );
    for s in [A, B, SessionId(11)] {
        assert!(sent_to(&out, s).is_empty(), "{out:?}");
    }
}
