//! The tensors of a checkpoint: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (or, lacking an index, every
//! `*.safetensors` file), or GGUF file(s) indexed under the same
//! HuggingFace names (`crate::gguf`), memory-mapped and indexed by tensor
//! name.
//!
//! Tensors are copied out of the mapping only when asked for, so a later
//! expert cache can read an expert's bytes on demand.

use crate::{ModelError, Result};
use memmap2::Mmap;
use moe_kernels::{QuantFormat, Weight};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// How a tensor's values are stored in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredType {
    /// 4-byte floats.
    F32,
    /// IEEE half floats (widened to f32 at load).
    F16,
    /// bfloat16 (kept as bf16).
    Bf16,
    /// GGUF blocks (kept quantized).
    Quant(QuantFormat),
    /// `float8_e4m3fn` codes, scaled per 128x128 block by the tensor named
    /// `<name>_scale_inv` (`crate::fp8`).
    Fp8E4m3,
    /// Anything else, by its name in the file (refused when used).
    Unsupported(String),
}

impl StoredType {
    fn from_safetensors(d: Dtype) -> Self {
        match d {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::Bf16,
            Dtype::F8_E4M3 => Self::Fp8E4m3,
            other => Self::Unsupported(format!("{other:?}")),
        }
    }
}

/// One tensor of the index: where its bytes are and how to read them.
pub(crate) struct Entry {
    pub(crate) file: usize,
    pub(crate) dtype: StoredType,
    /// Row-major shape (outermost first, as in safetensors).
    pub(crate) shape: Vec<usize>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// llama.cpp stores the q/k rows of `llama` models interleaved per head
    /// for its RoPE: the number of heads whose row order to restore.
    pub(crate) rope_heads: Option<usize>,
    /// The tensor's name in its file, where the index uses another (GGUF).
    pub(crate) file_name: Option<String>,
}

/// The memory-mapped weight files of a model (safetensors, or GGUF indexed
/// under the same HuggingFace names), indexed by tensor name.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

/// Turns off the kernel's read-around for faults on `map` (up to the
/// device's read-ahead, often megabytes, around every fault): indexing a file
/// reads its header, not the expert bytes beside it, which a disk tier of
/// experts would otherwise find in the page cache as a second copy. Tensors
/// are read ahead one by one instead ([`Checkpoint`]'s `bytes`). Advice only:
/// a refusal changes nothing but speed.
pub(crate) fn no_read_around(map: &Mmap) {
    let _ = map.advise(memmap2::Advice::Random);
}

impl Checkpoint {
    /// Maps the safetensors file(s) in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = shard_paths(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|cause| ModelError::Io { path: path.clone(), cause })?;
            // SAFETY: the mapping is read-only; the model directory must not be
            // modified while the server runs (as with every mmap-based loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|cause| ModelError::Io { path: path.clone(), cause })?;
            no_read_around(&mmap);
            let (header, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::Safetensors { path: path.clone(), message: e.to_string() })?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                index.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: StoredType::from_safetensors(info.dtype),
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                        rope_heads: None,
                        file_name: None,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index })
    }

    /// Builds a checkpoint from mapped files and an index made elsewhere
    /// (the GGUF reader).
    pub(crate) fn from_parts(files: Vec<(PathBuf, Mmap)>, index: HashMap<String, Entry>) -> Self {
        Self { files, index }
    }

    /// Opens the weights of a model path: a safetensors directory, or GGUF
    /// file(s) for the model `cfg` describes.
    pub fn open_model(path: &Path, cfg: &crate::ModelConfig) -> Result<Self> {
        match crate::gguf::gguf_files(path)? {
            Some(files) => crate::gguf::checkpoint(&files, cfg),
            None => Self::open(path),
        }
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.index.values().map(|e| e.end - e.start).sum()
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.index.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if e.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: display_name(name, e),
                got: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        let map = &self.files[e.file].1;
        // read exactly this tensor ahead (the mapping has no read-around):
        // the experts a disk tier streams never enter the page cache by it
        let _ = map.advise_range(memmap2::Advice::WillNeed, e.start, e.end - e.start);
        &map[e.start..e.end]
    }

    /// A `[rows, cols]` matrix, keeping bf16 as bf16 and quantized blocks
    /// quantized.
    pub fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let e = self.entry(name, &[rows, cols])?;
        if e.dtype == StoredType::Fp8E4m3 {
            let scales = self.f32_tensor(&crate::fp8::scale_name(name), &crate::fp8::scale_shape(rows, cols))?;
            return crate::fp8::weight(&display_name(name, e), rows, cols, self.bytes(e), &scales);
        }
        let w = weight_from_bytes(&display_name(name, e), &e.dtype, rows, cols, self.bytes(e))?;
        match e.rope_heads {
            Some(heads) => unpermute_rope_rows(&w, heads),
            None => Ok(w),
        }
    }

    /// Where a `[rows, cols]` matrix lives on disk, so that it can be read
    /// later without the mapping (the expert store's slow tier). The dtype is
    /// checked now.
    pub fn locate(&self, name: &str, rows: usize, cols: usize) -> Result<TensorLocation> {
        let e = self.entry(name, &[rows, cols])?;
        if let StoredType::Unsupported(dtype) = &e.dtype {
            return Err(ModelError::Dtype { name: display_name(name, e), dtype: dtype.clone() });
        }
        Ok(TensorLocation {
            name: display_name(name, e),
            path: self.files[e.file].0.clone(),
            offset: e.start as u64,
            len: e.end - e.start,
            dtype: e.dtype.clone(),
            rows,
            cols,
        })
    }

    /// Where the block scales of FP8 matrix `name` (`[rows, cols]`) live.
    pub(crate) fn locate_fp8_scales(&self, name: &str, rows: usize, cols: usize) -> Result<TensorLocation> {
        let [rb, cb] = crate::fp8::scale_shape(rows, cols);
        let loc = self.locate(&crate::fp8::scale_name(name), rb, cb)?;
        match loc.dtype {
            StoredType::F32 | StoredType::Bf16 | StoredType::F16 => Ok(loc),
            _ => Err(ModelError::Dtype { name: loc.name, dtype: type_name(&loc.dtype) }),
        }
    }

    /// A tensor of exactly `shape`, widened to f32 (norms, biases).
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name, shape)?;
        let b = self.bytes(e);
        Ok(match &e.dtype {
            StoredType::F32 => f32s(b),
            StoredType::Bf16 => u16s(b).into_iter().map(|x| half::bf16::from_bits(x).to_f32()).collect(),
            StoredType::F16 => u16s(b).into_iter().map(|x| half::f16::from_bits(x).to_f32()).collect(),
            StoredType::Quant(q) if b.len().is_multiple_of(q.block_bytes()) => {
                let mut out = vec![0f32; b.len() / q.block_bytes() * q.block_values()];
                q.dequantize(b, &mut out);
                out
            }
            other => return Err(ModelError::Dtype { name: display_name(name, e), dtype: type_name(other) }),
        })
    }

    /// A 1-D vector of length `len`, widened to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.f32_tensor(name, &[len])
    }

    /// Where slice `i` of a tensor of `shape` lives (`shape[0]` slices,
    /// each a `[shape[1], prod(shape[2..])]` matrix): one expert of a merged
    /// expert tensor (gpt-oss). Byte tensors (MXFP4 blocks and scales) are
    /// located too; their bytes are parsed by their reader.
    pub(crate) fn locate_slice(&self, name: &str, i: usize, shape: &[usize]) -> Result<TensorLocation> {
        let e = self.entry(name, shape)?;
        let one = (e.end - e.start) / shape[0].max(1);
        Ok(TensorLocation {
            name: display_name(name, e),
            path: self.files[e.file].0.clone(),
            offset: (e.start + i * one) as u64,
            len: one,
            dtype: e.dtype.clone(),
            rows: shape.get(1).copied().unwrap_or(1),
            cols: shape.iter().skip(2).product(),
        })
    }

    /// The bytes at `loc`, a location in this checkpoint, read ahead.
    pub(crate) fn bytes_at(&self, loc: &TensorLocation) -> &[u8] {
        let (start, len) = (loc.offset as usize, loc.len);
        let map =
            self.files.iter().find(|(p, _)| *p == loc.path).map(|(_, m)| m).expect("a location in this checkpoint");
        let _ = map.advise_range(memmap2::Advice::WillNeed, start, len);
        &map[start..start + len]
    }
}

/// The name to show for an entry: the file's own name when it differs.
fn display_name(name: &str, e: &Entry) -> String {
    match &e.file_name {
        Some(f) => format!("{f} ({name})"),
        None => name.to_string(),
    }
}

fn type_name(t: &StoredType) -> String {
    match t {
        StoredType::F32 => "F32".into(),
        StoredType::F16 => "F16".into(),
        StoredType::Bf16 => "BF16".into(),
        StoredType::Quant(q) => q.name().to_uppercase(),
        StoredType::Fp8E4m3 => "F8_E4M3".into(),
        StoredType::Unsupported(s) => s.clone(),
    }
}

/// Restores HuggingFace's row order of a q or k projection that llama.cpp's
/// converter interleaved for its RoPE: per head, its row `2j + i` is
/// HuggingFace's row `i * head_dim / 2 + j`.
fn unpermute_rope_rows(w: &Weight, heads: usize) -> Result<Weight> {
    let rows = w.rows();
    let hd = rows / heads.max(1);
    if heads == 0 || !rows.is_multiple_of(heads) || !hd.is_multiple_of(2) {
        return Err(ModelError::Unsupported(format!(
            "cannot restore the RoPE row order of {rows} rows in {heads} heads"
        )));
    }
    let mut order = vec![0usize; rows];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..hd / 2 {
                order[h * hd + i * hd / 2 + j] = h * hd + 2 * j + i;
            }
        }
    }
    Ok(w.select_rows(&order)?)
}

/// A matrix's place in a weight file: byte range, dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorLocation {
    /// Tensor name (for error messages).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub len: usize,
    /// Element type.
    pub dtype: StoredType,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl TensorLocation {
    /// Builds the matrix from bytes read at this location.
    pub fn to_weight(&self, bytes: &[u8]) -> Result<Weight> {
        if bytes.len() != self.len {
            return Err(ModelError::Safetensors {
                path: self.path.clone(),
                message: format!("tensor {}: read {} bytes, expected {}", self.name, bytes.len(), self.len),
            });
        }
        weight_from_bytes(&self.name, &self.dtype, self.rows, self.cols, bytes)
    }

    /// The values at this location widened to f32 (FP8 block scales).
    pub(crate) fn to_f32(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        Ok(self.to_weight(bytes)?.to_f32())
    }
}

/// A `[rows, cols]` matrix from little-endian tensor bytes (bf16 kept as
/// bf16, quantized blocks kept quantized).
fn weight_from_bytes(name: &str, dtype: &StoredType, rows: usize, cols: usize, b: &[u8]) -> Result<Weight> {
    let w = match dtype {
        StoredType::F32 => Weight::from_f32(rows, cols, f32s(b)),
        StoredType::Bf16 => Weight::from_bf16_bits(rows, cols, u16s(b)),
        StoredType::F16 => Weight::from_f16_bits(rows, cols, &u16s(b)),
        StoredType::Quant(q) => Weight::from_quant(rows, cols, *q, b.to_vec()),
        StoredType::Fp8E4m3 => {
            return Err(ModelError::Unsupported(format!("{name}: FP8 codes read without their block scales")))
        }
        StoredType::Unsupported(d) => return Err(ModelError::Dtype { name: name.into(), dtype: d.clone() }),
    };
    Ok(w?)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// The safetensors files of a model directory, in a stable order.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|cause| ModelError::Io { path: index_path.clone(), cause })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Safetensors { path: index_path.clone(), message: e.to_string() })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Safetensors {
            path: index_path.clone(),
            message: "no `weight_map` object".into(),
        })?;
        let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut paths = Vec::new();
        for n in names {
            // Shard names come from the index file: accept plain file names only.
            if n.contains('/') || n.contains('\\') || n == ".." {
                return Err(ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("shard name {n:?} is not a plain file name"),
                });
            }
            paths.push(dir.join(n));
        }
        return Ok(paths);
    }
    let rd = std::fs::read_dir(dir).map_err(|cause| ModelError::Io { path: dir.into(), cause })?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ModelError::Io {
            path: single,
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors file in the model directory"),
        });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_kernels::WeightData;
    use safetensors::tensor::TensorView;

    fn write(dir: &Path, file: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    fn le16(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn loads_each_precision_and_reports_bad_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [0.5f32, -1.0, 2.0, 0.25, 3.0, -0.125];
        let f16: Vec<u16> = vals.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let bf16: Vec<u16> = vals.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        write(
            dir.path(),
            "model.safetensors",
            &[
                ("h", Dtype::F16, vec![2, 3], le16(&f16)),
                ("b", Dtype::BF16, vec![2, 3], le16(&bf16)),
                ("f", Dtype::F32, vec![2, 3], f32b),
                ("i", Dtype::I64, vec![1], vec![0; 8]),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let mut row = [0f32; 3];
        for name in ["h", "b", "f"] {
            let w = ck.weight(name, 2, 3).unwrap();
            w.row_to_f32(1, &mut row);
            assert_eq!(row, [0.25, 3.0, -0.125], "{name}");
        }
        assert!(matches!(ck.weight("b", 2, 3).unwrap().data(), WeightData::Bf16(_)), "bf16 must stay bf16");
        assert_eq!(ck.vector("f", 6).unwrap_err().to_string(), "tensor f has shape [2, 3], expected [6]");
        assert_eq!(ck.weight("nope", 1, 1).unwrap_err().to_string(), "missing tensor nope");
        assert!(ck.vector("i", 1).unwrap_err().to_string().contains("unsupported dtype"));
    }

    #[test]
    fn shards_without_index_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a-00001.safetensors", &[("x", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec())]);
        write(dir.path(), "a-00002.safetensors", &[("y", Dtype::F32, vec![1], 2f32.to_le_bytes().to_vec())]);
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.vector("y", 1).unwrap(), vec![2.0]);
        assert!(ck.contains("x"));
        let p = dir.path().join("a-00002.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("invalid safetensors file") && err.contains("a-00002"), "{err}");
    }
}
