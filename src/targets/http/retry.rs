//! What an HTTP answer means for a message, and how long to wait before trying again.
//!
//! Pure functions: no I/O. 2xx is delivered; 408, 429, 5xx and attempts without an answer
//! (connection refused or reset, timeout) may succeed later; everything else (other 4xx, and
//! 3xx since redirects are not followed unless configured) is permanent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;

/// The verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// Worth another attempt, after `after` when the server said (Retry-After).
    Retry {
        /// For logs and the final failure.
        reason: String,
        /// The server's Retry-After, if any.
        after: Option<Duration>,
    },
    /// A retry of the same request would fail the same way.
    Permanent(String),
}

/// The verdict on a response with `status`; `retry_after` is its Retry-After header.
pub fn classify_status(status: StatusCode, retry_after: Option<&str>, now: SystemTime) -> Verdict {
    let text = match status.canonical_reason() {
        Some(r) => format!("HTTP {} {r}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    };
    if status.is_success() {
        Verdict::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Verdict::Retry { reason: text, after: retry_after.and_then(|v| parse_retry_after(v, now)) }
    } else if status.is_redirection() {
        Verdict::Permanent(format!("{text}: redirect not followed (http.*.max_redirects)"))
    } else {
        Verdict::Permanent(text)
    }
}

/// The verdict on an attempt that got no response. The URL is left out of the reason (it
/// may carry credentials, and the reason reaches logs and MQTT 5 clients).
pub fn classify_error(e: reqwest::Error) -> Verdict {
    let e = &e.without_url();
    if e.is_builder() {
        return Verdict::Permanent(format!("invalid request: {}", error_chain(e)));
    }
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    Verdict::Retry { reason: format!("{what}: {}", error_chain(e)), after: None }
}

/// The error and its sources on one line (reqwest's own message is terse).
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

/// Retry-After as delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date in the past is 0.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The delay before retry number `retry` (1 for the first): `initial * 2^(retry-1)` capped at
/// `max`, of which a random part (up to half) is taken off, so that many clients that failed
/// together do not come back together.
pub fn backoff(retry: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(max);
    let half = exp / 2;
    let jitter = half.mul_f64(random_unit());
    exp - jitter
}

/// A number in [0, 1) from a shared SplitMix64 state seeded by the clock: good enough for
/// jitter, and no dependency.
fn random_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
    }
    let next = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(next, Ordering::Relaxed);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let now = SystemTime::now();
        assert_eq!(classify_status(StatusCode::OK, None, now), Verdict::Delivered);
        assert_eq!(classify_status(StatusCode::NO_CONTENT, None, now), Verdict::Delivered);
        for s in [408, 429, 500, 502, 503, 504] {
            let v = classify_status(StatusCode::from_u16(s).unwrap(), None, now);
            assert!(matches!(v, Verdict::Retry { .. }), "{s}: {v:?}");
        }
        for s in [400, 401, 403, 404, 409, 422, 301, 302, 307] {
            let v = classify_status(StatusCode::from_u16(s).unwrap(), None, now);
            assert!(matches!(v, Verdict::Permanent(_)), "{s}: {v:?}");
        }
        let v = classify_status(StatusCode::TOO_MANY_REQUESTS, Some("3"), now);
        assert_eq!(
            v,
            Verdict::Retry {
                reason: "HTTP 429 Too Many Requests".into(),
                after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let b1 = backoff(1, i, m);
            assert!(b1 >= Duration::from_millis(50) && b1 <= i, "{b1:?}");
            let b3 = backoff(3, i, m);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400), "{b3:?}");
            let b9 = backoff(9, i, m);
            assert!(b9 >= Duration::from_millis(500) && b9 <= m, "{b9:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| backoff(2, i, m)).collect();
        assert!(spread.len() > 1, "no jitter");
    }
}
