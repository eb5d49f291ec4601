//! The one body type the stack passes around, and small constructors for it.

use std::convert::Infallible;

use bytes::Bytes;

pub use crate::error::{ClientBodyError, UpstreamBodyError};
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
        // The wrapped error is the cause, so classifying by the cause chain finds it.
        Some(&*self.0)
    }
}

/// Marks whether the caller's request body broke while it was sent on. hyper's client reports
/// only "incomplete message" then, so the upstream client looks here to tell whose fault it was.
#[derive(Debug, Clone, Default)]
pub struct ClientBody(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ClientBody {
    /// Whether reading the caller's body failed.
    pub fn failed(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The caller's request as hyper hands it over (or, in the micro benchmark, any body); a body
/// error is recorded in the request's [`ClientBody`] so it is blamed on the caller.
pub fn from_client<B>(request: http::Request<B>) -> Request
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, incoming) = request.into_parts();
    if incoming.is_end_stream() {
        return Request::from_parts(parts, empty());
    }
    let state = ClientBody::default();
    parts.extensions.insert(state.clone());
    let body = incoming
        .map_err(move |e| {
            state.0.store(true, std::sync::atomic::Ordering::Relaxed);
            BodyError(e.into())
        })
        .boxed_unsync();
    Request::from_parts(parts, body)
}

/// The upstream's response body, with errors that say they are the upstream's.
pub fn from_upstream(incoming: hyper::body::Incoming) -> Body {
    incoming
        .map_err(|e| BodyError(Box::new(UpstreamBodyError(e))))
        .boxed_unsync()
}

/// The future most layers return: boxed, since it holds an inner service's future across awaits.
pub type BoxFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, BoxError>> + Send>>;

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

/// A bodiless request's parts, kept once and shared: what retry sends its next attempt from, and,
/// put on each attempt's request, what the credential layer replays from after a 401, so a call
/// copies its request once for both rather than once each.
#[derive(Clone)]
pub struct Spare(std::sync::Arc<http::request::Parts>);

impl Spare {
    /// The spare of a request that has no body; `None` if it has one.
    pub fn of(request: &Request) -> Option<Spare> {
        clone_bodiless(request).map(|copy| Spare(std::sync::Arc::new(copy.into_parts().0)))
    }

    /// A request made from it (without the spare on it).
    pub fn request(&self) -> Request {
        http::Request::from_parts((*self.0).clone(), empty())
    }
}

/// How many headers pcgate adds to a stored or shared answer for each caller.
const PER_ANSWER_HEADERS: usize = 6;

/// A whole response held in memory: what the cache stores and what coalesced callers share.
#[derive(Debug, Clone)]
pub struct Buffered {
    /// The status.
    pub status: http::StatusCode,
    /// The end-to-end headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Buffered {
    /// A fresh response with these parts (the bytes are shared, not copied).
    pub fn to_response(&self) -> Response {
        let mut response = Response::new(full(self.body.clone()));
        *response.status_mut() = self.status;
        // Sized for the headers each answer then gets (`Age`, `Cache-Status`, `Vary`, the
        // tracking ids): a clone of the map is exactly full and grew twice as they went on.
        let headers = response.headers_mut();
        headers.reserve(self.headers.len() + PER_ANSWER_HEADERS);
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        response
    }

    /// Drops what belongs to one caller's exchange and must not reach another caller with a
    /// stored or shared copy: cookies, the tracking ids (each call stamps its own), `Age` and
    /// `Cache-Status` (set per answer).
    ///
    /// What is kept is copied into a map of its own: a header value hyper parsed is a view into
    /// the connection's read buffer (8 KiB or more), and a stored view would keep that whole
    /// buffer alive for as long as the entry lives, several times what the entry weighs.
    pub fn keep_shareable_headers(&mut self) {
        let mut owned = http::HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            if crate::headers::NOT_SHARED.contains(name) {
                continue;
            }
            // Standard names are static; any other name and every value are copied.
            let (Ok(name), Ok(mut copy)) = (
                http::HeaderName::from_bytes(name.as_str().as_bytes()),
                http::HeaderValue::from_bytes(value.as_bytes()),
            ) else {
                continue;
            };
            copy.set_sensitive(value.is_sensitive());
            owned.append(name, copy);
        }
        self.headers = owned;
    }

    /// The memory its headers and body hold: the body, and each header's name, value and slot
    /// in the map ([`HEADER_OVERHEAD`]). What holding it costs beyond that is the holder's to add.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + HEADER_OVERHEAD)
            .sum();
        self.body.len() + headers
    }
}

/// What one header costs beyond its name and value bytes, measured (RSS over 100,000 stored
/// entries of 0, 1, 4 and 8 headers): its bucket in the `HeaderMap` with the map's spare capacity,
/// its index slots, and the allocation of the copied value (about 210 bytes; rounded up).
pub const HEADER_OVERHEAD: usize = 224;

/// The outcome of [`buffer_up_to`].
pub enum Limited {
    /// The whole response, within the limit.
    Whole(Buffered),
    /// Larger than the limit: the response again, its body the bytes read so far followed by the rest.
    TooBig(Response),
}

/// Reads a response's body into memory if it is at most `limit` bytes. A larger one is handed back
/// as a stream (nothing lost), so it can go on to its caller without being held whole.
pub async fn buffer_up_to(response: Response, limit: usize) -> Result<Limited, BodyError> {
    use http_body::Body as _;
    let (parts, mut body) = response.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) || body.size_hint().lower() > limit as u64 {
        return Ok(Limited::TooBig(Response::from_parts(parts, body)));
    }
    let mut read: Vec<http_body::Frame<Bytes>> = Vec::new();
    let mut size = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            size += data.len();
        }
        read.push(frame);
        if size > limit {
            let prefix = futures_util::stream::iter(read.into_iter().map(Ok::<_, BodyError>));
            let rest = http_body_util::BodyStream::new(body);
            let stream = futures_util::StreamExt::chain(prefix, rest);
            let body = http_body_util::StreamBody::new(stream).boxed_unsync();
            return Ok(Limited::TooBig(Response::from_parts(parts, body)));
        }
    }
    let mut bytes = bytes::BytesMut::with_capacity(size);
    for frame in read {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Limited::Whole(Buffered {
        status: parts.status,
        headers: parts.headers,
        body: bytes.freeze(),
    }))
}
