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

/// Where one expert's three matrices live on disk.
#[derive(Clone, Debug)]
pub struct ExpertLocation {
    /// `[ffn, hidden]`.
    pub gate: TensorLocation,
    /// `[ffn, hidden]`.
    pub up: TensorLocation,
    /// `[hidden, ffn]`.
    pub down: TensorLocation,
}

impl ExpertLocation {
    /// Bytes on disk of the three matrices.
    pub fn nbytes(&self) -> usize {
        self.gate.len + self.up.len + self.down.len
    }
}

/// The disk locations of every expert, `[layer][expert]` (dense layers have
/// no entries); shapes and dtypes are checked here, so that a later read can
/// only fail on IO.
pub fn locate_experts(ck: &Checkpoint, cfg: &ModelConfig) -> Result<Vec<Vec<ExpertLocation>>> {
    if cfg.arch == crate::Arch::GptOss {
        return Err(ModelError::Unsupported(
            "an expert budget for gpt_oss (its experts are stored merged and interleaved): not yet; \
             load every expert (--expert-cache all)"
                .into(),
        ));
    }
    let (h, f) = (cfg.hidden_size, cfg.moe.expert_ffn);
    let mut out = Vec::with_capacity(cfg.num_layers());
    for (l, kind) in cfg.layers.iter().enumerate() {
        let mut layer = Vec::new();
        if *kind == crate::FfnKind::Moe {
            let names = LayerNames::new(cfg.arch, l);
            for e in 0..cfg.moe.num_experts {
                let n = names.expert(e);
                layer.push(ExpertLocation {
                    gate: ck.locate(&n[0], f, h)?,
                    up: ck.locate(&n[1], f, h)?,
                    down: ck.locate(&n[2], h, f)?,
                });
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
    experts: Vec<Vec<ExpertWeights>>,
}

impl ResidentExperts {
    /// Reads every expert of the checkpoint, calling `on_expert` after each.
    pub fn load(ck: &Checkpoint, cfg: &ModelConfig, mut on_expert: impl FnMut(usize)) -> Result<Self> {
        let mut experts = Vec::with_capacity(cfg.num_layers());
        for (l, kind) in cfg.layers.iter().enumerate() {
            let mut layer = Vec::new();
            if *kind == crate::FfnKind::Moe {
                let names = LayerNames::new(cfg.arch, l);
                for e in 0..cfg.moe.num_experts {
                    let w = if cfg.arch == crate::Arch::GptOss {
                        crate::gpt_oss::load_expert(ck, &names, e, cfg)?
                    } else {
                        ExpertWeights::load(ck, &names.expert(e), cfg.hidden_size, cfg.moe.expert_ffn)?
                    };
                    on_expert(w.nbytes());
                    layer.push(w);
                }
            }
            experts.push(layer);
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
