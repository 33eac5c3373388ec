//! `moe-serve`: serve, generate with, and benchmark MoE models.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use moe_bench::throughput::{self as bench, BenchArgs};
use moe_server::config::ServeArgs;
use moe_server::frontend::params::{RawParams, RequestLimits};
use moe_server::generate::{generate, GenerateArgs};
use moe_server::model_dir::{default_model_dir, load_with_progress, model_name};
use moe_server::offload::{load_served, OffloadArgs};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "moe-serve", version, about = "Mixture-of-Experts inference server")]
struct Cli {
    /// Worker threads for compute (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Keep each sequence's logits bit-identical whatever else shares its
    /// step (seeded sampling then repeats under load); false runs products of
    /// more than 32 rows through the gemm crate instead (faster prefill, but
    /// a sequence's numbers then depend on its batch).
    #[arg(long, global = true, env = "MOE_BATCH_INVARIANT", default_value_t = true, action = clap::ArgAction::Set)]
    batch_invariant: bool,
    #[command(subcommand)]
    cmd: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible REST API (the default command).
    ///
    /// Every setting can come from a flag, its MOE_* environment variable, or
    /// the same key in snake_case in the --config TOML file; that is also the
    /// order of precedence (flag first), then the default shown.
    Serve(Box<ServeArgs>),
    /// Generate a completion of one prompt, streamed to stdout.
    Generate(GenerateCmd),
    /// Measure prefill and decode throughput against the memory-bandwidth bound.
    Bench(BenchCmd),
    /// Record a routing trace (format v1, JSON Lines) of a text file, without a server.
    Trace(TraceCmd),
    /// Train the learned routing-path predictor from a routing trace.
    TrainPredictor(TrainPredictorCmd),
    /// Benchmark the expert cache: budgets x policies x predictors, with offline bounds.
    BenchOffload(BenchOffloadCmd),
    /// Benchmark token regrouping: fcfs, random and regroup micro-batches at a fixed expert budget.
    BenchRegroup(BenchRegroupCmd),
}

#[derive(Args)]
struct BenchRegroupCmd {
    /// Text files to draw prompts from (one kind of text each), round robin.
    #[arg(long, required = true, num_args = 1..)]
    text: Vec<PathBuf>,
    /// Model: a HuggingFace directory or a GGUF file; default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 32)]
    sequences: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Expert budget as a fraction of all experts.
    #[arg(long, default_value_t = 0.5)]
    budget: f64,
    /// Deferral bound.
    #[arg(long, default_value_t = 8)]
    max_deferral: u32,
    /// How experts beyond the budget are read from the checkpoint: direct (O_DIRECT, as
    /// `serve` does by default), release or cached (through the page cache).
    #[arg(long, default_value = "direct")]
    disk_io: moe_offload::DiskIo,
    /// Routing-path predictor whose forecasts regrouping reads (as `serve --predictor`).
    #[arg(long, default_value = "auto")]
    predictor: moe_offload::PredictorChoice,
}

#[derive(Args)]
struct TrainPredictorCmd {
    /// Routing trace (format v1) recorded on training text.
    #[arg(long)]
    trace: PathBuf,
    /// Predictor file to write (safetensors: format moe-path-predictor v1, or with
    /// --hidden-states moe-hidden-predictor v2).
    #[arg(long)]
    output: PathBuf,
    /// Model directory the trace was recorded with; default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Train the hidden-state predictor instead, from these hidden states (written
    /// with the trace by `trace --hidden-states`).
    #[arg(long)]
    hidden_states: Option<PathBuf>,
    /// With --hidden-states: MoE layers each probe forecasts (1: the layer itself).
    #[arg(long, default_value_t = 3)]
    distances: usize,
    /// With --hidden-states: hidden units per probe.
    #[arg(long, default_value_t = 32)]
    probe_units: usize,
    /// With --hidden-states: passes over the training tokens.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
}

#[derive(Args)]
struct BenchOffloadCmd {
    /// Held-out text to draw prompts from (not the predictor's training text).
    #[arg(long)]
    text: PathBuf,
    /// Model: a HuggingFace directory or a GGUF file; default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Budgets as fractions of all experts, comma-separated.
    #[arg(long, default_value = "0.25,0.5,0.75", value_delimiter = ',')]
    budgets: Vec<f64>,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// MoE layers ahead to forecast.
    #[arg(long, default_value_t = 1)]
    prefetch_depth: usize,
    /// Learned predictor file (default: the model directory's).
    #[arg(long)]
    predictor_file: Option<PathBuf>,
    /// Write the hit-ratio plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Also run the larger random-weight config (experts copied from host memory).
    #[arg(long)]
    large: bool,
    /// How experts beyond the budget are read from the checkpoint: direct (O_DIRECT, as
    /// `serve` does by default), release or cached (through the page cache).
    #[arg(long, default_value = "direct")]
    disk_io: moe_offload::DiskIo,
}

#[derive(Args)]
struct GenerateCmd {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Model: a HuggingFace directory or a GGUF file; default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (default: the model's generation_config, else 1).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling threshold (default: the model's generation_config, else 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long)]
    top_k: Option<usize>,
    /// RNG seed (default: from the clock); same seed, same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Device the model runs on: cpu, or cuda (needs a build with --features cuda and an NVIDIA GPU).
    #[arg(long, default_value_t = moe_server::device::Device::Cpu)]
    device: moe_server::device::Device,
    /// Keep generating past end-of-sequence tokens, up to --max-tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    offload: OffloadArgs,
}

#[derive(Args)]
struct TraceCmd {
    /// Text file to run through the model.
    #[arg(long)]
    input: PathBuf,
    /// Trace file to write.
    #[arg(long)]
    output: PathBuf,
    /// Model: a HuggingFace directory or a GGUF file; default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens per sequence window.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Stop after this many windows (0: the whole file).
    #[arg(long, default_value_t = 0)]
    max_windows: usize,
    /// Also write the residual stream entering each MoE layer of every token
    /// here (moe_types::hidden_trace; 12 + 2 x MoE layers x hidden size bytes
    /// per token), for `train-predictor --hidden-states`.
    #[arg(long)]
    hidden_states: Option<PathBuf>,
    #[command(flatten)]
    offload: OffloadArgs,
}

#[derive(Args)]
struct BenchCmd {
    /// Model to benchmark (HuggingFace directory or GGUF file); default: the built-in model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Skip the larger random-weight model (1.19B parameters, 2.4 GB of bf16).
    #[arg(long)]
    no_large: bool,
    /// Prompt tokens for prefill.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Repetitions (best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the concurrent-sequence throughput rows (batch 1 only, as llama-bench measures).
    #[arg(long)]
    no_batches: bool,
    /// Activations of products with MXFP4 experts from a transformers checkpoint: f32 (exact) or int8.
    #[arg(long, default_value = "f32")]
    expert_activations: moe_offload::ExpertActivations,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("configuring threads")?;
    }
    moe_kernels::set_batch_invariant(cli.batch_invariant);
    match cli.cmd.unwrap_or_default() {
        Command::Serve(a) => {
            let cfg = a.resolve()?;
            let rt =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
            rt.block_on(moe_server::serve::serve(cfg))
        }
        Command::Generate(g) => run_generate(g),
        Command::Bench(b) => run_bench(b),
        Command::Trace(t) => run_trace(t),
        Command::TrainPredictor(t) => run_train_predictor(t),
        Command::BenchOffload(b) => run_bench_offload(b),
        Command::BenchRegroup(b) => run_bench_regroup(b),
    }
}

fn run_train_predictor(t: TrainPredictorCmd) -> anyhow::Result<()> {
    let dir = t.model.unwrap_or_else(default_model_dir);
    let cfg = moe_model::read_config(&dir)?;
    let file = std::fs::File::open(&t.trace).with_context(|| format!("opening {}", t.trace.display()))?;
    let (header, records) = moe_types::trace::read_trace(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", t.trace.display()))?;
    if let Some(hs) = &t.hidden_states {
        let f = std::fs::File::open(hs).with_context(|| format!("opening {}", hs.display()))?;
        let reader = moe_types::hidden_trace::HiddenReader::new(std::io::BufReader::new(f))
            .with_context(|| format!("reading {}", hs.display()))?;
        anyhow::ensure!(
            reader.header().hidden_size == cfg.hidden_size,
            "{} holds hidden states of width {}, the model's is {}",
            hs.display(),
            reader.header().hidden_size,
            cfg.hidden_size
        );
        let cfg = moe_offload::predictor::HiddenTrainConfig {
            distances: t.distances,
            units: t.probe_units,
            epochs: t.epochs,
        };
        // the token embeddings, for the probe that forecasts before a step
        let (model, _) = moe_model::load_model_without_experts(&dir, &mut ())?;
        let row = |t: u32, out: &mut [f32]| model.embedding(t, out);
        let emb = moe_offload::predictor::TokenEmbeddings { vocab: model.config().vocab_size, row: &row };
        let (probes, report) = moe_offload::predictor::train_hidden(&header, &records, reader, cfg, Some(&emb))?;
        probes.save(&t.output)?;
        eprintln!("trained on {} tokens, validated on {}", report.train_tokens, report.valid_tokens);
        if report.dropped_tokens > 0 {
            eprintln!("left out {} tokens past the memory bound", report.dropped_tokens);
        }
        for d in 0..t.distances {
            let cells: Vec<String> = report
                .recall
                .iter()
                .map(|r| if r[d].is_nan() { "-".into() } else { format!("{:.1}%", r[d] * 100.0) })
                .collect();
            eprintln!("held-out recall per MoE layer, forecasting {d} layer(s) past the one read: {}", cells.join(" "));
        }
        let cells: Vec<String> = report.pre_recall.iter().map(|r| format!("{:.1}%", r * 100.0)).collect();
        eprintln!("held-out recall per MoE layer before the step (for regrouping): {}", cells.join(" "));
        eprintln!("wrote {}", t.output.display());
        return Ok(());
    }
    let (tables, report) = moe_offload::predictor::train(&header, &records, cfg.vocab_size)?;
    tables.save(&t.output)?;
    let pct = |v: &[f64]| v.iter().map(|a| format!("{:.1}%", a * 100.0)).collect::<Vec<_>>().join(" ");
    eprintln!(
        "trained on {} tokens, validated on {} (token weight {}, path weight {})",
        report.train_tokens, report.valid_tokens, report.token_weight, report.path_weight
    );
    eprintln!("held-out accuracy per MoE layer, from the token alone:          {}", pct(&report.token_only));
    eprintln!("held-out accuracy per MoE layer, token + earlier layers' path: {}", pct(&report.one_ahead));
    eprintln!("wrote {}", t.output.display());
    Ok(())
}

fn run_bench_regroup(b: BenchRegroupCmd) -> anyhow::Result<()> {
    anyhow::ensure!(b.sequences > 0 && b.prompt_tokens > 0 && b.decode_tokens > 0, "sizes must be positive");
    anyhow::ensure!(b.budget > 0.0 && b.budget <= 1.0, "--budget must be a fraction in (0, 1]");
    let dir = b.model.unwrap_or_else(default_model_dir);
    let (model, codec) = moe_model::load_model_without_experts(&dir, &mut ())?;
    let mut sources = Vec::new();
    for p in &b.text {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let ids = codec.encode(&text, false)?;
        let per = b.sequences.div_ceil(b.text.len());
        anyhow::ensure!(ids.len() >= per * b.prompt_tokens, "{} is too short for {per} prompts", p.display());
        let name = p.file_name().map_or("text".into(), |n| n.to_string_lossy().into_owned());
        sources.push((name, ids, per));
    }
    let mut prompts = Vec::new();
    for i in 0..b.sequences {
        let (name, ids, per) = &sources[i % sources.len()];
        let j = i / sources.len();
        let stride = ids.len() / per;
        prompts.push((name.clone(), ids[j * stride..j * stride + b.prompt_tokens].to_vec()));
    }
    let files = (dir.join(moe_server::offload::PREDICTOR_FILE), dir.join(moe_server::offload::HIDDEN_PREDICTOR_FILE));
    let predictor = b.predictor.resolve(files.0, files.1);
    predictor.check_width(model.config().hidden_size)?;
    let bench = moe_bench::regroup::RegroupBench {
        model,
        dir: dir.clone(),
        prompts,
        decode_tokens: b.decode_tokens,
        micro_batch: b.micro_batch,
        budget: b.budget,
        policy: moe_offload::PolicyKind::Predictive,
        predictor,
        max_deferral: b.max_deferral,
        disk_io: b.disk_io,
    };
    eprintln!("benchmarking token regrouping on {}...", model_name(&dir));
    print!("{}", bench.run()?);
    Ok(())
}

fn run_bench_offload(b: BenchOffloadCmd) -> anyhow::Result<()> {
    use moe_bench::offload::{OffloadBench, Tier};
    use moe_offload::{PolicyKind, PredictorKind};
    anyhow::ensure!(b.sequences > 0 && b.prompt_tokens > 0 && b.decode_tokens > 0, "sizes must be positive");
    anyhow::ensure!(b.budgets.iter().all(|&f| f > 0.0 && f < 1.0), "--budgets must be fractions in (0, 1)");
    let dir = b.model.unwrap_or_else(default_model_dir);
    let text = std::fs::read_to_string(&b.text).with_context(|| format!("reading {}", b.text.display()))?;
    let (model, codec) = moe_model::load_model_without_experts(&dir, &mut ())?;
    let ids = codec.encode(&text, false)?;
    let need = b.sequences * b.prompt_tokens;
    anyhow::ensure!(ids.len() >= need, "the text has {} tokens; {need} are needed", ids.len());
    let stride = ids.len() / b.sequences;
    let prompts: Vec<Vec<u32>> =
        (0..b.sequences).map(|i| ids[i * stride..i * stride + b.prompt_tokens].to_vec()).collect();
    let learned = b.predictor_file.unwrap_or_else(|| dir.join(moe_server::offload::PREDICTOR_FILE));
    let mut predictors = vec![PredictorKind::None, PredictorKind::PreviousToken, PredictorKind::LookAhead];
    if learned.is_file() {
        predictors.push(PredictorKind::Learned(learned));
    } else {
        eprintln!("no learned predictor at {}: skipping it", learned.display());
    }
    let hidden = dir.join(moe_server::offload::HIDDEN_PREDICTOR_FILE);
    if hidden.is_file() {
        predictors.push(PredictorKind::Hidden(hidden.clone()));
        if let Some(l @ PredictorKind::Learned(_)) = predictors.iter().find(|p| matches!(p, PredictorKind::Learned(_)))
        {
            predictors.push(PredictorKind::Combined(vec![PredictorKind::Hidden(hidden), l.clone()]));
        }
    } else {
        eprintln!("no hidden-state predictor at {}: skipping it", hidden.display());
    }
    let mut configs = Vec::new();
    for p in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Predictive] {
        for pred in &predictors {
            if p == PolicyKind::Predictive && *pred == PredictorKind::None {
                continue;
            }
            configs.push((p, pred.clone()));
        }
    }
    let name = model_name(&dir);
    eprintln!("benchmarking the expert cache on {name} ({} runs)...", configs.len() * b.budgets.len());
    let bench = OffloadBench {
        name: format!("{name} (experts read from the checkpoint, --disk-io {})", b.disk_io),
        model,
        tier: Tier::Disk(dir.clone(), b.disk_io),
        prompts,
        decode_tokens: b.decode_tokens,
        budgets: b.budgets.clone(),
        configs,
        depth: b.prefetch_depth,
        resident_repeats: 3,
    };
    let report = bench.run()?;
    print!("{}", report.render());
    if let Some(svg) = &b.svg {
        std::fs::write(svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
        eprintln!("wrote {}", svg.display());
    }
    if b.large {
        eprintln!("building the random-weight large model (1.19B parameters, bf16)...");
        let cfg = moe_model::ModelConfig::from_json(bench::LARGE_CONFIG)?;
        let (model, experts) = moe_model::random::random_model(&cfg, 0)?;
        let vocab = cfg.vocab_size as u32;
        let prompts = (0..2u32).map(|i| (0..16u32).map(|j| 3 + (i * 131 + j * 7) % (vocab - 3)).collect()).collect();
        let large = OffloadBench {
            name: "random-large (experts in host memory)".into(),
            model,
            tier: Tier::Memory(experts.into_weights()),
            prompts,
            decode_tokens: 16,
            budgets: vec![0.5],
            configs: vec![
                (PolicyKind::Lru, PredictorKind::None),
                (PolicyKind::Lru, PredictorKind::LookAhead),
                (PolicyKind::Predictive, PredictorKind::LookAhead),
                (PolicyKind::Predictive, PredictorKind::PreviousToken),
            ],
            depth: b.prefetch_depth,
            resident_repeats: 2,
        };
        print!("{}", large.run()?.render());
    }
    Ok(())
}

/// A model loaded for `generate`, on its device.
enum Loaded {
    Cpu(moe_server::offload::ServedModel),
    #[cfg(feature = "cuda")]
    Gpu(moe_server::gpu::GpuHost),
}

impl Loaded {
    fn codec(&self) -> &moe_model::TextCodec {
        match self {
            Self::Cpu(m) => &m.codec,
            #[cfg(feature = "cuda")]
            Self::Gpu(h) => h.codec(),
        }
    }

    fn config(&self) -> &moe_model::ModelConfig {
        match self {
            Self::Cpu(m) => m.model.config(),
            #[cfg(feature = "cuda")]
            Self::Gpu(h) => h.config(),
        }
    }
}

fn run_generate(g: GenerateCmd) -> anyhow::Result<()> {
    g.device.check()?;
    let dir = g.model.unwrap_or_else(default_model_dir);
    let t = Instant::now();
    let settings = g.offload.settings()?;
    let m = match g.device {
        moe_server::device::Device::Cpu => Loaded::Cpu(load_served(&dir, false, &settings)?),
        #[cfg(feature = "cuda")]
        moe_server::device::Device::Cuda => Loaded::Gpu(moe_server::gpu::load_host(&dir, false, &settings)?),
        #[cfg(not(feature = "cuda"))]
        moe_server::device::Device::Cuda => anyhow::bail!(moe_server::device::NO_CUDA_BUILD),
    };
    eprintln!("loaded {} ({}) in {:.2}s", dir.display(), m.config().arch.name(), t.elapsed().as_secs_f64());
    // the same request rules as the REST and gRPC APIs (frontend::params)
    let d = m.codec().defaults();
    let raw = RawParams {
        max_tokens: Some(("max_tokens", i64::try_from(g.max_tokens).unwrap_or(i64::MAX))),
        temperature: g.temperature.or(d.temperature).map(f64::from),
        top_p: g.top_p.or(d.top_p).map(f64::from),
        top_k: g.top_k.or(d.top_k).map(|k| i64::try_from(k).unwrap_or(i64::MAX)),
        ..Default::default()
    };
    let limits = RequestLimits { max_tokens: usize::MAX >> 1, max_n: 1, max_stop: 0, max_logit_bias: 0 };
    let sampling = raw
        .validate(&limits, m.config().vocab_size)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.param.as_deref().unwrap_or("").replace('_', "-"), e.message))?
        .sampling;
    let seed = g.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    let args = GenerateArgs { prompt: g.prompt, max_tokens: g.max_tokens, sampling, seed, ignore_eos: g.ignore_eos };
    let t = Instant::now();
    let stats = match m {
        Loaded::Cpu(m) => generate(m, &args, &mut std::io::stdout().lock())?,
        #[cfg(feature = "cuda")]
        Loaded::Gpu(host) => {
            moe_server::generate::generate_gpu(host, &dir, &settings, &args, &mut std::io::stdout().lock())?
        }
    };
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} prompt tokens, {} generated in {:.2}s ({:.1} tok/s), seed {}",
        stats.prompt_tokens,
        stats.generated,
        secs,
        stats.generated as f64 / secs,
        seed
    );
    let after_first = stats.generated.saturating_sub(1);
    eprintln!(
        "first token after {:.3}s; decode {:.3} tok/s over the {after_first} tokens after it",
        stats.first_token.as_secs_f64(),
        after_first as f64 / stats.decode.as_secs_f64().max(1e-9),
    );
    if let Some(c) = &stats.cache {
        eprintln!(
            "expert cache: hit ratio {:.3}, {} loads ({:.2} GB), prefetches {} issued / {} used / {} wasted, \
             predictor precision {:.3}, {:.2}s waiting for experts",
            c.hit_ratio(),
            c.loads,
            c.bytes_loaded as f64 / 1e9,
            c.prefetch_issued,
            c.prefetch_used,
            c.prefetch_wasted,
            c.precision(),
            c.stall_ns as f64 / 1e9
        );
    }
    Ok(())
}

fn run_trace(t: TraceCmd) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&t.input).with_context(|| format!("reading {}", t.input.display()))?;
    let dir = t.model.unwrap_or_else(default_model_dir);
    let m = load_served(&dir, false, &t.offload.settings()?)?;
    let name = model_name(&dir);
    let file = std::fs::File::create(&t.output).with_context(|| format!("creating {}", t.output.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let args = moe_server::trace::TraceArgs { window: t.window, max_windows: t.max_windows };
    let mut hidden = match &t.hidden_states {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let n = moe_server::trace::record_text(
        m,
        &name,
        &text,
        &args,
        &mut out,
        hidden.as_mut().map(|w| w as &mut dyn std::io::Write),
    )?;
    eprintln!("recorded the routing of {n} tokens to {}", t.output.display());
    if let Some(p) = &t.hidden_states {
        eprintln!("and their hidden states to {}", p.display());
    }
    Ok(())
}

fn run_bench(b: BenchCmd) -> anyhow::Result<()> {
    // run on a worker of a compute pool, as the served engine loop does, so
    // parallel sections start from a pool thread (`--threads` sizes it)
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("moe-compute-{i}"))
        .build()
        .context("starting the compute pool")?;
    pool.install(|| run_bench_in_pool(b))
}

fn run_bench_in_pool(b: BenchCmd) -> anyhow::Result<()> {
    let args = BenchArgs { prompt_tokens: b.prompt_tokens, decode_tokens: b.decode_tokens, repeats: b.repeats };
    anyhow::ensure!(
        args.prompt_tokens > 0 && args.decode_tokens > 0,
        "--prompt-tokens and --decode-tokens must be positive"
    );
    eprintln!("measuring read bandwidth...");
    let bw = bench::read_bandwidth();
    let dir = b.model.unwrap_or_else(default_model_dir);
    let mut m = load_with_progress(&dir).with_context(|| format!("loading model from {}", dir.display()))?;
    if b.expert_activations == moe_offload::ExpertActivations::Int8 {
        m.experts = m.experts.with_int8_activations();
    }
    let cfg = m.model.config().clone();
    let expert_bytes = m.experts.nbytes() / (cfg.moe_layers().count() * cfg.moe.num_experts).max(1);
    let name = model_name(&dir);
    eprintln!("benchmarking {name}...");
    let eos = m.codec.eos_ids().to_vec();
    // one step prefills the whole prompt, as the engine does for short prompts
    let sched = moe_scheduler::SchedulerConfig { max_num_seqs: 256, max_batched_tokens: args.prompt_tokens.max(4096) };
    let mut core = moe_engine::EngineCore::new(m.model, m.experts, eos, sched, (2048, 16));
    let mut rows = vec![bench::bench_model(&name, &mut core, expert_bytes, args, bw)?];
    let mut batch_rows = Vec::new();
    let mut large_rows = Vec::new();
    let batches: &[usize] = if b.no_batches { &[] } else { &[1, 8, 32, 64] };
    for &batch in batches {
        batch_rows.push((batch, bench::engine_throughput(&mut core, batch, args.decode_tokens)?));
    }
    drop(core);
    if !b.no_large {
        eprintln!("building the random-weight large model (1.19B parameters, bf16)...");
        let cfg = moe_model::ModelConfig::from_json(bench::LARGE_CONFIG)?;
        let (model, experts) = moe_model::random::random_model(&cfg, 0)?;
        eprintln!("benchmarking random-large...");
        let sched =
            moe_scheduler::SchedulerConfig { max_num_seqs: 256, max_batched_tokens: args.prompt_tokens.max(4096) };
        let mut core = moe_engine::EngineCore::new(model, experts, vec![], sched, (1024, 16));
        rows.push(bench::bench_model("random-large (bf16)", &mut core, bench::expert_bytes(&cfg, 2), args, bw)?);
        for &batch in batches.iter().filter(|&&b| b <= 32) {
            large_rows.push((batch, bench::engine_throughput(&mut core, batch, 16)?));
        }
    }
    print!("{}", bench::render(&rows, bw, args));
    if !batch_rows.is_empty() {
        println!(
            "\nengine decode throughput on {name} (greedy, 16-token prompts, {} new tokens each, no HTTP):\n",
            args.decode_tokens
        );
        println!("| concurrent sequences | tokens/s | vs 1 sequence |\n|---|---|---|");
        for (b, tps) in &batch_rows {
            println!("| {b} | {tps:.0} | {:.2}x |", tps / batch_rows[0].1);
        }
    }
    if !large_rows.is_empty() {
        println!(
            "\nengine decode throughput on random-large (greedy, 16-token prompts, 16 new tokens each, no HTTP):\n"
        );
        println!("| concurrent sequences | tokens/s | vs 1 sequence |\n|---|---|---|");
        for (b, tps) in &large_rows {
            println!("| {b} | {tps:.1} | {:.2}x |", tps / large_rows[0].1);
        }
    }
    Ok(())
}

impl Default for Command {
    fn default() -> Self {
        Command::Serve(Box::default())
    }
}
