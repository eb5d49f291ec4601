//! What hyper alone does on this machine, for `benches/run.sh` to set beside pcgate: the same
//! runtime shape as `pcgate run` (one single-threaded runtime and accept loop per core, one
//! upstream client per thread) with nothing else on the path. No ids, no metrics, no log, no
//! access rules, no cache policy, no deadline, no retry.
//!
//!     cargo run --release --example ceiling -- <listen> <upstream> <authorization value>
//!
//! - `GET /v1/invoices/summary` is answered from the first upstream answer, kept as it came:
//!   the least a cache hit can cost.
//! - Any other request goes to `<upstream>` (`127.0.0.1:19100`) with the given `Authorization`,
//!   over kept-alive connections: the least a pass-through call can cost.
//!
//! A benchmark peer, not part of pcgate: it trusts its upstream and panics on what it does not
//! expect.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;
type Upstream = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The kept summary answer: its head and body.
type Kept = Arc<OnceLock<(http::response::Parts, Bytes)>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(authorization)) =
        (args.next(), args.next(), args.next())
    else {
        eprintln!("usage: ceiling <listen> <upstream host:port> <authorization value>");
        std::process::exit(2);
    };
    let authorization: http::HeaderValue = authorization.parse().expect("authorization value");
    let listener = std::net::TcpListener::bind(&listen).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kept: Kept = Arc::default();
    let threads: Vec<_> = (0..lanes)
        .map(|_| {
            let listener = listener.try_clone().expect("listener copy");
            let (upstream, authorization, kept) =
                (upstream.clone(), authorization.clone(), kept.clone());
            std::thread::spawn(move || lane(listener, upstream, authorization, kept))
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// One thread: its own runtime, accept loop and upstream client.
fn lane(
    listener: std::net::TcpListener,
    upstream: String,
    authorization: http::HeaderValue,
    kept: Kept,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
        let upstream: Arc<str> = Arc::from(upstream);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (client, upstream, authorization, kept) = (
                client.clone(),
                upstream.clone(),
                authorization.clone(),
                kept.clone(),
            );
            let service = hyper::service::service_fn(move |request| {
                answer(
                    request,
                    client.clone(),
                    upstream.clone(),
                    authorization.clone(),
                    kept.clone(),
                )
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn answer(
    request: http::Request<Incoming>,
    client: Upstream,
    upstream: Arc<str>,
    authorization: http::HeaderValue,
    kept: Kept,
) -> Result<http::Response<Body>, Infallible> {
    let cached = request.uri().path() == "/v1/invoices/summary";
    if cached {
        if let Some((head, body)) = kept.get() {
            let response = http::Response::from_parts(head.clone(), Full::new(body.clone()));
            return Ok(response.map(|body| body.map_err(|never| match never {}).boxed_unsync()));
        }
    }
    let (mut parts, _) = request.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("http://{upstream}{target}")
        .parse()
        .expect("upstream URI");
    parts.headers.remove(http::header::HOST);
    parts
        .headers
        .insert(http::header::AUTHORIZATION, authorization);
    let request = http::Request::from_parts(parts, Full::new(Bytes::new()));
    let response = client.request(request).await.expect("upstream answer");
    if !cached {
        return Ok(response.map(BodyExt::boxed_unsync));
    }
    let (head, body) = response.into_parts();
    let body = body.collect().await.expect("upstream body").to_bytes();
    let _ = kept.set((head.clone(), body.clone()));
    let response = http::Response::from_parts(head, Full::new(body));
    Ok(response.map(|body| body.map_err(|never| match never {}).boxed_unsync()))
}
