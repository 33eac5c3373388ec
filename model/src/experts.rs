//! Expert weights and the view through which the forward pass reaches them.

use crate::arch::LayerNames;
use crate::checkpoint::Checkpoint;
use crate::{ModelConfig, ModelError, Result};
use moe_kernels::Weight;
use moe_types::{ExpertId, LayerId};
use std::ops::Deref;

/// One SwiGLU FFN: `down(silu(gate(x)) * up(x))`, with gate and up stacked
/// into one `[2 * ffn, hidden]` matrix so one product computes both.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    /// `[gate; up]`, `[2 * ffn, hidden]`.
    pub gate_up: Weight,
    /// `[hidden, ffn]`.
    pub down: Weight,
}

impl ExpertWeights {
    /// Reads an FFN's three matrices by name and stacks gate and up.
    pub(crate) fn load(ck: &Checkpoint, names: &[String; 3], hidden: usize, ffn: usize) -> Result<Self> {
        let gate = ck.weight(&names[0], ffn, hidden)?;
        let up = ck.weight(&names[1], ffn, hidden)?;
        let down = ck.weight(&names[2], hidden, ffn)?;
        Ok(Self { gate_up: Weight::concat_rows(&[gate, up])?, down })
    }

    /// FFN width.
    pub fn ffn(&self) -> usize {
        self.down.cols()
    }

    /// Bytes of the three matrices.
    pub fn nbytes(&self) -> usize {
        self.gate_up.nbytes() + self.down.nbytes()
    }
}

/// Maps a logical (layer, expert) to weights ready to compute with.
///
/// The forward pass calls [`prepare`](Self::prepare) once per MoE layer with
/// every expert the step's tokens chose there, then [`get`](Self::get) for
/// each. An implementation that keeps only some experts resident loads the
/// missing ones in `prepare` and keeps them alive while a guard is held.
pub trait ExpertProvider {
    /// Keeps an expert resident while alive.
    type Guard<'a>: Deref<Target = ExpertWeights>
    where
        Self: 'a;

    /// Announces the experts a layer is about to use.
    fn prepare(&self, layer: LayerId, experts: &[ExpertId]) -> Result<()> {
        let _ = (layer, experts);
        Ok(())
    }

    /// The weights of one expert.
    fn get(&self, layer: LayerId, expert: ExpertId) -> Result<Self::Guard<'_>>;
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
                    let w = ExpertWeights::load(ck, &names.expert(e), cfg.hidden_size, cfg.moe.expert_ffn)?;
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
}

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
