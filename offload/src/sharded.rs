//! Experts spread over N in-process shards by a placement plan (the CPU form
//! of multi-GPU expert placement): each expert lives in the store of the
//! shard(s) the plan names, the forward pass reaches it through that shard,
//! and the tokens that cross between shards from one MoE layer to the next
//! are counted with the cost model `moe-place eval` uses on a trace
//! (`moe_types::placement::{spread_load, spread_transition}`, one
//! definition for both).
//!
//! Outputs are identical to a single store by construction: the forward pass
//! combines expert outputs in expert order whichever shard computed them. A
//! replicated expert is computed by its first replica; its tokens are
//! accounted evenly across the replicas, as the planner's cost model assumes.

use crate::{metric_names as m, OffloadError};
use moe_model::{ExpertPlanner, ExpertProvider, ExpertWeights, ModelConfig, ModelError, ResidentExperts, StepToken};
use moe_types::placement::{spread_load, spread_transition, PlacementPlan};
use moe_types::{ExpertId, LayerId, LayerRouting};
use std::sync::Mutex;

/// Cross-shard traffic and per-shard load measured so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardStats {
    /// Per transition (MoE layer `l` to `l + 1`): token transitions between
    /// experts on different shards (fractional with replicas).
    pub cross: Vec<f64>,
    /// Per transition: all token transitions.
    pub transitions: Vec<f64>,
    /// Per MoE layer, per shard: tokens routed to its experts.
    pub load: Vec<Vec<f64>>,
}

struct Traffic {
    /// The previous MoE layer's routing in this step: (MoE index, ids).
    prev: Option<(usize, Vec<ExpertId>)>,
    stats: ShardStats,
}

/// Experts split over shards as a plan says.
pub struct ShardedExperts {
    /// `[shard][decoder layer][expert]`: the weights a shard holds.
    shards: Vec<Vec<Vec<Option<ExpertWeights>>>>,
    /// `[MoE index][expert]`: shards holding it (first computes).
    owners: Vec<Vec<Vec<u16>>>,
    moe_of: Vec<Option<usize>>,
    top_k: usize,
    traffic: Mutex<Traffic>,
}

impl ShardedExperts {
    /// Distributes `experts` over the plan's shards; the plan must fit the
    /// model (`PlacementPlan::validate`) and name the model's MoE layers.
    pub fn new(cfg: &ModelConfig, experts: ResidentExperts, plan: &PlacementPlan) -> Result<Self, OffloadError> {
        let moe_layers: Vec<usize> = cfg.moe_layers().collect();
        plan.validate(moe_layers.len(), cfg.moe.num_experts)?;
        if plan.moe_layers.iter().map(|&l| l as usize).ne(moe_layers.iter().copied()) {
            return Err(OffloadError::PlanLayers { plan: plan.moe_layers.clone(), model: moe_layers });
        }
        let n = plan.num_gpus;
        let weights = experts.into_weights();
        let mut shards: Vec<Vec<Vec<Option<ExpertWeights>>>> =
            (0..n).map(|_| weights.iter().map(|l| vec![None; l.len()]).collect()).collect();
        let mut moe_of = vec![None; cfg.num_layers()];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(i);
            for (e, w) in weights[l].iter().enumerate() {
                for &g in &plan.layers[i][e] {
                    shards[g as usize][l][e] = Some(w.clone());
                }
            }
        }
        let stats = ShardStats {
            cross: vec![0.0; moe_layers.len().saturating_sub(1)],
            transitions: vec![0.0; moe_layers.len().saturating_sub(1)],
            load: vec![vec![0.0; n]; moe_layers.len()],
        };
        Ok(Self {
            shards,
            owners: plan.layers.clone(),
            moe_of,
            top_k: cfg.moe.top_k,
            traffic: Mutex::new(Traffic { prev: None, stats }),
        })
    }

    /// Bytes of expert weights held over all shards.
    pub fn nbytes(&self) -> usize {
        self.shards.iter().flatten().flatten().flatten().map(ExpertWeights::nbytes).sum()
    }

    /// Shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// What was measured so far.
    pub fn stats(&self) -> ShardStats {
        self.traffic.lock().unwrap_or_else(|p| p.into_inner()).stats.clone()
    }

    fn record(&self, moe: usize, ids: &[ExpertId]) {
        let k = self.top_k;
        let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        let owners = &self.owners;
        for f in ids {
            spread_load(&owners[moe][f.index()], 1.0, &mut t.stats.load[moe]);
        }
        if let Some((p, prev)) = t.prev.take().filter(|(p, prev)| *p + 1 == moe && prev.len() == ids.len()) {
            let (mut cross, mut all) = (0.0, 0.0);
            for (a, b) in prev.chunks_exact(k).zip(ids.chunks_exact(k)) {
                for e in a {
                    for f in b {
                        all += 1.0;
                        spread_transition(&owners[p][e.index()], &owners[moe][f.index()], 1.0, |i, j, share| {
                            if i != j {
                                cross += share;
                            }
                        });
                    }
                }
            }
            t.stats.cross[p] += cross;
            t.stats.transitions[p] += all;
            metrics::gauge!(m::SHARD_CROSS_TOKENS, "from_layer" => p.to_string()).set(t.stats.cross[p]);
        }
        for (g, v) in t.stats.load[moe].iter().enumerate() {
            metrics::gauge!(m::SHARD_TOKENS, "layer" => moe.to_string(), "shard" => g.to_string()).set(*v);
        }
        t.prev = Some((moe, ids.to_vec()));
    }
}

impl ExpertPlanner for ShardedExperts {
    fn begin_step(&self, _tokens: &[StepToken]) {
        self.traffic.lock().unwrap_or_else(|p| p.into_inner()).prev = None;
    }
}

impl ExpertProvider for ShardedExperts {
    type Guard<'a> = &'a ExpertWeights;

    fn prepare(&self, routing: &LayerRouting, _used: &[ExpertId]) -> moe_model::Result<()> {
        if let Some(moe) = self.moe_of.get(routing.layer.index()).copied().flatten() {
            self.record(moe, &routing.ids);
        }
        Ok(())
    }

    fn get(&self, layer: LayerId, expert: ExpertId) -> moe_model::Result<&ExpertWeights> {
        let unavailable = |message: &str| ModelError::ExpertUnavailable {
            layer: layer.index(),
            expert: expert.index(),
            message: message.into(),
        };
        let moe = self.moe_of.get(layer.index()).copied().flatten().ok_or_else(|| unavailable("not an MoE layer"))?;
        let shard = *self.owners[moe]
            .get(expert.index())
            .and_then(|r| r.first())
            .ok_or_else(|| unavailable("no such expert"))?;
        self.shards[shard as usize][layer.index()][expert.index()]
            .as_ref()
            .ok_or_else(|| unavailable("not on its shard"))
    }
}
