//! The model's non-expert weights uploaded to the GPU once, in their
//! checkpoint precision (f32 or bf16). What the CUDA kernels do not cover is
//! refused before anything is uploaded, with the reason
//! ([`Model::gpu_plan`]): latent attention (DeepSeek, Kimi, GLM), attention
//! sinks and expert biases (gpt-oss), interleaved rotary pairs, quantized
//! non-expert weights.

use crate::experts::ExpertWeights;
use crate::weights::{Attention, FfnWeights, Model};
use crate::Result;
use cudarc::driver::CudaSlice;
use moe_kernels::cuda::gemm::GpuWeight;
use moe_kernels::cuda::GpuContext;

/// A SwiGLU MLP on the device (dense layers and shared experts).
pub(crate) struct GpuMlp {
    /// `[2 * ffn, hidden]`.
    pub(crate) gate_up: GpuWeight,
    /// `[hidden, ffn]`.
    pub(crate) down: GpuWeight,
}

/// The shared expert and its optional sigmoid gate.
pub(crate) struct GpuShared {
    pub(crate) mlp: GpuMlp,
    /// `[1, hidden]`.
    pub(crate) gate: Option<GpuWeight>,
}

pub(crate) enum GpuFfn {
    Dense(GpuMlp),
    Moe { router: GpuWeight, shared: Option<GpuShared> },
}

/// One decoder layer's weights on the device.
pub(crate) struct GpuLayer {
    pub(crate) input_norm: CudaSlice<f32>,
    pub(crate) post_attn_norm: CudaSlice<f32>,
    pub(crate) qkv: GpuWeight,
    pub(crate) qkv_bias: Option<CudaSlice<f32>>,
    pub(crate) o: GpuWeight,
    pub(crate) o_bias: Option<CudaSlice<f32>>,
    /// Query and key norms (per head or full width: their length says which).
    pub(crate) qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) ffn: GpuFfn,
}

/// Every non-expert weight on the device.
pub(crate) struct GpuWeights {
    pub(crate) embed: GpuWeight,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) final_norm: CudaSlice<f32>,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<GpuWeight>,
    /// Bytes uploaded.
    pub(crate) bytes: usize,
}

struct Uploader<'a> {
    g: &'a GpuContext,
    bytes: usize,
}

impl Uploader<'_> {
    fn weight(&mut self, w: &moe_kernels::Weight) -> Result<GpuWeight> {
        self.bytes += w.nbytes();
        Ok(GpuWeight::upload(self.g, w)?)
    }

    fn vector(&mut self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.bytes += 4 * v.len();
        Ok(self.g.stream().clone_htod(v)?)
    }

    fn mlp(&mut self, w: &ExpertWeights) -> Result<GpuMlp> {
        Ok(GpuMlp { gate_up: self.weight(&w.gate_up)?, down: self.weight(&w.down)? })
    }
}

impl GpuWeights {
    /// Uploads every non-expert weight of `model` (after checking that the
    /// GPU covers it: [`Model::gpu_plan`]).
    pub(crate) fn upload(g: &GpuContext, model: &Model) -> Result<Self> {
        let plan = model.gpu_plan(0, 1, 0)?;
        let mut up = Uploader { g, bytes: 0 };
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            let Attention::Standard(a) = &layer.attn else { unreachable!("checked above") };
            let qk_norm = match (&a.q_norm, &a.k_norm) {
                (Some(q), Some(k)) => Some((up.vector(q)?, up.vector(k)?)),
                _ => None,
            };
            let ffn = match &layer.ffn {
                FfnWeights::Dense(m) => GpuFfn::Dense(up.mlp(m)?),
                FfnWeights::Moe { router, shared } => GpuFfn::Moe {
                    router: up.weight(&router.weight)?,
                    shared: match shared {
                        Some(sh) => Some(GpuShared {
                            mlp: up.mlp(&sh.mlp)?,
                            gate: sh.gate.as_ref().map(|w| up.weight(w)).transpose()?,
                        }),
                        None => None,
                    },
                },
            };
            layers.push(GpuLayer {
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
    pub(crate) fn lm_head(&self) -> &GpuWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
