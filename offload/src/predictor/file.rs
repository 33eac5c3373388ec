//! The safetensors container both trained predictors are stored in: f32
//! tensors and string metadata with a `format` name and a `version`, checked
//! on reading. One place for the checks and the error wording.

use crate::OffloadError;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Writes f32 `tensors` (name, shape, values) and `meta` (with `format` and
/// `version` added) to `path`.
pub(super) fn write(
    path: &Path,
    format: &str,
    version: u32,
    tensors: &[(String, Vec<usize>, &[f32])],
    meta: impl IntoIterator<Item = (String, String)>,
) -> Result<(), OffloadError> {
    let err = |m: String| OffloadError::Predictor { path: path.into(), message: m };
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.2.iter().flat_map(|f| f.to_le_bytes()).collect()).collect();
    let mut views = Vec::new();
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        views.push((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), b).map_err(|x| err(x.to_string()))?));
    }
    let mut meta: HashMap<String, String> = meta.into_iter().collect();
    meta.insert("format".into(), format.into());
    meta.insert("version".into(), version.to_string());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|x| err(x.to_string()))
}

/// The `format` metadata of the predictor file at `path`, if it is a
/// readable safetensors file that has one.
pub fn format_of(path: &Path) -> Option<String> {
    let raw = std::fs::read(path).ok()?;
    let (_, header) = SafeTensors::read_metadata(&raw).ok()?;
    header.metadata().as_ref()?.get("format").cloned()
}

/// A predictor file read whole, its format and version checked.
pub(super) struct PredictorFile {
    path: PathBuf,
    raw: Vec<u8>,
    meta: HashMap<String, String>,
}

impl PredictorFile {
    /// Reads `path`, which must hold `format` at `version`.
    pub(super) fn read(path: &Path, format: &str, version: u32) -> Result<Self, OffloadError> {
        let err = |m: String| OffloadError::Predictor { path: path.into(), message: m };
        let raw = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&raw).map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let f = Self { path: path.into(), raw, meta };
        if f.get("format")? != format {
            return Err(f.err(format!("format is not {format:?}")));
        }
        let v = f.get("version")?;
        if v != version.to_string() {
            return Err(f.err(format!("unsupported version {v} (this build reads {version})")));
        }
        Ok(f)
    }

    /// An error about this file.
    pub(super) fn err(&self, message: String) -> OffloadError {
        OffloadError::Predictor { path: self.path.clone(), message }
    }

    /// Metadata value `k`.
    pub(super) fn get(&self, k: &str) -> Result<String, OffloadError> {
        self.meta.get(k).cloned().ok_or_else(|| self.err(format!("metadata lacks {k:?}")))
    }

    /// Metadata value `k` as a count.
    pub(super) fn num(&self, k: &str) -> Result<usize, OffloadError> {
        self.get(k)?.parse().map_err(|_| self.err(format!("metadata {k:?} is not a count")))
    }

    /// Metadata value `k` as a number.
    pub(super) fn real<T: std::str::FromStr>(&self, k: &str) -> Result<T, OffloadError> {
        self.get(k)?.parse().map_err(|_| self.err(format!("metadata {k:?} is not a number")))
    }

    /// Tensor `name`, which must be f32 of `shape`.
    pub(super) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, OffloadError> {
        let st = SafeTensors::deserialize(&self.raw).map_err(|x| self.err(x.to_string()))?;
        let t = st.tensor(name).map_err(|x| self.err(format!("tensor {name}: {x}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape {
            let found = format!("{:?} {:?}", t.dtype(), t.shape());
            return Err(self.err(format!("tensor {name} must be f32 {shape:?}, found {found}")));
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}
