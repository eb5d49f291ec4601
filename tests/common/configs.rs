//! Gateway configs built as values: a base parsed once, then fields set by name
//! (`config.retry.max_attempts = 5`, a route pushed), never TOML text cut apart.

use std::time::Duration;

use pcgate::config::{
    AppCredential, BaseUrl, ClientKey, ClientSecret, Config, CredentialConfig, KeySha256,
    RouteConfig, TokenUrl, UserCredential,
};
use sha2::Digest;

use super::{start_with, TestGateway, TestSandbox};

/// Milliseconds, for the short timeouts tests set.
pub fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Seconds.
pub fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// No credentials and one route, `invoices` (`GET /v1/invoices` and everything below it), to
/// `base_url`; every other value the default.
pub fn invoices_config(base_url: &str) -> Config {
    let mut config = Config::default();
    config.upstream.base_url = base_url_of(base_url);
    config.routes = vec![route(
        "invoices",
        &["GET /v1/invoices", "GET /v1/invoices/**"],
    )];
    config
}

/// `upstream.base_url` from text (tests give valid ones).
pub fn base_url_of(url: &str) -> BaseUrl {
    BaseUrl::parse(url).expect("a valid base URL")
}

/// A credential's `token_url` from text.
pub fn token_url_of(url: &str) -> TokenUrl {
    TokenUrl::parse(url).expect("a valid token URL")
}

/// A route named `name` matching `patterns`: no credential, no cache, no coalescing, no retry.
pub fn route(name: &str, patterns: &[&str]) -> RouteConfig {
    RouteConfig {
        name: Some(name.to_owned()),
        patterns: serde_json::from_value(serde_json::json!(patterns)).expect("valid patterns"),
        credential: None,
        cache_ttl: None,
        stale_while_revalidate: None,
        stale_if_error: None,
        coalesce: false,
        retry: false,
        origin_cache_control: Default::default(),
    }
}

/// A `static` credential with this token.
pub fn static_credential(token: &str) -> CredentialConfig {
    serde_json::from_value(serde_json::json!({"grant": "static", "token": token}))
        .expect("a valid static credential")
}

/// An `[[access.clients]]` entry for the inbound key `key` (its SHA-256 is what is stored).
pub fn client_key(name: &str, key: &[u8]) -> ClientKey {
    ClientKey {
        name: name.to_owned(),
        key_sha256: KeySha256::from_hex(&hex(&sha2::Sha256::digest(key))).expect("64 hex digits"),
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `config` on loopback ports the OS picks, checked as a loaded config is.
pub fn on_loopback(mut config: Config) -> Config {
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.validate().expect("test config is valid");
    config
}

/// Starts a gateway from a config value, on loopback ports the OS picks.
pub async fn start_config(config: Config) -> TestGateway {
    start_with(on_loopback(config)).await
}

impl TestSandbox {
    /// The demo's config for this sandbox (`pcgate::demo::config_for`): the shipped route table
    /// and settings, `app` (client credentials) and `user` (refresh token, inline) against its
    /// token endpoint. Listens where the shipped file says: [`start_config`] moves it to loopback.
    pub fn config(&self) -> Config {
        self.config.clone()
    }
}

/// Reaching into the sandbox config's two credentials and its routes by name.
pub trait ConfigExt {
    /// `[credentials.app]`, a `client_credentials` credential.
    fn app_mut(&mut self) -> &mut AppCredential;
    /// `[credentials.user]`, a `refresh_token` credential.
    fn user_mut(&mut self) -> &mut UserCredential;
    /// The route named `name`.
    fn route_mut(&mut self, name: &str) -> &mut RouteConfig;
}

impl ConfigExt for Config {
    fn app_mut(&mut self) -> &mut AppCredential {
        match self.credentials.get_mut("app") {
            Some(CredentialConfig::ClientCredentials(app)) => app,
            other => panic!("no client_credentials `app`: {other:?}"),
        }
    }

    fn user_mut(&mut self) -> &mut UserCredential {
        match self.credentials.get_mut("user") {
            Some(CredentialConfig::RefreshToken(user)) => user,
            other => panic!("no refresh_token `user`: {other:?}"),
        }
    }

    fn route_mut(&mut self, name: &str) -> &mut RouteConfig {
        self.routes
            .iter_mut()
            .find(|r| r.name() == name)
            .unwrap_or_else(|| panic!("no route `{name}`"))
    }
}

/// A client secret read from `path`.
pub fn secret_from_file(path: &std::path::Path) -> ClientSecret {
    ClientSecret::File(path.to_owned())
}
