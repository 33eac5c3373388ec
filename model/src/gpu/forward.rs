//! [`GpuModel`]: one forward step on the GPU (see the module docs of [`super`]).

use super::tier::GpuExpertTier;
use super::weights::{GpuFfn, GpuLayer, GpuMlp, GpuWeights};
use crate::forward::{ForwardOutput, SeqChunk, Workspace};
use crate::step_layout::{logit_rows, StepLayout};
use crate::weights::{FfnWeights, Model};
use crate::{ModelError, Result};
use cudarc::driver::CudaSlice;
use moe_kernels::cuda::gemm::{self, matmul_nt, FfnScratch, TokenGroup};
use moe_kernels::cuda::layer_ops::{self, Segments};
use moe_kernels::cuda::ops::{self, AttnMeta, AttnShape, QkvRows};
use moe_kernels::cuda::{CudaError, GpuContext};
use moe_types::{LayerId, StepRouting};

/// The paged KV cache in device memory: per layer, keys and values of
/// `num_blocks * block_size` rows.
struct GpuKv {
    block_size: usize,
    num_blocks: usize,
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
}

/// Device buffers of one step, grown to the largest step seen (kernels
/// accept buffers longer than the shape they are given).
struct Buffers {
    /// Tokens they hold room for.
    tokens: usize,
    h: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    out: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    /// Activations rounded to bf16 for the products.
    bf16: CudaSlice<u16>,
    router: CudaSlice<f32>,
    ahead: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    shared: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    group_rows: CudaSlice<i32>,
    group_weights: CudaSlice<f32>,
    experts: FfnScratch,
    logits: CudaSlice<f32>,
    lm_x: CudaSlice<f32>,
    lm_xn: CudaSlice<f32>,
}

/// Widths the buffers are sized from.
#[derive(Clone, Copy)]
struct Widths {
    hidden: usize,
    qkv: usize,
    q: usize,
    experts: usize,
    top_k: usize,
    /// Widest MLP (dense layers, shared experts, routed experts).
    ffn: usize,
    expert_ffn: usize,
    vocab: usize,
}

impl Buffers {
    fn new(g: &GpuContext, w: Widths, t: usize) -> Result<Self> {
        let s = g.stream();
        let f = |n: usize| s.alloc_zeros::<f32>(n.max(1));
        let k = w.hidden.max(w.q).max(w.ffn);
        Ok(Self {
            tokens: t,
            h: f(t * w.hidden)?,
            xn: f(t * w.hidden)?,
            out: f(t * w.hidden)?,
            qkv: f(t * w.qkv)?,
            attn: f(t * w.q)?,
            bf16: s.alloc_zeros::<u16>((t * k).max(1))?,
            router: f(t * w.experts)?,
            ahead: f(t * w.hidden)?,
            gate_up: f(t * 2 * w.ffn)?,
            act: f(t * w.ffn)?,
            shared: f(t * w.hidden)?,
            gate: f(t)?,
            group_rows: s.alloc_zeros::<i32>((t * w.top_k).max(1))?,
            group_weights: f(t * w.top_k)?,
            experts: FfnScratch::new(g, t.max(1), w.hidden, w.expert_ffn.max(1))?,
            logits: f(t * w.vocab)?,
            lm_x: f(t * w.hidden)?,
            lm_xn: f(t * w.hidden)?,
        })
    }
}

/// The model's non-expert weights, KV cache and activations on one GPU.
pub struct GpuModel {
    g: GpuContext,
    w: GpuWeights,
    kv: GpuKv,
    widths: Widths,
    buf: Option<Buffers>,
    /// Host-side scratch (routing, rotary tables) shared with the CPU path.
    host: Workspace,
}

impl GpuModel {
    /// Uploads `model`'s non-expert weights to `g`'s device and allocates a KV
    /// cache of `num_blocks` blocks of `block_size` slots there. Refuses, with
    /// the reason, a model whose layers the GPU kernels do not cover.
    pub fn new(g: GpuContext, model: &Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(ModelError::Input("KV block size must be positive".into()));
        }
        let cfg = &model.cfg;
        let w = GpuWeights::upload(&g, model)?;
        let (kw, vw) = cfg.kv_cache_widths();
        let rows = num_blocks * block_size;
        let layers = (0..cfg.num_layers())
            .map(|_| Ok((g.stream().alloc_zeros::<f32>(rows * kw)?, g.stream().alloc_zeros::<f32>(rows * vw)?)))
            .collect::<Result<Vec<_>, CudaError>>()?;
        let a = &cfg.attention;
        let mut ffn = cfg.moe.expert_ffn;
        for layer in &model.layers {
            match &layer.ffn {
                FfnWeights::Dense(m) => ffn = ffn.max(m.ffn()),
                FfnWeights::Moe { shared: Some(sh), .. } => ffn = ffn.max(sh.mlp.ffn()),
                FfnWeights::Moe { shared: None, .. } => {}
            }
        }
        let widths = Widths {
            hidden: cfg.hidden_size,
            qkv: (a.num_heads + 2 * a.num_kv_heads) * a.head_dim,
            q: a.num_heads * a.head_dim,
            experts: cfg.moe.num_experts,
            top_k: cfg.moe.top_k,
            ffn,
            expert_ffn: cfg.moe.expert_ffn,
            vocab: cfg.vocab_size,
        };
        Ok(Self { g, w, kv: GpuKv { block_size, num_blocks, layers }, widths, buf: None, host: Workspace::new() })
    }

    /// The device context (for the expert tier).
    pub fn gpu(&self) -> &GpuContext {
        &self.g
    }

    /// Bytes of non-expert weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes
    }

    /// Bytes of the device KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.layers.iter().map(|(k, v)| 4 * (k.len() + v.len())).sum()
    }

    /// Whether steps return the residual stream entering each MoE layer and
    /// the routers' scores (traces), as [`Workspace::capture_hidden`].
    pub fn capture_hidden(&mut self, on: bool) {
        self.host.capture_hidden(on);
    }

    /// Runs one step of `model` (the model these weights came from) on the
    /// GPU: every chunk's tokens through every layer, keys and values into the
    /// device cache, experts through `tier`; returns the requested logits and
    /// the routing, as [`Model::forward`] does.
    pub fn forward<T: GpuExpertTier>(
        &mut self,
        model: &Model,
        chunks: &[SeqChunk<'_>],
        tier: &mut T,
    ) -> Result<ForwardOutput> {
        model.validate(chunks, self.kv.block_size, self.kv.num_blocks)?;
        let layout = StepLayout::new(chunks, self.kv.block_size)
            .map_err(|_| ModelError::Input("step too large for the GPU kernels' 32-bit indices".into()))?;
        let t = layout.len();
        if self.buf.as_ref().is_none_or(|b| b.tokens < t) {
            // drop the old buffers first: the device may not hold both
            self.buf = None;
            self.buf = Some(Buffers::new(&self.g, self.widths, t.next_power_of_two())?);
        }
        let (g, w, kv) = (&self.g, &self.w, &mut self.kv);
        let b = self.buf.as_mut().expect("allocated above");
        let host = &mut self.host;
        let cfg = &model.cfg;
        let hsz = cfg.hidden_size;
        let s = g.stream();

        // the step's addressing and rotary tables, once
        let half = model.rope.half();
        host.cos.resize(t * half, 0.0);
        host.sin.resize(t * half, 0.0);
        for (i, &p) in layout.pos.iter().enumerate() {
            let r = i * half..(i + 1) * half;
            model.rope.angles(p as usize, &mut host.cos[r.clone()], &mut host.sin[r]);
        }
        let ids = s.clone_htod(&layout.ids)?;
        let pos = s.clone_htod(&layout.pos)?;
        let slots = s.clone_htod(&layout.slots)?;
        let blocks = s.clone_htod(&layout.blocks)?;
        let block_off = s.clone_htod(&layout.block_off)?;
        let cos = s.clone_htod(&host.cos)?;
        let sin = s.clone_htod(&host.sin)?;
        let meta = AttnMeta { blocks: &blocks, block_off: &block_off, pos: &pos };

        ops::embedding(g, &w.embed, &ids, t, &mut b.h)?;
        let mut routing = StepRouting::default();
        let mut hidden = Vec::new();
        host.captured_logits.clear();
        let show = tier.wants_hidden();
        let eps = cfg.rms_norm_eps;
        for (l, layer) in w.layers.iter().enumerate() {
            if matches!(layer.ffn, GpuFfn::Moe { .. }) && (show || host.capture) {
                let h = s.clone_dtoh(&b.h.slice(..t * hsz))?;
                s.synchronize()?;
                if show {
                    tier.hidden(LayerId(l as u16), &h);
                }
                if host.capture {
                    hidden.push(h);
                }
            }
            ops::rms_norm(g, &b.h, &layer.input_norm, (t, eps), &mut b.xn)?;
            attention(g, model, l, layer, (t, &cos, &sin), (&slots, &meta), kv, b)?;
            layer_ops::add_inplace(g, &mut b.h, &b.out, t * hsz)?;
            ops::rms_norm(g, &b.h, &layer.post_attn_norm, (t, eps), &mut b.xn)?;
            match &layer.ffn {
                GpuFfn::Dense(m) => mlp(g, m, t, b, MlpOut::Out)?,
                GpuFfn::Moe { .. } => {
                    let r = moe_block(StepCtx { g, model, dev: &w.layers }, (l, t), tier, b, host)?;
                    routing.layers.push(r);
                }
            }
            layer_ops::add_inplace(g, &mut b.h, &b.out, t * hsz)?;
        }

        // logits of the requested rows
        let rows = logit_rows(chunks);
        let n = rows.len();
        let mut logits = Vec::new();
        if n > 0 {
            let idx: Vec<i32> = rows.iter().map(|&(i, _)| i as i32).collect();
            let idx = s.clone_htod(&idx)?;
            ops::gather_rows(g, &b.h, &idx.as_view(), (n, hsz), &mut b.lm_x)?;
            ops::rms_norm(g, &b.lm_x, &w.final_norm, (n, eps), &mut b.lm_xn)?;
            matmul_nt(g, &b.lm_xn, n, w.lm_head(), &mut b.bf16, &mut b.logits)?;
            logits = s.clone_dtoh(&b.logits.slice(..n * cfg.vocab_size))?;
        }
        s.synchronize()?;
        Ok(ForwardOutput {
            logits,
            rows: rows.into_iter().map(|(_, r)| r).collect(),
            routing,
            hidden,
            router_logits: std::mem::take(&mut host.captured_logits),
        })
    }
}

/// Self-attention of layer `l`: reads `b.xn`, writes `b.out`; writes the
/// step's keys and values into the device cache.
#[allow(clippy::too_many_arguments)]
fn attention(
    g: &GpuContext,
    model: &Model,
    l: usize,
    layer: &GpuLayer,
    (t, cos, sin): (usize, &CudaSlice<f32>, &CudaSlice<f32>),
    (slots, meta): (&CudaSlice<i32>, &AttnMeta<'_>),
    kv: &mut GpuKv,
    b: &mut Buffers,
) -> Result<()> {
    let a = &model.cfg.attention;
    let (d, nh, nkv) = (a.head_dim, a.num_heads, a.num_kv_heads);
    let (qw, kvw) = (nh * d, nkv * d);
    let row = qw + 2 * kvw;
    matmul_nt(g, &b.xn, t, &layer.qkv, &mut b.bf16, &mut b.qkv)?;
    if let Some(bias) = &layer.qkv_bias {
        layer_ops::add_bias_rows(g, &mut b.qkv, bias, t)?;
    }
    let seg = |col, width, count| Segments { n_tok: t, stride: row, col, width, count };
    if let Some((qn, kn)) = &layer.qk_norm {
        // per-head weights are head_dim long; full-width ones cover every head
        let eps = model.cfg.rms_norm_eps;
        let (q, k) = if qn.len() == d { (seg(0, d, nh), seg(qw, d, nkv)) } else { (seg(0, qw, 1), seg(qw, kvw, 1)) };
        layer_ops::rms_norm_segments(g, &mut b.qkv, qn, q, eps)?;
        layer_ops::rms_norm_segments(g, &mut b.qkv, kn, k, eps)?;
    }
    if let Some(c) = a.clip_qkv {
        layer_ops::clamp(g, &mut b.qkv, t * row, c)?;
    }
    let half = model.rope.half();
    layer_ops::rope_tables(g, &mut b.qkv, (cos, sin), seg(0, d, nh), half)?;
    layer_ops::rope_tables(g, &mut b.qkv, (cos, sin), seg(qw, d, nkv), half)?;
    let shape = AttnShape {
        n_tok: t,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: kv.block_size,
        window: a.window(l),
        scale: a.softmax_scale,
    };
    let (kc, vc) = &mut kv.layers[l];
    ops::kv_write(g, &QkvRows { qkv: &b.qkv, stride: row }, shape, slots, (kc, vc))?;
    ops::paged_attention(g, &QkvRows { qkv: &b.qkv, stride: row }, shape, meta, (kc, vc), &mut b.attn)?;
    matmul_nt(g, &b.attn, t, &layer.o, &mut b.bf16, &mut b.out)?;
    if let Some(bias) = &layer.o_bias {
        layer_ops::add_bias_rows(g, &mut b.out, bias, t)?;
    }
    Ok(())
}

/// Where [`mlp`] writes.
#[derive(Clone, Copy)]
enum MlpOut {
    /// `b.out` (a dense layer).
    Out,
    /// `b.shared` (a shared expert).
    Shared,
}

/// A SwiGLU MLP over the `t` rows of `b.xn`.
fn mlp(g: &GpuContext, m: &GpuMlp, t: usize, b: &mut Buffers, to: MlpOut) -> Result<()> {
    let f = m.down.cols();
    matmul_nt(g, &b.xn, t, &m.gate_up, &mut b.bf16, &mut b.gate_up)?;
    ops::silu_mul(g, &b.gate_up, (t, f), &mut b.act)?;
    let out = match to {
        MlpOut::Out => &mut b.out,
        MlpOut::Shared => &mut b.shared,
    };
    matmul_nt(g, &b.act, t, &m.down, &mut b.bf16, out)?;
    Ok(())
}

/// What every layer of a step reads: the device, the host model and its
/// weights on the device.
#[derive(Clone, Copy)]
struct StepCtx<'a> {
    g: &'a GpuContext,
    model: &'a Model,
    dev: &'a [GpuLayer],
}

/// The MoE block of layer `l` over the `t` rows of `b.xn`, into `b.out`.
fn moe_block<T: GpuExpertTier>(
    cx: StepCtx<'_>,
    (l, t): (usize, usize),
    tier: &mut T,
    b: &mut Buffers,
    host: &mut Workspace,
) -> Result<moe_types::LayerRouting> {
    let StepCtx { g, model, dev } = cx;
    let cfg = &model.cfg;
    let (hsz, ne) = (cfg.hidden_size, cfg.moe.num_experts);
    let s = g.stream();
    let layer = LayerId(l as u16);
    let (FfnWeights::Moe { router: host_router, .. }, GpuFfn::Moe { router, shared }) =
        (&model.layers[l].ffn, &dev[l].ffn)
    else {
        return Err(ModelError::Input(format!("layer {l} is not a MoE layer")));
    };

    // router logits down; routing on the host by the CPU path's rule
    matmul_nt(g, &b.xn, t, router, &mut b.bf16, &mut b.router)?;
    host.moe.router.resize(t * ne, 0.0);
    s.memcpy_dtoh(&b.router.slice(..t * ne), &mut host.moe.router[..t * ne])?;
    s.synchronize()?;
    if host.capture {
        let mut scores = host.moe.router[..t * ne].to_vec();
        if let Some(bias) = &host_router.bias {
            scores.chunks_exact_mut(ne).for_each(|p| moe_kernels::ops::add_inplace(p, bias));
        }
        host.captured_logits.push(scores);
    }
    let routing = model.route_step(layer, host_router, t, &mut host.moe);
    tier.prepare(g, &routing, &host.moe.used)?;
    let ahead = look_ahead(cx, (l, t), tier, b, host);

    // every chosen expert once over its token group, adding into b.out
    let m = &mut host.moe;
    let mut rows = Vec::with_capacity(t * cfg.moe.top_k);
    let mut weights = Vec::with_capacity(t * cfg.moe.top_k);
    let mut spans = Vec::with_capacity(m.used.len());
    for e in &m.used {
        let start = rows.len();
        for &(tok, wgt) in &m.groups[e.index()] {
            rows.push(tok as i32);
            weights.push(wgt);
        }
        spans.push(start..rows.len());
    }
    let products = || -> Result<()> {
        ahead?;
        s.memcpy_htod(&rows, &mut b.group_rows)?;
        s.memcpy_htod(&weights, &mut b.group_weights)?;
        s.memset_zeros(&mut b.out)?;
        for (&e, span) in m.used.iter().zip(&spans) {
            let key = tier.key(layer, e)?;
            let pool = tier.pool();
            pool.wait_ready(g, key)?;
            let views = pool.views(key)?;
            let (rv, wv) = (b.group_rows.slice(span.clone()), b.group_weights.slice(span.clone()));
            let group = TokenGroup { rows: &rv, weights: &wv, len: span.len() };
            gemm::expert_ffn(g, &b.xn, &group, pool.matrices(&views), &mut b.experts, &mut b.out)?;
        }
        Ok(())
    };
    let done = products();
    // the pins go whether or not the products could be queued
    tier.release(layer, &m.used)?;
    done?;

    if let Some(sh) = shared.as_ref() {
        mlp(g, &sh.mlp, t, b, MlpOut::Shared)?;
        match &sh.gate {
            Some(gate) => {
                matmul_nt(g, &b.xn, t, gate, &mut b.bf16, &mut b.gate)?;
                layer_ops::sigmoid_gate_add(g, &b.shared, &b.gate, (t, hsz), &mut b.out)?;
            }
            None => layer_ops::add_inplace(g, &mut b.out, &b.shared, t * hsz)?,
        }
    }
    Ok(routing)
}

/// Look-ahead gating on the device: the next `tier.lookahead()` MoE layers'
/// routers applied to the residual stream `b.h` (each after its own
/// post-attention norm); the choices go to `tier.forecast`.
fn look_ahead<T: GpuExpertTier>(
    cx: StepCtx<'_>,
    (l, t): (usize, usize),
    tier: &mut T,
    b: &mut Buffers,
    host: &mut Workspace,
) -> Result<()> {
    let StepCtx { g, model, dev } = cx;
    let depth = tier.lookahead();
    if depth == 0 {
        return Ok(());
    }
    let ne = model.cfg.moe.num_experts;
    let s = g.stream();
    let later = model.layers.iter().enumerate().skip(l + 1).filter_map(|(j, layer)| match (&layer.ffn, &dev[j].ffn) {
        (FfnWeights::Moe { router, .. }, GpuFfn::Moe { router: on_device, .. }) => Some((j, router, on_device)),
        _ => None,
    });
    for (j, host_router, router) in later.take(depth) {
        ops::rms_norm(g, &b.h, &dev[j].post_attn_norm, (t, model.cfg.rms_norm_eps), &mut b.ahead)?;
        matmul_nt(g, &b.ahead, t, router, &mut b.bf16, &mut b.router)?;
        host.moe.ahead_probs.resize(t * ne, 0.0);
        s.memcpy_dtoh(&b.router.slice(..t * ne), &mut host.moe.ahead_probs[..t * ne])?;
        s.synchronize()?;
        model.route_ahead(host_router, t, &mut host.moe);
        tier.forecast(LayerId(l as u16), LayerId(j as u16), &host.moe.ahead_ids);
    }
    Ok(())
}
