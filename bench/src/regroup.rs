//! `moe-serve bench-regroup`: many concurrent sequences from different kinds
//! of text, micro-batched at a fixed expert budget, under first-come-first-
//! served (round robin), random grouping and ExpertFlow-style regrouping,
//! measured one after another in the same process.

use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{Model, SamplingParams};
use moe_offload::{CacheConfig, DiskExperts, ExpertCache, Experts, PolicyKind, PredictorKind};
use moe_scheduler::{GroupingConfig, GroupingMode, SchedulerConfig};
use moe_types::{SeqId, TokenId};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

/// What to run.
pub struct RegroupBench {
    /// Non-expert weights.
    pub model: Model,
    /// Model directory (the slow tier).
    pub dir: PathBuf,
    /// How experts are read from it.
    pub disk_io: moe_offload::DiskIo,
    /// Prompts with the kind of text each came from.
    pub prompts: Vec<(String, Vec<TokenId>)>,
    /// Tokens generated per sequence.
    pub decode_tokens: usize,
    /// Sequences per step.
    pub micro_batch: usize,
    /// Expert budget as a fraction.
    pub budget: f64,
    /// Cache policy and predictor.
    pub policy: PolicyKind,
    /// Predictor (must forecast whole paths before a step: learned or previous).
    pub predictor: PredictorKind,
    /// Deferral bound.
    pub max_deferral: u32,
}

/// One mode's figures.
pub struct ModeRow {
    /// Grouping mode.
    pub mode: GroupingMode,
    /// Mean distinct experts per micro-batch per MoE layer (decode steps).
    pub distinct: f64,
    /// Expert loads per generated token.
    pub loads_per_token: f64,
    /// Hit ratio.
    pub hit_ratio: f64,
    /// Output tokens per second.
    pub tokens_per_s: f64,
    /// Inter-token latency percentiles (seconds).
    pub itl_p50: f64,
    /// p99.
    pub itl_p99: f64,
    /// Scheduler time over step time.
    pub sched_share: f64,
    /// Longest run of steps a sequence was left out.
    pub max_deferred: u32,
    /// Same tokens as first-come-first-served.
    pub identical: bool,
}

impl RegroupBench {
    fn run_mode(&self, mode: GroupingMode) -> crate::Result<(ModeRow, BTreeMap<u64, Vec<TokenId>>)> {
        let cfg = self.model.config().clone();
        let total = cfg.moe_layers().count() * cfg.moe.num_experts;
        let slots = ((self.budget * total as f64).round() as usize).max(cfg.moe.num_experts);
        let src = DiskExperts::open(&self.dir, &cfg, self.disk_io)?;
        let cc = CacheConfig {
            slots,
            policy: self.policy,
            predictor: self.predictor.clone(),
            depth: 1,
            min_precision: 0.0,
            readers: 1,
        };
        let experts = Experts::Cached(ExpertCache::new(&cfg, Box::new(src), cc)?);
        let n = self.prompts.len();
        let sched = SchedulerConfig { max_num_seqs: n, max_batched_tokens: 512 };
        let per_seq = self.prompts.iter().map(|p| p.1.len()).max().unwrap_or(0) + self.decode_tokens;
        let mut core = EngineCore::new(self.model.clone(), experts, vec![], sched, (n * per_seq.div_ceil(16) + 4, 16))
            .with_grouping(GroupingConfig {
                mode,
                micro_batch: self.micro_batch,
                max_deferral: self.max_deferral,
                seed: 7,
            })?;
        for (i, (_, p)) in self.prompts.iter().enumerate() {
            let req = GenerationRequest {
                prompt: p.clone(),
                sampling: SamplingParams::default(),
                seed: 0,
                max_tokens: self.decode_tokens,
                min_tokens: 0,
                ignore_eos: true,
            };
            core.add(SeqId(i as u64), req)?;
        }
        let mut tokens: BTreeMap<u64, Vec<TokenId>> = BTreeMap::new();
        let mut last: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut gaps = Vec::new();
        let (mut plan_secs, mut step_secs) = (0.0, 0.0);
        let (mut distinct_sum, mut distinct_n) = (0usize, 0usize);
        let mut max_deferred = 0;
        let t0 = Instant::now();
        while !core.is_idle() {
            let t = Instant::now();
            let plan = core.plan();
            plan_secs += t.elapsed().as_secs_f64();
            let decode_only = plan.chunks.iter().all(|c| c.len == 1);
            for &s in core.scheduler().running() {
                max_deferred = max_deferred.max(core.scheduler().deferred(s));
            }
            let out = core.execute(plan).map_err(|(_, e)| e)?;
            step_secs += t.elapsed().as_secs_f64();
            if decode_only {
                distinct_sum += core.last_distinct_experts().iter().sum::<usize>();
                distinct_n += core.last_distinct_experts().len();
            }
            let now = Instant::now();
            for o in out {
                if let Some(prev) = last.insert(o.seq.0, now) {
                    gaps.push(now.duration_since(prev).as_secs_f64());
                }
                tokens.entry(o.seq.0).or_default().push(o.token.id);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        gaps.sort_by(f64::total_cmp);
        let pct = |p: f64| gaps.get(((gaps.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
        let generated: usize = tokens.values().map(Vec::len).sum();
        let stats = core.experts().cache_stats().unwrap_or_default().total();
        Ok((
            ModeRow {
                mode,
                distinct: distinct_sum as f64 / distinct_n.max(1) as f64,
                loads_per_token: stats.loads as f64 / generated.max(1) as f64,
                hit_ratio: stats.hit_ratio(),
                tokens_per_s: generated as f64 / secs,
                itl_p50: pct(0.5),
                itl_p99: pct(0.99),
                sched_share: plan_secs / step_secs.max(1e-12),
                max_deferred,
                identical: false,
            },
            tokens,
        ))
    }

    /// Runs the three modes and renders the comparison.
    pub fn run(&self) -> crate::Result<String> {
        let mut rows = Vec::new();
        let mut reference = None;
        for mode in [GroupingMode::Fcfs, GroupingMode::Random, GroupingMode::Regroup] {
            eprintln!("  {}", mode.name());
            let (mut row, toks) = self.run_mode(mode)?;
            let reference = reference.get_or_insert_with(|| toks.clone());
            row.identical = *reference == toks;
            rows.push(row);
        }
        let mut kinds: Vec<&str> = Vec::new();
        for (k, _) in &self.prompts {
            if !kinds.contains(&k.as_str()) {
                kinds.push(k);
            }
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n{} sequences ({} prompt tokens each, from: {}), {} new tokens each, micro-batch {}, expert budget {:.0}%, {} + {}, deferral bound {}, experts read with --disk-io {}\n",
            self.prompts.len(),
            self.prompts.first().map_or(0, |p| p.1.len()),
            kinds.join(", "),
            self.decode_tokens,
            self.micro_batch,
            self.budget * 100.0,
            self.policy.name(),
            self.predictor.name(),
            self.max_deferral,
            self.disk_io
        );
        let _ = writeln!(s, "| grouping | distinct experts / micro-batch / layer | loads / token | hit ratio | output tok/s | ITL p50 ms | ITL p99 ms | scheduler / step time | longest deferral | same tokens |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.2} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2}% | {} | {} |",
                r.mode.name(),
                r.distinct,
                r.loads_per_token,
                r.hit_ratio,
                r.tokens_per_s,
                r.itl_p50 * 1e3,
                r.itl_p99 * 1e3,
                r.sched_share * 100.0,
                r.max_deferred,
                if r.identical { "yes" } else { "NO" }
            );
        }
        let (f, g) = (&rows[0], &rows[2]);
        let fewer = (1.0 - g.distinct / f.distinct) * 100.0;
        let itl = g.itl_p99 / f.itl_p99;
        let _ = writeln!(s, "\ntargets (regroup against fcfs, same run):\n");
        let _ =
            writeln!(s, "- distinct experts per micro-batch: {fewer:.1}% fewer (target >= 25%): {}", ok(fewer >= 25.0));
        let _ = writeln!(s, "- p99 inter-token latency {itl:.2}x (target <= 1.2x): {}", ok(itl <= 1.2));
        let _ = writeln!(
            s,
            "- scheduler time {:.2}% of step time (target < 5%): {}",
            g.sched_share * 100.0,
            ok(g.sched_share < 0.05)
        );
        Ok(s)
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "MISSED"
    }
}
