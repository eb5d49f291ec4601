//! The route table: which calls pcgate forwards, and with what policy.
//!
//! Each route's patterns ([`crate::config::Pattern`], parsed with the config) are matched in table
//! order. Paths are normalised before matching (see [`normalize_path`]) and the normalised path is
//! the one sent upstream, so what was matched is what is forwarded. Each route's credential is
//! resolved to its [`TokenSource`] when the table is built, so no call looks a name up.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::config::{OriginCacheControl, Pattern, RouteConfig};
use crate::token::{TokenSource, TokenSources};

/// The route label of a call no route matched (or that never reached `access`), in logs and
/// metrics alike.
pub const NO_ROUTE: &str = "none";

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

/// A normalised path: its decoded segments and the canonical encoded form sent upstream. Both
/// borrow the request's path when it is already canonical (plain ASCII, nothing encoded: every
/// Partner Center path), so the usual call allocates nothing here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath<'a> {
    /// `/` and the decoded segments joined by `/` (a decoded segment never holds one).
    decoded: Cow<'a, str>,
    encoded: Cow<'a, str>,
}

impl NormalPath<'_> {
    /// The canonical percent-encoded path (`/v1/invoices/D123`).
    pub fn as_str(&self) -> &str {
        &self.encoded
    }

    /// The decoded segments.
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.decoded[1..].split('/')
    }

    /// Whether the canonical form is the path as it came.
    pub fn is_as_sent(&self) -> bool {
        matches!(self.encoded, Cow::Borrowed(_))
    }
}

/// Bytes a canonical path may hold as they are: unreserved characters (RFC 3986 §2.3), which
/// decode and encode to themselves, and the separator.
fn plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/')
}

/// Decodes and checks a request path. Anything that could make the upstream see a different path
/// than the one matched is refused rather than repaired: dot segments (also as `%2e`), empty
/// segments, encoded separators, control characters.
pub fn normalize_path(raw: &str) -> Result<NormalPath<'_>, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if raw.contains('\\') {
        return Err(PathError::HiddenSeparator);
    }
    if raw.bytes().all(plain) {
        // Nothing to decode: only the segment rules apply.
        for piece in rest.split('/') {
            match piece {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
        return Ok(NormalPath {
            decoded: Cow::Borrowed(raw),
            encoded: Cow::Borrowed(raw),
        });
    }
    let mut decoded_path = String::with_capacity(raw.len());
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
        decoded_path.push('/');
        decoded_path.push_str(&decoded);
    }
    Ok(NormalPath {
        decoded: Cow::Owned(decoded_path),
        encoded: Cow::Owned(encoded),
    })
}

/// What a matched route asks of the inner layers; put in the request's extensions by `access`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Label for logs and metrics (shared, so labelling a metric does not allocate).
    pub name: Arc<str>,
    /// The token source of the credential whose token is sent upstream.
    pub credential: Option<TokenSource>,
    /// Cache freshness for 200 responses.
    pub cache_ttl: Option<Duration>,
    /// Serve-stale-while-refreshing window after the TTL.
    pub stale_while_revalidate: Option<Duration>,
    /// Serve-stale-on-failure window after the TTL.
    pub stale_if_error: Option<Duration>,
    /// Whether the upstream's caching headers override the route's windows.
    pub origin_cache_control: OriginCacheControl,
    /// Share identical in-flight calls.
    pub coalesce: bool,
    /// Retry transient failures.
    pub retry: bool,
}

/// Why the route table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A route names a credential that has no token source.
    #[error("route `{route}`: credential `{credential}` is not configured: add [credentials.{credential}] or change the route")]
    UnknownCredential {
        /// The route's name.
        route: String,
        /// The credential it names.
        credential: String,
    },
}

/// The ordered route table; first match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    entries: Vec<(Pattern, Arc<Route>)>,
    /// The token sources some route uses, once each, in table order.
    credentials: Vec<TokenSource>,
}

impl RouteTable {
    /// A copy whose routes are its own (a call clones its route; see
    /// [`crate::stack::Layers::lane`]); the token sources are the same.
    pub fn lane(&self) -> RouteTable {
        RouteTable {
            entries: self
                .entries
                .iter()
                .map(|(pattern, route)| {
                    let copy = Route {
                        name: Arc::from(&*route.name),
                        ..Route::clone(route)
                    };
                    (pattern.clone(), Arc::new(copy))
                })
                .collect(),
            credentials: self.credentials.clone(),
        }
    }

    /// Builds the table from the config's routes, each credential resolved to its source.
    pub fn new(routes: &[RouteConfig], tokens: &TokenSources) -> Result<RouteTable, RouteError> {
        let mut entries = Vec::new();
        let mut credentials: Vec<TokenSource> = Vec::new();
        for config in routes {
            let credential = match &config.credential {
                None => None,
                Some(name) => Some(tokens.get(name).cloned().ok_or_else(|| {
                    RouteError::UnknownCredential {
                        route: config.name().to_owned(),
                        credential: name.clone(),
                    }
                })?),
            };
            if let Some(source) = &credential {
                if !credentials.iter().any(|known| known.same_as(source)) {
                    credentials.push(source.clone());
                }
            }
            let route = Arc::new(Route {
                name: config.name().into(),
                credential,
                cache_ttl: config.cache_ttl,
                stale_while_revalidate: config.stale_while_revalidate,
                stale_if_error: config.stale_if_error,
                origin_cache_control: config.origin_cache_control,
                coalesce: config.coalesce,
                retry: config.retry,
            });
            for pattern in config.patterns.as_slice() {
                entries.push((pattern.clone(), route.clone()));
            }
        }
        Ok(RouteTable {
            entries,
            credentials,
        })
    }

    /// The first route whose pattern matches.
    pub fn find(&self, method: &Method, path: &NormalPath) -> Option<&Arc<Route>> {
        self.entries
            .iter()
            .find(|(pattern, _)| pattern.matches(method, path.segments()))
            .map(|(_, route)| route)
    }

    /// The token sources some route uses, once each: readiness waits for these.
    pub fn credentials(&self) -> &[TokenSource] {
        &self.credentials
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table() -> RouteTable {
        let config = Config::from_toml(include_str!("../config/pcgate.toml")).unwrap();
        RouteTable::new(&config.routes, &TokenSources::fixed(&["app", "user"])).unwrap()
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
        let table = RouteTable::new(&config.routes, &TokenSources::default()).unwrap();
        let find = |p: &str| {
            table
                .find(&Method::GET, &normalize_path(p).unwrap())
                .unwrap()
                .name
                .to_string()
        };
        assert_eq!(find("/v1/invoices/summary"), "specific");
        assert_eq!(find("/v1/invoices/D1"), "general");
        assert!(table.credentials().is_empty());
    }

    #[test]
    fn each_route_holds_its_credentials_source_resolved_once() {
        let tokens = TokenSources::fixed(&["app", "user", "unused"]);
        let config = Config::from_toml(include_str!("../config/pcgate.toml")).unwrap();
        let table = RouteTable::new(&config.routes, &tokens).unwrap();
        let source = |path: &str| {
            table
                .find(&Method::GET, &normalize_path(path).unwrap())
                .and_then(|r| r.credential.clone())
                .unwrap()
        };
        // The very handles the sources hold, not copies found by name per call.
        assert!(source("/v1/invoices/summary").same_as(tokens.get("app").unwrap()));
        assert!(source("/v1/invoices/D1").same_as(tokens.get("user").unwrap()));
        // Readiness waits for these: every credential some route uses, once each, no other.
        let used: Vec<&str> = table.credentials().iter().map(TokenSource::name).collect();
        assert_eq!(used, ["app", "user"]);
        assert!(table.credentials()[0].same_as(tokens.get("app").unwrap()));
    }

    #[test]
    fn a_route_naming_a_missing_credential_is_a_typed_error() {
        let config = Config::from_toml(include_str!("../config/pcgate.toml")).unwrap();
        let error = RouteTable::new(&config.routes, &TokenSources::fixed(&["app"])).unwrap_err();
        assert_eq!(
            error,
            RouteError::UnknownCredential {
                route: "summaries".into(),
                credential: "user".into()
            }
        );
        assert!(error.to_string().contains("[credentials.user]"), "{error}");
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
        assert_eq!(p.segments().nth(2), Some("a b"));
        assert_eq!(
            route("GET", "/v1/%69nvoices/summary").as_deref(),
            Some("summary")
        );
    }
}
