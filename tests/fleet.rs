//! The fleet tier on a real `redis-server` (tests/common/redis.rs): the shared handle, then
//! gateways sharing one Redis and the sandbox.

mod common;

use common::*;
use pcgate::config::{RedisUrl, SharedConfig};
use pcgate::metrics::Metrics;
use pcgate::shared::{Op, Shared, Unavailable};
use tokio::time::Instant;

fn shared_config(url: &str, namespace: &str) -> SharedConfig {
    SharedConfig {
        redis_url: RedisUrl::parse(url).expect("a valid Redis URL"),
        namespace: namespace.to_owned(),
        timeout: ms(50),
        key_file: None,
    }
}

#[tokio::test]
async fn the_handle_locks_with_an_owner_token_and_releases_only_its_own() {
    let redis = start_redis();
    let metrics = Metrics::new();
    let shared = Shared::connect(&shared_config(&redis.url(), "t1"), None, &metrics).unwrap();
    assert_eq!(shared.key("entry", "abc"), "pcgate:t1:entry:abc");
    let key = shared.key("lock", "k");
    let lease = shared
        .try_lock(&key, secs(10))
        .await
        .unwrap()
        .expect("a free lock is taken");
    assert_eq!(shared.try_lock(&key, secs(10)).await.unwrap(), None);
    // Another owner's token does not release it.
    let foreign = pcgate::shared::Lease {
        key: key.clone(),
        token: "someone-else".into(),
    };
    assert!(!shared.release(&foreign).await.unwrap());
    assert!(shared.release(&lease).await.unwrap());
    assert!(shared.try_lock(&key, ms(200)).await.unwrap().is_some());
    // Its expiry frees it for the next taker.
    tokio::time::sleep(ms(400)).await;
    assert!(shared.try_lock(&key, secs(1)).await.unwrap().is_some());
    let got: Option<String> = shared
        .query(Op::Get, redis::cmd("GET").arg("pcgate:t1:missing"))
        .await
        .unwrap();
    assert_eq!(got, None);
}

#[tokio::test]
async fn a_frozen_or_absent_redis_costs_at_most_the_timeout_then_the_breaker_skips_it() {
    let mut redis = start_redis();
    let metrics = Metrics::new();
    let shared = Shared::connect(&shared_config(&redis.url(), "t2"), None, &metrics).unwrap();
    let ping = || async {
        let started = Instant::now();
        let result: Result<String, Unavailable> = shared.query(Op::Get, &redis::cmd("PING")).await;
        (result, started.elapsed())
    };
    assert_eq!(ping().await.0.unwrap(), "PONG");
    redis.freeze();
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let (result, took) = ping().await;
        assert!(
            took < ms(50) + secs(1),
            "a frozen Redis held a call {took:?}"
        );
        outcomes.push(result.unwrap_err());
    }
    assert!(
        outcomes.contains(&Unavailable::TimedOut(ms(50))),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.last(),
        Some(&Unavailable::Skipped),
        "the breaker opens after repeated failures: {outcomes:?}"
    );
    let scrape = metrics.encode();
    assert!(scrape.contains("pcgate_shared_breaker_state 2"), "{scrape}");
    assert!(
        !scrape.contains("pcgate_shared_errors_total{op=\"get\"} 0"),
        "{scrape}"
    );
    redis.thaw();
    // After the cool-off, the probe finds Redis again and sharing resumes (bounded wait).
    let started = Instant::now();
    loop {
        if let Ok(pong) = ping().await.0 {
            assert_eq!(pong, "PONG");
            break;
        }
        assert!(started.elapsed() < WAIT, "sharing did not resume");
        tokio::time::sleep(ms(100)).await;
    }
    assert!(metrics.encode().contains("pcgate_shared_breaker_state 0"));
    // Killed: refused connections are as quick, and a restarted server is found again.
    redis.kill();
    let (result, took) = ping().await;
    assert!(
        result.is_err() && took < ms(50) + secs(1),
        "{result:?} {took:?}"
    );
    redis.restart();
    let started = Instant::now();
    while ping().await.0.is_err() {
        assert!(started.elapsed() < WAIT, "no reconnection after a restart");
        tokio::time::sleep(ms(100)).await;
    }
}

#[tokio::test]
async fn a_gateway_starts_with_redis_down_and_exports_the_shared_families_at_zero() {
    let port = free_port();
    let sandbox = start_sandbox(Default::default()).await;
    let mut config = sandbox.config();
    config.shared = Some(shared_config(&format!("redis://127.0.0.1:{port}"), "t3"));
    let gateway = start_config(config).await;
    let scrape = scrape(&gateway).await;
    for line in [
        "pcgate_shared_lookups_total{result=\"hit\"} 0",
        "pcgate_shared_lookups_total{result=\"skipped\"} 0",
        "pcgate_shared_errors_total{op=\"put\"} 0",
        "pcgate_shared_lock_waits_total{outcome=\"took_over\"} 0",
        "pcgate_shared_breaker_state 0",
    ] {
        assert!(scrape.contains(line), "{line} missing:\n{scrape}");
    }
}

async fn scrape(gateway: &TestGateway) -> String {
    client()
        .get(format!("http://{}/metrics", gateway.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
