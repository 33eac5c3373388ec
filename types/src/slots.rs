//! Which logical expert occupies which physical slot of a fast tier.
//!
//! A fast tier (host-memory slots, GPU slots) holds a fixed number of
//! slots. [`SlotTable`] records the assignment both ways and the flat
//! logical-to-slot map a device kernel can read (`-1`: not resident). It
//! records decisions and refuses inconsistent ones; which expert to load or
//! evict is the residency core's choice (`moe-offload`), not this table's.

use crate::{ExpertId, MoeLayerId};
use std::collections::BTreeSet;

/// A logical expert of the model: its MoE layer and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// The MoE layer.
    pub layer: MoeLayerId,
    /// The expert within the layer.
    pub expert: ExpertId,
}

impl ExpertKey {
    /// The key of `expert` of MoE layer `layer`.
    pub fn new(layer: usize, expert: usize) -> Self {
        Self { layer: MoeLayerId(layer as u16), expert: ExpertId(expert as u16) }
    }

    /// `layer * experts + expert`: the key's position in per-expert arrays.
    pub fn flat(self, experts: usize) -> usize {
        self.layer.index() * experts + self.expert.index()
    }

    /// The inverse of [`flat`](Self::flat).
    pub fn from_flat(i: usize, experts: usize) -> Self {
        Self::new(i / experts, i % experts)
    }
}

impl std::fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "expert {} of MoE layer {}", self.expert, self.layer)
    }
}

/// A physical slot of a fast tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

impl SlotId {
    /// The slot's index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Why the table refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The key is outside the table's layers or experts.
    #[error("{0} is outside the table")]
    OutOfRange(ExpertKey),
    /// The key already occupies a slot.
    #[error("{0} is already resident")]
    AlreadyResident(ExpertKey),
    /// The key occupies no slot.
    #[error("{0} is not resident")]
    NotResident(ExpertKey),
    /// The slot is outside the table or taken.
    #[error("slot {0:?} is taken or does not exist")]
    SlotTaken(SlotId),
    /// Every slot is taken; evict first.
    #[error("all {0} slots are occupied")]
    Full(usize),
}

/// Slot assignments of one fast tier.
#[derive(Clone, Debug)]
pub struct SlotTable {
    experts: usize,
    /// `layer * experts + expert` -> slot, or -1.
    map: Vec<i32>,
    owner: Vec<Option<ExpertKey>>,
    /// Free slots; the lowest id is handed out first (deterministic).
    free: BTreeSet<SlotId>,
}

impl SlotTable {
    /// An empty table of `slots` slots for `layers` x `experts` logical experts.
    ///
    /// # Panics
    /// If `slots` does not fit the device map's `i32`.
    pub fn new(slots: usize, layers: usize, experts: usize) -> Self {
        assert!(slots <= i32::MAX as usize, "slot count must fit the device map's i32");
        Self {
            experts,
            map: vec![-1; layers * experts],
            owner: vec![None; slots],
            free: (0..slots as u32).map(SlotId).collect(),
        }
    }

    /// Slots in the tier.
    pub fn slots(&self) -> usize {
        self.owner.len()
    }

    /// Slots holding no expert.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    fn index(&self, k: ExpertKey) -> Result<usize, SlotError> {
        let i = k.flat(self.experts);
        if k.expert.index() < self.experts && i < self.map.len() {
            Ok(i)
        } else {
            Err(SlotError::OutOfRange(k))
        }
    }

    /// The slot holding `k`, if resident.
    pub fn slot_of(&self, k: ExpertKey) -> Option<SlotId> {
        let i = self.index(k).ok()?;
        u32::try_from(self.map[i]).ok().map(SlotId)
    }

    /// The expert in `slot`, if any.
    pub fn owner(&self, slot: SlotId) -> Option<ExpertKey> {
        self.owner.get(slot.index()).copied().flatten()
    }

    /// The lowest free slot, the one [`assign`](Self::assign) would hand out.
    pub fn first_free(&self) -> Option<SlotId> {
        self.free.first().copied()
    }

    /// Gives `k` the lowest free slot.
    pub fn assign(&mut self, k: ExpertKey) -> Result<SlotId, SlotError> {
        let slot = *self.free.first().ok_or(SlotError::Full(self.owner.len()))?;
        self.place(k, slot)?;
        Ok(slot)
    }

    /// Gives `k` the free slot `slot` (a mover mirroring the core's decision).
    pub fn place(&mut self, k: ExpertKey, slot: SlotId) -> Result<(), SlotError> {
        let i = self.index(k)?;
        if self.map[i] >= 0 {
            return Err(SlotError::AlreadyResident(k));
        }
        if !self.free.remove(&slot) {
            return Err(SlotError::SlotTaken(slot));
        }
        self.map[i] = slot.0 as i32;
        self.owner[slot.index()] = Some(k);
        Ok(())
    }

    /// Frees the slot of `k` and returns it.
    pub fn evict(&mut self, k: ExpertKey) -> Result<SlotId, SlotError> {
        let i = self.index(k)?;
        let slot = u32::try_from(self.map[i]).map(SlotId).map_err(|_| SlotError::NotResident(k))?;
        self.map[i] = -1;
        self.owner[slot.index()] = None;
        self.free.insert(slot);
        Ok(slot)
    }

    /// The flat map a device kernel reads: entry `layer * experts + expert`
    /// is the expert's slot, or -1 when it is not resident.
    pub fn device_map(&self) -> &[i32] {
        &self.map
    }

    /// Checks that the map and the owners are inverse to each other and the
    /// free set is exactly the unowned slots (tests and debug checks).
    pub fn check(&self) -> Result<(), String> {
        let held = self.map.iter().filter(|&&s| s >= 0).count();
        if held + self.free.len() != self.owner.len() {
            return Err(format!("{held} held + {} free != {} slots", self.free.len(), self.owner.len()));
        }
        for (i, &s) in self.map.iter().enumerate() {
            if s >= 0 && self.owner(SlotId(s as u32)) != Some(ExpertKey::from_flat(i, self.experts)) {
                return Err(format!("map entry {i} -> slot {s} is not owned back"));
            }
        }
        for (s, o) in self.owner.iter().enumerate() {
            if o.is_some() == self.free.contains(&SlotId(s as u32)) {
                return Err(format!("slot {s} is both owned and free, or neither"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer: usize, expert: usize) -> ExpertKey {
        ExpertKey::new(layer, expert)
    }

    #[test]
    fn assign_place_evict_and_map_agree() {
        let mut t = SlotTable::new(2, 2, 3);
        assert_eq!(t.assign(key(1, 2)), Ok(SlotId(0)));
        assert_eq!(t.assign(key(0, 0)), Ok(SlotId(1)));
        assert_eq!(t.assign(key(0, 1)), Err(SlotError::Full(2)));
        assert_eq!(t.assign(key(1, 2)), Err(SlotError::Full(2)));
        assert_eq!(t.device_map(), &[1, -1, -1, -1, -1, 0]);
        assert_eq!(t.evict(key(1, 2)), Ok(SlotId(0)));
        assert_eq!(t.evict(key(1, 2)), Err(SlotError::NotResident(key(1, 2))));
        assert_eq!(t.place(key(0, 0), SlotId(0)), Err(SlotError::AlreadyResident(key(0, 0))));
        assert_eq!(t.place(key(0, 1), SlotId(1)), Err(SlotError::SlotTaken(SlotId(1))));
        assert_eq!(t.place(key(0, 1), SlotId(0)), Ok(()));
        assert_eq!((t.slot_of(key(0, 1)), t.owner(SlotId(0))), (Some(SlotId(0)), Some(key(0, 1))));
        assert_eq!(t.place(key(0, 3), SlotId(0)), Err(SlotError::OutOfRange(key(0, 3))));
        assert_eq!(t.evict(key(2, 0)), Err(SlotError::OutOfRange(key(2, 0))));
        t.check().unwrap();
    }

    /// Any sequence of operations keeps the map and the owners inverse to
    /// each other, and no slot is held twice.
    #[test]
    fn map_and_owners_stay_inverse() {
        let mut t = SlotTable::new(3, 2, 4);
        let mut x = 0x9e37_79b9u32;
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let k = key((x % 2) as usize, ((x >> 8) % 4) as usize);
            let _ = if x & 0x10000 == 0 { t.assign(k).map(|_| ()) } else { t.evict(k).map(|_| ()) };
            t.check().unwrap();
        }
    }
}
