//! One exchange with an Entra ID token endpoint (v1 `.../oauth2/token` with `resource`, or v2
//! `.../oauth2/v2.0/token` with `scope`): the form sent, the answer parsed (reference §4.2, §4.3).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The longest lifetime a token is taken to have, whatever the endpoint says.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The most of a token endpoint's answer that is read: a token answer is a few KiB (an Entra
/// access token is 1-3 KiB, with an id token and a refresh token well under 16 KiB).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What the endpoint gave us.
pub struct Issued {
    /// The bearer token.
    pub access_token: SecretString,
    /// Its lifetime from now.
    pub expires_in: Duration,
    /// A rotated refresh token (refresh grant only).
    pub refresh_token: Option<SecretString>,
}

/// Why a token request failed. Never carries a secret: OAuth errors are reported by their code
/// and the endpoint's description, transport errors by their cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The endpoint could not be reached or did not answer in time.
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    /// The refresh token is no longer accepted.
    #[error("refresh token expired or revoked: re-consent needed ({0})")]
    InvalidGrant(String),
    /// The client id, secret or assertion was refused.
    #[error("client id or credential refused (invalid_client): {0}")]
    InvalidClient(String),
    /// Any other refusal, with the endpoint's OAuth error code.
    #[error("token endpoint answered {status} {error}: {description}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`, first line.
        description: String,
    },
    /// A 200 we could not use.
    #[error("token endpoint answer unusable: {0}")]
    BadResponse(String),
    /// A 3xx: a token request never follows a redirect, which would send the client secret and
    /// refresh token wherever `Location` names.
    #[error(
        "token endpoint answered {status} redirecting to host {host}; token requests never follow \
         redirects: set token_url to the endpoint itself"
    )]
    Redirected {
        /// HTTP status.
        status: u16,
        /// The `Location`'s host only (its path and query may carry anything).
        host: String,
    },
    /// An answer past [`MAX_RESPONSE_BYTES`], read no further.
    #[error("token endpoint answer too large: {0}")]
    TooLarge(String),
    /// The request could not be made: a credential file cannot be used now (the endpoint was not
    /// asked).
    #[error("{0}")]
    Credential(String),
}

pub use crate::config::Audience;

/// How the app proves itself at each token request: a client secret, inline or from a file that
/// is checked at each token request and re-read when it changed (a Kubernetes Secret updated in
/// place, a rotated Entra ID secret), so a rotation needs no restart; or a client assertion,
/// signed with a certificate's key or read from a workload identity token file (`assertion.rs`).
/// The checks are `stat`s: token requests come about once an hour.
pub enum ClientSecretSource {
    /// `client_secret`.
    Inline(SecretString),
    /// `client_secret_file`.
    File(SecretFile),
    /// `certificate_file` + `private_key_file`.
    Certificate(super::assertion::CertificateCredential),
    /// `federated_token_file`.
    Federated(super::assertion::FederatedToken),
}

/// What a token request carries to authenticate the app.
pub enum ClientAuth {
    /// `client_secret`.
    Secret(SecretString),
    /// `client_assertion` (with `client_assertion_type` jwt-bearer).
    Assertion(SecretString),
}

impl ClientSecretSource {
    /// What to send now, for `client_id` at `token_url` (an assertion names both).
    pub fn current(&self, client_id: &str, token_url: &str) -> Result<ClientAuth, FetchError> {
        match self {
            ClientSecretSource::Inline(secret) => Ok(ClientAuth::Secret(secret.clone())),
            ClientSecretSource::File(file) => Ok(ClientAuth::Secret(file.current())),
            ClientSecretSource::Certificate(certificate) => certificate
                .assertion(client_id, token_url)
                .map(ClientAuth::Assertion)
                .map_err(FetchError::Credential),
            ClientSecretSource::Federated(token) => token
                .current()
                .map(ClientAuth::Assertion)
                .map_err(|e| FetchError::Credential(e.to_string())),
        }
    }
}

/// The most of a credential file that is read (`client_secret_file`, `certificate_file`,
/// `private_key_file`, `federated_token_file`): each holds a few KiB at most (a 4096-bit key in
/// PEM is 3.2 KiB, a projected token 1-2 KiB), so a larger one is the wrong file, or a device
/// that never ends, and is refused rather than read into memory at every token request.
pub const MAX_CREDENTIAL_FILE_BYTES: u64 = 64 * 1024;

/// Reads `path`, refusing one past [`MAX_CREDENTIAL_FILE_BYTES`] (an `InvalidData` error saying
/// so) without reading further.
pub(super) fn read_file_capped(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CREDENTIAL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            too_large(),
        ));
    }
    Ok(bytes)
}

/// What [`read_file_capped`] says of a file past the cap.
pub(super) fn too_large() -> String {
    format!(
        "it is larger than {} KiB, more than any credential file holds: check the path",
        MAX_CREDENTIAL_FILE_BYTES / 1024
    )
}

/// `path` as UTF-8 text, at most [`MAX_CREDENTIAL_FILE_BYTES`].
pub(super) fn read_capped_text(path: &std::path::Path) -> std::io::Result<String> {
    String::from_utf8(read_file_capped(path)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

/// A secret file and what was read from it last.
pub struct SecretFile {
    path: std::path::PathBuf,
    read: std::sync::Mutex<(Option<FileStamp>, SecretString)>,
}

/// What tells a changed file from the one read: its identity, size, modification time and
/// status-change time. A Kubernetes Secret update swaps a symlink, which changes the identity; a
/// rewrite in place of the same length within one mtime tick (or with its mtime put back, as
/// `cp -p` or `rsync -t` do) changes only the ctime, which no one can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// ctime, seconds and nanoseconds (0 off unix).
    changed: (i64, i64),
}

impl FileStamp {
    /// The file's stamp now; `None` when it cannot be read.
    pub(super) fn of(path: &std::path::Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (device, inode, changed) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (device, inode, changed) = (0, 0, (0, 0));
        Some(FileStamp {
            device,
            inode,
            len: meta.len(),
            modified: meta.modified().ok(),
            changed,
        })
    }
}

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// It could not be read.
    #[error("{0}")]
    Unreadable(#[from] std::io::Error),
    /// It holds nothing but whitespace.
    #[error("the file is empty")]
    Empty,
}

impl SecretFile {
    /// Reads the secret from `path` now.
    pub fn open(path: &std::path::Path) -> Result<SecretFile, SecretFileError> {
        let stamp = FileStamp::of(path);
        let secret = read_secret(path)?;
        Ok(SecretFile {
            path: path.to_owned(),
            read: std::sync::Mutex::new((stamp, secret)),
        })
    }

    /// The secret, re-read first if the file changed since it was last read. A file that cannot
    /// be read now (mid-rotation, say) leaves the last secret in use; the log says so, never what
    /// the secret is.
    pub fn current(&self) -> SecretString {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = FileStamp::of(&self.path);
        if stamp != read.0 {
            match read_secret(&self.path) {
                Ok(secret) => {
                    tracing::info!(file = %self.path.display(), "client_secret_file changed: re-read");
                    *read = (stamp, secret);
                }
                Err(error) => tracing::warn!(
                    file = %self.path.display(),
                    %error,
                    "client_secret_file changed but cannot be read: the last secret read stays in use"
                ),
            }
        }
        read.1.clone()
    }
}

fn read_secret(path: &std::path::Path) -> Result<SecretString, SecretFileError> {
    let text = read_capped_text(path)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(SecretString::from(secret.to_owned()))
}

/// A token endpoint and the client credential used at it.
pub struct Endpoint {
    /// Shared HTTP client (rustls with the same roots as the upstream).
    pub client: reqwest::Client,
    /// `token_url`.
    pub url: String,
    /// The app registration.
    pub client_id: String,
    /// How the app proves itself: a secret (inline or from a file re-read when it changes), a
    /// certificate, or a federated token.
    pub client_secret: ClientSecretSource,
    /// What the token is for.
    pub audience: Audience,
}

impl Endpoint {
    /// `grant_type=client_credentials`.
    pub async fn client_credentials(&self) -> Result<Issued, FetchError> {
        self.exchange(&[("grant_type", "client_credentials")]).await
    }

    /// `grant_type=refresh_token`.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<Issued, FetchError> {
        self.exchange(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
        ])
        .await
    }

    async fn exchange(&self, grant: &[(&str, &str)]) -> Result<Issued, FetchError> {
        // Read per request: a rotated secret, certificate or federated token is picked up at the
        // next token request.
        let auth = self.client_secret.current(&self.client_id, &self.url)?;
        let mut form: Vec<(&str, &str)> = vec![("client_id", &self.client_id)];
        match &auth {
            ClientAuth::Secret(secret) => form.push(("client_secret", secret.expose_secret())),
            ClientAuth::Assertion(assertion) => {
                form.push(("client_assertion_type", super::assertion::JWT_BEARER));
                form.push(("client_assertion", assertion.expose_secret()));
            }
        }
        form.extend_from_slice(grant);
        match &self.audience {
            Audience::Resource(resource) => form.push(("resource", resource)),
            Audience::Scope(scope) => form.push(("scope", scope)),
        }
        let response = self
            .client
            .post(&self.url)
            .form(&form)
            .send()
            .await
            .map_err(|e| FetchError::Transport(transport_cause(&e)))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(FetchError::Redirected {
                status: status.as_u16(),
                host: location_host(&response),
            });
        }
        let body = read_capped(response).await?;
        if status.is_success() {
            parse_issued(&body)
        } else {
            Err(parse_refusal(status.as_u16(), &body))
        }
    }
}

/// The host a redirect's `Location` names (resolved against the request URL, so a relative one
/// names the token endpoint's own host), never its path or query.
fn location_host(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|location| response.url().join(location).ok())
        .and_then(|url| url.host_str().map(str::to_owned))
        .map_or_else(
            || "(no usable Location)".to_owned(),
            |host| host.chars().take(255).collect(),
        )
}

/// The answer's body, read chunk by chunk and given up on past [`MAX_RESPONSE_BYTES`] (or at once
/// when `Content-Length` announces more): dropping the response closes the connection, so the
/// rest is never read.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let too_large = |what: String| {
        FetchError::TooLarge(format!(
            "{what}, more than the {} KiB a token answer may have",
            MAX_RESPONSE_BYTES / 1024
        ))
    };
    if let Some(length) = response.content_length() {
        if length > MAX_RESPONSE_BYTES as u64 {
            return Err(too_large(format!("Content-Length {length} bytes")));
        }
    }
    let mut body = Vec::with_capacity(4096);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| FetchError::Transport(transport_cause(&e)))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(too_large(format!(
                "over {} bytes and still sending",
                body.len() + chunk.len()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// reqwest's error chain without the URL's query (there is none) or anything from the form.
fn transport_cause(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "connect failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `expires_in` is a string on v1 endpoints and a number on v2.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

impl Seconds {
    fn get(&self) -> Option<u64> {
        match self {
            Seconds::Number(n) => Some(*n),
            Seconds::Text(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct RawIssued {
    access_token: Option<SecretString>,
    token_type: Option<String>,
    expires_in: Option<Seconds>,
    expires_on: Option<Seconds>,
    refresh_token: Option<SecretString>,
}

/// Parses a 200 from a v1 or v2 endpoint.
pub fn parse_issued(body: &[u8]) -> Result<Issued, FetchError> {
    let raw: RawIssued = serde_json::from_slice(body)
        .map_err(|e| FetchError::BadResponse(format!("not a token response ({e})")))?;
    let access_token = raw
        .access_token
        .filter(|t| !t.expose_secret().is_empty())
        .ok_or_else(|| FetchError::BadResponse("no access_token".into()))?;
    if let Some(kind) = &raw.token_type {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(FetchError::BadResponse(format!(
                "token_type `{kind}` is not Bearer"
            )));
        }
    }
    let seconds = match (&raw.expires_in, &raw.expires_on) {
        (Some(s), _) => s.get(),
        (None, Some(on)) => on.get().map(|on| on.saturating_sub(unix_now())),
        (None, None) => None,
    }
    .ok_or_else(|| FetchError::BadResponse("no usable expires_in or expires_on".into()))?;
    if seconds == 0 {
        return Err(FetchError::BadResponse(
            "the token is already expired".into(),
        ));
    }
    // Entra tokens live about an hour; a day bounds anything odd an endpoint may claim.
    let seconds = seconds.min(MAX_TOKEN_LIFETIME.as_secs());
    Ok(Issued {
        access_token,
        expires_in: Duration::from_secs(seconds),
        refresh_token: raw.refresh_token.filter(|t| !t.expose_secret().is_empty()),
    })
}

#[derive(Deserialize, Default)]
struct RawRefusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    /// Entra ID's `AADSTS` numbers.
    #[serde(default)]
    error_codes: Vec<u64>,
}

/// What to do about an Entra ID refusal, by its `AADSTS` code or the HTTP status.
pub fn advice(status: u16, codes: &[u64]) -> Option<String> {
    let said = |code: u64, what: &str| Some(format!("AADSTS{code}: {what}"));
    for &code in codes {
        match code {
            7000215 => return said(code, "the client secret is wrong: put the app registration's current secret in client_secret_file (it is re-read, no restart needed)"),
            7000222 => return said(code, "the client secret has expired: add a new secret to the app registration in Entra ID and write it to client_secret_file"),
            700024 => return said(code, "the client assertion is expired or not yet valid: check this host's clock and the federated token file's freshness"),
            700027 => return said(code, "the client assertion's signature or certificate is not accepted: upload the certificate to the app registration, or check the federated credential"),
            70008 | 700082 => return said(code, "the refresh token has expired: redo the App+User consent and replace refresh_token_file"),
            50076 | 50078 | 50079 => return said(code, "the user must sign in again with MFA: redo the App+User consent and replace refresh_token_file"),
            70021 | 700211 | 700212 | 700213 => return said(code, "no federated credential of the app registration matches this token (issuer, subject, audience api://AzureADTokenExchange): check the federated credential names this cluster's OIDC issuer and service account"),
            50196 => return said(code, "Entra ID detected a request loop from this client: look for restarting pods or replicas refreshing together; pcgate backs off"),
            _ => {}
        }
    }
    (status == 429).then(|| {
        "the token endpoint throttles this client (429): pcgate backs off; check for many replicas or restarts refreshing at once".to_owned()
    })
}

/// Parses an OAuth error answer (RFC 6749 §5.2).
pub fn parse_refusal(status: u16, body: &[u8]) -> FetchError {
    let raw: RawRefusal = serde_json::from_slice(body).unwrap_or_default();
    // Entra descriptions run to several lines of trace and correlation ids; the first is the point.
    let mut description: String = raw
        .error_description
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    if description.is_empty() {
        description = format!("HTTP {status}");
    }
    if let Some(advice) = advice(status, &raw.error_codes) {
        description = format!("{description} ({advice})");
    }
    match raw.error.as_str() {
        "invalid_grant" => FetchError::InvalidGrant(description),
        "invalid_client" | "unauthorized_client" => FetchError::InvalidClient(description),
        "" => FetchError::Refused {
            status,
            error: "(no OAuth error)".into(),
            description,
        },
        other => FetchError::Refused {
            status,
            error: other.chars().take(64).collect(),
            description,
        },
    }
}

/// Seconds since the Unix epoch, by the wall clock (only to read `expires_on`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Rewrites `path` in place with `text` and puts its mtime back as it was, so only the
    /// content and the ctime tell the change; retried (a few times, 10 ms apart) until the
    /// filesystem's coarse ctime clock has moved, so the change is there to be seen.
    pub(in crate::token) fn rewrite_keeping_mtime(path: &std::path::Path, text: &str) {
        use std::os::unix::fs::MetadataExt;
        let before = std::fs::metadata(path).unwrap();
        for _ in 0..100 {
            std::fs::write(path, text).unwrap();
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(before.modified().unwrap()).unwrap();
            drop(file);
            let after = std::fs::metadata(path).unwrap();
            assert_eq!(after.modified().unwrap(), before.modified().unwrap());
            assert_eq!((after.ino(), after.len()), (before.ino(), before.len()));
            if (after.ctime(), after.ctime_nsec()) != (before.ctime(), before.ctime_nsec()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the ctime of {} never moved", path.display());
    }

    /// A secret rewritten in place with the same length and its mtime put back is still seen
    /// as changed (by its ctime) and read again.
    #[test]
    fn a_same_length_rewrite_with_the_mtime_put_back_is_read_again() {
        let dir = std::env::temp_dir().join(format!("pcgate-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client-secret");
        std::fs::write(&path, "secret-one").unwrap();
        let file = SecretFile::open(&path).unwrap();
        assert_eq!(file.current().expose_secret(), "secret-one");
        rewrite_keeping_mtime(&path, "secret-two");
        assert_eq!(file.current().expose_secret(), "secret-two");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn entra_refusals_say_what_to_do() {
        let refusal = |status: u16, error: &str, codes: &str| {
            let body = format!(
                r#"{{"error":"{error}","error_description":"AADSTS{codes}: Refused.\r\nTrace ID: 0a1b\r\nCorrelation ID: 2c3d","error_codes":[{codes}]}}"#
            );
            parse_refusal(status, body.as_bytes()).to_string()
        };
        let expired = refusal(401, "invalid_client", "7000222");
        assert!(
            expired.contains("has expired") && expired.contains("client_secret_file"),
            "{expired}"
        );
        let wrong = refusal(401, "invalid_client", "7000215");
        assert!(wrong.contains("secret is wrong"), "{wrong}");
        let assertion = refusal(400, "invalid_client", "700027");
        assert!(assertion.contains("certificate"), "{assertion}");
        let stale = refusal(400, "invalid_client", "700024");
        assert!(stale.contains("clock"), "{stale}");
        let consent = refusal(400, "invalid_grant", "70008");
        assert!(consent.contains("consent"), "{consent}");
        let federated = refusal(400, "invalid_client", "70021");
        assert!(federated.contains("federated credential"), "{federated}");
        let looping = refusal(400, "temporarily_unavailable", "50196");
        assert!(looping.contains("loop"), "{looping}");
        let throttled = parse_refusal(429, b"{}").to_string();
        assert!(throttled.contains("throttles"), "{throttled}");
        // An unknown code changes nothing; the description's trace lines never come along.
        let other = refusal(400, "invalid_request", "90002");
        assert!(
            !other.contains("Trace ID") && !other.contains("("),
            "{other}"
        );
    }

    #[test]
    fn v1_answers_have_string_numbers() {
        let issued = parse_issued(
            br#"{"token_type":"Bearer","expires_in":"3600","ext_expires_in":"3600","expires_on":"1546469802","not_before":"1546465902","resource":"https://api.partnercenter.microsoft.com","access_token":"abc"}"#,
        )
        .unwrap();
        assert_eq!(issued.expires_in, Duration::from_secs(3600));
        assert_eq!(issued.access_token.expose_secret(), "abc");
        assert!(issued.refresh_token.is_none());
    }

    #[test]
    fn v2_answers_have_numbers_and_refresh_tokens_rotate() {
        let issued = parse_issued(
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"abc","refresh_token":"r2"}"#,
        )
        .unwrap();
        assert_eq!(issued.expires_in, Duration::from_secs(3599));
        assert_eq!(issued.refresh_token.unwrap().expose_secret(), "r2");
    }

    #[test]
    fn expires_on_is_used_when_expires_in_is_missing() {
        let on = unix_now() + 600;
        let issued =
            parse_issued(format!(r#"{{"access_token":"a","expires_on":"{on}"}}"#).as_bytes())
                .unwrap();
        assert!((595..=600).contains(&issued.expires_in.as_secs()));
    }

    #[test]
    fn absurd_lifetimes_are_capped() {
        let issued =
            parse_issued(br#"{"access_token":"a","expires_in":"99999999999999"}"#).unwrap();
        assert_eq!(issued.expires_in, MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn unusable_answers_are_errors() {
        for body in [
            &br#"{"expires_in":"3600"}"#[..],
            br#"{"access_token":"","expires_in":"3600"}"#,
            br#"{"access_token":"a"}"#,
            br#"{"access_token":"a","expires_in":"soon"}"#,
            br#"{"access_token":"a","expires_in":"0"}"#,
            br#"{"access_token":"a","expires_in":"60","token_type":"mac"}"#,
            b"<html>",
        ] {
            assert!(
                parse_issued(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn oauth_refusals_are_named() {
        let e = parse_refusal(400, br#"{"error":"invalid_grant","error_description":"AADSTS70008: expired.\r\nTrace ID: x"}"#);
        assert!(matches!(e, FetchError::InvalidGrant(_)));
        assert!(e.to_string().contains("re-consent needed"));
        assert!(!e.to_string().contains("Trace ID"));
        let e = parse_refusal(401, br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#);
        assert!(matches!(e, FetchError::InvalidClient(_)));
        let e = parse_refusal(503, b"busy");
        assert!(e.to_string().contains("503"));
    }
}
