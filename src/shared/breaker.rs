//! The circuit breaker in front of Redis: after [`FAILURES_TO_OPEN`] failures in a row, Redis is
//! not asked for [`COOL_OFF`]; then one probe goes, and its outcome closes or reopens it. A probe
//! dropped before it finishes (its caller hung up, a deadline cut it) counts as a failed one
//! ([`Permit`]), so the breaker never waits forever on an outcome that will not come.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// Consecutive failures (errors or timeouts) that open the breaker.
pub const FAILURES_TO_OPEN: u32 = 5;
/// How long an open breaker stops asking Redis before one probe.
pub const COOL_OFF: Duration = Duration::from_secs(1);

/// The breaker's state, as its gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis is asked.
    Closed = 0,
    /// One probe is out.
    HalfOpen = 1,
    /// Redis is not asked until the cool-off passes.
    Open = 2,
}

/// A lock-free breaker; `pcgate_shared_breaker_state` follows it.
pub struct Breaker {
    start: Instant,
    failures: AtomicU32,
    /// Milliseconds since `start` until which Redis is not asked; 0: closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    gauge: Gauge,
}

impl Breaker {
    /// A closed breaker reporting to `gauge`.
    pub fn new(gauge: Gauge) -> Breaker {
        gauge.set(BreakerState::Closed as i64);
        Breaker {
            start: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            gauge,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether an operation may go to Redis now (when open, only the one probe after the cool-off).
    /// A caller that may drop the operation before it finishes takes a [`Breaker::permit`].
    pub fn allow(&self) -> bool {
        self.admit().is_some()
    }

    /// `None`: not now; `Some(true)`: the one probe after the cool-off; `Some(false)`: closed.
    fn admit(&self) -> Option<bool> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Some(false);
        }
        if self.now_ms() < until {
            return None;
        }
        let probe = self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if probe {
            self.gauge.set(BreakerState::HalfOpen as i64);
        }
        probe.then_some(true)
    }

    /// Leave for one operation, as [`Breaker::allow`]; the [`Permit`] records its outcome, and a
    /// probe's permit dropped before it does counts as a failure.
    pub fn permit(&self) -> Option<Permit<'_>> {
        self.admit().map(|probe| Permit {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// An operation answered: closed again.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("the shared tier answers again: sharing resumes");
        }
        self.probing.store(false, Ordering::Release);
        self.gauge.set(BreakerState::Closed as i64);
    }

    /// An operation failed or timed out.
    pub fn failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if was_probe || failures >= FAILURES_TO_OPEN {
            let until = self.now_ms() + u64::try_from(COOL_OFF.as_millis()).unwrap_or(1000);
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(
                    failures,
                    "the shared tier is failing: Redis is not asked for {COOL_OFF:?} (L1 only)"
                );
            }
            self.gauge.set(BreakerState::Open as i64);
        }
    }

    /// Whether the last operation answered (no failure since the last success).
    pub fn answering(&self) -> bool {
        self.failures.load(Ordering::Acquire) == 0
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match (
            self.open_until.load(Ordering::Acquire),
            self.probing.load(Ordering::Acquire),
        ) {
            (0, _) => BreakerState::Closed,
            (_, true) => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }
}

/// One operation's leave from the [`Breaker`]: [`Permit::success`] or [`Permit::failure`] says
/// how it went; dropped unsettled (the operation's future was dropped mid-flight), a probe counts
/// as failed (the breaker reopens for a cool-off, then probes again) and any other operation as
/// nothing (a caller hanging up says nothing about Redis).
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    /// The operation answered.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.success();
    }

    /// The operation failed or timed out.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.failure();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.failure();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_then_probes_once_after_the_cool_off() {
        let gauge = Gauge::default();
        let breaker = Breaker::new(gauge.clone());
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert!(breaker.allow());
            breaker.failure();
        }
        // A success in between resets the count.
        breaker.success();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            breaker.failure();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(gauge.get(), 2);
        assert!(!breaker.allow(), "open: Redis is not asked");
        tokio::time::advance(COOL_OFF).await;
        assert!(breaker.allow(), "one probe after the cool-off");
        assert!(!breaker.allow(), "only one");
        assert_eq!(gauge.get(), 1);
        // A failed probe reopens it for another cool-off.
        breaker.failure();
        assert!(!breaker.allow());
        tokio::time::advance(COOL_OFF).await;
        assert!(breaker.allow());
        breaker.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(gauge.get(), 0);
        assert!(breaker.allow() && breaker.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unfinished_reopens_the_breaker_and_a_later_probe_goes() {
        let breaker = Breaker::new(Gauge::default());
        for _ in 0..FAILURES_TO_OPEN {
            breaker.failure();
        }
        tokio::time::advance(COOL_OFF).await;
        let probe = breaker.permit().expect("the probe after the cool-off");
        assert!(breaker.permit().is_none(), "only one");
        // Its caller hung up: no outcome will come.
        drop(probe);
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(COOL_OFF).await;
        let probe = breaker
            .permit()
            .expect("another probe after the next cool-off");
        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        // Closed, a dropped operation says nothing about Redis.
        for _ in 0..FAILURES_TO_OPEN + 1 {
            drop(breaker.permit().expect("closed"));
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.answering());
    }
}
