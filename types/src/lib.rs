//! Small shared vocabulary of the project: identifier newtypes and the routing
//! record produced by the forward pass.
//!
//! Owns: `LayerId`, `MoeLayerId`, `ExpertId`, `BlockId`, `SeqId`, `TokenId`,
//! [`StepRouting`], and the versioned routing-trace file format ([`trace`]),
//! shared by the engine that writes traces and the offline tools that read
//! them, and the versioned placement-plan format ([`placement`]) written by
//! `moe-place` and read by the server, and the expert-slot table ([`slots`])
//! that the residency core and the GPU slot pool share. Depends on nothing of ours; no clocks.

use serde::{Deserialize, Serialize};

mod expert_set;
pub mod hidden_trace;
pub mod placement;
pub mod rng;
pub mod slots;
pub mod testing;
pub mod trace;

pub use expert_set::ExpertSet;
pub use slots::{ExpertKey, SlotError, SlotId, SlotTable};

pub use placement::{PlacementPlan, PlanError, PLAN_FORMAT, PLAN_VERSION};

/// A vocabulary entry.
pub type TokenId = u32;

/// For a setting type parsed at the edge (it implements `FromStr`):
/// `TryFrom<String>` through `FromStr`, so `#[serde(try_from = "String")]`
/// reads it from TOML with the same rule and message as a flag; with
/// `named`, also `Display` as its flag value (the type's `fn name(self)`).
#[macro_export]
macro_rules! setting_from_str {
    ($t:ty) => {
        impl ::std::convert::TryFrom<String> for $t {
            type Error = <$t as ::std::str::FromStr>::Err;
            fn try_from(s: String) -> ::std::result::Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
    (named $t:ty) => {
        $crate::setting_from_str!($t);
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw index, for indexing dense arrays.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_newtype!(
    /// A decoder layer index (0-based, in checkpoint order).
    LayerId(u16)
);
id_newtype!(
    /// An MoE layer's index among the model's MoE layers (0 = the first MoE
    /// layer), as opposed to its decoder-layer index ([`LayerId`]): a model
    /// with dense first layers has `LayerId(3)` as `MoeLayerId(0)`.
    MoeLayerId(u16)
);
id_newtype!(
    /// A logical expert of one layer, as numbered by the checkpoint's router.
    ExpertId(u16)
);
id_newtype!(
    /// A physical block of the paged KV cache.
    BlockId(u32)
);
id_newtype!(
    /// A sequence known to the engine.
    SeqId(u64)
);

/// Routing decisions of one MoE layer for every token of a step, in the
/// step's token order: token `t` chose `ids[t*k..(t+1)*k]` with weights
/// `weights[t*k..(t+1)*k]`, strongest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRouting {
    /// The decoder layer.
    pub layer: LayerId,
    /// Experts per token.
    pub top_k: usize,
    /// Chosen experts, `tokens * top_k`.
    pub ids: Vec<ExpertId>,
    /// Weight applied to each chosen expert's output, `tokens * top_k`.
    pub weights: Vec<f32>,
}

impl LayerRouting {
    /// Number of tokens recorded.
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// The experts chosen by token `t`, strongest first.
    pub fn experts_of(&self, t: usize) -> &[ExpertId] {
        &self.ids[t * self.top_k..(t + 1) * self.top_k]
    }

    /// The weights of the experts chosen by token `t`.
    pub fn weights_of(&self, t: usize) -> &[f32] {
        &self.weights[t * self.top_k..(t + 1) * self.top_k]
    }
}

/// Routing of a whole forward step: one entry per MoE layer, in layer order
/// (dense layers have no entry).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRouting {
    /// Per MoE layer routing.
    pub layers: Vec<LayerRouting>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_routing_slices_per_token() {
        let r = LayerRouting {
            layer: LayerId(3),
            top_k: 2,
            ids: vec![ExpertId(1), ExpertId(0), ExpertId(5), ExpertId(2)],
            weights: vec![0.7, 0.3, 0.6, 0.4],
        };
        assert_eq!(r.tokens(), 2);
        assert_eq!(r.experts_of(1), &[ExpertId(5), ExpertId(2)]);
        assert_eq!(r.weights_of(0), &[0.7, 0.3]);
    }
}
