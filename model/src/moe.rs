//! The FFN half of a layer: dense SwiGLU MLPs and the routed-expert block.
//!
//! The MoE block routes every token of the step, groups tokens by expert,
//! runs each chosen expert once over its group, and scatter-adds the
//! weighted outputs. Experts are reached only through an `ExpertProvider`.

use crate::config::ExpertAct;
use crate::experts::{ExpertProvider, ExpertWeights};
use crate::forward::Workspace;
use crate::routing::{route, RouteScratch};
use crate::weights::{Model, Router, SharedExpert};
use crate::Result;
use moe_kernels::{matmul_nt, ops};
use moe_types::{ExpertId, LayerId, LayerRouting};
use rayon::prelude::*;
use std::cell::RefCell;

/// Routed (token, expert) pairs from which experts run in parallel.
const PARALLEL_ROUTED_TOKENS: usize = 8;

thread_local! {
    static FFN: RefCell<FfnScratch> = RefCell::new(FfnScratch::default());
}

/// Buffers of the FFN half, reused across steps.
#[derive(Default)]
pub(crate) struct MoeScratch {
    pub(crate) router: Vec<f32>,
    gather: Vec<f32>,
    ffn: FfnScratch,
    y: Vec<f32>,
    shared: Vec<f32>,
    topk: Vec<usize>,
    chosen: Vec<f32>,
    route: RouteScratch,
    /// Per expert: (token, weight) pairs routed to it this layer.
    pub(crate) groups: Vec<Vec<(usize, f32)>>,
    pub(crate) used: Vec<ExpertId>,
    /// Look-ahead gating: normalised hidden states, router probabilities, ids.
    ahead_x: Vec<f32>,
    pub(crate) ahead_probs: Vec<f32>,
    pub(crate) ahead_ids: Vec<ExpertId>,
}

impl MoeScratch {
    pub(crate) fn ffn_mut(&mut self) -> &mut FfnScratch {
        &mut self.ffn
    }
}

/// Intermediate activations of one SwiGLU MLP.
#[derive(Default)]
pub(crate) struct FfnScratch {
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// `out[t] = mlp(x[t])` for `t` rows of `x`, with activation `act` (and the
/// expert's biases after each product, where it has them).
pub(crate) fn mlp(
    w: &ExpertWeights,
    act: ExpertAct,
    x: &[f32],
    t: usize,
    s: &mut FfnScratch,
    out: &mut [f32],
) -> Result<()> {
    let f = w.ffn();
    s.gate_up.resize(t * 2 * f, 0.0);
    s.act.resize(t * f, 0.0);
    matmul_nt(x, t, &w.gate_up, &mut s.gate_up)?;
    if let Some(b) = &w.bias {
        s.gate_up.chunks_exact_mut(2 * f).for_each(|r| ops::add_inplace(r, &b.gate_up));
    }
    match act {
        ExpertAct::Swiglu => ops::silu_mul(&s.gate_up, f, &mut s.act),
        ExpertAct::ClampedSwiglu { alpha, limit } => ops::clamped_swiglu(&s.gate_up, f, alpha, limit, &mut s.act),
    }
    matmul_nt(&s.act, t, &w.down, out)?;
    if let Some(b) = &w.bias {
        out[..t * b.down.len()].chunks_exact_mut(b.down.len()).for_each(|r| ops::add_inplace(r, &b.down));
    }
    Ok(())
}

impl Model {
    /// Look-ahead gating: applies the routers of the next
    /// `experts.lookahead()` MoE layers to the residual stream entering layer
    /// `l`'s FFN (`ws.h`), each with its own post-attention norm, and hands the
    /// chosen experts to `experts.forecast`. Cheap: one `[tokens, experts]`
    /// product per layer ahead.
    fn look_ahead<E: ExpertProvider>(&self, l: usize, experts: &E, ws: &mut Workspace) -> Result<()> {
        let depth = experts.lookahead();
        if depth == 0 {
            return Ok(());
        }
        let ne = self.cfg.moe.num_experts;
        let t = ws.tok.len();
        let s = &mut ws.moe;
        let later = self.layers.iter().enumerate().skip(l + 1).filter_map(|(j, layer)| match &layer.ffn {
            crate::weights::FfnWeights::Moe { router, .. } => Some((j, &layer.post_attn_norm, router)),
            crate::weights::FfnWeights::Dense(_) => None,
        });
        for (j, norm, router) in later.take(depth) {
            s.ahead_x.resize(ws.h.len(), 0.0);
            ops::rms_norm(&ws.h, norm, self.cfg.rms_norm_eps, &mut s.ahead_x);
            s.ahead_probs.resize(t * ne, 0.0);
            matmul_nt(&s.ahead_x, t, &router.weight, &mut s.ahead_probs)?;
            self.route_ahead(router, t, s);
            experts.forecast(LayerId(l as u16), LayerId(j as u16), &s.ahead_ids);
        }
        Ok(())
    }

    /// Look-ahead gating's routing: the `t` rows of router logits in
    /// `s.ahead_probs` (overwritten) to the chosen experts, in `s.ahead_ids`.
    pub(crate) fn route_ahead(&self, router: &Router, t: usize, s: &mut MoeScratch) {
        let ne = self.cfg.moe.num_experts;
        s.ahead_ids.clear();
        for probs in s.ahead_probs[..t * ne].chunks_exact_mut(ne) {
            // the layer's own rule (groups, correction bias) on a stale residual
            if let Some(b) = &router.bias {
                ops::add_inplace(probs, b);
            }
            route(probs, &self.cfg.moe, router.correction.as_deref(), &mut s.route, &mut s.topk, &mut s.chosen);
            s.ahead_ids.extend(s.topk.iter().map(|&e| ExpertId(e as u16)));
        }
    }

    /// Routes the `t` tokens whose router logits are in `s.router` (`[t,
    /// experts]`, overwritten) by the layer's rule: returns the routing and
    /// leaves each expert's `(token, weight)` group in `s.groups` and the
    /// distinct experts, ascending, in `s.used`. One routing step for the CPU
    /// and GPU forward passes.
    pub(crate) fn route_step(&self, layer: LayerId, router: &Router, t: usize, s: &mut MoeScratch) -> LayerRouting {
        let m = &self.cfg.moe;
        let (ne, k) = (m.num_experts, m.top_k);
        s.groups.resize_with(ne, Vec::new);
        s.groups.iter_mut().for_each(Vec::clear);
        let mut routing =
            LayerRouting { layer, top_k: k, ids: Vec::with_capacity(t * k), weights: Vec::with_capacity(t * k) };
        for (i, probs) in s.router[..t * ne].chunks_exact_mut(ne).enumerate() {
            if let Some(b) = &router.bias {
                ops::add_inplace(probs, b);
            }
            route(probs, m, router.correction.as_deref(), &mut s.route, &mut s.topk, &mut s.chosen);
            for (&e, &wgt) in s.topk.iter().zip(&s.chosen) {
                routing.ids.push(ExpertId(e as u16));
                routing.weights.push(wgt);
                s.groups[e].push((i, wgt));
            }
        }
        s.used.clear();
        s.used.extend((0..ne).filter(|&e| !s.groups[e].is_empty()).map(|e| ExpertId(e as u16)));
        routing
    }

    /// The MoE block of layer `l`: reads `ws.xn`, writes `ws.out`, returns the
    /// routing it applied.
    pub(crate) fn moe_block<E: ExpertProvider + Sync>(
        &self,
        l: usize,
        router: &Router,
        shared: Option<&SharedExpert>,
        experts: &E,
        ws: &mut Workspace,
    ) -> Result<LayerRouting> {
        let m = &self.cfg.moe;
        let (hsz, ne, k) = (self.cfg.hidden_size, m.num_experts, m.top_k);
        let t = ws.tok.len();
        let s = &mut ws.moe;
        let layer = LayerId(l as u16);

        // route by the configured rule (crate::routing)
        s.router.resize(t * ne, 0.0);
        matmul_nt(&ws.xn, t, &router.weight, &mut s.router)?;
        if ws.capture {
            // the logits plus any bias, for traces
            let mut scores = s.router.clone();
            if let Some(b) = &router.bias {
                scores.chunks_exact_mut(ne).for_each(|p| ops::add_inplace(p, b));
            }
            ws.captured_logits.push(scores);
        }
        let routing = self.route_step(layer, router, t, &mut ws.moe);
        let s = &mut ws.moe;
        let act = m.expert_act;
        experts.prepare(&routing, &s.used)?;
        self.look_ahead(l, experts, ws)?;
        let s = &mut ws.moe;

        // each chosen expert once over its token group, then scatter-add
        ws.out.fill(0.0);
        let routed = t * k;
        if s.used.len() > 1 && routed >= PARALLEL_ROUTED_TOKENS && rayon::current_num_threads() > 1 {
            // experts side by side on the pool, each single-threaded; the
            // scatter-add below stays in expert order, so results do not
            // depend on scheduling
            let (xn, groups) = (&ws.xn, &s.groups);
            let outs: Vec<Result<Vec<f32>>> = s
                .used
                .par_iter()
                .map(|&e| {
                    moe_kernels::serial(|| {
                        let group = &groups[e.index()];
                        let mut gather = vec![0.0; group.len() * hsz];
                        for (r, &(tok, _)) in group.iter().enumerate() {
                            gather[r * hsz..(r + 1) * hsz].copy_from_slice(&xn[tok * hsz..(tok + 1) * hsz]);
                        }
                        let w = experts.get(layer, e)?;
                        let mut y = vec![0.0; group.len() * hsz];
                        FFN.with(|f| mlp(&w, act, &gather, group.len(), &mut f.borrow_mut(), &mut y))?;
                        Ok(y)
                    })
                })
                .collect();
            for (&e, y) in s.used.iter().zip(outs) {
                let y = y?;
                for (r, &(tok, wgt)) in s.groups[e.index()].iter().enumerate() {
                    ops::axpy(&mut ws.out[tok * hsz..(tok + 1) * hsz], wgt, &y[r * hsz..(r + 1) * hsz]);
                }
            }
        } else {
            for &e in &s.used {
                let group = &s.groups[e.index()];
                let n = group.len();
                s.gather.resize(n * hsz, 0.0);
                for (r, &(tok, _)) in group.iter().enumerate() {
                    s.gather[r * hsz..(r + 1) * hsz].copy_from_slice(&ws.xn[tok * hsz..(tok + 1) * hsz]);
                }
                let w = experts.get(layer, e)?;
                s.y.resize(n * hsz, 0.0);
                mlp(&w, act, &s.gather, n, &mut s.ffn, &mut s.y)?;
                for (r, &(tok, wgt)) in group.iter().enumerate() {
                    ops::axpy(&mut ws.out[tok * hsz..(tok + 1) * hsz], wgt, &s.y[r * hsz..(r + 1) * hsz]);
                }
            }
        }

        if let Some(sh) = shared {
            s.shared.resize(t * hsz, 0.0);
            mlp(&sh.mlp, ExpertAct::Swiglu, &ws.xn, t, &mut s.ffn, &mut s.shared)?;
            let mut g = [0.0f32];
            for (tok, yr) in s.shared.chunks_exact(hsz).enumerate() {
                let scale = match &sh.gate {
                    Some(gate) => {
                        matmul_nt(&ws.xn[tok * hsz..(tok + 1) * hsz], 1, gate, &mut g)?;
                        ops::sigmoid(g[0])
                    }
                    None => 1.0,
                };
                ops::axpy(&mut ws.out[tok * hsz..(tok + 1) * hsz], scale, yr);
            }
        }
        Ok(routing)
    }
}
