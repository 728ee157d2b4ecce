// Dropout's kernels (launchers in dropout.rs; reference op: runtime/src/nn/dropout.rs, whose
// `mask`, `apply` and `add_into` compute the same numbers): the mask of a key, and dropout applied
// with its mask drawn in place (never stored) on the way into its destination.
#include "common.cuh"

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

DROPOUT_MASK(dropout_mask_f32, float, to_f32)
DROPOUT_MASK(dropout_mask_bf16, __nv_bfloat16, __float2bfloat16)
DROPOUT_MASK(dropout_mask_f16, __half, __float2half)

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
