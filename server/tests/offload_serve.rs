//! The server with an expert budget: same greedy text as fully resident,
//! expert-cache metrics on /metrics; bad budgets, grouping settings and
//! placement plans refused at start with a clear message.
//! (Its own test binary: metrics are process-wide.)

mod common;
use common::{config, TestServer};
use moe_offload::{ExpertBudget, PolicyKind, PredictorChoice};
use moe_scheduler::GroupingMode;
use moe_server::config::ServeArgs;
use serde_json::json;

async fn complete(s: &TestServer) -> String {
    let body = json!({"model": "tiny-shakespeare-moe", "prompt": "KING RICHARD:\n", "max_tokens": 40,
        "temperature": 0, "ignore_eos": true});
    let (status, v) = s.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarter_budget_serves_the_same_text_and_exports_cache_metrics() {
    let resident = TestServer::default().await;
    let want = complete(&resident).await;
    let mut cached = TestServer::start(
        config(|a| {
            a.expert_cache = Some("25%".parse().unwrap());
            a.expert_policy = Some(PolicyKind::Predictive);
            a.predictor = Some(PredictorChoice::Learned);
            a.micro_batch = Some(4);
            a.grouping = Some(GroupingMode::Regroup);
            a.max_deferral = Some(32);
        }),
        true,
    )
    .await;
    assert_eq!(complete(&cached).await, want);
    let m = cached.client.get(cached.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "moe_expert_cache_hits_total",
        "moe_expert_cache_misses_total",
        "moe_expert_bytes_loaded_total",
        "moe_expert_prefetch_issued_total",
        "moe_expert_predictor_precision",
        "moe_expert_predictor_recall",
        "moe_expert_cache_slots 8",
        "moe_scheduler_seconds",
        "moe_step_distinct_experts",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    cached.shutdown();
}

#[test]
fn a_bad_budget_is_a_clear_start_up_error() {
    // values are parsed where they enter: a TOML file (flags and environment
    // variables go through the same FromStr)
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("serve.toml");
    for (line, want) in [
        ("expert_cache = \"150%\"", "invalid expert cache budget \"150%\""),
        ("expert_policy = \"mru\"", "unknown cache policy \"mru\""),
        ("predictor = \"oracle\"", "unknown predictor \"oracle\""),
        ("grouping = \"zigzag\"", "unknown grouping \"zigzag\""),
    ] {
        std::fs::write(&toml, line).unwrap();
        let args = ServeArgs { config: Some(toml.clone()), ..Default::default() };
        let err = args.resolve().expect_err(line).to_string();
        assert!(err.contains(want) && err.contains("serve.toml"), "{line}: {err}");
    }
    let cfg = config(|a| {
        a.micro_batch = Some(2);
        a.max_deferral = Some(3);
    });
    let err = moe_server::serve::load_ready(&cfg).err().unwrap().to_string();
    assert!(err.contains("needs a deferral bound of at least 63"), "{err}");
}

#[test]
fn a_malformed_or_mismatched_placement_plan_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("plan.json");
    std::fs::write(&bad, "{\"format\":\"moe-placement-plan\",\"version\":1").unwrap();
    let cfg = config(|a| a.placement = Some(bad.clone()));
    let err = format!("{:#}", moe_server::serve::load_ready(&cfg).err().unwrap());
    assert!(err.contains("placement plan") && err.contains("plan.json"), "{err}");
    let mut plan = moe_types::placement::PlacementPlan::new(vec![0, 1, 2, 3], 16, 2, 2);
    plan.layers.iter_mut().flatten().for_each(|g| *g = vec![0]);
    plan.write(&mut std::fs::File::create(&bad).unwrap()).unwrap();
    let err = format!("{:#}", moe_server::serve::load_ready(&cfg).err().unwrap());
    assert!(
        err.contains("does not fit the model") && err.contains("16 experts per layer but the model has 8"),
        "{err}"
    );
    let missing = config(|a| a.placement = Some(dir.path().join("nope.json")));
    let err = format!("{:#}", moe_server::serve::load_ready(&missing).err().unwrap());
    assert!(err.contains("cannot read placement plan") && err.contains("nope.json"), "{err}");
}

/// An expert that cannot be read mid-serving fails its request with the real
/// cause and a retryable status (503 / UNAVAILABLE, the file named), not a
/// blanket 500; once the file is back the same request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_expert_is_a_503_with_its_cause() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let mut s = TestServer::start(
        config(|a| {
            a.model = Some(dir.path().to_path_buf());
            a.served_model_name = Some("tiny-shakespeare-moe".into());
            a.expert_cache = Some(ExpertBudget::Count(8));
            a.predictor = Some(PredictorChoice::None);
            a.expert_policy = Some(PolicyKind::Lru);
        }),
        true,
    )
    .await;
    let weights = dir.path().join("model.safetensors");
    let moved = dir.path().join("moved.safetensors");
    std::fs::rename(&weights, &moved).unwrap();
    let body = json!({"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0});
    let (status, v) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("unavailable") && msg.contains("model.safetensors"), "{msg}");
    std::fs::rename(&moved, &weights).unwrap();
    let (status, v) = s.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    s.shutdown();
}
