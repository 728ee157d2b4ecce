// Cross-entropy rows (launcher in cross_entropy.rs; reference op: the composite path of
// `nn::loss::causal_lm_loss` in runtime/src/nn/loss.rs).
#include "common.cuh"

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
