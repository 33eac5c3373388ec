//! Numerical fidelity against HuggingFace transformers: each fixture under
//! `tests/fixtures/` is a tiny random checkpoint plus the logits, routing and
//! greedy continuation transformers computed for it (see
//! `scripts/gen_fixtures.py`), with the logits and routing of each decode
//! step. Logits must agree within 1e-4, routing and greedy tokens exactly,
//! for the prompt and for every decode step through the KV cache, whether
//! the sequence runs alone or batched.

use anyhow::{ensure, Context, Result};
use moe_model::{
    load_weights, ExpertProvider, KvCache, LatentPath, LogitsRequest, Model, ModelConfig, SeqChunk, Workspace,
};
use moe_scheduler::{BlockAllocator, BlockTable};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

const LOGIT_TOL: f32 = 1e-4;

struct Reference {
    input_ids: Vec<u32>,
    logits: Vec<f32>,
    /// (layer, top-k ids, top-k weights)
    routing: Vec<(usize, Vec<u16>, Vec<f32>)>,
    greedy: Vec<u32>,
    /// Logits after greedy tokens 1.. (one row per decode step).
    decode_logits: Vec<f32>,
    /// The decode steps' routing, as `routing`, one row per step.
    decode_routing: Vec<(usize, Vec<u16>, Vec<f32>)>,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn read_reference(dir: &Path) -> Result<Reference> {
    let bytes = std::fs::read(dir.join("reference.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let ints = |name: &str| -> Result<Vec<i64>> {
        let t = st.tensor(name).with_context(|| name.to_string())?;
        ensure!(t.dtype() == Dtype::I64, "{name} is not int64");
        Ok(t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let floats = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).with_context(|| name.to_string())?;
        ensure!(t.dtype() == Dtype::F32, "{name} is not f32");
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let mut layers: Vec<usize> =
        st.names().iter().filter_map(|n| n.strip_prefix("topk_ids.")).map(|l| l.parse().unwrap()).collect();
    layers.sort_unstable();
    let routing_of = |prefix: &str| {
        layers
            .iter()
            .map(|&l| {
                let ids = ints(&format!("{prefix}topk_ids.{l}"))?.into_iter().map(|x| x as u16).collect();
                Ok((l, ids, floats(&format!("{prefix}topk_weights.{l}"))?))
            })
            .collect::<Result<Vec<_>>>()
    };
    Ok(Reference {
        input_ids: ints("input_ids")?.into_iter().map(|x| x as u32).collect(),
        logits: floats("logits")?,
        routing: routing_of("")?,
        greedy: ints("greedy_ids")?.into_iter().map(|x| x as u32).collect(),
        decode_logits: floats("decode_logits")?,
        decode_routing: routing_of("decode_")?,
    })
}

/// The largest |a - b|; NaN (or infinity) anywhere in either is infinite, so
/// no tolerance accepts it (`f32::max` would silently drop a NaN).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_finite() {
            m.max(d)
        } else {
            f32::INFINITY
        }
    })
}

#[test]
fn a_nan_or_infinite_value_fails_any_tolerance() {
    assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        // infinite: above every tolerance the checks use (1e-4, 1e-5)
        assert_eq!(max_abs_diff(&[1.0, bad, 3.0], &[1.0, 2.0, 3.0]), f32::INFINITY, "{bad}");
        assert_eq!(max_abs_diff(&[1.0, 2.0, 3.0], &[bad, 2.0, 3.0]), f32::INFINITY, "{bad}");
    }
}

fn argmax(x: &[f32]) -> u32 {
    moe_model::sampling::argmax(x)
}

struct Harness {
    cfg: ModelConfig,
    model: Model,
    experts: moe_model::ResidentExperts,
    kv: KvCache,
    alloc: BlockAllocator,
    ws: Workspace,
}

impl Harness {
    fn load(name: &str) -> Result<(Self, Reference)> {
        let dir = fixture_dir(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let (model, experts) = load_weights(&dir, &cfg, &mut ())?;
        // small blocks so sequences span several, non-contiguous blocks
        let kv = KvCache::new(&cfg, 64, 4);
        Ok((
            Self { alloc: BlockAllocator::new(64, 4), kv, model, experts, cfg, ws: Workspace::new() },
            read_reference(&dir)?,
        ))
    }
}

fn check_fixture(name: &str) -> Result<()> {
    check_fixture_path(name, LatentPath::Auto)
}

/// As [`check_fixture`], with latent attention (DeepSeek) pinned to `path`
/// for the prompt and every decode step.
fn check_fixture_path(name: &str, path: LatentPath) -> Result<()> {
    let (mut h, r) = Harness::load(name)?;
    h.ws.set_latent_path(path);
    let t = r.input_ids.len();
    let v = h.cfg.vocab_size;

    // 1. full prompt alone: logits and routing
    let mut table = BlockTable::new();
    let mut decoy = BlockTable::new();
    decoy.grow_to(&mut h.alloc, 5)?; // interleave another sequence's blocks
    table.grow_to(&mut h.alloc, t)?;
    let out = h.model.forward(
        &[SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: table.blocks(), logits: LogitsRequest::All }],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    let diff = max_abs_diff(&out.logits, &r.logits);
    eprintln!("{name}: max abs logit diff vs transformers = {diff:e}");
    ensure!(diff < LOGIT_TOL, "{name}: max |logit diff| {diff} >= {LOGIT_TOL}");
    ensure!(
        out.routing.layers.len() == r.routing.len(),
        "{name}: {} MoE layers routed, reference has {}",
        out.routing.layers.len(),
        r.routing.len()
    );
    for (got, (layer, ids, weights)) in out.routing.layers.iter().zip(&r.routing) {
        ensure!(got.layer.index() == *layer, "{name}: routed layer {} vs reference {layer}", got.layer);
        let got_ids: Vec<u16> = got.ids.iter().map(|e| e.0).collect();
        ensure!(&got_ids == ids, "{name}: layer {layer} top-k ids differ:\n got {got_ids:?}\nwant {ids:?}");
        let wd = max_abs_diff(&got.weights, weights);
        ensure!(wd < 1e-5, "{name}: layer {layer} routing weights differ by {wd}");
    }

    // 2. greedy continuation through the KV cache, one decode step at a time:
    // each step's logits and routing against transformers'
    let mut next = argmax(&out.logits[(t - 1) * v..]);
    let mut generated = vec![next];
    let k = h.cfg.moe.top_k;
    let steps = r.greedy.len() - 1;
    ensure!(r.decode_logits.len() == steps * v, "{name}: the reference has no logits for {steps} decode steps");
    ensure!(r.decode_routing.len() == r.routing.len(), "{name}: decode routing covers other layers");
    for (step, pos) in (t..t + r.greedy.len() - 1).enumerate() {
        table.grow_to(&mut h.alloc, pos + 1)?;
        let tok = [next];
        let out = h.model.forward(
            &[SeqChunk { tokens: &tok, start_pos: pos, blocks: table.blocks(), logits: LogitsRequest::Last }],
            &mut h.kv,
            &h.experts,
            &mut h.ws,
        )?;
        ensure!(out.routing.layers.len() == r.decode_routing.len(), "{name}: decode step {step} routed other layers");
        let want = &r.decode_logits[step * v..(step + 1) * v];
        let diff = max_abs_diff(out.row(0), want);
        ensure!(diff < LOGIT_TOL, "{name}: decode step {step} (position {pos}): max |logit diff| {diff}");
        for (got, (layer, ids, weights)) in out.routing.layers.iter().zip(&r.decode_routing) {
            let got_ids: Vec<u16> = got.ids.iter().map(|e| e.0).collect();
            ensure!(
                got_ids == ids[step * k..(step + 1) * k],
                "{name}: decode step {step} layer {layer} top-k ids differ"
            );
            let wd = max_abs_diff(&got.weights, &weights[step * k..(step + 1) * k]);
            ensure!(wd < 1e-5, "{name}: decode step {step} layer {layer} routing weights differ by {wd}");
        }
        next = argmax(out.row(0));
        generated.push(next);
    }
    ensure!(generated == r.greedy, "{name}: greedy continuation differs:\n got {generated:?}\nwant {:?}", r.greedy);
    table.release(&mut h.alloc);
    decoy.release(&mut h.alloc);
    Ok(())
}

/// The same prompt split across two steps and batched with another
/// sequence (prefill and decode mixed) gives the reference logits.
fn check_batched(name: &str) -> Result<()> {
    let (mut h, r) = Harness::load(name)?;
    let (t, v) = (r.input_ids.len(), h.cfg.vocab_size);
    let split = 7;
    let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
    a.grow_to(&mut h.alloc, split)?;
    b.grow_to(&mut h.alloc, t)?;
    a.grow_to(&mut h.alloc, t)?;
    let step1 = h.model.forward(
        &[
            SeqChunk { tokens: &r.input_ids[..split], start_pos: 0, blocks: a.blocks(), logits: LogitsRequest::None },
            SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: b.blocks(), logits: LogitsRequest::All },
        ],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    let diff = max_abs_diff(&step1.logits, &r.logits);
    ensure!(diff < LOGIT_TOL, "{name}: batched prefill logits differ by {diff}");
    let b_next = [argmax(&step1.logits[(t - 1) * v..])];
    ensure!(b_next[0] == r.greedy[0], "{name}: batched first greedy token differs");
    b.grow_to(&mut h.alloc, t + 1)?;
    let step2 = h.model.forward(
        &[
            SeqChunk { tokens: &b_next, start_pos: t, blocks: b.blocks(), logits: LogitsRequest::Last },
            SeqChunk {
                tokens: &r.input_ids[split..],
                start_pos: split,
                blocks: a.blocks(),
                logits: LogitsRequest::All,
            },
        ],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    ensure!(argmax(step2.row(0)) == r.greedy[1], "{name}: batched decode token differs");
    let a_logits = &step2.logits[v..];
    let diff = max_abs_diff(a_logits, &r.logits[split * v..]);
    ensure!(diff < LOGIT_TOL, "{name}: chunked prefill logits differ by {diff}");
    Ok(())
}

/// Batch invariance: a sequence's logits are bit-identical whether it runs
/// alone or beside another sequence, its prompt in one step or in two
/// chunks, its decode step alone or beside another decode. The stranger's
/// 40-token chunk makes every product of the first step more than 32 rows.
fn check_batch_invariant(name: &str) -> Result<()> {
    let (mut h, r) = Harness::load(name)?;
    let (t, v) = (r.input_ids.len(), h.cfg.vocab_size);
    let ids = &r.input_ids;
    let mut alone = BlockTable::new();
    alone.grow_to(&mut h.alloc, t + 1)?;
    let chunk = SeqChunk { tokens: ids, start_pos: 0, blocks: alone.blocks(), logits: LogitsRequest::All };
    let prompt = h.model.forward(&[chunk], &mut h.kv, &h.experts, &mut h.ws)?.logits;
    let next = [argmax(&prompt[(t - 1) * v..])];
    let chunk = SeqChunk { tokens: &next, start_pos: t, blocks: alone.blocks(), logits: LogitsRequest::Last };
    let decode = h.model.forward(&[chunk], &mut h.kv, &h.experts, &mut h.ws)?.logits;
    alone.release(&mut h.alloc);

    let stranger: Vec<u32> = (0..60u32).map(|i| (i * 7 + 3) % v as u32).collect();
    let (mut b, mut s) = (BlockTable::new(), BlockTable::new());
    s.grow_to(&mut h.alloc, stranger.len() + 1)?;
    b.grow_to(&mut h.alloc, t + 1)?;
    let split = t / 2;
    let step1 = h.model.forward(
        &[
            SeqChunk { tokens: &stranger[..40], start_pos: 0, blocks: s.blocks(), logits: LogitsRequest::None },
            SeqChunk { tokens: &ids[..split], start_pos: 0, blocks: b.blocks(), logits: LogitsRequest::All },
        ],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    let step2 = h.model.forward(
        &[
            SeqChunk { tokens: &ids[split..], start_pos: split, blocks: b.blocks(), logits: LogitsRequest::All },
            SeqChunk { tokens: &stranger[40..], start_pos: 40, blocks: s.blocks(), logits: LogitsRequest::Last },
        ],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    let stranger_next = [argmax(step2.row(t - split))];
    let step3 = h.model.forward(
        &[
            SeqChunk { tokens: &stranger_next, start_pos: 60, blocks: s.blocks(), logits: LogitsRequest::Last },
            SeqChunk { tokens: &next, start_pos: t, blocks: b.blocks(), logits: LogitsRequest::Last },
        ],
        &mut h.kv,
        &h.experts,
        &mut h.ws,
    )?;
    let same = |what: &str, got: &[f32], want: &[f32]| -> Result<()> {
        let first = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits());
        ensure!(
            got.len() == want.len() && first.is_none(),
            "{name}: {what} logits differ from the sequence alone (first at {first:?}: {:?} vs {:?})",
            first.map(|i| got[i]),
            first.map(|i| want[i])
        );
        Ok(())
    };
    same("first prompt chunk", &step1.logits, &prompt[..split * v])?;
    same("second prompt chunk", &step2.logits[..(t - split) * v], &prompt[split * v..])?;
    same("decode step", step3.row(1), &decode)?;
    b.release(&mut h.alloc);
    s.release(&mut h.alloc);
    Ok(())
}

/// Greedy decoding with the experts behind a half-size cache read from the
/// checkpoint (`DiskExperts`, `O_DIRECT`, two readers): the same logits and
/// tokens as transformers. Exercises each architecture's on-disk expert
/// layout (gpt-oss: slices of merged tensors, MXFP4 blocks).
fn check_cached(name: &str) -> Result<()> {
    use moe_offload::{CacheConfig, DiskExperts, DiskIo, ExpertCache, PolicyKind, PredictorKind};
    let dir = fixture_dir(name);
    let r = read_reference(&dir)?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let (model, _) = load_weights(&dir, &cfg, &mut ())?;
    let src = DiskExperts::open(&dir, &cfg, DiskIo::Direct)?;
    let slots = cfg.moe.num_experts; // half of two MoE layers' experts
    let cc = CacheConfig {
        slots,
        policy: PolicyKind::Lru,
        predictor: PredictorKind::LookAhead,
        depth: 1,
        min_precision: 0.0,
        readers: 2,
    };
    let experts = ExpertCache::new(&cfg, Box::new(src), cc)?;
    let (mut kv, mut alloc, mut ws) = (KvCache::new(&cfg, 64, 4), BlockAllocator::new(64, 4), Workspace::new());
    let (t, v) = (r.input_ids.len(), cfg.vocab_size);
    let mut table = BlockTable::new();
    table.grow_to(&mut alloc, t)?;
    let chunk = SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: table.blocks(), logits: LogitsRequest::All };
    let out = model.forward(&[chunk], &mut kv, &experts, &mut ws)?;
    let diff = max_abs_diff(&out.logits, &r.logits);
    ensure!(diff < LOGIT_TOL, "{name} cached: max |logit diff| {diff}");
    let mut next = argmax(&out.logits[(t - 1) * v..]);
    let mut generated = vec![next];
    for pos in t..t + r.greedy.len() - 1 {
        table.grow_to(&mut alloc, pos + 1)?;
        let tok = [next];
        let chunk = SeqChunk { tokens: &tok, start_pos: pos, blocks: table.blocks(), logits: LogitsRequest::Last };
        next = argmax(model.forward(&[chunk], &mut kv, &experts, &mut ws)?.row(0));
        generated.push(next);
    }
    ensure!(generated == r.greedy, "{name} cached: greedy continuation differs");
    let s = experts.stats().total();
    ensure!(s.loads > slots as u64 && s.misses > 0, "{name} cached: the cache never evicted ({s:?})");
    Ok(())
}

#[test]
fn gpt_oss_experts_stream_from_disk_through_a_half_size_cache() {
    for name in ["gpt_oss", "gpt_oss_bf16", "gpt_oss_mxfp4", "mixtral"] {
        check_cached(name).unwrap();
    }
}

#[test]
fn deepseek_and_glm_experts_stream_from_disk_through_a_half_size_cache() {
    for name in ["deepseek_v2", "deepseek_v2_grouped", "deepseek_v3", "deepseek_v3_fp8", "glm4_moe"] {
        check_cached(name).unwrap();
    }
}

#[test]
fn fp8_experts_stay_one_byte_per_weight() {
    let dir = fixture_dir("deepseek_v3_fp8");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (_, experts) = load_weights(&dir, &cfg, &mut ()).unwrap();
    let layer = cfg.moe_layers().next().unwrap();
    let w = experts.get(moe_types::LayerId(layer as u16), moe_types::ExpertId(0)).unwrap();
    let (h, f) = (cfg.hidden_size, cfg.moe.expert_ffn);
    assert_eq!(w.gate_up.quant_format(), Some(moe_kernels::QuantFormat::Fp8E4m3));
    assert_eq!(w.down.quant_format(), Some(moe_kernels::QuantFormat::Fp8E4m3));
    // one byte a weight plus an f32 scale per 128
    assert_eq!(w.nbytes(), 3 * h * f * 132 / 128);
    let locs = moe_model::locate_experts(&moe_model::Checkpoint::open(&dir).unwrap(), &cfg).unwrap();
    assert_eq!(locs[layer][0].resident_bytes(), w.nbytes());
}

/// `--expert-activations int8`: the MXFP4 experts' products quantize the
/// activations as llama.cpp does: no longer exact, close, and it does change
/// the computation (so the exact default is what the fidelity tests check).
#[test]
fn int8_activations_are_close_but_not_exact() {
    let dir = fixture_dir("gpt_oss_mxfp4");
    let r = read_reference(&dir).unwrap();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (model, experts) = load_weights(&dir, &cfg, &mut ()).unwrap();
    let experts = experts.with_int8_activations();
    let (mut kv, mut alloc, mut ws) = (KvCache::new(&cfg, 64, 4), BlockAllocator::new(64, 4), Workspace::new());
    let mut table = BlockTable::new();
    table.grow_to(&mut alloc, r.input_ids.len()).unwrap();
    let chunk = SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: table.blocks(), logits: LogitsRequest::All };
    let out = model.forward(&[chunk], &mut kv, &experts, &mut ws).unwrap();
    let diff = max_abs_diff(&out.logits, &r.logits);
    let scale = r.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("int8 activations: max |logit diff| {diff:e} (largest logit {scale})");
    assert!(diff > LOGIT_TOL / 100.0, "int8 activations changed nothing: {diff}");
    assert!(diff < 0.05 * scale, "int8 activations are far off: {diff} of {scale}");
}

macro_rules! fidelity {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn matches_transformers() {
                super::check_fixture(stringify!($name)).unwrap();
            }
            #[test]
            fn batched_and_chunked_match() {
                super::check_batched(stringify!($name)).unwrap();
            }
            #[test]
            fn logits_do_not_depend_on_the_batch() {
                super::check_batch_invariant(stringify!($name)).unwrap();
            }
        }
    )*};
}

fidelity!(
    mixtral,
    mixtral_bf16,
    mixtral_window,
    mixtral_yarn,
    qwen2_moe,
    qwen3_moe,
    qwen3_moe_yarn,
    olmoe,
    gpt_oss,
    gpt_oss_bf16,
    gpt_oss_mxfp4,
    deepseek_v2,
    deepseek_v2_grouped,
    deepseek_v3,
    deepseek_v3_fp8,
    glm4_moe
);

/// Latent attention's two forms, each alone for the prompt and every decode
/// step, against transformers.
macro_rules! latent_paths {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn absorbed_form_matches_transformers() {
                super::super::check_fixture_path(stringify!($name), super::super::LatentPath::Absorbed).unwrap();
            }
            #[test]
            fn expanded_form_matches_transformers() {
                super::super::check_fixture_path(stringify!($name), super::super::LatentPath::Expanded).unwrap();
            }
        }
    )*};
}

mod latent {
    latent_paths!(deepseek_v2, deepseek_v2_grouped, deepseek_v3, deepseek_v3_fp8);
}

#[test]
fn the_latent_cache_holds_the_latent_and_the_rope_key() {
    let cfg = ModelConfig::from_file(&fixture_dir("deepseek_v2").join("config.json")).unwrap();
    // kv_lora_rank 32 + qk_rope_head_dim 8 per token and layer, no values
    assert_eq!(KvCache::new(&cfg, 4, 4).widths(), (40, 0));
    assert_eq!(cfg.kv_bytes_per_token(), 4 * 40 * 3);
    // expanded: 4 heads of 24-wide keys and 16-wide values
    assert_eq!(cfg.expanded_kv_bytes_per_token(), 4 * 4 * (24 + 16) * 3);
}

/// The harness must notice a wrong weight: perturb one expert weight and the
/// comparison has to fail.
#[test]
fn a_perturbed_weight_is_detected() {
    let dir = tempfile_copy("mixtral");
    perturb_first_expert_value(&dir.join("model.safetensors"));
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (model, experts) = load_weights(&dir, &cfg, &mut ()).unwrap();
    let r = read_reference(&fixture_dir("mixtral")).unwrap();
    let mut kv = KvCache::new(&cfg, 8, 16);
    let blocks: Vec<_> = (0..1).map(moe_types::BlockId).collect();
    let out = model
        .forward(
            &[SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: &blocks, logits: LogitsRequest::All }],
            &mut kv,
            &experts,
            &mut Workspace::new(),
        )
        .unwrap();
    assert!(max_abs_diff(&out.logits, &r.logits) >= LOGIT_TOL, "perturbation went unnoticed");
    let _ = experts.get(moe_types::LayerId(0), moe_types::ExpertId(0)).unwrap();
    std::fs::remove_dir_all(dir).ok();
}

fn tempfile_copy(name: &str) -> PathBuf {
    let src = fixture_dir(name);
    let dst = std::env::temp_dir().join(format!("moe-fidelity-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// Adds 0.5 to the first value of every expert-0 w1 matrix (f32 file).
fn perturb_first_expert_value(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let (header, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info("model.layers.0.block_sparse_moe.experts.0.w1.weight").unwrap();
    let at = 8 + header + info.data_offsets.0;
    let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) + 0.5;
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// The real Mixtral tokenizer (shared material) encodes as transformers does.
#[test]
fn mixtral_tokenizer_hello_world() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tokenizers/mixtral-tokenizer.json");
    let codec = moe_model::TextCodec::from_tokenizer_file(&path).unwrap();
    assert_eq!(codec.encode("Hello world", true).unwrap(), vec![1, 22557, 1526]);
    assert_eq!(codec.decode(&[1, 22557, 1526], true).unwrap(), "Hello world");
}

/// Streaming detokenization yields exactly the full decode, even when a
/// character spans several byte-fallback tokens.
#[test]
fn incremental_decoding_matches_full_decode() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tokenizers/mixtral-tokenizer.json");
    let codec = moe_model::TextCodec::from_tokenizer_file(&path).unwrap();
    let text = "Héllo 🦀 wörld, 東京!  spaces\nnew line";
    let ids = codec.encode(text, false).unwrap();
    let mut dec = moe_model::IncrementalDecoder::new();
    let mut streamed = String::new();
    let mut partial_seen = false;
    for &id in &ids {
        let delta = dec.push(&codec, id).unwrap();
        partial_seen |= delta.is_empty();
        assert!(!delta.contains('\u{FFFD}'), "a partial character leaked: {delta:?}");
        streamed.push_str(&delta);
    }
    streamed.push_str(&dec.finish(&codec).unwrap());
    assert_eq!(streamed, codec.decode(&ids, true).unwrap());
    assert_eq!(streamed, text);
    assert!(partial_seen, "the text should exercise held-back bytes");
}

/// The fixtures of the architectures the device (GPU) forward pass implements.
const DEVICE_FIXTURES: [&str; 9] = [
    "mixtral",
    "mixtral_bf16",
    "mixtral_window",
    "mixtral_yarn",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_moe_yarn",
    "olmoe",
    "glm4_moe",
];

/// The GPU forward pass's plan (checked on the host, before any device is
/// touched): the architectures it implements pass, with their variants
/// (shared-expert gates, q/k norms, sliding windows, YaRN, partial rotary,
/// grouped sigmoid routing, bf16); the others are refused, naming what is
/// missing.
#[test]
fn the_gpu_plan_covers_five_architectures_and_names_the_rest() {
    for name in DEVICE_FIXTURES {
        let dir = fixture_dir(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let (model, _) = load_weights(&dir, &cfg, &mut ()).unwrap();
        let plan = model.gpu_plan(4, 16, 8).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(plan.weights >= model.nbytes() && plan.kv > 0, "{name}: {plan:?}");
    }
    for (name, missing) in [
        ("deepseek_v3", "multi-head latent attention"),
        ("deepseek_v2", "multi-head latent attention"),
        ("gpt_oss", "gpt-oss"),
    ] {
        let dir = fixture_dir(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let (model, _) = load_weights(&dir, &cfg, &mut ()).unwrap();
        let e = model.check_gpu_support().err().unwrap_or_else(|| panic!("{name} passed")).to_string();
        assert!(e.contains(missing) && e.contains("--device cpu"), "{name}: {e}");
    }
}

/// The device forward pass (the GPU pass's orchestration: buffers, head
/// segments, block tables, token groups, host routing) run on host memory
/// (`moe_model::device::host`) against transformers, as `check_fixture`
/// checks the CPU pass: the prompt's logits and routing, every decode step
/// through the device KV cache, the greedy continuation, and two sequences
/// in one step over interleaved blocks of 4 slots.
fn check_device_pass(name: &str) -> Result<()> {
    use moe_model::device::host::{HostDevice, HostExperts};
    use moe_model::device::DeviceModel;
    use moe_types::BlockId;
    let dir = fixture_dir(name);
    let r = read_reference(&dir)?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let (model, experts) = load_weights(&dir, &cfg, &mut ())?;
    let (t, v) = (r.input_ids.len(), cfg.vocab_size);
    let mut dm = DeviceModel::new(HostDevice, &model, 64, 4)?;
    let mut tier = HostExperts(experts);
    // blocks 1, 3, 5, ... for the sequence, so its table is not the identity
    let blocks: Vec<BlockId> = (0..32u32).map(|i| BlockId(2 * i + 1)).collect();
    let out = dm.forward(
        &model,
        &[SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: &blocks, logits: LogitsRequest::All }],
        &mut tier,
    )?;
    let diff = max_abs_diff(&out.logits, &r.logits);
    ensure!(diff < LOGIT_TOL, "{name}: device pass: max |logit diff| {diff} vs transformers");
    for (got, (layer, ids, _)) in out.routing.layers.iter().zip(&r.routing) {
        let got_ids: Vec<u16> = got.ids.iter().map(|e| e.0).collect();
        ensure!(&got_ids == ids, "{name}: device pass: layer {layer} top-k ids differ");
    }
    let mut next = argmax(&out.logits[(t - 1) * v..]);
    let mut generated = vec![next];
    for (step, pos) in (t..t + r.greedy.len() - 1).enumerate() {
        let tok = [next];
        let o = dm.forward(
            &model,
            &[SeqChunk { tokens: &tok, start_pos: pos, blocks: &blocks, logits: LogitsRequest::Last }],
            &mut tier,
        )?;
        let diff = max_abs_diff(o.row(0), &r.decode_logits[step * v..(step + 1) * v]);
        ensure!(diff < LOGIT_TOL, "{name}: device pass: decode step {step}: max |logit diff| {diff}");
        next = argmax(o.row(0));
        generated.push(next);
    }
    ensure!(generated == r.greedy, "{name}: device pass: greedy continuation differs");

    // two sequences in one step: A continues its prompt after a first chunk,
    // B runs its whole prompt; blocks interleaved (even ones, in reverse for A)
    let split = t / 2;
    let a_blocks: Vec<BlockId> = (0..16u32).rev().map(|i| BlockId(2 * i)).collect();
    let b_blocks: Vec<BlockId> = (0..16u32).map(|i| BlockId(2 * i + 1)).collect();
    let first =
        [SeqChunk { tokens: &r.input_ids[..split], start_pos: 0, blocks: &a_blocks, logits: LogitsRequest::None }];
    ensure!(dm.forward(&model, &first, &mut tier)?.logits.is_empty(), "{name}: rows without a request");
    let both = [
        SeqChunk { tokens: &r.input_ids[split..], start_pos: split, blocks: &a_blocks, logits: LogitsRequest::Last },
        SeqChunk { tokens: &r.input_ids, start_pos: 0, blocks: &b_blocks, logits: LogitsRequest::Last },
    ];
    let o = dm.forward(&model, &both, &mut tier)?;
    let want = &r.logits[(t - 1) * v..];
    for row in 0..2 {
        let diff = max_abs_diff(o.row(row), want);
        ensure!(diff < LOGIT_TOL, "{name}: device pass, batched: sequence {row}: max |logit diff| {diff}");
    }
    Ok(())
}

#[test]
fn the_device_pass_matches_transformers_on_every_architecture_it_covers() {
    for name in DEVICE_FIXTURES {
        check_device_pass(name).unwrap();
    }
}
