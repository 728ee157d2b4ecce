// qscript's CUDA kernels, compiled to PTX by build.rs (feature `cuda`) and loaded once per device.
// Each kernel has a reference op in Rust that computes the same function; the tests compare them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// splitmix64's finaliser; runtime/src/nn/dropout.rs computes the same.
__device__ __forceinline__ uint64_t splitmix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// dropout.rs's `hash32` and `uniform`: the row key folded to 32 bits, the element's Weyl step,
// one 32-bit hash (two multiplies; the 64-bit splitmix per element cost 5x the memory time).
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}
__device__ __forceinline__ float uniform(uint64_t key, uint64_t i) {
    uint32_t k = (uint32_t)(key ^ (key >> 32));
    uint32_t z = hash32(k ^ ((uint32_t)i * 0x9E3779B9u));
    return (float)(z >> 8) * (1.0f / 16777216.0f);  // 24 bits: a 32-bit convert
}

// dropout.rs's `mix`: the key of one example row.
__device__ __forceinline__ uint64_t mix(uint64_t a, uint64_t b) {
    return splitmix(a ^ ((b + 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull));
}

// Element j of row r (rows of row_elems elements) draws from key mix(key, first_row + r). Rows
// run along grid.y and their elements along grid.x, so a thread mixes its row's key once and no
// element pays for a 64-bit division.
#define DROPOUT_MASK(NAME, T, CONVERT)                                                          \
    extern "C" __global__ void NAME(T *out, uint64_t key, uint64_t first_row, uint64_t row_elems, \
                                    float p, float keep, uint64_t n) {                          \
        for (uint64_t r = blockIdx.y; r * row_elems < n; r += gridDim.y) {                      \
            uint64_t row = mix(key, first_row + r), base = r * row_elems;                       \
            uint64_t len = n - base < row_elems ? n - base : row_elems;                         \
            for (uint64_t j = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; j < len;         \
                 j += (uint64_t)blockDim.x * gridDim.x)                                         \
                out[base + j] = CONVERT(uniform(row, j) < p ? 0.0f : keep);                     \
        }                                                                                       \
    }

__device__ __forceinline__ float to_f32(float x) { return x; }
DROPOUT_MASK(dropout_mask_f32, float, to_f32)
DROPOUT_MASK(dropout_mask_bf16, __nv_bfloat16, __float2bfloat16)
DROPOUT_MASK(dropout_mask_f16, __half, __float2half)

// One AdamW step over a flat buffer, in place (torch.optim.AdamW's arithmetic, f32 states;
// om1 = 1 - beta1 and om2 = 1 - beta2 come from the host in f64, as the reference ops use them):
// g is scaled by *clip (the clipping factor, a device scalar, or 1 when clip is null); decay,
// when not null, is a bit per element (bit i % 32 of word i / 32), set where weight decay applies:
// n / 8 bytes instead of an f32 mask as long as the buffer.
#define ADAMW(NAME, T, LOAD, STORE)                                                             \
    extern "C" __global__ void NAME(T *p, float *m, float *v, const float *g, const float *clip, \
                                    const uint32_t *decay, float lr, float beta1, float beta2,     \
                                    float om1, float om2, float eps, float wd, float bc1,       \
                                    float bc2, uint64_t n) {                                    \
        float c = clip ? *clip : 1.0f;                                                          \
        for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;               \
             i += (uint64_t)blockDim.x * gridDim.x) {                                           \
            float gi = g[i] * c;                                                                \
            float pi = LOAD(p[i]);                                                              \
            if (decay && (decay[i >> 5] >> (i & 31) & 1u)) pi *= 1.0f - lr * wd;                \
            float mi = beta1 * m[i] + om1 * gi;                                                 \
            float vi = beta2 * v[i] + om2 * gi * gi;                                            \
            m[i] = mi;                                                                          \
            v[i] = vi;                                                                          \
            pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);                                    \
            p[i] = STORE(pi);                                                                   \
        }                                                                                       \
    }

__device__ __forceinline__ float from_bf16(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float from_f16(__half x) { return __half2float(x); }
ADAMW(adamw_f32, float, to_f32, to_f32)
ADAMW(adamw_bf16, __nv_bfloat16, from_bf16, __float2bfloat16)
ADAMW(adamw_f16, __half, from_f16, __float2half)

// ---------------------------------------------------------------- row reductions
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// Block-wide sum / max (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float s[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < (blockDim.x >> 5) ? s[lane] : 0.0f;
        x = warp_sum(x);
        if (lane == 0) total = x;
    }
    __syncthreads();
    return total;
}
__device__ float block_max(float v) {
    __shared__ float s[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < (blockDim.x >> 5) ? s[lane] : -INFINITY;
        x = warp_max(x);
        if (lane == 0) total = x;
    }
    __syncthreads();
    return total;
}

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ld(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half st<__half>(float x) { return __float2half(x); }

// Per block, the sum of squares of its grid-stride share of g: out[blockIdx.x] (the caller sums
// the few partials). The gradient norm in one read of the buffer, no squared copy.
extern "C" __global__ void sumsq_f32(const float *g, float *out, uint64_t n) {
    float acc = 0.0f;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float v = g[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// ---------------------------------------------------------------- cross-entropy rows
// A running (max, sum of exp(x - max)) pair, merged with another.
__device__ __forceinline__ void ms_merge(float &m, float &s, float m2, float s2) {
    float M = fmaxf(m, m2);
    if (M == -INFINITY) return;
    s = s * __expf(m - M) + s2 * __expf(m2 - M);
    m = M;
}
__device__ __forceinline__ void ms_add(float &m, float &s, float v) {
    if (v == -INFINITY) return;  // adds nothing (and -inf - -inf would be NaN)
    if (v > m) {
        s = s * __expf(m - v) + 1.0f;
        m = v;
    } else {
        s += __expf(v - m);
    }
}
// Block-wide merge of the pairs; every thread gets the result.
__device__ void block_ms(float &m, float &s) {
    __shared__ float sm[32], ss[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        ms_merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
    __syncthreads();
    if (lane == 0) { sm[w] = m; ss[w] = s; }
    __syncthreads();
    if (w == 0) {
        bool in = lane < (int)(blockDim.x >> 5);
        m = in ? sm[lane] : -INFINITY;
        s = in ? ss[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1)
            ms_merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
        if (lane == 0) { sm[0] = m; ss[0] = s; }
    }
    __syncthreads();
    m = sm[0];
    s = ss[0];
}

// One block per row of logits [n, V]: loss[r] = logsumexp(x) - x[target[r]] and
// dlogits = (softmax(x) - onehot(target)) * inv_denom, all arithmetic in f32. One read for the
// max and the sum together (online), one for the gradient; 16 bytes a thread where `vec` (rows
// 16-byte aligned, V a multiple of 16 / sizeof(T)).
template <typename T>
__device__ void ce_rows(const T *logits, const uint32_t *target, T *dlogits, float *loss,
                        uint64_t V, float inv_denom, int want_grad, int vec) {
    constexpr int W = 16 / sizeof(T);
    uint64_t r = blockIdx.x;
    const T *x = logits + r * V;
    float m = -INFINITY, sum = 0.0f;
    if (vec) {
        for (uint64_t j = threadIdx.x; j < V / W; j += blockDim.x) {
            uint4 u = reinterpret_cast<const uint4 *>(x)[j];
            const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
            for (int k = 0; k < W; k++) ms_add(m, sum, ld(e[k]));
        }
    } else {
        for (uint64_t j = threadIdx.x; j < V; j += blockDim.x) ms_add(m, sum, ld(x[j]));
    }
    block_ms(m, sum);
    float lse = m + __logf(sum);
    uint32_t t = target[r];
    if (threadIdx.x == 0) loss[r] = lse - ld(x[t]);
    if (!want_grad) return;
    T *d = dlogits + r * V;
    if (vec) {
        for (uint64_t j = threadIdx.x; j < V / W; j += blockDim.x) {
            uint4 u = reinterpret_cast<const uint4 *>(x)[j], o;
            const T *e = reinterpret_cast<const T *>(&u);
            T *f = reinterpret_cast<T *>(&o);
#pragma unroll
            for (int k = 0; k < W; k++) {
                uint64_t c = j * W + k;
                f[k] = st<T>((__expf(ld(e[k]) - lse) - (c == t ? 1.0f : 0.0f)) * inv_denom);
            }
            reinterpret_cast<uint4 *>(d)[j] = o;
        }
    } else {
        for (uint64_t j = threadIdx.x; j < V; j += blockDim.x) {
            float p = __expf(ld(x[j]) - lse);
            d[j] = st<T>((p - (j == t ? 1.0f : 0.0f)) * inv_denom);
        }
    }
}
#define CE(NAME, T)                                                                              \
    extern "C" __global__ void NAME(const T *l, const uint32_t *t, T *d, float *loss, uint64_t V, \
                                    float inv, int g, int vec) {                                 \
        ce_rows<T>(l, t, d, loss, V, inv, g, vec);                                               \
    }
CE(ce_rows_f32, float)
CE(ce_rows_bf16, __nv_bfloat16)
CE(ce_rows_f16, __half)

// ---------------------------------------------------------------- attention softmax
// Rows of scores [R, t] ordered [b][group][s] (group = heads, GQA groups included), raw q·kᵀ.
// Row r is query s_idx = r % s of batch r / rows_per_batch; it sees key j when
// kstart[b] <= j < kend[b] (no ranges: every key), j >= qs[b * s + s_idx] (packed rows: the start
// of the query's example; no qs: 0) and, if causal, j <= offset + s_idx. A row that sees no key
// attends uniformly to all keys (what the additive-bias reference computes).
__device__ __forceinline__ void row_range(uint64_t r, uint32_t s, uint64_t rows_per_batch,
                                          uint32_t offset, int causal, const uint32_t *ks,
                                          const uint32_t *ke, const uint32_t *qs, uint64_t t,
                                          uint64_t *lo, uint64_t *hi) {
    uint64_t b = r / rows_per_batch;
    uint64_t q = r % s;
    uint64_t a = ks ? ks[b] : 0, e = ke ? ke[b] : t;
    if (qs && qs[b * s + q] > a) a = qs[b * s + q];
    if (causal && offset + q + 1 < e) e = offset + q + 1;
    if (a >= e) { a = 0; e = t; }  // no visible key: uniform over all keys
    *lo = a;
    *hi = e;
}

template <typename T>
__device__ void softmax_fwd(const T *scores, T *probs, float *mx, float *lsum, uint64_t t,
                            uint32_t s, uint64_t rpb, uint32_t offset, int causal,
                            const uint32_t *ks, const uint32_t *ke, const uint32_t *qs, float scale) {
    uint64_t r = blockIdx.x, lo, hi;
    row_range(r, s, rpb, offset, causal, ks, ke, qs, t, &lo, &hi);
    const T *x = scores + r * t;
    T *p = probs + r * t;
    float m = -INFINITY;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, ld(x[j]) * scale);
    m = block_max(m);
    float sum = 0.0f;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) sum += __expf(ld(x[j]) * scale - m);
    sum = block_sum(sum);
    float ls = __logf(sum);
    if (threadIdx.x == 0) { mx[r] = m; lsum[r] = ls; }
    for (uint64_t j = threadIdx.x; j < t; j += blockDim.x)
        p[j] = st<T>(j >= lo && j < hi ? __expf(ld(x[j]) * scale - m - ls) : 0.0f);
}

// probs = softmax (recomputed from the saved row max and log-sum), ds = p * (dp - delta) * scale.
template <typename T>
__device__ void softmax_bwd(const T *scores, const T *dp, const float *mx, const float *lsum,
                            const float *delta, T *probs, T *ds, uint64_t t, uint32_t s,
                            uint64_t rpb, uint32_t offset, int causal, const uint32_t *ks,
                            const uint32_t *ke, const uint32_t *qs, float scale) {
    uint64_t r = blockIdx.x, lo, hi;
    row_range(r, s, rpb, offset, causal, ks, ke, qs, t, &lo, &hi);
    const T *x = scores + r * t;
    const T *g = dp + r * t;
    float m = mx[r], ls = lsum[r], dl = delta[r];
    for (uint64_t j = threadIdx.x; j < t; j += blockDim.x) {
        float p = j >= lo && j < hi ? __expf(ld(x[j]) * scale - m - ls) : 0.0f;
        probs[r * t + j] = st<T>(p);
        ds[r * t + j] = st<T>(p * (ld(g[j]) - dl) * scale);
    }
}
#define SOFTMAX(T, SFX)                                                                         \
    extern "C" __global__ void attn_softmax_fwd_##SFX(                                          \
        const T *x, T *p, float *mx, float *ls, uint64_t t, uint32_t s, uint64_t rpb,          \
        uint32_t off, int causal, const uint32_t *ks, const uint32_t *ke, const uint32_t *qs,  \
        float scale) {                                                                          \
        softmax_fwd<T>(x, p, mx, ls, t, s, rpb, off, causal, ks, ke, qs, scale);               \
    }                                                                                           \
    extern "C" __global__ void attn_softmax_bwd_##SFX(                                          \
        const T *x, const T *dp, const float *mx, const float *ls, const float *dl, T *p,      \
        T *ds, uint64_t t, uint32_t s, uint64_t rpb, uint32_t off, int causal,                 \
        const uint32_t *ks, const uint32_t *ke, const uint32_t *qs, float scale) {             \
        softmax_bwd<T>(x, dp, mx, ls, dl, p, ds, t, s, rpb, off, causal, ks, ke, qs, scale);   \
    }
SOFTMAX(float, f32)
SOFTMAX(__nv_bfloat16, bf16)
SOFTMAX(__half, f16)

// ---------------------------------------------------------------- SwiGLU
template <typename T>
__device__ void swiglu_fwd(const T *g, const T *u, T *h, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float a = ld(g[i]);
        float silu = ld(st<T>(a / (1.0f + __expf(-a))));  // rounded like silu(g) * up in T
        h[i] = st<T>(silu * ld(u[i]));
    }
}
template <typename T>
__device__ void swiglu_bwd(const T *g, const T *u, const T *dh, T *dg, T *du, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float a = ld(g[i]), b = ld(u[i]), d = ld(dh[i]);
        float sg = 1.0f / (1.0f + __expf(-a));
        du[i] = st<T>(d * a * sg);
        dg[i] = st<T>(d * b * sg * (1.0f + a * (1.0f - sg)));
    }
}
#define SWIGLU(T, SFX)                                                                          \
    extern "C" __global__ void swiglu_fwd_##SFX(const T *g, const T *u, T *h, uint64_t n) {     \
        swiglu_fwd<T>(g, u, h, n);                                                              \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SFX(const T *g, const T *u, const T *dh, T *dg,     \
                                                T *du, uint64_t n) {                            \
        swiglu_bwd<T>(g, u, dh, dg, du, n);                                                     \
    }
SWIGLU(float, f32)
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(__half, f16)

// ---------------------------------------------------------------- RMSNorm
// HF's arithmetic: y = T(T(x * rstd) * w), rstd = rsqrt(mean(x^2) + eps) in f32. One block a row.
template <typename T>
__device__ void rms_fwd(const T *x, const T *w, T *y, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        y[r * d + j] = st<T>(ld(st<T>(ld(xr[j]) * rstd)) * ld(w[j]));
}
// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w.
template <typename T>
__device__ void rms_bwd(const T *x, const T *w, const T *dy, T *dx, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    const T *gr = dy + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    float dot = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        dot += ld(gr[j]) * ld(w[j]) * ld(xr[j]) * rstd;
    dot = block_sum(dot) / (float)d;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) {
        float xh = ld(xr[j]) * rstd;
        dx[r * d + j] = st<T>(rstd * (ld(gr[j]) * ld(w[j]) - xh * dot));
    }
}
#define RMS(T, SFX)                                                                             \
    extern "C" __global__ void rms_fwd_##SFX(const T *x, const T *w, T *y, uint64_t d,          \
                                             float eps) {                                       \
        rms_fwd<T>(x, w, y, d, eps);                                                            \
    }                                                                                           \
    extern "C" __global__ void rms_bwd_##SFX(const T *x, const T *w, const T *dy, T *dx,        \
                                             uint64_t d, float eps) {                           \
        rms_bwd<T>(x, w, dy, dx, d, eps);                                                       \
    }
RMS(float, f32)
RMS(__nv_bfloat16, bf16)
RMS(__half, f16)

// ---------------------------------------------------------------- RoPE
// HF's apply_rotary_pos_emb on x [b, s, h, d] in any layout with d contiguous (strides in
// elements for b, s, h of x and y), cos/sin [s, d] (+ cb * batch when per row, cb = 0 when shared),
// rounded like x * cos + rotate_half(x) * sin in T. With `bwd`, the transpose:
// dx = dy * cos + rotate_half_t(dy * sin). A block per token (grid-stride over the b * s tokens),
// its threads over the token's h * d/2 pairs (i, i + d/2), with 32-bit index arithmetic.
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, uint64_t b, uint64_t s, uint64_t h,
                     uint64_t d, uint64_t xb, uint64_t xs, uint64_t xh, uint64_t yb, uint64_t ys,
                     uint64_t yh, uint64_t cb, int bwd) {
    uint32_t half = (uint32_t)(d / 2), pairs = (uint32_t)h * half;
    for (uint64_t tok = blockIdx.x; tok < b * s; tok += gridDim.x) {
        uint64_t bb = tok / s, ss = tok % s;
        const T *cr = cos + bb * cb + ss * d, *sr = sin + bb * cb + ss * d;
        for (uint32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
            uint32_t hh = p / half, j = p % half;
            const T *xr = x + bb * xb + ss * xs + hh * xh;
            T *yr = y + bb * yb + ss * ys + hh * yh;
            float x1 = ld(xr[j]), x2 = ld(xr[j + half]);
            float c1 = ld(cr[j]), c2 = ld(cr[j + half]), s1 = ld(sr[j]), s2 = ld(sr[j + half]);
            auto r16 = [](float v) { return ld(st<T>(v)); };
            if (!bwd) {  // [x1, x2] * cos + [-x2, x1] * sin
                yr[j] = st<T>(r16(x1 * c1) + r16(-x2 * s1));
                yr[j + half] = st<T>(r16(x2 * c2) + r16(x1 * s2));
            } else {  // dy * cos + [dy2 * s2, -(dy1 * s1)]
                yr[j] = st<T>(r16(x1 * c1) + r16(x2 * s2));
                yr[j + half] = st<T>(r16(x2 * c2) - r16(x1 * s1));
            }
        }
    }
}
#define ROPE(T, SFX)                                                                            \
    extern "C" __global__ void rope_##SFX(const T *x, const T *cos, const T *sin, T *y, uint64_t b, \
                                          uint64_t s, uint64_t h, uint64_t d, uint64_t xb,        \
                                          uint64_t xs, uint64_t xh, uint64_t yb, uint64_t ys,     \
                                          uint64_t yh, uint64_t cb, int bwd) {                    \
        rope<T>(x, cos, sin, y, b, s, h, d, xb, xs, xh, yb, ys, yh, cb, bwd);                   \
    }
ROPE(float, f32)
ROPE(__nv_bfloat16, bf16)
ROPE(__half, f16)

// ---------------------------------------------------------------- fused dropout, in-place adds
// out = (acc ? out : 0) + alpha * mask * x, the mask of dropout_mask drawn in place (never stored):
// dropout's forward (acc 0, alpha 1: x * mask rounded as the reference's T mask and product) and
// the adapter's input gradient added into dX (acc 1, alpha = the LoRA scale).
template <typename T>
__device__ __forceinline__ T dropout_one(T o, T x, uint64_t row, uint64_t j, float p, float kt, float alpha, int acc) {
    float m = uniform(row, j) < p ? 0.0f : kt;
    float v = acc ? ld(st<T>(alpha * ld(st<T>(m * ld(x))))) : m * ld(x);
    return st<T>(acc ? ld(o) + v : v);
}
// Rows along grid.y, as in DROPOUT_MASK; with `vec` (rows a multiple of 16 / sizeof(T) elements,
// x and out 16-byte aligned) a thread takes 16 bytes at a time.
template <typename T>
__device__ void dropout_axpy(T *out, const T *x, uint64_t key, uint64_t first_row, uint64_t row_elems, float p,
                             float keep, float alpha, int acc, uint64_t n, int vec) {
    constexpr int W = 16 / sizeof(T);
    float kt = ld(st<T>(keep));
    for (uint64_t r = blockIdx.y; r * row_elems < n; r += gridDim.y) {
        uint64_t row = mix(key, first_row + r), base = r * row_elems;
        uint64_t len = n - base < row_elems ? n - base : row_elems;
        // Within a row 32-bit indices (a row is far shorter than 2^32 elements).
        uint32_t t0 = blockIdx.x * blockDim.x + threadIdx.x, step = blockDim.x * gridDim.x, n32 = (uint32_t)len;
        if (vec) {
            for (uint32_t q = t0; q < n32 / W; q += step) {
                uint4 ux = reinterpret_cast<const uint4 *>(x + base)[q], uo;
                if (acc) uo = reinterpret_cast<const uint4 *>(out + base)[q];
                const T *ex = reinterpret_cast<const T *>(&ux);
                T *eo = reinterpret_cast<T *>(&uo);
#pragma unroll
                for (int k = 0; k < W; k++) eo[k] = dropout_one<T>(eo[k], ex[k], row, q * W + k, p, kt, alpha, acc);
                reinterpret_cast<uint4 *>(out + base)[q] = uo;
            }
        } else {
            for (uint32_t j = t0; j < n32; j += step)
                out[base + j] = dropout_one<T>(out[base + j], x[base + j], row, j, p, kt, alpha, acc);
        }
    }
}
#define DROPOUT_AXPY(T, SFX)                                                                    \
    extern "C" __global__ void dropout_axpy_##SFX(T *out, const T *x, uint64_t key, uint64_t first_row, \
                                                  uint64_t row_elems, float p, float keep, float alpha, \
                                                  int acc, uint64_t n, int vec) {               \
        dropout_axpy<T>(out, x, key, first_row, row_elems, p, keep, alpha, acc, n, vec);         \
    }
DROPOUT_AXPY(float, f32)
DROPOUT_AXPY(__nv_bfloat16, bf16)
DROPOUT_AXPY(__half, f16)

// dst (f32) += x, in place: a gradient added into its slot of the flat buffer.
template <typename T>
__device__ void acc_f32(float *dst, const T *x, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x)
        dst[i] += ld(x[i]);
}
// dst (f32 [vocab, h]) row ids[r] += x row r: the embedding's backward, straight into its slot.
template <typename T>
__device__ void scatter_rows_f32(float *dst, const uint32_t *ids, const T *x, uint64_t rows, uint64_t h) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < rows * h;
         i += (uint64_t)blockDim.x * gridDim.x)
        atomicAdd(dst + (uint64_t)ids[i / h] * h + i % h, ld(x[i]));
}
#define ACC(T, SFX)                                                                             \
    extern "C" __global__ void acc_f32_##SFX(float *dst, const T *x, uint64_t n) { acc_f32<T>(dst, x, n); } \
    extern "C" __global__ void scatter_rows_f32_##SFX(float *dst, const uint32_t *ids, const T *x,     \
                                                      uint64_t rows, uint64_t h) {              \
        scatter_rows_f32<T>(dst, ids, x, rows, h);                                              \
    }
ACC(float, f32)
ACC(__nv_bfloat16, bf16)
ACC(__half, f16)

// dst += x in place (same dtype, contiguous), 16 bytes a thread where `vec` (both 16-byte aligned
// and n a multiple of 16 / sizeof(T)); the sum is rounded once to T, as the reference's add.
template <typename T>
__device__ void add_into(T *dst, const T *x, uint64_t n, int vec) {
    constexpr int V = 16 / sizeof(T);
    uint64_t i0 = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x, step = (uint64_t)blockDim.x * gridDim.x;
    if (vec) {
        for (uint64_t i = i0; i < n / V; i += step) {
            uint4 a = reinterpret_cast<const uint4 *>(dst)[i], b = reinterpret_cast<const uint4 *>(x)[i];
            T *pa = reinterpret_cast<T *>(&a);
            const T *pb = reinterpret_cast<const T *>(&b);
#pragma unroll
            for (int k = 0; k < V; k++) pa[k] = st<T>(ld(pa[k]) + ld(pb[k]));
            reinterpret_cast<uint4 *>(dst)[i] = a;
        }
    } else {
        for (uint64_t i = i0; i < n; i += step) dst[i] = st<T>(ld(dst[i]) + ld(x[i]));
    }
}
// y [rows, d] += bias [d] in place, a block per row (grid-stride), 16 bytes a thread where `vec`.
template <typename T>
__device__ void bias_add(T *y, const T *bias, uint64_t rows, uint64_t d, int vec) {
    constexpr int V = 16 / sizeof(T);
    for (uint64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        T *yr = y + r * d;
        if (vec) {
            for (uint64_t j = threadIdx.x; j < d / V; j += blockDim.x) {
                uint4 a = reinterpret_cast<const uint4 *>(yr)[j], b = reinterpret_cast<const uint4 *>(bias)[j];
                T *pa = reinterpret_cast<T *>(&a);
                const T *pb = reinterpret_cast<const T *>(&b);
#pragma unroll
                for (int k = 0; k < V; k++) pa[k] = st<T>(ld(pa[k]) + ld(pb[k]));
                reinterpret_cast<uint4 *>(yr)[j] = a;
            }
        } else {
            for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = st<T>(ld(yr[j]) + ld(bias[j]));
        }
    }
}
// Row ids[r] of dst [*, h] = row r of x [rows, h] (distinct ids; the other rows untouched), a block
// per row.
template <typename T>
__device__ void put_rows(T *dst, const uint32_t *ids, const T *x, uint64_t rows, uint64_t h) {
    for (uint64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        T *dr = dst + (uint64_t)ids[r] * h;
        const T *xr = x + r * h;
        for (uint64_t j = threadIdx.x; j < h; j += blockDim.x) dr[j] = xr[j];
    }
}
#define ADDS(T, SFX)                                                                            \
    extern "C" __global__ void add_into_##SFX(T *dst, const T *x, uint64_t n, int vec) {        \
        add_into<T>(dst, x, n, vec);                                                            \
    }                                                                                           \
    extern "C" __global__ void bias_add_##SFX(T *y, const T *b, uint64_t rows, uint64_t d, int vec) { \
        bias_add<T>(y, b, rows, d, vec);                                                        \
    }                                                                                           \
    extern "C" __global__ void put_rows_##SFX(T *dst, const uint32_t *ids, const T *x, uint64_t rows, \
                                              uint64_t h) {                                     \
        put_rows<T>(dst, ids, x, rows, h);                                                      \
    }
ADDS(float, f32)
ADDS(__nv_bfloat16, bf16)
ADDS(__half, f16)

// The reference's per-row terms of RMSNorm's weight gradient, dy * T(xhat) in f32 [rows, d]; the
// caller sums the rows with a GEMM straight into the gradient. One block a row.
template <typename T>
__device__ void rms_dw_rows(const T *x, const T *dy, float *out, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        out[r * d + j] = ld(dy[r * d + j]) * ld(st<T>(ld(xr[j]) * rstd));
}
#define RMS_DW(T, SFX)                                                                          \
    extern "C" __global__ void rms_dw_rows_##SFX(const T *x, const T *dy, float *out, uint64_t d, float eps) { \
        rms_dw_rows<T>(x, dy, out, d, eps);                                                     \
    }
RMS_DW(float, f32)
RMS_DW(__nv_bfloat16, bf16)
RMS_DW(__half, f16)
