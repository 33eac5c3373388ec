//! The learned path predictor: a Bernoulli naive-Bayes model per MoE layer,
//! trained offline by counting routing traces.
//!
//! For a token with id `v` whose experts are known at MoE layers `i < j`, the
//! score of expert `e` at layer `j` is
//!
//! ```text
//! log P(e in path_j)
//!   + wt * log P(token = v | e in path_j)
//!   + wp * sum over i, e':  log P(e' in path_i | e in path_j)      if e' was chosen at i
//!                           log (1 - P(e' in path_i | e in path_j)) otherwise
//! ```
//!
//! and the forecast is the `top_k` best scores. It needs no hidden states, so
//! it also forecasts a step's first MoE layer from the token id alone (which
//! look-ahead gating cannot), and it costs a few hundred additions per token.
//! ExpertFlow trains a small neural network on similar inputs; counts are
//! what the traces of a small model support without overfitting, and train
//! in seconds.
//!
//! File format (`moe-path-predictor`, version 1): a safetensors file with f32
//! tensors `prior [L, E]`, `token [L, V, E]`, `path_present [L, L, E, E]` and
//! `path_absent [L, L, E, E]` (natural logs; `path_*[i][j][e'][e]` is about
//! `e'` at layer `i` given `e` at layer `j`), and string metadata `format`,
//! `version`, `model`, `layers`, `experts`, `top_k`, `vocab`, `token_weight`,
//! `path_weight`.

use super::{window, Forecast, PathPredictor, Shape, NO_EXPERT};
use crate::OffloadError;
use moe_model::StepToken;
use moe_types::trace::{TraceHeader, TraceToken};
use moe_types::{ExpertId, MoeLayerId};
use std::path::Path;
use std::sync::Arc;

/// The `format` metadata value.
pub const PREDICTOR_FORMAT: &str = "moe-path-predictor";
/// The version written and read.
pub const PREDICTOR_VERSION: u32 = 1;

/// The trained tables.
#[derive(Clone, Debug, PartialEq)]
pub struct PathTables {
    /// Model name the traces came from.
    pub model: String,
    /// MoE layers.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Weight of the token evidence.
    pub token_weight: f32,
    /// Weight of the path evidence.
    pub path_weight: f32,
    prior: Vec<f32>,
    token: Vec<f32>,
    present: Vec<f32>,
    absent: Vec<f32>,
}

impl PathTables {
    fn pair(&self, i: usize, j: usize, ep: usize, e: usize) -> usize {
        ((i * self.layers + j) * self.experts + ep) * self.experts + e
    }

    /// Scores of every expert at layer `j` for token `v` given the chosen
    /// experts of layers `0..known.len()` (`known[i]`: that layer's ids).
    pub fn scores(&self, j: usize, v: usize, known: &[&[ExpertId]], out: &mut [f32]) {
        let ne = self.experts;
        out.copy_from_slice(&self.prior[j * ne..(j + 1) * ne]);
        if v < self.vocab {
            let row = &self.token[(j * self.vocab + v) * ne..][..ne];
            out.iter_mut().zip(row).for_each(|(o, t)| *o += self.token_weight * t);
        }
        let mut chosen = vec![false; ne];
        for (i, ids) in known.iter().enumerate().filter(|&(i, _)| i != j) {
            chosen.iter_mut().for_each(|c| *c = false);
            ids.iter().filter(|id| id.index() < ne).for_each(|id| chosen[id.index()] = true);
            for (e, o) in out.iter_mut().enumerate() {
                let mut s = 0.0;
                for (ep, &c) in chosen.iter().enumerate() {
                    let p = self.pair(i, j, ep, e);
                    s += if c { self.present[p] } else { self.absent[p] };
                }
                *o += self.path_weight * s;
            }
        }
    }

    /// The `top_k` experts of layer `j` for token `v` given `known` layers.
    pub fn predict(&self, j: usize, v: usize, known: &[&[ExpertId]], out: &mut Vec<ExpertId>) {
        let mut s = vec![0.0; self.experts];
        self.scores(j, v, known, &mut s);
        let mut order: Vec<usize> = (0..self.experts).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        out.extend(order.iter().take(self.top_k).map(|&e| ExpertId(e as u16)));
    }

    /// Checks the tables against the model's shape.
    pub fn check_shape(&self, shape: Shape, path: &Path) -> Result<(), OffloadError> {
        if (self.layers, self.experts, self.top_k) != (shape.layers, shape.experts, shape.top_k) {
            let message = format!(
                "trained for {} MoE layers x {} experts (top {}), but the model has {} x {} (top {})",
                self.layers, self.experts, self.top_k, shape.layers, shape.experts, shape.top_k
            );
            return Err(OffloadError::Predictor { path: path.into(), message });
        }
        Ok(())
    }

    /// Writes the tables as a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OffloadError> {
        let (l, e, v) = (self.layers, self.experts, self.vocab);
        let tensors = [
            ("prior".to_string(), vec![l, e], &self.prior[..]),
            ("token".to_string(), vec![l, v, e], &self.token[..]),
            ("path_present".to_string(), vec![l, l, e, e], &self.present[..]),
            ("path_absent".to_string(), vec![l, l, e, e], &self.absent[..]),
        ];
        let meta = [
            ("model", self.model.clone()),
            ("layers", l.to_string()),
            ("experts", e.to_string()),
            ("top_k", self.top_k.to_string()),
            ("vocab", v.to_string()),
            ("token_weight", self.token_weight.to_string()),
            ("path_weight", self.path_weight.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v));
        super::file::write(path, PREDICTOR_FORMAT, PREDICTOR_VERSION, &tensors, meta)
    }

    /// Reads a file written by [`save`](Self::save), checking format,
    /// version and tensor shapes.
    pub fn load(path: &Path) -> Result<Self, OffloadError> {
        let f = super::file::PredictorFile::read(path, PREDICTOR_FORMAT, PREDICTOR_VERSION)?;
        let (l, e, v) = (f.num("layers")?, f.num("experts")?, f.num("vocab")?);
        Ok(Self {
            model: f.get("model")?,
            layers: l,
            experts: e,
            top_k: f.num("top_k")?,
            vocab: v,
            token_weight: f.real("token_weight")?,
            path_weight: f.real("path_weight")?,
            prior: f.tensor("prior", &[l, e])?,
            token: f.tensor("token", &[l, v, e])?,
            present: f.tensor("path_present", &[l, l, e, e])?,
            absent: f.tensor("path_absent", &[l, l, e, e])?,
        })
    }
}

/// What training measured, on held-out sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Tokens counted / held out.
    pub train_tokens: usize,
    /// Tokens held out for validation.
    pub valid_tokens: usize,
    /// The chosen weights.
    pub token_weight: f32,
    /// The chosen weights.
    pub path_weight: f32,
    /// Per layer: accuracy from the token alone (forecast at step start).
    pub token_only: Vec<f64>,
    /// Per layer: accuracy from the token and every earlier layer's experts
    /// (forecast one layer ahead).
    pub one_ahead: Vec<f64>,
}

/// Trains on the records of a trace: sequences with `seq % 5 == 0` are held
/// out to choose the evidence weights and to report accuracy. `vocab` is the
/// model's vocabulary size.
pub fn train(
    header: &TraceHeader,
    records: &[TraceToken],
    vocab: usize,
) -> Result<(PathTables, TrainReport), OffloadError> {
    let (l, e, k) = (header.moe_layers.len(), header.num_experts, header.top_k);
    if l == 0 || e == 0 || k == 0 || e >= NO_EXPERT.index() {
        return Err(OffloadError::Trace("the trace describes no MoE layers".into()));
    }
    for r in records {
        if r.experts.len() != l || r.experts.iter().any(|x| x.len() != k || x.iter().any(|&id| id as usize >= e)) {
            return Err(OffloadError::Trace(format!(
                "record of seq {} pos {} does not match the header",
                r.seq, r.pos
            )));
        }
        if r.token as usize >= vocab {
            return Err(OffloadError::Trace(format!("token id {} is outside the vocabulary {vocab}", r.token)));
        }
    }
    let (valid, train_set): (Vec<&TraceToken>, Vec<&TraceToken>) = records.iter().partition(|r| r.seq % 5 == 0);
    if train_set.is_empty() {
        return Err(OffloadError::Trace("no training records (every sequence id is a multiple of 5)".into()));
    }
    let mut tables = fit(header, &train_set, vocab);
    let mut best = (f64::MIN, 1.0, 1.0);
    for tw in [0.25f32, 0.5, 1.0] {
        for pw in [0.25f32, 0.5, 1.0] {
            tables.token_weight = tw;
            tables.path_weight = pw;
            let acc = evaluate(&tables, &valid, true).iter().sum::<f64>();
            if acc > best.0 {
                best = (acc, tw, pw);
            }
        }
    }
    tables.token_weight = best.1;
    tables.path_weight = best.2;
    let report = TrainReport {
        train_tokens: train_set.len(),
        valid_tokens: valid.len(),
        token_weight: best.1,
        path_weight: best.2,
        token_only: evaluate(&tables, &valid, false),
        one_ahead: evaluate(&tables, &valid, true),
    };
    // the shipped tables count every record
    let all: Vec<&TraceToken> = records.iter().collect();
    let mut full = fit(header, &all, vocab);
    full.token_weight = best.1;
    full.path_weight = best.2;
    Ok((full, report))
}

/// Laplace-smoothed log tables from counts.
fn fit(header: &TraceHeader, records: &[&TraceToken], vocab: usize) -> PathTables {
    let (l, e, k) = (header.moe_layers.len(), header.num_experts, header.top_k);
    let n = records.len() as f32;
    let mut cnt = vec![0f32; l * e];
    let mut tok = vec![0f32; l * vocab * e];
    let mut pair = vec![0f32; l * l * e * e];
    for r in records {
        for j in 0..l {
            for &x in &r.experts[j] {
                let x = x as usize;
                cnt[j * e + x] += 1.0;
                tok[(j * vocab + r.token as usize) * e + x] += 1.0;
                for i in 0..l {
                    for &y in &r.experts[i] {
                        pair[((i * l + j) * e + y as usize) * e + x] += 1.0;
                    }
                }
            }
        }
    }
    let alpha = 1.0f32;
    let prior = cnt.iter().map(|&c| ((c + alpha) / (n + alpha * e as f32 / k as f32)).ln()).collect();
    let mut token = vec![0f32; l * vocab * e];
    for j in 0..l {
        for v in 0..vocab {
            for x in 0..e {
                let idx = (j * vocab + v) * e + x;
                token[idx] = ((tok[idx] + alpha) / (cnt[j * e + x] + alpha * vocab as f32)).ln();
            }
        }
    }
    let mut present = vec![0f32; l * l * e * e];
    let mut absent = vec![0f32; l * l * e * e];
    for i in 0..l {
        for j in 0..l {
            for y in 0..e {
                for x in 0..e {
                    let idx = ((i * l + j) * e + y) * e + x;
                    let p = (pair[idx] + alpha) / (cnt[j * e + x] + 2.0 * alpha);
                    present[idx] = p.ln();
                    absent[idx] = (1.0 - p).max(1e-6).ln();
                }
            }
        }
    }
    PathTables {
        model: header.model.clone(),
        layers: l,
        experts: e,
        top_k: k,
        vocab,
        token_weight: 1.0,
        path_weight: 1.0,
        prior,
        token,
        present,
        absent,
    }
}

/// Per-layer accuracy (share of actual choices predicted) on `records`,
/// from the token alone or also from every earlier layer.
fn evaluate(t: &PathTables, records: &[&TraceToken], with_path: bool) -> Vec<f64> {
    let mut right = vec![0usize; t.layers];
    let mut total = vec![0usize; t.layers];
    let mut pred = Vec::new();
    for r in records {
        let ids: Vec<Vec<ExpertId>> = r.experts.iter().map(|x| x.iter().map(|&i| ExpertId(i)).collect()).collect();
        for j in 0..t.layers {
            let known: Vec<&[ExpertId]> = if with_path { ids[..j].iter().map(Vec::as_slice).collect() } else { vec![] };
            pred.clear();
            t.predict(j, r.token as usize, &known, &mut pred);
            right[j] += pred.iter().filter(|p| ids[j].contains(p)).count();
            total[j] += ids[j].len();
        }
    }
    right.iter().zip(&total).map(|(&r, &n)| if n == 0 { 0.0 } else { r as f64 / n as f64 }).collect()
}

/// Forecasts from the learned tables: every token's first `depth` layers at
/// step start from its id, then `depth` layers ahead of each routed layer
/// from its id and the experts it took so far.
pub struct LearnedPredictor {
    tables: Arc<PathTables>,
    shape: Shape,
    step: Vec<StepToken>,
    /// This step's routing so far, per layer.
    current: Vec<Vec<ExpertId>>,
    known_layers: usize,
}

impl LearnedPredictor {
    /// A predictor over `tables` (checked against `shape` by the caller).
    pub fn new(tables: Arc<PathTables>, shape: Shape) -> Self {
        Self { tables, shape, step: Vec::new(), current: vec![Vec::new(); shape.layers], known_layers: 0 }
    }

    fn forecast(&self, j: usize) -> Forecast {
        let k = self.shape.top_k;
        let mut ids = Vec::with_capacity(self.step.len() * k);
        let mut known: Vec<&[ExpertId]> = Vec::with_capacity(self.known_layers);
        for (t, tok) in self.step.iter().enumerate() {
            known.clear();
            known.extend(self.current[..self.known_layers].iter().map(|c| &c[t * k..(t + 1) * k]));
            let before = ids.len();
            self.tables.predict(j, tok.token as usize, &known, &mut ids);
            ids.resize(before + k, NO_EXPERT);
        }
        Forecast { layer: MoeLayerId(j as u16), ids }
    }
}

impl PathPredictor for LearnedPredictor {
    fn begin_step(&mut self, tokens: &[StepToken], out: &mut Vec<Forecast>) {
        self.step.clear();
        self.step.extend_from_slice(tokens);
        self.known_layers = 0;
        out.extend(window(0, self.shape.depth, self.shape.layers).map(|j| self.forecast(j)));
    }

    fn observe(&mut self, layer: MoeLayerId, ids: &[ExpertId], out: &mut Vec<Forecast>) {
        let layer = layer.index();
        if layer != self.known_layers || ids.len() != self.step.len() * self.shape.top_k {
            return; // out of order (cannot happen through the cache): no forecast
        }
        self.current[layer].clear();
        self.current[layer].extend_from_slice(ids);
        self.known_layers = layer + 1;
        out.extend(window(layer + 1, self.shape.depth, self.shape.layers).map(|j| self.forecast(j)));
    }

    fn path(&self, token: StepToken) -> Option<Vec<ExpertId>> {
        let mut ids = Vec::with_capacity(self.shape.layers * self.shape.top_k);
        for j in 0..self.shape.layers {
            self.tables.predict(j, token.token as usize, &[], &mut ids);
        }
        Some(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layer 1's expert equals layer 0's; layer 0's is the token id mod 4.
    fn synthetic() -> (TraceHeader, Vec<TraceToken>) {
        let h = TraceHeader::new("t", 2, vec![0, 1], 4, 1);
        let recs = (0..400u64)
            .map(|i| {
                let tok = (i * 7 % 16) as u32;
                let e = (tok % 4) as u16;
                TraceToken {
                    step: i,
                    seq: i,
                    pos: 0,
                    token: tok,
                    experts: vec![vec![e], vec![e]],
                    weights: vec![vec![1.0]; 2],
                }
            })
            .collect();
        (h, recs)
    }

    #[test]
    fn learns_token_and_path_dependence_and_round_trips() {
        let (h, recs) = synthetic();
        let (t, report) = train(&h, &recs, 16).unwrap();
        assert!(report.token_only.iter().all(|&a| a > 0.99), "{report:?}");
        assert!(report.one_ahead.iter().all(|&a| a > 0.99), "{report:?}");
        let mut out = Vec::new();
        t.predict(1, 99, &[&[ExpertId(2)]], &mut out); // unknown token: the path decides
        assert_eq!(out, vec![ExpertId(2)]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.safetensors");
        t.save(&p).unwrap();
        assert_eq!(PathTables::load(&p).unwrap(), t);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(PathTables::load(&p).unwrap_err().to_string().contains("not a safetensors file"));
        let shape = Shape { layers: 3, experts: 4, top_k: 1, depth: 1 };
        assert!(t
            .check_shape(shape, Path::new("p.safetensors"))
            .unwrap_err()
            .to_string()
            .contains("trained for 2 MoE layers"));
    }

    #[test]
    fn predictor_forecasts_from_token_then_path() {
        let (h, recs) = synthetic();
        let (t, _) = train(&h, &recs, 16).unwrap();
        let shape = Shape { layers: 2, experts: 4, top_k: 1, depth: 1 };
        let mut p = LearnedPredictor::new(Arc::new(t), shape);
        let mut out = Vec::new();
        let toks = [StepToken { seq: moe_types::SeqId(1), token: 6 }];
        p.begin_step(&toks, &mut out);
        assert_eq!(out, vec![Forecast { layer: MoeLayerId(0), ids: vec![ExpertId(2)] }]);
        out.clear();
        p.observe(MoeLayerId(0), &[ExpertId(1)], &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].layer, MoeLayerId(1));
    }
}
