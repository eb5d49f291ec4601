//! `credential`: sends the route's service credential upstream. The caller's `Authorization` was
//! removed by `access`; this layer injects `Bearer <token>` from the route's
//! [`TokenSource`](crate::token::TokenSource), resolved when the route table was built. On an
//! upstream 401 it asks the source for a different token (one refresh, shared with every other
//! call that saw the same 401) and replays the call once.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, StatusCode};

use crate::body::{self, BoxError, BoxFuture, Request, Response, Spare};
pub use crate::error::CredentialError;
use crate::route::Route;

/// Adds [`Credential`] in front of a service.
#[derive(Clone, Debug, Default)]
pub struct CredentialLayer;

impl CredentialLayer {
    /// Sends each route's own token source's token.
    pub fn new() -> Self {
        CredentialLayer
    }
}

impl<S> tower::Layer<S> for CredentialLayer {
    type Service = Credential<S>;

    fn layer(&self, inner: S) -> Credential<S> {
        Credential { inner }
    }
}

/// Injects the route's bearer token; see the module docs.
#[derive(Clone, Debug)]
pub struct Credential<S> {
    inner: S,
}

impl<S> tower::Service<Request> for Credential<S>
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

    fn call(&mut self, mut request: Request) -> Self::Future {
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let source = request
            .extensions()
            .get::<Arc<Route>>()
            .and_then(|route| route.credential.clone());
        Box::pin(async move {
            let Some(source) = source else {
                return inner.call(request).await;
            };
            let token = source.token().await.map_err(CredentialError::from)?;
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, token.header());
            // Retry's copy of the request when it keeps one, else a copy of our own.
            let spare = request.extensions().get::<Spare>().cloned();
            let copy = if spare.is_some() {
                None
            } else {
                body::clone_bodiless(&request)
            };
            let response = inner.call(request).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let Some(mut replay) = copy.or_else(|| spare.map(|spare| spare.request())) else {
                return Ok(response);
            };
            match source.replace(&token).await {
                Ok(fresh) => {
                    tracing::info!(
                        credential = source.name(),
                        "upstream refused the token (401): replaying once with a new one"
                    );
                    replay
                        .headers_mut()
                        .insert(header::AUTHORIZATION, fresh.header());
                    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                    inner.call(replay).await
                }
                // No other token to try: the upstream's own 401 is the truest answer.
                Err(e) => {
                    tracing::warn!(credential = source.name(), error = %e, "upstream refused the token (401) and no new one could be had");
                    Ok(response)
                }
            }
        })
    }
}
