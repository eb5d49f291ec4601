//! `[[routes]] match`: `"METHOD /path"` patterns, parsed as the config is read, so a pattern that
//! would never match is a config error naming its key.
//!
//! A path segment is a literal, `*` (exactly one segment) or a final `**` (one or more segments).
//! A `GET` pattern also admits `HEAD`.

use std::fmt;

use http::Method;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The methods a pattern may name. Methods are case-sensitive (RFC 9110 §9.1): `get` would be a
/// method of its own that never matches a real call, so only the standard ones, in capitals.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

/// Why a route pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// No space between a method and a path.
    #[error("pattern `{0}` must be `METHOD /path`")]
    Shape(String),
    /// Not one of [`METHODS`], in capitals.
    #[error("pattern `{pattern}`: `{method}` is not an HTTP method (use one of {})", METHODS.join(", "))]
    Method {
        /// The whole pattern.
        pattern: String,
        /// What stood where the method goes.
        method: String,
    },
    /// The path does not start with `/`.
    #[error("pattern `{0}`: the path must start with `/`")]
    NotAbsolute(String),
    /// `//` or a trailing `/`.
    #[error("pattern `{0}` has an empty segment")]
    EmptySegment(String),
    /// `**` before the last segment.
    #[error("pattern `{0}`: `**` may only be the last segment")]
    RestNotLast(String),
    /// `*` inside a segment (`/a*`).
    #[error("pattern `{0}`: `*` must be a whole segment (`/a/*/b`), not part of one")]
    PartialWildcard(String),
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A parsed `"METHOD /path"` pattern; it keeps its text, so the printed config shows it as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    method: Method,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `"GET /v1/invoices/*/lineitems/**"`.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| PatternError::Shape(text.to_owned()))?;
        let bad_method = || PatternError::Method {
            pattern: text.to_owned(),
            method: method.to_owned(),
        };
        if !METHODS.contains(&method) {
            return Err(bad_method());
        }
        let method: Method = method.parse().map_err(|_| bad_method())?;
        let rest = path
            .trim()
            .strip_prefix('/')
            .ok_or_else(|| PatternError::NotAbsolute(text.to_owned()))?;
        let pieces: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            segments.push(match *piece {
                "" => return Err(PatternError::EmptySegment(text.to_owned())),
                "*" => Segment::One,
                "**" if i + 1 == pieces.len() => Segment::Rest,
                "**" => return Err(PatternError::RestNotLast(text.to_owned())),
                literal if literal.contains('*') => {
                    return Err(PatternError::PartialWildcard(text.to_owned()))
                }
                literal => Segment::Literal(literal.to_owned()),
            });
        }
        Ok(Pattern {
            text: text.to_owned(),
            method,
            segments,
        })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a request with this method and these decoded path segments matches.
    pub fn matches<'p>(&self, method: &Method, path: impl IntoIterator<Item = &'p str>) -> bool {
        let method_ok =
            self.method == method || (self.method == Method::GET && method == Method::HEAD);
        method_ok && segments_match(&self.segments, path.into_iter())
    }
}

fn segments_match<'p>(pattern: &[Segment], mut path: impl Iterator<Item = &'p str>) -> bool {
    for segment in pattern {
        let next = path.next();
        match segment {
            // Always last: one or more segments, whatever they are.
            Segment::Rest => return next.is_some(),
            Segment::One if next.is_none() => return false,
            Segment::One => {}
            Segment::Literal(literal) => {
                if next != Some(literal.as_str()) {
                    return false;
                }
            }
        }
    }
    path.next().is_none()
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// A route's `match`: one pattern (`match = "GET /a"`) or several (`match = ["GET /a", "GET /b"]`),
/// never none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns(Vec<Pattern>);

impl Patterns {
    /// The patterns, in the order written.
    pub fn as_slice(&self) -> &[Pattern] {
        &self.0
    }

    /// The first pattern (there is always one).
    pub fn first(&self) -> &Pattern {
        &self.0[0]
    }
}

impl From<Pattern> for Patterns {
    fn from(pattern: Pattern) -> Self {
        Patterns(vec![pattern])
    }
}

impl<'de> Deserialize<'de> for Patterns {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor rather than `#[serde(untagged)]`, which would hide the pattern's own error
        // behind "did not match any variant".
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Patterns;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pattern `\"METHOD /path\"` or a list of them")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Patterns, E> {
                Pattern::parse(text).map(Patterns::from).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Patterns, A::Error> {
                let mut patterns = Vec::new();
                while let Some(pattern) = seq.next_element::<Pattern>()? {
                    patterns.push(pattern);
                }
                if patterns.is_empty() {
                    return Err(de::Error::custom(
                        "`match` is empty: give the route at least one pattern",
                    ));
                }
                Ok(Patterns(patterns))
            }
        }
        deserializer.deserialize_any(OneOrMany)
    }
}

impl Serialize for Patterns {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(serializer),
            many => many.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> std::str::Split<'_, char> {
        path.trim_start_matches('/').split('/')
    }

    #[test]
    fn star_is_one_segment_and_double_star_the_rest() {
        let p = Pattern::parse("GET /a/*/c/**").unwrap();
        let m = |path: &str| p.matches(&Method::GET, segments(path));
        assert!(m("/a/b/c/d"));
        assert!(m("/a/b/c/d/e/f"));
        assert!(!m("/a/b/c"));
        assert!(!m("/a/b/x/c/d"));
        assert!(!m("/a/c/d"));
        assert!(p.matches(&Method::HEAD, segments("/a/b/c/d")));
        assert!(!p.matches(&Method::POST, segments("/a/b/c/d")));
        assert_eq!(p.as_str(), "GET /a/*/c/**");
    }

    #[test]
    fn patterns_that_could_never_match_are_refused() {
        for (text, error) in [
            (
                "GET /a/**/b",
                PatternError::RestNotLast("GET /a/**/b".into()),
            ),
            (
                "GET /a/b*",
                PatternError::PartialWildcard("GET /a/b*".into()),
            ),
            ("/a", PatternError::Shape("/a".into())),
            ("GET a", PatternError::NotAbsolute("GET a".into())),
            ("GET /a//b", PatternError::EmptySegment("GET /a//b".into())),
        ] {
            assert_eq!(Pattern::parse(text), Err(error), "{text}");
        }
        for method in ["get", "FETCH", "CONNECT"] {
            let text = format!("{method} /a");
            assert!(
                matches!(Pattern::parse(&text), Err(PatternError::Method { .. })),
                "{text}"
            );
        }
    }
}
