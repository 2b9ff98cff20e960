// ema_update.cu — the EMA training step on the device (SPEC §4), bit-identical to the CPU twins
// in src/ema/update.rs (EmaState), src/nearest/mod.rs (normalize_row) and the quantizer's
// dead-code re-seeding (src/quantizer/mod.rs). State: cluster_size N (K f32), embed_avg m
// (K×D f32, row-major), codebook c (K×D f32).
//
// ema_update_f32 — N_k ← fmaf(w, n_k − N_k, N_k), m ← fmaf(w, s − m, m), w = (float)(1 − decay)
//   computed by the host in f64 (EmaState::update's lerp, `w.mul_add(new - old, old)`).
//   1-D grid-stride loop over the K·D sums (element e < K also updates N_e), block = 256,
//   grid = min(ceil(K·D / 256), 32 × the SM count).
//
// ema_total_f32 — total[0] = Σ_k N_k as a sequential f32 sum in increasing k starting from −0.0,
//   exactly Rust's `iter().sum::<f32>()`. One thread (grid = block = 1): the sum's order is what
//   makes it bit-identical, so it is not parallelised (K adds, tiny next to the step).
//
// ema_codebook_f32 — c_k = m_k / Ñ_k with Ñ_k = (N_k + ε) / (total + (float)K·ε) · total
//   (EmaState::smoothed_counts's operation order, each operation rounded on its own), then for
//   cosine each row scaled as normalize_row does: 1/sqrt(Σ (double)c² sequential from −0.0), 0
//   for a zero row, c ← (float)((double)c · inv). One block per code (grid-stride over codes,
//   grid = min(K, 2^16)), threads over the D columns (block = the launcher's choice, a multiple
//   of 32 up to ROW_MAX_THREADS; wider rows are looped); the norm is one thread's sequential sum.
//
// reseed_f32 — for m pairs (codes[j], rows[j]): codebook[code] = x[row] (normalised as above when
//   cosine), cluster_size[code] = count, embed_avg[code] = v·count (f32 product): the quantizer's
//   reseed_dead_codes + EmaState::reset. One block per pair (grid-stride, grid = min(m, 2^16)),
//   threads over columns as ema_codebook_f32. Codes must be distinct (two pairs naming one code
//   would race); a pair with code ≥ K or row ≥ N is skipped, so no launch touches memory
//   outside the buffers.
//
// usage_accumulate_u64 — total[k] += counts[k] (the cumulative usage), grid-stride over K.
//
// Every multiply and add is written as a round-to-nearest intrinsic so that nvcc cannot contract
// it into an fma the CPU does not do (the emulator builds with -ffp-contract=off); fmaf where the
// CPU uses mul_add. Division and sqrt are IEEE-correct (no fast-math).
//
// Limits: K·D < 2^63, K < 2^32, D < 2^31.

#include "sums.cuh"
#include "tiles.cuh"
#include "grid.cuh"

extern "C" __global__ void ema_update_f32(float* __restrict__ cluster_size,
                                          float* __restrict__ embed_avg,
                                          const unsigned int* __restrict__ counts,
                                          const float* __restrict__ sums,
                                          float w,
                                          long long k,
                                          long long d)
{
    const long long total = k * d;
    GRID_STRIDE_LOOP(e, total) {
        const float m = embed_avg[e];
        embed_avg[e] = fmaf(w, __fsub_rn(sums[e], m), m);
        if (e < k) {
            const float n = cluster_size[e];
            cluster_size[e] = fmaf(w, __fsub_rn((float)counts[e], n), n);
        }
    }
}

extern "C" __global__ void ema_total_f32(const float* __restrict__ cluster_size,
                                         long long k,
                                         float* __restrict__ total)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float acc = -0.0f;  // Rust's f32 sum starts from −0.0
    for (long long i = 0; i < k; ++i) acc = __fadd_rn(acc, cluster_size[i]);
    total[0] = acc;
}

extern "C" __global__ void ema_codebook_f32(const float* __restrict__ cluster_size,
                                            const float* __restrict__ embed_avg,
                                            const float* __restrict__ total,
                                            float eps,
                                            long long k,
                                            long long d,
                                            int cosine,
                                            float* __restrict__ codebook)
{
    __shared__ double inv;
    const float t = total[0];
    const float denom = __fadd_rn(t, __fmul_rn((float)k, eps));
    for (long long code = blockIdx.x; code < k; code += gridDim.x) {
        const float smoothed = __fmul_rn(__fdiv_rn(__fadd_rn(cluster_size[code], eps), denom), t);
        float* row = codebook + code * d;
        const float* m = embed_avg + code * d;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) row[j] = __fdiv_rn(m[j], smoothed);
        if (cosine) {
            __syncthreads();  // the whole row is written before one thread sums it
            if (threadIdx.x == 0) inv = inv_norm_f64(row, d);
            __syncthreads();
            for (long long j = threadIdx.x; j < d; j += blockDim.x) {
                row[j] = (float)__dmul_rn((double)row[j], inv);
            }
            __syncthreads();  // every thread has read inv before the next code overwrites it
        }
    }
}

extern "C" __global__ void reseed_f32(const float* __restrict__ x,
                                      const unsigned int* __restrict__ codes,
                                      const unsigned int* __restrict__ rows,
                                      long long m,
                                      long long n,
                                      long long k,
                                      long long d,
                                      float count,
                                      int cosine,
                                      float* __restrict__ codebook,
                                      float* __restrict__ cluster_size,
                                      float* __restrict__ embed_avg)
{
    __shared__ double inv;
    for (long long p = blockIdx.x; p < m; p += gridDim.x) {
        const long long code = codes[p];
        const long long r = rows[p];
        // Uniform over the block: every thread skips the same pairs, so the barriers match.
        if (code >= k || r >= n) continue;
        const float* src = x + r * d;
        if (cosine) {
            if (threadIdx.x == 0) inv = inv_norm_f64(src, d);
            __syncthreads();
        }
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            float v = src[j];
            if (cosine) v = (float)__dmul_rn((double)v, inv);
            codebook[code * d + j] = v;
            embed_avg[code * d + j] = __fmul_rn(v, count);
        }
        if (threadIdx.x == 0) cluster_size[code] = count;
        if (cosine) __syncthreads();  // inv is read by all before the next pair overwrites it
    }
}

extern "C" __global__ void usage_accumulate_u64(unsigned long long* __restrict__ total,
                                                const unsigned int* __restrict__ counts,
                                                long long k)
{
    GRID_STRIDE_LOOP(i, k) {
        total[i] += (unsigned long long)counts[i];
    }
}
