//! Issue 8: the counters move by exactly what the calls did. The last scrape is written to
//! `target/tmp/pcgate-scrape.prom`, where `.ci/run` checks it with `promtool check metrics`.

mod common;

use common::*;
use pcgate::sandbox::SandboxOptions;
use serde_json::json;

#[tokio::test]
async fn counters_move_by_exactly_what_the_calls_did() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.retry.base_delay = ms(10);
    config.retry.max_delay = ms(20);
    let gateway = start_config(config).await;
    let client = client();
    let get = |path: &str| {
        let request = client.get(gateway.url(path));
        async move { request.send().await.unwrap().status().as_u16() }
    };

    // One miss, then two hits.
    for _ in 0..3 {
        assert_eq!(get("/v1/invoices/summary").await, 200);
    }
    // Ten identical calls in flight together: one upstream call, nine coalesced.
    sandbox.faults(json!({"latency": "300ms"})).await;
    let calls: Vec<_> = (0..10).map(|_| get("/v1/invoices?size=3")).collect();
    assert!(futures_util::future::join_all(calls)
        .await
        .iter()
        .all(|s| *s == 200));
    sandbox.faults(json!({"latency": "0s"})).await;
    // One 500, retried once.
    sandbox.faults(json!({"script": [500]})).await;
    assert_eq!(get("/v1/invoices?size=4").await, 200);
    // Refused before any work.
    assert_eq!(get("/v1/customers").await, 403);
    // The App+User route, so the `user` token was surely used.
    assert_eq!(get("/v1/invoices/summaries").await, 200);

    // The process's CPU time counts in clock ticks (10 ms): a release build can serve all of
    // the above in less than one. Two ticks' worth of work first, so the counter must show some.
    burn_cpu(std::time::Duration::from_millis(20));
    let (text, m) = scrape(&gateway).await;
    let v = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(
        v(r#"pcgate_cache_lookups_total{route="summary",result="miss"}"#),
        1.0
    );
    assert_eq!(
        v(r#"pcgate_cache_lookups_total{route="summary",result="hit"}"#),
        2.0
    );
    assert_eq!(
        v(r#"pcgate_coalesced_requests_total{route="invoices"}"#),
        9.0
    );
    assert_eq!(v(r#"pcgate_retries_total{reason="status"}"#), 1.0);
    assert_eq!(v("pcgate_retry_budget_exhausted_total"), 0.0);
    assert_eq!(
        v(r#"pcgate_requests_total{route="summary",status="2xx"}"#),
        3.0
    );
    assert_eq!(
        v(r#"pcgate_requests_total{route="invoices",status="2xx"}"#),
        11.0
    );
    assert_eq!(
        v(r#"pcgate_requests_total{route="none",status="4xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"pcgate_request_duration_seconds_count{route="summary"}"#),
        3.0
    );
    assert_eq!(
        v(r#"pcgate_upstream_requests_total{route="summary",outcome="2xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"pcgate_upstream_requests_total{route="invoices",outcome="5xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"pcgate_upstream_requests_total{route="invoices",outcome="2xx"}"#),
        2.0
    );
    assert_eq!(
        v(r#"pcgate_token_refreshes_total{credential="app",result="ok"}"#),
        1.0
    );
    assert_eq!(
        v(r#"pcgate_token_refreshes_total{credential="user",result="ok"}"#),
        1.0
    );
    assert!(v(r#"pcgate_token_expiry_timestamp_seconds{credential="app"}"#) > 1.7e9);
    assert_eq!(v("pcgate_inflight_requests"), 0.0);
    assert_eq!(v("pcgate_cache_entries"), 2.0, "summary and summaries");
    assert_eq!(v(r#"pcgate_build_info{version="0.1.0"}"#), 1.0);
    // Process metrics, read from /proc at the scrape.
    assert!(v("process_resident_memory_bytes") > 1e6);
    assert!(v("process_open_fds") >= 3.0);
    assert!(v("process_cpu_seconds_total") > 0.0);
    // What the sandbox saw agrees.
    assert_eq!(sandbox.count("summary").await, 1);
    assert_eq!(sandbox.count("invoices").await, 3);

    // Keep the scrape for `promtool check metrics` in CI.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pcgate-scrape.prom");
    std::fs::write(path, &text).unwrap();

    // A Prometheus server asks for OpenMetrics, and gets it.
    let openmetrics = client
        .get(format!("http://{}/metrics", gateway.admin))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(openmetrics.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn every_known_series_is_exported_at_zero_before_the_first_call() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let (text, values) = scrape(&gateway).await;
    for series in [
        r#"pcgate_retries_total{reason="status"}"#,
        r#"pcgate_retries_total{reason="throttled"}"#,
        r#"pcgate_retries_total{reason="connect"}"#,
        r#"pcgate_retries_total{reason="timeout"}"#,
        r#"pcgate_coalesced_requests_total{route="summary"}"#,
        r#"pcgate_coalesced_requests_total{route="invoices"}"#,
        r#"pcgate_cache_lookups_total{route="summary",result="hit"}"#,
        r#"pcgate_cache_lookups_total{route="summaries",result="bypass"}"#,
        r#"pcgate_requests_total{route="invoice",status="5xx"}"#,
        r#"pcgate_requests_total{route="none",status="4xx"}"#,
        r#"pcgate_upstream_requests_total{route="summary",outcome="connect_error"}"#,
        r#"pcgate_upstream_requests_total{route="invoice_documents",outcome="2xx"}"#,
        r#"pcgate_upstream_duration_seconds_count{route="invoices"}"#,
        r#"pcgate_request_duration_seconds_count{route="summary"}"#,
        r#"pcgate_retry_budget_exhausted_total"#,
        r#"pcgate_token_refreshes_total{credential="user",result="error"}"#,
    ] {
        // The background refresh may already have counted the first tokens; nothing else ran.
        let value = values.get(series).copied();
        assert!(
            value.is_some(),
            "{series} is missing before the first call:\n{text}"
        );
        if !series.starts_with("pcgate_token_refreshes_total") {
            assert_eq!(value, Some(0.0), "{series}");
        }
    }
    // Routes without a cache or coalescing get no such series: labels stay bounded and honest.
    assert!(
        !text.contains(r#"pcgate_cache_lookups_total{route="invoices""#),
        "{text}"
    );
    assert!(
        !text.contains(r#"pcgate_coalesced_requests_total{route="invoice_documents""#),
        "{text}"
    );
}

/// Keeps this thread busy until it has used `cpu` of its own CPU time (read from
/// `/proc/thread-self/stat`, in clock ticks); fails if a busy machine gives it less within 5 s.
fn burn_cpu(cpu: std::time::Duration) {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        // utime and stime: fields 14 and 15, after the command in parentheses.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    };
    let (start, began) = (ticks(), std::time::Instant::now());
    let wanted = start + cpu.as_millis().div_ceil(10) as u64;
    let mut x = 0u64;
    while ticks() < wanted {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(5),
            "this thread got less than {cpu:?} of CPU in 5 s"
        );
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}
