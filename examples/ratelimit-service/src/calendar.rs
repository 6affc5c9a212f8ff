//! Calendar periods (the current hour, day, ISO week or month in an IANA time zone) for rates
//! that reset at a period's start rather than rolling. The service owns this arithmetic, with
//! the bundled time zone database, so the plugin carries none of it.

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use wire::Period;

/// A zone the service does not know, or a time outside what the calendar can name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarError(pub String);

/// The zone named `name` (IANA, e.g. `Asia/Shanghai`; `UTC`).
pub fn zone(name: &str) -> Result<TimeZone, CalendarError> {
    TimeZone::get(name).map_err(|_| CalendarError(format!("unknown time zone \"{name}\"")))
}

/// The period of kind `period` that holds `now_ms`, as `[start, end)` in ms since the epoch.
/// Periods begin at local midnight (or the first instant of the day where a DST change skips
/// midnight), weeks on Monday, so a DST day lasts 23 or 25 hours.
pub fn bounds(period: Period, tz: &TimeZone, now_ms: i64) -> Result<(i64, i64), CalendarError> {
    let failed = |e: jiff::Error| CalendarError(format!("calendar arithmetic failed: {e}"));
    let now = Timestamp::from_millisecond(now_ms)
        .map_err(failed)?
        .to_zoned(tz.clone());
    let (start, end): (Zoned, Zoned) = match period {
        Period::Hour => {
            // Whole hours since the epoch in local time: the zone's offset may not be whole.
            let offset_ms = i64::from(now.offset().seconds()) * 1000;
            let local = now_ms + offset_ms;
            let start_ms = local - local.rem_euclid(3_600_000) - offset_ms;
            return Ok((start_ms, start_ms + 3_600_000));
        }
        Period::Day => {
            let start = now.start_of_day().map_err(failed)?;
            let end = start
                .checked_add(1.day())
                .and_then(|d| d.start_of_day())
                .map_err(failed)?;
            (start, end)
        }
        Period::Week => {
            let back = i64::from(now.weekday().to_monday_zero_offset());
            let start = now
                .checked_sub(back.days())
                .and_then(|d| d.start_of_day())
                .map_err(failed)?;
            let end = start
                .checked_add(1.week())
                .and_then(|d| d.start_of_day())
                .map_err(failed)?;
            (start, end)
        }
        Period::Month => {
            let start = now
                .first_of_month()
                .and_then(|d| d.start_of_day())
                .map_err(failed)?;
            let end = start
                .checked_add(1.month())
                .and_then(|d| d.start_of_day())
                .map_err(failed)?;
            (start, end)
        }
    };
    Ok((
        start.timestamp().as_millisecond(),
        end.timestamp().as_millisecond(),
    ))
}

/// `ms` as RFC 3339 in `tz` (`2026-12-01T00:00:00+08:00`), for the client's 429 and `/v1/quota`.
pub fn rfc3339(ms: i64, tz: &TimeZone) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(t) => t
            .to_zoned(tz.clone())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string(),
        Err(_) => String::new(),
    }
}

/// A stable number for a rate's period and zone: every period of one rate shares one stored
/// state (the state holds the current period's bounds).
pub fn zone_id(period: Period, name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in period.name().bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Positive, and exact as a Lua double.
    (h >> 11) as i64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn period(p: Period, zone_name: &str, now: &str) -> (String, String) {
        let tz = zone(zone_name).unwrap();
        let (start, end) = bounds(p, &tz, at(now)).unwrap();
        (rfc3339(start, &tz), rfc3339(end, &tz))
    }

    #[test]
    fn months_end_on_their_last_day_leap_years_included() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            period(Period::Month, "UTC", "2024-02-29T23:59:59.999Z"),
            s("2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00")
        );
        assert_eq!(
            period(Period::Month, "UTC", "2023-02-28T12:00:00Z"),
            s("2023-02-01T00:00:00+00:00", "2023-03-01T00:00:00+00:00")
        );
        assert_eq!(
            period(Period::Month, "UTC", "2026-12-31T23:00:00Z"),
            s("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")
        );
        // 2026-11-30T20:00Z is already December 1st in Shanghai (UTC+8).
        assert_eq!(
            period(Period::Month, "Asia/Shanghai", "2026-11-30T20:00:00Z"),
            s("2026-12-01T00:00:00+08:00", "2027-01-01T00:00:00+08:00")
        );
        assert_eq!(
            period(Period::Month, "Asia/Shanghai", "2026-11-30T15:59:59Z"),
            s("2026-11-01T00:00:00+08:00", "2026-12-01T00:00:00+08:00")
        );
    }

    #[test]
    fn dst_days_last_23_and_25_hours() {
        let tz = zone("America/New_York").unwrap();
        // 2026-03-08: clocks go forward at 02:00 (EST → EDT).
        let (start, end) = bounds(Period::Day, &tz, at("2026-03-08T12:00:00Z")).unwrap();
        assert_eq!(end - start, 23 * 3_600_000);
        assert_eq!(rfc3339(start, &tz), "2026-03-08T00:00:00-05:00");
        assert_eq!(rfc3339(end, &tz), "2026-03-09T00:00:00-04:00");
        // 2026-11-01: clocks go back at 02:00 (EDT → EST).
        let (start, end) = bounds(Period::Day, &tz, at("2026-11-01T12:00:00Z")).unwrap();
        assert_eq!(end - start, 25 * 3_600_000);
        // A month across the change is not a whole number of days in UTC.
        let (start, end) = bounds(Period::Month, &tz, at("2026-03-15T00:00:00Z")).unwrap();
        assert_eq!(end - start, 31 * 86_400_000 - 3_600_000);
        // Hours stay an hour long on either side.
        let (start, end) = bounds(Period::Hour, &tz, at("2026-11-01T06:30:00Z")).unwrap();
        assert_eq!(
            (end - start, rfc3339(start, &tz).as_str()),
            (3_600_000, "2026-11-01T01:00:00-05:00")
        );
    }

    #[test]
    fn weeks_start_on_monday_and_hours_follow_half_hour_zones() {
        // 2026-12-03 is a Thursday.
        assert_eq!(
            period(Period::Week, "UTC", "2026-12-03T10:00:00Z").0,
            "2026-11-30T00:00:00+00:00"
        );
        assert_eq!(
            period(Period::Week, "UTC", "2026-11-30T00:00:00Z").0,
            "2026-11-30T00:00:00+00:00"
        );
        assert_eq!(
            period(Period::Hour, "Asia/Kolkata", "2026-12-01T10:10:00Z"),
            (
                "2026-12-01T15:00:00+05:30".to_string(),
                "2026-12-01T16:00:00+05:30".to_string()
            )
        );
    }

    #[test]
    fn unknown_zones_are_refused_by_name() {
        assert_eq!(
            zone("Mars/Olympus").unwrap_err(),
            CalendarError("unknown time zone \"Mars/Olympus\"".into())
        );
        assert_ne!(zone_id(Period::Month, "UTC"), zone_id(Period::Day, "UTC"));
        assert_ne!(
            zone_id(Period::Month, "UTC"),
            zone_id(Period::Month, "Asia/Shanghai")
        );
    }
}
