//! The errors pcgate answers for itself, each saying its own status ([`Problem`]), and the
//! responses made from them in the Partner Center error shape (reference §3.1), so clients that
//! already parse Partner Center errors parse ours too. The types live here, not in the layers that
//! raise them, so `rescue` classifies them without importing another layer.

use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use crate::body::{self, Response};
use crate::host::HostError;
use crate::route::PathError;
use crate::token::TokenError;

/// The body of an error pcgate makes: Partner Center's ApiFault plus `errorName`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiFault<'a> {
    code: u16,
    description: &'a str,
    error_name: &'a str,
    source: &'static str,
    data: [(); 0],
}

/// Builds a Partner Center-shaped error response: `{"code", "description", "errorName", "source": "pcgate", "data": []}`.
pub fn problem(status: StatusCode, error_name: &str, description: &str) -> Response {
    let fault = ApiFault {
        code: status.as_u16(),
        description,
        error_name,
        source: "pcgate",
        data: [],
    };
    // Serialising a struct of strings and numbers cannot fail.
    let json = serde_json::to_vec(&fault).unwrap_or_default();
    let mut response = Response::new(body::full(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Why `access` refused a call.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The path was malformed or tried to escape its segments (400).
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    /// No route allows this method and path (403).
    #[error("{method} {path} is not allowed by the route table")]
    NoRoute {
        /// The request method.
        method: http::Method,
        /// The normalised path.
        path: String,
    },
    /// Inbound keys are configured and the caller sent none, or a wrong one (401).
    #[error("missing or unknown API key: send `Authorization: Bearer <key>` with a key from [[access.clients]]")]
    BadKey,
    /// No inbound keys, and `Host` names a host this listener does not answer (421), or `Origin`
    /// is another site's (403).
    #[error(transparent)]
    Host(#[from] HostError),
    /// The head carried both `Content-Length` and `Transfer-Encoding` (400).
    #[error(
        "the request carries both Content-Length and Transfer-Encoding (RFC 9112 §6.3): send one"
    )]
    FramedTwice,
}

impl Problem for AccessError {
    fn status(&self) -> http::StatusCode {
        match self {
            AccessError::BadPath(_) | AccessError::FramedTwice => http::StatusCode::BAD_REQUEST,
            AccessError::NoRoute { .. } => http::StatusCode::FORBIDDEN,
            AccessError::BadKey => http::StatusCode::UNAUTHORIZED,
            AccessError::Host(HostError::Misdirected(_)) => http::StatusCode::MISDIRECTED_REQUEST,
            AccessError::Host(HostError::ForeignOrigin(_)) => http::StatusCode::FORBIDDEN,
        }
    }

    fn error_name(&self) -> &'static str {
        match self {
            AccessError::BadPath(_) => "InvalidPath",
            AccessError::FramedTwice => "InvalidRequest",
            AccessError::NoRoute { .. } => "RouteNotAllowed",
            AccessError::BadKey => "InvalidApiKey",
            AccessError::Host(HostError::Misdirected(_)) => "MisdirectedRequest",
            AccessError::Host(HostError::ForeignOrigin(_)) => "ForeignOrigin",
        }
    }
}

/// Why the call could not be given a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// No valid token and none to be had now (503).
    #[error(transparent)]
    NoToken(#[from] TokenError),
}

impl Problem for CredentialError {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::SERVICE_UNAVAILABLE
    }

    fn error_name(&self) -> &'static str {
        "NoValidCredential"
    }
}

/// A caller's tracking header that is present but malformed (400).
#[derive(Debug, thiserror::Error)]
#[error("header {header} must be a GUID (e.g. a45e6643-1caf-4429-8f90-07c03d85bc2b); got {got}")]
pub struct BadTrackingHeader {
    /// The header's name.
    pub header: &'static str,
    /// What was sent, shortened and made printable.
    pub got: String,
}

impl Problem for BadTrackingHeader {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::BAD_REQUEST
    }

    fn error_name(&self) -> &'static str {
        "InvalidTrackingHeader"
    }
}

/// The caller's request body broke (bad chunk framing, a length that does not match): a 400.
#[derive(Debug, thiserror::Error)]
#[error("the request body could not be read: it is malformed or was cut short")]
pub struct ClientBodyError;

impl Problem for ClientBodyError {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::BAD_REQUEST
    }

    fn error_name(&self) -> &'static str {
        "InvalidRequestBody"
    }
}

/// The upstream's response body broke after its head arrived (a reset, a short body): a 502.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's answer broke off: {0}")]
pub struct UpstreamBodyError(#[source] pub hyper::Error);

impl Problem for UpstreamBodyError {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::BAD_GATEWAY
    }

    fn error_name(&self) -> &'static str {
        "UpstreamFailed"
    }
}

/// What made pcgate answer 429 itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThrottleCause {
    /// The call's slot under `upstream.rate_limit` lay past its deadline.
    RateLimit,
    /// The upstream's `Retry-After` hold lasts past the call's deadline.
    Hold,
}

impl ThrottleCause {
    /// Every cause, for exporting each at zero.
    pub const ALL: [ThrottleCause; 2] = [ThrottleCause::RateLimit, ThrottleCause::Hold];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleCause::RateLimit => "rate_limit",
            ThrottleCause::Hold => "hold",
        }
    }
}

/// The call could not reach the upstream before its deadline: over `upstream.rate_limit`, or
/// under a hold the upstream's 429 asked for (429, with `Retry-After`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", match .cause {
    ThrottleCause::RateLimit => format!(
        "over upstream.rate_limit: the next upstream slot is {} away, past this call's deadline; try again later",
        humantime::format_duration(*.retry_after)
    ),
    ThrottleCause::Hold => format!(
        "the upstream is throttling this partner (429 with Retry-After): calls are held for {} more, past this call's deadline; try again later",
        humantime::format_duration(*.retry_after)
    ),
})]
pub struct Throttled {
    /// Which limit it was.
    pub cause: ThrottleCause,
    /// How long until a call could go (rounded up to whole seconds in `Retry-After`).
    pub retry_after: std::time::Duration,
}

impl Problem for Throttled {
    fn status(&self) -> http::StatusCode {
        http::StatusCode::TOO_MANY_REQUESTS
    }

    fn error_name(&self) -> &'static str {
        match self.cause {
            ThrottleCause::RateLimit => "RateLimited",
            ThrottleCause::Hold => "Throttled",
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        Some(self.retry_after)
    }
}

/// An error that knows the answer pcgate gives for it: each error type says its own status and
/// Partner Center-style `errorName` ([`crate::layer::rescue`] finds it in the cause chain).
pub trait Problem: std::error::Error {
    /// The status of the answer.
    fn status(&self) -> StatusCode;
    /// The `errorName` of the answer.
    fn error_name(&self) -> &'static str;
    /// When the caller may try again (`Retry-After`, in whole seconds rounded up), if it is known.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The Partner Center-shaped answer for `error`.
pub fn respond(error: &dyn Problem) -> Response {
    let mut response = problem(error.status(), error.error_name(), &error.to_string());
    if let Some(wait) = error.retry_after() {
        set_retry_after(&mut response, wait);
    }
    response
}

/// `Retry-After: <seconds>`, rounded up and at least 1 (RFC 9110 §10.2.3 has whole seconds only).
pub fn set_retry_after(response: &mut Response, wait: std::time::Duration) {
    let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
}

/// The first error of type `T` in `error`'s cause chain (`error` itself included), so a wrapper
/// (a body error, the client's error around it) needs no case of its own.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(found) = cause.downcast_ref::<T>() {
            return Some(found);
        }
        next = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn problem_has_the_partner_center_shape() {
        let response = problem(
            StatusCode::FORBIDDEN,
            "RouteNotAllowed",
            "no route for GET /x",
        );
        assert_eq!(response.status(), 403);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["code"], 403);
        assert_eq!(v["errorName"], "RouteNotAllowed");
        assert_eq!(v["description"], "no route for GET /x");
        assert_eq!(v["source"], "pcgate");
        assert_eq!(v["data"], serde_json::json!([]));
    }

    #[test]
    fn find_cause_walks_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Inner);
        let error = crate::body::BodyError(Box::new(Outer(Inner)));
        assert!(find_cause::<Inner>(&error).is_some());
        assert!(find_cause::<Outer>(&error).is_some());
        assert!(find_cause::<std::fmt::Error>(&error).is_none());
    }
}
