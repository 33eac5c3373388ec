//! Expert weights and the view through which the forward pass reaches them.

use crate::arch::LayerNames;
use crate::checkpoint::{Checkpoint, TensorLocation};
use crate::{ModelConfig, ModelError, Result};
use moe_kernels::Weight;
use moe_types::{ExpertId, ExpertSet, LayerId, LayerRouting, SeqId, TokenId};
use std::ops::Deref;

/// One SwiGLU FFN: `down(silu(gate(x)) * up(x))`, with gate and up stacked
/// into one `[2 * ffn, hidden]` matrix so one product computes both (the
/// activation is the model's `ExpertAct`; gpt-oss experts add biases).
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    /// `[gate; up]`, `[2 * ffn, hidden]`.
    pub gate_up: Weight,
    /// `[hidden, ffn]`.
    pub down: Weight,
    /// Biases added after the two products (gpt-oss).
    pub bias: Option<ExpertBias>,
}

/// The biases of a gpt-oss expert.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertBias {
    /// `[gate; up]`, `2 * ffn`.
    pub gate_up: Vec<f32>,
    /// `hidden`.
    pub down: Vec<f32>,
}

impl ExpertWeights {
    /// Reads an FFN's three matrices by name and stacks gate and up.
    pub(crate) fn load(ck: &Checkpoint, names: &[String; 3], hidden: usize, ffn: usize) -> Result<Self> {
        let gate = ck.weight(&names[0], ffn, hidden)?;
        let up = ck.weight(&names[1], ffn, hidden)?;
        let down = ck.weight(&names[2], hidden, ffn)?;
        Self::from_parts(gate, up, down)
    }

    /// Stacks `gate` (`[ffn, hidden]`) and `up` and keeps `down` (`[hidden, ffn]`).
    pub fn from_parts(gate: Weight, up: Weight, down: Weight) -> Result<Self> {
        Ok(Self { gate_up: Weight::concat_rows(&[gate, up])?, down, bias: None })
    }

    /// These weights with products that quantize few activation rows to
    /// int8, as llama.cpp computes (faster; no longer exact against a float
    /// reference): for gpt-oss's MXFP4 experts, which keep f32 activations by
    /// default. Float weights are unaffected.
    pub fn with_int8_activations(self) -> Self {
        Self { gate_up: self.gate_up.with_int8_activations(), down: self.down.with_int8_activations(), bias: self.bias }
    }

    /// FFN width.
    pub fn ffn(&self) -> usize {
        self.down.cols()
    }

    /// Bytes of the three matrices (and biases).
    pub fn nbytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| 4 * (b.gate_up.len() + b.down.len()));
        self.gate_up.nbytes() + self.down.nbytes() + bias
    }
}

/// Where one expert's bytes live on disk: the parts to read, and how they
/// become its weights ([`ExpertLocation::assemble`]), so a slow tier can read
/// an expert without the mapping.
#[derive(Clone, Debug)]
pub struct ExpertLocation {
    /// Every byte range of the expert, in the order `assemble` takes them.
    pub parts: Vec<TensorLocation>,
    layout: Layout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// gate `[ffn, hidden]`, up, down `[hidden, ffn]`, each a whole tensor.
    Split,
    /// gpt-oss's slices of its merged tensors (`gpt_oss.rs`).
    GptOss(crate::gpt_oss::Stored),
    /// As `Split` in FP8, then the three matrices' block scales (`fp8.rs`).
    SplitFp8,
}

impl ExpertLocation {
    pub(crate) fn split(gate: TensorLocation, up: TensorLocation, down: TensorLocation) -> Self {
        Self { parts: vec![gate, up, down], layout: Layout::Split }
    }

    /// An FP8 expert: gate, up and down codes, then their scales.
    pub(crate) fn split_fp8(codes: [TensorLocation; 3], scales: [TensorLocation; 3]) -> Self {
        Self { parts: codes.into_iter().chain(scales).collect(), layout: Layout::SplitFp8 }
    }

    pub(crate) fn gpt_oss(parts: Vec<TensorLocation>, stored: crate::gpt_oss::Stored) -> Self {
        Self { parts, layout: Layout::GptOss(stored) }
    }

    /// Bytes on disk.
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// The gate, up and down matrices when they are whole tensors (the
    /// layout a reader may fill buffers from directly).
    pub fn gate_up_down(&self) -> Option<[&TensorLocation; 3]> {
        match (self.layout, &self.parts[..]) {
            (Layout::Split, [g, u, d]) => Some([g, u, d]),
            _ => None,
        }
    }

    /// Bytes in memory once loaded (f16 is widened to f32, biases are f32).
    pub fn resident_bytes(&self) -> usize {
        let widened = |t: &TensorLocation| match t.dtype {
            crate::StoredType::F16 => t.len * 2,
            _ => t.len,
        };
        match self.layout {
            Layout::Split => self.parts.iter().map(widened).sum(),
            Layout::GptOss(stored) => crate::gpt_oss::resident_bytes(stored, &self.parts),
            Layout::SplitFp8 => self.parts[..3].iter().map(|t| crate::fp8::resident_bytes(t.rows, t.cols)).sum(),
        }
    }

    /// The expert from the bytes of its parts (`bytes[i]` read at `parts[i]`).
    pub fn assemble(&self, bytes: &[&[u8]]) -> Result<ExpertWeights> {
        if bytes.len() != self.parts.len() {
            return Err(ModelError::Unsupported(format!("{} parts read, {} expected", bytes.len(), self.parts.len())));
        }
        match self.layout {
            Layout::Split => {
                let w = |i: usize| self.parts[i].to_weight(bytes[i]);
                ExpertWeights::from_parts(w(0)?, w(1)?, w(2)?)
            }
            Layout::GptOss(stored) => crate::gpt_oss::assemble(stored, &self.parts, bytes),
            Layout::SplitFp8 => {
                let w = |i: usize| {
                    let (codes, scales) = (&self.parts[i], &self.parts[i + 3]);
                    let s = scales.to_f32(bytes[i + 3])?;
                    crate::fp8::weight(&codes.name, codes.rows, codes.cols, bytes[i], &s)
                };
                ExpertWeights::from_parts(w(0)?, w(1)?, w(2)?)
            }
        }
    }
}

/// The disk locations of every expert, `[layer][expert]` (dense layers have
/// no entries); shapes and dtypes are checked here, so that a later read can
/// only fail on IO.
pub fn locate_experts(ck: &Checkpoint, cfg: &ModelConfig) -> Result<Vec<Vec<ExpertLocation>>> {
    let (h, f) = (cfg.hidden_size, cfg.moe.expert_ffn);
    let mut out = Vec::with_capacity(cfg.num_layers());
    for (l, kind) in cfg.layers.iter().enumerate() {
        let mut layer = Vec::new();
        if *kind == crate::FfnKind::Moe {
            let names = LayerNames::new(cfg.arch, l);
            for e in 0..cfg.moe.num_experts {
                if cfg.arch == crate::Arch::GptOss {
                    layer.push(crate::gpt_oss::locate(ck, &names, e, cfg)?);
                    continue;
                }
                let n = names.expert(e);
                let codes = [ck.locate(&n[0], f, h)?, ck.locate(&n[1], f, h)?, ck.locate(&n[2], h, f)?];
                if codes.iter().any(|t| t.dtype == crate::StoredType::Fp8E4m3) {
                    let scales = [
                        ck.locate_fp8_scales(&n[0], f, h)?,
                        ck.locate_fp8_scales(&n[1], f, h)?,
                        ck.locate_fp8_scales(&n[2], h, f)?,
                    ];
                    layer.push(ExpertLocation::split_fp8(codes, scales));
                } else {
                    let [g, u, d] = codes;
                    layer.push(ExpertLocation::split(g, u, d));
                }
            }
        }
        out.push(layer);
    }
    Ok(out)
}

/// One token of a forward step, as the engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepToken {
    /// Its sequence.
    pub seq: SeqId,
    /// The token id the model reads.
    pub token: TokenId,
}

/// What the forward pass needs of the experts: maps a logical (layer,
/// expert) to weights ready to compute with.
///
/// Per MoE layer, in order: [`prepare`](Self::prepare) with the layer's
/// routing and distinct experts, [`forecast`](Self::forecast) for each later
/// layer when [`lookahead`](Self::lookahead) asks for it, and
/// [`get`](Self::get) for each expert used. An implementation that keeps
/// only some experts resident starts loads in `prepare` (and earlier, from
/// forecasts) and keeps an expert alive while its guard is held.
pub trait ExpertProvider {
    /// Keeps an expert resident while alive.
    type Guard<'a>: Deref<Target = ExpertWeights>
    where
        Self: 'a;

    /// How many MoE layers ahead the forward pass should apply later layers'
    /// routers to the current hidden states (look-ahead gating); 0 for none.
    fn lookahead(&self) -> usize {
        0
    }

    /// Look-ahead gating: while MoE layer `from` runs, `layer`'s router
    /// applied to the hidden states chose `ids` (`tokens * top_k`, strongest
    /// first, batch order).
    fn forecast(&self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        let _ = (from, layer, ids);
    }

    /// Whether the forward pass should show [`hidden`](Self::hidden) the
    /// residual stream entering each MoE layer (hidden-state predictors).
    fn wants_hidden(&self) -> bool {
        false
    }

    /// The residual stream entering MoE layer `layer`, before its attention
    /// (`tokens * hidden_size` values, batch order): a forecast made from it
    /// is ready while the attention runs.
    fn hidden(&self, layer: LayerId, h: &[f32]) {
        let _ = (layer, h);
    }

    /// Announces a layer about to run: its routing (per token) and the
    /// distinct experts it uses, ascending.
    fn prepare(&self, routing: &LayerRouting, used: &[ExpertId]) -> Result<()> {
        let _ = (routing, used);
        Ok(())
    }

    /// The weights of one expert.
    fn get(&self, layer: LayerId, expert: ExpertId) -> Result<Self::Guard<'_>>;
}

/// What the engine's step planner needs of the experts: step and sequence
/// boundaries, and the forecasts and residency that regrouping reads. The
/// defaults suit experts that are all resident.
pub trait ExpertPlanner {
    /// A forward step begins over `tokens` (batch order).
    fn begin_step(&self, tokens: &[StepToken]) {
        let _ = tokens;
    }

    /// A sequence ended: forget what was kept about it.
    fn end_sequence(&self, seq: SeqId) {
        let _ = seq;
    }

    /// Before a step is planned: for each token that may run next, the
    /// experts it is forecast to use at each MoE layer (`None`: no forecast).
    /// Used to regroup sequences into micro-batches.
    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        vec![None; tokens.len()]
    }

    /// The experts resident in the fast tier, per MoE layer (empty when
    /// every expert is resident).
    fn resident_sets(&self) -> Vec<ExpertSet> {
        Vec::new()
    }
}

/// Every expert of every MoE layer held in memory.
pub struct ResidentExperts {
    /// Indexed `[layer][expert]`; dense layers have no entries.
    pub(crate) experts: Vec<Vec<ExpertWeights>>,
}

impl ResidentExperts {
    /// Reads every expert of the checkpoint (through the same locations a
    /// disk tier reads), calling `on_expert` after each.
    pub fn load(ck: &Checkpoint, cfg: &ModelConfig, mut on_expert: impl FnMut(usize)) -> Result<Self> {
        let mut experts = Vec::with_capacity(cfg.num_layers());
        for layer in locate_experts(ck, cfg)? {
            let mut weights = Vec::with_capacity(layer.len());
            for loc in &layer {
                let bytes: Vec<&[u8]> = loc.parts.iter().map(|p| ck.bytes_at(p)).collect();
                let w = loc.assemble(&bytes)?;
                on_expert(w.nbytes());
                weights.push(w);
            }
            experts.push(weights);
        }
        Ok(Self { experts })
    }

    /// Builds from weights already in memory (`[layer][expert]`).
    pub fn from_weights(experts: Vec<Vec<ExpertWeights>>) -> Self {
        Self { experts }
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.experts.iter().flatten().map(ExpertWeights::nbytes).sum()
    }

    /// Every expert quantized to `format` (`--quantize-experts`), experts
    /// side by side on the thread pool.
    pub fn quantized(self, format: moe_kernels::QuantFormat) -> Result<Self> {
        use rayon::prelude::*;
        let experts = self
            .experts
            .into_par_iter()
            .map(|layer| layer.par_iter().map(|e| e.quantized(format)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { experts })
    }

    /// The weights, `[layer][expert]`.
    pub fn into_weights(self) -> Vec<Vec<ExpertWeights>> {
        self.experts
    }

    /// Every expert with int8 activation products (see
    /// [`ExpertWeights::with_int8_activations`]).
    pub fn with_int8_activations(self) -> Self {
        let experts = self.experts.into_iter().map(|l| l.into_iter().map(|e| e.with_int8_activations()).collect());
        Self { experts: experts.collect() }
    }
}

impl ExpertPlanner for ResidentExperts {}

impl ExpertProvider for ResidentExperts {
    type Guard<'a> = &'a ExpertWeights;

    fn get(&self, layer: LayerId, expert: ExpertId) -> Result<&ExpertWeights> {
        self.experts.get(layer.index()).and_then(|l| l.get(expert.index())).ok_or_else(|| {
            ModelError::ExpertUnavailable {
                layer: layer.index(),
                expert: expert.index(),
                message: "no such expert".into(),
            }
        })
    }
}
