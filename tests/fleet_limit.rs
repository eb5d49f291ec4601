//! Issue 16, items 4 and 5: one throttle budget (upstream 429 holds and `upstream.rate_limit`)
//! and refresh tokens shared across sidecars. Gateways and the sandbox speak real HTTP on
//! loopback; the fleet tests share a real `redis-server`.

mod common;

use std::time::Duration;

use common::*;
use pcgate::config::RateLimit;
use pcgate::sandbox::SandboxOptions;
use serde_json::json;
use tokio::time::Instant;

/// When each recent request to `route` reached the sandbox (Unix ms), oldest first.
async fn arrivals(sandbox: &TestSandbox, route: &str) -> Vec<u64> {
    sandbox
        .recent(route)
        .await
        .iter()
        .map(|r| r["at_ms"].as_u64().expect("at_ms"))
        .collect()
}

/// The most arrivals in any window of `window_ms` starting at an arrival.
fn most_in_window(arrivals: &[u64], window_ms: u64) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort_unstable();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| **t < sorted[i] + window_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// `n` concurrent calls to distinct invoice pages (no two share a key); their statuses.
async fn distinct_calls(gateways: &[&TestGateway], n: usize) -> Vec<u16> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let url = gateways[i % gateways.len()].url(&format!("/v1/invoices?size=1&offset={i}"));
            tokio::spawn(async move {
                let response = client().get(url).send().await.unwrap();
                response.status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(tokio::time::timeout(WAIT, call).await.unwrap().unwrap());
    }
    statuses
}

#[tokio::test]
async fn without_shared_the_rate_limit_is_local_and_callers_wait_for_their_slot() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.upstream.rate_limit = Some(RateLimit::parse("5/s").unwrap());
    let gateway = start_config(config).await;
    // Tokens first, so only API calls are timed.
    assert_eq!(
        client()
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sandbox.reset_log().await;

    let statuses = distinct_calls(&[&gateway], 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let at = arrivals(&sandbox, "invoices").await;
    assert_eq!(at.len(), 20);
    // Rate 5/s with a burst of 5: no second holds more than burst + rate.
    let most = most_in_window(&at, 1000);
    assert!(
        most <= 10,
        "{most} upstream calls within one second: {at:?}"
    );
    // And the calls were spread out, not sent at once: 15 past the burst at 200 ms each.
    let span = at.iter().max().unwrap() - at.iter().min().unwrap();
    assert!(span >= 2500, "20 calls spread over only {span} ms");
    let (_, metrics) = scrape(&gateway).await;
    assert!(metrics["pcgate_throttle_waits_total{cause=\"rate_limit\"}"] >= 14.0);
    assert_eq!(
        metrics["pcgate_throttle_refused_total{cause=\"rate_limit\"}"],
        0.0
    );
}

#[tokio::test]
async fn a_slot_past_the_deadline_gets_a_partner_center_shaped_429_with_retry_after() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.upstream.rate_limit = Some(RateLimit::parse("1/m").unwrap());
    config.upstream.attempt_timeout = secs(2);
    config.upstream.deadline = secs(2);
    let gateway = start_config(config).await;
    let first = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let started = Instant::now();
    let refused = client()
        .get(gateway.url("/v1/invoices?size=2"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    assert!(refused.headers().contains_key("ms-requestid"));
    let fault: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(fault["code"], 429);
    assert_eq!(fault["errorName"], "RateLimited");
    assert_eq!(fault["source"], "pcgate");
    assert_eq!(sandbox.count("invoices").await, 1);
}

#[tokio::test]
async fn a_429_holds_the_gateway_a_stale_copy_answers_and_others_get_429_at_once() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.upstream.attempt_timeout = secs(3);
    config.upstream.deadline = secs(3);
    {
        let summary = config.route_mut("summary");
        summary.cache_ttl = Some(ms(500));
        summary.stale_while_revalidate = None;
        summary.stale_if_error = Some(secs(3600));
        summary.origin_cache_control = pcgate::config::OriginCacheControl::Ignore;
    }
    let gateway = start_config(config).await;
    let warm = client()
        .get(gateway.url("/v1/invoices/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let fresh_body = warm.text().await.unwrap();
    tokio::time::sleep(ms(700)).await;

    // The upstream throttles one call for 20 s, longer than the call's deadline: its own 429
    // goes back, and the gateway holds.
    sandbox
        .faults(json!({"script": [429], "retry_after": "20"}))
        .await;
    let throttled = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "20");

    // The stale summary may stand in for an error: it answers, with no upstream call.
    let started = Instant::now();
    let stale = client()
        .get(gateway.url("/v1/invoices/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    let status = stale.headers()["cache-status"].to_str().unwrap().to_owned();
    assert!(status.contains("fwd=stale"), "{status}");
    assert_eq!(stale.text().await.unwrap(), fresh_body);
    // An uncached call gets pcgate's own 429 at once, with what is left of the hold.
    let held = client()
        .get(gateway.url("/v1/invoices?size=2"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    assert_eq!(held.status(), 429);
    let retry_after: u64 = held.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((15..=20).contains(&retry_after), "{retry_after}");
    let fault: serde_json::Value = held.json().await.unwrap();
    assert_eq!(fault["errorName"], "Throttled");
    assert_eq!(fault["source"], "pcgate");
    assert_eq!(sandbox.count("invoices").await, 1, "nothing went upstream");
    assert_eq!(sandbox.count("summary").await, 1);
    let (_, metrics) = scrape(&gateway).await;
    assert_eq!(
        metrics["pcgate_throttle_holds_total{origin=\"upstream\"}"],
        1.0
    );
    assert_eq!(
        metrics["pcgate_throttle_refused_total{cause=\"hold\"}"],
        2.0
    );
    assert_eq!(metrics["pcgate_throttle_held_seconds_total"], 20.0);
}

#[tokio::test]
async fn calls_during_a_short_hold_wait_for_it_and_then_succeed() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    assert_eq!(
        client()
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sandbox.reset_log().await;
    sandbox
        .faults(json!({"script": [429], "retry_after": "2"}))
        .await;
    // The first call is throttled, and retry waits its Retry-After; the others, sent during the
    // hold, wait for it too instead of calling.
    let first = tokio::spawn({
        let url = gateway.url("/v1/invoices?size=1&offset=100");
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    });
    tokio::time::sleep(ms(300)).await;
    let statuses = distinct_calls(&[&gateway], 5).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(first.await.unwrap(), 200);
    let recent = sandbox.recent("invoices").await;
    assert_eq!(recent.len(), 7, "one 429, its retry and five others");
    assert_eq!(recent[0]["status"], 429);
    let held_from = recent[0]["at_ms"].as_u64().unwrap();
    for later in &recent[1..] {
        let at = later["at_ms"].as_u64().unwrap();
        assert!(
            at >= held_from + 1900,
            "a call reached the upstream {} ms into a 2 s hold",
            at - held_from
        );
    }
}

/// `[shared]` on `redis` in namespace `ns`, with `timeout` per operation.
fn shared(redis: &TestRedis, ns: &str, timeout: Duration) -> pcgate::config::SharedConfig {
    pcgate::config::SharedConfig {
        redis_url: pcgate::config::RedisUrl::parse(&redis.url()).unwrap(),
        namespace: ns.to_owned(),
        timeout,
    }
}

/// `n` gateways on the sandbox sharing `redis` (namespace `ns`), each with `rate`; each has made
/// one call, so its tokens are fetched, and the log is empty.
async fn fleet(
    sandbox: &TestSandbox,
    redis: &TestRedis,
    ns: &str,
    rate: Option<&str>,
    n: usize,
) -> Vec<TestGateway> {
    let mut gateways = Vec::new();
    for _ in 0..n {
        let mut config = sandbox.config();
        config.upstream.rate_limit = rate.map(|r| RateLimit::parse(r).unwrap());
        config.shared = Some(shared(redis, ns, ms(250)));
        gateways.push(start_config(config).await);
    }
    for gateway in &gateways {
        let warm = client()
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(warm.status(), 200);
    }
    // The warm-up's slots are paid back before the measured calls.
    tokio::time::sleep(ms(1100)).await;
    sandbox.reset_log().await;
    gateways
}

#[tokio::test]
async fn a_429_seen_by_one_sidecar_defers_every_sidecars_calls_by_its_retry_after() {
    let redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateways = fleet(&sandbox, &redis, "hold", None, 3).await;
    sandbox
        .faults(json!({"script": [429], "retry_after": "2"}))
        .await;
    // Sidecar 0 is throttled; retry waits the Retry-After and then succeeds.
    let first = tokio::spawn({
        let url = gateways[0].url("/v1/invoices?size=1&offset=100");
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    });
    tokio::time::sleep(ms(300)).await;
    // The hold is one key in Redis, expiring with the Retry-After.
    let pttl: i64 = redis
        .command(&["PTTL", "pcgate:hold:throttle:hold"])
        .expect("redis answers")
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!((1000..=2000).contains(&pttl), "hold PTTL {pttl}");
    // The other sidecars' calls, sent during the hold, wait for it.
    let started = Instant::now();
    let statuses = distinct_calls(&[&gateways[1], &gateways[2]], 6).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered soon after the hold"
    );
    assert_eq!(first.await.unwrap(), 200);

    let recent = sandbox.recent("invoices").await;
    assert_eq!(recent.len(), 8, "one 429, its retry and six others");
    assert_eq!(recent[0]["status"], 429);
    let held_from = recent[0]["at_ms"].as_u64().unwrap();
    for later in &recent[1..] {
        let at = later["at_ms"].as_u64().unwrap();
        assert!(
            at >= held_from + 1900,
            "a call reached the upstream {} ms into a 2 s hold",
            at - held_from
        );
    }
    for gateway in &gateways[1..] {
        let (_, metrics) = scrape(gateway).await;
        assert_eq!(
            metrics["pcgate_throttle_holds_total{origin=\"fleet\"}"],
            1.0
        );
        assert_eq!(
            metrics["pcgate_throttle_holds_total{origin=\"upstream\"}"],
            0.0
        );
        assert!(metrics["pcgate_throttle_waits_total{cause=\"hold\"}"] >= 1.0);
    }
    let (_, metrics) = scrape(&gateways[0]).await;
    assert_eq!(
        metrics["pcgate_throttle_holds_total{origin=\"upstream\"}"],
        1.0
    );
}

#[tokio::test]
async fn the_rate_limit_holds_across_three_sidecars_with_no_caller_error() {
    let redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateways = fleet(&sandbox, &redis, "rate", Some("5/s"), 3).await;
    let all: Vec<&TestGateway> = gateways.iter().collect();
    let statuses = distinct_calls(&all, 30).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let at = arrivals(&sandbox, "invoices").await;
    assert_eq!(at.len(), 30);
    // One budget for the three: no second holds more than burst + rate (three limiters of their
    // own would have let 15 through at once).
    let most = most_in_window(&at, 1000);
    assert!(
        most <= 10,
        "{most} upstream calls within one second: {at:?}"
    );
    let span = at.iter().max().unwrap() - at.iter().min().unwrap();
    assert!(span >= 4500, "30 calls at 5/s spread over only {span} ms");
    let mut fleet_slots = 0.0;
    for gateway in &gateways {
        let (_, metrics) = scrape(gateway).await;
        fleet_slots += metrics["pcgate_rate_limit_slots_total{scope=\"fleet\"}"];
        assert_eq!(
            metrics["pcgate_throttle_refused_total{cause=\"rate_limit\"}"],
            0.0
        );
    }
    assert_eq!(
        fleet_slots, 33.0,
        "every slot, the warm-up's included, from the fleet"
    );
}

#[tokio::test]
async fn redis_frozen_or_killed_means_the_local_limiter_and_no_caller_error() {
    let mut redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.upstream.rate_limit = Some(RateLimit::parse("50/s").unwrap());
    config.shared = Some(shared(&redis, "down", ms(100)));
    // A 20 s Retry-After is past a 5 s deadline: not retried, and the hold outlasts callers.
    config.upstream.attempt_timeout = secs(5);
    config.upstream.deadline = secs(5);
    let gateway = start_config(config).await;
    let get = |i: usize| {
        let url = gateway.url(&format!("/v1/invoices?size=1&offset={i}"));
        async move {
            let started = Instant::now();
            let response = tokio::time::timeout(WAIT, client().get(url).send())
                .await
                .expect("answered")
                .unwrap();
            (response.status().as_u16(), started.elapsed())
        }
    };
    assert_eq!(get(0).await.0, 200);
    let (_, before) = scrape(&gateway).await;
    assert_eq!(
        before["pcgate_rate_limit_slots_total{scope=\"fleet\"}"],
        1.0
    );

    redis.freeze();
    for i in 1..6 {
        let (status, took) = get(i).await;
        assert_eq!(status, 200, "frozen Redis: call {i}");
        assert!(
            took < Duration::from_secs(2),
            "frozen Redis: call {i} took {took:?}"
        );
    }
    redis.thaw();
    redis.kill();
    for i in 6..11 {
        let (status, took) = get(i).await;
        assert_eq!(status, 200, "Redis killed: call {i}");
        assert!(
            took < Duration::from_secs(2),
            "Redis killed: call {i} took {took:?}"
        );
    }
    let (_, after) = scrape(&gateway).await;
    assert_eq!(
        after["pcgate_rate_limit_slots_total{scope=\"local\"}"],
        10.0
    );
    assert_eq!(after["pcgate_rate_limit_slots_total{scope=\"fleet\"}"], 1.0);
    // An upstream 429 still holds this sidecar while Redis is away.
    sandbox
        .faults(json!({"script": [429], "retry_after": "20"}))
        .await;
    let (status, _) = get(100).await;
    assert_eq!(
        status, 429,
        "the upstream's own 429 (20 s is past the deadline's retry)"
    );
    let (status, took) = get(101).await;
    assert_eq!(status, 429);
    assert!(took < Duration::from_secs(2));
    assert_eq!(
        sandbox.count("invoices").await,
        12,
        "the held call did not go upstream"
    );
}
