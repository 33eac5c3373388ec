//! MoETuner stage 2: given each layer's groups (stage 1), put group `b` of layer
//! `l` on a GPU, one group per GPU, minimising for every layer transition the worst
//! directed GPU-pair traffic divided by that pair's bandwidth (plus `mean_weight`
//! times the mean over pairs), with every GPU holding the same number of experts
//! over all layers (each GPU's running count is capped at the balanced share).
//!
//! Decomposition: layers are placed one at a time by a small MILP in which the
//! neighbouring layers are fixed, so GPU-pair traffic is linear in the unknowns:
//! `traffic(i, j) = sum_b in[i][b] y[b][j]` (from layer `l - 1`) and
//! `sum_b out[b][k] y[b][j]` (to layer `l + 1`). A forward pass places layer
//! `l + 1` given layer `l`; refinement passes re-place each layer given both
//! neighbours. When every link has the same bandwidth and groups are equally
//! large, relabelling GPUs leaves a transition's cost unchanged, so the forward
//! pass is exact: the sum of the per-transition MILP bounds is a valid bound on the
//! whole stage. Otherwise the bound comes from the same transitions priced with
//! every link at the fastest bandwidth and no memory caps (a relaxation).

use crate::cluster::Cluster;
use crate::error::Result;
use crate::milp::{Milp, MilpLimits, MilpStatus, Var};
use crate::stats::Stats;
use good_lp::{constraint, Expression};

/// Inputs of stage 2.
pub struct Stage2Input<'a> {
    /// Trace statistics.
    pub stats: &'a Stats,
    /// `groups[l][b]`: experts of group `b` at layer `l`.
    pub groups: &'a [Vec<Vec<usize>>],
    /// The cluster.
    pub cluster: &'a Cluster,
    /// Weight of the mean-pair term.
    pub mean_weight: f64,
}

/// Stage 2 result: GPU of each group.
#[derive(Clone, Debug)]
pub struct Stage2Output {
    /// `gpu[l][b]`.
    pub gpu: Vec<Vec<usize>>,
    /// Sum over transitions of their cost.
    pub objective: f64,
    /// Proven lower bound of that sum.
    pub bound: f64,
    /// Whether every sub-MILP (forward and bound) proved optimality.
    pub all_optimal: bool,
}

/// Group-level transition matrix `w[a * G + b]` between layers `l` and `l + 1`.
fn group_transitions(inp: &Stage2Input, l: usize) -> Vec<f64> {
    let g = inp.groups[l].len();
    let h = inp.groups[l + 1].len();
    let mut w = vec![0.0; g * h];
    for (a, ga) in inp.groups[l].iter().enumerate() {
        for (b, gb) in inp.groups[l + 1].iter().enumerate() {
            w[a * h + b] =
                ga.iter().flat_map(|&e| gb.iter().map(move |&f| (e, f))).map(|(e, f)| inp.stats.r(l, e, f)).sum();
        }
    }
    w
}

/// Bandwidth model of one sub-problem (real cluster, or every link at the fastest).
#[derive(Clone, Copy)]
struct Links<'a> {
    cluster: &'a Cluster,
    uniform: bool,
}

impl Links<'_> {
    fn bw(&self, i: usize, j: usize) -> f64 {
        if self.uniform {
            self.cluster.intra_node_gbps.max(self.cluster.inter_node_gbps)
        } else {
            self.cluster.bandwidth(i, j)
        }
    }
}

/// One GPU-pair constraint row: the pair and its terms `(group, gpu, coefficient)`.
type PairRow = (usize, usize, Vec<(usize, usize, f64)>);

/// One layer's placement problem with its neighbours fixed.
struct LayerProblem<'a> {
    gpus: usize,
    /// `inflow[i * G + b]`: tokens from GPU `i` (layer `l - 1`) to group `b`.
    inflow: Option<Vec<f64>>,
    /// `outflow[b * G + k]`: tokens from group `b` to GPU `k` (layer `l + 1`).
    outflow: Option<Vec<f64>>,
    sizes: Vec<usize>,
    /// Experts each GPU may still take at this layer (`None`: no cap).
    room: Option<Vec<usize>>,
    links: Links<'a>,
    mean_weight: f64,
}

impl LayerProblem<'_> {
    /// Cost of an assignment `gpu[b]` (same units as the MILP objective).
    fn cost(&self, gpu: &[usize]) -> f64 {
        let g = self.gpus;
        let mut total = 0.0;
        if let Some(inflow) = &self.inflow {
            let mut m = vec![0.0; g * g];
            for (b, &j) in gpu.iter().enumerate() {
                for i in 0..g {
                    m[i * g + j] += inflow[i * g + b];
                }
            }
            total += self.pair_cost(&m);
        }
        if let Some(outflow) = &self.outflow {
            let mut m = vec![0.0; g * g];
            for (b, &j) in gpu.iter().enumerate() {
                for k in 0..g {
                    m[j * g + k] += outflow[b * g + k];
                }
            }
            total += self.pair_cost(&m);
        }
        total
    }

    fn pair_cost(&self, m: &[f64]) -> f64 {
        let g = self.gpus;
        let (mut worst, mut sum) = (0.0f64, 0.0);
        for i in 0..g {
            for j in (0..g).filter(|&j| j != i) {
                let t = m[i * g + j] / self.links.bw(i, j);
                worst = worst.max(t);
                sum += t;
            }
        }
        worst + self.mean_weight * sum / (g * (g - 1)).max(1) as f64
    }

    /// Greedy start: keep the heaviest flows local, respecting the caps.
    fn greedy(&self) -> Vec<usize> {
        let g = self.gpus;
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for b in 0..g {
            for j in 0..g {
                let local = self.inflow.as_ref().map_or(0.0, |m| m[j * g + b])
                    + self.outflow.as_ref().map_or(0.0, |m| m[b * g + j]);
                pairs.push((local, b, j));
            }
        }
        pairs.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let mut gpu = vec![usize::MAX; g];
        let mut taken = vec![false; g];
        // biggest groups first when caps bind, so they find room
        let mut by_size: Vec<usize> = (0..g).collect();
        by_size.sort_by(|&a, &b| self.sizes[b].cmp(&self.sizes[a]).then(a.cmp(&b)));
        for &(_, b, j) in &pairs {
            if gpu[b] == usize::MAX && !taken[j] && self.fits(b, j) {
                gpu[b] = j;
                taken[j] = true;
            }
        }
        for &b in &by_size {
            if gpu[b] == usize::MAX {
                let j = (0..g).find(|&j| !taken[j] && self.fits(b, j)).or_else(|| (0..g).find(|&j| !taken[j]));
                let j = j.expect("as many GPUs as groups");
                gpu[b] = j;
                taken[j] = true;
            }
        }
        gpu
    }

    fn fits(&self, b: usize, j: usize) -> bool {
        self.room.as_ref().is_none_or(|r| self.sizes[b] <= r[j])
    }

    /// Solves the MILP warm-started from `start`; returns the better of the two.
    fn solve(&self, start: &[usize], limits: &MilpLimits) -> Result<(Vec<usize>, f64, f64, bool)> {
        let g = self.gpus;
        let start_cost = self.cost(start);
        let mut m = Milp::new();
        let y: Vec<Vec<Var>> = (0..g).map(|b| (0..g).map(|j| m.binary(start[b] == j)).collect()).collect();
        let mut objective = Expression::from(0.0);
        let mut linear = vec![vec![0.0; g]; g];
        let mut sides: Vec<Vec<PairRow>> = Vec::new();
        if let Some(inflow) = &self.inflow {
            // pair (i, j): sum_b inflow[i][b] y[b][j]
            let rows = (0..g)
                .flat_map(|i| (0..g).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| (i, j, (0..g).map(|b| (b, j, inflow[i * g + b] / self.links.bw(i, j))).collect()))
                .collect();
            sides.push(rows);
        }
        if let Some(outflow) = &self.outflow {
            // pair (j, k): sum_b outflow[b][k] y[b][j]
            let rows = (0..g)
                .flat_map(|j| (0..g).filter(move |&k| k != j).map(move |k| (j, k)))
                .map(|(j, k)| (j, k, (0..g).map(|b| (b, j, outflow[b * g + k] / self.links.bw(j, k))).collect()))
                .collect();
            sides.push(rows);
        }
        let pairs = (g * (g - 1)).max(1) as f64;
        for rows in sides {
            let z = m.nonneg(0.0);
            let mut z_start = 0.0f64;
            for (_, _, terms) in rows {
                z_start = z_start.max(terms.iter().filter(|t| start[t.0] == t.1).map(|t| t.2).sum::<f64>());
                let mut e = Expression::from(0.0);
                for (b, j, c) in terms {
                    if c != 0.0 {
                        e += c * y[b][j].v;
                        linear[b][j] += self.mean_weight * c / pairs;
                    }
                }
                m.constrain(constraint!(z.v >= e));
            }
            m.set_start(z, z_start);
            objective += z.v;
        }
        for b in 0..g {
            let one: Expression = y[b].iter().map(|v| v.v).sum();
            m.constrain(constraint!(one == 1.0));
            for j in 0..g {
                if linear[b][j] != 0.0 {
                    objective += linear[b][j] * y[b][j].v;
                }
            }
        }
        for j in 0..g {
            let one: Expression = (0..g).map(|b| y[b][j].v).sum();
            m.constrain(constraint!(one == 1.0));
            if let Some(room) = &self.room {
                let used: Expression = (0..g).map(|b| self.sizes[b] as f64 * y[b][j].v).sum();
                m.constrain(constraint!(used <= room[j] as f64));
            }
        }
        let sol = m.minimise(objective, limits)?;
        let gpu: Vec<usize> = y.iter().map(|row| row.iter().position(|v| sol.is_set(*v)).unwrap_or(0)).collect();
        let cost = self.cost(&gpu);
        let optimal = sol.status == MilpStatus::Optimal;
        if cost <= start_cost + 1e-12 {
            Ok((gpu, cost, sol.bound.min(cost), optimal))
        } else {
            Ok((start.to_vec(), start_cost, sol.bound.min(start_cost), optimal))
        }
    }
}

/// Time budget handed out across sub-problems.
pub struct Budget {
    deadline: std::time::Instant,
    /// Relative gap for each sub-MILP.
    pub rel_gap: f64,
    /// HiGHS log on.
    pub solver_log: bool,
}

impl Budget {
    /// A budget of `seconds` from now.
    pub fn new(seconds: f64, rel_gap: f64, solver_log: bool) -> Self {
        Budget {
            deadline: std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds),
            rel_gap,
            solver_log,
        }
    }

    /// Limits for the next of `left` sub-problems that share `share` of what remains.
    pub fn next(&self, left: usize, share: f64) -> MilpLimits {
        let remain = self.deadline.saturating_duration_since(std::time::Instant::now()).as_secs_f64();
        MilpLimits {
            time_limit: (remain * share / left.max(1) as f64).max(0.05),
            rel_gap: self.rel_gap,
            solver_log: self.solver_log,
        }
    }
}

fn room_for(inp: &Stage2Input, gpu: &[Vec<usize>], l: usize, placed_upto: usize) -> Option<Vec<usize>> {
    let g = inp.cluster.num_gpus();
    let sizes_equal = inp.groups.iter().all(|gs| gs.iter().all(|x| x.len() == gs[0].len()));
    if sizes_equal {
        return None;
    }
    // running cap: after layer l every GPU holds at most ceil(experts so far / G)
    let mut used = vec![0usize; g];
    let mut total = 0;
    for (k, layer) in gpu.iter().enumerate().take(placed_upto) {
        if k == l {
            continue;
        }
        for (b, &j) in layer.iter().enumerate() {
            used[j] += inp.groups[k][b].len();
        }
        total += inp.groups[k].iter().map(Vec::len).sum::<usize>();
    }
    total += inp.groups[l].iter().map(Vec::len).sum::<usize>();
    let cap = total.div_ceil(g);
    Some(used.iter().map(|&u| cap.saturating_sub(u)).collect())
}

/// Room per GPU at layer `l` under the cluster's expert memory, keeping enough for
/// the smallest groups of the layers still to come.
fn capacity_room(inp: &Stage2Input, gpu: &[Vec<usize>], l: usize) -> Vec<usize> {
    let g = inp.cluster.num_gpus();
    let mut used = vec![0usize; g];
    for (k, layer) in gpu.iter().enumerate().take(l) {
        for (b, &j) in layer.iter().enumerate() {
            used[j] += inp.groups[k][b].len();
        }
    }
    let reserve: usize = inp.groups[l + 1..].iter().map(|gs| gs.iter().map(Vec::len).min().unwrap_or(0)).sum();
    let cap = inp.cluster.max_experts_per_gpu();
    used.iter().map(|&u| cap.saturating_sub(u + reserve)).collect()
}

fn problem<'a>(
    inp: &'a Stage2Input,
    gpu: &[Vec<usize>],
    l: usize,
    links: Links<'a>,
    placed_upto: usize,
) -> LayerProblem<'a> {
    let g = inp.cluster.num_gpus();
    let layers = inp.groups.len();
    let inflow = (l > 0 && l - 1 < placed_upto).then(|| {
        let w = group_transitions(inp, l - 1);
        let mut m = vec![0.0; g * g];
        for (a, &i) in gpu[l - 1].iter().enumerate() {
            for b in 0..g {
                m[i * g + b] += w[a * g + b];
            }
        }
        m
    });
    let outflow = (l + 1 < layers && l + 1 < placed_upto).then(|| {
        let w = group_transitions(inp, l);
        let mut m = vec![0.0; g * g];
        for (c, &k) in gpu[l + 1].iter().enumerate() {
            for b in 0..g {
                m[b * g + k] += w[b * g + c];
            }
        }
        m
    });
    let room = if links.uniform && !links.cluster.is_uniform() { None } else { room_for(inp, gpu, l, placed_upto) };
    LayerProblem {
        gpus: g,
        inflow,
        outflow,
        sizes: inp.groups[l].iter().map(Vec::len).collect(),
        room,
        links,
        mean_weight: inp.mean_weight,
    }
}

/// Total stage-2 objective of an assignment.
pub fn total_cost(inp: &Stage2Input, gpu: &[Vec<usize>]) -> f64 {
    let links = Links { cluster: inp.cluster, uniform: false };
    (1..inp.groups.len()).map(|l| problem(inp, gpu, l, links, l + 1).cost(&gpu[l])).sum()
}

/// Forward pass, relaxation bound when needed, then `passes` refinement passes.
pub fn solve(inp: &Stage2Input, budget: &Budget, passes: usize) -> Result<Stage2Output> {
    let g = inp.cluster.num_gpus();
    let layers = inp.groups.len();
    let exact = inp.cluster.is_uniform() && room_for(inp, &vec![vec![0; g]; layers], 0, 0).is_none();
    let real = Links { cluster: inp.cluster, uniform: false };
    let mut gpu: Vec<Vec<usize>> = vec![(0..g).collect(); layers];
    let (mut bound, mut all_optimal) = (0.0, true);
    let phases = if exact { 1.0 } else { 2.0 + passes as f64 };
    for l in 1..layers {
        let mut p = problem(inp, &gpu, l, real, l + 1);
        let limits = budget.next(layers - l, 1.0 / phases);
        let (best, cost, b, opt) = match p.solve(&p.greedy(), &limits) {
            Err(_) if p.room.is_some() => {
                // unequal groups left no balanced fit: fall back to the cluster's memory
                p.room = Some(capacity_room(inp, &gpu, l));
                p.solve(&p.greedy(), &limits)?
            }
            r => r?,
        };
        eprintln!(
            "  stage 2 forward: layer {l}/{}: cost {cost:.4} bound {b:.4}{}",
            layers - 1,
            if opt { " (optimal)" } else { "" }
        );
        gpu[l] = best;
        bound += b;
        all_optimal &= opt;
    }
    if !exact {
        // Bound: per transition, the best cost over every way of spreading layer l-1's
        // groups over nodes (GPUs within a node and whole nodes are interchangeable),
        // without memory caps; when there are too many such spreads, price every link
        // at the fastest bandwidth instead.
        let spreads = node_spreads(g, inp.cluster.gpus_per_node, MAX_SPREADS);
        let relaxed = Links { cluster: inp.cluster, uniform: spreads.is_none() };
        let spreads = spreads.unwrap_or_else(|| vec![(0..g).collect()]);
        bound = 0.0;
        for l in 1..layers {
            let mut best = f64::INFINITY;
            for (k, spread) in spreads.iter().enumerate() {
                let mut fixed = gpu.clone();
                fixed[l - 1] = spread.clone();
                let mut p = problem(inp, &fixed, l, relaxed, l + 1);
                p.room = None;
                let left = (layers - l) * spreads.len() - k;
                let (_, _, b, opt) = p.solve(&p.greedy(), &budget.next(left, 1.0 / (phases - 1.0)))?;
                best = best.min(b);
                all_optimal &= opt;
            }
            let how = if relaxed.uniform { "all links at the fastest bandwidth" } else { "over all node spreads" };
            eprintln!("  stage 2 bound: transition {}->{l}: {best:.4} ({how})", l - 1);
            bound += best;
        }
        for pass in 0..passes {
            let before = total_cost(inp, &gpu);
            for l in 0..layers {
                let p = problem(inp, &gpu, l, real, layers);
                let left = (passes - pass) * layers - l;
                if let Ok((best, _, _, _)) = p.solve(&gpu[l].clone(), &budget.next(left, 1.0)) {
                    gpu[l] = best;
                }
            }
            let after = total_cost(inp, &gpu);
            eprintln!("  stage 2 refine pass {}: {before:.4} -> {after:.4}", pass + 1);
            if after >= before - 1e-12 {
                break;
            }
        }
    }
    let objective = total_cost(inp, &gpu);
    Ok(Stage2Output { gpu, objective, bound: bound.min(objective), all_optimal })
}

/// Most node spreads enumerated for the stage-2 bound.
const MAX_SPREADS: usize = 64;

/// Every way to split `g` groups into nodes of `per_node` (nodes unlabelled), as a
/// GPU for each group; `None` when there are more than `limit`.
fn node_spreads(g: usize, per_node: usize, limit: usize) -> Option<Vec<Vec<usize>>> {
    fn rec(
        b: usize,
        fill: &mut Vec<usize>,
        gpu: &mut Vec<usize>,
        per_node: usize,
        out: &mut Vec<Vec<usize>>,
        limit: usize,
    ) -> bool {
        if b == gpu.len() {
            out.push(gpu.clone());
            return out.len() <= limit;
        }
        let mut opened_empty = false;
        for n in 0..fill.len() {
            if fill[n] == per_node || (fill[n] == 0 && opened_empty) {
                continue;
            }
            opened_empty |= fill[n] == 0;
            gpu[b] = n * per_node + fill[n];
            fill[n] += 1;
            let ok = rec(b + 1, fill, gpu, per_node, out, limit);
            fill[n] -= 1;
            if !ok {
                return false;
            }
        }
        true
    }
    let mut out = Vec::new();
    let ok = rec(0, &mut vec![0; g / per_node], &mut vec![0; g], per_node, &mut out, limit);
    ok.then_some(out)
}
