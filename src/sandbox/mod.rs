//! `pcgate sandbox`: a local stand-in for Partner Center's billing API and its Entra ID (v1)
//! token endpoint, for the demo, the tests, the benchmarks and for offline development.
//!
//! Routes:
//! - `POST /{tenant}/oauth2/token` (also `/oauth2/v2.0/token`): `client_credentials` gives an
//!   app-only token, `refresh_token` an App+User token and a new refresh token (the old one stops
//!   working). See `token.rs`.
//! - `GET /v1/invoices/summary`, `/v1/invoices/summaries`, `/v1/invoices?size=&offset=`,
//!   `/v1/invoices/{id}`, `/v1/invoices/{id}/lineitems?...` (seek paging with
//!   `MS-ContinuationToken`), `/v1/invoices/{id}/lineitems/{provider}/{type}?size=&offset=`,
//!   `/v1/invoices/{id}/documents/statement`, `/v1/invoices/{id}/receipts/{rid}/documents/statement`.
//!   Each needs `Authorization: Bearer <token from here>` (401 otherwise); summaries, invoice by
//!   id and the PDFs refuse app-only tokens with 403 (reference §4.1). `HEAD` answers each of
//!   them as `GET` does, without the body. Anything else is 404, a wrong method 405. See `api.rs` and `data.rs`.
//! - `GET|POST /__sandbox/faults`: read or partially update the fault knobs (`faults.rs`).
//! - `GET|DELETE /__sandbox/requests`: the request log, or reset it (`requests.rs`).
//! - `GET|POST /__sandbox/credentials`: what the token endpoint accepts from the app (client
//!   secrets, certificates for signed assertions, federated tokens); a POST replaces each list it
//!   names, so a secret can be rotated at run time (`token.rs`).
//!
//! An API call goes: method check, `latency`, the next `script` entry, the rate limit (429 with
//! `Retry-After`), `fail_rate`, the Bearer check, then the data. Errors use Partner Center's
//! ApiFault shape with `"source": "PartnerFD"` (reference §3.1); 429s use the throttling shape
//! (reference §2.4). Responses carry `MS-RequestId` and `MS-CorrelationId` (echoed or made),
//! `MS-CV` (echoed or made) and `MS-ServerId`.
//!
//! The data is generated from the seed and never reads the wall clock; all timing runs on tokio's
//! clock. Tokens, secrets and `Authorization` never reach the tracing log; the request log on
//! `/__sandbox/requests` does show headers as received, by design.

mod api;
mod cert;
mod data;
mod faults;
mod pdf;
mod requests;
mod token;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::body::{self, Response};
use crate::server::{ServeOptions, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT};
use api::ApiRoute;
use faults::{Faults, RateWindow};
use requests::{Record, RequestLog, RouteName};
use token::{ClientCredentials, TokenKind, TokenStore};

pub use cert::{throwaway_certificate, ThrowawayCertificate, THROWAWAY_KEY_BITS};

/// Client id the sandbox's token endpoint accepts by default.
pub const SANDBOX_CLIENT_ID: &str = "pcgate-sandbox-client";
/// Client secret the sandbox's token endpoint accepts by default.
pub const SANDBOX_CLIENT_SECRET: &str = "sandbox-client-secret";
/// The first refresh token the sandbox accepts (it rotates on every use).
pub const SANDBOX_REFRESH_TOKEN: &str = "sandbox-refresh-token-0";
/// The tenant segment [`Sandbox::token_url`] uses (any segment works).
pub const SANDBOX_TENANT: &str = "sandbox-tenant";

/// Default listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
/// Default number of generated invoices.
pub const DEFAULT_INVOICES: usize = 60;
/// Default data seed.
pub const DEFAULT_SEED: u64 = 1;
/// Default access token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Default status of injected failures.
pub const DEFAULT_FAIL_STATUS: u16 = 500;

/// Partner Center error codes the sandbox writes (reference §3.2).
const BAD_INPUT: u32 = 3000;
const NOT_FOUND: u32 = 1000;
const TOKEN_MISSING: u32 = 800_001;
const TOKEN_INVALID: u32 = 900_420;
const ACCESS_DENIED: u32 = 400;
const UNEXPECTED: u32 = 800_003;

/// The value of `MS-ServerId` on every answer.
const SERVER_ID: &str = "sandbox-01";

/// The largest admin request body read.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// How the sandbox starts.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Number of invoices to generate.
    pub invoices: usize,
    /// Seed of the generated data (and of the `fail_rate` draws).
    pub seed: u64,
    /// Lifetime of issued access tokens.
    pub token_ttl: Duration,
    /// Share of API calls, 0.0 to 1.0, answered with `fail_status`.
    pub fail_rate: f64,
    /// Status of injected failures (400 to 599).
    pub fail_status: u16,
    /// Delay before every API call is answered.
    pub latency: Duration,
    /// Most API calls per second; `None` is unlimited.
    pub rate_limit: Option<u32>,
    /// Client id the token endpoint accepts.
    pub client_id: String,
    /// Client secret the token endpoint accepts (until `POST /__sandbox/credentials` replaces it).
    pub client_secret: String,
    /// PEM certificates whose keys may sign client assertions (the app registration's
    /// certificate credentials).
    pub client_certificates: Vec<String>,
    /// Federated tokens accepted as client assertions (workload identity).
    pub federated_tokens: Vec<String>,
    /// The initial refresh token the token endpoint accepts.
    pub refresh_token: String,
}

impl Default for SandboxOptions {
    fn default() -> SandboxOptions {
        SandboxOptions {
            listen: DEFAULT_LISTEN,
            invoices: DEFAULT_INVOICES,
            seed: DEFAULT_SEED,
            token_ttl: DEFAULT_TOKEN_TTL,
            fail_rate: 0.0,
            fail_status: DEFAULT_FAIL_STATUS,
            latency: Duration::ZERO,
            rate_limit: None,
            client_id: SANDBOX_CLIENT_ID.to_owned(),
            client_secret: SANDBOX_CLIENT_SECRET.to_owned(),
            client_certificates: Vec::new(),
            federated_tokens: Vec::new(),
            refresh_token: SANDBOX_REFRESH_TOKEN.to_owned(),
        }
    }
}

impl SandboxOptions {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(format!(
                "sandbox fail_rate {} is out of range: use a number from 0.0 to 1.0",
                self.fail_rate
            ));
        }
        if !(400..=599).contains(&self.fail_status) {
            return Err(format!(
                "sandbox fail_status {} is not an error status: use 400 to 599",
                self.fail_status
            ));
        }
        if self.rate_limit == Some(0) {
            return Err(
                "sandbox rate_limit 0 would refuse every call: use 1 or more, or none".into(),
            );
        }
        if self.client_id.is_empty()
            || self.client_secret.is_empty()
            || self.refresh_token.is_empty()
        {
            return Err(
                "sandbox client_id, client_secret and refresh_token must not be empty".into(),
            );
        }
        Ok(())
    }
}

/// Parses a rate limit written `50/s` or `50` (requests per second, at least 1).
pub fn parse_rate_limit(s: &str) -> Result<u32, String> {
    let number = s.trim();
    let number = number.strip_suffix("/s").unwrap_or(number).trim();
    match number.parse::<u32>() {
        Ok(0) => Err(format!("rate limit `{s}` must be at least 1/s")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "rate limit `{s}` is not valid: write requests per second, like `50/s` or `50`"
        )),
    }
}

/// `http://IP:PORT` of `addr`, with a wildcard address replaced by loopback so it can be dialled.
fn base_url_of(mut addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    format!("http://{addr}")
}

/// A bound, not yet serving, sandbox.
pub struct Sandbox {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<State>,
}

impl Sandbox {
    /// Checks `options`, generates the data and binds the listener (port 0 allowed).
    pub async fn bind(options: SandboxOptions) -> std::io::Result<Sandbox> {
        let invalid =
            |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
        options.validate().map_err(invalid)?;
        let mut credentials = ClientCredentials::new(
            &options.client_secret,
            &options.client_certificates,
            &options.federated_tokens,
        )
        .map_err(|e| invalid(format!("sandbox client_certificates: {e}")))?;
        let listener = TcpListener::bind(options.listen).await?;
        let local_addr = listener.local_addr()?;
        credentials.set_base_url(base_url_of(local_addr));
        Ok(Sandbox {
            listener,
            local_addr,
            state: Arc::new(State::new(options, credentials)),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://IP:PORT`, with a wildcard address replaced by loopback so it can be dialled.
    pub fn base_url(&self) -> String {
        base_url_of(self.local_addr)
    }

    /// The v1 token endpoint: `{base_url}/sandbox-tenant/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}/{SANDBOX_TENANT}/oauth2/token", self.base_url())
    }

    /// Serves until `shutdown` resolves, then drains for up to five seconds.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let state = self.state;
        tracing::info!(
            listen = %self.local_addr,
            invoices = state.data.invoices.len(),
            "sandbox serving"
        );
        let service = tower::service_fn(move |request: http::Request<Incoming>| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(state.handle(request).await) }
        });
        let options = ServeOptions {
            name: "sandbox",
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            // Past any latency fault a test or a developer sets.
            stall_timeout: Duration::from_secs(600),
            grace: Duration::from_secs(5),
            service_refuses_framed_twice: false,
        };
        crate::server::serve(self.listener, service, options, shutdown).await;
    }
}

/// Everything the sandbox keeps, shared by all connections.
struct State {
    options: SandboxOptions,
    data: data::Data,
    tokens: Mutex<TokenStore>,
    credentials: Mutex<ClientCredentials>,
    faults: Mutex<Faults>,
    rate: Mutex<RateWindow>,
    log: Mutex<RequestLog>,
    /// Draws for `fail_rate`, seeded so a run's failures repeat.
    rng: Mutex<fastrand::Rng>,
}

/// Locks `mutex`, carrying on if a panicking holder poisoned it (the data stays usable).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which kind of request this is.
enum Route {
    Token { v2: bool },
    Api(ApiRoute),
    Other,
}

impl Route {
    fn classify(path: &str) -> Route {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            [tenant, oauth2, token]
                if !tenant.is_empty() && *oauth2 == "oauth2" && *token == "token" =>
            {
                Route::Token { v2: false }
            }
            [tenant, oauth2, "v2.0", token]
                if !tenant.is_empty() && *oauth2 == "oauth2" && *token == "token" =>
            {
                Route::Token { v2: true }
            }
            _ => ApiRoute::classify(path).map_or(Route::Other, Route::Api),
        }
    }

    fn name(&self) -> RouteName {
        match self {
            Route::Token { .. } => RouteName::Token,
            Route::Api(api) => api.name(),
            Route::Other => RouteName::Other,
        }
    }
}

impl State {
    fn new(options: SandboxOptions, credentials: ClientCredentials) -> State {
        let faults = Faults {
            fail_rate: options.fail_rate,
            fail_status: options.fail_status,
            latency: options.latency,
            rate_limit: options.rate_limit,
            script: VecDeque::new(),
            retry_after: "1".to_owned(),
            token_fail_status: None,
        };
        State {
            data: data::Data::generate(options.seed, options.invoices),
            tokens: Mutex::new(TokenStore::new(options.refresh_token.clone())),
            credentials: Mutex::new(credentials),
            faults: Mutex::new(faults),
            rate: Mutex::new(RateWindow::default()),
            log: Mutex::new(RequestLog::default()),
            rng: Mutex::new(fastrand::Rng::with_seed(options.seed ^ 0x5eed_fa11)),
            options,
        }
    }

    fn tokens(&self) -> MutexGuard<'_, TokenStore> {
        lock(&self.tokens)
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    fn credentials(&self) -> MutexGuard<'_, ClientCredentials> {
        lock(&self.credentials)
    }

    async fn handle(&self, request: http::Request<Incoming>) -> Response {
        if let Some(admin) = request.uri().path().strip_prefix("/__sandbox/") {
            let admin = admin.to_owned();
            return self.admin(&admin, request).await;
        }
        let route = Route::classify(request.uri().path());
        let name = route.name();
        let mut record = Record::of(&request, name);
        let method = request.method().clone();
        let ids = ResponseIds::of(request.headers());
        let mut response = match route {
            Route::Token { v2 } => {
                let (response, client) = token::handle(self, request, v2).await;
                record.client = client;
                response
            }
            Route::Api(api) => self.api(&api, &request).await,
            Route::Other => pc_error(
                StatusCode::NOT_FOUND,
                NOT_FOUND,
                &format!(
                    "The resource {} was not found. The sandbox serves the Partner Center billing \
                     routes under /v1/invoices and the token endpoint /{{tenant}}/oauth2/token.",
                    printable_path(&record.path)
                ),
            ),
        };
        // Token answers are Entra ID's, which do not carry Partner Center's headers.
        if name != RouteName::Token {
            ids.stamp(response.headers_mut());
        }
        record.status = response.status().as_u16();
        tracing::debug!(
            route = name.as_str(),
            %method,
            status = record.status,
            "sandbox request"
        );
        lock(&self.log).record(record);
        response
    }

    async fn api(&self, route: &ApiRoute, request: &http::Request<Incoming>) -> Response {
        // HEAD is GET without the body (RFC 9110 §9.3.2): hyper sends the head of the GET answer,
        // its Content-Length included, and drops the body.
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = pc_error(
                StatusCode::METHOD_NOT_ALLOWED,
                405,
                &format!(
                    "The method {} is not allowed on this resource; use GET or HEAD.",
                    request.method()
                ),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        // Take the script entry on arrival, so concurrent calls get entries in arrival order.
        let (latency, scripted) = {
            let mut faults = self.faults();
            (faults.latency, faults.script.pop_front())
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(status) = scripted.filter(|status| *status >= 400) {
            return self.injected(status);
        }
        let rate_limit = self.faults().rate_limit;
        if let Some(limit) = rate_limit {
            let admitted = lock(&self.rate).admit(limit, Instant::now());
            if let Err(wait) = admitted {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return throttled(&seconds.max(1).to_string());
            }
        }
        let (fail_rate, fail_status) = {
            let faults = self.faults();
            (faults.fail_rate, faults.fail_status)
        };
        if fail_rate > 0.0 && lock(&self.rng).f64() < fail_rate && fail_status >= 400 {
            return self.injected(fail_status);
        }
        if let Err(refusal) = self.authorize(route, request.headers()) {
            return refusal.into_response();
        }
        api::respond(&self.data, route, request.uri().query(), request.headers())
    }

    /// The Bearer check: a token this sandbox issued, unexpired and unrevoked; App+User for the
    /// routes that need it.
    fn authorize(&self, route: &ApiRoute, headers: &HeaderMap) -> Result<(), Refusal> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty());
        let Some(presented) = presented else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                TOKEN_MISSING,
                "Partner Token missing in request context: send Authorization: Bearer <token>.",
            ));
        };
        match self.tokens().check(presented, Instant::now()) {
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                TOKEN_INVALID,
                "Invalid Token: the access token is unknown, expired or revoked.",
            )),
            Some(TokenKind::App) if route.user_only() => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                ACCESS_DENIED,
                "Access denied: this operation supports App+User credentials only, and the \
                 token presented is app-only (client credentials).",
            )),
            Some(_) => Ok(()),
        }
    }

    /// A failure chosen by the fault knobs. 429 uses the throttling shape; 429 and 503 carry
    /// `Retry-After`.
    fn injected(&self, status: u16) -> Response {
        let retry_after = self.faults().retry_after.clone();
        if status == 429 {
            return throttled(&retry_after);
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = match status.as_u16() {
            500 => UNEXPECTED,
            other => u32::from(other),
        };
        let mut response = pc_error(
            status,
            code,
            &format!(
                "Injected by the sandbox's fault settings ({}).",
                status.canonical_reason().unwrap_or("error")
            ),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            if let Ok(value) = HeaderValue::from_str(&retry_after) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }

    async fn admin(&self, path: &str, request: http::Request<Incoming>) -> Response {
        let method = request.method().clone();
        match (path, method) {
            ("faults", Method::GET) => json_response(StatusCode::OK, &self.faults_json()),
            ("faults", Method::POST) => {
                let bytes = match read_body(request.into_body(), MAX_ADMIN_BODY).await {
                    Ok(bytes) => bytes,
                    Err(error) => return admin_error(&format!("could not read the body: {error}")),
                };
                let patched = self.faults().patch(&bytes);
                match patched {
                    Ok(effects) => {
                        if effects.revoke_tokens {
                            self.tokens().revoke_all();
                        }
                        tracing::info!("sandbox fault settings changed");
                        json_response(StatusCode::OK, &self.faults_json())
                    }
                    Err(error) => admin_error(&error),
                }
            }
            ("requests", Method::GET) => {
                let log = serde_json::to_value(&*lock(&self.log)).unwrap_or(Value::Null);
                json_response(StatusCode::OK, &log)
            }
            ("requests", Method::DELETE) => {
                *lock(&self.log) = RequestLog::default();
                let log = serde_json::to_value(&*lock(&self.log)).unwrap_or(Value::Null);
                json_response(StatusCode::OK, &log)
            }
            ("credentials", Method::GET) => {
                json_response(StatusCode::OK, &self.credentials().summary())
            }
            ("credentials", Method::POST) => {
                let bytes = match read_body(request.into_body(), MAX_ADMIN_BODY).await {
                    Ok(bytes) => bytes,
                    Err(error) => return admin_error(&format!("could not read the body: {error}")),
                };
                let patched = self.credentials().patch(&bytes);
                match patched {
                    Ok(()) => {
                        tracing::info!("sandbox client credentials replaced");
                        json_response(StatusCode::OK, &self.credentials().summary())
                    }
                    Err(error) => admin_error(&error),
                }
            }
            ("faults" | "requests" | "credentials", _) => {
                let allow = if path == "requests" {
                    "GET, DELETE"
                } else {
                    "GET, POST"
                };
                let mut response = pc_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    405,
                    &format!("use {allow} on /__sandbox/{path}"),
                );
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                response
            }
            _ => pc_error(
                StatusCode::NOT_FOUND,
                NOT_FOUND,
                "unknown sandbox admin path: use /__sandbox/faults, /__sandbox/requests or \
                 /__sandbox/credentials",
            ),
        }
    }

    fn faults_json(&self) -> Value {
        serde_json::to_value(&*self.faults()).unwrap_or(Value::Null)
    }
}

/// The correlation headers of one exchange (Partner Center headers page, reference §1.1).
struct ResponseIds {
    request_id: HeaderValue,
    correlation_id: HeaderValue,
    cv: HeaderValue,
}

impl ResponseIds {
    /// Echoes the client's ids, making up the ones it did not send.
    fn of(headers: &HeaderMap) -> ResponseIds {
        let echo_or = |name: &str, make: &dyn Fn() -> String| {
            headers
                .get(name)
                .cloned()
                .or_else(|| HeaderValue::from_str(&make()).ok())
                .unwrap_or_else(|| HeaderValue::from_static("0"))
        };
        let uuid = || uuid::Uuid::new_v4().to_string();
        // A correlation vector v1: 16 base64-ish characters and a counter (reference §1.4).
        let cv = || {
            let base: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(16)
                .collect();
            format!("{base}.0")
        };
        ResponseIds {
            request_id: echo_or("ms-requestid", &uuid),
            correlation_id: echo_or("ms-correlationid", &uuid),
            cv: echo_or("ms-cv", &cv),
        }
    }

    fn stamp(self, headers: &mut HeaderMap) {
        headers.insert(HeaderName::from_static("ms-requestid"), self.request_id);
        headers.insert(
            HeaderName::from_static("ms-correlationid"),
            self.correlation_id,
        );
        headers.insert(HeaderName::from_static("ms-cv"), self.cv);
        headers.insert(
            HeaderName::from_static("ms-serverid"),
            HeaderValue::from_static(SERVER_ID),
        );
    }
}

/// A JSON answer with Partner Center's content type.
fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Partner Center's ApiFault as the real API writes it (reference §3.1): numeric `code`,
/// `description`, empty `data`, `source` `PartnerFD`.
fn pc_error(status: StatusCode, code: u32, description: &str) -> Response {
    json_response(
        status,
        &json!({
            "code": code,
            "description": description,
            "data": [],
            "source": "PartnerFD",
        }),
    )
}

/// A request refused in Partner Center's error shape; becomes a response at the edge (a
/// plain `Response` in `Err` would make every `Result` large).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: u32,
    description: String,
}

impl Refusal {
    fn new(status: StatusCode, code: u32, description: &str) -> Refusal {
        Refusal {
            status,
            code,
            description: description.to_owned(),
        }
    }

    /// The ApiFault answer; a 401 also carries `WWW-Authenticate` (reference §3.1).
    fn into_response(self) -> Response {
        let mut response = pc_error(self.status, self.code, &self.description);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("OAuth realm=urn:cpsvc:cpid:sandbox-tenant"),
            );
        }
        response
    }
}

/// The throttling answer (reference §2.4): not an ApiFault, `{statusCode, message}`.
fn throttled(retry_after: &str) -> Response {
    let message = match retry_after.parse::<u64>() {
        Ok(seconds) => format!("Rate limit is exceeded. Try again in {seconds} seconds."),
        Err(_) => format!("Rate limit is exceeded. Try again after {retry_after}."),
    };
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({ "statusCode": 429, "message": message }),
    );
    if let Ok(value) = HeaderValue::from_str(retry_after) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn admin_error(description: &str) -> Response {
    pc_error(StatusCode::BAD_REQUEST, BAD_INPUT, description)
}

/// Reads a whole body of at most `limit` bytes.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, String> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| error.to_string())
}

fn printable_path(path: &str) -> String {
    path.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse() {
        assert_eq!(parse_rate_limit("50/s"), Ok(50));
        assert_eq!(parse_rate_limit(" 7 "), Ok(7));
        assert!(parse_rate_limit("0").is_err());
        assert!(parse_rate_limit("fast").is_err());
        assert!(parse_rate_limit("5/m").is_err());
    }

    #[test]
    fn token_paths_take_any_tenant() {
        assert!(matches!(
            Route::classify("/contoso.onmicrosoft.com/oauth2/token"),
            Route::Token { v2: false }
        ));
        assert!(matches!(
            Route::classify("/abc/oauth2/v2.0/token"),
            Route::Token { v2: true }
        ));
        assert!(matches!(Route::classify("/oauth2/token"), Route::Other));
        assert!(matches!(
            Route::classify("/v1/invoices/summary"),
            Route::Api(ApiRoute::Summary)
        ));
    }

    #[test]
    fn options_are_checked() {
        let bad = SandboxOptions {
            fail_rate: 1.5,
            ..SandboxOptions::default()
        };
        assert!(bad.validate().is_err());
        assert!(SandboxOptions::default().validate().is_ok());
    }
}
