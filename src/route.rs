//! The route table: which calls pcgate forwards, and with what policy.
//!
//! A pattern is `"METHOD /path"` where a path segment is a literal, `*` (exactly one segment) or a
//! final `**` (one or more segments). A `GET` pattern also admits `HEAD`. Paths are normalised
//! before matching (see [`normalize_path`]) and the normalised path is the one sent upstream, so
//! what was matched is what is forwarded.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::config::RouteConfig;

/// Characters escaped when a decoded segment is written back (RFC 3986 §3.3 `pchar` complement).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Why a request path was refused before matching.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (`*`, an empty path).
    #[error("the path must start with `/`")]
    NotAbsolute,
    /// `//` or a trailing `/`.
    #[error("the path has an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    /// `.` or `..`, plain or percent-encoded.
    #[error("the path has a `.` or `..` segment")]
    DotSegment,
    /// `%2F` or `%5C`, or a raw backslash: a separator hidden inside a segment.
    #[error("the path has an encoded `/` or a `\\`")]
    HiddenSeparator,
    /// `;` in a segment (a path parameter, `..;/` or `;jsessionid=`): Partner Center paths have
    /// none, and servers that honour them would see a different path than the one matched.
    #[error("the path has a `;` (path parameters are not allowed)")]
    PathParameter,
    /// Control characters or bytes that are not UTF-8 after decoding.
    #[error("the path has control characters or invalid UTF-8")]
    BadBytes,
}

/// A normalised path: its decoded segments and the canonical encoded form sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    segments: Vec<String>,
    encoded: String,
}

impl NormalPath {
    /// The canonical percent-encoded path (`/v1/invoices/D123`).
    pub fn as_str(&self) -> &str {
        &self.encoded
    }

    /// The decoded segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

/// Decodes and checks a request path. Anything that could make the upstream see a different path
/// than the one matched is refused rather than repaired: dot segments (also as `%2e`), empty
/// segments, encoded separators, control characters.
pub fn normalize_path(raw: &str) -> Result<NormalPath, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if raw.contains('\\') {
        return Err(PathError::HiddenSeparator);
    }
    let mut segments = Vec::new();
    let mut encoded = String::with_capacity(raw.len());
    for piece in rest.split('/') {
        if piece.is_empty() {
            return Err(PathError::EmptySegment);
        }
        let decoded = percent_decode_str(piece)
            .decode_utf8()
            .map_err(|_| PathError::BadBytes)?;
        if decoded.contains(['/', '\\']) {
            return Err(PathError::HiddenSeparator);
        }
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        // Raw or encoded: a decoded `;` would be sent on as a raw one.
        if decoded.contains(';') {
            return Err(PathError::PathParameter);
        }
        if decoded.chars().any(char::is_control) {
            return Err(PathError::BadBytes);
        }
        encoded.push('/');
        encoded.extend(utf8_percent_encode(&decoded, SEGMENT));
        segments.push(decoded.into_owned());
    }
    Ok(NormalPath { segments, encoded })
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A parsed `"METHOD /path"` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    method: Method,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `"GET /v1/invoices/*/lineitems/**"`.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("pattern `{text}` must be `METHOD /path`"))?;
        // Methods are case-sensitive (RFC 9110 §9.1): `get` would be a method of its own that
        // never matches a real call, so only the standard ones, in capitals, are accepted.
        const METHODS: [&str; 8] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
        ];
        if !METHODS.contains(&method) {
            return Err(format!(
                "pattern `{text}`: `{method}` is not an HTTP method (use one of {})",
                METHODS.join(", ")
            ));
        }
        let method: Method = method
            .parse()
            .map_err(|_| format!("pattern `{text}`: `{method}` is not an HTTP method"))?;
        let path = path.trim();
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| format!("pattern `{text}`: the path must start with `/`"))?;
        let pieces: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            segments.push(match *piece {
                "" => return Err(format!("pattern `{text}` has an empty segment")),
                "*" => Segment::One,
                "**" if i + 1 == pieces.len() => Segment::Rest,
                "**" => {
                    return Err(format!(
                        "pattern `{text}`: `**` may only be the last segment"
                    ))
                }
                literal if literal.contains('*') => {
                    return Err(format!(
                        "pattern `{text}`: `*` must be a whole segment (`/a/*/b`), not part of one"
                    ))
                }
                literal => Segment::Literal(literal.to_owned()),
            });
        }
        Ok(Pattern { method, segments })
    }

    /// Whether a request with this method and path matches.
    pub fn matches(&self, method: &Method, path: &NormalPath) -> bool {
        let method_ok =
            self.method == method || (self.method == Method::GET && method == Method::HEAD);
        method_ok && segments_match(&self.segments, path.segments())
    }
}

fn segments_match(pattern: &[Segment], path: &[String]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (None, None) => true,
        (Some((Segment::Rest, _)), _) => !path.is_empty(),
        (Some((Segment::One, p)), Some((_, rest))) => segments_match(p, rest),
        (Some((Segment::Literal(lit), p)), Some((seg, rest))) => {
            lit == seg && segments_match(p, rest)
        }
        _ => false,
    }
}

/// What a matched route asks of the inner layers; put in the request's extensions by `access`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Label for logs and metrics (shared, so labelling a metric does not allocate).
    pub name: Arc<str>,
    /// The credential whose token is sent upstream.
    pub credential: Option<String>,
    /// Cache freshness for 200 responses.
    pub cache_ttl: Option<Duration>,
    /// Serve-stale-while-refreshing window after the TTL.
    pub stale_while_revalidate: Option<Duration>,
    /// Serve-stale-on-failure window after the TTL.
    pub stale_if_error: Option<Duration>,
    /// Share identical in-flight calls.
    pub coalesce: bool,
    /// Retry transient failures.
    pub retry: bool,
}

/// The ordered route table; first match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    entries: Vec<(Pattern, Arc<Route>)>,
}

impl RouteTable {
    /// Builds the table from validated config.
    pub fn new(routes: &[RouteConfig]) -> Result<RouteTable, String> {
        let mut entries = Vec::new();
        for config in routes {
            let route = Arc::new(Route {
                name: config.name().into(),
                credential: config.credential.clone(),
                cache_ttl: config.cache_ttl,
                stale_while_revalidate: config.stale_while_revalidate,
                stale_if_error: config.stale_if_error,
                coalesce: config.coalesce,
                retry: config.retry,
            });
            for text in config.patterns.as_slice() {
                entries.push((Pattern::parse(text)?, route.clone()));
            }
        }
        Ok(RouteTable { entries })
    }

    /// The first route whose pattern matches.
    pub fn find(&self, method: &Method, path: &NormalPath) -> Option<&Arc<Route>> {
        self.entries
            .iter()
            .find(|(pattern, _)| pattern.matches(method, path))
            .map(|(_, route)| route)
    }

    /// Every route, once each, in table order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        let mut seen: Vec<&Arc<Route>> = Vec::new();
        self.entries.iter().filter_map(move |(_, route)| {
            if seen.iter().any(|r| Arc::ptr_eq(r, route)) {
                None
            } else {
                seen.push(route);
                Some(route)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table() -> RouteTable {
        let config = Config::from_toml(include_str!("../config/pcgate.toml")).unwrap();
        RouteTable::new(&config.routes).unwrap()
    }

    fn route(method: &str, path: &str) -> Option<String> {
        let path = normalize_path(path).ok()?;
        table()
            .find(&method.parse().unwrap(), &path)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn default_table_routes_the_billing_calls() {
        assert_eq!(
            route("GET", "/v1/invoices/summary").as_deref(),
            Some("summary")
        );
        assert_eq!(
            route("GET", "/v1/invoices/summaries").as_deref(),
            Some("summaries")
        );
        assert_eq!(route("GET", "/v1/invoices").as_deref(), Some("invoices"));
        assert_eq!(route("HEAD", "/v1/invoices").as_deref(), Some("invoices"));
        assert_eq!(
            route("GET", "/v1/invoices/D0200ABC").as_deref(),
            Some("invoice")
        );
        assert_eq!(
            route("GET", "/v1/invoices/D1/lineitems").as_deref(),
            Some("invoice_lineitems")
        );
        assert_eq!(
            route("GET", "/v1/invoices/D1/lineitems/OneTime/BillingLineItems").as_deref(),
            Some("invoice_lineitems")
        );
        assert_eq!(
            route("GET", "/v1/invoices/D1/documents/statement").as_deref(),
            Some("invoice_documents")
        );
        assert_eq!(
            route("GET", "/v1/invoices/D1/receipts/R1/documents/statement").as_deref(),
            Some("invoice_documents")
        );
    }

    #[test]
    fn everything_else_is_refused() {
        assert_eq!(route("POST", "/v1/invoices"), None);
        assert_eq!(route("DELETE", "/v1/invoices/D1"), None);
        assert_eq!(route("GET", "/v1/customers"), None);
        assert_eq!(route("GET", "/v1/invoices/D1/other"), None);
        assert_eq!(route("GET", "/v1"), None);
        assert_eq!(route("GET", "/v1/invoices/D1/documents"), None);
    }

    #[test]
    fn star_is_one_segment_and_double_star_the_rest() {
        let p = Pattern::parse("GET /a/*/c/**").unwrap();
        let m = |path: &str| p.matches(&Method::GET, &normalize_path(path).unwrap());
        assert!(m("/a/b/c/d"));
        assert!(m("/a/b/c/d/e/f"));
        assert!(!m("/a/b/c"));
        assert!(!m("/a/b/x/c/d"));
        assert!(!m("/a/c/d"));
        assert!(Pattern::parse("GET /a/**/b").is_err());
        assert!(Pattern::parse("GET /a/b*").is_err());
        assert!(Pattern::parse("/a").is_err());
        assert!(Pattern::parse("GET a").is_err());
        assert!(Pattern::parse("get /a").is_err());
        assert!(Pattern::parse("FETCH /a").is_err());
        assert!(Pattern::parse("CONNECT /a").is_err());
    }

    #[test]
    fn first_match_wins() {
        let config = Config::from_toml(
            r#"
            [[routes]]
            name = "specific"
            match = "GET /v1/invoices/summary"
            [[routes]]
            name = "general"
            match = "GET /v1/invoices/*"
            "#,
        )
        .unwrap();
        let table = RouteTable::new(&config.routes).unwrap();
        let find = |p: &str| {
            table
                .find(&Method::GET, &normalize_path(p).unwrap())
                .unwrap()
                .name
                .to_string()
        };
        assert_eq!(find("/v1/invoices/summary"), "specific");
        assert_eq!(find("/v1/invoices/D1"), "general");
        assert_eq!(table.routes().count(), 2);
    }

    #[test]
    fn traversal_and_hidden_separators_are_refused() {
        for bad in [
            "/v1/invoices/../customers",
            "/v1/invoices/%2e%2e/customers",
            "/v1/invoices/%2E%2e/customers",
            "/v1/invoices/./summary",
            "/v1/invoices/%2e/summary",
            "/v1//invoices",
            "/v1/invoices/",
            "/v1/invoices%2fsummary",
            "/v1/invoices%2F..%2Fcustomers",
            "/v1/invoices%5csummary",
            "/v1\\invoices",
            "/v1/invoices/%00",
            "/v1/invoices/%ff",
            "/v1/invoices/..;/customers",
            "/v1/invoices;jsessionid=1/summary",
            "/v1/invoices/summary;x",
            "/v1/invoices/D1%3B/lineitems",
            "*",
            "",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn harmless_encodings_are_decoded_and_written_canonically() {
        let p = normalize_path("/v1/%69nvoices/summary").unwrap();
        assert_eq!(p.as_str(), "/v1/invoices/summary");
        let p = normalize_path("/v1/invoices/a%20b").unwrap();
        assert_eq!(p.as_str(), "/v1/invoices/a%20b");
        assert_eq!(p.segments()[2], "a b");
        assert_eq!(
            route("GET", "/v1/%69nvoices/summary").as_deref(),
            Some("summary")
        );
    }
}
