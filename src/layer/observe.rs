//! `observe`: request metrics and one access-log event per call.
//!
//! It stands outside `rescue`, so it sees every answer as the caller does, errors included. The
//! layers inside tell it what they learned through a [`CallInfo`] in the request's extensions:
//! `access` the route, `cache` what it did, the upstream client each attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::body::{Request, Response};
use crate::layer::cache::CacheStatus;
use crate::layer::tracking::{MS_CORRELATION_ID, MS_REQUEST_ID};
use crate::metrics::{status_class, Metrics, RouteLabel, RouteStatus};

/// What the inner layers learned about one call.
#[derive(Debug, Default)]
pub struct CallInfo {
    route: OnceLock<Arc<str>>,
    cache: OnceLock<CacheStatus>,
    attempts: AtomicU32,
}

impl CallInfo {
    /// The call matched this route (set by `access`).
    pub fn set_route(&self, name: &Arc<str>) {
        let _ = self.route.set(name.clone());
    }

    /// What the cache did (set by `cache`).
    pub fn set_cache(&self, status: CacheStatus) {
        let _ = self.cache.set(status);
    }

    /// One more upstream attempt (counted by the upstream client).
    pub fn add_attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The route's name, `none` before (or without) a match.
    pub fn route(&self) -> Arc<str> {
        self.route
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::from(crate::route::NO_ROUTE))
    }
}

/// Adds [`Observe`] around a service.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Measures and logs each call; see the module docs.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Keeps the in-flight gauge right even when the caller hangs up mid-call.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

impl<S, E> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = E>,
    S::Future: Send + 'static,
    E: 'static,
{
    type Response = Response;
    type Error = E;
    type Future = Pin<Box<dyn Future<Output = Result<Response, E>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let info = Arc::new(CallInfo::default());
        request.extensions_mut().insert(info.clone());
        let started = Instant::now();
        // Only kept when the access log is on.
        let logged = tracing::enabled!(target: "pcgate::access", tracing::Level::INFO)
            .then(|| (request.method().clone(), request.uri().path().to_owned()));
        self.metrics.inflight.inc();
        let in_flight = InFlight(self.metrics.clone());
        let metrics = self.metrics.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            drop(in_flight);
            let Ok(response) = &result else {
                return result;
            };
            let elapsed = started.elapsed();
            let route = info.route();
            let status = response.status();
            let labels = RouteStatus {
                route: route.clone(),
                status: status_class(status),
            };
            metrics.requests.get_or_create(&labels).inc();
            metrics
                .request_duration
                .get_or_create(&RouteLabel {
                    route: route.clone(),
                })
                .observe(elapsed.as_secs_f64());
            if let Some((method, path)) = logged {
                let header = |name| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                };
                tracing::info!(
                    target: "pcgate::access",
                    %method,
                    path,
                    route = &*route,
                    status = status.as_u16(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    cache_status = info.cache.get().map_or("none", |c| c.as_str()),
                    attempts = info.attempts.load(Ordering::Relaxed),
                    request_id = header(MS_REQUEST_ID),
                    correlation_id = header(MS_CORRELATION_ID),
                    "call"
                );
            }
            result
        })
    }
}
