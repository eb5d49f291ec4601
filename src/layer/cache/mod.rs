//! `cache`: summary responses from memory, on routes with `cache_ttl`.
//!
//! - Only `200` answers to `GET`/`HEAD` without a body are stored, never answers to a request
//!   with `Cache-Control: no-store`, never one over `cache.max_entry_bytes` (it streams through).
//!   The rules are pure functions in [`policy`]; what happened is one [`CacheStatusHeader`],
//!   rendered once as `Cache-Status` (RFC 9211) and counted as its [`CacheStatus`].
//! - Entries live behind the [`Storage`] interface (get, put, purge); [`MemoryStore`] (moka,
//!   bounded by `cache.max_bytes` with a byte weigher) is the first. An entry carries its own
//!   wall-clock stored-at time and windows; moka's own expiry only evicts. A store that fails or
//!   does not answer within the call's deadline is a miss, never the caller's error.
//! - On a miss, one lock per key ([`lock`]; routes with `coalesce = true`): the first caller
//!   fetches in a task of its own (so its hanging up cancels nothing) and stores the answer before
//!   it releases the lock; the others wait, against their own deadline, and re-read the store. An
//!   answer that is not stored (not a `200`) is handed to them, a failure reaches them as itself;
//!   one too large to store, they fetch for themselves; a writer that timed out or vanished, they
//!   replace, within their own deadline.
//! - After the TTL: within `stale_while_revalidate` the stale answer is served and one background
//!   refresh runs, through the same lock; within `stale_if_error` the stale answer is served when
//!   the upstream fails (5xx, timeout, unreachable, no token).
//! - A caller's `Cache-Control: no-cache` or `max-age=0` fetches fresh and stores the answer.
//! - Every wait (a remote store, the lock, the body read to store) is against the call's
//!   [`Deadline`], set once as the call entered, so no wait restarts the count.
//! - The upstream's `Cache-Control` / `Expires` decide freshness over the route's windows, and
//!   `no-store`, `no-cache`, `private` and `Vary: *` answers are not stored ([`policy`], unless
//!   the route says `origin_cache_control = "ignore"`); such an answer is not handed to waiters.
//! - `Vary`: an entry that varies is stored under its variant's key and, as the key's vary spec,
//!   under the key; a lookup that finds a spec for another variant looks up its own next, and
//!   on a miss takes its variant's lock, not the key's.
//! - `Set-Cookie` reaches only the caller whose request fetched the answer.
//! - A `2xx`/`3xx` answer to a write drops what is stored for its path (RFC 9111 §4.4).
//! - Every answer on a cached route says what happened in `Cache-Status` (after the upstream's
//!   member), its `Age` (RFC 9111 §4.2.3) and `Vary` for the request headers the key uses.

mod key;
mod lock;
mod policy;
mod record;
mod status;
mod store;
mod tiered;

pub use key::{shareable, Key, KEYED_HEADERS, MS_CONTINUATION_TOKEN, MS_CONTRACT_VERSION};
pub use lock::SharedError;
pub use policy::{initial_age, vary, Directives, NotStored, Vary, Windows};
pub use record::{decode as decode_record, encode as encode_record, Decoded, RecordError};
pub use status::{CacheStatus, CacheStatusHeader, Detail, Forward, Ttl, CACHE_STATUS};
pub use store::{
    Claim, Clock, Entry, MemoryStore, Purge, Storage, StorageError, StoreFuture, Waited,
    ENTRY_OVERHEAD,
};
pub use tiered::TieredStore;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, Either, Ready};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use tower::ServiceExt;

use crate::body::{self, BoxError, BoxFuture, Buffered, Limited, Request, Response};
use crate::call::{CallInfo, SharedUnanswered};
use crate::config::OriginCacheControl;
use crate::deadline::{Deadline, DeadlineExceeded};
use crate::error::find_cause;
use crate::metrics::{CacheLabels, Metrics, PerRoute, RouteLabel, CACHE_RESULTS};
use crate::route::Route;
use lock::{LockStatus, Locked, Locks, WritePermit};
use policy::{Asks, Freshness};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use crate::call::RequestCacheControl;

pub use crate::call::UnforwardedHeaders;

/// The `Vary` of pcgate's answers on cached routes that carry none from the upstream: the request
/// headers its key uses.
fn own_vary(extra: &[HeaderName]) -> HeaderValue {
    let keyed = KEYED_HEADERS;
    let names: Vec<&str> = keyed.iter().chain(extra).map(HeaderName::as_str).collect();
    HeaderValue::from_str(&names.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("*"))
}

/// Whether a method writes, so a non-error answer to it invalidates the path (RFC 9111 §4.4).
fn writes(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Adds [`Cache`] in front of a service.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
    /// `cache.key_headers`, part of every key.
    key_headers: Arc<[HeaderName]>,
    /// The `Vary` of pcgate's answers ([`own_vary`]).
    vary: HeaderValue,
}

#[derive(Clone)]
struct Shared {
    store: Arc<dyn Storage>,
    /// One writer per key on a miss or a background refresh.
    locks: Arc<Locks>,
    /// Stored-at times and ages.
    clock: Clock,
    /// The largest answer stored or shared with waiters.
    max_entry_bytes: usize,
    /// `pcgate_coalesced_requests_total` (shared with `coalesce`) lives here.
    metrics: Arc<Metrics>,
    /// `pcgate_cache_lookups_total{route,result}`, registered by this layer.
    lookups: Family<CacheLabels, Counter>,
    /// The lookup counters of the routes named at start, by [`CACHE_RESULTS`] index: a lookup
    /// counts without hashing its labels and taking the family's lock.
    by_route: PerRoute<[Counter; CACHE_RESULTS.len()]>,
    /// `upstream.deadline`, for a request that arrives without a [`Deadline`] (a layer test).
    deadline: Duration,
}

impl CacheLayer {
    /// Caches answers of at most `max_entry_bytes` into `store`; `deadline` is the call's limit
    /// when a request carries no [`Deadline`] of its own.
    pub fn new(
        store: Arc<dyn Storage>,
        max_entry_bytes: usize,
        metrics: Arc<Metrics>,
        deadline: Duration,
    ) -> Self {
        let lookups = Family::<CacheLabels, Counter>::default();
        metrics.register(
            "cache_lookups",
            "Cache lookups, by route and result",
            lookups.clone(),
        );
        CacheLayer {
            shared: Arc::new(Shared {
                store,
                locks: Arc::default(),
                clock: Clock::default(),
                max_entry_bytes,
                metrics,
                lookups,
                by_route: PerRoute::default(),
                deadline,
            }),
            key_headers: Arc::from([]),
            vary: own_vary(&[]),
        }
    }

    /// Exports the lookups of these cached routes at zero, every result, from start. Called
    /// before the layer wraps a service (a route named later is counted through the family).
    pub fn routes(mut self, cached: &[&str]) -> Self {
        let lookups = self.shared.lookups.clone();
        let by_route = PerRoute::new(cached.iter().copied(), |route| {
            CACHE_RESULTS.map(|result| {
                lookups
                    .get_or_create(&CacheLabels {
                        route: route.clone(),
                        result,
                    })
                    .clone()
            })
        });
        Arc::make_mut(&mut self.shared).by_route = by_route;
        self
    }

    /// A copy for one lane: the same store, locks and series, through handles of its own (see
    /// [`crate::stack::Layers::lane`]).
    pub fn lane(&self) -> Self {
        CacheLayer {
            shared: Arc::new(Shared::clone(&self.shared)),
            key_headers: self
                .key_headers
                .iter()
                .map(crate::headers::own_name)
                .collect(),
            vary: crate::headers::own_value(&self.vary),
        }
    }

    /// Puts these request headers in every key too (`cache.key_headers`); `coalesce` must be
    /// given the same list, since the two layers key calls alike.
    pub fn key_headers(mut self, extra: Arc<[HeaderName]>) -> Self {
        self.vary = own_vary(&extra);
        self.key_headers = extra;
        self
    }
}

impl<S> tower::Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            shared: self.shared.clone(),
            key_headers: self.key_headers.clone(),
            vary: self.vary.clone(),
        }
    }
}

/// The cache layer's answer: ready (a hit, a stale answer), a future of its own (a lookup that
/// waits, a miss, a write), or the inner call's as it is (a call the cache has no part in, which
/// so costs no box of its own).
pub type ResponseFuture<F> = Either<Ready<Result<Response, BoxError>>, Either<BoxFuture, F>>;

/// A future of the cache layer's own.
fn own<F>(
    future: impl std::future::Future<Output = Result<Response, BoxError>> + Send + 'static,
) -> ResponseFuture<F> {
    Either::Right(Either::Left(Box::pin(future)))
}

/// Answers from the cache when it can; see the module docs.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
    key_headers: Arc<[HeaderName]>,
    vary: HeaderValue,
}

impl<S: Clone> Cache<S> {
    /// The inner service `poll_ready` readied, leaving a clone in its place.
    fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }

    /// What this call is to the cache, if it is a cached route's shareable call.
    fn plan(&self, request: &Request) -> Option<Call> {
        let route = request.extensions().get::<Arc<Route>>()?;
        let windows = Windows::of(route)?;
        if !shareable(request) {
            return None;
        }
        let taken = request
            .extensions()
            .get::<RequestCacheControl>()
            .map_or(&[][..], |values| &values.0[..]);
        let asks = Asks::of(
            taken
                .iter()
                .chain(request.headers().get_all(header::CACHE_CONTROL)),
        );
        let key = Key::of(request, &self.key_headers);
        Some(Call {
            shared: self.shared.clone(),
            route: route.name.clone(),
            key: key.clone(),
            lock_key: key,
            asks,
            windows,
            mode: route.origin_cache_control,
            key_headers: self.key_headers.clone(),
            vary: self.vary.clone(),
            lock: route.coalesce,
            deadline: Deadline::of(request, self.shared.deadline),
            info: request.extensions().get::<Arc<CallInfo>>().cloned(),
        })
    }
}

impl<S> tower::Service<Request> for Cache<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if writes(request.method()) && request.extensions().get::<Arc<Route>>().is_some() {
            let store = self.shared.store.clone();
            let deadline = Deadline::of(&request, self.shared.deadline);
            let path = request.uri().path().to_owned();
            let answer = self.inner.call(request);
            return own(async move {
                let response = answer.await?;
                let paths = invalidated(path, &response);
                invalidate(&*store, &deadline, paths).await;
                Ok(response)
            });
        }
        let Some(mut call) = self.plan(&request) else {
            return Either::Right(Either::Right(self.inner.call(request)));
        };
        if !call.asks.takes_stored() {
            let inner = self.take_ready();
            return own(call.miss(inner, request, None));
        }
        // A store that answers at once (memory): hits are answered here, without touching the
        // layers below or allocating a future. The key's entry first, then, when it is a vary
        // spec for another variant, this request's variant.
        let pending = match self.shared.store.get(&call.key) {
            Either::Left(ready) => {
                match call.select(call.looked_up(ready.into_inner()), selecting(&request)) {
                    Ok(found) => return self.decide(call, found, request),
                    Err(variant) => match self.shared.store.get(&variant) {
                        Either::Left(ready) => {
                            call.lock_key = variant;
                            let found = call.looked_up(ready.into_inner());
                            return self.decide(call, found, request);
                        }
                        Either::Right(pending) => {
                            call.lock_key = variant;
                            (pending, true)
                        }
                    },
                }
            }
            Either::Right(pending) => (pending, false),
        };
        let inner = self.take_ready();
        own(async move {
            let mut call = call;
            let (pending, is_variant) = pending;
            let found = call.awaited(Either::Right(pending)).await;
            let found = match is_variant {
                true => found,
                false => match call.select(found, selecting(&request)) {
                    Ok(found) => found,
                    Err(variant) => {
                        let found = call.awaited(call.shared.store.get(&variant)).await;
                        call.lock_key = variant;
                        found
                    }
                },
            };
            match call.judge(found) {
                Judged::Hit(response) => Ok(response),
                Judged::Stale(response) => {
                    call.revalidate(inner, request);
                    Ok(response)
                }
                Judged::Miss(fallback) => call.miss(inner, request, fallback).await,
            }
        })
    }
}

impl<S> Cache<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Answers from what the lookup found, at once when it can.
    fn decide(
        &mut self,
        call: Call,
        found: Option<Arc<Entry>>,
        request: Request,
    ) -> <Self as tower::Service<Request>>::Future {
        match call.judge(found) {
            Judged::Hit(response) => {
                if let Some(info) = &call.info {
                    info.set_answered_at_once();
                }
                Either::Left(future::ready(Ok(response)))
            }
            Judged::Stale(response) => {
                call.revalidate(self.inner.clone(), request);
                Either::Left(future::ready(Ok(response)))
            }
            Judged::Miss(fallback) => {
                let inner = self.take_ready();
                own(call.miss(inner, request, fallback))
            }
        }
    }
}

/// The paths a write's answer invalidates (RFC 9111 §4.4): none for an error; else the write's
/// own and those its `Location` and `Content-Location` name on this origin.
fn invalidated(path: String, response: &Response) -> Vec<String> {
    if !(response.status().is_success() || response.status().is_redirection()) {
        return Vec::new();
    }
    let mut paths = vec![path];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let named = response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<http::Uri>().ok());
        // Only a path on this origin: an absolute URI names another cache's entries.
        if let Some(uri) = named.filter(|uri| uri.authority().is_none()) {
            if uri.path().starts_with('/') && !paths.iter().any(|p| p == uri.path()) {
                paths.push(uri.path().to_owned());
            }
        }
    }
    paths
}

/// Drops what is stored for `paths`, within the call's deadline; a store that fails is logged.
async fn invalidate(store: &dyn Storage, deadline: &Deadline, paths: Vec<String>) {
    for path in paths {
        match deadline.run(store.purge(Purge::Path(path.clone()))).await {
            Ok(Ok(n)) => tracing::debug!(key = path, purged = n, "a write invalidated the path"),
            Ok(Err(error)) => tracing::info!(key = path, %error, "invalidation failed"),
            Err(_) => tracing::info!(key = path, "invalidation timed out"),
        }
    }
}

/// An `Age` value: the seconds as digits, copied once (`HeaderValue::from(u64)` writes them into
/// a buffer and then freezes it: two allocations).
fn age_value(age: Duration) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    HeaderValue::from_str(digits.format(age.as_secs())).unwrap_or(HeaderValue::from_static("0"))
}

/// Which tiers a re-read asks.
#[derive(Clone, Copy)]
enum Tier {
    /// This process's own (a writer of this process just stored there): no remote work.
    Local,
    /// Every tier (another process's fetch stores remotely).
    Any,
}

/// How often a caller waiting on another process's fetch re-reads the store.
const FLEET_POLL: Duration = Duration::from_millis(20);

/// What [`Call::fleet_claim`] came to.
enum Fleet {
    /// This process fetches.
    Fetch,
    /// This process fetches, and the shared tier did not answer this call: the layers below
    /// are told (see [`SharedUnanswered`]), so the call pays `shared.timeout` once.
    Unanswered,
    /// Another process's fetch stored this.
    Filled(Arc<Entry>),
    /// The call's deadline passed while waiting.
    TimedOut,
}

/// What a stored entry is to a call.
enum Judged {
    /// Fresh: this answer.
    Hit(Response),
    /// Stale within `stale_while_revalidate`: this answer, and a background refresh.
    Stale(Response),
    /// Fetch; this stale entry stands in if the upstream fails.
    Miss(Option<Arc<Entry>>),
}

/// What the writer's fetch came to, for the writer.
enum Fetched {
    /// Stored: this entry.
    Stored(Arc<Entry>),
    /// Held whole but not stored.
    Unstored(Arc<Buffered>),
    /// Streamed on: too large to hold, or held by nobody else and not to be stored.
    Streamed(Response),
    /// The fetch failed.
    Failed(Arc<BoxError>),
    /// The deadline passed first.
    TimedOut,
}

/// One call on a cached route, as the cache sees it.
struct Call {
    shared: Arc<Shared>,
    /// The route's name (a metric label).
    route: Arc<str>,
    key: Key,
    /// The key whose miss lock this call takes: its variant's, once the key's stored vary spec
    /// names it, so callers of different variants do not queue behind each other's fetches.
    lock_key: Key,
    asks: Asks,
    /// The route's windows: the default freshness.
    windows: Windows,
    /// Whether the upstream's caching headers count.
    mode: OriginCacheControl,
    /// `cache.key_headers` (already in the key: a `Vary` on them needs no variant).
    key_headers: Arc<[HeaderName]>,
    /// The `Vary` this cache's answers carry.
    vary: HeaderValue,
    /// Whether misses take the key's lock (`coalesce = true`).
    lock: bool,
    deadline: Deadline,
    info: Option<Arc<CallInfo>>,
}

/// What the fetching task needs of its call to store the answer.
struct Fill {
    key: Key,
    windows: Windows,
    mode: OriginCacheControl,
    asks: Asks,
    deadline: Deadline,
    key_headers: Arc<[HeaderName]>,
    /// The request's forwarded headers and those not forwarded, to key a variant by.
    forwarded: HeaderMap,
    unforwarded: Option<HeaderMap>,
}

/// The headers `access` did not forward, if it kept any.
fn unforwarded(request: &Request) -> Option<&HeaderMap> {
    request
        .extensions()
        .get::<UnforwardedHeaders>()
        .map(|headers| &headers.0)
}

/// The request headers a `Vary` may name: those forwarded, and those `access` kept aside.
type Selecting<'a> = (&'a HeaderMap, Option<&'a HeaderMap>);

/// A request's [`Selecting`] headers.
fn selecting(request: &Request) -> Selecting<'_> {
    (request.headers(), unforwarded(request))
}

impl Call {
    /// The entry that answers this request, given what its key holds: that entry when it does
    /// not vary (or is this request's variant), else the variant key to look up next.
    fn select(
        &self,
        found: Option<Arc<Entry>>,
        (forwarded, unforwarded): Selecting<'_>,
    ) -> Result<Option<Arc<Entry>>, Key> {
        let Some(entry) = found else {
            return Ok(None);
        };
        if entry.vary.is_empty() {
            return Ok(Some(entry));
        }
        let variant = self.key.variant(&entry.vary, forwarded, unforwarded);
        if entry.variant.as_ref() == Some(&variant) {
            Ok(Some(entry))
        } else {
            Err(variant)
        }
    }

    /// A store read, within the call's deadline; a failed or late one is none.
    async fn awaited(&self, pending: StoreFuture<Option<Arc<Entry>>>) -> Option<Arc<Entry>> {
        let found = match self.deadline.run(pending).await {
            Ok(found) => found,
            Err(DeadlineExceeded(limit)) => Err(StorageError::Timeout(limit)),
        };
        self.looked_up(found)
    }

    /// What the fetch needs to store this request's answer.
    fn fill(&self, request: &Request) -> Fill {
        Fill {
            key: self.key.clone(),
            windows: self.windows,
            mode: self.mode,
            asks: self.asks,
            deadline: self.deadline,
            key_headers: self.key_headers.clone(),
            forwarded: request.headers().clone(),
            unforwarded: unforwarded(request).cloned(),
        }
    }

    /// A lookup's result; a store that failed or timed out is a miss.
    fn looked_up(&self, found: Result<Option<Arc<Entry>>, StorageError>) -> Option<Arc<Entry>> {
        found.unwrap_or_else(|error| {
            tracing::info!(key = self.key.path(), %error, "cache lookup failed: a miss");
            None
        })
    }

    fn judge(&self, entry: Option<Arc<Entry>>) -> Judged {
        let Some(entry) = entry else {
            return Judged::Miss(None);
        };
        let age = entry.age(self.shared.clock.now());
        match policy::freshness(&entry.windows, age) {
            Freshness::Fresh { left } => {
                Judged::Hit(self.answer_from(&entry, age, CacheStatusHeader::hit(left)))
            }
            Freshness::Revalidate { over } => {
                Judged::Stale(self.answer_from(&entry, age, CacheStatusHeader::revalidating(over)))
            }
            Freshness::IfError => Judged::Miss(Some(entry)),
            Freshness::Expired => Judged::Miss(None),
        }
    }

    /// Why this call goes forward.
    fn fwd(&self) -> Forward {
        match self.asks {
            Asks::Anything => Forward::Miss,
            Asks::Fresh | Asks::NoStore => Forward::Request,
        }
    }

    /// A miss: wait for the key's writer, or be it.
    async fn miss<S>(
        self,
        inner: S,
        mut request: Request,
        fallback: Option<Arc<Entry>>,
    ) -> Result<Response, BoxError>
    where
        S: tower::Service<Request, Response = Response, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        if !self.lock {
            return self.write(inner, request, None, fallback).await;
        }
        let mut waited = false;
        loop {
            let read = match self.shared.locks.lock(&self.lock_key) {
                Locked::Write(permit) => {
                    // A writer that let go between this call's lookup and now stored its answer.
                    let selecting = selecting(&request);
                    if let Some((entry, age, left)) =
                        self.stored_fresh(selecting, Tier::Local).await
                    {
                        permit.release(LockStatus::Done);
                        return Ok(self.answer_from(&entry, age, CacheStatusHeader::hit(left)));
                    }
                    // This process's writer; another sidecar may be fetching the key already.
                    match self.fleet_claim(selecting).await {
                        Fleet::Fetch => {}
                        Fleet::Unanswered => {
                            request.extensions_mut().insert(SharedUnanswered);
                        }
                        Fleet::Filled(entry) => {
                            permit.release(LockStatus::Done);
                            self.coalesced();
                            let age = entry.age(self.shared.clock.now());
                            let header = CacheStatusHeader::forwarded(self.fwd(), true);
                            return Ok(self.answer_from(&entry, age, header));
                        }
                        Fleet::TimedOut => {
                            permit.release(LockStatus::TimedOut);
                            return self.settle(Err(self.deadline.exceeded().into()), fallback);
                        }
                    }
                    let lock_key = self.lock_key.clone();
                    let store = self.shared.store.clone();
                    let answer = self.write(inner, request, Some(permit), fallback).await;
                    // A fetch that stored nothing lets go of the key's fleet lock here (a put
                    // already released it after its shared write).
                    store.unclaim(&lock_key);
                    return answer;
                }
                Locked::Read(read) => read,
            };
            if !waited {
                waited = true;
                self.coalesced();
            }
            let status = match read.wait(&self.deadline).await {
                Ok(status) => status,
                Err(exceeded) => return self.settle(Err(exceeded.into()), fallback),
            };
            match status {
                LockStatus::Done => {
                    let selecting = selecting(&request);
                    if let Some(entry) = self.reread(selecting, Tier::Local).await {
                        let age = entry.age(self.shared.clock.now());
                        let stored = self.asks != Asks::NoStore;
                        let header = CacheStatusHeader::forwarded(self.fwd(), stored);
                        return Ok(self.answer_from(&entry, age, header));
                    }
                    // Gone from the store already (evicted, or a remote store lost it): again.
                }
                LockStatus::Unstored(answer) => {
                    return self.settle(Ok(answer.to_response()), fallback)
                }
                LockStatus::Failed(error) => return self.settle(Err(error.into()), fallback),
                // Too large to share: this caller fetches for itself, in what is left of its time.
                LockStatus::GaveUp => {
                    let fetched = match self.deadline.run(inner.oneshot(request)).await {
                        Ok(fetched) => fetched,
                        Err(exceeded) => Err(exceeded.into()),
                    };
                    return self.settle(fetched, fallback);
                }
                other @ (LockStatus::TimedOut | LockStatus::Dangling | LockStatus::Waiting) => {
                    // The upstream did not answer in time: a stale answer stands in, else this
                    // caller tries again, within its own deadline.
                    if fallback.is_some() || self.deadline.remaining().is_zero() {
                        return self.settle(Err(self.deadline.exceeded().into()), fallback);
                    }
                    tracing::debug!(
                        key = self.key.path(),
                        writer = other.as_str(),
                        "the key's writer gave no answer: trying again"
                    );
                }
            }
        }
    }

    /// Counts this call as answered by another call's fetch.
    fn coalesced(&self) {
        self.shared
            .metrics
            .coalesced
            .get_or_create(&RouteLabel {
                route: self.route.clone(),
            })
            .inc();
    }

    /// Whether this process's writer fetches, or another process's fetch answers it: the
    /// store's claim on the key; while another process holds it, the store is re-read every
    /// [`FLEET_POLL`] within the call's deadline, and the claim asked again (so when that
    /// process dies, its claim lapses and one waiter, the one whose claim wins, takes over).
    async fn fleet_claim(&self, selecting: Selecting<'_>) -> Fleet {
        let store = &self.shared.store;
        let mut waited = false;
        loop {
            let claim = match self.deadline.run(store.claim(&self.lock_key)).await {
                Ok(Ok(claim)) => claim,
                Ok(Err(_)) => Claim::Alone,
                Err(_) => {
                    store.waited(Waited::TimedOut);
                    return Fleet::TimedOut;
                }
            };
            match claim {
                Claim::Alone if waited => {
                    store.waited(Waited::Abandoned);
                    return Fleet::Unanswered;
                }
                Claim::Alone => return Fleet::Unanswered,
                Claim::Owner if !waited => return Fleet::Fetch,
                Claim::Owner => {
                    // The owner may have stored its answer just before its claim lapsed.
                    if let Some((entry, _, _)) = self.stored_fresh(selecting, Tier::Any).await {
                        store.unclaim(&self.lock_key);
                        store.waited(Waited::Filled);
                        return Fleet::Filled(entry);
                    }
                    store.waited(Waited::TookOver);
                    return Fleet::Fetch;
                }
                Claim::Stored => {
                    // The claim copied the fill into this process's tier.
                    if let Some((entry, _, _)) = self.stored_fresh(selecting, Tier::Local).await {
                        if waited {
                            store.waited(Waited::Filled);
                        }
                        return Fleet::Filled(entry);
                    }
                    // Stored but not fresh (a stale copy): fetch, alone.
                    return Fleet::Fetch;
                }
                Claim::Busy => {}
            }
            waited = true;
            if self
                .deadline
                .run(tokio::time::sleep(FLEET_POLL))
                .await
                .is_err()
            {
                store.waited(Waited::TimedOut);
                return Fleet::TimedOut;
            }
            if let Some((entry, _, _)) = self.stored_fresh(selecting, Tier::Any).await {
                store.waited(Waited::Filled);
                return Fleet::Filled(entry);
            }
        }
    }

    /// A fresh stored entry, its age and time left, for a caller that takes stored answers.
    async fn stored_fresh(
        &self,
        selecting: Selecting<'_>,
        tier: Tier,
    ) -> Option<(Arc<Entry>, Duration, Duration)> {
        if !self.asks.takes_stored() {
            return None;
        }
        let entry = self.reread(selecting, tier).await?;
        let age = entry.age(self.shared.clock.now());
        match policy::freshness(&entry.windows, age) {
            Freshness::Fresh { left } => Some((entry, age, left)),
            _ => None,
        }
    }

    /// The stored entry for this request (its variant, when the key's answer varies), if the
    /// store has one (a failed or late read is none).
    async fn reread(&self, selecting: Selecting<'_>, tier: Tier) -> Option<Arc<Entry>> {
        let store = &self.shared.store;
        let get = |key: &Key| match tier {
            Tier::Local => store.get_local(key),
            Tier::Any => store.get(key),
        };
        let found = self.awaited(get(&self.key)).await;
        match self.select(found, selecting) {
            Ok(found) => found,
            Err(variant) => self.awaited(get(&variant)).await,
        }
    }

    /// Fetches (in a task of its own, so the caller hanging up cancels nothing), stores, releases
    /// the key's lock if held, and answers.
    async fn write<S>(
        self,
        inner: S,
        request: Request,
        permit: Option<WritePermit>,
        fallback: Option<Arc<Entry>>,
    ) -> Result<Response, BoxError>
    where
        S: tower::Service<Request, Response = Response, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let fill = self.fill(&request);
        let task = tokio::spawn(fetch(self.shared.clone(), inner, request, fill, permit));
        let (fetched, cookies) = task.await.unwrap_or_else(|error| {
            let error = format!("the cache's fetch ended: {error}").into();
            (Fetched::Failed(Arc::new(error)), Vec::new())
        });
        // `Set-Cookie` is the fetching caller's alone (never stored nor shared).
        let with_cookies = |mut response: Response| {
            for cookie in cookies {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            response
        };
        match fetched {
            Fetched::Stored(entry) => Ok(with_cookies(self.answer_from(
                &entry,
                entry.age(self.shared.clock.now()),
                CacheStatusHeader::forwarded(self.fwd(), true),
            ))),
            Fetched::Unstored(answer) => {
                self.settle(Ok(with_cookies(answer.to_response())), fallback)
            }
            Fetched::Streamed(response) => self.settle(Ok(response), fallback),
            // The error itself when nobody else holds it, else the shared one that points at it.
            Fetched::Failed(error) => {
                let error =
                    Arc::try_unwrap(error).unwrap_or_else(|shared| SharedError(shared).into());
                self.settle(Err(error), fallback)
            }
            Fetched::TimedOut => self.settle(Err(self.deadline.exceeded().into()), fallback),
        }
    }

    /// The upstream's outcome for this caller: the stale entry if it failed and one may stand in,
    /// else the outcome itself, labelled.
    fn settle(
        &self,
        outcome: Result<Response, BoxError>,
        fallback: Option<Arc<Entry>>,
    ) -> Result<Response, BoxError> {
        let failed = policy::failure(outcome.as_ref().map(Response::status));
        if let (Some(failure), Some(entry)) = (failed, fallback) {
            tracing::info!(
                key = self.key.path(),
                "upstream failed: serving a stale answer (stale-if-error)"
            );
            let age = entry.age(self.shared.clock.now());
            return Ok(self.answer_from(&entry, age, CacheStatusHeader::stale_if_error(failure)));
        }
        let header = CacheStatusHeader::forwarded(self.fwd(), false);
        match outcome {
            Ok(response) => Ok(self.label(response, header)),
            Err(error) => {
                self.count(header.outcome());
                Err(error)
            }
        }
    }

    /// Starts one background refresh for this key, unless a fetch for it is running.
    fn revalidate<S>(&self, inner: S, request: Request)
    where
        S: tower::Service<Request, Response = Response, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let Some(permit) = self.shared.locks.try_write(&self.lock_key) else {
            return;
        };
        let shared = self.shared.clone();
        let fill = Fill {
            asks: Asks::Anything,
            ..self.fill(&request)
        };
        tokio::spawn(async move {
            let path = fill.key.path().to_owned();
            match fetch(shared, inner, request, fill, Some(permit)).await.0 {
                Fetched::Stored(_) => {}
                Fetched::Unstored(answer) => tracing::info!(
                    key = path,
                    status = answer.status.as_u16(),
                    "background refresh not stored"
                ),
                Fetched::Streamed(_) => tracing::info!(
                    key = path,
                    "background refresh not stored: larger than cache.max_entry_bytes"
                ),
                Fetched::Failed(error) => {
                    tracing::info!(key = path, %error, "background refresh failed")
                }
                Fetched::TimedOut => tracing::info!(key = path, "background refresh timed out"),
            }
        });
    }

    /// A stored answer, `age` old, as this caller's response.
    fn answer_from(&self, entry: &Entry, age: Duration, header: CacheStatusHeader) -> Response {
        let mut response = entry.response.to_response();
        response.headers_mut().insert(header::AGE, age_value(age));
        self.label(response, header)
    }

    /// Says what the cache did, on the response, in the metrics and in the access log.
    fn label(&self, mut response: Response, header: CacheStatusHeader) -> Response {
        let headers = response.headers_mut();
        let status = appended(headers, &CACHE_STATUS, header.render(), false);
        headers.insert(CACHE_STATUS, status);
        // The upstream's own Vary names what its answer depends on, and goes on as sent (a
        // downstream cache reads it as the origin wrote it); an answer without one gets the
        // request headers pcgate's key uses, so a cache downstream cannot mix pcgate's variants.
        if !headers.contains_key(header::VARY) {
            headers.insert(header::VARY, self.vary.clone());
        }
        self.count(header.outcome());
        response
    }

    fn count(&self, status: CacheStatus) {
        if let Some(info) = &self.info {
            info.set_cache(status.as_str());
        }
        match self.shared.by_route.get(&self.route) {
            Some(counters) => counters[status.index()].inc(),
            None => self
                .shared
                .lookups
                .get_or_create(&CacheLabels {
                    route: self.route.clone(),
                    result: status.as_str(),
                })
                .inc(),
        };
    }
}

/// `ours` after the values `headers` already holds for `name`, as one line: RFC 9211 §2 has
/// each cache append its member to `Cache-Status`; for `Vary` (`vary`), the names not already
/// listed are added, and `*` stays `*`.
fn appended(headers: &HeaderMap, name: &HeaderName, ours: HeaderValue, vary: bool) -> HeaderValue {
    let theirs: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if theirs.is_empty() {
        return ours;
    }
    let mut text = theirs.join(", ");
    let ours_text = ours.to_str().unwrap_or("");
    if vary {
        let listed: Vec<String> = text
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        if listed.iter().any(|n| n == "*") {
            return HeaderValue::from_static("*");
        }
        for name in ours_text.split(", ") {
            if !listed.iter().any(|n| n == name) {
                text.push_str(", ");
                text.push_str(name);
            }
        }
    } else {
        text.push_str(", ");
        text.push_str(ours_text);
    }
    HeaderValue::from_str(&text).unwrap_or(ours)
}

/// The request headers an answer varies on beyond those its key already holds (`coalesce`
/// shares answers by the same rule).
pub fn varies_beyond_key(headers: &HeaderMap, key_headers: &[HeaderName]) -> Vec<HeaderName> {
    match policy::vary(headers) {
        policy::Vary::Names(names) => names
            .into_iter()
            .filter(|name| !KEYED_HEADERS.contains(name) && !key_headers.contains(name))
            .collect(),
        policy::Vary::None | policy::Vary::All => Vec::new(),
    }
}

/// The fetch, in a task of its own: call the upstream, read the answer within the deadline,
/// store it if it may be, then release the lock with the outcome (store first, so a caller
/// arriving after the release finds it). Returns the outcome and the answer's `Set-Cookie`
/// lines, which only the fetching caller gets.
async fn fetch<S>(
    shared: Arc<Shared>,
    inner: S,
    request: Request,
    fill: Fill,
    permit: Option<WritePermit>,
) -> (Fetched, Vec<HeaderValue>)
where
    S: tower::Service<Request, Response = Response, Error = BoxError>,
{
    let sharing = permit.is_some();
    let requested = shared.clock.now();
    // The deadline covers the body too: an upstream that sends headers and then stalls must not
    // hold the call, or its waiters, past it; and it is the call's, so the read does not start a
    // count of its own.
    let read = fill
        .deadline
        .run(async {
            let response = inner.oneshot(request).await?;
            let received = shared.clock.now();
            let verdict = policy::verdict(
                fill.asks,
                response.status(),
                fill.windows,
                fill.mode,
                response.headers(),
                received,
            );
            // Not to be stored, and nobody waits for it, or the upstream said it is for no
            // other caller (`private`, `no-store`, a `Vary` on this caller): it streams on, and
            // any waiters fetch for themselves.
            if let Err(why) = verdict {
                let varies = !varies_beyond_key(response.headers(), &fill.key_headers).is_empty();
                if !sharing || !why.shareable() || varies {
                    return Ok::<_, BoxError>((Limited::TooBig(response), received, verdict));
                }
            }
            let whole = body::buffer_up_to(response, shared.max_entry_bytes).await?;
            Ok((whole, received, verdict))
        })
        .await;
    let mut cookies = Vec::new();
    let (fetched, status) = match read {
        Err(_) => (Fetched::TimedOut, LockStatus::TimedOut),
        Ok(Err(error)) if find_cause::<DeadlineExceeded>(&*error).is_some() => {
            (Fetched::TimedOut, LockStatus::TimedOut)
        }
        Ok(Err(error)) => {
            let error = Arc::new(error);
            (
                Fetched::Failed(error.clone()),
                LockStatus::Failed(SharedError(error)),
            )
        }
        Ok(Ok((Limited::TooBig(response), _, _))) => {
            (Fetched::Streamed(response), LockStatus::GaveUp)
        }
        Ok(Ok((Limited::Whole(mut answer), received, verdict))) => {
            cookies = answer
                .headers
                .get_all(header::SET_COOKIE)
                .iter()
                .cloned()
                .collect();
            let upstream_status: Vec<HeaderValue> = answer
                .headers
                .get_all(CACHE_STATUS)
                .iter()
                .cloned()
                .collect();
            let initial_age = policy::initial_age(&answer.headers, requested, received);
            answer.keep_shareable_headers();
            // The upstream's own Cache-Status member stays: pcgate appends its own after it.
            for value in upstream_status {
                answer.headers.append(CACHE_STATUS, value);
            }
            match verdict {
                Err(why) => {
                    tracing::debug!(
                        key = fill.key.path(),
                        why = why.as_str(),
                        "answer not stored"
                    );
                    answer
                        .headers
                        .insert(header::AGE, HeaderValue::from(initial_age.as_secs()));
                    let answer = Arc::new(answer);
                    (
                        Fetched::Unstored(answer.clone()),
                        LockStatus::Unstored(answer),
                    )
                }
                Ok(windows) => {
                    let vary = varies_beyond_key(&answer.headers, &fill.key_headers);
                    let variant = (!vary.is_empty()).then(|| {
                        fill.key
                            .variant(&vary, &fill.forwarded, fill.unforwarded.as_ref())
                    });
                    let entry = Arc::new(Entry {
                        response: answer,
                        stored_at: received,
                        initial_age,
                        windows,
                        vary: vary.into(),
                        variant: variant.clone(),
                    });
                    // The variant first, then the key's vary spec pointing at it, so a reader
                    // that finds the spec finds the variant.
                    let mut put = Ok(());
                    for key in variant.into_iter().chain([fill.key.clone()]) {
                        put = match fill
                            .deadline
                            .run(shared.store.put(key, entry.clone()))
                            .await
                        {
                            Ok(put) => put,
                            Err(DeadlineExceeded(limit)) => Err(StorageError::Timeout(limit)),
                        };
                        if put.is_err() {
                            break;
                        }
                    }
                    match put {
                        Ok(()) => (Fetched::Stored(entry), LockStatus::Done),
                        // Not stored: the caller and the waiters still get the answer.
                        Err(error) => {
                            tracing::info!(key = fill.key.path(), %error, "answer not stored");
                            let mut answer = entry.response.clone();
                            answer
                                .headers
                                .insert(header::AGE, HeaderValue::from(initial_age.as_secs()));
                            let answer = Arc::new(answer);
                            (
                                Fetched::Unstored(answer.clone()),
                                LockStatus::Unstored(answer),
                            )
                        }
                    }
                }
            }
        }
    };
    if let Some(permit) = permit {
        permit.release(status);
    }
    (fetched, cookies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::time::Instant;
    use tower::{Layer, Service};

    const MINUTE: Duration = Duration::from_secs(60);

    /// An inner service that counts its calls and answers with `answer(n)` for the n-th (from 1).
    fn upstream<F, Fut>(
        answer: F,
    ) -> (
        impl Service<Request, Response = Response, Error = BoxError, Future: Send> + Clone + Send,
        Arc<AtomicUsize>,
    )
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
    {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let service = tower::service_fn(move |_request: Request| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            answer(n)
        });
        (service, calls)
    }

    fn text(status: u16, body: String) -> Response {
        let mut response = Response::new(body::full(body));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response
    }

    /// Answers `status` (read at each call) with the call number in the body.
    fn numbered(
        status: Arc<Mutex<u16>>,
    ) -> impl Fn(usize) -> future::Ready<Result<Response, BoxError>> + Clone {
        move |n| {
            let status = *status.lock().unwrap();
            future::ready(Ok(text(status, format!("answer {n}"))))
        }
    }

    /// A body that sends nothing, ever.
    fn stalled() -> Response {
        let stream = futures_util::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, body::BodyError>,
        >();
        Response::new(http_body_util::BodyExt::boxed_unsync(
            http_body_util::StreamBody::new(stream),
        ))
    }

    /// A store around a [`MemoryStore`] that counts puts, can hide the next gets (as if they had
    /// looked before a put), answers later instead of at once, or fails every operation.
    struct TestStore {
        memory: MemoryStore,
        puts: AtomicUsize,
        hide_gets: AtomicUsize,
        remote: bool,
        broken: bool,
    }

    impl TestStore {
        fn new() -> TestStore {
            TestStore {
                memory: MemoryStore::new(1 << 20, 1 << 16, &Metrics::new()),
                puts: AtomicUsize::new(0),
                hide_gets: AtomicUsize::new(0),
                remote: false,
                broken: false,
            }
        }

        fn later<T: Send + 'static>(&self, ready: StoreFuture<T>) -> StoreFuture<T> {
            let Either::Left(ready) = ready else {
                unreachable!("memory answers at once")
            };
            let result = if self.broken {
                Err(StorageError::Failed("the store is down".into()))
            } else {
                ready.into_inner()
            };
            if self.remote {
                Either::Right(Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    result
                }))
            } else {
                Either::Left(future::ready(result))
            }
        }
    }

    impl Storage for TestStore {
        fn get(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
            let hide = self
                .hide_gets
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if hide {
                return self.later(Either::Left(future::ready(Ok(None))));
            }
            self.later(self.memory.get(key))
        }

        fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<()> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            if self.broken {
                return self.later(Either::Left(future::ready(Ok(()))));
            }
            self.later(self.memory.put(key, entry))
        }

        fn purge(&self, scope: Purge) -> StoreFuture<u64> {
            self.later(self.memory.purge(scope))
        }
    }

    struct Harness<S> {
        service: Cache<S>,
        store: Arc<TestStore>,
        metrics: Arc<Metrics>,
    }

    fn harness<S>(inner: S, store: TestStore, max_entry_bytes: usize) -> Harness<S> {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(store);
        let service =
            CacheLayer::new(store.clone(), max_entry_bytes, metrics.clone(), MINUTE).layer(inner);
        Harness {
            service,
            store,
            metrics,
        }
    }

    fn route(coalesce: bool) -> Arc<Route> {
        Arc::new(Route {
            name: "summary".into(),
            credential: Some(crate::token::TokenSource::fixed("app")),
            cache_ttl: Some(Duration::from_secs(300)),
            stale_while_revalidate: Some(Duration::from_secs(60)),
            stale_if_error: Some(Duration::from_secs(3600)),
            origin_cache_control: Default::default(),
            coalesce,
            retry: true,
        })
    }

    fn summary() -> Request {
        let mut request = http::Request::get("/v1/invoices/summary")
            .body(body::empty())
            .unwrap();
        request.extensions_mut().insert(route(true));
        request
    }

    fn with(mut request: Request, name: &'static str, value: &'static str) -> Request {
        request
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
        request
    }

    fn with_deadline(mut request: Request, limit: Duration) -> Request {
        request.extensions_mut().insert(Deadline::after(limit));
        request
    }

    /// (status, Cache-Status, body) of one call.
    async fn send<S>(
        service: &Cache<S>,
        request: Request,
    ) -> Result<(u16, String, String), BoxError>
    where
        S: Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let response = service.clone().oneshot(request).await?;
        let status = response.status().as_u16();
        let cache_status = response
            .headers()
            .get(CACHE_STATUS)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        Ok((
            status,
            cache_status,
            String::from_utf8(body.to_vec()).unwrap(),
        ))
    }

    async fn get<S>(service: &Cache<S>) -> (String, String)
    where
        S: Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        let (_, cache_status, body) = send(service, summary()).await.unwrap();
        (cache_status, body)
    }

    fn lookups<S>(harness: &Harness<S>, result: &'static str) -> u64 {
        harness
            .service
            .shared
            .lookups
            .get_or_create(&CacheLabels {
                route: "summary".into(),
                result,
            })
            .get()
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_fresh_for_the_ttl_then_refetched() {
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        assert_eq!(
            get(&h.service).await,
            ("pcgate; fwd=miss; stored".into(), "answer 1".into())
        );
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(
            get(&h.service).await,
            ("pcgate; hit; ttl=1".into(), "answer 1".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past the TTL and the swr window: a plain miss.
        tokio::time::advance(Duration::from_secs(62)).await;
        assert_eq!(get(&h.service).await.0, "pcgate; fwd=miss; stored");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!((lookups(&h, "miss"), lookups(&h, "hit")), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hit_says_its_age() {
        let (inner, _calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        let first = h.service.clone().oneshot(summary()).await.unwrap();
        assert_eq!(first.headers()[header::AGE], "0");
        tokio::time::advance(Duration::from_secs(42)).await;
        let second = h.service.clone().oneshot(summary()).await.unwrap();
        assert_eq!(second.headers()[header::AGE], "42");
        assert_eq!(second.headers()[CACHE_STATUS], "pcgate; hit; ttl=258");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        get(&h.service).await;
        tokio::time::advance(Duration::from_secs(310)).await;
        for _ in 0..5 {
            let (cache_status, body) = get(&h.service).await;
            assert_eq!(
                cache_status,
                "pcgate; hit; ttl=-10; detail=stale-while-revalidate"
            );
            assert_eq!(body, "answer 1");
        }
        // Let the one background refresh run.
        settle().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "exactly one background refresh"
        );
        let (cache_status, body) = get(&h.service).await;
        assert!(
            cache_status.starts_with("pcgate; hit; ttl="),
            "{cache_status}"
        );
        assert_eq!(body, "answer 2");
        assert_eq!(lookups(&h, "stale"), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_covers_5xx_for_its_window_only() {
        let status = Arc::new(Mutex::new(200));
        let (inner, _calls) = upstream(numbered(status.clone()));
        let h = harness(inner, TestStore::new(), 1 << 16);
        get(&h.service).await;
        *status.lock().unwrap() = 503;
        tokio::time::advance(Duration::from_secs(400)).await;
        assert_eq!(
            get(&h.service).await,
            (
                "pcgate; fwd=stale; fwd-status=503".into(),
                "answer 1".into()
            )
        );
        // Past ttl + stale_if_error: the failure goes to the caller.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (cache_status, body) = get(&h.service).await;
        assert_eq!(cache_status, "pcgate; fwd=miss");
        assert_eq!(body, "answer 3");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_covers_an_upstream_that_does_not_answer() {
        #[derive(Debug, thiserror::Error)]
        #[error("connection refused")]
        struct Refused;
        let status = Arc::new(Mutex::new(200));
        let flag = status.clone();
        let (inner, _calls) = upstream(move |n| {
            let fail = *flag.lock().unwrap() != 200;
            async move {
                if fail {
                    Err(Refused.into())
                } else {
                    Ok(text(200, format!("answer {n}")))
                }
            }
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        get(&h.service).await;
        *status.lock().unwrap() = 0;
        tokio::time::advance(Duration::from_secs(400)).await;
        assert_eq!(
            get(&h.service).await,
            ("pcgate; fwd=stale".into(), "answer 1".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_cache_fetches_fresh_and_no_store_is_not_stored() {
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        get(&h.service).await;
        let fresh = send(&h.service, with(summary(), "cache-control", "no-cache"))
            .await
            .unwrap();
        assert_eq!(fresh.1, "pcgate; fwd=request; stored");
        assert_eq!(fresh.2, "answer 2");
        let unstored = send(&h.service, with(summary(), "cache-control", "no-store"))
            .await
            .unwrap();
        assert_eq!(unstored.1, "pcgate; fwd=request");
        assert_eq!(
            get(&h.service).await,
            ("pcgate; hit; ttl=300".into(), "answer 2".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(lookups(&h, "bypass"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_cold_calls_make_one_upstream_call_stored_once() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(200, format!("answer {n}")))
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let answers: Vec<_> = (0..100)
            .map(|_| {
                let service = h.service.clone();
                tokio::spawn(async move { send(&service, summary()).await.unwrap() })
            })
            .collect();
        for answer in futures_util::future::join_all(answers).await {
            assert_eq!(
                answer.unwrap(),
                (200, "pcgate; fwd=miss; stored".into(), "answer 1".into())
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(h.store.puts.load(Ordering::SeqCst), 1, "stored once");
        assert_eq!(lookups(&h, "miss"), 100);
        let coalesced = h
            .metrics
            .coalesced
            .get_or_create(&RouteLabel {
                route: "summary".into(),
            })
            .get();
        assert_eq!(coalesced, 99);
    }

    #[tokio::test(start_paused = true)]
    async fn without_coalesce_each_miss_fetches_for_itself() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(200, format!("answer {n}")))
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let request = || {
            let mut request = summary();
            request.extensions_mut().insert(route(false));
            request
        };
        let (a, b) = tokio::join!(send(&h.service, request()), send(&h.service, request()));
        assert_eq!(a.unwrap().1, "pcgate; fwd=miss; stored");
        assert_eq!(b.unwrap().1, "pcgate; fwd=miss; stored");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_arriving_after_the_fetch_lands_hits() {
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        assert_eq!(get(&h.service).await.0, "pcgate; fwd=miss; stored");
        // This caller's lookup ran before the store held the answer; the lock is free by the time
        // it asks, so it is the writer, and looks again before fetching.
        h.store.hide_gets.store(1, Ordering::SeqCst);
        let (cache_status, body) = get(&h.service).await;
        assert_eq!(cache_status, "pcgate; hit; ttl=300");
        assert_eq!(body, "answer 1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_reaches_every_waiter_as_itself() {
        #[derive(Debug, thiserror::Error)]
        #[error("upstream unreachable")]
        struct Unreachable;
        let (inner, calls) = upstream(|_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<Response, BoxError>(Unreachable.into())
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let answers = futures_util::future::join_all((0..5).map(|_| send(&h.service, summary())));
        for answer in answers.await {
            let error = answer.unwrap_err();
            assert!(
                find_cause::<Unreachable>(&*error).is_some(),
                "classified by its cause: {error}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unstorable_answer_is_shared_with_the_waiters() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(500, format!("broken {n}")))
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let answers = futures_util::future::join_all((0..5).map(|_| send(&h.service, summary())));
        for answer in answers.await {
            assert_eq!(
                answer.unwrap(),
                (500, "pcgate; fwd=miss".into(), "broken 1".into())
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a failing upstream sees one call"
        );
        assert_eq!(h.store.puts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_on_a_stalled_fetch_are_released_at_their_deadline() {
        // Headers at once, then nothing.
        let (inner, calls) = upstream(|_| future::ready(Ok(stalled())));
        let h = harness(inner, TestStore::new(), 1 << 16);
        let call_at = |started: Instant, arrive: u64| {
            let service = h.service.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(arrive)).await;
                let request = with_deadline(summary(), Duration::from_secs(10));
                let result = send(&service, request).await;
                (result.unwrap_err(), started.elapsed())
            }
        };
        // All at once: the writer's deadline is theirs too, so one upstream call.
        let started = Instant::now();
        let answers = futures_util::future::join_all((0..5).map(|_| call_at(started, 0))).await;
        for (error, elapsed) in answers {
            assert!(find_cause::<DeadlineExceeded>(&*error).is_some(), "{error}");
            assert_eq!(elapsed, Duration::from_secs(10));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A second apart: each is released at its own deadline, neither the writer's nor later.
        let started = Instant::now();
        let answers = futures_util::future::join_all((0..4).map(|i| call_at(started, i))).await;
        for (i, (error, elapsed)) in answers.into_iter().enumerate() {
            assert!(find_cause::<DeadlineExceeded>(&*error).is_some(), "{error}");
            assert_eq!(elapsed, Duration::from_secs(10 + i as u64), "caller {i}");
        }
    }

    /// A store shared with another process that holds the key's claim until `lapses` (never:
    /// `None`), and stores its own answer at `fills` (never: `None`).
    struct FleetStore {
        memory: MemoryStore,
        started: Instant,
        lapses: Option<Duration>,
        fills: Option<Duration>,
        waits: Mutex<Vec<Waited>>,
    }

    impl FleetStore {
        fn new(lapses: Option<Duration>, fills: Option<Duration>) -> Arc<FleetStore> {
            Arc::new(FleetStore {
                memory: MemoryStore::new(1 << 20, 1 << 16, &Metrics::new()),
                started: Instant::now(),
                lapses,
                fills,
                waits: Mutex::default(),
            })
        }

        fn past(&self, at: Option<Duration>) -> bool {
            at.is_some_and(|at| self.started.elapsed() >= at)
        }
    }

    impl Storage for FleetStore {
        fn get(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
            if self.past(self.fills) {
                let theirs = Arc::new(Entry {
                    response: Buffered {
                        status: http::StatusCode::OK,
                        headers: HeaderMap::new(),
                        body: bytes::Bytes::from_static(b"the other process's answer"),
                    },
                    stored_at: std::time::SystemTime::now(),
                    initial_age: Duration::ZERO,
                    windows: Windows {
                        ttl: MINUTE,
                        stale_while_revalidate: Duration::ZERO,
                        stale_if_error: Duration::ZERO,
                    },
                    vary: Arc::from([]),
                    variant: None,
                });
                return Either::Left(future::ready(Ok(Some(theirs))));
            }
            self.memory.get(key)
        }

        fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<()> {
            self.memory.put(key, entry)
        }

        fn purge(&self, scope: Purge) -> StoreFuture<u64> {
            self.memory.purge(scope)
        }

        fn claim(&self, _key: &Key) -> StoreFuture<Claim> {
            let claim = if self.past(self.lapses) {
                Claim::Owner
            } else {
                Claim::Busy
            };
            Either::Left(future::ready(Ok(claim)))
        }

        fn waited(&self, outcome: Waited) {
            self.waits.lock().unwrap().push(outcome);
        }
    }

    fn fleet_harness(
        store: Arc<FleetStore>,
    ) -> (
        Cache<
            impl Service<Request, Response = Response, Error = BoxError, Future: Send> + Clone + Send,
        >,
        Arc<AtomicUsize>,
    ) {
        let (inner, calls) = upstream(|n| future::ready(Ok(text(200, format!("answer {n}")))));
        let service =
            CacheLayer::new(store, 1 << 16, Arc::new(Metrics::new()), MINUTE).layer(inner);
        (service, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn while_another_process_fetches_callers_wait_for_its_fill_within_their_deadline() {
        // It stores its answer at 3 s: five callers here make no upstream call and get it.
        let store = FleetStore::new(None, Some(Duration::from_secs(3)));
        let (service, calls) = fleet_harness(store.clone());
        let started = Instant::now();
        let answers =
            futures_util::future::join_all((0..5).map(|_| send(&service, summary()))).await;
        for answer in answers {
            let (status, _, body) = answer.unwrap();
            assert_eq!((status, body.as_str()), (200, "the other process's answer"));
        }
        assert!(started.elapsed() >= Duration::from_secs(3));
        assert!(started.elapsed() < Duration::from_secs(3) + 2 * FLEET_POLL);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // This process's writer waited once; its own waiters queued on the local lock.
        assert_eq!(*store.waits.lock().unwrap(), [Waited::Filled]);

        // It never fills nor lets go: the callers are released at their own deadline.
        let store = FleetStore::new(None, None);
        let (service, calls) = fleet_harness(store.clone());
        let started = Instant::now();
        let error = send(&service, with_deadline(summary(), Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(find_cause::<DeadlineExceeded>(&*error).is_some(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(*store.waits.lock().unwrap(), [Waited::TimedOut]);

        // Its claim lapses at 2 s with nothing stored (it died): this process takes over, once.
        let store = FleetStore::new(Some(Duration::from_secs(2)), None);
        let (service, calls) = fleet_harness(store.clone());
        let answers =
            futures_util::future::join_all((0..5).map(|_| send(&service, summary()))).await;
        for answer in answers {
            assert_eq!(answer.unwrap().2, "answer 1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(*store.waits.lock().unwrap(), [Waited::TookOver]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_late_is_cut_at_the_calls_deadline_not_after_it() {
        // Headers at 0.8 x the deadline, then nothing: the body read must not start a count of
        // its own (it did: the call ended at 1.8 x).
        let (inner, _calls) = upstream(|_| async {
            tokio::time::sleep(Duration::from_secs(8)).await;
            Ok(stalled())
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let started = Instant::now();
        let error = send(
            &h.service,
            with_deadline(summary(), Duration::from_secs(10)),
        )
        .await
        .unwrap_err();
        assert!(find_cause::<DeadlineExceeded>(&*error).is_some(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // A request that came without a deadline gets the layer's limit, from its start.
        let started = Instant::now();
        assert!(send(&h.service, summary()).await.is_err());
        assert_eq!(started.elapsed(), MINUTE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_hanging_up_leaves_the_waiters_answered() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(text(200, format!("answer {n}")))
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        let writer = tokio::spawn({
            let service = h.service.clone();
            async move { send(&service, summary()).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let service = h.service.clone();
        let waiters = tokio::spawn(async move {
            futures_util::future::join_all((0..5).map(|_| send(&service, summary()))).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        writer.abort();
        for answer in waiters.await.unwrap() {
            assert_eq!(answer.unwrap().2, "answer 1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Stored when the fetch landed (t = 5 s), though its caller was gone; the 5 s the
        // upstream took count in its age (RFC 9111 §4.2.3 response delay), so 295 s are left.
        assert_eq!(get(&h.service).await.0, "pcgate; hit; ttl=295");
        assert_eq!(h.store.puts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_too_large_to_store_are_fetched_by_each_waiter() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(200, format!("a large answer {n}")))
        });
        let h = harness(inner, TestStore::new(), 8);
        let answers = futures_util::future::join_all((0..3).map(|_| send(&h.service, summary())));
        let mut bodies: Vec<String> = answers
            .await
            .into_iter()
            .map(|answer| {
                let (status, cache_status, body) = answer.unwrap();
                assert_eq!((status, cache_status.as_str()), (200, "pcgate; fwd=miss"));
                body
            })
            .collect();
        bodies.sort();
        assert_eq!(
            bodies,
            ["a large answer 1", "a large answer 2", "a large answer 3"]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(h.store.puts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_refresh_holds_the_lock_like_any_fetch() {
        let (inner, calls) = upstream(|n| async move {
            if n > 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(text(200, format!("answer {n}")))
        });
        let h = harness(inner, TestStore::new(), 1 << 16);
        get(&h.service).await;
        tokio::time::advance(Duration::from_secs(310)).await;
        // Stale: served at once, and the refresh starts.
        assert_eq!(get(&h.service).await.1, "answer 1");
        settle().await;
        // A caller that wants it fresh waits for that refresh rather than fetching again.
        let fresh = send(&h.service, with(summary(), "cache-control", "no-cache"))
            .await
            .unwrap();
        assert_eq!(fresh.1, "pcgate; fwd=request; stored");
        assert_eq!(fresh.2, "answer 2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(h.store.puts.load(Ordering::SeqCst), 2);
        // And while a caller's fetch holds the key, a stale hit starts no refresh of its own.
        tokio::time::advance(Duration::from_secs(310)).await;
        let forced = tokio::spawn({
            let service = h.service.clone();
            async move { send(&service, with(summary(), "cache-control", "no-cache")).await }
        });
        settle().await;
        assert_eq!(get(&h.service).await.1, "answer 2");
        assert_eq!(forced.await.unwrap().unwrap().2, "answer 3");
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_answers_later_still_gives_hits() {
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let store = TestStore {
            remote: true,
            ..TestStore::new()
        };
        let h = harness(inner, store, 1 << 16);
        assert_eq!(get(&h.service).await.0, "pcgate; fwd=miss; stored");
        assert_eq!(
            get(&h.service).await,
            ("pcgate; hit; ttl=299".into(), "answer 1".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_is_a_miss_never_an_error() {
        let (inner, calls) = upstream(|n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(text(200, format!("answer {n}")))
        });
        let store = TestStore {
            remote: true,
            broken: true,
            ..TestStore::new()
        };
        let h = harness(inner, store, 1 << 16);
        // The writer's put fails: it and its waiters still get the answer, marked not stored.
        let answers = futures_util::future::join_all((0..3).map(|_| send(&h.service, summary())));
        for answer in answers.await {
            assert_eq!(
                answer.unwrap(),
                (200, "pcgate; fwd=miss".into(), "answer 1".into())
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(get(&h.service).await.1, "answer 2");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_carry_their_own_times_and_windows() {
        // An entry stored elsewhere (another process) 100 s ago by the wall clock, with its own
        // windows: judged by those, not this route's.
        let (inner, calls) = upstream(numbered(Arc::new(Mutex::new(200))));
        let h = harness(inner, TestStore::new(), 1 << 16);
        let key = Key::of(&summary(), &[]);
        let entry = Entry {
            response: Buffered {
                status: http::StatusCode::OK,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::from_static(b"from elsewhere"),
            },
            stored_at: h.service.shared.clock.now() - Duration::from_secs(100),
            initial_age: Duration::ZERO,
            vary: Arc::from([]),
            variant: None,
            windows: Windows {
                ttl: Duration::from_secs(120),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
        };
        h.store.put(key, Arc::new(entry)).await.unwrap();
        let response = h.service.clone().oneshot(summary()).await.unwrap();
        assert_eq!(response.headers()[header::AGE], "100");
        assert_eq!(response.headers()[CACHE_STATUS], "pcgate; hit; ttl=20");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(get(&h.service).await.1, "answer 1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
