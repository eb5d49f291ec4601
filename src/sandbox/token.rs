//! The fake Entra ID token endpoint (`POST /{tenant}/oauth2/token`, reference §4.2/§4.3) and the
//! store of the tokens it has issued.
//!
//! v1 answers carry `expires_in`, `ext_expires_in`, `expires_on` and `not_before` as strings;
//! v2 answers (path `/oauth2/v2.0/token`, or `scope` without `resource`) carry numbers and no
//! `expires_on`. `client_credentials` issues an app-only token; `refresh_token` issues an
//! App+User token and a new refresh token, and the presented one stops working (strict rotation).
//! Expiry runs on tokio's clock; only `expires_on`/`not_before` read the wall clock, because
//! clients compare them with theirs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Answers one token request.
pub(super) async fn handle(
    state: &State,
    request: http::Request<Incoming>,
    v2_path: bool,
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
    let Some(client_secret) = field("client_secret") else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7_000_218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        );
    };
    if client_secret != state.options.client_secret {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7_000_215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is \
                 the client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        );
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

    #[test]
    fn revoke_invalidates_issued_tokens() {
        let mut store = TokenStore::new("r0".into());
        let now = Instant::now();
        let token = store.issue(TokenKind::User, Duration::from_secs(60), now);
        store.revoke_all();
        assert_eq!(store.check(&token, now), None);
    }
}
