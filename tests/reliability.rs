//! Issue 9: reliability under faults and hostile input, bounded in count and time, loopback only.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use pcgate::sandbox::SandboxOptions;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Panics anywhere in this test binary (a connection task included) are counted here.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// The sandbox config cut down to `summary` (cached 1 s, stale for 1 s while revalidating and
/// 1 h on error) and `invoices`, with fast, generous retries.
fn short_cache_fast_retry(sandbox: &TestSandbox) -> pcgate::config::Config {
    let mut config = sandbox.config();
    config.retry.max_attempts = 5;
    config.retry.base_delay = ms(5);
    config.retry.max_delay = ms(40);
    config.retry.budget_ratio = 2.0;
    config
        .routes
        .retain(|r| ["summary", "invoices"].contains(&r.name()));
    let summary = config.route_mut("summary");
    summary.cache_ttl = Some(secs(1));
    summary.stale_while_revalidate = Some(secs(1));
    summary.stale_if_error = Some(secs(3600));
    assert!(summary.coalesce && summary.retry);
    let invoices = config.route_mut("invoices");
    assert!(invoices.cache_ttl.is_none() && invoices.coalesce && invoices.retry);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_upstream_calls_failing_is_hidden_from_summary_callers() {
    count_panics();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(short_cache_fast_retry(&sandbox)).await;
    // Warm the cache, then fail half of everything.
    assert_eq!(
        client()
            .get(gateway.url("/v1/invoices/summary"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sandbox
        .faults(json!({"fail_rate": 0.5, "fail_status": 500}))
        .await;

    let (summary_errors, invoices_ok, invoices_total) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let stop = Instant::now() + Duration::from_secs(5);
    let worker = |id: usize| {
        let (summary_errors, invoices_ok, invoices_total) =
            (&summary_errors, &invoices_ok, &invoices_total);
        let gateway = &gateway;
        async move {
            let client = client();
            let mut n = 0;
            while Instant::now() < stop && n < 2_000 {
                n += 1;
                let summary = client
                    .get(gateway.url("/v1/invoices/summary"))
                    .send()
                    .await
                    .unwrap();
                if summary.status() != 200 {
                    summary_errors.fetch_add(1, Ordering::SeqCst);
                }
                let list = client
                    .get(gateway.url(&format!("/v1/invoices?size=2&offset={}", (id * 7 + n) % 50)))
                    .send()
                    .await
                    .unwrap();
                invoices_total.fetch_add(1, Ordering::SeqCst);
                if list.status() == 200 {
                    invoices_ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    };
    futures_util::future::join_all((0..8).map(worker)).await;

    let (ok, total) = (
        invoices_ok.load(Ordering::SeqCst),
        invoices_total.load(Ordering::SeqCst),
    );
    let rate = ok as f64 / total as f64;
    eprintln!(
        "invoice list with 50% upstream failures: {ok}/{total} succeeded ({:.1}%)",
        rate * 100.0
    );
    assert_eq!(
        summary_errors.load(Ordering::SeqCst),
        0,
        "a summary caller saw an error once warm"
    );
    assert!(
        total > 100,
        "too little load to mean anything: {total} calls"
    );
    assert!(rate > 0.90, "invoice-list success rate {rate:.3}");
    // The upstream really was failing half the time (and summaries were refreshed through it).
    let log = sandbox.log().await;
    let failed = log["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 500)
        .count();
    assert!(
        failed > 40,
        "only {failed} of the last 200 upstream calls failed"
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_token_endpoint_down_longer_than_a_refresh_interval_is_not_seen_by_callers() {
    // 10 s tokens refreshed 8 s ahead: the first refresh is due after about 2 s. The endpoint is
    // down from 0.5 s to 5.5 s, longer than that interval and than several refresh attempts.
    let sandbox = start_sandbox(SandboxOptions {
        token_ttl: Duration::from_secs(10),
        ..SandboxOptions::default()
    })
    .await;
    let mut config = sandbox.config();
    config.app_mut().refresh_before = secs(8);
    let gateway = start_config(config).await;
    let client = client();
    let started = Instant::now();
    assert_eq!(
        client
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut down = false;
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(8) && calls < 1_000 {
        let t = started.elapsed();
        if !down && t > Duration::from_millis(500) && t < Duration::from_millis(5_500) {
            sandbox.faults(json!({"token_fail_status": 503})).await;
            down = true;
        }
        if down && t >= Duration::from_millis(5_500) {
            sandbox.faults(json!({"token_fail_status": null})).await;
            down = false;
        }
        let status = client
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status, 200,
            "call {calls} at {t:?} failed while the token was still valid"
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = sandbox
        .recent("token")
        .await
        .iter()
        .filter(|r| r["status"] == 503)
        .count();
    assert!(
        refused >= 2,
        "the endpoint was down for only {refused} refresh attempts"
    );
    let renewed = sandbox
        .recent("token")
        .await
        .iter()
        .filter(|r| r["status"] == 200)
        .count();
    assert!(
        renewed >= 2,
        "the token was not renewed after the endpoint came back"
    );
}

/// Sends raw bytes on a new connection; the status of the answer, or 0 if it closed without one.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before reading everything (a 431, say).
    let _ = stream.write_all(bytes).await;
    let mut buf = [0u8; 64];
    let mut read = 0;
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf[read..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                read += n;
                if read >= 12 {
                    break;
                }
            }
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }
    std::str::from_utf8(&buf[..read])
        .ok()
        .and_then(|s| s.get(9..12))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_never_escapes_the_route_table_and_good_calls_keep_working() {
    count_panics();
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let good = || async {
        client()
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(good().await, 200);

    let big_header = format!(
        "GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("garbage request line", b"HELLO\r\n\r\n".to_vec()),
        ("no version", b"GET /v1/invoices\r\n\r\n".to_vec()),
        ("bad version", b"GET /v1/invoices HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n".to_vec()),
        ("space in path", b"GET /v1/invo ices HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec()),
        ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n".to_vec()),
        ("100 KiB header", big_header.into_bytes()),
        (
            "CL and TE together",
            b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        ("two content lengths", b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec()),
        ("CR in a header value", b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\rb\r\n\r\n".to_vec()),
        ("obsolete line folding", b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n b\r\n\r\n".to_vec()),
        ("traversal", raw_get("/v1/invoices/../customers")),
        ("encoded traversal", raw_get("/v1/invoices/%2e%2e/customers")),
        ("encoded slash", raw_get("/v1/invoices%2f..%2fcustomers")),
        ("backslash", raw_get("/v1/invoices\\..\\customers")),
        ("absolute form elsewhere", raw_get("http://evil.example/v1/customers")),
        ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec()),
        ("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".to_vec()),
        ("bad tracking id", b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nMS-RequestId: ../../\r\n\r\n".to_vec()),
    ];
    for (name, bytes) in &hostile {
        let status = raw(gateway.addr, bytes).await;
        // A closed connection is hyper refusing to parse at all; anything answered is a 4xx.
        assert!(
            status == 0 || (400..500).contains(&status),
            "{name}: answered {status}"
        );
        assert_eq!(
            good().await,
            200,
            "good calls stopped working after: {name}"
        );
    }

    // A bare LF ends a line (RFC 9112 §2.2 lets a recipient accept it), so this is two headers,
    // not a value holding a line break; whichever way it is read, no value sent on may hold one.
    let lf =
        b"GET /v1/invoices?size=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\nX-Injected: 1\r\n\r\n";
    let status = raw(gateway.addr, lf).await;
    assert!(
        status == 0 || status == 200 || (400..500).contains(&status),
        "bare LF: answered {status}"
    );
    for request in sandbox.log().await["recent"].as_array().unwrap() {
        for (name, value) in request["headers"].as_object().unwrap() {
            let value = value.as_str().unwrap_or("");
            assert!(
                !value.contains(['\r', '\n']),
                "{name}: {value:?} reached the upstream"
            );
        }
    }

    // 10 000 random paths from an alphabet rich in separators and escapes.
    let alphabet: Vec<char> = "/./%2e%2f%5c..//abcinvoices?&=#;:@!$'()*+,~_-0123456789AZ"
        .chars()
        .collect();
    let mut rng = fastrand::Rng::with_seed(9);
    let mut statuses = std::collections::BTreeMap::new();
    let started = Instant::now();
    for i in 0..10_000 {
        let len = rng.usize(1..40);
        let tail: String = (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        let path = match i % 3 {
            0 => format!("/v1/invoices/{tail}"),
            1 => format!("/v1/{tail}"),
            _ => format!("/{tail}"),
        };
        let status = raw(gateway.addr, &raw_get(&path)).await;
        *statuses.entry(status).or_insert(0) += 1;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "random paths took too long"
        );
    }
    eprintln!("10 000 random paths, answers by status: {statuses:?}");
    // Only paths inside the route table may reach the sandbox; "other" is everything else.
    let log = sandbox.log().await;
    assert_eq!(log["counts"]["other"], 0, "{}", log["counts"]);
    for request in log["recent"].as_array().unwrap() {
        let path = request["path"].as_str().unwrap();
        assert!(
            path.starts_with("/v1/invoices"),
            "reached the upstream: {path}"
        );
        // `a..b` is a name; only whole `.`/`..` segments, empty ones, or hidden separators escape.
        let segments: Vec<&str> = path.split('?').next().unwrap().split('/').skip(1).collect();
        assert!(
            segments
                .iter()
                .all(|s| !s.is_empty() && *s != "." && *s != ".." && !s.contains('\\')),
            "reached the upstream: {path}"
        );
        let lower = path.to_ascii_lowercase();
        assert!(
            !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e%2e"),
            "reached the upstream: {path}"
        );
    }
    assert!(
        statuses.keys().all(|s| *s == 0 || (200..500).contains(s)),
        "{statuses:?}"
    );
    assert_eq!(good().await, 200);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}
