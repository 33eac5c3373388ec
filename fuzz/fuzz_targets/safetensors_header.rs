//! A safetensors file as the checkpoint loader opens it: `Checkpoint::open`
//! maps the file and indexes its header; every tensor the header names is then
//! copied out at its declared shape. Malformed files must be errors, never
//! panics or reads outside the mapping.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_model::Checkpoint;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One model directory per fuzzing process, rewritten for every input.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        tempfile::Builder::new().prefix("moe-fuzz-st-").tempdir_in(base).expect("temp dir").keep()
    })
}

/// (name, shape) of every tensor the header declares, if it parses as JSON.
fn declared(data: &[u8]) -> Vec<(String, Vec<usize>)> {
    let Some(len) = data.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize) else {
        return Vec::new();
    };
    let Some(json) = data.get(8..8usize.saturating_add(len)) else { return Vec::new() };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Vec::new();
    };
    map.into_iter()
        .filter_map(|(name, v)| {
            let shape: Option<Vec<usize>> =
                v.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect();
            Some((name, shape?))
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("model.safetensors");
    std::fs::write(&path, data).expect("write input");
    let Ok(ck) = Checkpoint::open(dir()) else { return };
    let _ = ck.total_bytes();
    for (name, shape) in declared(data) {
        assert!(ck.contains(&name) || name == "__metadata__");
        // bounded: a huge declared shape must not make the harness allocate
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 20) {
            continue;
        }
        if let Ok(v) = ck.f32_tensor(&name, &shape) {
            assert_eq!(v.len(), shape.iter().product::<usize>());
        }
        if let [rows, cols] = shape[..] {
            let _ = ck.weight(&name, rows, cols);
        }
    }
});
