//! What a model needs on a GPU, decided on the host before anything is
//! allocated there: whether the GPU forward pass covers its layers, and the
//! device bytes of its weights, KV cache and expert slots. Pure (no device),
//! so it is tested on any machine; `moe_model::gpu` uploads by it.

use crate::config::ExpertAct;
use crate::weights::{Attention, FfnWeights, Model};
use crate::{ModelError, Result};
use moe_kernels::Weight;

/// Device memory a model takes on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuPlan {
    /// Non-expert weights, in their checkpoint precision (f32 or bf16), but
    /// routers, norms and biases in f32.
    pub weights: usize,
    /// The paged KV cache (f32 keys and values of every layer).
    pub kv: usize,
    /// Expert slots.
    pub slots: usize,
    /// Bytes of one slot (an expert's three matrices in bf16).
    pub slot_bytes: usize,
    /// Every expert of the model in bf16: the pinned host tier (host memory).
    pub pinned_host: usize,
}

impl GpuPlan {
    /// Device bytes of weights, KV cache and slots (step buffers come on top:
    /// a few activations per token).
    pub fn device_bytes(&self) -> usize {
        self.weights + self.kv + self.slots * self.slot_bytes
    }
}

fn unsupported(what: &str) -> ModelError {
    ModelError::Unsupported(format!("the GPU forward pass does not implement {what} yet; use --device cpu"))
}

fn gpu_weight(w: &Weight, what: &str) -> Result<usize> {
    match w.quant_format() {
        Some(f) => Err(unsupported(&format!("{} {what}", f.name()))),
        None => Ok(w.nbytes()),
    }
}

impl Model {
    /// Why this model cannot run on the GPU, if it cannot.
    pub fn check_gpu_support(&self) -> Result<()> {
        self.gpu_plan(0, 1, 0).map(|_| ())
    }

    /// The device memory of this model with `kv_blocks` KV blocks of
    /// `block_size` slots and `expert_slots` expert slots; an error naming
    /// what the GPU forward pass does not implement, for a model it cannot run.
    pub fn gpu_plan(&self, kv_blocks: usize, block_size: usize, expert_slots: usize) -> Result<GpuPlan> {
        let cfg = &self.cfg;
        if self.layers.iter().any(|l| matches!(l.attn, Attention::Latent(_))) {
            return Err(unsupported("multi-head latent attention (DeepSeek, Kimi, GLM)"));
        }
        if cfg.attention.rope_interleaved {
            return Err(unsupported("interleaved rotary embeddings"));
        }
        if !matches!(cfg.moe.expert_act, ExpertAct::Swiglu) {
            return Err(unsupported("the clamped SwiGLU of gpt-oss experts"));
        }
        let f32s = |v: &[f32]| 4 * v.len();
        let mut weights = 0;
        for layer in &self.layers {
            let a = match &layer.attn {
                Attention::Latent(_) => return Err(unsupported("multi-head latent attention (DeepSeek, Kimi, GLM)")),
                Attention::Standard(a) if a.sinks.is_some() => return Err(unsupported("attention sinks (gpt-oss)")),
                Attention::Standard(a) => a,
            };
            weights += f32s(&layer.input_norm) + f32s(&layer.post_attn_norm);
            weights += gpu_weight(&a.qkv, "attention weights")? + gpu_weight(&a.o, "attention weights")?;
            weights += a.qkv_bias.as_deref().map_or(0, f32s) + a.o_bias.as_deref().map_or(0, f32s);
            if let (Some(q), Some(k)) = (&a.q_norm, &a.k_norm) {
                weights += f32s(q) + f32s(k);
            }
            let mlp = |m: &crate::ExpertWeights| -> Result<usize> {
                if m.bias.is_some() {
                    return Err(unsupported("MLP biases"));
                }
                Ok(gpu_weight(&m.gate_up, "MLP weights")? + gpu_weight(&m.down, "MLP weights")?)
            };
            weights += match &layer.ffn {
                FfnWeights::Dense(m) => mlp(m)?,
                FfnWeights::Moe { router, shared } => {
                    let sh = match shared {
                        Some(s) => {
                            mlp(&s.mlp)? + s.gate.as_ref().map_or(Ok(0), |g| gpu_weight(g, "shared-expert gates"))?
                        }
                        None => 0,
                    };
                    // routers are held in f32 (Device::upload_router)
                    gpu_weight(&router.weight, "routers")?;
                    4 * router.weight.rows() * router.weight.cols() + sh
                }
            };
        }
        weights += gpu_weight(&self.embed, "embeddings")? + f32s(&self.final_norm);
        weights += self.lm_head.as_ref().map_or(Ok(0), |w| gpu_weight(w, "output heads"))?;
        let (kw, vw) = cfg.kv_cache_widths();
        let kv = cfg.num_layers() * kv_blocks * block_size * (kw + vw) * 4;
        let slot_bytes = 3 * cfg.hidden_size * cfg.moe.expert_ffn * 2;
        let pinned_host = cfg.moe_layers().count() * cfg.moe.num_experts * slot_bytes;
        Ok(GpuPlan { weights, kv, slots: expert_slots, slot_bytes, pinned_host })
    }
}

#[cfg(test)]
mod tests {
    use crate::random::random_model;
    use crate::ModelConfig;

    const MIXTRAL: &str = r#"{"model_type":"mixtral","vocab_size":64,"hidden_size":16,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":24,"num_local_experts":4,
        "num_experts_per_tok":2,"max_position_embeddings":64,"rms_norm_eps":1e-5,"rope_theta":10000.0}"#;

    #[test]
    fn plan_counts_weights_kv_and_slots() {
        let cfg = ModelConfig::from_json(MIXTRAL).unwrap();
        let (model, _) = random_model(&cfg, 0).unwrap();
        let p = model.gpu_plan(3, 16, 5).unwrap();
        // the weights as uploaded are the host's non-expert weights plus the
        // f32 norms the host keeps outside `nbytes`, routers widened to f32
        let norms = 4 * (2 * 2 * 16 + 16);
        let widened: usize = model
            .layers
            .iter()
            .map(|l| match &l.ffn {
                crate::weights::FfnWeights::Moe { router, .. } => 4 * 4 * 16 - router.weight.nbytes(),
                crate::weights::FfnWeights::Dense(_) => 0,
            })
            .sum();
        assert_eq!(p.weights, model.nbytes() + norms + widened);
        // 2 layers x 48 rows x (8 + 8 floats) x 4 bytes
        assert_eq!(p.kv, 2 * 3 * 16 * (8 + 8) * 4);
        assert_eq!(p.slot_bytes, 3 * 16 * 24 * 2);
        assert_eq!(p.pinned_host, 2 * 4 * p.slot_bytes);
        assert_eq!(p.device_bytes(), p.weights + p.kv + 5 * p.slot_bytes);
        model.check_gpu_support().unwrap();
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let deepseek = r#"{"model_type":"deepseek_v3","vocab_size":64,"hidden_size":16,"num_hidden_layers":2,
            "num_attention_heads":2,"num_key_value_heads":2,"intermediate_size":24,"moe_intermediate_size":8,
            "n_routed_experts":4,"num_experts_per_tok":2,"n_shared_experts":1,"first_k_dense_replace":1,
            "kv_lora_rank":8,"q_lora_rank":null,"qk_nope_head_dim":4,"qk_rope_head_dim":4,"v_head_dim":4,
            "n_group":1,"topk_group":1,"routed_scaling_factor":1.0,"norm_topk_prob":true,
            "max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000.0}"#;
        let cfg = ModelConfig::from_json(deepseek).unwrap();
        let (model, _) = random_model(&cfg, 0).unwrap();
        let e = model.check_gpu_support().unwrap_err().to_string();
        assert!(e.contains("multi-head latent attention") && e.contains("--device cpu"), "{e}");
    }
}
