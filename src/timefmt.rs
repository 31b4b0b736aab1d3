//! Timestamps as text: RFC 3339 in UTC with milliseconds, written digit by digit (the HTTP
//! envelope writes one per message; the dead-letter API and CLI show them too), and
//! [`WallClock`], which turns many monotonic `Instant`s into such timestamps with one clock
//! reading.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time of `Instant`s, anchored on one reading of both clocks: an HTTP batch
/// converts the receive time of every message with one anchor instead of two clock reads
/// per message. Consecutive messages often share their receive `Instant` (a session stamps
/// every packet of one socket read alike), so the last text is kept and reused.
#[derive(Debug)]
pub struct WallClock {
    /// The monotonic reading.
    at: Instant,
    /// The wall-clock reading taken with it, since the Unix epoch.
    wall: Duration,
    /// The last instant formatted, and its text.
    last: Option<(Instant, Rfc3339)>,
}

impl WallClock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        WallClock { at: Instant::now(), wall, last: None }
    }

    /// Milliseconds since the Unix epoch at `t`.
    pub fn unix_millis(&self, t: Instant) -> u64 {
        let wall = match t.checked_duration_since(self.at) {
            Some(later) => self.wall + later,
            None => self.wall.saturating_sub(self.at - t),
        };
        wall.as_millis() as u64
    }

    /// `t` as RFC 3339 text (see [`rfc3339`]).
    pub fn rfc3339(&mut self, t: Instant) -> &str {
        if self.last.as_ref().is_none_or(|(at, _)| *at != t) {
            self.last = Some((t, rfc3339(self.unix_millis(t))));
        }
        self.last.as_ref().map_or("1970-01-01T00:00:00.000Z", |(_, text)| text.as_str())
    }
}

/// `2026-11-26T09:03:54.123Z` for `ms` milliseconds since the Unix epoch.
pub fn rfc3339(ms: u64) -> Rfc3339 {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + i64::from(month <= 2)).clamp(0, 9999) as u64;
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    put(20, 3, ms % 1000);
    Rfc3339(b)
}

/// A formatted timestamp, on the stack.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339([u8; 24]);

impl Rfc3339 {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_with_milliseconds() {
        assert_eq!(rfc3339(0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000).as_str(), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_694_709_123).as_str(), "2026-11-26T12:05:09.123Z");
    }

    #[test]
    fn wall_clock_agrees_with_the_system_clock() {
        let earlier = Instant::now() - Duration::from_millis(1500);
        let mut clock = WallClock::now();
        let later = Instant::now() + Duration::from_millis(2500);
        let direct = |t: Instant| crate::store::codec::unix_millis(t);
        for t in [earlier, clock.at] {
            let (a, b) = (clock.unix_millis(t), direct(t));
            assert!(a.abs_diff(b) <= 2, "{a} vs {b}");
        }
        let ahead = clock.unix_millis(later) - clock.unix_millis(clock.at);
        assert!(ahead.abs_diff(2500) <= 1, "{ahead}");
        let text = clock.rfc3339(earlier).to_owned();
        assert_eq!(text, rfc3339(clock.unix_millis(earlier)).as_str());
        assert_eq!(clock.rfc3339(earlier), text, "cached");
        assert_ne!(clock.rfc3339(later), text);
    }
}
