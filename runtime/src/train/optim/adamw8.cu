// 8-bit AdamW's step (launcher in adamw8.rs; reference op: `Blockwise8::step_host` in
// eight_bit.rs). common.cuh is nn/cuda's, on the include path build.rs gives nvcc.
#include "common.cuh"

// The index of the value of the sorted code book q (in shared memory) nearest x; the lower one
// on a tie (as the reference's `nearest`).
__device__ __forceinline__ unsigned char nearest(const float *q, float x) {
    int lo = 0, hi = 256;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (q[mid] < x) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return 0;
    if (lo >= 256) return 255;
    return (x - q[lo - 1]) <= (q[lo] - x) ? (unsigned char)(lo - 1) : (unsigned char)lo;
}

// One quantization block per thread block (256 threads): dequantize both moments with the
// block's absmax, update them and the parameter in f32 (bitsandbytes' arithmetic), then quantize
// with the new absmax. lens[b] holds the block's length in its low 31 bits and the weight-decay
// flag in the top one. maps: the signed code book then the unsigned one.
#define ADAMW8(NAME, T, LOAD, STORE)                                                            \
    extern "C" __global__ void NAME(T *p, const float *g, const float *clip, unsigned char *cm,  \
                                    unsigned char *cv, float *am, float *av,                    \
                                    const long long *starts, const uint32_t *lens,              \
                                    const float *maps, float lr, float beta1, float beta2,      \
                                    float om1, float om2, float eps, float wd, float bc1,       \
                                    float bc2) {                                                \
        __shared__ float qm[256], qv[256], red[2][8], top[2];                                   \
        const int t = threadIdx.x, b = blockIdx.x;                                              \
        qm[t] = maps[t];                                                                        \
        qv[t] = maps[256 + t];                                                                  \
        const uint32_t ld = lens[b];                                                            \
        const uint32_t len = ld & 0x7fffffffu;                                                  \
        const bool decay = (ld >> 31) != 0;                                                     \
        const long long i = starts[b] + t;                                                      \
        const bool live = (uint32_t)t < len;                                                    \
        const float c = clip ? *clip : 1.0f;                                                    \
        __syncthreads();                                                                        \
        float m = 0.0f, v = 0.0f;                                                               \
        if (live) {                                                                             \
            m = qm[cm[i]] * am[b];                                                              \
            v = qv[cv[i]] * av[b];                                                              \
            float gi = g[i] * c;                                                                \
            m = beta1 * m + om1 * gi;                                                           \
            v = beta2 * v + om2 * gi * gi;                                                      \
            float pi = LOAD(p[i]);                                                              \
            if (decay && wd > 0.0f) pi *= 1.0f - lr * wd;                                       \
            pi -= (lr / bc1) * m / (sqrtf(v) / bc2 + eps);                                      \
            p[i] = STORE(pi);                                                                   \
        }                                                                                       \
        float xm = fabsf(m), xv = fabsf(v);                                                     \
        for (int o = 16; o > 0; o >>= 1) {                                                      \
            xm = fmaxf(xm, __shfl_xor_sync(0xffffffffu, xm, o));                                \
            xv = fmaxf(xv, __shfl_xor_sync(0xffffffffu, xv, o));                                \
        }                                                                                       \
        if ((t & 31) == 0) {                                                                    \
            red[0][t >> 5] = xm;                                                                \
            red[1][t >> 5] = xv;                                                                \
        }                                                                                       \
        __syncthreads();                                                                        \
        if (t == 0) {                                                                           \
            float a0 = 0.0f, a1 = 0.0f;                                                         \
            for (int w = 0; w < 8; ++w) {                                                       \
                a0 = fmaxf(a0, red[0][w]);                                                      \
                a1 = fmaxf(a1, red[1][w]);                                                      \
            }                                                                                   \
            top[0] = a0;                                                                        \
            top[1] = a1;                                                                        \
        }                                                                                       \
        __syncthreads();                                                                        \
        if (live) {                                                                             \
            cm[i] = nearest(qm, top[0] > 0.0f ? m / top[0] : 0.0f);                             \
            cv[i] = nearest(qv, top[1] > 0.0f ? v / top[1] : 0.0f);                             \
        }                                                                                       \
        if (t == 0) {                                                                           \
            am[b] = top[0];                                                                     \
            av[b] = top[1];                                                                     \
        }                                                                                       \
    }

// The tensors under min_8bit_size: f32 moments (sm, sv at offs[r] for run r), one thread block
// a run, striding over it.
#define ADAMW32RUNS(NAME, T, LOAD, STORE)                                                       \
    extern "C" __global__ void NAME(T *p, const float *g, const float *clip, float *sm,         \
                                    float *sv, const long long *starts, const uint32_t *lens,   \
                                    const long long *offs, float lr, float beta1, float beta2,  \
                                    float om1, float om2, float eps, float wd, float bc1,       \
                                    float bc2) {                                                \
        const int r = blockIdx.x;                                                               \
        const uint32_t ld = lens[r];                                                            \
        const uint32_t len = ld & 0x7fffffffu;                                                  \
        const bool decay = (ld >> 31) != 0;                                                     \
        const float c = clip ? *clip : 1.0f;                                                    \
        for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {                              \
            const long long i = starts[r] + j, k = offs[r] + j;                                 \
            float gi = g[i] * c;                                                                \
            float m = beta1 * sm[k] + om1 * gi;                                                 \
            float v = beta2 * sv[k] + om2 * gi * gi;                                            \
            sm[k] = m;                                                                          \
            sv[k] = v;                                                                          \
            float pi = LOAD(p[i]);                                                              \
            if (decay && wd > 0.0f) pi *= 1.0f - lr * wd;                                       \
            pi -= (lr / bc1) * m / (sqrtf(v) / bc2 + eps);                                      \
            p[i] = STORE(pi);                                                                   \
        }                                                                                       \
    }

__device__ __forceinline__ float from_bf16(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float from_f16(__half x) { return __half2float(x); }
ADAMW8(adamw8_f32, float, to_f32, to_f32)
ADAMW8(adamw8_bf16, __nv_bfloat16, from_bf16, __float2bfloat16)
ADAMW8(adamw8_f16, __half, from_f16, __float2half)
ADAMW32RUNS(adamw32runs_f32, float, to_f32, to_f32)
ADAMW32RUNS(adamw32runs_bf16, __nv_bfloat16, from_bf16, __float2bfloat16)
ADAMW32RUNS(adamw32runs_f16, __half, from_f16, __float2half)
