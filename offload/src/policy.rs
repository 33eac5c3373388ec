//! Cache policies: which resident expert to evict, and whether a prefetch
//! may evict anything at all. Pure functions of the candidates' counters.

use crate::OffloadError;
use std::cmp::Ordering;
use std::str::FromStr;

/// How the fast tier chooses victims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum PolicyKind {
    /// Least recently used (the baseline of most offloading systems).
    Lru,
    /// Least frequently used (tokens routed), ties by recency.
    Lfu,
    /// ExpertFlow: evict the expert with the least predicted value, the
    /// chance it is used at its layer's next run divided by how many layers
    /// away that run is. The chance comes from the predictor where it has
    /// forecast the layer (predicted: likely; not predicted: unlikely), else
    /// from how often the expert was used; experts predicted but then not
    /// used go first. Slots follow predicted demand across layers (no fixed
    /// per-layer share), and a prefetch only evicts an expert of less value.
    Predictive,
}

impl PolicyKind {
    /// Every policy, in report order.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Predictive];

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Lfu => "lfu",
            Self::Predictive => "predictive",
        }
    }
}

impl FromStr for PolicyKind {
    type Err = OffloadError;
    fn from_str(s: &str) -> Result<Self, OffloadError> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            OffloadError::Config(format!("unknown cache policy {s:?} (expected lru, lfu or predictive)"))
        })
    }
}

moe_types::setting_from_str!(named PolicyKind);

/// What a policy sees of a resident expert that may be evicted (not pinned,
/// not used by the running layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Candidate {
    /// The expert's index in the cache.
    pub slot: usize,
    /// Logical time of the last use.
    pub last_use: u64,
    /// Tokens routed to it so far.
    pub uses: u64,
    /// Predicted value: chance of use at its layer's next run over the
    /// distance to that run in layers.
    pub value: f64,
    /// Loaded by a prefetch and not used since.
    pub unused_prefetch: bool,
}

impl PolicyKind {
    /// Orders candidates: the smaller is evicted first.
    fn order(self, a: &Candidate, b: &Candidate) -> Ordering {
        let ties = || a.last_use.cmp(&b.last_use).then(a.slot.cmp(&b.slot));
        match self {
            Self::Lru => ties(),
            Self::Lfu => a.uses.cmp(&b.uses).then_with(ties),
            Self::Predictive => {
                a.value.total_cmp(&b.value).then(b.unused_prefetch.cmp(&a.unused_prefetch)).then_with(ties)
            }
        }
    }

    /// The expert to evict, if any candidate exists.
    pub(crate) fn victim(self, candidates: impl Iterator<Item = Candidate>) -> Option<Candidate> {
        candidates.min_by(|a, b| self.order(a, b))
    }

    /// Whether a prefetch of predicted `value` may evict `victim`.
    pub(crate) fn admits_prefetch(self, value: f64, victim: &Candidate) -> bool {
        match self {
            Self::Lru | Self::Lfu => true,
            Self::Predictive => victim.value < value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(slot: usize, last_use: u64, uses: u64, value: f64, unused_prefetch: bool) -> Candidate {
        Candidate { slot, last_use, uses, value, unused_prefetch }
    }

    #[test]
    fn each_policy_picks_its_victim() {
        let cands =
            [c(0, 5, 100, 0.0, false), c(1, 2, 50, 3.0, false), c(2, 9, 10, 0.0, true), c(3, 7, 10, 1.0, false)];
        let v = |p: PolicyKind| p.victim(cands.iter().copied()).unwrap().slot;
        assert_eq!(v(PolicyKind::Lru), 1);
        assert_eq!(v(PolicyKind::Lfu), 3, "fewest uses, ties by recency");
        assert_eq!(v(PolicyKind::Predictive), 2, "no value, and a prefetch that was not used");
        assert!(PolicyKind::Lru.victim(std::iter::empty()).is_none());
    }

    #[test]
    fn predictive_prefetch_never_evicts_more_valuable_experts() {
        let v = c(0, 1, 1, 2.0, false);
        assert!(!PolicyKind::Predictive.admits_prefetch(2.0, &v));
        assert!(PolicyKind::Predictive.admits_prefetch(3.0, &v));
        assert!(PolicyKind::Lru.admits_prefetch(0.5, &v));
        assert_eq!("lfu".parse::<PolicyKind>().unwrap(), PolicyKind::Lfu);
        assert!("mru".parse::<PolicyKind>().is_err());
    }
}
