//! The stack's own cost per call, without sockets or peers: a cache hit and a pass-through call
//! through the real tower stack (`stack::build`, every default layer on: tracking ids, metrics,
//! the access log at `info` as JSON, retry and credential), with an in-memory service where the
//! upstream client would be. Divan's allocation profiler counts the allocations of each call.
//!
//!     cargo bench --bench stack
//!
//! Regressions show here without the peers of `benches/run.sh`; compare runs of the same machine
//! (instruction counts from `perf stat` are steadier than times on a busy one).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use pcgate::body::{self, BoxError, Request, Response};
use tower::ServiceExt;

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

/// Routes as `benches/run.sh` configures them.
const CONFIG: &str = r#"
[upstream]
base_url = "http://127.0.0.1:9"
[credentials.fixed]
grant = "static"
token = "bench-token"
[[routes]]
name = "summary"
match = "GET /v1/invoices/summary"
credential = "fixed"
cache_ttl = "5m"
stale_while_revalidate = "1m"
stale_if_error = "1h"
coalesce = true
retry = true
[[routes]]
name = "invoices"
match = "GET /v1/invoices"
credential = "fixed"
retry = true
"#;

/// About what the sandbox answers for a summary (1.1 KB of JSON).
fn answer() -> Response {
    let json = format!("{{\"summary\":\"{}\"}}", "x".repeat(1090));
    let mut response = Response::new(body::full(json.clone()));
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        "application/json; charset=utf-8".parse().unwrap(),
    );
    headers.insert("ms-serverid", "sandbox-01".parse().unwrap());
    headers.insert("content-length", json.len().into());
    headers.insert(
        "date",
        httpdate::fmt_http_date(std::time::SystemTime::now())
            .parse()
            .unwrap(),
    );
    response
}

type Stack = Box<
    dyn FnMut(
        http::Request<Empty<Bytes>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response>>>,
>;

/// The stack over an in-memory upstream that counts its calls.
fn stack(calls: Arc<AtomicU64>) -> Stack {
    let config = pcgate::config::Config::from_toml(CONFIG).expect("the bench config is valid");
    let upstream = tower::service_fn(move |_request: Request| {
        calls.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, BoxError>(answer()))
    });
    let parts = pcgate::parts(&config)
        .expect("the bench parts build")
        .with_upstream(upstream);
    let service = pcgate::stack::build::<_, Empty<Bytes>>(parts);
    Box::new(move |request| {
        // hyper clones the stack for every call; so does the bench.
        let call = service.clone().oneshot(request);
        Box::pin(async move {
            let Ok::<_, Infallible>(response) = call.await;
            response
        })
    })
}

fn request(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", "127.0.0.1:8080")
        .header("user-agent", "wrk")
        .body(Empty::new())
        .unwrap()
}

/// One call, its body read to the end, as hyper would.
async fn call(stack: &mut Stack, path: &str) -> usize {
    let response = stack(request(path)).await;
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[divan::bench]
fn cache_hit(bencher: divan::Bencher) {
    let rt = runtime();
    let calls = Arc::new(AtomicU64::new(0));
    let mut stack = rt.block_on(async { stack(calls.clone()) });
    rt.block_on(call(&mut stack, "/v1/invoices/summary"));
    bencher.bench_local(|| rt.block_on(call(&mut stack, "/v1/invoices/summary")));
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "every call after the first is a hit"
    );
}

#[divan::bench]
fn pass_through(bencher: divan::Bencher) {
    let rt = runtime();
    let calls = Arc::new(AtomicU64::new(0));
    let mut stack = rt.block_on(async { stack(calls.clone()) });
    bencher.bench_local(|| rt.block_on(call(&mut stack, "/v1/invoices?size=1")));
    assert!(calls.load(Ordering::Relaxed) > 0);
}

fn main() {
    // The access log as `pcgate run` writes it by default (JSON at info, or `RUST_LOG`), into
    // nothing.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::sink)
        .fmt_fields(pcgate::log::JsonLines)
        .event_format(pcgate::log::JsonLines)
        .init();
    divan::main();
}
