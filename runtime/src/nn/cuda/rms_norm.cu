// RMSNorm (launchers in rms_norm.rs; reference ops: `nn::ops::rms_norm` and `rms_norm_backward`).
#include "common.cuh"

// HF's arithmetic: y = T(T(x * rstd) * w), rstd = rsqrt(mean(x^2) + eps) in f32. One block a row.
template <typename T>
__device__ void rms_fwd(const T *x, const T *w, T *y, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        y[r * d + j] = st<T>(ld(st<T>(ld(xr[j]) * rstd)) * ld(w[j]));
}
// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w.
template <typename T>
__device__ void rms_bwd(const T *x, const T *w, const T *dy, T *dx, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    const T *gr = dy + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    float dot = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        dot += ld(gr[j]) * ld(w[j]) * ld(xr[j]) * rstd;
    dot = block_sum(dot) / (float)d;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) {
        float xh = ld(xr[j]) * rstd;
        dx[r * d + j] = st<T>(rstd * (ld(gr[j]) * ld(w[j]) - xh * dot));
    }
}
#define RMS(T, SFX)                                                                             \
    extern "C" __global__ void rms_fwd_##SFX(const T *x, const T *w, T *y, uint64_t d,          \
                                             float eps) {                                       \
        rms_fwd<T>(x, w, y, d, eps);                                                            \
    }                                                                                           \
    extern "C" __global__ void rms_bwd_##SFX(const T *x, const T *w, const T *dy, T *dx,        \
                                             uint64_t d, float eps) {                           \
        rms_bwd<T>(x, w, dy, dx, d, eps);                                                       \
    }
RMS(float, f32)
RMS(__nv_bfloat16, bf16)
RMS(__half, f16)

// The reference's per-row terms of RMSNorm's weight gradient, dy * T(xhat) in f32 [rows, d]; the
// caller sums the rows with a GEMM straight into the gradient. One block a row.
template <typename T>
__device__ void rms_dw_rows(const T *x, const T *dy, float *out, uint64_t d, float eps) {
    uint64_t r = blockIdx.x;
    const T *xr = x + r * d;
    float ss = 0.0f;
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(xr[j]); ss += v * v; }
    ss = block_sum(ss);
    float rstd = rsqrtf(ss / (float)d + eps);
    for (uint64_t j = threadIdx.x; j < d; j += blockDim.x)
        out[r * d + j] = ld(dy[r * d + j]) * ld(st<T>(ld(xr[j]) * rstd));
}
#define RMS_DW(T, SFX)                                                                          \
    extern "C" __global__ void rms_dw_rows_##SFX(const T *x, const T *dy, float *out, uint64_t d, float eps) { \
        rms_dw_rows<T>(x, dy, out, d, eps);                                                     \
    }
RMS_DW(float, f32)
RMS_DW(__nv_bfloat16, bf16)
RMS_DW(__half, f16)
