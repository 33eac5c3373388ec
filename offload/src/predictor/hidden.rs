//! The hidden-state predictor: per MoE layer `m`, a small perceptron (the
//! probe, [`super::probe_mlp`]) reads the residual stream entering the layer
//! (before its attention, so the forecast is ready while the attention runs)
//! with what is known of the token's context, and scores the experts of MoE
//! layers `m`, `m + 1`, ... `m + D - 1`; the `top_k` best scores of each are
//! the forecast.
//!
//! A probe's input for layer `m` ([`features`]) is `[h / rms(h), c / rms(c),
//! path, 1]`: the token's hidden state divided by its root mean square (as
//! every router's input is normalised); `c`, the same sequence's previous
//! token's state entering MoE layer `min(m + 1, L - 1)`, kept from the
//! previous step (it has been through one more attention over the context
//! than `h`; zeros for a sequence's first token; for a token whose
//! predecessor runs in the same step, as in a prefill chunk, where that
//! state does not exist yet, the predecessor's state entering layer `m`,
//! the nearest the step has: measured on the bench's batch of 4, held-out
//! recall 0.88 against 0.87 with zeros); one indicator per expert of each earlier MoE
//! layer (1 if the token chose it there); and a bias. Width
//! `2 * hidden + m * experts + 1`. Per live sequence the predictor keeps the
//! last token's normalised states entering every MoE layer (`L * hidden`
//! f32, dropped when the sequence ends).
//!
//! Before a step, for regrouping ([`PathPredictor::path`]), a separate
//! probe (the pre-step probe) forecasts a token's whole path from its
//! normalised embedding and the sequence's previous token's state entering
//! the last MoE layer: its first layer's response to every token's embedding
//! is kept as a table (`[vocab, units]`), so the predictor needs no
//! embedding matrix at run time.
//!
//! Trained offline by [`train_hidden`](super::train_hidden) from a routing
//! trace and its hidden-state trace. Cost at run time per token and MoE layer:
//! `units * width + D * experts * (units + 1)` multiply-adds.
//!
//! File format (`moe-hidden-predictor`, version 2): a safetensors file with
//! f32 tensors `trunk.{m}` (`[units, width(m)]`) and `head.{m}`
//! (`[reach(m) * experts, units + 1]`, `reach(m) = min(distances, L - m)`,
//! distance-major), and string metadata `format`, `version`, `model`,
//! `layers`, `experts`, `top_k`, `hidden`, `distances`, `units`, and per
//! probe and distance `recall.{m}.{d}` (held-out recall, NaN past the last
//! layer); with a pre-step probe (metadata `pre_vocab` above 0) also
//! `pre.table` (`[pre_vocab, units]`), `pre.context` (`[units, hidden + 1]`),
//! `pre.head` (`[layers * experts, units + 1]`) and `pre_recall.{j}` per MoE
//! layer. Version 1 (linear probes without the context input) is refused.

use super::probe_mlp::{dot, silu, Mlp};
use super::{Forecast, PathPredictor, Shape};
use crate::OffloadError;
use moe_model::StepToken;
use moe_types::{ExpertId, MoeLayerId, SeqId};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The `format` metadata value.
pub const HIDDEN_PREDICTOR_FORMAT: &str = "moe-hidden-predictor";
/// The version written and read.
pub const HIDDEN_PREDICTOR_VERSION: u32 = 2;

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
    /// Distances each probe forecasts: 0 (the layer itself) to `distances - 1`.
    pub distances: usize,
    /// One probe per MoE layer (`reach(m) * experts` scores).
    pub(crate) probes: Vec<Mlp>,
    /// Held-out recall per layer and distance (`m * distances + d`; NaN where none).
    pub recall: Vec<f64>,
    /// The pre-step probe, if trained (it needs the model's embeddings).
    pub(crate) pre: Option<PreProbe>,
}

/// The probe forecasting a token's whole path before its step.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PreProbe {
    /// Tokens in the table.
    pub vocab: usize,
    /// Hidden units.
    pub units: usize,
    /// `[vocab, units]`: the first layer's response to each token's
    /// normalised embedding.
    pub table: Vec<f32>,
    /// `[units, hidden + 1]`: the first layer on the context state, and its bias.
    pub context: Vec<f32>,
    /// `[layers * experts, units + 1]`.
    pub head: Vec<f32>,
    /// Held-out recall per MoE layer.
    pub recall: Vec<f64>,
}

impl HiddenProbes {
    /// Probes of random weights for a model of this shape, with a pre-step
    /// probe over `vocab` tokens: their forecasts mean nothing, but they
    /// cost what trained ones do (`examples/predictor_cost`).
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        layers: usize,
        experts: usize,
        top_k: usize,
        hidden: usize,
        distances: usize,
        units: usize,
        vocab: usize,
        seed: u64,
    ) -> Self {
        let probes = (0..layers)
            .map(|m| Mlp::new(width(hidden, experts, m), units, distances.min(layers - m) * experts, seed + m as u64))
            .collect();
        let first = Mlp::new(vocab + hidden + 1, units, layers * experts, seed + layers as u64);
        let (n, table_end) = (first.inputs, vocab);
        let table = (0..vocab).flat_map(|t| first.w1.chunks_exact(n).map(move |w| w[t])).collect();
        let context = first.w1.chunks_exact(n).flat_map(|w| w[table_end..].iter().copied()).collect();
        let pre = PreProbe { vocab, units, table, context, head: first.w2, recall: vec![f64::NAN; layers] };
        Self {
            model: "random".into(),
            layers,
            experts,
            top_k,
            hidden,
            distances,
            probes,
            recall: vec![f64::NAN; layers * distances],
            pre: Some(pre),
        }
    }

    /// Inputs of layer `m`'s probe.
    pub fn width(&self, m: usize) -> usize {
        width(self.hidden, self.experts, m)
    }

    /// Distances layer `m`'s probe forecasts.
    pub fn reach(&self, m: usize) -> usize {
        self.distances.min(self.layers.saturating_sub(m))
    }

    /// Hidden units per probe.
    pub fn units(&self) -> usize {
        self.probes.first().map_or(0, |p| p.units)
    }

    /// Held-out recall per MoE layer of the pre-step probe (empty if none).
    pub fn pre_recall(&self) -> &[f64] {
        self.pre.as_ref().map_or(&[], |p| &p.recall)
    }

    /// Held-out recall of layer `m`'s probe at distance `d` (NaN if none).
    pub fn recall(&self, m: usize, d: usize) -> f64 {
        self.recall.get(m * self.distances + d).copied().unwrap_or(f64::NAN)
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
            ("units".into(), self.units().to_string()),
        ];
        meta.push(("pre_vocab".into(), self.pre.as_ref().map_or(0, |p| p.vocab).to_string()));
        if let Some(p) = &self.pre {
            let (u, l) = (p.units, self.layers);
            tensors.push(("pre.table".into(), vec![p.vocab, u], &p.table[..]));
            tensors.push(("pre.context".into(), vec![u, self.hidden + 1], &p.context[..]));
            tensors.push(("pre.head".into(), vec![l * self.experts, u + 1], &p.head[..]));
            meta.extend(p.recall.iter().enumerate().map(|(j, r)| (format!("pre_recall.{j}"), r.to_string())));
        }
        for (m, p) in self.probes.iter().enumerate() {
            tensors.push((format!("trunk.{m}"), vec![p.units, p.inputs], &p.w1[..]));
            tensors.push((format!("head.{m}"), vec![p.outputs, p.units + 1], &p.w2[..]));
            for d in 0..self.distances {
                meta.push((format!("recall.{m}.{d}"), self.recall(m, d).to_string()));
            }
        }
        super::file::write(path, HIDDEN_PREDICTOR_FORMAT, HIDDEN_PREDICTOR_VERSION, &tensors, meta)
    }

    /// Reads a file written by [`save`](Self::save), checking format,
    /// version and tensor shapes.
    pub fn load(path: &Path) -> Result<Self, OffloadError> {
        let f = super::file::PredictorFile::read(path, HIDDEN_PREDICTOR_FORMAT, HIDDEN_PREDICTOR_VERSION)?;
        let (l, e, h) = (f.num("layers")?, f.num("experts")?, f.num("hidden")?);
        let (dist, units) = (f.num("distances")?, f.num("units")?);
        if l == 0 || e == 0 || h == 0 || dist == 0 || units == 0 {
            return Err(f.err("layers, experts, hidden, distances and units must be positive".into()));
        }
        let (mut probes, mut recall) = (Vec::new(), Vec::new());
        for m in 0..l {
            let (n, outputs) = (width(h, e, m), dist.min(l - m) * e);
            let w1 = f.tensor(&format!("trunk.{m}"), &[units, n])?;
            let w2 = f.tensor(&format!("head.{m}"), &[outputs, units + 1])?;
            probes.push(Mlp { inputs: n, units, outputs, w1, w2 });
            for d in 0..dist {
                recall.push(f.real(&format!("recall.{m}.{d}"))?);
            }
        }
        let vocab = f.num("pre_vocab")?;
        let pre = if vocab == 0 {
            None
        } else {
            Some(PreProbe {
                vocab,
                units,
                table: f.tensor("pre.table", &[vocab, units])?,
                context: f.tensor("pre.context", &[units, h + 1])?,
                head: f.tensor("pre.head", &[l * e, units + 1])?,
                recall: (0..l).map(|j| f.real(&format!("pre_recall.{j}"))).collect::<Result<_, _>>()?,
            })
        };
        Ok(Self {
            model: f.get("model")?,
            layers: l,
            experts: e,
            top_k: f.num("top_k")?,
            hidden: h,
            distances: dist,
            probes,
            recall,
            pre,
        })
    }
}

/// Inputs of layer `m`'s probe for a model of width `hidden`.
pub(crate) fn width(hidden: usize, experts: usize, m: usize) -> usize {
    2 * hidden + m * experts + 1
}

/// The MoE layer whose entering state of the previous token is layer `m`'s
/// context input (`layers` MoE layers).
pub(crate) fn context_layer(m: usize, layers: usize) -> usize {
    (m + 1).min(layers.saturating_sub(1))
}

/// `h / rms(h)` into `out` (cleared first).
pub(crate) fn normalise(h: &[f32], out: &mut Vec<f32>) {
    let ms = dot(h, h) / h.len().max(1) as f32;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    out.clear();
    out.extend(h.iter().map(|v| v * inv));
}

/// One token's probe input into `out` (cleared first): its normalised
/// state `h`, the normalised context state (`None`: zeros), an indicator
/// per expert of each earlier MoE layer's choice (`path[j]` for layer
/// `j < m`; an empty list leaves that layer's indicators 0), and 1.
pub(crate) fn features(h: &[f32], context: Option<&[f32]>, path: &[&[ExpertId]], experts: usize, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(h);
    match context {
        Some(c) => out.extend_from_slice(c),
        None => out.resize(2 * h.len(), 0.0),
    }
    for ids in path {
        let at = out.len();
        out.resize(at + experts, 0.0);
        for id in ids.iter().filter(|id| id.index() < experts) {
            out[at + id.index()] = 1.0;
        }
    }
    out.push(1.0);
}

/// The `k` best of `scores`, strongest first (ties to the lower index),
/// appended to `out`.
pub(crate) fn top_k_into(scores: &[f32], k: usize, order: &mut Vec<usize>, out: &mut Vec<ExpertId>) {
    // k passes of selection: k is small, and a full sort cost 8% of a token's forecasts
    order.clear();
    for _ in 0..k.min(scores.len()) {
        let mut best: Option<usize> = None;
        for (e, s) in scores.iter().enumerate() {
            if !order.contains(&e) && best.is_none_or(|b| s.total_cmp(&scores[b]).is_gt()) {
                best = Some(e);
            }
        }
        order.extend(best);
    }
    out.extend(order.iter().map(|&e| ExpertId(e as u16)));
}

/// Steps of more tokens than this get no hidden-state forecasts (their
/// context states are still kept).
const MAX_STEP_TOKENS: usize = 256;

/// Hashes a sequence id by one multiplication (the ids are the engine's own
/// counters, not adversarial input; SipHash measured 3% of the predictor's
/// time per token).
#[derive(Clone, Copy, Default)]
struct SeqHash(u64);

impl std::hash::Hasher for SeqHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517C_C1B7_2722_0A95);
    }
}

type SeqMap<V> = HashMap<SeqId, V, std::hash::BuildHasherDefault<SeqHash>>;

/// One probe as product weights.
struct Probe {
    trunk: moe_kernels::Weight,
    head: moe_kernels::Weight,
}

impl Probe {
    fn new(trunk: (usize, usize, &[f32]), head: (usize, usize, &[f32])) -> Self {
        Self {
            trunk: moe_kernels::Weight::from_f32(trunk.0, trunk.1, trunk.2.to_vec()).expect("probe shape"),
            head: moe_kernels::Weight::from_f32(head.0, head.1, head.2.to_vec()).expect("probe shape"),
        }
    }
}

/// Forecasts from the probes as each MoE layer's hidden state arrives
/// (steps of up to `MAX_STEP_TOKENS` tokens).
pub struct HiddenPredictor {
    probes: Arc<HiddenProbes>,
    weights: Vec<Probe>,
    /// The pre-step probe's context columns (with the bias) and head.
    pre: Option<Probe>,
    shape: Shape,
    /// The step's tokens; per token, the nearest earlier token of the step
    /// of its sequence (if any), and whether it is its sequence's last.
    step: Vec<StepToken>,
    follows: Vec<Option<usize>>,
    last: Vec<bool>,
    /// Scratch for `follows` and `last`: each sequence's latest token so far.
    latest: SeqMap<usize>,
    /// This step's routing so far, per MoE layer (`tokens * top_k` ids).
    path: Vec<Vec<ExpertId>>,
    /// Per live sequence: its latest token's normalised states entering
    /// each MoE layer (`layers * hidden`), then the pre-step probe's first
    /// layer on the last of them (`units`, with a pre-step probe).
    context: SeqMap<Vec<f32>>,
    /// The same for this step's last tokens, filled layer by layer and
    /// moved to `context` after the last MoE layer.
    pending: SeqMap<Vec<f32>>,
    /// The step's normalised states, probe inputs, unit outputs, scores.
    hs: Vec<f32>,
    xs: Vec<f32>,
    units: Vec<f32>,
    scores: Vec<f32>,
    order: Vec<usize>,
    x: Vec<f32>,
}

impl HiddenPredictor {
    /// A predictor for `shape`: at each MoE layer's state it forecasts that
    /// layer and the `shape.depth` after it, as far as the probes reach (the
    /// learned predictor's forecasts at depth 1 come as a layer's routing is
    /// known, a whole expert computation before the next layer; these come
    /// after it, so they reach one layer further to leave the loads as much
    /// time: measured at a 50% budget, depth 1 this way stalled 77 us per
    /// token against 182 us forecasting the layer alone; BENCHMARKS.md).
    pub fn new(probes: Arc<HiddenProbes>, shape: Shape) -> Self {
        let weights = probes
            .probes
            .iter()
            .map(|p| Probe::new((p.units, p.inputs, &p.w1), (p.outputs, p.units + 1, &p.w2)))
            .collect();
        let (h, out) = (probes.hidden + 1, probes.layers * probes.experts);
        let pre = probes.pre.as_ref().map(|p| Probe::new((p.units, h, &p.context), (out, p.units + 1, &p.head)));
        Self {
            path: vec![Vec::new(); probes.layers],
            weights,
            pre,
            probes,
            shape,
            step: Vec::new(),
            follows: Vec::new(),
            last: Vec::new(),
            latest: SeqMap::default(),
            context: SeqMap::default(),
            pending: SeqMap::default(),
            hs: Vec::new(),
            xs: Vec::new(),
            units: Vec::new(),
            scores: Vec::new(),
            order: Vec::new(),
            x: Vec::new(),
        }
    }

    /// Sequences whose context states are kept.
    pub fn sequences(&self) -> usize {
        self.context.len()
    }

    /// Keeps the normalised states (`self.hs`) of the step's last tokens
    /// entering MoE layer `m`; after the last layer they become the context.
    fn keep(&mut self, m: usize) {
        let (l, hsz) = (self.probes.layers, self.probes.hidden);
        for (i, t) in self.step.iter().enumerate() {
            if self.last[i] {
                let slot = self.pending.entry(t.seq).or_insert_with(|| vec![0.0; l * hsz]);
                slot[m * hsz..(m + 1) * hsz].copy_from_slice(&self.hs[i * hsz..(i + 1) * hsz]);
            }
        }
        if m + 1 == l {
            for (seq, mut states) in self.pending.drain() {
                // the pre-step probe's first layer on the new context, kept
                // after the states: regrouping asks for paths many times a step
                if let Some(pre) = &self.pre {
                    let mut c = states[(l - 1) * hsz..l * hsz].to_vec();
                    c.push(1.0);
                    let mut z = vec![0f32; pre.trunk.rows()];
                    if moe_kernels::matmul_nt(&c, 1, &pre.trunk, &mut z).is_ok() {
                        states.extend_from_slice(&z);
                    }
                }
                self.context.insert(seq, states);
            }
        }
    }

    /// Scores the step's probe inputs (`self.xs`, `tokens` rows) with layer
    /// `m`'s probe into `self.scores` (`tokens` rows of its outputs); false
    /// if a product failed.
    fn score(&mut self, m: usize, tokens: usize) -> bool {
        let w = &self.weights[m];
        let u = w.trunk.rows();
        self.units.resize(tokens * u, 0.0);
        if moe_kernels::matmul_nt(&self.xs, tokens, &w.trunk, &mut self.units).is_err() {
            return false;
        }
        // the units' outputs and a 1 per token, as the head reads them
        self.xs.clear();
        for z in self.units.chunks_exact(u) {
            self.xs.extend(z.iter().map(|&v| silu(v)));
            self.xs.push(1.0);
        }
        self.scores.resize(tokens * w.head.rows(), 0.0);
        moe_kernels::matmul_nt(&self.xs, tokens, &w.head, &mut self.scores).is_ok()
    }
}

impl PathPredictor for HiddenPredictor {
    fn wants_hidden(&self) -> bool {
        true
    }

    fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>) {
        // with a pre-step probe, the first layers are forecast before the
        // step (the in-step probes refine them as each layer's state arrives)
        if self.probes.pre.is_some() && tokens.len() <= MAX_STEP_TOKENS {
            let (l, k) = (self.probes.layers, self.probes.top_k);
            let paths: Vec<Option<Vec<ExpertId>>> = tokens.iter().map(|&t| self.path(t)).collect();
            for j in super::window(0, self.shape.depth, l) {
                let mut ids = Vec::with_capacity(tokens.len() * k);
                for p in &paths {
                    match p {
                        Some(p) => ids.extend_from_slice(&p[j * k..(j + 1) * k]),
                        None => ids.extend(std::iter::repeat_n(super::NO_EXPERT, k)),
                    }
                }
                out.push(Forecast { layer: MoeLayerId(j as u16), ids });
            }
        }
        self.path.iter_mut().for_each(Vec::clear);
        self.pending.clear();
        self.step.clear();
        self.step.extend_from_slice(tokens);
        // one pass: each token's nearest earlier token of its sequence, and
        // each sequence's last token (a prefill step may hold thousands)
        self.latest.clear();
        self.follows.clear();
        for (i, t) in tokens.iter().enumerate() {
            self.follows.push(self.latest.insert(t.seq, i));
        }
        self.last.clear();
        self.last.extend(tokens.iter().enumerate().map(|(i, t)| self.latest.get(&t.seq) == Some(&i)));
    }

    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], _: &mut Vec<Forecast>) {
        if let Some(p) = self.path.get_mut(layer.index()) {
            p.clear();
            p.extend_from_slice(ids);
        }
    }

    fn hidden(&mut self, layer: MoeLayerId, h: &[f32], out: &mut Vec<Forecast>) {
        let probes = Arc::clone(&self.probes);
        let (m, k, hsz, e) = (layer.index(), probes.top_k, probes.hidden, probes.experts);
        let tokens = h.len() / hsz.max(1);
        if m >= probes.layers || tokens == 0 || tokens != self.step.len() || h.len() != tokens * hsz {
            return;
        }
        let forecast = tokens <= MAX_STEP_TOKENS;
        self.hs.clear();
        for (i, x) in h.chunks_exact(hsz).enumerate() {
            // a step too long to forecast keeps only its sequences' last states
            if forecast || self.last[i] {
                normalise(x, &mut self.x);
                self.hs.extend_from_slice(&self.x);
            } else {
                self.hs.resize(self.hs.len() + hsz, 0.0);
            }
        }
        if forecast {
            let cl = context_layer(m, probes.layers);
            let mut path: Vec<&[ExpertId]> = Vec::with_capacity(m);
            self.xs.clear();
            for i in 0..tokens {
                path.clear();
                path.extend(self.path[..m].iter().map(|l| l.get(i * k..(i + 1) * k).unwrap_or(&[])));
                let context = match self.follows[i] {
                    // the predecessor's state entering this layer: the
                    // nearest the step has to the one the probe was trained on
                    Some(j) => Some(&self.hs[j * hsz..(j + 1) * hsz]),
                    None => self.context.get(&self.step[i].seq).map(|c| &c[cl * hsz..(cl + 1) * hsz]),
                };
                features(&self.hs[i * hsz..(i + 1) * hsz], context, &path, e, &mut self.x);
                self.xs.extend_from_slice(&self.x);
            }
            if self.score(m, tokens) {
                let outputs = probes.reach(m) * e;
                // the layer about to run (its routing is not known yet: a
                // refinement of earlier forecasts) and `depth` layers after it
                for d in 0..(self.shape.depth + 1).min(probes.reach(m)) {
                    let mut ids = Vec::with_capacity(tokens * k);
                    for s in self.scores.chunks_exact(outputs) {
                        top_k_into(&s[d * e..(d + 1) * e], k, &mut self.order, &mut ids);
                    }
                    out.push(Forecast { layer: MoeLayerId((m + d) as u16), ids });
                }
            }
        }
        self.keep(m);
    }

    fn end_sequence(&mut self, seq: SeqId) {
        self.context.remove(&seq);
        self.pending.remove(&seq);
    }

    fn path(&self, token: StepToken) -> Option<Vec<ExpertId>> {
        let p = &*self.probes;
        let pre = p.pre.as_ref()?;
        let (u, hsz, e) = (pre.units, p.hidden, p.experts);
        let at = token.token as usize * u;
        let mut z = pre.table.get(at..at + u)?.to_vec();
        match self.context.get(&token.seq).and_then(|c| c.get(p.layers * hsz..)) {
            // the first layer's response to the context, computed as it was kept
            Some(cz) if cz.len() == u => z.iter_mut().zip(cz).for_each(|(zj, cz)| *zj += cz),
            _ => z.iter_mut().zip(pre.context.chunks_exact(hsz + 1)).for_each(|(zj, row)| *zj += row[hsz]),
        }
        let mut act: Vec<f32> = z.iter().map(|&v| silu(v)).collect();
        act.push(1.0);
        let head = &self.pre.as_ref()?.head;
        let mut scores = vec![0f32; head.rows()];
        moe_kernels::matmul_nt(&act, 1, head, &mut scores).ok()?;
        let (mut ids, mut order) = (Vec::with_capacity(p.layers * p.top_k), Vec::new());
        for s in scores.chunks_exact(e) {
            top_k_into(s, p.top_k, &mut order, &mut ids);
        }
        Some(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(l: usize, e: usize, hsz: usize, dist: usize) -> HiddenProbes {
        let probes = (0..l).map(|m| Mlp::new(width(hsz, e, m), 4, dist.min(l - m) * e, m as u64)).collect::<Vec<_>>();
        HiddenProbes {
            model: "t".into(),
            layers: l,
            experts: e,
            top_k: 2,
            hidden: hsz,
            distances: dist,
            probes,
            recall: (0..l * dist).map(|i| i as f64 / 10.0).collect(),
            pre: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_other_shapes_and_versions() {
        let p = probes(3, 4, 6, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        p.save(&path).unwrap();
        assert_eq!(HiddenProbes::load(&path).unwrap(), p);
        // with a pre-step probe over 5 tokens
        let table: Vec<f32> = (0..20).map(|i| (i as f32 * 0.7).sin()).collect();
        let context: Vec<f32> = (0..28).map(|i| (i as f32 * 0.3).cos()).collect();
        let head: Vec<f32> = (0..60).map(|i| (i as f32 * 1.1).sin()).collect();
        let pre = PreProbe { vocab: 5, units: 4, table, context, head, recall: vec![0.5, 0.25, 0.125] };
        let with = HiddenProbes { pre: Some(pre), ..p.clone() };
        with.save(&path).unwrap();
        let back = HiddenProbes::load(&path).unwrap();
        assert_eq!(back, with);
        assert_eq!(back.pre_recall(), &[0.5, 0.25, 0.125]);
        let shape = Shape { layers: 3, experts: 4, top_k: 2, depth: 2 };
        let pred = HiddenPredictor::new(Arc::new(back), shape);
        let ids = pred.path(StepToken { seq: SeqId(1), token: 4 }).unwrap();
        assert_eq!(ids.len(), 3 * 2);
        assert!(ids.iter().all(|id| id.index() < 4) && ids[0] != ids[1]);
        assert!(pred.path(StepToken { seq: SeqId(1), token: 5 }).is_none(), "outside the table");
        assert!(HiddenPredictor::new(Arc::new(p.clone()), shape).path(StepToken { seq: SeqId(1), token: 0 }).is_none());
        assert!(p.check_shape(shape, Some(6), &path).is_ok());
        let e = p.check_shape(Shape { layers: 4, ..shape }, Some(6), &path).unwrap_err();
        assert!(e.to_string().contains("4 x 4"), "{e}");
        let kind = super::super::PredictorKind::Hidden(path.clone());
        assert!(kind.check_width(6).is_ok());
        assert!(kind.check_width(12).unwrap_err().to_string().contains("width 6"));
        // a version 1 file (linear probes) is refused by name
        let v1 = dir.path().join("v1.safetensors");
        super::super::file::write(&v1, HIDDEN_PREDICTOR_FORMAT, 1, &[], Vec::new()).unwrap();
        let e = HiddenProbes::load(&v1).unwrap_err().to_string();
        assert!(e.contains("unsupported version 1"), "{e}");
    }

    #[test]
    fn forecasts_match_the_probe_and_context_is_kept_per_sequence_until_it_ends() {
        let (l, e, hsz) = (2, 4, 6);
        let p = Arc::new(probes(l, e, hsz, 2));
        let shape = Shape { layers: l, experts: e, top_k: 2, depth: 2 };
        let state = |s: f32| -> Vec<f32> { (0..hsz).map(|i| (i as f32 * 0.37 + s).sin()).collect() };
        let tok = |seq| StepToken { seq: SeqId(seq), token: 1 };
        // token i of a step enters layer m with state(s + i + m)
        let run_step = |pred: &mut HiddenPredictor, toks: &[StepToken], s: f32| {
            let mut all = Vec::new();
            pred.begin_step(toks, &mut Vec::new());
            for m in 0..l {
                let h: Vec<f32> = (0..toks.len()).flat_map(|i| state(s + i as f32 + m as f32)).collect();
                let mut out = Vec::new();
                pred.hidden(MoeLayerId(m as u16), &h, &mut out);
                let ids: Vec<ExpertId> = (0..toks.len() * 2).map(|i| ExpertId((i % e) as u16)).collect();
                pred.observe(MoeLayerId(m as u16), &ids, &mut Vec::new());
                all.push(out);
            }
            all
        };
        let expect = |h: &[f32], c: Option<&[f32]>| {
            let (mut n, mut cn, mut x, mut s) = (Vec::new(), Vec::new(), Vec::new(), vec![0f32; 2 * e]);
            normalise(h, &mut n);
            let c = c.map(|c| {
                normalise(c, &mut cn);
                &cn[..]
            });
            features(&n, c, &[], e, &mut x);
            p.probes[0].scores(&x, &mut s);
            let mut want = Vec::new();
            top_k_into(&s[..e], 2, &mut Vec::new(), &mut want);
            want
        };
        // a prefill step of two tokens of sequence 7: both forecast layers 0 and 1 from layer 0
        let mut pred = HiddenPredictor::new(Arc::clone(&p), Shape { depth: 1, ..shape });
        let first = run_step(&mut pred, &[tok(7), tok(7)], 0.0);
        assert_eq!(first[0].len(), 2);
        assert_eq!(first[0][1].layer, MoeLayerId(1));
        assert_eq!(pred.sequences(), 1);
        // the first token's forecast is the probe's scores with no context;
        // the second's reads its predecessor's state entering the same layer
        assert_eq!(first[0][0].ids[..2], expect(&state(0.0), None)[..]);
        assert_eq!(first[0][0].ids[2..], expect(&state(1.0), Some(&state(0.0)))[..]);
        // the next step reads the last token's state entering layer 1 as layer 0's context
        let next = run_step(&mut pred, &[tok(7)], 5.0);
        assert_eq!(next[0][0].ids, expect(&state(5.0), Some(&state(2.0))));
        // the context goes with the sequence
        pred.end_sequence(SeqId(7));
        assert_eq!(pred.sequences(), 0);
        // depth 1 forecasts the layer itself and the next; a wrong-sized state forecasts nothing
        let mut one = HiddenPredictor::new(p, Shape { depth: 1, ..shape });
        one.begin_step(&[tok(1)], &mut Vec::new());
        let mut out = Vec::new();
        one.hidden(MoeLayerId(1), &state(0.0), &mut out);
        assert_eq!(out.len(), 1, "layer 1 is the last");
        out.clear();
        one.hidden(MoeLayerId(0), &state(0.0), &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        one.hidden(MoeLayerId(1), &state(0.0)[..5], &mut out);
        assert!(out.is_empty());
        // a step too long to forecast still leaves its sequences' last states as context
        let long: Vec<StepToken> = (0..MAX_STEP_TOKENS + 1).map(|_| tok(9)).collect();
        let all = run_step(&mut pred, &long, 3.0);
        assert!(all.iter().all(Vec::is_empty));
        assert_eq!(
            pred.context[&SeqId(9)][hsz..2 * hsz],
            {
                let mut c = Vec::new();
                normalise(&state(3.0 + MAX_STEP_TOKENS as f32 + 1.0), &mut c);
                c
            }[..]
        );
    }
}
