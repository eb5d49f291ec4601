//! The request path: one tower stack, put together in one place ([`layers`], then
//! [`Layers::lane`]), read top to bottom as outside to inside (DESIGN.md §2).

use crate::body::Response;
use crate::config::ClientKey;
use crate::deadline::Deadline;
use crate::layer::access::AccessLayer;
use crate::layer::cache::{CacheLayer, MemoryStore};
use crate::layer::coalesce::CoalesceLayer;
use crate::layer::credential::CredentialLayer;
use crate::layer::limit::LimitLayer;
use crate::layer::observe::ObserveLayer;
use crate::layer::rescue::RescueLayer;
use crate::layer::retry::{RetryLayer, RetrySettings};
use crate::layer::tracking::{TrackingLayer, TrackingSettings};
use crate::route::RouteTable;
use crate::token::TokenSources;
use crate::upstream::Upstream;

/// Everything the stack is built from, prepared once at start-up. `U` is the innermost service:
/// the pooled upstream client, or an in-memory one in the micro benchmark (`benches/stack.rs`).
pub struct Parts<U = Upstream> {
    /// The names of the routes with a cache (their lookups are exported from start).
    pub cached_routes: Vec<String>,
    /// Call metrics and the access log (its metric families already registered).
    pub observe: ObserveLayer,
    /// The route table, matched by `access`.
    pub routes: RouteTable,
    /// Inbound keys checked by `access` (none: trust the loopback listener).
    pub keys: Vec<ClientKey>,
    /// The `Host` names answered when there are no inbound keys (DNS rebinding defence).
    pub hosts: crate::host::HostRule,
    /// Token sources, by credential name (each route holds its own handle; these run refreshers).
    pub tokens: TokenSources,
    /// The response cache's in-process store.
    pub store: std::sync::Arc<MemoryStore>,
    /// What the cache layer stores into: `store`, or `store` in front of Redis with `[shared]`.
    pub cache: std::sync::Arc<dyn crate::layer::cache::Storage>,
    /// The fleet tier on Redis, when `[shared]` is configured.
    pub shared: Option<crate::shared::Shared>,
    /// Retry policy and the call deadline.
    pub retry: RetrySettings,
    /// The throttle budget: upstream 429 holds and `upstream.rate_limit` (fleet-wide with
    /// `[shared]`).
    pub limit: LimitLayer,
    /// Where every layer counts what it does.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Tracking header settings.
    pub tracking: TrackingSettings,
    /// The pooled upstream client.
    pub upstream: U,
    /// `upstream.forward_headers`: forwarded beyond the documented request headers.
    pub forward_headers: Vec<http::HeaderName>,
    /// `cache.key_headers`: in every cache and coalescing key.
    pub key_headers: std::sync::Arc<[http::HeaderName]>,
}

impl<U> Parts<U> {
    /// The same parts around another innermost service (the micro benchmark's in-memory one).
    pub fn with_upstream<V>(self, upstream: V) -> Parts<V> {
        Parts {
            cached_routes: self.cached_routes,
            observe: self.observe,
            routes: self.routes,
            keys: self.keys,
            hosts: self.hosts,
            tokens: self.tokens,
            store: self.store,
            cache: self.cache,
            shared: self.shared,
            retry: self.retry,
            limit: self.limit,
            metrics: self.metrics,
            tracking: self.tracking,
            upstream,
            forward_headers: self.forward_headers,
            key_headers: self.key_headers,
        }
    }
}

/// The layers of the stack, each built once: what they share between calls (metric families, the
/// cache's miss locks, coalescing's flights, the throttle) exists once, however many copies of
/// the stack serve.
pub struct Layers<U = Upstream> {
    deadline: std::time::Duration,
    observe: ObserveLayer,
    tracking: TrackingLayer,
    access: AccessLayer,
    cache: CacheLayer,
    coalesce: CoalesceLayer,
    retry: RetryLayer,
    limit: LimitLayer,
    upstream: U,
}

/// Builds every layer's shared state from `parts`, once.
pub fn layers<U>(parts: Parts<U>) -> Layers<U> {
    Layers {
        deadline: parts.retry.deadline,
        observe: parts.observe,
        tracking: TrackingLayer::new(parts.tracking),
        access: AccessLayer::new(parts.routes, parts.keys, parts.hosts)
            .forward_headers(parts.forward_headers),
        cache: CacheLayer::new(
            parts.cache.clone(),
            parts.store.max_entry_bytes(),
            parts.metrics.clone(),
            parts.retry.deadline,
        )
        .routes(
            &parts
                .cached_routes
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .key_headers(parts.key_headers.clone()),
        coalesce: CoalesceLayer::new(
            parts.store.max_entry_bytes(),
            parts.retry.deadline,
            parts.metrics.clone(),
        )
        .key_headers(parts.key_headers),
        retry: RetryLayer::new(parts.retry, &parts.metrics),
        limit: parts.limit,
        upstream: parts.upstream,
    }
}

impl<U> Layers<U> {
    /// The gateway's service: a request as hyper hands it over in (`B` is hyper's `Incoming`), a
    /// response out, never an error.
    ///
    /// Each lane (`server::serve_lanes`) serves a copy of its own, and its connections clones of
    /// that copy. What a cache hit clones (its route, the cache's handles, the metrics' handles,
    /// the values of configured headers) then belongs to its lane, so two cores do not write its
    /// reference counts: shared, they cost a hit on two lanes about half as much again as on one
    /// (`benches/contend.rs`). Coalescing, retry, the throttle and the upstream client are the
    /// same `Arc`s in every copy (a miss's clones of them still cross the cores). What the lanes
    /// must share is shared still (`tests::lane_copies_share_the_store_the_flights_and_the_series`).
    pub fn lane<B>(
        &self,
    ) -> impl tower::Service<
        http::Request<B>,
        Response = Response,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
           + Send
           + 'static
    where
        U: tower::Service<crate::body::Request, Response = Response, Error = crate::body::BoxError>
            + Clone
            + Send
            + 'static,
        U::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::body::BoxError>,
    {
        let limit = self.deadline;
        tower::ServiceBuilder::new()
            // As the call enters: hop-by-hop headers belong to the caller's connection, so they go
            // before any layer adds a header that `Connection: <name>` could otherwise remove; the
            // deadline starts now, once, for every layer below to wait against; the body's errors
            // are marked as the caller's.
            .map_request(move |mut request: http::Request<B>| {
                crate::upstream::strip_hop_by_hop(request.headers_mut());
                request.extensions_mut().insert(Deadline::after(limit));
                crate::body::from_client(request)
            })
            // Outermost: it measures and logs each call as the caller saw it, errors included.
            .layer(self.observe.lane())
            // Ids are fixed before anything can fail, and stamped on every answer: rescue's too.
            .layer(self.tracking.lane())
            // Every error from any layer below becomes a Partner Center-shaped response; hyper
            // never sees an `Err`.
            .layer(RescueLayer)
            // Refuse what the route table does not allow before any other work is done, and drop
            // every request header that is not forwarded, before anything keys on them.
            .layer(self.access.lane())
            // Inside access, so only allowed calls are looked up, keyed with the route's
            // credential; on a miss it takes the key's lock, so identical misses make one fetch,
            // stored once.
            .layer(self.cache.lane())
            // Uncached routes: identical calls in flight share one upstream fetch.
            .layer(self.coalesce.clone())
            // The deadline and the retries wrap every attempt, inside the cache and coalescing so
            // a shared or stored answer is the one that came after retrying.
            .layer(self.retry.clone())
            // Every attempt, and the 401 replay, carries a current token.
            .layer(CredentialLayer::new())
            // Right above the client, so every request that reaches the upstream (retries and 401
            // replays included) waits out a 429's hold and takes a rate-limit slot, within the
            // call's deadline; a token request is not an API call and is not counted.
            .layer(self.limit.clone())
            .service(self.upstream.clone())
    }
}

#[cfg(test)]
mod tests {
    //! Lane copies share what the lanes must share: a test that fails if a `lane()` forks the
    //! store, coalescing's flights or a metric series.

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use tower::ServiceExt;

    use crate::body::{BoxError, Request, Response};

    const CONFIG: &str = r#"
[upstream]
base_url = "http://127.0.0.1:9"
[credentials.fixed]
grant = "static"
token = "test-token"
[[routes]]
name = "summary"
match = "GET /v1/invoices/summary"
credential = "fixed"
cache_ttl = "5m"
coalesce = true
[[routes]]
name = "invoice"
match = "GET /v1/invoices/*"
credential = "fixed"
coalesce = true
"#;

    /// An upstream that counts its calls and answers each after `delay`.
    #[derive(Clone)]
    struct Slow {
        calls: Arc<AtomicU64>,
        delay: Duration,
    }

    impl tower::Service<Request> for Slow {
        type Response = Response;
        type Error = BoxError;
        type Future = futures_util::future::BoxFuture<'static, Result<Response, BoxError>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut response = Response::new(crate::body::full("{\"id\":\"D1\"}"));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok(response)
            })
        }
    }

    fn request(path: &str) -> http::Request<Empty<Bytes>> {
        http::Request::builder()
            .uri(path)
            .header("host", "127.0.0.1:8080")
            .body(Empty::new())
            .expect("a valid request")
    }

    async fn status<S>(service: S, path: &str) -> http::StatusCode
    where
        S: tower::Service<
            http::Request<Empty<Bytes>>,
            Response = Response,
            Error = std::convert::Infallible,
        >,
    {
        let Ok(response) = service.oneshot(request(path)).await;
        let status = response.status();
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("the answer's body");
        status
    }

    #[tokio::test(start_paused = true)]
    async fn lane_copies_share_the_store_the_flights_and_the_series() {
        let config = crate::config::Config::from_toml(CONFIG).expect("a valid config");
        let calls = Arc::new(AtomicU64::new(0));
        let parts = crate::parts(&config).expect("the parts build");
        let metrics = parts.metrics.clone();
        let layers = super::layers(parts.with_upstream(Slow {
            calls: calls.clone(),
            delay: Duration::from_millis(100),
        }));
        let (a, b) = (layers.lane(), layers.lane());

        // A miss on one lane fills the store the other lane hits.
        assert_eq!(status(a.clone(), "/v1/invoices/summary").await, 200);
        assert_eq!(status(b.clone(), "/v1/invoices/summary").await, 200);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the second lane hit");

        // Identical uncached calls in flight on two lanes share one fetch.
        let (first, second) = tokio::join!(
            status(a.clone(), "/v1/invoices/D1"),
            status(b.clone(), "/v1/invoices/D1"),
        );
        assert_eq!(
            (first, second),
            (http::StatusCode::OK, http::StatusCode::OK)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one fetch for both lanes");

        // Both lanes count into the series /metrics shows.
        let text = metrics.encode();
        for series in [
            "pcgate_cache_lookups_total{route=\"summary\",result=\"miss\"} 1",
            "pcgate_cache_lookups_total{route=\"summary\",result=\"hit\"} 1",
            "pcgate_requests_total{route=\"summary\",status=\"2xx\"} 2",
            "pcgate_requests_total{route=\"invoice\",status=\"2xx\"} 2",
            "pcgate_coalesced_requests_total{route=\"invoice\"} 1",
            "pcgate_inflight_requests 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}
