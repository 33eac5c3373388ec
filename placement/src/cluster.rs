//! The cluster description (TOML): GPUs, nodes, link bandwidths and expert memory.
//!
//! ```toml
//! nodes = 2
//! gpus_per_node = 4
//! intra_node_gbps = 300.0   # GB/s between two GPUs of one node
//! inter_node_gbps = 50.0    # GB/s between GPUs on different nodes
//! [expert_memory]           # per GPU, all layers together; one of:
//! experts = 40              #   a count of expert copies, or
//! # bytes = 80_000_000_000  #   a byte budget, with
//! # expert_bytes = 352_321_536   # the size of one expert
//! ```

use crate::error::{PlaceError, Result};
use serde::Deserialize;

/// Expert memory of one GPU, as a count or as bytes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertMemory {
    /// Expert copies a GPU can hold (all layers together).
    #[serde(default)]
    pub experts: Option<usize>,
    /// Bytes a GPU has for experts.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Bytes of one expert (needed with `bytes`; used for the bytes-per-GPU report).
    #[serde(default)]
    pub expert_bytes: Option<u64>,
}

/// A cluster of `nodes * gpus_per_node` GPUs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Nodes.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus_per_node: usize,
    /// GB/s between two GPUs of one node.
    pub intra_node_gbps: f64,
    /// GB/s between GPUs on different nodes.
    pub inter_node_gbps: f64,
    /// Expert memory per GPU.
    pub expert_memory: ExpertMemory,
}

impl Cluster {
    /// Parses and checks a cluster description.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Cluster = toml::from_str(text).map_err(|e| PlaceError::Cluster(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// A single node of `gpus` GPUs with room for `experts` expert copies each.
    pub fn single_node(gpus: usize, experts: usize) -> Self {
        Cluster {
            nodes: 1,
            gpus_per_node: gpus,
            intra_node_gbps: 300.0,
            inter_node_gbps: 50.0,
            expert_memory: ExpertMemory { experts: Some(experts), bytes: None, expert_bytes: None },
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(PlaceError::Cluster(m.into()));
        if self.nodes == 0 || self.gpus_per_node == 0 {
            return bad("nodes and gpus_per_node must be at least 1");
        }
        if self.num_gpus() > u16::MAX as usize {
            return bad("too many GPUs");
        }
        if self.intra_node_gbps.is_nan() || self.intra_node_gbps <= 0.0 || self.inter_node_gbps.is_nan() {
            return bad("bandwidths must be positive");
        }
        if self.inter_node_gbps <= 0.0 {
            return bad("bandwidths must be positive");
        }
        let m = &self.expert_memory;
        match (m.experts, m.bytes, m.expert_bytes) {
            (Some(_), None, _) => Ok(()),
            (None, Some(_), Some(eb)) if eb > 0 => Ok(()),
            (None, Some(_), _) => bad("expert_memory.bytes needs expert_memory.expert_bytes (> 0)"),
            _ => bad("expert_memory needs exactly one of `experts` or `bytes`"),
        }
    }

    /// GPUs in the cluster.
    pub fn num_gpus(&self) -> usize {
        self.nodes * self.gpus_per_node
    }

    /// Node of GPU `g`.
    pub fn node_of(&self, g: usize) -> usize {
        g / self.gpus_per_node
    }

    /// GB/s between GPUs `a` and `b` (infinite on the same GPU).
    pub fn bandwidth(&self, a: usize, b: usize) -> f64 {
        if a == b {
            f64::INFINITY
        } else if self.node_of(a) == self.node_of(b) {
            self.intra_node_gbps
        } else {
            self.inter_node_gbps
        }
    }

    /// Whether every pair of distinct GPUs has the same bandwidth.
    pub fn is_uniform(&self) -> bool {
        self.nodes == 1 || self.gpus_per_node == 1 || self.intra_node_gbps == self.inter_node_gbps
    }

    /// Expert copies one GPU can hold.
    pub fn max_experts_per_gpu(&self) -> usize {
        let m = &self.expert_memory;
        match (m.experts, m.bytes, m.expert_bytes) {
            (Some(n), _, _) => n,
            (None, Some(b), Some(eb)) if eb > 0 => (b / eb) as usize,
            _ => 0,
        }
    }

    /// Bytes of one expert, when known.
    pub fn expert_bytes(&self) -> Option<u64> {
        self.expert_memory.expert_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_bytes() {
        let c = Cluster::from_toml(
            "nodes = 2\ngpus_per_node = 2\nintra_node_gbps = 300.0\ninter_node_gbps = 50.0\n\
             [expert_memory]\nbytes = 1000\nexpert_bytes = 100\n",
        )
        .unwrap();
        assert_eq!((c.num_gpus(), c.max_experts_per_gpu()), (4, 10));
        assert_eq!((c.bandwidth(0, 1), c.bandwidth(1, 2)), (300.0, 50.0));
        assert!(!c.is_uniform());
        let e = Cluster::from_toml(
            "nodes = 1\ngpus_per_node = 2\nintra_node_gbps = 1.0\ninter_node_gbps = 1.0\n[expert_memory]\nbytes = 1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("expert_bytes"), "{e}");
    }
}
