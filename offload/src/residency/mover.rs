//! The device mover: executes the residency core's commands on a slot
//! device whose copies run asynchronously in issue order and whose compute
//! is ordered after the copies it reads by the device itself (a GPU's copy
//! stream and per-slot events; [`SlotDevice`]).
//!
//! Because the device orders compute after the copy into the slot it reads,
//! and a copy into a slot after the compute that last read it, a load is
//! reported to the core as soon as its copy is *queued*: the host never
//! blocks on a copy, and the core's slot table always matches the device's.
//! Whether a queued copy had finished when its expert was needed is tracked
//! separately ([`DeviceMover::needed`]): those are the moments compute waited
//! for a copy on the device (late prefetches and demand loads).
//!
//! Tested on CPU against a fake device (below); driven on a GPU by
//! moe-offload's GPU tier over `moe_kernels::cuda::expert_pool::ExpertSlotPool`.

use super::{Command, ResidencyCore, ResidencyError};
use moe_types::{ExpertKey, SlotId};

/// Slots on a device that copies asynchronously, in issue order.
pub trait SlotDevice {
    /// What the device reports when it cannot do something.
    type Error: std::fmt::Display;
    /// Queues the copy of `key` from the slow tier into the free `slot`.
    fn load_into(&mut self, key: ExpertKey, slot: SlotId) -> Result<(), Self::Error>;
    /// Frees `key`'s slot (a later copy into it waits for the compute that read it).
    fn evict(&mut self, key: ExpertKey) -> Result<SlotId, Self::Error>;
    /// Whether `key`'s copy has finished (non-blocking).
    fn is_ready(&self, key: ExpertKey) -> Result<bool, Self::Error>;
}

/// What the mover refuses: the device failed, or the core refused a report
/// (a bug: the mover reported something the core did not ask for).
#[derive(Debug, thiserror::Error)]
pub enum MoverError<E: std::fmt::Display> {
    /// The device failed.
    #[error("{0}")]
    Device(E),
    /// The core refused a report.
    #[error("residency core: {0}")]
    Core(#[from] ResidencyError),
}

/// Copy counters of a [`DeviceMover`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Copies queued.
    pub loads: u64,
    /// Of those, prefetches.
    pub prefetches: u64,
    /// Experts needed by a layer while their copy was still running (the
    /// compute waited on the device).
    pub waited: u64,
    /// Experts needed by a layer with their copy finished or long resident.
    pub ready: u64,
}

/// A [`SlotDevice`] driven by a [`ResidencyCore`].
pub struct DeviceMover<D> {
    dev: D,
    /// Copies queued and not yet seen finished.
    in_flight: Vec<ExpertKey>,
    stats: CopyStats,
}

impl<D: SlotDevice> DeviceMover<D> {
    /// Drives `dev`, whose slots must match the core's (same count, empty).
    pub fn new(dev: D) -> Self {
        Self { dev, in_flight: Vec::new(), stats: CopyStats::default() }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Copy counters so far.
    pub fn stats(&self) -> CopyStats {
        self.stats
    }

    /// Copies queued and not yet seen finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Issues every command the core has now, reporting each at once (see
    /// the module docs). A copy the device refuses is reported to the core
    /// as a failed load (a later pin of it after waiting gets the error).
    pub fn pump(&mut self, core: &mut ResidencyCore) -> Result<(), MoverError<D::Error>> {
        while let Some(cmd) = core.poll(true) {
            match cmd {
                Command::Evict { key, .. } => {
                    self.dev.evict(key).map_err(MoverError::Device)?;
                    self.in_flight.retain(|&k| k != key);
                    core.evicted(key)?;
                }
                Command::Load { key, slot, prefetch } => match self.dev.load_into(key, slot) {
                    Ok(()) => {
                        self.in_flight.push(key);
                        self.stats.loads += 1;
                        self.stats.prefetches += u64::from(prefetch);
                        core.loaded(key, prefetch, Ok(()))?;
                    }
                    Err(e) => core.loaded(key, prefetch, Err(e.to_string()))?,
                },
            }
        }
        Ok(())
    }

    /// Forgets every queued copy the device has finished.
    pub fn reap(&mut self) -> Result<(), MoverError<D::Error>> {
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.dev.is_ready(self.in_flight[i]).map_err(MoverError::Device)? {
                self.in_flight.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// A layer's compute is about to read `key` (resident in the core):
    /// counts whether its copy was still running. Returns true if it was.
    pub fn needed(&mut self, key: ExpertKey) -> Result<bool, MoverError<D::Error>> {
        let pending = match self.in_flight.iter().position(|&k| k == key) {
            Some(_) if !self.dev.is_ready(key).map_err(MoverError::Device)? => true,
            Some(i) => {
                self.in_flight.swap_remove(i);
                false
            }
            None => false,
        };
        if pending {
            self.stats.waited += 1;
        } else {
            self.stats.ready += 1;
        }
        Ok(pending)
    }
}

#[cfg(test)]
mod tests;
