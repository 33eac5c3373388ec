//! Every metric name, in one place (all under the `moe_` prefix).

/// Counter: HTTP/gRPC requests, labels `endpoint`, `status`, `protocol`.
pub const REQUESTS: &str = "moe_requests_total";
/// Counter: prompt tokens of accepted requests.
pub const PROMPT_TOKENS: &str = "moe_prompt_tokens_total";
/// Counter: generated tokens.
pub const GENERATED_TOKENS: &str = "moe_generated_tokens_total";
/// Histogram (seconds): request arrival to first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "moe_time_to_first_token_seconds";
/// Histogram (seconds): gap between successive tokens of a sequence.
pub const INTER_TOKEN_LATENCY: &str = "moe_inter_token_latency_seconds";
/// Histogram (seconds): request arrival to completion.
pub const E2E_LATENCY: &str = "moe_e2e_request_latency_seconds";
/// Gauge: sequences holding KV cache.
pub const RUNNING: &str = "moe_running_sequences";
/// Gauge: sequences waiting for admission.
pub const WAITING: &str = "moe_waiting_sequences";
/// Gauge: KV blocks in use.
pub const KV_BLOCKS_USED: &str = "moe_kv_blocks_used";
/// Gauge: KV blocks in total.
pub const KV_BLOCKS_TOTAL: &str = "moe_kv_blocks_total";
/// Histogram (seconds): engine step time.
pub const STEP_TIME: &str = "moe_step_seconds";
/// Histogram: tokens computed per step.
pub const BATCH_TOKENS: &str = "moe_step_batch_tokens";
/// Histogram: sequences per step.
pub const BATCH_SEQS: &str = "moe_step_batch_sequences";
/// Histogram (seconds): time spent planning a step (scheduling and regrouping).
pub const SCHEDULER_TIME: &str = "moe_scheduler_seconds";
/// Counter: steps running sequences were left out of a micro-batch.
pub const DEFERRALS: &str = "moe_scheduler_deferrals_total";
/// Histogram: distinct experts one step (micro-batch) used, label `layer` (MoE layer index).
pub const DISTINCT_EXPERTS: &str = "moe_step_distinct_experts";
/// Counter: sequences preempted for lack of KV blocks.
pub const PREEMPTIONS: &str = "moe_preemptions_total";

/// Counter: routing-trace records dropped because the writer fell behind.
pub const TRACE_DROPPED: &str = "moe_trace_records_dropped_total";

/// Histogram bucket boundaries for latencies in seconds.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Histogram bucket boundaries for batch sizes.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
/// Gauge: bytes of the weights kept resident outside the experts (attention,
/// norms, routers, dense and shared MLPs, embeddings, output head).
pub const NON_EXPERT_BYTES: &str = "moe_non_expert_weight_bytes";
/// Gauge: the process's resident set size in bytes (from procfs, refreshed
/// every second; the name Prometheus' process collectors use).
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
