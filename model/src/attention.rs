//! Causal self-attention over the paged KV cache.

use crate::forward::{SeqChunk, Workspace};
use crate::kv_cache::KvCache;
use crate::weights::{Attention, Model};
use crate::Result;
use moe_kernels::{matmul_nt, ops};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// Per thread: attention scores.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Below this many (token, key) pairs per step attention runs on one thread.
const PARALLEL_PAIRS: usize = 512;

impl Model {
    /// Attention of layer `l`: reads `ws.xn`, writes `ws.out`; appends the
    /// step's keys and values to `kv`.
    pub(crate) fn attention(
        &self,
        l: usize,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        let w = match &self.layers[l].attn {
            Attention::Standard(w) => w,
            Attention::Latent(w) => return self.latent_attention(l, w, chunks, kv, ws),
        };
        let a = &self.cfg.attention;
        let (d, nh, nkv) = (a.head_dim, a.num_heads, a.num_kv_heads);
        let (qw, kvw) = (nh * d, nkv * d);
        let row = qw + 2 * kvw;
        let t = ws.tok.len();
        ws.qkv.resize(t * row, 0.0);
        matmul_nt(&ws.xn, t, &w.qkv, &mut ws.qkv)?;
        let half = self.rope.half();
        for (i, r) in ws.qkv.chunks_exact_mut(row).enumerate() {
            if let Some(b) = &w.qkv_bias {
                ops::add_inplace(r, b);
            }
            let (q, rest) = r.split_at_mut(qw);
            let (k, v) = rest.split_at_mut(kvw);
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                // per-head norms have head_dim weights, full-width ones cover every head
                ops::rms_norm_inplace(q, qn, self.cfg.rms_norm_eps);
                ops::rms_norm_inplace(k, kn, self.cfg.rms_norm_eps);
            }
            if let Some(c) = a.clip_qkv {
                for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                    *x = x.clamp(-c, c);
                }
            }
            let (cos, sin) = (&ws.cos[i * half..(i + 1) * half], &ws.sin[i * half..(i + 1) * half]);
            self.rope.apply(q, d, 0, cos, sin);
            self.rope.apply(k, d, 0, cos, sin);
            let slot = ws.layout.slots[i] as usize;
            kv.write(l, slot, k, v);
        }

        // scores and weighted values, one task per token
        let (kc, vc) = kv.layer(l);
        let scale = a.softmax_scale;
        let group = nh / nkv;
        let window = a.window(l);
        let sinks = w.sinks.as_deref();
        let qkv = &ws.qkv;
        let tok = &ws.tok;
        let (kv_rows, kv_rows_at) = (&ws.kv_rows, &ws.kv_rows_at);
        ws.attn.resize(t * qw, 0.0);
        let run = |(i, out): (usize, &mut [f32])| {
            let (c, pos) = tok[i];
            let lo = window.map_or(0, |wn| (pos + 1).saturating_sub(wn));
            let q_all = &qkv[i * row..i * row + qw];
            // key/value row offsets of the visible positions
            let rows = &kv_rows[kv_rows_at[c] + lo..=kv_rows_at[c] + pos];
            SCORES.with(|s| {
                let scores = &mut *s.borrow_mut();
                // the query heads sharing each KV head, over its keys and values
                for g in 0..nkv {
                    let hs = g * group * d..(g + 1) * group * d;
                    let kv = ops::KvRows { keys: &kc[g * d..], values: &vc[g * d..], rows, head_dim: d, value_dim: d };
                    let sink = sinks.map(|s| &s[g * group..(g + 1) * group]);
                    ops::attend(&q_all[hs.clone()], kv, scale, sink, scores, &mut out[hs]);
                }
            });
        };
        let pairs: usize = tok.iter().map(|&(_, p)| p + 1).sum();
        if pairs >= PARALLEL_PAIRS {
            ws.attn.par_chunks_mut(qw).enumerate().for_each(run);
        } else {
            ws.attn.chunks_mut(qw).enumerate().for_each(run);
        }
        matmul_nt(&ws.attn, t, &w.o, &mut ws.out)?;
        if let Some(b) = &w.o_bias {
            for r in ws.out.chunks_exact_mut(self.cfg.hidden_size) {
                ops::add_inplace(r, b);
            }
        }
        Ok(())
    }
}
