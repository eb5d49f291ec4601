//! What the accept loop knows about one connection: how many calls it has begun, how many are in
//! flight (a call lasts until its response body is finished or dropped, so a long streamed answer
//! is not idle), since when it has been idle, and whether an HTTP/1 head is on its way. The
//! service wrapper and the IO wrapper ([`super::framing`]) write it; the connection's driver reads
//! it when its timer fires to decide whether to close. Nothing here wakes the driver: a call costs a
//! few uncontended atomic stores, not a task wake-up and a timer reset.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{header, HeaderValue};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::ServiceExt;

use crate::body::{Body, BodyError, Response};
use crate::call::FramedTwice;
use crate::error::AccessError;

/// No value in an `AtomicU64` slot below.
const NONE: u64 = u64::MAX;

/// Shared between a connection's driver, its service and its IO.
pub(crate) struct ConnState {
    /// When the connection was accepted; the times below count from here, in nanoseconds.
    accepted: Instant,
    /// Calls begun (the service was called).
    calls: AtomicU64,
    /// Calls whose response body has not finished yet.
    in_flight: AtomicUsize,
    /// When `in_flight` last fell to zero.
    idle_since: AtomicU64,
    /// When the HTTP/1 head now arriving began; [`NONE`] when none is.
    head_since: AtomicU64,
    /// The index of the call whose head carried both `Content-Length` and `Transfer-Encoding`.
    conflict: AtomicU64,
    /// How many reads and writes have moved bytes on the socket, either way (the driver samples it
    /// to learn whether anything moved since it last looked).
    moves: AtomicU64,
}

impl ConnState {
    /// A connection accepted now.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnState {
            accepted: Instant::now(),
            calls: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            conflict: AtomicU64::new(NONE),
            moves: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_nanos()).unwrap_or(NONE - 1)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.accepted + std::time::Duration::from_nanos(nanos)
    }

    /// When the connection was accepted.
    pub(crate) fn accepted(&self) -> Instant {
        self.accepted
    }

    /// Whether any call has begun.
    pub(crate) fn has_calls(&self) -> bool {
        self.calls.load(Ordering::SeqCst) > 0
    }

    /// Whether a call is in flight.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Bytes moved on the socket (read or written) just now.
    pub(crate) fn moved(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times bytes have moved on the socket so far.
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// When the connection last fell idle (read only when it is not [`busy`](Self::busy)).
    pub(crate) fn idle_since(&self) -> Instant {
        self.at(self.idle_since.load(Ordering::SeqCst))
    }

    /// When the HTTP/1 head now arriving began, if one is.
    pub(crate) fn head_since(&self) -> Option<Instant> {
        match self.head_since.load(Ordering::SeqCst) {
            NONE => None,
            nanos => Some(self.at(nanos)),
        }
    }

    /// The first byte of an HTTP/1 head arrived.
    pub(crate) fn head_started(&self) {
        self.head_since.store(self.now(), Ordering::SeqCst);
    }

    /// An HTTP/1 head is complete; `conflict` if it was framed two ways.
    pub(crate) fn head_done(&self, index: u64, conflict: bool) {
        self.head_since.store(NONE, Ordering::SeqCst);
        if conflict {
            let _ = self
                .conflict
                .compare_exchange(NONE, index, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// The IO stopped watching heads (HTTP/2, or a head hyper refuses): none is timed as ours.
    pub(crate) fn head_abandoned(&self) {
        self.head_since.store(NONE, Ordering::SeqCst);
    }

    /// A call begins: returns its index and the guard that keeps it in flight.
    fn begin(self: &Arc<Self>) -> (u64, InFlight) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let index = self.calls.fetch_add(1, Ordering::SeqCst);
        (index, InFlight(self.clone()))
    }
}

/// Keeps one call in flight until dropped (with the response body, or with the call's future if
/// the caller went away first).
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        // Stamped before the count falls, so whoever sees zero also sees a fresh time.
        state.idle_since.fetch_max(state.now(), Ordering::SeqCst);
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The service hyper calls on one connection: the shared stack, plus the in-flight count and
/// requests framed two ways (refused here or by the service; the connection then closes).
pub(crate) struct ConnService<S> {
    /// The connection's own copy of the stack. Borrowed only inside `call`, never across an
    /// await, so a borrow never finds it taken.
    inner: RefCell<S>,
    state: Arc<ConnState>,
    /// `ServeOptions::service_refuses_framed_twice`.
    service_refuses: bool,
}

impl<S> ConnService<S> {
    /// Wraps the shared service for one connection; `service_refuses`: the service refuses a
    /// request marked [`FramedTwice`] itself.
    pub(crate) fn new(inner: S, state: Arc<ConnState>, service_refuses: bool) -> Self {
        ConnService {
            inner: RefCell::new(inner),
            state,
            service_refuses,
        }
    }
}

impl<S> ConnService<S>
where
    S: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible> + Clone,
{
    /// Calls the connection's copy of the stack when it is ready at once, as every layer's
    /// `poll_ready` is (none holds calls back there), without cloning the stack for the call;
    /// else a clone of it, readied in the call's future as tower's contract asks (`oneshot`).
    fn start(&self, request: http::Request<Incoming>) -> Call<S, http::Request<Incoming>> {
        let mut inner = self.inner.borrow_mut();
        match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Call::Ready {
                future: inner.call(request),
            },
            Poll::Ready(Err(never)) => match never {},
            // The polled copy goes with the call (any place it holds in a queue goes too), and a
            // fresh clone stays for the next call.
            Poll::Pending => {
                let fresh = inner.clone();
                Call::Readying {
                    oneshot: std::mem::replace(&mut *inner, fresh).oneshot(request),
                }
            }
        }
    }
}

impl<S> hyper::service::Service<http::Request<Incoming>> for ConnService<S>
where
    S: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible> + Clone,
{
    type Response = http::Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S, http::Request<Incoming>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        let (index, guard) = self.state.begin();
        // Framed two ways: refused (400), and the connection closes after the answer, since the
        // two framings disagree on where the next request starts.
        let close = self.state.conflict.load(Ordering::SeqCst) == index;
        let call = if close && !self.service_refuses {
            Call::Refused {
                response: Some(framed_twice()),
            }
        } else {
            if close {
                request.extensions_mut().insert(FramedTwice);
            }
            self.start(request)
        };
        ResponseFuture {
            call,
            guard: Some(guard),
            close,
        }
    }
}

/// The connection's own 400 for a request framed two ways (the admin port's, the sandbox's):
/// marked `no-store`, as every admin answer is.
fn framed_twice() -> Response {
    let mut response = crate::error::respond(&AccessError::FramedTwice);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pin_project! {
    #[project = CallProj]
    enum Call<S: tower::Service<R>, R> {
        Ready { #[pin] future: S::Future },
        Readying { #[pin] oneshot: Oneshot<S, R> },
        Refused { response: Option<Response> },
    }
}

pin_project! {
    /// The stack's response, its body carrying the call's in-flight guard.
    pub(crate) struct ResponseFuture<S: tower::Service<R>, R> {
        #[pin]
        call: Call<S, R>,
        guard: Option<InFlight>,
        // The connection closes after this answer.
        close: bool,
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: tower::Service<R, Response = Response, Error = Infallible>,
{
    type Output = Result<http::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.call.project() {
            CallProj::Ready { future } => match future.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
            },
            CallProj::Readying { oneshot } => match oneshot.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
            },
            CallProj::Refused { response } => response
                .take()
                .unwrap_or_else(|| Response::new(crate::body::empty())),
        };
        if *this.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            body,
            _guard: guard,
        })))
    }
}

/// A response body that keeps its call in flight until it is finished or dropped.
pub(crate) struct TrackedBody {
    body: Body,
    _guard: Option<InFlight>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Finished: no longer in flight, even if hyper keeps the body a while.
            self._guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
