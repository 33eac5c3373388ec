//! The residency core: which experts sit in the fast tier's slots, which are
//! being loaded or evicted, and what to load next. A deterministic state
//! machine with no threads, clocks or IO.
//!
//! Inputs: the step's tokens ([`ResidencyCore::begin_step`]), each MoE
//! layer's routing before it runs ([`ResidencyCore::prepare`]), look-ahead
//! gating ([`ResidencyCore::gating`]), pins and unpins of the experts being
//! computed, and the movers' reports ([`ResidencyCore::loaded`],
//! [`ResidencyCore::evicted`]). Outputs: [`Command`]s, taken one at a time
//! with [`ResidencyCore::poll`] by a mover (the CPU loader thread, the CUDA
//! slot pool through [`DeviceMover`]), which executes them in order and reports back.
//!
//! Each expert moves `Home -> Loading -> Resident -> Evicting -> Home` (a
//! failed load goes back `Loading -> Home` with its error kept). Invariants,
//! checked by [`ResidencyCore::check`] and the property tests:
//! - loading + resident experts never exceed the slots (the [`SlotTable`]
//!   holds exactly them, one slot each);
//! - an expert pinned by a computation, or used by the running layer, is
//!   never a victim;
//! - demand loads (needed now) are issued before any prefetch;
//! - the core changes *when* weights are read, never their values.

mod core;
#[cfg(test)]
mod fake_device;
mod forecast;
mod mover;
mod tier;

pub use self::core::{Command, Pin, ResidencyConfig, ResidencyCore, ResidencyError, State};
pub use self::mover::{CopyStats, DeviceMover, MoverError, SlotDevice};
pub use self::tier::DeviceTier;
pub use moe_types::{ExpertKey, SlotId, SlotTable};
