//! Non-expert weights of a model, and their loading by architecture.

use crate::arch::LayerNames;
use crate::checkpoint::Checkpoint;
use crate::config::{FfnKind, ModelConfig, QkNorm};
use crate::experts::ExpertWeights;
use crate::rope::Rope;
use crate::Result;
use moe_kernels::Weight;

/// A layer's attention: the standard projections or latent attention's.
#[derive(Clone)]
pub(crate) enum Attention {
    Standard(AttentionWeights),
    Latent(LatentWeights),
}

impl Attention {
    /// Bytes of the projection matrices held (latent attention's derived
    /// per-head matrices included).
    pub(crate) fn nbytes(&self) -> usize {
        match self {
            Attention::Standard(a) => a.qkv.nbytes() + a.o.nbytes(),
            Attention::Latent(a) => {
                let derived: usize = a.uk_t.iter().chain(&a.uv).map(Weight::nbytes).sum();
                a.matrices().iter().map(|w| w.nbytes()).sum::<usize>() + derived
            }
        }
    }

    /// Bytes one decoded token reads: latent attention decodes in the
    /// absorbed form, which reads the per-head matrices, not `kv_b`.
    pub(crate) fn decode_bytes(&self) -> usize {
        match self {
            Attention::Standard(_) => self.nbytes(),
            Attention::Latent(a) => self.nbytes() - a.kv_b.nbytes(),
        }
    }
}

/// Multi-head latent attention's projections (DeepSeek).
#[derive(Clone)]
pub(crate) struct LatentWeights {
    pub(crate) q: LatentQuery,
    /// `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent, then the
    /// shared RoPE key.
    pub(crate) kv_a: Weight,
    /// RMSNorm of the latent, `[kv_lora_rank]`.
    pub(crate) kv_a_norm: Vec<f32>,
    /// `[heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`: per head,
    /// the key up-projection's rows, then the value's.
    pub(crate) kv_b: Weight,
    /// `[hidden, heads * v_head_dim]`.
    pub(crate) o: Weight,
    /// Per head, the key up-projection transposed, `[kv_lora_rank,
    /// qk_nope_head_dim]`: absorbs it into the query.
    pub(crate) uk_t: Vec<Weight>,
    /// Per head, the value up-projection, `[v_head_dim, kv_lora_rank]`.
    pub(crate) uv: Vec<Weight>,
}

impl LatentWeights {
    /// The weights with the absorbed form's per-head matrices derived from
    /// `kv_b` (in its precision; quantized ones widened to f32, exactly).
    pub(crate) fn new(
        q: LatentQuery,
        (kv_a, kv_a_norm): (Weight, Vec<f32>),
        kv_b: Weight,
        o: Weight,
        m: &crate::config::MlaConfig,
        heads: usize,
    ) -> Result<Self> {
        let mut w = Self { q, kv_a, kv_a_norm, kv_b, o, uk_t: Vec::new(), uv: Vec::new() };
        w.derive(m, heads)?;
        Ok(w)
    }

    /// Recomputes `uk_t` and `uv` from `kv_b`: the value rows as stored,
    /// the key rows transposed (FP8 whole 128x128 blocks stay FP8, each
    /// block keeping its scale; other quantized rows are widened to f32).
    pub(crate) fn derive(&mut self, m: &crate::config::MlaConfig, heads: usize) -> Result<()> {
        let (dn, dv) = (m.qk_nope_head_dim, m.v_head_dim);
        let key_t = |from: usize| -> Result<Weight> {
            let part = self.kv_b.row_range(from..from + dn)?;
            if let Some(t) = crate::fp8::transposed(&part)? {
                return Ok(t);
            }
            let part = match part.quant_format() {
                Some(_) => Weight::from_f32(part.rows(), part.cols(), part.to_f32())?,
                None => part,
            };
            crate::gpt_oss::transposed(&part)
        };
        self.uk_t = (0..heads).map(|h| key_t(h * (dn + dv))).collect::<Result<_>>()?;
        self.uv = (0..heads)
            .map(|h| Ok(self.kv_b.row_range(h * (dn + dv) + dn..(h + 1) * (dn + dv))?))
            .collect::<Result<_>>()?;
        Ok(())
    }

    pub(crate) fn matrices(&self) -> Vec<&Weight> {
        let mut m = match &self.q {
            LatentQuery::Full(q) => vec![q],
            LatentQuery::LowRank { a, b, .. } => vec![a, b],
        };
        m.extend([&self.kv_a, &self.kv_b, &self.o]);
        m
    }

    /// Every matrix, the absorbed form's per-head ones included.
    pub(crate) fn matrices_mut(&mut self) -> Vec<&mut Weight> {
        let mut m = match &mut self.q {
            LatentQuery::Full(q) => vec![q],
            LatentQuery::LowRank { a, b, .. } => vec![a, b],
        };
        m.extend([&mut self.kv_a, &mut self.kv_b, &mut self.o]);
        m.extend(self.uk_t.iter_mut().chain(self.uv.iter_mut()));
        m
    }
}

/// Latent attention's query projection, `heads * (nope + rope)` outputs.
#[derive(Clone)]
pub(crate) enum LatentQuery {
    /// One matrix (`q_lora_rank` null).
    Full(Weight),
    /// `b(norm(a x))`.
    LowRank { a: Weight, norm: Vec<f32>, b: Weight },
}

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

/// The always-on shared expert(s) (one MLP of their summed width), with
/// Qwen2-MoE's sigmoid gate.
#[derive(Clone)]
pub(crate) struct SharedExpert {
    pub(crate) mlp: ExpertWeights,
    /// `[1, hidden]`.
    pub(crate) gate: Option<Weight>,
}

/// A MoE layer's router.
#[derive(Clone)]
pub(crate) struct Router {
    /// `[experts, hidden]`.
    pub(crate) weight: Weight,
    /// Added to the logits (gpt-oss).
    pub(crate) bias: Option<Vec<f32>>,
    /// Added to the scores for selection only (DeepSeek-V3, GLM).
    pub(crate) correction: Option<Vec<f32>>,
}

/// What follows attention.
#[derive(Clone)]
pub(crate) enum FfnWeights {
    Dense(ExpertWeights),
    Moe { router: Router, shared: Option<SharedExpert> },
}

/// One decoder layer (experts live behind an `ExpertProvider`).
#[derive(Clone)]
pub(crate) struct LayerWeights {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_attn_norm: Vec<f32>,
    pub(crate) attn: Attention,
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

    /// Token `token`'s embedding row into `out` (`hidden_size` values);
    /// false, leaving `out` as it was, if the token is outside the vocabulary
    /// or `out` has another length.
    pub fn embedding(&self, token: u32, out: &mut [f32]) -> bool {
        let ok = (token as usize) < self.embed.rows() && out.len() == self.embed.cols();
        if ok {
            self.embed.row_to_f32(token as usize, out);
        }
        ok
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
                let a = l.attn.nbytes();
                let f = match &l.ffn {
                    FfnWeights::Dense(m) => m.nbytes(),
                    FfnWeights::Moe { router, shared, .. } => {
                        router.weight.nbytes()
                            + shared.as_ref().map_or(0, |s| s.mlp.nbytes() + s.gate.as_ref().map_or(0, Weight::nbytes))
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
        let unread: usize = self.layers.iter().map(|l| l.attn.nbytes() - l.attn.decode_bytes()).sum();
        non_embed - unread + head + embed_row + moe_layers * self.cfg.moe.top_k * expert_bytes
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
                attn: match cfg.attention.mla {
                    Some(_) => Attention::Latent(load_latent(ck, cfg, &n)?),
                    None => Attention::Standard(load_attention(ck, cfg, &n)?),
                },
                ffn: match kind {
                    FfnKind::Dense(width) => FfnWeights::Dense(ExpertWeights::load(ck, &n.mlp(None), h, *width)?),
                    FfnKind::Moe => {
                        let e = cfg.moe.num_experts;
                        FfnWeights::Moe {
                            router: Router {
                                weight: ck.weight(&n.router(), e, h)?,
                                bias: match cfg.moe.router_bias {
                                    true => Some(ck.vector(&n.router_bias(), e)?),
                                    false => None,
                                },
                                correction: match cfg.moe.routing.has_correction_bias() {
                                    true => Some(ck.vector(&n.correction_bias(), e)?),
                                    false => None,
                                },
                            },
                            shared: match cfg.moe.shared_expert_ffn {
                                Some(w) => Some(SharedExpert {
                                    mlp: ExpertWeights::load(ck, &n.mlp(Some(n.shared_expert())), h, w)?,
                                    gate: match cfg.moe.shared_expert_gated {
                                        true => Some(ck.weight(&n.get("mlp.shared_expert_gate.weight"), 1, h)?),
                                        false => None,
                                    },
                                }),
                                None => None,
                            },
                        }
                    }
                },
            };
            // bytes read: latent attention's per-head matrices are derived (or, from
            // GGUF, read in place of kv_b, which is restacked from them)
            on_tensor(match &layer.attn {
                Attention::Standard(a) => a.qkv.nbytes() + a.o.nbytes(),
                Attention::Latent(a) => a.matrices().iter().map(|w| w.nbytes()).sum(),
            });
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

fn load_latent(ck: &Checkpoint, cfg: &ModelConfig, n: &LayerNames) -> Result<LatentWeights> {
    let a = &cfg.attention;
    let m = a.mla.expect("latent attention has its shape");
    let h = cfg.hidden_size;
    let qw = a.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim);
    let q = match m.q_lora_rank {
        None => LatentQuery::Full(ck.weight(&n.get("self_attn.q_proj.weight"), qw, h)?),
        Some(r) => LatentQuery::LowRank {
            a: ck.weight(&n.get("self_attn.q_a_proj.weight"), r, h)?,
            norm: ck.vector(&n.get("self_attn.q_a_layernorm.weight"), r)?,
            b: ck.weight(&n.get("self_attn.q_b_proj.weight"), qw, r)?,
        },
    };
    let r = m.kv_lora_rank;
    let (dn, dv, heads) = (m.qk_nope_head_dim, m.v_head_dim, a.num_heads);
    let kv_b_name = n.get("self_attn.kv_b_proj.weight");
    let kv_a = (
        ck.weight(&n.get("self_attn.kv_a_proj_with_mqa.weight"), r + m.qk_rope_head_dim, h)?,
        ck.vector(&n.get("self_attn.kv_a_layernorm.weight"), r)?,
    );
    let o = ck.weight(&n.get("self_attn.o_proj.weight"), h, a.num_heads * m.v_head_dim)?;
    if ck.contains(&kv_b_name) || !ck.contains(&n.get("self_attn.k_b_proj.0.weight")) {
        let kv_b = ck.weight(&kv_b_name, heads * (dn + dv), r)?;
        return LatentWeights::new(q, kv_a, kv_b, o, &m, heads);
    }
    // GGUF: per head the key rows stored transposed (the absorbed form's
    // `uk_t` as it is, quantized or not) and the value rows (`uv`);
    // restacked as transformers' kv_b for the expanded form (quantized
    // parts widened, exactly)
    let (mut uk_t, mut uv, mut parts) = (Vec::new(), Vec::new(), Vec::with_capacity(2 * heads));
    for hd in 0..heads {
        let k_t = ck.weight(&n.get(&format!("self_attn.k_b_proj.{hd}.weight")), r, dn)?;
        let v = ck.weight(&n.get(&format!("self_attn.v_b_proj.{hd}.weight")), dv, r)?;
        let widened = match k_t.quant_format() {
            Some(_) => Weight::from_f32(r, dn, k_t.to_f32())?,
            None => k_t.clone(),
        };
        parts.push(crate::gpt_oss::transposed(&widened)?);
        parts.push(v.clone());
        uk_t.push(k_t);
        uv.push(v);
    }
    let (kv_a, kv_a_norm) = kv_a;
    Ok(LatentWeights { q, kv_a, kv_a_norm, kv_b: Weight::concat_rows(&parts)?, o, uk_t, uv })
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
