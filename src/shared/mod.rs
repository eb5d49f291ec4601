//! The fleet tier's connection to Redis (DESIGN.md §6): one [`Shared`] handle per process, cheap
//! to clone, that every fleet-wide part (the second cache tier, fleet purge and coalescing, the
//! fleet throttle and shared refresh tokens) talks through.
//!
//! Redis is never on the failure path:
//! - every operation is bounded by `shared.timeout`; past it, or on any error, the caller gets
//!   [`Unavailable`] and goes on as if Redis were not configured (a miss, a local lock);
//! - a [`breaker::Breaker`] stops asking Redis after repeated failures, then probes once;
//! - the connection is redis-rs's `ConnectionManager`, made lazily (a Redis down at start is no
//!   start-up error) and reconnecting by itself; its own connect and response timeouts are set,
//!   so a frozen Redis (SIGSTOP) holds no task past them either;
//! - pub/sub runs on a connection of its own, in a task that resubscribes by itself
//!   ([`Shared::subscribe`]).
//!
//! Keys are `pcgate:{namespace}:{kind}:{rest}` ([`Shared::key`]), so tenants sharing one Redis
//! never see each other's entries.

pub mod breaker;
pub mod limit;
pub mod tokens;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::FromRedisValue;

use crate::config::SharedConfig;
use crate::metrics::Metrics;
use breaker::Breaker;

/// What an operation was, for `pcgate_shared_errors_total{op}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Reading a cache entry.
    Get,
    /// Writing a cache entry.
    Put,
    /// A fleet purge (generation bump and message).
    Purge,
    /// Taking a lock.
    Lock,
    /// Releasing a lock.
    Unlock,
    /// Any other Lua script (the fleet throttle, token sharing).
    Script,
    /// Publishing a message.
    Publish,
    /// The pub/sub connection.
    Subscribe,
}

impl Op {
    /// Every op, for the metric's zeros.
    pub const ALL: [Op; 8] = [
        Op::Get,
        Op::Put,
        Op::Purge,
        Op::Lock,
        Op::Unlock,
        Op::Script,
        Op::Publish,
        Op::Subscribe,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Purge => "purge",
            Op::Lock => "lock",
            Op::Unlock => "unlock",
            Op::Script => "script",
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
        }
    }
}

/// Why Redis gave no answer; every caller treats it as "no fleet tier this time".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The breaker is open: Redis was not asked.
    #[error("the shared tier is paused after repeated failures (breaker open)")]
    Skipped,
    /// No answer within `shared.timeout`.
    #[error("Redis did not answer within shared.timeout ({0:?})")]
    TimedOut(Duration),
    /// Redis refused or broke (the redis-rs error's kind; never a key or value).
    #[error("Redis failed: {0}")]
    Failed(String),
}

/// The result of an L2 lookup, for `pcgate_shared_lookups_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A usable record.
    Hit,
    /// None (or one of another generation, or an unknown record version).
    Miss,
    /// Redis failed or timed out.
    Error,
    /// The breaker was open: Redis was not asked.
    Skipped,
}

impl Lookup {
    /// Every result, for the metric's zeros.
    pub const ALL: [Lookup; 4] = [Lookup::Hit, Lookup::Miss, Lookup::Error, Lookup::Skipped];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Error => "error",
            Lookup::Skipped => "skipped",
        }
    }

    /// The lookup result a failed operation counts as.
    pub fn of(unavailable: &Unavailable) -> Lookup {
        match unavailable {
            Unavailable::Skipped => Lookup::Skipped,
            _ => Lookup::Error,
        }
    }
}

/// How a wait on another sidecar's fetch ended, for `pcgate_shared_lock_waits_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// The owner's answer arrived in L2.
    Filled,
    /// The owner's lock expired and this sidecar took it over.
    TookOver,
    /// The caller's deadline passed first.
    TimedOut,
    /// Redis stopped answering: this sidecar fetched on its own.
    Abandoned,
}

impl LockWait {
    /// Every outcome, for the metric's zeros.
    pub const ALL: [LockWait; 4] = [
        LockWait::Filled,
        LockWait::TookOver,
        LockWait::TimedOut,
        LockWait::Abandoned,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LockWait::Filled => "filled",
            LockWait::TookOver => "took_over",
            LockWait::TimedOut => "timed_out",
            LockWait::Abandoned => "abandoned",
        }
    }
}

/// `{op}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// [`Op::as_str`].
    pub op: &'static str,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// [`Lookup::as_str`].
    pub result: &'static str,
}

/// `{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// [`LockWait::as_str`].
    pub outcome: &'static str,
}

/// The shared tier's metric families (registered by [`Shared::connect`], every label at zero).
#[derive(Clone, Default)]
pub struct SharedMetrics {
    /// `pcgate_shared_lookups_total{result}`.
    pub lookups: Family<ResultLabel, Counter>,
    /// `pcgate_shared_errors_total{op}`: failed or timed-out Redis operations.
    pub errors: Family<OpLabel, Counter>,
    /// `pcgate_shared_breaker_state`: 0 closed, 1 half-open (probing), 2 open.
    pub breaker: Gauge,
    /// `pcgate_shared_lock_waits_total{outcome}`: waits on another sidecar's fetch.
    pub lock_waits: Family<OutcomeLabel, Counter>,
}

impl SharedMetrics {
    /// Registers the families in `metrics`, every label value at zero.
    pub fn register(metrics: &Metrics) -> SharedMetrics {
        let m = SharedMetrics::default();
        for result in Lookup::ALL {
            let _ = m.lookups.get_or_create(&ResultLabel {
                result: result.as_str(),
            });
        }
        for op in Op::ALL {
            let _ = m.errors.get_or_create(&OpLabel { op: op.as_str() });
        }
        for outcome in LockWait::ALL {
            let _ = m.lock_waits.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            });
        }
        metrics.register(
            "shared_lookups",
            "Second-tier (Redis) cache lookups after a first-tier miss, by result",
            m.lookups.clone(),
        );
        metrics.register(
            "shared_errors",
            "Redis operations that failed or timed out, by operation",
            m.errors.clone(),
        );
        metrics.register(
            "shared_breaker_state",
            "The shared tier's circuit breaker: 0 closed, 1 half-open, 2 open (Redis not asked)",
            m.breaker.clone(),
        );
        metrics.register(
            "shared_lock_waits",
            "Waits on another sidecar's fetch of the same key, by outcome",
            m.lock_waits.clone(),
        );
        m
    }

    /// Counts one L2 lookup.
    pub fn lookup(&self, result: Lookup) {
        self.lookups
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    /// Counts one wait on another sidecar's fetch.
    pub fn lock_wait(&self, outcome: LockWait) {
        self.lock_waits
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

/// Why the shared tier could not be set up (only a config the checks missed: Redis itself being
/// down is not an error at start).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The URL or the TLS roots were refused by the client.
    #[error("shared.redis_url {url}: {reason}")]
    Client {
        /// The URL, password redacted.
        url: String,
        /// What the client said.
        reason: String,
    },
}

/// A lock held in Redis: its key and the owner token only its taker knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lock's Redis key.
    pub key: String,
    /// This owner's token (random; not a secret, only unguessable by other sidecars).
    pub token: String,
}

/// What a subscription's handler is told.
#[derive(Debug)]
pub enum Notice<'a> {
    /// Subscribed; `first` is false after a reconnect (messages may have been missed meanwhile).
    Subscribed {
        /// The first subscription since start.
        first: bool,
    },
    /// A message's payload.
    Message(&'a [u8]),
}

/// A running subscription; dropping it stops the task.
pub struct Subscription(tokio::task::JoinHandle<()>);

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Compare-and-delete: the lock goes only if this owner still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The fleet tier's handle: clone it freely.
#[derive(Clone)]
pub struct Shared(Arc<Inner>);

struct Inner {
    manager: ConnectionManager,
    client: redis::Client,
    namespace: Arc<str>,
    timeout: Duration,
    breaker: Breaker,
    metrics: SharedMetrics,
    release: redis::Script,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("namespace", &self.0.namespace)
            .field("timeout", &self.0.timeout)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The handle for `[shared]`, connecting lazily (in the background, on first use), with
    /// `ca_file` (`upstream.ca_file`) as the trust roots of a `rediss://` URL when it is set
    /// (else the webpki roots). Registers the `pcgate_shared_*` families. Must run inside tokio.
    pub fn connect(
        config: &SharedConfig,
        ca_file: Option<&Path>,
        metrics: &Metrics,
    ) -> Result<Shared, SetupError> {
        let fail = |reason: String| SetupError::Client {
            url: config.redis_url.to_string(),
            reason,
        };
        let client = match ca_file.filter(|_| config.redis_url.is_tls()) {
            Some(ca) => {
                let root_cert = std::fs::read(ca)
                    .map_err(|e| fail(format!("upstream.ca_file {}: {e}", ca.display())))?;
                redis::Client::build_with_tls(
                    config.redis_url.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
            None => redis::Client::open(config.redis_url.expose()),
        }
        // redis-rs errors on a URL describe its shape, never echo it; still, keep only the kind.
        .map_err(|e| fail(format!("{:?}", e.kind())))?;
        let manager_config = ConnectionManagerConfig::new()
            // A frozen Redis must not hold a task past these: the manager's own timeouts, under
            // the per-operation bound every caller also applies.
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(connect_timeout(config.timeout)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| fail(format!("{:?}", e.kind())))?;
        let metrics = SharedMetrics::register(metrics);
        Ok(Shared(Arc::new(Inner {
            manager,
            client,
            namespace: config.namespace.as_str().into(),
            timeout: config.timeout,
            breaker: Breaker::new(metrics.breaker.clone()),
            metrics,
            release: redis::Script::new(RELEASE),
        })))
    }

    /// `shared.namespace`.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// `shared.timeout`: the bound on every operation.
    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    /// The tier's metric families.
    pub fn metrics(&self) -> &SharedMetrics {
        &self.0.metrics
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> breaker::BreakerState {
        self.0.breaker.state()
    }

    /// Whether Redis answered the last operation: a caller that already paid one timeout on
    /// this call can skip the next operation when it did not, so a call pays at most one.
    pub fn answering(&self) -> bool {
        self.0.breaker.answering()
    }

    /// `pcgate:{namespace}:{kind}:{rest}`.
    pub fn key(&self, kind: &str, rest: &str) -> String {
        format!("pcgate:{}:{kind}:{rest}", self.0.namespace)
    }

    /// Runs `work` on the connection, through the breaker and within `shared.timeout`.
    async fn bounded<T, F, Fut>(&self, op: Op, work: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // Held across the await: if this future is dropped mid-flight and it was the probe,
        // the permit's drop records a failure, so the breaker does not wait on it forever.
        let Some(permit) = self.0.breaker.permit() else {
            return Err(Unavailable::Skipped);
        };
        let outcome = tokio::time::timeout(self.0.timeout, work(self.0.manager.clone())).await;
        let failed = match outcome {
            Ok(Ok(value)) => {
                permit.success();
                return Ok(value);
            }
            Ok(Err(error)) if error.is_timeout() => {
                permit.failure();
                Unavailable::TimedOut(self.0.timeout)
            }
            Ok(Err(error)) => {
                // A server-side error (a wrong type, a script error) means Redis is up; so does
                // a reply this client could not read as the type asked for (a corrupted key):
                // one bad key must not turn the tier off.
                if matches!(
                    error.kind(),
                    redis::ErrorKind::Server(_)
                        | redis::ErrorKind::UnexpectedReturnType
                        | redis::ErrorKind::Parse
                ) {
                    permit.success();
                } else {
                    permit.failure();
                }
                Unavailable::Failed(format!("{:?}", error.kind()))
            }
            Err(_) => {
                permit.failure();
                Unavailable::TimedOut(self.0.timeout)
            }
        };
        self.0
            .metrics
            .errors
            .get_or_create(&OpLabel { op: op.as_str() })
            .inc();
        tracing::debug!(op = op.as_str(), error = %failed, "shared tier operation failed");
        Err(failed)
    }

    /// One command, bounded.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: Op,
        cmd: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.bounded(
            op,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// One Lua script (`EVALSHA`, loading it on first use), bounded the same way.
    pub async fn script<T: FromRedisValue>(
        &self,
        op: Op,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        self.bounded(op, |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// Takes the lock at `key` for `hold` (`SET NX PX` with a fresh owner token): `None` when
    /// another owner holds it.
    pub async fn try_lock(&self, key: &str, hold: Duration) -> Result<Option<Lease>, Unavailable> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let millis = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(&token).arg("NX").arg("PX").arg(millis);
        let set: Option<String> = self.query(Op::Lock, &cmd).await?;
        Ok(set.map(|_| Lease {
            key: key.to_owned(),
            token,
        }))
    }

    /// Releases `lease` if this owner still holds it (compare-and-delete); true if it did.
    pub async fn release(&self, lease: &Lease) -> Result<bool, Unavailable> {
        let mut invocation = self.0.release.key(&lease.key);
        invocation.arg(&lease.token);
        let deleted: i64 = self.script(Op::Unlock, &invocation).await?;
        Ok(deleted == 1)
    }

    /// Publishes `payload` on the namespace's channel `kind`.
    pub async fn publish(&self, kind: &str, payload: &[u8]) -> Result<(), Unavailable> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.key("channel", kind)).arg(payload);
        let _receivers: i64 = self.query(Op::Publish, &cmd).await?;
        Ok(())
    }

    /// Subscribes to the namespace's channel `kind` on a connection of its own, in a task that
    /// reconnects by itself (backing off to 2 s) until the returned [`Subscription`] is dropped.
    pub fn subscribe<F>(&self, kind: &str, handler: F) -> Subscription
    where
        F: Fn(Notice<'_>) + Send + Sync + 'static,
    {
        let client = self.0.client.clone();
        let channel = self.key("channel", kind);
        let connect = connect_timeout(self.0.timeout);
        let errors = self.0.metrics.errors.clone();
        Subscription(tokio::spawn(async move {
            let mut first = true;
            let mut backoff = Duration::from_millis(50);
            loop {
                let subscribed = tokio::time::timeout(connect, async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
                match subscribed {
                    Ok(Ok(mut pubsub)) => {
                        handler(Notice::Subscribed { first });
                        first = false;
                        backoff = Duration::from_millis(50);
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            handler(Notice::Message(message.get_payload_bytes()));
                        }
                        tracing::info!(channel, "shared tier subscription lost: reconnecting");
                    }
                    _ => {
                        errors
                            .get_or_create(&OpLabel {
                                op: Op::Subscribe.as_str(),
                            })
                            .inc();
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }))
    }
}

/// How long a (re)connect may take: longer than one operation (a TLS handshake to a managed
/// Redis takes a few round trips), short enough that a dead address is given up quickly. Callers
/// never wait for it: their operation's own bound is `shared.timeout`.
fn connect_timeout(timeout: Duration) -> Duration {
    Duration::from_secs(1) + timeout
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisUrl;

    /// A handle whose lazy connection is never made: the operations below never touch it.
    fn handle() -> Shared {
        let config = SharedConfig {
            redis_url: RedisUrl::parse("redis://127.0.0.1:1").unwrap(),
            namespace: "unit".into(),
            timeout: Duration::from_millis(50),
            key_file: None,
        };
        Shared::connect(&config, None, &Metrics::new()).unwrap()
    }

    fn fail(shared: &Shared, kind: redis::ErrorKind) -> impl std::future::Future + '_ {
        shared.bounded(Op::Get, move |_| async move {
            Err::<(), _>(redis::RedisError::from((kind, "unit")))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_mid_flight_does_not_turn_the_tier_off_for_good() {
        let shared = handle();
        for _ in 0..breaker::FAILURES_TO_OPEN {
            fail(&shared, redis::ErrorKind::Io).await;
        }
        assert_eq!(shared.breaker_state(), breaker::BreakerState::Open);
        tokio::time::advance(breaker::COOL_OFF).await;
        // The probe goes and hangs; its caller hangs up before shared.timeout.
        let probe = shared.bounded(Op::Get, |_| {
            std::future::pending::<redis::RedisResult<()>>()
        });
        let cut = tokio::time::timeout(Duration::from_millis(10), probe).await;
        assert!(cut.is_err(), "the probe was still out when dropped");
        tokio::time::advance(breaker::COOL_OFF).await;
        let answered = shared
            .bounded(Op::Get, |_| async { Ok::<_, redis::RedisError>(7) })
            .await;
        assert_eq!(answered, Ok(7), "a later probe goes and closes the breaker");
        assert_eq!(shared.breaker_state(), breaker::BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_of_an_unexpected_type_means_redis_is_up() {
        let shared = handle();
        for _ in 0..breaker::FAILURES_TO_OPEN * 2 {
            fail(&shared, redis::ErrorKind::UnexpectedReturnType).await;
            fail(&shared, redis::ErrorKind::Parse).await;
        }
        assert_eq!(shared.breaker_state(), breaker::BreakerState::Closed);
        assert!(shared.answering());
    }
}
