//! What the cache did for a call: the [`CacheStatus`] label (metrics, logs) and the
//! `Cache-Status` header value (RFC 9211) it is derived from, rendered in one place.

use std::io::Write as _;
use std::time::Duration;

use http::HeaderValue;

use super::policy::Failure;

pub use crate::headers::CACHE_STATUS;

/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "pcgate";

/// What the cache did for a call (a metric label, a log field and the `Cache-Status` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from a fresh entry.
    Hit,
    /// Fetched from the upstream: nothing usable was stored.
    Miss,
    /// Answered from a stale entry (revalidating in the background, or the upstream failed).
    Stale,
    /// Fetched because the caller asked (`no-cache`, `max-age=0`, `no-store`).
    Bypass,
}

impl CacheStatus {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }

    /// Its label's index in [`CACHE_RESULTS`](crate::metrics::CACHE_RESULTS).
    pub fn index(self) -> usize {
        match self {
            CacheStatus::Hit => 0,
            CacheStatus::Miss => 1,
            CacheStatus::Stale => 2,
            CacheStatus::Bypass => 3,
        }
    }
}

/// Why the request went forward (RFC 9211 §2.2 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Nothing usable was stored.
    Miss,
    /// The caller's `Cache-Control` asked for it.
    Request,
    /// The entry was stale (and the upstream failed: served it anyway).
    Stale,
}

impl Forward {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::Miss => "miss",
            Forward::Request => "request",
            Forward::Stale => "stale",
        }
    }
}

/// The entry's remaining freshness (RFC 9211 §2.5 `ttl`), negative once stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// This many seconds left.
    Left(u64),
    /// Stale by this many seconds (written `-N`, `-0` included).
    Over(u64),
}

/// Extra detail (RFC 9211 §2.8 `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// A stale answer given while one background refresh runs (RFC 5861 §3).
    StaleWhileRevalidate,
}

impl Detail {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Detail::StaleWhileRevalidate => "stale-while-revalidate",
        }
    }
}

/// One `Cache-Status` member for pcgate (RFC 9211 §2): its parameters as values, rendered by
/// [`CacheStatusHeader::render`] and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatusHeader {
    /// `hit`: answered from the cache without going forward.
    pub hit: bool,
    /// `fwd`: why it went forward.
    pub fwd: Option<Forward>,
    /// `fwd-status`: the status the upstream answered, when it is not the one sent on.
    pub fwd_status: Option<u16>,
    /// `ttl`: the entry's remaining freshness.
    pub ttl: Option<Ttl>,
    /// `stored`: the answer was stored.
    pub stored: bool,
    /// `detail`.
    pub detail: Option<Detail>,
}

impl CacheStatusHeader {
    const EMPTY: CacheStatusHeader = CacheStatusHeader {
        hit: false,
        fwd: None,
        fwd_status: None,
        ttl: None,
        stored: false,
        detail: None,
    };

    /// A fresh entry with `left` to live.
    pub fn hit(left: Duration) -> Self {
        CacheStatusHeader {
            hit: true,
            ttl: Some(Ttl::Left(left.as_secs())),
            ..Self::EMPTY
        }
    }

    /// A stale entry `over` its TTL, served while one refresh runs.
    pub fn revalidating(over: Duration) -> Self {
        CacheStatusHeader {
            hit: true,
            ttl: Some(Ttl::Over(over.as_secs())),
            detail: Some(Detail::StaleWhileRevalidate),
            ..Self::EMPTY
        }
    }

    /// A stale entry served because the upstream failed.
    pub fn stale_if_error(failure: Failure) -> Self {
        CacheStatusHeader {
            fwd: Some(Forward::Stale),
            fwd_status: match failure {
                Failure::Status(status) => Some(status.as_u16()),
                Failure::Error => None,
            },
            ..Self::EMPTY
        }
    }

    /// The upstream's answer, forwarded for `fwd` and `stored` or not.
    pub fn forwarded(fwd: Forward, stored: bool) -> Self {
        CacheStatusHeader {
            fwd: Some(fwd),
            stored,
            ..Self::EMPTY
        }
    }

    /// The label this answer counts under.
    pub fn outcome(&self) -> CacheStatus {
        match (self.hit, self.detail, self.fwd) {
            (true, Some(Detail::StaleWhileRevalidate), _) => CacheStatus::Stale,
            (true, None, _) => CacheStatus::Hit,
            (false, _, Some(Forward::Stale)) => CacheStatus::Stale,
            (false, _, Some(Forward::Request)) => CacheStatus::Bypass,
            (false, _, Some(Forward::Miss) | None) => CacheStatus::Miss,
        }
    }

    /// The header value: `pcgate; hit; ttl=12`, `pcgate; fwd=miss; stored`, ...
    pub fn render(&self) -> HeaderValue {
        // Written on the stack and copied once into the value: the longest
        // (`pcgate; hit; fwd=request; fwd-status=65535; ttl=-18446744073709551615; stored;
        // detail=stale-while-revalidate`) is 108 bytes; one that did not fit would be written
        // as the name alone, never cut short.
        let mut text = [0u8; 128];
        let mut out = std::io::Cursor::new(&mut text[..]);
        let written = (|| {
            out.write_all(CACHE_NAME.as_bytes())?;
            if self.hit {
                out.write_all(b"; hit")?;
            }
            if let Some(fwd) = self.fwd {
                write!(out, "; fwd={}", fwd.as_str())?;
            }
            if let Some(status) = self.fwd_status {
                write!(out, "; fwd-status={status}")?;
            }
            match self.ttl {
                Some(Ttl::Left(secs)) => write!(out, "; ttl={secs}")?,
                Some(Ttl::Over(secs)) => write!(out, "; ttl=-{secs}")?,
                None => {}
            }
            if self.stored {
                out.write_all(b"; stored")?;
            }
            if let Some(detail) = self.detail {
                write!(out, "; detail={}", detail.as_str())?;
            }
            std::io::Result::Ok(())
        })();
        let len = usize::try_from(out.position()).ok();
        // Only ASCII letters, digits and punctuation go in.
        match (written, len) {
            (Ok(()), Some(len)) => HeaderValue::from_bytes(&text[..len]).ok(),
            _ => None,
        }
        .unwrap_or_else(|| HeaderValue::from_static(CACHE_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn rendered(header: CacheStatusHeader) -> (String, CacheStatus) {
        (
            header.render().to_str().unwrap().to_owned(),
            header.outcome(),
        )
    }

    #[test]
    fn each_outcome_counts_under_its_own_label() {
        for status in [
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Stale,
            CacheStatus::Bypass,
        ] {
            assert_eq!(
                crate::metrics::CACHE_RESULTS[status.index()],
                status.as_str()
            );
        }
    }

    #[test]
    fn every_answer_the_cache_gives_renders_as_before() {
        let secs = Duration::from_secs;
        let cases = [
            (
                CacheStatusHeader::hit(secs(299)),
                "pcgate; hit; ttl=299",
                CacheStatus::Hit,
            ),
            (
                CacheStatusHeader::revalidating(secs(10)),
                "pcgate; hit; ttl=-10; detail=stale-while-revalidate",
                CacheStatus::Stale,
            ),
            (
                CacheStatusHeader::revalidating(Duration::from_millis(300)),
                "pcgate; hit; ttl=-0; detail=stale-while-revalidate",
                CacheStatus::Stale,
            ),
            (
                CacheStatusHeader::stale_if_error(Failure::Status(StatusCode::BAD_GATEWAY)),
                "pcgate; fwd=stale; fwd-status=502",
                CacheStatus::Stale,
            ),
            (
                CacheStatusHeader::stale_if_error(Failure::Error),
                "pcgate; fwd=stale",
                CacheStatus::Stale,
            ),
            (
                CacheStatusHeader::forwarded(Forward::Miss, true),
                "pcgate; fwd=miss; stored",
                CacheStatus::Miss,
            ),
            (
                CacheStatusHeader::forwarded(Forward::Miss, false),
                "pcgate; fwd=miss",
                CacheStatus::Miss,
            ),
            (
                CacheStatusHeader::forwarded(Forward::Request, true),
                "pcgate; fwd=request; stored",
                CacheStatus::Bypass,
            ),
            (
                CacheStatusHeader::forwarded(Forward::Request, false),
                "pcgate; fwd=request",
                CacheStatus::Bypass,
            ),
        ];
        for (header, text, outcome) in cases {
            assert_eq!(rendered(header), (text.to_owned(), outcome));
        }
    }

    #[test]
    fn parameters_come_in_rfc_9211_order() {
        let header = CacheStatusHeader {
            hit: false,
            fwd: Some(Forward::Stale),
            fwd_status: Some(503),
            ttl: Some(Ttl::Over(4)),
            stored: true,
            detail: Some(Detail::StaleWhileRevalidate),
        };
        assert_eq!(
            header.render(),
            "pcgate; fwd=stale; fwd-status=503; ttl=-4; stored; detail=stale-while-revalidate"
        );
    }

    #[test]
    fn the_longest_value_is_written_whole() {
        let header = CacheStatusHeader {
            hit: true,
            fwd: Some(Forward::Request),
            fwd_status: Some(u16::MAX),
            ttl: Some(Ttl::Over(u64::MAX)),
            stored: true,
            detail: Some(Detail::StaleWhileRevalidate),
        };
        assert_eq!(
            header.render(),
            "pcgate; hit; fwd=request; fwd-status=65535; ttl=-18446744073709551615; stored; \
             detail=stale-while-revalidate"
        );
    }
}
