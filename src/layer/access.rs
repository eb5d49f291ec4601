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
use http::header;
use http::header::HeaderName;
use http::uri::PathAndQuery;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::body::{BoxError, Request, Response};
use crate::call::CallInfo;
use crate::call::FramedTwice;
use crate::call::RequestCacheControl;
use crate::call::UnforwardedHeaders;
use crate::config::ClientKey;
pub use crate::error::AccessError;
use crate::headers::is_forwarded;
pub use crate::headers::{configured_header, FORWARDED};
use crate::host::HostRule;
use crate::route::{normalize_path, Route, RouteTable};

/// Keeps only the forwarded headers; the caller's `Cache-Control`, and on routes that share
/// answers the headers as the caller sent them (when some were not forwarded), go into the
/// request's extensions for the cache.
fn keep_forwarded(request: &mut Request, extra: &[HeaderName], keep_aside: bool) {
    // The forwarded ones are copied into a fresh map (the usual caller sends few, or none but
    // `Host`), and the caller's own map is kept aside or dropped whole: nothing is removed one
    // name at a time.
    let mut sent = std::mem::take(request.headers_mut());
    let cache_control: Vec<_> = sent
        .get_all(header::CACHE_CONTROL)
        .iter()
        .cloned()
        .collect();
    let forwarded = request.headers_mut();
    // The tracking ids are always there, so the map is needed: sized once.
    forwarded.reserve(sent.keys_len());
    let mut all_forwarded = true;
    for (name, value) in &sent {
        if is_forwarded(name, extra) {
            forwarded.append(name.clone(), value.clone());
        } else {
            all_forwarded = false;
        }
    }
    if keep_aside && !all_forwarded {
        // Kept for the cache: a stored answer's `Vary` may name a header not forwarded
        // (RFC 9111 §4.1); the forwarded ones are looked up in the request first, so they are
        // the same either way.
        for (name, value) in sent.iter_mut() {
            if *name == header::AUTHORIZATION || *name == header::COOKIE {
                value.set_sensitive(true);
            }
        }
        request.extensions_mut().insert(UnforwardedHeaders(sent));
    }
    if !cache_control.is_empty() {
        request
            .extensions_mut()
            .insert(RequestCacheControl(cache_control));
    }
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
    /// keys, `Host` and `Origin` must pass `hosts` (a key already proves the caller is no web page).
    pub fn new(table: RouteTable, keys: Vec<ClientKey>, hosts: HostRule) -> Self {
        AccessLayer {
            table: Arc::new(table),
            keys: keys.into(),
            hosts,
            forward: Arc::from([]),
        }
    }

    /// A copy for one lane: its routes its own (see [`crate::stack::Layers::lane`]).
    pub fn lane(&self) -> Self {
        AccessLayer {
            table: Arc::new(self.table.lane()),
            keys: self.keys.clone(),
            hosts: self.hosts.clone(),
            forward: self.forward.iter().map(crate::headers::own_name).collect(),
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
                request.extensions_mut().insert(route);
                Either::Right(self.inner.call(request))
            }
            Err(e) => Either::Left(future::ready(Err(e.into()))),
        }
    }
}

impl<S> Access<S> {
    fn admit(&self, request: &mut Request) -> Result<Arc<Route>, AccessError> {
        if request.extensions().get::<FramedTwice>().is_some() {
            return Err(AccessError::FramedTwice);
        }
        if self.keys.is_empty() {
            // No key proves the caller is no web page: refuse a rebound name, and a page of
            // another site posting here (browsers send `Origin` on every cross-site POST).
            self.hosts.check_host(request)?;
            self.hosts.check_origin(request)?;
        } else {
            let client = self.client(request).ok_or(AccessError::BadKey)?;
            // Admission runs before `tracking` opens the call's span (which waits for the
            // route), so this line names the call itself.
            let request_id = request
                .extensions()
                .get::<crate::layer::tracking::CallIds>()
                .map(|ids| ids.request_id.clone());
            tracing::debug!(client = %client.name, request_id = ?request_id, "inbound key accepted");
        }
        let path = normalize_path(request.uri().path())?;
        let route = self
            .table
            .find(request.method(), &path)
            .ok_or_else(|| AccessError::NoRoute {
                method: request.method().clone(),
                path: path.as_str().to_owned(),
            })?
            .clone();
        // Origin form: only the path and query go on; the caller's scheme and authority (an
        // absolute-form request line) are ignored, the upstream is fixed by config. A canonical
        // origin-form target (the usual call) stays as it is.
        let rewrite = (!path.is_as_sent() || request.uri().authority().is_some()).then(|| {
            match request.uri().query() {
                Some(query) => format!("{}?{query}", path.as_str()),
                None => path.as_str().to_owned(),
            }
        });
        // Only routes that share answers (a cache, coalescing) read the headers kept aside.
        keep_forwarded(
            request,
            &self.forward,
            route.cache_ttl.is_some() || route.coalesce,
        );
        if let Some(Ok(pq)) = rewrite.map(PathAndQuery::try_from) {
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
