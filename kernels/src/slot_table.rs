//! Bookkeeping of a fixed pool of expert slots: which logical expert
//! (layer, expert) occupies which physical slot, and the flat
//! logical-to-slot map a device kernel can read (`-1`: not resident).
//!
//! Pure and synchronous, so it is tested on every machine; the CUDA pool
//! (`cuda::expert_pool`, feature `cuda`) holds one and moves the bytes. The
//! choice of which expert to evict is the cache policy's (moe-offload), not
//! this table's: it only records decisions and refuses inconsistent ones.

/// A logical expert: MoE layer index and expert index within the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertKey {
    /// Layer index (among all layers of the model).
    pub layer: usize,
    /// Expert index within the layer.
    pub expert: usize,
}

/// A physical slot of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

/// Why the table refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The key is outside the table's layers or experts.
    #[error("expert {0:?} is outside the table")]
    OutOfRange(ExpertKey),
    /// The key already occupies a slot.
    #[error("expert {0:?} is already resident")]
    AlreadyResident(ExpertKey),
    /// The key occupies no slot.
    #[error("expert {0:?} is not resident")]
    NotResident(ExpertKey),
    /// Every slot is taken; evict first.
    #[error("all {0} slots are occupied")]
    Full(usize),
}

/// Slot assignments of one pool.
#[derive(Clone, Debug)]
pub struct SlotTable {
    experts: usize,
    /// `layer * experts + expert` -> slot, or -1.
    map: Vec<i32>,
    owner: Vec<Option<ExpertKey>>,
    /// Free slots; the lowest id is handed out first (deterministic).
    free: std::collections::BTreeSet<SlotId>,
}

impl SlotTable {
    /// An empty table of `slots` slots for `layers` x `experts` logical experts.
    pub fn new(slots: usize, layers: usize, experts: usize) -> Self {
        assert!(slots <= i32::MAX as usize, "slot count must fit the device map's i32");
        Self {
            experts,
            map: vec![-1; layers * experts],
            owner: vec![None; slots],
            free: (0..slots as u32).map(SlotId).collect(),
        }
    }

    /// Slots in the pool.
    pub fn slots(&self) -> usize {
        self.owner.len()
    }

    /// Slots holding no expert.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    fn index(&self, k: ExpertKey) -> Result<usize, SlotError> {
        let i = k.layer * self.experts + k.expert;
        if k.expert < self.experts && i < self.map.len() {
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
        self.owner.get(slot.0 as usize).copied().flatten()
    }

    /// Gives `k` the lowest free slot.
    pub fn assign(&mut self, k: ExpertKey) -> Result<SlotId, SlotError> {
        let i = self.index(k)?;
        if self.map[i] >= 0 {
            return Err(SlotError::AlreadyResident(k));
        }
        let slot = self.free.pop_first().ok_or(SlotError::Full(self.owner.len()))?;
        self.map[i] = slot.0 as i32;
        self.owner[slot.0 as usize] = Some(k);
        Ok(slot)
    }

    /// Frees the slot of `k` and returns it.
    pub fn evict(&mut self, k: ExpertKey) -> Result<SlotId, SlotError> {
        let i = self.index(k)?;
        let slot = u32::try_from(self.map[i]).map(SlotId).map_err(|_| SlotError::NotResident(k))?;
        self.map[i] = -1;
        self.owner[slot.0 as usize] = None;
        self.free.insert(slot);
        Ok(slot)
    }

    /// The flat map a device kernel reads: entry `layer * experts + expert`
    /// is the expert's slot, or -1 when it is not resident.
    pub fn device_map(&self) -> &[i32] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer: usize, expert: usize) -> ExpertKey {
        ExpertKey { layer, expert }
    }

    #[test]
    fn assign_evict_and_map_agree() {
        let mut t = SlotTable::new(2, 2, 3);
        assert_eq!(t.assign(key(1, 2)), Ok(SlotId(0)));
        assert_eq!(t.assign(key(0, 0)), Ok(SlotId(1)));
        assert_eq!(t.assign(key(0, 1)), Err(SlotError::Full(2)));
        assert_eq!(t.assign(key(1, 2)), Err(SlotError::AlreadyResident(key(1, 2))));
        assert_eq!(t.device_map(), &[1, -1, -1, -1, -1, 0]);
        assert_eq!(t.evict(key(1, 2)), Ok(SlotId(0)));
        assert_eq!(t.evict(key(1, 2)), Err(SlotError::NotResident(key(1, 2))));
        assert_eq!(t.assign(key(0, 1)), Ok(SlotId(0)));
        assert_eq!((t.slot_of(key(0, 1)), t.owner(SlotId(0))), (Some(SlotId(0)), Some(key(0, 1))));
        assert_eq!(t.assign(key(0, 3)), Err(SlotError::OutOfRange(key(0, 3))));
        assert_eq!(t.assign(key(2, 0)), Err(SlotError::OutOfRange(key(2, 0))));
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
            let held: Vec<_> = t.device_map().iter().filter(|&&s| s >= 0).collect();
            assert_eq!(held.len() + t.free_slots(), t.slots());
            for (i, &s) in t.device_map().iter().enumerate() {
                if s >= 0 {
                    assert_eq!(t.owner(SlotId(s as u32)), Some(key(i / 4, i % 4)));
                }
            }
        }
    }
}
