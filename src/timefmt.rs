//! Timestamps as text: RFC 3339 in UTC with milliseconds, written digit by digit (the HTTP
//! envelope writes one per message; the dead-letter API and CLI show them too).

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
}
