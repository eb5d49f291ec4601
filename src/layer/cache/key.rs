//! The key shared by the cache and coalescing (DESIGN.md §2): credential, method, normalised
//! path, canonical query, the forwarded headers that can change an answer ([`KEYED_HEADERS`]) and
//! the operator's `cache.key_headers`. Two callers that may see different answers must never share
//! a key, so everything the upstream's answer depends on is in it: `access` forwards no other
//! request header, except the operator's `upstream.forward_headers`, whose keying is theirs to choose.

use std::sync::Arc;

use http::header::{self, HeaderName};

use crate::body::Request;
use crate::route::Route;

pub use crate::headers::{MS_CONTINUATION_TOKEN, MS_CONTRACT_VERSION};

/// Fields are joined by `\n`, which no header value, normalised path or encoded query can hold.
const SEPARATOR: char = '\n';

/// The forwarded request headers an answer depends on (`layer::access::FORWARDED` lists them all).
/// `Accept-Encoding` is here too: a gzip body must not reach a caller that did not ask for one.
/// The tracking ids and the SDK's self-description (`MS-PartnerCenter-Application`, `-Client`,
/// `MS-SdkVersion`) do not change an answer; `If-Match` and the other conditionals make a request
/// unshareable instead ([`shareable`]).
pub const KEYED_HEADERS: [HeaderName; 6] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::CONTENT_TYPE,
    crate::headers::X_LOCALE,
    MS_CONTINUATION_TOKEN,
    MS_CONTRACT_VERSION,
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
    /// The key of a request that `access` has admitted (its path is already normalised), with
    /// `extra` headers (`cache.key_headers`) after the [`KEYED_HEADERS`].
    pub fn of(request: &Request, extra: &[HeaderName]) -> Key {
        let credential = request
            .extensions()
            .get::<Arc<Route>>()
            .and_then(|route| route.credential.as_ref())
            .map_or("", crate::token::TokenSource::name);
        let mut text = String::with_capacity(128);
        for part in [credential, request.method().as_str(), request.uri().path()] {
            text.push_str(part);
            text.push(SEPARATOR);
        }
        canonical_query(request.uri().query().unwrap_or(""), &mut text);
        for name in KEYED_HEADERS.iter().chain(extra) {
            text.push(SEPARATOR);
            // Every value, in order, byte for byte (escaped, so different bytes stay different).
            for (i, value) in request.headers().get_all(name).iter().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                escape_into(value.as_bytes(), &mut text);
            }
        }
        Key(text.into())
    }

    /// The key of one variant of this key's answer (RFC 9111 §4.1): the request's values of the
    /// `names` a stored answer's `Vary` gives, from its forwarded headers or else from those
    /// `access` did not forward. The values are digested (SHA-256), so no header value, a
    /// cookie say, is held as text in a key; whitespace around commas does not count.
    pub fn variant(
        &self,
        names: &[HeaderName],
        forwarded: &http::HeaderMap,
        unforwarded: Option<&http::HeaderMap>,
    ) -> Key {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        for name in names {
            digest.update(name.as_str());
            let values = match (forwarded.contains_key(name), unforwarded) {
                (false, Some(unforwarded)) => unforwarded.get_all(name),
                _ => forwarded.get_all(name),
            };
            // An absent header matches only an absent one (§4.1), never an empty value.
            let present = values.iter().next().is_some();
            digest.update(if present { b":" } else { b"!" });
            let mut first = true;
            for value in values {
                for part in value.as_bytes().split(|&b| b == b',') {
                    if !first {
                        digest.update(b",");
                    }
                    first = false;
                    digest.update(part.trim_ascii());
                }
            }
            digest.update(b"\n");
        }
        Key(format!("{}{SEPARATOR}vary={:x}", self.0, digest.finalize()).into())
    }

    /// The normalised path this key is for.
    pub fn path(&self) -> &str {
        self.0.split(SEPARATOR).nth(2).unwrap_or("")
    }

    /// Its size in bytes (for the cache's weigher).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The key's text (a shared store digests it into its own key, and keeps it in the record).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key from its text, as [`Key::as_str`] gave it (a record read back from a shared store).
    pub fn from_text(text: &str) -> Key {
        Key(text.into())
    }

    /// Whether it is empty (never, for a real request).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Appends the query with its pairs ordered by name (a stable sort, so repeated names keep
/// their order, which may matter), each pair exactly as sent: `b=2&a=1` and `a=1&b=2` are one
/// query, `a=1&a=2` and `a=2&a=1` are two.
///
/// Pairs are ordered by the name the upstream reads ([`sort_name`]), not by the bytes sent: sorted
/// by bytes, `a=1&%61=2` and `%61=2&a=1` would both become `%61=2&a=1`, one key for two answers
/// (the upstream reads `a` as `1, 2` from one and `2, 1` from the other).
fn canonical_query(query: &str, out: &mut String) {
    let mut pairs: Vec<(Vec<u8>, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| (sort_name(pair), pair))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (_, pair)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(pair);
    }
}

/// A pair's name as a server reads it: `+` is a space, `%XX` escapes decoded, and ASCII case
/// folded (ASP.NET, which serves Partner Center, matches query names case-insensitively). Two
/// names a server may read as one always sort equal, so their pairs keep their order; folding
/// more than a server does only keeps more pairs in the order sent.
fn sort_name(pair: &str) -> Vec<u8> {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    let spaced = name.replace('+', " ");
    let mut decoded: Vec<u8> = percent_encoding::percent_decode_str(&spaced).collect();
    decoded.make_ascii_lowercase();
    decoded
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
            credential: credential.map(crate::token::TokenSource::fixed),
            cache_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            origin_cache_control: Default::default(),
            coalesce: true,
            retry: true,
        }));
        request
    }

    fn key(uri: &str, headers: &[(&str, &str)]) -> Key {
        Key::of(&request(uri, headers, Some("app")), &[])
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
    fn percent_encoded_and_differently_cased_names_sort_with_their_plain_twins() {
        // `%73ize` is `size`: the two pairs keep the order they were sent in, as two `size`
        // pairs do, so the upstream's two readings (5 then 6, 6 then 5) get two keys.
        assert_ne!(
            key("/v1/invoices?%73ize=5&size=6", &[]),
            key("/v1/invoices?size=6&%73ize=5", &[])
        );
        assert_ne!(
            key("/v1/invoices?a=1&%61=2", &[]),
            key("/v1/invoices?%61=2&a=1", &[])
        );
        assert_ne!(
            key("/v1/invoices?Size=5&size=6", &[]),
            key("/v1/invoices?size=6&Size=5", &[])
        );
        assert_ne!(
            key("/v1/invoices?a+b=1&a%20b=2", &[]),
            key("/v1/invoices?a%20b=2&a+b=1", &[])
        );
        // Ordered among other names by the decoded name; pairs are kept as sent.
        assert_eq!(
            key("/v1/invoices?%73ize=5&offset=1&size=6", &[]),
            key("/v1/invoices?offset=1&%73ize=5&size=6", &[])
        );
        let mut text = String::new();
        canonical_query("size=6&%6Fffset=1&%73ize=5&a=0", &mut text);
        assert_eq!(text, "a=0&%6Fffset=1&size=6&%73ize=5");
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
            key("/v1/invoices/summary", &[("ms-contract-version", "v2")])
        );
        assert_ne!(
            base,
            key("/v1/invoices/summary", &[("content-type", "text/plain")])
        );
        // cache.key_headers: a configured header splits the key too, and only when configured.
        let tenant = [HeaderName::from_static("x-tenant")];
        let with = |value| {
            Key::of(
                &request("/v1/invoices/summary", &[("x-tenant", value)], Some("app")),
                &tenant,
            )
        };
        assert_ne!(with("a"), with("b"));
        assert_eq!(base, key("/v1/invoices/summary", &[("x-tenant", "a")]));
        assert_ne!(
            base,
            Key::of(&request("/v1/invoices/summary", &[], Some("user")), &[])
        );
        let mut head = request("/v1/invoices/summary", &[], Some("app"));
        *head.method_mut() = http::Method::HEAD;
        assert_ne!(base, Key::of(&head, &[]));
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
        assert_ne!(Key::of(&a, &[]), Key::of(&b, &[]));
        let mut c = request("/v1/a", &[("accept", "application/json")], Some("app"));
        c.headers_mut()
            .append("accept", "application/pdf".parse().unwrap());
        assert_ne!(
            Key::of(&c, &[]),
            key("/v1/a", &[("accept", "application/json")])
        );
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

    #[test]
    fn variants_split_on_the_vary_headers_values_wherever_they_are() {
        let base = key("/v1/invoices/summary", &[]);
        let names = [HeaderName::from_static("x-user")];
        let map = |pairs: &[(&str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in pairs {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            map
        };
        let none = http::HeaderMap::new();
        let a = base.variant(&names, &map(&[("x-user", "a")]), None);
        let b = base.variant(&names, &map(&[("x-user", "b")]), None);
        assert_ne!(a, b);
        assert_ne!(
            a,
            base.variant(&names, &none, None),
            "absent is a value of its own"
        );
        assert_ne!(
            base.variant(&names, &map(&[("x-user", "")]), None),
            base.variant(&names, &none, None),
            "an empty value is not an absent header (RFC 9111 §4.1)"
        );
        // Not forwarded: read from what access kept aside.
        assert_eq!(
            a,
            base.variant(&names, &none, Some(&map(&[("x-user", "a")])))
        );
        // Whitespace around commas, and one line or two, are the same value.
        assert_eq!(
            base.variant(&names, &map(&[("x-user", "a ,b")]), None),
            base.variant(&names, &map(&[("x-user", "a"), ("x-user", "b")]), None)
        );
        // Still the same path (purges cover it), and the value is not in the key as text.
        assert_eq!(a.path(), "/v1/invoices/summary");
        let secret = base.variant(&names, &map(&[("x-user", "s3cret-cookie")]), None);
        assert!(!secret.0.contains("s3cret"));
    }

    proptest::proptest! {
        /// Reversing a query's pairs reverses each name's pairs too: the key stays the same
        /// exactly when every name's sequence of pairs, as the upstream decodes names, reads
        /// the same both ways.
        #[test]
        fn reversed_queries_share_a_key_only_when_no_name_changes_order(
            pairs in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["a", "A", "%61", "%41", "b", "a+b", "a%20b", "%zz"]),
                    proptest::sample::select(vec!["1", "2", "", "%31"]),
                ),
                0..6,
            ),
        ) {
            let pairs: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
            let forward = key(&format!("/v1/a?{}", pairs.join("&")), &[]);
            let reversed: Vec<&str> = pairs.iter().rev().map(String::as_str).collect();
            let backward = key(&format!("/v1/a?{}", reversed.join("&")), &[]);
            let mut groups: std::collections::BTreeMap<Vec<u8>, Vec<&str>> = Default::default();
            for pair in &pairs {
                groups.entry(sort_name(pair)).or_default().push(pair);
            }
            let palindromes = groups.values().all(|g| g.iter().eq(g.iter().rev()));
            proptest::prop_assert_eq!(forward == backward, palindromes);
        }
    }
}
