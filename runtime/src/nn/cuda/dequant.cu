// Dequantization of bitsandbytes' 4-bit weights (launcher in dequant.rs; reference op: the candle
// path of `quant::Quant4::dequantize`). Each thread takes one byte (two codes, the first in the
// high nibble) and writes both values: code * its block's absmax in f32, rounded to T once.
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
