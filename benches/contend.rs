//! What the lanes cost each other: cache hits through the real stack (as `benches/stack.rs`, the
//! access log at `info` into nothing), timed per call on one thread, then on two threads at once
//! (this machine's two cores), in three ways:
//!
//! - `lanes`: each thread its own copy of the stack (`stack::Layers::lane`), as `pcgate run`
//!   serves: the store, the locks and the metric series are shared, a call's handles are not;
//! - `one copy`: both threads on clones of one copy, so every handle a call clones (its route,
//!   the cache's, the metrics') is written from both cores;
//! - `apart`: two stacks that share nothing, not even the store (the floor for two threads).
//!
//!     cargo bench --bench contend
//!
//! `CALLS` sets the calls per thread and round (default 300000). Each way runs twice, in turns.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use pcgate::body::Response;
use tower::ServiceExt;

mod common;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The stack's layers over an in-memory upstream counting into `calls`.
fn layers(calls: Arc<AtomicU64>) -> pcgate::stack::Layers<common::Upstream> {
    pcgate::stack::layers(common::parts(calls))
}

/// One call, its body read to the end.
async fn call<S>(service: &mut S)
where
    S: tower::Service<http::Request<Empty<Bytes>>, Response = Response, Error = Infallible>,
{
    let Ok(response) = service
        .oneshot(common::request("/v1/invoices/summary"))
        .await;
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .expect("the answer's body")
        .to_bytes();
}

/// Nanoseconds per call on each of `services`' threads, all started together.
fn per_call<S>(services: Vec<S>, calls: u64) -> Vec<f64>
where
    S: tower::Service<http::Request<Empty<Bytes>>, Response = Response, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send,
{
    let barrier = Arc::new(Barrier::new(services.len()));
    let threads: Vec<_> = services
        .into_iter()
        .map(|mut service| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                common::runtime().block_on(async move {
                    // The first call fills the cache (or finds it filled): not timed.
                    call(&mut service).await;
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..calls {
                        call(&mut service).await;
                    }
                    start.elapsed().as_nanos() as f64 / calls as f64
                })
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().expect("a bench thread"))
        .collect()
}

fn main() {
    common::log_into_nothing();
    let calls: u64 = std::env::var("CALLS")
        .ok()
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(300_000);
    let upstream_calls = Arc::new(AtomicU64::new(0));
    // Built on a runtime, as the gateway builds them (the store's housekeeping may spawn).
    let shared = common::runtime().block_on(async { layers(upstream_calls.clone()) });
    let show = |way: &str, times: Vec<f64>| {
        let times: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
        println!("{way:<24} ns per call, by thread: {}", times.join(", "));
    };
    for _ in 0..2 {
        show("one thread", per_call(vec![shared.lane()], calls));
        show(
            "two threads, lanes",
            per_call(vec![shared.lane(), shared.lane()], calls),
        );
        let copy = shared.lane();
        show(
            "two threads, one copy",
            per_call(vec![copy.clone(), copy], calls),
        );
        let apart = common::runtime().block_on(async {
            let own = Arc::new(AtomicU64::new(0));
            (layers(own.clone()).lane(), layers(own).lane())
        });
        show(
            "two threads, apart",
            per_call(vec![apart.0, apart.1], calls),
        );
    }
    assert_eq!(
        upstream_calls.load(Ordering::Relaxed),
        1,
        "every call on the shared store after the first is a hit"
    );
}
