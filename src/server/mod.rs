//! The accept loop shared by the gateway, the admin port and the sandbox: HTTP/1.1 and HTTP/2
//! cleartext on one port (hyper-util `auto`), and a driver per connection that closes what does
//! not deserve an open socket:
//!
//! - a connection that has not sent a complete request head within `header_read_timeout`, from
//!   the moment it is accepted: a socket that sends nothing or half an HTTP/2 preface, an HTTP/2
//!   client that sends its preface and SETTINGS but no HEADERS, a slow HTTP/1 head. Every later
//!   HTTP/1 head is timed too, from its first byte ([`framing`] watches the bytes);
//! - a connection with no call in flight for `idle_timeout` (HTTP/2 gets a GOAWAY first). A call is
//!   in flight until its response body is finished, so a long streamed answer is not idle;
//! - at shutdown, every connection is asked to finish (GOAWAY, or no more keep-alive); one with no
//!   call in flight that has not closed [`CLOSE_LINGER`] later is closed (an HTTP/2 client that
//!   never answers the GOAWAY's PING would hold it otherwise), and whatever is left when the grace
//!   period ends is closed before [`serve`] returns.
//!
//! Accept errors (out of file descriptors, mostly) are survived with a growing pause, capped, and
//! logged at most once per [`ACCEPT_LOG_EVERY`] with the count of those not logged.
//!
//! A request with both `Content-Length` and `Transfer-Encoding` gets 400 and the connection is
//! closed (see [`framing`] for why it is refused): from the gateway's stack, which is given the
//! request marked, or from the connection itself on the admin port and the sandbox.

mod conn;
mod framing;
mod lanes;

use lanes::Share;
pub use lanes::{default_lanes, lane, serve_lanes};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::body::Response;
use conn::{ConnService, ConnState};

/// How long a client may take to send a request's head before the connection is closed.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may stay open with no call in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The most a request's head (request line and headers) may take; larger gets 431. Partner
/// Center calls carry a few small headers; a 100 KiB header is an attack or a bug.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Once a connection has been asked to close (a GOAWAY sent, keep-alive off), how long it may
/// stay open with no call in flight. HTTP/2's graceful close waits for the client to answer a
/// PING; a client that never does is closed this long after.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// An accept error is logged at most once per this period; the line counts the others.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The first pause after an accept error; each further error doubles it, up to the cap.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(5);
/// The longest pause after an accept error.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Knobs for one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Name used in log lines (`gateway`, `admin`, `sandbox`).
    pub name: &'static str,
    /// Deadline for a request's head, from accept (first request) or from its first byte (slowloris
    /// defence; protocol detection included).
    pub header_read_timeout: Duration,
    /// A connection with no call in flight this long is closed.
    pub idle_timeout: Duration,
    /// A connection with a call in flight but no byte moving either way this long is closed: a
    /// client that never reads its answer (an HTTP/2 window left at zero) holds nothing forever.
    /// Longer than any legitimate wait (the call's deadline plus `idle_timeout`).
    pub stall_timeout: Duration,
    /// How long in-flight requests may run on after shutdown starts.
    pub grace: Duration,
    /// The service refuses a request framed two ways itself, from its mark
    /// ([`crate::call::FramedTwice`]: the gateway's stack, so the refusal carries tracking
    /// headers and is counted); otherwise the connection answers it 400 without calling the
    /// service. The connection closes after it either way.
    pub service_refuses_framed_twice: bool,
}

/// What a listener serves (the gateway's stack, the admin service, the sandbox): a service every
/// connection's task gets a clone of.
pub trait ConnectionService:
    tower::Service<
        http::Request<Incoming>,
        Response = Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnectionService for S where
    S: tower::Service<
            http::Request<Incoming>,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves `service` on `listener` until `shutdown` resolves, then stops accepting (the listener is
/// closed, so new connections are refused), lets open connections finish their calls for at most
/// `grace`, closes whatever is left and returns.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    S: ConnectionService,
{
    serve_share(listener, service, options, shutdown, Share::alone()).await;
}

/// [`serve`], as one lane of [`serve_lanes`].
async fn serve_share<S>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
    share: Share,
) where
    S: ConnectionService,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Heads are timed by the connection's driver, which knows when one begins; hyper's own
        // timer would also run while a keep-alive connection sits idle.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::default();
    tokio::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                share.holds(connections.len());
                continue;
            }
            accepted = listener.accept(), if share.may_accept() => accepted,
            // Another lane took a connection: this one may be the least loaded now.
            () = share.woken() => continue,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.reset();
                let _ = stream.set_nodelay(true);
                connections.spawn(drive(
                    stream,
                    peer,
                    builder.clone(),
                    service.clone(),
                    options,
                    draining.clone(),
                ));
                share.holds(connections.len());
            }
            Err(error) => {
                // Running out of file descriptors is the usual cause: the pending connection stays
                // in the backlog, so accepting again at once would spin. Pause, keep serving the
                // connections we have (closing one frees a descriptor), and do not flood the log.
                let pause = errors.failed(options.name, &error);
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    drop(listener);
    // No longer accepting: this lane must not hold the others back by looking least loaded.
    share.holds(usize::MAX);
    tracing::info!(listener = options.name, lane = share.lane, grace = ?options.grace, "shutting down: no new connections");
    let _ = drain.send(true);
    let drained = tokio::time::timeout(options.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!(
            listener = options.name,
            lane = share.lane,
            "all connections closed"
        ),
        Err(_) => {
            tracing::warn!(
                listener = options.name,
                lane = share.lane,
                remaining = connections.len(),
                "grace period over: closing the remaining connections"
            );
            connections.shutdown().await;
        }
    }
}

/// Why a connection's timer is set.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// A request head is due: past the deadline the connection is closed.
    Head,
    /// Nothing is in flight: past the deadline the connection is asked to close.
    Idle,
    /// Asked to close and nothing is in flight: past the deadline it is closed.
    Linger,
    /// Calls in flight, but nothing moved on the socket: past the deadline it is closed.
    Stall,
}

/// When bytes last moved on a connection's socket, as far as its driver knows: it samples the
/// move count each time its timer fires, so the time is late by at most one timer period (the
/// stall timer then fires late by that much, never early).
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// The move count at the last sample.
    moves: u64,
    /// When the count was first seen at that value.
    since: Instant,
}

impl Progress {
    /// Samples the count now.
    fn sample(&mut self, state: &ConnState, now: Instant) {
        let moves = state.moves();
        if moves != self.moves {
            *self = Progress { moves, since: now };
        }
    }
}

/// The next deadline for a connection: while a call is in flight, only the stall timer.
fn next_deadline(
    state: &ConnState,
    options: &ServeOptions,
    closing: Option<Instant>,
    progress: Progress,
) -> (Instant, Timer) {
    if state.busy() {
        return (progress.since + options.stall_timeout, Timer::Stall);
    }
    if let Some(since) = closing {
        return (since.max(state.idle_since()) + CLOSE_LINGER, Timer::Linger);
    }
    if !state.has_calls() {
        return (state.accepted() + options.header_read_timeout, Timer::Head);
    }
    if let Some(since) = state.head_since() {
        return (since + options.header_read_timeout, Timer::Head);
    }
    (state.idle_since() + options.idle_timeout, Timer::Idle)
}

/// The longest a connection's timer may sleep without looking at the connection again. The
/// connection's state moves on without waking its driver (a head begins, a call ends), and every
/// deadline such a move starts is at least one of these timeouts away from the move, so a timer
/// that never sleeps longer than the shortest of them never fires after a deadline.
fn timer_period(options: &ServeOptions, closing: bool) -> Duration {
    let period = options
        .header_read_timeout
        .min(options.idle_timeout)
        .min(options.stall_timeout);
    if closing {
        period.min(CLOSE_LINGER)
    } else {
        period
    }
}

/// Serves one connection until it ends, times out, or is closed by the shutdown.
///
/// A call does not wake this driver: its timer fires at most every [`timer_period`], and each time
/// it reads the connection's state, acts if a deadline has passed, and sleeps until the next
/// deadline or the next period, whichever is sooner.
async fn drive<S>(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    options: ServeOptions,
    mut draining: watch::Receiver<bool>,
) where
    S: ConnectionService,
{
    let name = options.name;
    let state = ConnState::new();
    let io = TokioIo::new(framing::Watched::new(stream, state.clone()));
    let connection = builder.serve_connection(
        io,
        ConnService::new(service, state.clone(), options.service_refuses_framed_twice),
    );
    tokio::pin!(connection);
    let mut closing: Option<Instant> = None;
    let mut progress = Progress {
        moves: state.moves(),
        since: state.accepted(),
    };
    let first = next_deadline(&state, &options, closing, progress).0;
    let timer =
        tokio::time::sleep_until(first.min(state.accepted() + timer_period(&options, false)));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = draining.wait_for(|stop| *stop), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                let now = Instant::now();
                closing = Some(now);
                timer.as_mut().reset(now + timer_period(&options, true));
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                progress.sample(&state, now);
                let (at, why) = next_deadline(&state, &options, closing, progress);
                if at <= now {
                    match why {
                        Timer::Head => {
                            tracing::debug!(listener = name, %peer, "no complete request head within header_read_timeout: closed");
                            return;
                        }
                        Timer::Idle => {
                            tracing::debug!(listener = name, %peer, "idle for idle_timeout: closing");
                            connection.as_mut().graceful_shutdown();
                            closing = Some(now);
                        }
                        Timer::Stall => {
                            tracing::debug!(listener = name, %peer, "calls in flight but nothing moved for stall_timeout: closed");
                            return;
                        }
                        Timer::Linger => {
                            tracing::debug!(listener = name, %peer, "did not close when asked: closed");
                            return;
                        }
                    }
                }
                let (at, _) = next_deadline(&state, &options, closing, progress);
                timer.as_mut().reset(at.max(now).min(now + timer_period(&options, closing.is_some())));
            }
        }
    }
}

/// Accept errors since the last success: the pause before the next try, and log rate limiting.
#[derive(Debug, Default)]
struct AcceptErrors {
    pause: Option<Duration>,
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// An accept succeeded: the next error pauses briefly again (the log stays rate limited).
    fn reset(&mut self) {
        self.pause = None;
    }

    /// An accept failed: logs it unless one was logged recently, and returns the pause.
    fn failed(&mut self, listener: &'static str, error: &std::io::Error) -> Duration {
        let pause = self
            .pause
            .map_or(ACCEPT_PAUSE_MIN, |p| (p * 2).min(ACCEPT_PAUSE_MAX));
        self.pause = Some(pause);
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                listener,
                %error,
                not_logged = self.unlogged,
                pause = ?pause,
                "accept failed (out of file descriptors?): pausing; at most one such line every {ACCEPT_LOG_EVERY:?}"
            );
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accept_errors_pause_longer_each_time_up_to_the_cap() {
        let mut errors = AcceptErrors::default();
        let error = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..12).map(|_| errors.failed("test", &error)).collect();
        assert_eq!(pauses[0], ACCEPT_PAUSE_MIN);
        assert_eq!(pauses[1], ACCEPT_PAUSE_MIN * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_PAUSE_MAX);
        // Only the first was logged; the rest are counted for the next line.
        assert_eq!(errors.unlogged, 11);
        tokio::time::advance(ACCEPT_LOG_EVERY).await;
        errors.failed("test", &error);
        assert_eq!(errors.unlogged, 0);
        errors.reset();
        assert_eq!(errors.failed("test", &error), ACCEPT_PAUSE_MIN);
    }
}
