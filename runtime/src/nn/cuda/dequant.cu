// Dequantization of bitsandbytes' 4-bit weights (launcher in dequant.rs; reference op: the candle
// path of `quant::Quant4::dequantize`). Each value is code * its block's absmax in f32, rounded to
// T once. `dequant4v` (every real weight: values a multiple of 16, blocks too) takes 16 codes a
// thread: one 8-byte load, one absmax, 16-byte stores; `dequant4` (any shape) a byte a thread.
// With double quantization a block's absmax is code256[q] * scale, then + offset, two roundings
// as bitsandbytes does them (no fused multiply-add).
#include "common.cuh"

__device__ __forceinline__ float block_absmax(uint64_t blk, const float *absmax,
                                              const uint8_t *absmax_q, const float *scales,
                                              const float *code256, float offset) {
    if (absmax_q == nullptr) return absmax[blk];
    return __fadd_rn(__fmul_rn(code256[absmax_q[blk]], scales[blk / 256]), offset);
}

template <typename T>
__device__ void dequant4(const uint8_t *packed, const float *code16, const float *absmax,
                         const uint8_t *absmax_q, const float *scales, const float *code256,
                         float offset, T *out, uint64_t n, uint32_t blocksize) {
    __shared__ float c[16];
    if (threadIdx.x < 16) c[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    uint64_t bytes = (n + 1) / 2;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < bytes;
         i += (uint64_t)blockDim.x * gridDim.x) {
        uint8_t b = packed[i];
        uint64_t e = 2 * i;
        float a = block_absmax(e / blocksize, absmax, absmax_q, scales, code256, offset);
        out[e] = st<T>(__fmul_rn(c[b >> 4], a));
        if (e + 1 < n) {
            float a1 = (e + 1) % blocksize == 0
                           ? block_absmax((e + 1) / blocksize, absmax, absmax_q, scales, code256,
                                          offset)
                           : a;
            out[e + 1] = st<T>(__fmul_rn(c[b & 15], a1));
        }
    }
}

#define DEQUANT4(T, SFX)                                                                        \
    extern "C" __global__ void dequant4_##SFX(const uint8_t *packed, const float *code16,      \
                                              const float *absmax, const uint8_t *absmax_q,    \
                                              const float *scales, const float *code256,       \
                                              float offset, T *out, uint64_t n,                \
                                              uint32_t blocksize) {                            \
        dequant4<T>(packed, code16, absmax, absmax_q, scales, code256, offset, out, n,         \
                    blocksize);                                                                 \
    }
DEQUANT4(float, f32)
DEQUANT4(__nv_bfloat16, bf16)
DEQUANT4(__half, f16)

// 16 values a thread (`groups` = values / 16; blocks of a multiple of 16 values, so a group never
// straddles two): the codes as one 8-byte load, the absmax once, the values as 16-byte stores.
template <typename T>
__device__ void dequant4v(const uint8_t *packed, const float *code16, const float *absmax,
                          const uint8_t *absmax_q, const float *scales, const float *code256,
                          float offset, T *out, uint32_t groups, uint32_t groups_per_block) {
    __shared__ float c[16];
    if (threadIdx.x < 16) c[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += blockDim.x * gridDim.x) {
        uint2 raw = reinterpret_cast<const uint2 *>(packed)[g];
        const uint8_t *b = reinterpret_cast<const uint8_t *>(&raw);
        float a = block_absmax(g / groups_per_block, absmax, absmax_q, scales, code256, offset);
        __align__(16) T v[16];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            v[2 * k] = st<T>(__fmul_rn(c[b[k] >> 4], a));
            v[2 * k + 1] = st<T>(__fmul_rn(c[b[k] & 15], a));
        }
        uint4 *o = reinterpret_cast<uint4 *>(out + (uint64_t)g * 16);
        const uint4 *src = reinterpret_cast<const uint4 *>(v);
#pragma unroll
        for (int k = 0; k < (int)(16 * sizeof(T) / 16); k++) o[k] = src[k];
    }
}

#define DEQUANT4V(T, SFX)                                                                       \
    extern "C" __global__ void dequant4v_##SFX(const uint8_t *packed, const float *code16,     \
                                               const float *absmax, const uint8_t *absmax_q,   \
                                               const float *scales, const float *code256,      \
                                               float offset, T *out, uint32_t groups,          \
                                               uint32_t groups_per_block) {                    \
        dequant4v<T>(packed, code16, absmax, absmax_q, scales, code256, offset, out, groups,   \
                     groups_per_block);                                                        \
    }
DEQUANT4V(float, f32)
DEQUANT4V(__nv_bfloat16, bf16)
DEQUANT4V(__half, f16)
