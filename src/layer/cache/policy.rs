//! What may be stored, how fresh an entry is, and when a stale one may be served: pure functions
//! of the route's windows, the caller's `Cache-Control`, the upstream's status and headers and an
//! age, so each rule is tested alone (as pingora-cache's `filters.rs` and Envoy's
//! `cache_policy.h` do).
//!
//! pcgate is a shared cache (RFC 9111 §1) whose default freshness is the route's:
//! - The upstream's `s-maxage`, else `max-age`, else `Expires` minus `Date` (§4.2.1) is the
//!   answer's freshness lifetime; only when it sends none do the route's `cache_ttl` and stale
//!   windows apply, as nginx's `proxy_cache_valid` does. With explicit freshness, an answer is
//!   served stale while revalidating only within the upstream's own `stale-while-revalidate`
//!   (RFC 5861 §3), and on an upstream failure within its `stale-if-error`, else the route's.
//! - `no-store`, `no-cache` and `private` answers are not stored (§5.2.2.4, .5, .7: pcgate has no
//!   revalidation, so `no-cache` cannot be stored usefully), nor `Vary: *` (§4.1).
//!   `must-revalidate`, `proxy-revalidate` and `s-maxage` forbid serving stale (§4.2.4).
//! - `Age` is computed as §4.2.3 says ([`initial_age`]): the larger of the apparent age (from
//!   `Date`) and the upstream's `Age` plus the response delay, then the time resident here.
//! - A route with `origin_cache_control = "ignore"` keeps its own windows whatever the upstream
//!   says ([`stored_windows`]); `Vary` and `Set-Cookie` are honoured still.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, StatusCode};

use crate::config::OriginCacheControl;
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
    /// The upstream said `no-store`.
    NoStore,
    /// The upstream said `no-cache` (store only to revalidate, which pcgate does not do).
    NoCache,
    /// The upstream said `private`: for one caller's cache only.
    Private,
    /// `Vary: *`: no later request can be known to match.
    VaryAll,
}

impl NotStored {
    /// The reason, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::RequestNoStore => "request no-store",
            NotStored::Status => "status not 200",
            NotStored::NoStore => "response no-store",
            NotStored::NoCache => "response no-cache",
            NotStored::Private => "response private",
            NotStored::VaryAll => "vary *",
        }
    }

    /// Whether the answer may still be handed to callers waiting on the same key: yes when only
    /// this cache's rules kept it out (a status, the fetching caller's `no-store`), so a failing
    /// upstream sees one call; no when the upstream said it is not for sharing.
    pub fn shareable(self) -> bool {
        matches!(self, NotStored::RequestNoStore | NotStored::Status)
    }
}

/// The upstream's `Cache-Control` directives a shared cache acts on (RFC 9111 §5.2.2), read
/// case-blind, commas inside quoted values respected, the first of a repeated directive winning
/// (§4.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`, with or without field names.
    pub no_cache: bool,
    /// `private`, with or without field names.
    pub private: bool,
    /// `must-revalidate` or `proxy-revalidate`.
    pub must_revalidate: bool,
    /// `max-age`, in seconds (an invalid value is 0: stale).
    pub max_age: Option<u64>,
    /// `s-maxage`, in seconds (an invalid value is 0).
    pub s_maxage: Option<u64>,
    /// `stale-while-revalidate` (RFC 5861 §3).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861 §4).
    pub stale_if_error: Option<u64>,
}

/// The largest delta-seconds a cache must handle; larger values are read as this (§1.2.2).
const MAX_DELTA: u64 = 1 << 31;

/// A delta-seconds value (`60`, `"60"`); anything else is invalid.
fn delta_seconds(value: Option<&str>) -> Option<u64> {
    let value = value?.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().map_or(MAX_DELTA, |v| v.min(MAX_DELTA)))
}

/// Splits a `Cache-Control` value on the commas outside quoted strings.
fn split_directives(value: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

impl Directives {
    /// The directives of every `Cache-Control` line of `headers`.
    pub fn of(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for directive in split_directives(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((name, arg)) => (name.trim(), Some(arg)),
                    None => (directive.trim(), None),
                };
                let seconds = || Some(delta_seconds(arg).unwrap_or(0));
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    "max-age" if d.max_age.is_none() => d.max_age = seconds(),
                    "s-maxage" if d.s_maxage.is_none() => d.s_maxage = seconds(),
                    "stale-while-revalidate" if d.stale_while_revalidate.is_none() => {
                        d.stale_while_revalidate = delta_seconds(arg)
                    }
                    "stale-if-error" if d.stale_if_error.is_none() => {
                        d.stale_if_error = delta_seconds(arg)
                    }
                    _ => {}
                }
            }
        }
        d
    }
}

/// An HTTP-date header's value; `None` when absent, `Some(Err)` when present but invalid.
fn date(headers: &HeaderMap, name: &HeaderName) -> Option<Result<SystemTime, ()>> {
    let value = headers.get(name)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
            .ok_or(()),
    )
}

/// The freshness lifetime the upstream gave (RFC 9111 §4.2.1): `s-maxage`, else `max-age`, else
/// `Expires` minus `Date` (minus `received` when there is no valid `Date`); an invalid `Expires`
/// (`0`, say) is in the past. `None`: it gave none, and the route's TTL applies.
pub fn upstream_lifetime(
    directives: &Directives,
    headers: &HeaderMap,
    received: SystemTime,
) -> Option<Duration> {
    if let Some(secs) = directives.s_maxage.or(directives.max_age) {
        return Some(Duration::from_secs(secs));
    }
    let expires = date(headers, &header::EXPIRES)?;
    let Ok(expires) = expires else {
        return Some(Duration::ZERO);
    };
    let date = match date(headers, &header::DATE) {
        Some(Ok(date)) => date,
        _ => received,
    };
    Some(expires.duration_since(date).unwrap_or_default())
}

/// The windows an answer is stored with, or why it is not stored: the upstream's freshness over
/// the route's `windows` when the route honours it (module docs), the route's alone when it
/// ignores it. `Vary: *` is never stored either way.
pub fn stored_windows(
    windows: Windows,
    mode: OriginCacheControl,
    headers: &HeaderMap,
    received: SystemTime,
) -> Result<Windows, NotStored> {
    if vary(headers) == Vary::All {
        return Err(NotStored::VaryAll);
    }
    if mode == OriginCacheControl::Ignore {
        return Ok(windows);
    }
    let d = Directives::of(headers);
    if d.no_store {
        return Err(NotStored::NoStore);
    }
    if d.no_cache {
        return Err(NotStored::NoCache);
    }
    if d.private {
        return Err(NotStored::Private);
    }
    let mut stored = match upstream_lifetime(&d, headers, received) {
        None => windows,
        Some(ttl) => Windows {
            ttl,
            stale_while_revalidate: Duration::from_secs(d.stale_while_revalidate.unwrap_or(0)),
            stale_if_error: d
                .stale_if_error
                .map_or(windows.stale_if_error, Duration::from_secs),
        },
    };
    // §4.2.4, §5.2.2.2, .8, .10: no stale answer once it is past its freshness.
    if d.must_revalidate || d.s_maxage.is_some() {
        stored.stale_while_revalidate = Duration::ZERO;
        stored.stale_if_error = Duration::ZERO;
    }
    Ok(stored)
}

/// What a stored answer's `Vary` says (RFC 9111 §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// Nothing, or only request headers already in the key.
    None,
    /// These request headers, lowercase, sorted, once each.
    Names(Vec<HeaderName>),
    /// `*`: it varies on things no request shows.
    All,
}

/// The request headers an answer varies on, from its `Vary` lines.
pub fn vary(headers: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            // Unreadable: no later request can be known to match.
            return Vary::All;
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Vary::All;
            }
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => names.push(name),
                Err(_) => return Vary::All,
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    if names.is_empty() {
        Vary::None
    } else {
        Vary::Names(names)
    }
}

/// An answer's corrected initial age (RFC 9111 §4.2.3) when it arrived at `received` for a
/// request sent at `requested`: the larger of its apparent age (`received` minus its `Date`) and
/// its `Age` plus the response delay. An invalid `Age` or `Date` counts as none.
pub fn initial_age(headers: &HeaderMap, requested: SystemTime, received: SystemTime) -> Duration {
    let apparent = match date(headers, &header::DATE) {
        Some(Ok(date)) => received.duration_since(date).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let delay = received.duration_since(requested).unwrap_or_default();
    apparent.max(Duration::from_secs(age_value(headers).unwrap_or(0)) + delay)
}

/// The upstream's `Age` in seconds: the first member of its first field line, as the HTTP
/// working group's cache tests read a malformed list (`Age: 7200, 0` is 7200 seconds old; RFC
/// 9111 §5.1 allows one value only). `None` when that member is not delta-seconds.
fn age_value(headers: &HeaderMap) -> Option<u64> {
    let first = headers.get(header::AGE)?.to_str().ok()?;
    delta_seconds(first.split(',').next())
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

/// Whether an answer may be stored, and with which windows, or why not: [`storable`], then
/// [`stored_windows`]. When this cache's own rules keep it out (a status, the fetching caller's
/// `no-store`), the upstream's word that it is for no other caller still wins, so the answer is
/// not handed to the key's waiters: `private` or `Vary: *` on any status, and on a `200` also
/// `no-store` and `no-cache` (a caller's `no-store` must not make such an answer shareable).
pub fn verdict(
    asks: Asks,
    status: StatusCode,
    windows: Windows,
    mode: OriginCacheControl,
    headers: &HeaderMap,
    received: SystemTime,
) -> Result<Windows, NotStored> {
    let upstream = stored_windows(windows, mode, headers, received);
    match storable(asks, status) {
        Ok(()) => upstream,
        Err(ours) => match upstream {
            Err(theirs @ (NotStored::Private | NotStored::VaryAll)) => Err(theirs),
            Err(theirs) if status == StatusCode::OK && !theirs.shareable() => Err(theirs),
            _ => Err(ours),
        },
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
    fn an_answer_for_no_other_caller_is_never_shareable_whatever_kept_it_out_first() {
        let now = SystemTime::UNIX_EPOCH + secs(1_000_000);
        let with = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            headers
        };
        let honor = OriginCacheControl::Honor;
        let v = |asks, status: u16, headers: &HeaderMap| {
            let status = StatusCode::from_u16(status).unwrap();
            verdict(asks, status, WINDOWS, honor, headers, now)
        };
        let private = with("cache-control", "private");
        let star = with("vary", "*");
        let no_store = with("cache-control", "no-store");
        assert_eq!(v(Asks::Anything, 404, &private), Err(NotStored::Private));
        assert_eq!(v(Asks::Anything, 503, &star), Err(NotStored::VaryAll));
        assert_eq!(v(Asks::NoStore, 200, &private), Err(NotStored::Private));
        assert_eq!(v(Asks::NoStore, 200, &no_store), Err(NotStored::NoStore));
        // An error that says only no-store is still handed to the waiters: one upstream call.
        assert_eq!(v(Asks::Anything, 503, &no_store), Err(NotStored::Status));
        assert_eq!(
            v(Asks::NoStore, 200, &HeaderMap::new()),
            Err(NotStored::RequestNoStore)
        );
        assert_eq!(v(Asks::Anything, 200, &HeaderMap::new()), Ok(WINDOWS));
        // A route that ignores the upstream's Cache-Control still honours Vary: *.
        let ignore = OriginCacheControl::Ignore;
        let status = StatusCode::NOT_FOUND;
        assert_eq!(
            verdict(Asks::Anything, status, WINDOWS, ignore, &private, now),
            Err(NotStored::Status)
        );
        assert_eq!(
            verdict(Asks::Anything, status, WINDOWS, ignore, &star, now),
            Err(NotStored::VaryAll)
        );
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

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const NOW: u64 = 1_800_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + secs(s)
    }

    fn http_date(s: u64) -> String {
        httpdate::fmt_http_date(at(s))
    }

    fn windows_for(pairs: &[(&str, &str)]) -> Result<Windows, NotStored> {
        stored_windows(WINDOWS, OriginCacheControl::Honor, &headers(pairs), at(NOW))
    }

    #[test]
    fn directives_are_read_case_blind_with_quoted_commas_and_first_wins() {
        let d = Directives::of(&headers(&[
            (
                "cache-control",
                "Max-Age=60, no-cache=\"set-cookie, x-a\", max-age=5",
            ),
            ("cache-control", "S-MAXAGE=\"30\", Proxy-Revalidate"),
        ]));
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(30));
        assert!(d.no_cache && d.must_revalidate && !d.no_store && !d.private);
        let bad = Directives::of(&headers(&[("cache-control", "max-age=-1, s-maxage=x")]));
        assert_eq!(
            (bad.max_age, bad.s_maxage),
            (Some(0), Some(0)),
            "invalid is stale"
        );
        let huge = Directives::of(&headers(&[(
            "cache-control",
            "max-age=99999999999999999999",
        )]));
        assert_eq!(huge.max_age, Some(MAX_DELTA));
        let swr = Directives::of(&headers(&[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=600",
        )]));
        assert_eq!(
            (swr.stale_while_revalidate, swr.stale_if_error),
            (Some(30), Some(600))
        );
    }

    #[test]
    fn the_upstreams_freshness_overrides_the_routes_and_s_maxage_wins() {
        // Nothing said: the route's windows.
        assert_eq!(windows_for(&[]), Ok(WINDOWS));
        assert_eq!(
            windows_for(&[("cache-control", "public")]),
            Ok(WINDOWS),
            "no freshness in it"
        );
        let max_age = windows_for(&[("cache-control", "max-age=30")]).unwrap();
        assert_eq!(max_age.ttl, secs(30));
        assert_eq!(
            max_age.stale_while_revalidate,
            Duration::ZERO,
            "not the route's"
        );
        assert_eq!(max_age.stale_if_error, WINDOWS.stale_if_error);
        assert_eq!(
            windows_for(&[("cache-control", "max-age=30, s-maxage=90")])
                .unwrap()
                .ttl,
            secs(90)
        );
        assert_eq!(
            windows_for(&[("cache-control", "max-age=0")]).unwrap().ttl,
            Duration::ZERO
        );
        // max-age over Expires.
        assert_eq!(
            windows_for(&[
                ("cache-control", "max-age=30"),
                ("expires", &http_date(NOW + 600)),
            ])
            .unwrap()
            .ttl,
            secs(30)
        );
        let swr = windows_for(&[(
            "cache-control",
            "max-age=10, stale-while-revalidate=20, stale-if-error=40",
        )])
        .unwrap();
        assert_eq!(
            swr,
            Windows {
                ttl: secs(10),
                stale_while_revalidate: secs(20),
                stale_if_error: secs(40)
            }
        );
    }

    #[test]
    fn expires_counts_from_date_and_an_invalid_one_is_in_the_past() {
        let expires = |pairs: &[(&str, &str)]| windows_for(pairs).unwrap().ttl;
        assert_eq!(
            expires(&[
                ("date", &http_date(NOW - 100)),
                ("expires", &http_date(NOW + 100))
            ]),
            secs(200)
        );
        // No Date: counted from when it arrived.
        assert_eq!(expires(&[("expires", &http_date(NOW + 100))]), secs(100));
        assert_eq!(
            expires(&[("expires", &http_date(NOW - 100))]),
            Duration::ZERO
        );
        assert_eq!(expires(&[("expires", "0")]), Duration::ZERO);
        assert_eq!(expires(&[("expires", "yesterday")]), Duration::ZERO);
    }

    #[test]
    fn no_store_no_cache_private_and_vary_star_are_not_stored() {
        for (value, why) in [
            ("no-store", NotStored::NoStore),
            ("max-age=60, No-Store", NotStored::NoStore),
            ("no-cache", NotStored::NoCache),
            ("no-cache=\"set-cookie\", max-age=60", NotStored::NoCache),
            ("private", NotStored::Private),
            ("private=\"x-user\", s-maxage=60", NotStored::Private),
        ] {
            assert_eq!(
                windows_for(&[("cache-control", value)]),
                Err(why),
                "{value}"
            );
            assert!(!why.shareable(), "{value}: not for the waiters either");
        }
        assert_eq!(windows_for(&[("vary", "*")]), Err(NotStored::VaryAll));
        assert_eq!(
            windows_for(&[("vary", "accept"), ("vary", "x-user, *")]),
            Err(NotStored::VaryAll)
        );
        assert!(NotStored::Status.shareable() && NotStored::RequestNoStore.shareable());
    }

    #[test]
    fn must_revalidate_proxy_revalidate_and_s_maxage_forbid_stale() {
        for value in [
            "must-revalidate",
            "proxy-revalidate",
            "max-age=60, must-revalidate",
            "s-maxage=60",
        ] {
            let w = windows_for(&[("cache-control", value)]).unwrap();
            assert_eq!(
                (w.stale_while_revalidate, w.stale_if_error),
                (Duration::ZERO, Duration::ZERO),
                "{value}"
            );
        }
        // The route's TTL still applies when only must-revalidate is said.
        assert_eq!(
            windows_for(&[("cache-control", "must-revalidate")])
                .unwrap()
                .ttl,
            WINDOWS.ttl
        );
    }

    #[test]
    fn a_route_that_ignores_the_upstream_keeps_its_windows_but_not_vary_star() {
        let ignore = |pairs: &[(&str, &str)]| {
            stored_windows(
                WINDOWS,
                OriginCacheControl::Ignore,
                &headers(pairs),
                at(NOW),
            )
        };
        for value in [
            "no-store",
            "private",
            "max-age=0",
            "s-maxage=5, must-revalidate",
        ] {
            assert_eq!(ignore(&[("cache-control", value)]), Ok(WINDOWS), "{value}");
        }
        assert_eq!(ignore(&[("expires", "0")]), Ok(WINDOWS));
        assert_eq!(ignore(&[("vary", "*")]), Err(NotStored::VaryAll));
    }

    #[test]
    fn vary_names_are_folded_sorted_and_deduplicated() {
        assert_eq!(vary(&headers(&[])), Vary::None);
        assert_eq!(vary(&headers(&[("vary", " , ")])), Vary::None);
        assert_eq!(
            vary(&headers(&[("vary", "X-User, accept"), ("vary", "x-user")])),
            Vary::Names(vec![header::ACCEPT, HeaderName::from_static("x-user")])
        );
        assert_eq!(vary(&headers(&[("vary", "a b")])), Vary::All, "not a name");
    }

    #[test]
    fn the_initial_age_is_the_larger_of_the_apparent_and_the_corrected_age() {
        let (sent, got) = (at(NOW - 2), at(NOW));
        let age = |pairs: &[(&str, &str)]| initial_age(&headers(pairs), sent, got);
        // No Date, no Age: the response delay.
        assert_eq!(age(&[]), secs(2));
        // Age plus the delay (the upstream's Age was counted before the delay).
        assert_eq!(age(&[("age", "30")]), secs(32));
        // Date 100 s back: the apparent age wins over a smaller Age.
        assert_eq!(
            age(&[("date", &http_date(NOW - 100)), ("age", "30")]),
            secs(100)
        );
        // A Date from the future, an invalid Age: none.
        assert_eq!(
            age(&[("date", &http_date(NOW + 100)), ("age", "x")]),
            secs(2)
        );
        assert_eq!(age(&[("age", "99999999999999999999")]), secs(MAX_DELTA + 2));
    }

    #[test]
    fn a_listed_age_counts_its_first_member_of_its_first_line() {
        let (sent, got) = (at(NOW), at(NOW));
        let age = |pairs: &[(&str, &str)]| initial_age(&headers(pairs), sent, got);
        assert_eq!(age(&[("age", "7200, 0")]), secs(7200));
        assert_eq!(age(&[("age", "0, 7200")]), secs(0));
        assert_eq!(age(&[("age", "7200"), ("age", "0")]), secs(7200));
        assert_eq!(age(&[("age", "0"), ("age", "7200")]), secs(0));
        assert_eq!(age(&[("age", "x, 7200")]), secs(0), "invalid first member");
    }
}
