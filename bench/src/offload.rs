//! `moe-serve bench-offload`: the expert cache at several budgets, for every
//! policy and predictor, on held-out text, side by side with the fully
//! resident run and with two offline bounds (Belady, oracle prefetch)
//! computed from the same run's routing.
//!
//! Every run decodes the same prompts greedily through the engine; the
//! generated tokens of every run are compared with the resident run's (they
//! must be identical). Throughput ratios are measured in the same process,
//! one run after another.

use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{Model, ModelConfig, SamplingParams};
use moe_offload::bounds::{self, Access, BoundResult};
use moe_offload::{
    CacheConfig, CacheStats, DiskExperts, ExpertCache, ExpertSource, Experts, LayerStats, MemoryExperts, PolicyKind,
    PredictorKind,
};
use moe_scheduler::SchedulerConfig;
use moe_types::{SeqId, TokenId};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Where experts come from in the benchmark.
pub enum Tier {
    /// The checkpoint in this directory (the real slow tier), read this way.
    Disk(PathBuf, moe_offload::DiskIo),
    /// Host memory (random-weight models): measures the machinery itself.
    Memory(Vec<Vec<moe_model::ExpertWeights>>),
}

/// What to run.
pub struct OffloadBench {
    /// Label of the model in the report.
    pub name: String,
    /// Non-expert weights.
    pub model: Model,
    /// Slow tier.
    pub tier: Tier,
    /// Prompts (token ids), one per concurrent sequence.
    pub prompts: Vec<Vec<TokenId>>,
    /// Tokens generated per sequence.
    pub decode_tokens: usize,
    /// Budgets as fractions of all experts.
    pub budgets: Vec<f64>,
    /// (policy, predictor) pairs to run.
    pub configs: Vec<(PolicyKind, PredictorKind)>,
    /// MoE layers ahead to forecast.
    pub depth: usize,
    /// Resident runs for the throughput reference (median taken).
    pub resident_repeats: usize,
}

/// One cache run's figures.
pub struct RunRow {
    /// Fraction of experts.
    pub budget: f64,
    /// Policy.
    pub policy: PolicyKind,
    /// Predictor name.
    pub predictor: &'static str,
    /// Summed counters.
    pub total: LayerStats,
    /// Per layer counters.
    pub layers: Vec<LayerStats>,
    /// Per layer and distance: (predicted, right).
    pub by_distance: Vec<Vec<(u64, u64)>>,
    /// Decode throughput.
    pub tokens_per_s: f64,
    /// Generated tokens identical to the resident run.
    pub identical: bool,
}

/// The offline bounds at one budget.
pub struct BoundRow {
    /// Fraction of experts.
    pub budget: f64,
    /// Belady's replacement.
    pub belady: BoundResult,
    /// Oracle prefetcher.
    pub oracle: BoundResult,
}

/// Everything measured.
pub struct OffloadReport {
    /// Model label.
    pub name: String,
    /// Routed experts in total and bytes of one.
    pub total_experts: usize,
    /// Bytes of one expert.
    pub expert_bytes: usize,
    /// Tokens computed per run (prompt + generated).
    pub computed_tokens: usize,
    /// Tokens generated per run.
    pub generated_tokens: usize,
    /// Resident decode throughput (median).
    pub resident_tps: f64,
    /// Cache runs.
    pub rows: Vec<RunRow>,
    /// Bounds per budget.
    pub bounds: Vec<BoundRow>,
    /// Look-ahead depth.
    pub depth: usize,
}

struct Outcome {
    tokens: BTreeMap<u64, Vec<TokenId>>,
    secs: f64,
    generated: usize,
    computed: usize,
    stats: Option<CacheStats>,
    accesses: Vec<Access>,
}

fn run(
    model: &Model,
    experts: Experts,
    prompts: &[Vec<TokenId>],
    decode: usize,
    record: bool,
) -> crate::Result<Outcome> {
    let sched = SchedulerConfig { max_num_seqs: prompts.len().max(1), max_batched_tokens: 4096 };
    let per_seq = prompts.iter().map(Vec::len).max().unwrap_or(0) + decode;
    let blocks = prompts.len() * per_seq.div_ceil(16) + 4;
    let mut core = EngineCore::new(model.clone(), experts, Vec::new(), sched, (blocks, 16));
    core.set_recording(record);
    for (i, p) in prompts.iter().enumerate() {
        let req = GenerationRequest {
            prompt: p.clone(),
            sampling: SamplingParams::default(),
            seed: 0,
            max_tokens: decode,
            min_tokens: 0,
            ignore_eos: true,
        };
        core.add(SeqId(i as u64), req)?;
    }
    let mut tokens: BTreeMap<u64, Vec<TokenId>> = BTreeMap::new();
    let mut records = Vec::new();
    let t = Instant::now();
    while !core.is_idle() {
        let out = core.step().map_err(|(_, e)| e)?;
        for o in out {
            tokens.entry(o.seq.0).or_default().push(o.token.id);
        }
        if record {
            records.extend(core.take_trace());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let generated = tokens.values().map(Vec::len).sum();
    let computed = prompts.iter().map(Vec::len).sum::<usize>() + generated - prompts.len();
    let stats = core.experts().cache_stats();
    Ok(Outcome { tokens, secs, generated, computed, stats, accesses: bounds::accesses(&records) })
}

impl OffloadBench {
    fn source(&self, cfg: &ModelConfig) -> crate::Result<Box<dyn ExpertSource>> {
        Ok(match &self.tier {
            Tier::Disk(dir, io) => Box::new(DiskExperts::open(dir, cfg, *io)?),
            Tier::Memory(w) => Box::new(MemoryExperts::new(w.clone())),
        })
    }

    fn resident(&self) -> crate::Result<Experts> {
        let cfg = self.model.config();
        Ok(Experts::Resident(match &self.tier {
            Tier::Disk(dir, _) => moe_model::load_weights(dir, cfg, &mut ())?.1,
            Tier::Memory(w) => moe_model::ResidentExperts::from_weights(w.clone()),
        }))
    }

    /// Runs everything and returns the figures.
    pub fn run(&self) -> crate::Result<OffloadReport> {
        let cfg = self.model.config().clone();
        let total = cfg.moe_layers().count() * cfg.moe.num_experts;
        let expert_bytes = self.source(&cfg)?.expert_bytes();
        let mut resident_secs = Vec::new();
        let reference = run(&self.model, self.resident()?, &self.prompts, self.decode_tokens, true)?;
        resident_secs.push(reference.secs);
        let mut rows = Vec::new();
        let mut bound_rows = Vec::new();
        let per_budget = self.configs.len().max(1);
        let resident_every = (self.budgets.len() * per_budget / self.resident_repeats.max(1)).max(1);
        let mut done = 0;
        for &budget in &self.budgets {
            let slots = ((budget * total as f64).round() as usize).clamp(cfg.moe.num_experts, total);
            bound_rows.push(BoundRow {
                budget,
                belady: bounds::belady(&reference.accesses, cfg.moe.num_experts, slots),
                oracle: bounds::oracle_prefetch(&reference.accesses, cfg.moe.num_experts, slots, self.depth),
            });
            for (policy, predictor) in &self.configs {
                let cc = CacheConfig {
                    slots,
                    policy: *policy,
                    predictor: predictor.clone(),
                    depth: self.depth,
                    min_precision: 0.0,
                    readers: 1,
                };
                let cache = ExpertCache::new(&cfg, self.source(&cfg)?, cc)?;
                eprintln!("  {:.0}% {} + {}", budget * 100.0, policy.name(), predictor.name());
                let o = run(&self.model, Experts::Cached(cache), &self.prompts, self.decode_tokens, false)?;
                let stats = o.stats.unwrap_or_default();
                rows.push(RunRow {
                    budget,
                    policy: *policy,
                    predictor: predictor.name(),
                    total: stats.total(),
                    layers: stats.layers,
                    by_distance: stats.by_distance,
                    tokens_per_s: o.generated as f64 / o.secs,
                    identical: o.tokens == reference.tokens,
                });
                done += 1;
                if done % resident_every == 0 && resident_secs.len() < self.resident_repeats {
                    resident_secs
                        .push(run(&self.model, self.resident()?, &self.prompts, self.decode_tokens, false)?.secs);
                }
            }
        }
        resident_secs.sort_by(f64::total_cmp);
        let median = resident_secs[resident_secs.len() / 2];
        Ok(OffloadReport {
            name: self.name.clone(),
            total_experts: total,
            expert_bytes,
            computed_tokens: reference.computed,
            generated_tokens: reference.generated,
            resident_tps: reference.generated as f64 / median,
            rows,
            bounds: bound_rows,
            depth: self.depth,
        })
    }
}

impl OffloadReport {
    /// Markdown tables: per budget, per predictor accuracy, and the targets.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mb = |bytes: f64| bytes / self.computed_tokens as f64 / 1e6;
        let _ = writeln!(
            s,
            "\n### {}: {} routed experts of {:.2} MB; {} tokens computed, {} generated per run; look-ahead {} MoE layer(s)\n",
            self.name,
            self.total_experts,
            self.expert_bytes as f64 / 1e6,
            self.computed_tokens,
            self.generated_tokens,
            self.depth
        );
        let _ = writeln!(s, "fully resident: {:.0} tokens/s (median of the resident runs)\n", self.resident_tps);
        let _ = writeln!(
            s,
            "| budget | policy | predictor | hit ratio | late prefetches | loads | MB loaded / token | stall us / token | decode tok/s | vs resident | same tokens |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for b in &self.bounds {
            for r in self.rows.iter().filter(|r| r.budget == b.budget) {
                let t = &r.total;
                let _ = writeln!(
                    s,
                    "| {:.0}% | {} | {} | {:.3} | {} | {} | {:.3} | {:.1} | {:.0} | {:.2}x | {} |",
                    r.budget * 100.0,
                    r.policy.name(),
                    r.predictor,
                    t.hit_ratio(),
                    t.late,
                    t.loads,
                    mb(t.bytes_loaded as f64),
                    t.stall_ns as f64 / 1e3 / self.computed_tokens as f64,
                    r.tokens_per_s,
                    r.tokens_per_s / self.resident_tps,
                    if r.identical { "yes" } else { "NO" }
                );
            }
            for (label, x) in [("Belady (offline bound)", &b.belady), ("oracle prefetch (offline bound)", &b.oracle)] {
                let _ = writeln!(
                    s,
                    "| {:.0}% | {label} | - | {:.3} | - | {} | {:.3} | - | - | - | - |",
                    b.budget * 100.0,
                    x.hit_ratio(),
                    x.loads,
                    mb((x.loads * self.expert_bytes as u64) as f64)
                );
            }
        }
        self.render_accuracy(&mut s);
        self.render_targets(&mut s);
        s
    }

    fn render_accuracy(&self, s: &mut String) {
        let mut seen = Vec::new();
        let Some(budget) = self.bounds.get(self.bounds.len() / 2).map(|b| b.budget) else { return };
        let _ = writeln!(s, "\npredictor precision / recall per MoE layer (runs at {:.0}%):\n", budget * 100.0);
        let layers = self.rows.first().map_or(0, |r| r.layers.len());
        let head: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
        let _ = writeln!(s, "| predictor | {} | all |", head.join(" | "));
        let _ = writeln!(s, "|---|{}---|", "---|".repeat(layers));
        for r in self.rows.iter().filter(|r| r.budget == budget && r.predictor != "none") {
            if seen.contains(&r.predictor) {
                continue;
            }
            seen.push(r.predictor);
            let cells: Vec<String> =
                r.layers.iter().map(|l| format!("{:.2} / {:.2}", l.precision(), l.recall())).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} / {:.2} |",
                r.predictor,
                cells.join(" | "),
                r.total.precision(),
                r.total.recall()
            );
        }
        self.render_distances(s, budget);
    }

    /// Precision per layer of the forecasts made d MoE layers ahead (when
    /// the runs forecast more than one layer ahead).
    fn render_distances(&self, s: &mut String, budget: f64) {
        let rows: Vec<&RunRow> = self.rows.iter().filter(|r| r.budget == budget && r.predictor != "none").collect();
        let depth = rows.iter().flat_map(|r| r.by_distance.iter().map(Vec::len)).max().unwrap_or(0);
        if depth < 2 {
            return;
        }
        let _ = writeln!(
            s,
            "\nprecision by distance (forecasts made d MoE layers ahead; runs at {:.0}%):\n",
            budget * 100.0
        );
        let layers = rows.first().map_or(0, |r| r.by_distance.len());
        let head: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
        let _ = writeln!(s, "| predictor | d | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(layers));
        let mut seen = Vec::new();
        for r in rows {
            if seen.contains(&r.predictor) {
                continue;
            }
            seen.push(r.predictor);
            for d in 0..depth {
                let cells: Vec<String> = r
                    .by_distance
                    .iter()
                    .map(|l| match l.get(d) {
                        Some(&(p, right)) if p > 0 => format!("{:.2}", right as f64 / p as f64),
                        _ => "-".into(),
                    })
                    .collect();
                let _ = writeln!(s, "| {} | {} | {} |", r.predictor, d + 1, cells.join(" | "));
            }
        }
    }

    fn render_targets(&self, s: &mut String) {
        let Some(b) = self.bounds.iter().find(|b| (b.budget - 0.5).abs() < 1e-9) else { return };
        let at = |p: PolicyKind, pred: &str| {
            self.rows.iter().find(|r| r.budget == 0.5 && r.policy == p && r.predictor == pred)
        };
        let Some(lru) = at(PolicyKind::Lru, "none") else { return };
        let best = self
            .rows
            .iter()
            .filter(|r| r.budget == 0.5 && r.policy == PolicyKind::Predictive)
            .max_by(|a, b| a.total.hit_ratio().total_cmp(&b.total.hit_ratio()));
        let Some(best) = best else { return };
        let belady = (b.belady.loads * self.expert_bytes as u64) as f64;
        let gain = (best.total.hit_ratio() - lru.total.hit_ratio()) * 100.0;
        let bytes = best.total.bytes_loaded as f64 / belady.max(1.0);
        let speed = best.tokens_per_s / self.resident_tps;
        let _ = writeln!(s, "\ntargets at 50% (predictive + {} against LRU without prediction):\n", best.predictor);
        let _ = writeln!(
            s,
            "- hit ratio {:.3} vs {:.3}: {gain:+.1} points (target >= +10): {}",
            best.total.hit_ratio(),
            lru.total.hit_ratio(),
            ok(gain >= 10.0)
        );
        let _ = writeln!(s, "- bytes loaded {bytes:.2}x Belady's (target <= 1.5x): {}", ok(bytes <= 1.5));
        let _ = writeln!(s, "- decode {speed:.2}x fully resident (target >= 0.8x): {}", ok(speed >= 0.8));
    }

    /// An SVG line chart of hit ratio against budget, one line per
    /// policy + predictor, plus the two bounds.
    pub fn svg(&self) -> String {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in &self.rows {
            let name = format!("{} + {}", r.policy.name(), r.predictor);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((r.budget, r.total.hit_ratio())),
                None => series.push((name, vec![(r.budget, r.total.hit_ratio())])),
            }
        }
        series.push(("Belady (bound)".into(), self.bounds.iter().map(|b| (b.budget, b.belady.hit_ratio())).collect()));
        series.push((
            "oracle prefetch (bound)".into(),
            self.bounds.iter().map(|b| (b.budget, b.oracle.hit_ratio())).collect(),
        ));
        line_chart(
            &format!("Expert cache hit ratio vs budget: {}", self.name),
            "expert budget (% of all experts)",
            "hit ratio at time of need",
            &series,
        )
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "MISSED"
    }
}

/// A small self-contained SVG line chart (x and y in [0, 1]).
fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const COLORS: [&str; 14] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
        "#393b79", "#637939", "#000000", "#555555",
    ];
    let (w, h, l, r, t, b) = (900.0, 520.0, 70.0, 300.0, 40.0, 60.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let px = |x: f64| l + x * pw;
    let py = |y: f64| t + (1.0 - y) * ph;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        l + pw / 2.0,
        esc(title)
    );
    for i in 0..=10 {
        let v = i as f64 / 10.0;
        let _ =
            writeln!(s, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##, px(0.0), py(v), px(1.0), py(v));
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{v:.1}</text>"#, px(0.0) - 6.0, py(v) + 4.0);
        let _ =
            writeln!(s, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##, px(v), py(0.0), px(v), py(1.0));
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text>"#, px(v), py(0.0) + 18.0, v * 100.0);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, l + pw / 2.0, h - 15.0, esc(xlabel));
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        t + ph / 2.0,
        t + ph / 2.0,
        esc(ylabel)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let dash = if name.contains("bound") { r#" stroke-dasharray="6 4""# } else { "" };
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ =
            writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"#, path.join(" "));
        for &(x, y) in pts {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, px(x), py(y));
        }
        let ly = t + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>"#,
            w - r + 15.0,
            w - r + 40.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, w - r + 46.0, ly + 4.0, esc(name));
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
