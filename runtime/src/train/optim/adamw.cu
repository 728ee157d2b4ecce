// AdamW's step (launcher in adamw.rs; reference op: the composite path of `AdamW::step` in
// mod.rs). common.cuh is nn/cuda's, on the include path build.rs gives nvcc.
#include "common.cuh"

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
