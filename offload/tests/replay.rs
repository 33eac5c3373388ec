//! Trace replay: a routing trace recorded from the built-in model
//! (`moe-serve trace --window 12 --max-windows 40` on tinyshakespeare),
//! replayed as decode steps of four sequences through the expert cache at several budgets, policies and predictors, with
//! every load finished before the next call (an infinitely fast slow tier, so
//! the counts do not depend on timing). The counts must equal the ones the
//! previous cache (before the residency core) produced on the same trace,
//! kept in `fixtures/replay_counts.json` (`RECORD_REPLAY=1` rewrites it).

use moe_model::{Checkpoint, ExpertPlanner, ExpertProvider, ModelConfig, ResidentExperts, StepToken};
use moe_offload::residency::{Command, ExpertKey, Pin, ResidencyConfig, ResidencyCore};
use moe_offload::{CacheConfig, CacheStats, ExpertCache, MemoryExperts, PolicyKind, PredictorChoice, PredictorKind};
use moe_types::trace::{read_trace, TraceToken};
use moe_types::{ExpertId, LayerId, LayerRouting, MoeLayerId, SeqId};
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The configurations replayed: (slots, policy, predictor).
fn configs() -> Vec<(usize, PolicyKind, &'static str)> {
    let mut out = Vec::new();
    for slots in [8, 12, 20] {
        for (policy, predictor) in [
            (PolicyKind::Lru, "none"),
            (PolicyKind::Lfu, "none"),
            (PolicyKind::Lru, "previous"),
            (PolicyKind::Lfu, "learned"),
            (PolicyKind::Predictive, "previous"),
            (PolicyKind::Predictive, "learned"),
        ] {
            out.push((slots, policy, predictor));
        }
    }
    out
}

fn predictor(name: &str) -> PredictorKind {
    name.parse::<PredictorChoice>()
        .unwrap()
        .resolve(model_dir().join("path_predictor.safetensors"), model_dir().join("hidden_predictor.safetensors"))
}

/// The recorded tokens replayed as decode steps: four sequences at a time,
/// one token of each per step, in position order.
fn steps() -> Vec<Vec<TraceToken>> {
    let file = std::fs::File::open(fixture("replay.trace.jsonl")).unwrap();
    let (_, mut records) = read_trace(std::io::BufReader::new(file)).unwrap();
    records.sort_by_key(|t| (t.seq / 4, t.pos, t.seq));
    let mut steps: Vec<Vec<TraceToken>> = Vec::new();
    for r in records {
        match steps.last_mut() {
            Some(s) if (s[0].seq / 4, s[0].pos) == (r.seq / 4, r.pos) => s.push(r),
            _ => steps.push(vec![r]),
        }
    }
    steps
}

fn counts(s: &CacheStats) -> serde_json::Value {
    let layers: Vec<_> = s
        .layers
        .iter()
        .map(|l| {
            serde_json::json!([
                l.hits,
                l.misses,
                l.late,
                l.prefetch_issued,
                l.prefetch_used,
                l.prefetch_wasted,
                l.loads,
                l.bytes_loaded,
                l.predicted_right,
                l.predicted,
                l.actual
            ])
        })
        .collect();
    serde_json::json!({ "layers": layers, "resident": s.resident, "load_failures": s.load_failures })
}

/// One call of the replay, in order.
enum Event<'a> {
    /// A sequence ended (seen before, absent from this step).
    EndSequence(SeqId),
    /// A step begins over these tokens.
    BeginStep(&'a [StepToken]),
    /// An MoE layer runs: its routing and its distinct experts, ascending.
    Layer { moe: MoeLayerId, routing: &'a LayerRouting, used: &'a [ExpertId] },
}

/// Replays the recorded steps through `on`, the same calls for every driver.
fn replay(cfg: &ModelConfig, mut on: impl FnMut(Event<'_>)) {
    let moe_layers: Vec<usize> = cfg.moe_layers().collect();
    let mut live: Vec<u64> = Vec::new();
    for step in steps() {
        for s in live.iter().filter(|s| !step.iter().any(|t| t.seq == **s)) {
            on(Event::EndSequence(SeqId(*s)));
        }
        live = step.iter().map(|t| t.seq).collect();
        let tokens: Vec<StepToken> = step.iter().map(|t| StepToken { seq: SeqId(t.seq), token: t.token }).collect();
        on(Event::BeginStep(&tokens));
        for (i, &l) in moe_layers.iter().enumerate() {
            let ids: Vec<ExpertId> = step.iter().flat_map(|t| t.experts[i].iter().map(|&e| ExpertId(e))).collect();
            let weights: Vec<f32> = step.iter().flat_map(|t| t.weights[i].iter().copied()).collect();
            let routing = LayerRouting { layer: LayerId(l as u16), top_k: cfg.moe.top_k, ids, weights };
            let mut used = routing.ids.clone();
            used.sort_unstable();
            used.dedup();
            on(Event::Layer { moe: MoeLayerId(i as u16), routing: &routing, used: &used });
        }
    }
}

/// Replays through a threaded cache, waiting for the loader after every call.
fn replay_cache(
    cfg: &ModelConfig,
    weights: &[Vec<moe_model::ExpertWeights>],
    c: (usize, PolicyKind, &str),
) -> serde_json::Value {
    let src = MemoryExperts::new(weights.to_vec());
    let cache = ExpertCache::new(
        cfg,
        Box::new(src),
        CacheConfig { slots: c.0, policy: c.1, predictor: predictor(c.2), depth: 2, min_precision: 0.0, readers: 1 },
    )
    .unwrap();
    replay(cfg, |ev| match ev {
        Event::EndSequence(seq) => cache.end_sequence(seq),
        Event::BeginStep(tokens) => {
            cache.begin_step(tokens);
            cache.wait_idle();
        }
        Event::Layer { routing, used, .. } => {
            cache.prepare(routing, used).unwrap();
            cache.wait_idle();
            for &e in used {
                drop(cache.get(routing.layer, e).unwrap());
                cache.wait_idle();
            }
        }
    });
    counts(&cache.stats())
}

#[test]
fn replayed_counts_equal_the_previous_caches() {
    let dir = model_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let weights = ResidentExperts::load(&ck, &cfg, |_| {}).unwrap().into_weights();
    let mut got = serde_json::Map::new();
    for c in configs() {
        got.insert(format!("{}-{}-{}", c.0, c.1.name(), c.2), replay_cache(&cfg, &weights, c));
    }
    let got = serde_json::Value::Object(got);
    let path = fixture("replay_counts.json");
    if std::env::var_os("RECORD_REPLAY").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&got[k], v, "counts differ at {k}");
    }
}

/// Executes every command at once, as a mover with an instant slow tier.
fn drain(core: &mut ResidencyCore) {
    while let Some(cmd) = core.poll(true) {
        match cmd {
            Command::Evict { key, .. } => core.evicted(key).unwrap(),
            Command::Load { key, prefetch, .. } => core.loaded(key, prefetch, Ok(())).unwrap(),
        }
        core.check().unwrap();
    }
}

/// The same replay on the bare residency core, no threads: the counts equal
/// the threaded cache's and the previous cache's.
#[test]
fn the_bare_core_replays_to_the_same_counts() {
    let dir = model_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("replay_counts.json")).unwrap()).unwrap();
    let expert_bytes = 3 * cfg.hidden_size * cfg.moe.expert_ffn * 2; // bf16
    for c in configs() {
        let mut core = ResidencyCore::new(ResidencyConfig {
            layers: cfg.moe_layers().count(),
            experts: cfg.moe.num_experts,
            top_k: cfg.moe.top_k,
            slots: c.0,
            expert_bytes: expert_bytes as u64,
            policy: c.1,
            predictor: predictor(c.2),
            depth: 2,
            min_precision: 0.0,
        })
        .unwrap();
        replay(&cfg, |ev| match ev {
            Event::EndSequence(seq) => core.end_sequence(seq),
            Event::BeginStep(tokens) => {
                core.begin_step(tokens);
                drain(&mut core);
            }
            Event::Layer { moe, routing, used } => {
                core.prepare(moe, routing, used).unwrap();
                drain(&mut core);
                for &expert in used {
                    let key = ExpertKey { layer: moe, expert };
                    assert!(matches!(core.pin(key, false).unwrap(), Pin::Ready(_)));
                    core.unpin(key).unwrap();
                    drain(&mut core);
                }
            }
        });
        let name = format!("{}-{}-{}", c.0, c.1.name(), c.2);
        assert_eq!(counts(&core.stats()), want[&name], "counts differ at {name}");
    }
}
