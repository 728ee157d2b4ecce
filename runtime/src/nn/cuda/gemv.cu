// Decoding's projections (launchers in gemv.rs; reference ops: `nn::decode::projections`,
// `residual` and `swiglu`): y[m, j] = sum_k x[m, k] W[j, k] for at most MAX_ROWS rows m of x
// (the tokens of one decode step; the launcher passes at most 4), one warp an output feature j,
// the weight read once in 16-byte loads, accumulated in f32. The epilogues round as the reference
// ops' separate kernels do: the product to T, then the bias, the residual or SwiGLU.
//
// Two forms. `gemv_many` is the q/k/v kernel (measured 2026-12-07: 22.2 us for a 7B's q/k/v at
// one row, H100): four loads in flight a lane with a serial tail, and an epilogue whose loop over
// a runtime row count indexes the accumulators dynamically (local memory); it takes up to four
// rows. The lean form (`gemv_lean_sS`, `gemv_residual_sS`, `gemv_swiglu_sS`) is for one row, S
// warps a feature: o + residual 17.2 us against cuBLAS's 21.6, gate/up + SwiGLU 93.1 against
// 106.6, the LM head 348 against 360, down 62.3 against 55.1 before the split (H100).
#include "common.cuh"

#define MAX_ROWS 8

// 8 values of T (16 bytes) to f32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 &r, float *out) {
    const T *v = reinterpret_cast<const T *>(&r);
#pragma unroll
    for (int i = 0; i < 8; i++) out[i] = ld(v[i]);
}

// acc[m] += x[m, chunk c] . w[chunk c] for the rows m < rows; a chunk is 8 values.
template <typename T>
__device__ __forceinline__ void fma_chunk(const uint4 &wr, const T *__restrict__ x, uint64_t k,
                                          int c, int rows, float *acc) {
    float wv[8];
    unpack8<T>(wr, wv);
#pragma unroll
    for (int m = 0; m < MAX_ROWS; m++) {
        if (m < rows) {
            float xv[8];
            unpack8<T>(*reinterpret_cast<const uint4 *>(x + m * k + (uint64_t)c * 8), xv);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[m] = fmaf(wv[i], xv[i], acc[m]);
        }
    }
}

// This lane's share of the dot products of x's rows with the weight row w (k values, a multiple
// of 8): chunks lane, lane + 32, ...; NW weight rows at once, their loads issued together, four
// chunks a row in flight.
template <typename T, int NW>
__device__ __forceinline__ void row_dots(const T *__restrict__ x, const T *const *w, uint64_t k,
                                         int rows, float (*acc)[MAX_ROWS]) {
    const int lane = threadIdx.x & 31;
    const int chunks = (int)(k / 8);
    const uint4 *wp[NW];
#pragma unroll
    for (int r = 0; r < NW; r++) wp[r] = reinterpret_cast<const uint4 *>(w[r]);
    int c = lane;
    for (; c + 96 < chunks; c += 128) {
        uint4 a[NW][4];
#pragma unroll
        for (int r = 0; r < NW; r++)
#pragma unroll
            for (int u = 0; u < 4; u++) a[r][u] = __ldcs(wp[r] + c + 32 * u);
#pragma unroll
        for (int r = 0; r < NW; r++)
#pragma unroll
            for (int u = 0; u < 4; u++) fma_chunk<T>(a[r][u], x, k, c + 32 * u, rows, acc[r]);
    }
    for (; c < chunks; c += 32) {
#pragma unroll
        for (int r = 0; r < NW; r++) fma_chunk<T>(__ldcs(wp[r] + c), x, k, c, rows, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < NW; r++)
#pragma unroll
        for (int m = 0; m < MAX_ROWS; m++)
            if (m < rows) acc[r][m] = warp_sum(acc[r][m]);
}

// The lean form, for one row (a decode step of one sequence): eight 16-byte weight loads in
// flight a lane over the NW weight rows, issued before any is used and predicated on the range's
// end (zeros past it: no serial tail), each chunk of x read once for the NW rows; every array
// indexed by constants (registers). S warps share a feature's row (split K: S consecutive warps of
// a block, each a 1/S share of the chunks): a long row (down_proj's 18,944 values) is then read by
// more warps at once, in more, shorter pieces. The first form (a runtime row count up to 8, 137
// registers a thread) left one block of 8 warps an SM (2.7x slower than cuBLAS for gate/up, H200);
// at four rows this form was 1.5-3x slower than cuBLAS (H100), so it is taken for one row only.
// With `g` (not null) x is RMS-normalized on the way in, as `rms_fwd` writes it: T(T(x * rstd) * g).
template <typename T, int NW>
__device__ __forceinline__ void lean_dots(const T *__restrict__ x, const T *__restrict__ g, float rstd,
                                          const T *const *w, int c_begin, int c_end, float *acc) {
    constexpr int U = 8 / NW;
    const int lane = threadIdx.x & 31;
    for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * U) {
        uint4 a[NW][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < NW; r++)
                a[r][u] = c < c_end ? __ldcs(reinterpret_cast<const uint4 *>(w[r]) + c)
                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c < c_end) {
                float xv[8];
                unpack8<T>(*reinterpret_cast<const uint4 *>(x + (uint64_t)c * 8), xv);
                if (g) {
                    float gv[8];
                    unpack8<T>(*reinterpret_cast<const uint4 *>(g + (uint64_t)c * 8), gv);
#pragma unroll
                    for (int i = 0; i < 8; i++) xv[i] = ld(st<T>(ld(st<T>(xv[i] * rstd)) * gv[i]));
                }
#pragma unroll
                for (int r = 0; r < NW; r++) {
                    float wv[8];
                    unpack8<T>(a[r][u], wv);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[r] = fmaf(wv[i], xv[i], acc[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NW; r++) acc[r] = warp_sum(acc[r]);
}

// RMSNorm's rstd of the row x (d values) as `rms_fwd` computes it, bit for bit: its launch takes
// `vthreads` threads a row (`rows_grid`), so this block's warps play its `vthreads / 32` warps
// (the same strided partial sums, the same shuffles, the same sum over the warps). Every thread
// of the block calls it (it synchronizes the block); g null: no norm, rstd unused.
template <typename T>
__device__ __forceinline__ float norm_rstd(const T *g, const T *x, uint64_t d, float eps, int vthreads) {
    if (!g) return 0.0f;
    __shared__ float s[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, vwarps = vthreads >> 5;
    for (int vw = w; vw < vwarps; vw += (int)(blockDim.x >> 5)) {
        float ss = 0.0f;
        for (uint64_t j = (uint64_t)vw * 32 + lane; j < d; j += vthreads) {
            float v = ld(x[j]);
            ss += v * v;
        }
        ss = warp_sum(ss);
        if (lane == 0) s[vw] = ss;
    }
    __syncthreads();
    if (w == 0) {
        float v = lane < vwarps ? s[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return rsqrtf(total / (float)d + eps);
}

// This warp's first feature (of `features`, F consecutive ones a warp) and its share of the k / 8
// chunks under S-way split K.
template <int S, int F>
struct Share {
    uint64_t j;
    int c_begin, c_end;
    bool live;
    __device__ __forceinline__ Share(uint64_t k, uint64_t features) {
        const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5;
        j = warp / S * F;
        const int chunks = (int)(k / 8), per = (chunks + S - 1) / S, p = (int)(warp % S);
        c_begin = min(chunks, p * per);
        c_end = min(chunks, c_begin + per);
        live = j < features;
    }
};

// The S partial dot products of each feature summed into its first warp's `acc` (every warp of
// the block calls this: it synchronizes the block). True for the lane that writes the feature.
template <int NW, int S>
__device__ __forceinline__ bool join(float *acc) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if constexpr (S > 1) {
        __shared__ float part[8][NW];
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < NW; r++) part[warp][r] = acc[r];
        __syncthreads();
        if (lane == 0 && warp % S == 0)
#pragma unroll
            for (int s = 1; s < S; s++)
#pragma unroll
                for (int r = 0; r < NW; r++) acc[r] += part[warp + s][r];
    }
    return lane == 0 && warp % S == 0;
}

// Feature j of the concatenation n0 | n1 | n2 of up to three projections of one input (q, k, v):
// its weight, bias (null: none), output and count, and j within it; false past the last.
template <typename T>
__device__ __forceinline__ bool pick(uint64_t &j, const T *&w, const T *&b, T *&y, uint64_t &n,
                                     const T *w0, const T *b0, T *y0, uint64_t n0, const T *w1,
                                     const T *b1, T *y1, uint64_t n1, const T *w2, const T *b2,
                                     T *y2, uint64_t n2) {
    w = w0, b = b0, y = y0, n = n0;
    if (j >= n) {
        j -= n;
        w = w1, b = b1, y = y1, n = n1;
        if (j >= n) {
            j -= n;
            w = w2, b = b2, y = y2, n = n2;
            if (j >= n) return false;
        }
    }
    return true;
}

// Up to three projections of one input (q, k, v) in one launch, the measured form.
template <typename T>
__device__ void gemv_many(const T *x, int rows, uint64_t k, const T *w0, const T *b0, T *y0,
                          uint64_t n0, const T *w1, const T *b1, T *y1, uint64_t n1,
                          const T *w2, const T *b2, T *y2, uint64_t n2) {
    uint64_t j = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5, n;
    const T *w, *b;
    T *y;
    if (!pick<T>(j, w, b, y, n, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2)) return;
    float acc[1][MAX_ROWS] = {};
    const T *wr[1] = {w + j * k};
    row_dots<T, 1>(x, wr, k, rows, acc);
    if ((threadIdx.x & 31) == 0) {
        float bias = b ? ld(b[j]) : 0.0f;
        for (int m = 0; m < rows; m++) {
            float v = ld(st<T>(acc[0][m]));
            y[m * n + j] = b ? st<T>(v + bias) : st<T>(v);
        }
    }
}

// The lean form's products, one row of x (RMS-normalized by g first where g is not null): up to
// three projections with their biases (the LM head: one, no bias), S warps a feature, F features
// a warp (every n_i a multiple of F).
template <typename T, int S, int F>
__device__ void gemv_lean(const T *x, const T *g, float eps, int vthreads, uint64_t k, const T *w0,
                          const T *b0, T *y0, uint64_t n0, const T *w1, const T *b1, T *y1,
                          uint64_t n1, const T *w2, const T *b2, T *y2, uint64_t n2) {
    const float rstd = norm_rstd<T>(g, x, k, eps, vthreads);
    Share<S, F> sh(k, n0 + n1 + n2);
    uint64_t j = sh.j, n = 0;
    const T *w = nullptr, *b = nullptr;
    T *y = nullptr;
    float acc[F] = {};
    const bool live =
        sh.live && pick<T>(j, w, b, y, n, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    if (live) {
        const T *wr[F];
#pragma unroll
        for (int f = 0; f < F; f++) wr[f] = w + (j + f) * k;
        lean_dots<T, F>(x, g, rstd, wr, sh.c_begin, sh.c_end, acc);
    }
    if (join<F, S>(acc) && live)
#pragma unroll
        for (int f = 0; f < F; f++) {
            float v = ld(st<T>(acc[f]));
            y[j + f] = b ? st<T>(v + ld(b[j + f])) : st<T>(v);
        }
}

// y = res + x W^T (o_proj and down_proj onto the residual stream), F features a warp.
template <typename T, int S, int F>
__device__ void gemv_residual(const T *x, uint64_t k, const T *w, uint64_t n, const T *res, T *y) {
    Share<S, F> sh(k, n);
    float acc[F] = {};
    if (sh.live) {
        const T *wr[F];
#pragma unroll
        for (int f = 0; f < F; f++) wr[f] = w + (sh.j + f) * k;
        lean_dots<T, F>(x, nullptr, 0.0f, wr, sh.c_begin, sh.c_end, acc);
    }
    if (join<F, S>(acc) && sh.live)
#pragma unroll
        for (int f = 0; f < F; f++) y[sh.j + f] = st<T>(ld(st<T>(acc[f])) + ld(res[sh.j + f]));
}

// y = silu(h Wg^T) * (h Wu^T), h = x or its RMSNorm by g: gate_proj, up_proj and SwiGLU in one
// pass.
template <typename T, int S>
__device__ void gemv_swiglu(const T *x, const T *g, float eps, int vthreads, uint64_t k,
                            const T *wg, const T *wu, uint64_t n, T *y) {
    const float rstd = norm_rstd<T>(g, x, k, eps, vthreads);
    Share<S, 1> sh(k, n);
    float acc[2] = {};
    if (sh.live) {
        const T *wr[2] = {wg + sh.j * k, wu + sh.j * k};
        lean_dots<T, 2>(x, g, rstd, wr, sh.c_begin, sh.c_end, acc);
    }
    if (join<2, S>(acc) && sh.live) {
        float gt = ld(st<T>(acc[0])), u = ld(st<T>(acc[1]));
        float silu = ld(st<T>(gt / (1.0f + __expf(-gt))));
        y[sh.j] = st<T>(silu * u);
    }
}

#define MANY_ARGS(T)                                                                            \
    const T *x, int rows, uint64_t k, const T *w0, const T *b0, T *y0, uint64_t n0, const T *w1, \
        const T *b1, T *y1, uint64_t n1, const T *w2, const T *b2, T *y2, uint64_t n2
#define LEAN_ARGS(T)                                                                            \
    const T *x, const T *g, float eps, int vthreads, uint64_t k, const T *w0, const T *b0, T *y0, \
        uint64_t n0, const T *w1, const T *b1, T *y1, uint64_t n1, const T *w2, const T *b2,    \
        T *y2, uint64_t n2
#define LEAN_F(T, SFX, S, F)                                                                    \
    extern "C" __global__ void gemv_lean_s##S##_f##F##_##SFX(LEAN_ARGS(T)) {                     \
        gemv_lean<T, S, F>(x, g, eps, vthreads, k, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2); \
    }                                                                                           \
    extern "C" __global__ void gemv_residual_s##S##_f##F##_##SFX(const T *x, uint64_t k, const T *w, \
                                                                 uint64_t n, const T *res, T *y) { \
        gemv_residual<T, S, F>(x, k, w, n, res, y);                                             \
    }
#define LEAN(T, SFX, S)                                                                         \
    LEAN_F(T, SFX, S, 1)                                                                        \
    LEAN_F(T, SFX, S, 2)                                                                        \
    extern "C" __global__ void gemv_swiglu_s##S##_##SFX(const T *x, const T *g, float eps,      \
                                                        int vthreads, uint64_t k, const T *wg,  \
                                                        const T *wu, uint64_t n, T *y) {        \
        gemv_swiglu<T, S>(x, g, eps, vthreads, k, wg, wu, n, y);                                \
    }
#define GEMV(T, SFX)                                                                            \
    extern "C" __global__ void gemv_many_##SFX(MANY_ARGS(T)) {                                     \
        gemv_many<T>(x, rows, k, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);               \
    }                                                                                           \
    LEAN(T, SFX, 1)                                                                             \
    LEAN(T, SFX, 2)                                                                             \
    LEAN(T, SFX, 4)
GEMV(__nv_bfloat16, bf16)
GEMV(__half, f16)
