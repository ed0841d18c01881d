//! PostgreSQL log sequence numbers (`16/B374D848`) and byte sizes (`16MB`).
//!
//! LSNs arrive as text from PostgreSQL and leave as text in the status JSON, so that the JSON
//! reads like `pg_current_wal_lsn()` does in psql.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 0/16B3748")]
pub struct LsnParseError(pub String);

impl Lsn {
    /// Bytes from `other` up to `self`; zero when `other` is ahead.
    pub fn bytes_after(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: expected bytes or a number with a unit (B, kB, MB, GB, TB), like 16MB"
)]
pub struct SizeParseError(pub String);

/// Parses a size the way PostgreSQL and Patroni's `?lag=` do: plain bytes, or a number with a
/// 1024-based unit (`kB`, `MB`, `GB`, `TB`; case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, SizeParseError> {
    let t = s.trim();
    let err = || SizeParseError(s.to_string());
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_lsns() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!(" 0/3000060 ".parse::<Lsn>().unwrap(), Lsn(0x3000060));
        for bad in ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn lsn_arithmetic_saturates() {
        let a: Lsn = "1/0".parse().unwrap();
        let b: Lsn = "0/FFFFFF00".parse().unwrap();
        assert_eq!(a.bytes_after(b), 0x100);
        assert_eq!(b.bytes_after(a), 0);
        assert!(a > b);
    }

    #[test]
    fn lsn_json_is_text() {
        let l = Lsn(0x3000060);
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"0/3000060\"");
        let back: Lsn = serde_json::from_str("\"0/3000060\"").unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("16mb").unwrap(), 16 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("10kB").unwrap(), 10240);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("MB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999TB").is_err());
    }
}
