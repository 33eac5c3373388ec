//! The model's non-expert weights uploaded to a device once, in their
//! checkpoint precision. What the device pass does not implement is refused
//! before anything is uploaded, with the reason ([`Model::gpu_plan`]): latent
//! attention (DeepSeek, Kimi), attention sinks and expert biases (gpt-oss),
//! interleaved rotary pairs, quantized non-expert weights.

use super::Device;
use crate::experts::ExpertWeights;
use crate::weights::{Attention, FfnWeights, Model};
use crate::Result;

/// A SwiGLU MLP on the device (dense layers and shared experts).
pub(crate) struct DevMlp<D: Device> {
    /// `[2 * ffn, hidden]`.
    pub(crate) gate_up: D::Weight,
    /// `[hidden, ffn]`.
    pub(crate) down: D::Weight,
}

/// The shared expert and its optional sigmoid gate.
pub(crate) struct DevShared<D: Device> {
    pub(crate) mlp: DevMlp<D>,
    /// `[1, hidden]`.
    pub(crate) gate: Option<D::Weight>,
}

pub(crate) enum DevFfn<D: Device> {
    Dense(DevMlp<D>),
    Moe { router: D::Weight, shared: Option<DevShared<D>> },
}

/// One decoder layer's weights on the device.
pub(crate) struct DevLayer<D: Device> {
    pub(crate) input_norm: D::Buf,
    pub(crate) post_attn_norm: D::Buf,
    pub(crate) qkv: D::Weight,
    pub(crate) qkv_bias: Option<D::Buf>,
    pub(crate) o: D::Weight,
    pub(crate) o_bias: Option<D::Buf>,
    /// Query and key norms, and whether they are per head (else full width).
    pub(crate) qk_norm: Option<(D::Buf, D::Buf, bool)>,
    pub(crate) ffn: DevFfn<D>,
}

/// Every non-expert weight on the device.
pub(crate) struct DevWeights<D: Device> {
    pub(crate) embed: D::Weight,
    pub(crate) layers: Vec<DevLayer<D>>,
    pub(crate) final_norm: D::Buf,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<D::Weight>,
    /// Bytes uploaded.
    pub(crate) bytes: usize,
}

struct Uploader<'a, D> {
    dev: &'a D,
    bytes: usize,
}

impl<D: Device> Uploader<'_, D> {
    fn weight(&mut self, w: &moe_kernels::Weight) -> Result<D::Weight> {
        self.bytes += w.nbytes();
        self.dev.upload_weight(w)
    }

    fn router(&mut self, w: &moe_kernels::Weight) -> Result<D::Weight> {
        self.bytes += 4 * w.rows() * w.cols();
        self.dev.upload_router(w)
    }

    fn vector(&mut self, v: &[f32]) -> Result<D::Buf> {
        self.bytes += 4 * v.len();
        self.dev.upload(v)
    }

    fn mlp(&mut self, w: &ExpertWeights) -> Result<DevMlp<D>> {
        Ok(DevMlp { gate_up: self.weight(&w.gate_up)?, down: self.weight(&w.down)? })
    }
}

impl<D: Device> DevWeights<D> {
    /// Uploads every non-expert weight of `model` (after checking that the
    /// device pass covers it: [`Model::gpu_plan`]).
    pub(crate) fn upload(dev: &D, model: &Model) -> Result<Self> {
        let plan = model.gpu_plan(0, 1, 0)?;
        let head_dim = model.cfg.attention.head_dim;
        let mut up = Uploader { dev, bytes: 0 };
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            let Attention::Standard(a) = &layer.attn else { unreachable!("refused by gpu_plan") };
            let qk_norm = match (&a.q_norm, &a.k_norm) {
                (Some(q), Some(k)) => Some((up.vector(q)?, up.vector(k)?, q.len() == head_dim)),
                _ => None,
            };
            let ffn = match &layer.ffn {
                FfnWeights::Dense(m) => DevFfn::Dense(up.mlp(m)?),
                FfnWeights::Moe { router, shared } => DevFfn::Moe {
                    router: up.router(&router.weight)?,
                    shared: match shared {
                        Some(sh) => Some(DevShared {
                            mlp: up.mlp(&sh.mlp)?,
                            gate: sh.gate.as_ref().map(|w| up.weight(w)).transpose()?,
                        }),
                        None => None,
                    },
                },
            };
            layers.push(DevLayer {
                input_norm: up.vector(&layer.input_norm)?,
                post_attn_norm: up.vector(&layer.post_attn_norm)?,
                qkv: up.weight(&a.qkv)?,
                qkv_bias: a.qkv_bias.as_deref().map(|b| up.vector(b)).transpose()?,
                o: up.weight(&a.o)?,
                o_bias: a.o_bias.as_deref().map(|b| up.vector(b)).transpose()?,
                qk_norm,
                ffn,
            });
        }
        let embed = up.weight(&model.embed)?;
        let final_norm = up.vector(&model.final_norm)?;
        let lm_head = model.lm_head.as_ref().map(|w| up.weight(w)).transpose()?;
        debug_assert_eq!(up.bytes, plan.weights, "the plan counts what is uploaded");
        Ok(Self { embed, layers, final_norm, lm_head, bytes: up.bytes })
    }

    /// The output projection.
    pub(crate) fn lm_head(&self) -> &D::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
