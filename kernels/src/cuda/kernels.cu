// Custom kernels of the CUDA backend, compiled at run time by NVRTC
// (moe_kernels::cuda::GpuContext::new). No headers: bf16 values travel as raw
// 16-bit patterns (unsigned short) and are widened exactly as the CPU kernels
// widen them. Every kernel mirrors a CPU function named in its comment; shapes
// are row-major. Block sizes: reductions assume blockDim.x is a power of two
// no larger than 1024 (the Rust wrappers launch 256 or 128).

// No headers under NVRTC: math.h's INFINITY is not defined.
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// Round to nearest even, NaN kept quiet (as half::bf16::from_f32).
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Sum of `v` over the block; every thread gets the result. `sh` holds blockDim.x floats.
__device__ float block_sum(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Maximum of `v` over the block; every thread gets the result.
__device__ float block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

// Embedding gather (Weight::row_to_f32 of the embedding table).
// grid: n_tok blocks. table [vocab, hidden]; ids [n_tok]; out [n_tok, hidden].
extern "C" __global__ void embedding_f32(const float* table, const unsigned int* ids, float* out, int n_tok,
                                         int hidden) {
    int t = blockIdx.x;
    if (t >= n_tok) return;
    const float* row = table + (size_t)ids[t] * hidden;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) out[(size_t)t * hidden + j] = row[j];
}

extern "C" __global__ void embedding_bf16(const unsigned short* table, const unsigned int* ids, float* out,
                                          int n_tok, int hidden) {
    int t = blockIdx.x;
    if (t >= n_tok) return;
    const unsigned short* row = table + (size_t)ids[t] * hidden;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) out[(size_t)t * hidden + j] = bf16_to_f32(row[j]);
}

// RMSNorm (ops::rms_norm): out = x / sqrt(mean(x^2) + eps) * w. grid: rows blocks;
// shared memory: blockDim.x floats. x and out may be the same buffer.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int rows, int d, float eps) {
    extern __shared__ float sh[];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * d;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc += xr[j] * xr[j];
    float ms = block_sum(acc, sh) / (float)d;
    float inv = 1.0f / sqrtf(ms + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(size_t)r * d + j] = xr[j] * inv * w[j];
}

// Rotary embedding, rotate-half convention (ops::rope_rotate_half with the angles
// of moe-model's Rope::angles: f32 product pos * inv_freq, cosine and sine in double).
// x: n_tok rows of `stride` floats; the heads start at column `col` of each row.
// grid: (n_tok, n_heads); block: threads over the `half` pairs.
extern "C" __global__ void rope_rotate_half(float* x, const int* pos, const float* inv_freq, int n_tok,
                                            int stride, int col, int n_heads, int half) {
    int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tok || h >= n_heads) return;
    float* head = x + (size_t)t * stride + col + (size_t)h * 2 * half;
    float p = (float)pos[t];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double a = (double)(p * inv_freq[j]);
        float c = (float)cos(a), s = (float)sin(a);
        float x1 = head[j], x2 = head[j + half];
        head[j] = x1 * c - x2 * s;
        head[j + half] = x2 * c + x1 * s;
    }
}

// SiLU-and-multiply (ops::silu_mul): rows of gate_up are [gate (i) | up (i)];
// out[r, j] = silu(gate) * up. One thread per output element.
extern "C" __global__ void silu_mul(const float* gate_up, float* out, int rows, int i) {
    size_t n = (size_t)rows * i;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        size_t r = e / i, j = e % i;
        float g = gate_up[r * 2 * i + j], u = gate_up[r * 2 * i + i + j];
        out[e] = g / (1.0f + expf(-g)) * u;
    }
}

// Router (moe-model's route step): scores = softmax(logits) (scoring 0) or
// sigmoid(logits) (scoring 1) over the experts, the k largest (ties to the lower
// index, as ops::top_k), weights optionally renormalised to sum to one.
// One thread per token; logits [n_tok, n_exp]; ids/weights [n_tok, k].
extern "C" __global__ void route_topk(const float* logits, int n_tok, int n_exp, int k, int scoring, int renorm,
                                      int* ids, float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tok) return;
    const float* l = logits + (size_t)t * n_exp;
    float mx = NEG_INF, sum = 0.0f;
    if (scoring == 0) {
        for (int e = 0; e < n_exp; e++) mx = fmaxf(mx, l[e]);
        for (int e = 0; e < n_exp; e++) sum += expf(l[e] - mx);
    }
    int* out_ids = ids + (size_t)t * k;
    float* out_w = weights + (size_t)t * k;
    float picked = 0.0f;
    for (int s = 0; s < k; s++) {
        int best = -1;
        float bv = NEG_INF;
        for (int e = 0; e < n_exp; e++) {
            bool taken = false;
            for (int q = 0; q < s; q++) taken |= (out_ids[q] == e);
            if (taken) continue;
            float v = (scoring == 0) ? expf(l[e] - mx) * (1.0f / sum) : 1.0f / (1.0f + expf(-l[e]));
            if (best < 0 || v > bv) {
                best = e;
                bv = v;
            }
        }
        out_ids[s] = best;
        out_w[s] = bv;
        picked += bv;
    }
    if (renorm) {
        for (int s = 0; s < k; s++) out_w[s] /= picked;
    }
}

// Index of each row's largest value, the first on ties (moe-model's sampling::argmax).
// grid: rows blocks; shared memory: blockDim.x floats + blockDim.x ints.
extern "C" __global__ void argmax_rows(const float* x, int rows, int n, unsigned int* out) {
    extern __shared__ float sh[];
    int* si = (int*)(sh + blockDim.x);
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = xr[j];
        if (v > bv || (bi == 0x7fffffff && !(v < bv))) {
            bv = v;
            bi = j;
        }
    }
    sh[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sh[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ov > sh[threadIdx.x] || (ov == sh[threadIdx.x] && oi < si[threadIdx.x])) {
                sh[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = (si[0] == 0x7fffffff) ? 0u : (unsigned int)si[0];
}

// Activations to bf16 for the cuBLAS products (bf16 in, f32 accumulate).
extern "C" __global__ void cast_f32_to_bf16(const float* x, unsigned short* out, int n) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (size_t)n; e += (size_t)gridDim.x * blockDim.x)
        out[e] = f32_to_bf16(x[e]);
}

// out[r] = x[idx[r]] for d-wide rows (an expert's token group). grid: n blocks.
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, int n, int d) {
    int r = blockIdx.x;
    if (r >= n) return;
    const float* src = x + (size_t)idx[r] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(size_t)r * d + j] = src[j];
}

// out[idx[r]] += w[r] * y[r] for d-wide rows (ops::axpy per token of an expert's
// group). Rows of one launch must target distinct tokens. grid: n blocks.
extern "C" __global__ void scatter_add_weighted(const float* y, const int* idx, const float* w, float* out, int n,
                                                int d) {
    int r = blockIdx.x;
    if (r >= n) return;
    float* dst = out + (size_t)idx[r] * d;
    float s = w[r];
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] += s * y[(size_t)r * d + j];
}

// Writes each token's key and value (KvCache::write): k and v are read from the
// token's qkv row at columns k_col and v_col, kvw wide, into cache row slot[t].
// grid: n_tok blocks.
extern "C" __global__ void kv_write(const float* qkv, int stride, int k_col, int v_col, int kvw, const int* slot,
                                    float* kc, float* vc, int n_tok) {
    int t = blockIdx.x;
    if (t >= n_tok) return;
    const float* row = qkv + (size_t)t * stride;
    size_t dst = (size_t)slot[t] * kvw;
    for (int j = threadIdx.x; j < kvw; j += blockDim.x) {
        kc[dst + j] = row[k_col + j];
        vc[dst + j] = row[v_col + j];
    }
}

// Causal attention over the paged KV cache (moe-model's Model::attention), prefill
// and decode alike: token t at position pos[t] attends to positions
// lo..=pos[t] of its sequence, lo = window > 0 ? max(0, pos + 1 - window) : 0.
// Position j of a sequence lives in cache row
// blocks[block_off[t] + j / block_size] * block_size + j % block_size.
// q: row t of `q_stride` floats, head h at column h * d; kc/vc: rows of nkv * d;
// out: [n_tok, nh * d]. Online softmax over tiles of blockDim.x keys.
// grid: (n_tok, nh); block: 128 threads; d <= 4 * blockDim.x;
// shared memory: d + 2 * blockDim.x floats (q, tile probabilities, reductions)
// plus blockDim.x ints (tile rows).
extern "C" __global__ void paged_attention(const float* q, int q_stride, const float* kc, const float* vc,
                                           const int* blocks, const int* block_off, const int* pos, int block_size,
                                           int nh, int nkv, int d, int window, float scale, float* out, int n_tok) {
    extern __shared__ float sh[];
    float* qs = sh;
    float* p = sh + d;
    float* red = p + blockDim.x;
    int* rows = (int*)(red + blockDim.x);
    int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tok || h >= nh) return;
    int kvw = nkv * d;
    int off = (h / (nh / nkv)) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) qs[j] = q[(size_t)t * q_stride + (size_t)h * d + j];
    __syncthreads();
    int last = pos[t];
    int lo = (window > 0 && last + 1 > window) ? last + 1 - window : 0;
    const int* bt = blocks + block_off[t];
    float m = NEG_INF, l = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int start = lo; start <= last; start += blockDim.x) {
        int j = start + threadIdx.x;
        float s = NEG_INF;
        int row = 0;
        if (j <= last) {
            row = bt[j / block_size] * block_size + j % block_size;
            const float* k = kc + (size_t)row * kvw + off;
            float dot = 0.0f;
            for (int e = 0; e < d; e++) dot += qs[e] * k[e];
            s = dot * scale;
        }
        rows[threadIdx.x] = row;
        float tile_max = block_max(s, red);
        float new_m = fmaxf(m, tile_max);
        float e = (j <= last) ? expf(s - new_m) : 0.0f;
        p[threadIdx.x] = e;
        float tile_sum = block_sum(e, red);
        float corr = expf(m - new_m);
        l = l * corr + tile_sum;
        int n = min((int)blockDim.x, last + 1 - start);
        for (int c = 0; c < 4; c++) {
            int dim = threadIdx.x + c * blockDim.x;
            if (dim < d) {
                float a = acc[c] * corr;
                for (int jj = 0; jj < n; jj++) a += p[jj] * vc[(size_t)rows[jj] * kvw + off + dim];
                acc[c] = a;
            }
        }
        m = new_m;
        __syncthreads();
    }
    for (int c = 0; c < 4; c++) {
        int dim = threadIdx.x + c * blockDim.x;
        if (dim < d) out[(size_t)t * nh * d + (size_t)h * d + dim] = acc[c] / l;
    }
}

// x[e] += y[e] for n values (ops::add_inplace: the residual adds).
extern "C" __global__ void add_inplace(float* x, const float* y, int n) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (size_t)n; e += (size_t)gridDim.x * blockDim.x)
        x[e] += y[e];
}

// Each of `rows` rows of width d gets the bias b added (ops::add_inplace per row).
extern "C" __global__ void add_bias_rows(float* x, const float* b, int rows, int d) {
    size_t n = (size_t)rows * d;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
        x[e] += b[e % d];
}

// Every value clamped to [-c, c] (the clip_qkv option).
extern "C" __global__ void clamp_inplace(float* x, int n, float c) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < (size_t)n; e += (size_t)gridDim.x * blockDim.x)
        x[e] = fminf(fmaxf(x[e], -c), c);
}

// RMSNorm in place of n_seg consecutive segments of `seg` floats starting at column
// `col` of each `stride`-float row, each with the weights w[seg] (per-head or
// full-width query/key norms: ops::rms_norm_inplace on a slice of the row).
// grid: (n_tok, n_seg); shared memory: blockDim.x floats.
extern "C" __global__ void rms_norm_segments(float* x, const float* w, int n_tok, int stride, int col, int seg,
                                             int n_seg, float eps) {
    extern __shared__ float sh[];
    int t = blockIdx.x, s = blockIdx.y;
    if (t >= n_tok || s >= n_seg) return;
    float* xr = x + (size_t)t * stride + col + (size_t)s * seg;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < seg; j += blockDim.x) acc += xr[j] * xr[j];
    float ms = block_sum(acc, sh) / (float)seg;
    float inv = 1.0f / sqrtf(ms + eps);
    for (int j = threadIdx.x; j < seg; j += blockDim.x) xr[j] = xr[j] * inv * w[j];
}

// Rotary embedding from precomputed tables (moe-model's Rope::apply, not
// interleaved): token t's cosines and sines are cos/sin[t * half ..]; heads of
// `head_stride` floats start at column `col`; the first 2 * half floats of each
// head are rotated. grid: (n_tok, n_heads).
extern "C" __global__ void rope_tables(float* x, const float* cosv, const float* sinv, int n_tok, int stride,
                                       int col, int n_heads, int head_stride, int half) {
    int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tok || h >= n_heads) return;
    float* head = x + (size_t)t * stride + col + (size_t)h * head_stride;
    const float* c = cosv + (size_t)t * half;
    const float* s = sinv + (size_t)t * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float x1 = head[j], x2 = head[j + half];
        head[j] = x1 * c[j] - x2 * s[j];
        head[j + half] = x2 * c[j] + x1 * s[j];
    }
}

// out[r] += sigmoid(g[r]) * y[r] for rows of width d (Qwen2-MoE's gated shared
// expert). grid: rows blocks.
extern "C" __global__ void sigmoid_gate_add(const float* y, const float* g, float* out, int rows, int d) {
    int r = blockIdx.x;
    if (r >= rows) return;
    float s = 1.0f / (1.0f + expf(-g[r]));
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(size_t)r * d + j] += s * y[(size_t)r * d + j];
}
