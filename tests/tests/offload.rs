//! Expert offloading changes when experts are read, never what is computed:
//! greedy tokens of concurrent sequences on the built-in model are identical
//! to the fully resident run at several budgets, for every policy and
//! predictor; and a slow tier that stops being readable fails the affected
//! requests with a clear error while the engine keeps serving.

use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{load_model, load_model_without_experts, ModelConfig, SamplingParams};
use moe_offload::{CacheConfig, DiskExperts, DiskIo, ExpertCache, Experts, PolicyKind, PredictorKind};
use moe_scheduler::SchedulerConfig;
use moe_types::SeqId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe")
}

const PROMPTS: [&str; 4] = ["ROMEO:\nWhat light", "KING HENRY:\nOnce more", "First Citizen:\nWe are", "JULIET:\nO"];

fn engine(dir: &Path, experts: Experts) -> EngineCore<Experts> {
    let (model, _) = load_model_without_experts(dir, &mut ()).unwrap();
    let sched = SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64 };
    EngineCore::new(model, experts, vec![], sched, (64, 16))
}

fn requests(dir: &Path) -> Vec<GenerationRequest> {
    let codec = load_model(dir, &mut ()).unwrap().codec;
    PROMPTS
        .iter()
        .map(|p| GenerationRequest {
            prompt: codec.encode(p, true).unwrap(),
            sampling: SamplingParams::default(),
            seed: 0,
            max_tokens: 24,
            min_tokens: 0,
            ignore_eos: true,
        })
        .collect()
}

fn run(core: &mut EngineCore<Experts>, reqs: &[GenerationRequest]) -> BTreeMap<u64, Vec<u32>> {
    for (i, r) in reqs.iter().enumerate() {
        core.add(SeqId(i as u64), r.clone()).unwrap();
    }
    let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    while !core.is_idle() {
        for o in core.step().unwrap() {
            out.entry(o.seq.0).or_default().push(o.token.id);
        }
    }
    out
}

/// How the disk tier reads: page-cache mode and readers in flight.
type Tier = (DiskIo, usize);

fn cached(dir: &Path, slots: usize, policy: PolicyKind, predictor: PredictorKind, depth: usize, tier: Tier) -> Experts {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = DiskExperts::open(dir, &cfg, tier.0).unwrap();
    let cc = CacheConfig { slots, policy, predictor, depth, min_precision: 0.0, readers: tier.1 };
    Experts::Cached(ExpertCache::new(&cfg, Box::new(src), cc).unwrap())
}

#[test]
fn greedy_tokens_are_identical_at_every_budget_policy_and_predictor() {
    let dir = model_dir();
    let reqs = requests(&dir);
    let resident = Experts::Resident(load_model(&dir, &mut ()).unwrap().experts);
    let reference = run(&mut engine(&dir, resident), &reqs);
    assert_eq!(reference.len(), 4);
    let learned = PredictorKind::Learned(dir.join("path_predictor.safetensors"));
    let hidden = PredictorKind::Hidden(dir.join("hidden_predictor.safetensors"));
    let combined = PredictorKind::Combined(vec![hidden.clone(), learned.clone()]);
    let predictors =
        [PredictorKind::None, PredictorKind::PreviousToken, PredictorKind::LookAhead, learned, hidden, combined];
    // 8, 16 and 24 of the 32 experts: 25%, 50%, 75%; each with its own way
    // of reading the disk (several readers make load completion order vary)
    for (slots, tier) in [(8, (DiskIo::Direct, 3)), (16, (DiskIo::Release, 2)), (24, (DiskIo::Direct, 1))] {
        for policy in PolicyKind::ALL {
            for predictor in &predictors {
                if policy == PolicyKind::Predictive && *predictor == PredictorKind::None {
                    continue;
                }
                let depth = if slots == 16 { 2 } else { 1 };
                let mut core = engine(&dir, cached(&dir, slots, policy, predictor.clone(), depth, tier));
                let got = run(&mut core, &reqs);
                let what = format!("{slots} slots, {} + {}, {} x{}", policy.name(), predictor.name(), tier.0, tier.1);
                assert_eq!(got, reference, "{what}");
                let s = core.experts().cache_stats().unwrap();
                let t = s.total();
                assert!(t.loads >= 8 && t.misses > 0, "{what}: {t:?}");
                assert!(s.resident <= slots, "{what}: over budget");
                if *predictor != PredictorKind::None {
                    assert!(t.predicted > 0 && t.predicted_right > 0, "{what}: the predictor never forecast");
                }
            }
        }
    }
}

#[test]
fn an_unreadable_checkpoint_fails_the_step_not_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let dir = tmp.path();
    let reqs = requests(dir);
    let mut core = engine(dir, cached(dir, 8, PolicyKind::Lru, PredictorKind::None, 1, (DiskIo::Direct, 2)));
    core.add(SeqId(0), reqs[0].clone()).unwrap();
    core.step().unwrap();
    let weights = dir.join("model.safetensors");
    std::fs::rename(&weights, dir.join("elsewhere")).unwrap();
    let (failed, err) = loop {
        match core.step() {
            Ok(_) => assert!(!core.is_idle(), "the sequence finished without needing a load"),
            Err(e) => break e,
        }
    };
    assert_eq!(failed, vec![SeqId(0)]);
    let msg = err.to_string();
    assert!(msg.contains("unavailable") && msg.contains("model.safetensors"), "{msg}");
    assert!(core.is_idle(), "the failed sequence was removed");
    assert_eq!(core.scheduler().num_running(), 0);
    std::fs::rename(dir.join("elsewhere"), &weights).unwrap();
    let again = run(&mut core, &reqs[1..2]);
    assert_eq!(again[&0].len(), 24, "the engine serves again once the file is back");
}

/// Micro-batches of 2 out of 4 sequences under every grouping mode give the
/// same greedy tokens as running everything every step, and regrouping
/// really defers sequences (it is exercised, not bypassed).
#[test]
fn regrouped_micro_batches_give_the_same_tokens_as_fcfs() {
    use moe_scheduler::{GroupingConfig, GroupingMode};
    let dir = model_dir();
    let reqs = requests(&dir);
    let learned = || PredictorKind::Learned(dir.join("path_predictor.safetensors"));
    let reference =
        run(&mut engine(&dir, cached(&dir, 16, PolicyKind::Predictive, learned(), 1, (DiskIo::Direct, 1))), &reqs);
    for mode in [GroupingMode::Fcfs, GroupingMode::Random, GroupingMode::Regroup] {
        let g = GroupingConfig { mode, micro_batch: 2, max_deferral: 8, seed: 1 };
        let mut core = engine(&dir, cached(&dir, 16, PolicyKind::Predictive, learned(), 1, (DiskIo::Direct, 1)))
            .with_grouping(g)
            .unwrap();
        assert_eq!(run(&mut core, &reqs), reference, "{mode:?}");
        assert!(core.scheduler().deferrals() > 0, "{mode:?}: nothing was deferred");
    }
}

/// DeepSeek (latent attention, grouped softmax and sigmoid routing with a
/// correction bias, FP8 experts) and GLM fixtures: the resident tokens at half
/// the experts under every policy and predictor that needs no trained file,
/// and under every grouping mode (shared experts stay outside the cache).
#[test]
fn deepseek_and_glm_tokens_are_identical_under_every_policy_predictor_and_grouping() {
    use moe_scheduler::{GroupingConfig, GroupingMode};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for name in ["deepseek_v2_grouped", "deepseek_v3", "deepseek_v3_fp8", "glm4_moe"] {
        let dir = fixtures.join(name);
        let reqs = requests(&dir);
        let resident = Experts::Resident(load_model(&dir, &mut ()).unwrap().experts);
        let reference = run(&mut engine(&dir, resident), &reqs);
        let slots = 8; // of 2 MoE layers x 8 experts
        let tier = (DiskIo::Cached, 2);
        for policy in PolicyKind::ALL {
            for predictor in [PredictorKind::None, PredictorKind::PreviousToken, PredictorKind::LookAhead] {
                if policy == PolicyKind::Predictive && predictor == PredictorKind::None {
                    continue;
                }
                let mut core = engine(&dir, cached(&dir, slots, policy, predictor.clone(), 1, tier));
                let what = format!("{name}: {} + {}", policy.name(), predictor.name());
                assert_eq!(run(&mut core, &reqs), reference, "{what}");
                let t = core.experts().cache_stats().unwrap().total();
                assert!(t.misses > 0 && t.loads > slots as u64, "{what}: {t:?}");
            }
        }
        for mode in [GroupingMode::Fcfs, GroupingMode::Random, GroupingMode::Regroup] {
            let g = GroupingConfig { mode, micro_batch: 2, max_deferral: 8, seed: 1 };
            let experts = cached(&dir, slots, PolicyKind::Predictive, PredictorKind::LookAhead, 1, tier);
            let mut core = engine(&dir, experts).with_grouping(g).unwrap();
            assert_eq!(run(&mut core, &reqs), reference, "{name}: {mode:?}");
            assert!(core.scheduler().deferrals() > 0, "{name}: {mode:?}: nothing was deferred");
        }
    }
}
