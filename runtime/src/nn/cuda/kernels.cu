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

__device__ __forceinline__ float uniform(uint64_t key, uint64_t i) {
    uint64_t z = splitmix(key ^ (i * 0x9E3779B97F4A7C15ull));
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

#define DROPOUT_MASK(NAME, T, CONVERT)                                                          \
    extern "C" __global__ void NAME(T *out, uint64_t key, float p, float keep, uint64_t n) {     \
        for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;               \
             i += (uint64_t)blockDim.x * gridDim.x) {                                           \
            out[i] = CONVERT(uniform(key, i) < p ? 0.0f : keep);                                \
        }                                                                                       \
    }

__device__ __forceinline__ float to_f32(float x) { return x; }
DROPOUT_MASK(dropout_mask_f32, float, to_f32)
DROPOUT_MASK(dropout_mask_bf16, __nv_bfloat16, __float2bfloat16)
DROPOUT_MASK(dropout_mask_f16, __half, __float2half)

// One AdamW step over a flat buffer, in place (torch.optim.AdamW's arithmetic, f32 states):
// g is scaled by *clip (the clipping factor, a device scalar, or 1 when clip is null); decay,
// when not null, is 1 where weight decay applies.
#define ADAMW(NAME, T, LOAD, STORE)                                                             \
    extern "C" __global__ void NAME(T *p, float *m, float *v, const float *g, const float *clip, \
                                    const float *decay, float lr, float beta1, float beta2,     \
                                    float eps, float wd, float bc1, float bc2, uint64_t n) {    \
        float c = clip ? *clip : 1.0f;                                                          \
        for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;               \
             i += (uint64_t)blockDim.x * gridDim.x) {                                           \
            float gi = g[i] * c;                                                                \
            float pi = LOAD(p[i]);                                                              \
            if (decay && decay[i] != 0.0f) pi *= 1.0f - lr * wd;                                \
            float mi = beta1 * m[i] + (1.0f - beta1) * gi;                                      \
            float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;                                 \
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
