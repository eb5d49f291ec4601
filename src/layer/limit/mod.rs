//! `limit`: one throttle budget in front of the upstream. Every request that goes to Partner
//! Center (each retry and each 401 replay too) passes here first:
//!
//! - **The hold.** An upstream `429` with `Retry-After` (seconds or an HTTP-date; at most
//!   `retry.max_retry_after`) holds every later upstream call of the process until it passes
//!   (reference §2.4: every call accrues against the partner's limits, so calling on only
//!   prolongs the throttling). A call that meets a hold waits for its end within its deadline;
//!   if the hold outlasts the deadline the call fails at once with [`Throttled`] (429 with
//!   `Retry-After`), an error, so the cache serves a stale copy where `stale_if_error` allows.
//! - **The rate.** `upstream.rate_limit` is a GCRA ([`gcra`]): over the rate a call waits for
//!   its slot, within its deadline; a slot past the deadline is not taken and the call gets a
//!   429 with `Retry-After` at once.
//! - **The fleet.** With `[shared]`, a [`Fleet`] answers both in one round trip for every
//!   sidecar of the namespace (a hold key with the `Retry-After` as its expiry, a GCRA in a Lua
//!   script on the Redis server's clock). When it cannot answer (Redis down, slow, its breaker
//!   open) the local hold and the local limiter decide: no caller sees an error for it.
//!
//! The layer stands below `retry` and `credential`, right above the client, so retries and
//! replays spend slots and respect holds like first attempts; `retry` already waits a 429's
//! `Retry-After` itself, and its retry then finds the hold over.

pub mod gcra;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::body::{BoxError, BoxFuture, Request, Response};
use crate::call::SharedUnanswered;
use crate::config::RateLimit;
use crate::deadline::Deadline;
pub use crate::error::{ThrottleCause, Throttled};
use crate::metrics::Metrics;
use gcra::{Decision, Gcra};

/// At most this many hold/slot rounds per attempt (each waits, bounded by the deadline).
const MAX_ROUNDS: usize = 16;

/// A future the fleet returns.
pub type FleetFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the fleet said about one upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetAnswer {
    /// The namespace is held for this much longer.
    Held(Duration),
    /// Not held, and the slot (if a rate is set) is taken: go after this wait.
    Go(Duration),
    /// Not held, but the next slot is this far away, past what the caller can wait.
    Refused(Duration),
}

/// The fleet-wide throttle of the shared tier; `None` from either call means it could not
/// answer in time, and the process decides alone.
pub trait Fleet: Send + Sync + 'static {
    /// The namespace's hold, else (with `rate`) a slot no further away than `max_wait`.
    fn admit(&self, rate: Option<Gcra>, max_wait: Duration)
        -> FleetFuture<'_, Option<FleetAnswer>>;
    /// Holds the namespace for `hold` (a longer hold already set stays).
    fn hold(&self, hold: Duration) -> FleetFuture<'_, Option<()>>;
}

/// Where a hold came from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldOrigin {
    /// A 429 with `Retry-After` this process got from the upstream.
    Upstream,
    /// Another sidecar's, learnt from the shared tier.
    Fleet,
}

impl HoldOrigin {
    /// Every origin, for exporting each at zero.
    pub const ALL: [HoldOrigin; 2] = [HoldOrigin::Upstream, HoldOrigin::Fleet];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldOrigin::Upstream => "upstream",
            HoldOrigin::Fleet => "fleet",
        }
    }
}

/// Who decided a call's slot (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// This process alone (no `[shared]`, or it could not answer).
    Local,
    /// The shared tier, for every sidecar of the namespace.
    Fleet,
}

impl Scope {
    /// Every scope, for exporting each at zero.
    pub const ALL: [Scope; 2] = [Scope::Local, Scope::Fleet];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Fleet => "fleet",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
label_value!(ThrottleCause, HoldOrigin, Scope);

/// `{cause}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CauseLabel {
    cause: ThrottleCause,
}

/// `{origin}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OriginLabel {
    origin: HoldOrigin,
}

/// `{scope}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ScopeLabel {
    scope: Scope,
}

/// The layer's metric families, registered by the layer itself, every series at zero.
struct LimitMetrics {
    /// `pcgate_throttle_waits_total{cause}`: upstream attempts that waited.
    waits: Family<CauseLabel, Counter>,
    /// `pcgate_throttle_wait_seconds_total{cause}`: the time they waited.
    wait_seconds: Family<CauseLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// `pcgate_throttle_refused_total{cause}`: calls answered 429 by pcgate.
    refused: Family<CauseLabel, Counter>,
    /// `pcgate_throttle_holds_total{origin}`: holds begun (or lengthened by an upstream 429).
    holds: Family<OriginLabel, Counter>,
    /// `pcgate_throttle_held_seconds_total`: hold time begun from this process's 429s.
    held_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// `pcgate_rate_limit_slots_total{scope}`: slots taken, by who decided them.
    slots: Family<ScopeLabel, Counter>,
}

impl LimitMetrics {
    fn register(metrics: &Metrics) -> LimitMetrics {
        let m = LimitMetrics {
            waits: Family::default(),
            wait_seconds: Family::default(),
            refused: Family::default(),
            holds: Family::default(),
            held_seconds: Counter::default(),
            slots: Family::default(),
        };
        for cause in ThrottleCause::ALL {
            let _ = m.waits.get_or_create(&CauseLabel { cause });
            let _ = m.wait_seconds.get_or_create(&CauseLabel { cause });
            let _ = m.refused.get_or_create(&CauseLabel { cause });
        }
        for origin in HoldOrigin::ALL {
            let _ = m.holds.get_or_create(&OriginLabel { origin });
        }
        for scope in Scope::ALL {
            let _ = m.slots.get_or_create(&ScopeLabel { scope });
        }
        metrics.register(
            "throttle_waits",
            "Upstream attempts that waited for a rate-limit slot or for a hold to pass",
            m.waits.clone(),
        );
        metrics.register(
            "throttle_wait_seconds",
            "Time upstream attempts waited for a rate-limit slot or a hold",
            m.wait_seconds.clone(),
        );
        metrics.register(
            "throttle_refused",
            "Calls answered 429 by pcgate: the slot or the hold's end lay past their deadline",
            m.refused.clone(),
        );
        metrics.register(
            "throttle_holds",
            "Holds begun or lengthened: from a 429 with Retry-After seen here, or learnt from the fleet",
            m.holds.clone(),
        );
        metrics.register(
            "throttle_held_seconds",
            "Hold time begun by the upstream's 429s seen by this process",
            m.held_seconds.clone(),
        );
        metrics.register(
            "rate_limit_slots",
            "Upstream slots taken under upstream.rate_limit, by who decided them (fleet or local)",
            m.slots.clone(),
        );
        m
    }
}

/// The layer's own settings.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// `upstream.rate_limit`.
    pub rate: Option<RateLimit>,
    /// The longest hold a `Retry-After` sets (`retry.max_retry_after`).
    pub max_hold: Duration,
    /// The call's time limit, for a request that came without a deadline.
    pub deadline: Duration,
}

/// The state every clone shares: the local hold and limiter, and the fleet's handle.
struct Throttle {
    settings: LimitSettings,
    gcra: Option<Gcra>,
    /// The local limiter's TAT, in microseconds since `epoch`.
    tat: Mutex<u64>,
    /// The local hold: no upstream call before this.
    held_until: Mutex<Option<Instant>>,
    epoch: Instant,
    /// The shared tier's throttle, when `[shared]` is configured.
    fleet: std::sync::OnceLock<Arc<dyn Fleet>>,
    metrics: LimitMetrics,
}

/// Adds [`Limit`] in front of a service.
#[derive(Clone)]
pub struct LimitLayer {
    throttle: Arc<Throttle>,
}

impl LimitLayer {
    /// One throttle for every clone, its metrics registered in `metrics`.
    pub fn new(settings: LimitSettings, metrics: &Metrics) -> LimitLayer {
        LimitLayer {
            throttle: Arc::new(Throttle {
                gcra: settings.rate.map(Gcra::new),
                settings,
                tat: Mutex::new(0),
                held_until: Mutex::new(None),
                epoch: Instant::now(),
                fleet: std::sync::OnceLock::new(),
                metrics: LimitMetrics::register(metrics),
            }),
        }
    }

    /// Asks `fleet` first (the shared tier); the local hold and limiter stand in when it cannot
    /// answer.
    pub fn fleet(self, fleet: Arc<dyn Fleet>) -> LimitLayer {
        if self.throttle.fleet.set(fleet).is_err() {
            tracing::warn!("the limit layer already has a fleet throttle: the first one stays");
        }
        self
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            throttle: self.throttle.clone(),
        }
    }
}

/// Holds and rate-limits upstream calls; see the module docs.
#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    throttle: Arc<Throttle>,
}

impl<S> tower::Service<Request> for Limit<S>
where
    S: tower::Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> BoxFuture {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let throttle = self.throttle.clone();
        Box::pin(async move {
            let deadline = Deadline::of(&request, throttle.settings.deadline);
            // The cache's shared-tier operation on this call failed: no second timeout here.
            let ask_fleet = request.extensions().get::<SharedUnanswered>().is_none();
            throttle.admit(&deadline, ask_fleet).await?;
            let response = inner.call(request).await?;
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                let wait = crate::layer::retry::retry_after(response.headers(), SystemTime::now());
                if let Some(wait) = wait.filter(|w| !w.is_zero()) {
                    throttle.upstream_throttled(wait);
                }
            }
            Ok(response)
        })
    }
}

impl Throttle {
    /// Waits until this call may go upstream: no hold, and a slot taken; or says why it cannot
    /// within its deadline.
    /// `ask_fleet` false: the shared tier already failed this call, so the local hold and
    /// limiter decide.
    async fn admit(&self, deadline: &Deadline, ask_fleet: bool) -> Result<(), Throttled> {
        let mut slotted = false;
        let mut asked_fleet = false;
        for _ in 0..MAX_ROUNDS {
            if let Some(left) = self.hold_left() {
                self.wait(ThrottleCause::Hold, left, deadline).await?;
                continue;
            }
            if slotted {
                return Ok(());
            }
            let answer = match self.fleet.get() {
                Some(fleet) if ask_fleet && (!asked_fleet || self.gcra.is_some()) => {
                    fleet.admit(self.gcra, deadline.remaining()).await
                }
                _ => None,
            };
            match answer {
                Some(FleetAnswer::Held(left)) => {
                    self.fleet_held(left);
                    // Asked again once the hold has passed: for a slot, or whether it is over.
                    asked_fleet = true;
                }
                Some(FleetAnswer::Go(wait)) => {
                    if self.gcra.is_some() {
                        self.count_slot(Scope::Fleet);
                    }
                    self.wait(ThrottleCause::RateLimit, wait, deadline).await?;
                    slotted = true;
                    // Another sidecar may have been throttled while this one waited for its
                    // slot: ask for the hold alone once more before going.
                    if !wait.is_zero() {
                        if let Some(fleet) = self.fleet.get() {
                            if let Some(FleetAnswer::Held(left)) =
                                fleet.admit(None, deadline.remaining()).await
                            {
                                self.fleet_held(left);
                            }
                        }
                    }
                }
                Some(FleetAnswer::Refused(wait)) => {
                    return Err(self.refuse(ThrottleCause::RateLimit, wait))
                }
                None => {
                    if let Some(gcra) = &self.gcra {
                        let wait = self.local_slot(gcra, deadline.remaining())?;
                        self.count_slot(Scope::Local);
                        self.wait(ThrottleCause::RateLimit, wait, deadline).await?;
                    }
                    slotted = true;
                }
            }
        }
        // Holds that keep coming back, one after another: the caller is told to slow down.
        Err(self.refuse(
            ThrottleCause::Hold,
            self.hold_left().unwrap_or(Duration::from_secs(1)),
        ))
    }

    /// How much of the local hold is left, if any.
    fn hold_left(&self) -> Option<Duration> {
        let held = self.held_until.lock().unwrap_or_else(|e| e.into_inner());
        held.map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    /// Waits `wait` for `cause`, or fails at once if that passes the deadline.
    async fn wait(
        &self,
        cause: ThrottleCause,
        wait: Duration,
        deadline: &Deadline,
    ) -> Result<(), Throttled> {
        if wait.is_zero() {
            return Ok(());
        }
        if wait > deadline.remaining() {
            return Err(self.refuse(cause, wait));
        }
        let label = CauseLabel { cause };
        self.metrics.waits.get_or_create(&label).inc();
        self.metrics
            .wait_seconds
            .get_or_create(&label)
            .inc_by(wait.as_secs_f64());
        tracing::debug!(
            cause = cause.as_str(),
            wait_ms = wait.as_millis() as u64,
            "waiting before the upstream call"
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn refuse(&self, cause: ThrottleCause, wait: Duration) -> Throttled {
        self.metrics
            .refused
            .get_or_create(&CauseLabel { cause })
            .inc();
        Throttled {
            cause,
            retry_after: wait,
        }
    }

    fn count_slot(&self, scope: Scope) {
        self.metrics
            .slots
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }

    /// Takes a slot from the local limiter no further than `max_wait` away; its wait.
    fn local_slot(&self, gcra: &Gcra, max_wait: Duration) -> Result<Duration, Throttled> {
        let now = Instant::now().duration_since(self.epoch).as_micros() as u64;
        let max_wait_us = max_wait.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        match gcra.reserve(*tat, now, max_wait_us) {
            Decision::Reserved { wait_us, tat: next } => {
                *tat = next;
                Ok(Duration::from_micros(wait_us))
            }
            Decision::Refused { wait_us } => {
                Err(self.refuse(ThrottleCause::RateLimit, Duration::from_micros(wait_us)))
            }
        }
    }

    /// Lengthens the local hold to `left` from now (a longer one stays); the time added. A hold
    /// is counted when it begins, and when an upstream 429 lengthens it (the fleet's answers
    /// to concurrent calls differ by their round trips, which is no new hold).
    fn extend_hold(&self, left: Duration, origin: HoldOrigin) -> Duration {
        let now = Instant::now();
        let until = now + left;
        let mut held = self.held_until.lock().unwrap_or_else(|e| e.into_inner());
        let in_force = held.filter(|at| *at > now);
        let current = in_force.unwrap_or(now);
        if until <= current {
            return Duration::ZERO;
        }
        *held = Some(until);
        drop(held);
        if in_force.is_none() || origin == HoldOrigin::Upstream {
            self.metrics
                .holds
                .get_or_create(&OriginLabel { origin })
                .inc();
        }
        until - current
    }

    /// The fleet holds for `left` more: so does this process, for at most `max_hold` (the
    /// key may have been written by anyone who can reach the Redis, as a local hold is capped).
    fn fleet_held(&self, left: Duration) {
        self.extend_hold(left.min(self.settings.max_hold), HoldOrigin::Fleet);
    }

    /// The upstream answered 429 with `Retry-After: wait`: hold here, and tell the fleet.
    fn upstream_throttled(self: &Arc<Self>, wait: Duration) {
        let hold = wait.min(self.settings.max_hold);
        let added = self.extend_hold(hold, HoldOrigin::Upstream);
        if added.is_zero() {
            return;
        }
        self.metrics.held_seconds.inc_by(added.as_secs_f64());
        tracing::warn!(
            hold_ms = hold.as_millis() as u64,
            "the upstream throttled a call (429 with Retry-After): holding upstream calls until it passes"
        );
        if let Some(fleet) = self.fleet.get() {
            // Off the caller's path: the answer it already has goes back now.
            let fleet = fleet.clone();
            tokio::spawn(async move {
                if fleet.hold(hold).await.is_none() {
                    tracing::debug!("the shared tier did not take the hold: it is local only");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests;
