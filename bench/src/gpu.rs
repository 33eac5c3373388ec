//! The model-level half of `scripts/gpu-check.sh` (feature `cuda`): the GPU
//! forward pass against the transformers fixtures and the CPU path, greedy
//! tokens unchanged by every expert budget, policy and predictor of the GPU
//! tier, and the tier's throughput on the bench shape. Needs a GPU; nothing
//! here runs in CI (it compiles there).

use crate::Result;
use moe_engine::{EngineCore, GenerationRequest};
use moe_kernels::cuda::GpuContext;
use moe_model::gpu::{CudaDevice, GpuModel};
use moe_model::{ExpertWeights, LogitsRequest, Model, ModelError, SeqChunk};
use moe_offload::gpu::{GpuBackend, GpuExperts, GpuTierConfig};
use moe_offload::{ExpertSource, MemoryExperts, PolicyKind, PredictorKind};
use moe_scheduler::SchedulerConfig;
use moe_types::{BlockId, SeqId};
use std::path::Path;
use std::time::Instant;

/// Logits on the GPU agree with the reference within this fraction of the
/// reference logits' largest magnitude: products take bf16 activations
/// (about 3 significant digits) where the CPU path keeps f32.
pub const GPU_LOGIT_TOL: f32 = 2e-2;

/// KV block size of these runs.
const BLOCK: usize = 16;

/// A GPU backend for `model` whose experts come from `source`.
pub fn backend(model: &Model, source: &dyn ExpertSource, tier: GpuTierConfig, kv_blocks: usize) -> Result<GpuBackend> {
    let g = GpuContext::new(0).map_err(ModelError::from)?;
    let gm = GpuModel::new(CudaDevice::new(g), model, kv_blocks, BLOCK)?;
    let experts = GpuExperts::new(gm.gpu(), model.config(), source, tier)?;
    Ok(GpuBackend::new(gm, experts))
}

/// Every device operation on the GPU against the host device
/// ([`crate::device_ops::op_suite`]): `(name, error, tolerance)` each.
pub fn compare_ops() -> Result<Vec<(&'static str, f32, f32)>> {
    let g = GpuContext::new(0).map_err(ModelError::from)?;
    let got = crate::device_ops::op_suite(&CudaDevice::new(g))?;
    let want = crate::device_ops::op_suite(&moe_model::device::host::HostDevice)?;
    Ok(got
        .iter()
        .zip(&want)
        .map(|(a, b)| (b.name, crate::device_ops::scaled_error(&a.values, &b.values), b.tol))
        .collect())
}

/// Every expert resident on the GPU.
pub fn resident_tier(model: &Model) -> GpuTierConfig {
    let c = model.config();
    GpuTierConfig {
        slots: c.moe_layers().count() * c.moe.num_experts,
        policy: PolicyKind::Lru,
        predictor: PredictorKind::None,
        depth: 1,
        min_precision: 0.0,
    }
}

/// How the GPU forward pass compares with a transformers fixture.
#[derive(Clone, Debug)]
pub struct Fidelity {
    /// Fixture name.
    pub name: String,
    /// Largest |GPU - reference| over the prompt's logits.
    pub prompt_err: f32,
    /// Largest |reference| over them.
    pub prompt_scale: f32,
    /// Largest |GPU - reference| over the decode steps' logits, relative to their largest |reference|.
    pub decode_rel: f32,
    /// (token, layer) routings equal to the reference's, and how many.
    pub routing: (usize, usize),
    /// Steps whose greedy choice equals the reference's, and how many steps.
    pub greedy: (usize, usize),
    /// Steps choosing another token where the reference's two candidates
    /// are within the tolerance (bf16 rounding may flip those).
    pub near_ties: usize,
}

impl Fidelity {
    /// Within [`GPU_LOGIT_TOL`], and every greedy choice equal to the
    /// reference's but at near ties.
    pub fn pass(&self) -> bool {
        self.prompt_err <= GPU_LOGIT_TOL * self.prompt_scale
            && self.decode_rel <= GPU_LOGIT_TOL
            && self.greedy.0 + self.near_ties == self.greedy.1
    }
}

/// A fixture's reference outputs (those this check compares).
struct Reference {
    input_ids: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
    decode_logits: Vec<f32>,
    /// Per MoE layer (ascending): the prompt tokens' top-k ids, `[tokens * k]`.
    routing: Vec<Vec<u16>>,
}

fn read_reference(dir: &Path) -> std::result::Result<Reference, String> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).map_err(|e| e.to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let ints = |n: &str| -> std::result::Result<Vec<i64>, String> {
        let t = st.tensor(n).map_err(|e| format!("{n}: {e}"))?;
        Ok(t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let floats = |n: &str| -> std::result::Result<Vec<f32>, String> {
        let t = st.tensor(n).map_err(|e| format!("{n}: {e}"))?;
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let mut layers: Vec<usize> =
        st.names().iter().filter_map(|n| n.strip_prefix("topk_ids.")).filter_map(|l| l.parse().ok()).collect();
    layers.sort_unstable();
    let routing = layers
        .iter()
        .map(|l| Ok(ints(&format!("topk_ids.{l}"))?.into_iter().map(|x| x as u16).collect()))
        .collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(Reference {
        input_ids: ints("input_ids")?.into_iter().map(|x| x as u32).collect(),
        logits: floats("logits")?,
        greedy: ints("greedy_ids")?.into_iter().map(|x| x as u32).collect(),
        decode_logits: floats("decode_logits")?,
        routing,
    })
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { f32::INFINITY })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_finite() {
            m.max(d)
        } else {
            f32::INFINITY
        }
    })
}

fn argmax(row: &[f32]) -> u32 {
    moe_model::sampling::argmax(row) as u32
}

/// Runs the fixture in `dir` (a tiny checkpoint plus transformers' logits
/// and greedy continuation, `scripts/gen_fixtures.py`) on the GPU: the
/// prompt in one step with every logits row, then one decode step per
/// reference greedy token through the device KV cache.
pub fn fidelity(dir: &Path) -> Result<Fidelity> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let loaded = moe_model::load_model(dir, &mut ())?;
    let r = read_reference(dir).map_err(|e| ModelError::Input(format!("{name}: reference: {e}")))?;
    let (ids, greedy) = (&r.input_ids, &r.greedy);
    let model = loaded.model;
    let vocab = model.config().vocab_size;
    let source = MemoryExperts::new(loaded.experts.into_weights());
    let total = ids.len() + greedy.len() + 1;
    let blocks: Vec<BlockId> = (0..total.div_ceil(BLOCK) as u32).map(BlockId).collect();
    let mut be = backend(&model, &source, resident_tier(&model), blocks.len())?;
    let (gm, tier) = be.parts();
    let out = gm.forward(
        &model,
        &[SeqChunk { tokens: ids, start_pos: 0, blocks: &blocks, logits: LogitsRequest::All }],
        tier,
    )?;
    let prompt_err = max_diff(&out.logits, &r.logits);
    let prompt_scale = max_abs(&r.logits);
    // routing: each token's chosen experts as a set, per MoE layer
    let mut routing = (0, 0);
    for (got, want) in out.routing.layers.iter().zip(&r.routing) {
        let k = got.top_k;
        for (t, w) in want.chunks_exact(k).enumerate() {
            let mut a: Vec<u16> = got.experts_of(t).iter().map(|e| e.0).collect();
            let mut b = w.to_vec();
            a.sort_unstable();
            b.sort_unstable();
            routing.0 += usize::from(a == b);
            routing.1 += 1;
        }
    }
    // greedy: each step's choice against the reference's (the reference's
    // tokens are fed, so steps are independent); a different choice where
    // the reference's two candidates are within the tolerance is a near tie
    let mut agree = (0, 0);
    let mut judge = |got: &[f32], want: &[f32], tok: u32| {
        let pick = argmax(got);
        if pick == tok {
            agree.0 += 1;
        } else if want[tok as usize] - want[pick as usize] <= GPU_LOGIT_TOL * max_abs(want) {
            agree.1 += 1;
        }
    };
    let last = &r.logits[(ids.len() - 1) * vocab..];
    judge(out.row(out.rows.len() - 1), last, greedy[0]);
    let (mut worst, mut scale) = (0.0f32, 0.0f32);
    // decode: feed the reference's greedy tokens, compare each step's logits
    for (i, &tok) in greedy.iter().enumerate().take(greedy.len().saturating_sub(1)) {
        let step = [tok];
        let o = gm.forward(
            &model,
            &[SeqChunk { tokens: &step, start_pos: ids.len() + i, blocks: &blocks, logits: LogitsRequest::Last }],
            tier,
        )?;
        let want = &r.decode_logits[i * vocab..(i + 1) * vocab];
        worst = worst.max(max_diff(o.row(0), want));
        scale = scale.max(max_abs(want));
        judge(o.row(0), want, greedy[i + 1]);
    }
    Ok(Fidelity {
        name,
        prompt_err,
        prompt_scale,
        decode_rel: if scale > 0.0 { worst / scale } else { worst },
        routing,
        greedy: (agree.0, greedy.len()),
        near_ties: agree.1,
    })
}

/// One configuration of the GPU tier.
#[derive(Clone, Debug)]
pub struct TierCase {
    /// Label.
    pub label: String,
    /// Fraction of the experts with a slot (1 = every expert).
    pub budget: f64,
    /// Victim choice.
    pub policy: PolicyKind,
    /// Forecasts.
    pub predictor: PredictorKind,
    /// MoE layers ahead.
    pub depth: usize,
}

/// What one configuration measured.
#[derive(Clone, Debug)]
pub struct TierRow {
    /// The configuration.
    pub case: TierCase,
    /// Prompt tokens per second (one sequence, one step).
    pub prefill_tps: f64,
    /// Decoded tokens per second (one sequence).
    pub decode_tps: f64,
    /// Residency hits / needs (an expert whose copy was queued counts as a hit).
    pub hit_ratio: f64,
    /// Experts needed whose copy had finished / needed (copies hidden behind compute).
    pub ready_ratio: f64,
    /// Host-to-device bytes copied per decoded token.
    pub bytes_per_token: f64,
    /// Greedy tokens equal to the first configuration's.
    pub same_tokens: bool,
}

/// Runs `prompt` (prefill, then `decode` greedy tokens) under each case and
/// checks every case's tokens equal the first's.
pub fn tier_bench(
    model: &Model,
    experts: &[Vec<ExpertWeights>],
    cases: &[TierCase],
    prompt: &[u32],
    decode: usize,
) -> Result<Vec<TierRow>> {
    let c = model.config();
    let total = c.moe_layers().count() * c.moe.num_experts;
    let source = MemoryExperts::new(experts.to_vec());
    let mut rows: Vec<TierRow> = Vec::new();
    let mut first: Option<Vec<u32>> = None;
    for case in cases {
        let slots = ((case.budget * total as f64).round() as usize).clamp(c.moe.num_experts, total);
        let tier = GpuTierConfig {
            slots,
            policy: case.policy,
            predictor: case.predictor.clone(),
            depth: case.depth,
            min_precision: 0.5,
        };
        let blocks = (prompt.len() + decode + 1).div_ceil(BLOCK) + 1;
        let be = backend(model, &source, tier, blocks)?;
        let sched = SchedulerConfig { max_num_seqs: 1, max_batched_tokens: prompt.len().max(16) };
        let mut core = EngineCore::new(model.clone(), be, vec![], sched, (blocks, BLOCK));
        // warm-up (kernel first launches, cuBLAS heuristics), then measure
        core.generate_greedy(&[prompt.to_vec()], 2)?;
        let bytes0 = core.experts().experts().bytes_copied();
        let req = GenerationRequest {
            prompt: prompt.to_vec(),
            sampling: moe_model::SamplingParams::default(),
            seed: 0,
            max_tokens: decode + 1,
            min_tokens: 0,
            ignore_eos: true,
        };
        core.add(SeqId(1), req)?;
        let t = Instant::now();
        let mut tokens = core.step().map_err(|(_, e)| e)?.into_iter().map(|o| o.token.id).collect::<Vec<_>>();
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        while !core.is_idle() {
            tokens.extend(core.step().map_err(|(_, e)| e)?.into_iter().map(|o| o.token.id));
        }
        let decode_s = t.elapsed().as_secs_f64();
        let tier = core.experts().experts();
        let stats = tier.stats().total();
        let copies = tier.copy_stats();
        let bytes = tier.bytes_copied() - bytes0;
        let same = match &first {
            None => {
                first = Some(tokens.clone());
                true
            }
            Some(f) => *f == tokens,
        };
        rows.push(TierRow {
            case: case.clone(),
            prefill_tps: prompt.len() as f64 / prefill,
            decode_tps: decode as f64 / decode_s,
            hit_ratio: stats.hit_ratio(),
            ready_ratio: copies.ready as f64 / (copies.ready + copies.waited).max(1) as f64,
            bytes_per_token: bytes as f64 / (decode + 1) as f64,
            same_tokens: same,
        });
    }
    Ok(rows)
}

/// The rows as a markdown table, decode and prefill against the first row.
pub fn render_tiers(rows: &[TierRow]) -> String {
    let mut s = String::from(
        "| configuration | budget | prefill tok/s | decode tok/s | decode vs first row | hit ratio | copies done when needed | MB copied / token | tokens same |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let base = rows.first().map_or(1.0, |r| r.decode_tps);
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0}% | {:.0} | {:.1} | {:.2}x | {:.3} | {:.3} | {:.2} | {} |\n",
            r.case.label,
            r.case.budget * 100.0,
            r.prefill_tps,
            r.decode_tps,
            r.decode_tps / base,
            r.hit_ratio,
            r.ready_ratio,
            r.bytes_per_token / 1e6,
            if r.same_tokens { "yes" } else { "NO" }
        ));
    }
    s
}
