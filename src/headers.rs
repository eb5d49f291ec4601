//! The header vocabulary, in one place: the Partner Center request headers (reference §1.1–1.2),
//! which request headers go upstream, the hop-by-hop headers of RFC 9110 §7.6.1, and what a
//! stored or shared answer drops. Layers decide what to do with them; the names live here.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `MS-RequestId`: the call's idempotency key.
pub const MS_REQUEST_ID: HeaderName = HeaderName::from_static("ms-requestid");
/// `MS-CorrelationId`: ties the calls of one operation together.
pub const MS_CORRELATION_ID: HeaderName = HeaderName::from_static("ms-correlationid");
/// `MS-CV`: the correlation vector, one step per upstream attempt.
pub const MS_CV: HeaderName = HeaderName::from_static("ms-cv");
/// `X-Locale`: the language of the answer.
pub const X_LOCALE: HeaderName = HeaderName::from_static("x-locale");
/// `MS-PartnerCenter-Application`: the calling application's name.
pub const MS_APPLICATION: HeaderName = HeaderName::from_static("ms-partnercenter-application");
/// `MS-ContinuationToken`: pages of seek-paged collections differ only by this header.
pub const MS_CONTINUATION_TOKEN: HeaderName = HeaderName::from_static("ms-continuationtoken");
/// `MS-Contract-Version`: the API version.
pub const MS_CONTRACT_VERSION: HeaderName = HeaderName::from_static("ms-contract-version");
/// `Cache-Status` (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The request headers forwarded upstream: those the Partner Center REST headers page documents
/// and its SDKs send (reference §1.1–1.2), the seek-paging header (§5.5), and the body's framing.
/// `Authorization` and `Host` are pcgate's own to set. Every one that can change an answer is in
/// the cache key (`layer::cache::key`); the tracking ids and the SDK's self-description cannot.
pub const FORWARDED: [HeaderName; 19] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    X_LOCALE,
    MS_REQUEST_ID,
    MS_CORRELATION_ID,
    MS_CV,
    MS_APPLICATION,
    MS_CONTRACT_VERSION,
    MS_CONTINUATION_TOKEN,
    header::IF_MATCH,
    HeaderName::from_static("ms-partnercenter-client"),
    HeaderName::from_static("ms-sdkversion"),
    // Conditional and partial requests (RFC 9110 §13, §14): a request carrying one is never
    // answered from the cache nor shared (`layer::cache::shareable`), so it needs no key.
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Request headers no configuration may forward or key on: credentials (the caller's cookies and
/// `Authorization` are never the upstream's business), `Host` (pcgate's own), and the hop-by-hop
/// headers of RFC 9110 §7.6.1, which belong to one connection.
pub const NEVER_FORWARDED: [&str; 12] = [
    "cookie",
    "authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Checks a header name from `upstream.forward_headers` or `cache.key_headers` (`key` names the
/// list in the message): a valid name, and not one that is never forwarded.
pub fn configured_header(key: &str, name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{key}: `{name}` is not a valid header name"))?;
    if NEVER_FORWARDED.contains(&parsed.as_str()) {
        return Err(format!(
            "{key}: `{name}` is never forwarded (credentials, Host and hop-by-hop headers stay with pcgate): remove it"
        ));
    }
    if parsed == header::CACHE_CONTROL {
        return Err(format!(
            "{key}: `{name}` is read by pcgate's cache, not forwarded: remove it"
        ));
    }
    Ok(parsed)
}

/// A copy of `value` in bytes of its own: a clone shares (and counts references to) the bytes it
/// came from, and a copy per lane keeps two cores from writing one count on every call.
pub fn own_value(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// A copy of `name` in bytes of its own (see [`own_value`]); a standard name has none to copy.
pub fn own_name(name: &HeaderName) -> HeaderName {
    HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone())
}

/// Whether `name` is forwarded upstream given the configured extra list.
pub fn is_forwarded(name: &HeaderName, extra: &[HeaderName]) -> bool {
    FORWARDED.contains(name) || extra.contains(name)
}

/// Response headers that belong to one caller's exchange and never reach another caller through a
/// stored or shared copy: cookies, the tracking ids (each call stamps its own), and `Age` and
/// `Cache-Status` (set per answer).
pub const NOT_SHARED: [HeaderName; 6] = [
    header::SET_COOKIE,
    MS_REQUEST_ID,
    MS_CORRELATION_ID,
    MS_CV,
    header::AGE,
    CACHE_STATUS,
];

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        // `Host` is end-to-end by definition, and the `Host` rule must see it.
        .filter(|name| *name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    strip_fixed_hop_by_hop(headers);
}

/// The hop-by-hop headers RFC 9110 §7.6.1 names, and the two older ones still seen.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop headers RFC 9110 §7.6.1 names, but not those a `Connection` header lists.
pub fn strip_fixed_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at the names present, then removals only if needed.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("te", "trailers".parse().unwrap());
        headers.insert("upgrade", "h2c".parse().unwrap());
        headers.insert("proxy-authorization", "Basic x".parse().unwrap());
        headers.insert("accept", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
    }

    #[test]
    fn a_connection_header_cannot_remove_host() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "host, x-private".parse().unwrap());
        headers.insert("host", "evil.example".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers["host"], "evil.example");
        assert!(!headers.contains_key("x-private"));
    }
}
