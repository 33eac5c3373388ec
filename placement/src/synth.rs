//! Synthetic routing traces with realistic skew and inter-layer affinity.
//!
//! Model: each layer has an expert popularity `exp(skew * N(0,1))` (log-normal,
//! a fresh draw per layer, so hot experts differ across layers). Tokens belong to
//! one of `topics` latent topics (topic frequency log-normal with sigma 1). Every
//! (topic, layer) has a preferred set of `2 * top_k` experts drawn by popularity.
//! A token keeps its topic through all layers; each of its `top_k` distinct picks
//! comes with probability `affinity` from its topic's preferred set at that layer
//! and otherwise from the layer's popularity. A shared topic across layers is what
//! makes experts of consecutive layers co-occur (inter-layer affinity); popularity
//! plus topic frequency give the load skew.
//!
//! `structure_seed` fixes popularities, topics and preferred sets (the "model");
//! `sample_seed` fixes which tokens are drawn, so a held-out trace of the same model
//! uses the same structure seed and another sample seed. Output is the project's
//! trace format with uniform weights `1 / top_k`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Generator parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// MoE layers.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Tokens to draw.
    pub tokens: usize,
    /// Sigma of the log-normal expert popularity.
    pub skew: f64,
    /// Latent topics.
    pub topics: usize,
    /// Probability that a pick comes from the topic's preferred experts.
    pub affinity: f64,
    /// Seed of the structure.
    pub structure_seed: u64,
    /// Seed of the token draw.
    pub sample_seed: u64,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

struct Cdf(Vec<f64>);

impl Cdf {
    fn new(weights: &[f64]) -> Self {
        let mut acc = 0.0;
        Cdf(weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect())
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> usize {
        let x = rng.random::<f64>() * self.0.last().copied().unwrap_or(0.0);
        self.0.partition_point(|&c| c <= x).min(self.0.len() - 1)
    }
}

/// Draws the trace: `experts[(t * layers + l) * top_k + i]`, as in [`crate::traces::Routing`].
pub fn generate(spec: &SynthSpec) -> Vec<u16> {
    let mut srng = ChaCha8Rng::seed_from_u64(spec.structure_seed);
    let popularity: Vec<Cdf> = (0..spec.layers)
        .map(|_| Cdf::new(&(0..spec.experts).map(|_| (spec.skew * normal(&mut srng)).exp()).collect::<Vec<_>>()))
        .collect();
    let topic_freq = Cdf::new(&(0..spec.topics).map(|_| normal(&mut srng).exp()).collect::<Vec<_>>());
    let set = (2 * spec.top_k).min(spec.experts);
    let preferred: Vec<Vec<Vec<usize>>> = (0..spec.topics)
        .map(|_| {
            (0..spec.layers)
                .map(|l| {
                    let mut s: Vec<usize> = Vec::with_capacity(set);
                    while s.len() < set {
                        let e = popularity[l].sample(&mut srng);
                        if !s.contains(&e) {
                            s.push(e);
                        }
                    }
                    s
                })
                .collect()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(spec.sample_seed);
    let k = spec.top_k.min(spec.experts);
    let mut out = Vec::with_capacity(spec.tokens * spec.layers * k);
    let mut picked: Vec<usize> = Vec::with_capacity(k);
    for _ in 0..spec.tokens {
        let topic = topic_freq.sample(&mut rng);
        for l in 0..spec.layers {
            picked.clear();
            while picked.len() < k {
                let e = if rng.random::<f64>() < spec.affinity {
                    let s = &preferred[topic][l];
                    s[rng.random_range(0..s.len())]
                } else {
                    popularity[l].sample(&mut rng)
                };
                if !picked.contains(&e) {
                    picked.push(e);
                }
            }
            out.extend(picked.iter().map(|&e| e as u16));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seeds_same_trace_and_distinct_experts() {
        let spec = SynthSpec {
            layers: 3,
            experts: 16,
            top_k: 4,
            tokens: 50,
            skew: 0.6,
            topics: 4,
            affinity: 0.5,
            structure_seed: 1,
            sample_seed: 2,
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_eq!(a.len(), 50 * 3 * 4);
        for pick in a.chunks(4) {
            let mut p = pick.to_vec();
            p.sort_unstable();
            p.dedup();
            assert_eq!(p.len(), 4);
        }
        assert_ne!(a, generate(&SynthSpec { sample_seed: 3, ..spec }));
    }
}
