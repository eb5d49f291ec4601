//! Where stored answers live: the [`Storage`] interface the cache layer talks to (get, put,
//! purge; pingora-cache's `storage.rs`, Envoy's `http_cache.h`), and [`MemoryStore`], the bounded
//! in-process tier on moka.
//!
//! An [`Entry`] carries everything needed to judge it, its wall-clock stored-at time and its
//! windows, so it means the same in another process (the fleet tier). A store may be remote: its
//! operations are futures that can fail or time out, and the cache layer takes a failed or late
//! `get` as a miss and a failed `put` as nothing stored, never as the caller's error. An in-memory
//! store answers at once ([`StoreFuture::Left`]), so a hit costs no allocation and no task switch.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::{self, BoxFuture, Either, Ready};
use tokio::time::Instant;

use super::key::Key;
use super::policy::{self, Windows};
use crate::body::{BoxError, Buffered};
use crate::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;

/// A stored answer and what it takes to judge it.
#[derive(Debug)]
pub struct Entry {
    /// The answer, without the headers of the exchange that fetched it.
    pub response: Buffered,
    /// When it was stored, by the wall clock (read through a [`Clock`]).
    pub stored_at: SystemTime,
    /// Its age when it was stored: RFC 9111 §4.2.3's corrected initial age ([`policy::initial_age`]).
    pub initial_age: Duration,
    /// The windows it was stored with: the upstream's freshness, else the route's.
    pub windows: Windows,
    /// The request headers beyond the key it varies on (RFC 9111 §4.1), sorted; empty: none.
    /// An entry with names is stored under its variant's key and, as the key's vary spec, under
    /// the key itself: a lookup that finds it there looks up its own variant next.
    pub vary: Arc<[http::HeaderName]>,
    /// The variant key it is stored under, when `vary` has names.
    pub variant: Option<Key>,
}

impl Entry {
    /// Its current age at `now`: the initial age plus the time resident (RFC 9111 §4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + policy::age(self.stored_at, now)
    }
}

/// A store operation that failed; the cache layer logs it and goes on as if nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No answer in time.
    #[error("the cache store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store refused or broke.
    #[error("the cache store failed: {0}")]
    Failed(#[source] BoxError),
}

/// What a store operation returns: ready at once (memory) or later (a remote store).
pub type StoreFuture<T> =
    Either<Ready<Result<T, StorageError>>, BoxFuture<'static, Result<T, StorageError>>>;

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Everything.
    All,
    /// Entries for exactly this path, any query (a write to it, RFC 9111 §4.4).
    Path(String),
    /// Entries whose path is this one or below it, by whole segments: `/v1/invoices` covers
    /// `/v1/invoices/summary`; `/v1/invoices/summary` does not cover `/v1/invoices/summaries`.
    Under(String),
}

impl Purge {
    /// Whether it removes an entry for `path`.
    pub fn covers(&self, path: &str) -> bool {
        match self {
            Purge::All => true,
            Purge::Path(exact) => path == exact,
            Purge::Under(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                path.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

/// What a store says to a caller about to fetch a key it missed (fleet-wide coalescing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This caller fetches: the store holds the key's fleet lock for it until its `put` (or
    /// [`Storage::unclaim`]).
    Owner,
    /// Another process is fetching: wait, re-reading the store, and claim again.
    Busy,
    /// Another process's fill landed since the caller's lookup: read the store again.
    Stored,
    /// No fleet to coordinate with now (no shared tier, or it does not answer): fetch alone.
    Alone,
}

/// How a wait on another process's fetch ended (counted by a shared store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The answer arrived in the store.
    Filled,
    /// The other process's claim lapsed and this caller took it over.
    TookOver,
    /// The caller's deadline passed first.
    TimedOut,
    /// The shared tier stopped answering: the caller fetched alone.
    Abandoned,
}

/// The cache's storage: one small interface, so a shared tier can sit behind it.
pub trait Storage: Send + Sync + 'static {
    /// The entry for `key`, usable or not (the cache layer judges it).
    fn get(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>>;
    /// Stores `entry` under `key`, replacing what was there.
    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<()>;
    /// Removes what `scope` covers; returns how many entries went.
    fn purge(&self, scope: Purge) -> StoreFuture<u64>;
    /// The entry for `key` in this process's own tier only (what its own writer just stored),
    /// with no remote work; a store of one tier has only that.
    fn get_local(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
        self.get(key)
    }
    /// Asks to be the one process that fetches `key` (a store shared by processes holds a lock
    /// for it); a store of one process has nobody to ask.
    fn claim(&self, _key: &Key) -> StoreFuture<Claim> {
        Either::Left(future::ready(Ok(Claim::Alone)))
    }
    /// Lets go of a claim whose fetch stored nothing under `key`.
    fn unclaim(&self, _key: &Key) {}
    /// Notes how a wait on another process's fetch ended.
    fn waited(&self, _outcome: Waited) {}
}

/// The wall clock, advanced by tokio's: the wall time when the clock was made plus tokio's
/// monotonic time since.
///
/// Why not `SystemTime::now()`: entries need a wall-clock time to mean anything to another
/// process, but tests drive freshness with tokio's paused clock, which `SystemTime` ignores.
/// Reading the wall clock once and adding tokio's elapsed time serves both, and makes ages immune
/// to the wall clock being stepped while the process runs; two processes still differ by their
/// clocks' offset, as any wall-clock scheme does, and [`policy::age`] treats a future
/// `stored_at` as age zero.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

impl Clock {
    /// Now, as a wall-clock time.
    pub fn now(&self) -> SystemTime {
        self.wall + self.mono.elapsed()
    }
}

/// Evicts an entry when its last window closes (moka's clock; freshness is judged from the
/// entry's own times).
struct EntryExpiry {
    clock: Clock,
}

impl EntryExpiry {
    fn left(&self, entry: &Entry) -> Duration {
        entry
            .windows
            .lifetime()
            .saturating_sub(entry.age(self.clock.now()))
    }
}

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Key,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.left(entry))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.left(entry))
    }
}

/// What one stored entry costs beyond its key's text and its answer's headers and body, measured
/// (RSS over 100,000 entries with no header and an empty body: 685 bytes, 40 of them the key's
/// text): moka's node, its hash-table slot, its order queues and timer-wheel node, the `Arc`s, the
/// [`Entry`] with its `HeaderMap`, and the key's `Arc<str>` header. The weigher adds it to every
/// entry, so `cache.max_bytes` bounds what the cache really holds, not only its payload.
pub const ENTRY_OVERHEAD: usize = 640;

/// The in-process store: a bounded moka map from [`Key`] to [`Entry`], weighed in bytes.
pub struct MemoryStore {
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    max_entry_bytes: usize,
    /// `pcgate_cache_entries` and `pcgate_cache_bytes`, registered by the store.
    gauges: (Gauge, Gauge),
}

impl MemoryStore {
    /// A store holding at most `max_bytes` (bodies, headers, keys and each entry's own overhead,
    /// [`ENTRY_OVERHEAD`]), for answers of at most `max_entry_bytes`.
    /// Registers its size gauges in `metrics`.
    pub fn new(max_bytes: u64, max_entry_bytes: u64, metrics: &Metrics) -> MemoryStore {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &Key, entry: &Arc<Entry>| {
                u32::try_from(ENTRY_OVERHEAD + key.len() + entry.response.weight())
                    .unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry {
                clock: Clock::default(),
            })
            .build();
        MemoryStore {
            entries,
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            gauges: {
                let (entries, bytes) = (Gauge::default(), Gauge::default());
                metrics.register(
                    "cache_bytes",
                    "Bytes held by the response cache",
                    bytes.clone(),
                );
                metrics.register(
                    "cache_entries",
                    "Entries in the response cache",
                    entries.clone(),
                );
                (entries, bytes)
            },
        }
    }

    /// The largest answer stored or shared (`cache.max_entry_bytes`).
    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// Applies pending evictions, brings the size gauges up to date and returns (entries,
    /// weighted bytes).
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        self.update_gauges();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    fn update_gauges(&self) {
        self.gauges.0.set(self.entries.entry_count() as i64);
        self.gauges.1.set(self.entries.weighted_size() as i64);
    }
}

impl Storage for MemoryStore {
    fn get(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
        Either::Left(future::ready(Ok(self.entries.get(key))))
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<()> {
        self.entries.insert(key, entry);
        self.update_gauges();
        Either::Left(future::ready(Ok(())))
    }

    fn purge(&self, scope: Purge) -> StoreFuture<u64> {
        self.entries.run_pending_tasks();
        let mut purged = 0;
        for (key, _) in self.entries.iter() {
            if scope.covers(key.path()) {
                self.entries.invalidate(&*key);
                purged += 1;
            }
        }
        self.entries.run_pending_tasks();
        self.update_gauges();
        Either::Left(future::ready(Ok(purged)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_covers_whole_segments() {
        let under = |p: &str| Purge::Under(p.to_owned());
        assert!(Purge::All.covers("/v1/invoices/summary"));
        assert!(under("/v1/invoices").covers("/v1/invoices/summary"));
        assert!(under("/v1/invoices/").covers("/v1/invoices/summary"));
        assert!(under("/v1/invoices/summary").covers("/v1/invoices/summary"));
        assert!(!under("/v1/invoices/summary").covers("/v1/invoices/summaries"));
        assert!(!under("/v1/invoices/summary").covers("/v1/invoices"));
        let path = Purge::Path("/v1/invoices/summary".to_owned());
        assert!(path.covers("/v1/invoices/summary"));
        assert!(!path.covers("/v1/invoices/summary/x"));
        assert!(!path.covers("/v1/invoices"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_moves_with_tokios() {
        let clock = Clock::default();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        let after = clock.now();
        assert!(after.duration_since(before).unwrap() >= Duration::from_secs(90));
        assert!(after.duration_since(before).unwrap() < Duration::from_secs(91));
    }

    #[tokio::test]
    async fn the_memory_store_answers_at_once() {
        let store = MemoryStore::new(1 << 20, 1 << 16, &Metrics::new());
        let key = {
            let request = http::Request::get("/v1/invoices/summary")
                .body(crate::body::empty())
                .unwrap();
            Key::of(&request, &[])
        };
        let entry = Arc::new(Entry {
            response: Buffered {
                status: http::StatusCode::OK,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::from_static(b"answer"),
            },
            stored_at: SystemTime::now(),
            initial_age: Duration::ZERO,
            vary: Arc::from([]),
            variant: None,
            windows: Windows {
                ttl: Duration::from_secs(60),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
        });
        let Either::Left(put) = store.put(key.clone(), entry) else {
            panic!("a memory put is ready at once");
        };
        put.into_inner().unwrap();
        let Either::Left(got) = store.get(&key) else {
            panic!("a memory get is ready at once");
        };
        assert_eq!(got.into_inner().unwrap().unwrap().response.body, "answer");
        assert_eq!(store.usage().0, 1);
        let Either::Left(purged) = store.purge(Purge::All) else {
            panic!("a memory purge is ready at once");
        };
        assert_eq!(purged.into_inner().unwrap(), 1);
        assert_eq!(store.usage().0, 0);
    }
}
