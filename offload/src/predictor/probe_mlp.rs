//! The hidden-state predictor's probe: a two-layer perceptron, `units`
//! SiLU units over an input whose last entry is the constant 1 (so `w1`'s
//! last column is the first layer's bias), then `outputs` scores from the
//! units and a bias (`w2` is `[outputs, units + 1]`). Scores come in groups
//! of `group` (one group per forecast distance, one score per expert).
//!
//! Training ([`fit`]) minimises, per group, the cross-entropy between the
//! scores' softmax and a target distribution (the router's softmax) by Adam
//! on mini-batches, with a linear warm-up and a cosine decay of the step
//! size, keeping the weights of the epoch that scored best on held-out
//! samples. Deterministic: seeded initialisation and shuffling, one thread.

use moe_types::rng::SplitMix64;

/// Mini-batch size.
const BATCH: usize = 256;
/// Adam's peak step size and moment decays.
const LR: f32 = 3e-3;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
/// Share of the steps spent warming the step size up.
const WARMUP: f64 = 0.1;

/// The probe's weights.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mlp {
    pub inputs: usize,
    pub units: usize,
    pub outputs: usize,
    /// `[units, inputs]`.
    pub w1: Vec<f32>,
    /// `[outputs, units + 1]`.
    pub w2: Vec<f32>,
}

/// The seeded generator, with the draws the probe needs.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// Uniform in `[-1, 1)`.
    fn symmetric(&mut self) -> f32 {
        (self.0.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
}

/// `x / (1 + e^-x)`.
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The derivative of [`silu`].
fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// `a · b` with independent partial sums (vectorisable).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

impl Mlp {
    /// Weights drawn uniformly in `±1/sqrt(fan-in)` from `seed`.
    pub fn new(inputs: usize, units: usize, outputs: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let b1 = 1.0 / (inputs.max(1) as f32).sqrt();
        let b2 = 1.0 / ((units + 1) as f32).sqrt();
        let w1 = (0..units * inputs).map(|_| rng.symmetric() * b1).collect();
        let w2 = (0..outputs * (units + 1)).map(|_| rng.symmetric() * b2).collect();
        Self { inputs, units, outputs, w1, w2 }
    }

    /// The pre-activations `z` (`units`) and the scores (`outputs`) of input
    /// `x`; `act` receives the units' outputs and the constant 1.
    fn forward(&self, x: &[f32], z: &mut [f32], act: &mut [f32], scores: &mut [f32]) {
        for (zj, row) in z.iter_mut().zip(self.w1.chunks_exact(self.inputs)) {
            *zj = dot(row, x);
        }
        for (a, &zj) in act.iter_mut().zip(z.iter()) {
            *a = silu(zj);
        }
        act[self.units] = 1.0;
        for (s, row) in scores.iter_mut().zip(self.w2.chunks_exact(self.units + 1)) {
            *s = dot(row, act);
        }
    }

    /// The scores of input `x`.
    pub fn scores(&self, x: &[f32], scores: &mut [f32]) {
        let (mut z, mut act) = (vec![0f32; self.units], vec![0f32; self.units + 1]);
        self.forward(x, &mut z, &mut act, scores);
    }
}

/// What [`fit`] trains on: samples by index, an input and a target
/// distribution per score group for each.
pub(crate) trait Samples: Sync {
    /// Sample `i`'s input into `out` (cleared first).
    fn input(&self, i: usize, out: &mut Vec<f32>);
    /// Sample `i`'s target probabilities, `outputs` values (each group sums to 1).
    fn target(&self, i: usize, out: &mut [f32]);
}

/// `p = softmax(s)` over each group of `group` values.
fn softmax_groups(s: &[f32], group: usize, p: &mut [f32]) {
    for (sg, pg) in s.chunks_exact(group).zip(p.chunks_exact_mut(group)) {
        let max = sg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (pv, &sv) in pg.iter_mut().zip(sg) {
            *pv = (sv - max).exp();
            sum += *pv;
        }
        pg.iter_mut().for_each(|v| *v /= sum);
    }
}

/// One Adam moment pair per weight.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self { m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// One step of size `lr` on `w` along `g`, the `t`-th (from 1).
    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32, t: i32) {
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for (((w, g), m), v) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
        }
    }
}

/// Trains `mlp` for `epochs` passes over the samples `train`, scores groups
/// of `group`; after each epoch `score` rates the weights on held-out
/// samples (higher is better) and the best epoch's weights are kept.
/// Returns the best score.
pub(crate) fn fit(
    mlp: &mut Mlp,
    data: &dyn Samples,
    train: &[usize],
    epochs: usize,
    group: usize,
    seed: u64,
    mut score: impl FnMut(&Mlp) -> f64,
) -> f64 {
    let (n, u, o) = (mlp.inputs, mlp.units, mlp.outputs);
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut order = train.to_vec();
    let (mut g1, mut g2) = (vec![0f32; u * n], vec![0f32; o * (u + 1)]);
    let (mut a1, mut a2) = (Adam::new(g1.len()), Adam::new(g2.len()));
    let (mut x, mut z, mut act) = (Vec::with_capacity(n), vec![0f32; u], vec![0f32; u + 1]);
    let (mut s, mut p, mut y, mut da) = (vec![0f32; o], vec![0f32; o], vec![0f32; o], vec![0f32; u]);
    let total = (epochs * train.len().div_ceil(BATCH)).max(1);
    let mut t = 0usize;
    let mut best = (score(mlp), mlp.clone());
    for _ in 0..epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for batch in order.chunks(BATCH) {
            g1.iter_mut().for_each(|v| *v = 0.0);
            g2.iter_mut().for_each(|v| *v = 0.0);
            let inv = 1.0 / batch.len() as f32;
            for &i in batch {
                data.input(i, &mut x);
                data.target(i, &mut y);
                mlp.forward(&x, &mut z, &mut act, &mut s);
                // d loss / d scores = softmax - target, per group
                softmax_groups(&s, group, &mut p);
                da.iter_mut().for_each(|v| *v = 0.0);
                for (r, (pv, yv)) in p.iter().zip(&y).enumerate() {
                    let ds = (pv - yv) * inv;
                    let row = &mlp.w2[r * (u + 1)..(r + 1) * (u + 1)];
                    axpy(&mut g2[r * (u + 1)..(r + 1) * (u + 1)], ds, &act);
                    axpy(&mut da, ds, &row[..u]);
                }
                for j in 0..u {
                    let dz = da[j] * silu_grad(z[j]);
                    if dz != 0.0 {
                        axpy(&mut g1[j * n..(j + 1) * n], dz, &x);
                    }
                }
            }
            t += 1;
            let frac = t as f64 / total as f64;
            let lr = if frac < WARMUP {
                frac / WARMUP
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * (frac - WARMUP) / (1.0 - WARMUP)).cos())
            } as f32
                * LR;
            a1.step(&mut mlp.w1, &g1, lr, t as i32);
            a2.step(&mut mlp.w2, &g2, lr, t as i32);
        }
        let now = score(mlp);
        if now > best.0 {
            best = (now, mlp.clone());
        }
    }
    *mlp = best.1;
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two groups of 3 classes, each the argmax of a fixed non-linear
    /// function of a 4-value input (|x0| - |x1| for one, x2 * x3 for the other).
    struct Xor(Vec<[f32; 4]>);

    impl Xor {
        fn classes(x: &[f32; 4]) -> [usize; 2] {
            let a = x[0].abs() - x[1].abs();
            let b = x[2] * x[3];
            [
                if a > 0.2 {
                    0
                } else if a < -0.2 {
                    1
                } else {
                    2
                },
                if b > 0.05 {
                    0
                } else if b < -0.05 {
                    1
                } else {
                    2
                },
            ]
        }
    }

    impl Samples for Xor {
        fn input(&self, i: usize, out: &mut Vec<f32>) {
            out.clear();
            out.extend_from_slice(&self.0[i]);
            out.push(1.0);
        }
        fn target(&self, i: usize, out: &mut [f32]) {
            out.iter_mut().for_each(|v| *v = 0.0);
            for (g, c) in Self::classes(&self.0[i]).into_iter().enumerate() {
                out[g * 3 + c] = 1.0;
            }
        }
    }

    fn accuracy(mlp: &Mlp, data: &Xor, idx: std::ops::Range<usize>) -> f64 {
        let mut s = vec![0f32; 6];
        let mut x = Vec::new();
        let mut right = 0;
        for i in idx.clone() {
            data.input(i, &mut x);
            mlp.scores(&x, &mut s);
            for (g, c) in Xor::classes(&data.0[i]).into_iter().enumerate() {
                let sg = &s[g * 3..g * 3 + 3];
                let best = (0..3).max_by(|&a, &b| sg[a].total_cmp(&sg[b])).unwrap();
                right += usize::from(best == c);
            }
        }
        right as f64 / (2 * idx.len()) as f64
    }

    #[test]
    fn learns_a_rule_no_linear_probe_can_and_is_deterministic() {
        let mut rng = Rng::new(7);
        let data =
            Xor((0..3000).map(|_| [rng.symmetric(), rng.symmetric(), rng.symmetric(), rng.symmetric()]).collect());
        let train: Vec<usize> = (0..2500).collect();
        let run = || {
            let mut mlp = Mlp::new(5, 32, 6, 1);
            let best = fit(&mut mlp, &data, &train, 100, 3, 3, |m| accuracy(m, &data, 2500..3000));
            (mlp, best)
        };
        let (mlp, best) = run();
        assert!(best > 0.9, "held-out accuracy {best}");
        assert_eq!(accuracy(&mlp, &data, 2500..3000), best, "the best epoch's weights are kept");
        // a linear rule cannot tell |x0| > |x1| or the sign of x2 * x3: chance is about 1/3-1/2
        assert_eq!(run().0, mlp, "same data, same seed: same weights");
    }

    #[test]
    fn silu_gradient_matches_finite_differences() {
        for x in [-3.0f32, -0.5, 0.0, 0.7, 4.0] {
            let h = 1e-3;
            let fd = (silu(x + h) - silu(x - h)) / (2.0 * h);
            assert!((fd - silu_grad(x)).abs() < 1e-3, "{x}: {fd} vs {}", silu_grad(x));
        }
    }
}
