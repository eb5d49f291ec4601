//! `upstream.rate_limit`: calls per period to the upstream, written `"20/s"`, `"600/m"` or
//! `"3600/h"`, parsed as the config is read so a bad one is refused naming its key.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The most calls a rate may name in one period (a limit this high is no limit).
pub const MAX_RATE_COUNT: u32 = 1_000_000;

/// A rate: `count` upstream calls per `period`. A fresh limiter also admits up to `count` calls
/// at once (the burst), then one every `period / count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls per period, and the burst.
    pub count: u32,
    /// One second, one minute or one hour.
    pub period: Duration,
}

impl RateLimit {
    /// Parses `N/s`, `N/m` (or `N/min`) and `N/h`, N from 1 to [`MAX_RATE_COUNT`].
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let shape = || {
            format!(
                "`{text}` is not a rate: write calls per second, minute or hour, like \"20/s\", \"600/m\" or \"3600/h\""
            )
        };
        let (count, unit) = text.trim().split_once('/').ok_or_else(shape)?;
        let count: u32 = count.trim().parse().map_err(|_| shape())?;
        let period = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(shape()),
        };
        if count == 0 {
            return Err(format!(
                "`{text}`: 0 calls would refuse every call; leave upstream.rate_limit out for no limit"
            ));
        }
        if count > MAX_RATE_COUNT {
            return Err(format!(
                "`{text}`: at most {MAX_RATE_COUNT} calls per period; leave upstream.rate_limit out for no limit"
            ));
        }
        Ok(RateLimit { count, period })
    }

    /// The time one call's slot takes: `period / count` (GCRA's emission interval).
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }

    /// How many calls may go at once from rest.
    pub fn burst(&self) -> u32 {
        self.count
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        RateLimit::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for RateLimit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_per_second_minute_and_hour() {
        let r = RateLimit::parse("20/s").unwrap();
        assert_eq!((r.count, r.period), (20, Duration::from_secs(1)));
        assert_eq!(r.interval(), Duration::from_millis(50));
        assert_eq!(r.to_string(), "20/s");
        let r = RateLimit::parse(" 600 / min ").unwrap();
        assert_eq!((r.count, r.period), (600, Duration::from_secs(60)));
        assert_eq!(r.to_string(), "600/m");
        assert_eq!(
            RateLimit::parse("3600/h").unwrap().interval(),
            Duration::from_secs(1)
        );
        for bad in ["20", "20/d", "fast/s", "-1/s", "/s", "2.5/s", ""] {
            let error = RateLimit::parse(bad).unwrap_err();
            assert!(error.contains("\"20/s\""), "{bad}: {error}");
        }
        assert!(RateLimit::parse("0/s")
            .unwrap_err()
            .contains("leave upstream.rate_limit out"));
        assert!(RateLimit::parse("1000001/s").is_err());
    }
}
