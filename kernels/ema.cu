// ema.cu — per-code sums and counts for the EMA codebook update (SPEC §4):
//   sums[k, :] = Σ_{n : idx[n] = k} x[n, :]   (K×D, row-major f32)
//   counts[k]  = #{n : idx[n] = k}            (K × u32)
// The host validates every index against K before launching.
//
// ema_sums_atomic_f32 — the fast mode
//   1-D grid-stride loop over the N·D elements of x; each element is added to its code's row with
//   a float atomicAdd, and the thread holding column 0 of a row adds 1 to the row's count. The
//   launcher zeroes `sums` and `counts` first. block = 256 threads,
//   grid = min(ceil(N·D / 256), 32 × the SM count).
//   f32 atomics land in whatever order the hardware serves them: the last bits of a sum may
//   differ run to run (error of any summation order: ≤ (n_k − 1)·2^-24·Σ|x| per element).
//
// ema_sums_sorted_f32 — the deterministic mode
//   The stable counting sort of kernels/sort.cu (on the device, equal to vqx::ema::group_by_code)
//   gives offsets (K + 1 × u64) and row ids (N × u32) grouped by code, each group in increasing
//   row order. One block per code
//   (grid-stride over codes, grid = min(K, 2^24)), threads over the D columns (block = the
//   launcher's choice, a multiple of 32 up to 256; columns beyond blockDim are looped). Each
//   column is accumulated in f64 over the code's rows in that fixed order and rounded once to f32,
//   exactly as the CPU twin does: bit-identical run to run and to vqx::ema::cpu. counts[k] is
//   offsets[k+1] − offsets[k]. No atomics; every output element is written exactly once.
//   Limit: a code that owns most rows is summed by one block (skewed batches are slower).
//
// Limits: N·D < 2^63, K < 2^32, D < 2^31.

#include "tiles.cuh"
#include "grid.cuh"

extern "C" __global__ void ema_sums_atomic_f32(const float* __restrict__ x,
                                               const unsigned int* __restrict__ idx,
                                               float* __restrict__ sums,
                                               unsigned int* __restrict__ counts,
                                               long long n,
                                               long long d)
{
    const long long total = n * d;
    GRID_STRIDE_LOOP(e, total) {
        const long long row = e / d;
        const long long col = e - row * d;
        const unsigned int code = idx[row];
        atomicAdd(&sums[(long long)code * d + col], x[e]);
        if (col == 0) atomicAdd(&counts[code], 1u);
    }
}

extern "C" __global__ void ema_sums_sorted_f32(const float* __restrict__ x,
                                               const unsigned long long* __restrict__ offsets,
                                               const unsigned int* __restrict__ rows,
                                               float* __restrict__ sums,
                                               unsigned int* __restrict__ counts,
                                               long long k,
                                               long long d)
{
    for (long long code = blockIdx.x; code < k; code += gridDim.x) {
        const unsigned long long begin = offsets[code];
        const unsigned long long end = offsets[code + 1];
        for (long long col = threadIdx.x; col < d; col += blockDim.x) {
            double acc = 0.0;
            for (unsigned long long r = begin; r < end; ++r) {
                acc += (double)x[(long long)rows[r] * d + col];
            }
            sums[code * d + col] = (float)acc;
        }
        if (threadIdx.x == 0) counts[code] = (unsigned int)(end - begin);
    }
}
