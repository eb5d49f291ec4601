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

/// The call metrics, registered by this layer: every route's series exist from start. A clone's
/// handles count into the same series.
#[derive(Clone)]
struct CallMetrics {
    /// Each route's series.
    routes: PerRoute<RouteSeries>,
    /// The series of calls no route matched ([`NO_ROUTE`]).
    unmatched: RouteSeries,
    /// `pcgate_inflight_requests`.
    inflight: Gauge,
}

/// One route's call series.
#[derive(Clone)]
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

impl ObserveLayer {
    /// A copy for one lane: the same series, through handles of its own (see
    /// [`crate::stack::Layers::lane`]).
    pub fn lane(&self) -> Self {
        ObserveLayer {
            metrics: Arc::new(CallMetrics::clone(&self.metrics)),
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
{
    type Response = Response;
    type Error = E;
    type Future = ResponseFuture<S::Future>;

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
        let watch = Watch {
            in_flight: InFlight(self.metrics.clone()),
            info,
            started,
            logged,
        };
        ResponseFuture {
            call: self.inner.call(request),
            watch: Some(watch),
        }
    }
}

/// What a call's answer is counted and logged with; dropped with the call if the caller goes away
/// first (the in-flight gauge falls either way).
struct Watch {
    in_flight: InFlight,
    info: Arc<CallInfo>,
    started: Instant,
    /// The method and target as the caller sent them, when the access log is on.
    logged: Option<(http::Method, http::Uri)>,
}

impl Watch {
    /// Counts the answer in its route's series and writes its access-log line.
    fn answered(self, response: &Response) {
        let Watch {
            in_flight,
            info,
            started,
            logged,
        } = self;
        let elapsed = started.elapsed();
        let status = response.status();
        let series = in_flight.0.series(info.matched_route());
        series.requests[status_class_index(status)].inc();
        series.duration.observe(elapsed.as_secs_f64());
        drop(in_flight);
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
    }
}

pin_project_lite::pin_project! {
    /// The inner call's answer, counted and logged as it comes out (a concrete future: no box per
    /// call).
    pub struct ResponseFuture<F> {
        #[pin]
        call: F,
        watch: Option<Watch>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.call.poll(cx));
        if let Some(watch) = this.watch.take() {
            match &result {
                Ok(response) => watch.answered(response),
                // An error is still a call that ended: only the gauge moves.
                Err(_) => drop(watch),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service};

    use super::*;

    fn summary_call() -> Request {
        http::Request::get("/v1/invoices/summary")
            .body(crate::body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_call_is_in_flight_until_answered_and_counted_once() {
        let metrics = Metrics::new();
        let layer = ObserveLayer::new(&metrics, &["summary"]);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut rx = Some(rx);
        let mut service = layer.layer(tower::service_fn(move |request: Request| {
            let rx = rx.take().expect("called once");
            let info = request.extensions().get::<Arc<CallInfo>>().cloned();
            async move {
                info.expect("observe hands the call its CallInfo")
                    .set_route(&Arc::from("summary"));
                let _ = rx.await;
                Ok::<_, Infallible>(Response::new(crate::body::empty()))
            }
        }));
        let call = tokio::spawn(service.call(summary_call()));
        tokio::task::yield_now().await;
        assert_eq!(layer.metrics.inflight.get(), 1);
        assert_eq!(layer.metrics.series(Some("summary")).requests[1].get(), 0);
        tx.send(()).unwrap();
        let Ok(response) = call.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(layer.metrics.inflight.get(), 0);
        assert_eq!(
            layer.metrics.series(Some("summary")).requests[1].get(),
            1,
            "one 2xx counted for the route access matched"
        );
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_leaves_nothing_in_flight_and_counts_nothing() {
        let metrics = Metrics::new();
        let layer = ObserveLayer::new(&metrics, &["summary"]);
        let mut service = layer.layer(tower::service_fn(|_request: Request| {
            std::future::pending::<Result<Response, Infallible>>()
        }));
        let call = service.call(summary_call());
        assert_eq!(layer.metrics.inflight.get(), 1);
        // The caller hangs up: hyper drops the call's future.
        drop(call);
        assert_eq!(layer.metrics.inflight.get(), 0);
        let unmatched = layer.metrics.series(None);
        assert_eq!(unmatched.requests.iter().map(Counter::get).sum::<u64>(), 0);
    }
}
