//! Configuration: built-in defaults, then the TOML file, then `PCGATE_` environment variables with
//! `__` for nesting (`PCGATE_UPSTREAM__BASE_URL`), merged by figment into one tree of structs.
//!
//! Every struct denies unknown keys, durations are humantime strings (`"250ms"`, `"5m"`) and sizes
//! are strings (`"64MiB"`). Values with a shape of their own are parsed into types as they are
//! read ([`Pattern`], [`BaseUrl`], [`TokenUrl`], [`KeySha256`], [`CredentialConfig`] by `grant`),
//! so a bad one is a parse error naming its key; [`Config::validate`] checks what serde cannot
//! (references between sections, numbers in range), with messages that name the key and the fix.
//!
//! This module imports neither `route` nor `upstream`: they consume its types.

mod credential;
mod pattern;
mod rate;
mod shared;
mod url;

pub use credential::{
    AppCredential, Audience, BearerToken, ClientSecret, CredentialConfig, CredentialError, Grant,
    StaticCredential, UserCredential, AUTHORITY_HOST_ENV, CLIENT_ID_ENV, DEFAULT_AUTHORITY_HOST,
    FEDERATED_TOKEN_ENV, TENANT_ENV,
};
pub use pattern::{Pattern, PatternError, Patterns};
pub use rate::RateLimit;
pub use shared::{RedisUrl, RedisUrlError, SharedConfig, DEFAULT_SHARED_TIMEOUT};
pub use url::{BaseUrl, TokenUrl, UrlError};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Where the gateway listens when the config does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the admin endpoints listen when the config does not say.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// How long in-flight calls may finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a client may take to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = crate::server::DEFAULT_HEADER_READ_TIMEOUT;
/// How long a connection may stay open with no call in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = crate::server::DEFAULT_IDLE_TIMEOUT;
/// The public Partner Center API.
pub const DEFAULT_BASE_URL: &str = "https://api.partnercenter.microsoft.com";
/// Time allowed for a TCP + TLS connect to the upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one upstream attempt, until the response headers arrive.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the whole call, all retries included.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// How long before expiry a token is refreshed.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// The Partner Center API audience for v1 token endpoints.
pub const DEFAULT_RESOURCE: &str = "https://api.partnercenter.microsoft.com";
/// `MS-PartnerCenter-Application` sent upstream.
pub const DEFAULT_APPLICATION: &str = "pcgate";
/// `X-Locale` sent when the caller sends none.
pub const DEFAULT_LOCALE: &str = "en-US";
/// Total cache size.
pub const DEFAULT_CACHE_MAX_BYTES: ByteSize = ByteSize::mib(64);
/// Largest response the cache stores or coalescing buffers.
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: ByteSize = ByteSize::mib(2);
/// Attempts per call, the first included.
pub const DEFAULT_RETRY_MAX_ATTEMPTS: u32 = 4;
/// Backoff base: attempt n waits up to `base * 2^n`.
pub const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_millis(250);
/// Backoff cap.
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(8);
/// Upstream statuses that are retried.
pub const DEFAULT_RETRY_STATUSES: [u16; 4] = [500, 502, 503, 504];
/// A longer `Retry-After` is not waited for.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Retries may add at most this share to upstream traffic.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// ...but always at least this many retries a second.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// The most `retry.budget_min_per_second` may be (tower's budget needs it below `i32::MAX`;
/// anything near this is already "no budget").
pub const MAX_BUDGET_MIN_PER_SECOND: u32 = 1_000_000;

/// The longest duration any key takes: each is added to the clock, and a year is already far
/// past any sensible timeout or cache window.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` or `$PCGATE_CONFIG` does not exist.
    #[error("config file {0} not found: pass --config FILE or set PCGATE_CONFIG")]
    NotFound(PathBuf),
    /// figment could not parse or map a value (the message names the key and the source).
    #[error("{}", parse_message(.0))]
    Parse(Box<figment::Error>),
    /// The values parsed but do not make sense together.
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and shutdown.
    pub server: ServerConfig,
    /// The Partner Center API pcgate forwards to.
    pub upstream: UpstreamConfig,
    /// Service credentials by name; routes pick one.
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// Optional inbound API keys.
    pub access: AccessConfig,
    /// Tracking headers.
    pub tracking: TrackingConfig,
    /// Response cache bounds.
    pub cache: CacheConfig,
    /// The fleet tier on Redis (DESIGN.md §6); absent: every process on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedConfig>,
    /// Retry policy for routes with `retry = true`.
    pub retry: RetryConfig,
    /// The route table: first match wins; a request no route matches gets 403.
    pub routes: Vec<RouteConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Billing apps call this address.
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `POST /cache/purge`.
    pub admin_listen: SocketAddr,
    /// How long in-flight calls may run on after SIGTERM or Ctrl-C.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a complete request head (HTTP/1 and HTTP/2, protocol
    /// detection included); past it the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no call in flight this long is closed (HTTP/2 gets a GOAWAY first).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Host names the admin port (and a gateway port without inbound keys) answers besides IP
    /// literals and `localhost`: DNS rebinding needs a name, so other names get 421.
    pub admin_hosts: Vec<String>,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `https://api.partnercenter.microsoft.com`; `http://` is allowed for the sandbox and tests.
    pub base_url: BaseUrl,
    /// Extra PEM trust roots (a private or test CA), added to the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// TCP and TLS connect time limit.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// One attempt's time limit, until the response headers arrive.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// The whole call's time limit, all retries included.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Calls per second (minute, hour) to the upstream, `"20/s"`; fleet-wide with `[shared]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Request headers forwarded beyond those Partner Center documents; not in the cache key
    /// unless also in `cache.key_headers`.
    pub forward_headers: Vec<String>,
}

/// `[access]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Listening off loopback with no `clients` lends the partner's credential to anyone who can
    /// connect; refused unless this is `true`.
    pub allow_anonymous_remote: bool,
    /// When any are set, callers must send `Authorization: Bearer <key>` matching one of them.
    pub clients: Vec<ClientKey>,
}

/// `[[access.clients]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKey {
    /// Who the key belongs to (for logs).
    pub name: String,
    /// SHA-256 of the key (64 hex digits in the config); the key itself is never stored.
    pub key_sha256: KeySha256,
}

/// The SHA-256 of an inbound key, from 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySha256([u8; 32]);

impl KeySha256 {
    /// From 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<KeySha256> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut sha256 = [0u8; 32];
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(KeySha256(sha256))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for KeySha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySha256({})", self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeySha256 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        KeySha256::from_hex(&hex).ok_or_else(|| {
            de::Error::custom(
                "must be 64 hex digits (make it with `printf %s \"$KEY\" | sha256sum`)",
            )
        })
    }
}

impl Serialize for KeySha256 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

/// `[tracking]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// `MS-PartnerCenter-Application`.
    pub application: String,
    /// `X-Locale` when the caller sends none.
    pub locale: String,
    /// Whether to send `MS-CV`.
    pub correlation_vector: bool,
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bound on everything cached (bodies and headers).
    pub max_bytes: ByteSize,
    /// Larger responses are neither stored nor shared: they stream through.
    pub max_entry_bytes: ByteSize,
    /// Request headers that are part of the cache and coalescing key, beyond the documented ones.
    pub key_headers: Vec<String>,
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff base.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Backoff cap.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Upstream statuses that are retried.
    pub statuses: Vec<u16>,
    /// A longer `Retry-After` is not waited for.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Retries may add at most this share to upstream traffic.
    pub budget_ratio: f64,
    /// ...but always at least this many a second.
    pub budget_min_per_second: u32,
}

/// `[[routes]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Used in logs and metric labels; defaults to the first pattern.
    #[serde(default)]
    pub name: Option<String>,
    /// `"METHOD /path"` or a list of them; `*` is one segment, `**` the rest (one or more).
    #[serde(rename = "match")]
    pub patterns: Patterns,
    /// The credential whose token is sent upstream.
    #[serde(default)]
    pub credential: Option<String>,
    /// Cache 200 responses this long.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_ttl: Option<Duration>,
    /// After the TTL, serve stale this long while one background refresh runs.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stale_while_revalidate: Option<Duration>,
    /// After the TTL, serve stale this long when the upstream fails.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stale_if_error: Option<Duration>,
    /// Whether the upstream's `Cache-Control` and `Expires` decide freshness (`honor`, the
    /// default) or the route's windows always win (`ignore`, for upstreams that send wrong ones).
    #[serde(default)]
    pub origin_cache_control: OriginCacheControl,
    /// Identical in-flight calls share one upstream call.
    #[serde(default)]
    pub coalesce: bool,
    /// Retry transient failures with backoff.
    #[serde(default)]
    pub retry: bool,
}

/// `routes.origin_cache_control`: who decides how long an answer is fresh (DESIGN.md §2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginCacheControl {
    /// The upstream's `Cache-Control` / `Expires` (RFC 9111), the route's windows when it sends
    /// none, as nginx's `proxy_cache_valid`.
    #[default]
    Honor,
    /// The route's windows, whatever the upstream says (nginx's `proxy_ignore_headers
    /// Cache-Control Expires`). `Vary` and `Set-Cookie` are still honoured.
    Ignore,
}

impl RouteConfig {
    /// The route's name: `name`, else its first pattern.
    pub fn name(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or_else(|| self.patterns.first().as_str())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default address"),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            admin_hosts: Vec::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: BaseUrl::parse(DEFAULT_BASE_URL).expect("valid default URL"),
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            rate_limit: None,
            forward_headers: Vec::new(),
        }
    }
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            application: DEFAULT_APPLICATION.to_owned(),
            locale: DEFAULT_LOCALE.to_owned(),
            correlation_vector: true,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            max_entry_bytes: DEFAULT_CACHE_MAX_ENTRY_BYTES,
            key_headers: Vec::new(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: DEFAULT_RETRY_MAX_ATTEMPTS,
            base_delay: DEFAULT_RETRY_BASE_DELAY,
            max_delay: DEFAULT_RETRY_MAX_DELAY,
            statuses: DEFAULT_RETRY_STATUSES.to_vec(),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            budget_ratio: DEFAULT_BUDGET_RATIO,
            budget_min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
        }
    }
}

impl Config {
    /// Loads defaults, then `file`, then `PCGATE_*` variables, and validates the result.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        if !file.is_file() {
            return Err(ConfigError::NotFound(file.to_owned()));
        }
        Self::from_figment(Figment::new().merge(Toml::file_exact(file)))
    }

    /// Loads from TOML text instead of a file (tests, the demo), then `PCGATE_*` variables.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        // `PCGATE_CONFIG` names the file; it is not a key.
        let env = Env::prefixed("PCGATE_").split("__").ignore(&["config"]);
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: references between sections, numbers in range, files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError::Invalid(msg));
        for (key, duration) in self.durations() {
            if duration > MAX_DURATION {
                return fail(format!(
                    "{key}: {} is longer than the longest pcgate accepts ({})",
                    humantime::format_duration(duration),
                    humantime::format_duration(MAX_DURATION)
                ));
            }
        }
        if self.server.header_read_timeout.is_zero() {
            return fail("server.header_read_timeout must be more than 0s (it closes connections that never send a request)".into());
        }
        if self.server.idle_timeout.is_zero() {
            return fail("server.idle_timeout must be more than 0s (it closes connections with no call in flight)".into());
        }
        if self.upstream.connect_timeout.is_zero() || self.upstream.attempt_timeout.is_zero() {
            return fail(
                "upstream.connect_timeout and upstream.attempt_timeout must be more than 0s".into(),
            );
        }
        if self.upstream.deadline < self.upstream.attempt_timeout {
            return fail(format!(
                "upstream.deadline ({}) is shorter than upstream.attempt_timeout ({}): raise the deadline or lower the attempt timeout",
                humantime::format_duration(self.upstream.deadline),
                humantime::format_duration(self.upstream.attempt_timeout)
            ));
        }
        if let Some(ca) = &self.upstream.ca_file {
            if !ca.is_file() {
                return fail(format!(
                    "upstream.ca_file: {} is not a readable file",
                    ca.display()
                ));
            }
            // What `run` reads: a file that is not PEM certificates fails here.
            ca_certificates(ca).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        for host in &self.server.admin_hosts {
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return fail(format!(
                    "server.admin_hosts: `{host}` is not a host name (letters, digits, `-` and `.`; no port)"
                ));
            }
        }
        if !self.server.listen.ip().is_loopback()
            && self.access.clients.is_empty()
            && !self.access.allow_anonymous_remote
        {
            return fail(format!(
                "server.listen {} is not a loopback address and no [[access.clients]] keys are set: anyone who can reach it would call Partner Center with the partner's credential. Add [[access.clients]], listen on 127.0.0.1, or set access.allow_anonymous_remote = true if a network policy already restricts callers",
                self.server.listen
            ));
        }
        crate::layer::tracking::TrackingSettings::new(&self.tracking)
            .map_err(ConfigError::Invalid)?;
        self.header_lists()?;
        if let Some(shared) = &self.shared {
            shared.validate().map_err(ConfigError::Invalid)?;
        }
        if self.cache.max_entry_bytes > self.cache.max_bytes {
            return fail("cache.max_entry_bytes is larger than cache.max_bytes".into());
        }
        if self.retry.max_attempts == 0 {
            return fail("retry.max_attempts must be at least 1 (1 means no retries)".into());
        }
        if !(0.0..=1000.0).contains(&self.retry.budget_ratio) {
            return fail("retry.budget_ratio must be between 0 and 1000".into());
        }
        if self.retry.budget_min_per_second > MAX_BUDGET_MIN_PER_SECOND {
            return fail(format!(
                "retry.budget_min_per_second must be at most {MAX_BUDGET_MIN_PER_SECOND}"
            ));
        }
        if let Some(bad) = self
            .retry
            .statuses
            .iter()
            .find(|s| **s != 429 && !(500..=599).contains(*s))
        {
            return fail(format!(
                "retry.statuses: {bad} cannot be retried: only 429 and 5xx statuses are transient"
            ));
        }
        if self.routes.is_empty() {
            return fail("no [[routes]]: every call would get 403; start from the table in config/pcgate.toml".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let name = route.name();
            let at = format!("routes[{i}] `{name}`");
            if route.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return fail(format!(
                    "routes[{i}]: `name` is empty; it labels metrics and logs, so give it a name or leave it out"
                ));
            }
            if name.chars().any(char::is_control) {
                return fail(format!("{at}: `name` has control characters"));
            }
            if !names.insert(name) {
                return fail(format!("{at}: another route has the same name; names label metrics, so give each route its own"));
            }
            if let Some(credential) = &route.credential {
                if !self.credentials.contains_key(credential) {
                    return fail(format!(
                        "{at}: credential `{credential}` is not configured: add [credentials.{credential}] or change the route"
                    ));
                }
            }
            if route.cache_ttl.is_none()
                && (route.stale_while_revalidate.is_some() || route.stale_if_error.is_some())
            {
                return fail(format!(
                    "{at}: stale_while_revalidate and stale_if_error need cache_ttl"
                ));
            }
        }
        Ok(())
    }

    /// Every duration in the config, by key: each is added to the clock somewhere.
    fn durations(&self) -> Vec<(String, Duration)> {
        let mut all = vec![
            (
                "server.shutdown_grace".to_owned(),
                self.server.shutdown_grace,
            ),
            (
                "server.header_read_timeout".to_owned(),
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout".to_owned(), self.server.idle_timeout),
            (
                "upstream.connect_timeout".to_owned(),
                self.upstream.connect_timeout,
            ),
            (
                "upstream.attempt_timeout".to_owned(),
                self.upstream.attempt_timeout,
            ),
            ("upstream.deadline".to_owned(), self.upstream.deadline),
            ("retry.base_delay".to_owned(), self.retry.base_delay),
            ("retry.max_delay".to_owned(), self.retry.max_delay),
            (
                "retry.max_retry_after".to_owned(),
                self.retry.max_retry_after,
            ),
        ];
        for (name, credential) in &self.credentials {
            if let Some(app) = credential.app() {
                all.push((
                    format!("credentials.{name}.refresh_before"),
                    app.refresh_before,
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            for (key, window) in [
                ("cache_ttl", route.cache_ttl),
                ("stale_while_revalidate", route.stale_while_revalidate),
                ("stale_if_error", route.stale_if_error),
            ] {
                if let Some(window) = window {
                    all.push((format!("routes[{i}].{key}"), window));
                }
            }
        }
        all
    }

    /// What is allowed but unsafe: a credential that would travel in clear text off this host.
    /// `run` and `check-config` print these at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let sends_real_token = self.routes.iter().any(|r| {
            r.credential
                .as_ref()
                .and_then(|c| self.credentials.get(c))
                .is_some_and(|c| c.app().is_some())
        });
        if sends_real_token && self.upstream.base_url.is_clear_text_off_loopback() {
            warnings.push(format!(
                "upstream.base_url {} is http:// off loopback: the partner's access tokens would cross the network in clear text; use https://",
                self.upstream.base_url
            ));
        }
        // Only a `token_url` written in the config gets here: one made from AZURE_AUTHORITY_HOST
        // is refused as the config is read when it is clear text off loopback.
        for (name, credential) in &self.credentials {
            if let Some(app) = credential.app() {
                if app.token_url.is_clear_text_off_loopback() {
                    let tokens = match credential.grant() {
                        Grant::RefreshToken => "the refresh token and the access tokens",
                        _ => "the access tokens",
                    };
                    warnings.push(format!(
                        "credentials.{name}.token_url {} is http:// off loopback: {} and {tokens} would cross the network in clear text; use https://",
                        app.token_url,
                        app.secret.sent_as()
                    ));
                }
            }
        }
        if let Some(shared) = self.shared.as_ref().filter(|s| s.key_file.is_none()) {
            let rotating: Vec<&str> = self
                .credentials
                .iter()
                .filter(|(_, c)| c.grant() == Grant::RefreshToken)
                .map(|(name, _)| name.as_str())
                .collect();
            if !rotating.is_empty() {
                warnings.push(format!(
                    "[shared] (namespace {}) has no key_file: the refresh tokens of {} are not shared, so sidecars holding the same one rotate it apart and all but one lose it; set shared.key_file to a 32-byte key file (`openssl rand -hex 32`), the same on every sidecar",
                    shared.namespace,
                    rotating.join(", ")
                ));
            }
        }
        warnings
    }

    /// `upstream.forward_headers` and `cache.key_headers`, parsed and checked: valid names, never
    /// a credential, `Host` or hop-by-hop header, and every key header forwarded (one that is not
    /// cannot change an answer, and is never seen by the key).
    pub fn header_lists(
        &self,
    ) -> Result<(Vec<http::HeaderName>, Vec<http::HeaderName>), ConfigError> {
        use crate::headers::{configured_header, is_forwarded};
        let parse = |key: &str, names: &[String]| {
            names
                .iter()
                .map(|name| configured_header(key, name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ConfigError::Invalid)
        };
        let forward = parse("upstream.forward_headers", &self.upstream.forward_headers)?;
        let key = parse("cache.key_headers", &self.cache.key_headers)?;
        let unforwarded = key.iter().zip(&self.cache.key_headers);
        if let Some((_, name)) = unforwarded
            .into_iter()
            .find(|(parsed, _)| !is_forwarded(parsed, &forward))
        {
            return Err(ConfigError::Invalid(format!(
                "cache.key_headers: `{name}` is not forwarded upstream, so it cannot change an answer: add it to upstream.forward_headers too, or remove it"
            )));
        }
        Ok((forward, key))
    }

    /// The effective configuration as TOML, secrets redacted (`check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

/// Why `upstream.ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("upstream.ca_file {path}: {reason}")]
pub struct CaFileError {
    /// The file named in the config.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// The PEM certificates in `upstream.ca_file`: at least one, each well-formed. `check-config`
/// and `run` read the file with this one function.
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let fail = |reason: String| CaFileError {
        path: path.display().to_string(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certificates.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(certificates)
}

/// A figment error with its key written as in these docs (`routes[0].match`), then the source.
fn parse_message(error: &figment::Error) -> String {
    let mut lines = Vec::new();
    for error in error.clone() {
        let mut line = String::new();
        if !error.path.is_empty() {
            for (i, part) in error.path.iter().enumerate() {
                if part.bytes().all(|b| b.is_ascii_digit()) {
                    line.push_str(&format!("[{part}]"));
                } else {
                    if i > 0 {
                        line.push('.');
                    }
                    line.push_str(part);
                }
            }
            line.push_str(": ");
        }
        line.push_str(&error.kind.to_string());
        if let Some(metadata) = &error.metadata {
            match &metadata.source {
                Some(source) => line.push_str(&format!(" (in {} {source})", metadata.name)),
                None => line.push_str(&format!(" (in {})", metadata.name)),
            }
        }
        lines.push(line);
    }
    lines.join("\n")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        [upstream]
        base_url = "http://127.0.0.1:9100"
        [[routes]]
        match = "GET /v1/invoices"
    "#;

    fn message(result: Result<Config, ConfigError>) -> String {
        result.expect_err("config should be refused").to_string()
    }

    #[test]
    fn the_shipped_file_loads_with_the_default_route_table() {
        Jail::expect_with(|_jail| {
            let config = Config::load(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/pcgate.toml"
            )))
            .map_err(|e| e.to_string())?;
            let names: Vec<&str> = config.routes.iter().map(RouteConfig::name).collect();
            assert_eq!(
                names,
                [
                    "summary",
                    "summaries",
                    "invoices",
                    "invoice_lineitems",
                    "invoice_documents",
                    "invoice"
                ]
            );
            assert_eq!(config.routes[0].cache_ttl, Some(Duration::from_secs(300)));
            assert_eq!(
                config.routes[0].origin_cache_control,
                OriginCacheControl::Honor,
                "the default"
            );
            assert_eq!(config.upstream.base_url.as_str(), DEFAULT_BASE_URL);
            assert_eq!(config.credentials["user"].grant(), Grant::RefreshToken);
            Ok(())
        });
    }

    #[test]
    fn a_file_overrides_defaults_and_env_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "pcgate.toml",
                r#"
                [upstream]
                base_url = "http://127.0.0.1:9100"
                attempt_timeout = "250ms"
                deadline = "2s"
                [[routes]]
                match = "GET /v1/invoices"
                "#,
            )?;
            let config = Config::load(Path::new("pcgate.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.upstream.attempt_timeout, Duration::from_millis(250));
            assert_eq!(config.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
            assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());

            jail.set_env("PCGATE_UPSTREAM__BASE_URL", "http://127.0.0.1:9200");
            jail.set_env("PCGATE_SERVER__SHUTDOWN_GRACE", "5s");
            jail.set_env("PCGATE_CONFIG", "pcgate.toml");
            let config = Config::load(Path::new("pcgate.toml")).map_err(|e| e.to_string())?;
            assert_eq!(config.upstream.base_url.as_str(), "http://127.0.0.1:9200");
            assert_eq!(config.server.shutdown_grace, Duration::from_secs(5));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        Jail::expect_with(|jail| {
            let text = format!("{MINIMAL}\n[cache]\nmax_byte = \"1MiB\"\n");
            let msg = message(Config::from_toml(&text));
            assert!(msg.contains("max_byte"), "{msg}");
            jail.set_env("PCGATE_UPSTREAM__BASE_URLL", "http://x");
            let msg = message(Config::from_toml(MINIMAL));
            assert!(msg.contains("base_urll"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn bad_durations_and_sizes_are_errors_that_name_the_key() {
        Jail::expect_with(|_jail| {
            let msg = message(Config::from_toml(&format!(
                "{MINIMAL}\n[server]\nshutdown_grace = \"soon\"\n"
            )));
            assert!(msg.contains("shutdown_grace"), "{msg}");
            let msg = message(Config::from_toml(&format!(
                "{MINIMAL}\n[cache]\nmax_bytes = \"lots\"\n"
            )));
            assert!(msg.contains("max_bytes"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn idle_timeout_defaults_to_60s_and_must_be_more_than_zero() {
        Jail::expect_with(|_jail| {
            let config = Config::from_toml(MINIMAL).map_err(|e| e.to_string())?;
            assert_eq!(config.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
            assert_eq!(DEFAULT_IDLE_TIMEOUT, Duration::from_secs(60));
            let config =
                Config::from_toml(&format!("{MINIMAL}\n[server]\nidle_timeout = \"5s\"\n"))
                    .map_err(|e| e.to_string())?;
            assert_eq!(config.server.idle_timeout, Duration::from_secs(5));
            let msg = message(Config::from_toml(&format!(
                "{MINIMAL}\n[server]\nidle_timeout = \"0s\"\n"
            )));
            assert!(msg.contains("server.idle_timeout"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key_and_the_fix() {
        Jail::expect_with(|_jail| {
            let msg = message(Config::from_toml(
                "[upstream]\nbase_url = \"ftp://x\"\n[[routes]]\nmatch = \"GET /a\"\n",
            ));
            assert!(msg.contains("upstream.base_url"), "{msg}");
            let msg = message(Config::from_toml(
                "[[routes]]\nmatch = \"GET /a\"\ncredential = \"nobody\"\n",
            ));
            assert!(msg.contains("[credentials.nobody]"), "{msg}");
            let msg = message(Config::from_toml("[[routes]]\nmatch = \"GET /a/**/b\"\n"));
            assert!(msg.contains("routes[0]"), "{msg}");
            let msg = message(Config::from_toml(""));
            assert!(msg.contains("[[routes]]"), "{msg}");
            let msg = message(Config::from_toml(
                "[credentials.app]\ngrant = \"client_credentials\"\ntoken_url = \"https://login.example/t/oauth2/token\"\nclient_id = \"id\"\n[[routes]]\nmatch = \"GET /a\"\n",
            ));
            assert!(
                msg.contains("credentials.app") && msg.contains("client_secret"),
                "{msg}"
            );
            let msg = message(Config::from_toml(
                "[upstream]\nattempt_timeout = \"10s\"\ndeadline = \"5s\"\n[[routes]]\nmatch = \"GET /a\"\n",
            ));
            assert!(msg.contains("deadline"), "{msg}");
            Ok(())
        });
    }

    /// A config that `check-config` passes must start: each of these used to pass `validate`
    /// and then fail or panic in `run` (or silently never match); each names its key.
    #[test]
    fn config_that_would_not_run_or_is_unsafe_is_refused_naming_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("not-pem.crt", "this is not a certificate\n")?;
            let with = |extra: &str| Config::from_toml(&format!("{MINIMAL}\n{extra}\n"));
            let route = |extra: &str| {
                Config::from_toml(&format!(
                    "[upstream]\nbase_url = \"http://127.0.0.1:9100\"\n[[routes]]\n{extra}\n"
                ))
            };
            let cases: Vec<(Result<Config, ConfigError>, &str)> = vec![
                (with("[retry]\nbudget_min_per_second = 2147483647"), "retry.budget_min_per_second"),
                (with("[retry]\nstatuses = [404]"), "retry.statuses"),
                (with("[retry]\nstatuses = [200, 500]"), "retry.statuses"),
                (with("[tracking]\napplication = \"bad\\nvalue\""), "tracking.application"),
                (with("[tracking]\nlocale = \"en\\u0007US\""), "tracking.locale"),
                (
                    with("[credentials.fixed]\ngrant = \"static\"\ntoken = \"abc\\n\""),
                    "credentials.fixed",
                ),
                (
                    Config::from_toml(
                        "[upstream]\nbase_url = \"http://127.0.0.1:9100\"\nca_file = \"not-pem.crt\"\n[[routes]]\nmatch = \"GET /a\"\n",
                    ),
                    "upstream.ca_file",
                ),
                (route("match = \"get /v1/invoices\""), "routes[0]"),
                (route("match = \"FETCH /v1/invoices\""), "routes[0]"),
                (route("name = \"\"\nmatch = \"GET /v1/invoices\""), "routes[0]"),
                (with("[server]\nlisten = \"0.0.0.0:8080\""), "server.listen"),
                (
                    route("match = \"GET /v1/invoices\"\ncache_ttl = \"500000000000years\""),
                    "routes[0].cache_ttl",
                ),
                (with("[server]\nidle_timeout = \"2years\""), "server.idle_timeout"),
                (
                    route("match = \"GET /v1/invoices\"\norigin_cache_control = \"obey\""),
                    "origin_cache_control",
                ),
            ];
            for (result, key) in cases {
                let msg = message(result);
                assert!(msg.contains(key), "{key}: {msg}");
                assert!(!msg.contains("abc\n"), "a token in a message: {msg}");
            }
            Ok(())
        });
    }

    #[test]
    fn the_shared_section_is_checked_and_its_password_never_printed() {
        Jail::expect_with(|jail| {
            let with =
                |shared: &str| Config::from_toml(&format!("{MINIMAL}\n[shared]\n{shared}\n"));
            let config =
                with("redis_url = \"redis://:pa55w0rd-x@127.0.0.1:6379\"\nnamespace = \"contoso\"")
                    .map_err(|e| e.to_string())?;
            let shared = config.shared.as_ref().expect("a [shared] section");
            assert_eq!(shared.timeout, DEFAULT_SHARED_TIMEOUT);
            assert_eq!(shared.namespace, "contoso");
            let printed = config.to_toml();
            let debugged = format!("{config:?}");
            for shown in [&printed, &debugged] {
                assert!(!shown.contains("pa55w0rd-x"), "{shown}");
            }
            assert!(
                printed.contains("[shared]") && printed.contains("redacted"),
                "{printed}"
            );
            Config::from_toml(&printed).map_err(|e| e.to_string())?;
            assert!(Config::from_toml(MINIMAL)
                .map_err(|e| e.to_string())?
                .shared
                .is_none());
            for (shared, key) in [
                (
                    "redis_url = \"redis://127.0.0.1\"\nnamespace = \"c\"\nttl = \"1s\"",
                    "ttl",
                ),
                (
                    "redis_url = \"http://127.0.0.1\"\nnamespace = \"c\"",
                    "shared.redis_url",
                ),
                (
                    "redis_url = \"redis://:pa55w0rd-x@\"\nnamespace = \"c\"",
                    "shared.redis_url",
                ),
                ("namespace = \"c\"", "redis_url"),
                ("redis_url = \"redis://127.0.0.1\"", "namespace"),
                (
                    "redis_url = \"redis://127.0.0.1\"\nnamespace = \"\"",
                    "shared.namespace",
                ),
                (
                    "redis_url = \"redis://127.0.0.1\"\nnamespace = \"a b:c\"",
                    "shared.namespace",
                ),
                (
                    "redis_url = \"redis://127.0.0.1\"\nnamespace = \"c\"\ntimeout = \"0s\"",
                    "shared.timeout",
                ),
                (
                    "redis_url = \"redis://127.0.0.1\"\nnamespace = \"c\"\ntimeout = \"1m\"",
                    "shared.timeout",
                ),
            ] {
                let msg = message(with(shared));
                assert!(msg.contains(key), "{shared}: {msg}");
                assert!(!msg.contains("pa55w0rd-x"), "{msg}");
            }
            // An environment override is the same key.
            jail.set_env("PCGATE_SHARED__REDIS_URL", "rediss://redis.example:6380");
            jail.set_env("PCGATE_SHARED__NAMESPACE", "fabrikam");
            let config = Config::from_toml(MINIMAL).map_err(|e| e.to_string())?;
            let shared = config.shared.expect("[shared] from the environment");
            assert!(shared.redis_url.is_tls());
            assert_eq!(shared.namespace, "fabrikam");
            Ok(())
        });
    }

    #[test]
    fn listening_off_loopback_needs_keys_or_an_explicit_opt_in() {
        Jail::expect_with(|_jail| {
            let key = "0".repeat(64);
            for extra in [
                "[access]\nallow_anonymous_remote = true".to_owned(),
                format!("[[access.clients]]\nname = \"app\"\nkey_sha256 = \"{key}\""),
            ] {
                Config::from_toml(&format!(
                    "{MINIMAL}\n[server]\nlisten = \"0.0.0.0:8080\"\n{extra}\n"
                ))
                .map_err(|e| e.to_string())?;
            }
            // Loopback needs neither.
            Config::from_toml(&format!(
                "{MINIMAL}\n[server]\nlisten = \"127.0.0.2:8080\"\n"
            ))
            .map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn shared_without_a_key_file_warns_that_refresh_tokens_rotate_apart() {
        Jail::expect_with(|_jail| {
            let config = |shared_extra: &str, grant: &str| {
                let credential = match grant {
                    "refresh_token" => "[credentials.user]\ngrant = \"refresh_token\"\ntoken_url = \"https://login.example/t/oauth2/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n",
                    _ => "[credentials.user]\ngrant = \"client_credentials\"\ntoken_url = \"https://login.example/t/oauth2/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
                };
                Config::from_toml(&format!(
                    "{credential}[shared]\nredis_url = \"redis://127.0.0.1:6379\"\nnamespace = \"contoso\"\n{shared_extra}\n[[routes]]\nmatch = \"GET /a\"\ncredential = \"user\"\n"
                ))
                .map_err(|e| e.to_string())
            };
            let warnings = config("", "refresh_token")?.warnings().join("\n");
            assert!(
                warnings.contains("key_file") && warnings.contains("user"),
                "{warnings}"
            );
            let keyed = config(
                "key_file = \"/run/secrets/pcgate/shared-key\"",
                "refresh_token",
            )?;
            assert!(keyed.warnings().is_empty(), "{:?}", keyed.warnings());
            assert_eq!(
                keyed.shared.as_ref().and_then(|s| s.key_file.as_deref()),
                Some(Path::new("/run/secrets/pcgate/shared-key"))
            );
            assert!(keyed.to_toml().contains("key_file"));
            // App-only credentials never share anything: nothing to warn about.
            let app = config("", "client_credentials")?;
            assert!(app.warnings().is_empty(), "{:?}", app.warnings());
            Ok(())
        });
    }

    #[test]
    fn a_real_credential_over_http_off_loopback_is_warned_about() {
        Jail::expect_with(|_jail| {
            let credential = |token_url: &str| {
                format!(
                    "[credentials.app]\ngrant = \"client_credentials\"\ntoken_url = \"{token_url}\"\nclient_id = \"id\"\nclient_secret = \"s\"\n"
                )
            };
            let config = |base: &str, token_url: &str| {
                Config::from_toml(&format!(
                    "[upstream]\nbase_url = \"{base}\"\n{}[[routes]]\nmatch = \"GET /a\"\ncredential = \"app\"\n",
                    credential(token_url)
                ))
                .map_err(|e| e.to_string())
            };
            let quiet = config(
                "https://api.example",
                "https://login.example/t/oauth2/token",
            )?;
            assert!(quiet.warnings().is_empty(), "{:?}", quiet.warnings());
            let local = config(
                "http://127.0.0.1:9100",
                "http://localhost:9100/t/oauth2/token",
            )?;
            assert!(local.warnings().is_empty(), "{:?}", local.warnings());
            let loud = config("http://api.example", "http://login.example/t/oauth2/token")?;
            let warnings = loud.warnings().join("\n");
            assert!(warnings.contains("upstream.base_url"), "{warnings}");
            assert!(warnings.contains("credentials.app.token_url"), "{warnings}");
            assert!(
                warnings.contains("the client secret and the access tokens"),
                "{warnings}"
            );
            assert!(!warnings.contains("s\""), "{warnings}");

            // The warning says what would travel: the secret, the assertion or the federated
            // token, and a refresh token on the refresh_token grant.
            let url = "token_url = \"http://login.example/t/oauth2/token\"\nclient_id = \"id\"\n";
            for (grant, keys, travels) in [
                (
                    "client_credentials",
                    "certificate_file = \"c\"\nprivate_key_file = \"k\"",
                    "the signed client assertion and the access tokens",
                ),
                (
                    "client_credentials",
                    "federated_token_file = \"/t\"",
                    "the federated token (the client assertion) and the access tokens",
                ),
                (
                    "refresh_token",
                    "client_secret_file = \"/s\"\nrefresh_token_file = \"/r\"",
                    "the client secret and the refresh token and the access tokens",
                ),
            ] {
                let config = Config::from_toml(&format!(
                    "{MINIMAL}credential = \"c\"\n[credentials.c]\ngrant = \"{grant}\"\n{url}{keys}\n"
                ))
                .map_err(|e| e.to_string())?;
                let warnings = config.warnings().join("\n");
                assert!(
                    warnings.contains("credentials.c.token_url") && warnings.contains(travels),
                    "{keys}: {warnings}"
                );
                assert!(
                    !warnings.contains("client secret") || travels.contains("client secret"),
                    "{warnings}"
                );
            }
            Ok(())
        });
    }

    /// The webhook's variables come from the environment, not the reviewed config: a tenant that
    /// is not one path segment, or an authority in clear text off loopback (where the federated
    /// token would go), is refused naming the variable, not made into a token URL.
    #[test]
    fn workload_identity_refuses_an_authority_or_tenant_that_would_send_the_token_elsewhere() {
        Jail::expect_with(|jail| {
            let load = || {
                Config::from_toml(&format!(
                    "{MINIMAL}\n[credentials.c]\ngrant = \"client_credentials\"\nclient_id = \"id\"\nfederated_token_file = \"/t\"\n"
                ))
            };
            jail.set_env(TENANT_ENV, "72f988bf-86f1-41af-91ab-2d7cd011db47");
            for host in [
                "http://login.evil.example",
                "http://login.evil.example:80/",
                "ftp://login.example",
                "https://user@login.evil.example/",
                "https://login.example/?x=1",
                "not a url",
            ] {
                jail.set_env(AUTHORITY_HOST_ENV, host);
                let msg = message(load());
                assert!(
                    msg.contains("credentials.c") && msg.contains(AUTHORITY_HOST_ENV),
                    "{host}: {msg}"
                );
            }
            jail.set_env(AUTHORITY_HOST_ENV, "http://login.evil.example");
            assert!(message(load()).contains("http:// off loopback"));
            // A local sandbox on loopback is fine, over http:// too.
            for (host, url) in [
                ("http://127.0.0.1:9100", "http://127.0.0.1:9100/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"),
                ("https://login.microsoftonline.us/", "https://login.microsoftonline.us/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"),
            ] {
                jail.set_env(AUTHORITY_HOST_ENV, host);
                let config = load().map_err(|e| e.to_string())?;
                let app = config.credentials["c"].app().expect("an app credential");
                assert_eq!(app.token_url.as_str(), url);
            }

            jail.set_env(AUTHORITY_HOST_ENV, "https://login.microsoftonline.com/");
            for tenant in [
                "evil.example/x",
                "t?x=1",
                "t#x",
                "user@evil.example",
                "con toso",
                "t\tx",
                "..",
                "t%2Fx",
            ] {
                jail.set_env(TENANT_ENV, tenant);
                let msg = message(load());
                assert!(
                    msg.contains("credentials.c")
                        && msg.contains(TENANT_ENV)
                        && msg.contains("GUID"),
                    "{tenant:?}: {msg}"
                );
            }
            jail.set_env(TENANT_ENV, "contoso.onmicrosoft.com");
            let config = load().map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert_eq!(
                app.token_url.as_str(),
                "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
            );
            Ok(())
        });
    }

    #[test]
    fn forward_and_key_headers_are_checked_names() {
        Jail::expect_with(|_jail| {
            let with = |lists: &str| {
                Config::from_toml(&format!(
                    "{lists}\n[[routes]]\nmatch = \"GET /v1/invoices\"\n"
                ))
            };
            let config = with("[upstream]\nforward_headers = [\"X-Tenant\", \"x-ms-customeruser-upn\"]\n[cache]\nkey_headers = [\"x-tenant\", \"Accept-Language\"]")
                .err()
                .map(|e| e.to_string());
            // Accept-Language is neither documented nor in forward_headers.
            let msg = config.expect("a key header that is not forwarded is refused");
            assert!(
                msg.contains("cache.key_headers") && msg.contains("Accept-Language"),
                "{msg}"
            );
            for (lists, key) in [
                (
                    "[upstream]\nforward_headers = [\"Cookie\"]",
                    "upstream.forward_headers",
                ),
                (
                    "[upstream]\nforward_headers = [\"authorization\"]",
                    "upstream.forward_headers",
                ),
                (
                    "[upstream]\nforward_headers = [\"Connection\"]",
                    "upstream.forward_headers",
                ),
                (
                    "[upstream]\nforward_headers = [\"bad header\"]",
                    "upstream.forward_headers",
                ),
                ("[cache]\nkey_headers = [\"cookie\"]", "cache.key_headers"),
            ] {
                let msg = message(with(lists));
                assert!(msg.contains(key), "{lists}: {msg}");
            }
            let config = Config::from_toml(&format!(
                "{MINIMAL}\n[cache]\nkey_headers = [\"X-Locale\"]\n"
            ))
            .map_err(|e| e.to_string())?;
            assert_eq!(
                config.header_lists().map_err(|e| e.to_string())?.1,
                ["x-locale"]
            );
            Ok(())
        });
    }

    #[test]
    fn values_with_a_shape_are_parsed_into_types_naming_their_key() {
        Jail::expect_with(|jail| {
            let route = |extra: &str| {
                Config::from_toml(&format!(
                    "[upstream]\nbase_url = \"http://127.0.0.1:9100\"\n[[routes]]\n{extra}\n"
                ))
            };
            for (result, key, what) in [
                (route("match = \"get /a\""), "routes[0].match", "`get`"),
                (
                    route("match = [\"GET /a\", \"GET /a/**/b\"]"),
                    "routes[0].match[1]",
                    "`**`",
                ),
                (route("match = []"), "routes[0].match", "empty"),
                (
                    route("match = \"GET /a\"\n[[access.clients]]\nname = \"x\"\nkey_sha256 = \"abc\""),
                    "access.clients[0].key_sha256",
                    "64 hex digits",
                ),
                (
                    route(&format!(
                        "match = \"GET /a\"\n[[access.clients]]\nname = \"x\"\nkey_sha256 = \"{}\"",
                        "g".repeat(64)
                    )),
                    "access.clients[0].key_sha256",
                    "64 hex digits",
                ),
            ] {
                let msg = message(result);
                assert!(msg.contains(key) && msg.contains(what), "{key}: {msg}");
            }
            // An environment override is parsed the same way, and named the same way.
            jail.set_env("PCGATE_UPSTREAM__BASE_URL", "ftp://x");
            let msg = message(Config::from_toml(MINIMAL));
            assert!(
                msg.contains("upstream.base_url") && msg.contains("https://"),
                "{msg}"
            );
            jail.clear_env();

            let hash = "Ab".repeat(32);
            let config = route(&format!(
                "match = [\"GET /a\", \"GET /b/*\"]\n[[access.clients]]\nname = \"app\"\nkey_sha256 = \"{hash}\""
            ))
            .map_err(|e| e.to_string())?;
            assert_eq!(config.access.clients[0].key_sha256.as_bytes(), &[0xab; 32]);
            let patterns = config.routes[0].patterns.as_slice();
            assert_eq!(patterns[1].as_str(), "GET /b/*");
            assert!(patterns[1].matches(&http::Method::HEAD, ["b", "c"]));
            assert_eq!(config.routes[0].name(), "GET /a");
            assert_eq!(config.upstream.base_url.as_str(), "http://127.0.0.1:9100");
            Ok(())
        });
    }

    #[test]
    fn a_credential_holds_what_its_grant_uses_and_nothing_else() {
        Jail::expect_with(|jail| {
            jail.create_file("secret", "s3cr3t\n")?;
            let with = |table: &str| {
                Config::from_toml(&format!(
                    "{MINIMAL}\n[credentials.c]\ntoken_url = \"https://login.example/t/oauth2/token\"\nclient_id = \"id\"\n{table}\n"
                ))
            };
            let cases = [
                ("grant = \"client_credentials\"\nclient_secrett = \"s\"", "client_secrett"),
                ("grant = \"client_credentials\"\nclient_secret = \"s\"\nrefresh_token_file = \"rt\"", "refresh_token_file"),
                ("grant = \"client_credentials\"\nclient_secret = \"s\"\nclient_secret_file = \"secret\"", "client_secret_file"),
                ("grant = \"client_credentials\"\nclient_secret = \"s\"\nresource = \"r\"\nscope = \"s\"", "scope"),
                ("grant = \"client_credentials\"\nclient_secret = \"s\"\nrefresh_before = \"soon\"", "duration"),
                ("grant = \"refresh_token\"\nclient_secret = \"s\"", "refresh_token_file"),
                ("grant = \"magic\"", "magic"),
                ("client_secret = \"s\"", "grant"),
                // A key another grant uses is unknown here (figment's tables are sorted: `client_id` first).
                ("grant = \"static\"\ntoken = \"t\"", "unknown field: found `client_id`"),
            ];
            for (table, key) in cases {
                let msg = message(with(table));
                assert!(
                    msg.contains("credentials.c") && msg.contains(key),
                    "{table}: {msg}"
                );
                assert!(!msg.contains("s3cr3t"), "{msg}");
            }
            let msg = message(Config::from_toml(&format!(
                "{MINIMAL}\n[credentials.c]\ngrant = \"client_credentials\"\ntoken_url = \"https://login.example/t\"\nclient_id = \"\"\nclient_secret = \"s\"\n"
            )));
            assert!(
                msg.contains("credentials.c") && msg.contains("client_id"),
                "{msg}"
            );
            let msg = message(Config::from_toml(&format!(
                "{MINIMAL}\n[credentials.fixed]\ngrant = \"static\"\ntoken = \"t\"\nrefresh_before = \"1m\"\n"
            )));
            assert!(
                msg.contains("credentials.fixed") && msg.contains("refresh_before"),
                "{msg}"
            );

            // What parses is typed: no option left for `token/` to check again.
            let config = with("grant = \"refresh_token\"\nclient_secret_file = \"secret\"\nrefresh_token_file = \"rt\"")
                .map_err(|e| e.to_string())?;
            let CredentialConfig::RefreshToken(user) = &config.credentials["c"] else {
                panic!("{:?}", config.credentials["c"]);
            };
            assert!(matches!(&user.app.secret, ClientSecret::File(p) if p == Path::new("secret")));
            assert_eq!(
                user.app.audience,
                Audience::Resource(DEFAULT_RESOURCE.into())
            );
            assert_eq!(user.app.refresh_before, DEFAULT_REFRESH_BEFORE);
            assert_eq!(
                config.credentials["c"].client_secret_file(),
                Some(Path::new("secret"))
            );
            assert_eq!(
                config.credentials["c"].refresh_token_file(),
                Some(Path::new("rt"))
            );
            let config = with("grant = \"client_credentials\"\nclient_secret = \"s\"\nscope = \"https://api.partnercenter.microsoft.com/.default\"")
                .map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert!(matches!(&app.audience, Audience::Scope(s) if s.ends_with("/.default")));
            assert_eq!(config.credentials["c"].grant(), Grant::ClientCredentials);
            Ok(())
        });
    }

    /// Issue 15: how the app proves itself is one of a secret, a certificate (both files) or a
    /// federated token; workload identity may take its file, client id and tenant from the
    /// variables the AKS webhook sets, and only workload identity does.
    #[test]
    fn a_credential_authenticates_one_way_and_workload_identity_reads_the_webhooks_variables() {
        Jail::expect_with(|jail| {
            let with = |keys: &str| {
                Config::from_toml(&format!(
                    "{MINIMAL}\n[credentials.c]\ngrant = \"client_credentials\"\n{keys}\n"
                ))
            };
            let named =
                "token_url = \"https://login.example/t/oauth2/token\"\nclient_id = \"id\"\n";
            let config = with(&format!(
                "{named}certificate_file = \"/etc/pc/cert.pem\"\nprivate_key_file = \"/etc/pc/key.pem\""
            ))
            .map_err(|e| e.to_string())?;
            assert_eq!(
                config.credentials["c"].certificate_files(),
                Some((Path::new("/etc/pc/cert.pem"), Path::new("/etc/pc/key.pem")))
            );
            let printed = config.to_toml();
            assert!(
                printed.contains("private_key_file = \"/etc/pc/key.pem\""),
                "{printed}"
            );
            let reloaded = Config::from_toml(&printed).map_err(|e| e.to_string())?;
            assert_eq!(reloaded.to_toml(), printed);

            let refused = [
                ("certificate_file = \"c.pem\"", "`certificate_file` needs `private_key_file`"),
                ("private_key_file = \"k.pem\"", "`private_key_file` needs `certificate_file`"),
                (
                    "client_secret = \"s3cr3t\"\ncertificate_file = \"c\"\nprivate_key_file = \"k\"",
                    "`client_secret` or `certificate_file`, not both",
                ),
                (
                    "client_secret_file = \"s\"\nfederated_token_file = \"t\"",
                    "`client_secret_file` or `federated_token_file`, not both",
                ),
                ("", "federated_token_file"),
            ];
            for (keys, expected) in refused {
                let msg = message(with(&format!("{named}{keys}")));
                assert!(
                    msg.contains("credentials.c") && msg.contains(expected),
                    "{keys}: {msg}"
                );
                assert!(!msg.contains("s3cr3t"), "{msg}");
            }
            // Only workload identity may leave out client_id and token_url, and only with the
            // webhook's variables set.
            let msg = message(with("federated_token_file = \"/t\"\nclient_id = \"id\""));
            assert!(
                msg.contains("token_url") && msg.contains(TENANT_ENV),
                "{msg}"
            );
            let msg = message(with("federated_token_file = \"/t\"\ntoken_url = \"https://login.example/t/oauth2/token\""));
            assert!(
                msg.contains("client_id") && msg.contains(CLIENT_ID_ENV),
                "{msg}"
            );
            jail.set_env(CLIENT_ID_ENV, "wi-client");
            jail.set_env(TENANT_ENV, "wi-tenant");
            let msg = message(with("client_secret = \"s\""));
            assert!(
                msg.contains("client_id"),
                "a secret credential ignores AZURE_*: {msg}"
            );

            // A credential with no secret at all, in a pod the webhook labelled: workload identity.
            jail.set_env(
                FEDERATED_TOKEN_ENV,
                "/var/run/secrets/azure/tokens/azure-identity-token",
            );
            let config = with("").map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert_eq!(
                config.credentials["c"].federated_token_file(),
                Some(Path::new(
                    "/var/run/secrets/azure/tokens/azure-identity-token"
                ))
            );
            assert_eq!(app.client_id, "wi-client");
            // Federated credentials are documented on the v2 endpoint: a token URL made from the
            // variables with no resource or scope asks v2 for the Partner Center scope.
            assert_eq!(
                app.token_url.as_str(),
                "https://login.microsoftonline.com/wi-tenant/oauth2/v2.0/token"
            );
            assert_eq!(
                app.audience,
                Audience::Scope("https://api.partnercenter.microsoft.com/.default".into())
            );
            // A resource asked for keeps the v1 endpoint; a token_url written keeps its default
            // audience, the v1 resource.
            let config = with("resource = \"https://api.partnercenter.microsoft.com\"")
                .map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert_eq!(
                app.token_url.as_str(),
                "https://login.microsoftonline.com/wi-tenant/oauth2/token"
            );
            let config = with("token_url = \"https://login.example/t/oauth2/token\"")
                .map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert_eq!(app.audience, Audience::Resource(DEFAULT_RESOURCE.into()));
            // The config wins over the variables; a v2 scope gets the v2 endpoint; the authority
            // can be another cloud's.
            jail.set_env(AUTHORITY_HOST_ENV, "https://login.microsoftonline.us");
            let config = with("client_id = \"mine\"\nfederated_token_file = \"/t\"\nscope = \"https://api.partnercenter.microsoft.com/.default\"")
                .map_err(|e| e.to_string())?;
            let app = config.credentials["c"].app().expect("an app credential");
            assert_eq!(app.client_id, "mine");
            assert_eq!(
                app.token_url.as_str(),
                "https://login.microsoftonline.us/wi-tenant/oauth2/v2.0/token"
            );
            assert_eq!(
                config.credentials["c"].federated_token_file(),
                Some(Path::new("/t"))
            );
            // check-config prints what the variables filled in, and it reloads as it is.
            let printed = config.to_toml();
            assert!(
                printed.contains("client_id = \"mine\"") && printed.contains("wi-tenant"),
                "{printed}"
            );
            Ok(())
        });
    }

    #[test]
    fn upstream_rate_limit_is_optional_parsed_and_named_when_bad() {
        Jail::expect_with(|jail| {
            let config = Config::from_toml(MINIMAL).map_err(|e| e.to_string())?;
            assert_eq!(config.upstream.rate_limit, None, "no limit by default");
            assert!(!config.to_toml().contains("rate_limit"));
            let with = |rate: &str| {
                Config::from_toml(&format!(
                    "[upstream]\nbase_url = \"http://127.0.0.1:9100\"\nrate_limit = {rate}\n[[routes]]\nmatch = \"GET /v1/invoices\"\n"
                ))
            };
            let config = with("\"20/s\"").map_err(|e| e.to_string())?;
            let rate = config.upstream.rate_limit.expect("set");
            assert_eq!((rate.count, rate.period), (20, Duration::from_secs(1)));
            // It prints as it was written, and the printed config reloads.
            let printed = config.to_toml();
            assert!(printed.contains("rate_limit = \"20/s\""), "{printed}");
            let reloaded = Config::from_toml(&printed).map_err(|e| e.to_string())?;
            assert_eq!(reloaded.upstream.rate_limit, Some(rate));
            for bad in ["\"20\"", "\"0/s\"", "\"20/d\"", "20"] {
                let msg = message(with(bad));
                assert!(msg.contains("upstream.rate_limit"), "{bad}: {msg}");
            }
            jail.set_env("PCGATE_UPSTREAM__RATE_LIMIT", "lots");
            let msg = message(Config::from_toml(MINIMAL));
            assert!(
                msg.contains("upstream.rate_limit") && msg.contains("\"20/s\""),
                "{msg}"
            );
            jail.set_env("PCGATE_UPSTREAM__RATE_LIMIT", "600/m");
            let config = Config::from_toml(MINIMAL).map_err(|e| e.to_string())?;
            assert_eq!(config.upstream.rate_limit.map(|r| r.count), Some(600));
            Ok(())
        });
    }

    #[test]
    fn the_printed_config_reloads_to_the_same_values() {
        Jail::expect_with(|_jail| {
            let hash = "ab".repeat(32);
            let config = Config::from_toml(&format!(
                r#"
                [credentials.user]
                grant = "refresh_token"
                token_url = "https://login.example/t/oauth2/v2.0/token"
                client_id = "id"
                client_secret = "s3cr3t-value"
                scope = "https://api.partnercenter.microsoft.com/.default"
                refresh_token = "r3fr3sh-value"
                refresh_token_file = "/var/lib/pcgate/refresh-token"
                [[access.clients]]
                name = "billing"
                key_sha256 = "{hash}"
                [[routes]]
                name = "two"
                match = ["GET /a", "GET /b/**"]
                credential = "user"
                "#
            ))
            .map_err(|e| e.to_string())?;
            let printed = config.to_toml();
            for secret in ["s3cr3t-value", "r3fr3sh-value"] {
                assert!(!printed.contains(secret), "{printed}");
            }
            let reloaded = Config::from_toml(&printed).map_err(|e| e.to_string())?;
            assert_eq!(reloaded.to_toml(), printed);
            assert_eq!(
                reloaded.access.clients[0].key_sha256.as_bytes(),
                &[0xab; 32]
            );
            assert_eq!(reloaded.routes[0].patterns, config.routes[0].patterns);
            let user = reloaded.credentials["user"]
                .app()
                .expect("an app credential");
            assert!(matches!(&user.audience, Audience::Scope(_)));
            assert_eq!(
                reloaded.credentials["user"].refresh_token_file(),
                Some(Path::new("/var/lib/pcgate/refresh-token"))
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_never_appear_in_the_printed_config() {
        Jail::expect_with(|_jail| {
            let config = Config::from_toml(
                r#"
                [credentials.app]
                grant = "client_credentials"
                token_url = "https://login.example/t/oauth2/token"
                client_id = "id"
                client_secret = "s3cr3t-value"
                [credentials.fixed]
                grant = "static"
                token = "fixed-t0ken"
                [[routes]]
                match = "GET /a"
                credential = "app"
                "#,
            )
            .map_err(|e| e.to_string())?;
            let printed = config.to_toml();
            let debugged = format!("{config:?}");
            for secret in ["s3cr3t-value", "fixed-t0ken"] {
                assert!(!printed.contains(secret), "{printed}");
                assert!(!debugged.contains(secret), "{debugged}");
            }
            assert!(printed.contains("[redacted]"));
            // The printed config is itself a valid config.
            Config::from_toml(&printed).map_err(|e| e.to_string())?;
            Ok(())
        });
    }
}
