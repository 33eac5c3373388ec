//! Non-expert weights of a model, and their loading by architecture.

use crate::arch::LayerNames;
use crate::checkpoint::Checkpoint;
use crate::config::{FfnKind, ModelConfig, QkNorm};
use crate::experts::ExpertWeights;
use crate::rope::Rope;
use crate::Result;
use moe_kernels::Weight;

/// Attention projections of one layer.
#[derive(Clone)]
pub(crate) struct AttentionWeights {
    /// `[q; k; v]` stacked, `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    pub(crate) qkv: Weight,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    /// `[hidden, heads * head_dim]`.
    pub(crate) o: Weight,
    pub(crate) o_bias: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    /// A sink logit per query head (gpt-oss).
    pub(crate) sinks: Option<Vec<f32>>,
}

/// The always-on shared expert of Qwen2-MoE and its sigmoid gate.
#[derive(Clone)]
pub(crate) struct SharedExpert {
    pub(crate) mlp: ExpertWeights,
    /// `[1, hidden]`.
    pub(crate) gate: Weight,
}

/// What follows attention.
#[derive(Clone)]
pub(crate) enum FfnWeights {
    Dense(ExpertWeights),
    Moe {
        /// `[experts, hidden]`.
        router: Weight,
        /// Added to the router's logits (gpt-oss).
        router_bias: Option<Vec<f32>>,
        shared: Option<SharedExpert>,
    },
}

/// One decoder layer (experts live behind an `ExpertProvider`).
#[derive(Clone)]
pub(crate) struct LayerWeights {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_attn_norm: Vec<f32>,
    pub(crate) attn: AttentionWeights,
    pub(crate) ffn: FfnWeights,
}

/// A model's configuration and non-expert weights; runs the forward pass.
#[derive(Clone)]
pub struct Model {
    pub(crate) cfg: ModelConfig,
    /// `[vocab, hidden]`.
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<Weight>,
    pub(crate) rope: Rope,
}

impl Model {
    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Each MoE layer's router as a linear map of the residual stream divided
    /// by its root mean square: `(R diag(γ), b)` with `R` the router
    /// (`[experts, hidden]`, row-major), `γ` the layer's post-attention norm
    /// and `b` the router's bias (zeros if none), so that the router's
    /// scores of a residual `h` are `R diag(γ) (h / rms(h)) + b` (up to the
    /// norm's epsilon). A baseline for hidden-state predictors.
    pub fn router_maps(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        let h = self.cfg.hidden_size;
        self.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                FfnWeights::Moe { router, router_bias, .. } => {
                    let mut r = router.to_f32();
                    for row in r.chunks_exact_mut(h) {
                        row.iter_mut().zip(&l.post_attn_norm).for_each(|(w, g)| *w *= g);
                    }
                    let b = router_bias.clone().unwrap_or_else(|| vec![0.0; router.rows()]);
                    Some((r, b))
                }
                FfnWeights::Dense(_) => None,
            })
            .collect()
    }

    pub(crate) fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of the non-expert weights.
    pub fn nbytes(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = l.attn.qkv.nbytes() + l.attn.o.nbytes();
                let f = match &l.ffn {
                    FfnWeights::Dense(m) => m.nbytes(),
                    FfnWeights::Moe { router, shared, .. } => {
                        router.nbytes() + shared.as_ref().map_or(0, |s| s.mlp.nbytes() + s.gate.nbytes())
                    }
                };
                a + f
            })
            .sum();
        self.embed.nbytes() + self.lm_head.as_ref().map_or(0, Weight::nbytes) + layer_bytes
    }

    /// Bytes of weights one decoded token reads: everything except the
    /// embedding table (one row) and the experts it did not choose.
    pub fn bytes_per_decoded_token(&self, expert_bytes: usize) -> usize {
        let moe_layers = self.cfg.moe_layers().count();
        let embed_row = self.embed.nbytes() / self.cfg.vocab_size.max(1);
        let head = self.lm_head().nbytes();
        let non_embed = self.nbytes() - self.embed.nbytes() - self.lm_head.as_ref().map_or(0, Weight::nbytes);
        non_embed + head + embed_row + moe_layers * self.cfg.moe.top_k * expert_bytes
    }

    /// Loads the non-expert weights of `cfg` from a checkpoint.
    pub(crate) fn load(ck: &Checkpoint, cfg: &ModelConfig, mut on_tensor: impl FnMut(usize)) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed = ck.weight("model.embed_tokens.weight", cfg.vocab_size, h)?;
        on_tensor(embed.nbytes());
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (l, kind) in cfg.layers.iter().enumerate() {
            let n = LayerNames::new(cfg.arch, l);
            let layer = LayerWeights {
                input_norm: ck.vector(&n.get("input_layernorm.weight"), h)?,
                post_attn_norm: ck.vector(&n.get("post_attention_layernorm.weight"), h)?,
                attn: load_attention(ck, cfg, &n)?,
                ffn: match kind {
                    FfnKind::Dense(width) => FfnWeights::Dense(ExpertWeights::load(ck, &n.mlp(None), h, *width)?),
                    FfnKind::Moe => FfnWeights::Moe {
                        router: ck.weight(&n.router(), cfg.moe.num_experts, h)?,
                        router_bias: match cfg.moe.router_bias {
                            true => Some(ck.vector(&n.router_bias(), cfg.moe.num_experts)?),
                            false => None,
                        },
                        shared: match cfg.moe.shared_expert_ffn {
                            Some(w) => Some(SharedExpert {
                                mlp: ExpertWeights::load(ck, &n.mlp(Some("shared_expert")), h, w)?,
                                gate: ck.weight(&n.get("mlp.shared_expert_gate.weight"), 1, h)?,
                            }),
                            None => None,
                        },
                    },
                },
            };
            on_tensor(layer.attn.qkv.nbytes() + layer.attn.o.nbytes());
            layers.push(layer);
        }
        let final_norm = ck.vector("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !ck.contains("lm_head.weight") {
            None
        } else {
            Some(ck.weight("lm_head.weight", cfg.vocab_size, h)?)
        };
        Ok(Self { rope: Rope::new(&cfg.attention), cfg: cfg.clone(), embed, layers, final_norm, lm_head })
    }
}

fn load_attention(ck: &Checkpoint, cfg: &ModelConfig, n: &LayerNames) -> Result<AttentionWeights> {
    let a = &cfg.attention;
    let h = cfg.hidden_size;
    let (qw, kvw) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let q = ck.weight(&n.get("self_attn.q_proj.weight"), qw, h)?;
    let k = ck.weight(&n.get("self_attn.k_proj.weight"), kvw, h)?;
    let v = ck.weight(&n.get("self_attn.v_proj.weight"), kvw, h)?;
    let qkv_bias = if a.qkv_bias {
        let mut b = ck.vector(&n.get("self_attn.q_proj.bias"), qw)?;
        b.extend(ck.vector(&n.get("self_attn.k_proj.bias"), kvw)?);
        b.extend(ck.vector(&n.get("self_attn.v_proj.bias"), kvw)?);
        Some(b)
    } else {
        None
    };
    let (q_norm, k_norm) = match a.qk_norm {
        QkNorm::None => (None, None),
        QkNorm::PerHead => (
            Some(ck.vector(&n.get("self_attn.q_norm.weight"), a.head_dim)?),
            Some(ck.vector(&n.get("self_attn.k_norm.weight"), a.head_dim)?),
        ),
        QkNorm::Full => (
            Some(ck.vector(&n.get("self_attn.q_norm.weight"), qw)?),
            Some(ck.vector(&n.get("self_attn.k_norm.weight"), kvw)?),
        ),
    };
    Ok(AttentionWeights {
        qkv: Weight::concat_rows(&[q, k, v])?,
        qkv_bias,
        o: ck.weight(&n.get("self_attn.o_proj.weight"), h, qw)?,
        o_bias: if a.o_bias { Some(ck.vector(&n.get("self_attn.o_proj.bias"), h)?) } else { None },
        q_norm,
        k_norm,
        sinks: if a.sinks { Some(ck.vector(&n.get("self_attn.sinks"), a.num_heads)?) } else { None },
    })
}
