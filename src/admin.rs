//! The admin listener: `GET /healthz` (the process is alive), `GET /readyz` (every credential a
//! route uses holds a valid token), `GET /metrics` (Prometheus), `POST /cache/purge[?prefix=]`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, Response};
use crate::error::problem;
use crate::host::{HostError, HostRule};
use crate::layer::cache::{MemoryStore, Purge, Storage};
use crate::metrics::Metrics;
use crate::token::TokenSource;

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct Admin {
    /// The `Host` names and the `Origin` answered.
    pub hosts: HostRule,
    /// The token sources some route uses (the route table's own handles): readiness waits for
    /// these.
    pub credentials: Arc<[TokenSource]>,
    /// The response cache's first tier (size gauges).
    pub store: Arc<MemoryStore>,
    /// What purges go to: the first tier, or with `[shared]` every sidecar of the namespace.
    pub cache: Arc<dyn Storage>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
}

impl Admin {
    /// Answers one admin request.
    pub async fn handle(self, request: http::Request<Incoming>) -> Result<Response, Infallible> {
        let mut response = match self.route(&request).await {
            Ok(response) => response,
            Err(error @ HostError::Misdirected(_)) => problem(
                StatusCode::MISDIRECTED_REQUEST,
                "MisdirectedRequest",
                &error.to_string(),
            ),
            Err(error @ HostError::ForeignOrigin(_)) => {
                problem(StatusCode::FORBIDDEN, "ForeignOrigin", &error.to_string())
            }
        };
        // Health, metrics and purge answers are about this moment: no cache may keep them.
        response.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        Ok(response)
    }

    async fn route(&self, request: &http::Request<Incoming>) -> Result<Response, HostError> {
        self.hosts.check_host(request)?;
        self.hosts.check_origin(request)?;
        Ok(match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            (&Method::GET | &Method::HEAD, "/readyz") => self.readiness(),
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(request.headers()),
            (&Method::POST, "/cache/purge") => self.purge(request.uri().query()).await,
            (_, "/healthz" | "/readyz" | "/metrics") => {
                problem(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "use GET")
            }
            (_, "/cache/purge") => problem(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "use POST"),
            (_, path) => problem(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no admin endpoint {path}: try /healthz, /readyz, /metrics or POST /cache/purge"),
            ),
        })
    }

    fn readiness(&self) -> Response {
        // Each credential without a valid token, and why its last token request failed.
        let missing: Vec<String> = self
            .credentials
            .iter()
            .filter(|source| source.current().is_none())
            .map(|source| match source.last_error() {
                Some(cause) => format!("{} ({cause})", source.name()),
                None => source.name().to_owned(),
            })
            .collect();
        if missing.is_empty() {
            text(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".into(),
            )
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!(
                    "not ready: no valid token yet for credential {}\n",
                    missing.join(", ")
                ),
            )
        }
    }

    fn metrics(&self, headers: &http::HeaderMap) -> Response {
        // Gauges read from elsewhere are brought up to date at scrape time.
        self.store.usage();
        let openmetrics = headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        if openmetrics {
            text(
                StatusCode::OK,
                crate::metrics::OPENMETRICS,
                self.metrics.encode_openmetrics(),
            )
        } else {
            text(
                StatusCode::OK,
                crate::metrics::PROMETHEUS_TEXT,
                self.metrics.encode(),
            )
        }
    }

    async fn purge(&self, query: Option<&str>) -> Response {
        let prefix = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "prefix")
                .map(|(_, v)| v.into_owned())
        });
        if let Some(p) = &prefix {
            if !p.starts_with('/') {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "InvalidPrefix",
                    "prefix must be a path, e.g. /v1/invoices/summary",
                );
            }
        }
        let scope = prefix.clone().map_or(Purge::All, Purge::Under);
        let purged = match self.cache.purge(scope).await {
            Ok(purged) => purged,
            Err(error) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PurgeFailed",
                    &format!("the cache could not be purged: {error}; try again"),
                )
            }
        };
        tracing::info!(
            purged,
            prefix = prefix.as_deref().unwrap_or("(all)"),
            "cache purged"
        );
        text(
            StatusCode::OK,
            "application/json",
            format!("{{\"purged\":{purged}}}\n"),
        )
    }
}

fn text(status: StatusCode, content_type: &'static str, text: String) -> Response {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
