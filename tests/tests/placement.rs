//! A placement plan splits the experts over in-process shards: greedy tokens
//! are identical to a single store, and the cross-shard token traffic the
//! server measures equals what `moe-place eval` computes from the routing
//! trace of the same run.

use moe_engine::{EngineCore, GenerationRequest};
use moe_model::{load_model, SamplingParams};
use moe_offload::{Experts, ShardedExperts};
use moe_place::{cluster::Cluster, eval, stats::Stats, traces};
use moe_scheduler::SchedulerConfig;
use moe_types::placement::PlacementPlan;
use moe_types::trace::{write_header, write_token};
use moe_types::SeqId;
use std::collections::BTreeMap;
use std::path::Path;

const PROMPTS: [&str; 3] = ["ROMEO:\nSoft", "QUEEN MARGARET:\nThou", "Second Servingman:\nWhy"];

/// Runs the prompts; returns tokens per sequence, the trace written to
/// `trace` (when given) and the engine.
fn run(experts: Experts, trace: Option<&Path>) -> (BTreeMap<u64, Vec<u32>>, EngineCore<Experts>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe");
    let m = load_model(&dir, &mut ()).unwrap();
    let sched = SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 64 };
    let mut core = EngineCore::new(m.model, experts, vec![], sched, (64, 16));
    core.set_recording(trace.is_some());
    let mut out = Vec::new();
    if trace.is_some() {
        write_header(&mut out, &core.trace_header("tiny-shakespeare-moe")).unwrap();
    }
    for (i, p) in PROMPTS.iter().enumerate() {
        let req = GenerationRequest {
            prompt: m.codec.encode(p, true).unwrap(),
            sampling: SamplingParams::default(),
            seed: 0,
            max_tokens: 20,
            min_tokens: 0,
            ignore_eos: true,
        };
        core.add(SeqId(i as u64), req).unwrap();
    }
    let mut tokens: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    while !core.is_idle() {
        for o in core.step().unwrap() {
            tokens.entry(o.seq.0).or_default().push(o.token.id);
        }
        for t in core.take_trace() {
            write_token(&mut out, &t).unwrap();
        }
    }
    if let Some(path) = trace {
        std::fs::write(path, out).unwrap();
    }
    (tokens, core)
}

fn resident() -> moe_model::ResidentExperts {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe");
    load_model(&dir, &mut ()).unwrap().experts
}

/// Contiguous placement on `gpus` shards, with expert 0 of every layer also
/// replicated on the last shard when `replicate`.
fn plan(gpus: usize, replicate: bool) -> PlacementPlan {
    let mut p = PlacementPlan::new(vec![0, 1, 2, 3], 8, gpus, gpus);
    p.method = "contiguous".into();
    for layer in &mut p.layers {
        for (e, g) in layer.iter_mut().enumerate() {
            *g = vec![(e * gpus / 8) as u16];
        }
        if replicate {
            layer[0].push(gpus as u16 - 1);
        }
    }
    p
}

#[test]
fn sharded_experts_give_identical_tokens_and_the_traffic_eval_predicts() {
    let (want, _) = run(Experts::Resident(resident()), None);
    let tmp = tempfile::tempdir().unwrap();
    for (gpus, replicate) in [(2, false), (4, false), (4, true)] {
        let plan = plan(gpus, replicate);
        let cfg = moe_model::ModelConfig::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe/config.json"),
        )
        .unwrap();
        let sharded = ShardedExperts::new(&cfg, resident(), &plan).unwrap();
        let trace = tmp.path().join(format!("trace-{gpus}-{replicate}.jsonl"));
        let (got, core) = run(Experts::Sharded(sharded), Some(&trace));
        assert_eq!(got, want, "{gpus} shards, replicas {replicate}: tokens differ");
        let Experts::Sharded(s) = core.experts() else { unreachable!() };
        let measured = s.stats();
        let stats = Stats::from_routing(&traces::read_routing(&trace, None).unwrap());
        let score = eval::score(&stats, &Cluster::single_node(gpus, 8), &plan.layers);
        for (l, t) in score.transitions.iter().enumerate() {
            assert!(t.cross > 0.0, "no traffic predicted at transition {l}");
            assert!(
                (measured.cross[l] - t.cross).abs() < 1e-6 * t.cross.max(1.0),
                "{gpus} shards, replicas {replicate}, transition {l}: measured {} vs eval {}",
                measured.cross[l],
                t.cross
            );
            assert!((measured.transitions[l] - t.total).abs() < 1e-6 * t.total);
        }
        for (l, layer) in score.layers.iter().enumerate() {
            for (g, load) in layer.load.iter().enumerate() {
                assert!((measured.load[l][g] - load).abs() < 1e-6 * load.max(1.0), "load of shard {g} layer {l}");
            }
        }
    }
}

#[test]
fn a_plan_that_does_not_fit_the_model_is_refused() {
    let cfg = moe_model::ModelConfig::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe/config.json"),
    )
    .unwrap();
    let mut p = plan(2, false);
    p.layers[1][3] = vec![];
    let e = ShardedExperts::new(&cfg, resident(), &p).err().unwrap().to_string();
    assert!(e.contains("expert 3 of MoE layer 1 is on no GPU"), "{e}");
    let mut p = plan(2, false);
    p.moe_layers = vec![0, 1, 2, 5];
    let e = ShardedExperts::new(&cfg, resident(), &p).err().unwrap().to_string();
    assert!(e.contains("the plan is for MoE layers [0, 1, 2, 5]"), "{e}");
}
