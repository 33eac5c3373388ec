//! Random-weight models built in memory from a config, for benchmarks of
//! shapes no checkpoint in the repo has. Weights are bf16, uniform with the
//! standard deviation of a typical initialiser.

use crate::config::{FfnKind, ModelConfig};
use crate::experts::{ExpertWeights, ResidentExperts};
use crate::rope::Rope;
use crate::weights::{
    Attention, AttentionWeights, FfnWeights, LatentQuery, LatentWeights, LayerWeights, Model, Router,
};
use crate::Result;
use moe_kernels::Weight;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Gen(ChaCha8Rng);

impl Gen {
    fn weight(&mut self, rows: usize, cols: usize) -> Result<Weight> {
        let a = 0.02f32 * 3f32.sqrt();
        let bits = (0..rows * cols).map(|_| half::bf16::from_f32(self.0.random_range(-a..a)).to_bits()).collect();
        Ok(Weight::from_bf16_bits(rows, cols, bits)?)
    }

    fn mlp(&mut self, hidden: usize, ffn: usize) -> Result<ExpertWeights> {
        Ok(ExpertWeights { gate_up: self.weight(2 * ffn, hidden)?, down: self.weight(hidden, ffn)?, bias: None })
    }

    /// An expert of `cfg` (with zero biases where the architecture has them).
    fn expert(&mut self, cfg: &ModelConfig) -> Result<ExpertWeights> {
        let mut w = self.mlp(cfg.hidden_size, cfg.moe.expert_ffn)?;
        if cfg.moe.expert_bias {
            let gate_up = vec![0.0; 2 * cfg.moe.expert_ffn];
            w.bias = Some(crate::experts::ExpertBias { gate_up, down: vec![0.0; cfg.hidden_size] });
        }
        Ok(w)
    }
}

/// A model of `cfg`'s shape with random bf16 weights (qkv bias, q/k norms and
/// shared experts follow the config). Deterministic in `seed`.
pub fn random_model(cfg: &ModelConfig, seed: u64) -> Result<(Model, ResidentExperts)> {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    let h = cfg.hidden_size;
    let a = &cfg.attention;
    let (qw, kvw) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let mut layers = Vec::new();
    let mut experts = Vec::new();
    for kind in &cfg.layers {
        let norm_len = |full: usize| if a.qk_norm == crate::QkNorm::PerHead { a.head_dim } else { full };
        let has_norm = a.qk_norm != crate::QkNorm::None;
        let attn = match a.mla {
            Some(m) => Attention::Latent(LatentWeights::new(
                match m.q_lora_rank {
                    None => LatentQuery::Full(g.weight(qw, h)?),
                    Some(r) => LatentQuery::LowRank { a: g.weight(r, h)?, norm: vec![1.0; r], b: g.weight(qw, r)? },
                },
                (g.weight(m.kv_lora_rank + m.qk_rope_head_dim, h)?, vec![1.0; m.kv_lora_rank]),
                g.weight(a.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)?,
                g.weight(h, a.num_heads * m.v_head_dim)?,
                &m,
                a.num_heads,
            )?),
            None => Attention::Standard(AttentionWeights {
                qkv: g.weight(qw + 2 * kvw, h)?,
                qkv_bias: a.qkv_bias.then(|| vec![0.0; qw + 2 * kvw]),
                o: g.weight(h, qw)?,
                o_bias: a.o_bias.then(|| vec![0.0; h]),
                q_norm: has_norm.then(|| vec![1.0; norm_len(qw)]),
                k_norm: has_norm.then(|| vec![1.0; norm_len(kvw)]),
                sinks: a.sinks.then(|| vec![0.0; a.num_heads]),
            }),
        };
        let (ffn, layer_experts) = match kind {
            FfnKind::Dense(w) => (FfnWeights::Dense(g.mlp(h, *w)?), Vec::new()),
            FfnKind::Moe => {
                let ex = (0..cfg.moe.num_experts).map(|_| g.expert(cfg)).collect::<Result<Vec<_>>>()?;
                let shared = match cfg.moe.shared_expert_ffn {
                    Some(w) => Some(crate::weights::SharedExpert {
                        mlp: g.mlp(h, w)?,
                        gate: if cfg.moe.shared_expert_gated { Some(g.weight(1, h)?) } else { None },
                    }),
                    None => None,
                };
                let zeros = |on: bool| on.then(|| vec![0.0; cfg.moe.num_experts]);
                let router = Router {
                    weight: g.weight(cfg.moe.num_experts, h)?,
                    bias: zeros(cfg.moe.router_bias),
                    correction: zeros(cfg.moe.routing.has_correction_bias()),
                };
                (FfnWeights::Moe { router, shared }, ex)
            }
        };
        layers.push(LayerWeights { input_norm: vec![1.0; h], post_attn_norm: vec![1.0; h], attn, ffn });
        experts.push(layer_experts);
    }
    let model = Model {
        embed: g.weight(cfg.vocab_size, h)?,
        lm_head: if cfg.tie_word_embeddings { None } else { Some(g.weight(cfg.vocab_size, h)?) },
        final_norm: vec![1.0; h],
        layers,
        rope: Rope::new(&cfg.attention),
        cfg: cfg.clone(),
    };
    Ok((model, ResidentExperts::from_weights(experts)))
}
