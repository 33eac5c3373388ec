//! The hidden-state predictor: linear probes that read the residual stream
//! entering MoE layer `m` (before its attention, so the forecast is ready
//! while the attention runs), with the token's path through the MoE layers
//! before `m`, and score the experts of MoE layers `m`, `m + 1`, ...
//! `m + D - 1`; the `top_k` best scores are the forecast.
//!
//! A probe's input for layer `m` is `[h / rms(h), path, 1]`: the hidden state
//! divided by its root mean square (as every router's input is normalised),
//! one indicator per expert of each earlier MoE layer (1 if the token chose
//! it there), and a bias (width `hidden + m * experts + 1`). Each probe
//! `W[m][d]` (`[experts, width]`) is fitted offline by ridge regression of
//! the router's scores at layer `m + d` (its logits, as the hidden-state
//! trace records them: a richer target than the chosen set alone) on that
//! input, shrunk towards the router itself: layer `m + d`'s router applied
//! to the normalised input (look-ahead gating from before the attention) is
//! linear in it, so the fit is that map plus a ridge-regularised correction
//! in closed form, `(XᵀX + λI') ΔW = XᵀY - XᵀX W₀ᵀ`, `W = W₀ + ΔW` (`I'` the
//! identity without the bias entry), from sums over the training tokens (no
//! pass over the training data is kept in memory), λ chosen per probe by the
//! recall on held-out sequences (up to 40,000 tokens kept). Its cost at run time is
//! `D * experts * width` multiply-adds per token and MoE layer.
//!
//! File format (`moe-hidden-predictor`, version 1): a safetensors file with f32
//! tensors `probe.{m}.{d}` of shape `[experts, hidden + m * experts + 1]`, and string
//! metadata `format`, `version`, `model`, `layers`, `experts`, `top_k`,
//! `hidden`, `distances`, and per probe `recall.{m}.{d}` and `lambda.{m}.{d}`
//! (held-out recall and the chosen λ).

use super::{Forecast, PathPredictor, Shape};
use crate::OffloadError;
use moe_model::StepToken;
use moe_types::hidden_trace::HiddenReader;
use moe_types::trace::{TraceHeader, TraceToken};
use moe_types::{ExpertId, MoeLayerId};
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

/// The `format` metadata value.
pub const HIDDEN_PREDICTOR_FORMAT: &str = "moe-hidden-predictor";
/// The version written and read.
pub const HIDDEN_PREDICTOR_VERSION: u32 = 1;

/// The trained probes.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenProbes {
    /// Model name the traces came from.
    pub model: String,
    /// MoE layers.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Values per hidden state.
    pub hidden: usize,
    /// Probes per layer: distances 0 (the layer itself) to `distances - 1`.
    pub distances: usize,
    /// `probe(m, d)` at `m * distances + d` (`experts * width(m)` values);
    /// empty where `m + d` is past the last layer.
    pub probes: Vec<Vec<f32>>,
    /// Held-out recall of each probe (NaN where there is none).
    pub recall: Vec<f64>,
    /// The λ chosen for each probe.
    pub lambda: Vec<f64>,
}

impl HiddenProbes {
    fn at(&self, m: usize, d: usize) -> usize {
        m * self.distances + d
    }

    /// Inputs of layer `m`'s probes: hidden values, earlier paths, bias.
    pub fn width(&self, m: usize) -> usize {
        width(self.hidden, self.experts, m)
    }

    /// Whether the probes were trained for a model of `shape` and width `hidden`.
    pub fn check_shape(&self, shape: Shape, hidden: Option<usize>, path: &Path) -> Result<(), OffloadError> {
        let wrong = (self.layers, self.experts, self.top_k) != (shape.layers, shape.experts, shape.top_k)
            || hidden.is_some_and(|h| h != self.hidden);
        if wrong {
            let message = format!(
                "trained for {} MoE layers x {} experts (top {}), width {}; this model has {} x {} (top {}), width {}",
                self.layers,
                self.experts,
                self.top_k,
                self.hidden,
                shape.layers,
                shape.experts,
                shape.top_k,
                hidden.map_or("?".into(), |h| h.to_string())
            );
            return Err(OffloadError::Predictor { path: path.into(), message });
        }
        Ok(())
    }

    /// Writes the probes as a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OffloadError> {
        let mut tensors = Vec::new();
        let mut meta = vec![
            ("model".to_string(), self.model.clone()),
            ("layers".into(), self.layers.to_string()),
            ("experts".into(), self.experts.to_string()),
            ("top_k".into(), self.top_k.to_string()),
            ("hidden".into(), self.hidden.to_string()),
            ("distances".into(), self.distances.to_string()),
        ];
        for m in 0..self.layers {
            for d in 0..self.distances {
                let at = self.at(m, d);
                if !self.probes[at].is_empty() {
                    tensors.push((format!("probe.{m}.{d}"), vec![self.experts, self.width(m)], &self.probes[at][..]));
                }
                meta.push((format!("recall.{m}.{d}"), self.recall[at].to_string()));
                meta.push((format!("lambda.{m}.{d}"), self.lambda[at].to_string()));
            }
        }
        super::file::write(path, HIDDEN_PREDICTOR_FORMAT, HIDDEN_PREDICTOR_VERSION, &tensors, meta)
    }

    /// Reads a file written by [`save`](Self::save), checking format,
    /// version and tensor shapes.
    pub fn load(path: &Path) -> Result<Self, OffloadError> {
        let f = super::file::PredictorFile::read(path, HIDDEN_PREDICTOR_FORMAT, HIDDEN_PREDICTOR_VERSION)?;
        let (l, e, h, dist) = (f.num("layers")?, f.num("experts")?, f.num("hidden")?, f.num("distances")?);
        if l == 0 || e == 0 || h == 0 || dist == 0 {
            return Err(f.err("layers, experts, hidden and distances must be positive".into()));
        }
        let (mut probes, mut recall, mut lambda) = (Vec::new(), Vec::new(), Vec::new());
        for m in 0..l {
            for d in 0..dist {
                recall.push(f.real(&format!("recall.{m}.{d}"))?);
                lambda.push(f.real(&format!("lambda.{m}.{d}"))?);
                probes.push(if m + d >= l {
                    Vec::new()
                } else {
                    f.tensor(&format!("probe.{m}.{d}"), &[e, width(h, e, m)])?
                });
            }
        }
        Ok(Self {
            model: f.get("model")?,
            layers: l,
            experts: e,
            top_k: f.num("top_k")?,
            hidden: h,
            distances: dist,
            probes,
            recall,
            lambda,
        })
    }
}

/// Inputs of layer `m`'s probes for a model of width `hidden`.
fn width(hidden: usize, experts: usize, m: usize) -> usize {
    hidden + m * experts + 1
}

/// One token's probe input at MoE layer `m` into `out`: `h / rms(h)`, an
/// indicator per expert of each earlier MoE layer's choice (`path[j]` for
/// layer `j < m`; an empty list leaves that layer's indicators 0), and 1.
pub fn features(h: &[f32], path: &[&[ExpertId]], experts: usize, out: &mut Vec<f32>) {
    let ms = h.iter().map(|v| v * v).sum::<f32>() / h.len().max(1) as f32;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    out.clear();
    out.extend(h.iter().map(|v| v * inv));
    for ids in path {
        let at = out.len();
        out.resize(at + experts, 0.0);
        for id in ids.iter().filter(|id| id.index() < experts) {
            out[at + id.index()] = 1.0;
        }
    }
    out.push(1.0);
}

/// `out[e] = w[e] · x` for the rows of `w` (`out.len()` rows of `x.len()`).
fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(x.len())) {
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// The `k` best of `scores`, strongest first (ties to the lower index),
/// appended to `out`.
fn top_k_into(scores: &[f32], k: usize, order: &mut Vec<usize>, out: &mut Vec<ExpertId>) {
    order.clear();
    order.extend(0..scores.len());
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    out.extend(order.iter().take(k).map(|&e| ExpertId(e as u16)));
}

/// Steps of more tokens than this get no hidden-state forecasts.
const MAX_STEP_TOKENS: usize = 256;

/// Forecasts from the probes as each MoE layer's hidden state arrives
/// (steps of up to `MAX_STEP_TOKENS` tokens).
pub struct HiddenPredictor {
    probes: Arc<HiddenProbes>,
    /// The probes as product weights (`None` past the last layer).
    weights: Vec<Option<moe_kernels::Weight>>,
    shape: Shape,
    /// This step's routing so far, per MoE layer (`tokens * top_k` ids).
    path: Vec<Vec<ExpertId>>,
    /// The step's probe inputs (`tokens * width`) and scores (`tokens * experts`).
    xs: Vec<f32>,
    scores: Vec<f32>,
    order: Vec<usize>,
    x: Vec<f32>,
}

impl HiddenPredictor {
    /// A predictor for `shape` (forecasts up to `shape.depth` layers ahead,
    /// as far as the probes reach).
    pub fn new(probes: Arc<HiddenProbes>, shape: Shape) -> Self {
        let e = probes.experts;
        let weights = (0..probes.layers * probes.distances)
            .map(|at| {
                let w = &probes.probes[at];
                let width = probes.width(at / probes.distances);
                (!w.is_empty()).then(|| moe_kernels::Weight::from_f32(e, width, w.clone()).expect("probe shape"))
            })
            .collect();
        Self {
            path: vec![Vec::new(); probes.layers],
            weights,
            probes,
            shape,
            xs: Vec::new(),
            scores: Vec::new(),
            order: Vec::with_capacity(e),
            x: Vec::new(),
        }
    }
}

impl PathPredictor for HiddenPredictor {
    fn wants_hidden(&self) -> bool {
        true
    }

    fn begin_step(&mut self, _: &[StepToken], _: &mut Vec<Forecast>) {
        self.path.iter_mut().for_each(Vec::clear);
    }

    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], _: &mut Vec<Forecast>) {
        if let Some(p) = self.path.get_mut(layer.index()) {
            p.clear();
            p.extend_from_slice(ids);
        }
    }

    fn hidden(&mut self, layer: MoeLayerId, h: &[f32], out: &mut Vec<Forecast>) {
        let p = &*self.probes;
        let (m, k) = (layer.index(), p.top_k);
        if m >= p.layers || h.is_empty() || !h.len().is_multiple_of(p.hidden) {
            return;
        }
        let (tokens, e) = (h.len() / p.hidden, p.experts);
        if tokens > MAX_STEP_TOKENS {
            // a long prefill step uses most experts anyway, and its probes
            // would run under the cache's lock for a while
            return;
        }
        let reach = self.shape.depth.min(p.distances).min(p.layers - m);
        let mut path: Vec<&[ExpertId]> = Vec::with_capacity(m);
        self.xs.clear();
        for (i, x) in h.chunks_exact(p.hidden).enumerate() {
            path.clear();
            path.extend(self.path[..m].iter().map(|l| l.get(i * k..(i + 1) * k).unwrap_or(&[])));
            features(x, &path, e, &mut self.x);
            self.xs.extend_from_slice(&self.x);
        }
        for d in 0..reach {
            let Some(w) = &self.weights[m * p.distances + d] else { continue };
            self.scores.resize(tokens * e, 0.0);
            if moe_kernels::matmul_nt(&self.xs, tokens, w, &mut self.scores).is_err() {
                continue;
            }
            let mut ids = Vec::with_capacity(tokens * k);
            for s in self.scores.chunks_exact(e) {
                top_k_into(s, k, &mut self.order, &mut ids);
            }
            out.push(Forecast { layer: MoeLayerId((m + d) as u16), ids });
        }
    }
}

/// What training measured on held-out sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenTrainReport {
    /// Tokens fitted.
    pub train_tokens: usize,
    /// Tokens held out (every sequence whose id is a multiple of 5).
    pub valid_tokens: usize,
    /// Held-out recall per MoE layer and distance (`[m][d]`, NaN past the end).
    pub recall: Vec<Vec<f64>>,
    /// Held-out recall per MoE layer of probes forecasting the next token's
    /// experts from a token's state entering the last MoE layer and its path
    /// (what regrouping could read before a step); measured, not saved: the
    /// learned predictor's token-only forecasts are better there. Empty if
    /// the trace had no consecutive tokens.
    pub next_recall: Vec<f64>,
}

/// Relative ridge strengths tried for each probe (times the mean diagonal of XᵀX).
const LAMBDAS: [f64; 7] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3];
/// Held-out tokens kept in memory for choosing λ and measuring recall: at
/// most this many, and at most `MAX_VALID_BYTES` of probe inputs.
const MAX_VALID_TOKENS: usize = 40_000;
const MAX_VALID_BYTES: usize = 1 << 30;

/// A token's probe inputs at every MoE layer (`features`), and last its
/// next-token probe input (the last layer's hidden state with the whole path).
fn token_features(values: &[f32], t: &TraceToken, hsz: usize, e: usize) -> Vec<Vec<f32>> {
    let path: Vec<Vec<ExpertId>> = t.experts.iter().map(|l| l.iter().map(|&x| ExpertId(x)).collect()).collect();
    let refs: Vec<&[ExpertId]> = path.iter().map(Vec::as_slice).collect();
    let l = values.len() / hsz;
    let mut x = Vec::new();
    (0..=l)
        .map(|m| {
            let at = m.min(l - 1);
            features(&values[at * hsz..(at + 1) * hsz], &refs[..m], e, &mut x);
            x.clone()
        })
        .collect()
}

/// Accumulates `x xᵀ` (upper triangle) into `a`, if given, and `x yᵀ` into `b`.
fn accumulate(mut a: Option<&mut [f64]>, b: &mut [f64], x: &[f32], y: &[f32]) {
    let (n, e) = (x.len(), y.len());
    for (p, &xp) in x.iter().enumerate() {
        if let Some(a) = a.as_deref_mut() {
            for (q, &xq) in x.iter().enumerate().skip(p) {
                a[p * n + q] += (xp * xq) as f64;
            }
        }
        for (bq, &yq) in b[p * e..(p + 1) * e].iter_mut().zip(y) {
            *bq += (xp * yq) as f64;
        }
    }
}

/// Fits probes for distances `0..distances` from a routing trace and its
/// hidden-state trace (same token order), holding out every sequence whose
/// id is a multiple of 5. Memory: the sums take `8 * n²` bytes for MoE layer
/// `m` (`n` = hidden + m x experts + 1): 0.1-0.2 MB per layer for the
/// built-in model, but 134-404 MB per layer and about 12 GB in all for a
/// 48-layer, 4096-wide model with 64 experts (too much for most hosts: such
/// a model needs the path indicators dropped or a subset of layers, not
/// built yet); plus up to 1 GiB of held-out inputs. `routers` (per MoE layer, `Model::router_maps`)
/// are the baselines the fit corrects; empty: none (zero baseline).
pub fn train_hidden<R: BufRead>(
    header: &TraceHeader,
    tokens: &[TraceToken],
    mut hidden: HiddenReader<R>,
    distances: usize,
    routers: &[(Vec<f32>, Vec<f32>)],
) -> Result<(HiddenProbes, HiddenTrainReport), OffloadError> {
    let bad = |m: String| OffloadError::Trace(m);
    let (l, e, k) = (header.moe_layers.len(), header.num_experts, header.top_k);
    let hsz = hidden.header().hidden_size;
    if (hidden.header().moe_layers, hidden.header().experts) != (l, e) {
        let hh = hidden.header();
        return Err(bad(format!(
            "the hidden states cover {} MoE layers x {} experts, the trace {l} x {e}",
            hh.moe_layers, hh.experts
        )));
    }
    if l == 0 || e == 0 || k == 0 || distances == 0 {
        return Err(bad("nothing to fit: no MoE layers, experts or distances".into()));
    }
    if !routers.is_empty() && (routers.len() != l || routers.iter().any(|(r, b)| r.len() != e * hsz || b.len() != e)) {
        return Err(bad(format!("the model's routers do not match {l} MoE layers x {e} experts of width {hsz}")));
    }
    // per layer: XᵀX (shared by its distances), and XᵀY per distance
    let mut xtx: Vec<Vec<f64>> = (0..l).map(|m| vec![0f64; width(hsz, e, m).pow(2)]).collect();
    let mut xty: Vec<Vec<Vec<f64>>> = (0..l).map(|m| vec![vec![0f64; width(hsz, e, m) * e]; distances]).collect();
    let mut valid: Vec<(Vec<Vec<f32>>, &TraceToken)> = Vec::new();
    // next-token probes: one XᵀX, XᵀY per layer, and their held-out pairs
    let nw = width(hsz, e, l);
    let mut next_xtx = vec![0f64; nw * nw];
    let mut next_xty = vec![vec![0f64; nw * e]; l];
    let mut next_valid: Vec<(Vec<Vec<f32>>, &TraceToken)> = Vec::new();
    let mut prev: Option<(u64, u32, Vec<f32>)> = None;
    let per_token = 4 * (0..=l).map(|m| width(hsz, e, m)).sum::<usize>();
    let max_valid = MAX_VALID_TOKENS.min(MAX_VALID_BYTES / per_token.max(1)).max(1);
    let (mut train_tokens, mut valid_tokens) = (0, 0);
    for (i, t) in tokens.iter().enumerate() {
        let r = hidden.next_record().map_err(|e| bad(e.to_string()))?;
        let r = r.ok_or_else(|| bad(format!("the hidden states end at record {i} of {}", tokens.len())))?;
        if (r.seq, r.pos) != (t.seq, t.pos) {
            return Err(bad(format!(
                "record {i} is seq {} pos {}, the trace has seq {} pos {}",
                r.seq, r.pos, t.seq, t.pos
            )));
        }
        let mut x = token_features(&r.values, t, hsz, e);
        let nx = x.pop().expect("the next-token input");
        // the previous token of the same sequence, if the trace has it
        let before = match prev.replace((t.seq, t.pos, nx)) {
            Some((seq, pos, px)) if seq == t.seq && pos + 1 == t.pos => Some(px),
            _ => None,
        };
        if t.seq % 5 == 0 {
            valid_tokens += 1;
            if valid.len() < max_valid {
                valid.push((x, t));
            }
            if let Some(px) = before {
                if next_valid.len() < max_valid {
                    next_valid.push((vec![px], t));
                }
            }
            continue;
        }
        train_tokens += 1;
        if let Some(px) = before {
            for (j, b) in next_xty.iter_mut().enumerate() {
                let a = (j == 0).then_some(next_xtx.as_mut_slice());
                accumulate(a, b, &px, &r.logits[j * e..(j + 1) * e]);
            }
        }
        // upper triangles only; mirrored before solving
        for (m, x) in x.iter().enumerate() {
            for (d, b) in xty[m].iter_mut().enumerate().take(l - m) {
                let a = (d == 0).then_some(xtx[m].as_mut_slice());
                accumulate(a, b, x, &r.logits[(m + d) * e..(m + d + 1) * e]);
            }
        }
    }
    if train_tokens == 0 || valid.is_empty() {
        return Err(bad("the trace needs sequences for training and for validation (ids multiple of 5)".into()));
    }
    let cells = l * distances;
    let mut probes = HiddenProbes {
        model: header.model.clone(),
        layers: l,
        experts: e,
        top_k: k,
        hidden: hsz,
        distances,
        probes: vec![Vec::new(); cells],
        recall: vec![f64::NAN; cells],
        lambda: vec![f64::NAN; cells],
    };
    let mut report = HiddenTrainReport {
        train_tokens,
        valid_tokens,
        recall: vec![vec![f64::NAN; distances]; l],
        next_recall: Vec::new(),
    };
    for m in 0..l {
        let n = width(hsz, e, m);
        let a = &mut xtx[m];
        for p in 0..n {
            for q in 0..p {
                a[p * n + q] = a[q * n + p];
            }
        }
        let scale = (0..n - 1).map(|p| a[p * n + p]).sum::<f64>() / (n - 1) as f64;
        for (d, xty_d) in xty[m].iter().enumerate().take(l - m) {
            // the baseline W₀ ([experts, n]): router m + d on the hidden part,
            // its bias in the bias column; the right side becomes Xᵀ(Y - X W₀)
            let mut w0 = vec![0f32; e * n];
            if let Some((r, b)) = routers.get(m + d) {
                for ex in 0..e {
                    w0[ex * n..ex * n + hsz].copy_from_slice(&r[ex * hsz..(ex + 1) * hsz]);
                    w0[ex * n + n - 1] = b[ex];
                }
            }
            let mut rhs = xty_d.clone();
            for p in 0..n {
                for (ex, out) in rhs[p * e..(p + 1) * e].iter_mut().enumerate() {
                    *out -= (0..n).map(|q| a[p * n + q] * w0[ex * n + q] as f64).sum::<f64>();
                }
            }
            let mut best: Option<(f64, f64, Vec<f32>)> = None;
            for rel in LAMBDAS {
                let lambda = rel * scale.max(f64::MIN_POSITIVE);
                let mut w = ridge(a, &rhs, n, e, lambda, n - 1)
                    .ok_or_else(|| bad(format!("the ridge system of layer {m} distance {d} has no finite solution")))?;
                w.iter_mut().zip(&w0).for_each(|(v, b)| *v += b);
                let recall = held_out_recall(&w, &valid, m, d, e, k);
                if best.as_ref().is_none_or(|b| recall > b.0) {
                    best = Some((recall, lambda, w));
                }
            }
            let (recall, lambda, w) = best.expect("at least one λ");
            let at = m * distances + d;
            (probes.probes[at], probes.recall[at], probes.lambda[at]) = (w, recall, lambda);
            report.recall[m][d] = recall;
        }
    }
    if !next_valid.is_empty() {
        let a = &mut next_xtx;
        for p in 0..nw {
            for q in 0..p {
                a[p * nw + q] = a[q * nw + p];
            }
        }
        let scale = (0..nw - 1).map(|p| a[p * nw + p]).sum::<f64>() / (nw - 1) as f64;
        for (j, rhs) in next_xty.iter().enumerate() {
            let mut best: Option<(f64, Vec<f32>)> = None;
            for rel in LAMBDAS {
                let w = ridge(a, rhs, nw, e, rel * scale.max(f64::MIN_POSITIVE), nw - 1)
                    .ok_or_else(|| bad(format!("the next-token ridge system of layer {j} has no finite solution")))?;
                // the held-out pairs keep their input at index 0 (as "layer 0,
                // distance j": scored against the token's layer-j experts)
                let recall = held_out_recall(&w, &next_valid, 0, j, e, k);
                if best.as_ref().is_none_or(|b| recall > b.0) {
                    best = Some((recall, w));
                }
            }
            report.next_recall.push(best.expect("at least one λ").0);
        }
    }
    Ok((probes, report))
}

/// Solves `(A + λI') W = B` (`A` `[n, n]` symmetric positive semi-definite,
/// `B` `[n, e]`, `I'` the identity without the bias entry `bias`) by
/// Cholesky (a pivot at or below zero is nudged to 1e-12, as a tiny ridge
/// would); returns `W` transposed as `[e, n]` f32, `None` if the result is
/// not finite (non-finite inputs).
fn ridge(a: &[f64], b: &[f64], n: usize, e: usize, lambda: f64, bias: usize) -> Option<Vec<f32>> {
    let mut c = a.to_vec();
    for p in 0..n {
        if p != bias {
            c[p * n + p] += lambda;
        }
    }
    // in place: lower triangle L with L Lᵀ = c
    for j in 0..n {
        let mut s = c[j * n + j] - (0..j).map(|q| c[j * n + q] * c[j * n + q]).sum::<f64>();
        if s <= 0.0 {
            // the bias row of a constant-free problem: nudge, as ridge would
            s = 1e-12;
        }
        let d = s.sqrt();
        c[j * n + j] = d;
        for i in j + 1..n {
            let s = c[i * n + j] - (0..j).map(|q| c[i * n + q] * c[j * n + q]).sum::<f64>();
            c[i * n + j] = s / d;
        }
    }
    let mut w = vec![0f32; e * n];
    let mut y = vec![0f64; n];
    for col in 0..e {
        // L y = b, then Lᵀ x = y
        for i in 0..n {
            let s = b[i * e + col] - (0..i).map(|q| c[i * n + q] * y[q]).sum::<f64>();
            y[i] = s / c[i * n + i];
        }
        for i in (0..n).rev() {
            let s = y[i] - (i + 1..n).map(|q| c[q * n + i] * w[col * n + q] as f64).sum::<f64>();
            let v = s / c[i * n + i];
            if !v.is_finite() {
                return None;
            }
            w[col * n + i] = v as f32;
        }
    }
    Some(w)
}

/// Mean share of the actual top-k set of layer `m + d` found in the top k
/// of probe `w` applied to the held-out tokens' inputs at layer `m`.
fn held_out_recall(w: &[f32], valid: &[(Vec<Vec<f32>>, &TraceToken)], m: usize, d: usize, e: usize, k: usize) -> f64 {
    let (mut scores, mut order, mut ids) = (vec![0f32; e], Vec::new(), Vec::new());
    let mut right = 0usize;
    for (x, t) in valid {
        dot_rows(w, &x[m], &mut scores);
        ids.clear();
        top_k_into(&scores, k, &mut order, &mut ids);
        right += ids.iter().filter(|id| t.experts[m + d].contains(&id.0)).count();
    }
    right as f64 / (valid.len() * k) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_types::hidden_trace::{write_header, write_record, HiddenHeader, HiddenRecord};

    /// Tokens whose router scores at layer j are a linear function of their
    /// hidden state there: the probes must find it.
    fn synthetic(tokens: usize) -> (TraceHeader, Vec<TraceToken>, Vec<u8>) {
        let (l, e, k, hsz) = (2, 4, 2, 6);
        let header = TraceHeader::new("synthetic", 2, vec![0, 1], e, k);
        let mut buf = Vec::new();
        write_header(&mut buf, &HiddenHeader::new(hsz, l, e)).unwrap();
        let mut toks = Vec::new();
        let mut state = 12345u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for i in 0..tokens {
            let values: Vec<f32> = (0..l * hsz).map(|_| rnd()).collect();
            // layer j's experts: the top 2 of (h0[e] + h0[e + 1]) for layer 0,
            // of -h1[e] for layer 1
            let (mut experts, mut logits) = (Vec::new(), Vec::new());
            for j in 0..l {
                let s: Vec<f32> =
                    (0..e).map(|x| if j == 0 { values[x] + values[x + 1] } else { -values[hsz + x] }).collect();
                let mut o: Vec<usize> = (0..e).collect();
                o.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
                experts.push(o[..k].iter().map(|&x| x as u16).collect());
                logits.extend(s);
            }
            let (seq, pos) = ((i / 10) as u64, (i % 10) as u32);
            write_record(&mut buf, &HiddenRecord { seq, pos, values, logits }).unwrap();
            toks.push(TraceToken { step: 0, seq, pos, token: 0, experts, weights: vec![vec![0.5, 0.5]; l] });
        }
        (header, toks, buf)
    }

    #[test]
    fn probes_learn_a_linear_routing_rule_and_round_trip() {
        let (header, toks, buf) = synthetic(3000);
        let (probes, report) = train_hidden(&header, &toks, HiddenReader::new(&buf[..]).unwrap(), 2, &[]).unwrap();
        assert!(report.recall[0][0] > 0.9, "{report:?}");
        assert!(report.recall[1][0] > 0.9, "{report:?}");
        assert!(report.recall[1][1].is_nan(), "no layer 2 to forecast");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        probes.save(&path).unwrap();
        let back = HiddenProbes::load(&path).unwrap();
        assert_eq!(back.probes, probes.probes);
        assert_eq!(back.hidden, 6);
        // the predictor forecasts the layer itself and the next from layer 0
        let shape = Shape { layers: 2, experts: 4, top_k: 2, depth: 2 };
        let mut p = HiddenPredictor::new(Arc::new(back), shape);
        let mut out = Vec::new();
        let h: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.5).collect();
        p.hidden(MoeLayerId(0), &h, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].layer, out[0].ids.len()), (MoeLayerId(0), 4));
        assert_eq!(out[1].layer, MoeLayerId(1));
        // a wrong shape is refused with both shapes named
        let other = Shape { layers: 3, ..shape };
        assert!(probes.check_shape(other, Some(6), &path).unwrap_err().to_string().contains("3 x 4"));
        // and so is another model width, before any forecast is made
        let kind = super::super::PredictorKind::Hidden(path.clone());
        assert!(kind.check_width(6).is_ok());
        assert!(kind.check_width(12).unwrap_err().to_string().contains("width 6"));
    }

    #[test]
    fn a_trace_and_hidden_states_out_of_step_are_refused() {
        let (header, mut toks, buf) = synthetic(100);
        toks[3].pos = 99;
        let e = train_hidden(&header, &toks, HiddenReader::new(&buf[..]).unwrap(), 1, &[]).unwrap_err();
        assert!(e.to_string().contains("record 3"), "{e}");
    }
}
