//! `moe-place`: the offline MoETuner placement planner.
//!
//! Reads routing traces (the project's format, `moe_types::trace`, or a plain
//! JSON Lines format, see [`traces`]) and a cluster description ([`cluster`]),
//! counts per-expert load and inter-layer transitions ([`stats`]), and decides
//! which GPU holds each expert of each MoE layer: MoETuner's two ILP stages
//! ([`stage1`], [`stage2`]) solved with good_lp + HiGHS ([`milp`]), a joint ILP for
//! small instances ([`joint`]), an affinity local search for large ones
//! ([`local_search`]) and traffic-blind baselines ([`baselines`]). Plans are written
//! in the shared format `moe_types::placement` and scored on any trace by
//! [`eval`] (table and SVG heatmap). [`synth`] generates synthetic traces with skew
//! and inter-layer affinity.
//!
//! Owns the planning policy only: nothing in the server depends on this crate;
//! plans travel as files.

pub mod baselines;
pub mod cluster;
pub mod cost;
pub mod error;
pub mod eval;
pub mod heatmap;
pub mod joint;
pub mod layer_milp;
pub mod local_search;
pub mod milp;
pub mod planner;
pub mod stage1;
pub mod stage2;
pub mod stats;
pub mod synth;
pub mod traces;
pub mod validate;

pub use error::{PlaceError, Result};
