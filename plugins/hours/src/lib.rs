//! Working hours: whether the request falls in the working day, in a time
//! zone, with French public holidays.
//!
//! Attributes: `{"open": bool, "holiday": bool}`. The cache lifetime it
//! returns ends at the next boundary (opening, closing, or local midnight,
//! when `holiday` may change), so a cached decision never outlives the
//! window it was made in.
//!
//! Configuration (defaults shown):
//! ```json
//! { "zone": "Europe/Paris", "days": ["mon", "tue", "wed", "thu", "fri"],
//!   "open": "08:00", "close": "19:00", "holidays": "fr",
//!   "extra_closed": ["2026-12-24"] }
//! ```
//! `holidays`: `fr` (the eleven national public holidays), `fr-alsace-moselle`
//! (plus Good Friday and 26 December) or `none`.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;
use vigie_plugin::{json, Outcome, Request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "paris")]
    zone: String,
    #[serde(default = "weekdays")]
    days: Vec<String>,
    #[serde(default = "eight")]
    open: String,
    #[serde(default = "nineteen")]
    close: String,
    #[serde(default = "fr")]
    holidays: String,
    /// More closed days (`YYYY-MM-DD`), e.g. a bridge day.
    #[serde(default)]
    extra_closed: Vec<String>,
}

fn paris() -> String {
    "Europe/Paris".into()
}
fn weekdays() -> Vec<String> {
    ["mon", "tue", "wed", "thu", "fri"]
        .iter()
        .map(|d| String::from(*d))
        .collect()
}
fn eight() -> String {
    "08:00".into()
}
fn nineteen() -> String {
    "19:00".into()
}
fn fr() -> String {
    "fr".into()
}

/// Easter Sunday (anonymous Gregorian algorithm).
pub fn easter(year: i32) -> Option<NaiveDate> {
    let a = year % 19;
    let b = year / 100;
    let c = year % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    NaiveDate::from_ymd_opt(year, month as u32, day as u32)
}

/// Whether `date` is a public holiday under `calendar`.
pub fn is_holiday(date: NaiveDate, calendar: &str) -> bool {
    if calendar == "none" {
        return false;
    }
    let fixed = [
        (1, 1),
        (5, 1),
        (5, 8),
        (7, 14),
        (8, 15),
        (11, 1),
        (11, 11),
        (12, 25),
    ];
    if fixed.contains(&(date.month(), date.day())) {
        return true;
    }
    let Some(easter) = easter(date.year()) else {
        return false;
    };
    let offset = date.signed_duration_since(easter).num_days();
    // Easter Monday, Ascension, Whit Monday.
    if [1, 39, 50].contains(&offset) {
        return true;
    }
    calendar == "fr-alsace-moselle" && (offset == -2 || (date.month(), date.day()) == (12, 26))
}

fn weekday(name: &str) -> Result<Weekday, String> {
    name.parse::<Weekday>()
        .map_err(|_| format!("`days`: `{name}` is not a day (mon, tue, ...)"))
}

fn time(text: &str, field: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(text, "%H:%M")
        .map_err(|_| format!("`{field}`: `{text}` is not HH:MM"))
}

struct Window {
    tz: Tz,
    days: Vec<Weekday>,
    open: NaiveTime,
    close: NaiveTime,
    holidays: String,
    extra: Vec<NaiveDate>,
}

impl Window {
    fn from(config: &Config) -> Result<Window, String> {
        let tz: Tz = config
            .zone
            .parse()
            .map_err(|_| format!("`zone`: `{}` is not an IANA time zone", config.zone))?;
        if !matches!(
            config.holidays.as_str(),
            "fr" | "fr-alsace-moselle" | "none"
        ) {
            return Err(format!(
                "`holidays`: `{}` is not fr, fr-alsace-moselle or none",
                config.holidays
            ));
        }
        let open = time(&config.open, "open")?;
        let close = time(&config.close, "close")?;
        if open >= close {
            return Err("`open` must be before `close`".into());
        }
        Ok(Window {
            tz,
            days: config
                .days
                .iter()
                .map(|d| weekday(d))
                .collect::<Result<_, _>>()?,
            open,
            close,
            holidays: config.holidays.clone(),
            extra: config
                .extra_closed
                .iter()
                .map(|d| {
                    NaiveDate::parse_from_str(d, "%Y-%m-%d")
                        .map_err(|_| format!("`extra_closed`: `{d}` is not YYYY-MM-DD"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    fn holiday(&self, date: NaiveDate) -> bool {
        is_holiday(date, &self.holidays) || self.extra.contains(&date)
    }

    fn working(&self, date: NaiveDate) -> bool {
        self.days.contains(&date.weekday()) && !self.holiday(date)
    }

    /// The UTC instant of a local date and time (the later one when a DST
    /// change repeats it, an hour on when one skips it).
    fn instant(&self, date: NaiveDate, t: NaiveTime) -> Option<DateTime<Utc>> {
        let local = date.and_time(t);
        self.tz
            .from_local_datetime(&local)
            .latest()
            .or_else(|| {
                self.tz
                    .from_local_datetime(&(local + chrono::Duration::hours(1)))
                    .latest()
            })
            .map(|d| d.with_timezone(&Utc))
    }
}

pub fn check(request: &Request, config: &Config) -> Result<Outcome, String> {
    let window = Window::from(config)?;
    let now = DateTime::<Utc>::from_timestamp_millis(request.now_unix_ms)
        .ok_or("the host's time is out of range")?;
    let local = now.with_timezone(&window.tz);
    let today = local.date_naive();
    let t = local.time();
    let open = window.working(today) && window.open <= t && t < window.close;
    // The next instant the answer can change.
    let tomorrow = today + Days::new(1);
    let mut next = window.instant(tomorrow, NaiveTime::MIN);
    let boundary = if open {
        Some(window.close)
    } else if window.working(today) && t < window.open {
        Some(window.open)
    } else {
        None
    };
    if let Some(b) = boundary.and_then(|b| window.instant(today, b)) {
        next = Some(next.map_or(b, |n| n.min(b)));
    }
    let ttl_ms = next
        .map(|n| (n - now).num_milliseconds().max(0) as u64)
        .unwrap_or(60_000);
    Ok(
        Outcome::new(json!({ "open": open, "holiday": window.holiday(today) }))
            .cache_for_ms(ttl_ms),
    )
}

vigie_plugin::plugin!(check);

#[cfg(test)]
mod tests {
    use super::*;
    use vigie_plugin::Value;

    fn at(utc: &str, config: Value) -> (Value, Option<u64>) {
        let ms = DateTime::parse_from_rfc3339(utc)
            .unwrap()
            .timestamp_millis();
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"").at(ms);
        let o = check(&req, &vigie_plugin::parse(&config).unwrap()).unwrap();
        (Value::Object(o.attributes), o.ttl_ms)
    }

    #[test]
    fn easter_dates() {
        assert_eq!(easter(2026), NaiveDate::from_ymd_opt(2026, 4, 5));
        assert_eq!(easter(2027), NaiveDate::from_ymd_opt(2027, 3, 28));
        assert_eq!(easter(2038), NaiveDate::from_ymd_opt(2038, 4, 25));
    }

    #[test]
    fn french_holidays() {
        let d = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
        for (m, day) in [
            (1, 1),
            (4, 6),
            (5, 1),
            (5, 8),
            (5, 14),
            (5, 25),
            (7, 14),
            (8, 15),
            (11, 1),
            (11, 11),
            (12, 25),
        ] {
            assert!(is_holiday(d(m, day), "fr"), "{m}-{day}");
        }
        assert!(!is_holiday(d(4, 3), "fr"));
        assert!(is_holiday(d(4, 3), "fr-alsace-moselle"), "Good Friday");
        assert!(is_holiday(d(12, 26), "fr-alsace-moselle"));
        assert!(!is_holiday(d(7, 14), "none"));
    }

    #[test]
    fn a_holiday_is_closed() {
        // Tuesday 14 July 2026, 10:00 in Paris.
        let (a, _) = at("2026-07-14T08:00:00Z", json!({}));
        assert_eq!(a, json!({"open": false, "holiday": true}));
        let (a, _) = at("2026-07-15T08:00:00Z", json!({}));
        assert_eq!(a, json!({"open": true, "holiday": false}));
    }

    #[test]
    fn the_window_is_local_time() {
        // 07:59 UTC on a winter Friday is 08:59 in Paris, 04:59 in Cayenne.
        assert_eq!(at("2026-11-27T07:59:00Z", json!({})).0["open"], true);
        assert_eq!(
            at("2026-11-27T07:59:00Z", json!({"zone": "America/Cayenne"})).0["open"],
            false
        );
        // Just before opening: the lifetime ends at opening (08:00 Paris = 07:00 UTC).
        let (a, ttl) = at("2026-11-27T06:59:00Z", json!({}));
        assert_eq!((a["open"].clone(), ttl), (json!(false), Some(60_000)));
        // Summer time: 08:30 in Paris is 06:30 UTC.
        assert_eq!(at("2026-07-15T06:30:00Z", json!({})).0["open"], true);
        // Open: the lifetime ends at closing, 19:00 Paris = 18:00 UTC.
        assert_eq!(at("2026-11-27T17:00:00Z", json!({})).1, Some(3_600_000));
        // After closing on Friday: until local midnight.
        assert_eq!(at("2026-11-27T22:00:00Z", json!({})).1, Some(3_600_000));
    }

    #[test]
    fn bad_config_is_named() {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"");
        for (config, field) in [
            (json!({"zone": "Mars/Olympus"}), "zone"),
            (json!({"open": "8h"}), "open"),
            (json!({"days": ["funday"]}), "days"),
            (json!({"holidays": "us"}), "holidays"),
            (json!({"extra_closed": ["24/12"]}), "extra_closed"),
        ] {
            let e = check(&req, &vigie_plugin::parse(&config).unwrap()).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }
}
