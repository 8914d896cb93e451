//! The windows the limits count in, from Unix milliseconds: the UTC second (rps), the
//! UTC hour (hourly budget, velocity) and the UTC calendar month (monthly budget).
//!
//! Both stores derive every window from the caller's clock, never from Redis's
//! `TIME`, so the clock can be injected in tests (month and hour rollovers) and the
//! two stores agree on where a window starts.

use crate::audit::time::{civil_from_days, days_from_civil};

/// One reading of the clock, cut into the windows the limits use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Now {
    pub ms: u64,
    pub second: u64,
    pub hour: u64,
    /// Months since year 0 (`year * 12 + month - 1`).
    pub month: i64,
}

impl Now {
    pub fn at(ms: u64) -> Now {
        Now {
            ms,
            second: ms / 1000,
            hour: ms / 3_600_000,
            month: month_of(ms),
        }
    }

    /// Whole seconds (rounded up, at least 1) until the next UTC calendar month.
    pub fn secs_to_next_month(&self) -> u64 {
        ceil_secs(month_start_ms(self.month + 1).saturating_sub(self.ms))
    }

    /// Whole seconds (rounded up, at least 1) until the next UTC hour.
    pub fn secs_to_next_hour(&self) -> u64 {
        ceil_secs((self.hour + 1) * 3_600_000 - self.ms)
    }
}

fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The month (`year * 12 + month - 1`) that Unix milliseconds fall in.
pub(super) fn month_of(ms: u64) -> i64 {
    let (y, m, _) = civil_from_days((ms / 86_400_000) as i64);
    y * 12 + i64::from(m) - 1
}

/// Unix milliseconds at 00:00 UTC on the first day of `month`.
pub(super) fn month_start_ms(month: i64) -> u64 {
    let (y, m) = (month.div_euclid(12), month.rem_euclid(12) as u32 + 1);
    (days_from_civil(y, m, 1).max(0) as u64) * 86_400_000
}

/// `YYYY-MM`, as the usage endpoint shows it and the Redis month keys are named.
pub(super) fn month_label(month: i64) -> String {
    format!(
        "{:04}-{:02}",
        month.div_euclid(12),
        month.rem_euclid(12) + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_boundaries() {
        // 2026-11-22 19:00:00 UTC
        let now = Now::at(1_795_374_000_000);
        assert_eq!(month_label(now.month), "2026-11");
        assert_eq!(now.secs_to_next_month(), 8 * 86_400 + 5 * 3600);
        assert_eq!(now.secs_to_next_hour(), 3600);
        // December rolls into January of the next year; February 2028 is a leap month.
        assert_eq!(
            month_label(month_of(month_start_ms(2026 * 12 + 12))),
            "2027-01"
        );
        let feb = Now::at(month_start_ms(2028 * 12 + 1));
        assert_eq!(feb.secs_to_next_month(), 29 * 86_400);
        // The last millisecond of a month still belongs to it.
        let end = month_start_ms(2026 * 12 + 11) - 1;
        assert_eq!(month_label(month_of(end)), "2026-11");
        assert_eq!(Now::at(end).secs_to_next_month(), 1);
    }
}
