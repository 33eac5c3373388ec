//! The one validator every plan must pass before it is written or scored: the
//! shared format's shape check (every expert of every layer placed, GPU ids in
//! range, no GPU twice per expert), the cluster's GPU count and node size, and
//! the per-GPU expert memory.

use crate::cluster::Cluster;
use crate::error::{PlaceError, Result};
use moe_types::placement::PlacementPlan;

/// Checks `plan` against a model of `layers` MoE layers of `experts` experts and `cluster`.
pub fn check(plan: &PlacementPlan, cluster: &Cluster, layers: usize, experts: usize) -> Result<()> {
    plan.validate(layers, experts)?;
    if plan.num_gpus != cluster.num_gpus() || plan.gpus_per_node != cluster.gpus_per_node {
        return Err(PlaceError::Input(format!(
            "plan is for {} GPUs in nodes of {}, cluster has {} in nodes of {}",
            plan.num_gpus,
            plan.gpus_per_node,
            cluster.num_gpus(),
            cluster.gpus_per_node
        )));
    }
    plan.check_memory(cluster.max_experts_per_gpu())?;
    Ok(())
}
