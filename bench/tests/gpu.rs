//! The GPU forward pass and expert tier on a GPU, where one is usable; on
//! a machine without one (CI) the test records why it skipped
//! (`scripts/test.sh` lists skips). `scripts/gpu-check.sh` runs the full
//! check with its tables.
#![cfg(feature = "cuda")]

use moe_bench::gpu::{self, TierCase};
use moe_offload::{PolicyKind, PredictorKind};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn gpu_usable(test: &str) -> bool {
    match moe_kernels::cuda::GpuContext::new(0) {
        Ok(_) => true,
        Err(e) => {
            moe_types::testing::skip(test, &e.to_string());
            false
        }
    }
}

#[test]
fn every_device_operation_matches_the_host_device() {
    if !gpu_usable("gpu::every_device_operation_matches_the_host_device") {
        return;
    }
    for (name, err, tol) in gpu::compare_ops().unwrap() {
        eprintln!("{name}: {err:.2e} (tolerance {tol:.0e})");
        assert!(err <= tol.max(1e-6), "{name}: {err} > {tol}");
    }
}

#[test]
fn fixtures_match_transformers_on_the_gpu() {
    if !gpu_usable("gpu::fixtures_match_transformers_on_the_gpu") {
        return;
    }
    for name in ["mixtral", "mixtral_bf16", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let f = gpu::fidelity(&root().join("tests/fixtures").join(name)).unwrap();
        eprintln!("{f:?}");
        assert!(f.pass(), "{name}: {f:?}");
    }
}

#[test]
fn every_tier_case_leaves_tokens_unchanged_on_the_gpu() {
    if !gpu_usable("gpu::every_tier_case_leaves_tokens_unchanged_on_the_gpu") {
        return;
    }
    let dir = root().join("models/tiny-shakespeare-moe");
    let loaded = moe_model::load_model(&dir, &mut ()).unwrap();
    let prompt = loaded.codec.encode("ROMEO:", true).unwrap();
    let weights = loaded.experts.into_weights();
    let case =
        |label: &str, budget, policy, predictor| TierCase { label: label.into(), budget, policy, predictor, depth: 1 };
    let cases = [
        case("resident", 1.0, PolicyKind::Lru, PredictorKind::None),
        case("lru", 0.5, PolicyKind::Lru, PredictorKind::None),
        case("predictive+previous", 0.25, PolicyKind::Predictive, PredictorKind::PreviousToken),
        case("predictive+lookahead", 0.5, PolicyKind::Predictive, PredictorKind::LookAhead),
    ];
    let rows = gpu::tier_bench(&loaded.model, &weights, &cases, &prompt, 24).unwrap();
    eprintln!("{}", gpu::render_tiers(&rows));
    assert!(rows.iter().all(|r| r.same_tokens));
}
