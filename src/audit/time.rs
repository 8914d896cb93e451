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

/// RFC 3339 in UTC with milliseconds (`2026-12-03T08:40:50.123Z`), for JSON answers.
pub fn rfc3339(ts_ms: u64) -> String {
    format!(
        "{}.{:03}Z",
        datetime(ts_ms).replacen(' ', "T", 1),
        ts_ms % 1000
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

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds of an RFC 3339 timestamp (`2026-11-22T19:07:46Z`,
/// `2026-11-22T19:07:46.5+01:00`); a bare date counts from its midnight UTC.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
    {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    if b.len() == 10 {
        return u64::try_from(days * 86_400_000).ok();
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        let ms3: String = digits.chars().chain("000".chars()).take(3).collect();
        frac_ms = ms3.parse().ok()?;
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) => {
            let oh: i64 = tz.get(1..3)?.parse().ok()?;
            let om: i64 = tz.get(4..6)?.parse().ok()?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

#[cfg(test)]
mod rfc3339_tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(
            parse_rfc3339("2026-11-22T19:07:46Z"),
            Some(1_795_374_466_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T20:07:46.5+01:00"),
            Some(1_795_374_466_500)
        );
        assert_eq!(parse_rfc3339("2026-11-22"), Some(1_795_305_600_000));
        assert_eq!(parse_rfc3339("2026-13-22T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        for ms in [0u64, 1_709_210_096_000, 1_795_374_466_000] {
            let text = datetime(ms).replace(' ', "T") + "Z";
            assert_eq!(parse_rfc3339(&text), Some(ms));
        }
    }
}
