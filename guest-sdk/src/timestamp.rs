//! Dates and timestamps from Postgres' text format (ISO `DateStyle`, the default), without a
//! date-time library.
//!
//! `timestamptz` values carry their UTC offset (`2024-05-01 12:30:00.25+02`); `timestamp`
//! values have none and are taken as UTC; `date` values are midnight UTC. `infinity` and
//! `-infinity` map to [`Timestamp::INFINITY`] and [`Timestamp::NEG_INFINITY`], the values
//! Postgres itself uses for them.

use crate::row::{FromPgText, type_oid};

/// A point in time, in microseconds since the Unix epoch (Postgres' own resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_micros: i64,
}

const MICROS_PER_SECOND: i64 = 1_000_000;

impl Timestamp {
    /// `infinity`.
    pub const INFINITY: Timestamp = Timestamp {
        unix_micros: i64::MAX,
    };
    /// `-infinity`.
    pub const NEG_INFINITY: Timestamp = Timestamp {
        unix_micros: i64::MIN,
    };

    /// The timestamp `unix_micros` microseconds after 1970-01-01 00:00:00 UTC.
    pub fn from_unix_micros(unix_micros: i64) -> Timestamp {
        Timestamp { unix_micros }
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.unix_micros
    }

    /// Whole seconds since the Unix epoch (rounded down) and the microseconds after them.
    pub fn as_secs_micros(self) -> (i64, u32) {
        let secs = self.unix_micros.div_euclid(MICROS_PER_SECOND);
        // `rem_euclid` of a positive divisor is in 0..1_000_000, so it fits a u32.
        let micros = self.unix_micros.rem_euclid(MICROS_PER_SECOND) as u32;
        (secs, micros)
    }
}

impl FromPgText for Timestamp {
    fn from_pg_text(text: &str, oid: u32) -> Result<Timestamp, String> {
        if !matches!(
            oid,
            type_oid::DATE | type_oid::TIMESTAMP | type_oid::TIMESTAMPTZ
        ) {
            return Err(format!("type oid {oid} is not a date or timestamp type"));
        }
        match text {
            "infinity" => return Ok(Timestamp::INFINITY),
            "-infinity" => return Ok(Timestamp::NEG_INFINITY),
            _ => {}
        }
        parse(text, oid).ok_or_else(|| format!("{text:?} is not an ISO date/timestamp"))
    }
}

/// A cursor over the ASCII text of a timestamp.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.at += 1;
        }
        matched
    }

    /// A run of at least `min` and at most `max` digits, with its length.
    fn number(&mut self, min: usize, max: usize) -> Option<(i64, usize)> {
        let start = self.at;
        let mut value: i64 = 0;
        while let Some(digit) = self.peek().filter(u8::is_ascii_digit) {
            if self.at - start == max {
                return None;
            }
            value = value * 10 + i64::from(digit - b'0');
            self.at += 1;
        }
        let len = self.at - start;
        (len >= min).then_some((value, len))
    }
}

fn parse(text: &str, oid: u32) -> Option<Timestamp> {
    let (text, before_christ) = match text.strip_suffix(" BC") {
        Some(text) => (text, true),
        None => (text, false),
    };
    let mut cursor = Cursor {
        bytes: text.as_bytes(),
        at: 0,
    };
    let (year, _) = cursor.number(4, 9)?;
    // 1 BC is year 0 of the proleptic Gregorian calendar, 2 BC is -1, and so on.
    let year = if before_christ { 1 - year } else { year };
    cursor.eat(b'-').then_some(())?;
    let (month, _) = cursor.number(2, 2)?;
    cursor.eat(b'-').then_some(())?;
    let (day, _) = cursor.number(2, 2)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut micros = days_from_civil(year, month, day).checked_mul(86_400 * MICROS_PER_SECOND)?;

    if oid != type_oid::DATE {
        cursor.eat(b' ').then_some(())?;
        let (hour, _) = cursor.number(2, 2)?;
        cursor.eat(b':').then_some(())?;
        let (minute, _) = cursor.number(2, 2)?;
        cursor.eat(b':').then_some(())?;
        let (second, _) = cursor.number(2, 2)?;
        // Postgres prints 24:00:00 for the end of a day; 60 is a leap second it accepts on input.
        if hour > 24 || minute > 59 || second > 60 {
            return None;
        }
        let mut fraction = 0;
        if cursor.eat(b'.') {
            let (digits, len) = cursor.number(1, 6)?;
            fraction = digits * 10_i64.pow(u32::try_from(6 - len).ok()?);
        }
        let time = ((hour * 60 + minute) * 60 + second) * MICROS_PER_SECOND + fraction;
        micros = micros.checked_add(time)?;
    }

    if oid == type_oid::TIMESTAMPTZ {
        let sign = match cursor.peek()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        cursor.at += 1;
        let (hours, _) = cursor.number(2, 2)?;
        let mut offset = hours * 3600;
        if cursor.eat(b':') {
            offset += cursor.number(2, 2)?.0 * 60;
            if cursor.eat(b':') {
                offset += cursor.number(2, 2)?.0;
            }
        }
        // The text is local time at `offset`; UTC is local time minus the offset.
        micros = micros.checked_sub(sign * offset * MICROS_PER_SECOND)?;
    }
    (cursor.at == cursor.bytes.len()).then_some(Timestamp::from_unix_micros(micros))
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str, oid: u32) -> Result<i64, String> {
        Timestamp::from_pg_text(text, oid).map(Timestamp::unix_micros)
    }

    #[test]
    fn parses_timestamptz_with_offsets_and_fractions() {
        // 2024-05-01T10:30:00.25Z = 1714559400.25
        assert_eq!(
            micros("2024-05-01 12:30:00.25+02", type_oid::TIMESTAMPTZ),
            Ok(1_714_559_400_250_000)
        );
        assert_eq!(
            micros("2024-05-01 05:00:00-05:30", type_oid::TIMESTAMPTZ),
            Ok(1_714_559_400_000_000)
        );
        assert_eq!(
            micros("1970-01-01 00:00:00+00", type_oid::TIMESTAMPTZ),
            Ok(0)
        );
    }

    #[test]
    fn parses_timestamp_date_and_specials() {
        assert_eq!(
            micros("1969-12-31 23:59:59.999999", type_oid::TIMESTAMP),
            Ok(-1)
        );
        assert_eq!(
            micros("2000-03-01", type_oid::DATE),
            Ok(951_868_800_000_000)
        );
        assert_eq!(micros("infinity", type_oid::DATE), Ok(i64::MAX));
        assert_eq!(
            Timestamp::from_unix_micros(-1).as_secs_micros(),
            (-1, 999_999)
        );
        // 0001-01-01 BC is year 0: 366 days (a leap year) before 0001-01-01 AD.
        let ad = micros("0001-01-01", type_oid::DATE).unwrap();
        let bc = micros("0001-01-01 BC", type_oid::DATE).unwrap();
        assert_eq!(ad - bc, 366 * 86_400 * MICROS_PER_SECOND);
    }

    #[test]
    fn rejects_malformed_text_and_other_types() {
        for bad in [
            "2024-05-01 12:30:00",            // timestamptz without offset
            "2024-13-01 12:30:00+00",         // month 13
            "2024-05-01T12:30:00+00",         // not ISO DateStyle output
            "2024-05-01 12:30:00.1234567+00", // 7 fraction digits
            "2024-05-01 12:30:00+00 extra",
            "",
        ] {
            assert!(
                Timestamp::from_pg_text(bad, type_oid::TIMESTAMPTZ).is_err(),
                "{bad}"
            );
        }
        assert!(Timestamp::from_pg_text("2024-05-01", type_oid::TEXT).is_err());
    }
}
