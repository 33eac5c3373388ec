//! Metric names of the expert cache (all under the `moe_expert_` prefix;
//! per-layer series carry a `layer` label).

/// Counter: experts resident when a layer needed them.
pub const HITS: &str = "moe_expert_cache_hits_total";
/// Counter: experts not resident when needed (loading or at home).
pub const MISSES: &str = "moe_expert_cache_misses_total";
/// Counter: prefetch loads started.
pub const PREFETCH_ISSUED: &str = "moe_expert_prefetch_issued_total";
/// Counter: prefetched experts later used.
pub const PREFETCH_USED: &str = "moe_expert_prefetch_used_total";
/// Counter: prefetched experts evicted without being used.
pub const PREFETCH_WASTED: &str = "moe_expert_prefetch_wasted_total";
/// Counter: bytes read from the slow tier.
pub const BYTES_LOADED: &str = "moe_expert_bytes_loaded_total";
/// Counter: microseconds the forward pass waited for experts.
pub const STALL_MICROSECONDS: &str = "moe_expert_stall_microseconds_total";
/// Counter: expert loads that failed.
pub const LOAD_FAILURES: &str = "moe_expert_load_failures_total";
/// Gauge: predictor precision (correct / predicted expert choices), per layer.
pub const PREDICTOR_PRECISION: &str = "moe_expert_predictor_precision";
/// Gauge: predictor recall (correct / actual expert choices), per layer.
pub const PREDICTOR_RECALL: &str = "moe_expert_predictor_recall";
/// Gauge: slots in use in the fast tier (resident experts plus loads in progress).
pub const RESIDENT: &str = "moe_expert_cache_resident";
/// Gauge: token transitions between experts on different shards, from MoE
/// layer `from_layer` to the next, since start (placement plans).
pub const SHARD_CROSS_TOKENS: &str = "moe_shard_cross_tokens";
/// Gauge: tokens routed to each shard's experts, labels `layer` and `shard`, since start.
pub const SHARD_TOKENS: &str = "moe_shard_tokens";
/// Gauge: slots of the fast tier.
pub const SLOTS: &str = "moe_expert_cache_slots";
/// Gauge: bytes of expert weights in the fast tier (every expert when all are
/// resident; with a budget, the slots in use times the bytes of one expert).
pub const RESIDENT_BYTES: &str = "moe_expert_resident_bytes";
/// Counter: experts a GPU layer needed while their copy to the device was
/// still running (the compute waited for it on the device).
pub const COPY_WAITS: &str = "moe_expert_copy_waits_total";
