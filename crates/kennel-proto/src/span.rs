//! How every duration in kennel's configuration is written: a number with a unit, `"500ms"`,
//! `"30s"`, `"5m"`, `"24h"`, `"7d"`, or several, `"1h30m"`. A bare number is refused: its unit
//! would be a guess.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configured duration (see the module documentation for how it is written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(Duration);

/// The units, largest first (as [`Span`]'s `Display` writes them), in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Span {
    pub const ZERO: Span = Span(Duration::ZERO);

    pub const fn from_millis(ms: u64) -> Span {
        Span(Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Span {
        Span(Duration::from_secs(s))
    }

    pub const fn get(self) -> Duration {
        self.0
    }

    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Reads `"1h30m"`, `"250ms"`, `"0s"`. The error says what is wrong and shows how to write
    /// it (`"15" has no unit; write e.g. "15s" or "500ms"`).
    pub fn parse(text: &str) -> Result<Span, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err(format!("an empty duration; {HOW}"));
        }
        let mut total: u64 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits == 0 {
                return Err(format!("\"{text}\" is not a duration; {HOW}"));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("\"{text}\" is too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                    .len();
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let Some((_, ms)) = UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(if unit.is_empty() && rest.is_empty() && digits == t.len() {
                    no_unit(&format!("\"{text}\""), t)
                } else if unit.is_empty() {
                    format!("\"{text}\" has a number without a unit; {HOW}")
                } else {
                    format!("\"{text}\" has an unknown unit \"{unit}\"; {HOW}")
                });
            };
            total = n
                .checked_mul(*ms)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("\"{text}\" is too large"))?;
        }
        Ok(Span::from_millis(total))
    }
}

/// How a duration is written, the end of every error about one.
const HOW: &str =
    "write a whole number with a unit (ms, s, m, h, d), e.g. \"30s\", \"500ms\" or \"1h30m\"";

/// The error for `shown` (a number, or text ending in one) written without a unit: the fix is
/// the same text with `s` after it.
fn no_unit(shown: &str, digits: &str) -> String {
    format!("{shown} has no unit; write e.g. \"{digits}s\" or \"500ms\"")
}

impl From<Duration> for Span {
    fn from(d: Duration) -> Span {
        Span(d)
    }
}

impl From<Span> for Duration {
    fn from(s: Span) -> Duration {
        s.0
    }
}

/// The shortest form: `"90s"` is written `"1m30s"`, zero `"0s"`.
impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut left = self.as_millis();
        if left == 0 {
            return f.write_str("0s");
        }
        for (unit, ms) in UNITS {
            if left >= ms {
                write!(f, "{}{unit}", left / ms)?;
                left %= ms;
            }
        }
        Ok(())
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Span;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, e.g. \"30s\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Span, E> {
                Span::parse(v).map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Span, E> {
                Err(E::custom(no_unit(&v.to_string(), &v.to_string())))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Span, E> {
                Err(E::custom(match u64::try_from(v) {
                    Ok(v) => no_unit(&v.to_string(), &v.to_string()),
                    Err(_) => format!("{v} is not a duration; {HOW}"),
                }))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Span, E> {
                Err(E::custom(format!("{v} is not a duration; {HOW}")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_compounds_read_and_print_back_in_the_shortest_form() {
        for (text, ms, shown) in [
            ("500ms", 500, "500ms"),
            ("30s", 30_000, "30s"),
            ("90s", 90_000, "1m30s"),
            ("5m", 300_000, "5m"),
            ("24h", 86_400_000, "1d"),
            ("7d", 604_800_000, "7d"),
            ("1h30m", 5_400_000, "1h30m"),
            ("0s", 0, "0s"),
            (" 2s ", 2_000, "2s"),
        ] {
            let s = Span::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.as_millis(), ms, "{text}");
            assert_eq!(s.to_string(), shown, "{text}");
            assert_eq!(Span::parse(shown), Ok(s));
        }
    }

    #[test]
    fn a_number_without_a_unit_or_an_unknown_unit_is_refused_with_an_example() {
        assert_eq!(
            Span::parse("15").unwrap_err(),
            "\"15\" has no unit; write e.g. \"15s\" or \"500ms\""
        );
        let e = Span::parse("1h30").unwrap_err();
        assert!(
            e.contains("a number without a unit") && e.contains("\"1h30m\""),
            "{e}"
        );
        assert!(Span::parse("3 weeks").is_err());
        let e = Span::parse("3w").unwrap_err();
        assert!(
            e.contains("unknown unit \"w\"") && e.contains("\"30s\""),
            "{e}"
        );
        for bad in ["", "-5s", "1.5s", "soon", "s"] {
            let e = Span::parse(bad).unwrap_err();
            assert!(e.contains("e.g. \"30s\""), "{bad:?}: {e}");
        }
        assert!(Span::parse("99999999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn serde_takes_strings_and_refuses_bare_numbers() {
        #[derive(Deserialize, Serialize)]
        struct C {
            t: Span,
        }
        let c: C = serde_json::from_str(r#"{"t":"1m"}"#).unwrap();
        assert_eq!(c.t.get(), Duration::from_secs(60));
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"t":"1m"}"#);
        let e = serde_json::from_str::<C>(r#"{"t":15}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("15 has no unit; write e.g. \"15s\""), "{e}");
        for bad in [r#"{"t":-3}"#, r#"{"t":1.5}"#] {
            let e = serde_json::from_str::<C>(bad).err().unwrap().to_string();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
    }
}
