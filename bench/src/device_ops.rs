//! Every [`Device`] operation of the forward pass on fixed random inputs,
//! run on any device, so the GPU's results can be set against the host
//! device's (the reference the fidelity tests hold to transformers): what
//! `scripts/gpu-check.sh` checks op by op before the whole pass. Shapes cover
//! partial rotary, per-head and full-width norms, grouped-query attention
//! with and without a window, and blocks out of order.

use moe_kernels::Weight;
use moe_model::device::{AttnDims, AttnIdx, Device, Heads};
use moe_model::Result;

/// One operation's output and how far a device may stray from the host's.
pub struct OpResult {
    /// What ran.
    pub name: &'static str,
    /// Its output.
    pub values: Vec<f32>,
    /// Allowed error, relative to `max(1, |reference|)`: products with bf16
    /// weights take bf16 activations on the GPU.
    pub tol: f32,
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = moe_types::rng::SplitMix64::new(seed);
    (0..n).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect()
}

fn bf16(rows: usize, cols: usize, seed: u64) -> Weight {
    let bits = rand_vec(rows * cols, seed).iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    Weight::from_bf16_bits(rows, cols, bits).expect("shape")
}

/// Runs every operation on `dev` and returns the outputs in a fixed order.
pub fn op_suite<D: Device>(dev: &D) -> Result<Vec<OpResult>> {
    let mut out = Vec::new();
    let mut push = |name, values, tol| out.push(OpResult { name, values, tol });
    let read = |b: &D::Buf, n: usize| -> Result<Vec<f32>> {
        let mut v = vec![0.0; n];
        dev.read(b, &mut v)?;
        Ok(v)
    };
    let (t, h) = (5usize, 96usize);
    let x = dev.upload(&rand_vec(t * h, 1))?;

    let table = dev.upload_weight(&bf16(40, h, 2))?;
    let mut emb = dev.zeros(t * h)?;
    dev.embedding(&table, &dev.upload_ids(&[3, 0, 39, 3, 17])?, t, &mut emb)?;
    push("embedding (bf16 table)", read(&emb, t * h)?, 0.0);

    let w = dev.upload(&rand_vec(h, 3))?;
    let mut y = dev.zeros(t * h)?;
    dev.rms_norm(&x, &w, t, 1e-6, &mut y)?;
    push("rms_norm", read(&y, t * h)?, 1e-5);

    let mut s = dev.scratch(t, 256, h, 64)?;
    for (name, wt, tol) in [
        ("matmul (f32 weight)", Weight::from_f32(70, h, rand_vec(70 * h, 4)).expect("shape"), 1e-4),
        ("matmul (bf16 weight)", bf16(70, h, 5), 2e-2),
    ] {
        let mut o = dev.zeros(t * 70)?;
        dev.matmul(&x, t, &dev.upload_weight(&wt)?, &mut s, &mut o)?;
        push(name, read(&o, t * 70)?, tol);
    }

    let mut a = dev.upload(&rand_vec(t * h, 6))?;
    dev.add(&mut a, &x, t * h)?;
    dev.add_bias_rows(&mut a, &w, t)?;
    dev.clamp(&mut a, t * h, 0.75)?;
    push("add, bias rows, clamp", read(&a, t * h)?, 1e-6);

    // attention rows: 4 query heads, 2 kv heads of 16: [q 64 | k 32 | v 32]
    let (nh, nkv, d) = (4usize, 2usize, 16usize);
    let row = (nh + 2 * nkv) * d;
    let qkv_host = rand_vec(t * row, 7);
    let mut qkv = dev.upload(&qkv_host)?;
    let heads = |col, width, count| Heads { n_tok: t, stride: row, col, width, count };
    let head_w = dev.upload(&rand_vec(d, 8))?;
    let full_w = dev.upload(&rand_vec(nkv * d, 9))?;
    dev.norm_heads(&mut qkv, &head_w, heads(0, d, nh), 1e-6)?;
    dev.norm_heads(&mut qkv, &full_w, heads(nh * d, nkv * d, 1), 1e-6)?;
    push("q/k norms (per head, full width)", read(&qkv, t * row)?, 1e-5);
    // partial rotary: the first 6 of each head's 16 values rotate, pairs (j, j + 3)
    let half = 3;
    let cos = dev.upload(&rand_vec(t * half, 10))?;
    let sin = dev.upload(&rand_vec(t * half, 11))?;
    dev.rope(&mut qkv, &cos, &sin, heads(0, d, nh), half)?;
    dev.rope(&mut qkv, &cos, &sin, heads(nh * d, d, nkv), half)?;
    push("rotary (partial, from tables)", read(&qkv, t * row)?, 1e-5);

    // two sequences over blocks of 4 out of order: A at positions 3..6 (3
    // tokens, the first 3 positions written by an earlier step), B at 0..2
    let bs = 4;
    let blocks = dev.upload_idx(&[5, 2, 7, 0])?; // A: blocks 5, 2; B: 7, 0
    let block_off = dev.upload_idx(&[0, 0, 0, 2, 2])?;
    let pos = dev.upload_idx(&[3, 4, 5, 0, 1])?;
    let slots =
        dev.upload_idx(&[5 * bs as i32 + 3, 2 * bs as i32, 2 * bs as i32 + 1, 7 * bs as i32, 7 * bs as i32 + 1])?;
    let kvw = nkv * d;
    let mut kc = dev.upload(&rand_vec(8 * bs * kvw, 12))?; // earlier positions hold values too
    let mut vc = dev.upload(&rand_vec(8 * bs * kvw, 13))?;
    for window in [None, Some(2)] {
        let dims =
            AttnDims { n_tok: t, num_heads: nh, num_kv_heads: nkv, head_dim: d, block_size: bs, window, scale: 0.25 };
        dev.kv_write(&qkv, dims, &slots, &mut kc, &mut vc)?;
        let mut o = dev.zeros(t * nh * d)?;
        let idx = AttnIdx { blocks: &blocks, block_off: &block_off, pos: &pos };
        dev.attention(&qkv, dims, idx, (&kc, &vc), &mut o)?;
        push(
            if window.is_none() { "paged attention" } else { "paged attention (window 2)" },
            read(&o, t * nh * d)?,
            1e-4,
        );
    }
    push("kv cache after writes", read(&kc, 8 * bs * kvw)?, 0.0);

    let f = 40;
    let gu = dev.upload(&rand_vec(t * 2 * f, 14))?;
    let mut act = dev.zeros(t * f)?;
    dev.silu_mul(&gu, t, f, &mut act)?;
    push("silu_mul", read(&act, t * f)?, 1e-5);

    let mut g = dev.zeros(3 * h)?;
    dev.gather_rows(&x, &dev.upload_idx(&[4, 0, 2])?, 3, h, &mut g)?;
    push("gather_rows", read(&g, 3 * h)?, 0.0);

    let mut acc = dev.upload(&rand_vec(t * h, 15))?;
    dev.sigmoid_gate_add(&y, &dev.upload(&rand_vec(t, 16))?, t, h, &mut acc)?;
    push("sigmoid_gate_add", read(&acc, t * h)?, 1e-5);
    Ok(out)
}

/// The largest error of `got` against `want`, relative to `max(1, |want|)`
/// (NaN or infinity: infinite).
pub fn scaled_error(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    got.iter().zip(want).fold(0.0f32, |m, (&a, &b)| {
        let e = (a - b).abs() / b.abs().max(1.0);
        if e.is_finite() {
            m.max(e)
        } else {
            f32::INFINITY
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::device::host::HostDevice;

    /// The suite runs on the host device (shapes consistent) and is
    /// deterministic; its attention differs with the window (the window is read).
    #[test]
    fn the_suite_runs_on_the_host_and_repeats() {
        let a = op_suite(&HostDevice).unwrap();
        let b = op_suite(&HostDevice).unwrap();
        assert_eq!(a.len(), 13);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(scaled_error(&x.values, &y.values), 0.0, "{}", x.name);
            assert!(x.values.iter().all(|v| v.is_finite()), "{}", x.name);
        }
        let attn: Vec<&OpResult> = a.iter().filter(|r| r.name.starts_with("paged attention")).collect();
        assert!(scaled_error(&attn[0].values, &attn[1].values) > 1e-3, "the window changed nothing");
    }
}
