// SwiGLU (launchers in swiglu.rs; reference ops: `nn::ops::swiglu` and `swiglu_backward`).
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(const T *g, const T *u, T *h, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float a = ld(g[i]);
        float silu = ld(st<T>(a / (1.0f + __expf(-a))));  // rounded like silu(g) * up in T
        h[i] = st<T>(silu * ld(u[i]));
    }
}
template <typename T>
__device__ void swiglu_bwd(const T *g, const T *u, const T *dh, T *dg, T *du, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float a = ld(g[i]), b = ld(u[i]), d = ld(dh[i]);
        float sg = 1.0f / (1.0f + __expf(-a));
        du[i] = st<T>(d * a * sg);
        dg[i] = st<T>(d * b * sg * (1.0f + a * (1.0f - sg)));
    }
}
#define SWIGLU(T, SFX)                                                                          \
    extern "C" __global__ void swiglu_fwd_##SFX(const T *g, const T *u, T *h, uint64_t n) {     \
        swiglu_fwd<T>(g, u, h, n);                                                              \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SFX(const T *g, const T *u, const T *dh, T *dg,     \
                                                T *du, uint64_t n) {                            \
        swiglu_bwd<T>(g, u, dh, dg, du, n);                                                     \
    }
SWIGLU(float, f32)
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(__half, f16)
