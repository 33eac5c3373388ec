//! Loading a model directory: config, tokenizer files, weights.

use crate::checkpoint::Checkpoint;
use crate::experts::ResidentExperts;
use crate::tokenizer::TextCodec;
use crate::weights::Model;
use crate::{ModelConfig, ModelError, Result};
use std::path::Path;

/// Receives loading progress in bytes of tensor data.
pub trait LoadProgress {
    /// Called once with the total before loading starts.
    fn start(&mut self, total_bytes: u64);
    /// Called as tensors are read.
    fn advance(&mut self, bytes: u64);
}

/// Ignores progress.
impl LoadProgress for () {
    fn start(&mut self, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// Everything loaded from a model directory.
pub struct LoadedModel {
    /// Non-expert weights and the forward pass.
    pub model: Model,
    /// Every expert, resident in memory.
    pub experts: ResidentExperts,
    /// Tokenizer and generation facts.
    pub codec: TextCodec,
}

/// The parts of a model path before any weight is read.
struct Opened {
    cfg: ModelConfig,
    codec: TextCodec,
    ck: Checkpoint,
}

/// Opens a model path: a HuggingFace directory (`config.json`,
/// `tokenizer.json` + optional `tokenizer_config.json` and
/// `generation_config.json`, safetensors weights) or a GGUF model (a
/// `.gguf` file, the first part of a split set, or a directory holding one).
fn open(path: &Path) -> Result<Opened> {
    if let Some(files) = crate::gguf::gguf_files(path)? {
        let (cfg, codec, ck) = crate::gguf::open(&files)?;
        return Ok(Opened { cfg, codec, ck });
    }
    check_dir(path)?;
    let cfg = ModelConfig::from_file(&path.join("config.json"))?;
    let codec = TextCodec::load(path, &cfg)?;
    let ck = Checkpoint::open(path)?;
    Ok(Opened { cfg, codec, ck })
}

/// The configuration of a model path (see [`load_model`] for the forms).
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    match crate::gguf::gguf_files(path)? {
        Some(files) => crate::gguf::read_config(&files),
        None => ModelConfig::from_file(&path.join("config.json")),
    }
}

/// Loads a model path (a HuggingFace directory or a GGUF model) with every
/// expert resident.
pub fn load_model(path: &Path, progress: &mut dyn LoadProgress) -> Result<LoadedModel> {
    let Opened { cfg, codec, ck } = open(path)?;
    progress.start(ck.total_bytes() as u64);
    let model = Model::load(&ck, &cfg, |b| progress.advance(b as u64))?;
    let experts = ResidentExperts::load(&ck, &cfg, |b| progress.advance(b as u64))?;
    // after the weights, whose shape errors name the tensor
    check_vocab(&codec, &cfg)?;
    Ok(LoadedModel { model, experts, codec })
}

/// Loads a model path like [`load_model`] but reads no expert: they stay on
/// disk for an expert cache (see `moe_offload::DiskExperts`). Returns the
/// non-expert weights and the tokenizer.
pub fn load_model_without_experts(path: &Path, progress: &mut dyn LoadProgress) -> Result<(Model, TextCodec)> {
    let Opened { cfg, codec, ck } = open(path)?;
    check_vocab(&codec, &cfg)?;
    let expert_bytes: usize = crate::experts::locate_experts(&ck, &cfg)?.iter().flatten().map(|e| e.nbytes()).sum();
    progress.start(ck.total_bytes().saturating_sub(expert_bytes) as u64);
    let model = Model::load(&ck, &cfg, |b| progress.advance(b as u64))?;
    Ok((model, codec))
}

fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.into(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        });
    }
    // fail on unreadable directories up front, with the directory named
    std::fs::read_dir(dir).map_err(|cause| ModelError::Io { path: dir.into(), cause })?;
    Ok(())
}

fn check_vocab(codec: &TextCodec, cfg: &ModelConfig) -> Result<()> {
    if codec.vocab_size() > cfg.vocab_size {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer has {} tokens but the model's vocab_size is {}",
            codec.vocab_size(),
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// Loads a model path's config and tokenizer but gives the model random
/// bf16 weights (for benchmarks of shapes without a checkpoint).
pub fn load_random(dir: &Path, seed: u64) -> Result<LoadedModel> {
    let (cfg, codec) = match crate::gguf::gguf_files(dir)? {
        Some(files) => {
            let (cfg, codec, _) = crate::gguf::open(&files)?;
            (cfg, codec)
        }
        None => {
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            let codec = TextCodec::load(dir, &cfg)?;
            (cfg, codec)
        }
    };
    let (model, experts) = crate::random::random_model(&cfg, seed)?;
    Ok(LoadedModel { model, experts, codec })
}

/// Loads only the weights of a model path for `cfg` (no tokenizer needed).
pub fn load_weights(
    dir: &Path,
    cfg: &ModelConfig,
    progress: &mut dyn LoadProgress,
) -> Result<(Model, ResidentExperts)> {
    let ck = Checkpoint::open_model(dir, cfg)?;
    progress.start(ck.total_bytes() as u64);
    let model = Model::load(&ck, cfg, |b| progress.advance(b as u64))?;
    let experts = ResidentExperts::load(&ck, cfg, |b| progress.advance(b as u64))?;
    Ok((model, experts))
}
