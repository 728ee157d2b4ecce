// In-place adds (launchers in accumulate.rs; reference ops: `nn::ops::add_into`, `add_bias` and
// `put_rows`, and the composite adds of `train::flat`'s gradient buffer).
#include "common.cuh"

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
// Row ids[r] of dst [*, h] (row r when ids is null) = (add: += ) row from[r] of x (row r when from
// is null) (distinct ids; the other rows untouched), a block per row, 16 bytes a thread where
// `vec` (rows of a multiple of 16 bytes, both buffers 16-byte aligned).
template <typename T>
__device__ void put_rows(T *dst, const uint32_t *ids, const T *x, const uint32_t *from, uint64_t rows,
                         uint64_t h, int add, int vec) {
    constexpr int V = 16 / sizeof(T);
    for (uint64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        T *dr = dst + (ids ? (uint64_t)ids[r] : r) * h;
        const T *xr = x + (from ? (uint64_t)from[r] : r) * h;
        if (vec) {
            uint4 *dv = reinterpret_cast<uint4 *>(dr);
            const uint4 *xv = reinterpret_cast<const uint4 *>(xr);
            for (uint64_t j = threadIdx.x; j < h / V; j += blockDim.x) {
                uint4 b = xv[j];
                if (add) {
                    uint4 a = dv[j];
                    T *pa = reinterpret_cast<T *>(&a);
                    const T *pb = reinterpret_cast<const T *>(&b);
#pragma unroll
                    for (int k = 0; k < V; k++) pa[k] = st<T>(ld(pa[k]) + ld(pb[k]));
                    dv[j] = a;
                } else {
                    dv[j] = b;
                }
            }
        } else if (add) {
            for (uint64_t j = threadIdx.x; j < h; j += blockDim.x) dr[j] = st<T>(ld(dr[j]) + ld(xr[j]));
        } else {
            for (uint64_t j = threadIdx.x; j < h; j += blockDim.x) dr[j] = xr[j];
        }
    }
}
#define ADDS(T, SFX)                                                                            \
    extern "C" __global__ void add_into_##SFX(T *dst, const T *x, uint64_t n, int vec) {        \
        add_into<T>(dst, x, n, vec);                                                            \
    }                                                                                           \
    extern "C" __global__ void bias_add_##SFX(T *y, const T *b, uint64_t rows, uint64_t d, int vec) { \
        bias_add<T>(y, b, rows, d, vec);                                                        \
    }                                                                                           \
    extern "C" __global__ void put_rows_##SFX(T *dst, const uint32_t *ids, const T *x,             \
                                              const uint32_t *from, uint64_t rows, uint64_t h, int add, \
                                              int vec) {                                        \
        put_rows<T>(dst, ids, x, from, rows, h, add, vec);                                      \
    }
ADDS(float, f32)
ADDS(__nv_bfloat16, bf16)
ADDS(__half, f16)
