//! Greedy output of a request is the same whether it runs alone or batched
//! with others, under chunked prefill, tight token budgets and preemption.

use moe_engine::{spawn_engine, EngineCore, EngineEvent, EngineLimits, FinishReason, GenerationRequest};
use moe_model::{load_weights, ModelConfig, ResidentExperts, SamplingParams};
use moe_scheduler::SchedulerConfig;
use moe_types::SeqId;
use std::collections::HashMap;
use std::path::Path;

fn core(sched: SchedulerConfig, kv: (usize, usize)) -> EngineCore<ResidentExperts> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_moe");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (model, experts) = load_weights(&dir, &cfg, &mut ()).unwrap();
    EngineCore::new(model, experts, vec![2], sched, kv)
}

fn request(i: usize, max_tokens: usize) -> GenerationRequest {
    let prompt = (0..3 + 5 * i).map(|j| (3 + (i * 31 + j * 17) % 250) as u32).collect();
    GenerationRequest {
        prompt,
        sampling: SamplingParams::default(),
        seed: 0,
        max_tokens,
        min_tokens: 0,
        ignore_eos: true,
    }
}

fn run_all(core: &mut EngineCore<ResidentExperts>, reqs: &[(u64, GenerationRequest)]) -> HashMap<u64, Vec<u32>> {
    for (id, r) in reqs {
        core.add(SeqId(*id), r.clone()).unwrap();
    }
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut steps = 0;
    while !core.is_idle() {
        for o in core.step().unwrap() {
            out.entry(o.seq.0).or_default().push(o.token.id);
        }
        steps += 1;
        assert!(steps < 10_000);
    }
    out
}

#[test]
fn batched_greedy_equals_alone() {
    let roomy = SchedulerConfig { max_num_seqs: 16, max_batched_tokens: 512 };
    let reqs: Vec<(u64, GenerationRequest)> = (0..6).map(|i| (i as u64, request(i, 12))).collect();
    let mut alone = HashMap::new();
    for (id, r) in &reqs {
        let mut c = core(roomy, (32, 4));
        alone.extend(run_all(&mut c, &[(*id, r.clone())]));
    }
    // tight: 7-token budget forces chunked prefill; 14 blocks of 4 force preemption
    let tight = SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 7 };
    let mut c = core(tight, (14, 4));
    let batched = run_all(&mut c, &reqs);
    assert!(c.scheduler().preemptions() > 0, "the tight run should preempt");
    assert_eq!(c.scheduler().blocks_used().0, 0);
    for (id, _) in &reqs {
        assert_eq!(batched[id], alone[id], "request {id} differs when batched");
        assert_eq!(alone[id].len(), 12);
    }
}

#[test]
fn rejects_what_cannot_fit() {
    let c = core(SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 64 }, (8, 4));
    assert_eq!(c.max_model_len(), 32);
    let e = c.check(&request(2, 30)).unwrap_err();
    assert!(e.to_string().contains("context length is 32"), "{e}");
    let mut bad = request(0, 4);
    bad.prompt[0] = 9999;
    assert!(c.check(&bad).unwrap_err().to_string().contains("outside the vocabulary"));
}

#[tokio::test]
async fn thread_streams_tokens_and_frees_on_drop() {
    let handle = spawn_engine(
        core(SchedulerConfig { max_num_seqs: 8, max_batched_tokens: 64 }, (32, 4)),
        EngineLimits { max_in_flight: 8, inbox: 8 },
        None,
    );
    let mut s = handle.submit(request(1, 5)).unwrap();
    let mut tokens = 0;
    let mut finish = None;
    while let Some(ev) = s.next().await {
        match ev {
            EngineEvent::Token(_) => tokens += 1,
            EngineEvent::Finished(r) => finish = Some(r),
            EngineEvent::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!((tokens, finish), (5, Some(FinishReason::Length)));
    drop(s);

    // a long request dropped after its first token frees its blocks
    let mut s = handle.submit(request(3, 40)).unwrap();
    assert!(matches!(s.next().await, Some(EngineEvent::Token(_))));
    drop(s);
    for _ in 0..200 {
        if handle.stats().kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed) == 0
            && handle.stats().running.load(std::sync::atomic::Ordering::Relaxed) == 0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(handle.stats().kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(handle.stats().in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);

    // admission limit
    let streams: Vec<_> = (0..8).map(|_| handle.submit(request(0, 40)).unwrap()).collect();
    assert!(matches!(handle.submit(request(0, 4)), Err(moe_engine::EngineError::QueueFull(_))));
    drop(streams);
    handle.close();
    assert!(matches!(handle.submit(request(0, 4)), Err(moe_engine::EngineError::ShuttingDown)));
}

#[test]
fn recording_covers_every_computed_token() {
    let mut c = core(SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 7 }, (32, 4));
    c.set_recording(true);
    let reqs: Vec<(u64, GenerationRequest)> = (0..3).map(|i| (i as u64, request(i, 4))).collect();
    let prompts: std::collections::HashMap<u64, Vec<u32>> =
        reqs.iter().map(|(id, r)| (*id, r.prompt.clone())).collect();
    let out = run_all(&mut c, &reqs);
    let trace = c.take_trace();
    let header = c.trace_header("fixture");
    assert_eq!(header.moe_layers, vec![0, 1, 3], "qwen2_moe fixture: layer 2 is dense");
    for (id, prompt) in &prompts {
        let mut mine: Vec<_> = trace.iter().filter(|t| t.seq == *id).collect();
        mine.sort_by_key(|t| t.pos);
        // the prompt and every generated token but the last are computed once
        let expect: Vec<u32> = prompt.iter().copied().chain(out[id][..out[id].len() - 1].iter().copied()).collect();
        assert_eq!(mine.iter().map(|t| t.token).collect::<Vec<_>>(), expect, "sequence {id}");
        assert!(mine.iter().enumerate().all(|(i, t)| t.pos as usize == i));
        assert!(mine.iter().all(|t| t.experts.len() == 3 && t.experts.iter().all(|e| e.len() == 2)));
    }
    assert!(c.take_trace().is_empty(), "take_trace drains");
}
