//! The CUDA mover (feature `cuda`): executes the residency core's commands
//! on a GPU [`ExpertSlotPool`]. Evictions free the slot at once (a later copy
//! into it waits on the device for the computations that read it, through
//! the pool's per-slot events); loads are queued on the copy stream and
//! reported to the core when their copy has finished ([`CudaMover::reap`]),
//! so the host never blocks on a copy.
//!
//! Not yet driven by the forward pass (the model computes on CPU); tested on
//! hardware only through the pool (`scripts/gpu-check.sh`).

use super::{Command, ResidencyCore};
use moe_kernels::cuda::expert_pool::ExpertSlotPool;
use moe_kernels::cuda::CudaError;
use moe_types::ExpertKey;

/// A GPU slot pool driven by a [`ResidencyCore`].
pub struct CudaMover {
    pool: ExpertSlotPool,
    /// Loads queued on the copy stream: (expert, prefetch).
    in_flight: Vec<(ExpertKey, bool)>,
}

fn refused(e: super::ResidencyError) -> CudaError {
    CudaError::Pool(format!("residency core: {e}"))
}

impl CudaMover {
    /// Drives `pool`, whose slots must match the core's (same count, empty).
    pub fn new(pool: ExpertSlotPool) -> Self {
        Self { pool, in_flight: Vec::new() }
    }

    /// The pool (views of resident experts, the device map).
    pub fn pool(&mut self) -> &mut ExpertSlotPool {
        &mut self.pool
    }

    /// Loads queued and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Issues every command the core has now. A copy that cannot be queued
    /// is reported to the core as a failed load.
    pub fn pump(&mut self, core: &mut ResidencyCore) -> Result<(), CudaError> {
        while let Some(cmd) = core.poll(true) {
            match cmd {
                Command::Evict { key, .. } => {
                    self.pool.evict(key)?;
                    core.evicted(key).map_err(refused)?;
                }
                Command::Load { key, slot, prefetch } => match self.pool.load_into(key, slot) {
                    Ok(()) => self.in_flight.push((key, prefetch)),
                    Err(e) => core.loaded(key, prefetch, Err(e.to_string())).map_err(refused)?,
                },
            }
        }
        Ok(())
    }

    /// Reports to the core every queued load whose copy has finished; returns
    /// how many.
    pub fn reap(&mut self, core: &mut ResidencyCore) -> Result<usize, CudaError> {
        let mut done = 0;
        let mut i = 0;
        while i < self.in_flight.len() {
            let (key, prefetch) = self.in_flight[i];
            if self.pool.is_ready(key)? {
                self.in_flight.swap_remove(i);
                core.loaded(key, prefetch, Ok(())).map_err(refused)?;
                done += 1;
            } else {
                i += 1;
            }
        }
        Ok(done)
    }
}
