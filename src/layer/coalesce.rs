//! `coalesce`: identical calls in flight at the same time share one upstream call, on uncached
//! routes with `coalesce = true` (on a cached route the cache's miss lock does this, and stores
//! the answer once). "Identical" is the cache [`Key`]. Nothing is stored here.
//!
//! The shared fetch runs in its own task, so a first caller that hangs up does not fail the others;
//! each caller waits against its own [`Deadline`], and the fetch against its first caller's. The
//! answer is buffered to be shared; one larger than `cache.max_entry_bytes` is not: it streams to
//! the caller that started the fetch, and the others go on their own.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{FutureExt, Shared};
use http::HeaderName;
use tokio::sync::oneshot;
use tower::ServiceExt;

use crate::body::{self, BoxError, BoxFuture, Buffered, Limited, Request, Response};
use crate::deadline::Deadline;
/// The shared fetch failed: the cache's miss lock and this layer report it alike.
pub use crate::layer::cache::SharedError;
use crate::layer::cache::{shareable, Key};
use crate::metrics::{Metrics, RouteLabel};
use crate::route::Route;

/// What a shared fetch came to.
#[derive(Clone)]
enum Outcome {
    /// The whole answer, for everyone.
    Whole(Arc<Buffered>),
    /// Too large to share: it went to the caller that started the fetch.
    TooBig,
    /// The fetch failed.
    Failed(Arc<BoxError>),
}

type Flight = Shared<Pin<Box<dyn Future<Output = Outcome> + Send>>>;

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
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> BoxFuture {
        // Cached routes are coalesced by the cache's miss lock, above.
        let wanted = request
            .extensions()
            .get::<Arc<Route>>()
            .is_some_and(|r| r.coalesce && r.cache_ttl.is_none())
            && shareable(&request);
        let Some(spare) = body::clone_bodiless(&request).filter(|_| wanted) else {
            return Box::pin(self.inner.call(request));
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
            .unwrap_or_else(|| Arc::from(""));

        let mut flights = state.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(&key).cloned() {
            drop(flights);
            state
                .metrics
                .coalesced
                .get_or_create(&RouteLabel { route })
                .inc();
            return Box::pin(async move {
                match deadline.run(flight).await? {
                    Outcome::Whole(buffered) => Ok(buffered.to_response()),
                    Outcome::Failed(error) => Err(SharedError(error).into()),
                    // Too large to share: this caller fetches for itself, in what is left of its time.
                    Outcome::TooBig => deadline.run(inner.oneshot(spare)).await?,
                }
            });
        }
        let (big_tx, big_rx) = oneshot::channel();
        let fetch =
            tokio::spawn(
                state
                    .clone()
                    .fetch(inner, request, key.clone(), deadline, big_tx),
            );
        let flight: Flight = async move {
            fetch.await.unwrap_or_else(|e| {
                Outcome::Failed(Arc::new(format!("shared fetch ended: {e}").into()))
            })
        }
        .boxed()
        .shared();
        flights.insert(key, flight.clone());
        drop(flights);
        Box::pin(async move {
            match deadline.run(flight).await? {
                Outcome::Whole(buffered) => Ok(buffered.to_response()),
                Outcome::Failed(error) => Err(SharedError(error).into()),
                Outcome::TooBig => big_rx
                    .await
                    .map_err(|_| "the streamed answer was lost".into()),
            }
        })
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
        deadline: Deadline,
        big: oneshot::Sender<Response>,
    ) -> Outcome
    where
        S: tower::Service<Request, Response = Response, Error = BoxError>,
    {
        let _landing = Landing {
            state: self.clone(),
            key,
        };
        // The deadline covers the body too: an upstream that sends headers and then stalls must
        // not hold every identical caller on this flight.
        let fetched = deadline
            .run(async {
                match inner.oneshot(request).await {
                    Err(error) => Outcome::Failed(Arc::new(error)),
                    Ok(response) => {
                        match body::buffer_up_to(response, self.max_entry_bytes).await {
                            Ok(Limited::Whole(mut buffered)) => {
                                buffered.keep_shareable_headers();
                                Outcome::Whole(Arc::new(buffered))
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
