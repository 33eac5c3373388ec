//! A set of expert ids of one layer (up to 256 experts), as a bitset.

use crate::ExpertId;

/// A set of experts of one MoE layer; ids 256 and above are ignored (models
/// with more routed experts per layer are not regrouped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExpertSet([u64; 4]);

impl ExpertSet {
    /// Largest number of experts a set can describe.
    pub const CAPACITY: usize = 256;

    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an expert.
    pub fn insert(&mut self, e: ExpertId) {
        let i = e.index();
        if i < Self::CAPACITY {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether `e` is in the set.
    pub fn contains(&self, e: ExpertId) -> bool {
        let i = e.index();
        i < Self::CAPACITY && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    /// `self ∪ other`.
    pub fn union(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    /// Members of `self` not in `other`.
    pub fn count_outside(&self, other: &Self) -> usize {
        self.0.iter().zip(&other.0).map(|(a, b)| (a & !b).count_ones() as usize).sum()
    }
}

impl FromIterator<ExpertId> for ExpertSet {
    fn from_iter<I: IntoIterator<Item = ExpertId>>(iter: I) -> Self {
        let mut s = Self::new();
        iter.into_iter().for_each(|e| s.insert(e));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let a: ExpertSet = [1, 70, 255, 300].into_iter().map(ExpertId).collect();
        assert_eq!(a.len(), 3, "300 is beyond the capacity");
        assert!(a.contains(ExpertId(70)) && !a.contains(ExpertId(2)));
        let b: ExpertSet = [1, 2].into_iter().map(ExpertId).collect();
        assert_eq!(a.union(&b).len(), 4);
        assert_eq!(b.count_outside(&a), 1);
        assert!(ExpertSet::new().is_empty());
    }
}
