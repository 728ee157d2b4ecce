// The gradient norm's sum of squares (launcher in grad_norm.rs; reference op: the composite path
// of `sum_of_squares` in mod.rs). common.cuh is nn/cuda's, on the include path build.rs gives nvcc.
#include "common.cuh"

// Per block, the sum of squares of its grid-stride share of g: out[blockIdx.x] (the caller sums
// the few partials). The gradient norm in one read of the buffer, no squared copy.
extern "C" __global__ void sumsq_f32(const float *g, float *out, uint64_t n) {
    float acc = 0.0f;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float v = g[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
