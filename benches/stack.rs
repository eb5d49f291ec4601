//! The stack's own cost per call, without sockets or peers: a cache hit and a pass-through call
//! through the real tower stack (one lane's copy, `stack::Layers::lane`, every default layer on:
//! tracking ids, metrics, the access log at `info` as JSON, retry and credential), with an
//! in-memory service where the upstream client would be. Divan's allocation profiler counts the allocations of each call.
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
use pcgate::body::Response;
use tower::ServiceExt;

mod common;

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

type Stack = Box<
    dyn FnMut(
        http::Request<Empty<Bytes>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response>>>,
>;

/// The stack over an in-memory upstream that counts its calls.
fn stack(calls: Arc<AtomicU64>) -> Stack {
    let service = pcgate::stack::layers(common::parts(calls)).lane::<Empty<Bytes>>();
    Box::new(move |request| {
        // hyper clones the stack for every call; so does the bench.
        let call = service.clone().oneshot(request);
        Box::pin(async move {
            let Ok::<_, Infallible>(response) = call.await;
            response
        })
    })
}

/// One call, its body read to the end, as hyper would.
async fn call(stack: &mut Stack, path: &str) -> usize {
    let response = stack(common::request(path)).await;
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

#[divan::bench]
fn cache_hit(bencher: divan::Bencher) {
    let rt = common::runtime();
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
    let rt = common::runtime();
    let calls = Arc::new(AtomicU64::new(0));
    let mut stack = rt.block_on(async { stack(calls.clone()) });
    bencher.bench_local(|| rt.block_on(call(&mut stack, "/v1/invoices?size=1")));
    assert!(calls.load(Ordering::Relaxed) > 0);
}

fn main() {
    common::log_into_nothing();
    divan::main();
}
