//! Matrix products on the device through cuBLAS, and the expert FFN over a
//! token group built from them.
//!
//! `out[m, n] = x[m, k] · w[n, k]ᵀ` as on the CPU ([`crate::matmul_nt`]):
//! row-major activations, weights in the checkpoint's `[out, in]` layout.
//! cuBLAS is column-major, so the call computes `outᵀ = w · xᵀ` with `w`
//! transposed (`op(A) = T`, `lda = k`), `xᵀ` as is (`ldb = k`), `ldc = n`.
//!
//! Precision: bf16 weights are multiplied with bf16 activations (rounded to
//! nearest even by `cast_f32_to_bf16`) and accumulated in f32 with f32
//! output (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`), as bf16 checkpoints are run
//! on GPUs elsewhere. The CPU path keeps f32 activations, so the two agree to
//! the activation rounding (about 3 significant digits), not bit for bit;
//! the tests compare against the CPU product of the rounded activations. f32
//! weights use a plain f32 product (no TF32).

use super::context::GpuContext;
use super::error::{check_len, i32_arg, CudaError};
use super::ops;
use crate::{Weight, WeightData};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

/// A weight matrix in device memory, in its checkpoint precision.
pub struct GpuWeight {
    rows: usize,
    cols: usize,
    data: GpuWeightData,
}

/// Device storage of a [`GpuWeight`].
pub enum GpuWeightData {
    /// 4 bytes per value.
    F32(CudaSlice<f32>),
    /// Raw bf16 bits, 2 bytes per value.
    Bf16(CudaSlice<u16>),
}

impl GpuWeight {
    /// Copies a host weight to the device (synchronously ordered on the
    /// compute stream).
    pub fn upload(g: &GpuContext, w: &Weight) -> Result<Self, CudaError> {
        let data = match w.data() {
            WeightData::F32(v) => GpuWeightData::F32(g.stream().clone_htod(v.as_slice())?),
            WeightData::Bf16(v) => GpuWeightData::Bf16(g.stream().clone_htod(v.as_slice())?),
            WeightData::Quant(q) => return Err(CudaError::Unsupported(q.format().name())),
        };
        Ok(Self { rows: w.rows(), cols: w.cols(), data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The device values.
    pub fn data(&self) -> &GpuWeightData {
        &self.data
    }
}

/// A bf16 `[rows, cols]` matrix somewhere in device memory (a [`GpuWeight`]
/// or part of an expert slot).
#[derive(Clone, Copy)]
pub struct Bf16Matrix<'a> {
    /// Raw bf16 bits, row-major.
    pub bits: &'a CudaView<'a, u16>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for a device weight of either precision.
/// `scratch` receives `x` rounded to bf16 when `w` is bf16 (at least `m * k`
/// values; unused for f32 weights).
pub fn matmul_nt(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    m: usize,
    w: &GpuWeight,
    scratch: &mut CudaSlice<u16>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    match &w.data {
        GpuWeightData::Bf16(bits) => {
            let view = bits.as_view();
            matmul_nt_bf16(g, x, m, Bf16Matrix { bits: &view, rows: w.rows, cols: w.cols }, scratch, out)
        }
        GpuWeightData::F32(v) => matmul_nt_f32(g, x, m, (v, w.rows, w.cols), out),
    }
}

/// `out[m, n] = bf16(x)[m, k] · w[n, k]ᵀ`, f32 accumulation and output.
pub fn matmul_nt_bf16(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    m: usize,
    w: Bf16Matrix<'_>,
    scratch: &mut CudaSlice<u16>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let (n, k) = (w.rows, w.cols);
    check_len("matmul input", m * k, x.len())?;
    check_len("matmul output", m * n, out.len())?;
    check_len("matmul weight", n * k, w.bits.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    ops::cast_bf16(g, x, m * k, scratch)?;
    let dims = Dims::new(m, n, k)?;
    let stream = g.stream();
    let (wp, _rw) = w.bits.device_ptr(stream);
    let (xp, _rx) = scratch.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    // SAFETY: the three device buffers were checked to hold n*k, m*k and m*n
    // values and stay borrowed (with their stream-sync guards) until after the
    // call is queued; the handle is bound to the compute stream they belong to;
    // alpha and beta are host f32 values read during the call (host pointer mode).
    unsafe { gemm_ex(g, dims, (wp, xp, op), blas_sys::cudaDataType_t::CUDA_R_16BF) }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for an f32 weight `(values, n, k)`.
fn matmul_nt_f32(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    m: usize,
    (w, n, k): (&CudaSlice<f32>, usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    check_len("matmul input", m * k, x.len())?;
    check_len("matmul output", m * n, out.len())?;
    check_len("matmul weight", n * k, w.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dims = Dims::new(m, n, k)?;
    let stream = g.stream();
    let (wp, _rw) = w.device_ptr(stream);
    let (xp, _rx) = x.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    // SAFETY: as in matmul_nt_bf16: sizes checked, buffers borrowed across the
    // queued call, handle bound to their stream.
    unsafe { gemm_ex(g, dims, (wp, xp, op), blas_sys::cudaDataType_t::CUDA_R_32F) }
}

#[derive(Clone, Copy)]
struct Dims {
    m: i32,
    n: i32,
    k: i32,
}

impl Dims {
    fn new(m: usize, n: usize, k: usize) -> Result<Self, CudaError> {
        Ok(Self { m: i32_arg("matmul rows", m)?, n: i32_arg("matmul features", n)?, k: i32_arg("matmul width", k)? })
    }
}

/// The column-major call behind both products: `outᵀ[n, m] = op(W)[n, k] · xᵀ[k, m]`.
///
/// # Safety
/// `w`, `x` and `out` must be device pointers to at least `n*k` values of
/// `ab_type`, `m*k` values of `ab_type` and `m*n` f32 values, valid until the
/// queued product has run.
unsafe fn gemm_ex(
    g: &GpuContext,
    d: Dims,
    (w, x, out): (u64, u64, u64),
    ab_type: blas_sys::cudaDataType_t,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    blas::gemm_ex(
        *g.blas().handle(),
        blas_sys::cublasOperation_t::CUBLAS_OP_T,
        blas_sys::cublasOperation_t::CUBLAS_OP_N,
        d.n,
        d.m,
        d.k,
        (&alpha) as *const f32 as *const _,
        w as *const _,
        ab_type,
        d.k,
        x as *const _,
        ab_type,
        d.k,
        (&beta) as *const f32 as *const _,
        out as *mut _,
        blas_sys::cudaDataType_t::CUDA_R_32F,
        d.n,
        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )?;
    Ok(())
}

/// One expert's token group: which rows of the step's activations it takes
/// and the router weight of each.
pub struct TokenGroup<'a> {
    /// Token rows (indices into the step's `[t, hidden]` activations), distinct.
    pub rows: &'a CudaView<'a, i32>,
    /// Router weight per row.
    pub weights: &'a CudaView<'a, f32>,
    /// Rows in the group.
    pub len: usize,
}

/// One expert's SwiGLU FFN in bf16: `gate_up` is `[2 * ffn, hidden]`, `down`
/// is `[hidden, ffn]` (moe-model's `ExpertWeights`).
#[derive(Clone, Copy)]
pub struct ExpertMatrices<'a> {
    /// Gate and up projections, stacked.
    pub gate_up: Bf16Matrix<'a>,
    /// Down projection.
    pub down: Bf16Matrix<'a>,
}

/// Device work buffers of [`expert_ffn`], grown as needed.
pub struct FfnScratch {
    x: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    y: CudaSlice<f32>,
    bf16: CudaSlice<u16>,
}

impl FfnScratch {
    /// Buffers for groups of up to `rows` tokens of width `hidden` through experts `ffn` wide.
    pub fn new(g: &GpuContext, rows: usize, hidden: usize, ffn: usize) -> Result<Self, CudaError> {
        let s = g.stream();
        Ok(Self {
            x: s.alloc_zeros(rows * hidden)?,
            gate_up: s.alloc_zeros(rows * 2 * ffn)?,
            act: s.alloc_zeros(rows * ffn)?,
            y: s.alloc_zeros(rows * hidden)?,
            bf16: s.alloc_zeros(rows * hidden.max(ffn))?,
        })
    }
}

/// Runs one expert over its token group and adds the weighted outputs into
/// `out` (`[t, hidden]`), like moe-model's per-expert step: gather the rows,
/// `silu(gate) * up`, down projection, `out[row] += weight * y`.
pub fn expert_ffn(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    group: &TokenGroup<'_>,
    w: ExpertMatrices<'_>,
    s: &mut FfnScratch,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let (hidden, ffn, n) = (w.gate_up.cols, w.down.cols, group.len);
    check_len("expert scratch rows", n * hidden, s.x.len())?;
    check_len("expert scratch rows", n * ffn, s.act.len())?;
    if n == 0 {
        return Ok(());
    }
    ops::gather_rows(g, x, group.rows, (n, hidden), &mut s.x)?;
    matmul_nt_bf16(g, &s.x, n, w.gate_up, &mut s.bf16, &mut s.gate_up)?;
    ops::silu_mul(g, &s.gate_up, (n, ffn), &mut s.act)?;
    matmul_nt_bf16(g, &s.act, n, w.down, &mut s.bf16, &mut s.y)?;
    ops::scatter_add_weighted(g, &s.y, group, hidden, out)
}
