//! Statistics of a routing trace: token load per expert per layer, `T[l][e]`, and
//! transitions between consecutive MoE layers, `R[l][e][e']` (a token routed to `e`
//! at layer `l` and to `e'` at layer `l + 1`; with top-k routing a token adds one
//! to each of its k x k (e, e') pairs).

use crate::traces::Routing;

/// Load and transition counts of one trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// MoE layers.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// `load[l][e]`: tokens routed to expert `e` at layer `l`.
    pub load: Vec<Vec<f64>>,
    /// `trans[l][e * experts + f]`: tokens routed to `e` at `l` and `f` at `l + 1`
    /// (`layers - 1` entries).
    pub trans: Vec<Vec<f64>>,
}

impl Stats {
    /// Counts the trace.
    pub fn from_routing(r: &Routing) -> Self {
        let (layers, experts) = (r.num_layers(), r.num_experts);
        let mut load = vec![vec![0.0; experts]; layers];
        let mut trans = vec![vec![0.0; experts * experts]; layers.saturating_sub(1)];
        for t in 0..r.num_tokens() {
            for l in 0..layers {
                let here = r.chosen(t, l);
                for &e in here {
                    load[l][e as usize] += 1.0;
                }
                if l + 1 < layers {
                    let m = &mut trans[l];
                    for &f in r.chosen(t, l + 1) {
                        for &e in here {
                            m[e as usize * experts + f as usize] += 1.0;
                        }
                    }
                }
            }
        }
        Stats { layers, experts, load, trans }
    }

    /// Transition count from `e` at layer `l` to `f` at layer `l + 1`.
    pub fn r(&self, l: usize, e: usize, f: usize) -> f64 {
        self.trans[l][e * self.experts + f]
    }

    /// Total load of layer `l`.
    pub fn layer_total(&self, l: usize) -> f64 {
        self.load[l].iter().sum()
    }
}
