// Decoding's attention (launcher in decode_attn.rs; reference op: `nn::attention`'s composite
// path): one query position per row, each query head against its KV head's cached keys, in one
// launch a layer (the composite path's two GEMMs, softmax and copies take five or more).
//
// A block per (query head, row); 8 warps, each taking every 8th key of the row's range with an
// online softmax of its own (running max, sum and weighted values, f32), four keys a step with
// their loads issued together; the warps' states are combined at the end. A lane holds EPL =
// head_dim / 32 consecutive elements of the query, the keys and the output.
//
// Keys of row r: [start, end) with start = starts[r] (0 without ranges) and end = min(ends[r]
// (t without ranges), limit) where `limit` is the causal bound (offset + 1 for a causal query,
// t otherwise). An empty range writes zeros.
#include "common.cuh"

#define WARPS 8
#define UNROLL 4

// EPL consecutive values of T to f32, in loads of up to 16 bytes (aligned to their size).
template <typename T, int EPL>
__device__ __forceinline__ void load_row(const T *p, float *o) {
    constexpr int BYTES = EPL * (int)sizeof(T);
    constexpr int WORD = BYTES < 16 ? BYTES : 16;
    constexpr int PER = WORD / (int)sizeof(T);
#pragma unroll
    for (int c = 0; c < BYTES / WORD; c++) {
        T v[PER];
        if constexpr (WORD == 16) {
            *reinterpret_cast<uint4 *>(v) = reinterpret_cast<const uint4 *>(p)[c];
        } else if constexpr (WORD == 8) {
            *reinterpret_cast<uint2 *>(v) = reinterpret_cast<const uint2 *>(p)[c];
        } else {
            *reinterpret_cast<uint32_t *>(v) = reinterpret_cast<const uint32_t *>(p)[c];
        }
#pragma unroll
        for (int i = 0; i < PER; i++) o[c * PER + i] = ld(v[i]);
    }
}

template <typename T, int EPL>
__device__ void decode_attn(const T *__restrict__ q, const T *__restrict__ k,
                            const T *__restrict__ v, T *__restrict__ out,
                            const uint32_t *__restrict__ starts, const uint32_t *__restrict__ ends,
                            int heads, int rep, int t, int limit, uint64_t sb, uint64_t sh,
                            uint64_t sk, float scale) {
    constexpr int D = EPL * 32;
    const int head = blockIdx.x, row = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = head / rep;
    int lo = starts ? (int)starts[row] : 0;
    int hi = ends ? (int)ends[row] : t;
    hi = min(hi, min(t, limit));
    const T *kb = k + row * sb + g * sh + lane * EPL;
    const T *vb = v + row * sb + g * sh + lane * EPL;

    float qv[EPL];
    load_row<T, EPL>(q + ((uint64_t)row * heads + head) * D + lane * EPL, qv);
#pragma unroll
    for (int e = 0; e < EPL; e++) qv[e] *= scale;

    float m = -INFINITY, l = 0.0f, acc[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) acc[e] = 0.0f;

    for (int j0 = lo + warp; j0 < hi; j0 += WARPS * UNROLL) {
        float kv[UNROLL][EPL], vv[UNROLL][EPL], s[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int j = j0 + u * WARPS;
            if (j < hi) {
                load_row<T, EPL>(kb + (uint64_t)j * sk, kv[u]);
                load_row<T, EPL>(vb + (uint64_t)j * sk, vv[u]);
            } else {
#pragma unroll
                for (int e = 0; e < EPL; e++) kv[u][e] = vv[u][e] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float d = 0.0f;
#pragma unroll
            for (int e = 0; e < EPL; e++) d = fmaf(qv[e], kv[u][e], d);
            s[u] = d;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < UNROLL; u++) s[u] += __shfl_xor_sync(0xffffffff, s[u], o);
        float mx = m;
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
            if (j0 + u * WARPS < hi) mx = fmaxf(mx, s[u]);
        const float c = __expf(m - mx);  // m = -inf on the first keys: c = 0, acc and l are 0
        l *= c;
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[e] *= c;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (j0 + u * WARPS < hi) {
                const float p = __expf(s[u] - mx);
                l += p;
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[e] = fmaf(p, vv[u][e], acc[e]);
            }
        }
        m = mx;
    }

    // The warps' states combined: out = sum_w acc_w e^(m_w - M) / sum_w l_w e^(m_w - M).
    __shared__ float sm[WARPS], sl[WARPS];
    __shared__ float sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < EPL; e++) sacc[warp][lane * EPL + e] = acc[e];
    __syncthreads();
    float big = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; w++) big = fmaxf(big, sm[w]);
    T *o = out + ((uint64_t)row * heads + head) * D;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float f = sm[w] == -INFINITY ? 0.0f : __expf(sm[w] - big);
            num = fmaf(sacc[w][e], f, num);
            den = fmaf(sl[w], f, den);
        }
        o[e] = st<T>(den > 0.0f ? num / den : 0.0f);
    }
}

#define DECODE_ATTN(T, SUFFIX, EPL)                                                              \
    extern "C" __global__ void decode_attn##EPL##_##SUFFIX(                                      \
        const T *q, const T *k, const T *v, T *out, const uint32_t *starts, const uint32_t *ends, \
        int heads, int rep, int t, int limit, uint64_t sb, uint64_t sh, uint64_t sk,             \
        float scale) {                                                                           \
        decode_attn<T, EPL>(q, k, v, out, starts, ends, heads, rep, t, limit, sb, sh, sk, scale); \
    }
#define DECODE_ATTN_ALL(T, SUFFIX) \
    DECODE_ATTN(T, SUFFIX, 2)      \
    DECODE_ATTN(T, SUFFIX, 4)      \
    DECODE_ATTN(T, SUFFIX, 8)

DECODE_ATTN_ALL(float, f32)
DECODE_ATTN_ALL(__nv_bfloat16, bf16)
DECODE_ATTN_ALL(__half, f16)
