//! What the in-process benches share: the routes `benches/run.sh` configures, an in-memory
//! upstream answering about what the sandbox answers for a summary, and the access log into
//! nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use pcgate::body::{self, BoxError, Request, Response};

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
pub fn answer() -> Response {
    let json = format!("{{\"summary\":\"{}\"}}", "x".repeat(1090));
    let mut response = Response::new(body::full(json.clone()));
    let headers = response.headers_mut();
    let value = |text: &str| http::HeaderValue::from_str(text).expect("a valid value");
    headers.insert("content-type", value("application/json; charset=utf-8"));
    headers.insert("ms-serverid", value("sandbox-01"));
    headers.insert("content-length", json.len().into());
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    headers.insert("date", value(&date));
    response
}

/// A GET of `path` as wrk sends it.
pub fn request(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", "127.0.0.1:8080")
        .header("user-agent", "wrk")
        .body(Empty::new())
        .expect("a valid request")
}

/// An in-memory upstream that counts its calls and answers each with [`answer`].
#[derive(Clone)]
pub struct Upstream(pub Arc<AtomicU64>);

impl tower::Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request) -> Self::Future {
        self.0.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(answer()))
    }
}

/// The gateway's parts for [`CONFIG`], over an [`Upstream`] counting into `calls`. Built on a
/// runtime, as the gateway builds them (the store's housekeeping may spawn).
pub fn parts(calls: Arc<AtomicU64>) -> pcgate::stack::Parts<Upstream> {
    let config = pcgate::config::Config::from_toml(CONFIG).expect("the bench config is valid");
    pcgate::parts(&config)
        .expect("the bench parts build")
        .with_upstream(Upstream(calls))
}

/// A runtime of one thread, as each of the gateway's lanes has.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The access log as `pcgate run` writes it by default (JSON at info, or `RUST_LOG`), into
/// nothing.
pub fn log_into_nothing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::sink)
        .fmt_fields(pcgate::log::JsonLines)
        .event_format(pcgate::log::JsonLines)
        .init();
}
