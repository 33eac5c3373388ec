//! Expert offloading in the spirit of ExpertFlow (arXiv 2410.17954): serve a
//! model whose experts do not all fit in fast memory.
//!
//! Owns:
//! - [`residency::ResidencyCore`]: the pure state machine that decides every
//!   load, eviction and pin (no threads, clock or IO), and its movers;
//! - the two tiers: an [`ExpertSource`] (slow tier: the checkpoint files on
//!   disk, read on demand, or host memory) and the [`ExpertCache`] (fast tier:
//!   a fixed number of ready-to-compute expert slots, the CPU shell around the
//!   residency core, filled by a background loader thread);
//! - [`ExpertBudget`]: `--expert-cache` as bytes, a fraction or a count;
//! - routing-path predictors ([`predictor`]): look-ahead gating, a learned
//!   count-based path predictor (trained offline from routing traces), and the
//!   previous-token baseline;
//! - cache policies ([`PolicyKind`]): LRU, LFU, and predictor-driven;
//! - offline bounds over a recorded access sequence ([`bounds`]): Belady's
//!   optimal replacement and an oracle prefetcher (benchmarks only);
//! - [`ShardedExperts`]: experts spread over in-process shards by a
//!   placement plan, with cross-shard traffic measured;
//! - [`Experts`]: fully resident, cached or sharded, one type for the engine.
//!
//! Invariants: an expert is computed only while pinned by a guard, and a
//! pinned expert, or one in use by the running layer, is never evicted;
//! resident plus loading experts never exceed the slot budget; the cache
//! changes only *when* weights are read, never their values, so generated
//! tokens are identical at every budget, policy and predictor. Policies and
//! predictors are deterministic (no clocks); only the loader does IO and only
//! stall accounting reads the clock. The residency core owns these invariants
//! (`ResidencyCore::check`, property-tested).

mod activations;
mod backend;
pub mod bounds;
mod budget;
mod cache;
mod disk_io;
mod error;
mod experts;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod metric_names;
mod policy;
pub mod predictor;
pub mod residency;
mod sharded;
mod source;
mod stats;

pub use activations::{ExpertActivations, Int8ActivationSource};
pub use backend::DeviceBackend;
pub use budget::ExpertBudget;
pub use cache::{CacheConfig, CacheGuard, ExpertCache};
pub use disk_io::DiskIo;
pub use error::OffloadError;
pub use experts::{Experts, ExpertsGuard};
pub use policy::PolicyKind;
pub use predictor::{PredictorChoice, PredictorKind};
pub use sharded::{ShardStats, ShardedExperts};
pub use source::{DiskExperts, ExpertSource, MemoryExperts, QuantizingSource};
pub use stats::{CacheStats, LayerStats};
