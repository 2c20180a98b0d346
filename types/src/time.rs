//! Wall-clock times as Hive prints them: UTC, from the epoch milliseconds that the store and
//! the protocol carry. `hivectl` writes `2026-11-27T05:34:25Z`, the dashboard
//! `2026-11-27 05:34:25Z`; both come from [`iso`].

/// `ms` (milliseconds since the Unix epoch) as `YYYY-MM-DD<sep>HH:MM:SSZ` in UTC; empty for 0
/// or less (never).
pub fn iso(ms: i64, sep: char) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}{sep}{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::iso;

    #[test]
    fn utc_dates_with_either_separator() {
        assert_eq!(iso(0, 'T'), "");
        assert_eq!(iso(-5, ' '), "");
        assert_eq!(iso(1_000, 'T'), "1970-01-01T00:00:01Z");
        assert_eq!(iso(951_782_400_000, ' '), "2000-02-29 00:00:00Z");
        assert_eq!(iso(1_795_757_665_123, 'T'), "2026-11-27T05:34:25Z");
    }
}
