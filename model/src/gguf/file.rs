//! The GGUF container (versions 2 and 3, little-endian): metadata
//! key/values and tensor infos, read from a memory map with every length
//! and offset checked against the file, so a truncated or hostile file is a
//! clear error, never a panic or a huge allocation. Tensors of types we do
//! not compute with are indexed like the others; only using one is an
//! error.

use crate::{ModelError, Result};
use memmap2::Mmap;
use moe_kernels::QuantFormat;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    Str(String),
    /// An array (of one element type).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::Uint(v) => Some(v),
            Self::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::Float(v) => Some(v),
            Self::Uint(v) => Some(v as f64),
            Self::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The string, if a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// How a tensor's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 4-byte floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    Bf16,
    /// A block-quantized format we compute with.
    Quant(QuantFormat),
    /// Any other type id (read past, refused when used).
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::Bf16,
            2 => Self::Quant(QuantFormat::Q4_0),
            3 => Self::Quant(QuantFormat::Q4_1),
            6 => Self::Quant(QuantFormat::Q5_0),
            7 => Self::Quant(QuantFormat::Q5_1),
            8 => Self::Quant(QuantFormat::Q8_0),
            12 => Self::Quant(QuantFormat::Q4K),
            13 => Self::Quant(QuantFormat::Q5K),
            14 => Self::Quant(QuantFormat::Q6K),
            39 => Self::Quant(QuantFormat::Mxfp4),
            other => Self::Other(other),
        }
    }

    /// ggml's name of the type (`Q4_K`, `BF16`; others by number).
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Bf16 => "BF16".into(),
            Self::Quant(q) => q.name().to_uppercase(),
            Self::Other(id) => match id {
                9 => "Q8_1".into(),
                10 => "Q2_K".into(),
                11 => "Q3_K".into(),
                15 => "Q8_K".into(),
                16..=23 | 29 => format!("IQ type {id}"),
                34 | 35 => format!("TQ type {id}"),
                other => format!("type {other}"),
            },
        }
    }

    /// Bytes of `values` elements (a whole number of blocks), if known.
    pub fn bytes_for(self, values: u64) -> Option<u64> {
        match self {
            Self::F32 => values.checked_mul(4),
            Self::F16 | Self::Bf16 => values.checked_mul(2),
            Self::Quant(q) => {
                let bv = q.block_values() as u64;
                values.is_multiple_of(bv).then(|| values / bv * q.block_bytes() as u64)
            }
            Self::Other(_) => None,
        }
    }
}

/// One tensor as the file describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// ggml's dimensions, innermost first (`[cols, rows, experts]`).
    pub dims: Vec<u64>,
    /// Element storage.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data (`None` for types of unknown size).
    pub len: Option<u64>,
}

/// One mapped GGUF file.
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The mapping (tensor data is sliced out of it).
    pub mmap: Mmap,
    /// Metadata by key.
    pub meta: HashMap<String, MetaValue>,
    /// Tensor infos by name.
    pub tensors: HashMap<String, TensorInfo>,
}

const MAGIC: &[u8; 4] = b"GGUF";
/// Nesting of arrays in arrays we accept (GGUF files use one level).
const MAX_DEPTH: usize = 4;

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|cause| ModelError::Io { path: path.into(), cause })?;
        // SAFETY: the mapping is read-only; model files must not be modified
        // while the server runs (as with every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|cause| ModelError::Io { path: path.into(), cause })?;
        crate::checkpoint::no_read_around(&mmap);
        let bad = |message: String| ModelError::Gguf { path: path.into(), message };
        let mut r = Reader { b: &mmap, pos: 0 };
        if r.take(4).map_err(&bad)? != MAGIC {
            return Err(bad("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32().map_err(&bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} (supported: 2 and 3)")));
        }
        let n_tensors = r.u64().map_err(&bad)?;
        let n_kv = r.u64().map_err(&bad)?;
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(&bad)?;
            let ty = r.u32().map_err(&bad)?;
            let v = r.value(ty, 0).map_err(|m| bad(format!("metadata `{key}`: {m}")))?;
            meta.insert(key, v);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string().map_err(&bad)?;
            let n_dims = r.u32().map_err(&bad)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(format!("tensor {name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<std::result::Result<Vec<_>, _>>().map_err(&bad)?;
            let ty = GgmlType::from_id(r.u32().map_err(&bad)?);
            let offset = r.u64().map_err(&bad)?;
            infos.push((name, dims, ty, offset));
        }
        let align = meta.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32);
        if align == 0 || !align.is_power_of_two() {
            return Err(bad(format!("general.alignment {align} is not a power of two")));
        }
        let data = (r.pos as u64).next_multiple_of(align);
        let mut tensors = HashMap::new();
        for (name, dims, ty, offset) in infos {
            let values = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let len = values.and_then(|v| ty.bytes_for(v));
            let start = data.checked_add(offset);
            if let (Some(len), Some(start)) = (len, start) {
                if start.checked_add(len).is_none_or(|end| end > mmap.len() as u64) {
                    return Err(bad(format!(
                        "tensor {name} ({} bytes at {start}) runs past the end of the file ({} bytes): truncated?",
                        len,
                        mmap.len()
                    )));
                }
            } else if !matches!(ty, GgmlType::Other(_)) {
                return Err(bad(format!("tensor {name}: dimensions {dims:?} do not fit type {}", ty.name())));
            }
            tensors.insert(name, TensorInfo { dims, ty, offset: start.unwrap_or(u64::MAX), len });
        }
        Ok(Self { path: path.into(), mmap, meta, tensors })
    }

    /// A tensor's bytes (`None` for types of unknown size).
    pub fn data(&self, t: &TensorInfo) -> Option<&[u8]> {
        let len = t.len?;
        let _ = self.mmap.advise_range(memmap2::Advice::WillNeed, t.offset as usize, len as usize);
        Some(&self.mmap[t.offset as usize..(t.offset + len) as usize])
    }
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

type R<T> = std::result::Result<T, String>;

impl Reader<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("header runs past the end of the file")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A length that must fit in what is left of the file (`min_each` bytes
    /// per element at least), so a hostile length cannot allocate.
    fn len(&mut self, min_each: usize) -> R<usize> {
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_each.max(1) as u64) > left {
            return Err(format!("length {n} runs past the end of the file (truncated?)"));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> R<String> {
        let n = self.len(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> R<MetaValue> {
        let v = match ty {
            0 => MetaValue::Uint(self.take(1)?[0] as u64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Uint(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::Uint(self.u32()? as u64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err("arrays nested too deep".into());
                }
                let inner = self.u32()?;
                let min_each = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.len(min_each)?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(out)
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(format!("unknown value type {other}")),
        };
        Ok(v)
    }
}
