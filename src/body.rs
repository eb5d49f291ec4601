//! The one body type the stack passes around, and small constructors for it.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Boxed error used by the stack and by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body: what hyper hands us, what the upstream returns, or bytes we made.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// An error while reading or writing a body (the peer hung up, say).
///
/// A named type rather than `BoxError`: a trait object in the request type makes rustc's `Send`
/// check fail for any async block that holds an inner service's future across an `.await`.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A request as the stack sees it.
pub type Request = http::Request<Body>;

/// A response as the stack sees it.
pub type Response = http::Response<Body>;

/// A body holding `bytes`, sent in one frame.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A body with nothing in it.
pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Boxes any body whose errors convert into [`BoxError`] (hyper's `Incoming`, say).
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(|e| BodyError(e.into())).boxed_unsync()
}

/// A copy of a request that has no body (method, URI, version, headers, extensions), for a
/// replay or a retry; `None` if the request has a body, which cannot be sent twice.
pub fn clone_bodiless(request: &Request) -> Option<Request> {
    use http_body::Body as _;
    if !request.body().is_end_stream() {
        return None;
    }
    let mut copy = http::Request::new(empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}
