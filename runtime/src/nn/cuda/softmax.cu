// Attention's masked softmax (launchers in softmax.rs; reference op: the composite path of
// `nn::attention::attention` and `attention_backward` in runtime/src/nn/attention.rs).
#include "common.cuh"

// Rows of scores [R, t] ordered [b][group][s] (group = heads, GQA groups included), raw q·kᵀ.
// Row r is query s_idx = r % s of batch r / rows_per_batch; it sees key j when
// kstart[b] <= j < kend[b] (no ranges: every key), j >= qs[b * s + s_idx] (packed rows: the start
// of the query's example; no qs: 0) and, if causal, j <= offset + s_idx. A row that sees no key
// attends uniformly to all keys (what the additive-bias reference computes).
__device__ __forceinline__ void row_range(uint64_t r, uint32_t s, uint64_t rows_per_batch,
                                          uint32_t offset, int causal, const uint32_t *ks,
                                          const uint32_t *ke, const uint32_t *qs, uint64_t t,
                                          uint64_t *lo, uint64_t *hi) {
    uint64_t b = r / rows_per_batch;
    uint64_t q = r % s;
    uint64_t a = ks ? ks[b] : 0, e = ke ? ke[b] : t;
    if (qs && qs[b * s + q] > a) a = qs[b * s + q];
    if (causal && offset + q + 1 < e) e = offset + q + 1;
    if (a >= e) { a = 0; e = t; }  // no visible key: uniform over all keys
    *lo = a;
    *hi = e;
}

template <typename T>
__device__ void softmax_fwd(const T *scores, T *probs, float *mx, float *lsum, uint64_t t,
                            uint32_t s, uint64_t rpb, uint32_t offset, int causal,
                            const uint32_t *ks, const uint32_t *ke, const uint32_t *qs, float scale) {
    uint64_t r = blockIdx.x, lo, hi;
    row_range(r, s, rpb, offset, causal, ks, ke, qs, t, &lo, &hi);
    const T *x = scores + r * t;
    T *p = probs + r * t;
    float m = -INFINITY;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, ld(x[j]) * scale);
    m = block_max(m);
    float sum = 0.0f;
    for (uint64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) sum += __expf(ld(x[j]) * scale - m);
    sum = block_sum(sum);
    float ls = __logf(sum);
    if (threadIdx.x == 0) { mx[r] = m; lsum[r] = ls; }
    for (uint64_t j = threadIdx.x; j < t; j += blockDim.x)
        p[j] = st<T>(j >= lo && j < hi ? __expf(ld(x[j]) * scale - m - ls) : 0.0f);
}

// probs = softmax (recomputed from the saved row max and log-sum), ds = p * (dp - delta) * scale.
template <typename T>
__device__ void softmax_bwd(const T *scores, const T *dp, const float *mx, const float *lsum,
                            const float *delta, T *probs, T *ds, uint64_t t, uint32_t s,
                            uint64_t rpb, uint32_t offset, int causal, const uint32_t *ks,
                            const uint32_t *ke, const uint32_t *qs, float scale) {
    uint64_t r = blockIdx.x, lo, hi;
    row_range(r, s, rpb, offset, causal, ks, ke, qs, t, &lo, &hi);
    const T *x = scores + r * t;
    const T *g = dp + r * t;
    float m = mx[r], ls = lsum[r], dl = delta[r];
    for (uint64_t j = threadIdx.x; j < t; j += blockDim.x) {
        float p = j >= lo && j < hi ? __expf(ld(x[j]) * scale - m - ls) : 0.0f;
        probs[r * t + j] = st<T>(p);
        ds[r * t + j] = st<T>(p * (ld(g[j]) - dl) * scale);
    }
}
#define SOFTMAX(T, SFX)                                                                         \
    extern "C" __global__ void attn_softmax_fwd_##SFX(                                          \
        const T *x, T *p, float *mx, float *ls, uint64_t t, uint32_t s, uint64_t rpb,          \
        uint32_t off, int causal, const uint32_t *ks, const uint32_t *ke, const uint32_t *qs,  \
        float scale) {                                                                          \
        softmax_fwd<T>(x, p, mx, ls, t, s, rpb, off, causal, ks, ke, qs, scale);               \
    }                                                                                           \
    extern "C" __global__ void attn_softmax_bwd_##SFX(                                          \
        const T *x, const T *dp, const float *mx, const float *ls, const float *dl, T *p,      \
        T *ds, uint64_t t, uint32_t s, uint64_t rpb, uint32_t off, int causal,                 \
        const uint32_t *ks, const uint32_t *ke, const uint32_t *qs, float scale) {             \
        softmax_bwd<T>(x, dp, mx, ls, dl, p, ds, t, s, rpb, off, causal, ks, ke, qs, scale);   \
    }
SOFTMAX(float, f32)
SOFTMAX(__nv_bfloat16, bf16)
SOFTMAX(__half, f16)
