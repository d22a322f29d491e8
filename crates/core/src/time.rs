//! Wall-clock helpers. Activity times, coverage intervals and recovery ranges are wall-clock
//! facts shared with the upstream; everything that measures durations inside the process
//! uses `tokio::time::Instant` so that tests can pause time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds
/// (`2023-07-05T17:09:12.070Z`), the form the Gnip recovery API takes.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// Formats as RFC 3339 UTC without fractions (`2023-07-05T17:09:12Z`), the form of X API v2.
pub fn rfc3339_secs(unix_ms: u64) -> String {
    let (y, mo, d, h, mi, s) = civil_from_unix(unix_ms / 1000);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Parses RFC 3339 UTC (`Z` suffix, optional fraction) into milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t = text.strip_suffix('Z').or_else(|| text.strip_suffix('z'))?;
    let (date, clock) = t.split_once(['T', 't'])?;
    let mut dp = date.splitn(3, '-');
    let y: i64 = dp.next()?.parse().ok()?;
    let mo: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    let (hms, frac) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (clock, None),
    };
    let mut cp = hms.splitn(3, ':');
    let h: u64 = cp.next()?.parse().ok()?;
    let mi: u64 = cp.next()?.parse().ok()?;
    let s: u64 = cp.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let ms = match frac {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let digits: String = f.chars().chain("000".chars()).take(3).collect();
            digits.parse::<u64>().ok()?
        }
        Some(_) => return None,
        None => 0,
    };
    let days = days_from_civil(y, mo, d);
    if days < 0 {
        return None;
    }
    Some(((days as u64 * 86_400) + h * 3600 + mi * 60 + s) * 1000 + ms)
}

/// Formats as the v1.1 `created_at` form (`Sun Aug 31 00:29:15 +0000 2014`).
pub fn twitter_date(unix_ms: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_ms / 1000;
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    let weekday = DAYS[((secs / 86_400) % 7) as usize];
    let month = MONTHS[(mo - 1) as usize];
    format!("{weekday} {month} {d:02} {h:02}:{mi:02}:{s:02} +0000 {y}")
}

/// Rounds a duration up to whole minutes (the unit of `backfillMinutes`).
pub fn ceil_minutes(d: Duration) -> u64 {
    d.as_millis().div_ceil(60_000) as u64
}

fn civil_from_unix(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, (rem % 3600) / 60, rem % 60)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented Gnip example time formats and parses back exactly.
    #[test]
    fn rfc3339_round_trip() {
        let ms = parse_rfc3339("2023-07-05T17:09:12.070Z").unwrap();
        assert_eq!(rfc3339_ms(ms), "2023-07-05T17:09:12.070Z");
        assert_eq!(rfc3339_secs(ms), "2023-07-05T17:09:12Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.5Z"),
            Some(1_709_251_199_500)
        );
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    /// The v1.1 date form matches a real sample post.
    #[test]
    fn twitter_date_matches_sample() {
        let ms = parse_rfc3339("2014-08-31T00:29:15Z").unwrap();
        assert_eq!(twitter_date(ms), "Sun Aug 31 00:29:15 +0000 2014");
    }

    /// Backfill minutes round up: 90 s needs 2 minutes, 60 s needs 1.
    #[test]
    fn minutes_round_up() {
        assert_eq!(ceil_minutes(Duration::from_secs(90)), 2);
        assert_eq!(ceil_minutes(Duration::from_secs(60)), 1);
        assert_eq!(ceil_minutes(Duration::from_millis(1)), 1);
    }
}
