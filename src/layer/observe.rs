//! `observe`: request metrics and one access-log event per call.
//!
//! It stands outside `rescue`, so it sees every answer as the caller does, errors included. The
//! layers inside tell it what they learned through a [`CallInfo`] in the request's extensions:
//! `access` the route, `cache` what it did, the upstream client each attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::body::{Request, Response};
pub use crate::call::CallInfo;
use crate::call::NO_ROUTE;
use crate::headers::{MS_CORRELATION_ID, MS_REQUEST_ID};
use crate::metrics::{
    latency_histogram, status_class_index, Metrics, PerRoute, RouteLabel, RouteStatus,
    STATUS_CLASSES,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// The call metrics, registered by this layer: every route's series exist from start.
struct CallMetrics {
    /// Each route's series.
    routes: PerRoute<RouteSeries>,
    /// The series of calls no route matched ([`NO_ROUTE`]).
    unmatched: RouteSeries,
    /// `pcgate_inflight_requests`.
    inflight: Gauge,
}

/// One route's call series.
struct RouteSeries {
    /// `pcgate_requests_total{route,status}`, by [`STATUS_CLASSES`] index.
    requests: [Counter; STATUS_CLASSES.len()],
    /// `pcgate_request_duration_seconds{route}`.
    duration: Histogram,
}

impl CallMetrics {
    fn register(metrics: &Metrics, routes: &[&str]) -> CallMetrics {
        let requests = Family::<RouteStatus, Counter>::default();
        let duration: Family<RouteLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let series = |route: &Arc<str>| RouteSeries {
            requests: STATUS_CLASSES.map(|status| {
                requests
                    .get_or_create(&RouteStatus {
                        route: route.clone(),
                        status,
                    })
                    .clone()
            }),
            duration: duration
                .get_or_create(&RouteLabel {
                    route: route.clone(),
                })
                .clone(),
        };
        let unmatched = series(&Arc::from(NO_ROUTE));
        let routes = PerRoute::new(routes.iter().copied(), series);
        let inflight = Gauge::default();
        metrics.register(
            "requests",
            "Calls answered, by route and status class",
            requests.clone(),
        );
        metrics.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            duration.clone(),
        );
        metrics.register(
            "inflight_requests",
            "Calls being served now",
            inflight.clone(),
        );
        CallMetrics {
            routes,
            unmatched,
            inflight,
        }
    }

    /// The series of the route `access` matched, else those of calls no route matched.
    fn series(&self, route: Option<&str>) -> &RouteSeries {
        route
            .and_then(|route| self.routes.get(route))
            .unwrap_or(&self.unmatched)
    }
}

/// Adds [`Observe`] around a service.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<CallMetrics>,
}

impl ObserveLayer {
    /// Registers the call metrics in `metrics`, each of `routes` (and calls no route matched)
    /// exported at zero from start.
    pub fn new(metrics: &Metrics, routes: &[&str]) -> Self {
        ObserveLayer {
            metrics: Arc::new(CallMetrics::register(metrics, routes)),
        }
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
    metrics: Arc<CallMetrics>,
}

/// Keeps the in-flight gauge right even when the caller hangs up mid-call.
struct InFlight(Arc<CallMetrics>);

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
            .then(|| (request.method().clone(), request.uri().clone()));
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
            let status = response.status();
            let series = metrics.series(info.matched_route());
            series.requests[status_class_index(status)].inc();
            series.duration.observe(elapsed.as_secs_f64());
            if let Some((method, uri)) = logged {
                let header = |name| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                };
                tracing::info!(
                    target: "pcgate::access",
                    method = method.as_str(),
                    path = uri.path(),
                    route = info.matched_route().unwrap_or(NO_ROUTE),
                    status = status.as_u16(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    cache_status = info.cache(),
                    attempts = info.attempts(),
                    request_id = header(MS_REQUEST_ID),
                    correlation_id = header(MS_CORRELATION_ID),
                    "call"
                );
            }
            result
        })
    }
}
