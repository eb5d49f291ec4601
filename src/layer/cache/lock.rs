//! The miss lock: one writer per key (pingora-cache's `lock.rs`). The first caller to miss gets a
//! [`WritePermit`] and fetches; callers that miss on the same key meanwhile get a [`ReadLock`] and
//! wait, against their own deadline, for the writer's [`LockStatus`]; then they re-read the store.
//!
//! The writer stores before it releases, so a caller arriving after the release finds the answer
//! in the store; one arriving between its own lookup and the release takes the lock and finds the
//! answer when it looks again ([`super`] re-reads the store under a fresh permit). A permit dropped
//! without a word (its task panicked or was cancelled) releases as [`LockStatus::Dangling`], so no
//! waiter waits on a writer that is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::key::Key;
use crate::body::{BoxError, Buffered};
use crate::deadline::{Deadline, DeadlineExceeded};

/// The shared fetch failed; the writer and every waiter get this. It reads as the error itself
/// and names it as its `source()`, so classifying by the cause chain sees the original error.
#[derive(Debug, Clone)]
pub struct SharedError(pub Arc<BoxError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

/// What the writer's fetch came to, as its waiters see it.
#[derive(Debug, Clone)]
pub enum LockStatus {
    /// Still fetching.
    Waiting,
    /// Fetched and stored: read it from the store.
    Done,
    /// Fetched but not stored (not a `200`, the caller's `no-store`, or the store failed): this
    /// copy is every waiter's, so a failing upstream still sees one call.
    Unstored(Arc<Buffered>),
    /// Too large to store or share: each waiter fetches for itself.
    GaveUp,
    /// The fetch failed: every waiter gets this error.
    Failed(SharedError),
    /// The writer's deadline passed before the answer was in: waiters try again, within theirs.
    TimedOut,
    /// The writer went away without releasing (a panic, a cancelled task): waiters try again.
    Dangling,
}

impl LockStatus {
    /// The status name, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            LockStatus::Waiting => "waiting",
            LockStatus::Done => "done",
            LockStatus::Unstored(_) => "unstored",
            LockStatus::GaveUp => "gave_up",
            LockStatus::Failed(_) => "failed",
            LockStatus::TimedOut => "timed_out",
            LockStatus::Dangling => "dangling",
        }
    }
}

/// The keys being fetched, each with the channel its writer will announce the outcome on.
#[derive(Default)]
pub struct Locks {
    table: Mutex<HashMap<Key, watch::Receiver<LockStatus>>>,
}

/// What [`Locks::lock`] gives a caller.
pub enum Locked {
    /// Nobody is fetching: this caller does, and must release.
    Write(WritePermit),
    /// Somebody is: wait for them.
    Read(ReadLock),
}

impl Locks {
    /// The writer's permit for `key`, or a place among its waiters.
    pub fn lock(self: &Arc<Self>, key: &Key) -> Locked {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = table.get(key) {
            return Locked::Read(ReadLock {
                status: status.clone(),
            });
        }
        Locked::Write(self.insert(&mut table, key))
    }

    /// The writer's permit for `key` if nobody holds it (a background refresh, which never waits).
    pub fn try_write(self: &Arc<Self>, key: &Key) -> Option<WritePermit> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.contains_key(key) {
            return None;
        }
        Some(self.insert(&mut table, key))
    }

    fn insert(
        self: &Arc<Self>,
        table: &mut HashMap<Key, watch::Receiver<LockStatus>>,
        key: &Key,
    ) -> WritePermit {
        let (sender, receiver) = watch::channel(LockStatus::Waiting);
        table.insert(key.clone(), receiver);
        WritePermit {
            locks: self.clone(),
            key: key.clone(),
            sender: Some(sender),
        }
    }

    /// How many keys are locked (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

/// The right to fetch a key; released with the fetch's outcome, or as `Dangling` when dropped.
pub struct WritePermit {
    locks: Arc<Locks>,
    key: Key,
    sender: Option<watch::Sender<LockStatus>>,
}

impl WritePermit {
    /// Lets go of the key and tells every waiter how the fetch went. Store first: a caller that
    /// comes after this must find the answer in the store.
    pub fn release(mut self, status: LockStatus) {
        self.announce(status);
    }

    fn announce(&mut self, status: LockStatus) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        self.locks
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        // Waiters that subscribed before the removal see this; later callers do not need to.
        sender.send_replace(status);
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        self.announce(LockStatus::Dangling);
    }
}

/// A waiter's place on a key being fetched.
pub struct ReadLock {
    status: watch::Receiver<LockStatus>,
}

impl ReadLock {
    /// The writer's outcome, or the waiter's own deadline, whichever comes first.
    pub async fn wait(mut self, deadline: &Deadline) -> Result<LockStatus, DeadlineExceeded> {
        let status = &mut self.status;
        deadline
            .run(async move {
                match status.wait_for(|s| !matches!(s, LockStatus::Waiting)).await {
                    Ok(status) => status.clone(),
                    // The sender always announces before it goes; should it not, it is gone.
                    Err(_) => LockStatus::Dangling,
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(path: &str) -> Key {
        let request = http::Request::get(path).body(crate::body::empty()).unwrap();
        Key::of(&request, &[])
    }

    fn writer(locks: &Arc<Locks>, key: &Key) -> WritePermit {
        match locks.lock(key) {
            Locked::Write(permit) => permit,
            Locked::Read(_) => panic!("expected to be the writer"),
        }
    }

    fn reader(locks: &Arc<Locks>, key: &Key) -> ReadLock {
        match locks.lock(key) {
            Locked::Read(read) => read,
            Locked::Write(_) => panic!("expected to wait"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_writer_many_waiters_and_the_key_is_free_after_release() {
        let locks = Arc::new(Locks::default());
        let key = key("/v1/invoices/summary");
        let permit = writer(&locks, &key);
        assert!(locks.try_write(&key).is_none(), "one writer per key");
        let other = writer(&locks, &self::key("/v1/invoices/summaries"));
        let deadline = Deadline::after(Duration::from_secs(60));
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let read = reader(&locks, &key);
                tokio::spawn(async move { read.wait(&deadline).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        permit.release(LockStatus::Done);
        for waiter in waiters {
            assert!(matches!(waiter.await.unwrap(), Ok(LockStatus::Done)));
        }
        // A caller after the release is a writer again (and re-reads the store first).
        assert_eq!(locks.len(), 1);
        drop(writer(&locks, &key));
        drop(other);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_reaches_every_waiter_with_its_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("upstream unreachable")]
        struct Unreachable;
        let locks = Arc::new(Locks::default());
        let key = key("/v1/invoices/summary");
        let permit = writer(&locks, &key);
        let deadline = Deadline::after(Duration::from_secs(60));
        let waiters: Vec<_> = (0..3).map(|_| reader(&locks, &key)).collect();
        permit.release(LockStatus::Failed(SharedError(Arc::new(Box::new(
            Unreachable,
        )))));
        for waiter in waiters {
            let LockStatus::Failed(error) = waiter.wait(&deadline).await.unwrap() else {
                panic!("expected the failure");
            };
            assert!(crate::error::find_cause::<Unreachable>(&error).is_some());
            assert_eq!(error.to_string(), "upstream unreachable");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_at_their_own_deadline() {
        let locks = Arc::new(Locks::default());
        let key = key("/v1/invoices/summary");
        let _stalled = writer(&locks, &key);
        let started = tokio::time::Instant::now();
        let early = Deadline::after(Duration::from_secs(5));
        let late = Deadline::after(Duration::from_secs(8));
        let (a, b) = tokio::join!(reader(&locks, &key).wait(&early), async {
            let result = reader(&locks, &key).wait(&late).await;
            (result, started.elapsed())
        });
        assert!(a.is_err());
        assert!(b.0.is_err());
        assert_eq!(b.1, Duration::from_secs(8));
        assert_eq!(started.elapsed(), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_goes_away_releases_as_dangling() {
        let locks = Arc::new(Locks::default());
        let key = key("/v1/invoices/summary");
        let permit = writer(&locks, &key);
        let read = reader(&locks, &key);
        let task = tokio::spawn(async move {
            let _permit = permit;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        let status = read
            .wait(&Deadline::after(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(
            matches!(status, LockStatus::Dangling),
            "{}",
            status.as_str()
        );
        assert_eq!(locks.len(), 0);
    }
}
