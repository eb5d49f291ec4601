//! `tracking`: the Partner Center tracking headers (reference §1.1–1.4), kept right for every app.
//!
//! - `MS-RequestId`: the caller's if it is a GUID, else a new v4 UUID. The same value goes on
//!   every retry of the call (it is Partner Center's idempotency key); a new call gets a new one.
//! - `MS-CorrelationId`: the caller's if it is a GUID, else a new v4 UUID.
//! - A caller's value that is present but not a GUID is refused (400) rather than silently replaced.
//! - `MS-CV` (when `tracking.correlation_vector`): the caller's vector extended once, or a new one
//!   seeded; the upstream client increments it before each attempt ([`CallIds::next_cv`]).
//! - `X-Locale` gets the configured default when absent; `MS-PartnerCenter-Application` is set.
//!
//! The ids go into the request's extensions as [`CallIds`], onto every response (it stands
//! outside `rescue`, so pcgate's own error answers carry them too), and into the call's span,
//! with the route `access` matched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::instrument::Instrumented;
use tracing::Instrument;

use crate::body::{Request, Response};
use crate::call::CallInfo;
use crate::cv::CorrelationVector;
pub use crate::error::BadTrackingHeader;

pub use crate::headers::{MS_APPLICATION, MS_CORRELATION_ID, MS_CV, MS_REQUEST_ID, X_LOCALE};

/// The tracking layer's own settings.
#[derive(Debug, Clone)]
pub struct TrackingSettings {
    /// `MS-PartnerCenter-Application`.
    pub application: Option<HeaderValue>,
    /// `X-Locale` when the caller sends none.
    pub locale: Option<HeaderValue>,
    /// Whether to send `MS-CV`.
    pub correlation_vector: bool,
}

impl TrackingSettings {
    /// From `[tracking]`; empty strings mean "do not send".
    pub fn new(config: &crate::config::TrackingConfig) -> Result<Self, String> {
        let value = |key: &str, text: &str| -> Result<Option<HeaderValue>, String> {
            if text.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(text)
                .map(Some)
                .map_err(|_| format!("tracking.{key} `{text}` is not a valid header value"))
        };
        Ok(TrackingSettings {
            application: value("application", &config.application)?,
            locale: value("locale", &config.locale)?,
            correlation_vector: config.correlation_vector,
        })
    }
}

/// The tracking ids of one call.
#[derive(Debug, Clone)]
pub struct CallIds {
    /// `MS-RequestId`.
    pub request_id: HeaderValue,
    /// `MS-CorrelationId`.
    pub correlation_id: HeaderValue,
    cv: Option<Arc<Mutex<Vector>>>,
}

/// A call's correlation vector, and its value as last sent upstream: the answer is stamped with
/// that same value, not a copy made again.
#[derive(Debug)]
struct Vector {
    cv: CorrelationVector,
    sent: Option<HeaderValue>,
}

impl Vector {
    fn new(cv: CorrelationVector) -> Arc<Mutex<Vector>> {
        Arc::new(Mutex::new(Vector { cv, sent: None }))
    }
}

impl CallIds {
    /// New ids for a call (and a seeded vector when enabled).
    pub fn fresh(correlation_vector: bool) -> CallIds {
        let (request_id, correlation_id) = new_guids();
        CallIds {
            request_id,
            correlation_id,
            cv: correlation_vector.then(|| Vector::new(CorrelationVector::seed())),
        }
    }

    /// The ids for an inbound call, from its headers.
    pub fn from_headers(
        headers: &HeaderMap,
        correlation_vector: bool,
    ) -> Result<CallIds, BadTrackingHeader> {
        let (request_id, correlation_id) =
            match (headers.get(MS_REQUEST_ID), headers.get(MS_CORRELATION_ID)) {
                // The usual call: both made here, in one allocation.
                (None, None) => new_guids(),
                _ => (
                    guid_or_new(headers, &MS_REQUEST_ID, "MS-RequestId")?,
                    guid_or_new(headers, &MS_CORRELATION_ID, "MS-CorrelationId")?,
                ),
            };
        let cv = correlation_vector.then(|| {
            let inbound = headers.get(MS_CV).map(|v| (v, v.to_str().ok().map(CorrelationVector::parse)));
            let cv = match inbound {
                Some((_, Some(Ok(mut cv)))) => {
                    cv.extend();
                    cv
                }
                Some((raw, _)) => {
                    let fresh = CorrelationVector::seed();
                    tracing::info!(received = %printable(raw.as_bytes()), seeded = %fresh, "malformed MS-CV replaced by a new vector");
                    fresh
                }
                None => CorrelationVector::seed(),
            };
            Vector::new(cv)
        });
        Ok(CallIds {
            request_id,
            correlation_id,
            cv,
        })
    }

    /// Increments the vector for the next upstream attempt and returns it (`None` when disabled).
    pub fn next_cv(&self) -> Option<HeaderValue> {
        let vector = self.cv.as_ref()?;
        let mut vector = vector.lock().unwrap_or_else(|e| e.into_inner());
        vector.cv.increment();
        vector.sent = vector.cv.header_value();
        vector.sent.clone()
    }

    /// The vector as it stands (the last one sent upstream, or the extended inbound one).
    pub fn cv(&self) -> Option<HeaderValue> {
        let vector = self.cv.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        match &vector.sent {
            Some(sent) => Some(sent.clone()),
            None => vector.cv.header_value(),
        }
    }

    /// Puts the ids on a response.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(MS_REQUEST_ID, self.request_id.clone());
        headers.insert(MS_CORRELATION_ID, self.correlation_id.clone());
        if let Some(cv) = self.cv() {
            headers.insert(MS_CV, cv);
        }
    }
}

/// A new v4 UUID from the thread's fast generator: ids need uniqueness, not secrecy, and this
/// keeps a getrandom system call off every request.
fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid()
}

fn new_guid() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    guid_value(random_uuid().hyphenated().encode_lower(&mut buf))
}

/// Two new GUIDs (a request id and a correlation id) as header values sharing one allocation.
fn new_guids() -> (HeaderValue, HeaderValue) {
    let mut both = [0u8; 72];
    for half in both.chunks_exact_mut(36) {
        random_uuid().hyphenated().encode_lower(half);
    }
    let both = bytes::Bytes::from_owner(both);
    let value =
        |bytes| HeaderValue::from_maybe_shared(bytes).expect("a UUID is a valid header value");
    (value(both.slice(..36)), value(both.slice(36..)))
}

/// A hyphenated GUID as a header value, in one allocation that its clones share: the ids are
/// cloned onto the request, the response and the span, and a value copied from a `&str` is
/// copied again into a shared buffer on its first clone.
fn guid_value(text: &str) -> HeaderValue {
    let mut id = [0u8; 36];
    id.copy_from_slice(text.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .expect("a UUID is a valid header value")
}

fn guid_or_new(
    headers: &HeaderMap,
    name: &HeaderName,
    label: &'static str,
) -> Result<HeaderValue, BadTrackingHeader> {
    let Some(value) = headers.get(name) else {
        return Ok(new_guid());
    };
    // Braced (`{...}`), `urn:uuid:` and unhyphenated forms are the same GUID: sent on in the one
    // canonical form, so the upstream and the logs see one spelling. The nil and max GUIDs are
    // placeholders, not ids: as an idempotency key they would tie unrelated calls together.
    match value.to_str().ok().map(|s| uuid::Uuid::try_parse(s.trim())) {
        Some(Ok(uuid)) if !uuid.is_nil() && !uuid.is_max() => {
            let mut buf = uuid::Uuid::encode_buffer();
            Ok(guid_value(uuid.hyphenated().encode_lower(&mut buf)))
        }
        _ => Err(BadTrackingHeader {
            header: label,
            got: printable(value.as_bytes()),
        }),
    }
}

/// At most 64 characters of a header value, with anything unprintable escaped.
fn printable(bytes: &[u8]) -> String {
    let mut text: String = bytes
        .iter()
        .take(64)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        text.push_str("...");
    }
    text
}

/// Adds [`Tracking`] in front of a service.
#[derive(Clone, Debug)]
pub struct TrackingLayer {
    settings: Arc<TrackingSettings>,
}

impl TrackingLayer {
    /// Uses these settings.
    pub fn new(settings: TrackingSettings) -> Self {
        TrackingLayer {
            settings: Arc::new(settings),
        }
    }

    /// A copy for one lane, its header values its own (see [`crate::stack::Layers::lane`]).
    pub fn lane(&self) -> Self {
        let settings = &self.settings;
        TrackingLayer::new(TrackingSettings {
            application: settings.application.as_ref().map(crate::headers::own_value),
            locale: settings.locale.as_ref().map(crate::headers::own_value),
            correlation_vector: settings.correlation_vector,
        })
    }
}

impl<S> tower::Layer<S> for TrackingLayer {
    type Service = Tracking<S>;

    fn layer(&self, inner: S) -> Tracking<S> {
        Tracking {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// Keeps or makes the tracking ids; see the module docs.
#[derive(Clone, Debug)]
pub struct Tracking<S> {
    inner: S,
    settings: Arc<TrackingSettings>,
}

impl<S> tower::Service<Request> for Tracking<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let settings = &self.settings;
        let tracking = match CallIds::from_headers(request.headers(), settings.correlation_vector) {
            Ok(tracking) => tracking,
            Err(bad) => {
                // Refused here, before anything else: the answer still carries (fresh) ids.
                let mut response = crate::error::respond(&bad);
                CallIds::fresh(settings.correlation_vector).stamp(response.headers_mut());
                return Either::Left(future::ready(Ok(response)));
            }
        };
        let headers = request.headers_mut();
        headers.insert(MS_REQUEST_ID, tracking.request_id.clone());
        headers.insert(MS_CORRELATION_ID, tracking.correlation_id.clone());
        if settings.correlation_vector {
            // Set per attempt by the upstream client, from `CallIds::next_cv`.
            headers.remove(MS_CV);
        }
        if let Some(locale) = &settings.locale {
            headers.entry(X_LOCALE).or_insert_with(|| locale.clone());
        }
        if let Some(application) = &settings.application {
            headers.insert(MS_APPLICATION, application.clone());
        }
        let info = request.extensions().get::<Arc<CallInfo>>().cloned();
        request.extensions_mut().insert(tracking.clone());
        // The inner layers' `call` decides the route (`access` matches it before any inner
        // future is polled), so the span opens after it with every field set at once: recording
        // the route on an open span costs the JSON formatter a re-parse of the span's fields,
        // a microsecond per call. Everything the inner layers do once polled is inside it.
        let call = self.inner.call(request);
        // A fresh hit is answered inside `call`: its future is ready and runs nothing, so no line
        // can be logged inside a span, and opening one would cost a microsecond for nothing.
        let span = (!info.as_deref().is_some_and(CallInfo::answered_at_once)).then(|| {
            tracing::info_span!(
                "call",
                // Plain strings: the ids are GUIDs (checked above), and a `Debug` value would be
                // formatted with its quotes and escaped again into the JSON line.
                request_id = tracking.request_id.to_str().unwrap_or_default(),
                correlation_id = tracking.correlation_id.to_str().unwrap_or_default(),
                route = info.as_deref().and_then(CallInfo::matched_route),
            )
        });
        let answer = Stamped {
            call,
            ids: Some(tracking),
        };
        Either::Right(match span {
            Some(span) => Either::Left(answer.instrument(span)),
            None => Either::Right(answer),
        })
    }
}

/// The tracking layer's answer: a refusal of malformed ids, or the inner call's answer stamped
/// (inside the call's span when there is one).
pub type ResponseFuture<F> =
    Either<Ready<Result<Response, Infallible>>, Either<Instrumented<Stamped<F>>, Stamped<F>>>;

pin_project_lite::pin_project! {
    /// The inner call's answer, stamped with the call's ids as it comes out (a concrete future:
    /// no box per call).
    pub struct Stamped<F> {
        #[pin]
        call: F,
        ids: Option<CallIds>,
    }
}

impl<F> Future for Stamped<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.call.poll(cx));
        if let Some(ids) = this.ids.take() {
            ids.stamp(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse::<HeaderName>().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn new_ids_are_distinct_v4_guids_whatever_the_caller_sent() {
        let v4 = |value: &HeaderValue| {
            let text = value.to_str().unwrap();
            let uuid = uuid::Uuid::try_parse(text).unwrap();
            assert_eq!(text.len(), 36, "{text}");
            assert_eq!(text, uuid.hyphenated().to_string(), "canonical form");
            assert_eq!(uuid.get_version_num(), 4, "{text}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{text}");
            uuid
        };
        let sent = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            // Neither sent (both made in one allocation), one sent, and a refused call's ids.
            let both = CallIds::from_headers(&HeaderMap::new(), false).unwrap();
            let one = CallIds::from_headers(&headers(&[("ms-requestid", sent)]), false).unwrap();
            let fresh = CallIds::fresh(false);
            for ids in [&both, &fresh] {
                assert!(seen.insert(v4(&ids.request_id)));
                assert!(seen.insert(v4(&ids.correlation_id)));
            }
            assert_eq!(one.request_id, sent);
            assert!(seen.insert(v4(&one.correlation_id)));
        }
    }

    #[tokio::test]
    async fn inner_log_lines_carry_the_ids_and_the_matched_route_as_span_fields() {
        use tower::{Layer, ServiceExt};
        let lines = crate::log::Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let inner = tower::service_fn(|request: Request| {
            // As `access` does: the route is known once the inner `call` has run.
            let info = request.extensions().get::<Arc<CallInfo>>().unwrap();
            info.set_route(&Arc::from("summary"));
            async {
                tokio::task::yield_now().await;
                tracing::warn!("inner line");
                Ok::<_, Infallible>(Response::new(crate::body::empty()))
            }
        });
        let settings = TrackingSettings {
            application: None,
            locale: None,
            correlation_vector: false,
        };
        let service = TrackingLayer::new(settings).layer(inner);
        let mut request = Request::new(crate::body::empty());
        request
            .extensions_mut()
            .insert(Arc::new(CallInfo::default()));
        let response = service.oneshot(request).await.unwrap();
        let request_id = response.headers()[MS_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_owned();
        let text = lines.text();
        let line: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["fields"]["message"] == "inner line")
            .expect("the inner line was logged");
        let span = &line["span"];
        assert_eq!(span["name"], "call", "{line}");
        assert_eq!(span["route"], "summary", "{line}");
        assert!(
            span["request_id"].as_str().unwrap().contains(&request_id),
            "{line}"
        );
        assert!(span["correlation_id"].as_str().is_some(), "{line}");
    }

    #[tokio::test]
    async fn a_call_answered_at_once_opens_no_span_and_any_other_call_does() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::{Layer, ServiceExt};
        use tracing_subscriber::layer::SubscriberExt;

        /// Counts the spans opened.
        struct Spans(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
            fn on_new_span(
                &self,
                _: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let opened = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Spans(opened.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let settings = TrackingSettings {
            application: None,
            locale: None,
            correlation_vector: false,
        };
        for at_once in [true, false] {
            let inner = tower::service_fn(move |request: Request| {
                if at_once {
                    let info = request.extensions().get::<Arc<CallInfo>>().unwrap();
                    info.set_answered_at_once();
                }
                std::future::ready(Ok::<_, Infallible>(Response::new(crate::body::empty())))
            });
            let service = TrackingLayer::new(settings.clone()).layer(inner);
            let mut request = Request::new(crate::body::empty());
            request
                .extensions_mut()
                .insert(Arc::new(CallInfo::default()));
            let before = opened.load(Ordering::SeqCst);
            let response = service.oneshot(request).await.unwrap();
            assert!(
                response.headers().contains_key(MS_REQUEST_ID),
                "ids are stamped either way"
            );
            assert_eq!(
                opened.load(Ordering::SeqCst) - before,
                usize::from(!at_once),
                "at once: {at_once}"
            );
        }
    }

    #[test]
    fn guids_are_kept_and_missing_ones_made() {
        let t = CallIds::from_headers(
            &headers(&[("ms-requestid", "a45e6643-1caf-4429-8f90-07c03d85bc2b")]),
            false,
        )
        .unwrap();
        assert_eq!(t.request_id, "a45e6643-1caf-4429-8f90-07c03d85bc2b");
        assert!(uuid::Uuid::try_parse(t.correlation_id.to_str().unwrap()).is_ok());
        assert!(t.cv().is_none());
    }

    #[test]
    fn other_spellings_of_a_guid_are_sent_in_the_canonical_form() {
        for value in [
            "{a45e6643-1caf-4429-8f90-07c03d85bc2b}",
            "urn:uuid:a45e6643-1caf-4429-8f90-07c03d85bc2b",
            "a45e66431caf44298f9007c03d85bc2b",
            "A45E6643-1CAF-4429-8F90-07C03D85BC2B",
        ] {
            let t = CallIds::from_headers(&headers(&[("ms-requestid", value)]), false).unwrap();
            assert_eq!(
                t.request_id, "a45e6643-1caf-4429-8f90-07c03d85bc2b",
                "{value}"
            );
        }
    }

    #[test]
    fn malformed_ids_are_refused_by_name() {
        for value in [
            "00000000-0000-0000-0000-000000000000",
            "{00000000-0000-0000-0000-000000000000}",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "abc",
            "a45e6643-1caf-4429-8f90-07c03d85bc2",
            &"a".repeat(500),
        ] {
            let err =
                CallIds::from_headers(&headers(&[("ms-correlationid", value)]), true).unwrap_err();
            assert_eq!(err.header, "MS-CorrelationId");
            assert!(err.got.len() <= 67);
        }
    }

    #[test]
    fn the_inbound_vector_is_extended_once_and_incremented_per_attempt() {
        let t = CallIds::from_headers(&headers(&[("ms-cv", "5npA0K22CUmWPOzB.4")]), true).unwrap();
        assert_eq!(t.cv().unwrap(), "5npA0K22CUmWPOzB.4.0");
        assert_eq!(t.next_cv().unwrap(), "5npA0K22CUmWPOzB.4.1");
        let retry = t.clone();
        assert_eq!(retry.next_cv().unwrap(), "5npA0K22CUmWPOzB.4.2");
        let bad = CallIds::from_headers(&headers(&[("ms-cv", "not a vector")]), true).unwrap();
        assert_eq!(bad.cv().unwrap().len(), 18);
    }
}
