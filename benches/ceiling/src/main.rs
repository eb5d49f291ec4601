//! "hyper alone", for `benches/run.sh` to set beside pcgate: pcgate's runtime shape (one
//! single-threaded runtime per core, each with its own listener and upstream client, jemalloc)
//! with nothing else on the path. No ids, no metrics, no log, no access rules, no cache policy,
//! no deadline, no retry.
//!
//!     ceiling <listen> <upstream host:port> <authorization value>
//!
//! - `GET /v1/invoices/summary` (no query) is answered from the first 200 the upstream gave for
//!   it, kept as it came: the least a cache hit can cost.
//! - Anything else goes to the upstream with the given `Authorization`, over kept-alive
//!   connections: the least a pass-through call can cost. A failed upstream call is a 502.
//!
//! `CEILING_CLIENT=conn` swaps hyper-util's pooled client for hyper's own HTTP/1 connections
//! in a pool of the thread's. Both are per thread; this one spawns no task per call to hand a
//! connection back and races no connect against the checkout: what a pcgate-owned client could
//! save (README, Performance). `benches/run.sh` always runs the default. The client in use is
//! logged at start.
//!
//! Each thread listens on its own socket (`SO_REUSEPORT`), so the kernel spreads the connections
//! over the threads. `TOKIO_WORKER_THREADS` sets the number of threads, as it sets pcgate's
//! lanes; by default one per core, at most 8.
//!
//! A benchmark reference, not part of pcgate: it trusts its upstream and its one caller.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// A thread's upstream client.
// Unboxed, so that the default client is cloned for each call as before the `conn` mode.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Upstream {
    /// hyper-util's pooled client, as pcgate uses it.
    Legacy(Client<HttpConnector, Full<Bytes>>),
    /// hyper's HTTP/1 connections, kept idle in the thread's own list (`CEILING_CLIENT=conn`).
    Conn(Pool),
}

impl Upstream {
    fn new(upstream: &str) -> Upstream {
        if std::env::var("CEILING_CLIENT").is_ok_and(|client| client == "conn") {
            Upstream::Conn(Pool {
                addr: upstream.into(),
                host: HeaderValue::from_str(upstream).expect("upstream host:port"),
                idle: Arc::default(),
            })
        } else {
            Upstream::Legacy(Client::builder(TokioExecutor::new()).build_http())
        }
    }

    /// Which client this is, for the log.
    fn name(&self) -> &'static str {
        match self {
            Upstream::Legacy(_) => "hyper-util's pooled client",
            Upstream::Conn(_) => {
                "hyper's HTTP/1 connections in a pool per thread (CEILING_CLIENT=conn)"
            }
        }
    }

    /// The URI a request for `target` (a path and query) on `authority` is sent to.
    fn uri(&self, authority: &str, target: &str) -> Option<http::Uri> {
        match self {
            Upstream::Legacy(_) => format!("http://{authority}{target}").parse().ok(),
            // HTTP/1 in origin form; the pool adds `Host`.
            Upstream::Conn(_) => target.parse().ok(),
        }
    }

    async fn request(&self, request: Request<Full<Bytes>>) -> Result<Response<Body>, ()> {
        match self {
            Upstream::Legacy(client) => {
                let response = client.request(request).await.map_err(|_| ())?;
                Ok(response.map(BodyExt::boxed_unsync))
            }
            Upstream::Conn(pool) => pool.request(request).await,
        }
    }
}

/// One thread's idle HTTP/1 connections to the upstream: a connection is taken for a call and
/// given back when the answer's body has ended.
#[derive(Clone)]
struct Pool {
    addr: Arc<str>,
    host: HeaderValue,
    idle: Arc<Mutex<Vec<Sender>>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Pool {
    /// Sends `request` on an idle connection, else a new one. A request that could not go out on
    /// a kept connection (the upstream had closed it) is sent once more, on another, so one stale
    /// connection is not a 502 (hyper-util's client goes on for as long as it meets stale ones).
    async fn request(&self, mut request: Request<Full<Bytes>>) -> Result<Response<Body>, ()> {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        for _ in 0..2 {
            let (mut sender, kept) = self.checkout().await?;
            if sender.ready().await.is_err() {
                if kept {
                    continue;
                }
                return Err(());
            }
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut unsent) => match unsent.take_message() {
                    Some(again) if kept => {
                        request = again;
                        continue;
                    }
                    _ => return Err(()),
                },
            };
            if hyper::body::Body::is_end_stream(response.body()) {
                // No body to wait for: hyper's server never polls an empty one.
                self.give_back(sender);
                return Ok(response.map(BodyExt::boxed_unsync));
            }
            let pool = self.clone();
            return Ok(response.map(move |incoming| {
                GiveBack {
                    incoming,
                    home: Some((sender, pool)),
                }
                .boxed_unsync()
            }));
        }
        Err(())
    }

    /// An idle connection still open (`true`: it was kept), else a new one.
    async fn checkout(&self) -> Result<(Sender, bool), ()> {
        loop {
            let idle = self.idle.lock().map_err(|_| ())?.pop();
            match idle {
                Some(sender) if sender.is_closed() => continue,
                Some(sender) => return Ok((sender, true)),
                None => break,
            }
        }
        let stream = tokio::net::TcpStream::connect(&*self.addr)
            .await
            .map_err(|_| ())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ())?;
        tokio::spawn(connection);
        Ok((sender, false))
    }

    fn give_back(&self, sender: Sender) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(sender);
        }
    }
}

/// An answer's body that gives its connection back to the pool once it has ended; dropped
/// before, it closes the connection.
struct GiveBack {
    incoming: Incoming,
    home: Option<(Sender, Pool)>,
}

impl hyper::body::Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        let ended = matches!(polled, Poll::Ready(None))
            || (matches!(polled, Poll::Ready(Some(Ok(_)))) && this.incoming.is_end_stream());
        if ended {
            if let Some((sender, pool)) = this.home.take() {
                pool.give_back(sender);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

/// The summary answer kept for hits: its head and body.
type Kept = Arc<OnceLock<(http::response::Parts, Bytes)>>;

/// What every thread shares.
struct Setup {
    upstream: String,
    authorization: HeaderValue,
    kept: Kept,
}

/// pcgate's own cap on its default number of lanes.
const MAX_THREADS: usize = 8;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(authorization)) =
        (args.next(), args.next(), args.next())
    else {
        eprintln!("usage: ceiling <listen> <upstream host:port> <authorization value>");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("listen address");
    let setup = Arc::new(Setup {
        upstream,
        authorization: authorization.parse().expect("authorization value"),
        kept: Arc::default(),
    });
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
        });
    eprintln!(
        "ceiling: upstream {} over {}, {threads} threads",
        setup.upstream,
        Upstream::new(&setup.upstream).name()
    );
    let lanes: Vec<_> = (0..threads)
        .map(|_| {
            let listener = reuse_port(listen);
            let setup = setup.clone();
            std::thread::spawn(move || lane(listener, setup))
        })
        .collect();
    for lane in lanes {
        let _ = lane.join();
    }
}

/// A listening socket on `addr` that other threads' sockets share (`SO_REUSEPORT`).
fn reuse_port(addr: SocketAddr) -> std::net::TcpListener {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.set_nonblocking(true).expect("non-blocking");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(1024).expect("listen");
    socket.into()
}

/// One thread: its own runtime, accept loop and upstream client.
fn lane(listener: std::net::TcpListener, setup: Arc<Setup>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let client = Upstream::new(&setup.upstream);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of file descriptors, say: wait rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (client, setup) = (client.clone(), setup.clone());
            let service = hyper::service::service_fn(move |request| {
                answer(request, client.clone(), setup.clone())
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn answer(
    request: Request<Incoming>,
    client: Upstream,
    setup: Arc<Setup>,
) -> Result<Response<Body>, Infallible> {
    let cached = request.uri().path() == "/v1/invoices/summary" && request.uri().query().is_none();
    if cached {
        if let Some((head, body)) = setup.kept.get() {
            return Ok(full(head.clone(), body.clone()));
        }
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let Some(uri) = client.uri(&setup.upstream, &target) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let mut upstream = Request::get(uri);
    if let Some(headers) = upstream.headers_mut() {
        for name in [header::ACCEPT, header::ACCEPT_ENCODING] {
            if let Some(value) = request.headers().get(&name) {
                headers.insert(name, value.clone());
            }
        }
        headers.insert(header::AUTHORIZATION, setup.authorization.clone());
    }
    let Ok(upstream) = upstream.body(Full::new(Bytes::new())) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let Ok(response) = client.request(upstream).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    if !(cached && response.status() == StatusCode::OK) {
        return Ok(response);
    }
    let (mut head, body) = response.into_parts();
    let Ok(body) = body.collect().await.map(|body| body.to_bytes()) else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    for name in [header::CONNECTION, header::TRANSFER_ENCODING] {
        head.headers.remove(name);
    }
    head.headers
        .insert(header::CONTENT_LENGTH, body.len().into());
    let _ = setup.kept.set((head.clone(), body.clone()));
    Ok(full(head, body))
}

fn full(head: http::response::Parts, body: Bytes) -> Response<Body> {
    Response::from_parts(
        head,
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

fn status(status: StatusCode) -> Response<Body> {
    let mut response = full(Response::new(()).into_parts().0, Bytes::new());
    *response.status_mut() = status;
    response
}
