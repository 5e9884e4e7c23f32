//! `weir token` and `weir keygen` as a backend developer would run them: what the
//! CLI issues, the CLI verifies, for every token family; invalid input exits non-zero.

use std::path::Path;
use std::process::{Command, Output};

use weir::config::Config;

fn weir(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(cwd)
        .env_remove("WEIR_CONFIG")
        .output()
        .expect("weir runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

fn dev_config(dir: &Path) -> String {
    let path = dir.join("apps.toml");
    Config::development(None).write(&path).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn issued_tokens_of_every_kind_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dev_config(dir.path());
    let d = dir.path();
    for kind in ["v1", "v2", "jwt"] {
        let sig = ok(&weir(
            &[
                "token",
                "usersig",
                "--config",
                &cfg,
                "--sdkappid",
                "1400000000",
                "--userid",
                "alice",
                "--kind",
                kind,
                "--now",
                "1700000000",
                "--expire",
                "600",
            ],
            d,
        ));
        let claims = ok(&weir(
            &[
                "token",
                "verify",
                &sig,
                "--config",
                &cfg,
                "--sdkappid",
                "1400000000",
                "--userid",
                "alice",
                "--now",
                "1700000100",
            ],
            d,
        ));
        let claims: serde_json::Value = serde_json::from_str(&claims).unwrap();
        assert_eq!(claims["kind"], kind);
        assert_eq!(claims["user_id"], "alice");
        assert_eq!(
            claims["expires_at"],
            if kind == "jwt" {
                1_700_000_599u64
            } else {
                1_700_000_600
            }
        );

        // expired, and the wrong user: exit 1 with the reason on stderr
        let expired = weir(
            &[
                "token",
                "verify",
                &sig,
                "--config",
                &cfg,
                "--sdkappid",
                "1400000000",
                "--userid",
                "alice",
                "--now",
                "1700001000",
            ],
            d,
        );
        assert_eq!(expired.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&expired.stderr).contains("expired at"));
        let wrong = weir(
            &[
                "token",
                "verify",
                &sig,
                "--config",
                &cfg,
                "--sdkappid",
                "1400000000",
                "--userid",
                "bob",
                "--now",
                "1700000100",
            ],
            d,
        );
        assert_eq!(wrong.status.code(), Some(1));

        for room in [["--roomid", "1234"], ["--strroomid", "court-7"]] {
            let key = ok(&weir(
                &[
                    "token",
                    "privatemapkey",
                    "--config",
                    &cfg,
                    "--sdkappid",
                    "1400000000",
                    "--userid",
                    "alice",
                    room[0],
                    room[1],
                    "--privileges",
                    "0x2a",
                    "--kind",
                    kind,
                    "--now",
                    "1700000000",
                ],
                d,
            ));
            let t = ok(&weir(
                &[
                    "token",
                    "verify",
                    &key,
                    "--config",
                    &cfg,
                    "--sdkappid",
                    "1400000000",
                    "--userid",
                    "alice",
                    room[0],
                    room[1],
                    "--require",
                    "0x08",
                    "--now",
                    "1700000001",
                ],
                d,
            ));
            let t: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(t["privileges"], 0x2a);
            // the audience ticket does not allow sending video
            let refused = weir(
                &[
                    "token",
                    "verify",
                    &key,
                    "--config",
                    &cfg,
                    "--sdkappid",
                    "1400000000",
                    "--userid",
                    "alice",
                    room[0],
                    room[1],
                    "--require",
                    "0x10",
                    "--now",
                    "1700000001",
                ],
                d,
            );
            assert_eq!(refused.status.code(), Some(1));
            assert!(String::from_utf8_lossy(&refused.stderr).contains("send video"));
        }
    }
}

#[test]
fn published_v2_vector_verifies_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let token = "eJyrVgrxCdYrSy1SslIy0jNQ0gHzM1NS80oy0zLBwhWZiflZpXlQqeKU7MSCgswUJStDEwMogMiUZOamKlkZmqOKplYUZBaBxE1NTY3gosWZ6UpWSj5ljuYp*p7l5unBxXnF2WVhVU4uAf7Ozi5JpX7O5SbuHuUhzgZJmQXaTia2SrUAohcx8g__";
    let key = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
    let out = ok(&weir(
        &[
            "token",
            "verify",
            token,
            "--secret-key",
            key,
            "--sdkappid",
            "1400000000",
            "--userid",
            "xiaojun",
            "--now",
            "1700000000",
        ],
        dir.path(),
    ));
    assert!(out.contains("\"kind\": \"v2\""), "{out}");
    let bad = weir(
        &[
            "token",
            "verify",
            &token.replace("eJyrVgrx", "eJyrVgrY"),
            "--secret-key",
            key,
            "--sdkappid",
            "1400000000",
            "--userid",
            "xiaojun",
            "--now",
            "1700000000",
        ],
        dir.path(),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Tencent error code"));
}

#[test]
fn keygen_keys_issue_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let listed = ok(&weir(&["keygen", "--out", "es256"], d));
    assert!(listed.contains("es256.key") && listed.contains("es256.pub"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("es256.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let jwt = ok(&weir(
        &[
            "token",
            "usersig",
            "--sdkappid",
            "7",
            "--userid",
            "u1",
            "--kind",
            "jwt",
            "--jwt-private-key",
            "k1=es256.key",
        ],
        d,
    ));
    assert_eq!(jwt.matches('.').count(), 2);
    ok(&weir(
        &[
            "token",
            "verify",
            &jwt,
            "--sdkappid",
            "7",
            "--userid",
            "u1",
            "--jwt-key",
            "k1=es256.pub",
        ],
        d,
    ));
    // a v1 (ECDSA) token from a secp256k1 key, checked with the public half only
    ok(&weir(
        &["keygen", "--curve", "secp256k1", "--out", "legacy"],
        d,
    ));
    let v1 = ok(&weir(
        &[
            "token",
            "usersig",
            "--sdkappid",
            "7",
            "--userid",
            "u1",
            "--kind",
            "v1",
            "--private-key",
            "legacy.key",
        ],
        d,
    ));
    ok(&weir(
        &[
            "token",
            "verify",
            &v1,
            "--sdkappid",
            "7",
            "--userid",
            "u1",
            "--public-key",
            "legacy.pub",
        ],
        d,
    ));
    let other = weir(
        &[
            "token",
            "verify",
            &v1,
            "--sdkappid",
            "7",
            "--userid",
            "u1",
            "--public-key",
            "es256.pub",
        ],
        d,
    );
    assert_eq!(other.status.code(), Some(1));
}

#[test]
fn live_urls_sign_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = ok(&weir(
        &[
            "token",
            "sign-url",
            "rtmp://127.0.0.1:1935/live/room1_alice",
            "--kind",
            "push",
            "--sdkappid",
            "9",
            "--push-key",
            "pk",
            "--expire-at",
            "1700000000",
        ],
        d,
    ));
    assert!(url.ends_with("txTime=6553F100"), "{url}");
    let checked = ok(&weir(
        &[
            "token",
            "check-url",
            &url,
            "--kind",
            "push",
            "--sdkappid",
            "9",
            "--push-key",
            "pk",
            "--now",
            "1700000000",
        ],
        d,
    ));
    assert!(checked.contains("\"stream\": \"room1_alice\""), "{checked}");
    let late = weir(
        &[
            "token",
            "check-url",
            &url,
            "--kind",
            "push",
            "--sdkappid",
            "9",
            "--push-key",
            "pk",
            "--now",
            "1700000001",
        ],
        d,
    );
    assert_eq!(late.status.code(), Some(1));
    // the official example, checked as a play URL with 10 minutes of extra validity
    let official =
        "http://domain/live/test.flv?txTime=5c2acacc&txSecret=b77e812107e1d8b8f247885a46e1bd34";
    ok(&weir(
        &[
            "token",
            "check-url",
            official,
            "--kind",
            "play",
            "--sdkappid",
            "9",
            "--play-key",
            "somestring",
            "--play-validity",
            "600",
            "--now",
            "1546308300",
        ],
        d,
    ));
    let wrong_key = weir(
        &[
            "token",
            "check-url",
            official,
            "--kind",
            "play",
            "--sdkappid",
            "9",
            "--play-key",
            "other",
            "--now",
            "1546308300",
        ],
        d,
    );
    assert_eq!(wrong_key.status.code(), Some(1));
}

#[test]
fn missing_keys_are_a_usage_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let out = weir(
        &[
            "token",
            "usersig",
            "--sdkappid",
            "7",
            "--userid",
            "u",
            "--kind",
            "v1",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("private_key_pem"));
}
