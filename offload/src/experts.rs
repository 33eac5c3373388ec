//! One expert-provider type for the engine: every expert resident, or an
//! expert cache.

use crate::cache::{CacheGuard, ExpertCache};
use crate::{CacheStats, ShardedExperts};
use moe_model::{ExpertPlanner, ExpertProvider, ExpertWeights, ResidentExperts, StepToken};
use moe_types::{ExpertId, ExpertSet, LayerId, LayerRouting, SeqId};
use std::ops::Deref;

/// The experts an engine computes with.
pub enum Experts {
    /// All in memory (no budget given).
    Resident(ResidentExperts),
    /// A budgeted fast tier over a slow tier.
    Cached(ExpertCache),
    /// Spread over shards by a placement plan.
    Sharded(ShardedExperts),
}

impl Experts {
    /// The cache's counters, if there is a cache.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        match self {
            Self::Resident(_) | Self::Sharded(_) => None,
            Self::Cached(c) => Some(c.stats()),
        }
    }

    /// Bytes of expert weights in memory now.
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Self::Resident(r) => r.nbytes() as u64,
            Self::Cached(c) => c.resident_bytes(),
            Self::Sharded(s) => s.nbytes() as u64,
        }
    }

    /// The most expert bytes the fast tier may hold (`None`: every expert
    /// is resident).
    pub fn budget_bytes(&self) -> Option<u64> {
        match self {
            Self::Resident(_) | Self::Sharded(_) => None,
            Self::Cached(c) => Some(c.budget_bytes()),
        }
    }
}

/// The guard of either variant.
pub enum ExpertsGuard<'a> {
    /// A borrowed resident (or sharded) expert.
    Resident(&'a ExpertWeights),
    /// A pinned cached expert.
    Cached(CacheGuard<'a>),
}

impl Deref for ExpertsGuard<'_> {
    type Target = ExpertWeights;
    fn deref(&self) -> &ExpertWeights {
        match self {
            Self::Resident(w) => w,
            Self::Cached(g) => g,
        }
    }
}

impl ExpertPlanner for Experts {
    fn begin_step(&self, tokens: &[StepToken]) {
        match self {
            Self::Resident(_) => {}
            Self::Cached(c) => c.begin_step(tokens),
            Self::Sharded(s) => s.begin_step(tokens),
        }
    }

    fn end_sequence(&self, seq: SeqId) {
        if let Self::Cached(c) = self {
            c.end_sequence(seq);
        }
    }

    fn predict_paths(&self, tokens: &[StepToken]) -> Vec<Option<Vec<ExpertSet>>> {
        match self {
            Self::Resident(_) | Self::Sharded(_) => vec![None; tokens.len()],
            Self::Cached(c) => c.predict_paths(tokens),
        }
    }

    fn resident_sets(&self) -> Vec<ExpertSet> {
        match self {
            Self::Resident(_) | Self::Sharded(_) => Vec::new(),
            Self::Cached(c) => c.resident_sets(),
        }
    }
}

impl ExpertProvider for Experts {
    type Guard<'a> = ExpertsGuard<'a>;

    fn lookahead(&self) -> usize {
        match self {
            Self::Resident(_) | Self::Sharded(_) => 0,
            Self::Cached(c) => c.lookahead(),
        }
    }

    fn forecast(&self, from: LayerId, layer: LayerId, ids: &[ExpertId]) {
        if let Self::Cached(c) = self {
            c.forecast(from, layer, ids);
        }
    }

    fn wants_hidden(&self) -> bool {
        matches!(self, Self::Cached(c) if c.wants_hidden())
    }

    fn hidden(&self, layer: LayerId, h: &[f32]) {
        if let Self::Cached(c) = self {
            c.hidden(layer, h);
        }
    }

    fn prepare(&self, routing: &LayerRouting, used: &[ExpertId]) -> moe_model::Result<()> {
        match self {
            Self::Resident(r) => r.prepare(routing, used),
            Self::Cached(c) => c.prepare(routing, used),
            Self::Sharded(s) => s.prepare(routing, used),
        }
    }

    fn get(&self, layer: LayerId, expert: ExpertId) -> moe_model::Result<ExpertsGuard<'_>> {
        Ok(match self {
            Self::Resident(r) => ExpertsGuard::Resident(r.get(layer, expert)?),
            Self::Cached(c) => ExpertsGuard::Cached(c.get(layer, expert)?),
            Self::Sharded(s) => ExpertsGuard::Resident(s.get(layer, expert)?),
        })
    }
}
