//! Fault knobs (error rate and status, latency, a scripted status sequence, a rate limit, a
//! failing token endpoint, token revocation), settable at start and through
//! `POST /__sandbox/faults`, and the per-second window behind the rate limit.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

/// The fault settings; `GET /__sandbox/faults` serialises exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Faults {
    /// Share of API calls, 0.0 to 1.0, answered with `fail_status`.
    pub fail_rate: f64,
    /// Status of the failures `fail_rate` draws.
    pub fail_status: u16,
    /// Delay before every API call is answered (`stall` is another name for it).
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Most API calls admitted per second; `None` is unlimited.
    pub rate_limit: Option<u32>,
    /// Statuses served, in order, to the next API calls before anything else; an entry below
    /// 400 lets that call through untouched.
    pub script: VecDeque<u16>,
    /// `Retry-After` on scripted or drawn 429 and 503 answers: seconds or an HTTP-date.
    pub retry_after: String,
    /// While set, the token endpoint answers this status with `temporarily_unavailable`.
    pub token_fail_status: Option<u16>,
}

/// What a fault patch asked for besides changing settings.
#[derive(Debug, Default)]
pub struct PatchEffects {
    /// `revoke_tokens: true`: invalidate every access token issued so far.
    pub revoke_tokens: bool,
}

impl Faults {
    /// Applies a partial update: the fields present change, the rest stay. Checks everything
    /// before changing anything, so a bad patch leaves the settings as they were.
    pub fn patch(&mut self, body: &[u8]) -> Result<PatchEffects, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|error| format!("the body is not valid JSON: {error}"))?;
        let Value::Object(fields) = value else {
            return Err("the body must be a JSON object".into());
        };
        let mut next = self.clone();
        let effects = next.apply(&fields)?;
        *self = next;
        Ok(effects)
    }

    fn apply(&mut self, fields: &Map<String, Value>) -> Result<PatchEffects, String> {
        let mut effects = PatchEffects::default();
        for (name, value) in fields {
            match name.as_str() {
                "fail_rate" => {
                    self.fail_rate = value
                        .as_f64()
                        .filter(|rate| (0.0..=1.0).contains(rate))
                        .ok_or("fail_rate must be a number from 0.0 to 1.0")?;
                }
                "fail_status" => self.fail_status = status(value, "fail_status")?,
                "latency" | "stall" => {
                    let text = value.as_str().ok_or_else(|| {
                        format!("{name} must be a duration string like \"250ms\"")
                    })?;
                    self.latency = humantime::parse_duration(text)
                        .map_err(|error| format!("{name} {text:?}: {error}"))?;
                }
                "rate_limit" => {
                    self.rate_limit = match value {
                        Value::Null => None,
                        _ => Some(
                            value
                                .as_u64()
                                .and_then(|n| u32::try_from(n).ok())
                                .filter(|n| *n > 0)
                                .ok_or("rate_limit must be a positive integer or null")?,
                        ),
                    };
                }
                "script" => {
                    let entries = value
                        .as_array()
                        .ok_or("script must be an array of HTTP statuses")?;
                    self.script = entries
                        .iter()
                        .map(|entry| status(entry, "script entries"))
                        .collect::<Result<_, _>>()?;
                }
                "retry_after" => {
                    let text = match value {
                        Value::String(text) => text.trim().to_owned(),
                        Value::Number(n) if n.is_u64() => n.to_string(),
                        _ => return Err("retry_after must be seconds or an HTTP-date".into()),
                    };
                    if text.is_empty() || http::HeaderValue::from_str(&text).is_err() {
                        return Err("retry_after must be seconds or an HTTP-date".into());
                    }
                    self.retry_after = text;
                }
                "token_fail_status" => {
                    self.token_fail_status = match value {
                        Value::Null => None,
                        _ => Some(status(value, "token_fail_status")?),
                    };
                }
                "revoke_tokens" => {
                    effects.revoke_tokens = value
                        .as_bool()
                        .ok_or("revoke_tokens must be true or false")?;
                }
                other => {
                    return Err(format!(
                        "unknown field `{other}`; expected fail_rate, fail_status, latency, stall, \
                         rate_limit, script, retry_after, token_fail_status or revoke_tokens"
                    ))
                }
            }
        }
        Ok(effects)
    }
}

fn status(value: &Value, what: &str) -> Result<u16, String> {
    value
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| (200..=599).contains(n))
        .ok_or_else(|| format!("{what} must be HTTP statuses from 200 to 599"))
}

/// A fixed one-second window counting admitted API calls.
#[derive(Debug, Default)]
pub struct RateWindow {
    start: Option<Instant>,
    count: u32,
}

impl RateWindow {
    /// Admits one call under `limit` per second, or says how long until the window reopens.
    pub fn admit(&mut self, limit: u32, now: Instant) -> Result<(), Duration> {
        let second = Duration::from_secs(1);
        let start = match self.start {
            Some(start) if now.duration_since(start) < second => start,
            _ => {
                self.start = Some(now);
                self.count = 0;
                now
            }
        };
        if self.count >= limit {
            return Err(second.saturating_sub(now.duration_since(start)));
        }
        self.count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults() -> Faults {
        Faults {
            fail_rate: 0.0,
            fail_status: 500,
            latency: Duration::ZERO,
            rate_limit: None,
            script: VecDeque::new(),
            retry_after: "1".into(),
            token_fail_status: None,
        }
    }

    #[test]
    fn patch_changes_only_the_fields_present() {
        let mut f = faults();
        f.patch(br#"{"fail_rate": 0.5, "latency": "250ms", "script": [500, 503]}"#)
            .unwrap();
        assert_eq!(f.fail_rate, 0.5);
        assert_eq!(f.latency, Duration::from_millis(250));
        assert_eq!(f.script, [500, 503]);
        assert_eq!(f.fail_status, 500);
        f.patch(br#"{"rate_limit": 5, "token_fail_status": 503}"#)
            .unwrap();
        assert_eq!(f.rate_limit, Some(5));
        f.patch(br#"{"rate_limit": null, "token_fail_status": null}"#)
            .unwrap();
        assert_eq!(f.rate_limit, None);
        assert_eq!(f.token_fail_status, None);
    }

    #[test]
    fn a_bad_patch_changes_nothing() {
        let mut f = faults();
        assert!(f
            .patch(br#"{"fail_rate": 0.5, "fail_status": 99}"#)
            .is_err());
        assert_eq!(f.fail_rate, 0.0);
        assert!(f.patch(b"{not json").is_err());
        assert!(f.patch(br#"{"fail_rate": 2}"#).is_err());
        assert!(f.patch(br#"{"bogus": 1}"#).is_err());
        assert!(f.patch(br#"{"latency": "soon"}"#).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_admits_limit_per_second() {
        let mut window = RateWindow::default();
        for _ in 0..3 {
            assert!(window.admit(3, Instant::now()).is_ok());
        }
        let wait = window.admit(3, Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(window.admit(3, Instant::now()).is_ok());
    }
}
