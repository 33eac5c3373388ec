//! Every method's plan passes the one validator; the same input gives the same plan.

use moe_place::cluster::Cluster;
use moe_place::planner::{self, Method, SolveOptions};
use moe_place::stats::Stats;
use moe_place::synth::{generate, SynthSpec};
use moe_place::traces::Routing;
use moe_place::validate;
use moe_types::placement::PlacementPlan;

fn stats_of(layers: usize, experts: usize) -> Stats {
    let spec = SynthSpec {
        layers,
        experts,
        top_k: 2,
        tokens: 500,
        skew: 0.8,
        topics: 6,
        affinity: 0.5,
        structure_seed: 11,
        sample_seed: 12,
    };
    let r = Routing {
        model: String::new(),
        moe_layers: (0..layers as u16).collect(),
        num_experts: experts,
        top_k: 2,
        experts: generate(&spec),
    };
    Stats::from_routing(&r)
}

fn stats() -> Stats {
    stats_of(4, 8)
}

fn cluster() -> Cluster {
    Cluster::from_toml(
        "nodes = 2\ngpus_per_node = 2\nintra_node_gbps = 450.0\ninter_node_gbps = 50.0\n\
         [expert_memory]\nbytes = 1000\nexpert_bytes = 100\n",
    )
    .unwrap()
}

fn options(method: Method) -> SolveOptions {
    SolveOptions {
        method,
        replicas: 0,
        time_limit: 2.0,
        rel_gap: 0.0,
        size_slack: 0,
        mean_weight: 0.1,
        load_weight: 1.0,
        passes: 2,
        local_search: false,
        load_slack: 0.0,
        solver_log: false,
    }
}

fn plan_for(s: &Stats, c: &Cluster, opts: &SolveOptions) -> PlacementPlan {
    let solved = planner::solve(s, c, opts).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
    let mut plan = PlacementPlan::new((0..s.layers as u16).collect(), s.experts, c.num_gpus(), c.gpus_per_node);
    plan.layers = solved.layers;
    plan
}

#[test]
fn every_method_passes_the_validator() {
    let (s, c) = (stats(), cluster());
    let mut variants: Vec<SolveOptions> =
        [Method::Contiguous, Method::RoundRobin, Method::Greedy, Method::Moetuner, Method::Joint]
            .into_iter()
            .map(options)
            .collect();
    variants.push(SolveOptions { replicas: 2, ..options(Method::Greedy) });
    variants.push(SolveOptions { local_search: true, ..options(Method::Moetuner) });
    variants.push(SolveOptions { size_slack: 1, ..options(Method::Moetuner) });
    for opts in &variants {
        let plan = plan_for(&s, &c, opts);
        validate::check(&plan, &c, 4, 8).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
        if opts.replicas > 0 {
            assert_eq!(plan.experts_per_gpu().iter().sum::<usize>(), 4 * (8 + 2));
        }
    }
    // the validator does catch a memory overflow
    let mut tight = c.clone();
    tight.expert_memory.bytes = Some(700);
    let plan = plan_for(&s, &c, &options(Method::Greedy));
    assert!(validate::check(&plan, &tight, 4, 8).unwrap_err().to_string().contains("more than its memory allows"));
}

#[test]
fn same_input_same_plan() {
    let (s, c) = (stats(), cluster());
    for method in [Method::Greedy, Method::Moetuner] {
        let opts = options(method);
        let a = plan_for(&s, &c, &opts);
        let b = plan_for(&s, &c, &opts);
        assert_eq!(a.layers, b.layers, "{method:?}");
    }
    // the joint MILP is deterministic when it finishes by optimality, not by the clock
    let small = stats_of(2, 4);
    let two = Cluster::single_node(2, 4);
    let joint = SolveOptions { time_limit: 30.0, ..options(Method::Joint) };
    let solved = planner::solve(&small, &two, &joint).unwrap();
    assert_eq!(solved.summary.status, "optimal");
    assert_eq!(solved.layers, planner::solve(&small, &two, &joint).unwrap().layers);
    let ls = SolveOptions { local_search: true, ..options(Method::Greedy) };
    assert_eq!(plan_for(&s, &c, &ls).layers, plan_for(&s, &c, &ls).layers);
}

#[test]
fn local_search_keeps_memory_and_load_caps_and_never_adds_crossings() {
    let (s, c) = (stats(), cluster());
    let before = planner::solve(&s, &c, &options(Method::Greedy)).unwrap().layers;
    let after = planner::solve(&s, &c, &SolveOptions { local_search: true, ..options(Method::Greedy) }).unwrap().layers;
    let g = c.num_gpus();
    let single = |layers: &moe_place::cost::Layers| -> Vec<Vec<usize>> {
        layers.iter().map(|l| l.iter().map(|r| r[0] as usize).collect()).collect()
    };
    let (b, a) = (single(&before), single(&after));
    assert!(
        moe_place::local_search::weighted_crossings(&s, &c, &a)
            <= moe_place::local_search::weighted_crossings(&s, &c, &b)
    );
    for l in 0..s.layers {
        let mean = s.layer_total(l) / g as f64;
        let (lb, la) = (moe_place::cost::gpu_load(&s, &before, l, g), moe_place::cost::gpu_load(&s, &after, l, g));
        for q in 0..g {
            assert!(la[q] <= lb[q].max(mean) + 1e-9, "layer {l} GPU {q}: {} > max({}, {mean})", la[q], lb[q]);
            let count = |p: &Vec<Vec<usize>>| p[l].iter().filter(|&&x| x == q).count();
            assert_eq!(count(&a), count(&b));
        }
    }
}
