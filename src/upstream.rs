//! The innermost service: sends the call to Partner Center over a pooled hyper-util client on
//! rustls (HTTP/2 or HTTP/1.1 by ALPN), and streams the answer back.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header;
use http::uri::PathAndQuery;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, Body, BoxError, BoxFuture, Request, Response};
use crate::call::CallInfo;
use crate::config::{BaseUrl, CaFileError, UpstreamConfig};
pub use crate::headers::strip_hop_by_hop;
use crate::headers::{strip_fixed_hop_by_hop, MS_CV};
use crate::layer::tracking::CallIds;
use crate::metrics::{
    latency_histogram, status_class_index, Metrics, PerRoute, RouteLabel, UpstreamLabels,
    STATUS_CLASSES, TRANSPORT_OUTCOMES,
};
use crate::route::Route;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an upstream attempt failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP or TLS connect failed (refused, unreachable, bad certificate, connect timeout).
    #[error("upstream unreachable: {0}")]
    Connect(String),
    /// No response headers within `attempt_timeout`.
    #[error("upstream did not answer within {0:?} (upstream.attempt_timeout)")]
    Timeout(Duration),
    /// The connection broke or the upstream spoke bad HTTP.
    #[error("upstream request failed: {0}")]
    Protocol(String),
}

impl crate::error::Problem for UpstreamError {
    fn status(&self) -> http::StatusCode {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Protocol(_) => http::StatusCode::BAD_GATEWAY,
            UpstreamError::Timeout(_) => http::StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn error_name(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "UpstreamUnreachable",
            UpstreamError::Protocol(_) => "UpstreamFailed",
            UpstreamError::Timeout(_) => "UpstreamTimeout",
        }
    }
}

/// Why the TLS client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `ca_file` could not be read or holds no certificate.
    #[error(transparent)]
    CaFile(#[from] CaFileError),
    /// rustls refused the settings.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client settings for the upstream and the token endpoints: webpki roots plus `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in crate::config::ca_certificates(path)? {
            roots.add(cert).map_err(|e| CaFileError {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sends each request to the upstream; cheap to clone: one `Arc` (hyper clones the stack for
/// every call, and the client alone holds several).
#[derive(Clone)]
pub struct Upstream(Arc<Shared>);

/// What every clone of [`Upstream`] shares.
struct Shared {
    /// The pooled clients, one per lane of the gateway's listener ([`crate::server::lane`]): a
    /// connection is opened, driven and reused on one thread, so a call never waits on another
    /// thread's runtime to write its request or hand back the answer. A thread that is not a
    /// lane (none calls the upstream today) uses the first.
    clients: Box<[Client<HttpsConnector<HttpConnector>, Body>]>,
    /// `upstream.base_url`.
    base: BaseUrl,
    /// `upstream.attempt_timeout`.
    attempt_timeout: Duration,
    /// The attempt metrics.
    metrics: AttemptMetrics,
}

/// The upstream attempt metrics, registered by the client that makes the attempts: every route's
/// series exist from start.
struct AttemptMetrics {
    /// `pcgate_upstream_requests_total{route,outcome}`.
    requests: Family<UpstreamLabels, Counter>,
    /// `pcgate_upstream_duration_seconds{route}`.
    duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Each route's series, taken from the families once.
    routes: PerRoute<AttemptSeries>,
}

/// One route's attempt series.
struct AttemptSeries {
    /// By [`OUTCOMES`] index.
    requests: [Counter; OUTCOMES.len()],
    duration: Histogram,
}

/// An attempt's outcomes: a status class, or how the transport failed.
const OUTCOMES: [&str; STATUS_CLASSES.len() + TRANSPORT_OUTCOMES.len()] = {
    let mut all = [""; STATUS_CLASSES.len() + TRANSPORT_OUTCOMES.len()];
    let mut i = 0;
    while i < all.len() {
        all[i] = if i < STATUS_CLASSES.len() {
            STATUS_CLASSES[i]
        } else {
            TRANSPORT_OUTCOMES[i - STATUS_CLASSES.len()]
        };
        i += 1;
    }
    all
};

/// `name`'s index in [`OUTCOMES`].
fn outcome_index(name: &str) -> usize {
    OUTCOMES
        .iter()
        .position(|outcome| *outcome == name)
        .unwrap_or(OUTCOMES.len() - 1)
}

impl AttemptMetrics {
    fn register(metrics: &Metrics, routes: &[&str]) -> AttemptMetrics {
        let requests = Family::<UpstreamLabels, Counter>::default();
        let duration: Family<RouteLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let routes = PerRoute::new(routes.iter().copied(), |route| AttemptSeries {
            requests: OUTCOMES.map(|outcome| {
                requests
                    .get_or_create(&UpstreamLabels {
                        route: route.clone(),
                        outcome,
                    })
                    .clone()
            }),
            duration: duration
                .get_or_create(&RouteLabel {
                    route: route.clone(),
                })
                .clone(),
        });
        metrics.register(
            "upstream_requests",
            "Upstream attempts, by route and outcome",
            requests.clone(),
        );
        metrics.register(
            "upstream_duration_seconds",
            "Upstream attempt time to response headers, by route",
            duration.clone(),
        );
        AttemptMetrics {
            requests,
            duration,
            routes,
        }
    }

    /// Counts one attempt of `route` that ended in `outcome` (an [`OUTCOMES`] index).
    fn count(&self, route: Option<&Arc<str>>, outcome: usize, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(series) = route.and_then(|route| self.routes.get(route)) {
            series.requests[outcome].inc();
            series.duration.observe(seconds);
            return;
        }
        // A route not known at start (none today): its series are made on first use.
        let route: Arc<str> = route.map_or_else(|| Arc::from(crate::call::NO_ROUTE), Arc::clone);
        self.requests
            .get_or_create(&UpstreamLabels {
                route: route.clone(),
                outcome: OUTCOMES[outcome],
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabel { route })
            .observe(seconds);
    }
}

impl Upstream {
    /// Builds the pooled client from `[upstream]`, and registers the attempt metrics in
    /// `metrics`, each of `routes` exported at zero from start.
    pub fn new(
        config: &UpstreamConfig,
        tls: rustls::ClientConfig,
        metrics: &Metrics,
        routes: &[&str],
    ) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let clients = (0..crate::server::default_lanes())
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .build(https.clone())
            })
            .collect();
        Upstream(Arc::new(Shared {
            clients,
            base: config.base_url.clone(),
            attempt_timeout: config.attempt_timeout,
            metrics: AttemptMetrics::register(metrics, routes),
        }))
    }
}

impl tower::Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let joined = match request.uri().path_and_query() {
            Some(path_and_query) => self.0.base.join(path_and_query),
            None => self.0.base.join(&PathAndQuery::from_static("/")),
        };
        let uri = match joined {
            Ok(uri) => uri,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        *request.uri_mut() = uri;
        // HTTP/2 to the upstream is negotiated by ALPN; the version the caller spoke is its own.
        *request.version_mut() = http::Version::HTTP_11;
        // The caller's hop-by-hop headers went as the request entered; this catches any that
        // a layer put back, without honouring a `Connection` list (which could name ours).
        strip_fixed_hop_by_hop(request.headers_mut());
        // Each attempt is a new outgoing call: the next correlation vector (cV spec: increment).
        if let Some(cv) = request
            .extensions()
            .get::<CallIds>()
            .and_then(CallIds::next_cv)
        {
            request.headers_mut().insert(MS_CV, cv);
        }
        // The client writes `Host` (or `:authority`) from the upstream URI.
        request.headers_mut().remove(header::HOST);

        if let Some(info) = request.extensions().get::<Arc<CallInfo>>() {
            info.add_attempt();
        }
        let route = request
            .extensions()
            .get::<Arc<Route>>()
            .map(|route| route.name.clone());
        let caller_body = request.extensions().get::<body::ClientBody>().cloned();
        let clients = &self.0.clients;
        let sent = clients[crate::server::lane() % clients.len()].request(request);
        let limit = self.0.attempt_timeout;
        let shared = self.0.clone();
        Box::pin(async move {
            let metrics = &shared.metrics;
            let started = tokio::time::Instant::now();
            let result = tokio::time::timeout(limit, sent).await;
            let outcome = match &result {
                Ok(Ok(response)) => status_class_index(response.status()),
                Ok(Err(e)) if e.is_connect() => outcome_index("connect_error"),
                Ok(Err(_)) => outcome_index("error"),
                Err(_) => outcome_index("timeout"),
            };
            metrics.count(route.as_ref(), outcome, started.elapsed());
            let response = match result {
                Err(_) => return Err(UpstreamError::Timeout(limit).into()),
                Ok(Err(e)) if e.is_connect() => {
                    return Err(UpstreamError::Connect(error_chain(&e)).into())
                }
                // Sending failed because the caller's own body broke (hyper reports only an
                // incomplete message): that failure is the caller's.
                Ok(Err(_)) if caller_body.as_ref().is_some_and(body::ClientBody::failed) => {
                    return Err(body::ClientBodyError.into())
                }
                Ok(Err(e)) => return Err(UpstreamError::Protocol(error_chain(&e)).into()),
                Ok(Ok(response)) => response,
            };
            let (mut parts, incoming) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body::from_upstream(incoming)))
        })
    }
}

/// The error and its causes on one line, so "connection refused" is not hidden behind "client error".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
