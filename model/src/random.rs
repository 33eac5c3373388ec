//! Random-weight models built in memory from a config, for benchmarks of
//! shapes no checkpoint in the repo has. Weights are bf16, uniform with the
//! standard deviation of a typical initialiser.

use crate::config::{FfnKind, ModelConfig};
use crate::experts::{ExpertWeights, ResidentExperts};
use crate::rope::Rope;
use crate::weights::{AttentionWeights, FfnWeights, LayerWeights, Model};
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
        Ok(ExpertWeights { gate_up: self.weight(2 * ffn, hidden)?, down: self.weight(hidden, ffn)? })
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
        let attn = AttentionWeights {
            qkv: g.weight(qw + 2 * kvw, h)?,
            qkv_bias: a.qkv_bias.then(|| vec![0.0; qw + 2 * kvw]),
            o: g.weight(h, qw)?,
            o_bias: a.o_bias.then(|| vec![0.0; h]),
            q_norm: has_norm.then(|| vec![1.0; norm_len(qw)]),
            k_norm: has_norm.then(|| vec![1.0; norm_len(kvw)]),
        };
        let (ffn, layer_experts) = match kind {
            FfnKind::Dense(w) => (FfnWeights::Dense(g.mlp(h, *w)?), Vec::new()),
            FfnKind::Moe => {
                let ex = (0..cfg.moe.num_experts).map(|_| g.mlp(h, cfg.moe.expert_ffn)).collect::<Result<Vec<_>>>()?;
                let shared = match cfg.moe.shared_expert_ffn {
                    Some(w) => Some(crate::weights::SharedExpert { mlp: g.mlp(h, w)?, gate: g.weight(1, h)? }),
                    None => None,
                };
                (FfnWeights::Moe { router: g.weight(cfg.moe.num_experts, h)?, shared }, ex)
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
