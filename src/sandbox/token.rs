//! The fake Entra ID token endpoint (`POST /{tenant}/oauth2/token`, reference §4.2/§4.3) and the
//! store of the tokens it has issued.
//!
//! v1 answers carry `expires_in`, `ext_expires_in`, `expires_on` and `not_before` as strings;
//! v2 answers (path `/oauth2/v2.0/token`, or `scope` without `resource`) carry numbers and no
//! `expires_on`. `client_credentials` issues an app-only token; `refresh_token` issues an
//! App+User token and a new refresh token, and the presented one stops working (strict rotation).
//! Expiry runs on tokio's clock; only `expires_on`/`not_before` read the wall clock, because
//! clients compare them with theirs.
//!
//! The app authenticates with a client secret (any of [`ClientCredentials`]' secrets), or a
//! `client_assertion` (`client_assertion_type` jwt-bearer): a JWT signed by a trusted
//! certificate's key and naming it by `x5t#S256` or `x5t`, checked as Entra ID does (RS256 or
//! PS256 signature, `aud` = the sandbox's own URL for the path posted to (its bound address, not
//! the Host header), `iss` = `sub` = the client id, `exp` (required) and `nbf` with a minute of
//! skew, a `jti` never seen before), or a federated token equal to
//! one configured. What is accepted can be replaced at run time (`POST /__sandbox/credentials`),
//! so a test or a demo user can rotate a secret: accept the new one, then refuse the old.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use http::{header, HeaderValue, Method, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{read_body, State};
use crate::body::{self, Response};

/// The audience a token is issued for when the request names none.
const DEFAULT_RESOURCE: &str = "https://api.partnercenter.microsoft.com";

/// The largest token request body read.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Client credentials: the application alone.
    App,
    /// Refresh token: the application acting for a user.
    User,
}

/// Tokens issued so far: access tokens with their expiry, and the one live refresh token.
#[derive(Debug)]
pub struct TokenStore {
    access: HashMap<String, (TokenKind, Instant)>,
    refresh: String,
}

impl TokenStore {
    /// A store whose only valid refresh token is `refresh`.
    pub fn new(refresh: String) -> TokenStore {
        TokenStore {
            access: HashMap::new(),
            refresh,
        }
    }

    /// Issues an access token of `kind` valid until `now + ttl`.
    pub fn issue(&mut self, kind: TokenKind, ttl: Duration, now: Instant) -> String {
        self.access.retain(|_, (_, expires)| *expires > now);
        let prefix = match kind {
            TokenKind::App => "sbx-app-",
            TokenKind::User => "sbx-user-",
        };
        let token = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        self.access.insert(token.clone(), (kind, now + ttl));
        token
    }

    /// The kind of `token` if it was issued here, is unexpired and was not revoked.
    pub fn check(&self, token: &str, now: Instant) -> Option<TokenKind> {
        match self.access.get(token) {
            Some((kind, expires)) if *expires > now => Some(*kind),
            _ => None,
        }
    }

    /// Swaps the live refresh token for a new one if `presented` is it.
    pub fn rotate(&mut self, presented: &str) -> Option<String> {
        if presented != self.refresh {
            return None;
        }
        self.refresh = format!("sbx-refresh-{}", uuid::Uuid::new_v4().simple());
        Some(self.refresh.clone())
    }

    /// Invalidates every access token issued so far.
    pub fn revoke_all(&mut self) {
        self.access.clear();
    }
}

/// `client_assertion_type` for JWT bearer assertions (RFC 7523 §2.2).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew allowed on an assertion's `exp` and `nbf`.
const ASSERTION_LEEWAY_SECS: u64 = 60;
/// The longest assertion lifetime accepted (bounds how long a `jti` is remembered).
const MAX_ASSERTION_LIFETIME_SECS: u64 = 24 * 3600;
/// The most `jti`s remembered; past it the oldest-expiring are forgotten first.
const MAX_REMEMBERED_JTIS: usize = 100_000;

/// A certificate the app registration trusts.
struct TrustedCertificate {
    x5t: String,
    x5t_s256: String,
    key: DecodingKey,
}

/// What the token endpoint accepts from the app: client secrets, certificates (for signed
/// assertions) and federated tokens; and the `jti`s of assertions already used, until they expire.
pub struct ClientCredentials {
    /// The sandbox's own `http://IP:PORT`: an assertion's `aud` must be a token URL under it.
    base_url: String,
    secrets: Vec<String>,
    certificates: Vec<TrustedCertificate>,
    federated_tokens: Vec<String>,
    seen_jtis: HashMap<String, u64>,
}

/// `POST /__sandbox/credentials`: each list present replaces what is accepted of its kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsPatch {
    client_secrets: Option<Vec<String>>,
    certificates: Option<Vec<String>>,
    federated_tokens: Option<Vec<String>>,
}

fn trusted(pem: &str) -> Result<TrustedCertificate, String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "a certificate is not PEM (-----BEGIN CERTIFICATE-----)".to_owned())?;
    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| format!("a certificate holds no RSA public key: {e}"))?;
    let (x5t, x5t_s256, _) = crate::token::assertion::thumbprints(der.as_ref());
    Ok(TrustedCertificate { x5t, x5t_s256, key })
}

/// The first 12 hex digits of a value's SHA-256: enough for a test to tell values apart in the
/// request log, nothing to sign in with.
fn fingerprint(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An `invalid_client` refusal (401), by its AADSTS code; made into the answer by [`handle`].
#[derive(Debug)]
struct Refused {
    code: u32,
    text: String,
}

#[derive(Deserialize)]
struct AssertionClaims {
    sub: Option<String>,
    exp: u64,
    jti: Option<String>,
}

impl ClientCredentials {
    /// Accepts `secret`, the PEM `certificates` and the `federated_tokens`.
    pub fn new(
        secret: &str,
        certificates: &[String],
        federated_tokens: &[String],
    ) -> Result<ClientCredentials, String> {
        Ok(ClientCredentials {
            base_url: String::new(),
            secrets: vec![secret.to_owned()],
            certificates: certificates
                .iter()
                .map(|pem| trusted(pem))
                .collect::<Result<_, _>>()?,
            federated_tokens: federated_tokens.to_vec(),
            seen_jtis: HashMap::new(),
        })
    }

    /// Sets the sandbox's own `http://IP:PORT`, once it is bound: assertions must name a token
    /// URL under it as their `aud`.
    pub fn set_base_url(&mut self, base_url: String) {
        self.base_url = base_url;
    }

    /// The `aud` an assertion posted to `path` must carry: the sandbox's own URL for it, as
    /// Entra ID expects its own token URL, whatever Host header or URI authority came (HTTP/1 and
    /// HTTP/2 alike).
    fn audience(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Applies a `POST /__sandbox/credentials` body; all or nothing.
    pub fn patch(&mut self, body: &[u8]) -> Result<(), String> {
        // serde_json's message quotes what it could not take, which here is a secret, a token or
        // a certificate: only where it stopped is shown.
        let patch: CredentialsPatch = serde_json::from_slice(body).map_err(|e| {
            format!(
                "expected {{\"client_secrets\": [...], \"certificates\": [PEM...], \
                 \"federated_tokens\": [...]}}, each optional and each a list of strings; the \
                 body is not that (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let certificates = match &patch.certificates {
            Some(pems) => Some(
                pems.iter()
                    .map(|pem| trusted(pem))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        if let Some(secrets) = patch.client_secrets {
            if secrets.iter().any(String::is_empty) {
                return Err("client_secrets must not hold an empty secret".into());
            }
            self.secrets = secrets;
        }
        if let Some(certificates) = certificates {
            self.certificates = certificates;
        }
        if let Some(tokens) = patch.federated_tokens {
            self.federated_tokens = tokens;
        }
        Ok(())
    }

    /// What `GET /__sandbox/credentials` shows: counts and thumbprints, never a secret.
    pub fn summary(&self) -> Value {
        json!({
            "client_secrets": self.secrets.len(),
            "certificates": self.certificates.iter().map(|c| &c.x5t_s256).collect::<Vec<_>>(),
            "federated_tokens": self.federated_tokens.len(),
        })
    }

    /// Checks a client secret; the log note names it by fingerprint.
    fn check_secret(&self, secret: &str, client_id: &str) -> Result<String, Refused> {
        if self.secrets.iter().any(|s| s == secret) {
            return Ok(format!("client_secret sha256:{}", fingerprint(secret)));
        }
        Err(Refused {
            code: 7_000_215,
            text: format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        })
    }

    /// Checks a client assertion sent to `audience` (the token URL) by `client_id`.
    fn check_assertion(
        &mut self,
        assertion: &str,
        client_id: &str,
        audience: &str,
    ) -> Result<String, Refused> {
        let refused = |code: u32, text: &str| {
            Err(Refused {
                code,
                text: text.to_owned(),
            })
        };
        if self.federated_tokens.iter().any(|t| t == assertion) {
            return Ok(format!("federated sha256:{}", fingerprint(assertion)));
        }
        let Ok(header) = jsonwebtoken::decode_header(assertion) else {
            return refused(50_027, "JWT token is invalid or malformed.");
        };
        let named = |c: &&TrustedCertificate| {
            header.x5t_s256.as_deref() == Some(c.x5t_s256.as_str())
                || header.x5t.as_deref() == Some(c.x5t.as_str())
        };
        if header.x5t_s256.is_none() && header.x5t.is_none() {
            // Not signed by a certificate: a federated token no federated credential matches.
            return refused(
                70_021,
                "No matching federated identity record found for presented assertion.",
            );
        }
        let Some(certificate) = self.certificates.iter().find(named) else {
            return refused(
                700_027,
                "The certificate with identifier used to sign the client assertion is not \
                 registered on application.",
            );
        };
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
            return refused(
                700_027,
                "Client assertion failed signature validation: the algorithm must be RS256 or PS256.",
            );
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = ASSERTION_LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[audience]);
        validation.set_issuer(&[client_id]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let claims =
            match jsonwebtoken::decode::<AssertionClaims>(assertion, &certificate.key, &validation)
            {
                Ok(data) => data.claims,
                Err(error) => {
                    use jsonwebtoken::errors::ErrorKind;
                    return match error.kind() {
                        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => refused(
                            700_024,
                            "Client assertion is not within its valid time range.",
                        ),
                        ErrorKind::InvalidSignature => {
                            refused(700_027, "Client assertion failed signature validation.")
                        }
                        ErrorKind::InvalidAudience => refused(
                            700_027,
                            &format!(
                            "Client assertion audience claim does not match the token endpoint \
                             (sandbox: aud must be {audience})."
                        ),
                        ),
                        ErrorKind::InvalidIssuer => refused(
                            700_027,
                            "Client assertion issuer claim must be the client id.",
                        ),
                        _ => refused(700_027, "Client assertion contains invalid claims."),
                    };
                }
            };
        if claims.sub.as_deref() != Some(client_id) {
            return refused(
                700_027,
                "Client assertion subject claim must be the client id.",
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS {
            return refused(
                700_024,
                "Client assertion is not within its valid time range: it expires too far in the future.",
            );
        }
        let Some(jti) = claims.jti.filter(|jti| !jti.is_empty()) else {
            return refused(700_027, "Client assertion has no jti claim.");
        };
        self.seen_jtis
            .retain(|_, exp| *exp + ASSERTION_LEEWAY_SECS >= now);
        if self.seen_jtis.contains_key(&jti) {
            return refused(
                700_027,
                "Client assertion was already used (its jti was seen before): sign a new one for \
                 every request.",
            );
        }
        if self.seen_jtis.len() >= MAX_REMEMBERED_JTIS {
            if let Some(oldest) = self
                .seen_jtis
                .iter()
                .min_by_key(|(_, exp)| **exp)
                .map(|(jti, _)| jti.clone())
            {
                self.seen_jtis.remove(&oldest);
            }
        }
        let note = format!(
            "client_assertion x5t#S256:{} jti:{}",
            certificate.x5t_s256,
            printable(&jti)
        );
        self.seen_jtis.insert(jti, claims.exp);
        Ok(note)
    }
}

/// Answers one token request; with the note on how the app authenticated, for the request log.
pub(super) async fn handle(
    state: &State,
    request: http::Request<Incoming>,
    v2_path: bool,
) -> (Response, Option<String>) {
    // `aud` of an assertion must be this endpoint's own URL, never one the request names.
    let audience = state.credentials().audience(request.uri().path());
    let mut note = None;
    let response = answer(state, request, v2_path, &audience, &mut note).await;
    (response, note)
}

async fn answer(
    state: &State,
    request: http::Request<Incoming>,
    v2_path: bool,
    audience: &str,
    note: &mut Option<String>,
) -> Response {
    if request.method() != Method::POST {
        let mut response = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900_561,
            "The endpoint only accepts POST requests.",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    if let Some(status) = state.faults().token_fail_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return oauth_error(
            status,
            "temporarily_unavailable",
            90_033,
            "A transient error has occurred. Please try again. (sandbox: token_fail_status is set)",
        );
    }
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        return missing("grant_type (the body must be application/x-www-form-urlencoded)");
    }
    let bytes = match read_body(request.into_body(), MAX_FORM_BYTES).await {
        Ok(bytes) => bytes,
        Err(error) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900_144,
                &format!("The request body could not be read: {error}."),
            )
        }
    };
    let mut form: HashMap<String, String> = HashMap::new();
    for (key, value) in form_urlencoded::parse(&bytes) {
        form.entry(key.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());

    let Some(grant_type) = field("grant_type") else {
        return missing("grant_type");
    };
    if grant_type != "client_credentials" && grant_type != "refresh_token" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70_003,
            &format!(
                "The app requested an unsupported grant type '{}'. The sandbox supports \
                 client_credentials and refresh_token.",
                printable(grant_type)
            ),
        );
    }
    let Some(client_id) = field("client_id") else {
        return missing("client_id");
    };
    if client_id != state.options.client_id {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{}' was not found in the directory '{}'.",
                printable(client_id),
                super::SANDBOX_TENANT
            ),
        );
    }
    let checked = match (
        field("client_secret"),
        field("client_assertion_type"),
        field("client_assertion"),
    ) {
        (Some(secret), None, None) => state.credentials().check_secret(secret, client_id),
        (None, Some(JWT_BEARER), Some(assertion)) => state
            .credentials()
            .check_assertion(assertion, client_id, audience),
        (None, Some(other), Some(_)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900_144,
                &format!(
                    "client_assertion_type '{}' is not supported: use {JWT_BEARER}.",
                    printable(other)
                ),
            )
        }
        (Some(_), _, Some(_)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900_144,
                "Send client_secret or client_assertion, not both.",
            )
        }
        (None, None, Some(_)) => return missing("client_assertion_type"),
        _ => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7_000_218,
                "The request body must contain the following parameter: 'client_assertion' or \
                 'client_secret'.",
            )
        }
    };
    match checked {
        Ok(how) => *note = Some(how),
        Err(refused) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                refused.code,
                &refused.text,
            )
        }
    }
    let resource = field("resource");
    let scope = field("scope");
    let v2 = v2_path || (resource.is_none() && scope.is_some());

    let ttl = state.options.token_ttl;
    let now = Instant::now();
    let (kind, refresh_token) = if grant_type == "client_credentials" {
        if resource.is_none() && scope.is_none() {
            return missing(if v2_path { "scope" } else { "resource" });
        }
        (TokenKind::App, None)
    } else {
        let Some(presented) = field("refresh_token") else {
            return missing("refresh_token");
        };
        let rotated = state.tokens().rotate(presented);
        let Some(new_refresh) = rotated else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                70_008,
                "The provided authorization code or refresh token has expired due to inactivity \
                 or was already redeemed. Send a new interactive authorization request for this \
                 user and resource (re-consent).",
            );
        };
        (TokenKind::User, Some(new_refresh))
    };
    let access_token = state.tokens().issue(kind, ttl, now);
    tracing::debug!(
        grant_type,
        kind = ?kind,
        v2,
        "sandbox token issued"
    );

    let seconds = ttl.as_secs();
    let mut body = if v2 {
        json!({
            "token_type": "Bearer",
            "expires_in": seconds,
            "ext_expires_in": seconds,
            "access_token": access_token,
        })
    } else {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        json!({
            "token_type": "Bearer",
            "expires_in": seconds.to_string(),
            "ext_expires_in": seconds.to_string(),
            "expires_on": (unix + seconds).to_string(),
            "not_before": unix.saturating_sub(300).to_string(),
            "resource": resource.unwrap_or(DEFAULT_RESOURCE),
            "access_token": access_token,
        })
    };
    if let (Some(refresh_token), Some(map)) = (refresh_token, body.as_object_mut()) {
        let scope = if v2 {
            scope.unwrap_or("https://api.partnercenter.microsoft.com/user_impersonation")
        } else {
            "user_impersonation"
        };
        map.insert("scope".into(), Value::from(scope));
        map.insert("refresh_token".into(), Value::from(refresh_token));
    }
    token_json(StatusCode::OK, &body)
}

/// `invalid_request` for a missing form field (AADSTS900144).
fn missing(name: &str) -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900_144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

/// An Entra ID error body: `error`, `error_description` (prefixed `AADSTS<code>: `, trailed by
/// trace and correlation ids as Entra writes them), `error_codes`, `timestamp`, ids, `error_uri`.
pub(super) fn oauth_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    let trace_id = uuid::Uuid::new_v4();
    let correlation_id = uuid::Uuid::new_v4();
    let timestamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id.to_string(),
        "correlation_id": correlation_id.to_string(),
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    token_json(status, &body)
}

fn token_json(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(body::full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Echoes client input into an error without letting it grow or carry control characters.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as URL_SAFE;
    use base64::Engine as _;

    #[tokio::test(start_paused = true)]
    async fn access_tokens_expire_on_the_tokio_clock() {
        let mut store = TokenStore::new("r0".into());
        let token = store.issue(TokenKind::App, Duration::from_secs(60), Instant::now());
        assert!(token.starts_with("sbx-app-"));
        assert_eq!(store.check(&token, Instant::now()), Some(TokenKind::App));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.check(&token, Instant::now()), None);
    }

    #[test]
    fn refresh_rotation_is_strict() {
        let mut store = TokenStore::new("r0".into());
        assert_eq!(store.rotate("nope"), None);
        let r1 = store.rotate("r0").unwrap();
        assert_eq!(store.rotate("r0"), None);
        let r2 = store.rotate(&r1).unwrap();
        assert_ne!(r1, r2);
        assert_eq!(store.rotate(&r1), None);
    }

    /// Signs `claims` with `pair`'s key under `alg`, naming the certificate by `x5t#S256`.
    fn signed(
        pair: &crate::sandbox::ThrowawayCertificate,
        alg: Algorithm,
        claims: &Value,
    ) -> String {
        use rustls_pki_types::pem::PemObject;
        use secrecy::ExposeSecret;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pair.certificate_pem.as_bytes())
            .unwrap();
        let mut header = jsonwebtoken::Header::new(alg);
        header.x5t_s256 = Some(crate::token::assertion::thumbprints(der.as_ref()).1);
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            pair.private_key_pem.expose_secret().as_bytes(),
        )
        .unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn unix() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn assertions_are_checked_as_entra_checks_them() {
        let trusted = crate::sandbox::throwaway_certificate("trusted").unwrap();
        let other = crate::sandbox::throwaway_certificate("not-uploaded").unwrap();
        let mut credentials =
            ClientCredentials::new("s", std::slice::from_ref(&trusted.certificate_pem), &[])
                .unwrap();
        let aud = "http://127.0.0.1:9100/t/oauth2/token";
        let claims = |jti: &str, exp: u64| json!({"aud": aud, "iss": "id", "sub": "id", "exp": exp, "nbf": unix(), "iat": unix(), "jti": jti});
        let code = |result: Result<String, Refused>| result.err().map(|r| r.code);

        let good = signed(&trusted, Algorithm::RS256, &claims("a", unix() + 600));
        let note = credentials.check_assertion(&good, "id", aud).unwrap();
        assert!(
            note.starts_with("client_assertion x5t#S256:") && note.ends_with("jti:a"),
            "{note}"
        );
        assert_eq!(
            code(credentials.check_assertion(&good, "id", aud)),
            Some(700_027),
            "replayed jti"
        );
        let pss = signed(&trusted, Algorithm::PS256, &claims("b", unix() + 600));
        assert!(
            credentials.check_assertion(&pss, "id", aud).is_ok(),
            "PS256 is accepted too"
        );

        let expired = signed(&trusted, Algorithm::RS256, &claims("c", unix() - 600));
        assert_eq!(
            code(credentials.check_assertion(&expired, "id", aud)),
            Some(700_024)
        );
        let elsewhere = signed(&trusted, Algorithm::RS256, &claims("d", unix() + 600));
        assert_eq!(
            code(credentials.check_assertion(
                &elsewhere,
                "id",
                "http://127.0.0.1:9100/x/oauth2/token"
            )),
            Some(700_027),
            "aud is the token URL"
        );
        let not_ours = signed(&trusted, Algorithm::RS256, &claims("e", unix() + 600));
        assert_eq!(
            code(credentials.check_assertion(&not_ours, "other-app", aud)),
            Some(700_027)
        );
        let unknown = signed(&other, Algorithm::RS256, &claims("f", unix() + 600));
        assert_eq!(
            code(credentials.check_assertion(&unknown, "id", aud)),
            Some(700_027)
        );
        // A key of another certificate under the trusted one's thumbprint: a bad signature.
        let forged = {
            let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
            parts[2] = unknown.split('.').nth(2).unwrap().to_owned();
            parts.join(".")
        };
        assert_eq!(
            code(credentials.check_assertion(&forged, "id", aud)),
            Some(700_027)
        );
        assert_eq!(
            code(credentials.check_assertion("not a jwt", "id", aud)),
            Some(50_027)
        );

        // Federated tokens: an exact match, replaceable at run time.
        let header = URL_SAFE.encode(br#"{"alg":"RS256","kid":"k"}"#);
        let federated = format!("{header}.e30.c2ln");
        assert_eq!(
            code(credentials.check_assertion(&federated, "id", aud)),
            Some(70_021)
        );
        credentials
            .patch(format!(r#"{{"federated_tokens": ["{federated}"]}}"#).as_bytes())
            .unwrap();
        assert!(credentials
            .check_assertion(&federated, "id", aud)
            .unwrap()
            .starts_with("federated sha256:"));
        // The summary shows counts and thumbprints, never a secret or token.
        let summary = credentials.summary().to_string();
        assert!(
            !summary.contains(&federated) && summary.contains("\"federated_tokens\":1"),
            "{summary}"
        );
    }

    /// Assertions Entra ID would refuse are refused: no algorithm (`none`), HS256 keyed with the
    /// certificate's PEM (the public certificate as an HMAC key), no `exp`, no `jti`.
    #[test]
    fn unsigned_hmac_and_claimless_assertions_are_refused() {
        use rustls_pki_types::pem::PemObject;
        let trusted = crate::sandbox::throwaway_certificate("trusted").unwrap();
        let mut credentials =
            ClientCredentials::new("s", std::slice::from_ref(&trusted.certificate_pem), &[])
                .unwrap();
        let aud = "http://127.0.0.1:9100/t/oauth2/token";
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(trusted.certificate_pem.as_bytes())
                .unwrap();
        let x5t_s256 = crate::token::assertion::thumbprints(der.as_ref()).1;
        let full = json!({"aud": aud, "iss": "id", "sub": "id", "exp": unix() + 600, "nbf": unix(), "iat": unix(), "jti": "j"});
        // The same claims, properly signed, are accepted: what follows fails for its one flaw.
        let good = signed(&trusted, Algorithm::RS256, &full);
        assert!(credentials.check_assertion(&good, "id", aud).is_ok());

        let b64 = |v: &Value| URL_SAFE.encode(v.to_string());
        let claims = |jti: &str| {
            let mut c = full.clone();
            c["jti"] = json!(jti);
            c
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT", "x5t#S256": x5t_s256})),
            b64(&claims("none"))
        );
        let hs256 = {
            let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
            header.x5t_s256 = Some(x5t_s256.clone());
            let key = jsonwebtoken::EncodingKey::from_secret(trusted.certificate_pem.as_bytes());
            jsonwebtoken::encode(&header, &claims("hs256"), &key).unwrap()
        };
        let no_exp = {
            let mut c = claims("no-exp");
            c.as_object_mut().unwrap().remove("exp");
            signed(&trusted, Algorithm::RS256, &c)
        };
        let no_jti = {
            let mut c = claims("");
            c.as_object_mut().unwrap().remove("jti");
            signed(&trusted, Algorithm::RS256, &c)
        };
        let empty_jti = signed(&trusted, Algorithm::RS256, &claims(""));
        for (what, jwt) in [
            ("alg none", &none),
            ("HS256 keyed with the certificate", &hs256),
            ("no exp", &no_exp),
            ("no jti", &no_jti),
            ("an empty jti", &empty_jti),
        ] {
            let refused = credentials
                .check_assertion(jwt, "id", aud)
                .err()
                .unwrap_or_else(|| panic!("{what} was accepted"));
            assert!(
                [50_027, 700_027].contains(&refused.code),
                "{what}: {refused:?}"
            );
        }
    }

    /// A body of the wrong shape is refused saying where, never quoting what it held (a secret).
    #[test]
    fn a_wrong_body_is_refused_without_quoting_it() {
        let mut credentials = ClientCredentials::new("old", &[], &[]).unwrap();
        for body in [
            &br#"{"client_secrets": "s3cr3t-value"}"#[..],
            br#"{"client_secrets": ["ok", {"s3cr3t-value": 1}]}"#,
            br#"{"s3cr3t-value": ["x"]}"#,
            br#"{"federated_tokens": [s3cr3t-value]}"#,
            br#"{"certificates": 7, "client_secrets": ["s3cr3t-value"]}"#,
        ] {
            let error = credentials.patch(body).unwrap_err();
            assert!(
                !error.contains("s3cr3t") && error.contains("line 1, column"),
                "{error}"
            );
        }
        assert!(
            credentials.check_secret("old", "id").is_ok(),
            "nothing applied"
        );
        assert!(credentials.check_secret("s3cr3t-value", "id").is_err());
    }

    #[test]
    fn a_secret_is_rotated_by_accepting_the_new_one_then_refusing_the_old() {
        let mut credentials = ClientCredentials::new("old", &[], &[]).unwrap();
        assert!(credentials.check_secret("old", "id").is_ok());
        assert!(credentials.check_secret("new", "id").is_err());
        credentials
            .patch(br#"{"client_secrets": ["old", "new"]}"#)
            .unwrap();
        assert!(credentials.check_secret("old", "id").is_ok());
        assert!(credentials.check_secret("new", "id").is_ok());
        credentials
            .patch(br#"{"client_secrets": ["new"]}"#)
            .unwrap();
        assert_eq!(
            credentials.check_secret("old", "id").err().map(|r| r.code),
            Some(7_000_215)
        );
        assert_ne!(
            credentials.check_secret("new", "id").unwrap(),
            format!("client_secret sha256:{}", fingerprint("old"))
        );
        assert!(credentials.patch(br#"{"client_secrets": [""]}"#).is_err());
        assert!(credentials
            .patch(br#"{"certificates": ["not pem"]}"#)
            .is_err());
        assert!(
            credentials.patch(br#"{"secrets": ["x"]}"#).is_err(),
            "unknown field"
        );
        assert!(
            credentials.check_secret("new", "id").is_ok(),
            "a bad patch changes nothing"
        );
    }

    #[test]
    fn revoke_invalidates_issued_tokens() {
        let mut store = TokenStore::new("r0".into());
        let now = Instant::now();
        let token = store.issue(TokenKind::User, Duration::from_secs(60), now);
        store.revoke_all();
        assert_eq!(store.check(&token, now), None);
    }
}
