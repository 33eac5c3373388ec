//! The one error type of the planner library.

/// Why planning, evaluation or a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A trace file is malformed.
    #[error("trace {path}: {message}")]
    Trace {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The cluster description is malformed or inconsistent.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A plan does not fit the model or the cluster.
    #[error(transparent)]
    Plan(#[from] moe_types::PlanError),
    /// The options or inputs do not make a solvable problem.
    #[error("{0}")]
    Input(String),
    /// The MILP solver failed or found no feasible solution.
    #[error("solver: {0}")]
    Solver(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, PlaceError>;
