//! One accept loop per core ("lanes"): the gateway's listener is served from `lanes` threads,
//! each a single-threaded tokio runtime with its own accept loop on a copy of the listening
//! socket, so a connection is accepted, served and closed on one thread, and its upstream
//! connections are opened and driven there too (`upstream::Upstream` keeps a pool per lane). No
//! work-stealing scheduler stands between a call and its socket (README, Performance).
//!
//! - The kernel wakes every lane for a new connection and the one awake wins, so left alone one
//!   lane would hold them all: [`Share`] lets a lane accept only while no other holds fewer.
//! - A lane that cannot start is logged and the others serve; when none can, the listener is
//!   served from the caller's runtime instead. A panic in a lane's accept loop stops the process,
//!   as a panic in the one accept loop did before (a panic in a call is caught, as ever).
//! - At shutdown each lane stops accepting and drains its own connections within the grace
//!   period, then waits for the others before its runtime goes: a task one lane spawned (a
//!   coalesced fetch, a token exchange) may be awaited by a call on another lane.
//! - Dropping [`serve_lanes`]'s future stops the lanes as a shutdown does.
//! - One lane serves every stream of an HTTP/2 connection: a client that sends everything over
//!   one connection is served by one core.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};

use super::{serve, serve_share, ConnectionService, ServeOptions};

/// How long a lane's runtime waits for its blocking tasks once the lanes have drained.
const RUNTIME_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The most lanes [`default_lanes`] gives: a sidecar beside one app; more would only multiply
/// the upstream pools (one per lane) on a large node with no CPU limit.
pub const MAX_DEFAULT_LANES: usize = 8;

thread_local! {
    /// The lane of [`serve_lanes`] this thread runs (0 on any other thread).
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The lane of [`serve_lanes`] the calling thread runs, 0 on any other thread: what keeps a
/// lane's upstream connections on the lane (see `upstream::Upstream`).
pub fn lane() -> usize {
    LANE.with(std::cell::Cell::get)
}

/// How many lanes the gateway's listener runs: `TOKIO_WORKER_THREADS` when set (tokio's own
/// setting for its worker count), else one per core the process may use (a cgroup's CPU quota
/// counts), at most [`MAX_DEFAULT_LANES`].
pub fn default_lanes() -> usize {
    let set = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|threads| threads.parse::<usize>().ok())
        .filter(|&threads| threads > 0);
    set.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(MAX_DEFAULT_LANES)
    })
}

/// The connections each lane of [`serve_lanes`] holds. Every lane's accept loop watches the same
/// listening socket, and the kernel wakes them all for a new connection, but the one that happens
/// to be awake wins: left alone, one lane ends up with every connection. So a lane accepts only
/// while it holds no more connections than the least loaded lane, and tells the others when its
/// count rises (one of them may now be the one to accept).
pub(super) struct Share {
    /// Open connections, by lane.
    open: Arc<[AtomicUsize]>,
    /// Wakes a lane to look at the counts again, by lane.
    wake: Arc<[Notify]>,
    /// This lane.
    pub(super) lane: usize,
}

impl Share {
    /// The only lane.
    pub(super) fn alone() -> Share {
        Share::lanes(1).remove(0)
    }

    /// `count` lanes sharing the connections.
    fn lanes(count: usize) -> Vec<Share> {
        let open: Arc<[AtomicUsize]> = (0..count).map(|_| AtomicUsize::new(0)).collect();
        let wake: Arc<[Notify]> = (0..count).map(|_| Notify::new()).collect();
        (0..count)
            .map(|lane| Share {
                open: open.clone(),
                wake: wake.clone(),
                lane,
            })
            .collect()
    }

    /// Whether this lane takes the next connection.
    pub(super) fn may_accept(&self) -> bool {
        let mine = self.open[self.lane].load(Ordering::Relaxed);
        self.open
            .iter()
            .all(|other| mine <= other.load(Ordering::Relaxed))
    }

    /// Resolves when another lane's count rose: this lane may be the least loaded now.
    pub(super) fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake[self.lane].notified()
    }

    /// This lane now holds `open` connections.
    pub(super) fn holds(&self, open: usize) {
        let before = self.open[self.lane].swap(open, Ordering::Relaxed);
        if open > before {
            for (lane, wake) in self.wake.iter().enumerate() {
                if lane != self.lane {
                    wake.notify_one();
                }
            }
        }
    }
}

impl Drop for Share {
    /// A lane that stops (or never started) takes no more connections: it must not hold the
    /// others back by looking least loaded.
    fn drop(&mut self) {
        self.holds(usize::MAX);
    }
}

/// The lanes still serving; a lane that has drained waits here for the others.
struct Serving {
    count: AtomicUsize,
    done: Notify,
}

impl Serving {
    /// One lane is done serving (drained, or never started).
    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    /// Resolves when no lane is serving.
    async fn all_done(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// Held by a lane's thread for as long as it runs: however the thread ends, the lane leaves
/// [`Serving`]; a panic stops the process.
struct LaneGuard {
    serving: Arc<Serving>,
    lane: usize,
    left: bool,
}

impl LaneGuard {
    /// This lane has drained: waits for the others (their calls may await tasks this lane
    /// spawned).
    async fn leave_and_wait(&mut self) {
        self.left = true;
        self.serving.leave();
        self.serving.all_done().await;
    }
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(lane = self.lane, "an accept loop panicked: pcgate stops");
            crate::log::batch::flush();
            std::process::exit(101);
        }
        if !self.left {
            self.serving.leave();
        }
    }
}

/// Serves on `listener` as [`serve`] does, from `lanes` threads of their own (see the module
/// docs), each lane its own copy of the service, made by `service`; returns when every lane has
/// drained and its runtime is gone.
///
/// `shutdown` makes one future per lane; each lane stops accepting when its future resolves, or
/// when this future is dropped, and drains as [`serve`] does.
pub async fn serve_lanes<S, F>(
    listener: TcpListener,
    service: impl Fn() -> S,
    options: ServeOptions,
    lanes: usize,
    shutdown: impl Fn() -> F,
) where
    S: ConnectionService,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listener = options.name, %error, "the listening socket cannot be handed to the accept loops");
            return;
        }
    };
    // Dropped with this future: every lane then stops as at shutdown.
    let (_abandon, abandoned) = watch::channel(());
    let lanes = lanes.max(1);
    let serving = Arc::new(Serving {
        count: AtomicUsize::new(lanes),
        done: Notify::new(),
    });
    let mut reports = Vec::new();
    for share in Share::lanes(lanes) {
        let lane = share.lane;
        let copy = match listener.try_clone() {
            Ok(copy) => copy,
            Err(error) => {
                tracing::warn!(listener = options.name, lane, %error, "the listening socket cannot be copied: fewer accept loops");
                serving.leave();
                continue;
            }
        };
        let (started, report) = oneshot::channel::<()>();
        let (finished, lane_finished) = oneshot::channel::<()>();
        let (service, stop, mut abandoned) = (service(), shutdown(), abandoned.clone());
        let mut guard = LaneGuard {
            serving: serving.clone(),
            lane,
            left: false,
        };
        let thread = std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread's name: `gateway-lane-7`.
            .name(format!("{}-lane-{lane}", options.name))
            .spawn(move || {
                LANE.with(|current| current.set(lane));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::warn!(listener = options.name, lane, %error, "no runtime for this accept loop");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(copy) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::warn!(listener = options.name, lane, %error, "accept loop not started");
                            return;
                        }
                    };
                    let _ = started.send(());
                    let stop = async move {
                        tokio::select! {
                            () = stop => {}
                            _ = abandoned.changed() => {}
                        }
                    };
                    serve_share(listener, service, options, stop, share).await;
                    guard.leave_and_wait().await;
                });
                // A blocking task still running (a DNS lookup of an upstream connect, a token file
                // write) gets a moment, not as long as it likes: shutdown keeps to its grace.
                runtime.shutdown_timeout(RUNTIME_LINGER);
                drop(finished);
            });
        match thread {
            Ok(_) => reports.push((report, lane_finished)),
            Err(error) => {
                tracing::warn!(listener = options.name, lane, %error, "no thread for this accept loop");
            }
        }
    }
    let mut running = Vec::new();
    for (report, finished) in reports {
        if report.await.is_ok() {
            running.push(finished);
        }
    }
    if running.is_empty() {
        // Not one lane started: serve from here rather than not at all.
        tracing::warn!(
            listener = options.name,
            "no accept loop of its own started: serving from the main runtime"
        );
        match TcpListener::from_std(listener) {
            Ok(listener) => serve(listener, service(), options, shutdown()).await,
            Err(error) => {
                tracing::error!(listener = options.name, %error, "no accept loop could start")
            }
        }
        return;
    }
    drop(listener);
    for finished in running {
        // Resolves when the lane's thread ends, its runtime gone.
        let _ = finished.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Response;
    use hyper::body::Incoming;
    use std::convert::Infallible;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Whether a request on a new connection to `addr` gets an answer.
    async fn answers(addr: std::net::SocketAddr) -> bool {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return false;
        };
        let ask = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut answer = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut answer));
        ask.is_ok() && matches!(read.await, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 204")
    }

    #[tokio::test]
    async fn dropping_the_future_stops_every_lane() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = tower::service_fn(|_: http::Request<Incoming>| async {
            let mut response = Response::new(crate::body::empty());
            *response.status_mut() = http::StatusCode::NO_CONTENT;
            Ok::<_, Infallible>(response)
        });
        let options = ServeOptions {
            name: "test",
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(5),
            grace: Duration::from_millis(200),
            service_refuses_framed_twice: false,
        };
        let lanes = tokio::spawn(serve_lanes(
            listener,
            move || service,
            options,
            2,
            std::future::pending::<()>,
        ));
        let mut serving = false;
        for _ in 0..50 {
            if answers(addr).await {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(serving, "the lanes never answered");
        lanes.abort();
        let _ = lanes.await;
        // Each lane stops accepting and closes its copy of the socket (then drains).
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the lanes still accept after their future was dropped");
    }

    #[test]
    fn a_lane_accepts_only_while_no_other_holds_fewer_connections() {
        let mut lanes = Share::lanes(2);
        let (first, second) = (&lanes[0], &lanes[1]);
        assert!(first.may_accept() && second.may_accept());
        first.holds(1);
        assert!(!first.may_accept(), "the other lane holds fewer");
        assert!(second.may_accept());
        second.holds(1);
        assert!(first.may_accept() && second.may_accept());
        second.holds(3);
        assert!(first.may_accept() && !second.may_accept());
        // A lane that stops holds nobody back.
        drop(lanes.pop());
        lanes[0].holds(5);
        assert!(lanes[0].may_accept());
    }
}
