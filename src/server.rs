//! The accept loop shared by the gateway, the admin port and the sandbox: HTTP/1.1 and HTTP/2
//! cleartext on one port (hyper-util `auto`), a header read timeout, accept errors survived, and
//! a graceful shutdown bounded by a grace period.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::body::Response;

/// How long a client may take to send a request's headers before the connection is closed.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most a request's head (request line and headers) may take; larger gets 431. Partner
/// Center calls carry a few small headers; a 100 KiB header is an attack or a bug.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Knobs for one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Name used in log lines (`gateway`, `admin`, `sandbox`).
    pub name: &'static str,
    /// Deadline for a request's headers (slowloris defence).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run on after shutdown starts.
    pub grace: Duration,
}

/// Serves `service` on `listener` until `shutdown` resolves, then stops accepting (the listener is
/// closed, so new connections are refused) and lets open connections finish their requests for at
/// most `grace`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<http::Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Running out of file descriptors is the usual cause; back off so the loop does
                // not spin, and keep serving the connections we have.
                tracing::warn!(listener = options.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        let name = options.name;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(listener = options.name, grace = ?options.grace, "shutting down: no new connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = options.name, "all connections closed"),
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!(listener = options.name, "grace period over: closing the remaining connections");
        }
    }
}
