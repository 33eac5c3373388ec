//! The slow tier: where an expert's weights come from when it is not
//! resident in the fast tier.

use crate::{DiskIo, OffloadError};
use moe_kernels::Weight;
use moe_model::{locate_experts, Checkpoint, ExpertLocation, ExpertWeights, ModelConfig, StoredType, TensorLocation};
use moe_types::{ExpertId, LayerId};
use std::fs::File;
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

/// Experts read from the checkpoint's files (safetensors or GGUF) with
/// positioned reads, each time one is loaded: nothing of them is kept in
/// memory by us, nor, unless `io` is [`DiskIo::Cached`], by the page cache.
/// The file is opened per load, so a shard that became unreadable fails only
/// the loads that need it, with its name in the error. Loads may run on
/// several threads at once.
pub struct DiskExperts {
    /// `[layer][expert]`, empty for dense layers.
    locations: Vec<Vec<ExpertLocation>>,
    expert_bytes: usize,
    dir: PathBuf,
    io: DiskIo,
}

impl DiskExperts {
    /// Indexes the experts of the model at `dir` (a safetensors directory or
    /// a GGUF model; shapes and dtypes are checked now; no expert data is
    /// read). GGUF experts are read as stored, quantized blocks included.
    /// `io`: how reads treat the page cache (`Direct` becomes `Release`
    /// where the file system refuses `O_DIRECT`); unless `Cached`, what is in
    /// the page cache of the files now (read by indexing them, or by loading
    /// the non-expert weights) is dropped.
    pub fn open(dir: &Path, cfg: &ModelConfig, io: DiskIo) -> Result<Self, OffloadError> {
        let ck = Checkpoint::open_model(dir, cfg)?;
        let locations = locate_experts(&ck, cfg)?;
        drop(ck); // unmapped, so its pages can be released below
        let first = locations.iter().flatten().next();
        let expert_bytes = first.map_or(0, ExpertLocation::resident_bytes);
        let io = match first.and_then(|loc| loc.parts.first()) {
            Some(part) => io.usable_for(&part.path)?,
            None => io,
        };
        let mut files: Vec<&Path> =
            locations.iter().flatten().flat_map(|l| l.parts.iter()).map(|p| p.path.as_path()).collect();
        files.sort_unstable();
        files.dedup();
        for f in files {
            io.release_file(f).map_err(|e| OffloadError::Config(format!("cannot open {}: {e}", f.display())))?;
        }
        Ok(Self { locations, expert_bytes, dir: dir.to_path_buf(), io })
    }
}

/// The common case, bf16 matrices in one file on a little-endian host: read
/// each matrix straight into the buffer it is computed from (gate and up into
/// one stacked buffer), one copy per byte. `None` when the case does not apply.
fn read_bf16_direct(loc: &ExpertLocation, io: DiskIo) -> Result<Option<ExpertWeights>, (&Path, String)> {
    let Some(parts) = loc.gate_up_down() else { return Ok(None) };
    let same_file = parts.iter().all(|t| t.path == parts[0].path);
    if cfg!(target_endian = "big") || !same_file || parts.iter().any(|t| t.dtype != StoredType::Bf16) {
        return Ok(None);
    }
    let [gate, up, down] = parts;
    let path = gate.path.as_path();
    let file = io.open(path).map_err(|e| (path, e.to_string()))?;
    let read = |t: &TensorLocation, dst: &mut [u16]| {
        io.read_into(&file, t.offset, bytemuck::cast_slice_mut(dst))
            .map_err(|e| (path, format!("reading tensor {}: {e}", t.name)))
    };
    let (g, u, d) = (gate.len / 2, up.len / 2, down.len / 2);
    let mut gate_up = vec![0u16; g + u];
    read(gate, &mut gate_up[..g])?;
    read(up, &mut gate_up[g..])?;
    let mut down_bits = vec![0u16; d];
    read(down, &mut down_bits)?;
    let w = |rows, cols, bits| Weight::from_bf16_bits(rows, cols, bits).map_err(|e| (path, e.to_string()));
    Ok(Some(ExpertWeights {
        gate_up: w(gate.rows + up.rows, gate.cols, gate_up)?,
        down: w(down.rows, down.cols, down_bits)?,
        bias: None,
    }))
}

fn read_part(io: DiskIo, file: &File, t: &TensorLocation) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; t.len];
    io.read_into(file, t.offset, &mut buf).map_err(|e| format!("reading tensor {}: {e}", t.name))?;
    Ok(buf)
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
        if let Some(w) = read_bf16_direct(loc, self.io).map_err(|(path, m)| fail(path, m))? {
            return Ok(w);
        }
        let mut bytes = Vec::with_capacity(loc.parts.len());
        let mut open: Option<(&Path, File)> = None;
        for t in &loc.parts {
            if open.as_ref().is_none_or(|(p, _)| *p != t.path.as_path()) {
                let f = self.io.open(&t.path).map_err(|e| fail(&t.path, e.to_string()))?;
                open = Some((t.path.as_path(), f));
            }
            let (_, f) = open.as_ref().expect("opened above");
            bytes.push(read_part(self.io, f, t).map_err(|m| fail(&t.path, m))?);
        }
        let views: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        loc.assemble(&views).map_err(|e| fail(&loc.parts[0].path, e.to_string()))
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn describe(&self) -> String {
        format!("checkpoint files in {} (read on demand, --disk-io {})", self.dir.display(), self.io)
    }
}

/// Experts of a float checkpoint quantized as they are read
/// (`--quantize-experts` with an expert budget): the cache's slots and its
/// budget hold quantized experts. Quantizing costs CPU on every load
/// (one thread, `examples/quant_bench.rs`: Q8_0 about 170 M values/s, Q4_K
/// about 15 M), so
/// a GGUF file, read as stored, is the better slow tier for Q4_K.
pub struct QuantizingSource {
    inner: Box<dyn ExpertSource>,
    format: moe_kernels::QuantFormat,
    expert_bytes: usize,
}

impl QuantizingSource {
    /// Wraps `inner` (the experts of `cfg`); one expert is read now to learn
    /// the quantized size.
    pub fn new(
        inner: Box<dyn ExpertSource>,
        cfg: &ModelConfig,
        format: moe_kernels::QuantFormat,
    ) -> Result<Self, OffloadError> {
        let expert_bytes = match cfg.moe_layers().next() {
            Some(l) => inner.load(LayerId(l as u16), ExpertId(0))?.quantized(format)?.nbytes(),
            None => 0,
        };
        Ok(Self { inner, format, expert_bytes })
    }
}

impl ExpertSource for QuantizingSource {
    fn load(&self, layer: LayerId, expert: ExpertId) -> Result<ExpertWeights, OffloadError> {
        Ok(self.inner.load(layer, expert)?.quantized(self.format)?)
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn describe(&self) -> String {
        format!("{}, quantized to {} as read", self.inner.describe(), self.format)
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
