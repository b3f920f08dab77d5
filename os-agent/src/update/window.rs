//! Maintenance windows for the `window` reboot strategy: days of the week, a
//! start time and a length, in a time zone.
//!
//! A zone is `UTC`, a fixed offset (`+02:00`, `-05:30`) or an IANA name
//! (`Europe/Berlin`) from the host's zoneinfo (the image's tzdata), with its
//! daylight saving time: a window at 02:00 Europe/Berlin opens at 02:00 local
//! time in winter and in summer. On the day a start time does not exist (the
//! clocks jump over it) the window opens as much later as the clocks jumped
//! (02:30 → 03:30), as RFC 5545 and systemd calendar events do; where it
//! exists twice, at the first. A window lasts its length in elapsed time.

use anyhow::{bail, Context, Result};
use jiff::civil::{Date, Time};
use jiff::tz::{Offset, TimeZone};
use jiff::{Timestamp, ToSpan};

pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A weekly maintenance window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days the window opens on, 0 = Monday.
    pub days: Vec<u8>,
    /// Minutes after local midnight.
    pub start_minute: u32,
    pub length_minutes: u32,
    pub zone: Zone,
}

/// A time zone and the name it was written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub tz: TimeZone,
}

impl Zone {
    pub fn utc() -> Zone {
        Zone {
            name: "UTC".into(),
            tz: TimeZone::UTC,
        }
    }
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

/// Parses `UTC` (or `Z`), a fixed offset `+HH:MM` / `-HH:MM`, or an IANA
/// zone name found in the host's zoneinfo.
pub fn parse_timezone(s: &str) -> Result<Zone> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Ok(Zone::utc());
    }
    let sign = match s.as_bytes().first() {
        Some(b'+') => Some(1),
        Some(b'-') => Some(-1),
        _ => None,
    };
    let tz = match sign {
        Some(sign) => {
            let minutes = parse_hhmm(&s[1..])
                .with_context(|| format!("timezone {s:?}: the offset is not HH:MM"))?;
            if minutes > 14 * 60 {
                bail!("timezone {s:?}: offsets go up to 14:00");
            }
            let secs = sign * minutes as i32 * 60;
            TimeZone::fixed(
                Offset::from_seconds(secs)
                    .with_context(|| format!("timezone {s:?}: not an offset"))?,
            )
        }
        None => TimeZone::get(s).map_err(|e| {
            anyhow::anyhow!(
                "timezone {s:?}: not UTC, a fixed offset like \"+02:00\" or a zone of the \
                 host's zoneinfo like \"Europe/Berlin\" ({e})"
            )
        })?,
    };
    Ok(Zone {
        name: s.to_string(),
        tz,
    })
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
    /// The local date of `now` in the window's zone.
    fn local_date(&self, now: u64) -> Option<Date> {
        let ts = Timestamp::from_second(i64::try_from(now).ok()?).ok()?;
        Some(ts.to_zoned(self.zone.tz.clone()).date())
    }

    /// The instant (Unix seconds) the window opens on `date`, if it opens
    /// that day.
    fn opening_on(&self, date: Date) -> Option<i64> {
        let wd = date.weekday().to_monday_zero_offset();
        if !self.days.contains(&u8::try_from(wd).ok()?) {
            return None;
        }
        let (h, m) = (self.start_minute / 60, self.start_minute % 60);
        let time = Time::new(i8::try_from(h).ok()?, i8::try_from(m).ok()?, 0, 0).ok()?;
        let open = self
            .zone
            .tz
            .to_ambiguous_zoned(date.to_datetime(time))
            .compatible()
            .ok()?;
        Some(open.timestamp().as_second())
    }

    /// Openings from `from_days` to `to_days` days around `now`'s local date.
    fn openings(&self, now: u64, days: std::ops::RangeInclusive<i64>) -> Vec<i64> {
        let Some(today) = self.local_date(now) else {
            return Vec::new();
        };
        days.filter_map(|d| today.checked_add(d.days()).ok())
            .filter_map(|date| self.opening_on(date))
            .collect()
    }

    /// Whether `now` (Unix seconds) is inside a window. A window may run past
    /// midnight and past Sunday into Monday.
    pub fn contains(&self, now: u64) -> bool {
        let now = now as i64;
        let len = i64::from(self.length_minutes) * 60;
        self.openings(now as u64, -8..=0)
            .into_iter()
            .any(|open| open <= now && now < open + len)
    }

    /// The next time (Unix seconds) a window opens after `now`; `now` itself
    /// if one is open.
    pub fn next_opening(&self, now: u64) -> u64 {
        if self.contains(now) {
            return now;
        }
        self.openings(now, 0..=8)
            .into_iter()
            .filter(|&open| open > now as i64)
            .min()
            .and_then(|open| u64::try_from(open).ok())
            // No day listed opens within eight days (none listed): a week on.
            .unwrap_or(now + 7 * 86_400)
    }

    /// `mon,thu 02:00 for 60 min (Europe/Berlin)`, for logs and status.
    pub fn describe(&self) -> String {
        let days: Vec<&str> = self.days.iter().map(|&d| DAY_NAMES[d as usize]).collect();
        let tz = match self.zone.name.as_bytes().first() {
            Some(b'+' | b'-') => format!("UTC{}", self.zone.name),
            _ => self.zone.name.clone(),
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
            zone: parse_timezone(tz).unwrap(),
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
        // Europe/Berlin: UTC+1 in winter, UTC+2 in summer. 2024-03-31 02:00
        // local does not exist (clocks go 02:00 → 03:00 = 01:00 UTC); on
        // 2024-10-27 02:00-03:00 local comes twice (00:00 and 01:00 UTC).
        let berlin_spring = 1_711_846_800; // 2024-03-31 01:00 UTC, Sunday
        let berlin_autumn = 1_729_987_200; // 2024-10-27 00:00 UTC, Sunday
        let cases_dst: Vec<(&str, Window, u64, bool, u64)> = vec![
            (
                "winter: 02:00 local is 01:00 UTC",
                window(&[0], "02:00", 60, "Europe/Berlin"),
                MONDAY + h,
                true,
                MONDAY + h,
            ),
            (
                "summer: 02:00 local is 00:00 UTC",
                window(&[0, 1, 2, 3, 4, 5, 6], "02:00", 60, "Europe/Berlin"),
                1_719_792_000, // 2024-07-01 00:00 UTC
                true,
                1_719_792_000,
            ),
            (
                "summer: before 02:00 local",
                window(&[0, 1, 2, 3, 4, 5, 6], "02:00", 60, "Europe/Berlin"),
                1_719_792_000 - 60,
                false,
                1_719_792_000,
            ),
            (
                "a start in the spring gap opens as much later as the clocks jumped",
                window(&[6], "02:30", 60, "Europe/Berlin"),
                berlin_spring - 60,
                false,
                berlin_spring + 30 * 60,
            ),
            (
                "a start that comes twice opens at the first",
                window(&[6], "02:30", 30, "Europe/Berlin"),
                berlin_autumn + 30 * 60,
                true,
                berlin_autumn + 30 * 60,
            ),
        ];
        for (what, w, now, inside, next) in cases.into_iter().chain(cases_dst) {
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
        let offset = |tz: &str| {
            let z = parse_timezone(tz).unwrap();
            z.tz.to_offset(Timestamp::UNIX_EPOCH).seconds()
        };
        assert_eq!(offset("UTC"), 0);
        assert_eq!(offset("-05:30"), -(5 * 3600 + 1800));
        assert_eq!(offset("Europe/Berlin"), 3600);
        for bad in ["Europe/Nowhere", "+25:00", "", "../etc/passwd", "Berlin"] {
            let e = format!("{:#}", parse_timezone(bad).unwrap_err());
            assert!(e.contains("timezone"), "{bad}: {e}");
        }
        assert!(parse_hhmm("24:00").is_err());
        assert!(parse_hhmm("7").is_err());
        assert_eq!(
            window(&[0, 3], "02:05", 90, "+02:00").describe(),
            "mon,thu 02:05 for 90 min (UTC+02:00)"
        );
    }
}
