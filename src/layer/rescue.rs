//! `rescue`: turns every error from the layers inside into a response in the Partner Center error
//! shape, so no `Err` reaches hyper (which would drop the connection with no answer). It stands
//! inside `tracking`, so rescued answers carry the call's ids like any other.
//!
//! Each error type says its own status and name ([`Problem`]); rescue finds the first one it
//! knows in the error's cause chain, so a wrapper (a body error, the HTTP client's error around
//! it, a coalesced caller's shared error) needs no case of its own. Anything else is a 500.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::StatusCode;
use pin_project_lite::pin_project;

use crate::body::{BoxError, Request, Response};
use crate::deadline::DeadlineExceeded;
use crate::error::{
    problem, set_retry_after, AccessError, BadTrackingHeader, ClientBodyError, CredentialError,
    Problem, Throttled, UpstreamBodyError,
};
use crate::upstream::UpstreamError;

/// Adds [`Rescue`] around a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer;

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            unready: None,
        }
    }
}

/// Answers errors with Partner Center-shaped responses; see the module docs.
pub struct Rescue<S> {
    inner: S,
    /// The inner service failed to become ready: the next call is answered with this, and the
    /// inner service is not called (tower's contract).
    unready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Rescue {
            inner: self.inner.clone(),
            unready: None,
        }
    }
}

impl<S> tower::Service<Request> for Rescue<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.unready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => {
                self.unready = Some(error);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.unready.take() {
            Some(error) => ResponseFuture::Answered {
                response: Some(error_response(&*error)),
            },
            None => ResponseFuture::Called {
                inner: self.inner.call(request),
            },
        }
    }
}

pin_project! {
    /// Resolves to the inner response, or to the error turned into one.
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// The inner service was called.
        Called { #[pin] inner: F },
        /// Answered without calling it.
        Answered { response: Option<Response> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, BoxError>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Called { inner } => match inner.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
                Poll::Ready(Err(error)) => Poll::Ready(Ok(error_response(&*error))),
            },
            Projected::Answered { response } => Poll::Ready(Ok(response
                .take()
                .expect("a rescue future is not polled after it is ready"))),
        }
    }
}

/// The Partner Center-shaped answer for an error from inside the stack.
pub fn error_response(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Response {
    let (status, name) = classify(error);
    if status.is_server_error() {
        tracing::warn!(%status, error = %error, "call failed");
    } else {
        tracing::debug!(%status, error = %error, "call refused");
    }
    let mut response = problem(status, name, &error.to_string());
    if let Some(wait) = known_cause(error).and_then(|known| known.retry_after()) {
        set_retry_after(&mut response, wait);
    }
    response
}

/// The status and name of the first error in the cause chain that knows its own.
fn classify(error: &(dyn std::error::Error + 'static)) -> (StatusCode, &'static str) {
    match known_cause(error) {
        Some(known) => (known.status(), known.error_name()),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "GatewayError"),
    }
}

/// The first error in the cause chain that knows its own answer.
fn known_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a dyn Problem> {
    let mut next = Some(error);
    while let Some(cause) = next {
        // A shared fetch's error (a lock waiter's, a coalesced caller's) names the original as
        // its source, so it needs no case of its own.
        if let Some(known) = known_problem(cause) {
            return Some(known);
        }
        next = cause.source();
    }
    None
}

/// `error` as a [`Problem`], if it is one of the stack's error types.
fn known_problem<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a dyn Problem> {
    fn as_problem<'a, T: Problem + 'static>(
        error: &'a (dyn std::error::Error + 'static),
    ) -> Option<&'a dyn Problem> {
        error.downcast_ref::<T>().map(|e| e as &dyn Problem)
    }
    as_problem::<AccessError>(error)
        .or_else(|| as_problem::<BadTrackingHeader>(error))
        .or_else(|| as_problem::<ClientBodyError>(error))
        .or_else(|| as_problem::<DeadlineExceeded>(error))
        .or_else(|| as_problem::<CredentialError>(error))
        .or_else(|| as_problem::<UpstreamError>(error))
        .or_else(|| as_problem::<UpstreamBodyError>(error))
        .or_else(|| as_problem::<Throttled>(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    /// A service that is never ready: its `poll_ready` fails.
    #[derive(Clone)]
    struct Broken;

    impl tower::Service<Request> for Broken {
        type Response = Response;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Err(Box::new(DeadlineExceeded(
                std::time::Duration::from_secs(1),
            ))))
        }

        fn call(&mut self, _: Request) -> Self::Future {
            panic!("called although poll_ready failed");
        }
    }

    #[tokio::test]
    async fn an_inner_service_that_is_not_ready_is_answered_not_called() {
        let mut rescue = tower::Layer::layer(&RescueLayer, Broken);
        let response = rescue
            .ready()
            .await
            .unwrap()
            .call(Request::new(crate::body::empty()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn errors_are_classified_by_their_cause_chain() {
        let wrapped = crate::body::BodyError(Box::new(UpstreamError::Timeout(
            std::time::Duration::from_secs(1),
        )));
        assert_eq!(
            classify(&wrapped),
            (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout")
        );
        /// A wrapper that names its cause, as a shared fetch's error does.
        #[derive(Debug, thiserror::Error)]
        #[error("shared: {0}")]
        struct Shared(#[source] crate::body::BodyError);
        let shared = Shared(crate::body::BodyError(Box::new(ClientBodyError)));
        assert_eq!(
            classify(&shared),
            (StatusCode::BAD_REQUEST, "InvalidRequestBody")
        );
        assert_eq!(
            classify(&std::fmt::Error),
            (StatusCode::INTERNAL_SERVER_ERROR, "GatewayError")
        );
    }

    #[test]
    fn a_throttled_call_gets_429_with_retry_after_in_whole_seconds_through_any_wrapper() {
        /// A wrapper that names its cause, as a shared fetch's error does.
        #[derive(Debug, thiserror::Error)]
        #[error("shared: {0}")]
        struct Shared(#[source] Throttled);
        let wrapped = Shared(Throttled {
            cause: crate::error::ThrottleCause::Hold,
            retry_after: std::time::Duration::from_millis(2200),
        });
        let response = error_response(&wrapped);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "3");
        // Errors that know no wait get no Retry-After.
        let response = error_response(&ClientBodyError);
        assert!(!response.headers().contains_key(http::header::RETRY_AFTER));
    }
}
