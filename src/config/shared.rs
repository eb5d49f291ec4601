//! `[shared]`: the fleet tier (DESIGN.md §6). Parsed as it is read: the Redis URL into a
//! [`RedisUrl`] whose password never reaches a log line, `check-config` or `Debug`.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Each Redis operation's time limit when the config does not say; past it the operation is a miss.
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(50);
/// The longest `shared.timeout` accepted: it is added to a call's latency when Redis is frozen.
pub const MAX_SHARED_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `shared.namespace`.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// `[shared]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    /// `redis://`, `rediss://` (TLS; `upstream.ca_file` trusted) or `redis+unix://`.
    pub redis_url: RedisUrl,
    /// Key prefix: one per partner tenant; every sidecar of the tenant uses the same.
    pub namespace: String,
    /// Per Redis operation; past it the operation counts as a miss.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// A secret file holding the 32-byte key (64 hex digits or base64) that encrypts the
    /// App+User refresh tokens shared in Redis; unset: refresh tokens are not shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
}

fn default_timeout() -> Duration {
    DEFAULT_SHARED_TIMEOUT
}

impl SharedConfig {
    /// What serde cannot check: the namespace's characters and the timeout's range.
    pub fn validate(&self) -> Result<(), String> {
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > MAX_NAMESPACE_LEN
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "shared.namespace: `{ns}` must be 1 to {MAX_NAMESPACE_LEN} letters, digits, `-`, `_` or `.` (it is part of every Redis key; use the partner tenant's name)"
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_SHARED_TIMEOUT {
            return Err(format!(
                "shared.timeout: {} must be more than 0s and at most {} (every call may wait this long when Redis does not answer)",
                humantime::format_duration(self.timeout),
                humantime::format_duration(MAX_SHARED_TIMEOUT)
            ));
        }
        Ok(())
    }
}

/// The Redis URL: checked (scheme, host or socket path) as it is read; shown with its password
/// replaced by `redacted` everywhere but [`RedisUrl::expose`].
#[derive(Clone)]
pub struct RedisUrl {
    text: String,
    shown: String,
}

/// Why `shared.redis_url` was refused (the message never holds the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` {reason}")]
pub struct RedisUrlError {
    shown: String,
    reason: &'static str,
}

impl RedisUrl {
    /// Parses and checks `redis://`, `rediss://` or `redis+unix://`.
    pub fn parse(text: &str) -> Result<RedisUrl, RedisUrlError> {
        let fail = |shown: String, reason| RedisUrlError { shown, reason };
        let url = url::Url::parse(text)
            .map_err(|_| fail("(not shown)".into(), "is not a URL: use redis://host:6379"))?;
        let shown = redact(&url);
        match url.scheme() {
            "redis" | "rediss" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(fail(shown, "has no host"));
                }
            }
            "redis+unix" | "unix" => {
                if url.path().is_empty() || url.path() == "/" {
                    return Err(fail(shown, "has no socket path"));
                }
            }
            _ => {
                return Err(fail(
                    shown,
                    "must start with redis://, rediss:// (TLS) or redis+unix://",
                ))
            }
        }
        // What `run` hands the redis crate: a URL it cannot read fails here, not at start.
        redis::Client::open(text)
            .map_err(|_| fail(shown.clone(), "is not a Redis URL the client accepts"))?;
        Ok(RedisUrl {
            text: text.to_owned(),
            shown,
        })
    }

    /// The URL with its password, for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Whether it is `rediss://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.text.starts_with("rediss://")
    }
}

/// Query parameters that carry credentials (`redis+unix:///sock?user=app&pass=...`).
const SECRET_PARAMS: [&str; 4] = ["pass", "password", "user", "username"];

/// The URL with any password, and the values of credential query parameters, replaced by
/// `redacted`.
fn redact(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("redacted"));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let secret = SECRET_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p));
                let value = if secret { "redacted".into() } else { value };
                (name.into_owned(), value.into_owned())
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.shown)
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        RedisUrl::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        let url = RedisUrl::parse("redis://:hunter2-pw@127.0.0.1:6379/0").unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("hunter2-pw"), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
        assert!(url.expose().contains("hunter2-pw"));
        let user = RedisUrl::parse("rediss://app:s3cr3t@redis.example:6380").unwrap();
        assert!(!user.to_string().contains("s3cr3t"));
        assert!(user.is_tls());
        let err = RedisUrl::parse("http://:hunter2-pw@127.0.0.1:6379")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("hunter2-pw") && err.contains("redis://"),
            "{err}"
        );
    }

    #[test]
    fn credentials_in_a_unix_socket_urls_query_are_never_shown() {
        let url = RedisUrl::parse("redis+unix:///run/redis.sock?db=2&user=app-usr&pass=hunter2-pw")
            .unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(
                !shown.contains("hunter2-pw") && !shown.contains("app-usr"),
                "{shown}"
            );
            assert!(
                shown.contains("db=2") && shown.contains("pass=redacted"),
                "{shown}"
            );
        }
        assert!(url.expose().contains("pass=hunter2-pw"));
        let config: SharedConfig = toml::from_str(
            "redis_url = \"redis+unix:///run/redis.sock?password=hunter2-pw\"\nnamespace = \"t\"\n",
        )
        .unwrap();
        let serialized = toml::to_string(&config).unwrap();
        assert!(!serialized.contains("hunter2-pw"), "{serialized}");
        assert!(!format!("{config:?}").contains("hunter2-pw"));
        // A URL the client refuses names it redacted too.
        let err = RedisUrl::parse("redis+unix://?pass=hunter2-pw")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2-pw"), "{err}");
    }

    #[test]
    fn the_schemes_redis_rediss_and_unix_sockets_are_accepted() {
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://localhost",
            "rediss://redis.example:6380/1",
            "redis+unix:///run/redis/redis.sock",
        ] {
            RedisUrl::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "127.0.0.1:6379",
            "memcached://x",
            "redis://",
            "redis+unix://",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
