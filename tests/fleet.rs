//! The fleet tier on a real `redis-server` (tests/common/redis.rs): the shared handle, then
//! gateways sharing one Redis and the sandbox.

mod common;

use std::time::Duration;

use common::*;
use pcgate::config::{RedisUrl, SharedConfig};
use pcgate::metrics::Metrics;
use pcgate::shared::{Op, Shared, Unavailable};
use tokio::time::Instant;

/// `shared.timeout` in these tests: long enough that one slow operation on a busy 2-core
/// machine is not taken for a frozen Redis (an extra upstream call), as in tests/fleet_limit.rs.
const TIMEOUT: Duration = Duration::from_millis(250);

/// What a call may take beyond `shared.timeout` on a busy machine.
const MARGIN: Duration = Duration::from_millis(300);

fn shared_config(url: &str, namespace: &str) -> SharedConfig {
    SharedConfig {
        redis_url: RedisUrl::parse(url).expect("a valid Redis URL"),
        namespace: namespace.to_owned(),
        timeout: TIMEOUT,
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
            took < TIMEOUT + MARGIN,
            "a frozen Redis held a call {took:?}"
        );
        outcomes.push(result.unwrap_err());
    }
    assert!(
        outcomes.contains(&Unavailable::TimedOut(TIMEOUT)),
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
        result.is_err() && took < TIMEOUT + MARGIN,
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

/// The sandbox's config with the fleet tier on `redis` under `namespace`.
fn fleet(sandbox: &TestSandbox, redis: &TestRedis, namespace: &str) -> pcgate::config::Config {
    let mut config = sandbox.config();
    config.shared = Some(shared_config(&redis.url(), namespace));
    config
}

/// `GET path` on `gateway`: its status, `Cache-Status` and how long it took.
async fn get(gateway: &TestGateway, path: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let response = tokio::time::timeout(WAIT, client().get(gateway.url(path)).send())
        .await
        .expect("an answer within the test's bound")
        .expect("an HTTP answer");
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    response.bytes().await.unwrap();
    (status, cache, started.elapsed())
}

/// The value of one series in a gateway's scrape (0 when absent).
async fn series(gateway: &TestGateway, name: &str) -> f64 {
    let scrape = scrape(gateway).await;
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const SUMMARY: &str = "/v1/invoices/summary";

#[tokio::test]
async fn ninety_cold_calls_across_three_gateways_make_one_upstream_call_and_a_late_one_reads_l2() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    // The upstream takes a while, so every call arrives while the one fetch is in flight.
    sandbox
        .faults(serde_json::json!({"latency": "300ms"}))
        .await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(start_config(fleet(&sandbox, &redis, "cold")).await);
    }
    let calls = (0..90).map(|i| {
        let url = gateways[i % 3].url(SUMMARY);
        tokio::spawn(async move {
            let response = client().get(url).send().await.unwrap();
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            status
        })
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(
        sandbox.count("summary").await,
        1,
        "one upstream call for the fleet"
    );
    let waits: f64 = {
        let mut sum = 0.0;
        for gateway in &gateways {
            sum += series(
                gateway,
                "pcgate_shared_lock_waits_total{outcome=\"filled\"}",
            )
            .await;
        }
        sum
    };
    assert_eq!(
        waits, 2.0,
        "the two other gateways waited for the owner's fill"
    );

    // A gateway started later answers from L2, with its Age, without an upstream call.
    let late = start_config(fleet(&sandbox, &redis, "cold")).await;
    let response = client().get(late.url(SUMMARY)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit"),
        "{:?}",
        response.headers()
    );
    assert!(response.headers().contains_key("age"));
    assert_eq!(sandbox.count("summary").await, 1);
    assert_eq!(
        series(&late, "pcgate_shared_lookups_total{result=\"hit\"}").await,
        1.0
    );
    // Another namespace on the same Redis shares nothing.
    let other = start_config(fleet(&sandbox, &redis, "another-tenant")).await;
    assert_eq!(get(&other, SUMMARY).await.0, 200);
    assert_eq!(sandbox.count("summary").await, 2);
}

/// After its TTL a record stays in Redis for its stale window (the usual state between fills):
/// the next misses across the fleet still make one upstream call, not one per sidecar.
#[tokio::test]
async fn after_the_ttl_a_stale_record_in_redis_still_coalesces_the_fleets_refetch() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    let mut config = fleet(&sandbox, &redis, "stale");
    let summary = config
        .routes
        .iter_mut()
        .find(|r| format!("{:?}", r.patterns).contains(SUMMARY))
        .expect("the demo config has a summary route");
    summary.cache_ttl = Some(secs(1));
    summary.stale_while_revalidate = None;
    summary.stale_if_error = Some(secs(60));
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(start_config(config.clone()).await);
    }
    assert_eq!(get(&gateways[0], SUMMARY).await.0, 200);
    assert_eq!(sandbox.count("summary").await, 1);
    // Past the TTL: the record is stale in Redis (and in gateway 0's own tier).
    tokio::time::sleep(ms(1_500)).await;
    sandbox
        .faults(serde_json::json!({"latency": "300ms"}))
        .await;
    let calls = (0..30).map(|i| get(&gateways[i % 3], SUMMARY));
    for (status, _, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    assert_eq!(
        sandbox.count("summary").await,
        2,
        "one refetch for the fleet"
    );
}

/// The owner's fetch may retry and wait out throttling up to `upstream.deadline`: its fleet lock
/// lasts that long, not one attempt's `attempt_timeout`, or another sidecar would fetch too.
#[tokio::test]
async fn the_fleet_lock_is_held_for_the_calls_deadline_not_one_attempt() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    sandbox
        .faults(serde_json::json!({"latency": "800ms"}))
        .await;
    let mut config = fleet(&sandbox, &redis, "hold");
    config.upstream.attempt_timeout = secs(2);
    config.upstream.deadline = secs(20);
    let gateway = start_config(config).await;
    let call = tokio::spawn({
        let url = gateway.url(SUMMARY);
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    });
    // While the fetch is in flight (bounded wait for its lock).
    let started = Instant::now();
    let lock = loop {
        if let Some(lock) = redis.keys("pcgate:hold:lock:*").pop() {
            break lock;
        }
        assert!(started.elapsed() < WAIT, "the owner took no fleet lock");
        tokio::time::sleep(ms(10)).await;
    };
    let pttl: i64 = redis
        .command(&["PTTL", &lock])
        .and_then(|reply| reply.strip_prefix(':')?.parse().ok())
        .expect("a PTTL reply");
    assert!(
        pttl > 15_000,
        "the lock expires in {pttl} ms: sooner than the deadline"
    );
    assert_eq!(call.await.unwrap(), 200);
}

#[tokio::test]
async fn a_purge_on_one_gateway_empties_every_gateway_of_the_namespace() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(start_config(fleet(&sandbox, &redis, "purge")).await);
    }
    for gateway in &gateways {
        assert_eq!(get(gateway, SUMMARY).await.0, 200);
        assert_eq!(series(gateway, "pcgate_cache_entries").await, 1.0);
    }
    assert_eq!(sandbox.count("summary").await, 1);
    for (scope, query) in [("prefix", "?prefix=/v1/invoices"), ("all", "")] {
        let purged = client()
            .post(format!("http://{}/cache/purge{query}", gateways[0].admin))
            .send()
            .await
            .unwrap();
        assert_eq!(purged.status(), 200, "{scope}");
        // Every sidecar drops its L1 on the purge message (bounded wait).
        let started = Instant::now();
        for gateway in &gateways {
            while series(gateway, "pcgate_cache_entries").await != 0.0 {
                assert!(started.elapsed() < WAIT, "{scope}: an L1 was not purged");
                tokio::time::sleep(ms(20)).await;
            }
        }
        // The next calls, on every gateway at once, are one upstream call: L2 was purged too.
        let before = sandbox.count("summary").await;
        let calls = gateways.iter().map(|g| get(g, SUMMARY));
        for (status, _, _) in futures_util::future::join_all(calls).await {
            assert_eq!(status, 200);
        }
        let after = sandbox.count("summary").await;
        if after != before + 1 {
            // Say why another sidecar fetched too: a lock wait's outcome, a Redis error.
            let mut seen = String::new();
            for gateway in &gateways {
                for line in scrape(gateway).await.lines() {
                    if line.starts_with("pcgate_shared_lock_waits_total")
                        || line.starts_with("pcgate_shared_errors_total")
                    {
                        seen.push_str(line);
                        seen.push('\n');
                    }
                }
            }
            panic!("{scope}: {} upstream calls, not 1:\n{seen}", after - before);
        }
    }
}

/// A fetch in flight while a purge runs fetched the answer from before it: it must not land in
/// Redis under the new generation, where every other sidecar would read it.
#[tokio::test]
async fn a_fill_in_flight_during_a_purge_is_not_shared_under_the_new_generation() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    sandbox
        .faults(serde_json::json!({"latency": "800ms"}))
        .await;
    let a = start_config(fleet(&sandbox, &redis, "race")).await;
    let b = start_config(fleet(&sandbox, &redis, "race")).await;
    let call = tokio::spawn({
        let url = a.url(SUMMARY);
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    });
    // a's fetch has begun (its fleet lock is taken): purge on b meanwhile.
    let started = Instant::now();
    while redis.keys("pcgate:race:lock:*").is_empty() {
        assert!(started.elapsed() < WAIT, "a took no fleet lock");
        tokio::time::sleep(ms(10)).await;
    }
    let purged = client()
        .post(format!("http://{}/cache/purge", b.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), 200);
    assert_eq!(call.await.unwrap(), 200);
    // a's write and release are off its caller's path: wait (bounded) for the lock to go.
    let started = Instant::now();
    while !redis.keys("pcgate:race:lock:*").is_empty() {
        assert!(started.elapsed() < WAIT, "a's lock was never released");
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(sandbox.count("summary").await, 1);
    sandbox.faults(serde_json::json!({"latency": "0ms"})).await;
    // b must not find a's pre-purge answer in Redis: a miss, fetched again.
    let (status, cache, _) = get(&b, SUMMARY).await;
    assert_eq!(status, 200);
    assert!(!cache.contains("hit"), "{cache}");
    assert_eq!(sandbox.count("summary").await, 2);
}

#[tokio::test]
async fn a_frozen_or_killed_redis_costs_callers_nothing_and_sharing_resumes() {
    let mut redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    let a = start_config(fleet(&sandbox, &redis, "outage")).await;
    let b = start_config(fleet(&sandbox, &redis, "outage")).await;
    // The usual time of a miss (a fresh query each call), Redis up.
    let mut usual = Duration::ZERO;
    for i in 0..5 {
        let (status, _, took) = get(&a, &format!("{SUMMARY}?usual={i}")).await;
        assert_eq!(status, 200);
        usual = usual.max(took);
    }
    let mut n = 0;
    for outage in ["frozen", "killed"] {
        match outage {
            "frozen" => redis.freeze(),
            _ => {
                redis.thaw();
                redis.kill();
            }
        }
        for gateway in [&a, &b] {
            for _ in 0..8 {
                n += 1;
                let (status, _, took) = get(gateway, &format!("{SUMMARY}?{outage}={n}")).await;
                assert_eq!(status, 200, "{outage}");
                assert!(
                    took < usual + TIMEOUT + MARGIN,
                    "{outage}: a call took {took:?} (usual {usual:?}, shared.timeout {TIMEOUT:?})"
                );
                // Hits on L1 need no Redis at all.
                let (status, cache, _) = get(gateway, &format!("{SUMMARY}?{outage}={n}")).await;
                assert_eq!(status, 200);
                assert!(cache.contains("hit"), "{cache}");
            }
        }
        assert!(
            series(&a, "pcgate_shared_breaker_state").await >= 1.0,
            "{outage}"
        );
        match outage {
            "frozen" => redis.thaw(),
            _ => redis.restart(),
        }
        // Sharing resumes by itself: a fill on one is a hit on the other (bounded wait).
        let started = Instant::now();
        loop {
            n += 1;
            let path = format!("{SUMMARY}?resumed={n}");
            assert_eq!(get(&a, &path).await.0, 200);
            let (status, cache, _) = get(&b, &path).await;
            assert_eq!(status, 200);
            if cache.contains("hit") {
                break;
            }
            assert!(
                started.elapsed() < WAIT,
                "sharing did not resume after {outage}"
            );
            tokio::time::sleep(ms(200)).await;
        }
    }
}

#[tokio::test]
async fn when_the_owner_dies_holding_the_lock_one_waiter_takes_over() {
    let redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    // The owner: the real binary, killed (SIGKILL) while its fetch is in flight.
    let dir = temp_dir("fleet-owner");
    let (listen, admin) = (free_port(), free_port());
    let config_file = dir.join("pcgate.toml");
    std::fs::write(
        &config_file,
        sandbox.gateway_toml(Knobs {
            // Its fleet lock is held for its deadline: 3 s, so it expires within the test.
            upstream: "attempt_timeout = \"3s\"\ndeadline = \"3s\"",
            rest: &format!(
                "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[shared]\nredis_url = \"{}\"\nnamespace = \"owner\"\n",
                redis.url()
            ),
            ..Default::default()
        }),
    )
    .unwrap();
    let mut owner = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args(["run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "warn")
        .env_remove("PCGATE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_healthz(admin).await;
    let started = Instant::now();
    while client()
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(started.elapsed() < WAIT, "the owner never got its tokens");
        tokio::time::sleep(ms(50)).await;
    }
    // The upstream takes a second: the owner is killed while its fetch is in flight.
    sandbox.faults(serde_json::json!({"latency": "1s"})).await;
    let owner_call = tokio::spawn(
        client()
            .get(format!("http://127.0.0.1:{listen}{SUMMARY}"))
            .send(),
    );
    let started = Instant::now();
    while redis.keys("pcgate:owner:lock:*").is_empty() {
        assert!(
            started.elapsed() < WAIT,
            "the owner never took the key's lock"
        );
        tokio::time::sleep(ms(10)).await;
    }
    tokio::time::sleep(ms(100)).await;
    owner.kill().unwrap();
    owner.wait().unwrap();
    let died = owner_call.await.unwrap();
    assert!(died.is_err(), "the owner died mid-call: {died:?}");
    // Past the upstream's latency, so the dead owner's call is in the sandbox's log.
    tokio::time::sleep(ms(1200)).await;
    let before = sandbox.count("summary").await;
    assert_eq!(
        redis.keys("pcgate:owner:lock:*").len(),
        1,
        "its lock outlives it"
    );
    assert!(
        redis.keys("pcgate:owner:entry:*").is_empty(),
        "nothing was stored"
    );

    let mut config = fleet(&sandbox, &redis, "owner");
    config.upstream.attempt_timeout = secs(3);
    let gateways = [
        start_config(config.clone()).await,
        start_config(config).await,
    ];
    let calls = (0..20).map(|i| get(&gateways[i % 2], SUMMARY));
    for (status, _, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    // One more upstream call than the dead owner's: the waiter whose SET NX won when the lock
    // expired.
    assert_eq!(sandbox.count("summary").await, before + 1);
    let mut took_over = 0.0;
    let mut filled = 0.0;
    for gateway in &gateways {
        took_over += series(
            gateway,
            "pcgate_shared_lock_waits_total{outcome=\"took_over\"}",
        )
        .await;
        filled += series(
            gateway,
            "pcgate_shared_lock_waits_total{outcome=\"filled\"}",
        )
        .await;
    }
    assert_eq!((took_over, filled), (1.0, 1.0));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_claim_after_another_sidecars_fill_landed_reads_it_instead_of_fetching_again() {
    use pcgate::layer::cache::{Claim, Entry, Key, MemoryStore, Storage, TieredStore, Windows};
    use std::sync::Arc;
    let redis = start_redis();
    let sidecar = || {
        let metrics = Metrics::new();
        let shared =
            Shared::connect(&shared_config(&redis.url(), "claim"), None, &metrics).unwrap();
        let memory = Arc::new(MemoryStore::new(1 << 20, 1 << 16, &metrics));
        TieredStore::new(memory, shared, 1 << 16, secs(5))
    };
    let (a, b) = (sidecar(), sidecar());
    let request = http::Request::get(SUMMARY)
        .body(pcgate::body::empty())
        .unwrap();
    let key = Key::of(&request, &[]);
    let entry = Arc::new(Entry {
        response: pcgate::body::Buffered {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"{}"),
        },
        stored_at: std::time::SystemTime::now(),
        initial_age: Duration::ZERO,
        windows: Windows {
            ttl: secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        },
        vary: Arc::from([]),
        variant: None,
    });
    // b looks the key up before a's fill lands: a miss.
    assert!(b.get(&key).await.unwrap().is_none());
    assert_eq!(a.claim(&key).await.unwrap(), Claim::Owner);
    assert_eq!(b.claim(&key).await.unwrap(), Claim::Busy);
    a.put(key.clone(), entry).await.unwrap();
    // a's fill lands in Redis and its lock goes (bounded wait).
    let started = Instant::now();
    while !redis.keys("pcgate:claim:lock:*").is_empty() {
        assert!(
            started.elapsed() < WAIT,
            "the owner's lock was never released"
        );
        tokio::time::sleep(ms(10)).await;
    }
    // b's claim now finds the fill rather than taking the free lock and fetching again.
    assert_eq!(b.claim(&key).await.unwrap(), Claim::Stored);
    assert!(redis.keys("pcgate:claim:lock:*").is_empty());
    let local = b
        .get_local(&key)
        .await
        .unwrap()
        .expect("copied into b's own tier");
    assert_eq!(local.response.body, "{}");
}

/// A fill whose Redis write cannot be queued (the writer is 1,024 writes behind) still releases
/// its key's fleet lock at once, so other sidecars' waiters do not stall until it expires.
#[tokio::test]
async fn a_full_write_queue_still_releases_the_fills_fleet_lock() {
    use pcgate::layer::cache::{Claim, Entry, Key, MemoryStore, Storage, TieredStore, Windows};
    use std::sync::Arc;
    let redis = start_redis();
    let metrics = Metrics::new();
    let shared = Shared::connect(&shared_config(&redis.url(), "full"), None, &metrics).unwrap();
    let memory = Arc::new(MemoryStore::new(64 << 20, 1 << 16, &metrics));
    let store = TieredStore::new(memory, shared, 1 << 16, secs(30));
    let key_of = |path: &str| {
        let request = http::Request::get(path)
            .body(pcgate::body::empty())
            .unwrap();
        Key::of(&request, &[])
    };
    let entry = Arc::new(Entry {
        response: pcgate::body::Buffered {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"{}"),
        },
        stored_at: std::time::SystemTime::now(),
        initial_age: Duration::ZERO,
        windows: Windows {
            ttl: secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        },
        vary: Arc::from([]),
        variant: None,
    });
    let key = key_of(SUMMARY);
    assert_eq!(store.claim(&key).await.unwrap(), Claim::Owner);
    assert_eq!(redis.keys("pcgate:full:lock:*").len(), 1);
    // On this single-threaded runtime the writer cannot run while these are queued: a put
    // answers at once, and nothing here yields.
    for i in 0..1_100 {
        store
            .put(key_of(&format!("/v1/invoices/{i}")), entry.clone())
            .await
            .unwrap();
    }
    store.put(key.clone(), entry).await.unwrap();
    let started = Instant::now();
    while !redis.keys("pcgate:full:lock:*").is_empty() {
        assert!(
            started.elapsed() < secs(5),
            "the lock stayed, to expire 30 s after it was taken"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

/// A record any process could have left in Redis: too large to be one this build writes, or
/// with more headers than `http`'s header map holds (it panics past that): a miss, never a panic.
#[tokio::test]
async fn a_hostile_record_in_redis_is_a_miss_not_a_panic() {
    use pcgate::layer::cache::{Key, MemoryStore, Storage, TieredStore};
    use sha2::Digest;
    use std::sync::Arc;
    let redis = start_redis();
    let metrics = Metrics::new();
    let shared = Shared::connect(&shared_config(&redis.url(), "hostile"), None, &metrics).unwrap();
    let memory = Arc::new(MemoryStore::new(1 << 20, 1 << 16, &metrics));
    let store = TieredStore::new(memory, shared.clone(), 1 << 16, secs(5));
    let request = http::Request::get(SUMMARY)
        .body(pcgate::body::empty())
        .unwrap();
    let key = Key::of(&request, &[]);
    let redis_key = format!(
        "pcgate:hostile:entry:{:x}",
        sha2::Sha256::digest(key.as_str().as_bytes())
    );
    let forged = |headers: usize, body: usize| {
        let head = serde_json::to_vec(&serde_json::json!({
            "k": key.as_str(), "s": 0, "a": 0, "w": [3_600_000, 0, 0], "c": 200,
            "h": vec![["a", ""]; headers], "v": [], "x": null,
        }))
        .unwrap();
        let mut out = vec![1u8];
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&u32::try_from(head.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&head);
        out.resize(out.len() + body, b'x');
        out
    };
    // What Redis has sent to its clients so far.
    let sent = || async {
        let info: String = shared
            .query(Op::Get, redis::cmd("INFO").arg("stats"))
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .expect("INFO stats has total_net_output_bytes")
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    // 25,000 headers: over HeaderMap's capacity limit; 2 MiB: far over cache.max_entry_bytes.
    for (headers, body) in [(25_000, 0), (1, 2 << 20)] {
        let mut set = redis::cmd("SET");
        set.arg(&redis_key).arg(forged(headers, body));
        let _: () = shared.query(Op::Put, &set).await.unwrap();
        let before = sent().await;
        assert!(
            store.get(&key).await.unwrap().is_none(),
            "{headers} headers, {body} body bytes: a miss"
        );
        if body > 0 {
            // Refused by its length in Redis: never sent, let alone decoded.
            let moved = sent().await - before;
            assert!(moved < 64 * 1024, "{moved} bytes sent for a refused record");
        }
    }
    // A record this build wrote still reads.
    let mut set = redis::cmd("SET");
    set.arg(&redis_key).arg(forged(2, 10));
    let _: () = shared.query(Op::Put, &set).await.unwrap();
    let read = store.get(&key).await.unwrap().expect("a sane record reads");
    assert_eq!(read.response.body, "xxxxxxxxxx");
    assert_eq!(read.response.headers.len(), 2);
}

/// DESIGN.md section 6: a frozen Redis adds at most `shared.timeout` to a call. The cache's
/// lookup is the call's one Redis wait; the throttle below it (the hold check) must not wait a
/// second time on the same call. A long timeout makes one wait and two plainly different.
#[tokio::test]
async fn a_miss_while_redis_is_frozen_waits_for_it_once_not_once_per_layer() {
    let mut redis = start_redis();
    let sandbox = start_sandbox(Default::default()).await;
    let timeout = ms(400);
    let mut config = fleet(&sandbox, &redis, "once");
    config.shared.as_mut().unwrap().timeout = timeout;
    let gateway = start_config(config).await;
    let mut usual = Duration::ZERO;
    for i in 0..5 {
        let (status, _, took) = get(&gateway, &format!("{SUMMARY}?usual={i}")).await;
        assert_eq!(status, 200);
        usual = usual.max(took);
    }
    redis.freeze();
    // Fewer calls than the breaker's threshold of failures, so each one asks Redis.
    for i in 0..2 {
        let (status, _, took) = get(&gateway, &format!("{SUMMARY}?frozen={i}")).await;
        assert_eq!(status, 200);
        assert!(
            took >= timeout,
            "call {i} took {took:?}: the lookup did not wait for Redis at all"
        );
        assert!(
            took < usual + timeout + ms(300),
            "call {i} took {took:?} (usual {usual:?}, shared.timeout {timeout:?}): Redis was waited for more than once"
        );
    }
    redis.thaw();
}
