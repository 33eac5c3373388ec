//! Multi-head latent attention (DeepSeek-V2/V3) over a latent KV cache.
//!
//! Each token's keys and values are up-projections (`kv_b`) of one
//! normalised latent `c` (`kv_lora_rank` values), with a small RoPE key
//! `k_pe` shared by every head beside it. The cache holds exactly `[c; k_pe]`
//! per token and layer. Two exact ways to attend over it:
//!
//! - **absorbed** (decode): the key up-projection is folded into the query,
//!   `q_h' = [W_uk,h^T q_nope,h; q_pe,h]`, so scores are `q_h' . [c; k_pe]`
//!   over the cached rows as they are; the softmax-weighted sum of latents
//!   is then up-projected by `W_uv,h`. Per key it reads `kv_lora_rank +
//!   qk_rope_head_dim` floats for all heads at once.
//! - **expanded** (prefill): the chunk's visible latents are up-projected to
//!   per-head keys and values once, then ordinary attention.
//!
//! Both agree with transformers to rounding but not bit for bit, so
//! [`LatentPath::Auto`] keeps to the absorbed form while results must not
//! depend on the batch (`moe_kernels::batch_invariant`, the default: prefill
//! then costs up to ~3x the attention multiply-adds, ~1% of a DeepSeek-V2-Lite
//! step at 4096 tokens), and otherwise picks, per chunk, the form with fewer
//! multiply-adds.

use crate::forward::{SeqChunk, Workspace};
use crate::kv_cache::KvCache;
use crate::weights::{LatentQuery, LatentWeights, Model};
use crate::Result;
use moe_kernels::{matmul_nt, ops};
use rayon::prelude::*;
use std::cell::RefCell;

/// transformers builds the latent and low-rank query norms with their
/// default epsilon, not the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Below this many (token, key) pairs per step attention runs on one thread.
const PARALLEL_PAIRS: usize = 256;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How latent attention attends over the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatentPath {
    /// Absorbed while products are batch-invariant (the default: a chunk's
    /// path must not depend on how the scheduler split its prompt); else per
    /// chunk the cheaper of the two (absorbed for decode, expanded for long
    /// prefill chunks).
    #[default]
    Auto,
    /// Always the absorbed form.
    Absorbed,
    /// Always expand keys and values.
    Expanded,
}

/// Buffers of latent attention, reused across steps.
#[derive(Default)]
pub(crate) struct MlaScratch {
    /// Low-rank query's intermediate, `[t, q_lora_rank]`.
    q_low: Vec<f32>,
    /// `[t, kv_lora_rank + rope]`: the step's latents and RoPE keys.
    latent: Vec<f32>,
    /// Absorbed queries, `[t, heads, kv_lora_rank + rope]`.
    q_abs: Vec<f32>,
    /// Weighted latents, `[t, heads, kv_lora_rank]`.
    o_lat: Vec<f32>,
    /// One head's rows of a per-head product.
    head_in: Vec<f32>,
    head_out: Vec<f32>,
    /// A chunk's visible latents, then their expansion.
    gathered: Vec<f32>,
    expanded: Vec<f32>,
    /// Per head `[k_nope; k_pe; v]` of each visible position.
    keys_values: Vec<f32>,
    rows: Vec<usize>,
    /// Indices into the step of the tokens attending in the absorbed form.
    tokens: Vec<usize>,
    pub(crate) path: LatentPath,
}

/// Shapes of one layer's latent attention.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    rank: usize,
}

impl Dims {
    fn q(&self) -> usize {
        self.nope + self.rope
    }

    fn latent(&self) -> usize {
        self.rank + self.rope
    }

    /// Whether expanding is cheaper for `n` new tokens seeing `end` keys
    /// (multiply-adds of each path; causal halving affects both alike).
    fn expand(&self, n: usize, end: usize) -> bool {
        let (h, r) = (self.heads, self.rank);
        let absorbed = n * end * h * (2 * r + self.rope) + n * h * r * (self.nope + self.v);
        let expanded = end * r * h * (self.nope + self.v) + n * end * h * (self.q() + self.v);
        expanded < absorbed
    }
}

impl Model {
    /// Latent attention of layer `l`: reads `ws.xn`, writes `ws.out`;
    /// appends the step's latents and RoPE keys to `kv`.
    pub(crate) fn latent_attention(
        &self,
        l: usize,
        w: &LatentWeights,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        let a = &self.cfg.attention;
        let m = a.mla.expect("latent attention has its shape");
        let d = Dims {
            heads: a.num_heads,
            nope: m.qk_nope_head_dim,
            rope: m.qk_rope_head_dim,
            v: m.v_head_dim,
            rank: m.kv_lora_rank,
        };
        let t = ws.tok.len();
        let s = &mut ws.mla;

        // queries, [t, heads * (nope + rope)]
        ws.qkv.resize(t * d.heads * d.q(), 0.0);
        match &w.q {
            LatentQuery::Full(q) => matmul_nt(&ws.xn, t, q, &mut ws.qkv)?,
            LatentQuery::LowRank { a: qa, norm, b } => {
                s.q_low.resize(t * qa.rows(), 0.0);
                matmul_nt(&ws.xn, t, qa, &mut s.q_low)?;
                ops::rms_norm_inplace(&mut s.q_low, norm, LATENT_NORM_EPS);
                matmul_nt(&s.q_low, t, b, &mut ws.qkv)?;
            }
        }
        // latents and RoPE keys, normalised and rotated, into the cache
        s.latent.resize(t * d.latent(), 0.0);
        matmul_nt(&ws.xn, t, &w.kv_a, &mut s.latent)?;
        let half = self.rope.half();
        for (i, (row, q)) in
            s.latent.chunks_exact_mut(d.latent()).zip(ws.qkv.chunks_exact_mut(d.heads * d.q())).enumerate()
        {
            let (cos, sin) = (&ws.cos[i * half..(i + 1) * half], &ws.sin[i * half..(i + 1) * half]);
            ops::rms_norm_inplace(&mut row[..d.rank], &w.kv_a_norm, LATENT_NORM_EPS);
            self.rope.apply(&mut row[d.rank..], d.rope, 0, cos, sin);
            self.rope.apply(q, d.q(), d.nope, cos, sin);
            kv.write(l, ws.layout.slots[i] as usize, row, &[]);
        }

        ws.attn.resize(t * d.heads * d.v, 0.0);
        let path = s.path;
        s.tokens.clear(); // the step's tokens to run absorbed
        let mut first = 0;
        for ch in chunks {
            let n = ch.tokens.len();
            let end = ch.start_pos + n;
            let expand = match path {
                LatentPath::Auto => !moe_kernels::batch_invariant() && d.expand(n, end),
                LatentPath::Absorbed => false,
                LatentPath::Expanded => true,
            };
            if expand {
                self.expanded_chunk(l, w, d, first..first + n, kv, ws)?;
            } else {
                ws.mla.tokens.extend(first..first + n);
            }
            first += n;
        }
        if !ws.mla.tokens.is_empty() {
            self.absorbed_tokens(l, w, d, kv, ws)?;
        }
        matmul_nt(&ws.attn, t, &w.o, &mut ws.out)?;
        Ok(())
    }

    /// The absorbed form for the tokens in `ws.mla.tokens` (indices into the step).
    fn absorbed_tokens(&self, l: usize, w: &LatentWeights, d: Dims, kv: &KvCache, ws: &mut Workspace) -> Result<()> {
        // taken out for the step and put back, so steady decoding reuses it
        let tokens = std::mem::take(&mut ws.mla.tokens);
        let n = tokens.len();
        let (dq, dl) = (d.q(), d.latent());
        let s = &mut ws.mla;
        // q' = [W_uk,h^T q_nope,h; q_pe,h], one product per head over the tokens
        s.q_abs.resize(n * d.heads * dl, 0.0);
        s.head_in.resize(n * d.nope, 0.0);
        s.head_out.resize(n * d.rank, 0.0);
        for h in 0..d.heads {
            for (r, &i) in tokens.iter().enumerate() {
                let q = &ws.qkv[(i * d.heads + h) * dq..];
                s.head_in[r * d.nope..(r + 1) * d.nope].copy_from_slice(&q[..d.nope]);
                let out = &mut s.q_abs[(r * d.heads + h) * dl..(r * d.heads + h + 1) * dl];
                out[d.rank..].copy_from_slice(&q[d.nope..dq]);
            }
            matmul_nt(&s.head_in, n, &w.uk_t[h], &mut s.head_out)?;
            for r in 0..n {
                let at = (r * d.heads + h) * dl;
                s.q_abs[at..at + d.rank].copy_from_slice(&s.head_out[r * d.rank..(r + 1) * d.rank]);
            }
        }
        // scores over [c; k_pe], weighted sums of c, all heads of a token sharing the rows
        let (keys, _) = kv.layer(l);
        let scale = self.cfg.attention.softmax_scale;
        let (tok, kv_rows, kv_rows_at) = (&ws.tok, &ws.kv_rows, &ws.kv_rows_at);
        let q_abs = &s.q_abs;
        s.o_lat.resize(n * d.heads * d.rank, 0.0);
        let run = |(r, out): (usize, &mut [f32])| {
            let (c, pos) = tok[tokens[r]];
            let rows = &kv_rows[kv_rows_at[c]..=kv_rows_at[c] + pos];
            let q = &q_abs[r * d.heads * dl..(r + 1) * d.heads * dl];
            SCORES.with(|sc| {
                let scores = &mut *sc.borrow_mut();
                // eight heads at a time: the widest group the kernel shares rows across
                for h0 in (0..d.heads).step_by(8) {
                    let h1 = (h0 + 8).min(d.heads);
                    let rows = ops::KvRows { keys, values: keys, rows, head_dim: dl, value_dim: d.rank };
                    ops::attend(&q[h0 * dl..h1 * dl], rows, scale, None, scores, &mut out[h0 * d.rank..h1 * d.rank]);
                }
            });
        };
        let pairs: usize = tokens.iter().map(|&i| tok[i].1 + 1).sum();
        if pairs >= PARALLEL_PAIRS {
            s.o_lat.par_chunks_mut(d.heads * d.rank).enumerate().for_each(run);
        } else {
            s.o_lat.chunks_mut(d.heads * d.rank).enumerate().for_each(run);
        }
        // v_h = W_uv,h o_h, one product per head over the tokens
        s.head_in.resize(n * d.rank, 0.0);
        s.head_out.resize(n * d.v, 0.0);
        for h in 0..d.heads {
            for r in 0..n {
                let at = (r * d.heads + h) * d.rank;
                s.head_in[r * d.rank..(r + 1) * d.rank].copy_from_slice(&s.o_lat[at..at + d.rank]);
            }
            matmul_nt(&s.head_in, n, &w.uv[h], &mut s.head_out)?;
            for (r, &i) in tokens.iter().enumerate() {
                let at = (i * d.heads + h) * d.v;
                ws.attn[at..at + d.v].copy_from_slice(&s.head_out[r * d.v..(r + 1) * d.v]);
            }
        }
        s.tokens = tokens;
        Ok(())
    }

    /// The expanded form for one chunk (step tokens `range`): its visible
    /// latents up-projected to every head's keys and values, then attention.
    fn expanded_chunk(
        &self,
        l: usize,
        w: &LatentWeights,
        d: Dims,
        range: std::ops::Range<usize>,
        kv: &KvCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        let (dq, dl) = (d.q(), d.latent());
        let c = ws.tok[range.start].0;
        let end = ws.tok[range.end - 1].1 + 1;
        let (cache, _) = kv.layer(l);
        let s = &mut ws.mla;
        let visible = &ws.kv_rows[ws.kv_rows_at[c]..ws.kv_rows_at[c] + end];
        s.gathered.resize(end * d.rank, 0.0);
        for (j, &r) in visible.iter().enumerate() {
            s.gathered[j * d.rank..(j + 1) * d.rank].copy_from_slice(&cache[r..r + d.rank]);
        }
        let width = d.nope + d.v;
        s.expanded.resize(end * d.heads * width, 0.0);
        matmul_nt(&s.gathered, end, &w.kv_b, &mut s.expanded)?;
        // per position and head: [k_nope; k_pe; v]
        let stride = dq + d.v;
        s.keys_values.resize(end * d.heads * stride, 0.0);
        for (j, &r) in visible.iter().enumerate() {
            let k_pe = &cache[r + d.rank..r + dl];
            for h in 0..d.heads {
                let src = &s.expanded[(j * d.heads + h) * width..(j * d.heads + h + 1) * width];
                let dst = &mut s.keys_values[(j * d.heads + h) * stride..(j * d.heads + h + 1) * stride];
                dst[..d.nope].copy_from_slice(&src[..d.nope]);
                dst[d.nope..dq].copy_from_slice(k_pe);
                dst[dq..].copy_from_slice(&src[d.nope..]);
            }
        }
        s.rows.clear();
        s.rows.extend((0..end).map(|j| j * d.heads * stride));
        let scale = self.cfg.attention.softmax_scale;
        let (tok, qkv, kvs, rows) = (&ws.tok, &ws.qkv, &s.keys_values, &s.rows);
        let out = &mut ws.attn[range.start * d.heads * d.v..range.end * d.heads * d.v];
        let run = |(r, out): (usize, &mut [f32])| {
            let i = range.start + r;
            let pos = tok[i].1;
            let q = &qkv[i * d.heads * dq..(i + 1) * d.heads * dq];
            SCORES.with(|sc| {
                let scores = &mut *sc.borrow_mut();
                for h in 0..d.heads {
                    let at = h * stride;
                    let kv = ops::KvRows {
                        keys: &kvs[at..],
                        values: &kvs[at + dq..],
                        rows: &rows[..=pos],
                        head_dim: dq,
                        value_dim: d.v,
                    };
                    ops::attend(&q[h * dq..(h + 1) * dq], kv, scale, None, scores, &mut out[h * d.v..(h + 1) * d.v]);
                }
            });
        };
        if range.len() * end >= PARALLEL_PAIRS {
            out.par_chunks_mut(d.heads * d.v).enumerate().for_each(run);
        } else {
            out.chunks_mut(d.heads * d.v).enumerate().for_each(run);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_absorbs_and_long_prefill_expands() {
        // DeepSeek-V2-Lite's shape
        let d = Dims { heads: 16, nope: 128, rope: 64, v: 128, rank: 512 };
        assert!(!d.expand(1, 2), "the first decode step");
        assert!(!d.expand(1, 4096), "decode at any context");
        assert!(!d.expand(8, 4096), "a few tokens deep into the context");
        assert!(d.expand(512, 512), "a long prompt");
        assert!(d.expand(2048, 4096), "a long chunk");
    }
}
