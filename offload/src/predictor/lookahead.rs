//! Look-ahead gating: the model applies the next layers' routers to the
//! current hidden state (the residual stream changes slowly from layer to
//! layer), and the experts they choose are the forecast.

use super::{Forecast, PathPredictor, Shape};
use moe_model::StepToken;
use moe_types::{ExpertId, MoeLayerId};

/// Forecasts from the model's own routers, `depth` MoE layers ahead. It has
/// nothing to say about a step's first MoE layer (no hidden state yet).
pub struct LookAhead {
    shape: Shape,
}

impl LookAhead {
    /// A predictor for `shape`.
    pub fn new(shape: Shape) -> Self {
        Self { shape }
    }
}

impl PathPredictor for LookAhead {
    fn lookahead(&self) -> usize {
        self.shape.depth
    }

    fn begin_step(&mut self, _: &[StepToken], _: &mut Vec<Forecast>) {}

    fn observe(&mut self, _: MoeLayerId, _: &[ExpertId], _: &mut Vec<Forecast>) {}

    fn gating(&mut self, _from: MoeLayerId, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        out.push(Forecast { layer, ids: ids.to_vec() });
    }
}
