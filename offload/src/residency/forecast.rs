//! How forecasts become prefetches and values: the predictor's output is
//! recorded per layer (for precision and recall), turned into per-expert
//! demand and queued prefetches, and read back by the predictive policy.

use super::core::ResidencyCore;
use crate::predictor::NO_EXPERT;
use moe_types::LayerRouting;

impl ResidencyCore {
    /// Records the predictor's new forecasts: per token (for accuracy),
    /// demand per expert, and prefetches of predicted experts not resident,
    /// most demanded first.
    pub(super) fn apply_forecasts(&mut self) {
        let mut out = std::mem::take(&mut self.scratch);
        for f in out.drain(..) {
            let j = f.layer.index();
            if j >= self.layers || (!self.between_steps && j == self.cur_layer) {
                continue; // the running layer's routing is already known
            }
            let ne = self.experts;
            let mut counts = vec![0u32; ne];
            f.ids.iter().filter(|&&id| id != NO_EXPERT && id.index() < ne).for_each(|id| counts[id.index()] += 1);
            self.drop_prefetches_of(j);
            let mut order: Vec<usize> = (0..ne).filter(|&e| counts[e] > 0).collect();
            order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
            for (e, &c) in counts.iter().enumerate() {
                self.entries[j * ne + e].demand = c as f32;
            }
            for e in order {
                self.queue_prefetch(j * ne + e);
            }
            self.forecasts[j] = Some(f.ids);
        }
        self.scratch = out;
    }

    /// Precision / recall of the latest forecast of `layer` against its routing.
    pub(super) fn score_forecast(&mut self, layer: usize, routing: &LayerRouting) {
        let k = self.top_k;
        let s = &mut self.stats[layer];
        s.actual += routing.ids.len() as u64;
        if let Some(f) = self.forecasts[layer].take() {
            if f.len() == routing.ids.len() {
                for (pred, actual) in f.chunks_exact(k).zip(routing.ids.chunks_exact(k)) {
                    for p in pred.iter().filter(|&&p| p != NO_EXPERT) {
                        s.predicted += 1;
                        s.predicted_right += u64::from(actual.contains(p));
                    }
                }
            }
        }
    }

    /// MoE layers from the running one to `layer`, going forward (1 = next).
    pub(super) fn distance(&self, layer: usize) -> usize {
        if self.between_steps {
            layer + 1
        } else {
            (layer + self.layers - self.cur_layer) % self.layers
        }
    }

    /// The predictive policy's value of expert `idx`: the chance it is used
    /// at its layer's next run over the distance to that run, in layers.
    pub(super) fn value(&self, idx: usize) -> f64 {
        let layer = idx / self.experts;
        let e = &self.entries[idx];
        let base = (e.steps_used as f64 + 1.0) / (self.layer_steps[layer] as f64 + 2.0);
        let chance = if self.forecasts[layer].is_some() {
            if e.demand > 0.0 {
                // the predictor's precision at this layer so far (prior 3/4)
                let s = &self.stats[layer];
                (s.predicted_right as f64 + 3.0) / (s.predicted as f64 + 4.0)
            } else {
                0.25 * base // forecast, not predicted
            }
        } else if e.unused_prefetch {
            0.5 * base // predicted last time, not used: error correction
        } else {
            base
        };
        let d = match self.distance(layer) {
            0 => self.layers,
            d => d,
        };
        chance / d as f64
    }
}
