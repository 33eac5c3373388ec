//! Choosing the next token from logits: penalties, logit bias, temperature,
//! top-k / top-p / min-p filtering, a seeded RNG, and logprobs.
//!
//! Order of processing (as in vLLM and HF): logit bias, repetition penalty
//! (over prompt and output), presence and frequency penalties (over the
//! output), then temperature and the filters. Temperature 0 is greedy.
//! Logprobs describe the model's raw distribution (log-softmax of the
//! unprocessed logits), which is what OpenAI clients expect to compare.

use moe_types::TokenId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// How to choose tokens; the defaults are greedy decoding with no penalties.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches this (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the best one (0: off).
    pub min_p: f32,
    /// HF-style: divides positive logits of seen tokens, multiplies negative ones (1: off).
    pub repetition_penalty: f32,
    /// OpenAI-style: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI-style: subtracted per occurrence in the generated text.
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Return this many most likely alternatives with each token (None: no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// A chosen token and, if asked for, its logprob and the top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    /// The token.
    pub id: TokenId,
    /// Its log-probability under the model's raw distribution.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(TokenId, f32)>,
}

/// Per-sequence sampling state: parameters, RNG and token counts.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<TokenId>,
    /// Generated token counts.
    counts: HashMap<TokenId, u32>,
    work: Vec<f32>,
    cand: Vec<(TokenId, f32)>,
    /// Index of the largest processed logit of the current draw.
    top: usize,
}

impl Sampler {
    /// A sampler seeded with `seed` (same seed, same choices).
    pub fn new(params: SamplingParams, seed: u64, prompt: &[TokenId]) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt: prompt.to_vec(),
            counts: HashMap::new(),
            work: Vec::new(),
            cand: Vec::new(),
            top: 0,
        }
    }

    /// Chooses the next token from `logits` and records it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> SampledToken {
        self.sample_excluding(logits, &[])
    }

    /// [`sample`](Self::sample), never choosing a token of `banned` (e.g.
    /// end-of-sequence tokens before `min_tokens`); logprobs still describe
    /// the raw distribution.
    pub fn sample_excluding(&mut self, logits: &[f32], banned: &[TokenId]) -> SampledToken {
        let p = &self.params;
        self.work.clear();
        self.work.extend_from_slice(logits);
        let w = &mut self.work;
        for &id in banned {
            if let Some(x) = w.get_mut(id as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        for &(id, b) in &p.logit_bias {
            if let Some(x) = w.get_mut(id as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().chain(self.counts.keys());
            let mut done = std::collections::HashSet::new();
            for &id in seen {
                if done.insert(id) {
                    if let Some(x) = w.get_mut(id as usize) {
                        *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(x) = w.get_mut(id as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let id = if p.temperature <= 0.0 { argmax(w) } else { self.sample_filtered() };
        let (logprob, top) = match self.params.logprobs {
            Some(n) => logprobs(logits, id, n),
            None => (0.0, Vec::new()),
        };
        *self.counts.entry(id).or_insert(0) += 1;
        SampledToken { id, logprob, top }
    }

    /// Temperature sampling with the top-k, top-p and min-p filters.
    ///
    /// Probabilities come from one vectorised pass over the vocabulary;
    /// nucleus sampling then sorts only as long a prefix of the most likely
    /// tokens as it needs (64, then 4x longer until the prefix reaches
    /// `top_p`) instead of the whole vocabulary: the kept set and its order
    /// are those of a full sort.
    fn sample_filtered(&mut self) -> TokenId {
        let total = match self.exp_scaled() {
            Ok(total) => total,
            Err(greedy) => return greedy,
        };
        let p = &self.params;
        let n = self.work.len();
        if (p.top_k == 0 || p.top_k >= n) && p.top_p >= 1.0 && p.min_p <= 0.0 {
            return self.draw_scan(total);
        }
        // candidates: (id, unnormalised probability), most likely first on sorting
        self.cand.clear();
        self.cand.extend(self.work.iter().enumerate().filter(|(_, &e)| e > 0.0).map(|(i, &e)| (i as TokenId, e)));
        let by_prob_desc = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_prob_desc);
            self.cand.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let target = p.top_p * self.cand.iter().map(|c| c.1).sum::<f32>();
            let len = self.cand.len();
            let mut m = 64.min(len);
            loop {
                if m < len {
                    self.cand.select_nth_unstable_by(m - 1, by_prob_desc);
                }
                self.cand[..m].sort_unstable_by(by_prob_desc);
                let mut acc = 0.0;
                let keep = self.cand[..m].iter().position(|c| {
                    acc += c.1;
                    acc >= target
                });
                if let Some(i) = keep {
                    self.cand.truncate(i + 1);
                    break;
                }
                if m == len {
                    break;
                }
                m = (m * 4).min(len);
            }
        }
        if p.min_p > 0.0 {
            let floor = self.cand.iter().map(|c| c.1).fold(0.0, f32::max) * p.min_p;
            self.cand.retain(|c| c.1 >= floor);
        }
        let total: f32 = self.cand.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in &self.cand {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        // rounding left the draw unspent: the most likely candidate
        self.cand.iter().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))).map_or(self.top as TokenId, |c| c.0)
    }

    /// Replaces `work` (processed logits) with unnormalised probabilities at
    /// the sampler's temperature, `exp(x / t - max)`, non-finite logits at 0;
    /// returns their sum. `Err(token)` when the temperature is so small that
    /// scaling overflows (the greedy limit: the largest finite logit, first
    /// on ties) or no logit is finite (the plain argmax, as greedy decoding
    /// would choose).
    fn exp_scaled(&mut self) -> Result<f32, TokenId> {
        let inv_t = 1.0 / self.params.temperature;
        let mut best: Option<usize> = None;
        for (i, &x) in self.work.iter().enumerate() {
            if x.is_finite() && best.is_none_or(|b| x > self.work[b]) {
                best = Some(i);
            }
        }
        let Some(best) = best else {
            return Err(argmax(&self.work));
        };
        let max = self.work[best] * inv_t;
        if !max.is_finite() || inv_t.is_infinite() {
            return Err(best as TokenId);
        }
        for x in self.work.iter_mut() {
            *x = if x.is_finite() { *x * inv_t } else { f32::NEG_INFINITY };
        }
        self.top = best;
        Ok(moe_kernels::exp::exp_shifted_inplace(&mut self.work, max))
    }

    /// Draws a token with probability `work[i] / total`, scanning in id
    /// order; when rounding leaves the draw unspent after the last token, the
    /// most likely token.
    fn draw_scan(&mut self, total: f32) -> TokenId {
        let mut r = self.rng.random::<f32>() * total;
        for (i, &e) in self.work.iter().enumerate() {
            if e > 0.0 {
                r -= e;
                if r <= 0.0 {
                    return i as TokenId;
                }
            }
        }
        self.top as TokenId
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as TokenId
}

/// Log-probability of `id` and the `n` most likely tokens under softmax(logits).
fn logprobs(logits: &[f32], id: TokenId, n: usize) -> (f32, Vec<(TokenId, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(TokenId, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let by = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by);
            idx.truncate(n);
        }
        idx.sort_unstable_by(by);
        top.extend(idx.into_iter().map(|i| (i as TokenId, logits[i] - lse)));
    }
    (logits[id as usize] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.9, 0.0, -3.0, 1.0, 0.2]
    }

    #[test]
    fn greedy_is_argmax_and_logprobs_are_normalised() {
        let mut s = Sampler::new(SamplingParams { logprobs: Some(3), ..Default::default() }, 0, &[]);
        let t = s.sample(&logits());
        assert_eq!(t.id, 1);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 6]);
        let total: f32 = logits().iter().map(|&x| (x - 2.0).exp()).sum();
        assert!((t.logprob - (1.0 / total).ln()).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_choices() {
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        let run = |seed| {
            let mut s = Sampler::new(p.clone(), seed, &[]);
            (0..50).map(|_| s.sample(&logits()).id).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn full_vocabulary_sampling_follows_softmax() {
        // temperature 0.5 doubles the logits; compare frequencies with the
        // softmax probabilities (the vectorised path) and with the filtered
        // path (top_p just under 1 keeps every token here)
        let probs: Vec<f64> = {
            let e: Vec<f64> = logits().iter().map(|&x| (2.0 * x as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        for top_p in [1.0, 0.999_999] {
            let p = SamplingParams { temperature: 0.5, top_p, ..Default::default() };
            let mut s = Sampler::new(p, 11, &[]);
            let n = 40_000;
            let mut counts = [0usize; 8];
            for _ in 0..n {
                counts[s.sample(&logits()).id as usize] += 1;
            }
            for (c, p) in counts.iter().zip(&probs) {
                let f = *c as f64 / n as f64;
                assert!((f - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3, "top_p {top_p}: {f} vs {p}");
            }
        }
        // non-finite logits are never drawn
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, ..Default::default() }, 5, &[]);
        let l = [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0];
        assert!((0..200).all(|_| matches!(s.sample(&l).id, 1 | 3)));
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, ..Default::default() }, 2, &[]);
        assert!((0..200).all(|_| !matches!(s.sample_excluding(&logits(), &[1, 3]).id, 1 | 3)));
        let mut g = Sampler::new(SamplingParams::default(), 0, &[]);
        assert_eq!(g.sample_excluding(&logits(), &[1]).id, 3);
    }

    #[test]
    fn vanishing_temperature_is_greedy() {
        // 1 / 1e-39 overflows f32: the scaled logits would be inf or NaN
        for t in [1e-39f32, 1e-45, 1e-30] {
            let mut s = Sampler::new(SamplingParams { temperature: t, ..Default::default() }, 1, &[]);
            assert_eq!(s.sample(&[0.0, 0.5, 2.0, 1.9, f32::NAN]).id, 2, "t = {t}");
        }
    }

    #[test]
    fn nucleus_longer_than_the_first_sorted_prefix() {
        // 3000 nearly equal logits: the top-p 0.5 nucleus holds about 1400
        // tokens, so the prefix sort grows several times
        let l: Vec<f32> = (0..3000).map(|i| -(i as f32) * 0.001).collect();
        let e: Vec<f64> = l.iter().map(|&x| (x as f64).exp()).collect();
        let total: f64 = e.iter().sum();
        let mut acc = 0.0;
        let cut = e.iter().position(|v| {
            acc += v / total;
            acc >= 0.5
        });
        let cut = cut.unwrap() + 1;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() }, 9, &[]);
        let ids: Vec<usize> = (0..4000).map(|_| s.sample(&l).id as usize).collect();
        let top = *ids.iter().max().unwrap();
        assert!(top < cut + 2 && top + 20 > cut, "largest id drawn {top}, nucleus ends at {cut}");
    }

    #[test]
    fn filters_restrict_choices() {
        for p in [
            SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.01, ..Default::default() },
            SamplingParams { temperature: 1.0, min_p: 0.99, ..Default::default() },
        ] {
            let mut s = Sampler::new(p, 3, &[]);
            assert!((0..100).all(|_| s.sample(&logits()).id == 1));
        }
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() }, 3, &[]);
        let ids: std::collections::HashSet<_> = (0..200).map(|_| s.sample(&logits()).id).collect();
        assert_eq!(ids, [1, 3].into_iter().collect());
    }

    #[test]
    fn bias_and_penalties_move_greedy_choice() {
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(5, 10.0)], ..Default::default() }, 0, &[]);
        assert_eq!(s.sample(&logits()).id, 5);
        // token 1 in the prompt is penalised below token 3
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.1, ..Default::default() }, 0, &[1]);
        assert_eq!(s.sample(&logits()).id, 3);
        // after generating 1 once, a presence penalty moves greedy to 3
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.5, ..Default::default() }, 0, &[]);
        assert_eq!(s.sample(&logits()).id, 1);
        assert_eq!(s.sample(&logits()).id, 3);
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.06, ..Default::default() }, 0, &[]);
        assert_eq!(s.sample(&logits()).id, 1);
        assert_eq!(s.sample(&logits()).id, 1);
        assert_eq!(s.sample(&logits()).id, 3);
    }
}
