//! Expert offloading settings (`--expert-cache`, `--expert-policy`,
//! `--predictor`, ...) and loading a model with its experts resident or
//! behind an expert cache.

use crate::model_dir::{load_with_progress, Bar};
use anyhow::Context;
use clap::Args;
use moe_model::{Model, QuantScope, QuantTarget, TextCodec};
use moe_offload::{
    CacheConfig, DiskExperts, DiskIo, ExpertActivations, ExpertBudget, ExpertCache, ExpertSource, Experts,
    Int8ActivationSource, MemoryExperts, PolicyKind, PredictorChoice, PredictorKind, QuantizingSource,
};
use std::path::{Path, PathBuf};

/// The learned predictor's file name inside a model directory.
pub const PREDICTOR_FILE: &str = "path_predictor.safetensors";
/// The hidden-state predictor's file name in a model directory.
pub const HIDDEN_PREDICTOR_FILE: &str = "hidden_predictor.safetensors";

/// Resolved offloading settings: every value already parsed into its type
/// at the edge (flag, environment variable or TOML).
#[derive(Clone, Debug)]
pub struct OffloadSettings {
    /// Fast-tier budget.
    pub budget: ExpertBudget,
    /// Cache policy.
    pub policy: PolicyKind,
    /// Predictor choice (resolved against the model directory).
    pub predictor: PredictorChoice,
    /// Learned predictor file (default: the model directory's).
    pub predictor_file: Option<PathBuf>,
    /// How far ahead to prefetch.
    pub prefetch: Prefetch,
    /// Quantization applied at load (`--quantize-experts`, `--quantize`).
    pub quantize: Quantize,
    /// How experts are read from disk under a budget.
    pub disk: DiskTier,
}

/// How far ahead forecasts are prefetched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prefetch {
    /// MoE layers ahead to forecast (`--prefetch-depth`, at least 1).
    pub depth: usize,
    /// Forecasts from a distance whose measured precision for the layer is
    /// below this are not prefetched (`--prefetch-min-precision`, in [0, 1]).
    pub min_precision: f64,
}

impl Prefetch {
    /// Checks the rules the types do not carry.
    pub fn new(depth: usize, min_precision: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(depth >= 1, "--prefetch-depth must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&min_precision),
            "--prefetch-min-precision must be between 0 and 1 (got {min_precision})"
        );
        Ok(Self { depth, min_precision })
    }
}

/// How the slow tier reads experts from the checkpoint files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskTier {
    /// Page-cache handling (`--disk-io`).
    pub io: DiskIo,
    /// Reads in flight at once (`--expert-readers`, at least 1).
    pub readers: usize,
}

impl DiskTier {
    /// Checks the one rule the types do not carry (at least one reader).
    pub fn new(io: DiskIo, readers: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(readers >= 1, "--expert-readers must be at least 1");
        Ok(Self { io, readers })
    }

    /// The defaults: `O_DIRECT`, four readers.
    pub fn default_tier() -> Self {
        Self { io: DiskIo::Direct, readers: 4 }
    }
}

/// What to quantize at load, checked: a scope of `all` needs a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantize {
    /// The format (none: keep the checkpoint's precision).
    pub target: QuantTarget,
    /// Experts only, or every large matrix.
    pub scope: QuantScope,
    /// Activations of products with experts stored for f32 activations.
    pub activations: ExpertActivations,
}

impl Quantize {
    /// Checks that `scope` has a format to apply.
    pub fn new(target: QuantTarget, scope: QuantScope, activations: ExpertActivations) -> anyhow::Result<Self> {
        anyhow::ensure!(
            target != QuantTarget::None || scope == QuantScope::Experts,
            "--quantize all needs a format: add --quantize-experts q8_0 or q4_k"
        );
        Ok(Self { target, scope, activations })
    }

    /// Nothing quantized.
    pub fn none() -> Self {
        Self { target: QuantTarget::None, scope: QuantScope::Experts, activations: ExpertActivations::F32 }
    }
}

impl OffloadSettings {
    /// Settings from their checked parts.
    pub fn new(
        budget: ExpertBudget,
        policy: PolicyKind,
        predictor: PredictorChoice,
        predictor_file: Option<PathBuf>,
        prefetch: Prefetch,
        quantize: Quantize,
        disk: DiskTier,
    ) -> Self {
        Self { budget, policy, predictor, predictor_file, prefetch, quantize, disk }
    }

    /// Every expert resident.
    pub fn resident() -> Self {
        Self {
            budget: ExpertBudget::All,
            policy: PolicyKind::Lru,
            predictor: PredictorChoice::None,
            predictor_file: None,
            prefetch: Prefetch { depth: 1, min_precision: 0.0 },
            quantize: Quantize::none(),
            disk: DiskTier::default_tier(),
        }
    }

    /// The predictor for a model in `dir`: `auto` is the hidden-state one when
    /// the directory has its probes file, else the learned one when it has
    /// its file, else look-ahead gating (`PredictorChoice::Auto`). A predictor file given
    /// replaces the chosen predictor's default (with `auto`: the kind its
    /// format names).
    pub fn predictor_kind(&self, dir: &Path) -> PredictorKind {
        let (learned, hidden) = (dir.join(PREDICTOR_FILE), dir.join(HIDDEN_PREDICTOR_FILE));
        match (&self.predictor_file, self.predictor) {
            (Some(f), PredictorChoice::Auto)
                if moe_offload::predictor::format_of(f).as_deref()
                    == Some(moe_offload::predictor::HIDDEN_PREDICTOR_FORMAT) =>
            {
                PredictorKind::Hidden(f.clone())
            }
            (Some(f), PredictorChoice::Auto) => PredictorKind::Learned(f.clone()),
            (Some(f), PredictorChoice::Hidden) => self.predictor.resolve(learned, f.clone()),
            (Some(f), _) => self.predictor.resolve(f.clone(), hidden),
            (None, _) => self.predictor.resolve(learned, hidden),
        }
    }
}

/// The offloading flags of `generate`, `trace` and `bench-offload` (`serve`
/// has the same settings with environment and TOML forms).
#[derive(Args, Debug, Clone)]
pub struct OffloadArgs {
    /// Fast-tier expert budget: all, a percentage (50%), a fraction (0.5), a
    /// count of experts (16) or bytes (64MiB).
    #[arg(long, default_value = "all")]
    pub expert_cache: ExpertBudget,
    /// Expert cache policy: lru, lfu or predictive.
    #[arg(long, default_value = "predictive")]
    pub expert_policy: PolicyKind,
    /// Routing-path predictor: auto, hidden, learned, lookahead, previous or none.
    #[arg(long, default_value = "auto")]
    pub predictor: PredictorChoice,
    /// Learned predictor file (default: path_predictor.safetensors in the model directory).
    #[arg(long)]
    pub predictor_file: Option<PathBuf>,
    /// MoE layers ahead to forecast and prefetch.
    #[arg(long, default_value_t = 1)]
    pub prefetch_depth: usize,
    /// Prefetch a layer's forecasts from a distance only while their measured
    /// precision there is at least this (0: always; 3 right in 4 assumed
    /// until measured).
    #[arg(long, default_value_t = 0.5)]
    pub prefetch_min_precision: f64,
    /// Quantize the experts of a float checkpoint at load: none, q8_0 or
    /// q4_k (rows too short for q4_k blocks use q8_0).
    #[arg(long, default_value = "none")]
    pub quantize_experts: QuantTarget,
    /// What --quantize-experts applies to: experts, or all (attention, dense
    /// and shared MLPs, embedding and output head too).
    #[arg(long, default_value = "experts")]
    pub quantize: QuantScope,
    /// Activations of products with MXFP4 experts read from a transformers
    /// checkpoint (gpt-oss): f32 (exact against transformers) or int8 (as
    /// llama.cpp computes: about 2.9x faster per expert product at decode).
    #[arg(long, default_value = "f32")]
    pub expert_activations: ExpertActivations,
    /// How experts read from disk under a budget treat the page cache:
    /// direct (O_DIRECT, bypassed), release (read, then dropped from it) or
    /// cached (left there: the budget is then not the only copy).
    #[arg(long, default_value = "direct")]
    pub disk_io: DiskIo,
    /// Expert reads in flight at once (loader threads; one is kept for demand loads).
    #[arg(long, default_value_t = 4)]
    pub expert_readers: usize,
}

impl OffloadArgs {
    /// The resolved settings.
    pub fn settings(&self) -> anyhow::Result<OffloadSettings> {
        Ok(OffloadSettings::new(
            self.expert_cache,
            self.expert_policy,
            self.predictor,
            self.predictor_file.clone(),
            Prefetch::new(self.prefetch_depth, self.prefetch_min_precision)?,
            Quantize::new(self.quantize_experts, self.quantize, self.expert_activations)?,
            DiskTier::new(self.disk_io, self.expert_readers)?,
        ))
    }
}

/// A model ready to serve: non-expert weights, experts (resident or cached)
/// and tokenizer.
pub struct ServedModel {
    /// Non-expert weights.
    pub model: Model,
    /// The experts.
    pub experts: Experts,
    /// Tokenizer and generation facts.
    pub codec: TextCodec,
}

/// Splits a model's experts over the shards of the placement plan in `path`
/// (checked against the model; experts must be fully resident).
pub fn apply_placement(served: ServedModel, path: &Path) -> anyhow::Result<ServedModel> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read placement plan {}", path.display()))?;
    let plan = moe_types::placement::PlacementPlan::read(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("placement plan {}: {e}", path.display()))?;
    let Experts::Resident(resident) = served.experts else {
        anyhow::bail!("--placement needs every expert resident: it cannot be combined with --expert-cache yet");
    };
    let sharded = moe_offload::ShardedExperts::new(served.model.config(), resident, &plan)
        .map_err(|e| anyhow::anyhow!("placement plan {} does not fit the model: {e}", path.display()))?;
    tracing::info!(shards = sharded.num_shards(), method = %plan.method, "experts placed");
    Ok(ServedModel { model: served.model, experts: Experts::Sharded(sharded), codec: served.codec })
}

/// Loads `dir` (random weights of its shape when `random_weights`) with the
/// experts `settings` ask for. With a budget below the total, real weights
/// are read from the checkpoint on demand (`settings.disk`); random weights
/// are copied from host memory (to measure the cache's own overhead). Expert
/// memory that the machine does not have available is refused before it is
/// allocated; the memory held is logged and published as metrics.
pub fn load_served(dir: &Path, random_weights: bool, settings: &OffloadSettings) -> anyhow::Result<ServedModel> {
    let served = load_experts(dir, random_weights, settings)?;
    let non_expert = served.model.nbytes() as u64;
    let experts = served.experts.resident_bytes();
    metrics::gauge!(moe_engine::metric_names::NON_EXPERT_BYTES).set(non_expert as f64);
    if served.experts.budget_bytes().is_none() {
        // a cache publishes its own figure as it fills
        metrics::gauge!(moe_offload::metric_names::RESIDENT_BYTES).set(experts as f64);
    }
    let rss = crate::memory::rss_bytes().unwrap_or(0);
    tracing::info!(
        non_expert = %crate::memory::gib(non_expert),
        experts = %crate::memory::gib(experts),
        expert_budget = %served.experts.budget_bytes().map_or("all".into(), crate::memory::gib),
        process_rss = %crate::memory::gib(rss),
        "memory"
    );
    Ok(served)
}

fn load_experts(dir: &Path, random_weights: bool, settings: &OffloadSettings) -> anyhow::Result<ServedModel> {
    let ctx = || format!("loading model from {}", dir.display());
    let (model, resident, codec) = if random_weights {
        tracing::warn!("serving RANDOM weights of {}'s shape (--random-weights)", dir.display());
        let m = moe_model::load_random(dir, 0).with_context(ctx)?;
        (m.model, Some(m.experts), m.codec)
    } else if settings.budget == ExpertBudget::All {
        check_all_experts_fit(dir)?;
        let m = load_with_progress(dir).with_context(ctx)?;
        (m.model, Some(m.experts), m.codec)
    } else {
        let mut bar = Bar(None);
        let (model, codec) = moe_model::load_model_without_experts(dir, &mut bar).with_context(ctx)?;
        bar.finish();
        (model, None, codec)
    };
    let mut model = model;
    let format = settings.quantize.target.format();
    if let (Some(f), QuantScope::All) = (format, settings.quantize.scope) {
        model.quantize_non_experts(f).context("quantizing the non-expert weights")?;
    }
    let resident = match (resident, format) {
        (Some(r), Some(f)) => Some(r.quantized(f).context("quantizing the experts")?),
        (r, _) => r,
    };
    let int8 = settings.quantize.activations == ExpertActivations::Int8;
    let resident = resident.map(|r| if int8 { r.with_int8_activations() } else { r });
    if let Some(f) = format {
        tracing::info!(format = f.name(), scope = settings.quantize.scope.name(), "quantized at load");
    }
    let cfg = model.config().clone();
    let total = cfg.moe_layers().count() * cfg.moe.num_experts;
    let source: Box<dyn ExpertSource> = match resident {
        Some(r) if settings.budget.slots(total, r.nbytes() / total.max(1)).is_none() => {
            return Ok(ServedModel { model, experts: Experts::Resident(r), codec });
        }
        Some(r) => Box::new(MemoryExperts::new(r.into_weights())),
        None => {
            let disk = Box::new(DiskExperts::open(dir, &cfg, settings.disk.io).with_context(ctx)?);
            let read: Box<dyn ExpertSource> = match format {
                Some(f) => Box::new(QuantizingSource::new(disk, &cfg, f).with_context(ctx)?),
                None => disk,
            };
            // experts already in memory were converted above
            if int8 {
                Box::new(Int8ActivationSource::new(read))
            } else {
                read
            }
        }
    };
    let budget_bytes = |slots: usize| (slots * source.expert_bytes()) as u64;
    let Some(slots) = settings.budget.slots(total, source.expert_bytes()) else {
        // the budget holds every expert: read each once from the slow tier
        crate::memory::check_fits(
            budget_bytes(total),
            &format!("--expert-cache {} holds every expert: they", settings.budget),
            "pass a smaller --expert-cache",
        )?;
        let mut weights = Vec::with_capacity(cfg.num_layers());
        for (l, kind) in cfg.layers.iter().enumerate() {
            let n = if *kind == moe_model::FfnKind::Moe { cfg.moe.num_experts } else { 0 };
            let layer = (0..n).map(|e| source.load(moe_types::LayerId(l as u16), moe_types::ExpertId(e as u16)));
            weights.push(layer.collect::<Result<Vec<_>, _>>().with_context(ctx)?);
        }
        let experts = Experts::Resident(moe_model::ResidentExperts::from_weights(weights));
        return Ok(ServedModel { model, experts, codec });
    };
    crate::memory::check_fits(
        budget_bytes(slots),
        &format!("--expert-cache {} ({slots} experts)", settings.budget),
        "choose a smaller budget",
    )?;
    let predictor = settings.predictor_kind(dir);
    let describe = source.describe();
    let cache_cfg = CacheConfig {
        slots,
        policy: settings.policy,
        predictor: predictor.clone(),
        depth: settings.prefetch.depth,
        min_precision: settings.prefetch.min_precision,
        readers: settings.disk.readers,
    };
    let cache = ExpertCache::new(&cfg, source, cache_cfg).context("starting the expert cache")?;
    tracing::info!(
        slots,
        of = total,
        policy = settings.policy.name(),
        predictor = predictor.name(),
        depth = settings.prefetch.depth,
        min_precision = settings.prefetch.min_precision,
        readers = settings.disk.readers,
        slow_tier = %describe,
        "expert cache"
    );
    Ok(ServedModel { model, experts: Experts::Cached(cache), codec })
}

/// With no budget every expert is loaded: refused up front (from the
/// checkpoint's index, before reading any weight) when they cannot fit.
fn check_all_experts_fit(dir: &Path) -> anyhow::Result<()> {
    let Ok(cfg) = moe_model::read_config(dir) else {
        return Ok(()); // the loader reports an unreadable model itself
    };
    let Ok(experts) = moe_model::Checkpoint::open_model(dir, &cfg).and_then(|ck| moe_model::locate_experts(&ck, &cfg))
    else {
        return Ok(());
    };
    let total = cfg.moe_layers().count() * cfg.moe.num_experts;
    // (quantizing at load holds the float experts first: their size counts)
    crate::memory::check_fits(
        experts.iter().flatten().map(|e| e.resident_bytes() as u64).sum(),
        &format!("all {total} experts of {}", dir.display()),
        "pass --expert-cache with a budget (for example --expert-cache 50%) to stream the rest from disk",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_the_probes_and_a_named_file_by_its_format() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe");
        let (learned, hidden) = (dir.join(PREDICTOR_FILE), dir.join(HIDDEN_PREDICTOR_FILE));
        let with = |choice, file: Option<&Path>| OffloadSettings {
            predictor: choice,
            predictor_file: file.map(Path::to_path_buf),
            ..OffloadSettings::resident()
        };
        assert_eq!(with(PredictorChoice::Auto, None).predictor_kind(&dir), PredictorKind::Hidden(hidden.clone()));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(with(PredictorChoice::Auto, None).predictor_kind(empty.path()), PredictorKind::LookAhead);
        assert_eq!(
            with(PredictorChoice::Auto, Some(&learned)).predictor_kind(empty.path()),
            PredictorKind::Learned(learned.clone())
        );
        assert_eq!(
            with(PredictorChoice::Auto, Some(&hidden)).predictor_kind(empty.path()),
            PredictorKind::Hidden(hidden.clone())
        );
        assert_eq!(with(PredictorChoice::Learned, None).predictor_kind(&dir), PredictorKind::Learned(learned));
    }
}
