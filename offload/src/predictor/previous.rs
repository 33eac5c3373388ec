//! The baseline: a token will take the path its sequence's previous token took.

use super::{window, Forecast, PathPredictor, Shape, NO_EXPERT};
use moe_model::StepToken;
use moe_types::{ExpertId, MoeLayerId, SeqId};
use std::collections::HashMap;

/// Remembers each sequence's last computed token's path (all MoE layers).
pub struct PreviousToken {
    shape: Shape,
    /// Per sequence: `layers * top_k` ids.
    last: HashMap<SeqId, Vec<ExpertId>>,
    step: Vec<StepToken>,
    /// This step's routing so far, per layer.
    current: Vec<Vec<ExpertId>>,
}

impl PreviousToken {
    /// A predictor for `shape`.
    pub fn new(shape: Shape) -> Self {
        Self { shape, last: HashMap::new(), step: Vec::new(), current: vec![Vec::new(); shape.layers] }
    }

    fn forecast(&self, layer: usize) -> Forecast {
        let k = self.shape.top_k;
        let mut ids = Vec::with_capacity(self.step.len() * k);
        for t in &self.step {
            match self.last.get(&t.seq) {
                Some(path) => ids.extend_from_slice(&path[layer * k..(layer + 1) * k]),
                None => ids.extend(std::iter::repeat_n(NO_EXPERT, k)),
            }
        }
        Forecast { layer: MoeLayerId(layer as u16), ids }
    }
}

impl PathPredictor for PreviousToken {
    fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>) {
        self.step.clear();
        self.step.extend_from_slice(tokens);
        out.extend(window(0, self.shape.depth, self.shape.layers).map(|j| self.forecast(j)));
    }

    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        let layer = layer.index();
        let (k, n) = (self.shape.top_k, self.shape.layers);
        if let Some(cur) = self.current.get_mut(layer) {
            cur.clear();
            cur.extend_from_slice(ids);
        }
        out.extend(window(layer + 1, self.shape.depth, n).map(|j| self.forecast(j)));
        if layer + 1 == n {
            // the last token of each sequence in this step sets its path
            for (t, tok) in self.step.iter().enumerate() {
                let path = self.last.entry(tok.seq).or_insert_with(|| vec![NO_EXPERT; n * k]);
                for (j, cur) in self.current.iter().enumerate() {
                    if let Some(src) = cur.get(t * k..(t + 1) * k) {
                        path[j * k..(j + 1) * k].copy_from_slice(src);
                    }
                }
            }
        }
    }

    fn end_sequence(&mut self, seq: SeqId) {
        self.last.remove(&seq);
    }

    fn path(&self, token: StepToken) -> Option<Vec<ExpertId>> {
        self.last.get(&token.seq).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forecasts_the_previous_tokens_path_and_forgets_ended_sequences() {
        let shape = Shape { layers: 2, experts: 4, top_k: 1, depth: 1 };
        let mut p = PreviousToken::new(shape);
        let tok = |seq| StepToken { seq: SeqId(seq), token: 7 };
        let mut out = Vec::new();
        p.begin_step(&[tok(1)], &mut out);
        assert_eq!(out, vec![Forecast { layer: MoeLayerId(0), ids: vec![NO_EXPERT] }]);
        out.clear();
        p.observe(MoeLayerId(0), &[ExpertId(3)], &mut out);
        assert_eq!(out, vec![Forecast { layer: MoeLayerId(1), ids: vec![NO_EXPERT] }]);
        p.observe(MoeLayerId(1), &[ExpertId(2)], &mut out);
        out.clear();
        p.begin_step(&[tok(1), tok(2)], &mut out);
        assert_eq!(out, vec![Forecast { layer: MoeLayerId(0), ids: vec![ExpertId(3), NO_EXPERT] }]);
        out.clear();
        p.observe(MoeLayerId(0), &[ExpertId(0), ExpertId(1)], &mut out);
        assert_eq!(out, vec![Forecast { layer: MoeLayerId(1), ids: vec![ExpertId(2), NO_EXPERT] }]);
        p.end_sequence(SeqId(1));
        out.clear();
        p.begin_step(&[tok(1)], &mut out);
        assert_eq!(out[0].ids, vec![NO_EXPERT]);
    }
}
