//! `coalesce`: identical calls in flight at the same time share one upstream call, on uncached
//! routes with `coalesce = true` (on a cached route the cache's miss lock does this, and stores
//! the answer once). "Identical" is the cache [`Key`]. Nothing is stored here.
//!
//! The shared fetch runs in its own task, so a first caller that hangs up does not fail the others;
//! each caller waits against its own [`Deadline`], and the fetch against its first caller's. The
//! answer is buffered to be shared; one larger than `cache.max_entry_bytes` is not: it streams to
//! the caller that started the fetch, and the others go on their own.
//!
//! As with the cache's shared answers (DESIGN.md §2.1, RFC 9111 §4.1): an answer that `Vary`s on
//! a request header beyond the key goes only to callers that sent what the first caller sent; one
//! marked `private` or `Vary: *` goes to no other caller (each fetches for itself); `Set-Cookie`
//! reaches only the caller whose request fetched it; every caller gets the answer's `Age`
//! (RFC 9111 §4.2.3: the upstream's, the response delay, and the time since it arrived).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::future::{Either, FutureExt, Shared};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::body::{self, BoxError, BoxFuture, Buffered, Limited, Request, Response};
use crate::call::UnforwardedHeaders;
use crate::deadline::Deadline;
/// The shared fetch failed: the cache's miss lock and this layer report it alike.
pub use crate::layer::cache::SharedError;
use crate::layer::cache::{initial_age, shareable, varies_beyond_key, vary, Directives, Key, Vary};
use crate::metrics::{Metrics, RouteLabel};
use crate::route::Route;

/// What a shared fetch came to.
#[derive(Clone)]
enum Outcome {
    /// The whole answer, for the callers [`Answer::sharing`] admits.
    Whole(Arc<Answer>),
    /// Too large to share: it went to the caller that started the fetch.
    TooBig,
    /// The fetch failed.
    Failed(Arc<BoxError>),
}

type Flight = Shared<Pin<Box<dyn Future<Output = Outcome> + Send>>>;

/// A shared fetch's whole answer.
struct Answer {
    /// Without the headers of the fetching caller's exchange (`Set-Cookie`, `Age`, ...).
    buffered: Buffered,
    /// The answer's `Set-Cookie` lines: the fetching caller's alone.
    cookies: Vec<HeaderValue>,
    /// Its corrected initial age when it arrived (RFC 9111 §4.2.3).
    initial_age: Duration,
    /// When it arrived, to add the time since to its `Age`.
    received: tokio::time::Instant,
    /// Which other callers may be given it.
    sharing: Sharing,
}

/// Which callers besides the fetching one an answer may go to.
enum Sharing {
    /// Every caller with the same key.
    Everyone,
    /// Those whose request gives this variant of the key for the answer's `Vary` names.
    Variant(Vec<HeaderName>, Key),
    /// None (`private`, `Vary: *`): each fetches for itself.
    Nobody,
}

impl Answer {
    /// The answer for one caller; `fetcher` says whether its request fetched it.
    fn to_response(&self, fetcher: bool) -> Response {
        let mut response = self.buffered.to_response();
        let age = self.initial_age + self.received.elapsed();
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
        if fetcher {
            for cookie in &self.cookies {
                response
                    .headers_mut()
                    .append(header::SET_COOKIE, cookie.clone());
            }
        }
        response
    }

    /// Whether a caller with this `request` may be given it.
    fn admits(&self, key: &Key, request: &Request) -> bool {
        match &self.sharing {
            Sharing::Everyone => true,
            Sharing::Nobody => false,
            Sharing::Variant(names, variant) => {
                let unforwarded = request
                    .extensions()
                    .get::<UnforwardedHeaders>()
                    .map(|headers| &headers.0);
                key.variant(names, request.headers(), unforwarded) == *variant
            }
        }
    }
}

/// Who else the answer with these `headers` may go to, for a fetch keyed `key` whose request
/// had `forwarded` headers and kept `unforwarded` ones aside.
fn sharing(
    headers: &HeaderMap,
    key: &Key,
    key_headers: &[HeaderName],
    forwarded: &HeaderMap,
    unforwarded: Option<&HeaderMap>,
) -> Sharing {
    if Directives::of(headers).private || vary(headers) == Vary::All {
        return Sharing::Nobody;
    }
    let names = varies_beyond_key(headers, key_headers);
    if names.is_empty() {
        return Sharing::Everyone;
    }
    let variant = key.variant(&names, forwarded, unforwarded);
    Sharing::Variant(names, variant)
}

/// Adds [`Coalesce`] in front of a service.
#[derive(Clone)]
pub struct CoalesceLayer {
    shared: Arc<State>,
    /// `cache.key_headers`, part of every key (the cache's keys and these are one).
    key_headers: Arc<[HeaderName]>,
}

struct State {
    flights: Mutex<HashMap<Key, Flight>>,
    max_entry_bytes: usize,
    /// `upstream.deadline`, for a request that arrives without a [`Deadline`] (a layer test).
    deadline: Duration,
    metrics: Arc<Metrics>,
}

impl CoalesceLayer {
    /// Shares answers up to `max_entry_bytes`; `deadline` is the call's limit when a request
    /// carries no [`Deadline`] of its own.
    pub fn new(max_entry_bytes: usize, deadline: Duration, metrics: Arc<Metrics>) -> Self {
        CoalesceLayer {
            shared: Arc::new(State {
                flights: Mutex::new(HashMap::new()),
                max_entry_bytes,
                deadline,
                metrics,
            }),
            key_headers: Arc::from([]),
        }
    }

    /// Puts these request headers in every key too: the same list as the cache's.
    pub fn key_headers(mut self, extra: Arc<[HeaderName]>) -> Self {
        self.key_headers = extra;
        self
    }
}

impl<S> tower::Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            state: self.shared.clone(),
            key_headers: self.key_headers.clone(),
        }
    }
}

/// Folds identical in-flight calls into one; see the module docs.
#[derive(Clone)]
pub struct Coalesce<S> {
    inner: S,
    state: Arc<State>,
    key_headers: Arc<[HeaderName]>,
}

impl<S> tower::Service<Request> for Coalesce<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    /// A shared fetch, or (a call that is not shared) the inner call's own future, unboxed.
    type Future = Either<BoxFuture, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Cached routes are coalesced by the cache's miss lock, above.
        let wanted = request
            .extensions()
            .get::<Arc<Route>>()
            .is_some_and(|r| r.coalesce && r.cache_ttl.is_none())
            && shareable(&request);
        let Some(spare) = wanted.then(|| body::clone_bodiless(&request)).flatten() else {
            return Either::Right(self.inner.call(request));
        };
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let key = Key::of(&request, &self.key_headers);
        let deadline = Deadline::of(&request, state.deadline);
        let route = request
            .extensions()
            .get::<Arc<Route>>()
            .map(|r| r.name.clone())
            .unwrap_or_else(|| Arc::from(crate::route::NO_ROUTE));

        let mut flights = state.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(&key).cloned() {
            drop(flights);
            state
                .metrics
                .coalesced
                .get_or_create(&RouteLabel { route })
                .inc();
            return Either::Left(Box::pin(async move {
                match deadline.run(flight).await? {
                    Outcome::Whole(answer) if answer.admits(&key, &spare) => {
                        Ok(answer.to_response(false))
                    }
                    Outcome::Failed(error) => Err(SharedError(error).into()),
                    // Too large to share, or not for this caller: it fetches for itself, in
                    // what is left of its time.
                    Outcome::Whole(_) | Outcome::TooBig => {
                        deadline.run(inner.oneshot(spare)).await?
                    }
                }
            }));
        }
        let (big_tx, big_rx) = oneshot::channel();
        let fetch = tokio::spawn(state.clone().fetch(
            inner,
            request,
            key.clone(),
            self.key_headers.clone(),
            deadline,
            big_tx,
        ));
        let flight: Flight = async move {
            fetch.await.unwrap_or_else(|e| {
                Outcome::Failed(Arc::new(format!("shared fetch ended: {e}").into()))
            })
        }
        .boxed()
        .shared();
        flights.insert(key, flight.clone());
        drop(flights);
        Either::Left(Box::pin(async move {
            match deadline.run(flight).await? {
                Outcome::Whole(answer) => Ok(answer.to_response(true)),
                Outcome::Failed(error) => Err(SharedError(error).into()),
                Outcome::TooBig => big_rx
                    .await
                    .map_err(|_| "the streamed answer was lost".into()),
            }
        }))
    }
}

/// Takes a flight out of the map however its fetch ends: answered, failed, timed out, panicked.
struct Landing {
    state: Arc<State>,
    key: Key,
}

impl Drop for Landing {
    fn drop(&mut self) {
        // Later arrivals start a new fetch.
        self.state
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

impl State {
    /// The shared fetch, in its own task: call the upstream, buffer the answer, publish it.
    async fn fetch<S>(
        self: Arc<Self>,
        inner: S,
        request: Request,
        key: Key,
        key_headers: Arc<[HeaderName]>,
        deadline: Deadline,
        big: oneshot::Sender<Response>,
    ) -> Outcome
    where
        S: tower::Service<Request, Response = Response, Error = BoxError>,
    {
        // What picks this request's variant, should the answer vary.
        let forwarded = request.headers().clone();
        let unforwarded = request
            .extensions()
            .get::<UnforwardedHeaders>()
            .map(|headers| headers.0.clone());
        let requested = SystemTime::now();
        let _landing = Landing {
            state: self.clone(),
            key: key.clone(),
        };
        // The deadline covers the body too: an upstream that sends headers and then stalls must
        // not hold every identical caller on this flight.
        let fetched = deadline
            .run(async {
                match inner.oneshot(request).await {
                    Err(error) => Outcome::Failed(Arc::new(error)),
                    Ok(response) => {
                        let received = (SystemTime::now(), tokio::time::Instant::now());
                        match body::buffer_up_to(response, self.max_entry_bytes).await {
                            Ok(Limited::Whole(mut buffered)) => {
                                let headers = &buffered.headers;
                                let cookies = headers
                                    .get_all(header::SET_COOKIE)
                                    .iter()
                                    .cloned()
                                    .collect();
                                let initial_age = initial_age(headers, requested, received.0);
                                let sharing = sharing(
                                    headers,
                                    &key,
                                    &key_headers,
                                    &forwarded,
                                    unforwarded.as_ref(),
                                );
                                buffered.keep_shareable_headers();
                                Outcome::Whole(Arc::new(Answer {
                                    buffered,
                                    cookies,
                                    initial_age,
                                    received: received.1,
                                    sharing,
                                }))
                            }
                            Ok(Limited::TooBig(response)) => {
                                let _ = big.send(response);
                                Outcome::TooBig
                            }
                            Err(error) => Outcome::Failed(Arc::new(error.into())),
                        }
                    }
                }
            })
            .await;
        fetched.unwrap_or_else(|exceeded| Outcome::Failed(Arc::new(exceeded.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;
    use tower::Layer;

    use crate::deadline::DeadlineExceeded;
    use crate::error::find_cause;

    /// Coalesce over an inner service that counts calls; each waits `delay`, then answers with
    /// a body that never ends when `stall`, else with the call number.
    fn harness(
        delay: Duration,
        stall: bool,
    ) -> (
        Coalesce<
            impl tower::Service<Request, Response = Response, Error = BoxError, Future: Send>
                + Clone
                + Send,
        >,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = tower::service_fn(move |_request: Request| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(delay).await;
                if stall {
                    let stream = futures_util::stream::pending::<
                        Result<http_body::Frame<bytes::Bytes>, body::BodyError>,
                    >();
                    let body = http_body_util::StreamBody::new(stream);
                    return Ok(Response::new(http_body_util::BodyExt::boxed_unsync(body)));
                }
                Ok::<_, BoxError>(Response::new(body::full(format!("answer {n}"))))
            }
        });
        let metrics = Arc::new(Metrics::new());
        let layer = CoalesceLayer::new(1 << 16, Duration::from_secs(60), metrics);
        (layer.layer(inner), calls)
    }

    fn request(cached: bool, deadline: Option<Duration>) -> Request {
        let mut request = http::Request::get("/v1/invoices?size=5")
            .body(body::empty())
            .unwrap();
        request.extensions_mut().insert(Arc::new(Route {
            name: "invoices".into(),
            credential: Some(crate::token::TokenSource::fixed("app")),
            cache_ttl: cached.then(|| Duration::from_secs(300)),
            stale_while_revalidate: None,
            stale_if_error: None,
            origin_cache_control: Default::default(),
            coalesce: true,
            retry: true,
        }));
        if let Some(limit) = deadline {
            request.extensions_mut().insert(Deadline::after(limit));
        }
        request
    }

    async fn send<S>(service: &S, request: Request) -> Result<String, BoxError>
    where
        S: tower::Service<Request, Response = Response, Error = BoxError> + Clone,
    {
        let response = service.clone().oneshot(request).await?;
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn identical_uncached_calls_share_one_fetch_cached_ones_are_the_caches() {
        let (service, calls) = harness(Duration::from_secs(1), false);
        let answers =
            futures_util::future::join_all((0..10).map(|_| send(&service, request(false, None))))
                .await;
        assert!(answers.iter().all(|a| a.as_deref().unwrap() == "answer 1"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // On a cached route the cache's miss lock folds calls; here each goes through.
        let answers =
            futures_util::future::join_all((0..3).map(|_| send(&service, request(true, None))))
                .await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn each_caller_waits_against_its_own_deadline() {
        // Headers after 8 s, then a body that stalls; the call's deadline is 10 s, the layer's 60 s.
        let (service, calls) = harness(Duration::from_secs(8), true);
        let started = Instant::now();
        let call_at = |arrive: u64| {
            let service = service.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(arrive)).await;
                let error = send(&service, request(false, Some(Duration::from_secs(10))))
                    .await
                    .unwrap_err();
                (error, started.elapsed())
            }
        };
        let (leader, follower) = tokio::join!(call_at(0), call_at(2));
        for (error, _) in [&leader, &follower] {
            assert!(
                find_cause::<DeadlineExceeded>(&**error).is_some(),
                "{error}"
            );
        }
        // The leader's deadline ends the shared fetch; the follower gets its outcome then.
        assert_eq!(leader.1, Duration::from_secs(10));
        assert_eq!(follower.1, Duration::from_secs(10));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_is_released_at_its_deadline_even_if_the_fetch_goes_on() {
        let (service, _calls) = harness(Duration::from_secs(30), false);
        let started = Instant::now();
        let (leader, follower) = tokio::join!(
            send(&service, request(false, Some(Duration::from_secs(40)))),
            async {
                let result = send(&service, request(false, Some(Duration::from_secs(5)))).await;
                (result, started.elapsed())
            }
        );
        assert_eq!(leader.unwrap(), "answer 1");
        assert!(follower.0.is_err());
        assert_eq!(follower.1, Duration::from_secs(5));
    }
}
