//! UTC calendar arithmetic for audit timestamps, without a date-time dependency.

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD hh:mm:ss` for Unix milliseconds (ClickHouse `DateTime` text).
pub fn datetime(ts_ms: u64) -> String {
    let secs = (ts_ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// `YYYYMMDDhh`, the hour a spool file covers.
pub fn hour_stamp(ts_ms: u64) -> String {
    let secs = (ts_ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}{m:02}{d:02}{:02}", secs.rem_euclid(86_400) / 3600)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        // 2024-02-29 12:34:56 UTC (leap day)
        assert_eq!(datetime(1_709_210_096_000), "2024-02-29 12:34:56");
        assert_eq!(hour_stamp(1_709_210_096_000), "2024022912");
        // 2026-11-22 19:07:46 UTC
        assert_eq!(datetime(1_795_374_466_000), "2026-11-22 19:07:46");
    }
}
