//! `access`: decides whether pcgate forwards a call at all. The path is normalised
//! ([`crate::route::normalize_path`]) and matched against the route table, first match wins; the
//! matched [`Route`] goes into the request's extensions for the inner layers, and the request URI
//! is rewritten to the normalised path, so the path matched is exactly the path forwarded.
//!
//! When inbound keys are configured (`[[access.clients]]`), the caller must present one as
//! `Authorization: Bearer <key>`; it is hashed and compared in constant time. The caller's
//! `Authorization` never goes further: the `credential` layer puts the service's own there.
//!
//! Only the request headers in [`FORWARDED`] (what Partner Center documents) and those the operator
//! adds in `upstream.forward_headers` go further; every other header the caller sent is dropped
//! here, so a header outside the cache key (`X-Original-URL`, `Accept-Language`, `Cookie`) can
//! never shape an answer other callers are then given. The caller's `Cache-Control` is not
//! forwarded either: it is handed to the cache layer as [`RequestCacheControl`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use http::header::HeaderName;
use http::uri::PathAndQuery;
use http::{header, Method};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::body::{BoxError, Request, Response};
use crate::config::ClientKey;
use crate::host::{HostError, HostRule};
use crate::layer::cache::{RequestCacheControl, MS_CONTINUATION_TOKEN, MS_CONTRACT_VERSION};
use crate::layer::observe::CallInfo;
use crate::layer::tracking::{MS_APPLICATION, MS_CORRELATION_ID, MS_CV, MS_REQUEST_ID, X_LOCALE};
use crate::route::{normalize_path, PathError, Route, RouteTable};

/// The request headers forwarded upstream: those the Partner Center REST headers page documents
/// and its SDKs send (reference §1.1–1.2), the seek-paging header (§5.5), and the body's framing.
/// `Authorization` and `Host` are pcgate's own to set. Every one that can change an answer is in
/// the cache key (`layer::cache::key`); the tracking ids and the SDK's self-description cannot.
pub const FORWARDED: [HeaderName; 19] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    X_LOCALE,
    MS_REQUEST_ID,
    MS_CORRELATION_ID,
    MS_CV,
    MS_APPLICATION,
    MS_CONTRACT_VERSION,
    MS_CONTINUATION_TOKEN,
    header::IF_MATCH,
    HeaderName::from_static("ms-partnercenter-client"),
    HeaderName::from_static("ms-sdkversion"),
    // Conditional and partial requests (RFC 9110 §13, §14): a request carrying one is never
    // answered from the cache nor shared (`layer::cache::shareable`), so it needs no key.
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Request headers no configuration may forward or key on: credentials (the caller's cookies and
/// `Authorization` are never the upstream's business), `Host` (pcgate's own), and the hop-by-hop
/// headers of RFC 9110 §7.6.1, which belong to one connection.
const NEVER_FORWARDED: [&str; 12] = [
    "cookie",
    "authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Checks a header name from `upstream.forward_headers` or `cache.key_headers` (`key` names the
/// list in the message): a valid name, and not one that is never forwarded.
pub fn configured_header(key: &str, name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{key}: `{name}` is not a valid header name"))?;
    if NEVER_FORWARDED.contains(&parsed.as_str()) {
        return Err(format!(
            "{key}: `{name}` is never forwarded (credentials, Host and hop-by-hop headers stay with pcgate): remove it"
        ));
    }
    if parsed == header::CACHE_CONTROL {
        return Err(format!(
            "{key}: `{name}` is read by pcgate's cache, not forwarded: remove it"
        ));
    }
    Ok(parsed)
}

/// Whether `name` is forwarded upstream given the configured extra list.
pub fn is_forwarded(name: &HeaderName, extra: &[HeaderName]) -> bool {
    FORWARDED.contains(name) || extra.contains(name)
}

/// Keeps only the forwarded headers; the caller's `Cache-Control` goes into the request's
/// extensions for the cache layer.
fn keep_forwarded(request: &mut Request, extra: &[HeaderName]) {
    let headers = request.headers_mut();
    let cache_control: Vec<_> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .cloned()
        .collect();
    // Removed in place: the usual caller sends only forwarded headers, and nothing is copied.
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !is_forwarded(name, extra))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
    if !cache_control.is_empty() {
        request
            .extensions_mut()
            .insert(RequestCacheControl(cache_control));
    }
}

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
    /// Inbound keys are configured and the caller sent none, or a wrong one (401).
    #[error("missing or unknown API key: send `Authorization: Bearer <key>` with a key from [[access.clients]]")]
    BadKey,
    /// No inbound keys, and `Host` names a host this listener does not answer (421).
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Adds [`Access`] in front of a service.
#[derive(Clone)]
pub struct AccessLayer {
    table: Arc<RouteTable>,
    keys: Arc<[ClientKey]>,
    hosts: HostRule,
    forward: Arc<[HeaderName]>,
}

impl AccessLayer {
    /// Uses this route table; with `keys` not empty, callers must present one, and without
    /// keys, `Host` must pass `hosts` (a key already proves the caller is no web page).
    pub fn new(table: RouteTable, keys: Vec<ClientKey>, hosts: HostRule) -> Self {
        AccessLayer {
            table: Arc::new(table),
            keys: keys.into(),
            hosts,
            forward: Arc::from([]),
        }
    }

    /// Forwards these request headers too (`upstream.forward_headers`), beyond [`FORWARDED`].
    pub fn forward_headers(mut self, extra: Vec<HeaderName>) -> Self {
        self.forward = extra.into();
        self
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            table: self.table.clone(),
            keys: self.keys.clone(),
            hosts: self.hosts.clone(),
            forward: self.forward.clone(),
        }
    }
}

/// Matches the call against the route table; see the module docs.
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    table: Arc<RouteTable>,
    keys: Arc<[ClientKey]>,
    hosts: HostRule,
    forward: Arc<[HeaderName]>,
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
                if let Some(info) = request.extensions().get::<Arc<CallInfo>>() {
                    info.set_route(&route.name);
                }
                tracing::Span::current().record("route", &*route.name);
                request.extensions_mut().insert(route);
                Either::Right(self.inner.call(request))
            }
            Err(e) => Either::Left(future::ready(Err(e.into()))),
        }
    }
}

impl<S> Access<S> {
    fn admit(&self, request: &mut Request) -> Result<Arc<Route>, AccessError> {
        if self.keys.is_empty() {
            self.hosts.check_host(request)?;
        } else {
            let client = self.client(request).ok_or(AccessError::BadKey)?;
            tracing::debug!(client = %client.name, "inbound key accepted");
        }
        keep_forwarded(request, &self.forward);
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

    /// The client whose key the caller presented.
    fn client(&self, request: &Request) -> Option<&ClientKey> {
        let value = request
            .headers()
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let presented: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        // Check every key, so the time taken does not tell which one came close.
        let mut found = None;
        for client in self.keys.iter() {
            if bool::from(client.key_sha256.as_bytes().ct_eq(&presented)) {
                found = Some(client);
            }
        }
        found
    }
}
