//! Launch wrappers of the small per-layer kernels the model's forward pass
//! on the GPU needs besides [`super::ops`]: residual and bias adds, the
//! query/key norms, rotary embedding from host-computed tables, clipping and
//! the gated shared-expert add. Same conventions as [`super::ops`]: every
//! buffer is device memory, lengths are checked before launching, nothing
//! waits.

use super::context::GpuContext;
use super::error::{check_len, i32_arg, CudaError};
use super::ops::{elems_cfg, rows_cfg, ROW_THREADS};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// `x[i] += y[i]` for the first `n` values ([`crate::ops::add_inplace`]).
pub fn add_inplace(g: &GpuContext, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
    check_len("add target", n, x.len())?;
    check_len("add operand", n, y.len())?;
    if n == 0 {
        return Ok(());
    }
    let nn = i32_arg("values", n)?;
    // SAFETY: the kernel reads and writes n values of each buffer (checked).
    unsafe { g.stream().launch_builder(g.func("add_inplace")).arg(x).arg(y).arg(&nn).launch(elems_cfg(n))? };
    Ok(())
}

/// Adds the bias `b` (width `b.len()`) to each of `rows` rows of `x`.
pub fn add_bias_rows(g: &GpuContext, x: &mut CudaSlice<f32>, b: &CudaSlice<f32>, rows: usize) -> Result<(), CudaError> {
    let d = b.len();
    check_len("bias target", rows * d, x.len())?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (r, dd) = (i32_arg("rows", rows)?, i32_arg("width", d)?);
    i32_arg("values", rows * d)?;
    // SAFETY: the kernel writes rows*d values of x and reads d of b (checked).
    unsafe {
        g.stream().launch_builder(g.func("add_bias_rows")).arg(x).arg(b).arg(&r).arg(&dd).launch(elems_cfg(rows * d))?
    };
    Ok(())
}

/// Clamps the first `n` values of `x` to `[-c, c]`.
pub fn clamp(g: &GpuContext, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<(), CudaError> {
    check_len("clamp target", n, x.len())?;
    if n == 0 {
        return Ok(());
    }
    let nn = i32_arg("values", n)?;
    // SAFETY: the kernel reads and writes n values of x (checked).
    unsafe { g.stream().launch_builder(g.func("clamp_inplace")).arg(x).arg(&nn).arg(&c).launch(elems_cfg(n))? };
    Ok(())
}

/// Where segments (heads) sit in each row of a `[n_tok, stride]` buffer.
#[derive(Clone, Copy, Debug)]
pub struct Segments {
    /// Rows (tokens).
    pub n_tok: usize,
    /// Floats per row.
    pub stride: usize,
    /// Column of the first segment.
    pub col: usize,
    /// Floats per segment (a head's width, or the whole query).
    pub width: usize,
    /// Consecutive segments per row.
    pub count: usize,
}

impl Segments {
    fn check(&self, what: &'static str, len: usize) -> Result<(), CudaError> {
        if self.col + self.width * self.count > self.stride {
            return Err(CudaError::Shape { what, expected: self.col + self.width * self.count, got: self.stride });
        }
        check_len(what, self.n_tok * self.stride, len)
    }
}

/// RMSNorm in place of every segment, each with the weights `w`
/// (`s.width` values): per-head or full-width query and key norms.
pub fn rms_norm_segments(
    g: &GpuContext,
    x: &mut CudaSlice<f32>,
    w: &CudaSlice<f32>,
    s: Segments,
    eps: f32,
) -> Result<(), CudaError> {
    s.check("norm rows", x.len())?;
    check_len("norm weights", s.width, w.len())?;
    if s.n_tok == 0 || s.count == 0 || s.width == 0 {
        return Ok(());
    }
    let a = [
        i32_arg("tokens", s.n_tok)?,
        i32_arg("stride", s.stride)?,
        i32_arg("column", s.col)?,
        i32_arg("segment", s.width)?,
        i32_arg("segments", s.count)?,
    ];
    let cfg = LaunchConfig {
        grid_dim: (a[0] as u32, a[4] as u32, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: ROW_THREADS * 4,
    };
    // SAFETY: block (t, s) normalises `width` floats of row t inside the
    // checked row layout; shared memory is blockDim floats as block_sum expects.
    unsafe {
        g.stream()
            .launch_builder(g.func("rms_norm_segments"))
            .arg(x)
            .arg(w)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(&a[4])
            .arg(&eps)
            .launch(cfg)?;
    }
    Ok(())
}

/// Rotary embedding in place from per-token tables (`cos`, `sin`: `[n_tok,
/// half]`, computed on the host by moe-model's `Rope::angles`): the first
/// `2 * half` floats of each segment are rotated (rotate-half pairs).
pub fn rope_tables(
    g: &GpuContext,
    x: &mut CudaSlice<f32>,
    (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
    s: Segments,
    half: usize,
) -> Result<(), CudaError> {
    s.check("rope rows", x.len())?;
    check_len("rope cosines", s.n_tok * half, cos.len())?;
    check_len("rope sines", s.n_tok * half, sin.len())?;
    if 2 * half > s.width {
        return Err(CudaError::Shape { what: "rotary width within a head", expected: 2 * half, got: s.width });
    }
    if s.n_tok == 0 || s.count == 0 || half == 0 {
        return Ok(());
    }
    let a = [
        i32_arg("tokens", s.n_tok)?,
        i32_arg("stride", s.stride)?,
        i32_arg("column", s.col)?,
        i32_arg("heads", s.count)?,
        i32_arg("head stride", s.width)?,
        i32_arg("half", half)?,
    ];
    let cfg = LaunchConfig { grid_dim: (a[0] as u32, a[3] as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: block (t, h) rotates 2*half floats of head h of row t, inside
    // the checked layout, reading `half` cosines and sines of row t (checked).
    unsafe {
        g.stream()
            .launch_builder(g.func("rope_tables"))
            .arg(x)
            .arg(cos)
            .arg(sin)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(&a[4])
            .arg(&a[5])
            .launch(cfg)?;
    }
    Ok(())
}

/// `out[r] += sigmoid(gate[r]) * y[r]` for `rows` rows of width `d`.
pub fn sigmoid_gate_add(
    g: &GpuContext,
    y: &CudaSlice<f32>,
    gate: &CudaSlice<f32>,
    (rows, d): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    check_len("gated rows", rows * d, y.len())?;
    check_len("gate logits", rows, gate.len())?;
    check_len("gated output", rows * d, out.len())?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (r, dd) = (i32_arg("rows", rows)?, i32_arg("width", d)?);
    // SAFETY: block r reads row r of y and gate[r] and adds into row r of out (checked).
    unsafe {
        g.stream()
            .launch_builder(g.func("sigmoid_gate_add"))
            .arg(y)
            .arg(gate)
            .arg(out)
            .arg(&r)
            .arg(&dd)
            .launch(rows_cfg(rows, 0)?)?;
    }
    Ok(())
}
