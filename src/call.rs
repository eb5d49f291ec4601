//! What the layers learn about one call and tell the access log: a [`CallInfo`] in the request's
//! extensions, put there by `observe` and filled in by the layers inside it. A neutral module, so
//! no layer imports another's internals to report.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

pub use crate::route::NO_ROUTE;

/// What the inner layers learned about one call.
#[derive(Debug, Default)]
pub struct CallInfo {
    route: OnceLock<Arc<str>>,
    cache: OnceLock<&'static str>,
    attempts: AtomicU32,
    at_once: AtomicBool,
}

impl CallInfo {
    /// The call matched this route (set by `access`).
    pub fn set_route(&self, name: &Arc<str>) {
        let _ = self.route.set(name.clone());
    }

    /// What the cache did: `hit`, `miss`, `stale`, `bypass` (set by `cache`).
    pub fn set_cache(&self, result: &'static str) {
        let _ = self.cache.set(result);
    }

    /// The call was answered inside its `call`, from memory (a fresh cache hit): its future is
    /// ready and runs nothing, so `tracking` opens no span for it (set by `cache`).
    pub fn set_answered_at_once(&self) {
        self.at_once.store(true, Ordering::Relaxed);
    }

    /// Whether the call was answered inside its `call` (see [`set_answered_at_once`](Self::set_answered_at_once)).
    pub fn answered_at_once(&self) -> bool {
        self.at_once.load(Ordering::Relaxed)
    }

    /// One more upstream attempt (counted by the upstream client).
    pub fn add_attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The route's name, [`NO_ROUTE`] before (or without) a match.
    pub fn route(&self) -> Arc<str> {
        self.route
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::from(NO_ROUTE))
    }

    /// The route's name once `access` matched one.
    pub fn matched_route(&self) -> Option<&str> {
        self.route.get().map(|name| &**name)
    }

    /// What the cache did, `none` on routes without one.
    pub fn cache(&self) -> &'static str {
        self.cache.get().copied().unwrap_or("none")
    }

    /// Upstream attempts made (0 when answered from the cache).
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }
}

/// The caller's `Cache-Control` values: `access` takes them out of the request (they are not
/// forwarded upstream) and leaves them here for the cache to honour.
#[derive(Debug, Clone)]
pub struct RequestCacheControl(pub Vec<http::HeaderValue>);

/// The request headers as the caller sent them, kept aside by `access` on routes that share answers: a stored
/// answer's `Vary` may name one `access` did not forward (RFC 9111 §4.1 matches the request the
/// cache was given), so it picks the variant though it never reaches the upstream. A header that
/// was forwarded is read from the request itself.
#[derive(Debug, Clone, Default)]
pub struct UnforwardedHeaders(pub http::HeaderMap);

/// Set by the connection on a request whose head carried both `Content-Length` and
/// `Transfer-Encoding`: `access` refuses it (400) before its other checks, so the refusal is
/// tracked, counted and logged like every other, and the connection then closes.
#[derive(Debug, Clone, Copy)]
pub struct FramedTwice;

/// Set by the cache on a call whose shared-tier operation just failed (refused, timed out,
/// breaker open): the layers below ask Redis nothing more on this call, so a call pays
/// `shared.timeout` at most once (DESIGN.md section 6).
#[derive(Debug, Clone, Copy)]
pub struct SharedUnanswered;
