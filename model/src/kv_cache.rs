//! The paged KV cache: per layer, keys and values of `num_blocks` blocks of
//! `block_size` token slots. Which block belongs to which sequence is decided
//! outside (`moe-scheduler`'s block tables); the forward pass receives each
//! sequence's block ids.

use crate::ModelConfig;

/// Keys and values of every layer, addressed by (block, slot). With latent
/// attention a slot holds the compressed latent and the shared RoPE key
/// (as its "key"; no values), not expanded keys and values.
pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    /// Floats per slot of keys and of values ([`ModelConfig::kv_cache_widths`]).
    widths: (usize, usize),
    /// Per layer: `[num_blocks * block_size, widths.0]` keys, then
    /// `[.., widths.1]` values.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// Allocates a zeroed cache for `cfg`.
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let widths = cfg.kv_cache_widths();
        let slots = num_blocks * block_size;
        let layers =
            (0..cfg.num_layers()).map(|_| (vec![0.0; slots * widths.0], vec![0.0; slots * widths.1])).collect();
        Self { block_size, num_blocks, widths, layers }
    }

    /// A cache of the same shape whose keys and values live elsewhere (a
    /// GPU backend's device cache): it holds no storage, and only its shape
    /// is read ([`Self::block_size`], [`Self::num_blocks`]).
    pub fn without_storage(cfg: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self { block_size, num_blocks, widths: cfg.kv_cache_widths(), layers: Vec::new() }
    }

    /// Floats per slot of keys (or latents) and of values.
    pub fn widths(&self) -> (usize, usize) {
        self.widths
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Writes one token's key and value for `layer` at `row` (`v` empty
    /// with latent attention).
    pub(crate) fn write(&mut self, layer: usize, row: usize, k: &[f32], v: &[f32]) {
        let (kw, vw) = self.widths;
        let (kc, vc) = &mut self.layers[layer];
        kc[row * kw..(row + 1) * kw].copy_from_slice(k);
        vc[row * vw..(row + 1) * vw].copy_from_slice(v);
    }

    /// Keys and values of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }
}
