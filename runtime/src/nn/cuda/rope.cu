// RoPE (launcher in rope.rs; reference ops: `nn::ops::apply_rope` and `rope_backward`).
#include "common.cuh"

// HF's apply_rotary_pos_emb on x [b, s, h, d] in any layout with d contiguous (strides in
// elements for b, s, h of x and y), cos/sin [s, d] (+ cb * batch when per row, cb = 0 when shared),
// rounded like x * cos + rotate_half(x) * sin in T. With `bwd`, the transpose:
// dx = dy * cos + rotate_half_t(dy * sin). A block per token (grid-stride over the b * s tokens),
// its threads over the token's h * d/2 pairs (i, i + d/2), with 32-bit index arithmetic.
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, uint64_t b, uint64_t s, uint64_t h,
                     uint64_t d, uint64_t xb, uint64_t xs, uint64_t xh, uint64_t yb, uint64_t ys,
                     uint64_t yh, uint64_t cb, int bwd) {
    uint32_t half = (uint32_t)(d / 2), pairs = (uint32_t)h * half;
    for (uint64_t tok = blockIdx.x; tok < b * s; tok += gridDim.x) {
        uint64_t bb = tok / s, ss = tok % s;
        const T *cr = cos + bb * cb + ss * d, *sr = sin + bb * cb + ss * d;
        for (uint32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
            uint32_t hh = p / half, j = p % half;
            const T *xr = x + bb * xb + ss * xs + hh * xh;
            T *yr = y + bb * yb + ss * ys + hh * yh;
            float x1 = ld(xr[j]), x2 = ld(xr[j + half]);
            float c1 = ld(cr[j]), c2 = ld(cr[j + half]), s1 = ld(sr[j]), s2 = ld(sr[j + half]);
            auto r16 = [](float v) { return ld(st<T>(v)); };
            if (!bwd) {  // [x1, x2] * cos + [-x2, x1] * sin
                yr[j] = st<T>(r16(x1 * c1) + r16(-x2 * s1));
                yr[j + half] = st<T>(r16(x2 * c2) + r16(x1 * s2));
            } else {  // dy * cos + [dy2 * s2, -(dy1 * s1)]
                yr[j] = st<T>(r16(x1 * c1) + r16(x2 * s2));
                yr[j + half] = st<T>(r16(x2 * c2) - r16(x1 * s1));
            }
        }
    }
}
// A decode step's RoPE and cache write in one launch (reference: `rope` on q and k, then the
// cache's scatter of k and v). Row r's query heads q[r, 0..h) are roped into yq [b, h, d]
// (contiguous); its key heads k[r, 0..kv) roped and its value heads v[r, 0..kv) copied into rows
// index[(r * kv + j) * d] of the flat caches kc and vc ([*, d]; the scatter's index, a row id
// repeated d times). cos/sin [b, d]: each row's position. q, k, v: strides for the row and the
// head, d contiguous. Rounded as `rope` rounds. A block per (row, head) of the h + 2 kv.
template <typename T>
__device__ void rope_append(const T *q, uint64_t qb, uint64_t qh, const T *k, uint64_t kb,
                            uint64_t kh, const T *v, uint64_t vb, uint64_t vh, const T *cos,
                            const T *sin, T *yq, T *kc, T *vc, const uint32_t *index, uint64_t b,
                            uint64_t h, uint64_t kv, uint64_t d) {
    const uint64_t heads = h + 2 * kv;
    const uint32_t half = (uint32_t)(d / 2);
    auto r16 = [](float v) { return ld(st<T>(v)); };
    for (uint64_t blk = blockIdx.x; blk < b * heads; blk += gridDim.x) {
        const uint64_t r = blk / heads, j = blk % heads;
        if (j < h + kv) {
            const T *xr;
            T *yr;
            if (j < h) {
                xr = q + r * qb + j * qh;
                yr = yq + (r * h + j) * d;
            } else {
                const uint64_t jj = j - h;
                xr = k + r * kb + jj * kh;
                yr = kc + (uint64_t)index[(r * kv + jj) * d] * d;
            }
            const T *cr = cos + r * d, *sr = sin + r * d;
            for (uint32_t i = threadIdx.x; i < half; i += blockDim.x) {
                float x1 = ld(xr[i]), x2 = ld(xr[i + half]);
                float c1 = ld(cr[i]), c2 = ld(cr[i + half]), s1 = ld(sr[i]), s2 = ld(sr[i + half]);
                yr[i] = st<T>(r16(x1 * c1) + r16(-x2 * s1));
                yr[i + half] = st<T>(r16(x2 * c2) + r16(x1 * s2));
            }
        } else {
            const uint64_t jj = j - h - kv;
            const T *xr = v + r * vb + jj * vh;
            T *yr = vc + (uint64_t)index[(r * kv + jj) * d] * d;
            for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i];
        }
    }
}
#define ROPE(T, SFX)                                                                            \
    extern "C" __global__ void rope_##SFX(const T *x, const T *cos, const T *sin, T *y, uint64_t b, \
                                          uint64_t s, uint64_t h, uint64_t d, uint64_t xb,        \
                                          uint64_t xs, uint64_t xh, uint64_t yb, uint64_t ys,     \
                                          uint64_t yh, uint64_t cb, int bwd) {                    \
        rope<T>(x, cos, sin, y, b, s, h, d, xb, xs, xh, yb, ys, yh, cb, bwd);                   \
    }                                                                                           \
    extern "C" __global__ void rope_append_##SFX(                                               \
        const T *q, uint64_t qb, uint64_t qh, const T *k, uint64_t kb, uint64_t kh, const T *v,   \
        uint64_t vb, uint64_t vh, const T *cos, const T *sin, T *yq, T *kc, T *vc,                \
        const uint32_t *index, uint64_t b, uint64_t h, uint64_t kv, uint64_t d) {                 \
        rope_append<T>(q, qb, qh, k, kb, kh, v, vb, vh, cos, sin, yq, kc, vc, index, b, h, kv, d); \
    }
ROPE(float, f32)
ROPE(__nv_bfloat16, bf16)
ROPE(__half, f16)
