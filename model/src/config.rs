//! `config.json`, parsed once into a typed description of the network.

use crate::{ModelError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The supported architectures, chosen by `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `mixtral`: softmax routing renormalised over the top-k.
    Mixtral,
    /// `qwen2_moe`: qkv bias, a sigmoid-gated shared expert, dense layers by
    /// `decoder_sparse_step` / `mlp_only_layers`.
    Qwen2Moe,
    /// `qwen3_moe`: per-head q/k RMSNorm, explicit `head_dim`.
    Qwen3Moe,
    /// `olmoe`: full-width q/k RMSNorm, optional `clip_qkv`.
    Olmoe,
    /// `gpt_oss`: attention with biases and a learned sink logit per head,
    /// sliding and full attention by layer, YaRN RoPE; a biased router whose
    /// top-k logits are softmaxed; experts with biases, gate and up
    /// interleaved in one tensor, and a clamped SwiGLU.
    GptOss,
    /// `deepseek_v2`: multi-head latent attention, softmax routing (greedy or
    /// group-limited), scaled routing weights, ungated shared experts, dense
    /// first layers, interleaved RoPE.
    DeepseekV2,
    /// `deepseek_v3` (also `kimi_k2`): as `deepseek_v2` with sigmoid scores,
    /// a selection-only correction bias and grouped top-k.
    DeepseekV3,
    /// `glm4_moe`: grouped-query attention with partial RoPE, optional
    /// per-head q/k norm and qkv bias; DeepSeek-V3's router and shared experts.
    Glm4Moe,
}

impl Arch {
    fn from_model_type(t: &str) -> Result<Self> {
        match t {
            "mixtral" => Ok(Arch::Mixtral),
            "qwen2_moe" => Ok(Arch::Qwen2Moe),
            "qwen3_moe" => Ok(Arch::Qwen3Moe),
            "olmoe" => Ok(Arch::Olmoe),
            "gpt_oss" => Ok(Arch::GptOss),
            "deepseek_v2" => Ok(Arch::DeepseekV2),
            "deepseek_v3" | "kimi_k2" => Ok(Arch::DeepseekV3),
            "glm4_moe" => Ok(Arch::Glm4Moe),
            other => Err(ModelError::UnsupportedArch(other.to_string())),
        }
    }

    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
            Arch::GptOss => "gpt_oss",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4Moe => "glm4_moe",
        }
    }

    /// DeepSeek's family: latent attention, shared experts, dense first layers.
    pub fn is_deepseek(self) -> bool {
        matches!(self, Arch::DeepseekV2 | Arch::DeepseekV3)
    }
}

/// Where q/k normalisation happens, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// None (Mixtral, Qwen2-MoE).
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE).
    PerHead,
    /// RMSNorm over all heads' values at once (OLMoE).
    Full,
}

/// Rotary-embedding frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// YaRN (arXiv 2309.00071), as transformers computes it: the
    /// frequencies of a band of dimensions ramp from extrapolated to
    /// interpolated, and cosines and sines are scaled by `attention_factor`.
    Yarn(Yarn),
}

/// YaRN's parameters, resolved (transformers' defaults filled in).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// The context the model was pretrained with.
    pub original_max_position_embeddings: usize,
    /// Rotations bounding the ramp (defaults 32 and 1).
    pub beta_fast: f64,
    /// See `beta_fast`.
    pub beta_slow: f64,
    /// Scale of the cosines and sines.
    pub attention_factor: f64,
    /// Round the ramp's bounds outwards to whole dimensions (default true).
    pub truncate: bool,
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are
/// up-projections of one compressed latent per token, which is all the KV
/// cache holds, with a small RoPE key shared by every head beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaConfig {
    /// Rank of the query's low-rank projection (`None`: one full projection,
    /// as in DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Width of the cached latent.
    pub kv_lora_rank: usize,
    /// Per head: key/query width without position.
    pub qk_nope_head_dim: usize,
    /// Key/query width rotated by RoPE (one key part shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per head: value width.
    pub v_head_dim: usize,
}

/// Attention shape and options.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`;
    /// with latent attention, `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head's queries and keys (with latent attention
    /// `qk_nope_head_dim + qk_rope_head_dim`).
    pub head_dim: usize,
    /// Dimensions of each head RoPE rotates (`head_dim`, less with GLM's
    /// partial rotary factor, `qk_rope_head_dim` with latent attention).
    pub rotary_dim: usize,
    /// RoPE rotates interleaved pairs `(x0, x1), (x2, x3), ...` (DeepSeek)
    /// rather than the two halves.
    pub rope_interleaved: bool,
    /// Multiplies the scores before the softmax (`head_dim^-1/2`, times
    /// YaRN's `mscale_all_dim` correction squared for DeepSeek).
    pub softmax_scale: f32,
    /// Latent attention's shape (DeepSeek).
    pub mla: Option<MlaConfig>,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// q/k normalisation.
    pub qk_norm: QkNorm,
    /// Clamp of q, k, v to `[-c, c]` (OLMoE).
    pub clip_qkv: Option<f32>,
    /// Keys further back than this many positions are masked (Mixtral; in
    /// gpt-oss only the layers `sliding_layers` marks).
    pub sliding_window: Option<usize>,
    /// Per layer: whether `sliding_window` applies (`None`: every layer).
    pub sliding_layers: Option<Vec<bool>>,
    /// A learned logit per query head joins each softmax's denominator (gpt-oss).
    pub sinks: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
}

impl AttentionConfig {
    /// The sliding window of decoder layer `l`, if it has one.
    pub fn window(&self, l: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(layers) if !layers.get(l).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }
}

/// What follows attention in a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// A dense SwiGLU MLP of this width.
    Dense(usize),
    /// The routed experts (see [`MoeConfig`]).
    Moe,
}

/// The routed-expert block.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Hidden width of one expert's FFN.
    pub expert_ffn: usize,
    /// Renormalise the top-k softmax weights to sum to one.
    pub norm_topk_prob: bool,
    /// Width of the always-on shared expert(s) (Qwen2-MoE, DeepSeek, GLM).
    pub shared_expert_ffn: Option<usize>,
    /// The shared expert's output is scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_expert_gated: bool,
    /// Multiplies the chosen experts' weights (DeepSeek, GLM).
    pub routed_scaling_factor: f32,
    /// How router logits become expert weights.
    pub routing: Routing,
    /// The router has a bias (gpt-oss).
    pub router_bias: bool,
    /// The experts' FFN.
    pub expert_act: ExpertAct,
    /// The experts' gate/up and down projections have biases (gpt-oss).
    pub expert_bias: bool,
}

/// How router logits become the chosen experts' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Softmax over all experts, keep the top k (renormalised when
    /// `norm_topk_prob`).
    SoftmaxTopK,
    /// Keep the top k logits, softmax over them (gpt-oss).
    TopKSoftmax,
    /// DeepSeek-V2's `group_limited_greedy`: softmax over all experts; the
    /// `topk_groups` groups (of `groups` equal, consecutive ones) with the
    /// highest best expert stay, the others' scores become 0; top k of the
    /// rest. Weights are the softmax values (never renormalised).
    SoftmaxGroupLimited {
        /// Expert groups.
        groups: usize,
        /// Groups kept.
        topk_groups: usize,
    },
    /// DeepSeek-V3 / GLM-4.5: sigmoid scores; for selection only, a
    /// per-expert correction bias is added; groups are ranked by the sum of
    /// their two best biased scores and the `topk_groups` best kept; top k of
    /// their experts. Weights are the unbiased sigmoid values (renormalised
    /// when `norm_topk_prob`).
    SigmoidGrouped {
        /// Expert groups.
        groups: usize,
        /// Groups kept.
        topk_groups: usize,
    },
}

impl Routing {
    /// The router has a selection-only correction bias
    /// (`e_score_correction_bias`).
    pub fn has_correction_bias(self) -> bool {
        matches!(self, Routing::SigmoidGrouped { .. })
    }
}

/// An expert's gated activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertAct {
    /// `silu(gate) * up`.
    Swiglu,
    /// gpt-oss: gate clamped above at `limit`, up to `[-limit, limit]`,
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu {
        /// Slope inside the sigmoid.
        alpha: f32,
        /// The clamp.
        limit: f32,
    },
}

/// A checkpoint's network, typed and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Vocabulary entries.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Attention options.
    pub attention: AttentionConfig,
    /// Per layer: dense MLP or MoE.
    pub layers: Vec<FfnKind>,
    /// MoE block options.
    pub moe: MoeConfig,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids named by the config.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    clip_qkv: Option<f64>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    layer_types: Option<Vec<String>>,
    experts_per_token: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    routed_scaling_factor: Option<f64>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
    partial_rotary_factor: Option<f64>,
    use_qk_norm: Option<bool>,
    mlp_bias: Option<bool>,
    quantization_config: Option<Value>,
    swiglu_limit: Option<f64>,
    swiglu_alpha: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|cause| ModelError::Io { path: path.into(), cause })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config { message, .. } => ModelError::Config { path: path.into(), message },
            other => other,
        })
    }

    /// Resolves a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |message: String| ModelError::Config { path: "config.json".into(), message };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let need = |v: Option<usize>, name: &str| v.ok_or_else(|| bad(format!("missing field `{name}`")));
        let arch =
            Arch::from_model_type(raw.model_type.as_deref().ok_or_else(|| bad("missing field `model_type`".into()))?)?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!("hidden_act {act:?} (only \"silu\")")));
            }
        }
        if raw.use_sliding_window == Some(true) {
            return Err(ModelError::Unsupported("use_sliding_window=true".into()));
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 {
            return Err(bad("hidden_size, num_hidden_layers and num_attention_heads must be positive".into()));
        }
        let mla = if arch.is_deepseek() { Some(resolve_mla(&raw).map_err(bad)?) } else { None };
        let num_kv_heads = match mla {
            Some(_) => num_heads, // every head expands its own keys and values from the latent
            None => raw.num_key_value_heads.unwrap_or(num_heads),
        };
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match mla {
            Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
            None => raw.head_dim.unwrap_or(hidden_size / num_heads),
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be positive and even")));
        }
        let rotary_dim = match (mla, arch) {
            (Some(m), _) => m.qk_rope_head_dim,
            (None, Arch::Glm4Moe) => {
                let factor = raw
                    .rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("partial_rotary_factor"))
                    .and_then(Value::as_f64)
                    .or(raw.partial_rotary_factor)
                    .unwrap_or(0.5);
                let dim = (head_dim as f64 * factor) as usize; // Python's int(): truncation
                if dim == 0 || !dim.is_multiple_of(2) || dim > head_dim {
                    return Err(bad(format!(
                        "partial_rotary_factor {factor} gives {dim} rotary dimensions of {head_dim} (must be even, 2..={head_dim})"
                    )));
                }
                dim
            }
            (None, _) => head_dim,
        };
        let (rope_theta, rope_scaling) =
            resolve_rope(&raw, raw.max_position_embeddings.unwrap_or(4096)).map_err(bad)?;
        let softmax_scale = match mla {
            // transformers: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2
            // for any scaled RoPE that names mscale_all_dim (in Python floats)
            Some(_) => ((head_dim as f64).powf(-0.5) * mscale_all_dim_correction(&raw)) as f32,
            None => 1.0 / (head_dim as f32).sqrt(),
        };

        // hub configs name the count by family; transformers 5 writes
        // `num_local_experts` for qwen3_moe too, so accept either
        let num_experts = need(
            raw.n_routed_experts.or(raw.num_experts).or(raw.num_local_experts),
            "num_local_experts` or `num_experts",
        )?;
        let top_k = need(raw.num_experts_per_tok.or(raw.experts_per_token), "num_experts_per_tok")?;
        if top_k == 0 || top_k > num_experts {
            return Err(bad(format!("num_experts_per_tok {top_k} must be in 1..={num_experts}")));
        }
        let expert_ffn = match arch {
            Arch::Mixtral | Arch::Olmoe | Arch::GptOss => need(raw.intermediate_size, "intermediate_size")?,
            Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => {
                need(raw.moe_intermediate_size, "moe_intermediate_size")?
            }
        };
        let layers = resolve_layers(arch, &raw, num_layers).map_err(bad)?;
        let shared_expert_ffn = match arch {
            Arch::Qwen2Moe => Some(need(raw.shared_expert_intermediate_size, "shared_expert_intermediate_size")?),
            // transformers' defaults: 2 shared experts for V2, 1 for V3 and GLM
            Arch::DeepseekV2 => Some(raw.n_shared_experts.unwrap_or(2) * expert_ffn),
            Arch::DeepseekV3 | Arch::Glm4Moe => Some(raw.n_shared_experts.unwrap_or(1) * expert_ffn),
            _ => None,
        }
        .filter(|&w| w > 0);
        let routing = resolve_routing(arch, &raw, num_experts, top_k).map_err(bad)?;
        let norm_topk_prob = match arch {
            Arch::Mixtral => true,
            Arch::Qwen3Moe | Arch::DeepseekV3 | Arch::Glm4Moe => raw.norm_topk_prob.unwrap_or(true),
            Arch::Qwen2Moe | Arch::Olmoe => raw.norm_topk_prob.unwrap_or(false),
            Arch::GptOss => false,     // the softmax is over the chosen k already
            Arch::DeepseekV2 => false, // its router never renormalises, whatever the config says
        };
        let routed_scaling_factor = match arch {
            Arch::DeepseekV3 => raw.routed_scaling_factor.unwrap_or(2.5) as f32, // transformers' default
            Arch::DeepseekV2 | Arch::Glm4Moe => raw.routed_scaling_factor.unwrap_or(1.0) as f32,
            _ => 1.0,
        };
        check_quantization(raw.quantization_config.as_ref()).map_err(bad)?;
        if raw.mlp_bias == Some(true) {
            return Err(ModelError::Unsupported("mlp_bias=true".into()));
        }
        let gpt_oss = arch == Arch::GptOss;
        let sliding_layers = if gpt_oss {
            let types = raw.layer_types.as_ref().ok_or_else(|| bad("missing field `layer_types`".into()))?;
            if types.len() != num_layers {
                return Err(bad(format!("layer_types has {} entries for {num_layers} layers", types.len())));
            }
            let slides = types.iter().map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(bad(format!("unknown layer type {other:?} (sliding_attention or full_attention)"))),
            });
            Some(slides.collect::<Result<Vec<bool>>>()?)
        } else {
            None
        };
        let expert_act = if gpt_oss {
            let limit = raw.swiglu_limit.unwrap_or(7.0) as f32;
            ExpertAct::ClampedSwiglu { alpha: raw.swiglu_alpha.unwrap_or(1.702) as f32, limit }
        } else {
            ExpertAct::Swiglu
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        if mla.is_some() && attention_bias {
            return Err(ModelError::Unsupported("attention_bias=true with latent attention".into()));
        }
        let attention = AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_interleaved: match arch {
                Arch::DeepseekV2 => true, // transformers rotates complex pairs
                Arch::DeepseekV3 => raw.rope_interleave.unwrap_or(true),
                _ => false,
            },
            softmax_scale,
            mla,
            qkv_bias: raw.qkv_bias.unwrap_or(arch == Arch::Qwen2Moe) || attention_bias,
            o_bias: !matches!(arch, Arch::Qwen2Moe | Arch::Glm4Moe) && attention_bias,
            qk_norm: match arch {
                Arch::Mixtral | Arch::Qwen2Moe | Arch::GptOss | Arch::DeepseekV2 | Arch::DeepseekV3 => QkNorm::None,
                Arch::Qwen3Moe => QkNorm::PerHead,
                Arch::Glm4Moe if raw.use_qk_norm == Some(true) => QkNorm::PerHead,
                Arch::Glm4Moe => QkNorm::None,
                Arch::Olmoe => QkNorm::Full,
            },
            clip_qkv: if arch == Arch::Olmoe { raw.clip_qkv.map(|c| c as f32) } else { None },
            sliding_window: if matches!(arch, Arch::Mixtral | Arch::GptOss) {
                raw.sliding_window.filter(|&w| w > 0)
            } else {
                None
            },
            sliding_layers,
            sinks: gpt_oss,
            rope_theta,
            rope_scaling,
        };
        Ok(ModelConfig {
            arch,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            attention,
            layers,
            moe: MoeConfig {
                num_experts,
                top_k,
                expert_ffn,
                norm_topk_prob,
                shared_expert_ffn,
                shared_expert_gated: arch == Arch::Qwen2Moe,
                routed_scaling_factor,
                routing,
                router_bias: gpt_oss,
                expert_act,
                expert_bias: gpt_oss,
            },
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().enumerate().filter(|(_, k)| **k == FfnKind::Moe).map(|(i, _)| i)
    }

    /// Width of one token's keys (or values) in one layer, as attention
    /// reads them (expanded, with latent attention).
    pub fn kv_width(&self) -> usize {
        self.attention.num_kv_heads * self.attention.head_dim
    }

    /// Floats one token's entry in one layer of the KV cache holds: keys and
    /// values (`2 * kv_width`), or with latent attention the latent and the
    /// shared RoPE key (`kv_lora_rank + qk_rope_head_dim`), values none.
    pub fn kv_cache_widths(&self) -> (usize, usize) {
        match self.attention.mla {
            Some(m) => (m.kv_lora_rank + m.qk_rope_head_dim, 0),
            None => (self.kv_width(), self.kv_width()),
        }
    }

    /// Bytes of KV cache per token over all layers (f32 entries).
    pub fn kv_bytes_per_token(&self) -> usize {
        let (k, v) = self.kv_cache_widths();
        4 * (k + v) * self.num_layers()
    }

    /// Bytes per token a cache of expanded keys and values would hold: the
    /// same as [`Self::kv_bytes_per_token`] without latent attention.
    pub fn expanded_kv_bytes_per_token(&self) -> usize {
        let a = &self.attention;
        let v = a.mla.map_or(a.head_dim, |m| m.v_head_dim);
        4 * a.num_kv_heads * (a.head_dim + v) * self.num_layers()
    }
}

/// RoPE base and scaling from either the hub form (top-level `rope_theta`,
/// `rope_scaling`) or the transformers 5 form (`rope_parameters`).
fn resolve_rope(raw: &RawConfig, max_positions: usize) -> std::result::Result<(f64, RopeScaling), String> {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(raw.rope_theta).unwrap_or(10000.0);
    let scaling = params.or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    let Some(s) = scaling else { return Ok((theta, RopeScaling::None)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "linear" => {
            let factor = s.get("factor").and_then(Value::as_f64).ok_or("linear rope scaling without `factor`")?;
            Ok((theta, RopeScaling::Linear { factor }))
        }
        "yarn" => Ok((theta, RopeScaling::Yarn(resolve_yarn(s, raw, max_positions)?))),
        other => Err(format!("unsupported rope type {other:?} (supported: default, linear, yarn)")),
    }
}

/// YaRN's parameters with transformers' defaults: the original context from
/// the parameters, else a top-level `original_max_position_embeddings`, else
/// `max_position_embeddings`; a missing factor is their ratio; the attention
/// factor, unless given, `0.1 ln(factor) + 1`, or with `mscale` and
/// `mscale_all_dim` the ratio of two such terms.
fn resolve_yarn(s: &Value, raw: &RawConfig, max_positions: usize) -> std::result::Result<Yarn, String> {
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let original = s
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .or(raw.original_max_position_embeddings)
        .unwrap_or(max_positions);
    if original == 0 {
        return Err("yarn rope scaling with original_max_position_embeddings 0".into());
    }
    let factor = num("factor").unwrap_or(max_positions as f64 / original as f64);
    if !(factor.is_finite() && factor > 0.0) {
        return Err(format!("yarn rope scaling factor {factor} must be positive"));
    }
    let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let attention_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim")) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
        _ => mscale(factor, 1.0),
    };
    // transformers treats 0 like a missing value here (`or 32`)
    let beta = |k: &str, default: f64| num(k).filter(|&b| b != 0.0).unwrap_or(default);
    Ok(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: beta("beta_fast", 32.0),
        beta_slow: beta("beta_slow", 1.0),
        attention_factor,
        truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// The checkpoint quantizations read: none, `mxfp4` (gpt-oss's experts) and
/// `fp8` with 128x128 blocks of e4m3 (`crate::fp8`); others are refused
/// here rather than misread later.
fn check_quantization(q: Option<&Value>) -> std::result::Result<(), String> {
    let Some(q) = q.filter(|v| !v.is_null()) else { return Ok(()) };
    match q.get("quant_method").and_then(Value::as_str) {
        Some("mxfp4") => Ok(()),
        Some("fp8") => {
            if let Some(b) = q.get("weight_block_size").filter(|v| !v.is_null()) {
                if b.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()) != Some(vec![128, 128])
                {
                    return Err(format!("fp8 weight_block_size {b} (only [128, 128])"));
                }
            }
            match q.get("fmt").and_then(Value::as_str) {
                None | Some("e4m3") => Ok(()),
                Some(other) => Err(format!("fp8 fmt {other:?} (only \"e4m3\")")),
            }
        }
        other => Err(format!("quantization_config.quant_method {other:?} (supported: fp8, mxfp4)")),
    }
}

/// Latent attention's widths, all present and positive (but the query rank).
fn resolve_mla(raw: &RawConfig) -> std::result::Result<MlaConfig, String> {
    let need = |v: Option<usize>, name: &str| match v {
        Some(x) if x > 0 => Ok(x),
        Some(_) => Err(format!("`{name}` must be positive")),
        None => Err(format!("missing field `{name}`")),
    };
    let m = MlaConfig {
        q_lora_rank: raw.q_lora_rank.filter(|&r| r > 0),
        kv_lora_rank: need(raw.kv_lora_rank, "kv_lora_rank")?,
        qk_nope_head_dim: need(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
        qk_rope_head_dim: need(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
        v_head_dim: need(raw.v_head_dim, "v_head_dim")?,
    };
    if !m.qk_rope_head_dim.is_multiple_of(2) {
        return Err(format!("qk_rope_head_dim {} must be even", m.qk_rope_head_dim));
    }
    if m.v_head_dim > m.kv_lora_rank {
        // the absorbed decode reads values as a prefix of the latent's width
        return Err(format!("v_head_dim {} above kv_lora_rank {}", m.v_head_dim, m.kv_lora_rank));
    }
    Ok(m)
}

/// DeepSeek's softmax-scale correction: `mscale(factor, mscale_all_dim)^2`
/// when the RoPE scaling is not the default one and names a non-zero
/// `mscale_all_dim`; else 1.
fn mscale_all_dim_correction(raw: &RawConfig) -> f64 {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let Some(s) = params.or(raw.rope_scaling.as_ref().filter(|v| !v.is_null())) else { return 1.0 };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let all_dim = s.get("mscale_all_dim").and_then(Value::as_f64).unwrap_or(0.0);
    let factor = s.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
    if kind == "default" || all_dim == 0.0 || factor <= 1.0 {
        return 1.0;
    }
    let m = 0.1 * all_dim * factor.ln() + 1.0;
    m * m
}

/// How the router's scores become choices, checked against the expert count.
fn resolve_routing(arch: Arch, raw: &RawConfig, experts: usize, top_k: usize) -> std::result::Result<Routing, String> {
    let grouped = |sigmoid: bool| -> std::result::Result<Routing, String> {
        // transformers' defaults: 8 groups keeping 4 for V3, else one group
        let (g, tg) = if arch == Arch::DeepseekV3 { (8, 4) } else { (1, 1) };
        let (groups, topk_groups) = (raw.n_group.unwrap_or(g), raw.topk_group.unwrap_or(tg));
        if groups == 0 || !experts.is_multiple_of(groups) {
            return Err(format!("n_group {groups} does not divide the {experts} routed experts"));
        }
        if topk_groups == 0 || topk_groups > groups {
            return Err(format!("topk_group {topk_groups} must be in 1..={groups}"));
        }
        let per_group = experts / groups;
        if sigmoid && per_group < 2 {
            return Err(format!("groups of {per_group} expert (groups are ranked by their two best)"));
        }
        if top_k > topk_groups * per_group {
            return Err(format!(
                "num_experts_per_tok {top_k} exceeds the {} experts of topk_group {topk_groups} groups",
                topk_groups * per_group
            ));
        }
        Ok(if sigmoid {
            Routing::SigmoidGrouped { groups, topk_groups }
        } else {
            Routing::SoftmaxGroupLimited { groups, topk_groups }
        })
    };
    let scoring = raw.scoring_func.as_deref();
    match arch {
        Arch::GptOss => Ok(Routing::TopKSoftmax),
        Arch::DeepseekV2 => {
            if scoring.is_some_and(|f| f != "softmax") {
                return Err(format!("scoring_func {scoring:?} (deepseek_v2 routes by softmax)"));
            }
            match raw.topk_method.as_deref().unwrap_or("greedy") {
                "greedy" => Ok(Routing::SoftmaxTopK),
                "group_limited_greedy" => grouped(false),
                other => Err(format!("topk_method {other:?} (greedy or group_limited_greedy)")),
            }
        }
        Arch::DeepseekV3 | Arch::Glm4Moe => {
            if scoring.is_some_and(|f| f != "sigmoid") {
                return Err(format!("scoring_func {scoring:?} ({} routes by sigmoid)", arch.name()));
            }
            match raw.topk_method.as_deref() {
                None | Some("noaux_tc") => grouped(true),
                Some(other) => Err(format!("topk_method {other:?} (noaux_tc)")),
            }
        }
        _ => Ok(Routing::SoftmaxTopK),
    }
}

fn resolve_layers(arch: Arch, raw: &RawConfig, n: usize) -> std::result::Result<Vec<FfnKind>, String> {
    match arch {
        Arch::Mixtral | Arch::Olmoe | Arch::GptOss => Ok(vec![FfnKind::Moe; n]),
        Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => {
            if let Some(freq) = raw.moe_layer_freq.filter(|&f| f != 1) {
                return Err(format!("moe_layer_freq {freq} (only 1: every layer from first_k_dense_replace)"));
            }
            // transformers' defaults: 0 dense layers for V2, 3 for V3, 1 for GLM
            let dense = raw.first_k_dense_replace.unwrap_or(match arch {
                Arch::DeepseekV2 => 0,
                Arch::DeepseekV3 => 3,
                _ => 1,
            });
            (0..n)
                .map(|l| match l < dense {
                    false => Ok(FfnKind::Moe),
                    true => raw
                        .intermediate_size
                        .map(FfnKind::Dense)
                        .ok_or_else(|| format!("layer {l} is dense but `intermediate_size` is missing")),
                })
                .collect()
        }
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            let step = raw.decoder_sparse_step.unwrap_or(1);
            if step == 0 {
                return Err("decoder_sparse_step must be positive".into());
            }
            let mlp_only = raw.mlp_only_layers.clone().unwrap_or_default();
            let dense_width = raw.intermediate_size;
            (0..n)
                .map(|l| {
                    if !mlp_only.contains(&l) && (l + 1) % step == 0 {
                        Ok(FfnKind::Moe)
                    } else {
                        dense_width
                            .map(FfnKind::Dense)
                            .ok_or_else(|| format!("layer {l} is dense but `intermediate_size` is missing"))
                    }
                })
                .collect()
        }
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL: &str = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,
        "num_hidden_layers":2,"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
        "num_local_experts":8,"num_experts_per_tok":2,"rms_norm_eps":1e-5,"rope_theta":1000000.0,
        "rope_scaling":null,"eos_token_id":2,"bos_token_id":1}"#;

    #[test]
    fn hub_form_rope() {
        let c = ModelConfig::from_json(MIXTRAL).unwrap();
        assert_eq!(c.attention.rope_theta, 1e6);
        assert_eq!(c.attention.head_dim, 128);
        assert_eq!(c.layers, vec![FfnKind::Moe; 2]);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.moe.norm_topk_prob);
    }

    #[test]
    fn rope_parameters_form() {
        let text = MIXTRAL.replace(r#""rope_theta":1000000.0,"#, "").replace(
            r#""rope_scaling":null"#,
            r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"linear","factor":2.0}"#,
        );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.attention.rope_theta, 5e5);
        assert_eq!(c.attention.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn qwen2_dense_layers() {
        let text = r#"{"model_type":"qwen2_moe","vocab_size":10,"hidden_size":8,"num_hidden_layers":4,
            "num_attention_heads":2,"intermediate_size":16,"moe_intermediate_size":4,"num_experts":4,
            "num_experts_per_tok":2,"shared_expert_intermediate_size":8,"decoder_sparse_step":2,"mlp_only_layers":[3]}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.layers, vec![FfnKind::Dense(16), FfnKind::Moe, FfnKind::Dense(16), FfnKind::Dense(16)]);
        assert_eq!(c.moe.shared_expert_ffn, Some(8));
        assert!(c.attention.qkv_bias && !c.attention.o_bias);
    }

    #[test]
    fn clear_errors() {
        let e = ModelConfig::from_json(&MIXTRAL.replace("mixtral", "llama4")).unwrap_err();
        assert!(e.to_string().contains("unsupported model_type \"llama4\""), "{e}");
        let e = ModelConfig::from_json(&MIXTRAL.replace(r#""num_local_experts":8,"#, "")).unwrap_err();
        assert!(e.to_string().contains("num_local_experts"), "{e}");
        let e = ModelConfig::from_json("{not json").unwrap_err();
        assert!(e.to_string().contains("malformed config"), "{e}");
        let e = ModelConfig::from_json(
            &MIXTRAL.replace(r#""rope_scaling":null"#, r#""rope_scaling":{"type":"longrope","factor":4}"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("longrope") && e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn yarn_defaults_as_transformers_fills_them() {
        let yarn = |scaling: &str| {
            let c = ModelConfig::from_json(&MIXTRAL.replace(r#""rope_scaling":null"#, scaling)).unwrap();
            match c.attention.rope_scaling {
                RopeScaling::Yarn(y) => y,
                other => panic!("{other:?}"),
            }
        };
        let y = yarn(r#""rope_scaling":{"type":"yarn","factor":4,"original_max_position_embeddings":32768}"#);
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 32768));
        assert_eq!((y.beta_fast, y.beta_slow, y.truncate), (32.0, 1.0, true));
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // DeepSeek's form: mscale terms, the factor from the two contexts
        let y = yarn(
            r#""max_position_embeddings":163840,"rope_scaling":{"type":"yarn","original_max_position_embeddings":4096,
            "mscale":1.0,"mscale_all_dim":1.0,"beta_fast":32,"beta_slow":1}"#,
        );
        assert_eq!(y.factor, 40.0);
        assert_eq!(y.attention_factor, 1.0);
        // gpt-oss's form
        let y = yarn(
            r#""rope_scaling":{"rope_type":"yarn","factor":32.0,"beta_fast":32.0,"beta_slow":1.0,"truncate":false,
            "original_max_position_embeddings":4096}"#,
        );
        assert!(!y.truncate);
        let e = ModelConfig::from_json(
            &MIXTRAL.replace(r#""rope_scaling":null"#, r#""rope_scaling":{"type":"yarn","factor":-1}"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be positive"), "{e}");
    }

    #[test]
    fn deepseek_v3_as_released() {
        // the fields of DeepSeek-V3's config.json that matter here
        let text = r#"{"model_type":"deepseek_v3","vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,
            "moe_intermediate_size":2048,"num_hidden_layers":61,"num_nextn_predict_layers":1,"num_attention_heads":128,
            "num_key_value_heads":128,"n_shared_experts":1,"n_routed_experts":256,"routed_scaling_factor":2.5,
            "kv_lora_rank":512,"q_lora_rank":1536,"qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,
            "topk_method":"noaux_tc","n_group":8,"topk_group":4,"num_experts_per_tok":8,"moe_layer_freq":1,
            "first_k_dense_replace":3,"norm_topk_prob":true,"scoring_func":"sigmoid","hidden_act":"silu",
            "max_position_embeddings":163840,"rms_norm_eps":1e-06,"rope_theta":10000,"attention_bias":false,
            "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":1.0,"mscale_all_dim":1.0,
            "original_max_position_embeddings":4096,"type":"yarn"},
            "quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8","weight_block_size":[128,128]},
            "tie_word_embeddings":false,"bos_token_id":0,"eos_token_id":1}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        let m = c.attention.mla.unwrap();
        assert_eq!(
            (m.q_lora_rank, m.kv_lora_rank, c.attention.head_dim, c.attention.rotary_dim),
            (Some(1536), 512, 192, 64)
        );
        assert!(c.attention.rope_interleaved);
        // 192^-1/2 times (0.1 ln 40 + 1)^2; cos/sin unscaled (mscale = mscale_all_dim)
        let want = (192f64.powf(-0.5) * (0.1 * 40f64.ln() + 1.0).powi(2)) as f32;
        assert_eq!(c.attention.softmax_scale, want);
        assert!(
            matches!(c.attention.rope_scaling, RopeScaling::Yarn(y) if y.attention_factor == 1.0 && y.factor == 40.0)
        );
        assert_eq!(c.moe.routing, Routing::SigmoidGrouped { groups: 8, topk_groups: 4 });
        assert_eq!(
            (c.moe.routed_scaling_factor, c.moe.shared_expert_ffn, c.moe.shared_expert_gated),
            (2.5, Some(2048), false)
        );
        assert_eq!(c.layers[..4], [FfnKind::Dense(18432), FfnKind::Dense(18432), FfnKind::Dense(18432), FfnKind::Moe]);
        assert_eq!(c.num_layers(), 61, "the MTP layer is not a decoder layer");
        // 61 layers of (512 + 64) f32 against 128 heads of 192-wide keys and 128-wide values
        assert_eq!((c.kv_bytes_per_token(), c.expanded_kv_bytes_per_token()), (4 * 576 * 61, 4 * 128 * 320 * 61));
        // Kimi K2 names its configs kimi_k2
        assert_eq!(ModelConfig::from_json(&text.replace("deepseek_v3", "kimi_k2")).unwrap().arch, Arch::DeepseekV3);
        for (from, to, says) in [
            (r#""weight_block_size":[128,128]"#, r#""weight_block_size":[1,128]"#, "weight_block_size"),
            (r#""quant_method":"fp8""#, r#""quant_method":"awq""#, "awq"),
            (r#""n_group":8"#, r#""n_group":7"#, "n_group 7"),
            (r#""topk_group":4"#, r#""topk_group":9"#, "topk_group 9"),
            (r#""scoring_func":"sigmoid""#, r#""scoring_func":"softmax""#, "scoring_func"),
            (r#""moe_layer_freq":1"#, r#""moe_layer_freq":2"#, "moe_layer_freq"),
            (r#""kv_lora_rank":512,"#, "", "kv_lora_rank"),
        ] {
            let e = ModelConfig::from_json(&text.replace(from, to)).unwrap_err();
            assert!(e.to_string().contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn deepseek_v2_lite_and_glm_as_released() {
        let v2 = r#"{"model_type":"deepseek_v2","vocab_size":102400,"hidden_size":2048,"intermediate_size":10944,
            "moe_intermediate_size":1408,"num_hidden_layers":27,"num_attention_heads":16,"num_key_value_heads":16,
            "n_shared_experts":2,"n_routed_experts":64,"routed_scaling_factor":1.0,"kv_lora_rank":512,"q_lora_rank":null,
            "qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,"topk_method":"greedy","n_group":1,
            "topk_group":1,"num_experts_per_tok":6,"moe_layer_freq":1,"first_k_dense_replace":1,"norm_topk_prob":false,
            "scoring_func":"softmax","max_position_embeddings":163840,"rope_theta":10000,
            "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":0.707,"mscale_all_dim":0.707,
            "original_max_position_embeddings":4096,"type":"yarn"},"rms_norm_eps":1e-06}"#;
        let c = ModelConfig::from_json(v2).unwrap();
        assert_eq!((c.arch, c.moe.routing, c.moe.top_k), (Arch::DeepseekV2, Routing::SoftmaxTopK, 6));
        assert_eq!(c.attention.mla.unwrap().q_lora_rank, None);
        assert_eq!((c.kv_bytes_per_token(), c.expanded_kv_bytes_per_token()), (4 * 576 * 27, 4 * 16 * 320 * 27));
        let grouped = v2
            .replace(r#""topk_method":"greedy","n_group":1,"#, r#""topk_method":"group_limited_greedy","n_group":8,"#)
            .replace(r#""topk_group":1,"#, r#""topk_group":3,"#);
        let c = ModelConfig::from_json(&grouped).unwrap();
        assert_eq!(c.moe.routing, Routing::SoftmaxGroupLimited { groups: 8, topk_groups: 3 });
        let glm = r#"{"model_type":"glm4_moe","vocab_size":151552,"hidden_size":4096,"intermediate_size":10944,
            "moe_intermediate_size":1408,"num_hidden_layers":46,"num_attention_heads":96,"num_key_value_heads":8,
            "head_dim":128,"partial_rotary_factor":0.5,"n_shared_experts":1,"n_routed_experts":128,
            "routed_scaling_factor":1.0,"n_group":1,"topk_group":1,"num_experts_per_tok":8,"first_k_dense_replace":1,
            "norm_topk_prob":true,"use_qk_norm":false,"attention_bias":true,"rope_theta":1000000,
            "max_position_embeddings":131072,"rms_norm_eps":1e-05,"num_nextn_predict_layers":1}"#;
        let c = ModelConfig::from_json(glm).unwrap();
        assert_eq!((c.attention.head_dim, c.attention.rotary_dim, c.attention.num_kv_heads), (128, 64, 8));
        assert!(c.attention.qkv_bias && !c.attention.o_bias && c.attention.qk_norm == QkNorm::None);
        assert_eq!(c.moe.routing, Routing::SigmoidGrouped { groups: 1, topk_groups: 1 });
        assert_eq!(c.layers[0], FfnKind::Dense(10944));
    }

    #[test]
    fn gpt_oss_as_released() {
        // the fields of gpt-oss-20b's config.json that matter here
        let text = r#"{"model_type":"gpt_oss","vocab_size":201088,"hidden_size":2880,"num_hidden_layers":4,
            "num_attention_heads":64,"num_key_value_heads":8,"head_dim":64,"intermediate_size":2880,
            "num_local_experts":32,"experts_per_token":4,"sliding_window":128,"swiglu_limit":7.0,
            "layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"],
            "attention_bias":true,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-05,
            "rope_theta":150000,"rope_scaling":{"beta_fast":32.0,"beta_slow":1.0,"factor":32.0,
            "original_max_position_embeddings":4096,"rope_type":"yarn","truncate":false},
            "quantization_config":{"quant_method":"mxfp4"},"eos_token_id":200002}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.arch, Arch::GptOss);
        assert_eq!((c.moe.top_k, c.moe.expert_ffn, c.moe.routing), (4, 2880, Routing::TopKSoftmax));
        assert!(c.moe.router_bias && c.moe.expert_bias && c.attention.sinks);
        assert!(c.attention.qkv_bias && c.attention.o_bias);
        assert_eq!(c.moe.expert_act, ExpertAct::ClampedSwiglu { alpha: 1.702, limit: 7.0 });
        assert_eq!((c.attention.window(0), c.attention.window(1), c.attention.window(2)), (Some(128), None, Some(128)));
        assert!(matches!(c.attention.rope_scaling, RopeScaling::Yarn(y) if !y.truncate && y.factor == 32.0));
        let e = ModelConfig::from_json(
            &text.replace(r#""full_attention","sliding_attention","full_attention""#, r#""full_attention""#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("layer_types has 2 entries for 4 layers"), "{e}");
        let e = ModelConfig::from_json(&text.replace("full_attention", "chunked_attention")).unwrap_err();
        assert!(e.to_string().contains("chunked_attention"), "{e}");
        // the other architectures: every layer slides when a window is set
        let m = ModelConfig::from_json(&MIXTRAL.replace(r#""rope_scaling":null"#, r#""sliding_window":7"#)).unwrap();
        assert_eq!((m.attention.window(0), m.attention.window(1)), (Some(7), Some(7)));
    }
}
