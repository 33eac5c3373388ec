//! Training the hidden-state predictor's probes ([`super::hidden`]) from a
//! routing trace and its hidden-state trace (`moe-serve trace
//! --hidden-states`): every sequence whose id is a multiple of 5 is held
//! out; each MoE layer's probe is fitted ([`super::probe_mlp::fit`]) to the
//! router's softmax at the layer itself and the `distances - 1` after it,
//! and the epoch with the best held-out recall is kept. Given the model's
//! token embeddings, the pre-step probe is fitted too (to every MoE layer's
//! softmax, from the token's embedding and its predecessor's state entering
//! the last MoE layer). Layers train in
//! parallel (one thread each, as many as the host has cores); the result does
//! not depend on the thread count.
//!
//! Memory: the trace is held as f32, `4 * L * (hidden + experts) + 2 * L *
//! top_k + 8` bytes per token (the built-in model: 2.2 KB, so 153,600
//! tokens take 340 MB); tokens past `MAX_TRAIN_BYTES` (4 GiB) are left out
//! and counted in the report. Time: `epochs` passes of `2 * units *
//! width` multiply-adds per token and layer.

use super::hidden::{context_layer, features, normalise, top_k_into, width, HiddenProbes, PreProbe};
use super::probe_mlp::{dot, fit, Mlp, Samples};
use crate::OffloadError;
use moe_types::hidden_trace::HiddenReader;
use moe_types::trace::{TraceHeader, TraceToken};
use moe_types::ExpertId;
use std::collections::HashMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bytes of trace held in memory at most.
const MAX_TRAIN_BYTES: usize = 4 << 30;
/// Held-out tokens each epoch is scored on at most.
const MAX_SCORED_TOKENS: usize = 20_000;

/// How to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenTrainConfig {
    /// MoE layers each probe forecasts (1: the layer itself).
    pub distances: usize,
    /// Hidden units per probe.
    pub units: usize,
    /// Passes over the training tokens.
    pub epochs: usize,
}

impl Default for HiddenTrainConfig {
    fn default() -> Self {
        Self { distances: 3, units: 32, epochs: 8 }
    }
}

/// What training measured on held-out sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenTrainReport {
    /// Tokens fitted.
    pub train_tokens: usize,
    /// Tokens held out (every sequence whose id is a multiple of 5).
    pub valid_tokens: usize,
    /// Tokens past the memory bound, not used.
    pub dropped_tokens: usize,
    /// Held-out recall per MoE layer and distance (`[m][d]`, NaN past the end).
    pub recall: Vec<Vec<f64>>,
    /// Held-out recall per MoE layer of the pre-step probe (empty without embeddings).
    pub pre_recall: Vec<f64>,
}

/// The trace in memory.
struct Set {
    layers: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    /// `tokens * layers * hidden`, each state normalised.
    states: Vec<f32>,
    /// The previous token of the same sequence, if the trace has it.
    previous: Vec<Option<usize>>,
    /// Token ids.
    token: Vec<u32>,
    /// `tokens * layers * top_k`.
    chosen: Vec<ExpertId>,
    /// `tokens * layers * experts`: the router's softmax.
    target: Vec<f32>,
}

impl Set {
    fn state(&self, i: usize, m: usize) -> &[f32] {
        let at = (i * self.layers + m) * self.hidden;
        &self.states[at..at + self.hidden]
    }

    fn chosen(&self, i: usize, m: usize) -> &[ExpertId] {
        let at = (i * self.layers + m) * self.top_k;
        &self.chosen[at..at + self.top_k]
    }
}

/// Layer `m`'s samples: its probe inputs and targets for `reach` distances.
struct Layer<'a> {
    set: &'a Set,
    m: usize,
    reach: usize,
}

impl Samples for Layer<'_> {
    fn input(&self, i: usize, out: &mut Vec<f32>) {
        let s = self.set;
        let cl = context_layer(self.m, s.layers);
        let path: Vec<&[ExpertId]> = (0..self.m).map(|j| s.chosen(i, j)).collect();
        let context = s.previous[i].map(|p| s.state(p, cl));
        features(s.state(i, self.m), context, &path, s.experts, out);
    }

    fn target(&self, i: usize, out: &mut [f32]) {
        let (s, e) = (self.set, self.set.experts);
        for d in 0..self.reach {
            let at = (i * s.layers + self.m + d) * e;
            out[d * e..(d + 1) * e].copy_from_slice(&s.target[at..at + e]);
        }
    }
}

/// The pre-step probe's samples: `[e / rms(e), c / rms(c), 1]` for the
/// token's embedding `e` (`embedded`: normalised, by token id) and its
/// predecessor's state `c` entering the last MoE layer (zeros if none);
/// targets: every MoE layer's router softmax.
struct PreStep<'a> {
    set: &'a Set,
    embedded: &'a HashMap<u32, Vec<f32>>,
}

impl Samples for PreStep<'_> {
    fn input(&self, i: usize, out: &mut Vec<f32>) {
        let s = self.set;
        let context = s.previous[i].map(|p| s.state(p, s.layers - 1));
        features(&self.embedded[&s.token[i]], context, &[], s.experts, out);
    }

    fn target(&self, i: usize, out: &mut [f32]) {
        let n = self.set.layers * self.set.experts;
        out.copy_from_slice(&self.set.target[i * n..(i + 1) * n]);
    }
}

/// A model's token embeddings, for the pre-step probe.
pub struct TokenEmbeddings<'a> {
    /// Tokens.
    pub vocab: usize,
    /// Writes token `t`'s embedding into the slice (`hidden` values); false
    /// if it has none.
    pub row: &'a (dyn Fn(u32, &mut [f32]) -> bool + Sync),
}

/// Held-out recall of `mlp` on `samples` at the tokens `valid`, per score
/// group: group `g` forecasts MoE layer `first + g`.
fn recall(mlp: &Mlp, samples: &dyn Samples, set: &Set, first: usize, valid: &[usize]) -> Vec<f64> {
    let (e, k) = (set.experts, set.top_k);
    let (mut x, mut scores, mut order, mut ids) = (Vec::new(), vec![0f32; mlp.outputs], Vec::new(), Vec::new());
    let mut right = vec![0usize; mlp.outputs / e];
    for &i in valid {
        samples.input(i, &mut x);
        mlp.scores(&x, &mut scores);
        for (g, r) in right.iter_mut().enumerate() {
            ids.clear();
            top_k_into(&scores[g * e..(g + 1) * e], k, &mut order, &mut ids);
            let actual = set.chosen(i, first + g);
            *r += ids.iter().filter(|id| actual.contains(id)).count();
        }
    }
    right.iter().map(|&r| r as f64 / (valid.len() * k).max(1) as f64).collect()
}

/// A layer's probe and its held-out recall per distance.
type Trained = (Mlp, Vec<f64>);

/// The pre-step probe's run-time form: its first layer's response to every
/// token's normalised embedding as a table (a token without one keeps the
/// bias alone), the context columns with the bias, and the head.
fn pre_probe(mlp: &Mlp, emb: &TokenEmbeddings, hidden: usize, recall: Vec<f64>) -> PreProbe {
    let (u, n) = (mlp.units, mlp.inputs);
    let (mut table, mut row, mut x) = (vec![0f32; emb.vocab * u], vec![0f32; hidden], Vec::new());
    for (t, out) in table.chunks_exact_mut(u).enumerate() {
        if (emb.row)(t as u32, &mut row) {
            normalise(&row, &mut x);
            for (o, w) in out.iter_mut().zip(mlp.w1.chunks_exact(n)) {
                *o = dot(&w[..hidden], &x);
            }
        }
    }
    let context = mlp.w1.chunks_exact(n).flat_map(|w| w[hidden..].iter().copied()).collect();
    PreProbe { vocab: emb.vocab, units: u, table, context, head: mlp.w2.clone(), recall }
}

/// Reads the traces (same token order) into memory.
fn read<R: BufRead>(
    header: &TraceHeader,
    tokens: &[TraceToken],
    mut hidden: HiddenReader<R>,
) -> Result<(Set, usize), OffloadError> {
    let bad = |m: String| OffloadError::Trace(m);
    let (l, e, k) = (header.moe_layers.len(), header.num_experts, header.top_k);
    let hsz = hidden.header().hidden_size;
    let per_token = 4 * l * (hsz + e) + 2 * l * k + 8;
    let keep = tokens.len().min(MAX_TRAIN_BYTES / per_token.max(1));
    let mut set = Set {
        layers: l,
        experts: e,
        top_k: k,
        hidden: hsz,
        states: Vec::with_capacity(keep * l * hsz),
        previous: Vec::with_capacity(keep),
        token: Vec::with_capacity(keep),
        chosen: Vec::with_capacity(keep * l * k),
        target: Vec::with_capacity(keep * l * e),
    };
    let mut index: HashMap<(u64, u32), usize> = HashMap::with_capacity(keep);
    let mut x = Vec::new();
    for (i, t) in tokens.iter().take(keep).enumerate() {
        let r = hidden.next_record().map_err(|e| bad(e.to_string()))?;
        let r = r.ok_or_else(|| bad(format!("the hidden states end at record {i} of {}", tokens.len())))?;
        if (r.seq, r.pos) != (t.seq, t.pos) {
            return Err(bad(format!(
                "record {i} is seq {} pos {}, the trace has seq {} pos {}",
                r.seq, r.pos, t.seq, t.pos
            )));
        }
        if t.experts.len() != l || t.experts.iter().any(|ids| ids.len() != k || ids.iter().any(|&x| x as usize >= e)) {
            return Err(bad(format!("token {i} does not route to {k} of {e} experts at each of {l} MoE layers")));
        }
        for h in r.values.chunks_exact(hsz) {
            normalise(h, &mut x);
            set.states.extend_from_slice(&x);
        }
        for logits in r.logits.chunks_exact(e) {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let at = set.target.len();
            set.target.extend(logits.iter().map(|&v| (v - max).exp()));
            let sum: f32 = set.target[at..].iter().sum();
            set.target[at..].iter_mut().for_each(|v| *v /= sum);
        }
        set.chosen.extend(t.experts.iter().flatten().map(|&x| ExpertId(x)));
        set.previous.push(t.pos.checked_sub(1).and_then(|p| index.get(&(t.seq, p)).copied()));
        set.token.push(t.token);
        index.insert((t.seq, t.pos), i);
    }
    if set.states.iter().chain(&set.target).any(|v| !v.is_finite()) {
        return Err(bad("the hidden states or router scores hold non-finite values".into()));
    }
    Ok((set, tokens.len() - keep))
}

/// Fits one probe per MoE layer, each forecasting `cfg.distances` layers,
/// from a routing trace and its hidden-state trace (same token order).
pub fn train_hidden<R: BufRead>(
    header: &TraceHeader,
    tokens: &[TraceToken],
    hidden: HiddenReader<R>,
    cfg: HiddenTrainConfig,
    embeddings: Option<&TokenEmbeddings>,
) -> Result<(HiddenProbes, HiddenTrainReport), OffloadError> {
    let bad = |m: String| OffloadError::Trace(m);
    let (l, e, k) = (header.moe_layers.len(), header.num_experts, header.top_k);
    let hh = hidden.header().clone();
    if (hh.moe_layers, hh.experts) != (l, e) {
        return Err(bad(format!(
            "the hidden states cover {} MoE layers x {} experts, the trace {l} x {e}",
            hh.moe_layers, hh.experts
        )));
    }
    if l == 0 || e == 0 || k == 0 || k > e || cfg.distances == 0 || cfg.units == 0 || cfg.epochs == 0 {
        return Err(bad("nothing to fit: no MoE layers, experts, distances, units or epochs".into()));
    }
    let (set, dropped) = read(header, tokens, hidden)?;
    let held = |i: usize| tokens[i].seq.is_multiple_of(5);
    let n = set.previous.len();
    let train: Vec<usize> = (0..n).filter(|&i| !held(i)).collect();
    let valid: Vec<usize> = (0..n).filter(|&i| held(i)).collect();
    if train.is_empty() || valid.is_empty() {
        return Err(bad("the trace needs sequences for training and for validation (ids multiple of 5)".into()));
    }
    let scored = &valid[..valid.len().min(MAX_SCORED_TOKENS)];
    // each traced token's normalised embedding, by id
    let mut embedded: HashMap<u32, Vec<f32>> = HashMap::new();
    if let Some(emb) = embeddings {
        let (mut row, mut x) = (vec![0f32; set.hidden], Vec::new());
        for &t in &set.token {
            if let std::collections::hash_map::Entry::Vacant(v) = embedded.entry(t) {
                if !(emb.row)(t, &mut row) {
                    return Err(bad(format!("token {t} of the trace has no embedding in the model")));
                }
                normalise(&row, &mut x);
                v.insert(x.clone());
            }
        }
    }
    // jobs 0..l: the layers' probes; job l: the pre-step probe
    let jobs = l + usize::from(embeddings.is_some());
    let results: Mutex<Vec<Option<Trained>>> = Mutex::new(vec![None; jobs]);
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |p| p.get()).min(jobs);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let m = next.fetch_add(1, Ordering::Relaxed);
                if m >= jobs {
                    break;
                }
                let mean = |r: Vec<f64>| r.iter().sum::<f64>() / r.len() as f64;
                if m == l {
                    let pre = PreStep { set: &set, embedded: &embedded };
                    let mut mlp = Mlp::new(2 * set.hidden + 1, cfg.units, l * e, 999);
                    fit(&mut mlp, &pre, &train, cfg.epochs, e, 999, |w| mean(recall(w, &pre, &set, 0, scored)));
                    let r = recall(&mlp, &pre, &set, 0, &valid);
                    results.lock().expect("no worker panics holding the lock")[m] = Some((mlp, r));
                    continue;
                }
                let layer = Layer { set: &set, m, reach: cfg.distances.min(l - m) };
                let mut mlp = Mlp::new(width(set.hidden, e, m), cfg.units, layer.reach * e, 1000 + m as u64);
                fit(&mut mlp, &layer, &train, cfg.epochs, e, m as u64, |w| mean(recall(w, &layer, &set, m, scored)));
                let r = recall(&mlp, &layer, &set, m, &valid);
                results.lock().expect("no worker panics holding the lock")[m] = Some((mlp, r));
            });
        }
    });
    let mut results = results.into_inner().expect("no worker panicked");
    let pre = match (embeddings, results.get_mut(l).and_then(Option::take)) {
        (Some(emb), Some((mlp, recall))) => Some(pre_probe(&mlp, emb, set.hidden, recall)),
        _ => None,
    };
    results.truncate(l);
    let (mut probes, mut report_recall, mut flat) = (Vec::new(), Vec::new(), Vec::new());
    for r in results {
        let (mlp, r) = r.expect("every layer trained");
        let row: Vec<f64> = (0..cfg.distances).map(|d| r.get(d).copied().unwrap_or(f64::NAN)).collect();
        flat.extend_from_slice(&row);
        report_recall.push(row);
        probes.push(mlp);
    }
    let probes = HiddenProbes {
        model: header.model.clone(),
        layers: l,
        experts: e,
        top_k: k,
        hidden: set.hidden,
        distances: cfg.distances,
        probes,
        recall: flat,
        pre,
    };
    let report = HiddenTrainReport {
        train_tokens: train.len(),
        valid_tokens: valid.len(),
        dropped_tokens: dropped,
        recall: report_recall,
        pre_recall: probes.pre_recall().to_vec(),
    };
    Ok((probes, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictor::{HiddenPredictor, PathPredictor, Shape};
    use moe_model::StepToken;
    use moe_types::hidden_trace::{write_header, write_record, HiddenHeader, HiddenRecord};
    use moe_types::{MoeLayerId, SeqId};
    use std::sync::Arc;

    /// Tokens whose layer-0 experts follow |h0[x]| (not linear in h) and
    /// whose layer-1 experts follow the previous token's state entering
    /// layer 1 (its context): the probes must find both.
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
        let mut before: Vec<f32> = Vec::new();
        for i in 0..tokens {
            let (seq, pos) = ((i / 10) as u64, (i % 10) as u32);
            let values: Vec<f32> = (0..l * hsz).map(|_| rnd()).collect();
            let (mut experts, mut logits) = (Vec::new(), Vec::new());
            for j in 0..l {
                let s: Vec<f32> = (0..e)
                    .map(|x| match (j, pos) {
                        (0, _) => 4.0 * values[x].abs(),
                        (_, 0) => x as f32,
                        _ => 4.0 * before[hsz + x],
                    })
                    .collect();
                let mut o: Vec<usize> = (0..e).collect();
                o.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
                experts.push(o[..k].iter().map(|&x| x as u16).collect());
                logits.extend(s);
            }
            write_record(&mut buf, &HiddenRecord { seq, pos, values: values.clone(), logits }).unwrap();
            // the recorded (half precision) values are what the predictor sees
            before = values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            toks.push(TraceToken {
                step: 0,
                seq,
                pos,
                token: (i % 3) as u32,
                experts,
                weights: vec![vec![0.5, 0.5]; l],
            });
        }
        (header, toks, buf)
    }

    #[test]
    fn probes_learn_non_linear_and_context_rules_and_forecast_them_at_run_time() {
        let (header, toks, buf) = synthetic(6000);
        let cfg = HiddenTrainConfig { distances: 2, units: 32, epochs: 40 };
        // three tokens, each its own embedding
        let row = |t: u32, out: &mut [f32]| {
            out.iter_mut().enumerate().for_each(|(i, v)| *v = f32::from(i as u32 == t));
            t < 3
        };
        let emb = TokenEmbeddings { vocab: 3, row: &row };
        let (probes, report) =
            train_hidden(&header, &toks, HiddenReader::new(&buf[..]).unwrap(), cfg, Some(&emb)).unwrap();
        // before the step, layer 1 (which follows the context) is forecast;
        // layer 0 (which follows the token's own state) cannot be
        assert!(report.pre_recall[1] > 0.85 && report.pre_recall[0] < 0.8, "{report:?}");
        assert!(report.recall[0][0] > 0.85, "{report:?}");
        assert!(report.recall[1][0] > 0.85, "{report:?}");
        assert!(report.recall[1][1].is_nan(), "no layer 2 to forecast");
        assert_eq!((report.train_tokens, report.valid_tokens, report.dropped_tokens), (4800, 1200, 0));
        // the same training again gives the same probes
        let again = train_hidden(&header, &toks, HiddenReader::new(&buf[..]).unwrap(), cfg, Some(&emb)).unwrap().0;
        assert_eq!((again.probes, again.pre), (probes.probes.clone(), probes.pre.clone()));
        // at run time, decoding sequence 0 token by token, the layer-1
        // forecasts follow the context as the trace's routing does
        let shape = Shape { layers: 2, experts: 4, top_k: 2, depth: 1 };
        let mut p = HiddenPredictor::new(Arc::new(probes), shape);
        let mut reader = HiddenReader::new(&buf[..]).unwrap();
        let (mut right, mut total, mut pre_right) = (0, 0, 0);
        for t in toks.iter().take(400) {
            let r = reader.next_record().unwrap().unwrap();
            let mut out = Vec::new();
            let tok = StepToken { seq: SeqId(t.seq), token: t.token };
            let before = p.path(tok).unwrap();
            if t.pos > 0 {
                pre_right += before[2..].iter().filter(|id| t.experts[1].contains(&id.0)).count();
            }
            p.begin_step(&[tok], &mut out);
            for m in 0..2 {
                out.clear();
                p.hidden(MoeLayerId(m as u16), &r.values[m * 6..(m + 1) * 6], &mut out);
                let ids: Vec<ExpertId> = t.experts[m].iter().map(|&x| ExpertId(x)).collect();
                if m == 1 && t.pos > 0 {
                    right += out[0].ids.iter().filter(|id| ids.contains(id)).count();
                    total += 2;
                }
                p.observe(MoeLayerId(m as u16), &ids, &mut Vec::new());
            }
            if t.pos == 9 {
                p.end_sequence(SeqId(t.seq));
            }
        }
        assert!(right as f64 / total as f64 > 0.85, "{right} of {total}");
        assert!(pre_right as f64 / total as f64 > 0.85, "before the step: {pre_right} of {total}");
        assert_eq!(p.sequences(), 0, "ended sequences leave no context behind");
    }

    #[test]
    fn a_trace_and_hidden_states_out_of_step_are_refused() {
        let (header, mut toks, buf) = synthetic(100);
        toks[3].pos = 99;
        let cfg = HiddenTrainConfig { distances: 1, units: 4, epochs: 1 };
        let e = train_hidden(&header, &toks, HiddenReader::new(&buf[..]).unwrap(), cfg, None).unwrap_err();
        assert!(e.to_string().contains("record 3"), "{e}");
    }
}
