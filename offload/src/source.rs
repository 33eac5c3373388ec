//! The slow tier: where an expert's weights come from when it is not
//! resident in the fast tier.

use crate::OffloadError;
use moe_kernels::Weight;
use moe_model::{locate_experts, Checkpoint, ExpertLocation, ExpertWeights, ModelConfig, TensorLocation};
use moe_types::{ExpertId, LayerId};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Produces an expert's weights on demand (called from the loader thread).
pub trait ExpertSource: Send + Sync {
    /// Reads expert `expert` of decoder layer `layer`.
    fn load(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertWeights, OffloadError>;
    /// Bytes one expert occupies once resident.
    fn expert_bytes(&self) -> usize;
    /// A short description for logs.
    fn describe(&self) -> String;
}

/// Experts read from the checkpoint's safetensors files with positioned
/// reads, each time one is loaded: nothing of them is kept in memory by us.
/// The file is opened per load, so a shard that became unreadable fails only
/// the loads that need it, with its name in the error.
pub struct DiskExperts {
    /// `[layer][expert]`, empty for dense layers.
    locations: Vec<Vec<ExpertLocation>>,
    expert_bytes: usize,
    dir: PathBuf,
}

impl DiskExperts {
    /// Indexes the experts of the checkpoint in `dir` (shapes and dtypes are
    /// checked now; no expert data is read).
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Self, OffloadError> {
        let ck = Checkpoint::open(dir)?;
        let locations = locate_experts(&ck, cfg)?;
        let expert_bytes = locations.iter().flatten().next().map_or(0, resident_bytes);
        Ok(Self { locations, expert_bytes, dir: dir.to_path_buf() })
    }
}

/// Bytes in memory of an expert (f16 is widened to f32 at load).
fn resident_bytes(loc: &ExpertLocation) -> usize {
    let one = |t: &TensorLocation| match t.dtype {
        safetensors::Dtype::F16 => t.len * 2,
        _ => t.len,
    };
    one(&loc.gate) + one(&loc.up) + one(&loc.down)
}

fn read_tensor(file: &File, t: &TensorLocation) -> Result<Weight, String> {
    let mut buf = vec![0u8; t.len];
    file.read_exact_at(&mut buf, t.offset).map_err(|e| format!("reading tensor {}: {e}", t.name))?;
    t.to_weight(&buf).map_err(|e| e.to_string())
}

impl ExpertSource for DiskExperts {
    fn load(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertWeights, OffloadError> {
        let loc = self.locations.get(layer.index()).and_then(|l| l.get(expert.index())).ok_or_else(|| {
            OffloadError::Load {
                layer: layer.index(),
                expert: expert.index(),
                path: self.dir.clone(),
                message: "no such expert in the checkpoint".into(),
            }
        })?;
        let fail = |path: &Path, message: String| OffloadError::Load {
            layer: layer.index(),
            expert: expert.index(),
            path: path.to_path_buf(),
            message,
        };
        let mut parts = Vec::with_capacity(3);
        let mut open: Option<(&Path, File)> = None;
        for t in [&loc.gate, &loc.up, &loc.down] {
            if open.as_ref().is_none_or(|(p, _)| *p != t.path.as_path()) {
                let f = File::open(&t.path).map_err(|e| fail(&t.path, e.to_string()))?;
                open = Some((t.path.as_path(), f));
            }
            let (_, f) = open.as_ref().expect("opened above");
            parts.push(read_tensor(f, t).map_err(|m| fail(&t.path, m))?);
        }
        let down = parts.pop().expect("three parts");
        let up = parts.pop().expect("three parts");
        let gate = parts.pop().expect("three parts");
        ExpertWeights::from_parts(gate, up, down).map_err(|e| fail(&loc.gate.path, e.to_string()))
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn describe(&self) -> String {
        format!("checkpoint files in {} (read on demand)", self.dir.display())
    }
}

/// Experts held in host memory and copied into the fast tier on load: the
/// slow tier of a GPU deployment, and on CPU a way to measure the cache's
/// own overhead (random-weight models have no files).
pub struct MemoryExperts {
    experts: Vec<Vec<ExpertWeights>>,
    expert_bytes: usize,
}

impl MemoryExperts {
    /// Wraps `[layer][expert]` weights (dense layers: empty).
    pub fn new(experts: Vec<Vec<ExpertWeights>>) -> Self {
        let expert_bytes = experts.iter().flatten().next().map_or(0, ExpertWeights::nbytes);
        Self { experts, expert_bytes }
    }
}

impl ExpertSource for MemoryExperts {
    fn load(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertWeights, OffloadError> {
        self.experts.get(layer.index()).and_then(|l| l.get(expert.index())).cloned().ok_or_else(|| OffloadError::Load {
            layer: layer.index(),
            expert: expert.index(),
            path: PathBuf::from("<memory>"),
            message: "no such expert".into(),
        })
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn describe(&self) -> String {
        "host memory".into()
    }
}
