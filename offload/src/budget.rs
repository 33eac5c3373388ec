//! `--expert-cache`: how many experts the fast tier holds.

use crate::OffloadError;
use std::str::FromStr;

/// The fast tier's size, as given by the user (parsed once at the edge, from
/// a flag, an environment variable or a TOML string).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ExpertBudget {
    /// Every expert resident (no cache).
    All,
    /// A fraction of all routed experts, in (0, 1].
    Fraction(f64),
    /// A number of expert slots.
    Count(usize),
    /// Bytes of expert weights.
    Bytes(u64),
}

impl FromStr for ExpertBudget {
    type Err = OffloadError;

    /// `all`, `50%`, `0.5` (a fraction has a decimal point), `24` (experts),
    /// or bytes with a unit: `64MiB`, `1.5GB`, `300000B` (B, KB, MB, GB, KiB,
    /// MiB, GiB).
    fn from_str(s: &str) -> Result<Self, OffloadError> {
        let bad = |message: &str| OffloadError::Budget { value: s.into(), message: message.into() };
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") || t.eq_ignore_ascii_case("full") {
            return Ok(Self::All);
        }
        let fraction = |f: f64| {
            if f.is_finite() && f > 0.0 && f <= 1.0 {
                Ok(Self::Fraction(f))
            } else {
                Err(bad("a fraction must be above 0 and at most 1 (100%)"))
            }
        };
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad("expected a percentage like 50%"))?;
            return fraction(v / 100.0);
        }
        let units: [(&str, f64); 7] = [
            ("KiB", 1024.0),
            ("MiB", 1024.0 * 1024.0),
            ("GiB", 1024.0 * 1024.0 * 1024.0),
            ("KB", 1e3),
            ("MB", 1e6),
            ("GB", 1e9),
            ("B", 1.0),
        ];
        for (unit, scale) in units {
            if let Some(n) = t.strip_suffix(unit) {
                let v: f64 = n.trim().parse().map_err(|_| bad("expected a number before the unit"))?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad("the size must be positive"));
                }
                return Ok(Self::Bytes((v * scale) as u64));
            }
        }
        if t.contains('.') {
            let v: f64 = t.parse().map_err(|_| bad("expected all, a percentage, a fraction, a count or bytes"))?;
            return fraction(v);
        }
        match t.parse::<usize>() {
            Ok(0) => Err(bad("the cache must hold at least one expert")),
            Ok(n) => Ok(Self::Count(n)),
            Err(_) => Err(bad("expected all, a percentage (50%), a fraction (0.5), a count (24) or bytes (64MiB)")),
        }
    }
}

moe_types::setting_from_str!(ExpertBudget);

impl std::fmt::Display for ExpertBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::All => f.write_str("all"),
            Self::Fraction(x) => write!(f, "{}%", x * 100.0),
            Self::Count(n) => write!(f, "{n}"),
            Self::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl ExpertBudget {
    /// Expert slots for a model with `total` routed experts of
    /// `expert_bytes` each; `None` means every expert resident. A budget at or
    /// above the total is also `None`.
    pub fn slots(&self, total: usize, expert_bytes: usize) -> Option<usize> {
        let n = match *self {
            Self::All => return None,
            Self::Fraction(f) => (f * total as f64).round() as usize,
            Self::Count(n) => n,
            Self::Bytes(b) => (b / expert_bytes.max(1) as u64) as usize,
        };
        (n < total).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let p = |s: &str| s.parse::<ExpertBudget>().unwrap();
        assert_eq!(p("all"), ExpertBudget::All);
        assert_eq!(p("50%"), ExpertBudget::Fraction(0.5));
        assert_eq!(p("0.25"), ExpertBudget::Fraction(0.25));
        assert_eq!(p("24"), ExpertBudget::Count(24));
        assert_eq!(p("2MiB"), ExpertBudget::Bytes(2 * 1024 * 1024));
        assert_eq!(p("1.5GB"), ExpertBudget::Bytes(1_500_000_000));
        assert_eq!(p("300B"), ExpertBudget::Bytes(300));
        for bad in ["", "0", "150%", "1.5", "-3", "x", "12 parsecs", "0MB"] {
            let e = bad.parse::<ExpertBudget>().unwrap_err().to_string();
            assert!(e.contains("invalid expert cache budget"), "{bad}: {e}");
        }
    }

    #[test]
    fn display_parses_back() {
        for b in [ExpertBudget::All, ExpertBudget::Fraction(0.5), ExpertBudget::Count(7), ExpertBudget::Bytes(4096)] {
            assert_eq!(b.to_string().parse::<ExpertBudget>().unwrap(), b);
        }
    }

    #[test]
    fn slots_round_and_saturate() {
        assert_eq!(ExpertBudget::Fraction(0.5).slots(32, 100), Some(16));
        assert_eq!(ExpertBudget::Fraction(1.0).slots(32, 100), None);
        assert_eq!(ExpertBudget::Count(40).slots(32, 100), None);
        assert_eq!(ExpertBudget::Bytes(1050).slots(32, 100), Some(10));
        assert_eq!(ExpertBudget::All.slots(32, 100), None);
    }
}
