//! `cache`: summary responses from memory, on routes with `cache_ttl`.
//!
//! - Only `200` answers to `GET`/`HEAD` without a body are stored, never answers to a request
//!   with `Cache-Control: no-store`, never one over `cache.max_entry_bytes` (it streams through).
//! - Freshness is kept on tokio's clock in the entry; moka's own expiry only evicts, at the end
//!   of the last window, and moka bounds the total by `cache.max_bytes` with a byte weigher.
//! - After the TTL: within `stale_while_revalidate` the stale answer is served and one background
//!   refresh runs; within `stale_if_error` the stale answer is served when the upstream fails
//!   (5xx, timeout, unreachable, no token).
//! - A caller's `Cache-Control: no-cache` or `max-age=0` fetches fresh and stores the answer.
//! - Every answer on a cached route says what happened in `Cache-Status` (RFC 9211) and, when it
//!   came from the cache, its `Age` (RFC 9111 §5.1).

mod key;

pub use key::{shareable, Key, KEYED_HEADERS, MS_CONTINUATION_TOKEN, MS_CONTRACT_VERSION};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, Either, Ready};
use http::{header, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::body::{self, BoxError, BoxFuture, Buffered, Limited, Request, Response};
use crate::call::CallInfo;
use crate::deadline::DeadlineExceeded;
use crate::metrics::{CacheLabels, Metrics};
use crate::route::Route;

pub use crate::headers::CACHE_STATUS;

/// The caller's `Cache-Control` values: `access` takes them out of the request (they are not
/// forwarded upstream) and leaves them here for the cache to honour.
#[derive(Debug, Clone)]
pub struct RequestCacheControl(pub Vec<HeaderValue>);

/// What the cache did for a call (a metric label, a log field and the `Cache-Status` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from a fresh entry.
    Hit,
    /// Fetched from the upstream: nothing usable was stored.
    Miss,
    /// Answered from a stale entry (revalidating in the background, or the upstream failed).
    Stale,
    /// Fetched because the caller asked (`no-cache`, `max-age=0`, `no-store`).
    Bypass,
}

impl CacheStatus {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// A stored answer and its windows.
#[derive(Debug)]
pub struct Entry {
    /// The answer.
    pub response: Buffered,
    /// When it was stored (tokio clock).
    pub stored_at: Instant,
    ttl: Duration,
    swr: Duration,
    sie: Duration,
}

impl Entry {
    fn lifetime(&self) -> Duration {
        self.ttl + self.swr.max(self.sie)
    }
}

/// Evicts an entry when its last window closes (moka's clock; freshness uses tokio's).
struct EntryExpiry;

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Key,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.lifetime())
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.lifetime())
    }
}

/// What one stored entry costs beyond its key's text and its answer's headers and body, measured
/// (RSS over 100,000 entries with no header and an empty body: 685 bytes, 40 of them the key's
/// text): moka's node, its hash-table slot, its order queues and timer-wheel node, the `Arc`s, the
/// [`Entry`] with its `HeaderMap`, and the key's `Arc<str>` header. The weigher adds it to every
/// entry, so `cache.max_bytes` bounds what the cache really holds, not only its payload.
pub const ENTRY_OVERHEAD: usize = 640;

/// The response cache: a bounded moka map from [`Key`] to [`Entry`]. The one place entries are
/// kept, behind a small interface (get, put, purge) so a shared second tier can slot in later.
pub struct Store {
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    max_entry_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Store {
    /// A store holding at most `max_bytes` (bodies, headers, keys and each entry's own overhead,
    /// [`ENTRY_OVERHEAD`]), each answer at most `max_entry_bytes`.
    pub fn new(max_bytes: u64, max_entry_bytes: u64, metrics: Arc<Metrics>) -> Store {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &Key, entry: &Arc<Entry>| {
                u32::try_from(ENTRY_OVERHEAD + key.len() + entry.response.weight())
                    .unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build();
        Store {
            entries,
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            metrics,
        }
    }

    /// The largest answer stored or shared.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// The entry for `key`, fresh or not.
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }

    fn put(&self, key: Key, entry: Entry) {
        self.entries.insert(key, Arc::new(entry));
        self.update_gauges();
    }

    /// Removes every entry, or those under the path `prefix` (whole segments: `/v1/invoices`
    /// covers `/v1/invoices/summary`, `/v1/invoices/summary` does not cover `.../summaries`);
    /// returns how many.
    pub fn purge(&self, prefix: Option<&str>) -> u64 {
        self.entries.run_pending_tasks();
        let under = |path: &str, prefix: &str| {
            let prefix = prefix.trim_end_matches('/');
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let mut purged = 0;
        for (key, _) in self.entries.iter() {
            if prefix.is_none_or(|p| under(key.path(), p)) {
                self.entries.invalidate(&*key);
                purged += 1;
            }
        }
        self.entries.run_pending_tasks();
        self.update_gauges();
        purged
    }

    /// Applies pending evictions and returns (entries, weighted bytes).
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        self.update_gauges();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    fn update_gauges(&self) {
        self.metrics
            .cache_entries
            .set(self.entries.entry_count() as i64);
        self.metrics
            .cache_bytes
            .set(self.entries.weighted_size() as i64);
    }
}

/// Lets the layer that fetches an answer for a cached route store it at once, before it tells
/// anyone the fetch is over. `coalesce` calls it before taking its flight out of its map, so a
/// caller arriving in between finds the answer in the cache instead of starting a second fetch
/// (the same guarantee as nginx's `proxy_cache_lock`).
pub struct StoreOnArrival {
    store: Arc<Store>,
    key: Key,
    windows: (Duration, Duration, Duration),
}

impl StoreOnArrival {
    /// Stores `answer` if it is a `200` within the entry size limit.
    pub fn store(&self, answer: &Buffered) {
        if answer.status != StatusCode::OK || answer.body.len() > self.store.max_entry_bytes() {
            return;
        }
        let mut response = answer.clone();
        response.keep_shareable_headers();
        let (ttl, swr, sie) = self.windows;
        self.store.put(
            self.key.clone(),
            Entry {
                response,
                stored_at: Instant::now(),
                ttl,
                swr,
                sie,
            },
        );
    }
}

/// Adds [`Cache`] in front of a service.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
    /// `cache.key_headers`, part of every key.
    key_headers: Arc<[HeaderName]>,
}

struct Shared {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Keys with a background refresh running: one at a time per key.
    revalidating: Mutex<HashSet<Key>>,
    /// The call's deadline (`upstream.deadline`), which also bounds reading a body to store.
    deadline: Duration,
}

impl CacheLayer {
    /// Caches into `store`; a body being stored must arrive within `deadline`.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, deadline: Duration) -> Self {
        CacheLayer {
            shared: Arc::new(Shared {
                store,
                metrics,
                revalidating: Mutex::new(HashSet::new()),
                deadline,
            }),
            key_headers: Arc::from([]),
        }
    }

    /// Puts these request headers in every key too (`cache.key_headers`); `coalesce` must be
    /// given the same list, since the two layers share keys.
    pub fn key_headers(mut self, extra: Arc<[HeaderName]>) -> Self {
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
        }
    }
}

/// Answers from the cache when it can; see the module docs.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
    key_headers: Arc<[HeaderName]>,
}

/// The route's cache windows, if it is cached.
fn windows(request: &Request) -> Option<(Duration, Duration, Duration, Arc<str>)> {
    let route = request.extensions().get::<Arc<Route>>()?;
    let ttl = route.cache_ttl?;
    Some((
        ttl,
        route.stale_while_revalidate.unwrap_or_default(),
        route.stale_if_error.unwrap_or_default(),
        route.name.clone(),
    ))
}

/// What the caller's `Cache-Control` asks of us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asks {
    Anything,
    Fresh,
    NoStore,
}

fn caller_asks(request: &Request) -> Asks {
    let mut asks = Asks::Anything;
    let taken = request
        .extensions()
        .get::<RequestCacheControl>()
        .map_or(&[][..], |values| &values.0[..]);
    for directive in taken
        .iter()
        .chain(request.headers().get_all(header::CACHE_CONTROL))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
    {
        match directive.as_str() {
            "no-store" => return Asks::NoStore,
            "no-cache" | "max-age=0" | "max-age=\"0\"" => asks = Asks::Fresh,
            _ => {}
        }
    }
    asks
}

impl<S> tower::Service<Request> for Cache<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = Either<Ready<Result<Response, BoxError>>, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let cacheable = shareable(&request);
        let Some((ttl, swr, sie, route)) = windows(&request).filter(|_| cacheable) else {
            return Either::Right(Box::pin(self.inner.call(request)));
        };
        let shared = self.shared.clone();
        let key = Key::get_or_insert(&mut request, &self.key_headers);
        let asks = caller_asks(&request);
        let info = request.extensions().get::<Arc<CallInfo>>().cloned();
        let now = Instant::now();
        let entry = match asks {
            Asks::Anything => shared.store.get(&key),
            Asks::Fresh | Asks::NoStore => None,
        };
        // Hits are answered here, without touching the layers below or allocating a future.
        if let Some(entry) = &entry {
            let age = now.saturating_duration_since(entry.stored_at);
            if age < entry.ttl {
                shared.count(&route, CacheStatus::Hit, info.as_ref());
                let left = (entry.ttl - age).as_secs();
                let response = from_entry(
                    entry,
                    age,
                    CacheStatus::Hit,
                    &format!("pcgate; hit; ttl={left}"),
                );
                return Either::Left(future::ready(Ok(response)));
            }
            if age < entry.ttl + entry.swr {
                shared.count(&route, CacheStatus::Stale, info.as_ref());
                shared.revalidate(self.inner.clone(), request, key, (ttl, swr, sie));
                let over = (age - entry.ttl).as_secs();
                let cache_status =
                    format!("pcgate; hit; ttl=-{over}; detail=stale-while-revalidate");
                return Either::Left(future::ready(Ok(from_entry(
                    entry,
                    age,
                    CacheStatus::Stale,
                    &cache_status,
                ))));
            }
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let status = match asks {
                Asks::Anything => CacheStatus::Miss,
                Asks::Fresh | Asks::NoStore => CacheStatus::Bypass,
            };
            let fwd = if status == CacheStatus::Miss {
                "miss"
            } else {
                "request"
            };
            // A stale entry still within stale-if-error is the fallback if the fetch fails.
            let fallback =
                entry.filter(|e| now.saturating_duration_since(e.stored_at) < e.ttl + e.sie);
            if asks != Asks::NoStore {
                let hook = StoreOnArrival {
                    store: shared.store.clone(),
                    key: key.clone(),
                    windows: (ttl, swr, sie),
                };
                request.extensions_mut().insert(Arc::new(hook));
            }
            let outcome = inner.oneshot(request).await;
            let failed = match &outcome {
                Ok(response) => response
                    .status()
                    .is_server_error()
                    .then(|| response.status().as_u16()),
                Err(_) => Some(0),
            };
            if let (Some(upstream_status), Some(entry)) = (failed, &fallback) {
                shared.count(&route, CacheStatus::Stale, info.as_ref());
                let age = Instant::now().saturating_duration_since(entry.stored_at);
                let detail = match upstream_status {
                    0 => String::new(),
                    s => format!("; fwd-status={s}"),
                };
                tracing::info!(
                    key = key.path(),
                    "upstream failed: serving a stale answer (stale-if-error)"
                );
                return Ok(from_entry(
                    entry,
                    age,
                    CacheStatus::Stale,
                    &format!("pcgate; fwd=stale{detail}"),
                ));
            }
            shared.count(&route, status, info.as_ref());
            let response = outcome?;
            if asks == Asks::NoStore {
                return Ok(with_status(response, status, &format!("pcgate; fwd={fwd}")));
            }
            shared
                .store_response(response, key, (ttl, swr, sie), status, fwd)
                .await
        }))
    }
}

impl Shared {
    fn count(&self, route: &Arc<str>, status: CacheStatus, info: Option<&Arc<CallInfo>>) {
        if let Some(info) = info {
            info.set_cache(status.as_str());
        }
        self.metrics
            .cache_lookups
            .get_or_create(&CacheLabels {
                route: route.clone(),
                result: status.as_str(),
            })
            .inc();
    }

    /// Stores a 200 answer within the size limit and returns it; passes anything else through.
    async fn store_response(
        &self,
        response: Response,
        key: Key,
        (ttl, swr, sie): (Duration, Duration, Duration),
        status: CacheStatus,
        fwd: &str,
    ) -> Result<Response, BoxError> {
        if response.status() != StatusCode::OK {
            return Ok(with_status(response, status, &format!("pcgate; fwd={fwd}")));
        }
        // The deadline covers reading the body too: an upstream that stalls mid-body fails the call.
        let read = body::buffer_up_to(response, self.store.max_entry_bytes());
        let read = tokio::time::timeout(self.deadline, read)
            .await
            .map_err(|_| DeadlineExceeded(self.deadline))?;
        match read? {
            Limited::TooBig(response) => {
                Ok(with_status(response, status, &format!("pcgate; fwd={fwd}")))
            }
            Limited::Whole(mut buffered) => {
                buffered.keep_shareable_headers();
                let entry = Entry {
                    response: buffered,
                    stored_at: Instant::now(),
                    ttl,
                    swr,
                    sie,
                };
                let response = from_entry(
                    &entry,
                    Duration::ZERO,
                    status,
                    &format!("pcgate; fwd={fwd}; stored"),
                );
                self.store.put(key, entry);
                Ok(response)
            }
        }
    }

    /// Starts one background refresh for `key`, unless one is running.
    fn revalidate<S>(
        self: &Arc<Self>,
        inner: S,
        request: Request,
        key: Key,
        windows: (Duration, Duration, Duration),
    ) where
        S: tower::Service<Request, Response = Response, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        if !self
            .revalidating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            match inner.oneshot(request).await {
                Ok(response) if response.status() == StatusCode::OK => {
                    let _ = shared
                        .store_response(response, key.clone(), windows, CacheStatus::Miss, "miss")
                        .await;
                }
                Ok(response) => {
                    tracing::info!(
                        key = key.path(),
                        status = response.status().as_u16(),
                        "background refresh not stored"
                    );
                }
                Err(error) => tracing::info!(key = key.path(), %error, "background refresh failed"),
            }
            shared
                .revalidating
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }
}

fn from_entry(entry: &Entry, age: Duration, status: CacheStatus, cache_status: &str) -> Response {
    let mut response = entry.response.to_response();
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age.as_secs()));
    with_status(response, status, cache_status)
}

fn with_status(mut response: Response, status: CacheStatus, cache_status: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cache_status) {
        response.headers_mut().insert(CACHE_STATUS, value);
    }
    response.extensions_mut().insert(status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, Service};

    /// A cache over an inner service that counts calls and answers `status` with the call number.
    fn harness(
        status: Arc<Mutex<u16>>,
    ) -> (
        impl Service<Request, Response = Response, Error = BoxError> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = tower::service_fn(move |_request: Request| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let status = *status.lock().unwrap();
            async move {
                let mut response = Response::new(body::full(format!("answer {n}")));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, BoxError>(response)
            }
        });
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::new(1 << 20, 1 << 16, metrics.clone()));
        (
            CacheLayer::new(store, metrics, Duration::from_secs(60)).layer(inner),
            calls,
        )
    }

    fn summary() -> Request {
        let mut request = http::Request::get("/v1/invoices/summary")
            .body(body::empty())
            .unwrap();
        request.extensions_mut().insert(Arc::new(Route {
            name: "summary".into(),
            credential: Some(crate::token::TokenSource::fixed("app")),
            cache_ttl: Some(Duration::from_secs(300)),
            stale_while_revalidate: Some(Duration::from_secs(60)),
            stale_if_error: Some(Duration::from_secs(3600)),
            coalesce: true,
            retry: true,
        }));
        request
    }

    async fn get(
        service: &mut (impl Service<Request, Response = Response, Error = BoxError> + Clone),
    ) -> (String, String) {
        let response = tower::ServiceExt::oneshot(service.clone(), summary())
            .await
            .unwrap();
        let cache_status = response.headers()[CACHE_STATUS]
            .to_str()
            .unwrap()
            .to_owned();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (cache_status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_fresh_for_the_ttl_then_refetched() {
        let (mut service, calls) = harness(Arc::new(Mutex::new(200)));
        assert_eq!(
            get(&mut service).await,
            ("pcgate; fwd=miss; stored".into(), "answer 1".into())
        );
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(
            get(&mut service).await,
            ("pcgate; hit; ttl=1".into(), "answer 1".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past the TTL and the swr window: a plain miss.
        tokio::time::advance(Duration::from_secs(62)).await;
        assert_eq!(get(&mut service).await.0, "pcgate; fwd=miss; stored");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
        let (mut service, calls) = harness(Arc::new(Mutex::new(200)));
        get(&mut service).await;
        tokio::time::advance(Duration::from_secs(310)).await;
        for _ in 0..5 {
            let (cache_status, body) = get(&mut service).await;
            assert_eq!(
                cache_status,
                "pcgate; hit; ttl=-10; detail=stale-while-revalidate"
            );
            assert_eq!(body, "answer 1");
        }
        // Let the one background refresh run.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "exactly one background refresh"
        );
        let (cache_status, body) = get(&mut service).await;
        assert!(
            cache_status.starts_with("pcgate; hit; ttl="),
            "{cache_status}"
        );
        assert_eq!(body, "answer 2");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_covers_5xx_for_its_window_only() {
        let status = Arc::new(Mutex::new(200));
        let (mut service, _calls) = harness(status.clone());
        get(&mut service).await;
        *status.lock().unwrap() = 503;
        tokio::time::advance(Duration::from_secs(400)).await;
        assert_eq!(
            get(&mut service).await,
            (
                "pcgate; fwd=stale; fwd-status=503".into(),
                "answer 1".into()
            )
        );
        // Past ttl + stale_if_error: the failure goes to the caller.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (cache_status, body) = get(&mut service).await;
        assert_eq!(cache_status, "pcgate; fwd=miss");
        assert_eq!(body, "answer 3");
    }
}
