//! Several predictors at once, with a measured rule where they disagree:
//! for each MoE layer, the forecast of the member whose forecasts of that
//! layer have been right most often so far (precision with a prior of 3
//! right in 4, ties to the earlier member). Every member's forecasts are
//! scored against the layer's routing, whether they were used or not, so
//! the choice follows the text being served. The paths forecast before a
//! step (for regrouping) are chosen the same way, layer by layer, from
//! their own record: each member's path for each of the step's tokens is
//! scored against the routing the step then takes.

use super::{Forecast, PathPredictor, Shape};
use moe_model::StepToken;
use moe_types::{ExpertId, MoeLayerId, SeqId};

/// One member's record at one MoE layer.
#[derive(Clone, Default)]
struct Score {
    predicted: u64,
    right: u64,
    /// Its latest forecast of the layer this step, not yet scored.
    latest: Option<Vec<ExpertId>>,
}

impl Score {
    fn precision(&self) -> f64 {
        (self.right as f64 + 3.0) / (self.predicted as f64 + 4.0)
    }
}

/// Members in order of preference on ties.
pub struct Combined {
    members: Vec<Box<dyn PathPredictor>>,
    /// `[member][layer]`.
    scores: Vec<Vec<Score>>,
    /// `[member][layer]`, of the paths forecast before a step.
    path_scores: Vec<Vec<Score>>,
    /// `[member]`: each member's path for each of the step's tokens, scored
    /// as the layers run.
    step_paths: Vec<Vec<Option<Vec<ExpertId>>>>,
    layers: usize,
    buf: Vec<Forecast>,
    top_k: usize,
}

impl Combined {
    /// Combines `members` for a model of `shape`.
    pub fn new(members: Vec<Box<dyn PathPredictor>>, shape: Shape) -> Self {
        let scores = vec![vec![Score::default(); shape.layers]; members.len()];
        let (path_scores, step_paths) = (scores.clone(), vec![Vec::new(); members.len()]);
        Self {
            members,
            scores,
            path_scores,
            step_paths,
            layers: shape.layers,
            buf: Vec::new(),
            top_k: shape.top_k.max(1),
        }
    }

    /// The member chosen for `layer` now.
    fn chosen(&self, layer: usize) -> usize {
        let mut best = 0;
        for m in 1..self.members.len() {
            if self.scores[m][layer].precision() > self.scores[best][layer].precision() {
                best = m;
            }
        }
        best
    }

    /// Records member `m`'s new forecasts (in `self.buf`) and passes on those
    /// of layers it is chosen for.
    fn take(&mut self, m: usize, out: &mut Vec<Forecast>) {
        for f in std::mem::take(&mut self.buf) {
            let j = f.layer.index();
            if j >= self.scores[m].len() {
                continue;
            }
            self.scores[m][j].latest = Some(f.ids.clone());
            if self.chosen(j) == m {
                out.push(f);
            }
        }
    }

    /// Calls `f` on each member, collecting and filtering their forecasts.
    fn each(&mut self, out: &mut Vec<Forecast>, mut f: impl FnMut(&mut dyn PathPredictor, &mut Vec<Forecast>)) {
        for m in 0..self.members.len() {
            let mut buf = std::mem::take(&mut self.buf);
            f(self.members[m].as_mut(), &mut buf);
            self.buf = buf;
            self.take(m, out);
        }
    }

    /// Each member's precision per MoE layer so far (`[member][layer]`).
    pub fn precisions(&self) -> Vec<Vec<f64>> {
        self.scores.iter().map(|s| s.iter().map(Score::precision).collect()).collect()
    }
}

impl PathPredictor for Combined {
    fn lookahead(&self) -> usize {
        self.members.iter().map(|m| m.lookahead()).max().unwrap_or(0)
    }

    fn wants_hidden(&self) -> bool {
        self.members.iter().any(|m| m.wants_hidden())
    }

    fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>) {
        // forecasts of a step that did not run to its end are not scored
        self.scores.iter_mut().flatten().for_each(|s| s.latest = None);
        for (m, paths) in self.step_paths.iter_mut().enumerate() {
            paths.clear();
            paths.extend(tokens.iter().map(|&t| self.members[m].path(t)));
        }
        self.each(out, |p, buf| p.begin_step(tokens, buf));
    }

    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        let (j, k) = (layer.index(), self.top_k);
        for (paths, scores) in self.step_paths.iter().zip(self.path_scores.iter_mut()) {
            let Some(s) = scores.get_mut(j) else { continue };
            for (path, used) in paths.iter().zip(ids.chunks_exact(k)) {
                if let Some(f) = path.as_ref().and_then(|p| p.get(j * k..(j + 1) * k)) {
                    let (predicted, right) = super::score(f, used, k);
                    s.predicted += predicted;
                    s.right += right;
                }
            }
        }
        for member in self.scores.iter_mut() {
            let Some(s) = member.get_mut(j) else { continue };
            let Some(f) = s.latest.take() else { continue };
            let (predicted, right) = super::score(&f, ids, k);
            s.predicted += predicted;
            s.right += right;
        }
        self.each(out, |p, buf| p.observe(layer, ids, buf));
    }

    fn gating(&mut self, from: MoeLayerId, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        self.each(out, |p, buf| p.gating(from, layer, ids, buf));
    }

    fn hidden(&mut self, layer: MoeLayerId, h: &[f32], out: &mut Vec<Forecast>) {
        self.each(out, |p, buf| p.hidden(layer, h, buf));
    }

    fn end_sequence(&mut self, seq: SeqId) {
        self.members.iter_mut().for_each(|m| m.end_sequence(seq));
    }

    fn path(&self, token: StepToken) -> Option<Vec<ExpertId>> {
        let paths: Vec<Option<Vec<ExpertId>>> = self.members.iter().map(|m| m.path(token)).collect();
        let k = self.top_k;
        let mut out = Vec::with_capacity(self.layers * k);
        for j in 0..self.layers {
            let best = (0..paths.len()).filter(|&m| paths[m].as_ref().is_some_and(|p| p.len() >= (j + 1) * k)).reduce(
                |a, b| if self.path_scores[b][j].precision() > self.path_scores[a][j].precision() { b } else { a },
            )?;
            out.extend_from_slice(&paths[best].as_ref().expect("filtered")[j * k..(j + 1) * k]);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forecasts a fixed expert for every layer from `begin_step`.
    struct Always(u16, Shape);

    impl PathPredictor for Always {
        fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>) {
            for j in 0..self.1.layers {
                out.push(Forecast { layer: MoeLayerId(j as u16), ids: vec![ExpertId(self.0); tokens.len()] });
            }
        }
        fn observe(&mut self, _: MoeLayerId, _: &[ExpertId], _: &mut Vec<Forecast>) {}
        fn path(&self, _: StepToken) -> Option<Vec<ExpertId>> {
            Some(vec![ExpertId(self.0); self.1.layers])
        }
    }

    #[test]
    fn each_layer_follows_the_member_right_most_often() {
        let shape = Shape { layers: 2, experts: 4, top_k: 1, depth: 1 };
        let mut c = Combined::new(vec![Box::new(Always(1, shape)), Box::new(Always(2, shape))], shape);
        let tok = [StepToken { seq: SeqId(0), token: 5 }];
        let mut out = Vec::new();
        for _ in 0..10 {
            out.clear();
            c.begin_step(&tok, &mut out);
            // layer 0 always routes to 2 (the second member), layer 1 to 1
            c.observe(MoeLayerId(0), &[ExpertId(2)], &mut Vec::new());
            c.observe(MoeLayerId(1), &[ExpertId(1)], &mut Vec::new());
        }
        out.clear();
        c.begin_step(&tok, &mut out);
        let mut by_layer: Vec<_> = out.iter().map(|f| (f.layer.index(), f.ids[0].0)).collect();
        by_layer.sort();
        assert_eq!(by_layer, vec![(0, 2), (1, 1)], "{:?}", c.precisions());
        // the paths before a step follow the same record, layer by layer
        assert_eq!(c.path(tok[0]).unwrap(), vec![ExpertId(2), ExpertId(1)]);
    }
}
