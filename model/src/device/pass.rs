//! [`DeviceModel`]: one forward step as a sequence of [`Device`] operations
//! (see the module docs of [`super`]).

use super::tier::DeviceExperts;
use super::weights::{DevFfn, DevLayer, DevMlp, DevWeights};
use super::{AttnDims, AttnIdx, Device, Group, Heads};
use crate::forward::{ForwardOutput, SeqChunk, Workspace};
use crate::step_layout::{logit_rows, StepLayout};
use crate::weights::{FfnWeights, Model};
use crate::{ModelError, Result};
use moe_types::{LayerId, LayerRouting, StepRouting};

/// The paged KV cache on the device: per layer, keys and values of
/// `num_blocks * block_size` rows.
struct DevKv<D: Device> {
    block_size: usize,
    num_blocks: usize,
    bytes: usize,
    layers: Vec<(D::Buf, D::Buf)>,
}

/// Widths the step buffers are sized from.
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

/// Device buffers of one step, sized for `tokens` tokens (operations accept
/// buffers longer than their shape).
struct Buffers<D: Device> {
    tokens: usize,
    h: D::Buf,
    xn: D::Buf,
    out: D::Buf,
    qkv: D::Buf,
    attn: D::Buf,
    router: D::Buf,
    ahead: D::Buf,
    gate_up: D::Buf,
    act: D::Buf,
    shared: D::Buf,
    gate: D::Buf,
    group_rows: D::Idx,
    group_weights: D::Buf,
    logits: D::Buf,
    lm_x: D::Buf,
    lm_xn: D::Buf,
    scratch: D::Scratch,
}

impl<D: Device> Buffers<D> {
    fn new(dev: &D, w: Widths, t: usize) -> Result<Self> {
        let f = |n: usize| dev.zeros(n.max(1));
        let widest = w.hidden.max(w.q).max(w.ffn);
        Ok(Self {
            tokens: t,
            h: f(t * w.hidden)?,
            xn: f(t * w.hidden)?,
            out: f(t * w.hidden)?,
            qkv: f(t * w.qkv)?,
            attn: f(t * w.q)?,
            router: f(t * w.experts)?,
            ahead: f(t * w.hidden)?,
            gate_up: f(t * 2 * w.ffn)?,
            act: f(t * w.ffn)?,
            shared: f(t * w.hidden)?,
            gate: f(t)?,
            group_rows: dev.zeros_idx((t * w.top_k).max(1))?,
            group_weights: f(t * w.top_k)?,
            logits: f(t * w.vocab)?,
            lm_x: f(t * w.hidden)?,
            lm_xn: f(t * w.hidden)?,
            scratch: dev.scratch(t.max(1), widest, w.hidden, w.expert_ffn.max(1))?,
        })
    }
}

/// The model's non-expert weights, KV cache and activations on one device.
pub struct DeviceModel<D: Device> {
    dev: D,
    w: DevWeights<D>,
    kv: DevKv<D>,
    widths: Widths,
    buf: Option<Buffers<D>>,
    /// Host-side scratch (routing, rotary tables) shared with the CPU path.
    host: Workspace,
}

/// What every layer of a step reads: the device, the host model and its
/// weights on the device.
struct StepCtx<'a, D: Device> {
    dev: &'a D,
    model: &'a Model,
    layers: &'a [DevLayer<D>],
}

impl<D: Device> Clone for StepCtx<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: Device> Copy for StepCtx<'_, D> {}

impl<D: Device> DeviceModel<D> {
    /// Uploads `model`'s non-expert weights to `dev` and allocates a KV
    /// cache of `num_blocks` blocks of `block_size` slots there. Refuses, with
    /// the reason, a model whose layers the device pass does not cover.
    pub fn new(dev: D, model: &Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(ModelError::Input("KV block size must be positive".into()));
        }
        let cfg = &model.cfg;
        let w = DevWeights::upload(&dev, model)?;
        let (kw, vw) = cfg.kv_cache_widths();
        let rows = num_blocks * block_size;
        let layers = (0..cfg.num_layers())
            .map(|_| Ok((dev.zeros((rows * kw).max(1))?, dev.zeros((rows * vw).max(1))?)))
            .collect::<Result<Vec<_>>>()?;
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
        let kv_bytes = cfg.num_layers() * rows * (kw + vw) * 4;
        Ok(Self {
            dev,
            w,
            kv: DevKv { block_size, num_blocks, bytes: kv_bytes, layers },
            widths,
            buf: None,
            host: Workspace::new(),
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Bytes of non-expert weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes
    }

    /// Bytes of the device KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes
    }

    /// Whether steps return the residual stream entering each MoE layer and
    /// the routers' scores (traces), as [`Workspace::capture_hidden`].
    pub fn capture_hidden(&mut self, on: bool) {
        self.host.capture_hidden(on);
    }

    /// Runs one step of `model` (the model these weights came from) on the
    /// device: every chunk's tokens through every layer, keys and values into
    /// the device cache, experts through `tier`; returns the requested logits
    /// and the routing, as [`Model::forward`] does.
    pub fn forward<T: DeviceExperts<D>>(
        &mut self,
        model: &Model,
        chunks: &[SeqChunk<'_>],
        tier: &mut T,
    ) -> Result<ForwardOutput> {
        model.validate(chunks, self.kv.block_size, self.kv.num_blocks)?;
        let layout = StepLayout::new(chunks, self.kv.block_size)
            .map_err(|_| ModelError::Input("step too large for the device kernels' 32-bit indices".into()))?;
        let t = layout.len();
        if self.buf.as_ref().is_none_or(|b| b.tokens < t) {
            // drop the old buffers first: the device may not hold both
            self.buf = None;
            self.buf = Some(Buffers::new(&self.dev, self.widths, t.next_power_of_two())?);
        }
        let (dev, w, kv) = (&self.dev, &self.w, &mut self.kv);
        let b = self.buf.as_mut().expect("allocated above");
        let host = &mut self.host;
        let cfg = &model.cfg;
        let hsz = cfg.hidden_size;

        // the step's addressing and rotary tables, once
        let half = model.rope.half();
        host.cos.resize(t * half, 0.0);
        host.sin.resize(t * half, 0.0);
        for (i, &p) in layout.pos.iter().enumerate() {
            let r = i * half..(i + 1) * half;
            model.rope.angles(p as usize, &mut host.cos[r.clone()], &mut host.sin[r]);
        }
        let ids = dev.upload_ids(&layout.ids)?;
        let pos = dev.upload_idx(&layout.pos)?;
        let slots = dev.upload_idx(&layout.slots)?;
        let blocks = dev.upload_idx(&layout.blocks)?;
        let block_off = dev.upload_idx(&layout.block_off)?;
        let cos = dev.upload(&host.cos)?;
        let sin = dev.upload(&host.sin)?;
        let step = StepIdx { slots: &slots, blocks: &blocks, block_off: &block_off, pos: &pos, cos: &cos, sin: &sin };

        dev.embedding(&w.embed, &ids, t, &mut b.h)?;
        let mut routing = StepRouting::default();
        let mut hidden = Vec::new();
        host.captured_logits.clear();
        let show = tier.wants_hidden();
        let eps = cfg.rms_norm_eps;
        let cx = StepCtx { dev, model, layers: &w.layers };
        for (l, layer) in w.layers.iter().enumerate() {
            if matches!(layer.ffn, DevFfn::Moe { .. }) && (show || host.capture) {
                let mut h = vec![0.0; t * hsz];
                dev.read(&b.h, &mut h)?;
                if show {
                    tier.hidden(LayerId(l as u16), &h);
                }
                if host.capture {
                    hidden.push(h);
                }
            }
            dev.rms_norm(&b.h, &layer.input_norm, t, eps, &mut b.xn)?;
            attention(cx, (l, t), &step, kv, b)?;
            dev.add(&mut b.h, &b.out, t * hsz)?;
            dev.rms_norm(&b.h, &layer.post_attn_norm, t, eps, &mut b.xn)?;
            match &layer.ffn {
                DevFfn::Dense(m) => mlp(dev, m, t, b, MlpOut::Out)?,
                DevFfn::Moe { .. } => routing.layers.push(moe_block(cx, (l, t), tier, b, host)?),
            }
            dev.add(&mut b.h, &b.out, t * hsz)?;
        }

        // logits of the requested rows
        let rows = logit_rows(chunks);
        let n = rows.len();
        let mut logits = vec![0.0; n * cfg.vocab_size];
        if n > 0 {
            let idx: Vec<i32> = rows.iter().map(|&(i, _)| i as i32).collect();
            let idx = dev.upload_idx(&idx)?;
            dev.gather_rows(&b.h, &idx, n, hsz, &mut b.lm_x)?;
            dev.rms_norm(&b.lm_x, &w.final_norm, n, eps, &mut b.lm_xn)?;
            dev.matmul(&b.lm_xn, n, w.lm_head(), &mut b.scratch, &mut b.logits)?;
            dev.read(&b.logits, &mut logits)?;
        }
        Ok(ForwardOutput {
            logits,
            rows: rows.into_iter().map(|(_, r)| r).collect(),
            routing,
            hidden,
            router_logits: std::mem::take(&mut host.captured_logits),
        })
    }
}

/// The step's uploaded addressing and rotary tables.
struct StepIdx<'a, D: Device> {
    slots: &'a D::Idx,
    blocks: &'a D::Idx,
    block_off: &'a D::Idx,
    pos: &'a D::Idx,
    cos: &'a D::Buf,
    sin: &'a D::Buf,
}

/// Self-attention of layer `l`: reads `b.xn`, writes `b.out`; writes the
/// step's keys and values into the device cache.
fn attention<D: Device>(
    cx: StepCtx<'_, D>,
    (l, t): (usize, usize),
    step: &StepIdx<'_, D>,
    kv: &mut DevKv<D>,
    b: &mut Buffers<D>,
) -> Result<()> {
    let StepCtx { dev, model, layers } = cx;
    let layer = &layers[l];
    let a = &model.cfg.attention;
    let (d, nh, nkv) = (a.head_dim, a.num_heads, a.num_kv_heads);
    let (qw, kvw) = (nh * d, nkv * d);
    let row = qw + 2 * kvw;
    dev.matmul(&b.xn, t, &layer.qkv, &mut b.scratch, &mut b.qkv)?;
    if let Some(bias) = &layer.qkv_bias {
        dev.add_bias_rows(&mut b.qkv, bias, t)?;
    }
    let heads = |col, width, count| Heads { n_tok: t, stride: row, col, width, count };
    if let Some((qn, kn, per_head)) = &layer.qk_norm {
        // per-head weights are head_dim long; full-width ones cover every head
        let eps = model.cfg.rms_norm_eps;
        let (q, k) =
            if *per_head { (heads(0, d, nh), heads(qw, d, nkv)) } else { (heads(0, qw, 1), heads(qw, kvw, 1)) };
        dev.norm_heads(&mut b.qkv, qn, q, eps)?;
        dev.norm_heads(&mut b.qkv, kn, k, eps)?;
    }
    if let Some(c) = a.clip_qkv {
        dev.clamp(&mut b.qkv, t * row, c)?;
    }
    let half = model.rope.half();
    dev.rope(&mut b.qkv, step.cos, step.sin, heads(0, d, nh), half)?;
    dev.rope(&mut b.qkv, step.cos, step.sin, heads(qw, d, nkv), half)?;
    let dims = AttnDims {
        n_tok: t,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
        block_size: kv.block_size,
        window: a.window(l),
        scale: a.softmax_scale,
    };
    let (kc, vc) = &mut kv.layers[l];
    dev.kv_write(&b.qkv, dims, step.slots, kc, vc)?;
    let idx = AttnIdx { blocks: step.blocks, block_off: step.block_off, pos: step.pos };
    dev.attention(&b.qkv, dims, idx, (kc, vc), &mut b.attn)?;
    dev.matmul(&b.attn, t, &layer.o, &mut b.scratch, &mut b.out)?;
    if let Some(bias) = &layer.o_bias {
        dev.add_bias_rows(&mut b.out, bias, t)?;
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
fn mlp<D: Device>(dev: &D, m: &DevMlp<D>, t: usize, b: &mut Buffers<D>, to: MlpOut) -> Result<()> {
    let f = D::cols(&m.down);
    dev.matmul(&b.xn, t, &m.gate_up, &mut b.scratch, &mut b.gate_up)?;
    dev.silu_mul(&b.gate_up, t, f, &mut b.act)?;
    let out = match to {
        MlpOut::Out => &mut b.out,
        MlpOut::Shared => &mut b.shared,
    };
    dev.matmul(&b.act, t, &m.down, &mut b.scratch, out)
}

/// The MoE block of layer `l` over the `t` rows of `b.xn`, into `b.out`.
fn moe_block<D: Device, T: DeviceExperts<D>>(
    cx: StepCtx<'_, D>,
    (l, t): (usize, usize),
    tier: &mut T,
    b: &mut Buffers<D>,
    host: &mut Workspace,
) -> Result<LayerRouting> {
    let StepCtx { dev, model, layers } = cx;
    let cfg = &model.cfg;
    let (hsz, ne) = (cfg.hidden_size, cfg.moe.num_experts);
    let layer = LayerId(l as u16);
    let (FfnWeights::Moe { router: host_router, .. }, DevFfn::Moe { router, shared }) =
        (&model.layers[l].ffn, &layers[l].ffn)
    else {
        return Err(ModelError::Input(format!("layer {l} is not a MoE layer")));
    };

    // router logits to the host; routing there by the CPU path's rule
    dev.matmul(&b.xn, t, router, &mut b.scratch, &mut b.router)?;
    host.moe.router.resize(t * ne, 0.0);
    dev.read(&b.router, &mut host.moe.router[..t * ne])?;
    if host.capture {
        let mut scores = host.moe.router[..t * ne].to_vec();
        if let Some(bias) = &host_router.bias {
            scores.chunks_exact_mut(ne).for_each(|p| moe_kernels::ops::add_inplace(p, bias));
        }
        host.captured_logits.push(scores);
    }
    let routing = model.route_step(layer, host_router, t, &mut host.moe);
    tier.prepare(&routing, &host.moe.used)?;
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
        dev.write_idx(&rows, &mut b.group_rows)?;
        dev.write(&weights, &mut b.group_weights)?;
        dev.fill_zero(&mut b.out)?;
        for (&e, span) in m.used.iter().zip(&spans) {
            let expert = tier.expert(layer, e)?;
            let group = Group { rows: &b.group_rows, weights: &b.group_weights, span: span.clone() };
            dev.expert_ffn(&b.xn, group, expert, &mut b.scratch, &mut b.out)?;
        }
        Ok(())
    };
    let done = products();
    // the pins go whether or not the products could be queued
    tier.release(layer, &m.used)?;
    done?;

    if let Some(sh) = shared.as_ref() {
        mlp(dev, &sh.mlp, t, b, MlpOut::Shared)?;
        match &sh.gate {
            Some(gate) => {
                dev.matmul(&b.xn, t, gate, &mut b.scratch, &mut b.gate)?;
                dev.sigmoid_gate_add(&b.shared, &b.gate, t, hsz, &mut b.out)?;
            }
            None => dev.add(&mut b.out, &b.shared, t * hsz)?,
        }
    }
    Ok(routing)
}

/// Look-ahead gating on the device: the next `tier.lookahead()` MoE layers'
/// routers applied to the residual stream `b.h` (each after its own
/// post-attention norm); the choices go to `tier.forecast`.
fn look_ahead<D: Device, T: DeviceExperts<D>>(
    cx: StepCtx<'_, D>,
    (l, t): (usize, usize),
    tier: &mut T,
    b: &mut Buffers<D>,
    host: &mut Workspace,
) -> Result<()> {
    let StepCtx { dev, model, layers } = cx;
    let depth = tier.lookahead();
    if depth == 0 {
        return Ok(());
    }
    let ne = model.cfg.moe.num_experts;
    let later =
        model.layers.iter().enumerate().skip(l + 1).filter_map(|(j, layer)| match (&layer.ffn, &layers[j].ffn) {
            (FfnWeights::Moe { router, .. }, DevFfn::Moe { router: on_device, .. }) => Some((j, router, on_device)),
            _ => None,
        });
    for (j, host_router, router) in later.take(depth) {
        dev.rms_norm(&b.h, &layers[j].post_attn_norm, t, model.cfg.rms_norm_eps, &mut b.ahead)?;
        dev.matmul(&b.ahead, t, router, &mut b.scratch, &mut b.router)?;
        host.moe.ahead_probs.resize(t * ne, 0.0);
        dev.read(&b.router, &mut host.moe.ahead_probs[..t * ne])?;
        model.route_ahead(host_router, t, &mut host.moe);
        tier.forecast(LayerId(l as u16), LayerId(j as u16), &host.moe.ahead_ids);
    }
    Ok(())
}
