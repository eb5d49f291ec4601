//! Helpers for the end-to-end tests: a gateway on 127.0.0.1:0, in-test origins, an HTTP client.
#![allow(dead_code)]

mod configs;
mod h2c;
mod metrics;
mod process;
mod raw;
mod redis;
#[allow(unused_imports)]
pub use {configs::*, h2c::*, metrics::*, process::*, raw::*, redis::*};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pcgate::body::{self, Response};
use pcgate::config::Config;
use pcgate::{Gateway, StartError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test, so a broken build fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

/// A gateway serving in this process; shut down when dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), StartError>>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (up to [`WAIT`]) until `/readyz` answers 200: every credential a route uses holds
    /// its first token, so the start-up token requests are over. A test that counts token
    /// requests counts from here, or it races the refreshers' first fetches.
    pub async fn ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        let started = std::time::Instant::now();
        while started.elapsed() < WAIT {
            if let Ok(response) = client().get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the gateway's /readyz at {} did not answer 200 within {WAIT:?}",
            self.admin
        );
    }

    /// Starts the graceful shutdown (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a gateway from TOML text, listening on loopback ports the OS picks.
pub async fn start_gateway(toml: &str) -> TestGateway {
    let mut config = Config::from_toml(toml).expect("test config is valid");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    start_with(config).await
}

/// Starts a gateway from a config, as given.
pub async fn start_with(config: Config) -> TestGateway {
    let gateway = Gateway::bind(config).await.expect("gateway binds");
    let (addr, admin) = (gateway.local_addr(), gateway.admin_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(async move {
        let _ = stopped.await;
    }));
    TestGateway {
        addr,
        admin,
        stop: Some(stop),
        task,
    }
}

/// What an origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A hyper origin server on 127.0.0.1:0 that records what it receives.
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Origin {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A handler gets the request head and its whole body.
pub trait Handler: Fn(Seen) -> Self::Fut + Send + Sync + 'static {
    type Fut: Future<Output = Response> + Send;
}
impl<F, Fut> Handler for F
where
    F: Fn(Seen) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send,
{
    type Fut = Fut;
}

/// Starts a plain HTTP origin.
pub async fn origin<H: Handler>(handler: H) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = recording_service(handler, seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Origin { addr, seen, task }
}

/// Wraps a handler into a hyper service that records each request.
pub fn recording_service<H: Handler>(
    handler: H,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static {
    let handler = Arc::new(handler);
    hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let handler = handler.clone();
        let seen = seen.clone();
        async move {
            let (parts, incoming) = request.into_parts();
            let body = incoming
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let record = Seen {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                body,
            };
            seen.lock().unwrap().push(record.clone());
            Ok::<_, Infallible>(handler(record).await)
        }
    })
}

/// A response with a status and a text body.
pub fn text(status: u16, body: &'static str) -> Response {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
}

/// An HTTP client for plain-http loopback calls.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(pcgate::upstream::tls_config(None).unwrap())
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// Sends raw bytes and returns the status code of the answer (0 if the connection closed first).
pub async fn raw_status(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while read < 12 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[read..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return 0,
            Ok(Ok(n)) => read += n,
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }
    let line = String::from_utf8_lossy(&buf[..read]);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A `GET` request line for raw tests.
pub fn raw_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A sandbox serving in this process; shut down when dropped.
pub struct TestSandbox {
    pub base_url: String,
    pub token_url: String,
    /// The demo's config for this sandbox; see [`TestSandbox::config`].
    config: Config,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a sandbox on 127.0.0.1:0 with these options.
pub async fn start_sandbox(options: pcgate::sandbox::SandboxOptions) -> TestSandbox {
    let options = pcgate::sandbox::SandboxOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..options
    };
    let sandbox = pcgate::sandbox::Sandbox::bind(options)
        .await
        .expect("sandbox binds");
    let (base_url, token_url) = (sandbox.base_url(), sandbox.token_url());
    let config = pcgate::demo::config_for(&sandbox).expect("the demo config is valid");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sandbox.serve(async move {
        let _ = stopped.await;
    }));
    TestSandbox {
        base_url,
        token_url,
        config,
        stop: Some(stop),
    }
}

impl TestSandbox {
    /// Changes the sandbox's faults (a partial JSON update).
    pub async fn faults(&self, update: serde_json::Value) {
        let response = client()
            .post(format!("{}/__sandbox/faults", self.base_url))
            .json(&update)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "faults update refused: {}",
            response.text().await.unwrap()
        );
    }

    /// Replaces what the sandbox's token endpoint accepts (`client_secrets`, `certificates`,
    /// `federated_tokens`: each list given replaces its kind).
    pub async fn accept(&self, update: serde_json::Value) {
        let response = client()
            .post(format!("{}/__sandbox/credentials", self.base_url))
            .json(&update)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "credentials update refused: {}",
            response.text().await.unwrap()
        );
    }

    /// How the app authenticated at each recent token request (the log's `client` note), with
    /// the answer's status.
    pub async fn token_clients(&self) -> Vec<(String, u16)> {
        self.recent("token")
            .await
            .iter()
            .map(|r| {
                (
                    r["client"].as_str().unwrap_or_default().to_owned(),
                    r["status"].as_u64().unwrap_or(0) as u16,
                )
            })
            .collect()
    }

    /// The sandbox's request log.
    pub async fn log(&self) -> serde_json::Value {
        client()
            .get(format!("{}/__sandbox/requests", self.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// How many requests reached a sandbox route (`token`, `summary`, `invoices`...).
    pub async fn count(&self, route: &str) -> u64 {
        self.log().await["counts"][route].as_u64().unwrap_or(0)
    }

    /// The recent requests to one route, oldest first.
    pub async fn recent(&self, route: &str) -> Vec<serde_json::Value> {
        let log = self.log().await;
        log["recent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["route"] == route)
            .cloned()
            .collect()
    }

    /// Empties the request log.
    pub async fn reset_log(&self) {
        client()
            .delete(format!("{}/__sandbox/requests", self.base_url))
            .send()
            .await
            .unwrap();
    }

    /// The gateway config for this sandbox as TOML text: the shipped route table, `app` and
    /// `user` credentials against its token endpoint, with `knobs` added to their tables.
    /// Prefer [`TestSandbox::config`], a value whose fields a test sets.
    pub fn gateway_toml(&self, knobs: Knobs) -> String {
        use pcgate::sandbox::{SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_REFRESH_TOKEN};
        // The shipped route table, as values rendered back to TOML.
        #[derive(serde::Serialize)]
        struct Routes<'a> {
            routes: &'a [pcgate::config::RouteConfig],
        }
        let routes = toml::to_string(&Routes {
            routes: &self.config.routes,
        })
        .expect("routes render as TOML");
        format!(
            r#"
            [upstream]
            base_url = "{base}"
            {upstream}
            [credentials.app]
            grant = "client_credentials"
            token_url = "{token_url}"
            client_id = "{SANDBOX_CLIENT_ID}"
            client_secret = "{SANDBOX_CLIENT_SECRET}"
            resource = "https://api.partnercenter.microsoft.com"
            {app}
            [credentials.user]
            grant = "refresh_token"
            token_url = "{token_url}"
            client_id = "{SANDBOX_CLIENT_ID}"
            client_secret = "{SANDBOX_CLIENT_SECRET}"
            {user}
            {rest}
            {routes}
            "#,
            base = self.base_url,
            token_url = self.token_url,
            upstream = knobs.upstream,
            app = knobs.app,
            user = knobs
                .user
                .unwrap_or(&format!("refresh_token = \"{SANDBOX_REFRESH_TOKEN}\"")),
            rest = knobs.rest,
        )
    }
}

/// Extra TOML lines for [`TestSandbox::gateway_toml`], by table.
#[derive(Default, Clone, Copy)]
pub struct Knobs<'a> {
    /// Lines in `[upstream]`.
    pub upstream: &'a str,
    /// Lines in `[credentials.app]`.
    pub app: &'a str,
    /// Lines in `[credentials.user]`; `None` gives it the sandbox's inline refresh token.
    pub user: Option<&'a str>,
    /// Whole tables after the credentials (`[retry]`, `[[access.clients]]`...).
    pub rest: &'a str,
}
