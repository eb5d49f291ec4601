//! Issue 7: retries end to end, against the sandbox's fault injection (real time, short delays;
//! the timing rules themselves are unit-tested under paused time in `src/layer/retry.rs`).

mod common;

use std::time::Duration;

use common::*;
use pcgate::sandbox::SandboxOptions;
use serde_json::json;
use tokio::time::Instant;

/// The sandbox config with short backoff delays (20 ms base, 100 ms cap).
fn fast(sandbox: &TestSandbox) -> pcgate::config::Config {
    let mut config = sandbox.config();
    config.retry.base_delay = ms(20);
    config.retry.max_delay = ms(100);
    config
}

#[tokio::test]
async fn two_500s_then_200_reach_the_caller_as_200_with_one_request_id_and_rising_cv() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(fast(&sandbox)).await;
    sandbox.faults(json!({"script": [500, 500]})).await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let attempts = sandbox.recent("invoices").await;
    let statuses: Vec<_> = attempts
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    let ids: Vec<_> = attempts
        .iter()
        .map(|a| a["headers"]["ms-requestid"].as_str().unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(response.headers()["ms-requestid"], ids[0]);
    let cvs: Vec<_> = attempts
        .iter()
        .map(|a| a["headers"]["ms-cv"].as_str().unwrap().to_owned())
        .collect();
    let base = cvs[0].trim_end_matches(".1");
    assert_eq!(
        cvs,
        [
            format!("{base}.1"),
            format!("{base}.2"),
            format!("{base}.3")
        ]
    );
}

#[tokio::test]
async fn always_500_makes_max_attempts_and_returns_the_500() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = fast(&sandbox);
    config.retry.max_attempts = 3;
    let gateway = start_config(config).await;
    sandbox
        .faults(json!({"fail_rate": 1.0, "fail_status": 500}))
        .await;
    let response = client()
        .get(gateway.url("/v1/invoices/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(sandbox.count("summary").await, 3);
    // The upstream's own error body goes back.
    let fault: serde_json::Value = response.json().await.unwrap();
    assert_ne!(fault["source"], "pcgate");
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_for_and_a_long_one_is_returned_at_once() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(fast(&sandbox)).await;
    sandbox
        .faults(json!({"script": [429], "retry_after": "1"}))
        .await;
    let started = Instant::now();
    let response = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "did not wait for Retry-After"
    );
    assert_eq!(sandbox.count("invoices").await, 2);

    sandbox
        .faults(json!({"script": [429], "retry_after": "3600"}))
        .await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3600");
    assert_eq!(sandbox.count("invoices").await, 3);
}

#[tokio::test]
async fn past_the_deadline_the_caller_gets_504() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = fast(&sandbox);
    config.upstream.attempt_timeout = ms(300);
    config.upstream.deadline = ms(500);
    let gateway = start_config(config).await;
    sandbox.faults(json!({"latency": "2s"})).await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let fault: serde_json::Value = response.json().await.unwrap();
    assert!(
        ["DeadlineExceeded", "UpstreamTimeout"].contains(&fault["errorName"].as_str().unwrap()),
        "{fault}"
    );
}

#[tokio::test]
async fn connect_refused_then_up_gives_200() {
    let port = free_port();
    let mut config = invoices_config(&format!("http://127.0.0.1:{port}"));
    let mut invoices = route("", &["GET /v1/invoices"]);
    invoices.name = None;
    invoices.retry = true;
    config.routes = vec![invoices];
    config.retry.base_delay = ms(200);
    config.retry.max_delay = ms(400);
    config.retry.max_attempts = 6;
    let gateway = start_config(config).await;
    let url = gateway.url("/v1/invoices");
    let call = tokio::spawn(async move { client().get(url).send().await.unwrap().status() });
    // The first attempt finds nothing listening; then the origin comes up on that port.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let origin = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(text(200, "up"))
        });
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    assert_eq!(
        tokio::time::timeout(WAIT, call).await.unwrap().unwrap(),
        200
    );
    origin.abort();
}

#[tokio::test]
async fn the_retry_budget_stops_retries_growing_under_sustained_failure() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.retry.base_delay = ms(1);
    config.retry.max_delay = ms(2);
    config.retry.budget_ratio = 0.1;
    config.retry.budget_min_per_second = 1;
    let gateway = start_config(config).await;
    sandbox
        .faults(json!({"fail_rate": 1.0, "fail_status": 500}))
        .await;
    let client = client();
    for _ in 0..200 {
        let response = client
            .get(gateway.url("/v1/invoices?size=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
    }
    let upstream_calls = sandbox.count("invoices").await;
    // Without a budget: 200 × 4 attempts = 800. With it: about 200 + 10 + 10% of 200.
    assert!(
        upstream_calls < 300,
        "{upstream_calls} upstream calls for 200 caller calls"
    );
    assert!(upstream_calls > 200, "no retry at all");
}
