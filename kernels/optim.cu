// optim.cu — the optimiser of `vqx train` on the device: AdamW over one flat parameter buffer and
// clipping by global norm, bit-identical to src/train/optim.rs where the CPU's order allows.
//
// The tensors of the CPU optimiser laid end to end form one buffer of P floats; elements before
// `first` (a frozen prefix: whole tensors) are never read or written.
//
// adamw_f32 — one grid-stride pass over e in [first, n): as AdamW::step_from per value, in f64
//   with the CPU's operations and order (no contraction into fma: explicit _rn intrinsics):
//     g = (double)grads[e]
//     m' = beta1·m + omb1·g          v' = beta2·v + (omb2·g)·g
//     m, v ← (float)m', (float)v'
//     u = (m'/bc1) / (sqrt(v'/bc2) + eps)
//     p ← (float)(p·s − lr·u),  s = shrink where decay[e] != 0, else 1.0
//   The scalars (omb1 = 1 − beta1, omb2 = 1 − beta2, bias corrections bc1, bc2, shrink =
//   1 − lr·weight_decay) are computed once on the host exactly as the CPU computes them.
//   Double division and sqrt are correctly rounded on the device (IEEE), as on the CPU.
//
// sq_sum_partial_f64 — stage 1 of Σ_{e in [first, n)} (double)g[e]·(double)g[e] (each product
//   is exact: 24-bit × 24-bit significands fit in 53 bits). Grid = REDUCE_BLOCKS blocks of
//   REDUCE_THREADS threads (tiles.cuh) whatever n: each thread sums its grid-stride elements in
//   order, each block reduces its threads in a fixed tree into partials[blockIdx.x].
// global_norm_f64 — stage 2: norm[0] = sqrt(Σ partials[0..m)) by one block of REDUCE_THREADS
//   threads (a fixed strided subset each, then the fixed tree). Grid = 1.
//   The result is deterministic run to run; the CPU sums in element order, so the two agree to
//   ~n·2^-53 relative (all terms ≥ 0).
// clip_by_norm_f32 — reads norm[0] on the device; when max_norm > 0 and norm > max_norm,
//   s = max_norm / (norm + 1e-12) and every g[e], e in [first, n), becomes (float)((double)g·s),
//   as clip_global_norm scales. Otherwise nothing is written.
//
// Limits: n < 2^63.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

extern "C" __global__ void __launch_bounds__(GRID_STRIDE_THREADS)
adamw_f32(float* __restrict__ params,
          const float* __restrict__ grads,
          float* __restrict__ m,
          float* __restrict__ v,
          const unsigned int* __restrict__ decay,
          long long first,
          long long n,
          double beta1,
          double omb1,
          double beta2,
          double omb2,
          double bc1,
          double bc2,
          double eps,
          double lr,
          double shrink)
{
    GRID_STRIDE_LOOP_FROM(e, first, n) {
        const double g = (double)grads[e];
        const double mj = __dadd_rn(__dmul_rn(beta1, (double)m[e]), __dmul_rn(omb1, g));
        const double vj =
            __dadd_rn(__dmul_rn(beta2, (double)v[e]), __dmul_rn(__dmul_rn(omb2, g), g));
        m[e] = (float)mj;
        v[e] = (float)vj;
        const double update =
            __ddiv_rn(__ddiv_rn(mj, bc1), __dadd_rn(__dsqrt_rn(__ddiv_rn(vj, bc2)), eps));
        const double s = decay[e] != 0u ? shrink : 1.0;
        params[e] = (float)__dsub_rn(__dmul_rn((double)params[e], s), __dmul_rn(lr, update));
    }
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sq_sum_partial_f64(const float* __restrict__ g,
                   long long first,
                   long long n,
                   double* __restrict__ partials)
{
    __shared__ double sh[REDUCE_THREADS];
    double acc = 0.0;
    GRID_STRIDE_LOOP_FROM(e, first, n) {
        const double x = (double)g[e];
        acc = __dadd_rn(acc, __dmul_rn(x, x));
    }
    block_partial_f64(acc, sh, partials);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
global_norm_f64(const double* __restrict__ partials, long long m, double* __restrict__ norm)
{
    __shared__ double sh[REDUCE_THREADS];
    sum_partials_f64(partials, m, sh);
    if (threadIdx.x == 0) norm[0] = __dsqrt_rn(sh[0]);
}

extern "C" __global__ void __launch_bounds__(GRID_STRIDE_THREADS)
clip_by_norm_f32(float* __restrict__ g,
                 long long first,
                 long long n,
                 const double* __restrict__ norm,
                 double max_norm)
{
    const double nrm = norm[0];
    if (!(max_norm > 0.0 && nrm > max_norm)) return;
    const double s = __ddiv_rn(max_norm, __dadd_rn(nrm, 1e-12));
    GRID_STRIDE_LOOP_FROM(e, first, n) {
        g[e] = (float)__dmul_rn((double)g[e], s);
    }
}
