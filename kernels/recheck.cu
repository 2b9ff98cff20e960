// recheck.cu — the exactness recheck of the nearest kernels on the device (SPEC §1), the device
// side of vqx::nearest::finish: the indices that leave the device are those of an exact
// computation, and no row of x crosses the bus.
//
// What it computes
//   recheck_flag_f32   For each examined row r (all n rows, or the `*count_in` rows of `list_in`):
//                      the rounding bound err(||x_r||) of vqx::nearest::RoundingModel (the model's
//                      γ and dot-product factor come from the host, the largest code norm from
//                      row_norms_f32 on the device, 1 under cosine). A row whose margin
//                      second − best is NaN or ≤ 2·err is appended to `list_out` (order of the
//                      atomics, unspecified) and counted in *count_out; every other row gets its
//                      distance: ||x||² + best under L2 and (best + 1)/2 under cosine, or with
//                      exact_winner_distance the exact f64 distance to the winner (for rows
//                      scored at low precision, whose scores carry the operands' rounding),
//                      clamped at 0.
//   nearest_rows_f32   For the *count rows of `list`: nearest_f32's arithmetic per (row, code) —
//                      fmaf over d in increasing order, score fmaf(−2, dot, ||c||²) — and its
//                      (best index, best, runner-up) triple, written at the row's own position.
//                      The tf32/bf16 kernels' flagged rows are rescored here before the f64 pass.
//   nearest_exact_f64  For the *count rows of `list`: the exact distance to every code in f64 with
//                      the CPU's order of operations (vqx::nearest::exact_row: 8 lane accumulators,
//                      then the tail), the first minimum wins; writes the index and the distance.
//
// Launch shape (kernels/tiles.cuh; the launchers are in src/backend/cuda/launch.rs)
//   recheck_flag_f32: one thread per examined row, block = ROW_THREADS, grid-stride.
//   nearest_rows_f32, nearest_exact_f64: one listed row per block (grid-stride over the list; the
//   count is read on the device, so the grid is sized for the worst case), block = RECHECK_THREADS
//   threads over the codes, then a tree merge in shared memory (static, ≤ 4 KiB).
//
// Limits: n < 2^32 (row ids are u32), k < 2^32, d < 2^31. Inputs finite (the host validates).
// The per-row kernels read the codebook once per listed row: fine for the few percent of rows a
// recheck sees, slow if most rows are flagged (bf16 on uniform data).

#include "candidates.cuh"
#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

static_assert(RECHECK_THREADS == 256, "the tree merges below assume 256 threads");

// One term of sum_lanes in f64: (x − c)² or x·c.
template <bool SQUARED_DIFF>
__device__ __forceinline__ double lane_term(double a, double b) {
    if (SQUARED_DIFF) {
        const double u = __dsub_rn(a, b);
        return __dmul_rn(u, u);
    }
    return __dmul_rn(a, b);
}

// Σ_i f(x_i, c_i) in f64 like vqx::nearest::sum_lanes: 8 accumulators over whole chunks of 8,
// summed in lane order, plus the tail summed in order.
template <bool SQUARED_DIFF>
__device__ __forceinline__ double sum_lanes(const float* __restrict__ x,
                                            const float* __restrict__ c,
                                            int d) {
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    const int whole = d - d % 8;
    for (int i = 0; i < whole; i += 8) {
        for (int l = 0; l < 8; ++l) {
            const double a = (double)x[i + l], b = (double)c[i + l];
            acc[l] = __dadd_rn(acc[l], lane_term<SQUARED_DIFF>(a, b));
        }
    }
    double tail = 0.0;
    for (int i = whole; i < d; ++i) {
        const double a = (double)x[i], b = (double)c[i];
        tail = __dadd_rn(tail, lane_term<SQUARED_DIFF>(a, b));
    }
    double s = 0.0;
    for (int l = 0; l < 8; ++l) s = __dadd_rn(s, acc[l]);
    return __dadd_rn(s, tail);
}

// vqx::nearest::exact_distance before the clamp: ||x − c||² or 1 − cos(x, c).
__device__ __forceinline__ double exact_distance(const float* __restrict__ x, double x_inv,
                                                 const float* __restrict__ c, int d,
                                                 int cosine) {
    if (!cosine) return sum_lanes<true>(x, c, d);
    const double dot = sum_lanes<false>(x, c, d);
    return __dsub_rn(1.0, __dmul_rn(__dmul_rn(dot, x_inv), inv_norm_f64(c, d)));
}

extern "C" __global__ void recheck_flag_f32(const float* __restrict__ x,
                                            const float* __restrict__ cb,
                                            const unsigned long long* __restrict__ max_norm_bits,
                                            const unsigned int* __restrict__ list_in,
                                            const unsigned int* __restrict__ count_in,
                                            const unsigned int* __restrict__ best_idx,
                                            const float* __restrict__ best_score,
                                            const float* __restrict__ second_score,
                                            float* __restrict__ dist,
                                            unsigned int* __restrict__ list_out,
                                            unsigned int* __restrict__ count_out,
                                            long long n,
                                            int d,
                                            int cosine,
                                            int use_list,
                                            int exact_winner_distance,
                                            double gamma,
                                            double dot_factor)
{
    const long long m = use_list ? (long long)*count_in : n;
    const double cm = cosine ? 1.0 : __longlong_as_double((long long)*max_norm_bits);
    GRID_STRIDE_LOOP(j, m) {
        const long long r = use_list ? (long long)list_in[j] : j;
        const float* xr = x + r * d;
        const double x_norm_sq = sum_sq_f64(xr, d);
        const double x_norm = cosine ? 1.0 : sqrt(x_norm_sq);
        // RoundingModel's bound (vqx::nearest::Prepared::score_error); η covers underflow.
        const double eta = 2.0 * 0x1p-124 * (sqrt((double)d) * (x_norm + cm) + (double)d);
        const double err = gamma * cm * cm + 2.0 * x_norm * cm * dot_factor + eta;
        const double b = (double)best_score[r];
        const double margin = (double)second_score[r] - b;
        if (!(margin > 2.0 * err)) {  // NaN margins take the exact path too
            list_out[atomicAdd(count_out, 1u)] = (unsigned int)r;
        } else if (exact_winner_distance) {
            const double x_inv = cosine ? inv_norm_f64(xr, d) : 0.0;
            const double e = exact_distance(xr, x_inv, cb + (long long)best_idx[r] * d, d, cosine);
            dist[r] = (float)fmax(e, 0.0);
        } else {
            dist[r] = cosine ? (float)fmax(__dmul_rn(__dadd_rn(b, 1.0), 0.5), 0.0)
                             : (float)fmax(__dadd_rn(x_norm_sq, b), 0.0);
        }
    }
}

extern "C" __global__ void __launch_bounds__(RECHECK_THREADS)
nearest_rows_f32(const float* __restrict__ xs,
                 const float* __restrict__ cbs,
                 const float* __restrict__ norms,
                 const unsigned int* __restrict__ list,
                 const unsigned int* __restrict__ count,
                 unsigned int* __restrict__ best_out,
                 float* __restrict__ best_score_out,
                 float* __restrict__ second_score_out,
                 long long k,
                 int d)
{
    __shared__ Cand part[RECHECK_THREADS];
    const unsigned int m = *count;
    const float inf = __int_as_float(0x7f800000);
    for (unsigned int j = blockIdx.x; j < m; j += gridDim.x) {
        const long long r = list[j];
        const float* xr = xs + r * d;
        Cand c;
        c.idx = 0xffffffffu;
        c.best = inf;
        c.second = inf;
        // Codes in increasing order with a strict < : the smallest index among equal scores,
        // the runner-up counting duplicates, as nearest_f32 keeps them.
        for (long long code = threadIdx.x; code < k; code += RECHECK_THREADS) {
            const float* cr = cbs + code * d;
            float acc = 0.0f;
            for (int i = 0; i < d; ++i) acc = fmaf(xr[i], cr[i], acc);
            const float s = fmaf(-2.0f, acc, norms[code]);
            if (s < c.best) {
                c.second = c.best;
                c.best = s;
                c.idx = (unsigned int)code;
            } else if (s < c.second) {
                c.second = s;
            }
        }
        part[threadIdx.x] = c;
        __syncthreads();
        for (int half = RECHECK_THREADS / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) part[threadIdx.x] = merge_cand(part[threadIdx.x], part[threadIdx.x + half]);
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            best_out[r] = part[0].idx;
            best_score_out[r] = part[0].best;
            second_score_out[r] = part[0].second;
        }
        __syncthreads();  // part[] is reused by the next row
    }
}

extern "C" __global__ void __launch_bounds__(RECHECK_THREADS)
nearest_exact_f64(const float* __restrict__ x,
                  const float* __restrict__ cb,
                  const unsigned int* __restrict__ list,
                  const unsigned int* __restrict__ count,
                  unsigned int* __restrict__ idx_out,
                  float* __restrict__ dist_out,
                  long long k,
                  int d,
                  int cosine)
{
    __shared__ double best_d[RECHECK_THREADS];
    __shared__ unsigned int best_k[RECHECK_THREADS];
    const unsigned int m = *count;
    for (unsigned int j = blockIdx.x; j < m; j += gridDim.x) {
        const long long r = list[j];
        const float* xr = x + r * d;
        const double x_inv = cosine ? inv_norm_f64(xr, d) : 0.0;
        double bd = __longlong_as_double(0x7ff0000000000000LL);  // +inf
        unsigned int bk = 0xffffffffu;
        for (long long code = threadIdx.x; code < k; code += RECHECK_THREADS) {
            const double e = exact_distance(xr, x_inv, cb + code * d, d, cosine);
            if (e < bd) {
                bd = e;
                bk = (unsigned int)code;
            }
        }
        best_d[threadIdx.x] = bd;
        best_k[threadIdx.x] = bk;
        __syncthreads();
        for (int half = RECHECK_THREADS / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) {
                const double od = best_d[threadIdx.x + half];
                const unsigned int ok = best_k[threadIdx.x + half];
                if (od < best_d[threadIdx.x] || (od == best_d[threadIdx.x] && ok < best_k[threadIdx.x])) {
                    best_d[threadIdx.x] = od;
                    best_k[threadIdx.x] = ok;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            // exact_row starts from index 0 at +inf: an all-inf row (impossible for finite
            // inputs) would report code 0.
            idx_out[r] = best_k[0] == 0xffffffffu ? 0u : best_k[0];
            dist_out[r] = (float)fmax(best_d[0], 0.0);
        }
        __syncthreads();
    }
}
