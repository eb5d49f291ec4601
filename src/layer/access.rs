//! `access`: decides whether pcgate forwards a call at all. The path is normalised
//! ([`crate::route::normalize_path`]) and matched against the route table, first match wins; the
//! matched [`Route`] goes into the request's extensions for the inner layers, and the request URI
//! is rewritten to the normalised path, so the path matched is exactly the path forwarded.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use http::uri::PathAndQuery;
use http::Method;

use crate::body::{BoxError, Request, Response};
use crate::route::{normalize_path, PathError, Route, RouteTable};

/// Why `access` refused a call.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The path was malformed or tried to escape its segments (400).
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    /// No route allows this method and path (403).
    #[error("{method} {path} is not allowed by the route table")]
    NoRoute {
        /// The request method.
        method: Method,
        /// The normalised path.
        path: String,
    },
}

/// Adds [`Access`] in front of a service.
#[derive(Clone)]
pub struct AccessLayer {
    table: Arc<RouteTable>,
}

impl AccessLayer {
    /// Uses this route table.
    pub fn new(table: RouteTable) -> Self {
        AccessLayer {
            table: Arc::new(table),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            table: self.table.clone(),
        }
    }
}

/// Matches the call against the route table; see the module docs.
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    table: Arc<RouteTable>,
}

impl<S> tower::Service<Request> for Access<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError>,
{
    type Response = Response;
    type Error = BoxError;
    type Future = Either<Ready<Result<Response, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        match self.admit(&mut request) {
            Ok(route) => {
                request.extensions_mut().insert(route);
                Either::Right(self.inner.call(request))
            }
            Err(e) => Either::Left(future::ready(Err(e.into()))),
        }
    }
}

impl<S> Access<S> {
    fn admit(&self, request: &mut Request) -> Result<Arc<Route>, AccessError> {
        let path = normalize_path(request.uri().path())?;
        let route = self
            .table
            .find(request.method(), &path)
            .ok_or_else(|| AccessError::NoRoute {
                method: request.method().clone(),
                path: path.as_str().to_owned(),
            })?
            .clone();
        let normal = match request.uri().query() {
            Some(query) => format!("{}?{query}", path.as_str()),
            None => path.as_str().to_owned(),
        };
        // Origin form: only the path and query go on; the caller's scheme and authority (an
        // absolute-form request line) are ignored, the upstream is fixed by config.
        if let Ok(pq) = PathAndQuery::try_from(normal) {
            *request.uri_mut() = pq.into();
        }
        Ok(route)
    }
}
