//! The two-tier store (DESIGN.md §6): [`MemoryStore`] first, Redis second, behind the same
//! [`Storage`] interface, so the cache layer does not know which answered.
//!
//! - `get`: a fresh L1 entry answers at once, with no Redis work; otherwise one script reads
//!   the namespace's generation and the key's record, within `shared.timeout` (a miss past it),
//!   sending the record only if its length (`STRLEN`) is within `cache.max_entry_bytes` plus a
//!   record head's cap, so a hostile or stray value is never transferred nor decoded. A record
//!   of the current generation is copied into L1; one of an older generation (purged), of an
//!   unknown [`record`] version (a newer pod), malformed or too large is a miss.
//! - `put`: into L1 at once; the L2 write goes to a background writer (off the caller's path,
//!   in order, so a variant lands before the vary spec that points at it), as a Lua script that
//!   writes only if the generation is still the one this process last saw, with Redis's `PX`
//!   set to what is left of the entry's longest window. Answers over `cache.max_entry_bytes` are
//!   never written (nor read back).
//! - `purge`: L1 here, then `INCR` of the namespace's generation (every L2 record of an older
//!   one is a miss from then on) and a message on the namespace's `purge` channel that makes
//!   every sidecar drop the same scope from its L1. A prefix purge drops the prefix from every
//!   L1 and bumps the generation like a full one: L2 keys are digests, so "everything" is the
//!   one scope L2 can drop at once, and refetching the rest once is the price of being correct.
//!   A sidecar that lost its subscription drops its whole L1 when it resubscribes, since it may
//!   have missed a purge.
//! - `claim`: a Redis lock per key (`SET NX PX` with an owner token, held for
//!   `upstream.deadline`, the longest a fetch with its retries and throttle waits runs, in one script that first checks whether the key's record landed
//!   since the caller's lookup: a fresh one answers, a stale or purged one is no fill and the
//!   lock is taken), released by compare-and-delete after the L2 write; when its
//!   owner dies, the lock expires and the one waiter whose `SET NX` wins takes over.
//!
//! A fill that was in flight when a purge ran may still land in L1 (as without the fleet
//! tier), never in L2: it is written under the generation its claim saw (the one its fetch
//! began in), and the write script drops it once a purge has moved Redis's on. A sidecar
//! that started while Redis was down hears no purge until its first subscription: what it
//! cached before then lives out its TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{self, Either};
use tokio::sync::mpsc;

use super::key::Key;
use super::policy::{self, Freshness};
use super::record::{self, Decoded};
use super::store::{
    Claim, Clock, Entry, MemoryStore, Purge, Storage, StorageError, StoreFuture, Waited,
};
use crate::shared::{Lease, LockWait, Lookup, Notice, Op, Shared, Subscription};

/// L2 writes waiting for the writer; past this many, a write is dropped (the entry is in L1).
const WRITE_QUEUE: usize = 1024;

/// Writes the record only if the namespace's generation is still the writer's.
const PUT: &str = r"
local current = redis.call('GET', KEYS[1]) or '0'
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

/// The generation, the record (only if at most ARGV[1] bytes long) and the record's length.
const GET: &str = r"
local size = redis.call('STRLEN', KEYS[2])
local record = false
if size <= tonumber(ARGV[1]) then
  record = redis.call('GET', KEYS[2])
end
return {redis.call('GET', KEYS[1]), record, size}
";

/// Takes the key's lock, unless its record is already there (a fill that landed between the
/// caller's lookup and now): 2 stored, 1 taken, 0 held by another owner.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 2
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
";

/// What the background writer does.
enum Write {
    /// Write the record under the generation the fetch began in, then release the key's lease
    /// if the fetch held one.
    Put(Key, Arc<Entry>, u64, Option<Lease>),
    /// Release a lease whose fetch stored nothing.
    Release(Lease),
}

/// L1 (moka) in front of L2 (Redis); see the module docs.
pub struct TieredStore {
    inner: Arc<Inner>,
    writes: mpsc::Sender<Write>,
    _purges: Subscription,
}

struct Inner {
    memory: Arc<MemoryStore>,
    shared: Shared,
    /// The namespace's generation, as this process last saw it.
    generation: AtomicU64,
    max_entry_bytes: usize,
    /// How long a fetch's fleet lock is held before it expires on its own.
    hold: Duration,
    /// Fleet locks held by this process's fetches, by the key they fetch, with the generation
    /// seen when the lock was taken (the fill is written under that one, or not at all).
    leases: Mutex<HashMap<Key, (Lease, u64)>>,
    put: redis::Script,
    get: redis::Script,
    claim: redis::Script,
    clock: Clock,
    generation_key: String,
}

impl TieredStore {
    /// `memory` in front of `shared`, for answers of at most `max_entry_bytes`, fleet locks held
    /// for `hold` (`upstream.deadline`). Starts its writer and its purge subscription
    /// (stopped when the store is dropped). Must run inside tokio.
    pub fn new(
        memory: Arc<MemoryStore>,
        shared: Shared,
        max_entry_bytes: usize,
        hold: Duration,
    ) -> TieredStore {
        let inner = Arc::new(Inner {
            memory,
            generation_key: shared.key("meta", "generation"),
            shared,
            generation: AtomicU64::new(0),
            max_entry_bytes,
            hold,
            leases: Mutex::default(),
            put: redis::Script::new(PUT),
            get: redis::Script::new(GET),
            claim: redis::Script::new(CLAIM),
            clock: Clock::default(),
        });
        let (writes, mut queue) = mpsc::channel(WRITE_QUEUE);
        let writer = inner.clone();
        tokio::spawn(async move {
            while let Some(write) = queue.recv().await {
                match write {
                    Write::Put(key, entry, generation, lease) => {
                        writer.write(&key, &entry, generation).await;
                        if let Some(lease) = lease {
                            let _ = writer.shared.release(&lease).await;
                        }
                    }
                    Write::Release(lease) => {
                        let _ = writer.shared.release(&lease).await;
                    }
                }
            }
        });
        let listener = inner.clone();
        let purges = inner
            .shared
            .subscribe("purge", move |notice| listener.heard(notice));
        TieredStore {
            inner,
            writes,
            _purges: purges,
        }
    }

    /// The first tier.
    pub fn memory(&self) -> &Arc<MemoryStore> {
        &self.inner.memory
    }

    fn send(&self, write: Write) {
        if let Err(error) = self.writes.try_send(write) {
            tracing::info!("shared tier write queue full: an entry stays in L1 only");
            // The key's fleet lock still goes now: its waiters must not stall until it expires.
            if let Write::Put(_, _, _, Some(lease)) | Write::Release(lease) = error.into_inner() {
                let shared = self.inner.shared.clone();
                tokio::spawn(async move {
                    let _ = shared.release(&lease).await;
                });
            }
            self.inner
                .shared
                .metrics()
                .errors
                .get_or_create(&crate::shared::OpLabel {
                    op: Op::Put.as_str(),
                })
                .inc();
        }
    }
}

/// What a memory store's operation gave (it answers at once; anything else is nothing).
fn at_once<T>(done: StoreFuture<T>) -> Option<T> {
    match done {
        Either::Left(ready) => ready.into_inner().ok(),
        Either::Right(_) => None,
    }
}

/// The Redis key part for a cache key: its SHA-256, so no header value is a Redis key's text.
fn digest(key: &Key) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(key.as_str().as_bytes()))
}

/// A purge message: `1 <generation> <all|path|under> <path>`, one field a line.
fn purge_message(generation: u64, scope: &Purge) -> String {
    let (kind, path) = match scope {
        Purge::All => ("all", ""),
        Purge::Path(path) => ("path", path.as_str()),
        Purge::Under(path) => ("under", path.as_str()),
    };
    format!("1\n{generation}\n{kind}\n{path}")
}

fn parse_purge(payload: &[u8]) -> Option<(u64, Purge)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut lines = text.splitn(4, '\n');
    if lines.next()? != "1" {
        return None;
    }
    let generation = lines.next()?.parse().ok()?;
    let kind = lines.next()?;
    let path = lines.next().unwrap_or("").to_owned();
    let scope = match kind {
        "all" => Purge::All,
        "path" => Purge::Path(path),
        "under" => Purge::Under(path),
        _ => return None,
    };
    Some((generation, scope))
}

impl Inner {
    fn entry_key(&self, key: &Key) -> String {
        self.shared.key("entry", &digest(key))
    }

    /// The L2 record for `key`, copied into L1 when it is usable.
    async fn lookup(&self, key: &Key) -> Option<Arc<Entry>> {
        let metrics = self.shared.metrics();
        let mut invocation = self.get.key(&self.generation_key);
        invocation
            .key(self.entry_key(key))
            .arg(self.max_entry_bytes + record::MAX_RECORD_OVERHEAD);
        let (generation, record, size): (Option<u64>, Option<Vec<u8>>, u64) =
            match self.shared.script(Op::Get, &invocation).await {
                Ok(found) => found,
                Err(unavailable) => {
                    metrics.lookup(Lookup::of(&unavailable));
                    return None;
                }
            };
        let current = generation.unwrap_or(0);
        // Redis's own value, even if lower than the one held: a Redis restarted without
        // persistence starts again from 0, and a fill must then be written under 0. (A reply
        // older than a purge heard meanwhile only makes a later write under it a refused one.)
        self.generation.store(current, Ordering::Release);
        if record.is_none() && size > 0 {
            tracing::info!(
                size,
                "a shared record larger than any this build writes: a miss"
            );
        }
        let found = match record.map(|bytes| record::decode(key, &bytes)) {
            Some(Ok(Decoded::Entry(written, entry)))
                if written == current && entry.response.weight() <= self.max_entry_bytes =>
            {
                Some(entry)
            }
            Some(Ok(Decoded::UnknownVersion(version))) => {
                tracing::debug!(version, "a shared record of a newer version: a miss");
                None
            }
            Some(Err(error)) => {
                tracing::info!(%error, "a shared record could not be read: a miss");
                None
            }
            _ => None,
        };
        let Some(entry) = found else {
            metrics.lookup(Lookup::Miss);
            return None;
        };
        metrics.lookup(Lookup::Hit);
        let entry: Arc<Entry> = Arc::from(entry);
        at_once(self.memory.put(key.clone(), entry.clone()));
        Some(entry)
    }

    /// Writes `entry`'s record under `generation`, the one its fetch began in: a purge since
    /// then has moved Redis's on, and the script then writes nothing.
    async fn write(&self, key: &Key, entry: &Entry, generation: u64) {
        let Some(expiry) = record::expiry(entry, self.clock.now()) else {
            return;
        };
        let bytes = record::encode(key, entry, generation);
        let mut invocation = self.put.key(&self.generation_key);
        invocation
            .key(self.entry_key(key))
            .arg(generation)
            .arg(bytes)
            .arg(u64::try_from(expiry.as_millis()).unwrap_or(u64::MAX).max(1));
        if let Ok(0) = self.shared.script::<i64>(Op::Put, &invocation).await {
            tracing::debug!("a purge ran since this fill began: not written to the shared tier");
        }
    }

    /// A purge message or a (re)subscription.
    fn heard(&self, notice: Notice<'_>) {
        match notice {
            Notice::Subscribed { first: true } => {}
            // A purge may have gone by while the subscription was down.
            Notice::Subscribed { first: false } => {
                at_once(self.memory.purge(Purge::All));
            }
            Notice::Message(payload) => match parse_purge(payload) {
                Some((generation, scope)) => {
                    self.generation.fetch_max(generation, Ordering::AcqRel);
                    at_once(self.memory.purge(scope));
                }
                None => tracing::info!("an unreadable purge message: ignored"),
            },
        }
    }
}

impl Storage for TieredStore {
    fn get(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
        let first = at_once(self.inner.memory.get(key)).flatten();
        // A fresh L1 entry answers with no Redis work at all.
        if let Some(entry) = &first {
            let age = entry.age(self.inner.clock.now());
            if matches!(
                policy::freshness(&entry.windows, age),
                Freshness::Fresh { .. }
            ) {
                return Either::Left(future::ready(Ok(first)));
            }
        }
        let inner = self.inner.clone();
        let key = key.clone();
        Either::Right(Box::pin(async move {
            let second = inner.lookup(&key).await;
            // Another sidecar may have refreshed what this one holds stale.
            Ok(match (first, second) {
                (Some(first), Some(second)) if first.stored_at > second.stored_at => {
                    at_once(inner.memory.put(key, first.clone()));
                    Some(first)
                }
                (first, None) => first,
                (_, second) => second,
            })
        }))
    }

    fn get_local(&self, key: &Key) -> StoreFuture<Option<Arc<Entry>>> {
        self.inner.memory.get(key)
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> StoreFuture<()> {
        at_once(self.inner.memory.put(key.clone(), entry.clone()));
        let claimed = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        // A fill without a lease (its claim found Redis away) goes under the latest generation.
        let (lease, generation) = match claimed {
            Some((lease, generation)) => (Some(lease), generation),
            None => (None, self.inner.generation.load(Ordering::Acquire)),
        };
        if entry.response.weight() <= self.inner.max_entry_bytes {
            self.send(Write::Put(key, entry, generation, lease));
        } else if let Some(lease) = lease {
            self.send(Write::Release(lease));
        }
        Either::Left(future::ready(Ok(())))
    }

    fn purge(&self, scope: Purge) -> StoreFuture<u64> {
        let local = at_once(self.inner.memory.purge(scope.clone())).unwrap_or(0);
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            let fail = |e: crate::shared::Unavailable| StorageError::Failed(Box::new(e));
            let mut incr = redis::cmd("INCR");
            incr.arg(&inner.generation_key);
            let generation: u64 = inner.shared.query(Op::Purge, &incr).await.map_err(fail)?;
            inner.generation.fetch_max(generation, Ordering::AcqRel);
            inner
                .shared
                .publish("purge", purge_message(generation, &scope).as_bytes())
                .await
                .map_err(fail)?;
            Ok(local)
        }))
    }

    fn claim(&self, key: &Key) -> StoreFuture<Claim> {
        let inner = self.inner.clone();
        let key = key.clone();
        // The lookup just before this failed: this call has paid its one `shared.timeout`.
        if !self.inner.shared.answering() {
            return Either::Left(future::ready(Ok(Claim::Alone)));
        }
        Either::Right(Box::pin(async move {
            // The generation this fetch begins in (the caller's lookup just read it).
            let generation = inner.generation.load(Ordering::Acquire);
            let lock = inner.shared.key("lock", &digest(&key));
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut invocation = inner.claim.key(&lock);
            invocation.key(inner.entry_key(&key)).arg(&token).arg(
                u64::try_from(inner.hold.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
            let claimed = match inner.shared.script::<i64>(Op::Lock, &invocation).await {
                // A record is there: a fill since this caller's lookup answers it. One of an
                // older generation, or a stale one (the usual state after each TTL: records live
                // until their longest window), is no fill: then the lock is taken as usual, so
                // the fleet's refetch is still one upstream call.
                Ok(2) => {
                    let now = inner.clock.now();
                    let fresh = inner.lookup(&key).await.is_some_and(|entry| {
                        matches!(
                            policy::freshness(&entry.windows, entry.age(now)),
                            Freshness::Fresh { .. }
                        )
                    });
                    if fresh {
                        return Ok(Claim::Stored);
                    }
                    inner
                        .shared
                        .try_lock(&lock, inner.hold)
                        .await
                        .map(|lease| lease.map(|l| l.token))
                }
                Ok(1) => Ok(Some(token)),
                Ok(_) => Ok(None),
                Err(unavailable) => Err(unavailable),
            };
            Ok(match claimed {
                Ok(Some(token)) => {
                    inner
                        .leases
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, (Lease { key: lock, token }, generation));
                    Claim::Owner
                }
                Ok(None) => Claim::Busy,
                Err(_) => Claim::Alone,
            })
        }))
    }

    fn unclaim(&self, key: &Key) {
        let lease = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some((lease, _)) = lease {
            self.send(Write::Release(lease));
        }
    }

    fn waited(&self, outcome: Waited) {
        self.inner.shared.metrics().lock_wait(match outcome {
            Waited::Filled => LockWait::Filled,
            Waited::TookOver => LockWait::TookOver,
            Waited::TimedOut => LockWait::TimedOut,
            Waited::Abandoned => LockWait::Abandoned,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_messages_read_back_as_their_scope() {
        for scope in [
            Purge::All,
            Purge::Path("/v1/invoices/summary".into()),
            Purge::Under("/v1/invoices".into()),
        ] {
            let message = purge_message(42, &scope);
            assert_eq!(parse_purge(message.as_bytes()), Some((42, scope)));
        }
        assert_eq!(
            parse_purge(b"2\n1\nall\n"),
            None,
            "an unknown message version"
        );
        assert_eq!(parse_purge(b"1\nx\nall\n"), None);
        assert_eq!(parse_purge(b"1\n1\nsome\n/"), None);
    }
}
