//! The forward pass over a device's buffers: [`DeviceModel`] runs a step as
//! a sequence of [`Device`] operations (products, norms, rotary embedding,
//! the paged KV cache, expert products over token groups), with routing on
//! the host by the CPU path's own rule.
//!
//! Two devices implement it: the GPU (`moe_model::gpu::CudaDevice`, feature
//! `cuda`) and [`host::HostDevice`], the same operations on host memory with
//! the CPU kernels. The host device is the GPU pass's reference: every step
//! of the orchestration (buffers, strides, head segments, block tables,
//! token groups, the order of operations) runs in the tests on any machine
//! and must give the CPU forward pass's logits, so what is left to check on
//! a GPU is the kernels themselves (`kernels/tests/cuda_vs_cpu.rs`).

pub mod host;
mod pass;
mod tier;
mod weights;

pub use pass::DeviceModel;
pub use tier::DeviceExperts;

use crate::Result;
use moe_kernels::Weight;
use std::ops::Range;

/// Where heads (or any equal segments) sit in each row of a `[n_tok,
/// stride]` buffer.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Rows (tokens).
    pub n_tok: usize,
    /// Floats per row.
    pub stride: usize,
    /// Column of the first head.
    pub col: usize,
    /// Floats per head.
    pub width: usize,
    /// Heads, contiguous from `col`.
    pub count: usize,
}

/// One attention layer over the paged cache.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    /// Tokens in the step.
    pub n_tok: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// Multiplies the query-key dot products.
    pub scale: f32,
}

impl AttnDims {
    /// Floats per fused `[q | k | v]` row.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

/// A step's per-token addressing on the device ([`crate::StepLayout`]).
pub struct AttnIdx<'a, D: Device + ?Sized> {
    /// Every chunk's block table, concatenated.
    pub blocks: &'a D::Idx,
    /// Per token: where its table starts in `blocks`.
    pub block_off: &'a D::Idx,
    /// Per token: its position.
    pub pos: &'a D::Idx,
}

/// One expert's token group: `rows[span]` are token rows of the step's
/// activations, `weights[span]` their router weights.
pub struct Group<'a, D: Device + ?Sized> {
    /// Token rows of every group of the layer.
    pub rows: &'a D::Idx,
    /// Their router weights.
    pub weights: &'a D::Buf,
    /// This group's part.
    pub span: Range<usize>,
}

/// The operations the forward pass runs on a device. Buffers may be longer
/// than the shape an operation is given (they are sized for the largest
/// step); every operation reads and writes only its shape's part. Nothing
/// waits unless it says so.
#[allow(missing_docs)]
pub trait Device {
    /// An f32 buffer.
    type Buf;
    /// An i32 buffer.
    type Idx;
    /// A u32 buffer (token ids).
    type Ids;
    /// A weight matrix.
    type Weight;
    /// Work space of products for up to a step's rows.
    type Scratch;
    /// An expert's matrices, as the expert tier hands them out.
    type Expert<'a>
    where
        Self: 'a;

    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn zeros_idx(&self, n: usize) -> Result<Self::Idx>;
    /// Scratch for `rows` rows of products up to `widest` inputs, and expert
    /// products of `hidden` x `expert_ffn`.
    fn scratch(&self, rows: usize, widest: usize, hidden: usize, expert_ffn: usize) -> Result<Self::Scratch>;
    fn upload(&self, v: &[f32]) -> Result<Self::Buf>;
    fn upload_idx(&self, v: &[i32]) -> Result<Self::Idx>;
    fn upload_ids(&self, v: &[u32]) -> Result<Self::Ids>;
    /// A weight in its checkpoint precision (an error for formats the device has no product for).
    fn upload_weight(&self, w: &Weight) -> Result<Self::Weight>;
    /// A router's weight: products whose results pick experts. The GPU
    /// widens bf16 routers to f32 (an f32 product, no bf16 rounding of the
    /// activations), so routing does not flip on that rounding; the plan
    /// counts routers at 4 bytes a value.
    fn upload_router(&self, w: &Weight) -> Result<Self::Weight> {
        self.upload_weight(w)
    }
    /// Input features of a weight.
    fn cols(w: &Self::Weight) -> usize;
    /// `dst[..v.len()] = v`.
    fn write_idx(&self, v: &[i32], dst: &mut Self::Idx) -> Result<()>;
    fn write(&self, v: &[f32], dst: &mut Self::Buf) -> Result<()>;
    /// `out = src[..out.len()]`, after everything queued before (waits).
    fn read(&self, src: &Self::Buf, out: &mut [f32]) -> Result<()>;
    fn fill_zero(&self, b: &mut Self::Buf) -> Result<()>;
    /// Rows `ids[..n]` of `table`, as f32.
    fn embedding(&self, table: &Self::Weight, ids: &Self::Ids, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// RMSNorm of `rows` rows of width `w`'s length.
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
    fn matmul(
        &self,
        x: &Self::Buf,
        m: usize,
        w: &Self::Weight,
        s: &mut Self::Scratch,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `x[..n] += y[..n]`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()>;
    /// Each of `rows` rows of `x` gets `b` added.
    fn add_bias_rows(&self, x: &mut Self::Buf, b: &Self::Buf, rows: usize) -> Result<()>;
    /// `x[..n]` clamped to `[-c, c]`.
    fn clamp(&self, x: &mut Self::Buf, n: usize, c: f32) -> Result<()>;
    /// RMSNorm in place of every head, each with the weights `w`.
    fn norm_heads(&self, x: &mut Self::Buf, w: &Self::Buf, h: Heads, eps: f32) -> Result<()>;
    /// Rotate-half rotary embedding of the first `2 * half` values of every
    /// head, token `t` by `cos/sin[t * half..]`.
    fn rope(&self, x: &mut Self::Buf, cos: &Self::Buf, sin: &Self::Buf, h: Heads, half: usize) -> Result<()>;
    /// Each token's key and value (from its `[q | k | v]` row) into cache row `slots[t]`.
    fn kv_write(
        &self,
        qkv: &Self::Buf,
        a: AttnDims,
        slots: &Self::Idx,
        kc: &mut Self::Buf,
        vc: &mut Self::Buf,
    ) -> Result<()>;
    /// Causal attention of every token over its sequence's cached rows.
    fn attention(
        &self,
        qkv: &Self::Buf,
        a: AttnDims,
        idx: AttnIdx<'_, Self>,
        kv: (&Self::Buf, &Self::Buf),
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[r] = silu(gate) * up` of `rows` rows of `[gate (f) | up (f)]`.
    fn silu_mul(&self, gate_up: &Self::Buf, rows: usize, f: usize, out: &mut Self::Buf) -> Result<()>;
    /// `out[r] = x[idx[r]]` for `n` rows of width `d`.
    fn gather_rows(&self, x: &Self::Buf, idx: &Self::Idx, n: usize, d: usize, out: &mut Self::Buf) -> Result<()>;
    /// `out[r] += sigmoid(g[r]) * y[r]` for `rows` rows of width `d`.
    fn sigmoid_gate_add(&self, y: &Self::Buf, g: &Self::Buf, rows: usize, d: usize, out: &mut Self::Buf) -> Result<()>;
    /// One expert over its token group, weighted outputs added into `out`.
    fn expert_ffn(
        &self,
        x: &Self::Buf,
        group: Group<'_, Self>,
        expert: Self::Expert<'_>,
        s: &mut Self::Scratch,
        out: &mut Self::Buf,
    ) -> Result<()>;
}
