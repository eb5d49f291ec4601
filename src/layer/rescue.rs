//! `rescue`: the outermost layer. Turns every error from the layers inside into a response in the
//! Partner Center error shape, so no `Err` reaches hyper (which would drop the connection with no
//! answer). The mapping from error to status lives here and only here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::StatusCode;
use pin_project_lite::pin_project;

use crate::body::{BoxError, ClientBodyError, Request, Response, UpstreamBodyError};
use crate::deadline::DeadlineExceeded;
use crate::error::{find_cause, problem};
use crate::layer::access::AccessError;
use crate::layer::coalesce::SharedError;
use crate::layer::credential::CredentialError;
use crate::layer::tracking::{BadTrackingHeader, Tracked};
use crate::upstream::UpstreamError;

/// Adds [`Rescue`] around a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer;

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue { inner }
    }
}

/// Answers errors with Partner Center-shaped responses; see the module docs.
#[derive(Clone, Debug)]
pub struct Rescue<S> {
    inner: S,
}

impl<S> tower::Service<Request> for Rescue<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A layer that is not ready with an error is answered per call, below.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Resolves to the inner response, or to the error turned into one.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, BoxError>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
            Poll::Ready(Err(error)) => Poll::Ready(Ok(match error.downcast::<Tracked>() {
                Ok(tracked) => {
                    let mut response = error_response(&*tracked.source);
                    tracked.tracking.stamp(response.headers_mut());
                    response
                }
                Err(error) => error_response(&*error),
            })),
        }
    }
}

/// The status, error name and description for an error from inside the stack.
pub fn error_response(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Response {
    let (status, name) = classify(error);
    if status.is_server_error() {
        tracing::warn!(%status, error = %error, "call failed");
    } else {
        tracing::debug!(%status, error = %error, "call refused");
    }
    problem(status, name, &error.to_string())
}

fn classify(error: &(dyn std::error::Error + Send + Sync + 'static)) -> (StatusCode, &'static str) {
    // Walk the cause chain for each kind, most specific first: an error wrapped in a body error
    // or in the client's error is still the error it was.
    let error: &(dyn std::error::Error + 'static) = error;
    // A coalesced caller gets the shared fetch's error: classify what it points at.
    if let Some(SharedError(shared)) = find_cause::<SharedError>(error) {
        return classify(&***shared);
    }
    if let Some(e) = find_cause::<AccessError>(error) {
        return match e {
            AccessError::BadPath(_) => (StatusCode::BAD_REQUEST, "InvalidPath"),
            AccessError::NoRoute { .. } => (StatusCode::FORBIDDEN, "RouteNotAllowed"),
            AccessError::BadKey => (StatusCode::UNAUTHORIZED, "InvalidApiKey"),
            AccessError::Host(crate::host::HostError::Misdirected(_)) => {
                (StatusCode::MISDIRECTED_REQUEST, "MisdirectedRequest")
            }
            AccessError::Host(crate::host::HostError::ForeignOrigin(_)) => {
                (StatusCode::FORBIDDEN, "ForeignOrigin")
            }
        };
    }
    if find_cause::<BadTrackingHeader>(error).is_some() {
        return (StatusCode::BAD_REQUEST, "InvalidTrackingHeader");
    }
    if find_cause::<ClientBodyError>(error).is_some() {
        return (StatusCode::BAD_REQUEST, "InvalidRequestBody");
    }
    if find_cause::<DeadlineExceeded>(error).is_some() {
        return (StatusCode::GATEWAY_TIMEOUT, "DeadlineExceeded");
    }
    if find_cause::<CredentialError>(error).is_some() {
        return (StatusCode::SERVICE_UNAVAILABLE, "NoValidCredential");
    }
    if let Some(e) = find_cause::<UpstreamError>(error) {
        return match e {
            UpstreamError::Connect(_) => (StatusCode::BAD_GATEWAY, "UpstreamUnreachable"),
            UpstreamError::Protocol(_) => (StatusCode::BAD_GATEWAY, "UpstreamFailed"),
            UpstreamError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout"),
        };
    }
    if find_cause::<UpstreamBodyError>(error).is_some() {
        return (StatusCode::BAD_GATEWAY, "UpstreamFailed");
    }
    (StatusCode::INTERNAL_SERVER_ERROR, "GatewayError")
}
