//! Cost of the hidden-state predictor per token, to set against a decode
//! step: runs the built-in model's probes (or those in FILE, or with `large`
//! random probes of the 1.19B bench shape: width 1024, 8 MoE layers of 16
//! experts, top 2, 32 units, vocabulary 32000) on synthetic hidden states
//! at every MoE layer for one decoding token (with its previous token's
//! states as context), `depth` layers ahead.
//!
//! `cargo run --release -p moe-offload --example predictor_cost [-- FILE|large [DEPTH]]`

use moe_model::StepToken;
use moe_offload::predictor::{HiddenPredictor, HiddenProbes, PathPredictor, Shape};
use moe_types::{ExpertId, MoeLayerId, SeqId};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-shakespeare-moe/hidden_predictor.safetensors").into()
    });
    let depth: usize = args.next().and_then(|d| d.parse().ok()).unwrap_or(1);
    let probes = if path == "large" {
        HiddenProbes::random(8, 16, 2, 1024, 3, 32, 32000, 1)
    } else {
        HiddenProbes::load(std::path::Path::new(&path)).expect("probes")
    };
    let shape = Shape { layers: probes.layers, experts: probes.experts, top_k: probes.top_k, depth };
    let (hsz, layers, k) = (probes.hidden, probes.layers, probes.top_k);
    let mut p = HiddenPredictor::new(Arc::new(probes), shape);
    let h: Vec<f32> = (0..hsz).map(|i| ((i * 7919 % 97) as f32 / 97.0) - 0.5).collect();
    let route: Vec<ExpertId> = (0..k).map(|e| ExpertId(e as u16)).collect();
    let mut out = Vec::new();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let n = if hsz > 512 { 2_000 } else { 20_000 };
        for _ in 0..n {
            // one decoding sequence: its previous token's states are the context
            p.begin_step(&[StepToken { seq: SeqId(0), token: 1 }], &mut out);
            for m in 0..layers {
                out.clear();
                p.hidden(MoeLayerId(m as u16), &h, &mut out);
                p.observe(MoeLayerId(m as u16), &route, &mut out);
            }
            std::hint::black_box(&out);
        }
        best = best.min(t.elapsed().as_secs_f64() / n as f64);
    }
    println!("hidden-state predictor, {layers} MoE layers, depth {depth}: {:.2} us per token (best of 5)", best * 1e6);
}
