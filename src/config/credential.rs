//! `[credentials.NAME]`: a tagged enum by `grant`, each variant holding only what that grant
//! uses, checked here as the config is read (the one place a credential's shape is checked), so
//! `token/` builds a source from it without checking again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::url::TokenUrl;
use super::{DEFAULT_REFRESH_BEFORE, DEFAULT_RESOURCE};

/// How a credential gets its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// App-only: client id and secret.
    ClientCredentials,
    /// App+User: a refresh token from a one-time consent, rotated on every use.
    RefreshToken,
    /// A fixed bearer token (tests, benchmarks).
    Static,
}

impl Grant {
    /// The name used in config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
            Grant::Static => "static",
        }
    }
}

/// `[credentials.NAME]`, by `grant`. An unknown key, or a key another grant uses, is an error
/// that names it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "grant", rename_all = "snake_case")]
pub enum CredentialConfig {
    /// `grant = "client_credentials"`: app-only.
    ClientCredentials(AppCredential),
    /// `grant = "refresh_token"`: App+User.
    RefreshToken(UserCredential),
    /// `grant = "static"`: a fixed token.
    Static(StaticCredential),
}

impl CredentialConfig {
    /// The grant.
    pub fn grant(&self) -> Grant {
        match self {
            CredentialConfig::ClientCredentials(_) => Grant::ClientCredentials,
            CredentialConfig::RefreshToken(_) => Grant::RefreshToken,
            CredentialConfig::Static(_) => Grant::Static,
        }
    }

    /// The app registration, for the grants that have one.
    pub fn app(&self) -> Option<&AppCredential> {
        match self {
            CredentialConfig::ClientCredentials(app) => Some(app),
            CredentialConfig::RefreshToken(user) => Some(&user.app),
            CredentialConfig::Static(_) => None,
        }
    }

    /// `client_secret_file`, if the secret is read from one.
    pub fn client_secret_file(&self) -> Option<&Path> {
        match &self.app()?.secret {
            ClientSecret::File(path) => Some(path),
            ClientSecret::Inline(_) => None,
        }
    }

    /// `refresh_token_file`, for the `refresh_token` grant.
    pub fn refresh_token_file(&self) -> Option<&Path> {
        match self {
            CredentialConfig::RefreshToken(user) => user.refresh_token_file.as_deref(),
            _ => None,
        }
    }
}

/// Why a `[credentials.NAME]` table was refused. Never shows a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// A required value is empty.
    #[error("grant `{grant}` needs `{key}`")]
    Empty {
        /// The grant.
        grant: &'static str,
        /// The empty key.
        key: &'static str,
    },
    /// Both `client_secret` and `client_secret_file`.
    #[error("set `client_secret` or `client_secret_file`, not both")]
    TwoSecrets,
    /// Neither `client_secret` nor `client_secret_file`.
    #[error("needs `client_secret` or `client_secret_file` (preferred)")]
    NoSecret,
    /// Both `resource` and `scope`.
    #[error("set `resource` (v1 token endpoint) or `scope` (v2), not both")]
    TwoAudiences,
    /// `refresh_token` grant with neither `refresh_token_file` nor `refresh_token`.
    #[error("grant `refresh_token` needs `refresh_token_file` (or `refresh_token`)")]
    NoRefreshToken,
    /// A `refresh_token` key on a `client_credentials` credential.
    #[error(
        "grant `client_credentials` does not use `{0}`: remove it, or use grant `refresh_token`"
    )]
    NotForAppOnly(&'static str),
    /// A static token that cannot go into an `Authorization` header as it is.
    #[error("`token` must be printable ASCII without spaces or control characters (check for a trailing newline)")]
    BadToken,
}

/// Where the client secret comes from.
#[derive(Debug, Clone)]
pub enum ClientSecret {
    /// `client_secret`, inline.
    Inline(SecretString),
    /// `client_secret_file` (preferred: keeps it out of the config), read at start.
    File(PathBuf),
}

/// The audience of the tokens asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// v1 endpoints: `resource=...` (default: the Partner Center API).
    Resource(String),
    /// v2 endpoints: `scope=...`, e.g. `https://api.partnercenter.microsoft.com/.default`.
    Scope(String),
}

/// An app registration at a token endpoint (`client_credentials`, and the app part of
/// `refresh_token`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "AppFields", into = "AppFields")]
pub struct AppCredential {
    /// The Entra ID token endpoint (v1 `.../oauth2/token` or v2 `.../oauth2/v2.0/token`).
    pub token_url: TokenUrl,
    /// The app registration's client id.
    pub client_id: String,
    /// The client secret.
    pub secret: ClientSecret,
    /// What the tokens are for.
    pub audience: Audience,
    /// Refresh this long before the token expires.
    pub refresh_before: Duration,
}

/// A `refresh_token` credential: an app registration and the user's refresh token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "AppFields", into = "AppFields")]
pub struct UserCredential {
    /// The app registration.
    pub app: AppCredential,
    /// The first refresh token, inline; used when `refresh_token_file` is absent or empty.
    pub refresh_token: Option<SecretString>,
    /// Where the refresh token is kept; rotated tokens are written back here.
    pub refresh_token_file: Option<PathBuf>,
}

/// A `static` credential.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCredential {
    /// The fixed token.
    pub token: BearerToken,
}

/// A token that goes into `Authorization: Bearer <token>` as it is: printable ASCII, no spaces.
/// Printed as `[redacted]`.
#[derive(Debug, Clone)]
pub struct BearerToken(SecretString);

impl BearerToken {
    /// Checks `token`.
    pub fn new(token: SecretString) -> Result<BearerToken, CredentialError> {
        let text = token.expose_secret();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialError::BadToken);
        }
        Ok(BearerToken(token))
    }

    /// The token.
    pub fn secret(&self) -> &SecretString {
        &self.0
    }
}

impl<'de> Deserialize<'de> for BearerToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BearerToken::new(SecretString::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

impl Serialize for BearerToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// What `check-config` prints for a secret.
const REDACTED: &str = "[redacted]";

/// The keys of the two app grants as written, before their shape is checked.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AppFields {
    token_url: TokenUrl,
    client_id: String,
    #[serde(default, serialize_with = "redact_option")]
    client_secret: Option<SecretString>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, serialize_with = "redact_option")]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    refresh_token_file: Option<PathBuf>,
    #[serde(default = "default_refresh_before", with = "humantime_serde")]
    refresh_before: Duration,
}

fn default_refresh_before() -> Duration {
    DEFAULT_REFRESH_BEFORE
}

fn redact_option<S: Serializer>(
    value: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_str(REDACTED),
        None => serializer.serialize_none(),
    }
}

impl AppCredential {
    fn from_fields(fields: &AppFields, grant: Grant) -> Result<AppCredential, CredentialError> {
        if fields.client_id.is_empty() {
            return Err(CredentialError::Empty {
                grant: grant.as_str(),
                key: "client_id",
            });
        }
        let secret = match (&fields.client_secret, &fields.client_secret_file) {
            (Some(_), Some(_)) => return Err(CredentialError::TwoSecrets),
            (None, None) => return Err(CredentialError::NoSecret),
            (Some(secret), None) => ClientSecret::Inline(secret.clone()),
            (None, Some(path)) => ClientSecret::File(path.clone()),
        };
        let audience = match (&fields.resource, &fields.scope) {
            (Some(_), Some(_)) => return Err(CredentialError::TwoAudiences),
            (None, Some(scope)) => Audience::Scope(scope.clone()),
            (Some(resource), None) => Audience::Resource(resource.clone()),
            (None, None) => Audience::Resource(DEFAULT_RESOURCE.to_owned()),
        };
        Ok(AppCredential {
            token_url: fields.token_url.clone(),
            client_id: fields.client_id.clone(),
            secret,
            audience,
            refresh_before: fields.refresh_before,
        })
    }

    fn fields(self) -> AppFields {
        let (client_secret, client_secret_file) = match self.secret {
            ClientSecret::Inline(secret) => (Some(secret), None),
            ClientSecret::File(path) => (None, Some(path)),
        };
        let (resource, scope) = match self.audience {
            Audience::Resource(resource) => (Some(resource), None),
            Audience::Scope(scope) => (None, Some(scope)),
        };
        AppFields {
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret,
            client_secret_file,
            resource,
            scope,
            refresh_token: None,
            refresh_token_file: None,
            refresh_before: self.refresh_before,
        }
    }
}

impl TryFrom<AppFields> for AppCredential {
    type Error = CredentialError;

    fn try_from(fields: AppFields) -> Result<Self, CredentialError> {
        if fields.refresh_token.is_some() {
            return Err(CredentialError::NotForAppOnly("refresh_token"));
        }
        if fields.refresh_token_file.is_some() {
            return Err(CredentialError::NotForAppOnly("refresh_token_file"));
        }
        AppCredential::from_fields(&fields, Grant::ClientCredentials)
    }
}

impl From<AppCredential> for AppFields {
    fn from(app: AppCredential) -> Self {
        app.fields()
    }
}

impl TryFrom<AppFields> for UserCredential {
    type Error = CredentialError;

    fn try_from(fields: AppFields) -> Result<Self, CredentialError> {
        let app = AppCredential::from_fields(&fields, Grant::RefreshToken)?;
        if fields.refresh_token.is_none() && fields.refresh_token_file.is_none() {
            return Err(CredentialError::NoRefreshToken);
        }
        Ok(UserCredential {
            app,
            refresh_token: fields.refresh_token,
            refresh_token_file: fields.refresh_token_file,
        })
    }
}

impl From<UserCredential> for AppFields {
    fn from(user: UserCredential) -> Self {
        AppFields {
            refresh_token: user.refresh_token,
            refresh_token_file: user.refresh_token_file,
            ..user.app.fields()
        }
    }
}
