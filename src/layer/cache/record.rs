//! An [`Entry`] as a versioned record, for the shared tier: what another process needs to judge
//! it the same way (its wall-clock stored-at time, initial age and windows, so freshness, `Age`
//! and stale-if-error mean the same on every pod) and the generation it was written under.
//!
//! Layout of version 1: one version byte, the generation (u64, big-endian), the length of a JSON
//! head (u32, big-endian), the head, then the body's bytes as they are. A record of a version this
//! build does not know (a newer pod wrote it) is [`Decoded::UnknownVersion`]: a miss, never an
//! error; a malformed one is a [`RecordError`], also a miss to the cache. Records are written by
//! any process that can reach the Redis, so nothing in one is trusted: a head over
//! [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] headers is refused before anything is
//! built from it (the `http` crate's header map panics past its own size limit).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::key::Key;
use super::policy::Windows;
use super::store::Entry;
use crate::body::Buffered;

/// The record version this build writes.
pub const VERSION: u8 = 1;

/// The bytes before the head: version, generation, head length.
const PREFIX: usize = 1 + 8 + 4;

/// The most headers a record may carry: far more than any Partner Center answer has.
pub const MAX_HEADERS: usize = 1_000;

/// The longest head a record may carry (its key, windows and base64 headers).
pub const MAX_HEAD_BYTES: usize = 256 * 1024;

/// The most a record may hold beyond its body: its prefix and the longest head.
pub const MAX_RECORD_OVERHEAD: usize = PREFIX + MAX_HEAD_BYTES;

/// The head: everything but the body, by short names (it is written for every fill).
#[derive(Serialize, Deserialize)]
struct Head {
    /// The cache key's text: a digest collision (or a stray key) is a miss, not a wrong answer.
    k: String,
    /// Stored at, Unix milliseconds.
    s: u64,
    /// Initial age, milliseconds.
    a: u64,
    /// TTL, stale-while-revalidate, stale-if-error, milliseconds.
    w: [u64; 3],
    /// Status code.
    c: u16,
    /// Headers, each `[name, base64 value]` (a value may hold any byte but control characters).
    h: Vec<[String; 2]>,
    /// The request headers it varies on beyond the key.
    v: Vec<String>,
    /// The variant key it is stored under, if it varies.
    x: Option<String>,
}

/// A record that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("a shared cache record is malformed: {0}")]
pub struct RecordError(&'static str);

/// What a record holds.
#[derive(Debug)]
pub enum Decoded {
    /// An entry, written under this generation.
    Entry(u64, Box<Entry>),
    /// Written by a newer pcgate: not for this build.
    UnknownVersion(u8),
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `entry` under `key`, written under `generation`.
pub fn encode(key: &Key, entry: &Entry, generation: u64) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let head = Head {
        k: key.as_str().to_owned(),
        s: millis(
            entry
                .stored_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        ),
        a: millis(entry.initial_age),
        w: [
            millis(entry.windows.ttl),
            millis(entry.windows.stale_while_revalidate),
            millis(entry.windows.stale_if_error),
        ],
        c: entry.response.status.as_u16(),
        h: entry
            .response
            .headers
            .iter()
            .map(|(n, v)| [n.as_str().to_owned(), b64.encode(v.as_bytes())])
            .collect(),
        v: entry.vary.iter().map(|n| n.as_str().to_owned()).collect(),
        x: entry.variant.as_ref().map(|k| k.as_str().to_owned()),
    };
    let head = serde_json::to_vec(&head).expect("a record head serialises");
    let body = &entry.response.body;
    let mut out = Vec::with_capacity(PREFIX + head.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

/// The record in `bytes`, if it is one for `key`.
pub fn decode(key: &Key, bytes: &[u8]) -> Result<Decoded, RecordError> {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let (&version, rest) = bytes.split_first().ok_or(RecordError("empty"))?;
    if version != VERSION {
        return Ok(Decoded::UnknownVersion(version));
    }
    if rest.len() < PREFIX - 1 {
        return Err(RecordError("shorter than its prefix"));
    }
    let generation = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
    let head_len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
    let rest = &rest[12..];
    if head_len > MAX_HEAD_BYTES {
        return Err(RecordError("head too long"));
    }
    if rest.len() < head_len {
        return Err(RecordError("head cut short"));
    }
    let (head, body) = rest.split_at(head_len);
    let head: Head = serde_json::from_slice(head).map_err(|_| RecordError("head is not JSON"))?;
    if head.k != key.as_str() {
        return Err(RecordError("stored for another key"));
    }
    if head.h.len() > MAX_HEADERS {
        return Err(RecordError("too many headers"));
    }
    let mut headers =
        HeaderMap::try_with_capacity(head.h.len()).map_err(|_| RecordError("too many headers"))?;
    for [name, value] in &head.h {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| RecordError("header name"))?;
        let value = b64
            .decode(value)
            .ok()
            .and_then(|v| HeaderValue::from_bytes(&v).ok())
            .ok_or(RecordError("header value"))?;
        headers
            .try_append(name, value)
            .map_err(|_| RecordError("too many headers"))?;
    }
    let vary = head
        .v
        .iter()
        .map(|n| HeaderName::from_bytes(n.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RecordError("vary name"))?;
    let ms = Duration::from_millis;
    Ok(Decoded::Entry(
        generation,
        Box::new(Entry {
            response: Buffered {
                status: StatusCode::from_u16(head.c).map_err(|_| RecordError("status"))?,
                headers,
                body: Bytes::copy_from_slice(body),
            },
            stored_at: UNIX_EPOCH + ms(head.s),
            initial_age: ms(head.a),
            windows: Windows {
                ttl: ms(head.w[0]),
                stale_while_revalidate: ms(head.w[1]),
                stale_if_error: ms(head.w[2]),
            },
            vary: Arc::from(vary),
            variant: head.x.as_deref().map(Key::from_text),
        }),
    ))
}

/// How long Redis should keep a record of `entry` at `now`: what is left of its longest window
/// (none: not worth writing).
pub fn expiry(entry: &Entry, now: SystemTime) -> Option<Duration> {
    let left = entry.windows.lifetime().saturating_sub(entry.age(now));
    (!left.is_zero()).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let request = http::Request::get("/v1/invoices/summary?b=2&a=1")
            .body(crate::body::empty())
            .unwrap();
        Key::of(&request, &[])
    }

    fn entry() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        headers.append("x-multi", "one".parse().unwrap());
        headers.append("x-multi", HeaderValue::from_bytes(b"t\xe9o").unwrap());
        Entry {
            response: Buffered {
                status: StatusCode::OK,
                headers,
                body: Bytes::from_static(b"{\"totalCharges\": 42}\x00\xff"),
            },
            stored_at: UNIX_EPOCH + Duration::from_millis(1_764_580_000_123),
            initial_age: Duration::from_secs(3),
            windows: Windows {
                ttl: Duration::from_secs(300),
                stale_while_revalidate: Duration::from_secs(60),
                stale_if_error: Duration::from_secs(3600),
            },
            vary: Arc::from([HeaderName::from_static("x-tenant")]),
            variant: Some(Key::from_text("variant-key")),
        }
    }

    #[test]
    fn a_record_reads_back_as_the_entry_it_was_written_from() {
        let (key, entry) = (key(), entry());
        let bytes = encode(&key, &entry, 7);
        assert_eq!(bytes[0], VERSION);
        let Decoded::Entry(generation, back) = decode(&key, &bytes).unwrap() else {
            panic!("a version-1 record");
        };
        assert_eq!(generation, 7);
        assert_eq!(back.response.status, entry.response.status);
        assert_eq!(back.response.headers, entry.response.headers);
        assert_eq!(back.response.body, entry.response.body);
        assert_eq!(back.stored_at, entry.stored_at);
        assert_eq!(back.initial_age, entry.initial_age);
        assert_eq!(back.windows, entry.windows);
        assert_eq!(&*back.vary, &*entry.vary);
        assert_eq!(back.variant, entry.variant);
        // The same age on another pod at the same wall time.
        let now = entry.stored_at + Duration::from_secs(10);
        assert_eq!(back.age(now), entry.age(now));
        assert_eq!(back.age(now), Duration::from_secs(13));
    }

    #[test]
    fn a_newer_version_is_a_miss_and_garbage_an_error_never_a_panic() {
        let key = key();
        let mut bytes = encode(&key, &entry(), 1);
        bytes[0] = VERSION + 1;
        assert!(matches!(
            decode(&key, &bytes),
            Ok(Decoded::UnknownVersion(v)) if v == VERSION + 1
        ));
        let good = encode(&key, &entry(), 1);
        for cut in [0, 1, 5, PREFIX, PREFIX + 10] {
            assert!(decode(&key, &good[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = good.clone();
        lying[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&key, &lying).is_err());
        // A record for another key (a digest collision, a stray write) is not this key's.
        assert!(decode(&Key::from_text("other"), &good).is_err());
    }

    #[test]
    fn redis_keeps_a_record_for_what_is_left_of_its_longest_window() {
        let entry = entry();
        let at = |s| entry.stored_at + Duration::from_secs(s);
        // 300 s fresh + max(60, 3600) stale, 3 s old when stored.
        assert_eq!(expiry(&entry, at(0)), Some(Duration::from_secs(3897)));
        assert_eq!(expiry(&entry, at(3897)), None);
    }

    /// A record as a hostile writer could leave it: a valid prefix and `head` as its head.
    fn forged(head: &serde_json::Value) -> Vec<u8> {
        let head = serde_json::to_vec(head).unwrap();
        let mut out = vec![VERSION];
        out.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&u32::try_from(head.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&head);
        out
    }

    #[test]
    fn a_record_with_tens_of_thousands_of_headers_is_refused_not_a_panic() {
        let key = key();
        for count in [MAX_HEADERS + 1, 25_000, 40_000] {
            let headers: Vec<[&str; 2]> = (0..count).map(|_| ["x-a", "YQ"]).collect();
            let head = serde_json::json!({
                "k": key.as_str(), "s": 0, "a": 0, "w": [1000, 0, 0], "c": 200,
                "h": headers, "v": [], "x": null,
            });
            assert!(decode(&key, &forged(&head)).is_err(), "{count} headers");
        }
        // At the cap it still reads.
        let headers: Vec<[&str; 2]> = (0..MAX_HEADERS).map(|_| ["x-a", "YQ"]).collect();
        let head = serde_json::json!({
            "k": key.as_str(), "s": 0, "a": 0, "w": [1000, 0, 0], "c": 200,
            "h": headers, "v": [], "x": null,
        });
        let Ok(Decoded::Entry(_, entry)) = decode(&key, &forged(&head)) else {
            panic!("a record at the cap reads");
        };
        assert_eq!(entry.response.headers.len(), MAX_HEADERS);
    }

    #[test]
    fn a_head_longer_than_its_cap_is_refused_before_it_is_parsed() {
        let key = key();
        let mut bytes = encode(&key, &entry(), 1);
        let len = u32::try_from(MAX_HEAD_BYTES + 1).unwrap();
        bytes[9..13].copy_from_slice(&len.to_be_bytes());
        bytes.resize(PREFIX + MAX_HEAD_BYTES + 1, b' ');
        assert_eq!(
            decode(&key, &bytes).unwrap_err().to_string(),
            "a shared cache record is malformed: head too long"
        );
    }
}
