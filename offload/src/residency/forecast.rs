//! How forecasts become prefetches and values: the predictor's output is
//! recorded per layer (for precision and recall), turned into per-expert
//! demand and queued prefetches, and read back by the predictive policy.

use super::core::ResidencyCore;
use crate::predictor::{score, NO_EXPERT};
use moe_types::LayerRouting;

impl ResidencyCore {
    /// Records the predictor's new forecasts: per token and distance (for
    /// accuracy), and, where forecasts from this far ahead have been right
    /// often enough for the layer, demand per expert and prefetches of
    /// predicted experts not resident, most demanded first.
    pub(super) fn apply_forecasts(&mut self) {
        let mut out = std::mem::take(&mut self.scratch);
        for f in out.drain(..) {
            let j = f.layer.index();
            if j >= self.layers || (!self.between_steps && j == self.cur_layer) {
                continue; // the running layer's routing is already known
            }
            let d = self.distance(j).clamp(1, self.by_distance[j].len());
            self.by_distance[j][d - 1].latest = Some(f.ids.clone());
            if !self.trusted(j, d) {
                continue;
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

    /// Whether forecasts of `layer` made `d` MoE layers ahead are prefetched.
    fn trusted(&self, layer: usize, d: usize) -> bool {
        self.min_precision <= 0.0 || self.precision_at(layer, d) >= self.min_precision
    }

    /// The precision of `layer`'s forecasts made `d` MoE layers ahead (1 =
    /// from the layer before), with a prior of 3 right in 4.
    pub fn precision_at(&self, layer: usize, d: usize) -> f64 {
        let s = &self.by_distance[layer][d.clamp(1, self.by_distance[layer].len()) - 1];
        (s.right as f64 + 3.0) / (s.predicted as f64 + 4.0)
    }

    /// Precision / recall of the latest forecast of `layer` against its
    /// routing, and of its latest forecast from each distance.
    pub(super) fn score_forecast(&mut self, layer: usize, routing: &LayerRouting) {
        let k = self.top_k;
        for s in self.by_distance[layer].iter_mut() {
            let Some(f) = s.latest.take() else { continue };
            let (predicted, right) = score(&f, &routing.ids, k);
            s.predicted += predicted;
            s.right += right;
        }
        let s = &mut self.stats[layer];
        s.actual += routing.ids.len() as u64;
        if let Some(f) = self.forecasts[layer].take() {
            let (predicted, right) = score(&f, &routing.ids, k);
            s.predicted += predicted;
            s.predicted_right += right;
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

#[cfg(test)]
mod tests {
    use super::super::core::{ResidencyConfig, ResidencyCore};
    use crate::{PolicyKind, PredictorKind};
    use moe_model::StepToken;
    use moe_types::{ExpertId, LayerId, LayerRouting, MoeLayerId, SeqId};

    #[test]
    fn a_layer_prefetches_only_as_far_ahead_as_its_forecasts_are_right() {
        let (layers, experts) = (4u16, 8usize);
        let mut core = ResidencyCore::new(ResidencyConfig {
            layers: layers.into(),
            experts,
            top_k: 2,
            slots: experts,
            expert_bytes: 1,
            policy: PolicyKind::Lru,
            predictor: PredictorKind::LookAhead,
            depth: 2,
            min_precision: 0.5,
        })
        .unwrap();
        let pair = |a: u16, b: u16| vec![ExpertId(a), ExpertId(b)];
        // no mover runs: nothing loads, so queued prefetches stay visible
        for step in 0..4 {
            core.begin_step(&[StepToken { seq: SeqId(0), token: 7 }]);
            for l in 0..layers {
                let routing = LayerRouting { layer: LayerId(l), top_k: 2, ids: pair(0, 1), weights: vec![0.5; 2] };
                core.prepare(MoeLayerId(l), &routing, &pair(0, 1)).unwrap();
                if l + 1 < layers {
                    // one layer ahead: always right
                    core.gating(MoeLayerId(l), MoeLayerId(l + 1), &pair(0, 1));
                }
                if l + 2 < layers {
                    // two layers ahead: always wrong
                    core.gating(MoeLayerId(l), MoeLayerId(l + 2), &pair(5, 6));
                    let target = usize::from(l + 2) * experts + 5;
                    // trusted by the prior (3 in 4) until two wrong forecasts
                    // bring the measured precision below one half
                    assert_eq!(core.prefetch_q.contains(&target), step < 2, "step {step}, layer {}", l + 2);
                }
            }
        }
        assert!(core.precision_at(3, 2) < 0.5, "{}", core.precision_at(3, 2));
        assert!(core.precision_at(3, 1) > 0.9, "{}", core.precision_at(3, 1));
    }
}
