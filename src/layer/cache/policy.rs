//! What may be stored, how fresh an entry is, and when a stale one may be served: pure functions
//! of the route's windows, the caller's `Cache-Control`, the upstream's status and an age, so each
//! rule is tested alone (as pingora-cache's `filters.rs` and Envoy's `cache_policy.h` do).
//!
//! Freshness is the route's: `cache_ttl`, then `stale_while_revalidate` and `stale_if_error`
//! (RFC 5861) counted from the end of the TTL. The upstream's own `Cache-Control` is not read yet.

use std::time::{Duration, SystemTime};

use http::{HeaderValue, StatusCode};

use crate::route::Route;

/// A route's cache windows, carried by every stored entry so it can be judged on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Fresh for this long after it was stored.
    pub ttl: Duration,
    /// Past the TTL, served stale for this long while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// Past the TTL, served stale for this long when the upstream fails.
    pub stale_if_error: Duration,
}

impl Windows {
    /// The route's windows, if it is cached.
    pub fn of(route: &Route) -> Option<Windows> {
        Some(Windows {
            ttl: route.cache_ttl?,
            stale_while_revalidate: route.stale_while_revalidate.unwrap_or_default(),
            stale_if_error: route.stale_if_error.unwrap_or_default(),
        })
    }

    /// How long an entry can be of any use: a store may drop it after this.
    pub fn lifetime(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// An entry's age: how long ago it was stored, by the wall clock (zero if `stored_at` is ahead
/// of `now`, say another process's clock runs fast).
pub fn age(stored_at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(stored_at).unwrap_or_default()
}

/// What an entry of a given age is good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within the TTL: a hit, `left` before it goes stale.
    Fresh {
        /// Time left in the TTL.
        left: Duration,
    },
    /// Past the TTL, within `stale_while_revalidate`: served stale while one refresh runs.
    Revalidate {
        /// How far past the TTL it is.
        over: Duration,
    },
    /// Past the TTL (and any `stale_while_revalidate`), within `stale_if_error`: served only if
    /// the upstream fails.
    IfError,
    /// Past every window: of no use.
    Expired,
}

/// How fresh an entry with `windows` is at `age`.
pub fn freshness(windows: &Windows, age: Duration) -> Freshness {
    if age < windows.ttl {
        Freshness::Fresh {
            left: windows.ttl - age,
        }
    } else if age < windows.ttl + windows.stale_while_revalidate {
        Freshness::Revalidate {
            over: age - windows.ttl,
        }
    } else if age < windows.ttl + windows.stale_if_error {
        Freshness::IfError
    } else {
        Freshness::Expired
    }
}

/// What the caller's `Cache-Control` asks of the cache (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asks {
    /// Nothing: any fresh or usable stale entry will do.
    Anything,
    /// `no-cache` or `max-age=0`: fetch fresh (and store what comes).
    Fresh,
    /// `no-store`: fetch, and store nothing of it.
    NoStore,
}

impl Asks {
    /// What the caller's `Cache-Control` values ask, `no-store` over everything else.
    pub fn of<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Asks {
        let mut asks = Asks::Anything;
        for directive in values
            .into_iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
        {
            match directive.as_str() {
                "no-store" => return Asks::NoStore,
                "no-cache" | "max-age=0" | "max-age=\"0\"" => asks = Asks::Fresh,
                _ => {}
            }
        }
        asks
    }

    /// Whether a stored entry may answer the caller (otherwise the call is forwarded).
    pub fn takes_stored(self) -> bool {
        self == Asks::Anything
    }
}

/// Why an answer was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// The caller sent `Cache-Control: no-store`.
    RequestNoStore,
    /// Only `200` answers are stored.
    Status,
}

impl NotStored {
    /// The reason, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::RequestNoStore => "request no-store",
            NotStored::Status => "status not 200",
        }
    }
}

/// Whether an answer with `status`, fetched for a caller who asks `asks`, may be stored. Its
/// size is checked as it is read (`cache.max_entry_bytes`); the request itself was already found
/// shareable ([`super::shareable`]).
pub fn storable(asks: Asks, status: StatusCode) -> Result<(), NotStored> {
    if asks == Asks::NoStore {
        Err(NotStored::RequestNoStore)
    } else if status != StatusCode::OK {
        Err(NotStored::Status)
    } else {
        Ok(())
    }
}

/// How the upstream failed, when a stale answer may stand in for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It answered with a server error.
    Status(StatusCode),
    /// No answer: unreachable, timed out, no token.
    Error,
}

/// Whether the upstream failed (RFC 5861 §4: an error, or a 500, 502, 503 or 504; any 5xx here).
pub fn failure<T>(status: Result<StatusCode, &T>) -> Option<Failure> {
    match status {
        Ok(status) if status.is_server_error() => Some(Failure::Status(status)),
        Ok(_) => None,
        Err(_) => Some(Failure::Error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOWS: Windows = Windows {
        ttl: Duration::from_secs(300),
        stale_while_revalidate: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(3600),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn freshness_follows_the_windows_at_their_edges() {
        assert_eq!(
            freshness(&WINDOWS, secs(0)),
            Freshness::Fresh { left: secs(300) }
        );
        assert_eq!(
            freshness(&WINDOWS, secs(299)),
            Freshness::Fresh { left: secs(1) }
        );
        assert_eq!(
            freshness(&WINDOWS, secs(300)),
            Freshness::Revalidate { over: secs(0) }
        );
        assert_eq!(
            freshness(&WINDOWS, secs(359)),
            Freshness::Revalidate { over: secs(59) }
        );
        assert_eq!(freshness(&WINDOWS, secs(360)), Freshness::IfError);
        assert_eq!(freshness(&WINDOWS, secs(3899)), Freshness::IfError);
        assert_eq!(freshness(&WINDOWS, secs(3900)), Freshness::Expired);
        let no_stale = Windows {
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ..WINDOWS
        };
        assert_eq!(freshness(&no_stale, secs(300)), Freshness::Expired);
        assert_eq!(no_stale.lifetime(), secs(300));
        assert_eq!(WINDOWS.lifetime(), secs(3900));
    }

    #[test]
    fn a_longer_revalidate_window_covers_the_error_window() {
        let windows = Windows {
            stale_while_revalidate: secs(600),
            stale_if_error: secs(60),
            ..WINDOWS
        };
        assert_eq!(
            freshness(&windows, secs(500)),
            Freshness::Revalidate { over: secs(200) }
        );
        assert_eq!(freshness(&windows, secs(900)), Freshness::Expired);
        assert_eq!(windows.lifetime(), secs(900));
    }

    #[test]
    fn age_is_zero_for_an_entry_from_the_future() {
        let now = SystemTime::UNIX_EPOCH + secs(1_000);
        assert_eq!(age(now - secs(7), now), secs(7));
        assert_eq!(age(now + secs(7), now), Duration::ZERO);
    }

    #[test]
    fn the_callers_cache_control_is_read_case_blind_and_no_store_wins() {
        let asks = |values: &[&str]| {
            let values: Vec<HeaderValue> = values
                .iter()
                .map(|v| HeaderValue::from_str(v).unwrap())
                .collect();
            Asks::of(&values)
        };
        assert_eq!(asks(&[]), Asks::Anything);
        assert_eq!(asks(&["max-age=60"]), Asks::Anything);
        assert_eq!(asks(&["No-Cache"]), Asks::Fresh);
        assert_eq!(asks(&["max-stale, max-age=0"]), Asks::Fresh);
        assert_eq!(asks(&["max-age=\"0\""]), Asks::Fresh);
        assert_eq!(asks(&["no-cache", "NO-STORE"]), Asks::NoStore);
        assert_eq!(asks(&["no-store, no-cache"]), Asks::NoStore);
        assert!(Asks::Anything.takes_stored());
        assert!(!Asks::Fresh.takes_stored());
        assert!(!Asks::NoStore.takes_stored());
    }

    #[test]
    fn only_200_answers_are_stored_and_never_for_no_store() {
        assert_eq!(storable(Asks::Anything, StatusCode::OK), Ok(()));
        assert_eq!(storable(Asks::Fresh, StatusCode::OK), Ok(()));
        assert_eq!(
            storable(Asks::NoStore, StatusCode::OK),
            Err(NotStored::RequestNoStore)
        );
        for status in [
            StatusCode::NO_CONTENT,
            StatusCode::NOT_MODIFIED,
            StatusCode::NOT_FOUND,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert_eq!(
                storable(Asks::Anything, status),
                Err(NotStored::Status),
                "{status}"
            );
        }
    }

    #[test]
    fn server_errors_and_errors_are_failures_other_answers_are_not() {
        let ok = |s: u16| failure::<()>(Ok(StatusCode::from_u16(s).unwrap()));
        assert_eq!(ok(200), None);
        assert_eq!(ok(404), None);
        assert_eq!(ok(429), None);
        assert_eq!(
            ok(503),
            Some(Failure::Status(StatusCode::SERVICE_UNAVAILABLE))
        );
        assert_eq!(failure(Err(&"unreachable")), Some(Failure::Error));
    }
}
