//! [`HostDevice`]: the device operations on host memory with the CPU
//! kernels, in the CPU forward pass's order of arithmetic, so the device
//! pass over it gives [`Model::forward`](crate::Model::forward)'s logits.
//! It is the reference that tests the GPU pass's orchestration on any
//! machine (tests/tests/fidelity.rs), and [`HostExperts`] its expert tier
//! (every expert resident). Not a serving path: it copies every weight.

use super::{AttnDims, AttnIdx, Device, DeviceExperts, Group, Heads};
use crate::config::ExpertAct;
use crate::experts::{ExpertWeights, ResidentExperts};
use crate::{ModelError, Result};
use moe_kernels::{matmul_nt, ops, Weight};
use moe_types::{ExpertId, LayerId, LayerRouting};

/// Host memory as a device (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostDevice;

/// Work space of [`HostDevice`]'s expert products.
#[derive(Default)]
pub struct HostScratch {
    ffn: crate::moe::FfnScratch,
    gather: Vec<f32>,
    y: Vec<f32>,
}

fn short(what: &str, need: usize, have: usize) -> ModelError {
    ModelError::Input(format!("device buffer {what}: {need} values needed, {have} held"))
}

fn part<'a>(what: &str, b: &'a [f32], n: usize) -> Result<&'a [f32]> {
    b.get(..n).ok_or_else(|| short(what, n, b.len()))
}

fn part_mut<'a>(what: &str, b: &'a mut [f32], n: usize) -> Result<&'a mut [f32]> {
    let have = b.len();
    b.get_mut(..n).ok_or_else(|| short(what, n, have))
}

impl Device for HostDevice {
    type Buf = Vec<f32>;
    type Idx = Vec<i32>;
    type Ids = Vec<u32>;
    type Weight = Weight;
    type Scratch = HostScratch;
    type Expert<'a> = &'a ExpertWeights;

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn zeros_idx(&self, n: usize) -> Result<Vec<i32>> {
        Ok(vec![0; n])
    }

    fn scratch(&self, _rows: usize, _widest: usize, _hidden: usize, _ffn: usize) -> Result<HostScratch> {
        Ok(HostScratch::default())
    }

    fn upload(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn upload_idx(&self, v: &[i32]) -> Result<Vec<i32>> {
        Ok(v.to_vec())
    }

    fn upload_ids(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }

    fn upload_weight(&self, w: &Weight) -> Result<Weight> {
        Ok(w.clone())
    }

    fn cols(w: &Weight) -> usize {
        w.cols()
    }

    fn write_idx(&self, v: &[i32], dst: &mut Vec<i32>) -> Result<()> {
        let have = dst.len();
        dst.get_mut(..v.len()).ok_or_else(|| short("indices", v.len(), have))?.copy_from_slice(v);
        Ok(())
    }

    fn write(&self, v: &[f32], dst: &mut Vec<f32>) -> Result<()> {
        part_mut("write", dst, v.len())?.copy_from_slice(v);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(part("read", src, out.len())?);
        Ok(())
    }

    fn fill_zero(&self, b: &mut Vec<f32>) -> Result<()> {
        b.fill(0.0);
        Ok(())
    }

    fn embedding(&self, table: &Weight, ids: &Vec<u32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        let h = table.cols();
        let out = part_mut("embedding", out, n * h)?;
        for (i, &id) in ids[..n].iter().enumerate() {
            table.row_to_f32(id as usize, &mut out[i * h..(i + 1) * h]);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, rows: usize, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        let n = rows * w.len();
        ops::rms_norm(part("norm input", x, n)?, w, eps, part_mut("norm output", out, n)?);
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, m: usize, w: &Weight, _s: &mut HostScratch, out: &mut Vec<f32>) -> Result<()> {
        let (n, k) = (w.rows(), w.cols());
        matmul_nt(part("product input", x, m * k)?, m, w, part_mut("product output", out, m * n)?)?;
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) -> Result<()> {
        ops::add_inplace(part_mut("add", x, n)?, part("add operand", y, n)?);
        Ok(())
    }

    fn add_bias_rows(&self, x: &mut Vec<f32>, b: &Vec<f32>, rows: usize) -> Result<()> {
        for r in part_mut("bias rows", x, rows * b.len())?.chunks_exact_mut(b.len()) {
            ops::add_inplace(r, b);
        }
        Ok(())
    }

    fn clamp(&self, x: &mut Vec<f32>, n: usize, c: f32) -> Result<()> {
        part_mut("clamp", x, n)?.iter_mut().for_each(|v| *v = v.clamp(-c, c));
        Ok(())
    }

    fn norm_heads(&self, x: &mut Vec<f32>, w: &Vec<f32>, h: Heads, eps: f32) -> Result<()> {
        for row in part_mut("head norms", x, h.n_tok * h.stride)?.chunks_exact_mut(h.stride) {
            for head in row[h.col..h.col + h.width * h.count].chunks_exact_mut(h.width) {
                ops::rms_norm_inplace(head, w, eps);
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, cos: &Vec<f32>, sin: &Vec<f32>, h: Heads, half: usize) -> Result<()> {
        for (t, row) in part_mut("rope", x, h.n_tok * h.stride)?.chunks_exact_mut(h.stride).enumerate() {
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for head in row[h.col..h.col + h.width * h.count].chunks_exact_mut(h.width) {
                ops::rope_rotate_half(&mut head[..2 * half], c, s);
            }
        }
        Ok(())
    }

    fn kv_write(
        &self,
        qkv: &Vec<f32>,
        a: AttnDims,
        slots: &Vec<i32>,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
    ) -> Result<()> {
        let (row, qw, kvw) = (a.qkv_width(), a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        for (t, r) in part("kv rows", qkv, a.n_tok * row)?.chunks_exact(row).enumerate() {
            let s = slots[t] as usize * kvw;
            part_mut("key cache", kc, s + kvw)?[s..].copy_from_slice(&r[qw..qw + kvw]);
            part_mut("value cache", vc, s + kvw)?[s..].copy_from_slice(&r[qw + kvw..]);
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &Vec<f32>,
        a: AttnDims,
        idx: AttnIdx<'_, Self>,
        (kc, vc): (&Vec<f32>, &Vec<f32>),
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (d, nh, nkv) = (a.head_dim, a.num_heads, a.num_kv_heads);
        let (row, qw, kvw, group, bs) = (a.qkv_width(), nh * d, nkv * d, nh / nkv, a.block_size);
        let out = part_mut("attention output", out, a.n_tok * qw)?;
        let mut scores = Vec::new();
        let mut rows = Vec::new();
        for t in 0..a.n_tok {
            let pos = idx.pos[t] as usize;
            let table = &idx.blocks[idx.block_off[t] as usize..];
            let lo = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            rows.clear();
            rows.extend((lo..=pos).map(|j| (table[j / bs] as usize * bs + j % bs) * kvw));
            let q_all = &qkv[t * row..t * row + qw];
            for g in 0..nkv {
                let hs = g * group * d..(g + 1) * group * d;
                let kv =
                    ops::KvRows { keys: &kc[g * d..], values: &vc[g * d..], rows: &rows, head_dim: d, value_dim: d };
                ops::attend(&q_all[hs.clone()], kv, a.scale, None, &mut scores, &mut out[t * qw..][hs]);
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate_up: &Vec<f32>, rows: usize, f: usize, out: &mut Vec<f32>) -> Result<()> {
        ops::silu_mul(part("silu input", gate_up, rows * 2 * f)?, f, part_mut("silu output", out, rows * f)?);
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, idx: &Vec<i32>, n: usize, d: usize, out: &mut Vec<f32>) -> Result<()> {
        let out = part_mut("gathered rows", out, n * d)?;
        for (r, &i) in idx[..n].iter().enumerate() {
            out[r * d..(r + 1) * d].copy_from_slice(&x[i as usize * d..(i as usize + 1) * d]);
        }
        Ok(())
    }

    fn sigmoid_gate_add(&self, y: &Vec<f32>, g: &Vec<f32>, rows: usize, d: usize, out: &mut Vec<f32>) -> Result<()> {
        let out = part_mut("gated output", out, rows * d)?;
        for r in 0..rows {
            ops::axpy(&mut out[r * d..(r + 1) * d], ops::sigmoid(g[r]), &y[r * d..(r + 1) * d]);
        }
        Ok(())
    }

    fn expert_ffn(
        &self,
        x: &Vec<f32>,
        group: Group<'_, Self>,
        w: &ExpertWeights,
        s: &mut HostScratch,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (h, n) = (w.down.rows(), group.span.len());
        let rows = &group.rows[group.span.clone()];
        let weights = &group.weights[group.span.clone()];
        s.gather.resize(n * h, 0.0);
        for (r, &tok) in rows.iter().enumerate() {
            s.gather[r * h..(r + 1) * h].copy_from_slice(&x[tok as usize * h..(tok as usize + 1) * h]);
        }
        s.y.resize(n * h, 0.0);
        crate::moe::mlp(w, ExpertAct::Swiglu, &s.gather, n, &mut s.ffn, &mut s.y)?;
        for (r, (&tok, &wgt)) in rows.iter().zip(weights).enumerate() {
            ops::axpy(&mut out[tok as usize * h..(tok as usize + 1) * h], wgt, &s.y[r * h..(r + 1) * h]);
        }
        Ok(())
    }
}

/// Every expert resident in host memory, as the device pass's tier.
pub struct HostExperts(pub ResidentExperts);

impl DeviceExperts<HostDevice> for HostExperts {
    fn prepare(&mut self, _routing: &LayerRouting, _used: &[ExpertId]) -> Result<()> {
        Ok(())
    }

    fn expert(&mut self, layer: LayerId, expert: ExpertId) -> Result<&ExpertWeights> {
        self.0.experts.get(layer.index()).and_then(|l| l.get(expert.index())).ok_or_else(|| {
            ModelError::ExpertUnavailable {
                layer: layer.index(),
                expert: expert.index(),
                message: "no such expert".into(),
            }
        })
    }

    fn release(&mut self, _layer: LayerId, _used: &[ExpertId]) -> Result<()> {
        Ok(())
    }
}
