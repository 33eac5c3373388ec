//! The forward pass on an NVIDIA GPU (feature `cuda`): [`CudaDevice`], the
//! [`Device`] operations as CUDA kernels and cuBLAS products on one compute
//! stream, and [`GpuModel`], the device pass over it (`crate::device`).
//!
//! Non-expert weights are uploaded once; the paged KV cache and the step's
//! activations live on the device; experts come from the expert tier's slot
//! pool ([`CudaExpert`]: the compute stream waits on the device for the
//! expert's copy, nothing else). Per step: token ids, positions, cache rows
//! and rotary tables go up once; each MoE layer's router logits come down
//! (routing runs on the host by the CPU path's own rule, so the tier learns
//! the routing before the experts run); logits come down for sampling.
//!
//! Precision: products take bf16 activations against bf16 weights with f32
//! accumulation (`moe_kernels::cuda::gemm`), except the routers, widened to
//! f32 at upload so routing does not flip on that rounding; everything else
//! is f32. The
//! orchestration is the host device's (`crate::device::host`), tested against
//! the CPU forward pass everywhere; these operations are checked against the
//! CPU kernels on a GPU by `scripts/gpu-check.sh`.

use crate::device::{AttnDims, AttnIdx, Device, DeviceModel, Group, Heads};
use crate::{ModelError, Result};
use cudarc::driver::CudaSlice;
use moe_kernels::cuda::expert_pool::ExpertSlotPool;
use moe_kernels::cuda::gemm::{self, FfnScratch, GpuWeight, TokenGroup};
use moe_kernels::cuda::layer_ops::{self, Segments};
use moe_kernels::cuda::ops::{self, AttnMeta, AttnShape, QkvRows};
use moe_kernels::cuda::GpuContext;
use moe_kernels::Weight;
use moe_types::ExpertKey;

/// The device pass on a GPU.
pub type GpuModel = DeviceModel<CudaDevice>;

/// One GPU: its context (compute stream, cuBLAS, kernels).
pub struct CudaDevice {
    g: GpuContext,
}

impl CudaDevice {
    /// Runs on `g`'s device.
    pub fn new(g: GpuContext) -> Self {
        Self { g }
    }

    /// The context.
    pub fn context(&self) -> &GpuContext {
        &self.g
    }
}

impl DeviceModel<CudaDevice> {
    /// The GPU context (for the expert tier).
    pub fn gpu(&self) -> &GpuContext {
        self.device().context()
    }
}

/// Work space of products on the GPU.
pub struct CudaScratch {
    /// Activations rounded to bf16 for the products.
    bf16: CudaSlice<u16>,
    /// Expert products.
    ffn: FfnScratch,
}

/// A prepared expert: its slot in the pool.
#[derive(Clone, Copy)]
pub struct CudaExpert<'a> {
    /// The pool holding it.
    pub pool: &'a ExpertSlotPool,
    /// Which expert.
    pub key: ExpertKey,
}

fn segments(h: Heads) -> Segments {
    Segments { n_tok: h.n_tok, stride: h.stride, col: h.col, width: h.width, count: h.count }
}

fn shape(a: AttnDims) -> AttnShape {
    AttnShape {
        n_tok: a.n_tok,
        num_heads: a.num_heads,
        num_kv_heads: a.num_kv_heads,
        head_dim: a.head_dim,
        block_size: a.block_size,
        window: a.window,
        scale: a.scale,
    }
}

impl Device for CudaDevice {
    type Buf = CudaSlice<f32>;
    type Idx = CudaSlice<i32>;
    type Ids = CudaSlice<u32>;
    type Weight = GpuWeight;
    type Scratch = CudaScratch;
    type Expert<'a> = CudaExpert<'a>;

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.g.stream().alloc_zeros(n)?)
    }

    fn zeros_idx(&self, n: usize) -> Result<CudaSlice<i32>> {
        Ok(self.g.stream().alloc_zeros(n)?)
    }

    fn scratch(&self, rows: usize, widest: usize, hidden: usize, expert_ffn: usize) -> Result<CudaScratch> {
        Ok(CudaScratch {
            bf16: self.g.stream().alloc_zeros((rows * widest).max(1))?,
            ffn: FfnScratch::new(&self.g, rows, hidden, expert_ffn)?,
        })
    }

    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.g.stream().clone_htod(v)?)
    }

    fn upload_idx(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        Ok(self.g.stream().clone_htod(v)?)
    }

    fn upload_ids(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        Ok(self.g.stream().clone_htod(v)?)
    }

    fn upload_weight(&self, w: &Weight) -> Result<GpuWeight> {
        Ok(GpuWeight::upload(&self.g, w)?)
    }

    fn upload_router(&self, w: &Weight) -> Result<GpuWeight> {
        let wide = Weight::from_f32(w.rows(), w.cols(), w.to_f32())?;
        Ok(GpuWeight::upload(&self.g, &wide)?)
    }

    fn cols(w: &GpuWeight) -> usize {
        w.cols()
    }

    fn write_idx(&self, v: &[i32], dst: &mut CudaSlice<i32>) -> Result<()> {
        if v.len() > dst.len() {
            return Err(ModelError::Input(format!("device index buffer holds {}, {} written", dst.len(), v.len())));
        }
        Ok(self.g.stream().memcpy_htod(v, dst)?)
    }

    fn write(&self, v: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        if v.len() > dst.len() {
            return Err(ModelError::Input(format!("device buffer holds {}, {} written", dst.len(), v.len())));
        }
        Ok(self.g.stream().memcpy_htod(v, dst)?)
    }

    fn read(&self, src: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        if out.len() > src.len() {
            return Err(ModelError::Input(format!("device buffer holds {}, {} read", src.len(), out.len())));
        }
        let s = self.g.stream();
        s.memcpy_dtoh(&src.slice(..out.len()), out)?;
        Ok(s.synchronize()?)
    }

    fn fill_zero(&self, b: &mut CudaSlice<f32>) -> Result<()> {
        Ok(self.g.stream().memset_zeros(b)?)
    }

    fn embedding(&self, table: &GpuWeight, ids: &CudaSlice<u32>, n: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        Ok(ops::embedding(&self.g, table, ids, n, out)?)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Ok(ops::rms_norm(&self.g, x, w, (rows, eps), out)?)
    }

    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &GpuWeight,
        s: &mut CudaScratch,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Ok(gemm::matmul_nt(&self.g, x, m, w, &mut s.bf16, out)?)
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        Ok(layer_ops::add_inplace(&self.g, x, y, n)?)
    }

    fn add_bias_rows(&self, x: &mut CudaSlice<f32>, b: &CudaSlice<f32>, rows: usize) -> Result<()> {
        Ok(layer_ops::add_bias_rows(&self.g, x, b, rows)?)
    }

    fn clamp(&self, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<()> {
        Ok(layer_ops::clamp(&self.g, x, n, c)?)
    }

    fn norm_heads(&self, x: &mut CudaSlice<f32>, w: &CudaSlice<f32>, h: Heads, eps: f32) -> Result<()> {
        Ok(layer_ops::rms_norm_segments(&self.g, x, w, segments(h), eps)?)
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        h: Heads,
        half: usize,
    ) -> Result<()> {
        Ok(layer_ops::rope_tables(&self.g, x, (cos, sin), segments(h), half)?)
    }

    fn kv_write(
        &self,
        qkv: &CudaSlice<f32>,
        a: AttnDims,
        slots: &CudaSlice<i32>,
        kc: &mut CudaSlice<f32>,
        vc: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = QkvRows { qkv, stride: a.qkv_width() };
        Ok(ops::kv_write(&self.g, &rows, shape(a), slots, (kc, vc))?)
    }

    fn attention(
        &self,
        qkv: &CudaSlice<f32>,
        a: AttnDims,
        idx: AttnIdx<'_, Self>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>),
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = QkvRows { qkv, stride: a.qkv_width() };
        let meta = AttnMeta { blocks: idx.blocks, block_off: idx.block_off, pos: idx.pos };
        Ok(ops::paged_attention(&self.g, &rows, shape(a), &meta, kv, out)?)
    }

    fn silu_mul(&self, gate_up: &CudaSlice<f32>, rows: usize, f: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        Ok(ops::silu_mul(&self.g, gate_up, (rows, f), out)?)
    }

    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        n: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Ok(ops::gather_rows(&self.g, x, &idx.slice(..n), (n, d), out)?)
    }

    fn sigmoid_gate_add(
        &self,
        y: &CudaSlice<f32>,
        g: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Ok(layer_ops::sigmoid_gate_add(&self.g, y, g, (rows, d), out)?)
    }

    fn expert_ffn(
        &self,
        x: &CudaSlice<f32>,
        group: Group<'_, Self>,
        e: CudaExpert<'_>,
        s: &mut CudaScratch,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        e.pool.wait_ready(&self.g, e.key)?;
        let views = e.pool.views(e.key)?;
        let (rows, weights) = (group.rows.slice(group.span.clone()), group.weights.slice(group.span.clone()));
        let tg = TokenGroup { rows: &rows, weights: &weights, len: group.span.len() };
        Ok(gemm::expert_ffn(&self.g, x, &tg, e.pool.matrices(&views), &mut s.ffn, out)?)
    }
}
