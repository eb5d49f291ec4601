//! URLs in the config, parsed as it is read: `upstream.base_url` and each credential's `token_url`.

use std::fmt;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Why a configured URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a URL at all.
    #[error("`{text}` is not a URL ({reason})")]
    Syntax {
        /// What was configured.
        text: String,
        /// What the parser said.
        reason: String,
    },
    /// Neither `https://` nor `http://`.
    #[error("`{0}` must start with https:// (or http:// for a local sandbox)")]
    Scheme(String),
    /// No host after the scheme.
    #[error("`{0}` has no host")]
    NoHost(String),
    /// A base URL with a query: every call's own query goes there.
    #[error("`{0}` must not have a query")]
    Query(String),
}

fn parse_http(text: &str) -> Result<(Uri, Scheme), UrlError> {
    let uri: Uri = text
        .parse()
        .map_err(|e: http::uri::InvalidUri| UrlError::Syntax {
            text: text.to_owned(),
            reason: e.to_string(),
        })?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::HTTPS,
        Some("http") => Scheme::HTTP,
        _ => return Err(UrlError::Scheme(text.to_owned())),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost(text.to_owned()));
    }
    Ok((uri, scheme))
}

/// Whether an `http://` URL leaves this host (`localhost` and loopback IP literals stay).
fn is_clear_text_off_loopback(uri: &Uri) -> bool {
    uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !is_loopback_host(h))
}

/// `localhost`, or an IP literal on loopback (`127.0.0.0/8`, `[::1]`).
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `upstream.base_url`: `http(s)://host[:port][/prefix]`, split once as the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    text: String,
    scheme: Scheme,
    authority: Authority,
    /// A path prefix without the trailing `/` (usually empty).
    prefix: String,
}

impl BaseUrl {
    /// Parses and checks `http(s)://host[:port][/prefix]`.
    pub fn parse(text: &str) -> Result<BaseUrl, UrlError> {
        let (uri, scheme) = parse_http(text)?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UrlError::NoHost(text.to_owned()))?;
        if uri.query().is_some() {
            return Err(UrlError::Query(text.to_owned()));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(BaseUrl {
            text: text.to_owned(),
            scheme,
            authority,
            prefix,
        })
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it is `http://` to a host other than this one.
    pub fn is_clear_text_off_loopback(&self) -> bool {
        self.scheme == Scheme::HTTP && !is_loopback_host(self.authority.host())
    }

    /// The absolute upstream URI for an origin-form path and query (without a base path, the
    /// caller's own, shared rather than parsed again).
    pub fn join(&self, path_and_query: &PathAndQuery) -> Result<Uri, http::Error> {
        let pq: PathAndQuery = if self.prefix.is_empty() {
            path_and_query.clone()
        } else {
            format!("{}{}", self.prefix, path_and_query.as_str()).parse()?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `credentials.NAME.token_url`: an `http://` or `https://` URL with a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUrl {
    text: String,
    uri: Uri,
}

impl TokenUrl {
    /// Parses and checks an `http(s)://host/...` URL.
    pub fn parse(text: &str) -> Result<TokenUrl, UrlError> {
        let (uri, _) = parse_http(text)?;
        Ok(TokenUrl {
            text: text.to_owned(),
            uri,
        })
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it is `http://` to a host other than this one.
    pub fn is_clear_text_off_loopback(&self) -> bool {
        is_clear_text_off_loopback(&self.uri)
    }
}

impl fmt::Display for TokenUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

macro_rules! serde_as_text {
    ($type:ty) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$type>::parse(&text).map_err(de::Error::custom)
            }
        }

        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.text)
            }
        }
    };
}

serde_as_text!(BaseUrl);
serde_as_text!(TokenUrl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_joins_paths() {
        let base = BaseUrl::parse("https://api.example.com").unwrap();
        assert_eq!(
            base.join(&PathAndQuery::from_static("/v1/invoices?size=2"))
                .unwrap()
                .to_string(),
            "https://api.example.com/v1/invoices?size=2"
        );
        let base = BaseUrl::parse("http://127.0.0.1:9000/prefix/").unwrap();
        assert_eq!(
            base.join(&PathAndQuery::from_static("/v1/invoices"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9000/prefix/v1/invoices"
        );
        assert_eq!(base.as_str(), "http://127.0.0.1:9000/prefix/");
        assert!(matches!(
            BaseUrl::parse("ftp://x"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            BaseUrl::parse("/relative"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            BaseUrl::parse("https://x/?q=1"),
            Err(UrlError::Query(_))
        ));
    }

    #[test]
    fn token_urls_need_http_and_a_host() {
        assert!(TokenUrl::parse("https://login.example/t/oauth2/token").is_ok());
        assert!(matches!(
            TokenUrl::parse("ftp://login.example/t"),
            Err(UrlError::Scheme(_))
        ));
        assert!(TokenUrl::parse("not a url").is_err());
    }

    #[test]
    fn clear_text_is_told_apart_from_loopback() {
        let off = |text: &str| BaseUrl::parse(text).unwrap().is_clear_text_off_loopback();
        assert!(off("http://api.example"));
        assert!(!off("https://api.example"));
        assert!(!off("http://127.0.0.1:9100"));
        assert!(!off("http://[::1]:9100"));
        assert!(!off("http://localhost:9100"));
        let token = |text: &str| TokenUrl::parse(text).unwrap().is_clear_text_off_loopback();
        assert!(token("http://login.example/t"));
        assert!(!token("http://localhost:9100/t"));
    }
}
