//! WAL positions (LSNs): a 64-bit byte offset into the write-ahead log, written by Postgres as
//! two hex halves, `16/B374D848`. Every layer speaks LSNs (the decoder reads them off the wire,
//! the pipeline tracks them, the CLI takes `--stop-at-lsn`), so the type lives on its own.

use std::fmt;
use std::str::FromStr;

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which Postgres uses for "none".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not of the form `HI/LO` with both halves hexadecimal 32-bit numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseLsnError(text.to_owned());
        let (high, low) = text.trim().split_once('/').ok_or_else(invalid)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| invalid())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| invalid())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

/// Read from its text form (`0/16B3748`), as in a config file.
impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for value in [0, 1, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
    }

    #[test]
    fn rejects_malformed_text() {
        for text in ["", "16", "16/", "/1", "G/0", "1/2/3", "100000000/0"] {
            assert!(text.parse::<Lsn>().is_err(), "{text:?} parsed");
        }
    }
}
