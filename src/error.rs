//! Responses pcgate makes itself, in the Partner Center error shape (reference §3.1), so that
//! clients that already parse Partner Center errors parse ours too.

use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use crate::body::{self, Response};

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

/// An error that knows the answer pcgate gives for it: each error type says its own status and
/// Partner Center-style `errorName` ([`crate::layer::rescue`] finds it in the cause chain).
pub trait Problem: std::error::Error {
    /// The status of the answer.
    fn status(&self) -> StatusCode;
    /// The `errorName` of the answer.
    fn error_name(&self) -> &'static str;
}

/// The Partner Center-shaped answer for `error`.
pub fn respond(error: &dyn Problem) -> Response {
    problem(error.status(), error.error_name(), &error.to_string())
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
