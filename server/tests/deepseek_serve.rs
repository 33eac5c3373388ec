//! DeepSeek (latent attention, grouped routing, FP8) and GLM fixtures
//! served with expert budgets. (Its own test binary: the expert-cache
//! metrics are process-wide, and `offload_serve` checks their values.)

mod common;
use common::{config, TestServer};
use serde_json::json;

/// DeepSeek (latent attention, grouped routing, FP8) and GLM fixtures:
/// the same greedy text resident, at half the experts and at 12 of 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek_and_glm_serve_the_same_text_at_every_budget() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for name in ["deepseek_v2", "deepseek_v2_grouped", "deepseek_v3", "deepseek_v3_fp8", "glm4_moe"] {
        let mut texts = Vec::new();
        for budget in [None, Some("50%"), Some("12")] {
            let mut s = TestServer::start(
                config(|a| {
                    a.model = Some(fixtures.join(name));
                    a.expert_cache = budget.map(|b| b.parse().unwrap());
                }),
                true,
            )
            .await;
            let body = json!({"model": name, "prompt": "Hello there", "max_tokens": 16, "temperature": 0,
                "ignore_eos": true});
            let (status, v) = s.post("/v1/completions", body).await;
            assert_eq!(status, 200, "{name} at {budget:?}: {v}");
            assert_eq!(v["usage"]["completion_tokens"], 16, "{name}: {v}");
            texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
            s.shutdown();
        }
        assert!(texts.iter().all(|t| *t == texts[0]), "{name}: {texts:?}");
    }
}
