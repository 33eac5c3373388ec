//! A GGUF file's hyperparameters (llama.cpp's metadata keys) as a
//! [`ModelConfig`], for the architectures llama.cpp writes our models as:
//! `llama` with experts (Mixtral), `qwen2moe`, `qwen3moe`, `olmoe`.

use super::file::{GgufFile, MetaValue};
use crate::config::{Arch, AttentionConfig, ExpertAct, FfnKind, MoeConfig, QkNorm, RopeScaling, Routing};
use crate::{ModelConfig, ModelError, Result};

/// Reads the config of the model in `files` (metadata from the first, tensor
/// shapes from whichever holds them).
pub(crate) fn config(files: &[GgufFile]) -> Result<ModelConfig> {
    let first = &files[0];
    let bad = |message: String| ModelError::Gguf { path: first.path.clone(), message };
    let meta = &first.meta;
    let get = |k: &str| meta.get(k);
    let name =
        get("general.architecture").and_then(MetaValue::as_str).ok_or_else(|| bad("no general.architecture".into()))?;
    let arch = match name {
        "llama" | "mixtral" => Arch::Mixtral,
        "qwen2moe" => Arch::Qwen2Moe,
        "qwen3moe" => Arch::Qwen3Moe,
        "olmoe" => Arch::Olmoe,
        other => {
            return Err(ModelError::UnsupportedArch(format!(
                "{other} (GGUF architecture; supported: llama with experts, qwen2moe, qwen3moe, olmoe)"
            )))
        }
    };
    let key = |k: &str| format!("{name}.{k}");
    let uint = |k: &str| get(&key(k)).and_then(MetaValue::as_u64).map(|v| v as usize);
    let need = |k: &str| uint(k).ok_or_else(|| bad(format!("missing metadata {}", key(k))));
    let float = |k: &str| get(&key(k)).and_then(MetaValue::as_f64);
    let tensor = |n: &str| files.iter().find_map(|f| f.tensors.get(n));
    let has = |n: &str| tensor(n).is_some();

    let hidden_size = need("embedding_length")?;
    let num_layers = need("block_count")?;
    let num_heads = need("attention.head_count")?;
    let num_kv_heads = match get(&key("attention.head_count_kv")) {
        None => num_heads,
        Some(v) => {
            v.as_u64().map(|v| v as usize).ok_or_else(|| bad("per-layer head_count_kv is not supported".into()))?
        }
    };
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) || hidden_size == 0 {
        return Err(bad(format!("head counts {num_heads}/{num_kv_heads} or width {hidden_size} are inconsistent")));
    }
    let head_dim = uint("attention.key_length").unwrap_or(hidden_size / num_heads);
    let num_experts = uint("expert_count").unwrap_or(0);
    if num_experts == 0 {
        return Err(ModelError::Unsupported(format!(
            "GGUF {name} model without experts (moe-serve serves MoE models)"
        )));
    }
    let top_k = need("expert_used_count")?;
    if top_k == 0 || top_k > num_experts {
        return Err(bad(format!("expert_used_count {top_k} must be in 1..={num_experts}")));
    }
    let expert_ffn = uint("expert_feed_forward_length").or_else(|| uint("feed_forward_length"));
    let expert_ffn =
        expert_ffn.ok_or_else(|| bad(format!("missing metadata {}", key("expert_feed_forward_length"))))?;
    let mut layers = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        if has(&format!("blk.{l}.ffn_gate_inp.weight")) {
            layers.push(FfnKind::Moe);
        } else {
            let dense = tensor(&format!("blk.{l}.ffn_gate.weight"))
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| bad(format!("layer {l} has neither a router nor a dense MLP")))?;
            layers.push(FfnKind::Dense(dense as usize));
        }
    }
    let rope_scaling = match get(&key("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear { factor: float("rope.scaling.factor").unwrap_or(1.0) },
        Some(other) => return Err(ModelError::Unsupported(format!("GGUF rope scaling {other:?}"))),
    };
    let q_norm = tensor("blk.0.attn_q_norm.weight").map(|t| t.dims[0] as usize);
    let qk_norm = match q_norm {
        None => QkNorm::None,
        Some(n) if n == head_dim => QkNorm::PerHead,
        Some(_) => QkNorm::Full,
    };
    let vocab_size = match tensor("token_embd.weight").and_then(|t| t.dims.get(1)) {
        Some(&v) => v as usize,
        None => return Err(bad("missing tensor token_embd.weight".into())),
    };
    let token = |k: &str| get(&format!("tokenizer.ggml.{k}")).and_then(MetaValue::as_u64).map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> =
        ["eos_token_id", "eot_token_id", "eom_token_id"].iter().filter_map(|k| token(k)).collect();
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        attention: AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            rope_interleaved: false,
            softmax_scale: 1.0 / (head_dim as f32).sqrt(),
            mla: None,
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            qk_norm,
            clip_qkv: float("attention.clamp_kqv").map(|c| c as f32).filter(|&c| c > 0.0),
            // as config.json is read: only Mixtral's window is applied
            sliding_window: uint("attention.sliding_window").filter(|&w| w > 0 && arch == Arch::Mixtral),
            sliding_layers: None,
            sinks: false,
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
        },
        layers,
        moe: MoeConfig {
            num_experts,
            top_k,
            expert_ffn,
            // as llama.cpp computes each architecture
            norm_topk_prob: matches!(arch, Arch::Mixtral | Arch::Qwen3Moe),
            shared_expert_ffn: uint("expert_shared_feed_forward_length").filter(|&w| w > 0),
            shared_expert_gated: true,
            routed_scaling_factor: 1.0,
            routing: Routing::SoftmaxTopK,
            router_bias: false,
            expert_act: ExpertAct::Swiglu,
            expert_bias: false,
        },
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
        max_position_embeddings: uint("context_length").unwrap_or(4096),
        tie_word_embeddings: !has("output.weight"),
        eos_token_ids,
        bos_token_id: token("bos_token_id"),
    })
}
