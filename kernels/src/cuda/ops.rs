//! Launch wrappers of the custom kernels in `kernels.cu`. Each checks its
//! buffers' lengths against the shape it is given, then queues the kernel on
//! the context's compute stream (nothing waits; read results back with
//! `GpuContext::stream().clone_dtoh`, which orders after them).
//!
//! Every buffer argument is device memory. Shapes are row-major; each
//! wrapper names the CPU function it mirrors.

use super::context::GpuContext;
use super::error::{check_len, i32_arg, CudaError};
use super::gemm::{GpuWeight, GpuWeightData, TokenGroup};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

/// Threads per block of the row-wise kernels (a power of two).
pub(super) const ROW_THREADS: u32 = 256;
/// Threads per block of the attention kernel (its `d <= 4 * ATTN_THREADS`).
const ATTN_THREADS: u32 = 128;

pub(super) fn rows_cfg(rows: usize, shared_floats: u32) -> Result<LaunchConfig, CudaError> {
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(rows).map_err(|_| CudaError::TooLarge("rows"))?, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: shared_floats * 4,
    })
}

pub(super) fn elems_cfg(n: usize) -> LaunchConfig {
    // grid-stride loops inside the kernels cover anything beyond the grid
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Embedding rows of `ids` (`n_tok` token ids, each `< table.rows()`) into
/// `out` (`[n_tok, table.cols()]`), widened to f32 (`Weight::row_to_f32`).
/// Ids are not range-checked on the device: the caller validates tokens.
pub fn embedding(
    g: &GpuContext,
    table: &GpuWeight,
    ids: &CudaSlice<u32>,
    n_tok: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let h = table.cols();
    check_len("embedding ids", n_tok, ids.len())?;
    check_len("embedding output", n_tok * h, out.len())?;
    if n_tok == 0 {
        return Ok(());
    }
    let (n, hd) = (i32_arg("tokens", n_tok)?, i32_arg("hidden", h)?);
    let cfg = rows_cfg(n_tok, 0)?;
    let s = g.stream();
    // SAFETY: the kernel reads n_tok ids and n_tok rows of the table (ids
    // below its row count, the caller's contract) and writes n_tok*h floats,
    // all within the buffers checked above; argument types match the kernel's.
    unsafe {
        match table.data() {
            GpuWeightData::F32(t) => {
                s.launch_builder(g.func("embedding_f32")).arg(t).arg(ids).arg(out).arg(&n).arg(&hd).launch(cfg)?
            }
            GpuWeightData::Bf16(t) => {
                s.launch_builder(g.func("embedding_bf16")).arg(t).arg(ids).arg(out).arg(&n).arg(&hd).launch(cfg)?
            }
        };
    }
    Ok(())
}

/// RMSNorm of `rows` rows of width `w.len()` ([`crate::ops::rms_norm`]).
pub fn rms_norm(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    (rows, eps): (usize, f32),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let d = w.len();
    check_len("rms_norm input", rows * d, x.len())?;
    check_len("rms_norm output", rows * d, out.len())?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (r, dd) = (i32_arg("rows", rows)?, i32_arg("width", d)?);
    let cfg = rows_cfg(rows, ROW_THREADS)?;
    // SAFETY: one block per row reads d floats of x and w and writes d floats
    // of out, within the lengths checked above; shared memory is blockDim floats
    // as the kernel expects.
    unsafe {
        g.stream().launch_builder(g.func("rms_norm")).arg(x).arg(w).arg(out).arg(&r).arg(&dd).arg(&eps).launch(cfg)?;
    }
    Ok(())
}

/// Where the heads to rotate sit in each row of a buffer.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    /// Rows (tokens).
    pub n_tok: usize,
    /// Floats per row.
    pub stride: usize,
    /// Column of the first head.
    pub col: usize,
    /// Heads to rotate, contiguous from `col`.
    pub n_heads: usize,
    /// Half the head width (`inv_freq.len()`).
    pub half: usize,
}

/// Rotary embedding in place ([`crate::ops::rope_rotate_half`]), angles
/// computed on the device from each token's position (`pos`, `n_tok`
/// values) and the inverse frequencies (`half` values) as moe-model's
/// `Rope::angles` computes them.
pub fn rope(
    g: &GpuContext,
    x: &mut CudaSlice<f32>,
    pos: &CudaSlice<i32>,
    inv_freq: &CudaSlice<f32>,
    s: RopeShape,
) -> Result<(), CudaError> {
    check_len("rope positions", s.n_tok, pos.len())?;
    check_len("rope frequencies", s.half, inv_freq.len())?;
    if s.col + s.n_heads * 2 * s.half > s.stride {
        return Err(CudaError::Shape { what: "rope heads within a row", expected: s.stride, got: s.col });
    }
    check_len("rope input", s.n_tok * s.stride, x.len())?;
    if s.n_tok == 0 || s.n_heads == 0 || s.half == 0 {
        return Ok(());
    }
    let args = [
        i32_arg("tokens", s.n_tok)?,
        i32_arg("stride", s.stride)?,
        i32_arg("column", s.col)?,
        i32_arg("heads", s.n_heads)?,
        i32_arg("half", s.half)?,
    ];
    let cfg = LaunchConfig {
        grid_dim: (args[0] as u32, args[3] as u32, 1),
        block_dim: ((s.half as u32).min(ROW_THREADS), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: block (t, h) touches the 2*half floats of head h in row t,
    // inside the row (checked) and the buffer (checked); pos and inv_freq are
    // read within their checked lengths.
    unsafe {
        g.stream()
            .launch_builder(g.func("rope_rotate_half"))
            .arg(x)
            .arg(pos)
            .arg(inv_freq)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&args[3])
            .arg(&args[4])
            .launch(cfg)?;
    }
    Ok(())
}

/// `out[r] = silu(gate[r]) * up[r]` for `rows` rows of `gate_up` laid out
/// `[gate (i) | up (i)]` ([`crate::ops::silu_mul`]).
pub fn silu_mul(
    g: &GpuContext,
    gate_up: &CudaSlice<f32>,
    (rows, i): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    check_len("silu_mul input", rows * 2 * i, gate_up.len())?;
    check_len("silu_mul output", rows * i, out.len())?;
    if rows * i == 0 {
        return Ok(());
    }
    let (r, ii) = (i32_arg("rows", rows)?, i32_arg("width", i)?);
    // SAFETY: grid-stride over rows*i outputs, each reading two inputs of its
    // row; all within the checked lengths.
    unsafe {
        g.stream()
            .launch_builder(g.func("silu_mul"))
            .arg(gate_up)
            .arg(out)
            .arg(&r)
            .arg(&ii)
            .launch(elems_cfg(rows * i))?;
    }
    Ok(())
}

/// How router logits become expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// Independent sigmoids (DeepSeek-V3 style).
    Sigmoid,
}

/// Routing parameters of one MoE layer.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// Experts per token.
    pub k: usize,
    /// Softmax or sigmoid scores.
    pub scoring: Scoring,
    /// Renormalise the chosen scores to sum to one.
    pub renorm: bool,
}

/// Routing on the device: for each of `n_tok` rows of `n_exp` router logits,
/// the top `r.k` expert ids (largest score first, ties to the lower id) and
/// their weights, into `ids`/`weights` (`[n_tok, k]`). Mirrors moe-model's
/// routing step ([`crate::ops::softmax_inplace`], [`crate::ops::top_k`]).
pub fn route_topk(
    g: &GpuContext,
    logits: &CudaSlice<f32>,
    (n_tok, n_exp): (usize, usize),
    r: Route,
    (ids, weights): (&mut CudaSlice<i32>, &mut CudaSlice<f32>),
) -> Result<(), CudaError> {
    check_len("router logits", n_tok * n_exp, logits.len())?;
    check_len("routed ids", n_tok * r.k, ids.len())?;
    check_len("routed weights", n_tok * r.k, weights.len())?;
    if r.k > n_exp {
        return Err(CudaError::Shape { what: "experts to choose from", expected: r.k, got: n_exp });
    }
    if n_tok == 0 || r.k == 0 {
        return Ok(());
    }
    let a = [
        i32_arg("tokens", n_tok)?,
        i32_arg("experts", n_exp)?,
        i32_arg("top_k", r.k)?,
        (r.scoring == Scoring::Sigmoid) as i32,
        r.renorm as i32,
    ];
    let threads = 128u32;
    let cfg = LaunchConfig {
        grid_dim: ((n_tok as u32).div_ceil(threads), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: thread t reads row t of the logits and writes k ids and weights
    // of row t, for t < n_tok; all within the checked lengths.
    unsafe {
        g.stream()
            .launch_builder(g.func("route_topk"))
            .arg(logits)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(&a[4])
            .arg(ids)
            .arg(weights)
            .launch(cfg)?;
    }
    Ok(())
}

/// Index of the largest value of each of `rows` rows of width `n`, the first
/// on ties (moe-model's `sampling::argmax`), into `out` (`rows` values).
pub fn argmax(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    (rows, n): (usize, usize),
    out: &mut CudaSlice<u32>,
) -> Result<(), CudaError> {
    check_len("argmax input", rows * n, x.len())?;
    check_len("argmax output", rows, out.len())?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let (r, nn) = (i32_arg("rows", rows)?, i32_arg("width", n)?);
    let cfg = rows_cfg(rows, 2 * ROW_THREADS)?;
    // SAFETY: one block per row reads n floats and writes one index; shared
    // memory holds blockDim floats and blockDim ints as the kernel expects.
    unsafe {
        g.stream().launch_builder(g.func("argmax_rows")).arg(x).arg(&r).arg(&nn).arg(out).launch(cfg)?;
    }
    Ok(())
}

/// The first `n` values of `x` rounded to bf16 (nearest even) into `out`.
pub fn cast_bf16(g: &GpuContext, x: &CudaSlice<f32>, n: usize, out: &mut CudaSlice<u16>) -> Result<(), CudaError> {
    check_len("cast input", n, x.len())?;
    check_len("cast output", n, out.len())?;
    if n == 0 {
        return Ok(());
    }
    let nn = i32_arg("elements", n)?;
    // SAFETY: grid-stride over n elements of both checked buffers.
    unsafe {
        g.stream().launch_builder(g.func("cast_f32_to_bf16")).arg(x).arg(out).arg(&nn).launch(elems_cfg(n))?;
    }
    Ok(())
}

/// `out[r] = x[idx[r]]` for `n` rows of width `d` (an expert's token group).
/// Indices are not range-checked on the device: they come from routing.
pub fn gather_rows(
    g: &GpuContext,
    x: &CudaSlice<f32>,
    idx: &CudaView<'_, i32>,
    (n, d): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    check_len("gather indices", n, idx.len())?;
    check_len("gather output", n * d, out.len())?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    let (nn, dd) = (i32_arg("rows", n)?, i32_arg("width", d)?);
    // SAFETY: block r reads row idx[r] of x (a valid token row by the caller's
    // contract) and writes row r of out, within its checked length.
    unsafe {
        g.stream()
            .launch_builder(g.func("gather_rows"))
            .arg(x)
            .arg(idx)
            .arg(out)
            .arg(&nn)
            .arg(&dd)
            .launch(rows_cfg(n, 0)?)?;
    }
    Ok(())
}

/// `out[group.rows[r]] += group.weights[r] * y[r]` for the group's rows of
/// width `d` (rows distinct within a group).
pub fn scatter_add_weighted(
    g: &GpuContext,
    y: &CudaSlice<f32>,
    group: &TokenGroup<'_>,
    d: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let n = group.len;
    check_len("scatter rows", n * d, y.len())?;
    check_len("scatter indices", n, group.rows.len())?;
    check_len("scatter weights", n, group.weights.len())?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    let (nn, dd) = (i32_arg("rows", n)?, i32_arg("width", d)?);
    // SAFETY: block r reads row r of y and adds into row rows[r] of out (a
    // valid token row by the caller's contract); rows are distinct, so no two
    // blocks write the same element.
    unsafe {
        g.stream()
            .launch_builder(g.func("scatter_add_weighted"))
            .arg(y)
            .arg(group.rows)
            .arg(group.weights)
            .arg(out)
            .arg(&nn)
            .arg(&dd)
            .launch(rows_cfg(n, 0)?)?;
    }
    Ok(())
}

/// Shape of one attention layer over the paged cache.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Tokens in the step.
    pub n_tok: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Head width (at most 512).
    pub head_dim: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// Multiplies the query-key dot products (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

impl AttnShape {
    /// Floats per cache row (`num_kv_heads * head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Per-token addressing of one step: each token's position and where its
/// sequence's block table starts in the flat `blocks` array.
pub struct AttnMeta<'a> {
    /// Block ids of every sequence of the step, concatenated.
    pub blocks: &'a CudaSlice<i32>,
    /// Per token: offset of its sequence's table in `blocks`.
    pub block_off: &'a CudaSlice<i32>,
    /// Per token: its position in its sequence.
    pub pos: &'a CudaSlice<i32>,
}

/// A step's fused `[q | k | v]` rows (`stride` floats each, heads at columns
/// 0, `q_width` and `q_width + kv_width`).
pub struct QkvRows<'a> {
    /// The rows.
    pub qkv: &'a CudaSlice<f32>,
    /// Floats per row.
    pub stride: usize,
}

/// Writes each token's key and value from its qkv row into cache row
/// `slots[t]` of `kc`/`vc` (moe-model's `KvCache::write`).
pub fn kv_write(
    g: &GpuContext,
    rows: &QkvRows<'_>,
    s: AttnShape,
    slots: &CudaSlice<i32>,
    (kc, vc): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
) -> Result<(), CudaError> {
    let (qw, kvw) = (s.num_heads * s.head_dim, s.kv_width());
    check_len("qkv row width", qw + 2 * kvw, rows.stride)?;
    check_len("qkv rows", s.n_tok * rows.stride, rows.qkv.len())?;
    check_len("kv slots", s.n_tok, slots.len())?;
    if kc.len() != vc.len() || kc.len() % kvw.max(1) != 0 {
        return Err(CudaError::Shape { what: "value cache", expected: kc.len(), got: vc.len() });
    }
    if s.n_tok == 0 {
        return Ok(());
    }
    let a = [
        i32_arg("stride", rows.stride)?,
        i32_arg("k column", qw)?,
        i32_arg("v column", qw + kvw)?,
        i32_arg("kv width", kvw)?,
        i32_arg("tokens", s.n_tok)?,
    ];
    // SAFETY: block t reads 2*kvw floats of qkv row t and writes cache row
    // slots[t]; slots come from the caller's block tables, which address rows
    // inside the cache (`num_blocks * block_size` rows, the caller's contract).
    unsafe {
        g.stream()
            .launch_builder(g.func("kv_write"))
            .arg(rows.qkv)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(slots)
            .arg(kc)
            .arg(vc)
            .arg(&a[4])
            .launch(rows_cfg(s.n_tok, 0)?)?;
    }
    Ok(())
}

/// Causal attention over the paged cache for every token of the step
/// (prefill and decode alike; moe-model's `Model::attention` after the cache
/// write): queries from `rows` (heads at column 0), keys and values from
/// `kc`/`vc`, output `[n_tok, num_heads * head_dim]`.
pub fn paged_attention(
    g: &GpuContext,
    rows: &QkvRows<'_>,
    s: AttnShape,
    meta: &AttnMeta<'_>,
    (kc, vc): (&CudaSlice<f32>, &CudaSlice<f32>),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let (d, nh, nkv) = (s.head_dim, s.num_heads, s.num_kv_heads);
    if nkv == 0 || nh % nkv != 0 || d == 0 || d > 4 * ATTN_THREADS as usize || s.block_size == 0 {
        return Err(CudaError::Shape { what: "attention heads (nh % nkv == 0, 0 < d <= 512)", expected: nh, got: nkv });
    }
    check_len("qkv row width", nh * d, rows.stride)?;
    check_len("qkv rows", s.n_tok * rows.stride, rows.qkv.len())?;
    check_len("token positions", s.n_tok, meta.pos.len())?;
    check_len("token block offsets", s.n_tok, meta.block_off.len())?;
    check_len("attention output", s.n_tok * nh * d, out.len())?;
    check_len("value cache", kc.len(), vc.len())?;
    if s.n_tok == 0 {
        return Ok(());
    }
    let a = [
        i32_arg("stride", rows.stride)?,
        i32_arg("block size", s.block_size)?,
        i32_arg("heads", nh)?,
        i32_arg("kv heads", nkv)?,
        i32_arg("head dim", d)?,
        i32_arg("window", s.window.unwrap_or(0))?,
        i32_arg("tokens", s.n_tok)?,
    ];
    let scale = s.scale;
    let cfg = LaunchConfig {
        grid_dim: (a[6] as u32, a[2] as u32, 1),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: (d as u32 + 3 * ATTN_THREADS) * 4,
    };
    // SAFETY: block (t, h) reads head h of query row t, the cache rows of
    // positions lo..=pos[t] through the token's block table (block ids and
    // positions come from the caller's block tables, which cover every
    // position and address rows inside the cache: the caller's contract), and
    // writes head h of output row t (checked). Shared memory matches the
    // kernel's layout: d + 2*blockDim floats and blockDim ints.
    unsafe {
        g.stream()
            .launch_builder(g.func("paged_attention"))
            .arg(rows.qkv)
            .arg(&a[0])
            .arg(kc)
            .arg(vc)
            .arg(meta.blocks)
            .arg(meta.block_off)
            .arg(meta.pos)
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(&a[4])
            .arg(&a[5])
            .arg(&scale)
            .arg(out)
            .arg(&a[6])
            .launch(cfg)?;
    }
    Ok(())
}
