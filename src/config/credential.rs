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
            _ => None,
        }
    }

    /// `certificate_file` and `private_key_file`, for a certificate credential.
    pub fn certificate_files(&self) -> Option<(&Path, &Path)> {
        match &self.app()?.secret {
            ClientSecret::Certificate {
                certificate_file,
                private_key_file,
            } => Some((certificate_file, private_key_file)),
            _ => None,
        }
    }

    /// `federated_token_file`, for a workload identity credential.
    pub fn federated_token_file(&self) -> Option<&Path> {
        match &self.app()?.secret {
            ClientSecret::Federated(path) => Some(path),
            _ => None,
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
    /// Two ways for the app to prove itself (`client_secret`, `client_secret_file`,
    /// `certificate_file`, `federated_token_file`): one is allowed.
    #[error("set one way to authenticate the app: `{0}` or `{1}`, not both")]
    TwoSecrets(&'static str, &'static str),
    /// No way for the app to prove itself.
    #[error(
        "needs a way to authenticate the app: `client_secret_file` (or `client_secret`), \
         `certificate_file` + `private_key_file`, or `federated_token_file` (workload identity; \
         {FEDERATED_TOKEN_ENV} is not set)"
    )]
    NoSecret,
    /// One half of a certificate credential.
    #[error("`{0}` needs `{1}`: a certificate credential is the PEM certificate and its PEM private key")]
    HalfCertificate(&'static str, &'static str),
    /// No `token_url`, and no `AZURE_TENANT_ID` to make one from.
    #[error(
        "needs `token_url` (a workload identity credential may leave it out when {TENANT_ENV} \
         is set, as the AKS webhook does)"
    )]
    NoTokenUrl,
    /// No `client_id`, and no `AZURE_CLIENT_ID` to take it from.
    #[error(
        "needs `client_id` (a workload identity credential may leave it out when {CLIENT_ID_ENV} \
         is set, as the AKS webhook does)"
    )]
    NoClientId,
    /// `AZURE_TENANT_ID` / `AZURE_AUTHORITY_HOST` do not make a token URL.
    #[error("the token URL made from {TENANT_ENV} and {AUTHORITY_HOST_ENV} is not valid: {0}")]
    BadAuthority(String),
    /// `AZURE_AUTHORITY_HOST` is not an `https://` authority (or `http://` on loopback).
    #[error(
        "{AUTHORITY_HOST_ENV} {0:?} {1}: the federated token would be sent there; set it to \
         https://login.microsoftonline.com/ (or your cloud's authority), or set `token_url`"
    )]
    BadAuthorityHost(String, &'static str),
    /// `AZURE_TENANT_ID` is not a tenant id or domain name.
    #[error(
        "{TENANT_ENV} {0:?} is not a tenant: use its id (a GUID) or a domain name such as \
         contoso.onmicrosoft.com (letters, digits, `-`, `.`, `_`; no `/ ? # @` or whitespace)"
    )]
    BadTenant(String),
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

/// The workload identity webhook's variable naming the projected service account token.
pub const FEDERATED_TOKEN_ENV: &str = "AZURE_FEDERATED_TOKEN_FILE";
/// The workload identity webhook's variable holding the app registration's client id.
pub const CLIENT_ID_ENV: &str = "AZURE_CLIENT_ID";
/// The workload identity webhook's variable holding the tenant id.
pub const TENANT_ENV: &str = "AZURE_TENANT_ID";
/// The workload identity webhook's variable holding the Entra ID authority.
pub const AUTHORITY_HOST_ENV: &str = "AZURE_AUTHORITY_HOST";
/// The authority when `AZURE_AUTHORITY_HOST` is unset (the public cloud).
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
/// The v2 scope of the Partner Center API: what a workload identity credential whose token URL
/// comes from the environment asks for when it names neither `resource` nor `scope`.
pub const DEFAULT_SCOPE: &str = "https://api.partnercenter.microsoft.com/.default";

/// How the app proves itself at the token endpoint. (Named for the first kind it had.)
#[derive(Debug, Clone)]
pub enum ClientSecret {
    /// `client_secret`, inline.
    Inline(SecretString),
    /// `client_secret_file` (keeps it out of the config), re-read when it changes.
    File(PathBuf),
    /// `certificate_file` + `private_key_file` (PEM): a client assertion signed with the key,
    /// naming the certificate by thumbprint. Both re-read when they change.
    Certificate {
        /// The PEM certificate uploaded to the app registration.
        certificate_file: PathBuf,
        /// Its PEM private key (PKCS#8 or PKCS#1 RSA).
        private_key_file: PathBuf,
    },
    /// `federated_token_file` (workload identity): the file's content is the client assertion,
    /// read for every token request.
    Federated(PathBuf),
}

impl ClientSecret {
    /// What a token request sends to prove the app, in words (for warnings).
    pub fn sent_as(&self) -> &'static str {
        match self {
            ClientSecret::Inline(_) | ClientSecret::File(_) => "the client secret",
            ClientSecret::Certificate { .. } => "the signed client assertion",
            ClientSecret::Federated(_) => "the federated token (the client assertion)",
        }
    }
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
/// `refresh_token`). A workload identity credential (`federated_token_file`, set or from
/// `AZURE_FEDERATED_TOKEN_FILE`) takes a `client_id` and `token_url` it leaves out from
/// `AZURE_CLIENT_ID` and `AZURE_TENANT_ID` (+ `AZURE_AUTHORITY_HOST`), as the AKS webhook sets them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "AppFields", into = "AppFields")]
pub struct AppCredential {
    /// The Entra ID token endpoint (v1 `.../oauth2/token` or v2 `.../oauth2/v2.0/token`).
    pub token_url: TokenUrl,
    /// The app registration's client id.
    pub client_id: String,
    /// How the app proves itself: a secret, a certificate or a federated token.
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
    #[serde(default)]
    token_url: Option<TokenUrl>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default, serialize_with = "redact_option")]
    client_secret: Option<SecretString>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    certificate_file: Option<PathBuf>,
    #[serde(default)]
    private_key_file: Option<PathBuf>,
    #[serde(default)]
    federated_token_file: Option<PathBuf>,
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

/// A variable of the environment, if set and not blank.
fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// How the app proves itself, from the keys written: exactly one way, a certificate as a pair;
/// none written means workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set.
fn client_auth(fields: &AppFields) -> Result<ClientSecret, CredentialError> {
    let mut set: Vec<&'static str> = Vec::new();
    let mut found = None;
    if let Some(secret) = &fields.client_secret {
        set.push("client_secret");
        found = Some(ClientSecret::Inline(secret.clone()));
    }
    if let Some(path) = &fields.client_secret_file {
        set.push("client_secret_file");
        found = Some(ClientSecret::File(path.clone()));
    }
    match (&fields.certificate_file, &fields.private_key_file) {
        (Some(certificate_file), Some(private_key_file)) => {
            set.push("certificate_file");
            found = Some(ClientSecret::Certificate {
                certificate_file: certificate_file.clone(),
                private_key_file: private_key_file.clone(),
            });
        }
        (Some(_), None) => {
            return Err(CredentialError::HalfCertificate(
                "certificate_file",
                "private_key_file",
            ))
        }
        (None, Some(_)) => {
            return Err(CredentialError::HalfCertificate(
                "private_key_file",
                "certificate_file",
            ))
        }
        (None, None) => {}
    }
    if let Some(path) = &fields.federated_token_file {
        set.push("federated_token_file");
        found = Some(ClientSecret::Federated(path.clone()));
    }
    if let [first, second, ..] = set[..] {
        return Err(CredentialError::TwoSecrets(first, second));
    }
    match found {
        Some(auth) => Ok(auth),
        None => env(FEDERATED_TOKEN_ENV)
            .map(|path| ClientSecret::Federated(PathBuf::from(path)))
            .ok_or(CredentialError::NoSecret),
    }
}

/// Checks `AZURE_TENANT_ID`: a tenant id (GUID) or a domain name goes into the token URL's path
/// as one segment, so nothing that could end the segment or the path (`/ ? # @`, `%`, `..`,
/// whitespace) is taken.
fn check_tenant(tenant: &str) -> Result<(), CredentialError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if tenant.is_empty() || !tenant.chars().all(allowed) || tenant.chars().all(|c| c == '.') {
        return Err(CredentialError::BadTenant(tenant.to_owned()));
    }
    Ok(())
}

/// Checks `AZURE_AUTHORITY_HOST`: the federated token goes there, so `https://` (or `http://` to
/// loopback, for a local sandbox), with no user info, query or fragment. It comes from the
/// environment, not the reviewed config file, so clear text off this host is refused, not
/// warned about as a configured `token_url` is.
fn check_authority_host(host: &str) -> Result<(), CredentialError> {
    let bad = |why: &'static str| Err(CredentialError::BadAuthorityHost(host.to_owned(), why));
    let Ok(uri) = host.parse::<http::Uri>() else {
        return bad("is not a URL");
    };
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if uri.host().is_some_and(super::url::is_loopback_host) => {}
        Some("http") => return bad("is http:// off loopback (clear text)"),
        _ => return bad("must start with https://"),
    }
    if uri.host().is_none_or(str::is_empty) {
        return bad("has no host");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return bad("must not hold user info (`@`)");
    }
    if uri.query().is_some() || host.contains('#') {
        return bad("must not have a query or fragment");
    }
    Ok(())
}

/// The v1 (or, for a `scope`, v2) token endpoint of `AZURE_TENANT_ID` at `AZURE_AUTHORITY_HOST`.
fn token_url_from_env(audience: &Audience) -> Result<Option<TokenUrl>, CredentialError> {
    let Some(tenant) = env(TENANT_ENV) else {
        return Ok(None);
    };
    check_tenant(&tenant)?;
    let host = env(AUTHORITY_HOST_ENV).unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
    check_authority_host(&host)?;
    let path = match audience {
        Audience::Resource(_) => "oauth2/token",
        Audience::Scope(_) => "oauth2/v2.0/token",
    };
    let url = format!("{}/{tenant}/{path}", host.trim_end_matches('/'));
    TokenUrl::parse(&url)
        .map(Some)
        .map_err(|e| CredentialError::BadAuthority(e.to_string()))
}

impl AppCredential {
    fn from_fields(fields: &AppFields, grant: Grant) -> Result<AppCredential, CredentialError> {
        let secret = client_auth(fields)?;
        let federated = matches!(secret, ClientSecret::Federated(_));
        let audience = match (&fields.resource, &fields.scope) {
            (Some(_), Some(_)) => return Err(CredentialError::TwoAudiences),
            (None, Some(scope)) => Audience::Scope(scope.clone()),
            (Some(resource), None) => Audience::Resource(resource.clone()),
            // Microsoft documents federated credentials on the v2.0 endpoint only ("Microsoft
            // identity platform and the OAuth 2.0 client credentials flow", third case: access
            // token request with a federated credential), and the Azure SDKs' workload identity
            // credentials ask there: so does a token URL pcgate makes from AZURE_TENANT_ID.
            (None, None) if federated && fields.token_url.is_none() => {
                Audience::Scope(DEFAULT_SCOPE.to_owned())
            }
            (None, None) => Audience::Resource(DEFAULT_RESOURCE.to_owned()),
        };
        // Only workload identity reads the webhook's variables: another credential in the same
        // pod may well be a different app registration.
        let client_id = match &fields.client_id {
            Some(id) => id.clone(),
            None if federated => env(CLIENT_ID_ENV).ok_or(CredentialError::NoClientId)?,
            None => return Err(CredentialError::NoClientId),
        };
        if client_id.is_empty() {
            return Err(CredentialError::Empty {
                grant: grant.as_str(),
                key: "client_id",
            });
        }
        let token_url = match &fields.token_url {
            Some(url) => url.clone(),
            None if federated => {
                token_url_from_env(&audience)?.ok_or(CredentialError::NoTokenUrl)?
            }
            None => return Err(CredentialError::NoTokenUrl),
        };
        Ok(AppCredential {
            token_url,
            client_id,
            secret,
            audience,
            refresh_before: fields.refresh_before,
        })
    }

    fn fields(self) -> AppFields {
        let (mut client_secret, mut client_secret_file) = (None, None);
        let (mut certificate_file, mut private_key_file, mut federated_token_file) =
            (None, None, None);
        match self.secret {
            ClientSecret::Inline(secret) => client_secret = Some(secret),
            ClientSecret::File(path) => client_secret_file = Some(path),
            ClientSecret::Certificate {
                certificate_file: certificate,
                private_key_file: key,
            } => {
                certificate_file = Some(certificate);
                private_key_file = Some(key);
            }
            ClientSecret::Federated(path) => federated_token_file = Some(path),
        }
        let (resource, scope) = match self.audience {
            Audience::Resource(resource) => (Some(resource), None),
            Audience::Scope(scope) => (None, Some(scope)),
        };
        AppFields {
            token_url: Some(self.token_url),
            client_id: Some(self.client_id),
            client_secret,
            client_secret_file,
            certificate_file,
            private_key_file,
            federated_token_file,
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
