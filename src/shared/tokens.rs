//! Refresh tokens shared across sidecars (issue 16 item 5): the sidecars of a namespace that hold
//! the same App+User credential refresh it one at a time, under a Redis lock, and hand the
//! rotated refresh token on through Redis, so rotation never races (Entra ID and the sandbox
//! rotate strictly: a refresh token used once is dead).
//!
//! - The record, `pcgate:{ns}:token:{credential}`, is a hash of `gen` (a generation counted up at
//!   each rotation) and `blob`: the refresh token sealed with ChaCha20-Poly1305 (ring) under the
//!   key in `shared.key_file`, a random nonce per seal, and the namespace, credential and
//!   generation as associated data, so a blob cannot be moved to another key or generation.
//!   Only the refresh token is stored: access tokens, App+User and app-only alike, never are.
//! - A write is a compare-and-swap on the generation (a Lua script): a sidecar whose lock
//!   expired while another rotated cannot put an older token back.
//! - Redis away means the old behaviour: the sidecar refreshes on its own, with the token it
//!   holds, and `refresh_token_file` stays the fallback at every restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};

use super::{Lease, Op, Shared, Unavailable};
use crate::metrics::Metrics;

/// Bytes in the key.
pub const KEY_LEN: usize = 32;
/// How long a refresh may hold the lock: a token request's own limit and some slack. An owner
/// that dies frees it after this.
pub const LOCK_HOLD: Duration = Duration::from_secs(40);
/// How long a sidecar waits for another's refresh before refreshing without the lock (the
/// generation check still keeps the record from going back): [`lock_wait`] of [`LOCK_HOLD`].
pub const LOCK_WAIT: Duration = lock_wait(LOCK_HOLD);

/// The wait for a lock held for `hold`: longer than the hold, so when its owner dies the waiters
/// outlast its lock and one of them takes it when it expires, rather than every waiter giving up
/// first and all refreshing at once without it (the race the lock is there to prevent).
pub const fn lock_wait(hold: Duration) -> Duration {
    hold.saturating_add(Duration::from_secs(5))
}
/// Between tries for a held lock.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// The record's expiry, renewed at each rotation: an unused chain is gone after this (Entra ID's
/// refresh tokens last 90 days).
const RECORD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// KEYS: the record. ARGV: expected generation, new generation, blob, ttl ms. Returns -1 when
/// written, else the generation found. No record at all (a Redis restarted without persistence,
/// or one that evicted it) takes any writer's: there is nothing newer to roll back, and a
/// compare against 0 would refuse every sidecar that holds a generation, for good.
const STORE: &str = r"
local found = redis.call('HGET', KEYS[1], 'gen')
if found then
  local gen = tonumber(found) or 0
  if gen ~= tonumber(ARGV[1]) then
    return gen
  end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'blob', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return -1
";

/// Why `shared.key_file` cannot be used (never shows its content).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("shared.key_file {} is not readable ({source})", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file holds something else than a 32-byte key.
    #[error(
        "shared.key_file {} must hold a 32-byte key as 64 hex digits or base64 (make one with \
         `openssl rand -hex 32`); every sidecar of the namespace needs the same",
        .0.display()
    )]
    Malformed(PathBuf),
}

/// The key that seals shared refresh tokens. Its bytes never appear in `Debug`.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([redacted])")
    }
}

impl SealKey {
    /// Reads `shared.key_file`: 64 hex digits or base64 of 32 bytes, surrounding space ignored.
    pub fn read(path: &Path) -> Result<SealKey, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        SealKey::parse(text.trim()).ok_or_else(|| KeyFileError::Malformed(path.to_owned()))
    }

    /// From the key file's text.
    fn parse(text: &str) -> Option<SealKey> {
        let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..KEY_LEN)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()?
        };
        let bytes: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(SealKey::from_bytes(&bytes))
    }

    /// From the key's bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> SealKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte ChaCha20 key");
        SealKey(LessSafeKey::new(key))
    }

    /// `token` sealed: base64 of nonce, ciphertext and tag.
    fn seal(&self, aad: &str, token: &SecretString) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut sealed = token.expose_secret().as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut sealed,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Some(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// The token in `blob`, if this key sealed it with this `aad`.
    fn open(&self, aad: &str, blob: &str) -> Option<SecretString> {
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let mut sealed = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).ok()?;
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut sealed)
            .ok()?;
        let token = std::str::from_utf8(plain).ok()?.to_owned();
        Some(SecretString::from(token))
    }
}

/// How one shared refresh went, for `pcgate_shared_token_refreshes_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareOutcome {
    /// The rotated refresh token was stored for the fleet.
    Stored,
    /// A newer refresh token from another sidecar was taken up before refreshing.
    Adopted,
    /// Another sidecar rotated meanwhile (this one lost or never got the lock): not stored.
    Conflict,
    /// Redis did not answer: this sidecar refreshed on its own.
    Unavailable,
    /// The record could not be opened (another key, or tampered with): ignored.
    Unreadable,
}

impl ShareOutcome {
    /// Every outcome, for the metric's zeros.
    pub const ALL: [ShareOutcome; 5] = [
        ShareOutcome::Stored,
        ShareOutcome::Adopted,
        ShareOutcome::Conflict,
        ShareOutcome::Unavailable,
        ShareOutcome::Unreadable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareOutcome::Stored => "stored",
            ShareOutcome::Adopted => "adopted",
            ShareOutcome::Conflict => "conflict",
            ShareOutcome::Unavailable => "unavailable",
            ShareOutcome::Unreadable => "unreadable",
        }
    }
}

/// `{credential, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShareLabels {
    credential: String,
    outcome: &'static str,
}

/// `pcgate_shared_token_refreshes_total{credential,outcome}`, registered once.
#[derive(Clone)]
pub struct ShareMetrics(Family<ShareLabels, Counter>);

impl ShareMetrics {
    /// Registers the family in `metrics`.
    pub fn register(metrics: &Metrics) -> ShareMetrics {
        let outcomes = Family::<ShareLabels, Counter>::default();
        metrics.register(
            "shared_token_refreshes",
            "App+User refreshes coordinated through the shared tier, by outcome",
            outcomes.clone(),
        );
        ShareMetrics(outcomes)
    }

    /// Exports every outcome of credential `name` at zero.
    pub fn prime(&self, name: &str) {
        for outcome in ShareOutcome::ALL {
            let _ = self.0.get_or_create(&ShareLabels {
                credential: name.to_owned(),
                outcome: outcome.as_str(),
            });
        }
    }
}

/// Hands out one [`SharedRefreshToken`] per credential.
pub struct TokenShares {
    shared: Shared,
    key: Arc<SealKey>,
    outcomes: ShareMetrics,
    /// How long a refresh holds the lock ([`LOCK_HOLD`]).
    hold: Duration,
}

impl TokenShares {
    /// Shares refresh tokens through `shared`, sealed with `key`, counted in `metrics`.
    pub fn new(shared: Shared, key: SealKey, metrics: ShareMetrics) -> TokenShares {
        TokenShares {
            shared,
            key: Arc::new(key),
            outcomes: metrics,
            hold: LOCK_HOLD,
        }
    }

    /// The same, with refreshes holding the lock for `hold` rather than [`LOCK_HOLD`] (and
    /// waiters waiting [`lock_wait`] of it): for a token endpoint known to answer well within it,
    /// and for tests that let a dead owner's lock expire.
    pub fn with_lock_hold(mut self, hold: Duration) -> TokenShares {
        self.hold = hold;
        self
    }

    /// The shared record of credential `name` (its series exported at zero).
    pub fn for_credential(&self, name: &str) -> SharedRefreshToken {
        self.outcomes.prime(name);
        SharedRefreshToken {
            hold: self.hold,
            record_key: self.shared.key("token", name),
            lock_key: self.shared.key("lock", &format!("token:{name}")),
            aad_prefix: format!(
                "pcgate refresh token v1\0{}\0{name}\0",
                self.shared.namespace()
            ),
            credential: name.to_owned(),
            shared: self.shared.clone(),
            key: self.key.clone(),
            outcomes: self.outcomes.0.clone(),
            generation: AtomicU64::new(0),
            store: redis::Script::new(STORE),
        }
    }
}

/// What a store came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Written as this generation.
    Written(u64),
    /// Another sidecar's generation was found; nothing written.
    Conflict(u64),
}

/// One credential's refresh token in Redis.
pub struct SharedRefreshToken {
    shared: Shared,
    /// How long a refresh holds the lock; waiters wait [`lock_wait`] of it.
    hold: Duration,
    key: Arc<SealKey>,
    credential: String,
    record_key: String,
    lock_key: String,
    aad_prefix: String,
    outcomes: Family<ShareLabels, Counter>,
    /// The generation of the token this sidecar holds (0: none from the fleet yet).
    generation: AtomicU64,
    store: redis::Script,
}

impl std::fmt::Debug for SharedRefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRefreshToken")
            .field("credential", &self.credential)
            .field("generation", &self.generation.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl SharedRefreshToken {
    /// Counts one outcome.
    pub fn count(&self, outcome: ShareOutcome) {
        self.outcomes
            .get_or_create(&ShareLabels {
                credential: self.credential.clone(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// The generation this sidecar holds.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn aad(&self, generation: u64) -> String {
        format!("{}{generation}", self.aad_prefix)
    }

    /// Takes the credential's refresh lock, waiting up to [`LOCK_WAIT`] (past any lock's own
    /// expiry) for another sidecar's refresh; `None` when Redis does not answer or the wait runs
    /// out (the caller refreshes anyway: the generation check guards the record).
    pub async fn lock(&self) -> Option<Lease> {
        let started = tokio::time::Instant::now();
        let wait = lock_wait(self.hold);
        loop {
            match self.shared.try_lock(&self.lock_key, self.hold).await {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) if started.elapsed() < wait => tokio::time::sleep(LOCK_POLL).await,
                Ok(None) => {
                    tracing::warn!(
                        credential = %self.credential,
                        "another sidecar held the refresh lock too long: refreshing without it"
                    );
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Releases the lock if this sidecar still holds it.
    pub async fn release(&self, lease: &Lease) {
        let _ = self.shared.release(lease).await;
    }

    /// The fleet's newest refresh token and its generation, if the record holds one this key
    /// opens; `Err` when Redis does not answer.
    pub async fn read(&self) -> Result<Option<(u64, SecretString)>, Unavailable> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&self.record_key).arg("gen").arg("blob");
        let (generation, blob): (Option<u64>, Option<String>) =
            self.shared.query(Op::Get, &cmd).await?;
        let (Some(generation), Some(blob)) = (generation, blob) else {
            return Ok(None);
        };
        match self.key.open(&self.aad(generation), &blob) {
            Some(token) => Ok(Some((generation, token))),
            None => {
                self.count(ShareOutcome::Unreadable);
                tracing::warn!(
                    credential = %self.credential,
                    generation,
                    "the shared refresh token cannot be opened with shared.key_file (another key?): ignored"
                );
                Ok(None)
            }
        }
    }

    /// Takes up `generation` as the one this sidecar holds.
    pub fn adopt(&self, generation: u64) {
        self.generation.store(generation, Ordering::SeqCst);
        self.count(ShareOutcome::Adopted);
    }

    /// Stores `token` as the generation after the one this sidecar holds, if the record still
    /// holds that one (compare-and-swap).
    pub async fn store(&self, token: &SecretString) -> Result<Stored, Unavailable> {
        let expected = self.generation();
        let next = expected + 1;
        let blob = self
            .key
            .seal(&self.aad(next), token)
            .ok_or_else(|| Unavailable::Failed("sealing failed".into()))?;
        let mut invocation = self.store.key(&self.record_key);
        invocation
            .arg(expected)
            .arg(next)
            .arg(blob)
            .arg(RECORD_TTL.as_millis() as u64);
        let found: i64 = self.shared.script(Op::Script, &invocation).await?;
        if found < 0 {
            self.generation.store(next, Ordering::SeqCst);
            self.count(ShareOutcome::Stored);
            Ok(Stored::Written(next))
        } else {
            self.count(ShareOutcome::Conflict);
            Ok(Stored::Conflict(found as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_with_its_key_and_its_associated_data() {
        let key = SealKey::from_bytes(&[7; KEY_LEN]);
        let token = SecretString::from("refresh-token-value".to_owned());
        let blob = key.seal("ns\0user\x001", &token).unwrap();
        assert!(!blob.contains("refresh-token-value"));
        let again = key.seal("ns\0user\x001", &token).unwrap();
        assert_ne!(blob, again, "a fresh nonce per seal");
        assert_eq!(
            key.open("ns\0user\x001", &blob).unwrap().expose_secret(),
            "refresh-token-value"
        );
        assert!(
            key.open("ns\0user\x002", &blob).is_none(),
            "another generation"
        );
        assert!(
            key.open("ns\0app\x001", &blob).is_none(),
            "another credential"
        );
        let other = SealKey::from_bytes(&[8; KEY_LEN]);
        assert!(other.open("ns\0user\x001", &blob).is_none(), "another key");
        let mut tampered = base64::engine::general_purpose::STANDARD
            .decode(&blob)
            .unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let tampered = base64::engine::general_purpose::STANDARD.encode(tampered);
        assert!(key.open("ns\0user\x001", &tampered).is_none(), "tampered");
        assert!(key.open("ns\0user\x001", "not base64!").is_none());
        assert!(key.open("ns\0user\x001", "").is_none());
    }

    #[test]
    fn the_key_file_holds_hex_or_base64_of_32_bytes_and_is_never_shown() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        assert!(SealKey::parse(hex).is_some());
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; KEY_LEN]);
        assert!(SealKey::parse(&b64).is_some());
        for bad in [
            "",
            "abc",
            &hex[..62],
            &base64::engine::general_purpose::STANDARD.encode([9u8; 16]),
        ] {
            assert!(SealKey::parse(bad).is_none(), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("pcgate-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "not-a-key-but-secret\n").unwrap();
        let error = SealKey::read(&path).unwrap_err().to_string();
        assert!(error.contains("openssl rand -hex 32"), "{error}");
        assert!(!error.contains("not-a-key-but-secret"), "{error}");
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        let key = SealKey::read(&path).unwrap();
        assert_eq!(format!("{key:?}"), "SealKey([redacted])");
        let missing = SealKey::read(&dir.join("missing")).unwrap_err().to_string();
        assert!(missing.contains("not readable"), "{missing}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
