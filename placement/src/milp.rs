//! A thin layer over good_lp + HiGHS: build a model with good_lp, solve it with
//! a time limit, a relative gap and an optional warm start, and read back the
//! incumbent together with HiGHS's proven dual bound (which good_lp's own
//! `solve` does not expose).
//!
//! Variables are numbered in creation order; [`Milp::start`] values use that order.

use crate::error::{PlaceError, Result};
use good_lp::{Constraint, Expression, ProblemVariables, SolverModel, Variable, VariableDefinition};
use highs::{HighsModelStatus, HighsSolutionStatus};

/// Limits and logging of one MILP solve.
#[derive(Clone, Debug, PartialEq)]
pub struct MilpLimits {
    /// Seconds before HiGHS stops and returns its incumbent.
    pub time_limit: f64,
    /// Relative gap at which HiGHS stops.
    pub rel_gap: f64,
    /// Print HiGHS's own branch-and-bound log to stdout.
    pub solver_log: bool,
}

/// How a solve ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MilpStatus {
    /// Proven optimal (within HiGHS's default tolerances).
    Optimal,
    /// Stopped at the requested relative gap.
    GapLimit,
    /// Stopped at the time (or another) limit with a feasible incumbent.
    TimeLimit,
}

impl MilpStatus {
    /// The name used in plans and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MilpStatus::Optimal => "optimal",
            MilpStatus::GapLimit => "gap_limit",
            MilpStatus::TimeLimit => "time_limit",
        }
    }
}

/// The incumbent of a solve.
#[derive(Clone, Debug)]
pub struct MilpSolution {
    values: Vec<f64>,
    /// Objective of the incumbent (constant terms excluded).
    pub objective: f64,
    /// Proven lower bound on the objective.
    pub bound: f64,
    /// How the solve ended.
    pub status: MilpStatus,
}

impl MilpSolution {
    /// Value of a variable in the incumbent.
    pub fn value(&self, v: Var) -> f64 {
        self.values[v.idx]
    }

    /// Whether a binary variable is set in the incumbent.
    pub fn is_set(&self, v: Var) -> bool {
        self.value(v) > 0.5
    }
}

/// A model variable: the good_lp handle `v` (for expressions) and its column.
#[derive(Clone, Copy, Debug)]
pub struct Var {
    /// The good_lp variable, for building expressions.
    pub v: Variable,
    idx: usize,
}

/// A minimisation MILP under construction.
#[derive(Default)]
pub struct Milp {
    vars: ProblemVariables,
    constraints: Vec<Constraint>,
    start: Vec<f64>,
}

impl Milp {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a binary variable with a warm-start value.
    pub fn binary(&mut self, start: bool) -> Var {
        self.add(good_lp::variable().binary(), if start { 1.0 } else { 0.0 })
    }

    /// Adds a continuous variable `>= 0` with a warm-start value.
    pub fn nonneg(&mut self, start: f64) -> Var {
        self.add(good_lp::variable().min(0.0), start)
    }

    fn add(&mut self, def: VariableDefinition, start: f64) -> Var {
        self.start.push(start);
        Var { v: self.vars.add(def), idx: self.start.len() - 1 }
    }

    /// Changes the warm-start value of a variable.
    pub fn set_start(&mut self, v: Var, value: f64) {
        self.start[v.idx] = value;
    }

    /// Adds a constraint.
    pub fn constrain(&mut self, c: Constraint) {
        self.constraints.push(c);
    }

    /// Variables so far.
    pub fn num_vars(&self) -> usize {
        self.start.len()
    }

    /// Minimises `objective` under the constraints, starting from the warm-start values
    /// (HiGHS ignores them when they are infeasible).
    pub fn minimise(self, objective: Expression, limits: &MilpLimits) -> Result<MilpSolution> {
        let mut problem = self.vars.minimise(objective).using(good_lp::highs);
        for c in self.constraints {
            problem.add_constraint(c);
        }
        let mut model = problem.try_into_inner().map_err(|e| PlaceError::Solver(e.to_string()))?;
        model.set_option("time_limit", limits.time_limit.max(0.01));
        model.set_option("mip_rel_gap", limits.rel_gap.max(0.0));
        model.set_option("output_flag", limits.solver_log);
        model.set_option("log_to_console", limits.solver_log);
        model.set_option("random_seed", 0);
        model.set_option("mip_abs_gap", 1e-9);
        if !self.start.is_empty() {
            model
                .try_set_solution(Some(&self.start), None, None, None)
                .map_err(|e| PlaceError::Solver(format!("warm start: {e:?}")))?;
        }
        let solved = model.try_solve().map_err(|e| PlaceError::Solver(format!("{e:?}")))?;
        let status = match solved.status() {
            HighsModelStatus::Optimal => MilpStatus::Optimal,
            HighsModelStatus::ObjectiveBound | HighsModelStatus::ObjectiveTarget => MilpStatus::GapLimit,
            HighsModelStatus::ReachedTimeLimit
            | HighsModelStatus::ReachedSolutionLimit
            | HighsModelStatus::ReachedIterationLimit
            | HighsModelStatus::ReachedInterrupt
            | HighsModelStatus::ReachedMemoryLimit => MilpStatus::TimeLimit,
            other => return Err(PlaceError::Solver(format!("HiGHS ended with {other:?}"))),
        };
        if solved.primal_solution_status() != HighsSolutionStatus::Feasible {
            return Err(PlaceError::Solver("no feasible solution found within the limits".into()));
        }
        let objective = solved.objective_value();
        let values = solved.get_solution().columns().to_vec();
        let dual = solved.double_info_value(c"mip_dual_bound").unwrap_or(f64::NEG_INFINITY);
        let bound = if dual.is_finite() { dual.min(objective) } else { 0.0 };
        let gap = rel_gap(objective, bound);
        let status = match status {
            MilpStatus::Optimal if gap > 1e-6 => MilpStatus::GapLimit,
            s => s,
        };
        Ok(MilpSolution { values, objective, bound, status })
    }
}

/// `(objective - bound) / objective`, 0 when both are (near) zero.
pub fn rel_gap(objective: f64, bound: f64) -> f64 {
    if objective.abs() < 1e-9 {
        0.0
    } else {
        ((objective - bound) / objective.abs()).max(0.0)
    }
}
