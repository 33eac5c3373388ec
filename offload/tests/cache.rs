//! The expert cache (residency core + CPU loader) on a real (tiny)
//! checkpoint, without sleeps: pins hold experts through evictions, loads fill the budget and no more, and an unreadable slow tier
//! fails the loads that need it with the file named, then recovers.

use moe_model::{ExpertProvider, ModelConfig};
use moe_offload::residency::State;
use moe_offload::{CacheConfig, DiskExperts, ExpertCache, PolicyKind, PredictorKind};
use moe_types::{ExpertId, LayerId, LayerRouting};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral")
}

/// A routing where every token of a step chose `experts` (top-2 pairs).
fn routing(layer: u16, experts: &[u16]) -> LayerRouting {
    LayerRouting {
        layer: LayerId(layer),
        top_k: 2,
        ids: experts.iter().map(|&e| ExpertId(e)).collect(),
        weights: vec![0.5; experts.len()],
    }
}

fn cache(dir: &Path, slots: usize, policy: PolicyKind) -> ExpertCache {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = DiskExperts::open(dir, &cfg, moe_offload::DiskIo::Direct).unwrap();
    ExpertCache::new(
        &cfg,
        Box::new(src),
        CacheConfig { slots, policy, predictor: PredictorKind::None, depth: 1, min_precision: 0.0, readers: 1 },
    )
    .unwrap()
}

fn run_layer(c: &ExpertCache, layer: u16, experts: &[u16]) {
    let used: Vec<ExpertId> = {
        let mut u: Vec<u16> = experts.to_vec();
        u.sort_unstable();
        u.dedup();
        u.into_iter().map(ExpertId).collect()
    };
    c.prepare(&routing(layer, experts), &used).unwrap();
    for &e in &used {
        let g = c.get(LayerId(layer), e).unwrap();
        assert_eq!(g.ffn(), 32);
    }
}

#[test]
fn a_pinned_expert_survives_until_its_guard_drops() {
    // 2 layers x 4 experts, 4 slots: layer 1 needs every slot
    let c = cache(&fixture(), 4, PolicyKind::Lru);
    run_layer(&c, 0, &[0, 1, 2, 3]);
    let pinned = c.get(LayerId(0), ExpertId(0)).unwrap();
    let used: Vec<ExpertId> = (0..4).map(ExpertId).collect();
    c.prepare(&routing(1, &[0, 1, 2, 3]), &used).unwrap();
    // three of layer 1's experts can come in; the fourth needs the pinned slot
    c.wait_settled();
    assert!(matches!(c.residency(LayerId(0), ExpertId(0)), Some(State::Resident(_))), "a pinned expert was evicted");
    let home: Vec<u16> = (0..4).filter(|&e| c.residency(LayerId(1), ExpertId(e)) == Some(State::Home)).collect();
    assert_eq!(home.len(), 1, "layer 1 cannot have all its experts while layer 0's is pinned");
    drop(pinned);
    for e in used {
        drop(c.get(LayerId(1), e).unwrap());
    }
    assert_eq!(c.residency(LayerId(0), ExpertId(0)), Some(State::Home));
    let s = c.stats();
    assert_eq!(s.resident, 4, "never more than the budget");
    assert_eq!((s.layers[0].misses, s.layers[1].misses), (4, 4));
    assert_eq!(s.total().loads, 8);
}

#[test]
fn experts_of_the_running_layer_are_not_evicted_and_hits_are_counted() {
    let c = cache(&fixture(), 6, PolicyKind::Lfu);
    run_layer(&c, 0, &[0, 1, 0, 1, 0, 2]);
    run_layer(&c, 1, &[3, 2]);
    run_layer(&c, 0, &[0, 1]);
    let s = c.stats();
    assert_eq!(s.layers[0].hits, 2, "{s:?}");
    assert_eq!(s.layers[0].misses, 3);
    // layer 1 needs 3 more slots: LFU evicts layer 0's least used (expert 2)
    run_layer(&c, 1, &[0, 1, 3]);
    assert_eq!(c.residency(LayerId(0), ExpertId(2)), Some(State::Home));
    assert!(matches!(c.residency(LayerId(0), ExpertId(0)), Some(State::Resident(_))));
    assert_eq!(c.stats().resident, 6);
}

#[test]
fn an_unreadable_slow_tier_fails_the_load_with_the_file_named_then_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
    }
    let c = cache(tmp.path(), 4, PolicyKind::Lru);
    run_layer(&c, 0, &[0, 1]);
    let moved = tmp.path().join("moved.safetensors");
    std::fs::rename(tmp.path().join("model.safetensors"), &moved).unwrap();
    c.prepare(&routing(1, &[2, 3]), &[ExpertId(2), ExpertId(3)]).unwrap();
    let err = c.get(LayerId(1), ExpertId(2)).err().expect("the file is gone").to_string();
    assert!(err.contains("expert 2 of layer 1 unavailable") && err.contains("model.safetensors"), "{err}");
    assert!(c.stats().load_failures >= 1);
    // resident experts still serve, and the file coming back heals the cache
    assert!(c.get(LayerId(0), ExpertId(0)).is_ok());
    std::fs::rename(&moved, tmp.path().join("model.safetensors")).unwrap();
    run_layer(&c, 1, &[2, 3]);
}

#[test]
fn bad_configurations_are_refused() {
    let dir = fixture();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let new = |slots, policy, predictor| {
        let src = DiskExperts::open(&dir, &cfg, moe_offload::DiskIo::Direct).unwrap();
        ExpertCache::new(
            &cfg,
            Box::new(src),
            CacheConfig { slots, policy, predictor, depth: 1, min_precision: 0.0, readers: 3 },
        )
        .err()
        .unwrap()
        .to_string()
    };
    assert!(new(3, PolicyKind::Lru, PredictorKind::None).contains("at least one layer's 4 experts"));
    assert!(new(4, PolicyKind::Predictive, PredictorKind::None).contains("needs a predictor"));
    let e = new(4, PolicyKind::Lru, PredictorKind::Learned(dir.join("nope.safetensors")));
    assert!(e.contains("nope.safetensors") && e.contains("cannot read"), "{e}");
}
