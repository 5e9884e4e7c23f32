use super::*;

fn event(n: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("event_type".into(), 100.into());
    m.insert("n".into(), n.into());
    m
}

fn n_of(r: &Request) -> u64 {
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn delivers_in_order_one_at_a_time_with_tencent_signs() {
    let t0 = Instant::now();
    let mut o = Outbox::new(OutboxConfig::default(), "key123");
    o.push("record", 1, event(1), t0);
    o.push("record", 1, event(2), t0);
    let r = o.poll_send(t0, 1_700_000_000).unwrap();
    assert_eq!(n_of(&r), 1);
    assert!(o.poll_send(t0, 1_700_000_000).is_none(), "one in flight");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["t"], 1_700_000_600u64);
    assert_eq!(v["sign"], tencent_sign("key123", 1_700_000_600));
    assert_eq!(r.signature, body_signature("key123", &r.body));
    o.on_result(true, t0);
    assert_eq!(n_of(&o.poll_send(t0, 1_700_000_000).unwrap()), 2);
    o.on_result(true, t0);
    assert!(o.is_empty());
    assert_eq!(o.stats.delivered, 2);
}

#[test]
fn tencent_sign_is_md5_of_key_and_decimal_t() {
    // md5("abc1234") computed independently (coreutils md5sum).
    assert_eq!(
        tencent_sign("abc", 1234),
        "a141c47927929bc2d1fb6d336a256df4"
    );
}

#[test]
fn retries_with_backoff_until_the_backend_comes_back() {
    let t0 = Instant::now();
    let cfg = OutboxConfig::default();
    let mut o = Outbox::new(cfg, "k");
    o.push("record", 1, event(1), t0);
    let mut now = t0;
    let mut delays = Vec::new();
    for _ in 0..8 {
        assert!(o.poll_send(now, 0).is_some());
        o.on_result(false, now);
        let next = o.poll_timeout().unwrap();
        delays.push((next - now).as_millis());
        assert!(o.poll_send(now, 0).is_none(), "not before the backoff");
        now = next;
    }
    assert_eq!(
        delays,
        vec![500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
    );
    // Back after ~45 s down: the event goes out at the next try.
    let r = o.poll_send(now, 0).unwrap();
    assert_eq!(n_of(&r), 1);
    o.on_result(true, now);
    assert_eq!(o.stats.failed_attempts, 8);
    assert_eq!(o.stats.delivered, 1);
    assert!(o.poll_timeout().is_none());
}

#[test]
fn bounded_by_count_and_bytes_dropping_the_oldest_but_not_the_one_in_flight() {
    let t0 = Instant::now();
    let cfg = OutboxConfig {
        max_events: 3,
        ..Default::default()
    };
    let mut o = Outbox::new(cfg, "k");
    o.push("x", 1, event(1), t0);
    let r = o.poll_send(t0, 0).unwrap();
    for n in 2..=10 {
        o.push("x", 1, event(n), t0);
    }
    assert_eq!(o.len(), 3);
    assert_eq!(o.stats.dropped_full, 7);
    assert_eq!(n_of(&r), 1);
    o.on_result(true, t0);
    let left: Vec<u64> = (0..2)
        .map(|_| {
            let r = o.poll_send(t0, 0).unwrap();
            o.on_result(true, t0);
            n_of(&r)
        })
        .collect();
    assert_eq!(left, vec![9, 10]);

    let cfg = OutboxConfig {
        max_bytes: 200,
        ..Default::default()
    };
    let mut o = Outbox::new(cfg, "k");
    for n in 0..100 {
        o.push("x", 1, event(n), t0);
    }
    assert!(o.len() * 20 <= 220, "{} queued", o.len());
}

#[test]
fn an_event_too_old_is_given_up() {
    let t0 = Instant::now();
    let cfg = OutboxConfig {
        give_up_after: Duration::from_secs(60),
        ..Default::default()
    };
    let mut o = Outbox::new(cfg, "k");
    o.push("x", 1, event(1), t0);
    o.push("x", 1, event(2), t0 + Duration::from_secs(50));
    assert!(o.poll_send(t0, 0).is_some());
    o.on_result(false, t0);
    let later = t0 + Duration::from_secs(61);
    let r = o.poll_send(later, 0).unwrap();
    assert_eq!(n_of(&r), 2);
    assert_eq!(o.stats.expired, 1);
}
