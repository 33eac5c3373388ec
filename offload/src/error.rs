//! The error type of the offload crate.

use std::path::PathBuf;

/// What can go wrong configuring or running the expert cache.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// An `--expert-cache` value could not be parsed or does not fit the model.
    #[error("invalid expert cache budget {value:?}: {message}")]
    Budget {
        /// The value given.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A configuration that cannot work (policy without predictor...).
    #[error("invalid expert cache configuration: {0}")]
    Config(String),
    /// An expert could not be read from the slow tier.
    #[error("cannot load expert {expert} of layer {layer} from {path}: {message}")]
    Load {
        /// Layer index.
        layer: usize,
        /// Expert index.
        expert: usize,
        /// The file read.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A path-predictor file is unreadable or does not fit the model.
    #[error("path predictor {path}: {message}")]
    Predictor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A placement plan does not fit the model's shape.
    #[error(transparent)]
    Plan(#[from] moe_types::PlanError),
    /// A placement plan names other MoE layers than the model's.
    #[error("the plan is for MoE layers {plan:?}, the model's are {model:?}")]
    PlanLayers {
        /// The plan's MoE layers (decoder indices).
        plan: Vec<u16>,
        /// The model's.
        model: Vec<usize>,
    },
    /// A model-side error (checkpoint layout, shapes).
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    /// A routing trace could not be read.
    #[error("routing trace: {0}")]
    Trace(String),
}
