//! Durations in configuration files: `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration read from configuration. Displays the way it is written (`1500ms`, `10s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfDuration(pub Duration);

impl ConfDuration {
    pub const fn secs(s: u64) -> Self {
        ConfDuration(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        ConfDuration(Duration::from_millis(ms))
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h`, `1d`, or a bare integer meaning seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("invalid duration {s:?}: expected a number with a unit (ms, s, m, h, d), like 10s")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

impl fmt::Display for ConfDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for ConfDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ConfDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"10s\", \"2m\" or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ConfDuration, E> {
                Ok(ConfDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ConfDuration, E> {
                u64::try_from(v)
                    .map(|v| ConfDuration(Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ConfDuration, E> {
                parse_duration(v).map(ConfDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "10x", "1.5s", "-1s", "ten seconds"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn displays_as_written() {
        assert_eq!(ConfDuration::millis(1500).to_string(), "1500ms");
        assert_eq!(ConfDuration::secs(10).to_string(), "10s");
    }
}
