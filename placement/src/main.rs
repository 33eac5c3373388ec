//! `moe-place`: command line of the offline placement planner (see the library docs).
//!
//! - `moe-place solve --trace T --cluster C --method moetuner --out plan.json`
//! - `moe-place eval --trace HELD_OUT --cluster C plan1.json plan2.json --heatmap load.svg`
//! - `moe-place synth --shape deepseek-v3 --tokens 8192 --out train.jsonl`

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use moe_place::cluster::Cluster;
use moe_place::planner::{self, Method, SolveOptions};
use moe_place::stats::Stats;
use moe_place::synth::{self, SynthSpec};
use moe_place::{eval, heatmap, traces};
use moe_types::placement::PlacementPlan;
use moe_types::trace::{write_header, write_token, TraceHeader, TraceToken};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "moe-place", about = "Offline MoE expert placement planner (MoETuner, good_lp + HiGHS)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Solve a placement from a routing trace.
    Solve(SolveArgs),
    /// Score plans on a (held-out) trace: table, per-layer detail, heatmap.
    Eval(EvalArgs),
    /// Write a synthetic trace with skew and inter-layer affinity.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
struct SolveArgs {
    /// Routing trace (project format or plain JSONL).
    #[arg(long)]
    trace: PathBuf,
    /// Experts per layer, for plain traces whose highest expert id was never chosen.
    #[arg(long)]
    num_experts: Option<usize>,
    /// Cluster description (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// Placement method.
    #[arg(long, value_enum, default_value = "moetuner")]
    method: Method,
    /// Redundant expert copies per layer (greedy only).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// Seconds for the whole solve.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// Relative MILP gap at which to stop.
    #[arg(long, default_value_t = 0.0)]
    gap: f64,
    /// Stage-1 group sizes may differ from E/G by this much.
    #[arg(long, default_value_t = 0)]
    size_slack: usize,
    /// Weight of the mean GPU-pair traffic next to the worst pair.
    #[arg(long, default_value_t = 0.1)]
    mean_weight: f64,
    /// Weight of the load term in the joint objective.
    #[arg(long, default_value_t = 1.0)]
    load_weight: f64,
    /// Stage-2 refinement passes.
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// Run the affinity local search on the result (keeps each layer's max load).
    #[arg(long)]
    local_search: bool,
    /// With --local-search: each GPU's load may rise to max(its starting load,
    /// layer mean x (1 + this)).
    #[arg(long, default_value_t = 0.0)]
    load_slack: f64,
    /// Print HiGHS's own log (branch and bound progress) to stdout.
    #[arg(long)]
    solver_log: bool,
    /// Where to write the plan.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Trace to score on (held out from the solve).
    #[arg(long)]
    trace: PathBuf,
    /// Experts per layer, for plain traces.
    #[arg(long)]
    num_experts: Option<usize>,
    /// Cluster description (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// Write an SVG heatmap of per-GPU load per layer here.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// Write all figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also print per-layer detail.
    #[arg(long)]
    per_layer: bool,
    /// Plans to score.
    #[arg(required = true)]
    plans: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// 4 MoE layers x 8 experts, top-2 (the built-in model's shape).
    Tiny,
    /// 32 x 8, top-2.
    Mixtral,
    /// 58 x 256, top-8.
    DeepseekV3,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Model shape.
    #[arg(long, value_enum)]
    shape: Shape,
    /// Tokens to draw.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Sigma of the log-normal expert popularity.
    #[arg(long, default_value_t = 0.6)]
    skew: f64,
    /// Latent topics.
    #[arg(long, default_value_t = 64)]
    topics: usize,
    /// Probability a pick comes from the token's topic's preferred experts.
    #[arg(long, default_value_t = 0.5)]
    affinity: f64,
    /// Seed of the structure (same for a training and a held-out trace).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed of the token draw (differs between training and held-out traces).
    #[arg(long, default_value_t = 1)]
    sample_seed: u64,
    /// Output trace.
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("moe-place: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Solve(a) => solve(a),
        Command::Eval(a) => evaluate(a),
        Command::Synth(a) => synthesize(a),
    }
}

fn load_cluster(path: &Path) -> anyhow::Result<Cluster> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Cluster::from_toml(&text).with_context(|| path.display().to_string())
}

fn solve(a: SolveArgs) -> anyhow::Result<()> {
    let cluster = load_cluster(&a.cluster)?;
    let routing = traces::read_routing(&a.trace, a.num_experts)?;
    let stats = Stats::from_routing(&routing);
    eprintln!(
        "moe-place: {} tokens, {} MoE layers x {} experts (top-{}), {} GPUs on {} node(s); method {}",
        routing.num_tokens(),
        stats.layers,
        stats.experts,
        routing.top_k,
        cluster.num_gpus(),
        cluster.nodes,
        a.method.name()
    );
    let opts = SolveOptions {
        method: a.method,
        replicas: a.replicas,
        time_limit: a.time_limit,
        rel_gap: a.gap,
        size_slack: a.size_slack,
        mean_weight: a.mean_weight,
        load_weight: a.load_weight,
        passes: a.passes,
        local_search: a.local_search,
        load_slack: a.load_slack,
        solver_log: a.solver_log,
    };
    let solved = planner::solve(&stats, &cluster, &opts)?;
    let mut plan =
        PlacementPlan::new(routing.moe_layers.clone(), stats.experts, cluster.num_gpus(), cluster.gpus_per_node);
    plan.model = routing.model.clone();
    plan.method = if a.local_search { format!("{}+ls", a.method.name()) } else { a.method.name().into() };
    if a.replicas > 0 {
        plan.method = format!("{}+{}r", plan.method, a.replicas);
    }
    plan.layers = solved.layers;
    plan.solve = Some(solved.summary.clone());
    moe_place::validate::check(&plan, &cluster, stats.layers, stats.experts)?;
    let mut f = std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    plan.write(&mut f)?;
    let score = eval::score(&stats, &cluster, &plan.layers);
    let s = &solved.summary;
    println!("# moe-place report: {} ({})", plan.method, a.out.display());
    if s.status.starts_with("heuristic") {
        println!("solve: {:.2} s, {}", s.seconds, s.status);
    } else {
        println!(
            "solve: {:.2} s, status {}, objective {:.4}, bound {:.4}, gap {:.2}%",
            s.seconds,
            s.status,
            s.objective,
            s.bound,
            100.0 * s.gap
        );
    }
    for line in &solved.report {
        println!("{line}");
    }
    println!("\nOn the solve trace (in-sample):\n\n{}", eval::table(&[(plan.method.clone(), score)]));
    Ok(())
}

fn evaluate(a: EvalArgs) -> anyhow::Result<()> {
    let cluster = load_cluster(&a.cluster)?;
    let routing = traces::read_routing(&a.trace, a.num_experts)?;
    let stats = Stats::from_routing(&routing);
    let mut rows = Vec::new();
    for p in &a.plans {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let plan = PlacementPlan::read(std::io::BufReader::new(f)).with_context(|| p.display().to_string())?;
        moe_place::validate::check(&plan, &cluster, stats.layers, stats.experts)
            .with_context(|| p.display().to_string())?;
        let name = p.file_stem().map_or(plan.method.clone(), |s| s.to_string_lossy().into_owned());
        rows.push((name, eval::score(&stats, &cluster, &plan.layers)));
    }
    println!(
        "Scored on {} ({} tokens, {} MoE layers x {} experts, top-{}), {} GPUs on {} node(s)\n",
        a.trace.display(),
        routing.num_tokens(),
        stats.layers,
        stats.experts,
        routing.top_k,
        cluster.num_gpus(),
        cluster.nodes
    );
    print!("{}", eval::table(&rows));
    if a.per_layer {
        for (name, s) in &rows {
            print!("{}", eval::per_layer(name, s));
        }
    }
    if let Some(path) = &a.heatmap {
        std::fs::write(path, heatmap::svg(&rows)).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.json {
        let map: serde_json::Map<String, serde_json::Value> =
            rows.iter().map(|(n, s)| Ok((n.clone(), serde_json::to_value(s)?))).collect::<anyhow::Result<_>>()?;
        std::fs::write(path, serde_json::to_string_pretty(&map)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn synthesize(a: SynthArgs) -> anyhow::Result<()> {
    let (layers, experts, top_k, name) = match a.shape {
        Shape::Tiny => (4, 8, 2, "synthetic-tiny"),
        Shape::Mixtral => (32, 8, 2, "synthetic-mixtral"),
        Shape::DeepseekV3 => (58, 256, 8, "synthetic-deepseek-v3"),
    };
    if !(0.0..=1.0).contains(&a.affinity) || a.topics == 0 {
        bail!("--affinity must be within [0, 1] and --topics at least 1");
    }
    let spec = SynthSpec {
        layers,
        experts,
        top_k,
        tokens: a.tokens,
        skew: a.skew,
        topics: a.topics,
        affinity: a.affinity,
        structure_seed: a.seed,
        sample_seed: a.sample_seed,
    };
    let ids = synth::generate(&spec);
    let f = std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let header = TraceHeader::new(name, layers, (0..layers as u16).collect(), experts, top_k);
    write_header(&mut w, &header)?;
    let weights = vec![vec![1.0 / top_k as f32; top_k]; layers];
    for (t, per_token) in ids.chunks(layers * top_k).enumerate() {
        let token = TraceToken {
            step: t as u64,
            seq: 0,
            pos: t as u32,
            token: 0,
            experts: per_token.chunks(top_k).map(<[u16]>::to_vec).collect(),
            weights: weights.clone(),
        };
        write_token(&mut w, &token)?;
    }
    w.flush()?;
    eprintln!("moe-place: wrote {} tokens of {name} to {}", a.tokens, a.out.display());
    Ok(())
}
