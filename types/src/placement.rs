//! The placement-plan file format, version 1: what the offline planner
//! (`moe-place`) writes and what the server reads with `--placement FILE` to
//! decide which GPU (or CPU shard) holds which expert of which MoE layer.
//!
//! A plan is one JSON object (UTF-8), a [`PlacementPlan`]:
//! ```json
//! {"format":"moe-placement-plan","version":1,"model":"tiny-shakespeare-moe",
//!  "moe_layers":[0,1,2,3],"num_experts":8,"num_gpus":2,"gpus_per_node":2,
//!  "method":"moetuner","layers":[[[0],[1],[0],[1],[0,1],[1],[0],[1]], ...],
//!  "solve":{"objective":12.5,"bound":12.5,"gap":0.0,"seconds":0.4,"status":"optimal"}}
//! ```
//! - `moe_layers`: the model's MoE layer indices (as in the routing trace header);
//!   `layers[i]` belongs to `moe_layers[i]`.
//! - `layers[i][e]`: the GPUs (0-based, `< num_gpus`) holding expert `e` of that
//!   layer. One GPU normally; several when the expert is replicated, in which case
//!   its tokens are split evenly across the replicas. GPU `g` sits on node
//!   `g / gpus_per_node`.
//! - `method`: how the plan was made (free text, e.g. `greedy`, `moetuner`).
//! - `solve`: optional solver figures (objective, proven lower bound, relative gap,
//!   seconds, status); informative only.
//!
//! Readers must reject a different `format` and any `version` they do not know;
//! later versions may add fields (readers ignore unknown fields) but never change
//! the meaning of these. [`PlacementPlan::validate`] checks a plan against the
//! model it is meant for: every expert of every layer placed, GPU ids in range,
//! no GPU listed twice for one expert ([`PlacementPlan::validate_for_model`] also
//! matches the MoE layer ids); [`PlacementPlan::check_memory`] checks a per-GPU
//! expert budget.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The `format` value of every plan.
pub const PLAN_FORMAT: &str = "moe-placement-plan";
/// The version this crate writes and reads.
pub const PLAN_VERSION: u32 = 1;

/// Solver figures recorded with a plan (informative).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SolveSummary {
    /// Objective value of the plan, in the method's own units.
    pub objective: f64,
    /// Proven lower bound on that objective (0 when none is known).
    pub bound: f64,
    /// Relative gap `(objective - bound) / objective`, 0 when proven optimal.
    pub gap: f64,
    /// Wall-clock seconds spent solving.
    pub seconds: f64,
    /// `optimal`, `gap_limit`, `time_limit` or `heuristic`.
    pub status: String,
}

/// A placement plan: which GPUs hold each expert of each MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementPlan {
    /// Always [`PLAN_FORMAT`].
    pub format: String,
    /// [`PLAN_VERSION`] when written by this crate.
    pub version: u32,
    /// Model the traces came from (free text; may be empty).
    pub model: String,
    /// The model's MoE layer indices, in order; `layers` follows this order.
    pub moe_layers: Vec<u16>,
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// GPUs (or shards) in the cluster.
    pub num_gpus: usize,
    /// GPUs per node; GPU `g` is on node `g / gpus_per_node`.
    pub gpus_per_node: usize,
    /// How the plan was made.
    pub method: String,
    /// `layers[i][e]`: GPUs holding expert `e` of MoE layer `moe_layers[i]`.
    pub layers: Vec<Vec<Vec<u16>>>,
    /// Solver figures, when a solver made the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solve: Option<SolveSummary>,
}

/// Why a plan could not be read or does not fit.
#[derive(Debug)]
pub enum PlanError {
    /// Reading or writing failed.
    Io(std::io::Error),
    /// The file is not a plan of a known version.
    Format(String),
    /// The plan does not fit the model or cluster it is checked against.
    Invalid(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Io(e) => write!(f, "placement plan: {e}"),
            PlanError::Format(m) => write!(f, "placement plan: {m}"),
            PlanError::Invalid(m) => write!(f, "placement plan does not fit: {m}"),
        }
    }
}

impl std::error::Error for PlanError {}

impl PlacementPlan {
    /// A version-1 plan with the given shape and layers.
    pub fn new(moe_layers: Vec<u16>, num_experts: usize, num_gpus: usize, gpus_per_node: usize) -> Self {
        let layers = vec![vec![Vec::new(); num_experts]; moe_layers.len()];
        Self {
            format: PLAN_FORMAT.into(),
            version: PLAN_VERSION,
            model: String::new(),
            moe_layers,
            num_experts,
            num_gpus,
            gpus_per_node,
            method: String::new(),
            layers,
            solve: None,
        }
    }

    /// Reads and checks the format and version (not the shape: see [`Self::validate`]).
    pub fn read(r: impl Read) -> Result<Self, PlanError> {
        let plan: PlacementPlan = serde_json::from_reader(r).map_err(|e| PlanError::Format(e.to_string()))?;
        if plan.format != PLAN_FORMAT {
            return Err(PlanError::Format(format!("format {:?} is not {PLAN_FORMAT:?}", plan.format)));
        }
        if plan.version != PLAN_VERSION {
            return Err(PlanError::Format(format!(
                "version {} is not supported (this reader knows {PLAN_VERSION})",
                plan.version
            )));
        }
        Ok(plan)
    }

    /// Writes the plan as pretty JSON with a final newline.
    pub fn write(&self, w: &mut (impl Write + ?Sized)) -> Result<(), PlanError> {
        serde_json::to_writer_pretty(&mut *w, self).map_err(|e| PlanError::Io(e.into()))?;
        w.write_all(b"\n").map_err(PlanError::Io)
    }

    /// Checks the plan against a model with `num_moe_layers` MoE layers of
    /// `num_experts` experts: every expert placed on at least one GPU, GPU ids
    /// below `num_gpus`, no GPU twice for one expert, a sane node size.
    pub fn validate(&self, num_moe_layers: usize, num_experts: usize) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Invalid(m));
        if self.layers.len() != num_moe_layers || self.moe_layers.len() != num_moe_layers {
            return bad(format!(
                "{} layers ({} MoE layer ids) but the model has {num_moe_layers} MoE layers",
                self.layers.len(),
                self.moe_layers.len()
            ));
        }
        if self.num_experts != num_experts {
            return bad(format!("{} experts per layer but the model has {num_experts}", self.num_experts));
        }
        if self.num_gpus == 0 || self.gpus_per_node == 0 || !self.num_gpus.is_multiple_of(self.gpus_per_node) {
            return bad(format!("{} GPUs do not split into nodes of {}", self.num_gpus, self.gpus_per_node));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.len() != num_experts {
                return bad(format!("MoE layer {i} lists {} experts, expected {num_experts}", layer.len()));
            }
            for (e, gpus) in layer.iter().enumerate() {
                if gpus.is_empty() {
                    return bad(format!("expert {e} of MoE layer {i} is on no GPU"));
                }
                if let Some(g) = gpus.iter().find(|&&g| g as usize >= self.num_gpus) {
                    return bad(format!("expert {e} of MoE layer {i} is on GPU {g} (only {})", self.num_gpus));
                }
                let mut seen = gpus.clone();
                seen.sort_unstable();
                if seen.windows(2).any(|w| w[0] == w[1]) {
                    return bad(format!("expert {e} of MoE layer {i} lists a GPU twice: {gpus:?}"));
                }
            }
        }
        Ok(())
    }

    /// [`Self::validate`], and also that the plan's MoE layer ids are exactly
    /// `moe_layers` (the model's, in order).
    pub fn validate_for_model(&self, moe_layers: &[u16], num_experts: usize) -> Result<(), PlanError> {
        self.validate(moe_layers.len(), num_experts)?;
        if self.moe_layers != moe_layers {
            return Err(PlanError::Invalid(format!(
                "plan is for MoE layers {:?}, the model's are {moe_layers:?}",
                self.moe_layers
            )));
        }
        Ok(())
    }

    /// Expert copies (replicas included, all layers) held by each GPU.
    pub fn experts_per_gpu(&self) -> Vec<usize> {
        let mut n = vec![0; self.num_gpus];
        for g in self.layers.iter().flatten().flatten() {
            if let Some(c) = n.get_mut(*g as usize) {
                *c += 1;
            }
        }
        n
    }

    /// Checks that no GPU holds more than `max_experts_per_gpu` expert copies.
    pub fn check_memory(&self, max_experts_per_gpu: usize) -> Result<(), PlanError> {
        for (g, &n) in self.experts_per_gpu().iter().enumerate() {
            if n > max_experts_per_gpu {
                return Err(PlanError::Invalid(format!(
                    "GPU {g} holds {n} experts, more than its memory allows ({max_experts_per_gpu})"
                )));
            }
        }
        Ok(())
    }
}

/// The cross-GPU cost model shared by the planner (`moe-place`: solving and
/// `eval`) and the serving side's sharded experts (`moe-offload`): an expert
/// with `r` replicas takes `1/r` of its tokens on each replica's GPU.
pub fn spread_load(replicas: &[u16], tokens: f64, load: &mut [f64]) {
    let share = tokens / replicas.len() as f64;
    for &g in replicas {
        load[g as usize] += share;
    }
}

/// The same model for a token moving from an expert at one MoE layer (on
/// the GPUs `from`) to an expert at the next (on `to`): every directed pair
/// `(i, j)` of replicas carries `tokens / (|from| * |to|)`, passed to `add`;
/// pairs with `i == j` stay on their GPU.
pub fn spread_transition(from: &[u16], to: &[u16], tokens: f64, mut add: impl FnMut(usize, usize, f64)) {
    let share = tokens / (from.len() * to.len()) as f64;
    for &i in from {
        for &j in to {
            add(i as usize, j as usize, share);
        }
    }
}

#[cfg(test)]
mod tests {

    /// Found by the `placement_plan` fuzz target: a solver figure written
    /// with many digits (`"bound": 999...9.0`) was parsed to a neighbouring
    /// f64, so the plan read back from what was written differed. JSON is now
    /// parsed with correctly rounded floats (serde_json `float_roundtrip`).
    #[test]
    fn long_decimal_solver_figures_round_trip() {
        let mut p = PlacementPlan::new(vec![0], 2, 1, 1);
        p.layers[0] = vec![vec![0], vec![0]];
        let mut text = Vec::new();
        p.write(&mut text).unwrap();
        let nines = "9".repeat(64);
        let text = String::from_utf8(text).unwrap().replacen(
            "\"layers\"",
            &format!("\"solve\": {{\"objective\": 1.5, \"bound\": {nines}.0, \"gap\": 0.3, \"seconds\": 0.1, \"status\": \"time_limit\"}}, \"layers\""),
            1,
        );
        let plan = PlacementPlan::read(text.as_bytes()).unwrap();
        let mut out = Vec::new();
        plan.write(&mut out).unwrap();
        assert_eq!(PlacementPlan::read(&out[..]).unwrap(), plan);
    }

    use super::*;

    fn plan() -> PlacementPlan {
        let mut p = PlacementPlan::new(vec![1, 3], 2, 2, 2);
        p.layers = vec![vec![vec![0], vec![1]], vec![vec![1], vec![0, 1]]];
        p
    }

    #[test]
    fn round_trips_and_validates() {
        let p = plan();
        let mut buf = Vec::new();
        p.write(&mut buf).unwrap();
        let q = PlacementPlan::read(&buf[..]).unwrap();
        assert_eq!(p, q);
        q.validate(2, 2).unwrap();
        assert_eq!(q.experts_per_gpu(), vec![2, 3]);
        q.check_memory(3).unwrap();
        assert!(q.check_memory(2).unwrap_err().to_string().contains("GPU 1 holds 3 experts"));

        let text = String::from_utf8(buf).unwrap();
        let e = PlacementPlan::read(text.replace("\"version\": 1", "\"version\": 7").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("version 7 is not supported"), "{e}");
    }

    #[test]
    fn rejects_plans_that_do_not_fit() {
        let p = plan();
        assert!(p.validate(3, 2).unwrap_err().to_string().contains("model has 3 MoE layers"));
        assert!(p.validate(2, 4).unwrap_err().to_string().contains("model has 4"));
        p.validate_for_model(&[1, 3], 2).unwrap();
        assert!(p.validate_for_model(&[0, 1], 2).unwrap_err().to_string().contains("the model's are [0, 1]"));
        let mut q = p.clone();
        q.layers[0][1].clear();
        assert!(q.validate(2, 2).unwrap_err().to_string().contains("expert 1 of MoE layer 0 is on no GPU"));
        let mut q = p.clone();
        q.layers[1][0] = vec![5];
        assert!(q.validate(2, 2).unwrap_err().to_string().contains("on GPU 5"));
        let mut q = p;
        q.layers[1][1] = vec![1, 1];
        assert!(q.validate(2, 2).unwrap_err().to_string().contains("twice"));
    }
}
