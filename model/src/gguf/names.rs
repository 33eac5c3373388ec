//! llama.cpp's tensor names, mapped onto the HuggingFace names the loader
//! asks for (`arch::LayerNames`), so one loader serves both formats.
//! Merged expert tensors (`blk.N.ffn_*_exps`, `[experts, rows, cols]`) are
//! indexed as one entry per expert (a contiguous slice of the tensor).

use super::file::{GgmlType, GgufFile};
use crate::arch::LayerNames;
use crate::checkpoint::{Entry, StoredType};
use crate::config::Arch;
use crate::{FfnKind, ModelConfig, ModelError, Result};
use std::collections::HashMap;

/// Which part of a GGUF tensor an index entry is.
#[derive(Clone, Copy)]
enum Part {
    Whole,
    /// Slice `i` of `n` along the outermost dimension: one expert of a
    /// merged expert tensor, one head of DeepSeek's `attn_k_b`/`attn_v_b`.
    Slice(usize, usize),
}

/// The index of `files` under HuggingFace names for `cfg`.
pub(crate) fn index(files: &[GgufFile], cfg: &ModelConfig) -> Result<HashMap<String, Entry>> {
    let mut idx = HashMap::new();
    let mut add = |hf: String, gguf: String, part: Part, rope_heads: Option<usize>| -> Result<()> {
        let idx = &mut idx;
        let Some((fi, t)) = files.iter().enumerate().find_map(|(i, f)| f.tensors.get(&gguf).map(|t| (i, t))) else {
            return Ok(()); // absent: the loader reports the missing tensor by name
        };
        let bad = |message: String| ModelError::Gguf { path: files[fi].path.clone(), message };
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let len = t.len.unwrap_or(0) as usize;
        let start = if t.len.is_some() { t.offset as usize } else { 0 };
        let (start, end, shape) = match part {
            Part::Whole => (start, start + len, shape),
            Part::Slice(i, n) => {
                if shape.len() != 3 || shape[0] != n {
                    return Err(bad(format!("tensor {gguf} has shape {shape:?}, expected [{n}, rows, cols]")));
                }
                let each = len / n;
                (start + i * each, start + (i + 1) * each, shape[1..].to_vec())
            }
        };
        let dtype = match t.ty {
            GgmlType::F32 => StoredType::F32,
            GgmlType::F16 => StoredType::F16,
            GgmlType::Bf16 => StoredType::Bf16,
            GgmlType::Quant(q) => StoredType::Quant(q),
            other @ GgmlType::Other(_) => StoredType::Unsupported(format!(
                "{} (readable: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4)",
                other.name()
            )),
        };
        idx.insert(hf, Entry { file: fi, dtype, shape, start, end, rope_heads, file_name: Some(gguf) });
        Ok(())
    };
    add("model.embed_tokens.weight".into(), "token_embd.weight".into(), Part::Whole, None)?;
    add("model.norm.weight".into(), "output_norm.weight".into(), Part::Whole, None)?;
    add("lm_head.weight".into(), "output.weight".into(), Part::Whole, None)?;
    let a = &cfg.attention;
    // llama.cpp interleaves the q/k rows of `llama` models for its RoPE
    let interleaved = cfg.arch == Arch::Mixtral;
    for (l, kind) in cfg.layers.iter().enumerate() {
        let n = LayerNames::new(cfg.arch, l);
        let b = |s: &str| format!("blk.{l}.{s}");
        add(n.get("input_layernorm.weight"), b("attn_norm.weight"), Part::Whole, None)?;
        add(n.get("post_attention_layernorm.weight"), b("ffn_norm.weight"), Part::Whole, None)?;
        add(n.get("post_attention_layernorm.weight"), b("post_attention_norm.weight"), Part::Whole, None)?; // GLM
        if cfg.attention.mla.is_some() {
            for (hf, g) in [
                ("q_a_proj.weight", "attn_q_a.weight"),
                ("q_a_layernorm.weight", "attn_q_a_norm.weight"),
                ("q_b_proj.weight", "attn_q_b.weight"),
                ("kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"),
                ("kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
                ("kv_b_proj.weight", "attn_kv_b.weight"),
            ] {
                add(n.get(&format!("self_attn.{hf}")), b(g), Part::Whole, None)?;
            }
            // per head: the key up-projection transposed, [kv_lora_rank,
            // qk_nope_head_dim], and the value's, [v_head_dim, kv_lora_rank]
            for h in 0..a.num_heads {
                let s = Part::Slice(h, a.num_heads);
                add(n.get(&format!("self_attn.k_b_proj.{h}.weight")), b("attn_k_b.weight"), s, None)?;
                add(n.get(&format!("self_attn.v_b_proj.{h}.weight")), b("attn_v_b.weight"), s, None)?;
            }
        }
        add(n.get("self_attn.q_proj.weight"), b("attn_q.weight"), Part::Whole, interleaved.then_some(a.num_heads))?;
        add(n.get("self_attn.k_proj.weight"), b("attn_k.weight"), Part::Whole, interleaved.then_some(a.num_kv_heads))?;
        add(n.get("self_attn.v_proj.weight"), b("attn_v.weight"), Part::Whole, None)?;
        add(n.get("self_attn.o_proj.weight"), b("attn_output.weight"), Part::Whole, None)?;
        for (hf, g) in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")] {
            add(n.get(&format!("self_attn.{hf}.bias")), b(&format!("{g}.bias")), Part::Whole, None)?;
        }
        if interleaved && a.qkv_bias {
            return Err(ModelError::Unsupported("q/k biases in a GGUF `llama` model".into()));
        }
        add(n.get("self_attn.q_norm.weight"), b("attn_q_norm.weight"), Part::Whole, None)?;
        add(n.get("self_attn.k_norm.weight"), b("attn_k_norm.weight"), Part::Whole, None)?;
        match kind {
            FfnKind::Dense(_) => {
                for (hf, g) in n.mlp(None).into_iter().zip(["ffn_gate", "ffn_up", "ffn_down"]) {
                    add(hf, b(&format!("{g}.weight")), Part::Whole, None)?;
                }
            }
            FfnKind::Moe => {
                add(n.router(), b("ffn_gate_inp.weight"), Part::Whole, None)?;
                add(n.correction_bias(), b("exp_probs_b.bias"), Part::Whole, None)?;
                let ne = cfg.moe.num_experts;
                for e in 0..ne {
                    for (hf, g) in n.expert(e).into_iter().zip(["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]) {
                        add(hf, b(&format!("{g}.weight")), Part::Slice(e, ne), None)?;
                    }
                }
                for (hf, g) in
                    n.mlp(Some(n.shared_expert())).into_iter().zip(["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"])
                {
                    add(hf, b(&format!("{g}.weight")), Part::Whole, None)?;
                }
                add(n.get("mlp.shared_expert_gate.weight"), b("ffn_gate_inp_shexp.weight"), Part::Whole, None)?;
            }
        }
    }
    // llama.cpp stores the shared experts' gates as vectors
    for (name, e) in idx.iter_mut() {
        if name.ends_with("mlp.shared_expert_gate.weight") && e.shape.len() == 1 {
            e.shape.insert(0, 1);
        }
    }
    Ok(idx)
}
