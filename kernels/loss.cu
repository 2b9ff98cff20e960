// loss.cu — the statistics of a training step as a few bytes on the device (SPEC §2, §5):
// deterministic run to run (a fixed grid, fixed-order tree reductions, no float atomics).
//
// sq_err_partial_f64 — stage 1 of Σ_rows Σ_d ((double)x − (double)q)² over the N×D rows
//   (with use_mask != 0 only rows whose mask flag is non-zero; the mask pointer is always
//   passed, read only when use_mask != 0). Grid = REDUCE_BLOCKS blocks of REDUCE_THREADS
//   threads (tiles.cuh) whatever N and D: each thread sums its grid-stride elements in order,
//   each block reduces its threads in a fixed tree and writes partials[blockIdx.x].
//   The CPU's mean_sq_diff sums in another order: the two agree to ~(D + N)·2^-53 relative
//   (all terms are ≥ 0), checked at 1e-12.
//
// reduce_f64 — stage 2: out[0] = Σ partials[0..m) by one block of REDUCE_THREADS threads
//   (each sums a fixed strided subset in order, then the fixed tree). Grid = 1.
//
// usage_count_partial_u64 — stage 1 of the histogram's total Σ counts and used count
//   #{k : counts[k] > 0}: partials[b] and partials[REDUCE_BLOCKS + b] per block. Integer sums:
//   exact whatever the order.
// usage_entropy_partial_f64 — stage 1 of the entropy −Σ p·ln(p + 1e-10), p = (double)c /
//   (double)total, as usage::UsageSummary computes each term (0 when total = 0). Every block
//   first adds the REDUCE_BLOCKS count partials (exact) to get the total; block 0 writes
//   totals[0] = total, totals[1] = used. Then partials[blockIdx.x] as in sq_err_partial_f64;
//   reduce_f64 finishes it. The host takes perplexity = exp(entropy). The device's log is
//   within 1 ulp of the C library's: the entropy agrees to ~1e-15 relative, checked at 1e-12.
//
// Limits: N·D < 2^63, K < 2^63. Shapes are fixed (REDUCE_BLOCKS × REDUCE_THREADS, asserted in
// sums.cuh and launch.rs) so that a result depends only on the inputs, never on the device.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
sq_err_partial_f64(const float* __restrict__ x,
                   const float* __restrict__ q,
                   const unsigned int* __restrict__ mask,
                   int use_mask,
                   long long n,
                   long long d,
                   double* __restrict__ partials)
{
    __shared__ double sh[REDUCE_THREADS];
    const long long total = n * d;
    double acc = 0.0;
    GRID_STRIDE_LOOP(e, total) {
        if (use_mask && mask[e / d] == 0u) continue;
        const double t = __dsub_rn((double)x[e], (double)q[e]);
        acc = __dadd_rn(acc, __dmul_rn(t, t));
    }
    block_partial_f64(acc, sh, partials);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
reduce_f64(const double* __restrict__ partials, long long m, double* __restrict__ out)
{
    __shared__ double sh[REDUCE_THREADS];
    sum_partials_f64(partials, m, sh);
    if (threadIdx.x == 0) out[0] = sh[0];
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
usage_count_partial_u64(const unsigned int* __restrict__ counts,
                        long long k,
                        unsigned long long* __restrict__ partials)
{
    __shared__ unsigned long long tot[REDUCE_THREADS];
    __shared__ unsigned long long used[REDUCE_THREADS];
    unsigned long long t = 0, u = 0;
    GRID_STRIDE_LOOP(i, k) {
        t += counts[i];
        u += counts[i] > 0u ? 1u : 0u;
    }
    tot[threadIdx.x] = t;
    used[threadIdx.x] = u;
    for (int s = REDUCE_THREADS / 2; s > 0; s >>= 1) {
        __syncthreads();
        if ((int)threadIdx.x < s) {
            tot[threadIdx.x] += tot[threadIdx.x + s];
            used[threadIdx.x] += used[threadIdx.x + s];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = tot[0];
        partials[REDUCE_BLOCKS + blockIdx.x] = used[0];
    }
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
usage_entropy_partial_f64(const unsigned int* __restrict__ counts,
                          long long k,
                          const unsigned long long* __restrict__ count_partials,
                          unsigned long long* __restrict__ totals,
                          double* __restrict__ partials)
{
    __shared__ double sh[REDUCE_THREADS];
    __shared__ unsigned long long total;
    if (threadIdx.x == 0) {
        unsigned long long t = 0, u = 0;
        for (int b = 0; b < REDUCE_BLOCKS; ++b) {
            t += count_partials[b];
            u += count_partials[REDUCE_BLOCKS + b];
        }
        total = t;
        if (blockIdx.x == 0) {
            totals[0] = t;
            totals[1] = u;
        }
    }
    __syncthreads();
    double acc = 0.0;
    if (total != 0) {
        const double td = (double)total;
        GRID_STRIDE_LOOP(i, k) {
            const double p = (double)counts[i] / td;
            acc = __dadd_rn(acc, __dmul_rn(-p, log(__dadd_rn(p, 1e-10))));
        }
    }
    block_partial_f64(acc, sh, partials);
}
