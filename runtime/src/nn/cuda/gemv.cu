// Decoding's projections (launchers in gemv.rs; reference ops: `nn::decode::projections`,
// `residual` and `swiglu`): y[m, j] = sum_k x[m, k] W[j, k] for at most MAX_ROWS rows m of x
// (the tokens of one decode step; the launcher passes at most 4), one warp an output feature j,
// the weight read once in 16-byte loads, accumulated in f32. The epilogues round as the reference
// ops' separate kernels do: the product to T, then the bias, the residual or SwiGLU.
//
// Two forms. `gemv_many` is the q/k/v kernel as measured on the GPU (2026-12-07): four loads in
// flight a lane with a serial tail, and an epilogue whose loop over a runtime row count indexes
// the accumulators dynamically (local memory). The lean form (`gemv_lean_rR`,
// `gemv_residual_rR`, `gemv_swiglu_rR`, R rows compiled in) keeps eight loads in flight a lane
// in few registers; `nn::decode` takes it only when told to (`QSCRIPT_DECODE_GEMV=all`) until it
// is measured. Its first version (a runtime row count up to 8 in registers, 137 a thread for
// gate/up) was correct and 1.1-3.1x slower than cuBLAS on every group but o (H200).
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

// The lean form: the row count R compiled in (the launcher picks 1, 2 or 4 for at most that
// many rows), eight 16-byte weight loads in flight a lane over the NW weight rows, issued
// before any is used and predicated on the row's end (zeros past it: no serial tail), each
// chunk of x read once for the NW rows. Every array is indexed by constants (registers), and
// few of them: 1 block of 8 warps an SM was all the first `8` form's 137 registers a thread
// left room for (2.7x slower than cuBLAS for gate/up, H200).
template <typename T, int NW, int R>
__device__ __forceinline__ void lean_dots(const T *__restrict__ x, const T *const *w, uint64_t k,
                                          int rows, float (*acc)[R]) {
    constexpr int U = 8 / NW;
    const int lane = threadIdx.x & 31;
    const int chunks = (int)(k / 8);
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 a[NW][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < NW; r++)
                a[r][u] = c < chunks ? __ldcs(reinterpret_cast<const uint4 *>(w[r]) + c)
                                     : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int m = 0; m < R; m++) {
                    if (m < rows) {
                        float xv[8];
                        unpack8<T>(*reinterpret_cast<const uint4 *>(x + m * k + (uint64_t)c * 8),
                                   xv);
#pragma unroll
                        for (int r = 0; r < NW; r++) {
                            float wv[8];
                            unpack8<T>(a[r][u], wv);
#pragma unroll
                            for (int i = 0; i < 8; i++) acc[r][m] = fmaf(wv[i], xv[i], acc[r][m]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NW; r++)
#pragma unroll
        for (int m = 0; m < R; m++)
            if (m < rows) acc[r][m] = warp_sum(acc[r][m]);
}

// This warp's output feature j of the concatenation n0 | n1 | n2 of up to three projections of
// one input (q, k, v): its weight, bias (null: none), output and count, and j within it; false
// past the last.
template <typename T>
__device__ __forceinline__ bool pick(uint64_t &j, const T *&w, const T *&b, T *&y, uint64_t &n,
                                     const T *w0, const T *b0, T *y0, uint64_t n0, const T *w1,
                                     const T *b1, T *y1, uint64_t n1, const T *w2, const T *b2,
                                     T *y2, uint64_t n2) {
    j = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5;
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
    uint64_t j, n;
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

// The same in the lean form, R rows compiled in.
template <typename T, int R>
__device__ void gemv_lean(const T *x, int rows, uint64_t k, const T *w0, const T *b0, T *y0,
                          uint64_t n0, const T *w1, const T *b1, T *y1, uint64_t n1,
                          const T *w2, const T *b2, T *y2, uint64_t n2) {
    uint64_t j, n;
    const T *w, *b;
    T *y;
    if (!pick<T>(j, w, b, y, n, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2)) return;
    float acc[1][R] = {};
    const T *wr[1] = {w + j * k};
    lean_dots<T, 1, R>(x, wr, k, rows, acc);
    if ((threadIdx.x & 31) == 0) {
        float bias = b ? ld(b[j]) : 0.0f;
#pragma unroll
        for (int m = 0; m < R; m++)
            if (m < rows) {
                float v = ld(st<T>(acc[0][m]));
                y[m * n + j] = b ? st<T>(v + bias) : st<T>(v);
            }
    }
}

// y = res + x W^T (o_proj and down_proj onto the residual stream; lean form).
template <typename T, int R>
__device__ void gemv_residual(const T *x, int rows, uint64_t k, const T *w, uint64_t n,
                              const T *res, T *y) {
    uint64_t j = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5;
    if (j >= n) return;
    float acc[1][R] = {};
    const T *wr[1] = {w + j * k};
    lean_dots<T, 1, R>(x, wr, k, rows, acc);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int m = 0; m < R; m++)
            if (m < rows) y[m * n + j] = st<T>(ld(st<T>(acc[0][m])) + ld(res[m * n + j]));
}

// y = silu(x Wg^T) * (x Wu^T): gate_proj, up_proj and SwiGLU in one pass (lean form).
template <typename T, int R>
__device__ void gemv_swiglu(const T *x, int rows, uint64_t k, const T *wg, const T *wu,
                            uint64_t n, T *y) {
    uint64_t j = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) >> 5;
    if (j >= n) return;
    float acc[2][R] = {};
    const T *wr[2] = {wg + j * k, wu + j * k};
    lean_dots<T, 2, R>(x, wr, k, rows, acc);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int m = 0; m < R; m++)
            if (m < rows) {
                float g = ld(st<T>(acc[0][m])), u = ld(st<T>(acc[1][m]));
                float silu = ld(st<T>(g / (1.0f + __expf(-g))));
                y[m * n + j] = st<T>(silu * u);
            }
}

#define MANY_ARGS(T)                                                                            \
    const T *x, int rows, uint64_t k, const T *w0, const T *b0, T *y0, uint64_t n0, const T *w1, \
        const T *b1, T *y1, uint64_t n1, const T *w2, const T *b2, T *y2, uint64_t n2
#define LEAN(T, SFX, R)                                                                         \
    extern "C" __global__ void gemv_lean_r##R##_##SFX(MANY_ARGS(T)) {                              \
        gemv_lean<T, R>(x, rows, k, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);           \
    }                                                                                           \
    extern "C" __global__ void gemv_residual_r##R##_##SFX(const T *x, int rows, uint64_t k,     \
                                                          const T *w, uint64_t n, const T *res, \
                                                          T *y) {                               \
        gemv_residual<T, R>(x, rows, k, w, n, res, y);                                          \
    }                                                                                           \
    extern "C" __global__ void gemv_swiglu_r##R##_##SFX(const T *x, int rows, uint64_t k,       \
                                                        const T *wg, const T *wu, uint64_t n,   \
                                                        T *y) {                                 \
        gemv_swiglu<T, R>(x, rows, k, wg, wu, n, y);                                            \
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
