//! Maintenance windows for the `window` reboot strategy: days of the week, a
//! start time and a length, in UTC or at a fixed offset from it.
//!
//! Time zones are fixed offsets only (`UTC`, `+02:00`, `-05:30`): the image
//! carries no tz database the agent could trust to match the operator's, and
//! a fixed offset cannot be misread. A window that should follow daylight
//! saving time has to be moved by the operator twice a year.

use anyhow::{bail, Context, Result};

const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A weekly maintenance window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days the window opens on, 0 = Monday.
    pub days: Vec<u8>,
    /// Minutes after local midnight.
    pub start_minute: u32,
    pub length_minutes: u32,
    /// Offset of local time from UTC, in seconds.
    pub utc_offset_secs: i32,
}

/// Parses `HH:MM`.
pub fn parse_hhmm(s: &str) -> Result<u32> {
    let (h, m) = s
        .split_once(':')
        .with_context(|| format!("{s:?} is not HH:MM"))?;
    let h: u32 = h.parse().with_context(|| format!("{s:?} is not HH:MM"))?;
    let m: u32 = m.parse().with_context(|| format!("{s:?} is not HH:MM"))?;
    if h > 23 || m > 59 {
        bail!("{s:?} is not a time of day (00:00 to 23:59)");
    }
    Ok(h * 60 + m)
}

/// Parses `UTC` (or `Z`) or a fixed offset `+HH:MM` / `-HH:MM`.
pub fn parse_timezone(s: &str) -> Result<i32> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => bail!("timezone {s:?}: only \"UTC\" or a fixed offset like \"+02:00\" is supported"),
    };
    let minutes =
        parse_hhmm(rest).with_context(|| format!("timezone {s:?}: the offset is not HH:MM"))?;
    if minutes > 14 * 60 {
        bail!("timezone {s:?}: offsets go up to 14:00");
    }
    Ok(sign * minutes as i32 * 60)
}

/// Parses `mon`..`sun` (also full English names, any case).
pub fn parse_day(s: &str) -> Result<u8> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let lower = s.to_ascii_lowercase();
    (0..7u8)
        .find(|&i| lower == DAY_NAMES[i as usize] || lower == FULL[i as usize])
        .with_context(|| format!("{s:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))
}

impl Window {
    /// Local seconds since Monday 00:00 of the week holding `now`.
    fn week_position(&self, now: u64) -> i64 {
        let local = now as i64 + i64::from(self.utc_offset_secs);
        // 1970-01-01 was a Thursday: shift so that 0 is a Monday.
        (local + 3 * DAY).rem_euclid(WEEK)
    }

    /// Openings in the week, as seconds after Monday 00:00 local time.
    fn openings(&self) -> impl Iterator<Item = i64> + '_ {
        self.days
            .iter()
            .map(|&d| i64::from(d) * DAY + i64::from(self.start_minute) * 60)
    }

    /// Whether `now` (Unix seconds) is inside a window. A window may run past
    /// midnight and past Sunday into Monday.
    pub fn contains(&self, now: u64) -> bool {
        let pos = self.week_position(now);
        let len = i64::from(self.length_minutes) * 60;
        self.openings().any(|open| {
            let since = (pos - open).rem_euclid(WEEK);
            since < len
        })
    }

    /// The next time (Unix seconds) a window opens after `now`; `now` itself
    /// if one is open.
    pub fn next_opening(&self, now: u64) -> u64 {
        if self.contains(now) {
            return now;
        }
        let pos = self.week_position(now);
        let wait = self
            .openings()
            .map(|open| (open - pos).rem_euclid(WEEK))
            .min()
            .unwrap_or(WEEK);
        now + wait as u64
    }

    /// `mon,thu 02:00 +60min UTC+02:00`, for logs and status.
    pub fn describe(&self) -> String {
        let days: Vec<&str> = self.days.iter().map(|&d| DAY_NAMES[d as usize]).collect();
        let off = self.utc_offset_secs;
        let tz = if off == 0 {
            "UTC".to_string()
        } else {
            let a = off.unsigned_abs() / 60;
            format!(
                "UTC{}{:02}:{:02}",
                if off < 0 { '-' } else { '+' },
                a / 60,
                a % 60
            )
        };
        format!(
            "{} {:02}:{:02} for {} min ({tz})",
            days.join(","),
            self.start_minute / 60,
            self.start_minute % 60,
            self.length_minutes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-01-01 00:00:00 UTC was a Monday.
    const MONDAY: u64 = 1_704_067_200;

    fn window(days: &[u8], start: &str, len: u32, tz: &str) -> Window {
        Window {
            days: days.to_vec(),
            start_minute: parse_hhmm(start).unwrap(),
            length_minutes: len,
            utc_offset_secs: parse_timezone(tz).unwrap(),
        }
    }

    #[test]
    fn table_of_times() {
        let h = 3600;
        let cases: Vec<(&str, Window, u64, bool, u64)> = vec![
            // (what, window, now, inside, next opening)
            (
                "before",
                window(&[0], "02:00", 60, "UTC"),
                MONDAY + h,
                false,
                MONDAY + 2 * h,
            ),
            (
                "at start",
                window(&[0], "02:00", 60, "UTC"),
                MONDAY + 2 * h,
                true,
                MONDAY + 2 * h,
            ),
            (
                "inside",
                window(&[0], "02:00", 60, "UTC"),
                MONDAY + 2 * h + 59 * 60,
                true,
                MONDAY + 2 * h + 59 * 60,
            ),
            (
                "at end",
                window(&[0], "02:00", 60, "UTC"),
                MONDAY + 3 * h,
                false,
                MONDAY + 7 * 24 * h + 2 * h,
            ),
            (
                "next day",
                window(&[0, 1], "02:00", 60, "UTC"),
                MONDAY + 3 * h,
                false,
                MONDAY + 26 * h,
            ),
            (
                "over midnight",
                window(&[6], "23:00", 120, "UTC"),
                MONDAY + 30 * 60,
                true,
                MONDAY + 30 * 60,
            ),
            (
                "offset",
                window(&[0], "02:00", 60, "+02:00"),
                MONDAY,
                true,
                MONDAY,
            ),
            (
                "offset before",
                window(&[0], "02:00", 60, "+02:00"),
                MONDAY + h,
                false,
                MONDAY + 7 * 24 * h,
            ),
            (
                "negative offset",
                window(&[6], "22:00", 60, "-05:00"),
                MONDAY + 3 * h + 60,
                true,
                MONDAY + 3 * h + 60,
            ),
        ];
        for (what, w, now, inside, next) in cases {
            assert_eq!(w.contains(now), inside, "{what}");
            assert_eq!(w.next_opening(now), next, "{what}");
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_day("Mon").unwrap(), 0);
        assert_eq!(parse_day("sunday").unwrap(), 6);
        assert!(parse_day("mo").is_err());
        assert!(parse_day("monkey").is_err());
        assert_eq!(parse_timezone("UTC").unwrap(), 0);
        assert_eq!(parse_timezone("-05:30").unwrap(), -(5 * 3600 + 1800));
        let e = parse_timezone("Europe/Berlin").unwrap_err().to_string();
        assert!(e.contains("fixed offset"), "{e}");
        assert!(parse_hhmm("24:00").is_err());
        assert!(parse_hhmm("7").is_err());
        assert_eq!(
            window(&[0, 3], "02:05", 90, "+02:00").describe(),
            "mon,thu 02:05 for 90 min (UTC+02:00)"
        );
    }
}
