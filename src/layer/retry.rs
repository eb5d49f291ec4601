//! `retry`: one deadline for the whole call, and, on routes with `retry = true`, retries of
//! transient failures: the statuses in `retry.statuses`, connect errors and attempt timeouts.
//!
//! - Delay: full jitter, a random time in `[0, min(max_delay, base_delay * 2^n)]` for retry n.
//! - `Retry-After` (delta-seconds or HTTP-date) on 429 and 503 replaces the backoff when it is
//!   within `max_retry_after` and the deadline; otherwise the upstream's answer goes back at once.
//!   A 429 is retried only with a `Retry-After` (Partner Center's throttling guidance, reference §2.4).
//! - A budget shared by every call (tower's `TpsBudget`): retries may add `budget_ratio` of recent
//!   calls, but always `budget_min_per_second`. When it is spent the upstream's last answer goes
//!   back and the exhaustion is counted.
//! - Only `GET` and `HEAD` without a body are retried; a response is handed on only when no retry
//!   will follow, so a body that has started streaming to the caller is never retried.
//! - Every attempt carries the same `MS-RequestId`; the upstream client increments `MS-CV`.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, Method, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::body::{BoxError, BoxFuture, Request, Response, Spare};
use crate::deadline::Deadline;
use crate::metrics::Metrics;
use crate::route::Route;
use crate::upstream::UpstreamError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// How long the budget remembers calls.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Why an attempt is retried (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// The upstream answered a status in `retry.statuses`.
    Status,
    /// 429 with `Retry-After`.
    Throttled,
    /// Connect refused or failed.
    Connect,
    /// No response headers within `attempt_timeout`.
    Timeout,
}

impl RetryReason {
    /// Every reason, for exporting each at zero.
    pub const ALL: [RetryReason; 4] = [
        RetryReason::Status,
        RetryReason::Throttled,
        RetryReason::Connect,
        RetryReason::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Status => "status",
            RetryReason::Throttled => "throttled",
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
        }
    }
}

impl prometheus_client::encoding::EncodeLabelValue for RetryReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// `{reason}` of `pcgate_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: RetryReason,
}

/// The retry layer's metric families, registered by the layer itself.
struct RetryMetrics {
    /// `pcgate_retries_total{reason}`.
    retries: Family<ReasonLabel, Counter>,
    /// `pcgate_retry_budget_exhausted_total`.
    budget_exhausted: Counter,
}

impl RetryMetrics {
    fn register(metrics: &Metrics) -> RetryMetrics {
        let retries = Family::<ReasonLabel, Counter>::default();
        for reason in RetryReason::ALL {
            let _ = retries.get_or_create(&ReasonLabel { reason });
        }
        let budget_exhausted = Counter::default();
        metrics.register("retries", "Upstream retries, by reason", retries.clone());
        metrics.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            budget_exhausted.clone(),
        );
        RetryMetrics {
            retries,
            budget_exhausted,
        }
    }
}

/// The retry layer's own settings.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff base.
    pub base_delay: Duration,
    /// Backoff cap.
    pub max_delay: Duration,
    /// Statuses that are retried.
    pub statuses: HashSet<u16>,
    /// A longer `Retry-After` is not waited for.
    pub max_retry_after: Duration,
    /// Retries may add at most this share to upstream traffic...
    pub budget_ratio: f64,
    /// ...but always this many a second.
    pub budget_min_per_second: u32,
    /// The whole call's time limit.
    pub deadline: Duration,
}

impl RetrySettings {
    /// From `[retry]` and `upstream.deadline`.
    pub fn new(retry: &crate::config::RetryConfig, deadline: Duration) -> Self {
        RetrySettings {
            max_attempts: retry.max_attempts.max(1),
            base_delay: retry.base_delay,
            max_delay: retry.max_delay,
            statuses: retry.statuses.iter().copied().collect(),
            max_retry_after: retry.max_retry_after,
            budget_ratio: retry.budget_ratio,
            budget_min_per_second: retry.budget_min_per_second,
            deadline,
        }
    }

    /// Full jitter for retry `n` (0-based): uniform in `[0, min(max_delay, base * 2^n)]`.
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << n.min(20))
            .min(self.max_delay);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Adds [`Retry`] in front of a service.
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

struct Shared {
    settings: RetrySettings,
    budget: TpsBudget,
    metrics: RetryMetrics,
}

impl RetryLayer {
    /// Uses these settings, and registers its metrics in `metrics`; the budget is shared by
    /// every clone.
    pub fn new(settings: RetrySettings, metrics: &Metrics) -> Self {
        let budget = TpsBudget::new(
            BUDGET_WINDOW,
            settings.budget_min_per_second,
            settings.budget_ratio as f32,
        );
        RetryLayer {
            shared: Arc::new(Shared {
                settings,
                budget,
                metrics: RetryMetrics::register(metrics),
            }),
        }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Bounds the call by the deadline and retries transient failures; see the module docs.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<Request> for Retry<S>
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
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let deadline = Deadline::of(&request, shared.settings.deadline);
            match deadline
                .run(shared.run(inner, request, deadline.at()))
                .await
            {
                // The deadline covers the body too: a body that stalls or never ends is cut
                // when it passes.
                Ok(Ok(response)) => Ok(response.map(|b| deadline.bound(b))),
                Ok(Err(error)) => Err(error),
                Err(exceeded) => Err(exceeded.into()),
            }
        })
    }
}

/// What to do after an attempt.
enum Next {
    /// Hand this outcome to the caller.
    Done,
    /// Wait, then try again.
    RetryAfter(Duration, RetryReason),
}

impl Shared {
    async fn run<S>(
        &self,
        mut inner: S,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, BoxError>
    where
        S: tower::Service<Request, Response = Response, Error = BoxError>,
    {
        let retryable = request
            .extensions()
            .get::<Arc<Route>>()
            .is_some_and(|r| r.retry)
            && matches!(*request.method(), Method::GET | Method::HEAD);
        // One copy of the request, for every further attempt and for the credential layer's 401
        // replay inside each attempt.
        let spare = if retryable { Spare::of(&request) } else { None };
        let mut request = request;
        if let Some(spare) = &spare {
            request.extensions_mut().insert(spare.clone());
        }
        self.budget.deposit();
        let mut attempt: u32 = 1;
        loop {
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            let outcome = inner.call(request).await;
            let next = match (&spare, &outcome) {
                (Some(_), _) if attempt < self.settings.max_attempts => {
                    self.next(&outcome, attempt, deadline)
                }
                _ => Next::Done,
            };
            let (delay, reason) = match next {
                Next::Done => return outcome,
                Next::RetryAfter(delay, reason) => (delay, reason),
            };
            if !self.budget.withdraw() {
                self.metrics.budget_exhausted.inc();
                tracing::warn!(
                    attempt,
                    reason = reason.as_str(),
                    "retry budget spent: answering with the last outcome"
                );
                return outcome;
            }
            self.metrics
                .retries
                .get_or_create(&ReasonLabel { reason })
                .inc();
            tracing::info!(
                attempt,
                reason = reason.as_str(),
                delay_ms = delay.as_millis() as u64,
                status = outcome.as_ref().ok().map(|r| r.status().as_u16()),
                "retrying"
            );
            // The answer we are not giving is dropped (its connection is closed, not reused).
            drop(outcome);
            tokio::time::sleep(delay).await;
            let spare = spare.as_ref().expect("checked above");
            request = spare.request();
            request.extensions_mut().insert(spare.clone());
            attempt += 1;
        }
    }

    fn next(&self, outcome: &Result<Response, BoxError>, attempt: u32, deadline: Instant) -> Next {
        let (reason, retry_after) = match outcome {
            Ok(response) => {
                let status = response.status();
                let retry_after = match status {
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                        retry_after(response.headers(), SystemTime::now())
                    }
                    _ => None,
                };
                if status == StatusCode::TOO_MANY_REQUESTS {
                    match retry_after {
                        Some(_) => (RetryReason::Throttled, retry_after),
                        None => return Next::Done,
                    }
                } else if self.settings.statuses.contains(&status.as_u16()) {
                    (RetryReason::Status, retry_after)
                } else {
                    return Next::Done;
                }
            }
            Err(error) => match error.downcast_ref::<UpstreamError>() {
                Some(UpstreamError::Connect(_)) => (RetryReason::Connect, None),
                Some(UpstreamError::Timeout(_)) => (RetryReason::Timeout, None),
                _ => return Next::Done,
            },
        };
        let delay = match retry_after {
            Some(wait) if wait > self.settings.max_retry_after => return Next::Done,
            Some(wait) => wait,
            None => self.settings.backoff(attempt - 1),
        };
        if Instant::now() + delay >= deadline {
            return Next::Done;
        }
        Next::RetryAfter(delay, reason)
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3); `None` if absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use std::sync::Mutex;
    use tower::{Layer, Service, ServiceExt};

    /// One scripted upstream answer: a status with an optional Retry-After, or a connect error.
    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16, Option<&'static str>),
        ConnectError,
        Hang,
    }

    /// A retry layer over a scripted inner service that records when each attempt came.
    #[allow(clippy::type_complexity)]
    fn harness(
        settings: RetrySettings,
        script: Vec<Answer>,
    ) -> (
        impl Service<Request, Response = Response, Error = BoxError>,
        Arc<Mutex<Vec<Instant>>>,
        RetryLayer,
    ) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let script = Arc::new(script);
        let inner = tower::service_fn(move |_request: Request| {
            let (calls, script) = (seen.clone(), script.clone());
            async move {
                let n = {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now());
                    calls.len() - 1
                };
                match script.get(n).or(script.last()).copied().unwrap() {
                    Answer::Status(status, retry_after) => {
                        let mut response = Response::new(body::empty());
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some(value) = retry_after {
                            response
                                .headers_mut()
                                .insert(header::RETRY_AFTER, value.parse().unwrap());
                        }
                        Ok(response)
                    }
                    Answer::ConnectError => Err(UpstreamError::Connect("refused".into()).into()),
                    Answer::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        unreachable!("the deadline ends the call first")
                    }
                }
            }
        });
        let layer = RetryLayer::new(settings, &Metrics::new());
        (layer.layer(inner), calls, layer)
    }

    fn get(retry: bool) -> Request {
        let mut request = Request::new(body::empty());
        request.extensions_mut().insert(Arc::new(Route {
            name: "test".into(),
            credential: None,
            cache_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            origin_cache_control: Default::default(),
            coalesce: false,
            retry,
        }));
        request
    }

    async fn call(
        service: &mut impl Service<Request, Response = Response, Error = BoxError>,
        request: Request,
    ) -> Result<Response, BoxError> {
        service.ready().await?.call(request).await
    }

    fn gaps(calls: &Mutex<Vec<Instant>>) -> Vec<Duration> {
        calls
            .lock()
            .unwrap()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn two_500s_then_200_waits_twice_within_the_jitter_bounds() {
        let s = settings();
        let (base, max) = (s.base_delay, s.max_delay);
        for _ in 0..20 {
            let (mut service, calls, metrics) = harness(
                settings(),
                vec![
                    Answer::Status(500, None),
                    Answer::Status(500, None),
                    Answer::Status(200, None),
                ],
            );
            let response = call(&mut service, get(true)).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(calls.lock().unwrap().len(), 3, "three attempts");
            let gaps = gaps(&calls);
            assert_eq!(gaps.len(), 2);
            assert!(gaps[0] <= base, "{gaps:?}");
            assert!(gaps[1] <= (base * 2).min(max), "{gaps:?}");
            let retried = metrics
                .shared
                .metrics
                .retries
                .get_or_create(&ReasonLabel {
                    reason: RetryReason::Status,
                })
                .get();
            assert_eq!(retried, 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn always_500_gives_max_attempts_then_the_500() {
        let (mut service, calls, _) = harness(settings(), vec![Answer::Status(500, None)]);
        let response = call(&mut service, get(true)).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(
            calls.lock().unwrap().len(),
            settings().max_attempts as usize
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_within_the_limit_and_not_beyond() {
        let (mut service, calls, _) = harness(
            settings(),
            vec![Answer::Status(429, Some("2")), Answer::Status(200, None)],
        );
        assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 200);
        assert_eq!(gaps(&calls), [Duration::from_secs(2)]);

        let (mut service, calls, _) = harness(
            settings(),
            vec![Answer::Status(503, Some("3600")), Answer::Status(200, None)],
        );
        let started = Instant::now();
        assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 503);
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A 429 without Retry-After is not retried: the caller is told to slow down.
        let (mut service, calls, _) = harness(
            settings(),
            vec![Answer::Status(429, None), Answer::Status(200, None)],
        );
        assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 429);
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_are_retried() {
        let (mut service, calls, metrics) = harness(
            settings(),
            vec![Answer::ConnectError, Answer::Status(200, None)],
        );
        assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 200);
        assert_eq!(calls.lock().unwrap().len(), 2);
        assert_eq!(
            metrics
                .shared
                .metrics
                .retries
                .get_or_create(&ReasonLabel {
                    reason: RetryReason::Connect
                })
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_call() {
        let s = RetrySettings {
            deadline: Duration::from_secs(5),
            ..settings()
        };
        let (mut service, _, _) = harness(s, vec![Answer::Hang]);
        let started = Instant::now();
        let error = call(&mut service, get(false)).await.unwrap_err();
        assert!(error
            .downcast_ref::<crate::deadline::DeadlineExceeded>()
            .is_some());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_would_pass_the_deadline_is_not_made() {
        let s = RetrySettings {
            deadline: Duration::from_secs(3),
            ..settings()
        };
        let (mut service, calls, _) = harness(
            s,
            vec![Answer::Status(503, Some("5")), Answer::Status(200, None)],
        );
        assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 503);
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_without_retry_and_requests_with_bodies_are_not_retried() {
        let (mut service, calls, _) = harness(
            settings(),
            vec![Answer::Status(500, None), Answer::Status(200, None)],
        );
        assert_eq!(call(&mut service, get(false)).await.unwrap().status(), 500);
        assert_eq!(calls.lock().unwrap().len(), 1);
        let (mut service, calls, _) = harness(
            settings(),
            vec![Answer::Status(500, None), Answer::Status(200, None)],
        );
        let mut post = get(true);
        *post.method_mut() = Method::POST;
        assert_eq!(call(&mut service, post).await.unwrap().status(), 500);
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_retries_growing_with_traffic() {
        let s = RetrySettings {
            budget_min_per_second: 1,
            budget_ratio: 0.1,
            ..settings()
        };
        let (mut service, calls, metrics) = harness(s, vec![Answer::Status(500, None)]);
        for _ in 0..300 {
            assert_eq!(call(&mut service, get(true)).await.unwrap().status(), 500);
        }
        let attempts = calls.lock().unwrap().len();
        let retries = attempts - 300;
        // Unbudgeted: 300 calls × 3 retries = 900. Budgeted: the reserve (1/s over the 10 s
        // window) plus 10% of the calls, give or take the window sliding under paused time.
        assert!(retries < 150, "{retries} retries for 300 calls");
        assert!(metrics.shared.metrics.budget_exhausted.get() > 100);
    }

    fn settings() -> RetrySettings {
        RetrySettings::new(
            &crate::config::RetryConfig::default(),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn full_jitter_stays_within_its_ceiling() {
        let s = settings();
        for n in 0..10 {
            let ceiling = (s.base_delay * 2u32.pow(n)).min(s.max_delay);
            for _ in 0..200 {
                assert!(s.backoff(n) <= ceiling);
            }
        }
        // Spread out, not fixed: 200 draws at n = 3 are not all alike.
        let draws: HashSet<u128> = (0..200).map(|_| s.backoff(3).as_micros()).collect();
        assert!(draws.len() > 100);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, SystemTime::now()), None);
        headers.insert(header::RETRY_AFTER, "57".parse().unwrap());
        assert_eq!(
            retry_after(&headers, SystemTime::now()),
            Some(Duration::from_secs(57))
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        headers.insert(header::RETRY_AFTER, later.parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(120)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        headers.insert(header::RETRY_AFTER, past.parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
    }
}
