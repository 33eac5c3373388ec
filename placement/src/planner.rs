//! From statistics to a plan: runs the chosen method and records what it proved.

use crate::baselines;
use crate::cluster::Cluster;
use crate::cost::{self, Layers, Single};
use crate::error::{PlaceError, Result};
use crate::joint::{self, JointWeights};
use crate::layer_milp;
use crate::local_search;
use crate::milp::rel_gap;
use crate::stage1::{self, SizeRange};
use crate::stage2::{self, Budget, Stage2Input};
use crate::stats::Stats;
use moe_types::placement::SolveSummary;
use std::time::Instant;

/// Placement methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Expert `e` of `E` on GPU `e * G / E`.
    Contiguous,
    /// Expert `e` on GPU `e mod G`.
    RoundRobin,
    /// EPLB-style greedy balanced packing (with `--replicas`).
    Greedy,
    /// MoETuner: stage 1 (balanced groups) then stage 2 (group-to-GPU, traffic).
    Moetuner,
    /// One MILP over load and traffic (small instances).
    Joint,
}

impl Method {
    /// Name written into plans.
    pub fn name(self) -> &'static str {
        match self {
            Method::Contiguous => "contiguous",
            Method::RoundRobin => "round-robin",
            Method::Greedy => "greedy",
            Method::Moetuner => "moetuner",
            Method::Joint => "joint",
        }
    }
}

/// Options of one solve.
#[derive(Clone, Debug, PartialEq)]
pub struct SolveOptions {
    /// The method.
    pub method: Method,
    /// Redundant expert copies per layer (greedy only).
    pub replicas: usize,
    /// Seconds for the whole solve.
    pub time_limit: f64,
    /// Relative gap at which each MILP stops.
    pub rel_gap: f64,
    /// Stage-1 group sizes may differ from `E/G` by this much.
    pub size_slack: usize,
    /// Weight of the mean-pair term next to the worst pair.
    pub mean_weight: f64,
    /// Weight of the load term in the joint objective.
    pub load_weight: f64,
    /// Stage-2 refinement passes (non-uniform clusters or unequal groups).
    pub passes: usize,
    /// Run the affinity local search on the result.
    pub local_search: bool,
    /// The local search may raise a layer's largest GPU load by this fraction of the
    /// layer mean above where it started (0: never raise it).
    pub load_slack: f64,
    /// Print HiGHS's log.
    pub solver_log: bool,
}

/// A solved placement with its figures.
pub struct Solved {
    /// `layers[l][e]`: GPUs of each expert.
    pub layers: Layers,
    /// Objective, bound, gap, seconds, status.
    pub summary: SolveSummary,
    /// Human-readable lines describing the solve.
    pub report: Vec<String>,
}

/// Runs `opts.method` on the statistics.
pub fn solve(stats: &Stats, cluster: &Cluster, opts: &SolveOptions) -> Result<Solved> {
    let t0 = Instant::now();
    let g = cluster.num_gpus();
    let (layers, experts) = (stats.layers, stats.experts);
    if opts.replicas > 0 && opts.method != Method::Greedy {
        return Err(PlaceError::Input("--replicas is supported by the greedy method only".into()));
    }
    if matches!(opts.method, Method::Moetuner | Method::Joint) && experts < g {
        return Err(PlaceError::Input(format!(
            "{experts} experts cannot form {g} non-empty groups; use greedy with replicas"
        )));
    }
    let mut report = Vec::new();
    let heuristic =
        |obj: f64| SolveSummary { objective: obj, bound: 0.0, gap: 0.0, seconds: 0.0, status: "heuristic".into() };
    let (mut single, mut summary): (Option<Single>, SolveSummary) = match opts.method {
        Method::Contiguous => (Some(baselines::contiguous(layers, experts, g)), heuristic(0.0)),
        Method::RoundRobin => (Some(baselines::round_robin(layers, experts, g)), heuristic(0.0)),
        Method::Greedy if opts.replicas > 0 => {
            let layers = baselines::greedy(stats, g, opts.replicas)?;
            return finish(layers, heuristic(0.0), report, t0);
        }
        Method::Greedy => {
            let l = baselines::greedy(stats, g, 0)?;
            (Some(l.iter().map(|r| r.iter().map(|x| x[0] as usize).collect()).collect()), heuristic(0.0))
        }
        Method::Moetuner => {
            let (s, sum) = moetuner(stats, cluster, opts, &mut report)?;
            (Some(s), sum)
        }
        Method::Joint => {
            let sizes = SizeRange::balanced(experts, g, opts.size_slack);
            let (start, _) = moetuner(
                stats,
                cluster,
                &SolveOptions { time_limit: opts.time_limit * 0.2, ..opts.clone() },
                &mut report,
            )?;
            let w = JointWeights { load_weight: opts.load_weight, mean_weight: opts.mean_weight };
            let left = (opts.time_limit - t0.elapsed().as_secs_f64()).max(1.0);
            let limits =
                crate::milp::MilpLimits { time_limit: left, rel_gap: opts.rel_gap, solver_log: opts.solver_log };
            let out = joint::solve(stats, cluster, (sizes, w), &start, &limits)?;
            report.push(format!(
                "joint MILP: objective {:.4}, bound {:.4}, gap {:.2}%, {}",
                out.objective,
                out.bound,
                100.0 * rel_gap(out.objective, out.bound),
                out.status
            ));
            let s = SolveSummary {
                objective: out.objective,
                bound: out.bound,
                gap: rel_gap(out.objective, out.bound),
                seconds: 0.0,
                status: out.status.into(),
            };
            (Some(out.gpu), s)
        }
    };
    if opts.local_search {
        let gpu = single.as_mut().expect("one GPU per expert");
        let lay = cost::to_layers(gpu);
        // each GPU may rise to the larger of its own starting load and the layer mean
        // (plus the slack): GPUs are never pushed up to the layer's hottest one, so the
        // load spread, and with it the max/mean on new traffic, stays as it was
        let cap: Vec<Vec<f64>> = (0..layers)
            .map(|l| {
                let mean = stats.layer_total(l) / g as f64;
                cost::gpu_load(stats, &lay, l, g).into_iter().map(|x| x.max(mean * (1.0 + opts.load_slack))).collect()
            })
            .collect();
        // swaps first (fast), then per-layer MILPs on the time left, then swaps again
        for round in 0..2 {
            let out = local_search::improve(stats, cluster, gpu, &cap, 100);
            report.push(format!(
                "swap search: weighted crossing transitions {:.0} -> {:.0} ({} swaps; GPU load cap max(start, mean x {}))",
                out.before,
                out.after,
                out.swaps,
                1.0 + opts.load_slack
            ));
            eprintln!("  {}", report.last().expect("just pushed"));
            if round == 0 {
                let left = (opts.time_limit - t0.elapsed().as_secs_f64()).max(1.0);
                let (b, a) = layer_milp::sweep(stats, cluster, gpu, &cap, (left, opts.solver_log))?;
                report.push(format!("layer MILP sweeps: weighted crossing transitions {b:.0} -> {a:.0}"));
            }
        }
        summary.status = format!("{}+local-search", summary.status);
    }
    finish(cost::to_layers(&single.expect("set above")), summary, report, t0)
}

fn finish(layers: Layers, mut summary: SolveSummary, report: Vec<String>, t0: Instant) -> Result<Solved> {
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(Solved { layers, summary, report })
}

/// MoETuner's two stages; returns the placement and a summary of stage 2 (the
/// traffic objective; stage 1 figures go to the report).
fn moetuner(
    stats: &Stats,
    cluster: &Cluster,
    opts: &SolveOptions,
    report: &mut Vec<String>,
) -> Result<(Single, SolveSummary)> {
    let g = cluster.num_gpus();
    let sizes = SizeRange::balanced(stats.experts, g, opts.size_slack);
    let budget = Budget::new(opts.time_limit, opts.rel_gap, opts.solver_log);
    let t1 = Instant::now();
    let mut groups = Vec::with_capacity(stats.layers);
    let (mut dev, mut dev_bound, mut optimal) = (0.0, 0.0, 0);
    for l in 0..stats.layers {
        let p = stage1::solve_layer(&stats.load[l], g, sizes, &budget.next(stats.layers - l, STAGE1_SHARE))?;
        eprintln!(
            "  stage 1: layer {}/{}: deviation {:.1} bound {:.1} ({})",
            l + 1,
            stats.layers,
            p.objective,
            p.bound,
            p.status
        );
        dev += p.objective;
        dev_bound += p.bound;
        optimal += usize::from(p.status == "optimal");
        groups.push(p.groups);
    }
    report.push(format!(
        "stage 1: sum of |group load - mean| {dev:.1}, bound {dev_bound:.1} ({optimal}/{} layers proven optimal), {:.2} s",
        stats.layers,
        t1.elapsed().as_secs_f64()
    ));
    let t2 = Instant::now();
    let inp = Stage2Input { stats, groups: &groups, cluster, mean_weight: opts.mean_weight };
    let out = stage2::solve(&inp, &budget, opts.passes)?;
    let gap = rel_gap(out.objective, out.bound);
    report.push(format!(
        "stage 2: sum over transitions of (worst pair + {} x mean pair) tokens/(GB/s) {:.4}, bound {:.4}, gap {:.2}%, {:.2} s",
        opts.mean_weight,
        out.objective,
        out.bound,
        100.0 * gap,
        t2.elapsed().as_secs_f64()
    ));
    let mut single = vec![vec![0; stats.experts]; stats.layers];
    for (l, layer) in groups.iter().enumerate() {
        for (b, members) in layer.iter().enumerate() {
            for &e in members {
                single[l][e] = out.gpu[l][b];
            }
        }
    }
    let status = if gap <= 1e-6 {
        "optimal"
    } else if gap <= opts.rel_gap + 1e-9 {
        "gap_limit"
    } else if out.all_optimal {
        "decomposed"
    } else {
        "time_limit"
    };
    Ok((single, SolveSummary { objective: out.objective, bound: out.bound, gap, seconds: 0.0, status: status.into() }))
}

/// Share of the time limit stage 1 may use: its greedy start is already within a
/// hair of balance on large layers, so most of the time goes to traffic.
const STAGE1_SHARE: f64 = 0.1;
