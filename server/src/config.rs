//! `moe-serve serve` configuration: command-line flags, environment
//! variables and an optional TOML file.
//!
//! Precedence, highest first: a flag on the command line, its environment
//! variable (`MOE_*`, shown in `--help`), the key of the same name in the
//! `--config` TOML file (snake_case, e.g. `max_num_seqs = 64`), the default.

use clap::Args;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

macro_rules! serve_config {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr => $shown:literal, env = $env:literal; )*) => {
        /// Raw flags of `moe-serve serve` (each optional: unset flags fall back
        /// to the TOML file, then to the default).
        #[derive(Args, Debug, Default, Clone)]
        pub struct ServeArgs {
            /// TOML file with any of the settings below (flags and environment win).
            #[arg(long, env = "MOE_CONFIG")]
            pub config: Option<PathBuf>,
            /// Model: a HuggingFace directory, a .gguf file (first part of a split
            /// set) or a directory holding one; default: the built-in model.
            #[arg(long, env = "MOE_MODEL")]
            pub model: Option<PathBuf>,
            /// API key required as `Authorization: Bearer <key>` (default: none).
            #[arg(long, env = "MOE_API_KEY", hide_env_values = true)]
            pub api_key: Option<String>,
            /// Model name clients use (default: the model directory's name).
            #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
            pub served_model_name: Option<String>,
            /// Record every computed token's routing to this file (routing-trace
            /// format v1, JSON Lines; see moe_types::trace).
            #[arg(long, env = "MOE_RECORD_ROUTING")]
            pub record_routing: Option<PathBuf>,
            /// Benchmarking aid: ignore the checkpoint's weights and use random
            /// bf16 weights of config.json's shape (tokenizer files still needed).
            #[arg(long)]
            pub random_weights: bool,
            /// Predictor file: the learned path predictor's, or with --predictor hidden
            /// the hidden-state probes' (default: path_predictor.safetensors or
            /// hidden_predictor.safetensors in the model directory).
            #[arg(long, env = "MOE_PREDICTOR_FILE")]
            pub predictor_file: Option<PathBuf>,
            /// Placement plan (moe-place's JSON, format v1): which shard holds
            /// each expert. On CPU the experts are split over that many
            /// in-process shards and cross-shard token traffic is measured.
            #[arg(long, env = "MOE_PLACEMENT")]
            pub placement: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env, help = concat!($($doc,)* " [default: ", $shown, "]"))]
                pub $name: Option<$ty>,
            )*
        }

        /// The file form of the settings.
        #[derive(Deserialize, Debug, Default)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            model: Option<PathBuf>,
            api_key: Option<String>,
            served_model_name: Option<String>,
            record_routing: Option<PathBuf>,
            predictor_file: Option<PathBuf>,
            placement: Option<PathBuf>,
            $( $name: Option<$ty>, )*
        }

        /// Resolved settings.
        #[derive(Debug, Clone)]
        pub struct ServeConfig {
            /// Model directory; `None` means the built-in model.
            pub model: Option<PathBuf>,
            /// API key, if any.
            pub api_key: Option<String>,
            /// Name served in `/v1/models`.
            pub served_model_name: Option<String>,
            /// Random weights instead of the checkpoint's.
            pub random_weights: bool,
            /// Routing-trace output file, if recording.
            pub record_routing: Option<PathBuf>,
            /// Learned path-predictor file, if not the model directory's.
            pub predictor_file: Option<PathBuf>,
            /// Placement plan file, if any.
            pub placement: Option<PathBuf>,
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl ServeArgs {
            /// Applies the precedence rules.
            pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
                let file = match &self.config {
                    Some(p) => read_file(p)?,
                    None => FileConfig::default(),
                };
                Ok(ServeConfig {
                    model: self.model.clone().or(file.model),
                    api_key: self.api_key.clone().or(file.api_key).filter(|k| !k.is_empty()),
                    served_model_name: self.served_model_name.clone().or(file.served_model_name),
                    random_weights: self.random_weights,
                    record_routing: self.record_routing.clone().or(file.record_routing),
                    predictor_file: self.predictor_file.clone().or(file.predictor_file),
                    placement: self.placement.clone().or(file.placement),
                    $( $name: self.$name.clone().or(file.$name).unwrap_or_else(|| $default), )*
                })
            }
        }
    };
}

serve_config! {
    /// Address to bind.
    host: IpAddr = IpAddr::from([127, 0, 0, 1]) => "127.0.0.1", env = "MOE_HOST";
    /// HTTP port (0 picks a free one, printed at start).
    port: u16 = 8000 => "8000", env = "MOE_PORT";
    /// gRPC port on the same host (0 picks a free one, printed at start).
    grpc_port: u16 = 50051 => "50051", env = "MOE_GRPC_PORT";
    /// Most sequences computed together in one step.
    max_num_seqs: usize = 64 => "64", env = "MOE_MAX_NUM_SEQS";
    /// Token budget of one step (prefill chunks plus decodes).
    max_batched_tokens: usize = 512 => "512", env = "MOE_MAX_BATCHED_TOKENS";
    /// Requests queued beyond the running ones before 429.
    max_waiting: usize = 256 => "256", env = "MOE_MAX_WAITING";
    /// KV cache size in tokens (rounded up to whole blocks).
    kv_cache_tokens: usize = 65536 => "65536", env = "MOE_KV_CACHE_TOKENS";
    /// Token slots per KV block.
    block_size: usize = 16 => "16", env = "MOE_BLOCK_SIZE";
    /// Longest prompt accepted, in tokens (also bounded by the context).
    max_prompt_tokens: usize = 32768 => "32768", env = "MOE_MAX_PROMPT_TOKENS";
    /// Largest `max_tokens` accepted.
    max_tokens_limit: usize = 4096 => "4096", env = "MOE_MAX_TOKENS_LIMIT";
    /// Largest `n`.
    max_n: usize = 8 => "8", env = "MOE_MAX_N";
    /// Most stop strings per request.
    max_stop: usize = 8 => "8", env = "MOE_MAX_STOP";
    /// Most `logit_bias` entries per request.
    max_logit_bias: usize = 300 => "300", env = "MOE_MAX_LOGIT_BIAS";
    /// Largest request body in bytes.
    max_body_bytes: usize = 2 << 20 => "2097152", env = "MOE_MAX_BODY_BYTES";
    /// Most concurrent gRPC calls (HTTP/2 streams) per connection; REST is HTTP/1.1, one request at a time per connection.
    grpc_max_concurrent_streams: u32 = 128 => "128", env = "MOE_GRPC_MAX_CONCURRENT_STREAMS";
    /// Answer /health and grpc.health.v1 without the API key (probes send none); false puts them behind it.
    public_health: bool = true => "true", env = "MOE_PUBLIC_HEALTH";
    /// Answer /metrics without the API key (as vLLM does; annotation-based Prometheus scrapes send none); false puts it behind it.
    public_metrics: bool = true => "true", env = "MOE_PUBLIC_METRICS";
    /// Tokenize special-token text inside chat message contents as the special tokens themselves (trusted deployments only: a user could close their turn and forge a system turn); by default only the chat template's markup produces special tokens.
    allow_special_tokens_in_content: bool = false => "false", env = "MOE_ALLOW_SPECIAL_TOKENS_IN_CONTENT";
    /// Seconds a REST connection may take to send a request head (also closes idle keep-alive connections).
    header_timeout_secs: u64 = 30 => "30", env = "MOE_HEADER_TIMEOUT_SECS";
    /// Seconds a REST request may take to send its body.
    body_timeout_secs: u64 = 60 => "60", env = "MOE_BODY_TIMEOUT_SECS";
    /// Most REST connections open at once; one over it gets an immediate 503 and is closed.
    max_connections: usize = 4096 => "4096", env = "MOE_MAX_CONNECTIONS";
    /// Seconds in-flight requests get to finish after SIGTERM.
    shutdown_grace_secs: u64 = 30 => "30", env = "MOE_SHUTDOWN_GRACE_SECS";
    /// Fast-tier expert budget: all, a percentage (50%), a fraction (0.5), a count of experts (16) or bytes (64MiB); experts beyond it stay on disk and are loaded on demand or prefetched.
    expert_cache: moe_offload::ExpertBudget = moe_offload::ExpertBudget::All => "all", env = "MOE_EXPERT_CACHE";
    /// Expert cache policy: lru, lfu or predictive (ExpertFlow: evict by predicted demand).
    expert_policy: moe_offload::PolicyKind = moe_offload::PolicyKind::Predictive => "predictive", env = "MOE_EXPERT_POLICY";
    /// Routing-path predictor: auto (hidden if the model directory has hidden-state probes, else learned if it has a trained path predictor, else lookahead), hidden, learned, lookahead, previous or none.
    predictor: moe_offload::PredictorChoice = moe_offload::PredictorChoice::Auto => "auto", env = "MOE_PREDICTOR";
    /// MoE layers ahead to forecast and prefetch.
    prefetch_depth: usize = 1 => "1", env = "MOE_PREFETCH_DEPTH";
    /// Prefetch a layer's forecasts from a distance only while their measured precision there is at least this (0: always; 3 right in 4 assumed until measured).
    prefetch_min_precision: f64 = 0.5 => "0.5", env = "MOE_PREFETCH_MIN_PRECISION";
    /// Quantize the experts of a float checkpoint at load: none, q8_0 or q4_k (rows too short for q4_k blocks use q8_0); budgets then count quantized bytes, and with a budget below all each expert is quantized when read (q4_k about 15 M values/s per thread: prefer a GGUF file there).
    quantize_experts: moe_model::QuantTarget = moe_model::QuantTarget::None => "none", env = "MOE_QUANTIZE_EXPERTS";
    /// What quantize_experts applies to: experts, or all (attention, dense and shared MLPs, embedding and output head too).
    quantize: moe_model::QuantScope = moe_model::QuantScope::Experts => "experts", env = "MOE_QUANTIZE";
    /// Activations of products with MXFP4 experts read from a transformers checkpoint (gpt-oss): f32 (exact against transformers) or int8 (as llama.cpp computes: about 2.9x faster per expert product at decode).
    expert_activations: moe_offload::ExpertActivations = moe_offload::ExpertActivations::F32 => "f32", env = "MOE_EXPERT_ACTIVATIONS";
    /// How experts read from disk under a budget treat the page cache: direct (O_DIRECT, bypassed), release (read, then dropped from it) or cached (left there: the budget is then not the only copy).
    disk_io: moe_offload::DiskIo = moe_offload::DiskIo::Direct => "direct", env = "MOE_DISK_IO";
    /// Expert reads in flight at once (loader threads; one is kept for demand loads).
    expert_readers: usize = 4 => "4", env = "MOE_EXPERT_READERS";
    /// Most sequences computed per step (a micro-batch); 0 computes every runnable sequence each step.
    micro_batch: usize = 0 => "0", env = "MOE_MICRO_BATCH";
    /// How a micro-batch is chosen when more sequences are runnable: fcfs (round robin), random, or regroup (ExpertFlow: sequences whose forecast experts overlap run together).
    grouping: moe_scheduler::GroupingMode = moe_scheduler::GroupingMode::Fcfs => "fcfs", env = "MOE_GROUPING";
    /// Most consecutive steps a running sequence may be left out of the micro-batch.
    max_deferral: u32 = 16 => "16", env = "MOE_MAX_DEFERRAL";
    /// Device the model runs on: cpu, or cuda (needs a build with --features cuda and an NVIDIA GPU).
    device: crate::device::Device = crate::device::Device::Cpu => "cpu", env = "MOE_DEVICE";
}

fn read_file(p: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", p.display()))
}

impl ServeConfig {
    /// The expert offloading settings.
    pub fn offload(&self) -> anyhow::Result<crate::offload::OffloadSettings> {
        Ok(crate::offload::OffloadSettings::new(
            self.expert_cache,
            self.expert_policy,
            self.predictor,
            self.predictor_file.clone(),
            crate::offload::Prefetch::new(self.prefetch_depth, self.prefetch_min_precision)?,
            crate::offload::Quantize::new(self.quantize_experts, self.quantize, self.expert_activations)?,
            crate::offload::DiskTier::new(self.disk_io, self.expert_readers)?,
        ))
    }

    /// The micro-batching settings.
    pub fn grouping(&self) -> moe_scheduler::GroupingConfig {
        moe_scheduler::GroupingConfig {
            mode: self.grouping,
            micro_batch: self.micro_batch,
            max_deferral: self.max_deferral,
            seed: 0,
        }
    }

    /// Checks values that must be positive, and that the device is usable.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.device.check()?;
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("kv_cache_tokens", self.kv_cache_tokens),
            ("block_size", self.block_size),
            ("max_prompt_tokens", self.max_prompt_tokens),
            ("max_tokens_limit", self.max_tokens_limit),
            ("max_n", self.max_n),
            ("max_body_bytes", self.max_body_bytes),
            ("grpc_max_concurrent_streams", self.grpc_max_concurrent_streams as usize),
            ("max_connections", self.max_connections),
            ("header_timeout_secs", self.header_timeout_secs as usize),
            ("body_timeout_secs", self.body_timeout_secs as usize),
        ] {
            anyhow::ensure!(v > 0, "{name} must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "max_num_seqs = 7\nport = 9000\napi_key = \"k\"\n").unwrap();
        let args = ServeArgs { config: Some(f.clone()), port: Some(9100), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!((c.port, c.max_num_seqs, c.max_n), (9100, 7, 8));
        assert_eq!(c.api_key.as_deref(), Some("k"));
        std::fs::write(&f, "max_num_seq = 7\n").unwrap();
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("unknown field `max_num_seq`"), "{e}");
    }
}
