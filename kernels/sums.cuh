// sums.cuh — the f64 sums kernels share with their CPU twins, written once.
//   sum_sq_f64   Σ v[i]² over one row, one thread, in increasing i from −0.0: the order of
//                vqx::nearest::norm_sq_f64 (Rust's f64 `sum`), so norms are bit-identical.
//   inv_norm_f64 1/||v|| from that sum (0 for a zero row), as vqx::nearest::inv_norm_f64.
//   tree_f64     a fixed-order tree over a block's REDUCE_THREADS values in shared memory
//                (deterministic run to run); every thread of the block must call it.
//   block_partial_f64 the end of stage 1 of the two-stage reductions: this thread's `acc` into
//                the block's tree, the block's sum into partials[blockIdx.x].
//   sum_partials_f64  stage 2 of the two-stage reductions: one block sums the m partials of
//                stage 1 in a fixed order; the total is sh[0] after the call.
// Every multiply and add is a round-to-nearest intrinsic: nvcc may not contract them into fma.
#pragma once

#include "tiles.cuh"

static_assert((REDUCE_THREADS & (REDUCE_THREADS - 1)) == 0, "tree_f64 halves the block");

__device__ __forceinline__ double sum_sq_f64(const float* __restrict__ v, long long d)
{
    double s = -0.0;
    for (long long i = 0; i < d; ++i) {
        const double a = (double)v[i];
        s = __dadd_rn(s, __dmul_rn(a, a));
    }
    return s;
}

__device__ __forceinline__ double inv_norm_f64(const float* __restrict__ v, long long d)
{
    const double n = sqrt(sum_sq_f64(v, d));
    return n > 0.0 ? 1.0 / n : 0.0;
}

__device__ __forceinline__ void tree_f64(double* sh)
{
    for (int s = REDUCE_THREADS / 2; s > 0; s >>= 1) {
        __syncthreads();
        if ((int)threadIdx.x < s) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
    }
    __syncthreads();
}

__device__ __forceinline__ void block_partial_f64(double acc, double* sh,
                                                  double* __restrict__ partials)
{
    sh[threadIdx.x] = acc;
    tree_f64(sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

__device__ __forceinline__ void sum_partials_f64(const double* __restrict__ partials, long long m,
                                                 double* sh)
{
    double acc = 0.0;
    for (long long i = threadIdx.x; i < m; i += blockDim.x) acc = __dadd_rn(acc, partials[i]);
    sh[threadIdx.x] = acc;
    tree_f64(sh);
}
