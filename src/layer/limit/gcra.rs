//! GCRA (the generic cell rate algorithm, as in ATM's traffic policing and Redis's `redis-cell`):
//! one number per limiter, the theoretical arrival time (TAT) of the next call. The same
//! formula runs here for the local limiter and in the fleet's Lua script on the Redis server's
//! clock, so a fleet and a lone process admit alike.
//!
//! With emission interval `T = period / count` and tolerance `τ = T × (burst − 1)`, a call
//! arriving at `now` may go at `max(TAT, now) − τ`; taking the slot moves the TAT to
//! `max(TAT, now) + T`. So from rest `burst` calls go at once, then one every `T`, and in any
//! window of length `t` at most `burst + t / T` calls go.

use crate::config::RateLimit;

/// A rate as GCRA's two numbers, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: the time one call's slot takes.
    pub interval_us: u64,
    /// `τ`: how far ahead of the TAT a call may go (the burst).
    pub tolerance_us: u64,
}

/// What [`Gcra::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The slot is taken: wait this long, then call; the TAT is now `tat`.
    Reserved {
        /// Time until the slot.
        wait_us: u64,
        /// The new TAT.
        tat: u64,
    },
    /// The slot is further away than the caller can wait; nothing was taken.
    Refused {
        /// Time until the slot.
        wait_us: u64,
    },
}

impl Gcra {
    /// The rate's interval and tolerance.
    pub fn new(rate: RateLimit) -> Gcra {
        let interval_us = (rate.interval().as_micros() as u64).max(1);
        Gcra {
            interval_us,
            tolerance_us: interval_us * u64::from(rate.burst().saturating_sub(1)),
        }
    }

    /// A call at `now` that can wait at most `max_wait_us`, against the stored `tat` (0: none).
    pub fn reserve(&self, tat: u64, now: u64, max_wait_us: u64) -> Decision {
        let start = tat.max(now);
        let wait_us = start.saturating_sub(self.tolerance_us).saturating_sub(now);
        if wait_us > max_wait_us {
            return Decision::Refused { wait_us };
        }
        Decision::Reserved {
            wait_us,
            tat: start + self.interval_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra(rate: &str) -> Gcra {
        Gcra::new(RateLimit::parse(rate).unwrap())
    }

    /// Reserves at `now` with unbounded patience; the wait.
    fn take(g: &Gcra, tat: &mut u64, now: u64) -> u64 {
        match g.reserve(*tat, now, u64::MAX) {
            Decision::Reserved { wait_us, tat: next } => {
                *tat = next;
                wait_us
            }
            Decision::Refused { .. } => unreachable!("unbounded patience"),
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_one_per_interval() {
        let g = gcra("4/s");
        assert_eq!(g.interval_us, 250_000);
        assert_eq!(g.tolerance_us, 750_000);
        let mut tat = 0;
        let now = 1_000_000_000;
        let waits: Vec<u64> = (0..7).map(|_| take(&g, &mut tat, now)).collect();
        assert_eq!(waits, [0, 0, 0, 0, 250_000, 500_000, 750_000]);
        // After a quiet second the burst is back, once the TAT is in the past.
        let later = now + 10_000_000;
        assert_eq!(take(&g, &mut tat, later), 0);
    }

    #[test]
    fn a_slot_past_the_callers_patience_is_refused_and_not_taken() {
        let g = gcra("1/s");
        let mut tat = 0;
        assert_eq!(take(&g, &mut tat, 5_000_000), 0);
        let before = tat;
        assert_eq!(
            g.reserve(tat, 5_000_000, 999_999),
            Decision::Refused { wait_us: 1_000_000 }
        );
        assert_eq!(tat, before, "a refusal changes nothing");
        assert_eq!(
            g.reserve(tat, 5_000_000, 1_000_000),
            Decision::Reserved {
                wait_us: 1_000_000,
                tat: 7_000_000
            }
        );
    }

    #[test]
    fn no_window_admits_more_than_burst_plus_rate() {
        // Callers arriving every 10 ms for 3 s against 20/s: in every 1 s window of slots, at
        // most burst + rate = 40, and over the whole run no more than the rate allows.
        let g = gcra("20/s");
        let mut tat = 0;
        let mut slots = Vec::new();
        for i in 0..300u64 {
            let now = 1_000_000 + i * 10_000;
            slots.push(now + take(&g, &mut tat, now));
        }
        for (i, start) in slots.iter().enumerate() {
            let within = slots[i..]
                .iter()
                .take_while(|s| **s < start + 1_000_000)
                .count();
            assert!(within <= 40, "{within} slots in 1 s from {start}");
        }
        let last = *slots.last().unwrap();
        assert!(last >= 1_000_000 + (300 - 20) * 50_000, "{last}");
    }
}
