//! A GGUF file's hyperparameters (llama.cpp's metadata keys) as a
//! [`ModelConfig`], for the architectures llama.cpp writes our models as:
//! `llama` with experts (Mixtral), `qwen2moe`, `qwen3moe`, `olmoe`,
//! `deepseek2` (DeepSeek-V2/V3, Kimi K2: latent attention, its keys' up-projection
//! stored per head as `attn_k_b`, values' as `attn_v_b`) and `glm4moe`.

use super::file::{GgufFile, MetaValue};
use crate::config::{
    Arch, AttentionConfig, ExpertAct, FfnKind, MlaConfig, MoeConfig, QkNorm, RopeScaling, Routing, Yarn,
};
use crate::{ModelConfig, ModelError, Result};

/// The GGUF architectures read, for messages.
const READ: &str = "llama with experts, qwen2moe, qwen3moe, olmoe, deepseek2, glm4moe";

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
        // V3's router (sigmoid, correction bias): gating function 2, or told by its
        // bias tensors (some converters leave the function out)
        "deepseek2"
            if meta.get("deepseek2.expert_gating_func").and_then(MetaValue::as_u64) == Some(2)
                || files.iter().any(|f| f.tensors.keys().any(|n| n.ends_with("exp_probs_b.bias"))) =>
        {
            Arch::DeepseekV3
        }
        "deepseek2" => Arch::DeepseekV2,
        "glm4moe" => Arch::Glm4Moe,
        other => return Err(ModelError::UnsupportedArch(format!("{other} (GGUF architecture; supported: {READ})"))),
    };
    let key = |k: &str| format!("{name}.{k}");
    let uint = |k: &str| get(&key(k)).and_then(MetaValue::as_u64).map(|v| v as usize);
    let need = |k: &str| uint(k).ok_or_else(|| bad(format!("missing metadata {}", key(k))));
    let float = |k: &str| get(&key(k)).and_then(MetaValue::as_f64);
    let tensor = |n: &str| files.iter().find_map(|f| f.tensors.get(n));
    let has = |n: &str| tensor(n).is_some();

    let hidden_size = need("embedding_length")?;
    // multi-token-prediction layers follow the decoder's (GLM's converter writes them)
    let num_layers = need("block_count")?.saturating_sub(uint("nextn_predict_layers").unwrap_or(0));
    let num_heads = need("attention.head_count")?;
    let mla = match arch.is_deepseek() {
        true => {
            let rope = need("rope.dimension_count")?;
            let qk = need("attention.key_length_mla")?;
            Some(MlaConfig {
                q_lora_rank: uint("attention.q_lora_rank").filter(|&r| r > 0),
                kv_lora_rank: need("attention.kv_lora_rank")?,
                qk_nope_head_dim: qk
                    .checked_sub(rope)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("key_length_mla {qk} is not above rope.dimension_count {rope}")))?,
                qk_rope_head_dim: rope,
                v_head_dim: need("attention.value_length_mla")?,
            })
        }
        false => None,
    };
    let num_kv_heads = match get(&key("attention.head_count_kv")) {
        // the converter writes latent attention as one shared KV head
        _ if mla.is_some() => num_heads,
        None => num_heads,
        Some(v) => {
            v.as_u64().map(|v| v as usize).ok_or_else(|| bad("per-layer head_count_kv is not supported".into()))?
        }
    };
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) || hidden_size == 0 {
        return Err(bad(format!("head counts {num_heads}/{num_kv_heads} or width {hidden_size} are inconsistent")));
    }
    let head_dim = match mla {
        Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
        None => uint("attention.key_length").unwrap_or(hidden_size / num_heads),
    };
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
        // DeepSeek's YaRN: the file keeps 0.1 mscale_all_dim, not mscale;
        // every release has mscale = mscale_all_dim, so cosines and sines
        // are unscaled (and the softmax scale takes mscale(factor)^2, below)
        Some("yarn") if mla.is_some() => {
            let factor = float("rope.scaling.factor").ok_or_else(|| bad("yarn without rope.scaling.factor".into()))?;
            RopeScaling::Yarn(Yarn {
                factor,
                original_max_position_embeddings: need("rope.scaling.original_context_length")?,
                beta_fast: float("rope.scaling.yarn_beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: float("rope.scaling.yarn_beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                attention_factor: 1.0,
                truncate: true,
            })
        }
        Some(other) => return Err(ModelError::Unsupported(format!("GGUF rope scaling {other:?}"))),
    };
    // as transformers computes it: latent attention in Python floats, with
    // YaRN's mscale(factor, mscale_all_dim)^2; the others in f32
    let softmax_scale = match (mla, rope_scaling) {
        (Some(_), RopeScaling::Yarn(y)) => {
            let log_mul = float("rope.scaling.yarn_log_multiplier").unwrap_or(0.0);
            let m = if y.factor > 1.0 && log_mul != 0.0 { log_mul * y.factor.ln() + 1.0 } else { 1.0 };
            ((head_dim as f64).powf(-0.5) * m * m) as f32
        }
        (Some(_), _) => (head_dim as f64).powf(-0.5) as f32,
        (None, _) => 1.0 / (head_dim as f32).sqrt(),
    };
    let sigmoid = arch == Arch::DeepseekV3 || arch == Arch::Glm4Moe;
    let (groups, topk_groups) = (uint("expert_group_count").unwrap_or(1), uint("expert_group_used_count").unwrap_or(1));
    if groups == 0 || !num_experts.is_multiple_of(groups) || topk_groups == 0 || topk_groups > groups {
        return Err(bad(format!("expert groups {topk_groups} of {groups} do not fit {num_experts} experts")));
    }
    let routing = match (arch, sigmoid) {
        (Arch::DeepseekV2, _) if groups > 1 => Routing::SoftmaxGroupLimited { groups, topk_groups },
        (_, true) => Routing::SigmoidGrouped { groups, topk_groups },
        _ => Routing::SoftmaxTopK,
    };
    let flag = |k: &str| matches!(get(&key(k)), Some(MetaValue::Bool(true)));
    let shared_count = uint("expert_shared_count").unwrap_or(0);
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
            rotary_dim: uint("rope.dimension_count").filter(|&d| d > 0 && d <= head_dim).unwrap_or(head_dim),
            // llama.cpp rotates DeepSeek's pairs (its "normal" RoPE), as transformers does
            rope_interleaved: mla.is_some(),
            softmax_scale,
            mla,
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
            norm_topk_prob: matches!(arch, Arch::Mixtral | Arch::Qwen3Moe)
                || (matches!(arch, Arch::DeepseekV3 | Arch::Glm4Moe) && flag("expert_weights_norm")),
            shared_expert_ffn: match arch {
                Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => Some(shared_count * expert_ffn),
                _ => uint("expert_shared_feed_forward_length"),
            }
            .filter(|&w| w > 0),
            shared_expert_gated: arch == Arch::Qwen2Moe,
            routed_scaling_factor: float("expert_weights_scale").unwrap_or(1.0) as f32,
            routing,
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
