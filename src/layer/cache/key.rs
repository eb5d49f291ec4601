//! The key shared by the cache and coalescing (DESIGN.md §2): credential, method, normalised
//! path, canonical query, `Accept`, `X-Locale`, `MS-ContinuationToken`. Two callers that may see
//! different answers must never share a key, so everything the upstream's answer depends on is in it.

use std::sync::Arc;

use http::header::{self, HeaderName};

use crate::body::Request;
use crate::route::Route;

/// `MS-ContinuationToken`: pages of seek-paged collections differ only by this header.
pub const MS_CONTINUATION_TOKEN: HeaderName = HeaderName::from_static("ms-continuationtoken");

/// Fields are joined by `\n`, which no header value, normalised path or encoded query can hold.
const SEPARATOR: char = '\n';

/// The request headers an answer depends on. `Accept-Encoding` is here too: a gzip body must not
/// reach a caller that did not ask for one.
const KEYED_HEADERS: [HeaderName; 4] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    crate::layer::tracking::X_LOCALE,
    MS_CONTINUATION_TOKEN,
];

/// Conditional and partial requests get answers (304, 206) that an unconditional caller must not
/// be given: they are neither answered from the cache nor shared.
const UNSHAREABLE: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Whether a request's answer may be cached or shared: a `GET`/`HEAD` without a body that is
/// neither conditional nor partial.
pub fn shareable(request: &Request) -> bool {
    matches!(*request.method(), http::Method::GET | http::Method::HEAD)
        && http_body::Body::is_end_stream(request.body())
        && !UNSHAREABLE
            .iter()
            .any(|name| request.headers().contains_key(name))
}

/// Appends `bytes`, escaping `%` and anything outside printable ASCII as `%XX`.
fn escape_into(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// A cache and coalescing key; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(Arc<str>);

impl Key {
    /// The key of a request that `access` has admitted (its path is already normalised).
    pub fn of(request: &Request) -> Key {
        let credential = request
            .extensions()
            .get::<Arc<Route>>()
            .and_then(|route| route.credential.as_deref())
            .unwrap_or("");
        let mut text = String::with_capacity(128);
        for part in [credential, request.method().as_str(), request.uri().path()] {
            text.push_str(part);
            text.push(SEPARATOR);
        }
        canonical_query(request.uri().query().unwrap_or(""), &mut text);
        for name in KEYED_HEADERS {
            text.push(SEPARATOR);
            // Every value, in order, byte for byte (escaped, so different bytes stay different).
            for (i, value) in request.headers().get_all(&name).iter().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                escape_into(value.as_bytes(), &mut text);
            }
        }
        Key(text.into())
    }

    /// The key of `request`, computed once and kept in its extensions for the next layer.
    pub fn get_or_insert(request: &mut Request) -> Key {
        if let Some(key) = request.extensions().get::<Key>() {
            return key.clone();
        }
        let key = Key::of(request);
        request.extensions_mut().insert(key.clone());
        key
    }

    /// The normalised path this key is for.
    pub fn path(&self) -> &str {
        self.0.split(SEPARATOR).nth(2).unwrap_or("")
    }

    /// Its size in bytes (for the cache's weigher).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty (never, for a real request).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Appends the query with its pairs ordered by name (a stable sort, so repeated names keep
/// their order, which may matter), each pair exactly as sent: `b=2&a=1` and `a=1&b=2` are one
/// query, `a=1&a=2` and `a=2&a=1` are two.
fn canonical_query(query: &str, out: &mut String) {
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_by_key(|pair| pair.split_once('=').map_or(*pair, |(name, _)| name));
    out.push_str(&pairs.join("&"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    fn request(uri: &str, headers: &[(&str, &str)], credential: Option<&str>) -> Request {
        let mut request = http::Request::get(uri).body(body::empty()).unwrap();
        for (k, v) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        request.extensions_mut().insert(Arc::new(Route {
            name: "r".into(),
            credential: credential.map(str::to_owned),
            cache_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            coalesce: true,
            retry: true,
        }));
        request
    }

    fn key(uri: &str, headers: &[(&str, &str)]) -> Key {
        Key::of(&request(uri, headers, Some("app")))
    }

    #[test]
    fn the_order_of_differently_named_pairs_does_not_matter() {
        assert_eq!(
            key("/v1/invoices?size=2&offset=4", &[]),
            key("/v1/invoices?offset=4&size=2", &[])
        );
        // Repeated names keep their order: the upstream may read the first or the last.
        assert_ne!(
            key("/v1/invoices?a=1&a=2", &[]),
            key("/v1/invoices?a=2&a=1", &[])
        );
        // Encodings are kept as sent: two byte strings never share a key.
        assert_ne!(
            key("/v1/invoices?x=%FF", &[]),
            key("/v1/invoices?x=%FE", &[])
        );
        assert_ne!(
            key("/v1/invoices?size=2", &[]),
            key("/v1/invoices?size=3", &[])
        );
        assert_ne!(
            key("/v1/invoices?size=2&size=3", &[]),
            key("/v1/invoices?size=2", &[])
        );
    }

    #[test]
    fn everything_the_answer_depends_on_is_in_the_key() {
        let base = key("/v1/invoices/summary", &[]);
        assert_ne!(
            base,
            key("/v1/invoices/summary", &[("accept", "application/pdf")])
        );
        assert_ne!(base, key("/v1/invoices/summary", &[("x-locale", "de-DE")]));
        assert_ne!(
            base,
            key("/v1/invoices/summary", &[("accept-encoding", "gzip")])
        );
        assert_ne!(
            base,
            key("/v1/invoices/summary", &[("ms-continuationtoken", "abc")])
        );
        assert_ne!(
            base,
            Key::of(&request("/v1/invoices/summary", &[], Some("user")))
        );
        let mut head = request("/v1/invoices/summary", &[], Some("app"));
        *head.method_mut() = http::Method::HEAD;
        assert_ne!(base, Key::of(&head));
        // What the answer does not depend on is not.
        assert_eq!(
            base,
            key(
                "/v1/invoices/summary",
                &[("ms-requestid", "a45e6643-1caf-4429-8f90-07c03d85bc2b")]
            )
        );
        assert_eq!(base.path(), "/v1/invoices/summary");
    }

    #[test]
    fn distinct_bytes_and_repeated_values_give_distinct_keys() {
        let mut a = request("/v1/a", &[], Some("app"));
        let mut b = request("/v1/a", &[], Some("app"));
        a.headers_mut().insert(
            "ms-continuationtoken",
            http::HeaderValue::from_bytes(b"t\xff").unwrap(),
        );
        b.headers_mut().insert(
            "ms-continuationtoken",
            http::HeaderValue::from_bytes(b"t\xfe").unwrap(),
        );
        assert_ne!(Key::of(&a), Key::of(&b));
        let mut c = request("/v1/a", &[("accept", "application/json")], Some("app"));
        c.headers_mut()
            .append("accept", "application/pdf".parse().unwrap());
        assert_ne!(Key::of(&c), key("/v1/a", &[("accept", "application/json")]));
    }

    #[test]
    fn conditional_and_partial_requests_are_not_shared() {
        assert!(shareable(&request("/v1/a", &[], None)));
        for (name, value) in [
            ("if-none-match", "\"x\""),
            ("range", "bytes=0-10"),
            ("if-modified-since", "Sat, 21 Nov 2026 00:00:00 GMT"),
        ] {
            assert!(
                !shareable(&request("/v1/a", &[(name, value)], None)),
                "{name}"
            );
        }
        let mut post = request("/v1/a", &[], None);
        *post.method_mut() = http::Method::POST;
        assert!(!shareable(&post));
    }

    #[test]
    fn a_header_cannot_forge_another_field() {
        // Values cannot hold the separator, so no value can shift the fields.
        assert!(http::HeaderValue::from_bytes(b"a\nb").is_err());
        assert_ne!(
            key("/v1/a", &[("accept", "x"), ("x-locale", "y")]),
            key("/v1/a", &[("accept", "x y"), ("x-locale", "")])
        );
    }
}
