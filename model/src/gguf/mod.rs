//! GGUF models (llama.cpp's format): a `.gguf` file, a split set
//! (`name-00001-of-00003.gguf` and its siblings), or a directory holding
//! one of these. The container is read by [`file`] (a small reader: it
//! indexes tensor types it cannot compute with instead of failing the
//! file); [`config`] turns the metadata into a [`ModelConfig`]; [`names`]
//! indexes the tensors under the HuggingFace names the loader uses;
//! [`tokenizer`] rebuilds the tokenizer and chat template.

mod config;
mod file;
mod names;
mod tokenizer;

pub use file::{GgmlType, GgufFile, MetaValue, TensorInfo};

use crate::checkpoint::Checkpoint;
use crate::tokenizer::TextCodec;
use crate::{ModelConfig, ModelError, Result};
use std::path::{Path, PathBuf};

/// The GGUF files of `path`, in split order, or `None` when `path` is not
/// a GGUF model (a safetensors directory).
pub fn gguf_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let is_gguf = |p: &Path| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
    if path.is_file() || is_gguf(path) {
        if !is_gguf(path) {
            return Ok(None);
        }
        if !path.is_file() {
            return Err(not_found(path, "GGUF file not found"));
        }
        return split_set(path).map(Some);
    }
    let Ok(rd) = std::fs::read_dir(path) else { return Ok(None) };
    let mut found: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_gguf(p) && p.is_file()).collect();
    found.sort();
    if found.is_empty() || path.join("config.json").is_file() {
        return Ok(None);
    }
    // one model: a single file, or the first part of one split set
    let firsts: Vec<&PathBuf> = found.iter().filter(|p| split_part(p).is_none_or(|(i, _)| i == 1)).collect();
    match firsts.as_slice() {
        [one] => split_set(one).map(Some),
        _ => Err(ModelError::Gguf {
            path: path.into(),
            message: format!(
                "the directory holds {} GGUF models ({}): pass --model the file to serve",
                firsts.len(),
                firsts.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

fn not_found(path: &Path, what: &str) -> ModelError {
    ModelError::Io { path: path.into(), cause: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()) }
}

/// `(part, count)` of a split file name `stem-0000P-of-0000N.gguf`.
fn split_part(p: &Path) -> Option<(usize, usize)> {
    let stem = p.file_stem()?.to_str()?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (_, part) = rest.rsplit_once('-')?;
    if part.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((part.parse().ok()?, count.parse().ok()?))
}

/// Every part of the split set `first` belongs to (just `first` if it is
/// not a split file); each must exist.
fn split_set(first: &Path) -> Result<Vec<PathBuf>> {
    let Some((part, count)) = split_part(first) else { return Ok(vec![first.to_path_buf()]) };
    let name = first.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let prefix = &name[..name.len() - "00001-of-00001.gguf".len()];
    if part != 1 {
        return Err(ModelError::Gguf {
            path: first.into(),
            message: format!("part {part} of a split model: pass the first part ({prefix}00001-of-{count:05}.gguf)"),
        });
    }
    (1..=count)
        .map(|i| {
            let p = first.with_file_name(format!("{prefix}{i:05}-of-{count:05}.gguf"));
            if p.is_file() {
                Ok(p)
            } else {
                Err(not_found(&p, "a part of the split GGUF model is missing"))
            }
        })
        .collect()
}

fn open_all(paths: &[PathBuf]) -> Result<Vec<GgufFile>> {
    paths.iter().map(|p| GgufFile::open(p)).collect()
}

/// The weights of the GGUF model in `paths` for `cfg`.
pub(crate) fn checkpoint(paths: &[PathBuf], cfg: &ModelConfig) -> Result<Checkpoint> {
    checkpoint_of(open_all(paths)?, cfg)
}

fn checkpoint_of(files: Vec<GgufFile>, cfg: &ModelConfig) -> Result<Checkpoint> {
    let index = names::index(&files, cfg)?;
    Ok(Checkpoint::from_parts(files.into_iter().map(|f| (f.path, f.mmap)).collect(), index))
}

/// Config, tokenizer and weights of the GGUF model in `paths`.
pub(crate) fn open(paths: &[PathBuf]) -> Result<(ModelConfig, TextCodec, Checkpoint)> {
    let files = open_all(paths)?;
    let cfg = config::config(&files)?;
    let text = tokenizer::text(&files[0])?;
    let codec = TextCodec::from_parts(text.tokenizer, &cfg, text.bos_token, text.eos_token, text.chat_template);
    let ck = checkpoint_of(files, &cfg)?;
    Ok((cfg, codec, ck))
}

/// The config of the GGUF model in `paths`.
pub(crate) fn read_config(paths: &[PathBuf]) -> Result<ModelConfig> {
    config::config(&open_all(paths)?)
}
