//! `config.json` text -> `ModelConfig`: never a panic; an accepted config has
//! the shape invariants the loader and forward pass rely on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = ModelConfig::from_json(text) else { return };
    // what resolving promises: positive sizes, a usable attention layout
    assert!(cfg.hidden_size > 0 && cfg.num_layers() > 0);
    let a = &cfg.attention;
    assert!(a.num_heads > 0 && a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0);
    assert!(a.head_dim > 0 && a.head_dim % 2 == 0);
    assert!(cfg.moe.top_k >= 1 && cfg.moe.top_k <= cfg.moe.num_experts);
    let _ = cfg.moe_layers().count();
    let _ = format!("{cfg:?}");
});
