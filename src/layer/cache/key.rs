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
        let header = |name: &HeaderName| {
            request
                .headers()
                .get(name)
                .map_or(&b""[..], |v| v.as_bytes())
        };
        let mut text = String::with_capacity(128);
        for part in [credential, request.method().as_str(), request.uri().path()] {
            text.push_str(part);
            text.push(SEPARATOR);
        }
        canonical_query(request.uri().query().unwrap_or(""), &mut text);
        for name in [
            &header::ACCEPT,
            &crate::layer::tracking::X_LOCALE,
            &MS_CONTINUATION_TOKEN,
        ] {
            text.push(SEPARATOR);
            // Header values are visible ASCII or opaque bytes; keep them exactly.
            text.push_str(&String::from_utf8_lossy(header(name)));
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

/// Appends the query with its pairs decoded, sorted, and encoded one way: `b=2&a=1` and
/// `a=%31&b=2` are the same query.
fn canonical_query(query: &str, out: &mut String) {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    pairs.sort();
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    serializer.extend_pairs(pairs);
    out.push_str(&serializer.finish());
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
    fn query_order_and_encoding_do_not_matter() {
        assert_eq!(
            key("/v1/invoices?size=2&offset=4", &[]),
            key("/v1/invoices?offset=4&size=2", &[])
        );
        assert_eq!(
            key("/v1/invoices?size=%32", &[]),
            key("/v1/invoices?size=2", &[])
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
    fn a_header_cannot_forge_another_field() {
        // Values cannot hold the separator, so no value can shift the fields.
        assert!(http::HeaderValue::from_bytes(b"a\nb").is_err());
        assert_ne!(
            key("/v1/a", &[("accept", "x"), ("x-locale", "y")]),
            key("/v1/a", &[("accept", "x y"), ("x-locale", "")])
        );
    }
}
