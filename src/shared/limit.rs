//! The fleet throttle: the hold and the rate limit of [`crate::layer::limit`] for every sidecar
//! of the namespace, in Redis.
//!
//! - The hold is one key, `pcgate:{ns}:throttle:hold`, set with `PX` = the `Retry-After` (a
//!   longer hold already set stays): Redis expires it when the hold passes, on its own clock.
//! - The rate is one key, `pcgate:{ns}:throttle:rate`, holding the GCRA's theoretical arrival
//!   time in microseconds of the Redis server's clock (`TIME`), so the sidecars' clocks never
//!   matter; the formula is [`crate::layer::limit::gcra`]'s. It expires once the TAT is past.
//!
//! Before each upstream call one script reads the hold and, when none, takes a slot no further
//! away than the caller can wait: one round trip, within `shared.timeout`, through the breaker.
//! A sidecar learns of another's hold at its next upstream call, so no message is needed.

use std::time::Duration;

use super::{Op, Shared};
use crate::layer::limit::gcra::Gcra;
use crate::layer::limit::{Fleet, FleetAnswer, FleetFuture};

/// KEYS: the hold, the TAT. ARGV: interval µs (0: no rate), tolerance µs, max wait µs.
/// Returns `{0, wait_us}` (go after the wait), `{1, held_us}` (held) or `{2, wait_us}` (the
/// slot is past the caller's patience; nothing taken).
const ADMIT: &str = r"
local held = redis.call('PTTL', KEYS[1])
if held > 0 then
  return {1, held * 1000}
end
local interval = tonumber(ARGV[1])
if interval == 0 then
  return {0, 0}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local start = math.max(tat, now)
local wait = start - tonumber(ARGV[2]) - now
if wait < 0 then
  wait = 0
end
if wait > tonumber(ARGV[3]) then
  return {2, wait}
end
local next_tat = start + interval
redis.call('SET', KEYS[2], string.format('%.0f', next_tat), 'PX',
  math.floor((next_tat - now) / 1000) + 1)
return {0, wait}
";

/// KEYS: the hold. ARGV: its length in ms. Lengthens the hold to that, never shortens it.
const HOLD: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
";

/// [`Fleet`] on the shared tier.
pub struct FleetThrottle {
    shared: Shared,
    hold_key: String,
    rate_key: String,
    admit: redis::Script,
    hold: redis::Script,
}

impl FleetThrottle {
    /// The namespace's throttle.
    pub fn new(shared: Shared) -> FleetThrottle {
        FleetThrottle {
            hold_key: shared.key("throttle", "hold"),
            rate_key: shared.key("throttle", "rate"),
            shared,
            admit: redis::Script::new(ADMIT),
            hold: redis::Script::new(HOLD),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Fleet for FleetThrottle {
    fn admit(
        &self,
        rate: Option<Gcra>,
        max_wait: Duration,
    ) -> FleetFuture<'_, Option<FleetAnswer>> {
        Box::pin(async move {
            let mut invocation = self.admit.key(&self.hold_key);
            invocation
                .key(&self.rate_key)
                .arg(rate.map_or(0, |r| r.interval_us))
                .arg(rate.map_or(0, |r| r.tolerance_us))
                // Lua numbers are doubles: keep the patience well inside their exact range.
                .arg(micros(max_wait).min(1 << 50));
            let (kind, us): (i64, i64) = self.shared.script(Op::Script, &invocation).await.ok()?;
            let d = Duration::from_micros(us.max(0) as u64);
            match kind {
                0 => Some(FleetAnswer::Go(d)),
                1 => Some(FleetAnswer::Held(d)),
                2 => Some(FleetAnswer::Refused(d)),
                _ => None,
            }
        })
    }

    fn hold(&self, hold: Duration) -> FleetFuture<'_, Option<()>> {
        Box::pin(async move {
            let millis = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut invocation = self.hold.key(&self.hold_key);
            invocation.arg(millis);
            let _set: i64 = self.shared.script(Op::Script, &invocation).await.ok()?;
            Some(())
        })
    }
}
