// nearest.cu — fused exact-f32 distance-argmin (SPEC §1), the CUDA side of vqx::nearest.
//
// What it computes
//   For each row x_n (N×D, row-major f32) against a codebook C (K×D, row-major f32) with
//   precomputed norms[k] = ||c_k||² (f32, given by the host):
//       s_k = norms[k] − 2·(x_n · c_k)
//   and writes per row the index of the smallest score (ties → smallest k), that score, and the
//   runner-up score (second smallest, counting duplicates; +inf when K = 1). The host then calls
//   vqx::nearest::finish, which rechecks in f64 the rows whose margin is inside the f32 rounding
//   bound. Cosine is the same kernel: the host passes L2-normalised x, the normalised codebook
//   and norms of exactly 1. The N×K score matrix is never stored: memory is O(N + K·D).
//
// Launch shape (kernels/tiles.cuh; the launcher is src/backend/cuda/launch.rs)
//   grid  = (ceil(N / 128), 1, 1), block = (256, 1, 1), no dynamic shared memory.
//   One block owns 128 rows and walks the whole codebook in tiles of 128 codes; the dimension is
//   consumed in chunks of 8 (any D ≥ 1; D = 4096 is 512 chunks). Each chunk of the x tile and of
//   the code tile is staged in shared memory (double-buffered, 2 × 2 × 8 × 132 floats = 16.5 KiB
//   static), the next chunk's global loads are issued before the current chunk is consumed.
//   Thread (ty = tid / 16, tx = tid % 16) accumulates 8 rows × 8 codes of dot products in
//   registers (rows ty·4+{0..3} and 64+ty·4+{0..3}, codes tx·4+{0..3} and 64+tx·4+{0..3}).
//   After the last chunk of a code tile it folds the 64 scores into per-row running
//   (best index, best, runner-up); codes reach a thread in increasing order so a strict `<`
//   keeps the smallest index. At the end the 16 threads that share rows (one half-warp) merge
//   with shuffles, the merge preferring the smaller index on equal scores.
//
// Limits
//   128 registers per thread (launch bounds: 2 blocks of 256 per SM); ptxas: no spills on sm_90,
//   36 bytes of spill stores outside the inner product loop on sm_80.
//   N < 2^63, K < 2^32 (indices are u32), D < 2^31; products are accumulated with fmaf in f32
//   in increasing-d order per (row, code) pair. Inputs must be finite (the host validates).
//   Rows and codes beyond N/K inside a tile are zero-filled and never reported.

#include "candidates.cuh"
#include "tiles.cuh"

// The thread mapping below (16 × 16 threads, 8 × 8 scores each, 4 loads of a 128 × 8 tile per
// thread) is written for exactly these values.
static_assert(NEAREST_BM == 128 && NEAREST_BN == 128 && NEAREST_BK == 8 &&
                  NEAREST_THREADS == 256 && NEAREST_PAD % 4 == 0,
              "nearest_f32's thread mapping assumes 128 × 128 tiles, chunks of 8, 256 threads");

extern "C" __global__ void __launch_bounds__(NEAREST_THREADS, 2)
nearest_f32(const float* __restrict__ x,
            const float* __restrict__ cb,
            const float* __restrict__ norms,
            unsigned int* __restrict__ best_out,
            float* __restrict__ best_score_out,
            float* __restrict__ second_score_out,
            long long n,
            long long k,
            int d)
{
    __shared__ __align__(16) float xs[2][NEAREST_BK][NEAREST_BM + NEAREST_PAD];
    __shared__ __align__(16) float cs[2][NEAREST_BK][NEAREST_BN + NEAREST_PAD];

    const int tid = threadIdx.x;
    const int tx = tid & 15;  // code lane
    const int ty = tid >> 4;  // row lane
    const long long row0 = (long long)blockIdx.x * NEAREST_BM;

    const unsigned int tiles = (unsigned int)((k + NEAREST_BN - 1) / NEAREST_BN);
    const int chunks = (d + NEAREST_BK - 1) / NEAREST_BK;

    // Loader mapping: element e = tid + 256·i (i = 0..3) of a 128×8 tile is (r = e / 8, c = e % 8).
    float xr[4], cr[4];
    // Rows of x this block may read (≤ 128) and the block's first row.
    const int rows_here = (int)min(n - row0, (long long)NEAREST_BM);
    const float* __restrict__ xb = x + row0 * (long long)d;
    auto load = [&](unsigned int tile, int chunk) {
        const int d0 = chunk * NEAREST_BK;
        const long long code0 = (long long)tile * NEAREST_BN;
        const int codes_here = (int)min(k - code0, (long long)NEAREST_BN);
        const float* __restrict__ cbt = cb + code0 * (long long)d;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + NEAREST_THREADS * i;
            const int r = e >> 3;
            const int gd = d0 + (e & 7);
            const bool col_ok = gd < d;
            xr[i] = (r < rows_here && col_ok) ? xb[(long long)r * d + gd] : 0.0f;
            cr[i] = (r < codes_here && col_ok) ? cbt[(long long)r * d + gd] : 0.0f;
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + NEAREST_THREADS * i;
            xs[buf][e & 7][e >> 3] = xr[i];
            cs[buf][e & 7][e >> 3] = cr[i];
        }
    };

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    unsigned int bi[8];
    float bs[8], ss[8];
    init_cands(bi, bs, ss);

    unsigned int tile = 0;
    int chunk = 0;
    int buf = 0;
    load(0, 0);
    while (tile < tiles) {
        store(buf);
        __syncthreads();
        // Issue the next chunk's global loads before consuming this one.
        unsigned int next_tile = tile;
        int next_chunk = chunk + 1;
        if (next_chunk == chunks) {
            next_chunk = 0;
            ++next_tile;
        }
        if (next_tile < tiles) load(next_tile, next_chunk);

#pragma unroll
        for (int kk = 0; kk < NEAREST_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&xs[buf][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&xs[buf][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&cs[buf][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&cs[buf][kk][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }

        if (chunk == chunks - 1) {
            // Epilogue of this code tile: s = ||c||² − 2·dot, folded into the running candidates.
            const unsigned int code0 = tile * NEAREST_BN;
            const int codes_here = (int)min(k - (long long)code0, (long long)NEAREST_BN);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int local = j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4);
                if (local < codes_here) {
                    const unsigned int kc = code0 + (unsigned int)local;
                    const float nrm = norms[kc];
#pragma unroll
                    for (int i = 0; i < 8; ++i)
                        fold_score(bi[i], bs[i], ss[i], fmaf(-2.0f, acc[i][j], nrm), kc);
                }
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
        }

        tile = next_tile;
        chunk = next_chunk;
        buf ^= 1;
    }

    // The 16 threads holding the same rows (tx = 0..15) are one half-warp: merge by shuffles.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        Cand c = {bi[i], bs[i], ss[i]};
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) c = shfl_merge_cand(c, off);
        if (tx == 0) {
            const long long r = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
            if (r < n) {
                best_out[r] = c.idx;
                best_score_out[r] = c.best;
                second_score_out[r] = c.second;
            }
        }
    }
}
