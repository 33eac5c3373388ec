//! The MILPs' optima equal brute force on tiny instances.

use moe_place::cluster::Cluster;
use moe_place::cost::{self, Single};
use moe_place::joint::{self, JointWeights};
use moe_place::milp::MilpLimits;
use moe_place::stage1::{self, SizeRange};
use moe_place::stage2::{self, Budget, Stage2Input};
use moe_place::stats::Stats;
use moe_place::synth::{generate, SynthSpec};
use moe_place::traces::Routing;

fn stats(layers: usize, experts: usize, top_k: usize, seed: u64) -> Stats {
    let spec = SynthSpec {
        layers,
        experts,
        top_k,
        tokens: 300,
        skew: 0.8,
        topics: 5,
        affinity: 0.6,
        structure_seed: seed,
        sample_seed: seed + 100,
    };
    let routing = Routing {
        model: String::new(),
        moe_layers: (0..layers as u16).collect(),
        num_experts: experts,
        top_k,
        experts: generate(&spec),
    };
    Stats::from_routing(&routing)
}

fn limits() -> MilpLimits {
    MilpLimits { time_limit: 30.0, rel_gap: 0.0, solver_log: false }
}

/// Calls `f` with every vector in `0..base` of length `len`.
fn each_assignment(len: usize, base: usize, mut f: impl FnMut(&[usize])) {
    let mut v = vec![0; len];
    loop {
        f(&v);
        let mut i = 0;
        while i < len {
            v[i] += 1;
            if v[i] < base {
                break;
            }
            v[i] = 0;
            i += 1;
        }
        if i == len {
            return;
        }
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    let mut all = Vec::new();
    each_assignment(n, n, |v| {
        let mut s = v.to_vec();
        s.sort_unstable();
        s.dedup();
        if s.len() == n {
            all.push(v.to_vec());
        }
    });
    all
}

fn two_nodes(gpus_per_node: usize) -> Cluster {
    Cluster::from_toml(&format!(
        "nodes = 2\ngpus_per_node = {gpus_per_node}\nintra_node_gbps = 400.0\ninter_node_gbps = 40.0\n\
         [expert_memory]\nexperts = 100\n"
    ))
    .unwrap()
}

#[test]
fn stage1_matches_brute_force() {
    for seed in 1..4 {
        let s = stats(1, 7, 2, seed);
        let load = &s.load[0];
        let sizes = SizeRange::balanced(7, 3, 1);
        let mut best = f64::INFINITY;
        each_assignment(7, 3, |a| {
            let groups: Vec<Vec<usize>> = (0..3).map(|g| (0..7).filter(|&e| a[e] == g).collect()).collect();
            if groups.iter().all(|g| (sizes.lo..=sizes.hi).contains(&g.len())) {
                best = best.min(stage1::partition_deviation(load, &groups));
            }
        });
        let p = stage1::solve_layer(load, 3, sizes, &limits()).unwrap();
        assert!((p.objective - best).abs() < 1e-6, "seed {seed}: milp {} brute {best}", p.objective);
        assert!((p.bound - best).abs() < 1e-6 * best.max(1.0), "bound {} brute {best}", p.bound);
    }
}

fn brute_stage2(s: &Stats, cluster: &Cluster, mean_weight: f64) -> f64 {
    let g = cluster.num_gpus();
    let perms = permutations(g);
    let mut best = f64::INFINITY;
    // layer 0 fixed to the identity loses nothing only with uniform links: enumerate all
    each_assignment(s.layers, perms.len(), |choice| {
        let single: Single = choice.iter().map(|&c| perms[c].clone()).collect();
        let layers = cost::to_layers(&single);
        let c: f64 = (0..s.layers - 1)
            .map(|l| cost::transition_cost(&cost::pair_traffic(s, &layers, l, g), cluster, mean_weight))
            .sum();
        best = best.min(c);
    });
    best
}

fn singleton_groups(layers: usize, experts: usize) -> Vec<Vec<Vec<usize>>> {
    vec![(0..experts).map(|e| vec![e]).collect(); layers]
}

#[test]
fn stage2_uniform_matches_brute_force() {
    let cluster = Cluster::single_node(3, 100);
    for seed in 1..3 {
        let s = stats(3, 3, 1, seed);
        let groups = singleton_groups(3, 3);
        let inp = Stage2Input { stats: &s, groups: &groups, cluster: &cluster, mean_weight: 0.1 };
        let out = stage2::solve(&inp, &Budget::new(30.0, 0.0, false), 1).unwrap();
        let best = brute_stage2(&s, &cluster, 0.1);
        assert!((out.objective - best).abs() < 1e-6 * best.max(1.0), "milp {} brute {best}", out.objective);
        assert!((out.bound - best).abs() < 1e-6 * best.max(1.0), "bound {} brute {best}", out.bound);
    }
}

#[test]
fn stage2_two_nodes_bound_is_valid_and_tight_here() {
    let cluster = two_nodes(2);
    let s = stats(3, 4, 2, 7);
    let groups = singleton_groups(3, 4);
    let inp = Stage2Input { stats: &s, groups: &groups, cluster: &cluster, mean_weight: 0.1 };
    let out = stage2::solve(&inp, &Budget::new(30.0, 0.0, false), 2).unwrap();
    let best = brute_stage2(&s, &cluster, 0.1);
    assert!(out.bound <= best + 1e-6 && out.objective >= best - 1e-6, "{out:?} brute {best}");
    assert!(
        (out.objective - best).abs() < 1e-6 * best,
        "decomposition missed the optimum: {} vs {best}",
        out.objective
    );
}

#[test]
fn joint_matches_brute_force() {
    let w = JointWeights { load_weight: 1.0, mean_weight: 0.1 };
    for cluster in [Cluster::single_node(2, 4), two_nodes(1)] {
        let s = stats(2, 4, 2, 3);
        let sizes = SizeRange::balanced(4, 2, 0);
        let mut best = f64::INFINITY;
        each_assignment(8, 2, |a| {
            let single: Single = vec![a[..4].to_vec(), a[4..].to_vec()];
            if single.iter().all(|l| l.iter().filter(|&&g| g == 0).count() == 2) {
                best = best.min(joint::joint_cost(&s, &cluster, &single, w));
            }
        });
        let start: Single = vec![vec![0, 0, 1, 1]; 2];
        let out = joint::solve(&s, &cluster, (sizes, w), &start, &limits()).unwrap();
        assert_eq!(out.status, "optimal");
        assert!((out.objective - best).abs() < 1e-6 * best, "milp {} brute {best}", out.objective);
        assert!((out.bound - best).abs() < 1e-5 * best, "bound {} brute {best}", out.bound);
    }
}
