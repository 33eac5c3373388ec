//! The disk tier keeps the expert budget the only copy of an expert in
//! memory: after every expert of a checkpoint was read through a small
//! cache, (1) the page cache holds (almost) none of the file unless the
//! mode is `cached` (the control that shows the check can fail), and (2) the
//! process's resident memory grew by no more than the budget plus what is in
//! flight. One test per binary: the resident-memory figure is the process's.

use moe_model::{ExpertProvider, ModelConfig};
use moe_offload::{CacheConfig, DiskExperts, DiskIo, ExpertCache, PolicyKind, PredictorKind};
use moe_types::{ExpertId, LayerId, LayerRouting};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

const HIDDEN: usize = 512;
const FFN: usize = 1024;
const EXPERTS: usize = 8;
const LAYERS: usize = 4;
/// bf16 gate, up and down
const EXPERT_BYTES: usize = 3 * HIDDEN * FFN * 2;

fn write_checkpoint(dir: &Path) {
    let cfg = serde_json::json!({
        "model_type": "mixtral", "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": 8, "num_key_value_heads": 8,
        "num_local_experts": EXPERTS, "num_experts_per_tok": 2, "vocab_size": 64,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = Vec::new();
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
            for (w, shape) in [("w1", [FFN, HIDDEN]), ("w3", [FFN, HIDDEN]), ("w2", [HIDDEN, FFN])] {
                // small bf16 values, distinct per tensor
                let seed = (l * EXPERTS + e) as u16;
                let bytes: Vec<u8> = (0..shape[0] * shape[1])
                    .flat_map(|i| (0x3c00u16 | ((i as u16).wrapping_mul(31) ^ seed) & 0xff).to_le_bytes())
                    .collect();
                tensors.push((format!("{p}.{w}.weight"), shape.to_vec(), bytes));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap())).collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    drop_from_page_cache(&path);
}

/// Writes the file back and drops it from the page cache.
fn drop_from_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// The fraction of the file's pages in the page cache.
fn cached_fraction(path: &Path) -> f64 {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: the file is not modified while mapped (the test owns it).
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let page = 4096;
    let mut vec = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes starting at a page
    // boundary, and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / vec.len() as f64
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// Reads every expert through a cache of `slots`, layer by layer, two
/// experts a step (each step evicts); returns the highest RSS seen.
fn stream_every_expert(dir: &Path, io: DiskIo, slots: usize, readers: usize) -> u64 {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = DiskExperts::open(dir, &cfg, io).unwrap();
    assert_eq!(moe_offload::ExpertSource::expert_bytes(&src), EXPERT_BYTES);
    let cc = CacheConfig {
        slots,
        policy: PolicyKind::Lru,
        predictor: PredictorKind::None,
        depth: 1,
        min_precision: 0.0,
        readers,
    };
    let cache = ExpertCache::new(&cfg, Box::new(src), cc).unwrap();
    let mut peak = 0;
    for round in 0..2 {
        for l in 0..LAYERS {
            for pair in 0..EXPERTS / 2 {
                let ids = [ExpertId((2 * pair) as u16), ExpertId((2 * pair + 1) as u16)];
                let routing =
                    LayerRouting { layer: LayerId(l as u16), top_k: 2, ids: ids.to_vec(), weights: vec![0.5; 2] };
                cache.prepare(&routing, &ids).unwrap();
                let guards: Vec<_> = ids.iter().map(|&e| cache.get(LayerId(l as u16), e).unwrap()).collect();
                assert!(guards.iter().all(|g| g.ffn() == FFN), "round {round}");
                assert!(cache.resident_bytes() <= cache.budget_bytes(), "the budget was exceeded");
                peak = peak.max(rss());
            }
        }
    }
    cache.wait_idle();
    peak
}

#[test]
fn the_budget_is_the_only_copy_of_an_expert_in_memory() {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = root.path();
    write_checkpoint(dir);
    let file = dir.join("model.safetensors");
    if cached_fraction(&file) > 0.5 {
        moe_types::testing::skip(
            "disk_memory::the_budget_is_the_only_copy",
            "this file system keeps the file in the page cache after POSIX_FADV_DONTNEED (tmpfs?)",
        );
        return;
    }
    let slots = EXPERTS;
    let budget = (slots * EXPERT_BYTES) as u64;
    for (io, readers) in [(DiskIo::Direct, 1), (DiskIo::Direct, 3), (DiskIo::Release, 3), (DiskIo::Cached, 1)] {
        drop_from_page_cache(&file);
        let before = rss();
        let peak = stream_every_expert(dir, io, slots, readers);
        let cached = cached_fraction(&file);
        eprintln!(
            "{io} x{readers}: page cache holds {:.1}% of the file; RSS grew by {:.1} MB (budget {:.1} MB)",
            cached * 100.0,
            (peak.saturating_sub(before)) as f64 / 1e6,
            budget as f64 / 1e6
        );
        if io == DiskIo::Cached {
            // the control: ordinary reads leave the file in the page cache
            assert!(cached > 0.9, "{io}: only {cached} of the file was cached");
        } else {
            assert!(cached < 0.02, "{io}: the page cache kept {:.1}% of the file", cached * 100.0);
        }
        // the budget, plus the guards of a step and the reads in flight (one
        // expert each), plus the allocator's slack
        let allowed = budget + ((2 + readers) * EXPERT_BYTES) as u64 + (8 << 20);
        assert!(
            peak.saturating_sub(before) <= allowed,
            "{io}: RSS grew by {} bytes, more than the budget allows ({allowed})",
            peak - before
        );
    }
}
