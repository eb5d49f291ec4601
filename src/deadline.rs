//! The call's deadline (`upstream.deadline`): computed once as the call enters, carried in the
//! request's extensions, and waited against by every layer that waits (retry backoff, miss-lock
//! and coalescing waiters, a body read to store or share, and a body streamed to the caller, as
//! tower-http's `TimeoutBody` does). One clock, so no layer can restart the count.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::body::{Body, BodyError};

/// The call ran out of time (504).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the call did not finish within {0:?} (upstream.deadline), retries included")]
pub struct DeadlineExceeded(pub Duration);

impl crate::error::Problem for DeadlineExceeded {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::GATEWAY_TIMEOUT
    }

    fn error_name(&self) -> &'static str {
        "DeadlineExceeded"
    }
}

/// When the call must be over: an instant on tokio's clock, and the configured limit it came
/// from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    /// The deadline in `request`'s extensions, or `limit` from now for a request that came in
    /// without one (a layer's own tests, a background refresh).
    pub fn of<B>(request: &http::Request<B>, limit: Duration) -> Deadline {
        request
            .extensions()
            .get::<Deadline>()
            .copied()
            .unwrap_or_else(|| Deadline::after(limit))
    }

    /// The instant itself.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// What is left of it (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The error for this deadline.
    pub fn exceeded(&self) -> DeadlineExceeded {
        DeadlineExceeded(self.limit)
    }

    /// Runs `future` until the deadline.
    pub async fn run<F: Future>(&self, future: F) -> Result<F::Output, DeadlineExceeded> {
        tokio::time::timeout_at(self.at, future)
            .await
            .map_err(|_| self.exceeded())
    }

    /// Bounds `body` by the deadline: past it the body fails with [`DeadlineExceeded`]. A body
    /// that is already complete is left as it is.
    pub fn bound(&self, body: Body) -> Body {
        if body.is_end_stream() {
            return body;
        }
        DeadlineBody {
            inner: body,
            at: self.at,
            sleep: None,
            limit: self.limit,
        }
        .boxed_unsync()
    }
}

pin_project! {
    /// A body that fails with [`DeadlineExceeded`] once the call's deadline passes. Its timer is
    /// set only when the body first waits: a body whose frames are ready (a buffered answer, the
    /// usual small one) is checked against the clock instead, and never touches the timer wheel.
    struct DeadlineBody {
        #[pin]
        inner: Body,
        at: Instant,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        limit: Duration,
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        let exceeded = |limit: &Duration| {
            Poll::Ready(Some(Err(BodyError(Box::new(DeadlineExceeded(*limit))))))
        };
        // The clock first: an endless body that is always ready must still be cut.
        if Instant::now() >= *this.at {
            return exceeded(this.limit);
        }
        let frame = this.inner.poll_frame(cx);
        if frame.is_pending() {
            // Waiting: the timer wakes this body at the deadline if no frame comes first.
            if this.sleep.as_mut().as_pin_mut().is_none() {
                this.sleep.set(Some(tokio::time::sleep_until(*this.at)));
            }
            if let Some(sleep) = this.sleep.as_pin_mut() {
                if sleep.poll(cx).is_ready() {
                    return exceeded(this.limit);
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_still_streaming_at_the_deadline_fails() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let (tx, body) = {
            let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
            let stream = futures_util::stream::unfold(receiver, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, BodyError>(Frame::data(b)), rx))
            });
            (
                sender,
                http_body_util::StreamBody::new(stream).boxed_unsync(),
            )
        };
        let mut body = deadline.bound(body);
        tx.send(Bytes::from_static(b"first")).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        // Nothing more arrives; the deadline passes.
        let next = body.frame().await.unwrap();
        let error = next.unwrap_err();
        assert!(error.0.downcast_ref::<DeadlineExceeded>().is_some());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_always_ready_is_still_cut_at_the_deadline() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, BodyError>(Frame::data(Bytes::from_static(b"more")))
        });
        let mut body = deadline.bound(http_body_util::StreamBody::new(endless).boxed_unsync());
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "more");
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        // The body is still ready, frame after frame: the clock cuts it, no timer is waited on.
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.0.downcast_ref::<DeadlineExceeded>().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_the_same_however_often_it_is_read() {
        let request = {
            let mut request = http::Request::new(());
            request
                .extensions_mut()
                .insert(Deadline::after(Duration::from_secs(10)));
            request
        };
        let first = Deadline::of(&request, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(4)).await;
        let second = Deadline::of(&request, Duration::from_secs(60));
        assert_eq!(first.at(), second.at());
        assert_eq!(second.remaining(), Duration::from_secs(6));
        let late = second.run(tokio::time::sleep(Duration::from_secs(7))).await;
        assert!(late.is_err());
    }
}
