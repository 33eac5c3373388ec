//! A slot device for tests: copies finish only when the test says so, in
//! issue order, and a load into an occupied slot is refused (so a load issued
//! before its slot's eviction fails the test).

use super::SlotDevice;
use moe_types::{ExpertKey, SlotId};
use std::collections::VecDeque;

#[derive(Default)]
pub(crate) struct FakeDevice {
    pub(crate) slots: Vec<Option<ExpertKey>>,
    /// Copies queued and not finished, in issue order.
    pub(crate) copying: VecDeque<ExpertKey>,
    /// A load of this expert is refused.
    pub(crate) refuse: Option<ExpertKey>,
}

impl FakeDevice {
    pub(crate) fn new(slots: usize) -> Self {
        Self { slots: vec![None; slots], ..Default::default() }
    }

    /// The oldest `n` queued copies finish (copies complete in issue order).
    pub(crate) fn finish(&mut self, n: usize) {
        for _ in 0..n.min(self.copying.len()) {
            self.copying.pop_front();
        }
    }
}

impl SlotDevice for FakeDevice {
    type Error = String;

    fn load_into(&mut self, key: ExpertKey, slot: SlotId) -> Result<(), String> {
        if self.refuse == Some(key) {
            return Err(format!("cannot copy {key}"));
        }
        match self.slots[slot.index()] {
            Some(old) => Err(format!("load of {key} into slot {slot:?} still holding {old}")),
            None => {
                self.slots[slot.index()] = Some(key);
                self.copying.push_back(key);
                Ok(())
            }
        }
    }

    fn evict(&mut self, key: ExpertKey) -> Result<SlotId, String> {
        let i = self.slots.iter().position(|&k| k == Some(key)).ok_or(format!("{key} is not resident"))?;
        self.slots[i] = None;
        Ok(SlotId(i as u32))
    }

    fn is_ready(&self, key: ExpertKey) -> Result<bool, String> {
        Ok(self.slots.contains(&Some(key)) && !self.copying.contains(&key))
    }
}
