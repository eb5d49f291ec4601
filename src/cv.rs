//! The correlation vector (`MS-CV`), per the cV spec 2.1 (reference §1.4): `base.e1.e2...[!]`.
//!
//! - v1 (what Partner Center shows): a 16-character base64 base, at most 63 characters in all.
//! - v2: a 22-character base, at most 127.
//!
//! Operators: **seed** `{} → X.0`; **extend** `V → V.0`, once on an incoming call; **increment**
//! `V.N → V.(N+1)`, before each outgoing call. An operation that would pass the length limit
//! terminates the vector instead (a trailing `!`), and a terminated vector never changes again.

use std::fmt;

use base64::Engine as _;

/// The version of a vector, by the length of its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 16-character base, 63 characters at most.
    V1,
    /// 22-character base, 127 characters at most.
    V2,
}

impl Version {
    fn base_len(self) -> usize {
        match self {
            Version::V1 => 16,
            Version::V2 => 22,
        }
    }

    /// The longest a vector may be, the terminating `!` not counted.
    pub fn max_len(self) -> usize {
        match self {
            Version::V1 => 63,
            Version::V2 => 127,
        }
    }
}

/// A parsed, valid correlation vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationVector {
    /// The whole vector without the `!`.
    value: String,
    /// Where the last element starts in `value`.
    last: usize,
    version: Version,
    terminated: bool,
}

/// Why a header value is not a correlation vector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a correlation vector: {0}")]
pub struct ParseError(&'static str);

impl CorrelationVector {
    /// A new v1 vector: base64 of 12 random bytes, then `.0`.
    pub fn seed() -> CorrelationVector {
        let bytes: [u8; 12] = std::array::from_fn(|_| fastrand::u8(..));
        // 12 bytes are 16 base64 characters, with no padding; then `.0`.
        let mut value = String::with_capacity(18);
        base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut value);
        let last = value.len() + 1;
        value.push_str(".0");
        CorrelationVector {
            last,
            value,
            version: Version::V1,
            terminated: false,
        }
    }

    /// Parses a caller's vector.
    pub fn parse(text: &str) -> Result<CorrelationVector, ParseError> {
        let (body, terminated) = match text.strip_suffix('!') {
            Some(body) => (body, true),
            None => (text, false),
        };
        let (base, elements) = body
            .split_once('.')
            .ok_or(ParseError("no `.` after the base"))?;
        let version = match base.len() {
            16 => Version::V1,
            22 => Version::V2,
            _ => return Err(ParseError("the base must be 16 (v1) or 22 (v2) characters")),
        };
        if !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        {
            return Err(ParseError("the base must be base64 characters"));
        }
        if body.len() > version.max_len() {
            return Err(ParseError("longer than the spec allows"));
        }
        for element in elements.split('.') {
            let digits_only = !element.is_empty() && element.bytes().all(|b| b.is_ascii_digit());
            if !digits_only
                || element.parse::<u32>().is_err()
                || (element.len() > 1 && element.starts_with('0'))
            {
                return Err(ParseError("each element must be a decimal 32-bit number"));
            }
        }
        let last = body.rfind('.').map_or(0, |i| i + 1);
        debug_assert_eq!(base.len(), version.base_len());
        Ok(CorrelationVector {
            value: body.to_owned(),
            last,
            version,
            terminated,
        })
    }

    /// `V → V.0` (once, on an incoming call).
    pub fn extend(&mut self) {
        if self.terminated {
            return;
        }
        if self.value.len() + 2 > self.version.max_len() {
            self.terminated = true;
            return;
        }
        self.last = self.value.len() + 1;
        self.value.push_str(".0");
    }

    /// `V.N → V.(N+1)` (before each outgoing call).
    pub fn increment(&mut self) {
        if self.terminated {
            return;
        }
        let Some(next) = self.value[self.last..]
            .parse::<u32>()
            .ok()
            .and_then(|n| n.checked_add(1))
        else {
            self.terminated = true;
            return;
        };
        let mut digits = itoa::Buffer::new();
        let next = digits.format(next);
        if self.last + next.len() > self.version.max_len() {
            self.terminated = true;
            return;
        }
        self.value.truncate(self.last);
        self.value.push_str(next);
    }

    /// Whether the vector has reached its limit and no longer changes.
    pub fn is_terminated(&self) -> bool {
        self.terminated
    }

    /// The vector's version.
    pub fn version(&self) -> Version {
        self.version
    }
}

impl CorrelationVector {
    /// The vector as a header value (one copy of its text, no string formatted on the way).
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        let mut text = Text {
            bytes: [0; TEXT_MAX],
            len: 0,
        };
        let value = self.value.as_bytes();
        let end = value.len() + usize::from(self.terminated);
        if end > TEXT_MAX {
            return None;
        }
        text.bytes[..value.len()].copy_from_slice(value);
        if self.terminated {
            text.bytes[value.len()] = b'!';
        }
        text.len = end;
        // One allocation that the value's clones share (the request's and the answer's).
        http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
    }
}

/// The longest vector's text: V2's 127 characters and the terminator.
const TEXT_MAX: usize = 128;

/// A vector's text, owned by the header value made from it.
struct Text {
    bytes: [u8; TEXT_MAX],
    len: usize,
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Display for CorrelationVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)?;
        if self.terminated {
            f.write_str("!")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seed_is_a_v1_vector() {
        let cv = CorrelationVector::seed();
        let text = cv.to_string();
        assert_eq!(text.len(), 18);
        assert!(text.ends_with(".0"));
        assert_eq!(CorrelationVector::parse(&text).unwrap(), cv);
        assert_ne!(CorrelationVector::seed(), cv);
    }

    #[test]
    fn extend_and_increment_follow_the_spec() {
        let mut cv = CorrelationVector::parse("5npA0K22CUmWPOzB.1").unwrap();
        cv.extend();
        assert_eq!(cv.to_string(), "5npA0K22CUmWPOzB.1.0");
        cv.increment();
        cv.increment();
        assert_eq!(cv.to_string(), "5npA0K22CUmWPOzB.1.2");
        let mut cv = CorrelationVector::parse("5npA0K22CUmWPOzB.9").unwrap();
        cv.increment();
        assert_eq!(cv.to_string(), "5npA0K22CUmWPOzB.10");
    }

    #[test]
    fn at_the_limit_the_vector_is_terminated_and_frozen() {
        // 16 + ".0" repeated to 63 characters: 16 + 2 * 23 = 62, one more `.0` would be 64.
        let text = format!("5npA0K22CUmWPOzB{}", ".0".repeat(23));
        assert_eq!(text.len(), 62);
        let mut cv = CorrelationVector::parse(&text).unwrap();
        cv.extend();
        assert!(cv.is_terminated());
        assert_eq!(cv.to_string(), format!("{text}!"));
        cv.increment();
        cv.extend();
        assert_eq!(cv.to_string(), format!("{text}!"));
        // Increment 9 → 10 grows by one character: allowed at 62, not at 63.
        let mut cv =
            CorrelationVector::parse(&format!("5npA0K22CUmWPOzB{}.9", ".0".repeat(22))).unwrap();
        cv.increment();
        assert!(!cv.is_terminated());
        assert_eq!(cv.to_string().len(), 63);
        // A terminated vector from a caller stays terminated.
        let mut cv = CorrelationVector::parse("5npA0K22CUmWPOzB.3!").unwrap();
        cv.increment();
        assert_eq!(cv.to_string(), "5npA0K22CUmWPOzB.3!");
    }

    #[test]
    fn malformed_vectors_are_refused() {
        for bad in [
            "",
            "abc",
            "5npA0K22CUmWPOzB",
            "5npA0K22CUmWPOzB.",
            "5npA0K22CUmWPOzB..1",
            "5npA0K22CUmWPOzB.x",
            "5npA0K22CUmWPOzB.-1",
            "5npA0K22CUmWPOzB.01",
            "5npA0K22CUmWPOzB.4294967296",
            "5npA0K22CUmWPOz.0",
            "5npA0K22CUmWPO=B.0",
            "5npA0K22CUmWPOzB.0!!",
            "5npA0K22CUmWPOzB.0\r\nX: y",
        ] {
            assert!(
                CorrelationVector::parse(bad).is_err(),
                "{bad:?} was accepted"
            );
        }
        let long = format!("5npA0K22CUmWPOzB{}", ".0".repeat(24));
        assert!(CorrelationVector::parse(&long).is_err());
        assert!(
            CorrelationVector::parse("KZGmCkbuCEeBxv3qX2dOnQ.3")
                .unwrap()
                .version()
                == Version::V2
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Extend,
        Increment,
    }

    fn start() -> impl Strategy<Value = CorrelationVector> {
        prop_oneof![
            Just(CorrelationVector::seed()),
            (0u32..=u32::MAX, 0usize..=18).prop_map(|(n, depth)| {
                CorrelationVector::parse(&format!("5npA0K22CUmWPOzB{}.{n}", ".1".repeat(depth)))
                    .unwrap()
            }),
            (0usize..50).prop_map(|depth| {
                CorrelationVector::parse(&format!(
                    "KZGmCkbuCEeBxv3qX2dOnQ{}",
                    ".7".repeat(depth + 1)
                ))
                .unwrap()
            }),
        ]
    }

    proptest! {
        #[test]
        fn any_sequence_of_operations_yields_a_valid_vector_within_the_limit(
            mut cv in start(),
            ops in proptest::collection::vec(prop_oneof![Just(Op::Extend), Just(Op::Increment)], 0..200),
        ) {
            for op in ops {
                let before = cv.to_string();
                let was_terminated = cv.is_terminated();
                match op {
                    Op::Extend => cv.extend(),
                    Op::Increment => cv.increment(),
                }
                let text = cv.to_string();
                let body_len = text.trim_end_matches('!').len();
                prop_assert!(body_len <= cv.version().max_len(), "{text} is too long");
                let reparsed = CorrelationVector::parse(&text);
                prop_assert_eq!(reparsed, Ok(cv.clone()));
                if was_terminated {
                    prop_assert_eq!(&text, &before);
                }
            }
        }
    }
}
