//! The public vectors of `shared/spec/credentials.md` at fixed clocks, tampering,
//! and issue/verify round trips for every token family.

use super::*;
use crate::config::AppConfig;

fn app_v1(sdk_app_id: u64, public_pem: &str) -> AppKeys {
    AppKeys::from_config(&AppConfig {
        sdk_app_id,
        public_key_pem: Some(public_pem.into()),
        ..Default::default()
    })
    .unwrap()
}

const V2_KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

fn app_v2() -> AppKeys {
    AppKeys::from_config(&AppConfig {
        sdk_app_id: 1_400_000_000,
        secret_key: Some(V2_KEY.into()),
        ..Default::default()
    })
    .unwrap()
}

const V1_A_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAEtqF9a4XZGHQ/npNSeTcGITcBR7lW7qz1
x0M1QFxkhLM4GiBa2kv7GzLoO2/YqIuXRWV5Xm9EdnrSGd3T7sHFcg==
-----END PUBLIC KEY-----";
const V1_A: &str = "eJxN0E9vgjAUAPA7n6LhumVrC7ixxAOKA4OLM*K2W9NIdS8IQqlSWfbd59Bsfcf3e--yviyEkJ3Olnd8vd4fSsXUqRI2ekL2wL79x6qCjHHFHJn1SKhjsNAVSMH4Rgl56cWGQiZKBRu42rnV9Qxuspz18--URNj26ZfJYjyNOD4UcuE*y9Eu1asd0a1Q969JNK-jMP4I4ebkbsMw149BAEG7jGs-J8kn6VLqRNPG180xGby-ibbl44IC7UYR1JNuFgyHxkoFxeUBxKPkgWDim584CtnAvuwLKCbe*V78G7b1bf0AYUhaRQ__";

const V1_B_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAED5Ffi4qIe4XUZ5zDGR9pC0Z6UL/gCHf0
vgoLVestQxqOGJB5mcbaKULeriaevZoq0Sx8gGtfDlSf4fXwzPtGvg==
-----END PUBLIC KEY-----";
const V1_B: &str = "eJxNz11vgjAYBeB7fkXTW41rKwL1bkMMGnGyidu8IaxUfdehFWpkMfvv8ysL5-Y5yck5WQghPJ*8djIhdoetSc2Plhj1EabUwe1-lrWGUqbZysjyyqzHGSGkUYFcbg2s4F6gZ6UNrnKVZlpDflObXMJYc6SC9RWj4MMfxf57lz0xb8ztcd2aKgrTJYdSh8lsU8dmcnQTFaqdGC48dRxtHp8DL5qLw-fnW*Q8BCJosXj-FfpLx7eLRf2iOUnWVTEgXuI2Jg0U97s9do7LXY6tX*sPGj5LXg__";

const V1_C_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEBH5u4BnS8+O4Ka510XU8SKKzDxUQ
brPwRg9b+YeeP/iPZn3D9eeNs22phtlj9w/5N3Sy73g9td2Y4MCONt3MwA==
-----END PUBLIC KEY-----";
const V1_C: &str = "eJxNjV1PgzAUhv8LtxotBVIw8QImLihIpJKAWUI6KKQulK6UMWf87wIZiefuvB-P*6N9hPiurw4FEYJV2oOmmwAAZDsO0m4Xk54Fk7QgtaJy9i3LglPk6i61gqjCkHN7lRVr6RKGBjSBjVYYqyhXrGYLilQt4yunLLuBq0J9C-qP07Nm*iI-3QRbj7jHEbPYG17D9Dn4wqpuzk8JdqC4uUSN7xGujJcQy8hlvntvh5skE43aB3lWDmGXv53QMaM7ueNIHMwkRvuR4HRsP9*3cf4469fRE5U96-g0DIFu6dAA82m-f-HNW5Q_";

const V1_D_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAEaPVFHhWqRDnKnVlyU5JIzXOUyOJd/pPU
whLUovf+PYBm7otRBptnvJ4EoJ4qeSJNG0v4XdiqM3mtChkhUEFT3Q==
-----END PUBLIC KEY-----";
const V1_D_PRIV: &str = "-----BEGIN EC PARAMETERS-----
BgUrgQQACg==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MHQCAQEEIEJDBDY4KVdj3dPBacADreB772ok45A57YWrUUvc5fMQoAcGBSuBBAAK
oUQDQgAEaPVFHhWqRDnKnVlyU5JIzXOUyOJd/pPUwhLUovf+PYBm7otRBptnvJ4E
oJ4qeSJNG0v4XdiqM3mtChkhUEFT3Q==
-----END EC PRIVATE KEY-----";
const V1_D: &str = "eAFNjlFvgjAUhf9LX1lGbxFZl-iwWGcUt8jQsflCOlpdJwKBguiy-24lmOw8ft89J-cXrRbhPU*SvM50rE*FRI8Io7sOKyEzrbZKlgbyr6THvCiUiLmOnVL8u67EPu6UYTDAJoBd0ndkW6hSxnyruzF6S68bWVYqz0yTYHjADnGu-V5qdbh*BS4BSgHobbNSO4NfJuvxLGCrd8Ws*ZPX*lEz9vYhnZwHDXx6wfLNXnrpccqzj5bZ6Tk8znbR9w-Poa3hdQgsPwQMnjV2N-bGF9O5X5M0stbEWqhhHYzQ3wVIlVX1";
const V1_E: &str = "eAE1jl1vgjAYhf9Lb1lcKxDHEi*YNh2ESZiK86ppS9GKH3y028zifx*Yei6f55y87x9YJctRV1SU1bUqwCtAHuyDoD8GT3epCnnWqlSy7S3jwmKtTnKo*2MUBGjieZbL31q1krJS3weBjbVMiIs5a6qv9bCGDzwcp0xTtx1*eGDTyZabsifbTXyw3U7tevCB17OIVE0a7k38HhHnJU4LPk*Mm2FhMp6S*dfMeb5KlnkIbT9DhUNN4twngawgdJsjz8X3m1iECV7nBwMvG3yKFs6**dktiZiC2z-8z1UA";

const V2_A: &str = "eJyrVgrxCdYrSy1SslIy0jNQ0gHzM1NS80oy0zLBwhWZiflZpXlQqeKU7MSCgswUJStDEwMogMiUZOamKlkZmqOKplYUZBaBxE1NTY3gosWZ6UpWSj5ljuYp*p7l5unBxXnF2WVhVU4uAf7Ozi5JpX7O5SbuHuUhzgZJmQXaTia2SrUAohcx8g__";
const V2_A_PYTHON: &str = "eJyrVgrxCdYrSy1SslJQMtIzUNJRAItkpqTmlWSmZUIkKjIT87NK82CSxSnZiQUFmSlAKUMTAyiAyqVWFGQWpYJkTE1NjRDiJZm5YFFzNPXFmekgG3zKHM1T9D3LzdODi-OKs8vCqpxcAvydnV2SSv2cy03cPcpDnA2SMgu0nUxslWoBHdYzUg__";
const V2_B: &str = "eJxVjc0KgkAYRd-l2xb*kVQDLb5CVJCwEoJ2jo7TpKn410j07qFZ0N1c7jmL*4TAOykdq4CAoWgwH7eIWd6IRIxYirC4tfmk6jgNy1LEQPSFNuVjGnFnQPTlP2WyFNXATdM0frStWUXbBAggosPs7EqNUqfZvg84Iu6iwyW1VBzir8b63gsOBPo1dtSUD4e7vMAttcPUCy1N1rNOjb3I9Rmn5ySiR8-dwOsNn*tDuQ__";
const V2_C: &str = "eJxVzk0LgkAQBuD-MteiVLKPhQ5bmglZSeWhm*Jqk*lu2qoR-fdIK*iFgZnnvcwD9qtdr2Q5ENB6CnSbG0OW3TDChmv0*Vlmn6oIE18IDIGoA*WTtrlhyoCoo39ltcD87bquaz*VBcsDGQEB6tIlsy6nQBNqcFnf9zFtckzMfrNsxy1QXjsGrdpxq*87GAMBKYW-Se0reofC43OjTP0ktQ7joWW6M0*x2dDtTKxFwCtnCs8XEF9Ing__";

const T0: u64 = 1_700_000_000;

#[test]
fn v1_a_secp256k1_with_appid_at_3rd() {
    let app = app_v1(1234, V1_A_PUB);
    let id = app.verify_user_sig(V1_A, "12345", 1_521_710_200).unwrap();
    assert_eq!(id.kind, TokenKind::V1);
    assert_eq!(id.expires_at, 1_521_710_256);
    // Tencent's own test expects "expired", code 9, at today's clock.
    let err = app.verify_user_sig(V1_A, "12345", T0).unwrap_err();
    assert!(matches!(
        err,
        AuthError::Expired {
            expired_at: 1_521_710_256,
            ..
        }
    ));
    assert_eq!(err.tencent_code(), Some(9));
    // valid through time + expire_after inclusive
    assert!(app.verify_user_sig(V1_A, "12345", 1_521_710_256).is_ok());
    assert!(app.verify_user_sig(V1_A, "12345", 1_521_710_257).is_err());
}

#[test]
fn v1_b_secp256k1_high_s_without_appid_at_3rd() {
    let app = app_v1(1_400_000_226, V1_B_PUB);
    let id = app.verify_user_sig(V1_B, "10001", 1_522_227_979).unwrap();
    assert_eq!(id.expires_at, 1_522_227_979 + 2_592_000);
}

#[test]
fn v1_c_p256_high_s_with_crlf_in_sig() {
    let app = app_v1(1_400_078_997, V1_C_PUB);
    let id = app.verify_user_sig(V1_C, "admin", 1_523_240_877).unwrap();
    assert_eq!(id.user_id, "admin");
    assert!(matches!(
        app.verify_user_sig(V1_C, "admin", T0),
        Err(AuthError::Expired { .. })
    ));
}

#[test]
fn v1_d_long_lived_secp256k1_valid_today() {
    let app = app_v1(1_400_001_052, V1_D_PUB);
    let id = app.verify_user_sig(V1_D, "abc", T0).unwrap();
    assert_eq!(id.expires_at, 1_521_991_192 + 999_999_999);
    assert!(app.verify_user_sig(V1_D, "abc", 2_521_991_191).is_ok());
    assert!(app.verify_user_sig(V1_D, "abc", 2_521_991_192).is_err());
}

#[test]
fn v1_e_userbuf_token_verifies_with_seven_lines_but_is_not_a_user_sig() {
    let keys = tls::TlsKeys {
        sdk_app_id: 1_400_001_052,
        public_key: Some(&ec::PublicKey::from_pem(V1_D_PUB).unwrap()),
        secret_key: None,
    };
    let claims = tls::verify(V1_E, &keys, "abc", 1_521_991_744).unwrap();
    assert_eq!(claims.userbuf.as_deref(), Some(&b"abc"[..]));
    let app = app_v1(1_400_001_052, V1_D_PUB);
    // the cross test of tls-sig-api: a userbuf token is not a plain userSig
    assert_eq!(
        app.verify_user_sig(V1_E, "abc", 1_521_991_744).unwrap_err(),
        AuthError::UnexpectedUserbuf
    );
    // "abc" is not a room ticket record
    assert!(matches!(
        app.verify_private_map_key(V1_E, "abc", &RoomId::Num(1), 1_521_991_744),
        Err(AuthError::Userbuf(_))
    ));
}

#[test]
fn v2_a_plain_user_sig_from_node_and_python() {
    let app = app_v2();
    for token in [V2_A, V2_A_PYTHON] {
        let id = app.verify_user_sig(token, "xiaojun", T0).unwrap();
        assert_eq!(id.kind, TokenKind::V2);
        assert_eq!(id.expires_at, T0 + 15_552_000);
    }
    assert!(app
        .verify_user_sig(V2_A, "xiaojun", T0 + 15_552_000)
        .is_ok());
    let err = app
        .verify_user_sig(V2_A, "xiaojun", T0 + 15_552_001)
        .unwrap_err();
    assert_eq!(err.tencent_code(), Some(9));
    // what we issue is byte-for-byte what the official libraries sign
    let ours = app
        .issue_user_sig(TokenKind::V2, "xiaojun", T0, 15_552_000)
        .unwrap();
    let doc = envelope::open(&ours).unwrap();
    assert_eq!(
        doc["TLS.sig"],
        "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="
    );
}

#[test]
fn v2_b_private_map_key_numeric_room() {
    let app = app_v2();
    let t = app
        .verify_private_map_key(V2_B, "xiaojun", &RoomId::Num(10000), T0)
        .unwrap();
    assert_eq!(t.privileges, Privileges::ALL);
    assert_eq!(t.room_expires_at, 1_715_552_000);
    assert!(t.require(Privileges::SEND_VIDEO).is_ok());
    let ours = app
        .issue_private_map_key(
            TokenKind::V2,
            "xiaojun",
            &RoomId::Num(10000),
            Privileges::ALL,
            T0,
            15_552_000,
        )
        .unwrap();
    let doc = envelope::open(&ours).unwrap();
    assert_eq!(
        doc["TLS.userbuf"],
        "AAAHeGlhb2p1blNyTgAAACcQZkE/AAAAAP8AAAAA"
    );
    assert_eq!(
        doc["TLS.sig"],
        "y9Avb5xwHgIgoABbGakLaE0xs+v/dLcIPegbWfcbRLI="
    );
}

#[test]
fn v2_c_private_map_key_string_room() {
    let app = app_v2();
    let room = RoomId::Str("1000000040".into());
    let t = app
        .verify_private_map_key(V2_C, "xiaojun", &room, T0)
        .unwrap();
    assert_eq!(t.room, room);
    // the numeric room 1000000040 is a different room
    assert!(matches!(
        app.verify_private_map_key(V2_C, "xiaojun", &RoomId::Num(1_000_000_040), T0),
        Err(AuthError::RoomMismatch { .. })
    ));
    let ours = app
        .issue_private_map_key(
            TokenKind::V2,
            "xiaojun",
            &room,
            Privileges::ALL,
            T0,
            15_552_000,
        )
        .unwrap();
    assert_eq!(
        envelope::open(&ours).unwrap()["TLS.sig"],
        "uupaOmIqiVUsVoCDvmakmGU86GEQBV0Ie6Q+9GFbowM="
    );
}

#[test]
fn one_changed_character_anywhere_is_refused() {
    let v2 = app_v2();
    let v1 = app_v1(1_400_001_052, V1_D_PUB);
    for (app, token, user, room) in [
        (&v2, V2_A, "xiaojun", None),
        (&v2, V2_B, "xiaojun", Some(RoomId::Num(10000))),
        (&v1, V1_D, "abc", None),
    ] {
        for i in 0..token.len() {
            let mut bytes = token.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            let result = match &room {
                None => app.verify_user_sig(&tampered, user, T0).map(|_| ()),
                Some(r) => app
                    .verify_private_map_key(&tampered, user, r, T0)
                    .map(|_| ()),
            };
            assert!(result.is_err(), "changing byte {i} of {token} was accepted");
        }
    }
}

#[test]
fn altered_claims_with_the_old_signature_fail_the_signature() {
    // Same JSON, identifier changed, signature kept: only the signature can notice.
    let mut doc = envelope::open(V2_A).unwrap();
    doc.insert("TLS.identifier".into(), "mallory".into());
    let forged = envelope::seal(&doc);
    let err = app_v2()
        .verify_user_sig(&forged, "mallory", T0)
        .unwrap_err();
    assert_eq!(
        err,
        AuthError::BadSignature {
            key: "v2 secret key",
            sdk_app_id: 1_400_000_000
        }
    );
    assert_eq!(err.tencent_code(), Some(8));
    let mut doc = envelope::open(V1_D).unwrap();
    doc.insert("TLS.expire_after".into(), "9999999999".into());
    let forged = envelope::seal(&doc);
    let err = app_v1(1_400_001_052, V1_D_PUB)
        .verify_user_sig(&forged, "abc", T0)
        .unwrap_err();
    assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");
}

#[test]
fn each_refusal_has_its_own_error() {
    let app = app_v2();
    let e = app.verify_user_sig(V2_A, "bob", T0).unwrap_err();
    assert!(
        matches!(&e, AuthError::UserMismatch { expected, got, .. } if expected == "bob" && got == "xiaojun")
    );
    assert_eq!(e.tencent_code(), Some(13));

    let other_app = AppKeys::from_config(&AppConfig {
        sdk_app_id: 1_400_000_001,
        secret_key: Some(V2_KEY.into()),
        ..Default::default()
    })
    .unwrap();
    let e = other_app.verify_user_sig(V2_A, "xiaojun", T0).unwrap_err();
    assert_eq!(
        e,
        AuthError::AppMismatch {
            what: "userSig",
            expected: 1_400_000_001,
            got: 1_400_000_000
        }
    );
    assert_eq!(e.tencent_code(), Some(14));

    let e = app
        .verify_private_map_key(V2_B, "xiaojun", &RoomId::Num(10001), T0)
        .unwrap_err();
    assert_eq!(
        e,
        AuthError::RoomMismatch {
            expected: "10001".into(),
            got: "10000".into()
        }
    );

    let e = app
        .verify_user_sig(V2_A, "xiaojun", T0 + 20_000_000)
        .unwrap_err();
    assert!(
        e.to_string().contains("expired at 2024-05-12T22:13:20Z"),
        "{e}"
    );

    let audience = app
        .issue_private_map_key(
            TokenKind::V2,
            "xiaojun",
            &RoomId::Num(7),
            Privileges(0xab),
            T0,
            300,
        )
        .unwrap();
    let t = app
        .verify_private_map_key(&audience, "xiaojun", &RoomId::Num(7), T0)
        .unwrap();
    let e = t.require(Privileges::SEND_VIDEO).unwrap_err();
    assert!(e.to_string().contains("send video"), "{e}");

    assert_eq!(
        app.verify_private_map_key(V2_A, "xiaojun", &RoomId::Num(1), T0)
            .unwrap_err(),
        AuthError::MissingUserbuf
    );
    assert_eq!(
        app.verify_user_sig(V2_B, "xiaojun", T0).unwrap_err(),
        AuthError::UnexpectedUserbuf
    );
}

#[test]
fn room_ticket_expiry_is_enforced_separately_from_the_token() {
    // A token valid for a day whose ticket ran out after 300 s.
    let app = app_v2();
    let buf = UserBuf {
        account: b"xiaojun".to_vec(),
        sdk_app_id: 1_400_000_000,
        room: RoomId::Num(5),
        exp_time: (T0 + 300) as u32,
        privileges: Privileges::ALL,
        account_type: 0,
    };
    let token = tls::issue_v2(
        V2_KEY,
        1_400_000_000,
        "xiaojun",
        T0,
        86_400,
        Some(&buf.to_bytes()),
    );
    assert!(app
        .verify_private_map_key(&token, "xiaojun", &RoomId::Num(5), T0 + 300)
        .is_ok());
    let e = app
        .verify_private_map_key(&token, "xiaojun", &RoomId::Num(5), T0 + 301)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::Expired {
                what: "privateMapKey room ticket",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn truncated_and_foreign_userbufs_are_refused() {
    let app = app_v2();
    let good = UserBuf {
        account: b"xiaojun".to_vec(),
        sdk_app_id: 1_400_000_000,
        room: RoomId::Num(5),
        exp_time: (T0 + 300) as u32,
        privileges: Privileges::ALL,
        account_type: 0,
    };
    let bytes = good.to_bytes();
    let truncated = tls::issue_v2(
        V2_KEY,
        1_400_000_000,
        "xiaojun",
        T0,
        300,
        Some(&bytes[..bytes.len() - 3]),
    );
    let e = app
        .verify_private_map_key(&truncated, "xiaojun", &RoomId::Num(5), T0)
        .unwrap_err();
    assert!(matches!(e, AuthError::Userbuf(_)), "{e}");
    assert_eq!(e.tencent_code(), Some(15));

    // a ticket for someone else inside alice's signed token
    let foreign = UserBuf {
        account: b"mallory".to_vec(),
        ..good.clone()
    };
    let token = tls::issue_v2(
        V2_KEY,
        1_400_000_000,
        "xiaojun",
        T0,
        300,
        Some(&foreign.to_bytes()),
    );
    assert!(matches!(
        app.verify_private_map_key(&token, "xiaojun", &RoomId::Num(5), T0),
        Err(AuthError::UserMismatch {
            what: "privateMapKey room ticket",
            ..
        })
    ));
    let other_app = UserBuf {
        sdk_app_id: 1_400_000_999,
        ..good
    };
    let token = tls::issue_v2(
        V2_KEY,
        1_400_000_000,
        "xiaojun",
        T0,
        300,
        Some(&other_app.to_bytes()),
    );
    assert!(matches!(
        app.verify_private_map_key(&token, "xiaojun", &RoomId::Num(5), T0),
        Err(AuthError::AppMismatch {
            what: "privateMapKey room ticket",
            ..
        })
    ));
}

#[test]
fn zlib_bomb_token_is_refused() {
    use flate2::write::ZlibEncoder;
    use std::io::Write;
    let mut enc = ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![b' '; 4 * 1024 * 1024]).unwrap();
    let bomb = envelope::b64x_encode(&enc.finish().unwrap());
    let e = app_v2().verify_user_sig(&bomb, "x", T0).unwrap_err();
    assert_eq!(
        e,
        AuthError::Inflated {
            limit: envelope::MAX_INFLATED
        }
    );
    assert_eq!(e.tencent_code(), Some(3));
}

fn full_app() -> AppKeys {
    AppKeys::from_config(&AppKeys::generate_config(1_400_000_123)).unwrap()
}

#[test]
fn round_trips_for_every_kind() {
    let app = full_app();
    for kind in [TokenKind::V1, TokenKind::V2, TokenKind::Jwt] {
        let sig = app.issue_user_sig(kind, "alice", T0, 3600).unwrap();
        let id = app.verify_user_sig(&sig, "alice", T0 + 10).unwrap();
        assert_eq!(id.kind, kind);
        assert_eq!(id.sdk_app_id, 1_400_000_123);
        for room in [RoomId::Num(4_294_967_295), RoomId::Str("hearing-42".into())] {
            let key = app
                .issue_private_map_key(kind, "alice", &room, Privileges(0x2a), T0, 3600)
                .unwrap();
            let t = app
                .verify_private_map_key(&key, "alice", &room, T0 + 10)
                .unwrap();
            assert_eq!(t.privileges, Privileges(0x2a), "{kind:?}");
            assert_eq!(t.identity.kind, kind);
            assert!(t.require(Privileges::SEND_AUDIO).is_err());
            let wrong_room = RoomId::Num(1);
            assert!(matches!(
                app.verify_private_map_key(&key, "alice", &wrong_room, T0),
                Err(AuthError::RoomMismatch { .. })
            ));
            assert!(matches!(
                app.verify_private_map_key(&key, "alice", &room, T0 + 3601),
                Err(AuthError::Expired { .. })
            ));
        }
    }
}

#[test]
fn jwt_refusals() {
    let app = full_app();
    let token = app.issue_user_sig(TokenKind::Jwt, "alice", T0, 60).unwrap();
    assert!(matches!(
        app.verify_user_sig(&token, "bob", T0),
        Err(AuthError::UserMismatch { .. })
    ));
    // exp is exclusive
    assert!(app.verify_user_sig(&token, "alice", T0 + 59).is_ok());
    assert!(matches!(
        app.verify_user_sig(&token, "alice", T0 + 60),
        Err(AuthError::Expired { expired_at, .. }) if expired_at == T0 + 60
    ));
    // a key from another app does not know this kid's key
    let other = AppKeys::from_config(&AppKeys::generate_config(1_400_000_123)).unwrap();
    assert!(matches!(
        other.verify_user_sig(&token, "alice", T0),
        Err(AuthError::BadSignature { .. })
    ));
    let mut no_kid = other.clone();
    no_kid.jwt_keys.clear();
    assert!(matches!(
        no_kid.verify_user_sig(&token, "alice", T0),
        Err(AuthError::JwtUnknownKid { .. })
    ));
    // a JWT userSig is not a privateMapKey
    assert_eq!(
        app.verify_private_map_key(&token, "alice", &RoomId::Num(1), T0)
            .unwrap_err(),
        AuthError::MissingUserbuf
    );
}

#[test]
fn missing_keys_are_named() {
    let app = AppKeys::from_config(&AppConfig {
        sdk_app_id: 7,
        ..Default::default()
    })
    .unwrap();
    let e = app.issue_user_sig(TokenKind::V1, "a", T0, 1).unwrap_err();
    assert!(e.to_string().contains("private_key_pem"), "{e}");
    let e = app_v1(1_400_001_052, V1_D_PUB)
        .verify_user_sig(V2_A, "xiaojun", T0)
        .unwrap_err();
    // app id differs first; with the right id, the missing secret is named
    assert!(matches!(e, AuthError::AppMismatch { .. }));
    let app = app_v1(1_400_000_000, V1_D_PUB);
    let e = app.verify_user_sig(V2_A, "xiaojun", T0).unwrap_err();
    assert!(e.to_string().contains("secret_key"), "{e}");
}

#[test]
fn v1_issuing_with_the_published_secp256k1_key_verifies_with_its_public_key() {
    let app = AppKeys::from_config(&AppConfig {
        sdk_app_id: 1_400_001_052,
        private_key_pem: Some(V1_D_PRIV.into()),
        public_key_pem: Some(V1_D_PUB.into()),
        ..Default::default()
    })
    .unwrap();
    let token = app.issue_user_sig(TokenKind::V1, "abc", T0, 100).unwrap();
    assert!(app.verify_user_sig(&token, "abc", T0).is_ok());
}

#[test]
fn garbage_never_panics() {
    let app = full_app();
    let samples = [
        "",
        " ",
        ".",
        "..",
        "a.b.c",
        "eJ",
        "eAE",
        "____",
        "%%%",
        "\u{0}",
        "a.b",
        "eyJhbGciOiJFUzI1NiIsImtpZCI6ImRldi0xIn0.e30.AAAA",
    ];
    for s in samples {
        let _ = app.verify_user_sig(s, "u", T0);
        let _ = app.verify_private_map_key(s, "u", &RoomId::Num(1), T0);
    }
}

/// An unfilled template (`secret_key = ""`) would sign tokens anyone can make.
#[test]
fn an_empty_hmac_key_stops_the_app_from_loading() {
    for field in ["secret_key", "live_push_key", "live_play_key"] {
        let mut c = AppKeys::generate_config(1_400_000_000);
        match field {
            "secret_key" => c.secret_key = Some(" ".into()),
            "live_push_key" => c.live_push_key = Some(String::new()),
            _ => c.live_play_key = Some(String::new()),
        }
        let e = AppKeys::from_config(&c).unwrap_err().to_string();
        assert!(e.contains(&format!("{field} is empty")), "{e}");
    }
}
