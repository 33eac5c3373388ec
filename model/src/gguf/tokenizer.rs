//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), rebuilt as a
//! `tokenizers` tokenizer through its JSON form:
//! - `gpt2`: byte-level BPE from the vocabulary and merges, with the
//!   pre-tokenizer split llama.cpp uses for `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece BPE with byte fallback, merges derived from the
//!   pieces' scores (a merge of two pieces ranks by the score of the piece
//!   it makes, as SentencePiece's BPE applies them).
//!
//! Control and user-defined tokens become added tokens (control ones
//! special); `add_bos_token` / `add_eos_token` become the post-processor.

use super::file::{GgufFile, MetaValue};
use crate::{ModelError, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// The pre-tokenizer regex of Qwen2-family vocabularies (llama.cpp's
/// `qwen2` pre type).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token types of `tokenizer.ggml.token_type`.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// What the GGUF says about its text side, beyond the tokenizer itself.
pub(crate) struct GgufText {
    pub(crate) tokenizer: Tokenizer,
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) chat_template: Option<String>,
}

/// Builds the tokenizer of `f`.
pub(crate) fn text(f: &GgufFile) -> Result<GgufText> {
    let bad = |m: String| ModelError::Gguf { path: f.path.clone(), message: m };
    let get = |k: &str| f.meta.get(&format!("tokenizer.ggml.{k}"));
    let model = get("model").and_then(MetaValue::as_str).ok_or_else(|| bad("no tokenizer.ggml.model".into()))?;
    let tokens: Vec<&str> = get("tokens")
        .and_then(MetaValue::as_array)
        .ok_or_else(|| bad("no tokenizer.ggml.tokens".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or(""))
        .collect();
    let types: Vec<i64> = match get("token_type").and_then(MetaValue::as_array) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
        None => vec![1; tokens.len()],
    };
    let id = |k: &str| get(k).and_then(MetaValue::as_u64).map(|v| v as usize).filter(|&i| i < tokens.len());
    let flag = |k: &str, default: bool| match get(k) {
        Some(MetaValue::Bool(b)) => *b,
        _ => default,
    };
    let (model_json, normalizer, pre, decoder, add_bos_default) = match model {
        "gpt2" => {
            // a vocabulary of single bytes has no merges (and llama.cpp's
            // converter then writes none)
            let merges: Vec<Value> = get("merges")
                .and_then(MetaValue::as_array)
                .unwrap_or_default()
                .iter()
                .filter_map(MetaValue::as_str)
                .map(|m| Value::String(m.to_string()))
                .collect();
            let pre_name = get("pre").and_then(MetaValue::as_str).unwrap_or("default");
            let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": regex});
            let pre = match pre_name {
                "default" | "gpt-2" | "gpt2" | "olmo" | "dbrx" | "smaug-bpe" => byte_level(true),
                "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)
                ]}),
                other => {
                    return Err(bad(format!(
                        "tokenizer pre-type {other:?} is not supported (supported: default, gpt-2, olmo, qwen2)"
                    )))
                }
            };
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map(&tokens), "merges": merges,
            });
            (
                model,
                Value::Null,
                pre,
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
                false,
            )
        }
        "llama" => {
            let scores: Vec<f64> = get("scores")
                .and_then(MetaValue::as_array)
                .ok_or_else(|| bad("a llama vocabulary without tokenizer.ggml.scores".into()))?
                .iter()
                .map(|v| v.as_f64().unwrap_or(0.0))
                .collect();
            let unk = id("unknown_token_id").map(|i| tokens[i]).unwrap_or("<unk>");
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab_map(&tokens), "merges": spm_merges(&tokens, &scores, &types),
            });
            let normalizer = if flag("add_space_prefix", true) {
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
                ]})
            } else {
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})
            };
            let strip = if flag("add_space_prefix", true) { 1 } else { 0 };
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": strip, "stop": 0}
            ]});
            (model, normalizer, Value::Null, decoder, true)
        }
        other => return Err(bad(format!("tokenizer model {other:?} is not supported (supported: gpt2, llama)"))),
    };
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == CONTROL || t == USER_DEFINED)
        .map(|(i, (tok, &t))| {
            json!({"id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": t == USER_DEFINED, "special": t == CONTROL})
        })
        .collect();
    let bos = id("bos_token_id").map(|i| tokens[i].to_string());
    let eos = id("eos_token_id").map(|i| tokens[i].to_string());
    let add_bos = flag("add_bos_token", add_bos_default) && bos.is_some();
    let add_eos = flag("add_eos_token", false) && eos.is_some();
    let post = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut special = Map::new();
        for (on, tok, k) in [(add_bos, &bos, "bos_token_id"), (add_eos, &eos, "eos_token_id")] {
            if let (true, Some(t)) = (on, tok) {
                special.insert(t.clone(), json!({"id": t, "ids": [id(k)], "tokens": [t]}));
            }
        }
        if let (true, Some(b)) = (add_bos, &bos) {
            single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if let (true, Some(e)) = (add_eos, &eos) {
            single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special})
    } else {
        Value::Null
    };
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post, "decoder": decoder,
        "model": model_json,
    });
    let tokenizer: Tokenizer =
        doc.to_string().parse().map_err(|e| bad(format!("building the tokenizer from tokenizer.ggml.*: {e}")))?;
    let chat_template = f.meta.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string);
    Ok(GgufText { tokenizer, bos_token: bos, eos_token: eos, chat_template })
}

fn vocab_map(tokens: &[&str]) -> Value {
    // a token listed twice keeps its first id (as llama.cpp's lookup does)
    let mut m = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        m.entry(t.to_string()).or_insert(json!(i));
    }
    Value::Object(m)
}

/// SentencePiece BPE merges from the vocabulary: every split of a normal
/// piece into two pieces of the vocabulary is a merge, ranked by the
/// merged piece's score (higher first), then by the pieces' ids.
fn spm_merges(tokens: &[&str], scores: &[f64], types: &[i64]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores.get(i).copied().unwrap_or(0.0), li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect()
}
