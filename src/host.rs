//! Which `Host` a listener answers (DNS rebinding defence) and which `Origin` the admin port
//! accepts (cross-site request defence).
//!
//! A rebinding attack makes a browser send a request for an attacker's name to 127.0.0.1: the
//! request carries the attacker's name in `Host`. Probes and scrapers address a pod by its IP, and
//! local callers use `127.0.0.1` or `localhost`, so answering only IP literals, `localhost` and the
//! names an operator lists (`server.admin_hosts`) stops rebinding without breaking them.

use std::sync::Arc;

use http::header;

/// The names a listener answers besides IP literals and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct HostRule {
    names: Arc<[String]>,
}

/// Why a request was refused by [`HostRule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// `Host` names a host this listener does not answer for (421).
    #[error("this listener does not answer for host `{0}`: call it by IP address or localhost, or list the name in server.admin_hosts")]
    Misdirected(String),
    /// `Origin` is another site's (403).
    #[error("requests from web pages of another origin ({0}) are refused")]
    ForeignOrigin(String),
}

impl HostRule {
    /// IP literals, `localhost`, and these names (case-insensitive).
    pub fn new(names: &[String]) -> HostRule {
        HostRule {
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Checks the request's host: `:authority` (HTTP/2, absolute form) or else `Host`. A request
    /// with neither (HTTP/1.0) names no host and passes: a browser always sends one.
    pub fn check_host<B>(&self, request: &http::Request<B>) -> Result<(), HostError> {
        // Borrowed, not copied: a valid UTF-8 `Host` (every real one) is read where it is.
        let sent;
        let host = match request.uri().authority() {
            Some(authority) => Some(authority.host()),
            None => match request.headers().get(header::HOST) {
                Some(value) => {
                    sent = String::from_utf8_lossy(value.as_bytes());
                    Some(host_of(&sent))
                }
                None => None,
            },
        };
        match host {
            Some(host) if !self.allows(host) => Err(HostError::Misdirected(printable(host))),
            _ => Ok(()),
        }
    }

    /// Checks `Origin`: absent, or the same scheme-less authority as `Host` (the page is served
    /// by this very listener). `null` and every other origin are refused.
    pub fn check_origin<B>(&self, request: &http::Request<B>) -> Result<(), HostError> {
        let Some(origin) = request.headers().get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let own = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            });
        let origin_authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        match (origin_authority, own) {
            (Some(theirs), Some(own)) if theirs.eq_ignore_ascii_case(&own) => Ok(()),
            _ => Err(HostError::ForeignOrigin(printable(&origin))),
        }
    }

    fn allows(&self, host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || host.eq_ignore_ascii_case("localhost")
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(host))
    }
}

/// The host part of a `Host` value: without the port, brackets kept for IPv6.
fn host_of(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    value.rsplit_once(':').map_or(value, |(host, _)| host)
}

/// At most 100 characters, control characters replaced: safe for a log line and an error body.
fn printable(text: &str) -> String {
    text.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>, origin: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::get("/metrics");
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        if let Some(origin) = origin {
            builder = builder.header("origin", origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn ip_literals_localhost_and_listed_names_are_answered() {
        let rule = HostRule::new(&["pcgate.billing.svc".to_owned()]);
        for host in [
            "127.0.0.1:9090",
            "10.1.2.3:9090",
            "10.1.2.3",
            "[::1]:9090",
            "[fd00::5]",
            "localhost:9090",
            "LOCALHOST",
            "pcgate.billing.svc:9090",
            "PCGATE.billing.svc",
        ] {
            assert_eq!(
                rule.check_host(&request(Some(host), None)),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(rule.check_host(&request(None, None)), Ok(()));
    }

    #[test]
    fn other_names_are_misdirected() {
        let rule = HostRule::new(&[]);
        for host in [
            "attacker.example:9090",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "pcgate.billing.svc",
        ] {
            assert!(
                matches!(
                    rule.check_host(&request(Some(host), None)),
                    Err(HostError::Misdirected(_))
                ),
                "{host}"
            );
        }
        let absolute = http::Request::get("http://attacker.example/metrics")
            .header("host", "127.0.0.1")
            .body(())
            .unwrap();
        assert!(rule.check_host(&absolute).is_err());
    }

    #[test]
    fn only_the_listener_s_own_origin_is_accepted() {
        let rule = HostRule::new(&[]);
        let host = Some("127.0.0.1:9090");
        assert_eq!(rule.check_origin(&request(host, None)), Ok(()));
        assert_eq!(
            rule.check_origin(&request(host, Some("http://127.0.0.1:9090"))),
            Ok(())
        );
        for origin in [
            "https://evil.example",
            "http://127.0.0.1:8080",
            "null",
            "http://localhost:9090",
        ] {
            assert!(
                matches!(
                    rule.check_origin(&request(host, Some(origin))),
                    Err(HostError::ForeignOrigin(_))
                ),
                "{origin}"
            );
        }
    }
}
