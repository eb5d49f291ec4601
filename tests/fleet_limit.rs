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
        key_file: None,
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
    let timeout = ms(100);
    config.shared = Some(shared(&redis, "down", timeout));
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
    // The usual time of a call, Redis up: a frozen or killed Redis adds at most shared.timeout.
    let mut usual = Duration::ZERO;
    for i in [0, 200, 201] {
        let (status, took) = get(i).await;
        assert_eq!(status, 200);
        usual = usual.max(took);
    }
    let bound = usual + timeout + ms(300);
    let (_, before) = scrape(&gateway).await;
    assert_eq!(
        before["pcgate_rate_limit_slots_total{scope=\"fleet\"}"],
        3.0
    );

    redis.freeze();
    for i in 1..6 {
        let (status, took) = get(i).await;
        assert_eq!(status, 200, "frozen Redis: call {i}");
        assert!(
            took < bound,
            "frozen Redis: call {i} took {took:?} (usual {usual:?}, shared.timeout {timeout:?})"
        );
    }
    redis.thaw();
    redis.kill();
    for i in 6..11 {
        let (status, took) = get(i).await;
        assert_eq!(status, 200, "Redis killed: call {i}");
        assert!(
            took < bound,
            "Redis killed: call {i} took {took:?} (usual {usual:?}, shared.timeout {timeout:?})"
        );
    }
    let (_, after) = scrape(&gateway).await;
    assert_eq!(
        after["pcgate_rate_limit_slots_total{scope=\"local\"}"],
        10.0
    );
    assert_eq!(after["pcgate_rate_limit_slots_total{scope=\"fleet\"}"], 3.0);
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
        14,
        "the held call did not go upstream"
    );
}

/// A 32-byte key file (hex) in `dir`.
fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("shared-key");
    std::fs::write(&path, format!("{}\n", "5a".repeat(32))).unwrap();
    path
}

/// A gateway whose `user` credential starts from `refresh_token_file` (seeded with the
/// sandbox's first refresh token) and shares it through `redis` with `key_file`.
async fn sharing_gateway(
    sandbox: &TestSandbox,
    redis: &TestRedis,
    dir: &std::path::Path,
    name: &str,
    key_file: Option<&std::path::Path>,
) -> (TestGateway, std::path::PathBuf) {
    let file = dir.join(format!("refresh-token-{name}"));
    std::fs::write(
        &file,
        format!("{}\n", pcgate::sandbox::SANDBOX_REFRESH_TOKEN),
    )
    .unwrap();
    let mut config = sandbox.config();
    config.user_mut().refresh_token = None;
    config.user_mut().refresh_token_file = Some(file.clone());
    let mut shared = shared(redis, "tokens", ms(250));
    shared.key_file = key_file.map(std::path::Path::to_owned);
    config.shared = Some(shared);
    (start_config(config).await, file)
}

/// `/v1/invoices/{id}` of the sandbox's first invoice (an App+User route, cached nowhere, so
/// every sidecar needs its own App+User token to answer it), found with the app-only token.
async fn an_invoice(gateway: &TestGateway) -> String {
    let list: serde_json::Value = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    format!("/v1/invoices/{}", list["items"][0]["id"].as_str().unwrap())
}

/// `GET path` (an App+User route) on each gateway at once; the statuses.
async fn user_calls(gateways: &[&TestGateway], path: &str) -> Vec<u16> {
    let calls: Vec<_> = gateways
        .iter()
        .map(|g| {
            let url = g.url(path);
            tokio::spawn(async move { client().get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(tokio::time::timeout(WAIT, call).await.unwrap().unwrap());
    }
    statuses
}

/// Every value in `redis`, as one string (hashes by field and value).
async fn every_value(redis: &TestRedis) -> String {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut all = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap()],
            _ => Vec::new(),
        };
        all.push_str(&key);
        for part in value {
            all.push(' ');
            all.push_str(&String::from_utf8_lossy(&part));
        }
        all.push('\n');
    }
    all
}

#[tokio::test]
async fn two_sidecars_rotating_one_refresh_token_concurrently_end_with_one_valid_chain() {
    let redis = start_redis();
    // Tokens live 2 s: each sidecar's refresher rotates the refresh token about every second.
    let sandbox = start_sandbox(SandboxOptions {
        token_ttl: secs(2),
        ..SandboxOptions::default()
    })
    .await;
    let dir = temp_dir("shared-refresh");
    let key = key_file(&dir);
    let (a, file_a) = sharing_gateway(&sandbox, &redis, &dir, "a", Some(&key)).await;
    let (b, file_b) = sharing_gateway(&sandbox, &redis, &dir, "b", Some(&key)).await;
    let invoice = an_invoice(&a).await;
    // Both start from the same refresh token and need an App+User token at once.
    assert_eq!(user_calls(&[&a, &b], &invoice).await, [200, 200]);
    // Five seconds of App+User calls on both while both keep rotating.
    let until = Instant::now() + secs(5);
    while Instant::now() < until {
        assert_eq!(user_calls(&[&a, &b], &invoice).await, [200, 200]);
        tokio::time::sleep(ms(200)).await;
    }
    // No refresh was ever refused: nobody presented a refresh token the other had used.
    let statuses: Vec<u64> = sandbox
        .recent("token")
        .await
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "token answers {statuses:?}"
    );
    let mut stored = 0.0;
    let mut adopted = 0.0;
    for gateway in [&a, &b] {
        let (_, metrics) = scrape(gateway).await;
        let outcome = |o: &str| {
            metrics[&format!(
                "pcgate_shared_token_refreshes_total{{credential=\"user\",outcome=\"{o}\"}}"
            )]
        };
        stored += outcome("stored");
        adopted += outcome("adopted");
        assert_eq!(outcome("conflict"), 0.0);
        assert_eq!(outcome("unavailable"), 0.0);
        assert_eq!(
            metrics["pcgate_requests_total{route=\"invoice\",status=\"5xx\"}"],
            0.0
        );
    }
    // Each sidecar rotated several times, each time from the token the other had stored.
    assert!(stored >= 6.0, "{stored} rotations stored");
    assert!(adopted >= 4.0, "{adopted} tokens taken up from the other");
    // Each file holds the token its sidecar last rotated to; the chain goes on from the newest.
    let (ta, tb) = (
        std::fs::read_to_string(&file_a).unwrap(),
        std::fs::read_to_string(&file_b).unwrap(),
    );
    assert!(ta.starts_with("sbx-refresh-") && tb.starts_with("sbx-refresh-"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn without_a_key_file_sidecars_rotate_apart_and_the_second_loses_its_token() {
    // The control for the test above: the same two sidecars, not sharing.
    let redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let dir = temp_dir("unshared-refresh");
    let (a, _) = sharing_gateway(&sandbox, &redis, &dir, "a", None).await;
    let (b, _) = sharing_gateway(&sandbox, &redis, &dir, "b", None).await;
    let invoice = an_invoice(&a).await;
    let mut statuses = user_calls(&[&a, &b], &invoice).await;
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 503],
        "one of them presented a used refresh token"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_refresh_token_in_redis_is_sealed_and_no_access_token_is_there() {
    let redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let dir = temp_dir("sealed-refresh");
    let key = key_file(&dir);
    let (a, file_a) = sharing_gateway(&sandbox, &redis, &dir, "a", Some(&key)).await;
    assert_eq!(user_calls(&[&a], "/v1/invoices/summaries").await, [200]);
    // And an app-only call, so an app-only access token exists too.
    let app = client()
        .get(a.url("/v1/invoices/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(app.status(), 200);
    let rotated = std::fs::read_to_string(&file_a).unwrap().trim().to_owned();
    assert!(rotated.starts_with("sbx-refresh-"), "{rotated}");
    let everything = every_value(&redis).await;
    assert!(
        everything.contains("pcgate:tokens:token:user"),
        "the record is there: {everything}"
    );
    assert!(
        !everything.contains(&rotated),
        "the refresh token is in Redis in clear"
    );
    let suffix = rotated.trim_start_matches("sbx-refresh-");
    assert!(
        !everything.contains(suffix),
        "part of the refresh token is in Redis"
    );
    // No token of any kind in clear: sandbox tokens all start with `sbx-`.
    assert!(!everything.contains("sbx-"), "{everything}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_sidecar_that_lost_its_lock_cannot_roll_the_shared_refresh_token_back() {
    use pcgate::shared::tokens::{SealKey, Stored, TokenShares};
    use secrecy::{ExposeSecret, SecretString};
    let redis = start_redis();
    let config = shared(&redis, "cas", ms(250));
    let share = |metrics: &pcgate::metrics::Metrics| {
        let handle = pcgate::shared::Shared::connect(&config, None, metrics).unwrap();
        TokenShares::new(
            handle,
            SealKey::from_bytes(&[3; 32]),
            pcgate::shared::tokens::ShareMetrics::register(metrics),
        )
        .for_credential("user")
    };
    let (ma, mb) = (
        pcgate::metrics::Metrics::new(),
        pcgate::metrics::Metrics::new(),
    );
    let (a, b) = (share(&ma), share(&mb));
    // A takes the lock and stalls past its expiry, holding generation 0.
    let lease = a.lock().await.expect("the lock is free");
    assert_eq!(a.read().await.unwrap().map(|(g, _)| g), None);
    // B rotates meanwhile and stores generation 1.
    let newer = SecretString::from("rotated-by-b".to_owned());
    assert_eq!(b.store(&newer).await.unwrap(), Stored::Written(1));
    // A, late, tries to store its own from generation 0: refused, and generation 1 stays.
    let older = SecretString::from("rotated-by-a".to_owned());
    assert_eq!(a.store(&older).await.unwrap(), Stored::Conflict(1));
    let (generation, token) = a.read().await.unwrap().expect("the record");
    assert_eq!(generation, 1);
    assert_eq!(token.expose_secret(), "rotated-by-b");
    // Once A takes up generation 1 it may store generation 2.
    a.adopt(generation);
    assert_eq!(a.store(&older).await.unwrap(), Stored::Written(2));
    assert_eq!(
        b.read().await.unwrap().unwrap().1.expose_secret(),
        "rotated-by-a"
    );
    a.release(&lease).await;
    // The record gone (a Redis restarted without persistence, or an eviction): the next rotation
    // is shared again, not refused for ever against an empty record.
    assert_eq!(
        redis.command(&["DEL", "pcgate:cas:token:user"]).as_deref(),
        Some(":1")
    );
    let after_restart = SecretString::from("rotated-after-restart".to_owned());
    assert_eq!(b.store(&after_restart).await.unwrap(), Stored::Written(2));
    let (generation, token) = a.read().await.unwrap().expect("the record again");
    assert_eq!(generation, 2);
    assert_eq!(token.expose_secret(), "rotated-after-restart");
    let text = ma.encode();
    assert!(
        text.contains(
            "pcgate_shared_token_refreshes_total{credential=\"user\",outcome=\"conflict\"} 1"
        ),
        "{text}"
    );
}

/// A refresh lock whose owner died is outwaited: its waiters take it one at a time once it
/// expires, rather than all giving up first and refreshing together without it.
#[tokio::test]
async fn when_the_refresh_locks_owner_dies_its_waiters_take_the_lock_in_turn_not_all_at_once() {
    use pcgate::shared::tokens::{SealKey, TokenShares};
    let redis = start_redis();
    let config = shared(&redis, "dead", ms(250));
    let hold = secs(2);
    // The dead owner: its lock lives out the whole hold.
    assert_eq!(
        redis
            .command(&[
                "SET",
                "pcgate:dead:lock:token:user",
                "dead-owner",
                "PX",
                "2000"
            ])
            .as_deref(),
        Some("+OK")
    );
    let started = Instant::now();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let metrics = pcgate::metrics::Metrics::new();
                let handle = pcgate::shared::Shared::connect(&config, None, &metrics).unwrap();
                let share = TokenShares::new(
                    handle,
                    SealKey::from_bytes(&[5; 32]),
                    pcgate::shared::tokens::ShareMetrics::register(&metrics),
                )
                .with_lock_hold(hold)
                .for_credential("user");
                let lease = share.lock().await;
                let taken = started.elapsed();
                if let Some(lease) = &lease {
                    // The refresh, then the lock goes to the next waiter.
                    tokio::time::sleep(ms(100)).await;
                    share.release(lease).await;
                }
                (lease.is_some(), taken)
            })
        })
        .collect();
    let mut taken = Vec::new();
    for waiter in waiters {
        let (locked, at) = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
        assert!(
            locked,
            "a waiter gave up at {at:?} and refreshed without the lock"
        );
        taken.push(at);
    }
    taken.sort();
    assert!(
        taken[0] >= ms(1_900),
        "the dead owner's lock was taken at {:?}, before it expired",
        taken[0]
    );
    for pair in taken.windows(2) {
        assert!(
            pair[1] - pair[0] >= ms(90),
            "two held the lock at once: {taken:?}"
        );
    }
}

#[tokio::test]
async fn a_malformed_key_file_stops_the_start_naming_the_file_never_its_content() {
    let redis = start_redis();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let dir = temp_dir("bad-key");
    let key = dir.join("shared-key");
    std::fs::write(&key, "hunter2-not-a-key\n").unwrap();
    let mut config = sandbox.config();
    let mut shared = shared(&redis, "badkey", ms(250));
    shared.key_file = Some(key.clone());
    config.shared = Some(shared);
    let error = match pcgate::Gateway::bind(on_loopback(config)).await {
        Ok(_) => panic!("a gateway started with a malformed key file"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains(&key.display().to_string()), "{error}");
    assert!(error.contains("openssl rand -hex 32"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}
