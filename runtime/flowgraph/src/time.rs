//! Calendar arithmetic for conditions on the tenant's local time. The
//! plugin only has a UTC clock and an offset, so this is done by hand
//! (Howard Hinnant's days-from-civil algorithm).

/// A local date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Year.
    pub year: i64,
    /// Month 1–12.
    pub month: u32,
    /// Day 1–31.
    pub day: u32,
    /// 0 = Monday … 6 = Sunday.
    pub weekday: u32,
    /// Minutes since midnight.
    pub minute_of_day: u32,
}

impl LocalTime {
    /// Local time for a UTC instant and an offset from UTC.
    pub fn new(now_ms: u64, utc_offset_minutes: i32) -> Self {
        let local_ms = now_ms as i64 + i64::from(utc_offset_minutes) * 60_000;
        let days = local_ms.div_euclid(86_400_000);
        let ms_of_day = local_ms.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        LocalTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday (index 3).
            weekday: (days + 3).rem_euclid(7) as u32,
            minute_of_day: (ms_of_day / 60_000) as u32,
        }
    }
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses `MM-DD` (every year: year `None`) or `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<(Option<i64>, u32, u32)> {
    let parts: Vec<&str> = s.split('-').collect();
    let (y, m, d) = match parts.as_slice() {
        [m, d] => (None, m, d),
        [y, m, d] if y.len() == 4 => (Some(y.parse().ok()?), m, d),
        _ => return None,
    };
    let (m, d): (u32, u32) = (m.parse().ok()?, d.parse().ok()?);
    ((1..=12).contains(&m) && (1..=31).contains(&d)).then_some((y, m, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        // 2026-11-23T10:00:00Z is a Monday.
        let t = LocalTime::new(1_795_428_000_000, 0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2026, 11, 23, 0));
        assert_eq!(t.minute_of_day, 600);
        // +120 minutes moves the clock, and crossing midnight moves the date.
        let t = LocalTime::new(1_795_474_800_000, 120); // 23:00Z → 01:00 next day
        assert_eq!((t.day, t.weekday, t.minute_of_day), (24, 1, 60));
        let t = LocalTime::new(0, -60);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1969, 12, 31, 2));
        assert_eq!(parse_date("12-25"), Some((None, 12, 25)));
        assert_eq!(parse_date("2026-01-01"), Some((Some(2026), 1, 1)));
        assert_eq!(parse_date("13-01"), None);
    }
}
