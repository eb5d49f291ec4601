//! Token sources: one per configured credential, outside the stack. Each is a cheap handle that
//! returns the current token, refreshes it ahead of expiry in the background, lets one refresh
//! run at a time however many callers wait, backs off while the token endpoint fails, and keeps
//! serving the old token until it really expires.

pub mod assertion;
pub mod endpoint;
pub mod store;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::config::{AppCredential, ClientSecret, CredentialConfig};
use crate::metrics::{CredentialLabel, Metrics, TokenLabels};
use endpoint::{Endpoint, FetchError};

/// First wait after a failed refresh; doubled each failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between refresh attempts while the endpoint fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After a 401 made us fetch a token, another 401 within this long is answered as it is: an
/// upstream that refuses fresh tokens (missing consent or role) must not turn every call into a
/// token request.
pub const REPLACE_INTERVAL: Duration = Duration::from_secs(10);
/// At most this many token requests forced by upstream 401s per credential in any hour: a caller
/// who can provoke 401s must not make pcgate rotate the refresh token every [`REPLACE_INTERVAL`].
pub const MAX_FORCED_PER_HOUR: usize = 6;
/// The window [`MAX_FORCED_PER_HOUR`] counts over.
const FORCED_WINDOW: Duration = Duration::from_secs(3600);
/// A token endpoint call's time limit.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no token can be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("credential `{credential}` has no valid token: {cause}")]
pub struct TokenError {
    /// The credential's name.
    pub credential: String,
    /// The last failure, never a secret.
    pub cause: String,
}

/// Why a token source could not be set up at start.
#[derive(Debug, thiserror::Error)]
#[error("credential `{credential}`: {kind}")]
pub struct SetupError {
    /// The credential's name (`*`: every credential).
    pub credential: String,
    /// What is wrong and what to do.
    #[source]
    pub kind: SetupErrorKind,
}

/// What could not be set up; each says what to do. Never shows a secret.
#[derive(Debug, thiserror::Error)]
pub enum SetupErrorKind {
    /// `client_secret_file` could not be read.
    #[error("client_secret_file {} is not readable ({source})", path.display())]
    SecretFileUnreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `client_secret_file` holds nothing but whitespace.
    #[error("client_secret_file {} is empty", .0.display())]
    SecretFileEmpty(PathBuf),
    /// `certificate_file`, `private_key_file` or `federated_token_file` cannot be used.
    #[error(transparent)]
    CredentialFile(#[from] assertion::CredentialFileError),
    /// `refresh_token_file` exists but could not be read.
    #[error("refresh_token_file {} is not readable ({source})", path.display())]
    RefreshTokenUnreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Rotated refresh tokens could not be written next to `refresh_token_file`.
    #[error(
        "refresh_token_file {}: cannot create files in {} ({source}), where each rotated refresh \
         token is written; make that directory writable by pcgate's user",
        path.display(),
        store::directory(path).display()
    )]
    RefreshTokenDirectory {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither the file nor the config holds a refresh token.
    #[error(
        "no refresh token: refresh_token_file {} does not exist or is empty and no refresh_token \
         is set; run the App+User consent flow and write the refresh token there",
        .0.as_ref().map_or("(unset)".into(), |p| p.display().to_string())
    )]
    NoRefreshToken(Option<PathBuf>),
    /// The token cannot go into an `Authorization` header.
    #[error("the token has characters not allowed in a header")]
    BadToken,
    /// The HTTP client for the token endpoints could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(String),
}

/// A bearer token, ready to put in a header. Its value never appears in `Debug`.
pub struct Token {
    header: HeaderValue,
    /// When it stops being valid (tokio clock).
    pub expires_at: Instant,
    /// The same instant as Unix seconds (for the expiry metric).
    pub expires_at_unix: u64,
    /// When the background task refreshes it.
    refresh_at: Instant,
    /// Counts tokens issued by this source, so a 401 replaces only the token it was seen with.
    generation: u64,
}

impl Token {
    /// `Bearer <token>`, marked sensitive so hyper and logs never show it.
    pub fn header(&self) -> HeaderValue {
        self.header.clone()
    }

    fn is_valid(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

impl Token {
    /// A token that never expires (the `static` grant).
    fn fixed(header: HeaderValue) -> Token {
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        Token {
            header,
            expires_at: Instant::now() + far,
            expires_at_unix: endpoint::unix_now() + far.as_secs(),
            refresh_at: Instant::now() + far,
            generation: 1,
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"[redacted]")
            .field("expires_at_unix", &self.expires_at_unix)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What a caller of [`TokenSource::refresh`] needs.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Any valid token (a call with none).
    Valid,
    /// A token not yet due for refresh (the background task).
    Fresh,
    /// Anything but the token of this generation (the upstream refused it with 401).
    Replace(u64),
}

struct State {
    token: Option<Arc<Token>>,
    /// Token requests made so far; a waiter that sees it move takes that attempt's outcome.
    attempts: u64,
    last_error: Option<String>,
    /// No caller-driven attempt before this, after a failure.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// When 401s made us fetch a new token, oldest first, within the last [`FORCED_WINDOW`].
    forced: VecDeque<Instant>,
}

enum Kind {
    Static(Arc<Token>),
    ClientCredentials(Endpoint),
    RefreshToken {
        endpoint: Endpoint,
        current: Mutex<SecretString>,
        file: Option<PathBuf>,
        /// `current` is not in `file` yet: its write failed and is being retried.
        unsaved: AtomicBool,
        /// With `[shared]` and `shared.key_file`: the fleet's copy of the refresh token.
        shared: std::sync::OnceLock<Arc<crate::shared::tokens::SharedRefreshToken>>,
    },
    /// Tests: a token endpoint that answers at once, counting its requests.
    #[cfg(test)]
    Fake(Arc<tests::Fake>),
}

struct Inner {
    name: String,
    kind: Kind,
    refresh_before: Duration,
    state: RwLock<State>,
    refresh_lock: Arc<tokio::sync::Mutex<()>>,
    metrics: Arc<Metrics>,
}

/// A credential's token source; clone freely.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl TokenSource {
    /// Sets up the source from config: reads secret files, builds the endpoint. Fetches nothing.
    /// The config's shape was checked as it was read; only files are checked here.
    pub fn new(
        name: &str,
        config: &CredentialConfig,
        http: &reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Result<TokenSource, SetupError> {
        let fail = |kind: SetupErrorKind| SetupError {
            credential: name.to_owned(),
            kind,
        };
        let (kind, refresh_before) = match config {
            CredentialConfig::Static(fixed) => {
                let header =
                    bearer(fixed.token.secret()).map_err(|_| fail(SetupErrorKind::BadToken))?;
                (Kind::Static(Arc::new(Token::fixed(header))), Duration::ZERO)
            }
            CredentialConfig::ClientCredentials(app) => (
                Kind::ClientCredentials(endpoint_for(app, http).map_err(fail)?),
                app.refresh_before,
            ),
            CredentialConfig::RefreshToken(user) => {
                let endpoint = endpoint_for(&user.app, http).map_err(fail)?;
                let file = user.refresh_token_file.clone();
                let stored = match &file {
                    Some(path) => store::read(path).map_err(|source| {
                        fail(SetupErrorKind::RefreshTokenUnreadable {
                            path: path.clone(),
                            source,
                        })
                    })?,
                    None => None,
                };
                if let Some(path) = &file {
                    // Every rotation writes the new refresh token there; if it cannot, the token
                    // lives only in memory and a restart needs re-consent. Better to refuse now.
                    store::check_writable(path).map_err(|source| {
                        fail(SetupErrorKind::RefreshTokenDirectory {
                            path: path.clone(),
                            source,
                        })
                    })?;
                    // Exported at zero from start, so the alert has a series to watch.
                    let label = CredentialLabel {
                        credential: name.to_owned(),
                    };
                    let _ = metrics.token_store_failures.get_or_create(&label);
                }
                let current = stored
                    .or_else(|| user.refresh_token.clone())
                    .ok_or_else(|| fail(SetupErrorKind::NoRefreshToken(file.clone())))?;
                (
                    Kind::RefreshToken {
                        endpoint,
                        current: Mutex::new(current),
                        file,
                        unsaved: AtomicBool::new(false),
                        shared: std::sync::OnceLock::new(),
                    },
                    user.app.refresh_before,
                )
            }
        };
        Ok(TokenSource::from_kind(name, kind, refresh_before, metrics))
    }

    /// A source that always gives this static token (tests of the layers that carry a route).
    #[cfg(test)]
    pub(crate) fn fixed(name: &str) -> TokenSource {
        let header = bearer(&SecretString::from(format!("fixed-{name}"))).expect("a header value");
        TokenSource::from_kind(
            name,
            Kind::Static(Arc::new(Token::fixed(header))),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        )
    }

    /// Whether `other` is a handle to this same source.
    pub fn same_as(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn from_kind(
        name: &str,
        kind: Kind,
        refresh_before: Duration,
        metrics: Arc<Metrics>,
    ) -> TokenSource {
        let token = match &kind {
            Kind::Static(token) => Some(token.clone()),
            _ => None,
        };
        TokenSource {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                kind,
                refresh_before,
                state: RwLock::new(State {
                    token,
                    attempts: 0,
                    last_error: None,
                    retry_at: None,
                    backoff: MIN_BACKOFF,
                    forced: VecDeque::new(),
                }),
                refresh_lock: Arc::new(tokio::sync::Mutex::new(())),
                metrics,
            }),
        }
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Why the last token request failed, if it did (never a secret): for `/readyz`.
    pub fn last_error(&self) -> Option<String> {
        let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        state.last_error.clone()
    }

    /// The current token if it is still valid.
    pub fn current(&self) -> Option<Arc<Token>> {
        let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        state.token.clone().filter(|t| t.is_valid(Instant::now()))
    }

    /// A valid token: the current one, or a fresh one from the endpoint (one request however
    /// many callers wait). While the endpoint is failing and in backoff, the last error.
    pub async fn token(&self) -> Result<Arc<Token>, TokenError> {
        match self.current() {
            Some(token) => Ok(token),
            None => self.refresh(Need::Valid).await,
        }
    }

    /// After the upstream refused `rejected` with 401: a different token, or the reason there is none.
    pub async fn replace(&self, rejected: &Token) -> Result<Arc<Token>, TokenError> {
        if matches!(self.inner.kind, Kind::Static(_)) {
            return Err(self.error("the static token was refused by the upstream".into()));
        }
        self.refresh(Need::Replace(rejected.generation)).await
    }

    /// Runs the background refresher until the returned handle is aborted.
    pub fn spawn_refresher(&self) -> Option<tokio::task::JoinHandle<()>> {
        if matches!(self.inner.kind, Kind::Static(_)) {
            return None;
        }
        let source = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep_until(source.next_attempt_at()).await;
                // The outcome is logged and counted inside; failures set the next attempt's time.
                let _ = source.refresh(Need::Fresh).await;
            }
        }))
    }

    fn next_attempt_at(&self) -> Instant {
        let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        match (&state.last_error, &state.retry_at, &state.token) {
            (Some(_), Some(retry_at), _) => *retry_at,
            (_, _, Some(token)) => token.refresh_at,
            _ => Instant::now(),
        }
    }

    fn count(&self, result: &'static str) {
        let labels = TokenLabels {
            credential: self.inner.name.clone(),
            result,
        };
        self.inner
            .metrics
            .token_refreshes
            .get_or_create(&labels)
            .inc();
    }

    fn error(&self, cause: String) -> TokenError {
        TokenError {
            credential: self.inner.name.clone(),
            cause,
        }
    }

    /// Decides, under the refresh lock, whether a token request is needed for `need`; if a
    /// request made while we waited already answered it, that answer is returned instead.
    fn settled(
        &self,
        need: Need,
        attempts_seen: u64,
        now: Instant,
    ) -> Option<Result<Arc<Token>, TokenError>> {
        let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        let valid = state.token.clone().filter(|t| t.is_valid(now));
        match (need, valid) {
            (Need::Valid, Some(token)) => return Some(Ok(token)),
            (Need::Fresh, Some(token)) if token.refresh_at > now => return Some(Ok(token)),
            (Need::Replace(generation), Some(token)) if token.generation != generation => {
                return Some(Ok(token))
            }
            _ => {}
        }
        if matches!(need, Need::Replace(_)) {
            if let Some(cause) = replacement_refused(&state.forced, now) {
                return Some(Err(self.error(cause)));
            }
        }
        let last_error = state.last_error.clone();
        if let Some(cause) = last_error {
            // Someone tried while we waited and failed: share the outcome, don't ask again.
            let tried_meanwhile = state.attempts != attempts_seen;
            // Callers do not drive attempts during backoff; the background task does.
            let backing_off =
                !matches!(need, Need::Fresh) && state.retry_at.is_some_and(|at| now < at);
            if tried_meanwhile || backing_off {
                return Some(Err(self.error(cause)));
            }
        }
        None
    }

    async fn refresh(&self, need: Need) -> Result<Arc<Token>, TokenError> {
        let attempts_seen = self
            .inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .attempts;
        let one_at_a_time = self.inner.refresh_lock.clone().lock_owned().await;
        if let Some(outcome) = self.settled(need, attempts_seen, Instant::now()) {
            return outcome;
        }
        // The exchange runs in its own task, holding the lock: a caller that hangs up (or a
        // deadline) cannot cancel it between the endpoint rotating the refresh token and the
        // new one being kept, which would lose the only valid refresh token.
        let source = self.clone();
        let exchange = tokio::spawn(async move {
            let _one_at_a_time = one_at_a_time;
            source.exchange(need).await
        });
        exchange
            .await
            .unwrap_or_else(|e| Err(self.error(format!("the refresh task ended: {e}"))))
    }

    /// One token request and its outcome recorded; called with the refresh lock held.
    async fn exchange(&self, need: Need) -> Result<Arc<Token>, TokenError> {
        let started = Instant::now();
        let result = self.fetch().await.map_err(|e| e.to_string());
        let mut state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        state.attempts += 1;
        if matches!(need, Need::Replace(_)) {
            state.forced.retain(|at| started < *at + FORCED_WINDOW);
            state.forced.push_back(started);
            let forced = state.forced.len();
            tracing::warn!(
                credential = %self.inner.name,
                forced_in_last_hour = forced,
                limit = MAX_FORCED_PER_HOUR,
                "the upstream refused the token (401): fetched another ahead of time"
            );
            if forced >= MAX_FORCED_PER_HOUR {
                tracing::warn!(
                    credential = %self.inner.name,
                    forced_in_last_hour = forced,
                    "limit of 401-forced token requests reached: further 401s go back to the \
                     caller as they are until the oldest is an hour old"
                );
            }
        }
        let generation = state.token.as_ref().map_or(0, |t| t.generation) + 1;
        match result.and_then(|issued| self.make_token(issued, started, generation)) {
            Ok(token) => {
                let token = Arc::new(token);
                self.count("ok");
                let label = CredentialLabel {
                    credential: self.inner.name.clone(),
                };
                self.inner
                    .metrics
                    .token_expiry
                    .get_or_create(&label)
                    .set(token.expires_at_unix as i64);
                tracing::info!(
                    credential = %self.inner.name,
                    expires_in_s = token.expires_at.saturating_duration_since(started).as_secs(),
                    "token refreshed"
                );
                state.token = Some(token.clone());
                state.last_error = None;
                state.retry_at = None;
                state.backoff = MIN_BACKOFF;
                Ok(token)
            }
            Err(e) => {
                self.count("error");
                let wait = jittered(state.backoff);
                state.retry_at = Some(Instant::now() + wait);
                state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
                let still_valid = state
                    .token
                    .as_ref()
                    .is_some_and(|t| t.is_valid(Instant::now()));
                tracing::warn!(
                    credential = %self.inner.name,
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    still_valid,
                    "token refresh failed"
                );
                state.last_error = Some(e.clone());
                match state.token.clone().filter(|t| t.is_valid(Instant::now())) {
                    // The old token still works: callers keep using it.
                    Some(token) if !matches!(need, Need::Replace(_)) => Ok(token),
                    _ => Err(self.error(e)),
                }
            }
        }
    }

    async fn fetch(&self) -> Result<endpoint::Issued, FetchError> {
        if let Kind::RefreshToken {
            endpoint,
            current,
            file,
            shared,
            ..
        } = &self.inner.kind
        {
            if let Some(share) = shared.get() {
                return self
                    .fetch_shared(share, endpoint, current, file.as_deref())
                    .await;
            }
        }
        match &self.inner.kind {
            Kind::Static(_) => Err(FetchError::BadResponse(
                "a static token is never fetched".into(),
            )),
            Kind::ClientCredentials(endpoint) => endpoint.client_credentials().await,
            #[cfg(test)]
            Kind::Fake(fake) => fake.issue(),
            Kind::RefreshToken {
                endpoint,
                current,
                file,
                ..
            } => {
                let refresh_token = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let issued = endpoint.refresh(&refresh_token).await?;
                if let Some(rotated) = &issued.refresh_token {
                    *current.lock().unwrap_or_else(|e| e.into_inner()) = rotated.clone();
                    if let Some(path) = file {
                        self.save(path, rotated.clone()).await;
                    }
                }
                Ok(issued)
            }
        }
    }

    /// The refresh grant with the fleet (see [`crate::shared::tokens`]): under the credential's
    /// Redis lock, take up a newer refresh token another sidecar stored, refresh with it, and
    /// store the rotated one for the others (a generation compare-and-swap). Redis away: the
    /// token this sidecar holds, as without `[shared]`. Called with the refresh lock held.
    async fn fetch_shared(
        &self,
        share: &crate::shared::tokens::SharedRefreshToken,
        endpoint: &Endpoint,
        current: &Mutex<SecretString>,
        file: Option<&std::path::Path>,
    ) -> Result<endpoint::Issued, FetchError> {
        use crate::shared::tokens::{ShareOutcome, Stored};
        let lease = share.lock().await;
        let outcome = async {
            let held = || current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // Takes up the fleet's token if it is another than the one held; whether it did.
            let take_up = |found: Result<Option<(u64, SecretString)>, _>| -> bool {
                match found {
                    Ok(Some((generation, token)))
                        if generation != share.generation()
                            || token.expose_secret() != held().expose_secret() =>
                    {
                        *current.lock().unwrap_or_else(|e| e.into_inner()) = token;
                        share.adopt(generation);
                        tracing::info!(
                            credential = %self.inner.name,
                            generation,
                            "took up the refresh token another sidecar rotated"
                        );
                        true
                    }
                    Ok(_) => false,
                    Err(_) => {
                        share.count(ShareOutcome::Unavailable);
                        false
                    }
                }
            };
            let mine = held();
            let took_up = take_up(share.read().await);
            let issued = match endpoint.refresh(&held()).await {
                // Another sidecar may have rotated it without the lock (Redis was away, or the
                // lock wait ran out): if the fleet holds another token now, try that one once;
                // if the one taken up was refused, the one held before it.
                Err(FetchError::InvalidGrant(reason)) => {
                    if !take_up(share.read().await) {
                        if !took_up || mine.expose_secret() == held().expose_secret() {
                            return Err(FetchError::InvalidGrant(reason));
                        }
                        *current.lock().unwrap_or_else(|e| e.into_inner()) = mine;
                    }
                    endpoint.refresh(&held()).await?
                }
                other => other?,
            };
            if let Some(rotated) = &issued.refresh_token {
                *current.lock().unwrap_or_else(|e| e.into_inner()) = rotated.clone();
                match share.store(rotated).await {
                    Ok(Stored::Written(_)) => {}
                    Ok(Stored::Conflict(found)) => tracing::warn!(
                        credential = %self.inner.name,
                        found,
                        "another sidecar stored a newer refresh token meanwhile: ours is not stored"
                    ),
                    Err(error) => {
                        share.count(ShareOutcome::Unavailable);
                        tracing::warn!(
                            credential = %self.inner.name,
                            error = %error,
                            "the rotated refresh token could not be shared; it is kept here and in refresh_token_file"
                        );
                    }
                }
                if let Some(path) = file {
                    self.save(path, rotated.clone()).await;
                }
            }
            Ok(issued)
        }
        .await;
        if let Some(lease) = lease {
            share.release(&lease).await;
        }
        outcome
    }

    /// Writes a rotated refresh token to `path`; called with the refresh lock held, so writes
    /// happen in rotation order. A failure is counted and logged, and the write retried (see
    /// [`TokenSource::retry_save`]) while the token stays in memory.
    async fn save(&self, path: &std::path::Path, token: SecretString) -> bool {
        let Kind::RefreshToken { unsaved, .. } = &self.inner.kind else {
            return true;
        };
        let path_owned = path.to_owned();
        let written = tokio::task::spawn_blocking(move || store::write(&path_owned, &token))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match written {
            Ok(()) => {
                unsaved.store(false, Ordering::SeqCst);
                true
            }
            Err(e) => {
                self.inner
                    .metrics
                    .token_store_failures
                    .get_or_create(&CredentialLabel {
                        credential: self.inner.name.clone(),
                    })
                    .inc();
                tracing::error!(
                    credential = %self.inner.name,
                    file = %path.display(),
                    error = %e,
                    "could not save the rotated refresh token; it is kept in memory and the write \
                     is retried, but until it succeeds a restart needs re-consent"
                );
                if !unsaved.swap(true, Ordering::SeqCst) {
                    self.retry_save();
                }
                false
            }
        }
    }

    /// Retries writing the current refresh token, with backoff, until a write succeeds (here or
    /// at the next rotation) or the source is gone.
    fn retry_save(&self) {
        let source = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut wait = MIN_BACKOFF;
            loop {
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(MAX_BACKOFF);
                let Some(inner) = source.upgrade() else {
                    return;
                };
                let source = TokenSource { inner };
                let _one_at_a_time = source.inner.refresh_lock.clone().lock_owned().await;
                let Kind::RefreshToken {
                    current,
                    file: Some(path),
                    unsaved,
                    ..
                } = &source.inner.kind
                else {
                    return;
                };
                if !unsaved.load(Ordering::SeqCst) {
                    return;
                }
                let token = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                // `save` sees `unsaved` already set, so it starts no second retrier.
                if source.save(path, token).await {
                    tracing::info!(
                        credential = %source.inner.name,
                        file = %path.display(),
                        "saved the rotated refresh token on retry"
                    );
                    return;
                }
            }
        });
    }

    fn make_token(
        &self,
        issued: endpoint::Issued,
        started: Instant,
        generation: u64,
    ) -> Result<Token, String> {
        let ttl = issued.expires_in;
        // Refresh `refresh_before` ahead, but never in the first half of a short-lived token's
        // life, and spread over a quarter of that lead so many sidecars do not refresh together.
        let lead = self.inner.refresh_before.min(ttl / 2);
        let spread = lead / 4;
        let jitter = spread.mul_f64(fastrand::f64());
        Ok(Token {
            header: bearer(&issued.access_token)?,
            expires_at: started + ttl,
            expires_at_unix: endpoint::unix_now() + ttl.as_secs(),
            refresh_at: started + ttl - lead - jitter,
            generation,
        })
    }
}

fn bearer(token: &SecretString) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
        .map_err(|_| "the token has characters not allowed in a header".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Why a 401 at `now` gets no new token, given when 401s forced the earlier ones: one came less
/// than [`REPLACE_INTERVAL`] ago, or [`MAX_FORCED_PER_HOUR`] came in the last hour.
fn replacement_refused(forced: &VecDeque<Instant>, now: Instant) -> Option<String> {
    if forced.back().is_some_and(|at| now < *at + REPLACE_INTERVAL) {
        return Some(
            "the upstream refused a token fetched moments ago (401); not fetching another yet"
                .into(),
        );
    }
    let mut recent = forced.iter().filter(|at| now < **at + FORCED_WINDOW);
    let oldest = *recent.next()?;
    let count = 1 + recent.count();
    (count >= MAX_FORCED_PER_HOUR).then(|| {
        format!(
            "the upstream refused {count} tokens fetched after a 401 in the last hour; not \
             fetching another for {} s (at most {MAX_FORCED_PER_HOUR} an hour)",
            (oldest + FORCED_WINDOW)
                .saturating_duration_since(now)
                .as_secs()
        )
    })
}

/// Between half and all of `wait`.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// The token endpoint of a credential, its secret, certificate or federated token read and checked.
fn endpoint_for(app: &AppCredential, http: &reqwest::Client) -> Result<Endpoint, SetupErrorKind> {
    let client_secret = match &app.secret {
        ClientSecret::Inline(secret) => endpoint::ClientSecretSource::Inline(secret.clone()),
        ClientSecret::File(path) => endpoint::ClientSecretSource::File(
            endpoint::SecretFile::open(path).map_err(|error| match error {
                endpoint::SecretFileError::Unreadable(source) => {
                    SetupErrorKind::SecretFileUnreadable {
                        path: path.to_owned(),
                        source,
                    }
                }
                endpoint::SecretFileError::Empty => {
                    SetupErrorKind::SecretFileEmpty(path.to_owned())
                }
            })?,
        ),
        ClientSecret::Certificate {
            certificate_file,
            private_key_file,
        } => endpoint::ClientSecretSource::Certificate(assertion::CertificateCredential::open(
            certificate_file,
            private_key_file,
        )?),
        ClientSecret::Federated(path) => {
            endpoint::ClientSecretSource::Federated(assertion::FederatedToken::open(path)?)
        }
    };
    Ok(Endpoint {
        client: http.clone(),
        url: app.token_url.as_str().to_owned(),
        client_id: app.client_id.clone(),
        client_secret,
        audience: app.audience.clone(),
    })
}

/// Every configured credential's source, by name.
#[derive(Clone, Debug, Default)]
pub struct TokenSources {
    sources: Arc<BTreeMap<String, TokenSource>>,
}

impl TokenSources {
    /// Shares every `refresh_token` credential's refresh token through the fleet (see
    /// [`crate::shared::tokens`]); the names of those that now share. App-only and static
    /// credentials never do.
    pub fn share_refresh_tokens(&self, shares: &crate::shared::tokens::TokenShares) -> Vec<String> {
        let mut sharing = Vec::new();
        for (name, source) in self.sources.iter() {
            if let Kind::RefreshToken { shared, .. } = &source.inner.kind {
                if shared.set(Arc::new(shares.for_credential(name))).is_ok() {
                    sharing.push(name.clone());
                }
            }
        }
        sharing
    }

    /// Sets up one source per `[credentials.NAME]`.
    pub fn new(
        credentials: &BTreeMap<String, CredentialConfig>,
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<TokenSources, SetupError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(connect_timeout)
            .timeout(TOKEN_TIMEOUT)
            // A redirect would re-send the client secret and refresh token to whatever host the
            // `Location` names (even from https to http): a 3xx is a failed refresh instead.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| SetupError {
                credential: "*".into(),
                kind: SetupErrorKind::HttpClient(e.to_string()),
            })?;
        let mut sources = BTreeMap::new();
        for (name, config) in credentials {
            sources.insert(
                name.clone(),
                TokenSource::new(name, config, &http, metrics.clone())?,
            );
        }
        Ok(TokenSources {
            sources: Arc::new(sources),
        })
    }

    /// The source for a credential name (the route table resolves each route's once).
    pub fn get(&self, name: &str) -> Option<&TokenSource> {
        self.sources.get(name)
    }

    /// Static sources under these names (tests of tables and layers that need a source).
    #[cfg(test)]
    pub(crate) fn fixed(names: &[&str]) -> TokenSources {
        let sources = names
            .iter()
            .map(|name| ((*name).to_owned(), TokenSource::fixed(name)))
            .collect();
        TokenSources {
            sources: Arc::new(sources),
        }
    }

    /// Starts every background refresher; abort the handles to stop them.
    pub fn spawn_refreshers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.sources
            .values()
            .filter_map(TokenSource::spawn_refresher)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    /// A token endpoint that answers at once: tokens of `lifetime`, or failures while `failing`.
    pub(super) struct Fake {
        requests: AtomicU64,
        lifetime: Duration,
        failing: AtomicBool,
    }

    impl Fake {
        fn count(&self) -> u64 {
            self.requests.load(Ordering::SeqCst)
        }

        pub(super) fn issue(&self) -> Result<endpoint::Issued, FetchError> {
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            if self.failing.load(Ordering::SeqCst) {
                return Err(FetchError::Transport("the fake endpoint is down".into()));
            }
            Ok(endpoint::Issued {
                access_token: SecretString::from(format!("fake-{n}")),
                expires_in: self.lifetime,
                refresh_token: None,
            })
        }
    }

    /// A source whose endpoint issues tokens of `lifetime`, refreshed `refresh_before` ahead.
    fn fake_with(lifetime: Duration, refresh_before: Duration) -> (TokenSource, Arc<Fake>) {
        let fake = Arc::new(Fake {
            requests: AtomicU64::new(0),
            lifetime,
            failing: AtomicBool::new(false),
        });
        let source = TokenSource::from_kind(
            "fake",
            Kind::Fake(fake.clone()),
            refresh_before,
            Arc::new(Metrics::new()),
        );
        (source, fake)
    }

    fn fake() -> (TokenSource, Arc<Fake>) {
        fake_with(Duration::from_secs(2 * 3600), Duration::from_secs(300))
    }

    #[test]
    fn setup_reads_the_files_the_typed_config_names_and_says_which_failed() {
        let config = crate::config::Config::from_toml(
            "[credentials.app]\ngrant = \"client_credentials\"\ntoken_url = \"https://login.example/t\"\nclient_id = \"id\"\nclient_secret_file = \"/nonexistent/pc-secret\"\n[credentials.fixed]\ngrant = \"static\"\ntoken = \"t0ken\"\n[[routes]]\nmatch = \"GET /a\"\n",
        )
        .unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::upstream::tls_config(None).unwrap())
            .build()
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let error = TokenSource::new("app", &config.credentials["app"], &http, metrics.clone())
            .unwrap_err();
        assert_eq!(error.credential, "app");
        assert!(
            matches!(&error.kind, SetupErrorKind::SecretFileUnreadable { path, .. } if path == std::path::Path::new("/nonexistent/pc-secret")),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("`app`") && text.contains("/nonexistent/pc-secret"),
            "{text}"
        );
        let fixed =
            TokenSource::new("fixed", &config.credentials["fixed"], &http, metrics).unwrap();
        let token = fixed
            .current()
            .expect("a static token is valid from the start");
        assert_eq!(token.header(), "Bearer t0ken");
        assert!(fixed.spawn_refresher().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_provoking_401s_for_an_hour_gets_at_most_the_bound_of_token_requests() {
        let (source, requests) = fake();
        let mut token = source.token().await.unwrap();
        assert_eq!(requests.count(), 1);
        // The first 401 is answered by a new token at once: a revoked token is replaced.
        token = source.replace(&token).await.unwrap();
        assert_eq!(requests.count(), 2);
        // Then every call, one a second for an hour, is refused with 401 on its (fresh) token.
        let started = Instant::now();
        let mut refusal = None;
        while started.elapsed() < Duration::from_secs(3600) {
            match source.replace(&token).await {
                Ok(replaced) => token = replaced,
                Err(e) => refusal = Some(e),
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let forced = requests.count() - 1;
        assert!(
            forced <= MAX_FORCED_PER_HOUR as u64,
            "{forced} token requests forced by 401s in an hour"
        );
        // Refused replacements say why; the limit is a rolling hour, not a lifetime ban.
        let refusal = refusal.unwrap().cause;
        assert!(refusal.contains("in the last hour"), "{refusal}");
        tokio::time::advance(Duration::from_secs(3600)).await;
        token = source.replace(&token).await.unwrap();
        assert_eq!(requests.count(), forced + 2);
        assert!(source.replace(&token).await.is_err(), "10 s apart at least");
    }

    /// The steady state (replaces a 30 s wall-clock test): 2 s tokens refreshed 1 s ahead, with
    /// jitter, for 30 s of paused time; a caller every 50 ms always gets a valid token, without
    /// waiting for a refresh, and the endpoint sees about one request a second.
    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_refreshed_ahead_of_expiry_and_callers_never_wait() {
        let (source, fake) = fake_with(Duration::from_secs(2), Duration::from_secs(1));
        source.token().await.unwrap();
        let refresher = source.spawn_refresher().unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let token = source.current().expect("a valid token at every moment");
            assert!(token.is_valid(Instant::now()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        refresher.abort();
        let fetched = fake.count();
        // One fetch every 0.5–1 s (refresh at most half the life ahead, jittered).
        assert!(
            (25..=70).contains(&fetched),
            "{fetched} token requests in 30 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_first_callers_make_one_token_request() {
        let (source, fake) = fake();
        let calls: Vec<_> = (0..100)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.token().await.map(|_| ()) })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(fake.count(), 1);
    }

    /// The endpoint fails for longer than the token's remaining life minus `refresh_before`:
    /// callers keep the old token until it expires, attempts back off, and then it is an error
    /// naming the cause; once the endpoint is back, the next attempt recovers.
    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ridden_out_with_backoff_until_the_token_expires() {
        let (source, fake) = fake_with(Duration::from_secs(600), Duration::from_secs(300));
        source.token().await.unwrap();
        let refresher = source.spawn_refresher().unwrap();
        fake.failing.store(true, Ordering::SeqCst);
        // Just before expiry: still the old token, and far fewer attempts than seconds passed.
        tokio::time::sleep(Duration::from_secs(590)).await;
        assert!(
            source.current().is_some(),
            "the old token is kept until it expires"
        );
        let attempts = fake.count() - 1;
        assert!(attempts >= 3, "refreshes were not attempted: {attempts}");
        assert!(attempts <= 20, "{attempts} attempts in ~300 s: no backoff");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(source.current().is_none(), "an expired token is not served");
        let error = source.token().await.expect_err("no token to be had");
        assert!(error.cause.contains("down"), "{}", error.cause);
        fake.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF + Duration::from_secs(1)).await;
        assert!(
            source.current().is_some(),
            "recovered once the endpoint is back"
        );
        refresher.abort();
    }
}
